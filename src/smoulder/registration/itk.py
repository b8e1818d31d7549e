"""Transforms in the file formats of ITK/ANTs (LPS world coordinates)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from smoulder.images import atomic_path

#: RAS ↔ LPS: ITK's physical space flips the first two world axes.
RAS_TO_LPS = np.array([-1.0, -1.0, 1.0], np.float32)


def save_displacement_field(target_mm: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Return ``path`` after writing an ITK/ANTs displacement field, atomically.

    Args:
        target_mm: ``(3, X, Y, Z)`` RAS world position that each voxel of the grid maps to.
        affine: voxel-to-world (RAS) matrix of the grid the field is defined on.
        path: destination (``.nii.gz``); the NIfTI is 5D ``(X, Y, Z, 1, 3)`` with vector intent
            and LPS displacements in millimetres, the layout ``antsApplyTransforms`` reads.
    """
    shape = target_mm.shape[1:]
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    world = np.tensordot(affine[:3, :3].astype(np.float32), idx, axes=1)
    world += affine[:3, 3, None, None, None].astype(np.float32)
    disp = (target_mm - world) * RAS_TO_LPS[:, None, None, None]
    data = np.moveaxis(disp, 0, -1)[:, :, :, None, :].astype(np.float32)
    img = nib.Nifti1Image(data, affine)
    img.header.set_intent("vector")
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return Path(path)
