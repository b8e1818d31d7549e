"""Tissue volumes (ml) of a class map, one number per named tissue.

A tissue is a name of :data:`smoulder.segmentation.classes.TISSUES` and sums the classes listed
there. White matter exists in two meanings: ``WM`` (lesions excluded) and ``WM_lesions_filled``
(lesions counted as white matter, as atrophy measures count it so that a new lesion is not read
as white-matter loss).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from smoulder.grids import voxel_volume_mm3
from smoulder.segmentation.classes import TISSUES

#: Tissues whose volume a session's atrophy measures report, in display order.
ATROPHY_TISSUES: tuple[str, ...] = ("brain", "GM", "WM_lesions_filled", "lesion")


def tissue_volumes_ml(
    dseg: np.ndarray,
    affine: np.ndarray,
    class_index: Mapping[str, int],
    tissues: Sequence[str] = ATROPHY_TISSUES,
) -> dict[str, float]:
    """Return ``{tissue: volume (ml)}`` of the class map ``dseg``, rounded to 1 µl.

    Args:
        dseg: the class map (integer labels; 3D).
        affine: its voxel-to-world matrix (mm), for the voxel volume.
        class_index: ``{class name: label}`` of the map, as its ``_dseg.tsv`` lists them.
            Classes of a tissue that the map lacks count as zero.
        tissues: keys of :data:`~smoulder.segmentation.classes.TISSUES` to measure.

    Returns:
        One volume per tissue of ``tissues``, in millilitres (1 ml = 1000 mm³).

    Examples:
        >>> dseg = np.array([[[0, 4, 4, 5]]])  # two WM voxels and one lesion voxel
        >>> names = {"background": 0, "WM": 4, "lesion": 5}
        >>> cm = np.diag([10.0, 10.0, 10.0, 1.0])  # 1 ml voxels
        >>> tissue_volumes_ml(dseg, cm, names, ("WM", "WM_lesions_filled"))
        {'WM': 2.0, 'WM_lesions_filled': 3.0}
    """
    voxel_ml = voxel_volume_mm3(affine) / 1000.0
    counts = np.bincount(dseg.ravel().astype(np.int64), minlength=max(class_index.values()) + 1)
    return {
        tissue: round(
            float(sum(counts[class_index[c]] for c in TISSUES[tissue] if c in class_index))
            * voxel_ml,
            3,
        )
        for tissue in tissues
    }


#: Intracranial volume of the standard head the normalised brain volume is scaled to (ml).
STANDARD_ICV_ML = 1500.0


def session_volumes(
    dseg: np.ndarray,
    affine: np.ndarray,
    class_index: Mapping[str, int],
    *,
    standard_icv_ml: float = STANDARD_ICV_ML,
) -> dict[str, float]:
    """Return a session's cross-sectional volumes (ml) and fractions from its class map.

    Brain is the parenchyma (GM, WM and lesions); the intracranial volume (ICV) adds the CSF;
    the brain parenchymal fraction (BPF) is their ratio. The normalised brain volume scales
    the brain to a head of ``standard_icv_ml``: the volume factor ``standard_icv_ml / ICV``
    plays the part of SIENAX's skull-to-template scaling (a volume ratio of head sizes).

    Examples:
        >>> names = {"background": 0, "CSF": 1, "cortical_GM": 2, "deep_GM": 3, "WM": 4,
        ...          "lesion": 5}
        >>> dseg = np.array([[[1, 2, 2, 3, 4, 4, 4, 5]]])
        >>> v = session_volumes(dseg, np.diag([10.0, 10.0, 10.0, 1.0]), names,
        ...                     standard_icv_ml=16.0)
        >>> v["brain_ml"], v["icv_ml"], v["bpf"], v["nbv_ml"], v["head_scale"]
        (7.0, 8.0, 0.875, 14.0, 2.0)
    """
    v = tissue_volumes_ml(
        dseg,
        affine,
        class_index,
        ("brain", "GM", "cortical_GM", "deep_GM", "WM_lesions_filled", "lesion", "CSF"),
    )
    icv = v["brain"] + v["CSF"]
    scale = standard_icv_ml / icv if icv > 0 else float("nan")
    return {
        "brain_ml": v["brain"],
        "gm_ml": v["GM"],
        "cortical_gm_ml": v["cortical_GM"],
        "deep_gm_ml": v["deep_GM"],
        "wm_lesions_filled_ml": v["WM_lesions_filled"],
        "lesion_ml": v["lesion"],
        "csf_ml": v["CSF"],
        "icv_ml": round(icv, 3),
        "bpf": round(v["brain"] / icv, 5) if icv > 0 else float("nan"),
        "head_scale": round(scale, 5),
        "nbv_ml": round(v["brain"] * scale, 3),
    }
