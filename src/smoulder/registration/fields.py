"""Dense displacement fields on a voxel grid: warping, composition, exponentiation, Jacobians.

Convention used throughout smoulder: a displacement field ``u`` has shape ``(3, X, Y, Z)`` and is
expressed in **voxel units of the grid it is defined on**; it is a *pull-back* map, so the warped
image is ``moved(x) = image(x + u(x))``. Fields are converted to world millimetres (and to the
LPS convention of ITK/ANTs) only when they are written to disk, so that no code here depends
on the sign of an affine's diagonal.
"""

from __future__ import annotations

import numpy as np
from scipy import fft as sp_fft
from scipy import ndimage


def identity_grid(shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """Return voxel coordinates ``(3, X, Y, Z)`` of every voxel of a grid of ``shape``.

    Examples:
        >>> identity_grid((2, 1, 1))[:, 1, 0, 0].tolist()
        [1.0, 0.0, 0.0]
    """
    return np.stack(np.meshgrid(*[np.arange(n, dtype=dtype) for n in shape], indexing="ij"))


def sample(
    image: np.ndarray, coords: np.ndarray, *, order: int = 1, cval: float = 0.0
) -> np.ndarray:
    """Return ``image`` sampled at voxel coordinates ``coords`` (shape ``(3, ...)``).

    Outside the grid the value is ``cval``. ``order`` is the spline order (0 nearest, 1 linear).
    """
    return ndimage.map_coordinates(
        image, coords, order=order, mode="constant", cval=cval, prefilter=order > 1
    ).astype(image.dtype if image.dtype.kind == "f" else np.float32, copy=False)


def sample_field(field: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Return the vector field ``(3, …)`` trilinearly sampled at voxel ``coords``
    (``(3, …)``); outside the grid its edge values are continued.

    Examples:
        >>> u = np.zeros((3, 2, 2, 2), np.float32); u[0, 1] = 2.0
        >>> sample_field(u, np.array([[0.5, 5.0], [0.0, 0.0], [0.0, 0.0]]))[0].tolist()
        [1.0, 2.0]
    """
    return np.stack(
        [
            ndimage.map_coordinates(c, coords, order=1, mode="nearest", prefilter=False)
            for c in field
        ]
    )


def warp(image: np.ndarray, displacement: np.ndarray, *, order: int = 1) -> np.ndarray:
    """Return ``image`` pulled back through ``displacement``: ``image(x + u(x))``.

    Examples:
        >>> img = np.arange(5, dtype=np.float32).reshape(5, 1, 1)
        >>> u = np.zeros((3, 5, 1, 1), np.float32); u[0] = 1.0
        >>> warp(img, u)[:, 0, 0].tolist()
        [1.0, 2.0, 3.0, 4.0, 0.0]
    """
    coords = identity_grid(image.shape) + displacement
    return sample(image, coords, order=order)


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """Return the displacement of ``x ↦ y + outer(y)`` with ``y = x + inner(x)``.

    Both fields live on the same grid. Outside the grid ``outer`` is continued by its nearest
    value, which keeps smooth fields smooth at the border.
    """
    coords = identity_grid(inner.shape[1:]) + inner
    moved = np.stack(
        [
            ndimage.map_coordinates(c, coords, order=1, mode="nearest", prefilter=False)
            for c in outer
        ]
    )
    return (inner + moved).astype(np.float32, copy=False)


def exponentiate(velocity: np.ndarray, *, steps: int = 6) -> np.ndarray:
    """Return the displacement of the flow of a stationary ``velocity`` for unit time.

    Scaling and squaring: ``exp(v) = exp(v / 2**steps) ∘ … ∘ exp(v / 2**steps)``. The result is a
    diffeomorphism when ``|v| / 2**steps`` is well below a voxel.
    """
    disp = (velocity / float(2**steps)).astype(np.float32)
    for _ in range(steps):
        disp = compose(disp, disp)
    return disp


def jacobian_determinant(
    displacement: np.ndarray, spacing: tuple[float, float, float] | None = None
) -> np.ndarray:
    """Return the Jacobian determinant of ``x ↦ x + u(x)`` at every voxel.

    ``displacement`` is in voxel units, so the result does not depend on ``spacing`` when it is
    isotropic; for a field in millimetres pass the voxel ``spacing`` so that derivatives are
    taken per millimetre.

    Examples:
        >>> u = np.zeros((3, 4, 4, 4), np.float32)
        >>> u[0] = 0.1 * np.arange(4)[:, None, None]   # stretch x by 10 %
        >>> round(float(jacobian_determinant(u)[1, 1, 1]), 6)
        1.1
    """
    spacing = spacing or (1.0, 1.0, 1.0)
    grads = [[np.gradient(displacement[i], spacing[j], axis=j) for j in range(3)] for i in range(3)]
    a = [[grads[i][j] + (1.0 if i == j else 0.0) for j in range(3)] for i in range(3)]
    det = (
        a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
        - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
        + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0])
    )
    return det.astype(np.float32)


def smooth_random_velocity(
    shape: tuple[int, int, int],
    rng: np.random.Generator,
    *,
    max_voxels: float,
    smoothness_voxels: float,
    weight: np.ndarray | None = None,
) -> np.ndarray:
    """Return a smooth random velocity field ``(3, *shape)`` peaking at ``max_voxels``.

    Args:
        shape: grid shape.
        rng: random generator (the field is deterministic for its state).
        max_voxels: peak absolute component, in voxels.
        smoothness_voxels: Gaussian smoothing sigma of the underlying white noise, in voxels.
        weight: optional array of ``shape`` multiplying the field (e.g. to fade it to zero).
    """
    field = np.empty((3, *shape), np.float32)
    for i in range(3):
        noise = rng.standard_normal(shape).astype(np.float32)
        field[i] = ndimage.gaussian_filter(noise, smoothness_voxels, mode="wrap")
    if weight is not None:
        field *= weight.astype(np.float32)
    peak = float(np.abs(field).max())
    if peak > 0:
        field *= max_voxels / peak
    return field


def gradient_of_poisson(source: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Return ``∇φ`` (in voxel units per unit time) where ``Δφ = source`` on a periodic grid.

    A velocity that is the gradient of ``φ`` has divergence ``source``: the flow it generates
    changes local volume at the rate ``source`` (per unit time, relative), so prescribing the
    source prescribes where tissue shrinks and where CSF grows. The mean of ``source`` is
    removed (a periodic Poisson problem has no solution otherwise).

    Args:
        source: desired divergence (relative volume change per unit time) at every voxel.
        spacing: voxel size in millimetres.

    Returns:
        ``(3, *source.shape)`` float32 velocity in voxel units.
    """
    src = source.astype(np.float64) - float(source.mean())
    k = [2 * np.pi * sp_fft.fftfreq(n, d=s) for n, s in zip(source.shape, spacing, strict=True)]
    kx, ky, kz = np.meshgrid(*k, indexing="ij", sparse=True)
    k2 = kx**2 + ky**2 + kz**2
    k2[0, 0, 0] = 1.0
    phi_hat = -sp_fft.fftn(src, workers=-1) / k2
    phi_hat[0, 0, 0] = 0.0
    vel = np.empty((3, *source.shape), np.float32)
    for i, (ki, s) in enumerate(zip((kx, ky, kz), spacing, strict=True)):
        # derivative in mm, then divide by the voxel size to express it in voxels
        vel[i] = np.real(sp_fft.ifftn(1j * ki * phi_hat, workers=-1)) / s
    return vel
