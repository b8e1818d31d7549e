"""The cord CSA at a reproducible level: centreline, fraction, angle-corrected slab mean.

The reference level is an *anchor* on the centreline: a given world point, else the lower end
of the brain parenchyma along the centreline (the foramen magnum). The CSA is the mean of the
angle-corrected slice CSAs over a slab 15–30 mm below the anchor, measured along the
centreline (arc length), so that it does not depend on the head's tilt or the slice thickness.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smoulder.cord.centreline import Centreline, find_centreline
from smoulder.cord.fraction import cord_fraction, slice_cosines, slice_csa_mm2
from smoulder.cord.slices import Contrast
from smoulder.images import save_nifti, save_tsv

__all__ = ["Contrast", "CordMeasure", "measure_cord", "save_cord_outputs"]

#: How far above the top of the centreline the brain mask is looked for (mm).
ANCHOR_REACH_MM = 40.0
#: A brain-mask slice this large (mm²) is the brain's bulk (cerebellum, medulla), not the cord:
#: the cord's CSA is under 150 mm², the medulla's above 300 mm² with the cerebellar tonsils
#: beside it. A mask that runs on down the cord is cut below its bulk (:func:`brain_bulk`).
BULK_AREA_MM2 = 300.0
#: The cord search starts this far below the brain's lower end (mm).
SEED_BELOW_MM = 10.0
#: Share of the slab's slices on which the cord must have been found.
MIN_SLAB_COVERAGE = 0.5


@dataclass
class CordMeasure:
    """The cord CSA of one image and how it was obtained.

    Attributes:
        csa_mm2: mean angle-corrected CSA over the slab (mm²), or None when not measurable.
        status: ``"measured"`` or ``"not measurable"``.
        reason: why (not) measured, in words, with the distances involved.
        contrast: ``"T1"`` or ``"T2"``.
        level: where the slab comes from: ``"anchor"``, ``"brain mask"`` or ``"no anchor"``.
        slab_mm: the slab's (start, end) distances below the anchor (mm); without an anchor,
            below the top of the found cord.
        n_slices: slices averaged.
        slice_index: per centreline slice, its index along the slice axis.
        distance_below_anchor_mm: per centreline slice, arc length below the anchor (mm).
        slice_csa_mm2: per centreline slice, angle-corrected CSA (NaN where not found).
        angle_deg: per centreline slice, the angle between the cord and the slice normal.
        fraction: the cord fraction map on the image grid (zeros when no cord).
        centreline: the centreline, or None when no cord was found.
    """

    csa_mm2: float | None
    status: str
    reason: str
    contrast: Contrast
    level: str = "no anchor"
    slab_mm: tuple[float, float] = (float("nan"), float("nan"))
    n_slices: int = 0
    slice_index: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    distance_below_anchor_mm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    slice_csa_mm2: np.ndarray = field(default_factory=lambda: np.zeros(0))
    angle_deg: np.ndarray = field(default_factory=lambda: np.zeros(0))
    fraction: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.float32))
    centreline: Centreline | None = None
    used: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def to_row(self) -> dict[str, Any]:
        """Return the measure as a flat dict: one TSV row (``n/a`` for missing numbers)."""
        angles = self.angle_deg[self.used] if self.used.any() else np.zeros(0)
        return {
            "cord_csa_mm2": _num(self.csa_mm2),
            "cord_status": self.status,
            "cord_reason": self.reason,
            "cord_contrast": self.contrast,
            "cord_level": self.level,
            "cord_slab_start_mm": _num(self.slab_mm[0]),
            "cord_slab_end_mm": _num(self.slab_mm[1]),
            "cord_slices": self.n_slices,
            "cord_angle_deg": _num(float(angles.mean()) if angles.size else None),
        }


def _num(value: float | None) -> float | str:
    """Return ``value`` rounded to 3 decimals, or ``"n/a"`` when missing."""
    if value is None or not np.isfinite(value):
        return "n/a"
    return round(float(value), 3)


def measure_cord(
    image: np.ndarray,
    affine: np.ndarray,
    contrast: Contrast,
    *,
    anchor_mm: np.ndarray | None = None,
    brain_mask: np.ndarray | None = None,
    level_below_anchor_mm: float = 15.0,
    length_mm: float = 15.0,
) -> CordMeasure:
    """Return the cord's mean CSA over the slab ``level_below_anchor_mm`` + ``length_mm``.

    Args:
        image: 3D intensities.
        affine: 4×4 voxel-to-world matrix (mm).
        contrast: ``"T1"`` (cord brighter than CSF: T1w, UNIT1, FLAIR) or ``"T2"``.
        anchor_mm: world point of the reference level; projected onto the centreline.
        brain_mask: parenchyma mask (or probability) on the image grid; its lower end along
            the centreline is the anchor when ``anchor_mm`` is not given. Either way the cord
            is not looked for above the brain's lowest point.
        level_below_anchor_mm: slab start, below the anchor along the centreline (mm).
        length_mm: slab length (mm).

    Without ``anchor_mm`` or ``brain_mask`` the mean over every slice where the cord was found
    is reported, with ``level`` ``"no anchor"``.
    """
    image = np.asarray(image, np.float32)
    if brain_mask is not None:
        brain_mask = brain_bulk(brain_mask, affine)
    seed_mm = anchor_mm if anchor_mm is not None else _brain_bottom_mm(brain_mask, affine)
    avoid = _above_brain(brain_mask, affine)  # the cord is below the brain, given anchor or not
    line = find_centreline(image, affine, contrast, start_mm=seed_mm, avoid=avoid)
    if line is None:
        return CordMeasure(
            None,
            "not measurable",
            "no cord found: no cord-like tube (a disk of cord in a ring of CSF) in the image",
            contrast,
            fraction=np.zeros(image.shape, np.float32),
        )
    fraction = cord_fraction(image, affine, contrast, line)
    csa = slice_csa_mm2(fraction, affine, line)
    angle = np.degrees(np.arccos(np.clip(slice_cosines(affine, line), 0.0, 1.0)))
    found = line.found & np.isfinite(csa) & (np.nan_to_num(csa) > 0)
    up = _arc_up_mm(line)
    anchor_up, level = _anchor_arc(line, affine, up, anchor_mm, brain_mask)
    common: dict[str, Any] = {
        "contrast": contrast,
        "level": level,
        "slice_index": line.slice_index,
        "slice_csa_mm2": csa,
        "angle_deg": angle,
        "fraction": fraction,
        "centreline": line,
    }
    if anchor_up is None:
        below = up.max() - up
        used = found
        if not used.any():
            return CordMeasure(
                None, "not measurable", "no cord found: no slice held a cord blob", **common
            )
        return CordMeasure(
            float(csa[used].mean()),
            "measured",
            f"no anchor: mean over the {int(used.sum())} slices where the cord was found",
            slab_mm=(float(below[used].min()), float(below[used].max())),
            n_slices=int(used.sum()),
            distance_below_anchor_mm=below,
            used=used,
            **common,
        )
    below = anchor_up - up
    start, end = level_below_anchor_mm, level_below_anchor_mm + length_mm
    return _slab_mean(csa, below, found, (start, end), line, image.shape, common)


def _slab_mean(
    csa: np.ndarray,
    below: np.ndarray,
    found: np.ndarray,
    slab: tuple[float, float],
    line: Centreline,
    shape: tuple[int, ...],
    common: dict[str, Any],
) -> CordMeasure:
    """Return the measure over ``slab`` (mm below the anchor), or why it is not measurable."""
    start, end = slab
    step = float(np.median(np.abs(np.diff(below)))) if len(below) > 1 else 1.0
    reach = float(below[found].max()) if found.any() else float("-inf")
    in_slab = (below >= start - step / 2) & (below <= end + step / 2)
    used = in_slab & found
    edge = line.slice_index[np.argmax(below)] in (0, shape[line.slice_axis] - 1)
    where = "the image's field of view ends" if edge else "the cord is followed to"
    if reach < end - step / 2:
        reason = (
            f"{where} {max(reach, 0.0):.1f} mm below the anchor; the slab needs "
            f"{start:.0f}–{end:.0f} mm below it (the image must reach {end:.0f} mm)"
        )
        return CordMeasure(
            None, "not measurable", reason, slab_mm=slab, distance_below_anchor_mm=below, **common
        )
    if used.sum() < MIN_SLAB_COVERAGE * max(in_slab.sum(), 1):
        reason = f"the cord was found on {int(used.sum())} of {int(in_slab.sum())} slab slices"
        return CordMeasure(
            None, "not measurable", reason, slab_mm=slab, distance_below_anchor_mm=below, **common
        )
    return CordMeasure(
        float(csa[used].mean()),
        "measured",
        f"mean of {int(used.sum())} slices {start:.0f}–{end:.0f} mm below the anchor",
        slab_mm=slab,
        n_slices=int(used.sum()),
        distance_below_anchor_mm=below,
        used=used,
        **common,
    )


def _arc_up_mm(line: Centreline) -> np.ndarray:
    """Return each slice's arc length (mm), increasing towards the head (world +z)."""
    arc = line.arc_length_mm()
    return arc if line.centre_mm[-1, 2] >= line.centre_mm[0, 2] else arc.max() - arc


def _anchor_arc(
    line: Centreline,
    affine: np.ndarray,
    up: np.ndarray,
    anchor_mm: np.ndarray | None,
    brain_mask: np.ndarray | None,
) -> tuple[float | None, str]:
    """Return the anchor's arc length on the centreline (as :func:`_arc_up_mm`) and its kind."""
    top = int(np.argmax(up))
    if anchor_mm is not None:
        # the nearest centreline point; above the top, continue along the top tangent
        anchor = np.asarray(anchor_mm, float)
        dist = np.linalg.norm(line.centre_mm - anchor, axis=1)
        n = int(np.argmin(dist))
        if n == top:
            beyond = float((anchor - line.centre_mm[top]) @ line.tangent[top])
            return float(up[top] + max(beyond, 0.0)), "anchor"
        return float(up[n]), "anchor"
    if brain_mask is None:
        return None, "no anchor"
    mask = np.asarray(brain_mask) >= 0.5
    inside = np.array([_in_mask(mask, affine, p) for p in line.centre_mm])
    if inside.any():
        return float(up[inside].min()), "brain mask"
    for step in np.arange(1.0, ANCHOR_REACH_MM + 1.0):
        point = line.centre_mm[top] + step * line.tangent[top]
        if _in_mask(mask, affine, point):
            return float(up[top] + step), "brain mask"
    return None, "no anchor"


def brain_bulk(brain_mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Return ``brain_mask`` (≥ 0.5) without the slices below the lowest one whose area is at
    least :data:`BULK_AREA_MM2`: a segmentation that labels the cord as white matter would
    otherwise put the anchor at the bottom of the image.

    Examples:
        >>> mask = np.zeros((30, 30, 20), bool)
        >>> mask[5:25, 5:25, 10:] = True  # the brain: 400 mm² slices
        >>> mask[13:17, 13:17, :10] = True  # a cord of 16 mm² below it
        >>> int(np.argwhere(brain_bulk(mask, np.eye(4)))[:, 2].min())
        10
    """
    from smoulder.cord.slices import slice_axis

    mask = np.asarray(brain_mask) >= 0.5
    axis = slice_axis(affine)
    spacing = np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))
    pixel = float(np.prod(np.delete(spacing, axis)))
    areas = mask.sum(axis=tuple(a for a in range(3) if a != axis)) * pixel
    bulk = np.nonzero(areas >= BULK_AREA_MM2)[0]
    if bulk.size == 0:
        return mask
    # the foot end of the slice axis: where world z is lowest
    foot_first = float(np.asarray(affine, float)[2, axis]) > 0
    keep = np.zeros(mask.shape[axis], bool)
    if foot_first:
        keep[bulk.min() :] = True
    else:
        keep[: bulk.max() + 1] = True
    shape = [1, 1, 1]
    shape[axis] = -1
    return mask & keep.reshape(shape)


def _brain_bottom_mm(brain_mask: np.ndarray | None, affine: np.ndarray) -> np.ndarray | None:
    """Return where to start looking for the cord: the world centre of the lowest 3 mm of
    ``brain_mask``, :data:`SEED_BELOW_MM` further down (the cord, not the brainstem above it,
    is then the nearest cord-like tube)."""
    if brain_mask is None:
        return None
    ijk = np.argwhere(np.asarray(brain_mask) >= 0.5)
    if len(ijk) == 0:
        return None
    world = ijk @ np.asarray(affine, float)[:3, :3].T + np.asarray(affine, float)[:3, 3]
    low = world[world[:, 2] <= world[:, 2].min() + 3.0]
    return np.asarray(low.mean(axis=0)) - np.array([0.0, 0.0, SEED_BELOW_MM])


def _above_brain(brain_mask: np.ndarray | None, affine: np.ndarray) -> np.ndarray | None:
    """Return the voxels at or above the lowest world z of ``brain_mask``, None without one.

    The cord is measured below the brain, and tracking it up into the head only risks
    following the brain's surface or the skull: the cord is neither looked for nor
    followed there (its anchor is found along its tangent, :func:`_anchor_arc`).
    """
    if brain_mask is None:
        return None
    mask = np.asarray(brain_mask) >= 0.5
    if not mask.any():
        return None
    row = np.asarray(affine, float)[2]
    grids = np.ogrid[tuple(slice(0, n) for n in mask.shape)]
    z_mm = row[0] * grids[0] + row[1] * grids[1] + row[2] * grids[2] + row[3]
    return np.asarray(z_mm >= z_mm[mask].min())


def _in_mask(mask: np.ndarray, affine: np.ndarray, point_mm: np.ndarray) -> bool:
    """Return whether the voxel nearest ``point_mm`` is inside ``mask`` (False outside it)."""
    ijk = np.round(np.linalg.solve(np.asarray(affine, float), np.append(point_mm, 1.0))[:3])
    idx = ijk.astype(int)
    if np.any(idx < 0) or np.any(idx >= mask.shape):
        return False
    return bool(mask[tuple(idx)])


def save_cord_outputs(
    measure: CordMeasure, affine: np.ndarray, out_dir: str | Path, prefix: str
) -> dict[str, Path]:
    """Return the paths written: the cord fraction, its mask and the centreline table.

    Files, in ``out_dir``: ``<prefix>_label-cord_probseg.nii.gz`` (fraction, float32),
    ``<prefix>_label-cord_mask.nii.gz`` (fraction ≥ 0.5, uint8) and
    ``<prefix>_desc-cordcentreline.tsv`` (per slice: index, world centre and tangent, found,
    distance below the anchor, CSA). Each is written to a temporary name, then renamed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "probseg": out / f"{prefix}_label-cord_probseg.nii.gz",
        "mask": out / f"{prefix}_label-cord_mask.nii.gz",
        "centreline": out / f"{prefix}_desc-cordcentreline.tsv",
    }
    save_nifti(measure.fraction.astype(np.float32), affine, paths["probseg"])
    save_nifti((measure.fraction >= 0.5).astype(np.uint8), affine, paths["mask"])
    save_tsv(_centreline_rows(measure), paths["centreline"], columns=CENTRELINE_COLUMNS)
    return paths


CENTRELINE_COLUMNS = [
    "slice_index",
    "x_mm",
    "y_mm",
    "z_mm",
    "tangent_x",
    "tangent_y",
    "tangent_z",
    "found",
    "distance_below_anchor_mm",
    "csa_mm2",
    "angle_deg",
    "in_slab",
]


def _centreline_rows(measure: CordMeasure) -> list[dict[str, Any]]:
    """Return one row per centreline slice for the centreline table."""
    line = measure.centreline
    if line is None:
        return []
    rows = []
    for n, s in enumerate(line.slice_index):
        below = measure.distance_below_anchor_mm
        rows.append(
            {
                "slice_index": int(s),
                "x_mm": round(float(line.centre_mm[n, 0]), 3),
                "y_mm": round(float(line.centre_mm[n, 1]), 3),
                "z_mm": round(float(line.centre_mm[n, 2]), 3),
                "tangent_x": round(float(line.tangent[n, 0]), 5),
                "tangent_y": round(float(line.tangent[n, 1]), 5),
                "tangent_z": round(float(line.tangent[n, 2]), 5),
                "found": int(line.found[n]),
                "distance_below_anchor_mm": _num(float(below[n]) if n < len(below) else None),
                "csa_mm2": _num(float(measure.slice_csa_mm2[n])),
                "angle_deg": _num(float(measure.angle_deg[n])),
                "in_slab": int(measure.used[n]) if n < len(measure.used) else 0,
            }
        )
    return rows
