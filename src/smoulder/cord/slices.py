"""Axial slices of an image and the cord on one slice: geometry, intensity levels, fractions.

Conventions: the *slice axis* is the voxel axis whose direction is closest to world z
(head–foot); a volume is viewed as ``np.moveaxis(volume, axis, -1)``, so that ``stack[:, :, s]``
is slice ``s`` and its two in-plane voxel axes keep their order. In-plane positions are
``(u, v)`` voxel coordinates of that view; distances are in mm through the in-plane voxel
sizes. Intensities are compared through a *fraction* ``(I − I_csf) / (I_cord − I_csf)``, which
is 1 in cord and 0 in CSF whatever the contrast's sign.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import ndimage as ndi

#: ``T1``: cord brighter than CSF (T1w, UNIT1, FLAIR); ``T2``: cord darker than CSF (T2w).
Contrast = Literal["T1", "T2"]

#: In-plane half-width (mm) of the window around the centre in which the cord is looked for.
WINDOW_MM = 15.0
#: The cord lies within this distance (mm) of its centre: a larger blob is a leak.
MAX_RADIUS_MM = 10.0
#: The cord must differ from CSF by this many robust SDs of the CSF intensity.
MIN_CONTRAST = 1.5
#: ... and by this share of the larger of the two (noise alone differs by far less).
MIN_RELATIVE = 0.2
#: Erosions tried to cut the cord from tissue it touches through a broken CSF ring.
MAX_CUT = 3
#: Voxels brighter than the cord by this fraction are other tissue (bone, fat), not cord.
MAX_FRACTION = 1.8
#: Radial profiles per slice on which the cord's border is placed, and their sampling (mm).
N_RAYS, RAY_STEP_MM = 48, 0.25
#: Gaussian SD (voxels) of the denoising before the profiles are sampled.
DENOISE_SIGMA_VOX = 0.5
#: The edge's steepest descent is looked for this far (mm) either side of the blob's end.
EDGE_SEARCH_MM = 1.0
#: How far (mm) from the edge the cord plateau and the CSF extreme are looked for.
CORD_REACH_MM, CSF_REACH_MM = 3.0, 3.0
#: The edge ends, and its plateau begins, where its slope has flattened to this share of
#: its steepest (for a Gaussian-blurred step, 1.7 SD from the border, 95 % of the way).
PLATEAU_SLOPE = 0.25
#: An edge with less than this share of the slice's contrast has no CSF beyond it.
MIN_EDGE = 0.4
#: Sub-samples per in-plane voxel axis when a contour is turned into fractions.
SUPERSAMPLE = 5


def contrast_sign(contrast: Contrast) -> float:
    """Return +1 for a cord brighter than CSF (``T1``), −1 for darker (``T2``).

    Examples:
        >>> contrast_sign("T1"), contrast_sign("T2")
        (1.0, -1.0)
    """
    if contrast not in ("T1", "T2"):
        raise ValueError(f"contrast: expected 'T1' or 'T2', found {contrast!r}")
    return 1.0 if contrast == "T1" else -1.0


def slice_axis(affine: np.ndarray) -> int:
    """Return the voxel axis whose direction is closest to the world head–foot (z) axis.

    Examples:
        >>> slice_axis(np.diag([1.0, 1.0, 1.0, 1.0]))
        2
        >>> psr = np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])
        >>> slice_axis(psr)
        1
    """
    cols = np.asarray(affine, float)[:3, :3]
    return int(np.argmax(np.abs(cols[2]) / np.linalg.norm(cols, axis=0)))


def in_plane_axes(axis: int) -> tuple[int, int]:
    """Return the two voxel axes other than ``axis``, in order.

    Examples:
        >>> in_plane_axes(1)
        (0, 2)
    """
    u, v = (i for i in range(3) if i != axis)
    return u, v


def in_plane_spacing_mm(affine: np.ndarray, axis: int) -> np.ndarray:
    """Return the voxel sizes (mm) along the two in-plane axes of slices along ``axis``.

    Examples:
        >>> in_plane_spacing_mm(np.diag([0.5, 0.6, 3.0, 1.0]), 2).tolist()
        [0.5, 0.6]
    """
    cols = np.asarray(affine, float)[:3, :3]
    return np.linalg.norm(cols[:, list(in_plane_axes(axis))], axis=0)


def slice_normal(affine: np.ndarray, axis: int) -> tuple[np.ndarray, float]:
    """Return the unit world normal of the slices along ``axis`` and one voxel's area (mm²).

    The normal is that of the slice plane (the cross product of the in-plane voxel axes),
    not the slice axis itself, which a sheared affine may tilt; it points to world +z.

    Examples:
        >>> n, area = slice_normal(np.diag([0.5, 0.5, 3.0, 1.0]), 2)
        >>> n.tolist(), area
        ([0.0, 0.0, 1.0], 0.25)
    """
    cols = np.asarray(affine, float)[:3, :3]
    u, v = in_plane_axes(axis)
    cross = np.cross(cols[:, u], cols[:, v])
    area = float(np.linalg.norm(cross))
    normal = cross / area
    return (normal if normal[2] >= 0 else -normal), area


def _window(shape: tuple[int, ...], centre: np.ndarray, spacing: np.ndarray) -> tuple[slice, slice]:
    half = np.ceil(WINDOW_MM / spacing).astype(int)
    c = np.round(centre).astype(int)
    return (
        slice(max(c[0] - half[0], 0), min(c[0] + half[0] + 1, shape[0])),
        slice(max(c[1] - half[1], 0), min(c[1] + half[1] + 1, shape[1])),
    )


def _distance_mm(shape: tuple[int, ...], centre: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    uu, vv = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    return np.hypot((uu - centre[0]) * spacing[0], (vv - centre[1]) * spacing[1])


def cord_component(
    plane: np.ndarray, centre: np.ndarray, spacing: np.ndarray, cord: float, csf: float
) -> np.ndarray | None:
    """Return the cord on one slice (boolean, ``plane``'s shape), or None when there is none.

    The cord is the 4-connected blob of fraction in [0.5, :data:`MAX_FRACTION`] holding the
    voxel nearest ``centre`` (or, failing that, the nearest such blob within 2 mm), its holes
    filled. A blob reaching beyond :data:`MAX_RADIUS_MM` of the centre has leaked into other
    tissue: it is eroded up to :data:`MAX_CUT` times until the cord comes apart, then grown
    back by as many steps; if it never does, None.

    Args:
        plane: one slice's intensities.
        centre: ``(u, v)`` voxel position of the cord's centre.
        spacing: in-plane voxel sizes (mm).
        cord: the cord's intensity.
        csf: the CSF's intensity.
    """
    if not np.isfinite(cord - csf) or cord == csf:
        return None
    win = _window(plane.shape, centre, spacing)
    local_centre = centre - np.array([win[0].start, win[1].start])
    frac = (plane[win] - csf) / (cord - csf)
    above = (frac >= 0.5) & (frac <= MAX_FRACTION)
    dist = _distance_mm(frac.shape, local_centre, spacing)
    blob = None
    for depth in range(MAX_CUT + 1):
        # thin bridges to neighbouring tissue (a CSF ring broken by noise) are cut by eroding
        # `depth` times, then the cord is grown back as far within `above`
        core = ndi.binary_erosion(above, iterations=depth) if depth else above
        found = _blob_at(core, dist, spacing)
        if found is None:
            return None
        if dist[found].max() <= MAX_RADIUS_MM:
            blob = ndi.binary_dilation(found, iterations=depth, mask=above) if depth else found
            break
    if blob is None or dist[blob].max() > MAX_RADIUS_MM + depth * float(spacing.max()):
        return None
    blob = ndi.binary_fill_holes(blob)
    out = np.zeros(plane.shape, bool)
    out[win] = blob
    return out


def _blob_at(above: np.ndarray, dist: np.ndarray, spacing: np.ndarray) -> np.ndarray | None:
    """Return the 4-connected blob of ``above`` at the centre (or nearest within 2 mm)."""
    labels, _ = ndi.label(above)
    near = (labels > 0) & (dist <= 2.0 + float(spacing.max()) / 2)
    if not near.any():
        return None
    label = labels.flat[np.flatnonzero(near)[np.argmin(dist[near])]]
    return np.asarray(labels == label)


def _ring(blob: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Return the voxels just past the partial-volume edge of ``blob``: 1.2–2.7 voxels out."""
    dist = ndi.distance_transform_edt(~blob, sampling=spacing)
    inner = 1.2 * float(spacing.max())
    return (dist > inner) & (dist <= inner + 1.5)


def shorth_mean(values: np.ndarray) -> float:
    """Return the mean of the shortest interval holding half of ``values``: a robust mode.

    Around the cord the CSF ring may also hold a darker tissue (bone on T1) on some sides; the
    shorth picks the larger cluster where the median would fall between the two.

    Examples:
        >>> round(shorth_mean(np.array([2.0, 2.1, 14.0, 15.0, 15.0, 15.2, 16.0])), 2)
        15.07
    """
    v = np.sort(np.asarray(values, float))
    half = max(len(v) // 2, 1)
    widths = v[half - 1 :] - v[: len(v) - half + 1]
    start = int(np.argmin(widths))
    return float(v[start : start + half].mean())


def slice_levels(
    plane: np.ndarray, centre: np.ndarray, spacing: np.ndarray, sign: float
) -> tuple[float, float] | None:
    """Return the (cord, CSF) intensities on one slice around ``centre``, or None.

    Starts from the median within 2 mm of the centre (cord) and the 10th percentile, on the
    CSF side, of the 4–12 mm annulus (CSF); then, three times: the cord is the blob of
    :func:`cord_component`, its intensity the median of its eroded inner part, the CSF's the
    robust mode (:func:`shorth_mean`) of the CSF side (fraction < 0.5) of a ring just outside it.

    Args:
        plane: one slice's intensities.
        centre: ``(u, v)`` voxel position of the cord's centre.
        spacing: in-plane voxel sizes (mm).
        sign: :func:`contrast_sign` of the image.

    Examples:
        >>> plane = np.zeros((40, 40))
        >>> uu, vv = np.mgrid[:40, :40]
        >>> plane[(uu - 20) ** 2 + (vv - 20) ** 2 <= 16] = 100.0
        >>> slice_levels(plane, np.array([20.0, 20.0]), np.array([1.0, 1.0]), 1.0)
        (100.0, 0.0)
    """
    win = _window(plane.shape, centre, spacing)
    local = plane[win]
    c = centre - np.array([win[0].start, win[1].start])
    dist = _distance_mm(local.shape, c, spacing)
    cord = float(np.median(local[dist <= 2.0 + float(spacing.max()) / 2]))
    annulus = sign * local[(dist >= 4.0) & (dist <= 12.0)]
    if annulus.size == 0:
        return None
    csf = sign * float(np.percentile(annulus, 10))
    for _ in range(3):
        blob = cord_component(local, c, spacing, cord, csf)
        if blob is None:
            return None
        core = ndi.binary_erosion(blob)
        cord = float(np.median(local[core if core.any() else blob]))
        ring = _ring(blob, spacing)
        csf_side = ring & ((local - csf) / (cord - csf) < 0.5)
        if not csf_side.any():
            return None
        csf = shorth_mean(local[csf_side])
        noise = 1.4826 * float(np.median(np.abs(local[csf_side] - csf)))
        contrast = sign * (cord - csf)
        if contrast <= MIN_CONTRAST * noise or contrast < MIN_RELATIVE * max(abs(cord), abs(csf)):
            return None
    return cord, csf


def slice_fraction(
    plane: np.ndarray,
    centre: np.ndarray,
    spacing: np.ndarray,
    cord: float,
    csf: float,
    sign: float | None = None,
) -> np.ndarray | None:
    """Return the partial-volume cord fraction on one slice (in [0, 1]), or None if no cord.

    The cord's border is found on :data:`N_RAYS` radial intensity profiles from ``centre``
    (:func:`border_radii_mm`), each at the half-way level between the plateaus on either side
    of its cord–CSF edge; the fraction is the share of each voxel inside that star-shaped
    contour (:func:`contour_fraction`), so the slice's summed fraction is the contour's area.
    A half-way border is exact for a straight step blurred by any symmetric point-spread
    function, whatever the blur's width, whereas a voxel-wise fraction
    ``(I − I_csf) / (I_cord − I_csf)`` counts the blurred tail of a CSF ring too thin to reach
    the CSF level as cord.

    Args:
        plane: one slice's intensities.
        centre: ``(u, v)`` voxel position of the cord's centre.
        spacing: in-plane voxel sizes (mm).
        cord: the cord's intensity on this slice (:func:`slice_levels`).
        csf: the CSF's intensity on this slice.
        sign: :func:`contrast_sign`; by default that of ``cord − csf``.

    Examples:
        >>> uu, vv = np.mgrid[:40, :40]
        >>> plane = np.where(np.hypot(uu - 20, vv - 20) <= 5.0, 100.0, 0.0)
        >>> f = slice_fraction(plane, np.array([20.0, 20.0]), np.ones(2), 100.0, 0.0)
        >>> round(float(f.sum()), 1)  # the disk's 81 voxels, bordered half-way
        80.0
    """
    sign = float(np.sign(cord - csf)) if sign is None else sign
    blob = cord_component(plane, centre, spacing, cord, csf)
    if blob is None:
        return None
    radii = border_radii_mm(plane, centre, spacing, sign, (sign * cord, sign * csf), blob)
    if radii is None:
        return None
    return contour_fraction(plane.shape, centre, spacing, radii)


def border_radii_mm(
    plane: np.ndarray,
    centre: np.ndarray,
    spacing: np.ndarray,
    sign: float,
    levels: tuple[float, float],
    blob: np.ndarray,
) -> np.ndarray | None:
    """Return the cord border's distance (mm) from ``centre`` on each of :data:`N_RAYS` rays.

    Ray ``k`` leaves ``centre`` at angle ``2πk / N_RAYS`` from the ``u`` axis towards ``v``
    (in mm). The slice is first smoothed by a Gaussian of :data:`DENOISE_SIGMA_VOX` voxels
    (noise, not the edge: a symmetric blur leaves a straight edge's half-way point in place).
    On each ray the edge is the steepest cord-to-CSF descent within :data:`EDGE_SEARCH_MM`
    of where ``blob`` ends; it extends either way until its slope has flattened to
    :data:`PLATEAU_SLOPE` of the steepest or turned (:func:`_plateau`), within
    :data:`CORD_REACH_MM` inwards and :data:`CSF_REACH_MM` outwards (the CSF ring is 1–3 mm
    wide), and the profile there gives the local cord and CSF levels: measured where the CSF
    is on this ray, not a ring average that mixes in partial volumes, the tissue beyond and the
    other sides. The CSF level is held at or above the slice's (:func:`slice_levels`, the
    mode of a ring's CSF side): the profile passes beyond it only where it runs through a thin
    CSF layer into darker (T1) or brighter (T2) tissue, which is not CSF. The border is where
    the profile crosses the half-way level between them.
    Rays whose edge has less than :data:`MIN_EDGE` × the slice's contrast
    (the cord touching dura or a ligament, no CSF between) take the border interpolated from
    the nearest rays that have one; with fewer than a quarter of the rays, None.

    Args:
        plane: one slice's intensities.
        centre: ``(u, v)`` voxel position of the cord's centre.
        spacing: in-plane voxel sizes (mm).
        sign: :func:`contrast_sign` of the image.
        levels: the slice's ``sign ×`` (cord, CSF) intensities (:func:`slice_levels`).
        blob: the cord on this slice (:func:`cord_component`).
    """
    angles = 2 * np.pi * np.arange(N_RAYS) / N_RAYS
    radius = np.arange(0.0, MAX_RADIUS_MM + CSF_REACH_MM + RAY_STEP_MM, RAY_STEP_MM)
    step_vox = np.stack([np.cos(angles), np.sin(angles)]) / np.asarray(spacing, float)[:, None]
    points = np.asarray(centre, float)[:, None, None] + step_vox[:, :, None] * radius
    smooth = ndi.gaussian_filter(np.asarray(plane, np.float64), DENOISE_SIGMA_VOX)
    profiles = sign * ndi.map_coordinates(smooth, points, order=1, mode="nearest")
    inside = ndi.map_coordinates(blob.astype(np.float64), points, order=0, mode="constant")
    radii = np.full(N_RAYS, np.nan)
    for k in range(N_RAYS):
        outside = np.flatnonzero(inside[k] < 0.5)
        if outside.size:
            radii[k] = _half_way_radius(profiles[k], int(outside[0]), levels)
    ok = np.isfinite(radii)
    if ok.sum() < N_RAYS / 4:
        return None
    return np.interp(angles, angles[ok], radii[ok], period=2 * np.pi)


def _half_way_radius(profile: np.ndarray, end: int, levels: tuple[float, float]) -> float:
    """Return the radius (mm) of one ray's half-way border, or NaN where it has no edge.

    ``profile`` is sampled every :data:`RAY_STEP_MM` from the centre, cord positive; ``end``
    is the first sample past the blob; ``levels`` the slice's (cord, CSF), cord positive.
    See :func:`border_radii_mm`.

    Examples:
        >>> r = np.arange(80) * RAY_STEP_MM  # cord 100 to 10 mm, blurred to CSF 0 by 12 mm
        >>> profile = np.interp(r, [0.0, 10.0, 12.0, 20.0], [100.0, 100.0, 0.0, 0.0])
        >>> _half_way_radius(profile, 44, (100.0, 0.0))
        11.0
    """
    slope = np.gradient(profile)
    reach = int(round(EDGE_SEARCH_MM / RAY_STEP_MM))
    lo, hi = max(end - reach, 0), min(end + reach + 1, len(profile))
    if lo >= hi:
        return float("nan")
    steep = lo + int(np.argmin(slope[lo:hi]))
    cord_at = _plateau(slope, steep, -1, CORD_REACH_MM)
    csf_at = _plateau(slope, steep, 1, CSF_REACH_MM)
    top, bottom = profile[cord_at], max(profile[csf_at], levels[1])
    if top - bottom < MIN_EDGE * (levels[0] - levels[1]):
        return float("nan")
    half = (top + bottom) / 2
    edge = profile[cord_at : csf_at + 1]
    crossings = np.flatnonzero((edge[:-1] >= half) & (edge[1:] < half)) + cord_at
    if crossings.size == 0:
        return float("nan")
    i = int(crossings[np.argmin(np.abs(crossings - steep))])
    return float((i + (profile[i] - half) / (profile[i] - profile[i + 1])) * RAY_STEP_MM)


def _plateau(slope: np.ndarray, steep: int, step: int, reach_mm: float) -> int:
    """Return the index where the edge at ``steep`` ends along ``step`` (±1): its plateau.

    The edge ends where its (negative) slope has flattened to :data:`PLATEAU_SLOPE` of the
    steepest, or turned, within ``reach_mm``. A profile that runs on, more gently, into tissue
    beyond the CSF (bone, on T1) is thereby not taken for the CSF.
    """
    n = int(round(reach_mm / RAY_STEP_MM))
    stop = max(steep - n, 0) if step < 0 else min(steep + n, len(slope) - 1)
    for i in range(steep + step, stop + step, step):
        if slope[i] > PLATEAU_SLOPE * slope[steep]:
            return i
    return stop


def contour_fraction(
    shape: tuple[int, ...], centre: np.ndarray, spacing: np.ndarray, radii_mm: np.ndarray
) -> np.ndarray:
    """Return each voxel's share (float32 in [0, 1]) inside a star-shaped contour.

    The contour's radius at ``2πk / len(radii_mm)`` (as :func:`border_radii_mm`) is
    ``radii_mm[k]``, linearly interpolated between; each voxel is sampled on a
    :data:`SUPERSAMPLE` × :data:`SUPERSAMPLE` grid.

    Examples:
        >>> f = contour_fraction((30, 30), np.array([15.0, 15.0]), np.ones(2), np.full(64, 6.0))
        >>> round(float(f.sum()) / (np.pi * 36), 2)
        1.0
    """
    radii = np.asarray(radii_mm, float)
    angles = 2 * np.pi * np.arange(len(radii)) / len(radii)
    half = np.ceil((radii.max() + 1.0) / np.asarray(spacing, float)).astype(int)
    c = np.round(centre).astype(int)
    win = tuple(slice(max(c[i] - half[i], 0), min(c[i] + half[i] + 1, shape[i])) for i in range(2))
    uu, vv = np.meshgrid(
        np.arange(win[0].start, win[0].stop), np.arange(win[1].start, win[1].stop), indexing="ij"
    )
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE - 0.5
    inside = np.zeros(uu.shape)
    for du in offsets:
        for dv in offsets:
            x = (uu + du - centre[0]) * spacing[0]
            y = (vv + dv - centre[1]) * spacing[1]
            limit = np.interp(np.arctan2(y, x) % (2 * np.pi), angles, radii, period=2 * np.pi)
            inside += np.hypot(x, y) <= limit
    out = np.zeros(shape, np.float32)
    out[win] = inside / SUPERSAMPLE**2
    return out


def centroid(fraction: np.ndarray) -> np.ndarray:
    """Return the fraction-weighted ``(u, v)`` centroid of one slice's cord fraction.

    Examples:
        >>> f = np.zeros((5, 5)); f[1:3, 2] = 1.0
        >>> centroid(f).tolist()
        [1.5, 2.0]
    """
    return np.asarray(ndi.center_of_mass(fraction), float)
