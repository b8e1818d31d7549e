"""The partial-volume cord fraction map and the angle-corrected cross-sectional area per slice."""

from __future__ import annotations

import numpy as np

from smoulder.cord.centreline import Centreline
from smoulder.cord.slices import (
    Contrast,
    contrast_sign,
    in_plane_axes,
    in_plane_spacing_mm,
    slice_fraction,
    slice_levels,
    slice_normal,
)

__all__ = ["cord_fraction", "slice_csa_mm2", "slice_cosines"]

#: Slices over which the cord and CSF intensities are median-smoothed (noise, not anatomy).
LEVEL_SMOOTHING_SLICES = 5


def _slice_centre(centreline: Centreline, n: int) -> np.ndarray:
    u, v = in_plane_axes(centreline.slice_axis)
    return centreline.centre_vox[n, [u, v]]


def cord_fraction(
    image: np.ndarray, affine: np.ndarray, contrast: Contrast, centreline: Centreline
) -> np.ndarray:
    """Return the cord's partial-volume fraction (float32 in [0, 1]) on the image grid.

    On each slice where the centreline found the cord, the cord and CSF intensities are
    estimated around the centre (:func:`~smoulder.cord.slices.slice_levels`), median-smoothed
    over :data:`LEVEL_SMOOTHING_SLICES` slices, and turned into fractions restricted to the
    cord blob and its one-voxel edge (:func:`~smoulder.cord.slices.slice_fraction`). Other
    slices are 0. The binary cord mask is ``fraction >= 0.5``.

    Args:
        image: 3D intensities.
        affine: 4×4 voxel-to-world matrix (mm).
        contrast: ``"T1"`` or ``"T2"``.
        centreline: from :func:`~smoulder.cord.centreline.find_centreline` on this image.
    """
    sign = contrast_sign(contrast)
    axis = centreline.slice_axis
    stack = np.moveaxis(np.asarray(image, np.float32), axis, -1)
    spacing = in_plane_spacing_mm(affine, axis)
    out = np.zeros(stack.shape, np.float32)
    rows = np.flatnonzero(centreline.found)
    levels = np.full((len(centreline.slice_index), 2), np.nan)
    for n in rows:
        plane = stack[:, :, centreline.slice_index[n]]
        found = slice_levels(plane, _slice_centre(centreline, n), spacing, sign)
        if found is not None:
            levels[n] = found
    levels = _smooth_levels(levels, centreline.found)
    for n in rows:
        if not np.isfinite(levels[n]).all():
            continue
        s = centreline.slice_index[n]
        plane = stack[:, :, s]
        cord, csf = (float(x) for x in levels[n])
        frac = slice_fraction(plane, _slice_centre(centreline, n), spacing, cord, csf, sign)
        if frac is not None:
            out[:, :, s] = frac
    return np.moveaxis(out, -1, axis)


def _smooth_levels(levels: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Return per-slice (cord, CSF) levels median-smoothed over the found slices, gaps filled.

    Examples:
        >>> lv = np.array([[10.0, 1], [11, 1], [50, 1], [np.nan, np.nan], [10, 2]])
        >>> _smooth_levels(lv, np.ones(5, bool))[:, 0].tolist()
        [11.0, 11.0, 10.5, 11.0, 30.0]
    """
    ok = np.isfinite(levels).all(axis=1)
    out = np.full_like(levels, np.nan)
    if not ok.any():
        return out
    idx = np.flatnonzero(ok)
    half = LEVEL_SMOOTHING_SLICES // 2
    for n in np.flatnonzero(found):
        near = idx[np.abs(idx - n) <= half]
        if near.size == 0:
            near = idx[[np.argmin(np.abs(idx - n))]]
        out[n] = np.median(levels[near], axis=0)
    return out


def slice_cosines(affine: np.ndarray, centreline: Centreline) -> np.ndarray:
    """Return, per centreline slice, cos(angle between the tangent and the slice normal).

    Examples:
        >>> from smoulder.cord.centreline import Centreline
        >>> t = np.array([[0.0, np.sin(0.5), np.cos(0.5)]])
        >>> line = Centreline(2, np.array([0]), np.zeros((1, 3)), np.zeros((1, 3)), t,
        ...                   np.array([True]))
        >>> round(float(slice_cosines(np.eye(4), line)[0]), 6) == round(float(np.cos(0.5)), 6)
        True
    """
    normal, _ = slice_normal(affine, centreline.slice_axis)
    return np.abs(centreline.tangent @ normal)


def slice_csa_mm2(fraction: np.ndarray, affine: np.ndarray, centreline: Centreline) -> np.ndarray:
    """Return the angle-corrected cord cross-sectional area (mm²) of each centreline slice.

    CSA = Σ fraction on the slice × in-plane voxel area × cos(angle between the centreline
    tangent and the slice normal): a slice cuts a tilted cylinder in an ellipse stretched by
    1 / cos, so the correction is exact for a straight tube. Slices where the cord was not
    found are NaN.

    Args:
        fraction: cord fraction on the image grid (:func:`cord_fraction`), or a binary mask.
        affine: 4×4 voxel-to-world matrix (mm).
        centreline: the cord's centreline on that grid.
    """
    axis = centreline.slice_axis
    _, area = slice_normal(affine, axis)
    stack = np.moveaxis(np.asarray(fraction, np.float64), axis, -1)
    sums = stack.sum(axis=(0, 1))[centreline.slice_index]
    csa = sums * area * slice_cosines(affine, centreline)
    return np.where(centreline.found, csa, np.nan)
