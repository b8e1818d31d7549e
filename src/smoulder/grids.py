"""Voxel grids: their voxel sizes, a RAS+ grid covering an image, and resampling onto a grid.

A *grid* is a ``(shape, affine)`` pair: ``shape`` the three voxel counts, ``affine`` the 4×4
voxel-to-world matrix (RAS mm, as nibabel). Every module that needs a voxel size, a grid of
its own, or an array moved between grids uses these functions; resampling *through a
transform* (registration, chains of transforms) is :func:`smoulder.registration.transforms.
resample`, which calls nothing here.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

Shape3 = tuple[int, int, int]


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Return the three voxel sizes (mm) of a voxel-to-world ``affine``: its column norms.

    Examples:
        >>> voxel_sizes(np.diag([-0.5, 0.5, 3.0, 1.0])).tolist()
        [0.5, 0.5, 3.0]
    """
    return np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Return the volume of one voxel (mm³) of a voxel-to-world ``affine``.

    Examples:
        >>> round(voxel_volume_mm3(np.diag([0.5, 0.5, 3.0, 1.0])), 6)
        0.75
    """
    return float(abs(np.linalg.det(np.asarray(affine, float)[:3, :3])))


def covering_grid(img: nib.Nifti1Image, spacing_mm: float) -> tuple[Shape3, np.ndarray]:
    """Return shape and affine of the RAS+ grid of ``spacing_mm`` voxels covering ``img``.

    The grid spans the image's field of view (the outer faces of its corner voxels, in world
    space) and is centred on it, whatever the image's orientation.

    Examples:
        >>> img = nib.Nifti1Image(np.zeros((10, 20, 5), np.float32), np.diag([2.0, 1.0, 3.0, 1]))
        >>> covering_grid(img, 1.0)[0]
        (20, 20, 15)
    """
    shape = np.array(img.shape[:3])
    corners = np.array(
        [
            [i, j, k, 1.0]
            for i in (-0.5, shape[0] - 0.5)
            for j in (-0.5, shape[1] - 0.5)
            for k in (-0.5, shape[2] - 0.5)
        ]
    )
    world = (img.affine @ corners.T)[:3]
    lo, hi = world.min(1), world.max(1)
    n = np.maximum(np.round((hi - lo) / spacing_mm).astype(int), 1)
    affine = np.diag([spacing_mm] * 3 + [1.0])
    centre = (lo + hi) / 2
    affine[:3, 3] = centre - spacing_mm * (n - 1) / 2
    return tuple(int(v) for v in n), affine  # type: ignore[return-value]


def resample_to_grid(
    data: np.ndarray,
    src_affine: np.ndarray,
    shape: Sequence[int],
    dst_affine: np.ndarray,
    order: int = 1,
) -> np.ndarray:
    """Return ``data`` (on ``src_affine``) sampled at the voxels of the ``shape``/``dst_affine``
    grid, as float32, zero outside ``data``.

    Where the grids' axes are parallel (the usual case: a RAS+ grid against an image stored in
    RAS, LAS, LPS… order) no general interpolation is needed: voxels that coincide are copied
    (axes permuted, flipped and shifted), and scaled axes go through scipy's separable zoom.
    ``ndi.affine_transform`` with a full matrix takes 0.5–2 s per 1 mm volume even for the
    identity.

    Args:
        data: 3D array on the source grid.
        src_affine: its voxel-to-world matrix.
        shape: the destination grid's shape.
        dst_affine: the destination grid's voxel-to-world matrix.
        order: spline order of the interpolation (1: linear, 0: nearest).

    Examples:
        >>> d = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
        >>> flip = np.diag([-1.0, 1, 1, 1]); flip[0, 3] = 1.0  # LAS, same voxels
        >>> bool(np.array_equal(resample_to_grid(d, flip, (2, 3, 4), np.eye(4)), d[::-1]))
        True
        >>> shifted = np.eye(4); shifted[1, 3] = 1.0  # one voxel further along the second axis
        >>> resample_to_grid(d, np.eye(4), (2, 3, 4), shifted)[0, :, 0].tolist()
        [4.0, 8.0, 0.0]
    """
    m = np.linalg.inv(src_affine) @ dst_affine
    data = np.asarray(data, np.float32)
    lin, shift = m[:3, :3], m[:3, 3]
    nonzero = np.abs(lin) > 1e-6
    if nonzero.sum() == 3 and nonzero.any(0).all() and nonzero.any(1).all():
        source = [int(np.flatnonzero(nonzero[:, j])[0]) for j in range(3)]  # per output axis
        scale = np.array([lin[source[j], j] for j in range(3)])
        offset = np.array([shift[source[j]] for j in range(3)])
        view = np.transpose(data, source)
        for j in range(3):
            if scale[j] < 0:  # flipped axis: index n − 1 − i
                view = np.flip(view, j)
                scale[j], offset[j] = -scale[j], view.shape[j] - 1 - offset[j]
        if np.allclose(scale, 1.0, atol=1e-6) and np.allclose(offset, np.round(offset), atol=1e-4):
            return _copy_shifted(view, np.round(offset).astype(int), tuple(shape))
        with warnings.catch_warnings():  # a 1-D matrix is the diagonal: SciPy notes it changed
            warnings.filterwarnings("ignore", "The behavior of affine_transform", UserWarning)
            return ndi.affine_transform(
                np.ascontiguousarray(view),
                scale,
                offset,
                output_shape=tuple(shape),
                order=order,
                mode="constant",
                cval=0.0,
            )
    return ndi.affine_transform(
        data,
        lin,
        shift,
        output_shape=tuple(shape),
        order=order,
        mode="constant",
        cval=0.0,
    )


def resample_image(
    img: nib.Nifti1Image, shape: Sequence[int], affine: np.ndarray, order: int = 1
) -> nib.Nifti1Image:
    """Return ``img`` resampled onto the ``shape``/``affine`` grid (float32, zero outside).

    Examples:
        >>> img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
        >>> resample_image(img, (2, 2, 2), np.diag([2.0, 2, 2, 1])).shape
        (2, 2, 2)
    """
    data = resample_to_grid(np.asarray(img.dataobj), img.affine, shape, affine, order)
    return nib.Nifti1Image(data, np.asarray(affine, float))


def sample_world(img: nib.Nifti1Image, world_mm: np.ndarray) -> np.ndarray:
    """Return ``img`` at world points ``(N, 3)`` (trilinear, 0 outside).

    Examples:
        >>> img = nib.Nifti1Image(np.arange(8, dtype=np.float32).reshape(2, 2, 2), np.eye(4))
        >>> sample_world(img, np.array([[0.5, 0.0, 0.0], [5.0, 5.0, 5.0]])).tolist()
        [2.0, 0.0]
    """
    vox = (np.linalg.inv(img.affine) @ np.c_[world_mm, np.ones(len(world_mm))].T)[:3]
    return ndi.map_coordinates(np.asarray(img.dataobj, np.float32), vox, order=1, mode="constant")


def _copy_shifted(view: np.ndarray, offset: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Return ``out`` of ``shape`` with ``out[o] = view[o + offset]`` where that lies inside
    ``view``, else 0."""
    out = np.zeros(shape, np.float32)
    dst, src = [], []
    for n_out, n_in, t in zip(shape, view.shape, offset, strict=True):
        lo, hi = max(0, -int(t)), min(n_out, n_in - int(t))
        if hi <= lo:
            return out
        dst.append(slice(lo, hi))
        src.append(slice(lo + int(t), hi + int(t)))
    out[tuple(dst)] = view[tuple(src)]
    return out
