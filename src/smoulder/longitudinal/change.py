"""Intensity change between two sessions on the within-subject grid: the evidence behind "new"
and "enlarging".

Two independently segmented masks differ wherever either segmentation wavers; the images
themselves say whether tissue changed. Both sessions' FLAIRs (or T1w) are on one grid
(:mod:`smoulder.longitudinal.space`); the later one is brought to the earlier one's intensity
scale by a differential bias correction (Lewis & Fox, NeuroImage 2004: the ratio of the two
images, median-filtered over normal-appearing white matter and smoothed, removes slowly
varying intensity differences between sessions: scanner drift, coil and bias-field changes)
and the difference is scaled by its robust spread in normal-appearing white matter: a change
z-map. A lesion is *new* when its voxels brightened (mean z above ``new_z``), not merely when
the later segmentation has it and the earlier one missed it; an old lesion *grows* where voxels
next to it brightened.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Smoothing (mm) of the session-to-session intensity ratio: bias fields vary over centimetres.
BIAS_SMOOTHING_MM = 12.0


@dataclass
class ChangeMap:
    """The intensity change from an earlier to a later session on one grid.

    Attributes:
        z: (later − earlier) / robust SD, both normalised to normal-appearing WM.
        earlier: the earlier image, divided by its NAWM median.
        later: the later image after the differential bias correction, same scale.
        noise_sd: the robust SD of the difference in NAWM (in NAWM-median units).
    """

    z: np.ndarray
    earlier: np.ndarray
    later: np.ndarray
    noise_sd: float


def change_map(
    earlier: np.ndarray,
    later: np.ndarray,
    nawm: np.ndarray,
    voxel_mm: float,
    *,
    brain: np.ndarray | None = None,
) -> ChangeMap:
    """Return the normalised intensity change from ``earlier`` to ``later`` (same grid).

    Args:
        earlier, later: the two sessions' images on the within-subject grid.
        nawm: normal-appearing white matter in both sessions (where the tissue is assumed not
            to change): the reference of the intensity scale, the bias ratio and the noise.
        voxel_mm: the grid's voxel edge (mm), for the smoothing.
        brain: where the ratio is extrapolated to (default: everywhere).

    Raises:
        ValueError: fewer than 100 NAWM voxels with signal in both images.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> a = 1 + 0.01 * rng.standard_normal((20, 20, 20))
        >>> b = 1.3 * (1 + 0.01 * rng.standard_normal((20, 20, 20)))  # a global drift
        >>> b[5:8, 5:8, 5:8] *= 1.5                                     # and a new lesion
        >>> wm = np.ones(a.shape, bool); wm[4:9, 4:9, 4:9] = False
        >>> cm = change_map(a, b, wm, 1.0)
        >>> bool(cm.z[6, 6, 6] > 10), bool(abs(np.median(cm.z[wm])) < 0.5)
        (True, True)
    """
    a = np.asarray(earlier, np.float32)
    b = np.asarray(later, np.float32)
    ref = np.asarray(nawm, bool) & (a > 0) & (b > 0)
    if int(ref.sum()) < 100:
        raise ValueError(
            f"change map: expected >= 100 normal-appearing white-matter voxels with signal in "
            f"both sessions, found {int(ref.sum())}"
        )
    a_n = a / float(np.median(a[ref]))
    b_n = b / float(np.median(b[ref]))
    ratio = _smooth_ratio(b_n, a_n, ref, BIAS_SMOOTHING_MM / max(voxel_mm, 1e-3))
    if brain is not None:
        ratio = np.where(np.asarray(brain, bool), ratio, 1.0)
    b_c = b_n / np.maximum(ratio, 1e-3)
    diff = b_c - a_n
    centre = float(np.median(diff[ref]))
    sd = 1.4826 * float(np.median(np.abs(diff[ref] - centre)))
    sd = max(sd, 1e-6)
    return ChangeMap(((diff - centre) / sd).astype(np.float32), a_n, b_c.astype(np.float32), sd)


def _smooth_ratio(
    num: np.ndarray, den: np.ndarray, where: np.ndarray, sigma_vox: float
) -> np.ndarray:
    """Return ``num / den`` over ``where``, smoothed (normalised convolution) and extended."""
    ratio = np.where(where, num / np.maximum(den, 1e-6), 0.0).astype(np.float32)
    # robust: clip the per-voxel ratio to its central range before smoothing
    lo, hi = np.percentile(ratio[where], [5, 95])
    ratio = np.where(where, np.clip(ratio, lo, hi), 0.0)
    weight = ndimage.gaussian_filter(where.astype(np.float32), sigma_vox)
    smooth = ndimage.gaussian_filter(ratio, sigma_vox)
    fallback = float(np.median(ratio[where]))
    return np.where(weight > 1e-3, smooth / np.maximum(weight, 1e-6), fallback).astype(np.float32)


def new_lesion_evidence(z: np.ndarray, region: np.ndarray) -> float:
    """Return the mean change z of ``region`` (NaN for an empty region).

    Examples:
        >>> new_lesion_evidence(np.array([0.0, 3.0, 5.0]), np.array([False, True, True]))
        4.0
    """
    region = np.asarray(region, bool)
    return float(np.mean(z[region])) if region.any() else float("nan")


def growth_voxels(
    z: np.ndarray, earlier_lesion: np.ndarray, later_lesion: np.ndarray, *, min_z: float
) -> np.ndarray:
    """Return the voxels a lesion gained that brightened: in the later lesion, outside the
    earlier one, with change z ≥ ``min_z``.

    Examples:
        >>> z = np.array([0.0, 0.0, 4.0, 0.5])
        >>> growth_voxels(z, np.array([1, 1, 0, 0]), np.array([1, 1, 1, 1]), min_z=2.0).tolist()
        [False, False, True, False]
    """
    return np.asarray(later_lesion, bool) & ~np.asarray(earlier_lesion, bool) & (z >= min_z)
