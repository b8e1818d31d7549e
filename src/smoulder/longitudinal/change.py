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

import nibabel as nib
import numpy as np
from scipy import ndimage

from smoulder.grids import sample_world

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
    cm: ChangeMap,
    earlier_lesion: np.ndarray,
    later_lesion: np.ndarray,
    *,
    min_z: float,
    where: tuple[slice, ...] | None = None,
) -> np.ndarray:
    """Return the voxels a lesion gained that turned from normal-appearing to lesional: in
    the later lesion, outside the earlier one, brightened by change z ≥ ``min_z``, below the
    halfway level between NAWM (1) and the earlier lesion's median intensity before and above
    it after. A lesion that only brightened as a whole (contrast drift) gains nothing.

    Args:
        cm: the interval's change map.
        earlier_lesion, later_lesion: the lesion's masks (on ``cm``'s grid, or its ``where`` box).
        min_z: smallest change z of a gained voxel.
        where: the box of ``cm`` the masks cover (None: the whole grid).

    Examples:
        >>> z = np.array([0.0, 0.0, 4.0, 0.5, 4.0])
        >>> before = np.array([1.0, 2.0, 1.0, 1.0, 1.9])   # NAWM-scaled
        >>> after = np.array([1.0, 2.0, 2.0, 1.0, 2.4])
        >>> cm = ChangeMap(z, before, after, 0.05)
        >>> was, now = np.array([0, 1, 0, 0, 0]), np.array([0, 1, 1, 1, 1])
        >>> growth_voxels(cm, was, now, min_z=2.0).tolist()
        [False, False, True, False, False]
    """
    box = where or tuple(slice(None) for _ in cm.z.shape)
    z, before, after = cm.z[box], cm.earlier[box], cm.later[box]
    was, now = np.asarray(earlier_lesion, bool), np.asarray(later_lesion, bool)
    lesion_level = float(np.median(before[was])) if was.any() else float(np.max(before))
    mid = 0.5 * (1.0 + lesion_level)
    return now & ~was & (z >= min_z) & (before < mid) & (after >= mid)


def partial_volumes_ul(
    cm: ChangeMap,
    earlier_lesion: np.ndarray,
    later_lesion: np.ndarray,
    other_lesions: np.ndarray,
    dets: tuple[np.ndarray, np.ndarray],
    voxel_ul: float,
    *,
    where: tuple[slice, ...],
    margin: int = 2,
) -> tuple[float, float]:
    """Return the lesion's volume (µl) in the earlier and the later session from the images'
    partial volume, not from the masks' edges.

    Around the lesion (both masks dilated by ``margin`` voxels), each voxel's lesion fraction
    is its FLAIR between the local background (median of a shell beyond, other lesions left
    out) and the lesion's own level (median inside the mask), clipped to [0, 1]; each grid
    voxel counts for its volume in that session (the Jacobian of the grid → session map), so
    the result is the session's own volume. Sub-voxel growth that registration smooths away
    and mask thresholds miss shows here as fractions.

    Examples:
        >>> img_a = np.array([1.0, 1.0, 2.0, 2.0, 1.5, 1.0, 1.0, 1.0])
        >>> img_b = np.array([1.0, 1.0, 2.0, 2.0, 2.0, 1.5, 1.0, 1.0])
        >>> cm = ChangeMap(np.zeros(8), img_a, img_b, 0.05)
        >>> a = np.array([0, 0, 1, 1, 0, 0, 0, 0], bool)
        >>> b = np.array([0, 0, 1, 1, 1, 0, 0, 0], bool)
        >>> one = np.ones(8)
        >>> partial_volumes_ul(cm, a, b, np.zeros(8, bool), (one, one), 1.0,
        ...                    where=(slice(None),), margin=1)
        (2.5, 3.5)
    """
    was, now = np.asarray(earlier_lesion, bool), np.asarray(later_lesion, bool)
    region = ndimage.binary_dilation(was | now, iterations=margin)
    shell = ndimage.binary_dilation(region, iterations=2) & ~region & ~np.asarray(other_lesions)
    out = []
    for image, mask, det in ((cm.earlier, was, dets[0]), (cm.later, now, dets[1])):
        data = image[where]
        ring = data[shell] if shell.any() else data[region & ~mask]
        background = float(np.median(ring)) if ring.size else 1.0
        level = float(np.median(data[mask])) if mask.any() else float(np.max(data[region]))
        span = level - background
        if span <= 1e-6:
            out.append(float("nan"))
            continue
        fraction = np.clip((data - background) / span, 0.0, 1.0)
        out.append(float(np.sum(fraction[region] * det[where][region]) * voxel_ul))
    return out[0], out[1]


def newness_z(
    lesions: nib.Nifti1Image,
    instances: list[int],
    later: nib.Nifti1Image,
    earlier: nib.Nifti1Image,
    later_to_earlier: np.ndarray,
    scales: tuple[float, float],
    noise_sd: float,
) -> float:
    """Return how much a lesion of the later session brightened since the earlier one: the
    mean change over its own voxels less the median change of a shell around it (2–3 voxels
    out, other lesions left out), in units of the change noise.

    Measured on the later session's own grid, the earlier image brought there through the
    rigid/affine part of the within-subject maps only: a deformable registration may squeeze
    a new lesion to a few grid voxels (matching it to whatever bright tissue is near), a
    linear map cannot. The shell takes out local bias and misalignment.

    Args:
        lesions: the later session's lesion instances; ``instances``: the lesion's IDs there.
        later, earlier: the two sessions' FLAIRs (same resolution).
        later_to_earlier: later-session world points → earlier-session world points (4×4).
        scales: the NAWM medians of the earlier and the later FLAIR.
        noise_sd: the robust SD of the change in NAWM (NAWM-median units).

    Examples:
        >>> aff = np.eye(4)
        >>> before = np.ones((12, 12, 12), np.float32)
        >>> after = before.copy(); after[4:8, 4:8, 4:8] = 1.5
        >>> labels = np.zeros((12, 12, 12), np.int16); labels[4:8, 4:8, 4:8] = 1
        >>> img = lambda d: nib.Nifti1Image(d, aff)
        >>> round(newness_z(img(labels), [1], img(after), img(before), aff, (1, 1), 0.05), 1)
        10.0
    """
    data = np.asarray(lesions.dataobj)
    mask = np.isin(data, instances)
    if not mask.any():
        return float("nan")
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - 4, 0)
    hi = np.minimum(idx.max(axis=0) + 5, data.shape[:3])
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    own, labels = mask[box], data[box]
    shell = ndimage.binary_dilation(own, iterations=3) & ~ndimage.binary_dilation(own, iterations=1)
    shell &= labels == 0
    offset = np.array([b.start for b in box])

    def change(region: np.ndarray) -> np.ndarray:
        world = nib.affines.apply_affine(lesions.affine, np.argwhere(region) + offset)
        b = sample_world(later, world) / scales[1]
        a = sample_world(earlier, nib.affines.apply_affine(later_to_earlier, world)) / scales[0]
        ok = (a > 0) & (b > 0)
        return (b - a)[ok]

    inside, around = change(own), change(shell)
    if inside.size == 0:
        return float("nan")
    centre = float(np.median(around)) if around.size else 0.0
    return float((np.mean(inside) - centre) / max(noise_sd, 1e-6))
