"""One session's cross-sectional atrophy measures: tissue volumes and the cord area.

The volumes come from the session's class map (:func:`smoulder.atrophy.volumes.
session_volumes`); the cord is found and measured on the T1-weighted image (T1w, else UNIT1)
or, without one, on the FLAIR, with a flag (:func:`smoulder.cord.measure.measure_cord`), at a
slab below the lower end of the brain along the cord.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import nibabel as nib
import numpy as np

from smoulder.atrophy.volumes import STANDARD_ICV_ML, session_volumes
from smoulder.cord.measure import CordMeasure, measure_cord


def cord_measure(
    image: nib.Nifti1Image,
    *,
    brain_mask: nib.Nifti1Image | None = None,
    anchor_mm: np.ndarray | None = None,
    level_below_anchor_mm: float = 15.0,
    length_mm: float = 15.0,
) -> CordMeasure:
    """Return the cord measure of a T1-like image (T1w, UNIT1 or FLAIR: cord brighter than
    CSF) at the slab below ``anchor_mm``, else below the lower end of ``brain_mask`` (which
    also keeps the search below the brain)."""
    mask = None if brain_mask is None else np.asarray(brain_mask.dataobj) > 0.5
    return measure_cord(
        np.asarray(image.dataobj, np.float32),
        image.affine,
        "T1",
        anchor_mm=anchor_mm,
        brain_mask=mask,
        level_below_anchor_mm=level_below_anchor_mm,
        length_mm=length_mm,
    )


def anchor_point(measure: CordMeasure) -> np.ndarray | None:
    """Return the world point (mm) of a measure's anchor on its centreline, or ``None``.

    The anchor is where the distance below it is zero: the centreline point nearest that
    distance, moved along the cord's tangent by what remains (above the found cord, the
    tangent is followed up to the anchor).
    """
    line = measure.centreline
    below = measure.distance_below_anchor_mm
    if line is None or below.size == 0 or measure.level == "no anchor":
        return None
    n = int(np.argmin(np.abs(below)))
    return np.asarray(line.centre_mm[n] + below[n] * line.tangent[n], float)


def session_row(
    dseg: nib.Nifti1Image,
    class_index: Mapping[str, int],
    cord: CordMeasure | None,
    *,
    cord_image: str,
    standard_icv_ml: float = STANDARD_ICV_ML,
) -> dict[str, Any]:
    """Return the session's cross-sectional row: volumes (ml), fractions and the cord.

    Args:
        dseg: the class map; ``class_index``: its ``{class name: label}``.
        cord: the cord measure (``None``: not attempted).
        cord_image: the image the cord was measured on (``T1w``, ``UNIT1``, ``FLAIR``); a
            FLAIR is flagged, its cord/CSF contrast is the weakest.
    """
    row: dict[str, Any] = dict(
        session_volumes(
            np.asarray(dseg.dataobj), dseg.affine, class_index, standard_icv_ml=standard_icv_ml
        )
    )
    if cord is not None:
        row.update(cord.to_row())
        row["cord_image"] = cord_image
        row["cord_flag"] = "FLAIR only (no T1w)" if cord_image == "FLAIR" else "none"
    return row
