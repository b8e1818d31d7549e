"""The reference session's lesions followed into later sessions.

Lesions are those of the reference (first) session. A later session's lesion instances are
mapped onto the reference grid through the longitudinal transform (nearest neighbour, so
instance labels stay labels); a reference lesion's volume in that session is the volume of the
mapped lesions inside it (0 µl: gone, or not matched).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from smoulder.grids import voxel_volume_mm3

if TYPE_CHECKING:
    from smoulder.registration.transforms import Transform


def map_instances(
    instances: nib.Nifti1Image, reference: nib.Nifti1Image, transform: Transform
) -> np.ndarray:
    """Return a later session's lesion ``instances`` resampled onto the ``reference`` grid.

    Args:
        instances: the later session's lesion instance map.
        reference: an image on the reference session's grid.
        transform: the longitudinal transform from the reference grid to the later session
            (a pull-back: reference points to later-session points).

    Returns:
        The instance labels on the reference grid (nearest neighbour).
    """
    from smoulder.registration.transforms import resample

    moved = resample(instances, reference, transform, interpolation="nearest")
    return np.asarray(moved.dataobj)


def lesion_volumes_ul(
    ref_instances: np.ndarray, affine: np.ndarray, mapped: Iterable[np.ndarray | None]
) -> dict[int, list[float | None]]:
    """Return ``{reference lesion id: [volume µl per session]}``.

    Args:
        ref_instances: the reference session's lesion instances (0: background).
        affine: their voxel-to-world matrix (mm), for the voxel volume (1 mm³ = 1 µl).
        mapped: for each later session, its lesion instances on the reference grid (see
            :func:`map_instances`), or None where the session could not be mapped.

    Returns:
        For each lesion id from 1 to the largest, its volume in the reference session then in
        each later one: the volume of the later session's lesions inside it (None: not mapped).

    Examples:
        >>> ref = np.array([[[1, 1, 2, 0]]])
        >>> later = np.array([[[0, 3, 3, 3]]])
        >>> lesion_volumes_ul(ref, np.diag([2.0, 1.0, 1.0, 1.0]), [later, None])
        {1: [4.0, 2.0, None], 2: [2.0, 2.0, None]}
    """
    ref_inst = np.asarray(ref_instances).astype(np.int64)
    voxel_ul = voxel_volume_mm3(affine)
    n = int(ref_inst.max())
    out: dict[int, list[float | None]] = {
        i: [float(c) * voxel_ul]
        for i, c in enumerate(np.bincount(ref_inst.ravel(), minlength=n + 1))
        if i > 0
    }
    for later in mapped:
        if later is None:
            for values in out.values():
                values.append(None)
            continue
        counts = np.bincount(ref_inst[later > 0], minlength=n + 1)
        for i, values in out.items():
            values.append(float(counts[i]) * voxel_ul)
    return out
