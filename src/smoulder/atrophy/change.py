"""Volume change within a subject: PBVC and grey-matter change on the within-subject grid.

Two estimates of the percentage brain volume change (PBVC) between two sessions, both on the
within-subject grid (:class:`smoulder.longitudinal.space.SubjectSpace`), never from two
independent segmentations:

* **Jacobian integration** (:func:`jacobian_change`). A grid region ``R`` is, in session ``s``,
  the region ``φ_s(R)`` of volume ``∫_R det Dφ_s``. With ``R`` the brain of the subject's joint
  segmentation on the grid (the mean of the sessions' tissue probabilities pulled back through
  their maps), the volume of each session's brain is that integral, and PBVC is the ratio of two
  of them. The grey matter is measured the same way with the joint grey-matter probability: one
  segmentation propagated to every session, as the deformation says.
* **Boundary shift** (:func:`boundary_shift_pbvc`), SIENA's principle (Smith et al., NeuroImage
  2002): the two sessions are aligned by the linear part of their maps only, the brain edge of
  the joint mask is found on the grid, and at every edge point the intensity profiles of both
  images along the edge normal are compared; the shift that makes them match is the edge
  motion (mm, + outwards; :func:`edge_motion`). The mean motion becomes a PBVC through a
  self-calibration: the first image against itself scaled by a known volume change (SIENA's
  own calibration), so no surface area has to be estimated.

The benchmark (``benchmarks/atrophy.py``) measures both against the phantom's truth; the
configuration's ``atrophy.pbvc_method`` names the default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

from smoulder.registration.transforms import mapped_points_jacobian

#: Half length of the intensity profiles across the brain edge (mm) and their sampling step.
PROFILE_HALF_MM = 2.5
PROFILE_STEP_MM = 0.25
#: Largest edge motion searched between two sessions (mm).
MAX_SHIFT_MM = 1.5
#: Volume change of the self-calibration (SIENA scales the image by about this much).
CALIBRATION_SCALE = 0.01


@dataclass
class GridSession:
    """One session's images pulled back onto (a box of) the within-subject grid.

    Attributes:
        label: the session label.
        det: Jacobian determinant of the grid → session map (session volume per grid volume).
        brain: brain (parenchyma) probability on the grid, through the full map.
        gm: grey-matter probability on the grid, through the full map (``None``: unknown).
    """

    label: str
    det: np.ndarray
    brain: np.ndarray
    gm: np.ndarray | None


def pull_back(
    transform: object,
    grid_affine: np.ndarray,
    box: tuple[slice, ...],
    images: Mapping[str, nib.Nifti1Image | None],
) -> tuple[np.ndarray, dict[str, np.ndarray | None]]:
    """Return the Jacobian determinant of ``transform`` on the grid's ``box`` and the images
    resampled there (trilinear), all from one evaluation of the map per voxel.

    Args:
        transform: grid world points → session world points (``.apply(points)``).
        grid_affine: the grid's voxel-to-world matrix.
        box: the region of the grid (slices per axis).
        images: ``{name: image in the session's space}``; ``None`` entries stay ``None``.
    """
    from smoulder.grids import sample_world

    shape = tuple(b.stop - b.start for b in box)
    ijk = np.indices(shape).reshape(3, -1).T + np.array([b.start for b in box])
    points = transform.apply(nib.affines.apply_affine(grid_affine, ijk)).astype(np.float32)  # type: ignore[attr-defined]
    det = mapped_points_jacobian(points.reshape(*shape, 3), grid_affine)
    out = {
        name: None if img is None else sample_world(img, points).reshape(shape)
        for name, img in images.items()
    }
    return det, out


def jacobian_change(a: GridSession, b: GridSession, voxel_mm3: float) -> dict[str, float | None]:
    """Return the brain and grey-matter volume change from ``a`` to ``b`` by Jacobian integration.

    The region is the joint probability of the two sessions (their mean on the grid); each
    session's volume of it is the probability-weighted integral of its Jacobian determinant.

    Returns:
        ``pbvc_pct`` (brain), ``gm_change_pct`` (``None`` without grey-matter maps), and the
        two sessions' brain volumes of the joint region (``brain_a_ml``, ``brain_b_ml``).

    Examples:
        >>> ones = np.ones((4, 4, 4), np.float32)
        >>> a = GridSession("1", ones, ones, ones)
        >>> b = GridSession("2", 0.99 * ones, ones, ones)
        >>> round(jacobian_change(a, b, 1.0)["pbvc_pct"], 4)
        -1.0
    """
    brain = 0.5 * (a.brain + b.brain)
    va = float(np.sum(brain * a.det, dtype=np.float64))
    vb = float(np.sum(brain * b.det, dtype=np.float64))
    out: dict[str, float | None] = {
        "pbvc_pct": 100.0 * (vb / va - 1.0) if va > 0 else None,
        "brain_a_ml": va * voxel_mm3 / 1000.0,
        "brain_b_ml": vb * voxel_mm3 / 1000.0,
        "gm_change_pct": None,
    }
    if a.gm is not None and b.gm is not None:
        gm = 0.5 * (a.gm + b.gm)
        ga = float(np.sum(gm * a.det, dtype=np.float64))
        gb = float(np.sum(gm * b.det, dtype=np.float64))
        out["gm_change_pct"] = 100.0 * (gb / ga - 1.0) if ga > 0 else None
    return out


# ----------------------------------------------------------------------- boundary shift


@dataclass
class EdgePoints:
    """Points of the brain edge on the grid, in world mm, with their outward unit normals."""

    points: np.ndarray  # (N, 3)
    normals: np.ndarray  # (N, 3)


def brain_edge(brain: np.ndarray, affine: np.ndarray, *, smooth_mm: float = 1.0) -> EdgePoints:
    """Return the edge voxels of the binary ``brain`` mask and their outward normals.

    The edge is every mask voxel with a 6-neighbour outside it; the normal is the gradient of
    the mask smoothed by ``smooth_mm`` (Gaussian sigma), pointing out of the brain.

    Examples:
        >>> ball = np.linalg.norm(np.indices((21, 21, 21)) - 10, axis=0) <= 6
        >>> edge = brain_edge(ball, np.eye(4))
        >>> bool(np.all(np.einsum("ij,ij->i", edge.normals, edge.points - 10) > 0))
        True
    """
    mask = np.asarray(brain, bool)
    edge = mask & ~ndimage.binary_erosion(mask)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    soft = ndimage.gaussian_filter(mask.astype(np.float32), smooth_mm / spacing)
    grads = np.stack(np.gradient(soft, *spacing), axis=-1)  # per mm along voxel axes
    ijk = np.argwhere(edge)
    g = -grads[tuple(ijk.T)]
    # voxel-axis gradient → world direction through the affine's rotation
    rot = affine[:3, :3] / spacing
    g = g @ rot.T
    norm = np.linalg.norm(g, axis=1)
    keep = norm > 1e-6
    points = nib.affines.apply_affine(affine, ijk[keep])
    return EdgePoints(points, g[keep] / norm[keep, None])


def _profiles(
    data: np.ndarray,
    to_voxel: np.ndarray,
    edge: EdgePoints,
    offsets: np.ndarray,
) -> np.ndarray:
    """Return an image sampled (cubic spline; ``data`` already spline-filtered) along each
    edge normal: ``(N, T)`` for ``offsets`` ``(T,)`` or per point ``(N, T)`` (mm).
    ``to_voxel``: grid world → that image's voxel indices (4×4)."""
    offsets = np.broadcast_to(offsets, (len(edge.points), offsets.shape[-1]))
    pts = edge.points[:, None, :] + offsets[:, :, None] * edge.normals[:, None, :]
    vox = nib.affines.apply_affine(to_voxel, pts.reshape(-1, 3)).T
    values = ndimage.map_coordinates(data, vox, order=3, mode="nearest", prefilter=False)
    return values.reshape(offsets.shape)


def _standardised(p: np.ndarray) -> np.ndarray:
    """Return each profile (row) minus its mean, over its standard deviation: the edge's
    position is compared, not the sessions' intensity scales or offsets."""
    p = p - p.mean(axis=1, keepdims=True)
    return p / np.maximum(p.std(axis=1, keepdims=True), 1e-12)


def edge_motion(
    data_a: np.ndarray,
    to_voxel_a: np.ndarray,
    data_b: np.ndarray,
    to_voxel_b: np.ndarray,
    edge: EdgePoints,
    *,
    iterations: int = 5,
) -> tuple[np.ndarray, np.ndarray]:
    """Return each edge point's motion from image a to image b along its normal (mm, +
    outwards) and whether it is usable (a clear edge, converged inside the search range).

    The motion ``s`` is where b shows what a shows: b's profile sampled at ``t + s`` matches a's
    at ``t``, in least squares over the profile after standardising both (Gauss–Newton on
    ``s``, b resampled at every step). Unlike the peak of a windowed correlation, this is not
    biased by where the edge sits in the window, which matters for motions of a few hundredths
    of a millimetre.
    """
    offsets = np.arange(-PROFILE_HALF_MM, PROFILE_HALF_MM + 1e-6, PROFILE_STEP_MM)
    za = _standardised(_profiles(data_a, to_voxel_a, edge, offsets))
    shift = np.zeros(len(edge.points))
    for _ in range(iterations):
        zb = _standardised(_profiles(data_b, to_voxel_b, edge, offsets + shift[:, None]))
        slope = np.gradient(zb, PROFILE_STEP_MM, axis=1)
        energy = (slope * slope).sum(axis=1)
        step = ((za - zb) * slope).sum(axis=1) / np.maximum(energy, 1e-12)
        shift = np.clip(shift + step, -MAX_SHIFT_MM, MAX_SHIFT_MM)
    residual = ((za - zb) ** 2).mean(axis=1)
    usable = (np.abs(shift) < MAX_SHIFT_MM - PROFILE_STEP_MM) & (np.abs(step) < 0.01)
    usable &= residual < 0.25  # the two profiles are the same edge
    return shift, usable


def boundary_shift_pbvc(
    image_a: nib.Nifti1Image,
    image_b: nib.Nifti1Image,
    linear_a: np.ndarray,
    linear_b: np.ndarray,
    brain: np.ndarray,
    grid_affine: np.ndarray,
) -> dict[str, float]:
    """Return the PBVC from ``a`` to ``b`` by the motion of the brain edge (module doc).

    Args:
        image_a, image_b: the two sessions' images (T1w, else FLAIR), each in its own space.
        linear_a, linear_b: grid world → session world (4×4): the linear parts of the maps.
        brain: the joint brain mask on the grid (or a box of it: ``grid_affine`` is then the
            box's voxel-to-world matrix).
        grid_affine: voxel-to-world matrix of ``brain``'s array.

    Returns:
        ``pbvc_pct``, the mean edge motion ``edge_motion_mm`` (+ outwards), the calibration
        factor ``pbvc_per_mm`` and the number of edge points used.
    """
    edge = brain_edge(brain, grid_affine)
    data_a = ndimage.spline_filter(np.asarray(image_a.dataobj, np.float32), order=3)
    data_b = ndimage.spline_filter(np.asarray(image_b.dataobj, np.float32), order=3)
    vox_a = np.linalg.inv(image_a.affine) @ linear_a
    vox_b = np.linalg.inv(image_b.affine) @ linear_b
    shift, usable = edge_motion(data_a, vox_a, data_b, vox_b, edge)
    # self-calibration: a against a scaled by ±s about the edge's centre, on the same points
    centre = edge.points.mean(axis=0)
    factors = []
    for sign in (1.0, -1.0):
        lin = (1.0 + sign * CALIBRATION_SCALE) ** (1.0 / 3.0)
        # the scaled image's point x shows a's point centre + (x − centre) / lin
        scale = np.eye(4)
        scale[:3, :3] /= lin
        scale[:3, 3] = centre - centre / lin
        calib, ok = edge_motion(data_a, vox_a, data_a, vox_a @ scale, edge)
        both = usable & ok
        if both.any() and abs(calib[both].mean()) > 1e-9:
            factors.append(100.0 * sign * CALIBRATION_SCALE / float(calib[both].mean()))
    per_mm = float(np.mean(factors)) if factors else float("nan")
    motion = float(shift[usable].mean()) if usable.any() else float("nan")
    return {
        "pbvc_pct": per_mm * motion,
        "edge_motion_mm": motion,
        "pbvc_per_mm": per_mm,
        "edge_points": int(usable.sum()),
    }


# ---------------------------------------------------------------------------- subject level


def grid_box(masks: Sequence[np.ndarray], margin: int = 4) -> tuple[slice, slice, slice]:
    """Return the box (slices) around the voxels of any of ``masks``, plus ``margin`` voxels.

    Examples:
        >>> m = np.zeros((10, 10, 10), bool); m[4:6, 3, 5] = True
        >>> grid_box([m], 1)
        (slice(3, 7, None), slice(2, 5, None), slice(4, 7, None))
    """
    union = np.logical_or.reduce([np.asarray(m, bool) for m in masks])
    idx = np.argwhere(union)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, union.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


def box_affine(affine: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """Return the voxel-to-world matrix of the sub-array ``box`` of a grid with ``affine``."""
    out = affine.copy()
    out[:3, 3] = nib.affines.apply_affine(affine, [b.start for b in box])
    return out
