"""The spinal cord's centreline: detected on each axial slice, tracked, then smoothed.

A cord-in-CSF filter responds to a cord-sized square of one contrast with CSF on either side;
its lowest value over 15 mm along the slices favours tubes, and each strong tube (below and near
a given start point, if any) seeds a track that moves slice by slice, up and down, to the best
response within 1.5 mm of the line through the last 10 mm of track (its slope held to 45°),
bridging up to three weak slices and stopping at a region to avoid (the brain). The track on
which a cord blob (:mod:`smoulder.cord.slices`) is found most often wins; each of its centres
is refined to the centroid of that blob, and the centres are smoothed by a robust polynomial of
the slice index, whose derivative gives the tangent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.polynomial import Polynomial
from scipy import ndimage as ndi

from smoulder.cord.slices import (
    Contrast,
    centroid,
    contrast_sign,
    in_plane_axes,
    in_plane_spacing_mm,
    slice_axis,
    slice_fraction,
    slice_levels,
)

__all__ = ["Centreline", "Contrast", "find_centreline"]

#: Half-width (mm) of the detector's squares, and the distance of the CSF squares around.
DISK_MM, RING_MM = 2.0, 6.5
#: Length (mm) along the slices over which the detector is averaged to find a tube.
TUBE_MM = 15.0
#: A tracked slice needs this share of the typical response so far.
ACCEPT = 0.35
#: Slices with a cord blob needed for a centreline.
MIN_SLICES = 3
#: Candidate tubes tracked before the longest is kept.
N_SEEDS = 20
#: Weak slices bridged before the tracking stops.
MAX_MISSES = 3
#: Steepest cord allowed against the slice normal (mm sideways per mm along the slices): 45°.
MAX_SLOPE = 1.0
#: How far (mm) the tracked centre may stray from the line through the previous centres.
TRACK_TOLERANCE_MM = 1.5
#: Length (mm) of the last stretch of track whose line predicts the next centre.
LOOKBACK_MM = 10.0


@dataclass(frozen=True)
class Centreline:
    """The cord's centre on consecutive axial slices.

    Attributes:
        slice_axis: the voxel axis across the slices (closest to world z).
        slice_index: ``(n,)`` slice numbers along ``slice_axis``, increasing.
        centre_vox: ``(n, 3)`` smoothed centre, voxel coordinates of the image.
        centre_mm: ``(n, 3)`` the same in world mm.
        tangent: ``(n, 3)`` unit world tangent, pointing to world +z (head).
        found: ``(n,)`` whether a cord was found on the slice (else the centre is bridged).
    """

    slice_axis: int
    slice_index: np.ndarray
    centre_vox: np.ndarray
    centre_mm: np.ndarray
    tangent: np.ndarray
    found: np.ndarray

    def arc_length_mm(self) -> np.ndarray:
        """Return the distance (mm) along the centreline from its first slice to each slice."""
        steps = np.linalg.norm(np.diff(self.centre_mm, axis=0), axis=1)
        return np.concatenate([[0.0], np.cumsum(steps)])


def detector_response(stack: np.ndarray, spacing: np.ndarray, sign: float) -> np.ndarray:
    """Return the cord-in-CSF response of each slice of ``stack`` (slices last).

    With intensities times ``sign`` (the cord positive), the response is the mean in a square
    of half-width :data:`DISK_MM` minus the mean of two such squares :data:`RING_MM` away on
    either side, along whichever in-plane axis gives the lower mean: the cord is wider than
    deep, and bone or ligament may lie close in front of and behind it, so CSF is looked for
    across the axis where it is clearest. Squares (box filters) keep it fast.

    Examples:
        >>> stack = np.zeros((31, 31, 2)); stack[13:18, 13:18] = 1.0
        >>> r = detector_response(stack, np.ones(2), 1.0)
        >>> np.unravel_index(np.argmax(r[..., 0]), (31, 31))
        (np.int64(15), np.int64(15))
    """
    size = [2 * int(round(DISK_MM / s)) + 1 for s in spacing] + [1]
    box = ndi.uniform_filter(sign * np.asarray(stack, np.float32), size=size, mode="nearest")
    pairs = []
    for axis, step in ((0, spacing[0]), (1, spacing[1])):
        shift = int(round(RING_MM / step))
        pairs.append(0.5 * (np.roll(box, shift, axis=axis) + np.roll(box, -shift, axis=axis)))
    return box - np.minimum(*pairs)


def find_centreline(
    image: np.ndarray,
    affine: np.ndarray,
    contrast: Contrast,
    *,
    start_mm: np.ndarray | None = None,
    search_radius_mm: float = 15.0,
    avoid: np.ndarray | None = None,
) -> Centreline | None:
    """Return the cord's centreline in ``image``, or None when no cord is found.

    Args:
        image: 3D intensities.
        affine: 4×4 voxel-to-world matrix (mm).
        contrast: ``"T1"`` (cord brighter than CSF) or ``"T2"`` (darker).
        start_mm: a world point at or above the cord's upper end (the lower end of the
            brainstem): the cord is looked for below it, within ``search_radius_mm``;
            without it, the strongest cord-like tube in the image.
        search_radius_mm: how far from ``start_mm`` the cord may be.
        avoid: boolean mask on the image grid that the cord does not enter (the brain's
            bulk): no seed lies in it, and a track stops where it would enter it.
    """
    sign = contrast_sign(contrast)
    axis = slice_axis(affine)
    stack = np.moveaxis(np.asarray(image, np.float32), axis, -1)
    spacing = in_plane_spacing_mm(affine, axis)
    thickness = float(np.linalg.norm(np.asarray(affine, float)[:3, axis]))
    response = detector_response(stack, spacing, sign)
    blocked = None if avoid is None else np.moveaxis(np.asarray(avoid, bool), axis, -1)
    if blocked is not None:
        response = np.where(blocked, -np.inf, response)
    up = 1 if float(np.asarray(affine, float)[2, axis]) > 0 else -1
    seeds = _seeds(response, affine, axis, spacing, thickness, start_mm, search_radius_mm, up)
    best: tuple[np.ndarray, np.ndarray] | None = None
    best_score = (0, 0)
    for seed in seeds:
        # the cord is the longest tube on which a cord blob is found: score every 4th slice
        slices, centres = _track(response, seed, spacing, thickness)
        checked = zip(slices[::4], centres[::4], strict=True)
        blobs = sum(slice_levels(stack[:, :, s], c, spacing, sign) is not None for s, c in checked)
        if (blobs, len(slices)) > best_score:
            best, best_score = (slices, centres), (blobs, len(slices))
    if best is None:
        return None
    return _refine(stack, affine, axis, spacing, sign, *best)


def _voxel(world: np.ndarray, affine: np.ndarray, axis: int) -> np.ndarray:
    """Return ``(u, v, s)`` slice-view voxel coordinates of a world point."""
    ijk = np.linalg.solve(np.asarray(affine, float), np.append(world, 1.0))[:3]
    u, v = in_plane_axes(axis)
    return np.array([ijk[u], ijk[v], ijk[axis]])


def _seeds(
    response: np.ndarray,
    affine: np.ndarray,
    axis: int,
    spacing: np.ndarray,
    thickness: float,
    start_mm: np.ndarray | None,
    search_radius_mm: float,
    up: int,
) -> list[tuple[int, np.ndarray]]:
    """Return up to :data:`N_SEEDS` seeds (slice, ``(u, v)`` centre): the strongest tubes.

    A tube's strength is the lowest response over :data:`TUBE_MM` along the slices; seeds are
    its local maxima, strongest first. Given ``start_mm``, they lie below it (``up`` is the
    slice step towards the head), within ``search_radius_mm`` in-plane and along the slices.
    """
    n_tube = max(int(round(TUBE_MM / thickness)), 1)
    tube = ndi.minimum_filter1d(response, n_tube, axis=2, mode="nearest")
    border = [int(np.ceil((RING_MM + DISK_MM) / s)) for s in spacing]
    allowed = np.zeros(tube.shape, bool)
    allowed[border[0] : tube.shape[0] - border[0], border[1] : tube.shape[1] - border[1]] = True
    if start_mm is not None:
        u0, v0, s0 = _voxel(np.asarray(start_mm, float), affine, axis)
        uu, vv, ss = np.meshgrid(*(np.arange(n) for n in tube.shape), indexing="ij", sparse=True)
        near = np.hypot((uu - u0) * spacing[0], (vv - v0) * spacing[1]) <= search_radius_mm
        depth_mm = (s0 - ss) * up * thickness
        allowed &= near & (depth_mm >= 0) & (depth_mm <= search_radius_mm)
    score = np.where(allowed & (tube > 0), tube, -np.inf)
    # one seed per tube: the best slice of each in-plane position, then in-plane maxima
    best_slice = np.argmax(score, axis=2)
    plane = np.take_along_axis(score, best_slice[..., None], axis=2)[..., 0]
    size = [2 * int(round(2 * DISK_MM / s)) + 1 for s in spacing]
    peaks = (plane == ndi.maximum_filter(plane, size=size, mode="nearest")) & np.isfinite(plane)
    where = np.argwhere(peaks)
    order = np.argsort(-plane[peaks])[:N_SEEDS]
    return [(int(best_slice[tuple(where[n])]), where[n].astype(float)) for n in order]


def _track(
    response: np.ndarray, seed: tuple[int, np.ndarray], spacing: np.ndarray, thickness: float
) -> tuple[np.ndarray, np.ndarray]:
    """Return the tracked slices and their ``(u, v)`` centres, following the best response.

    From the seed, up and down, each slice's centre is the best response within
    :data:`TRACK_TOLERANCE_MM` (at least a voxel) of the line through the last
    :data:`LOOKBACK_MM` of track, whose slope is held to :data:`MAX_SLOPE`; the tolerance
    grows by that slope for each slice since the last one found, so a bridged gap may bend
    no more than the cord can. The track stops after :data:`MAX_MISSES` weak slices, or
    where the response is ``-inf`` (a region to avoid).
    """
    s0, c0 = seed
    tolerance = max(TRACK_TOLERANCE_MM, 1.01 * float(np.max(spacing)))
    lookback = max(int(round(LOOKBACK_MM / thickness)), 2)
    found = {s0: c0}
    for direction in (1, -1):
        history = [(s0, c0)]
        levels = [float(response[int(c0[0]), int(c0[1]), s0])]
        misses, s = 0, s0
        while 0 <= s + direction < response.shape[2] and misses <= MAX_MISSES:
            s += direction
            predicted = _predict(history[-lookback:], s, spacing, thickness)
            gap = abs(s - history[-1][0])
            radius = tolerance + MAX_SLOPE * thickness * (gap - 1)
            at = np.clip(np.round(predicted).astype(int), 0, np.array(response.shape[:2]) - 1)
            if not np.isfinite(response[at[0], at[1], s]):
                break
            centre, value = _best_near(response[:, :, s], predicted, spacing, radius)
            if value >= ACCEPT * float(np.median(levels)):
                found[s], misses = centre, 0
                levels.append(value)
                history.append((s, centre))
            else:
                misses += 1
    slices = np.array(sorted(found))
    return slices, np.array([found[s] for s in slices])


def _predict(
    history: list[tuple[int, np.ndarray]], s: int, spacing: np.ndarray, thickness: float
) -> np.ndarray:
    """Return the ``(u, v)`` centre on slice ``s`` of the line through ``history``'s centres.

    The line is a least-squares fit, its slope held to :data:`MAX_SLOPE`; with one centre,
    that centre.

    Examples:
        >>> hist = [(0, np.array([10.0, 10.0])), (1, np.array([10.5, 10.0])),
        ...         (2, np.array([11.0, 10.0]))]
        >>> np.round(_predict(hist, 3, np.ones(2), 1.0), 6).tolist()
        [11.5, 10.0]
    """
    ss = np.array([h[0] for h in history], float)
    uv = np.array([h[1] for h in history], float)
    if len(history) < 2 or np.ptp(ss) == 0:
        return uv[-1]
    slope = np.polyfit(ss, uv, 1)[0]
    # slope in voxels per slice; its size in mm per mm is held to MAX_SLOPE
    steep = float(np.hypot(*(slope * spacing))) / thickness
    if steep > MAX_SLOPE:
        slope = slope * MAX_SLOPE / steep
    mean_s, mean_uv = ss.mean(), uv.mean(axis=0)
    return mean_uv + slope * (s - mean_s)


def _best_near(
    plane: np.ndarray, centre: np.ndarray, spacing: np.ndarray, radius_mm: float
) -> tuple[np.ndarray, float]:
    """Return the position and value of the highest response within ``radius_mm``."""
    half = np.ceil(radius_mm / np.asarray(spacing, float)).astype(int)
    c = np.round(centre).astype(int)
    lo = np.maximum(c - half, 0)
    hi = np.minimum(c + half + 1, plane.shape)
    if np.any(lo >= hi):
        return centre, -np.inf
    uu, vv = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="ij")
    near = np.hypot((uu - centre[0]) * spacing[0], (vv - centre[1]) * spacing[1]) <= radius_mm
    if not near.any():
        return centre, -np.inf
    values = np.where(near, plane[lo[0] : hi[0], lo[1] : hi[1]], -np.inf)
    best = np.unravel_index(int(np.argmax(values)), values.shape)
    return np.array(best, float) + lo, float(values[best])


def _refine(
    stack: np.ndarray,
    affine: np.ndarray,
    axis: int,
    spacing: np.ndarray,
    sign: float,
    slices: np.ndarray,
    centres: np.ndarray,
) -> Centreline | None:
    """Return the centreline through the cord centroids of the tracked slices, smoothed."""
    refined = np.full((len(slices), 2), np.nan)
    for n, (s, c) in enumerate(zip(slices, centres, strict=True)):
        plane = stack[:, :, s]
        levels = slice_levels(plane, c, spacing, sign)
        fraction = None if levels is None else slice_fraction(plane, c, spacing, *levels, sign)
        if fraction is not None and fraction.sum() > 0:
            refined[n] = centroid(fraction)
    ok = np.isfinite(refined[:, 0])
    if ok.sum() < MIN_SLICES:
        return None
    span = np.arange(slices[ok].min(), slices[ok].max() + 1)
    fit_u, fit_v, inlier = _robust_fit(slices[ok], refined[ok], spacing)
    found = np.isin(span, slices[ok][inlier])
    uv = np.stack([fit_u(span), fit_v(span)], axis=1)
    duv = np.stack([fit_u.deriv()(span), fit_v.deriv()(span)], axis=1)
    return _centreline(affine, axis, span, uv, duv, found)


def _robust_fit(
    s: np.ndarray, uv: np.ndarray, spacing: np.ndarray
) -> tuple[Polynomial, Polynomial, np.ndarray]:
    """Return polynomials u(s), v(s) fitted with outliers (> 3 robust SD, ≥ 1.5 mm) left out."""
    span = float(s.max() - s.min())
    degree = int(np.clip(len(s) // 12, 1, 3)) if span > 0 else 0
    inlier = np.ones(len(s), bool)
    for _ in range(3):
        fit_u = Polynomial.fit(s[inlier], uv[inlier, 0], degree)
        fit_v = Polynomial.fit(s[inlier], uv[inlier, 1], degree)
        resid = np.hypot((uv[:, 0] - fit_u(s)) * spacing[0], (uv[:, 1] - fit_v(s)) * spacing[1])
        limit = max(3.0 * 1.4826 * float(np.median(resid[inlier])), 1.5)
        new = resid <= limit
        if new.sum() < max(degree + 1, 2) or np.array_equal(new, inlier):
            break
        inlier = new
    return fit_u, fit_v, inlier


def _centreline(
    affine: np.ndarray,
    axis: int,
    slices: np.ndarray,
    uv: np.ndarray,
    duv: np.ndarray,
    found: np.ndarray,
) -> Centreline:
    """Return the :class:`Centreline` of slice-view centres ``uv`` and their derivatives."""
    affine = np.asarray(affine, float)
    u, v = in_plane_axes(axis)
    vox = np.zeros((len(slices), 3))
    vox[:, u], vox[:, v], vox[:, axis] = uv[:, 0], uv[:, 1], slices
    world = vox @ affine[:3, :3].T + affine[:3, 3]
    tangent = np.outer(duv[:, 0], affine[:3, u]) + np.outer(duv[:, 1], affine[:3, v])
    tangent = tangent + affine[:3, axis]
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    tangent *= np.where(tangent[:, 2:3] < 0, -1.0, 1.0)
    return Centreline(axis, slices, vox, world, tangent, found)
