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
