"""Registration in PyTorch: the same code on CUDA and on the CPU.

Affine (6 or 12 degrees of freedom) by gradient descent on a multi-resolution pyramid, with
local normalised cross-correlation (same contrast) or Parzen-window mutual information (across
contrasts); deformable as a stationary velocity field (SVF) whose exponential (scaling and
squaring) is a diffeomorphism with an exact-by-construction inverse ``exp(-v)``. Gradients are
smoothed before each step (a fluid-like regulariser) and the field after it (elastic-like), as
in greedy and FireANTs.

Geometry is explicit: images are arrays with 4×4 voxel-to-world (RAS mm) matrices; the affine
maps fixed world points to moving world points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AffineSettings:
    """Optimisation settings of :func:`affine`."""

    dof: int = 6
    metric: str = "ncc"
    shrink: tuple[int, ...] = (4, 2, 1)
    iterations: tuple[int, ...] = (100, 50, 30)
    learning_rate: float = 0.01
    bins: int = 32
    max_points: int = 200_000


@dataclass(frozen=True)
class DeformableSettings:
    """Optimisation settings of :func:`svf`."""

    shrink: tuple[int, ...] = (4, 2, 1)
    iterations: tuple[int, ...] = (120, 60, 20)
    learning_rate: float = 1.0
    ncc_radius: int = 2
    fluid_sigma: float = 1.7
    elastic_sigma: float = 0.7
    squarings: int = 6


# ----------------------------------------------------------------------------- image helpers


def to_tensor(data: np.ndarray, device: torch.device) -> torch.Tensor:
    """Return ``data`` as a ``(1, 1, X, Y, Z)`` float32 tensor scaled to about [0, 1].

    Intensities are divided by their 99.5th percentile of non-zero voxels, so that metrics
    and learning rates do not depend on the scanner's units.
    """
    arr = np.asarray(data, np.float32)
    nz = arr[arr > 0]
    scale = float(np.percentile(nz, 99.5)) if nz.size else 1.0
    arr = np.clip(arr / max(scale, 1e-6), 0.0, 1.5)
    return torch.from_numpy(np.ascontiguousarray(arr))[None, None].to(device)


def shrink(image: torch.Tensor, affine: np.ndarray, factor: int) -> tuple[torch.Tensor, np.ndarray]:
    """Return the image averaged over ``factor``³ blocks and the affine of the coarse grid."""
    if factor == 1:
        return image, affine
    small = F.avg_pool3d(image, factor, stride=factor, ceil_mode=True)
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2.0
    return small, affine @ scale


def world_grid(shape: tuple[int, ...], affine: np.ndarray, device: torch.device) -> torch.Tensor:
    """Return world coordinates ``(X, Y, Z, 3)`` of every voxel of a grid."""
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in shape]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
    a = torch.as_tensor(affine, dtype=torch.float32, device=device)
    return idx @ a[:3, :3].T + a[:3, 3]


def sample_world(
    image: torch.Tensor, affine: np.ndarray, points: torch.Tensor, *, mode: str = "bilinear"
) -> torch.Tensor:
    """Return ``image`` sampled at world points ``(..., 3)`` (zero outside), shape ``(1,1,...)``."""
    inv = torch.as_tensor(np.linalg.inv(affine), dtype=torch.float32, device=points.device)
    vox = points @ inv[:3, :3].T + inv[:3, 3]
    size = torch.tensor(image.shape[2:], dtype=torch.float32, device=points.device)
    norm = 2.0 * vox / (size - 1).clamp(min=1) - 1.0
    grid = norm.flip(-1).reshape(1, *points.shape[:-1], 3)
    if grid.dim() == 3:  # a flat list of points
        grid = grid[:, :, None, None]
    return F.grid_sample(image, grid, mode=mode, padding_mode="zeros", align_corners=True)


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Return the mean over a ``(2r+1)³`` box around each voxel (separable, zero padded)."""
    k = 2 * radius + 1
    for dim in range(3):
        size = [1, 1, 1]
        size[dim] = k
        pad = [0, 0, 0]
        pad[dim] = radius
        x = F.avg_pool3d(x, tuple(size), stride=1, padding=tuple(pad), count_include_pad=True)
    return x


def local_ncc(
    a: torch.Tensor, b: torch.Tensor, radius: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Return the mean local normalised cross-correlation (squared) of two images."""
    mu_a, mu_b = box_mean(a, radius), box_mean(b, radius)
    var_a = box_mean(a * a, radius) - mu_a**2
    var_b = box_mean(b * b, radius) - mu_b**2
    cov = box_mean(a * b, radius) - mu_a * mu_b
    # a tiny epsilon: with window means (not sums) a larger one would flatten low-contrast areas
    ncc = cov * cov / (var_a * var_b + 1e-9)
    if mask is None:
        return ncc.mean()
    return (ncc * mask).sum() / mask.sum().clamp(min=1.0)


def mutual_information(
    a: torch.Tensor, b: torch.Tensor, bins: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Return the mutual information of two images from Parzen-window histograms."""
    a, b = a.reshape(-1), b.reshape(-1)
    w = torch.ones_like(a) if mask is None else mask.reshape(-1)
    centres = torch.linspace(0.0, 1.0, bins, device=a.device)
    sigma = 1.0 / bins
    pa = torch.exp(-0.5 * ((a.clamp(0, 1)[:, None] - centres) / sigma) ** 2)
    pb = torch.exp(-0.5 * ((b.clamp(0, 1)[:, None] - centres) / sigma) ** 2)
    pa = pa / pa.sum(1, keepdim=True).clamp(min=1e-8) * w[:, None]
    pb = pb / pb.sum(1, keepdim=True).clamp(min=1e-8)
    joint = pa.T @ pb
    joint = joint / joint.sum().clamp(min=1e-8)
    ma, mb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    return (joint * (torch.log(joint + 1e-10) - torch.log(ma @ mb + 1e-10))).sum()


def centre_of_mass(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Return the intensity-weighted centre (world mm) of the positive voxels of an image."""
    w = np.clip(np.asarray(data, np.float64), 0, None)
    idx = np.indices(w.shape).reshape(3, -1)
    c = (idx * w.reshape(-1)).sum(1) / max(w.sum(), 1e-9)
    return (affine @ np.r_[c, 1.0])[:3]


def _tensors(
    fixed: np.ndarray, moving: np.ndarray, fixed_mask: np.ndarray | None, device: str, seed: int
) -> tuple[torch.device, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Return the device and the fixed, moving and mask tensors ``(1, 1, X, Y, Z)`` a
    registration starts from (images scaled by :func:`to_tensor`), after seeding PyTorch."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    f_img, m_img = to_tensor(fixed, dev), to_tensor(moving, dev)
    if fixed_mask is None:
        return dev, f_img, m_img, None
    return dev, f_img, m_img, torch.from_numpy(fixed_mask.astype(np.float32))[None, None].to(dev)


# ----------------------------------------------------------------------------- affine


def _sample_points(
    image: torch.Tensor,
    affine: np.ndarray,
    mask: torch.Tensor | None,
    mask_affine: np.ndarray,
    factor: int,
    max_points: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return world points ``(N, 3)`` and intensities ``(N,)`` of a level's foreground voxels.

    The foreground is the mask when given, else voxels above 5 % of the intensity scale; a
    regular stride keeps at most ``max_points`` (deterministic, unlike random sampling).
    """
    if mask is not None:
        keep = shrink(mask, mask_affine, factor)[0][0, 0] > 0.5
    else:
        keep = image[0, 0] > 0.05
    idx = torch.nonzero(keep)
    stride = max(1, int(np.ceil(len(idx) / max_points)))
    idx = idx[::stride]
    a = torch.as_tensor(affine, dtype=torch.float32, device=image.device)
    pts = idx.float() @ a[:3, :3].T + a[:3, 3]
    return pts, image[0, 0][idx[:, 0], idx[:, 1], idx[:, 2]]


def _correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return Pearson's correlation of two flat tensors."""
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (a.norm() * b.norm() + 1e-8)


def _matrix(params: torch.Tensor, dof: int) -> torch.Tensor:
    """Return a 3×3 matrix from rotation (3), log-scale (3) and shear (3) parameters."""
    rx, ry, rz = params[0], params[1], params[2]
    one, zero = torch.ones_like(rx), torch.zeros_like(rx)
    rot_x = torch.stack(
        [one, zero, zero, zero, rx.cos(), -rx.sin(), zero, rx.sin(), rx.cos()]
    ).reshape(3, 3)
    rot_y = torch.stack(
        [ry.cos(), zero, ry.sin(), zero, one, zero, -ry.sin(), zero, ry.cos()]
    ).reshape(3, 3)
    rot_z = torch.stack(
        [rz.cos(), -rz.sin(), zero, rz.sin(), rz.cos(), zero, zero, zero, one]
    ).reshape(3, 3)
    m = rot_z @ rot_y @ rot_x
    if dof > 6:
        shear = torch.stack(
            [one, params[6], params[7], zero, one, params[8], zero, zero, one]
        ).reshape(3, 3)
        m = m @ shear @ torch.diag(torch.exp(params[3:6]))
    return m


def affine(
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    moving: np.ndarray,
    moving_affine: np.ndarray,
    *,
    settings: AffineSettings = AffineSettings(),
    fixed_mask: np.ndarray | None = None,
    initial: np.ndarray | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> np.ndarray:
    """Return the 4×4 world (RAS) matrix mapping fixed points to moving points.

    Initialised by matching centres of mass (or ``initial``); rotation is about the fixed
    image's centre so that rotation and translation are decoupled.
    """
    dev, f_img, m_img, mask_t = _tensors(fixed, moving, fixed_mask, device, seed)
    c_f = centre_of_mass(fixed, fixed_affine)
    start = np.eye(4)
    if initial is not None:
        start = np.asarray(initial, float)
    else:
        start[:3, 3] = centre_of_mass(moving, moving_affine) - c_f
    params = torch.zeros(9, device=dev, requires_grad=True)
    shift = torch.zeros(3, device=dev, requires_grad=True)
    start_t = torch.as_tensor(start, dtype=torch.float32, device=dev)
    c = torch.as_tensor(c_f, dtype=torch.float32, device=dev)
    for factor, iters in zip(settings.shrink, settings.iterations, strict=True):
        f_lvl, f_aff = shrink(f_img, fixed_affine, factor)
        m_lvl, m_aff = shrink(m_img, moving_affine, factor)
        pts, values = _sample_points(
            f_lvl, f_aff, mask_t, fixed_affine, factor, settings.max_points
        )
        opt = torch.optim.Adam([params, shift], lr=settings.learning_rate)
        for _ in range(iters):
            opt.zero_grad()
            mat = _matrix(params, settings.dof)
            # fixed point → rotate/scale about the centre → shift (10 mm per unit) → start
            moved = (pts - c) @ mat.T + c + 10.0 * shift
            moved = moved @ start_t[:3, :3].T + start_t[:3, 3]
            warped = sample_world(m_lvl, m_aff, moved).reshape(-1)
            if settings.metric == "mi":
                loss = -mutual_information(values, warped, settings.bins)
            else:
                loss = -_correlation(values, warped)
            loss.backward()
            opt.step()
    with torch.no_grad():
        mat = _matrix(params, settings.dof).cpu().numpy().astype(np.float64)
        t = 10.0 * shift.cpu().numpy().astype(np.float64)
    inner = np.eye(4)
    inner[:3, :3] = mat
    inner[:3, 3] = c_f - mat @ c_f + t
    return start @ inner


# ----------------------------------------------------------------------------- deformable


def gaussian_smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Return ``x`` (``(1, C, X, Y, Z)``) smoothed by a separable Gaussian of ``sigma`` voxels."""
    if sigma <= 0:
        return x
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    channels = x.shape[1]
    for dim in range(3):
        shape = [1, 1, 1]
        shape[dim] = k.numel()
        weight = k.reshape(1, 1, *shape).repeat(channels, 1, 1, 1, 1)
        pad = [0, 0, 0]
        pad[dim] = radius
        x = F.conv3d(x, weight, padding=tuple(pad), groups=channels)
    return x


def _identity(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    axes = [torch.linspace(-1.0, 1.0, n, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), 0)[None]  # (1, 3, X, Y, Z), x-first


def _warp_field(field: torch.Tensor, disp: torch.Tensor, ident: torch.Tensor) -> torch.Tensor:
    """Return ``field`` (``(1, C, ...)``) sampled at ``x + disp(x)`` (normalised units)."""
    grid = (ident + disp).permute(0, 2, 3, 4, 1).flip(-1)
    return F.grid_sample(field, grid, mode="bilinear", padding_mode="border", align_corners=True)


def exp_svf(velocity: torch.Tensor, squarings: int) -> torch.Tensor:
    """Return the displacement (normalised units) of the flow of ``velocity`` for unit time."""
    ident = _identity(tuple(velocity.shape[2:]), velocity.device)
    disp = velocity / (2**squarings)
    for _ in range(squarings):
        disp = disp + _warp_field(disp, disp, ident)
    return disp


def _to_normalised(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return (
        2.0 / (torch.tensor(shape, dtype=torch.float32, device=device) - 1).clamp(min=1)
    ).reshape(1, 3, 1, 1, 1)


def svf(
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    moving: np.ndarray,
    moving_affine: np.ndarray,
    pre_affine: np.ndarray,
    *,
    symmetric: bool = False,
    settings: DeformableSettings = DeformableSettings(),
    fixed_mask: np.ndarray | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> np.ndarray:
    """Return a stationary velocity field ``(3, X, Y, Z)`` in fixed-grid voxel units.

    The fixed point ``x`` maps to the moving point ``pre_affine(world(x + exp(v)(x)))``. With
    ``symmetric`` the loss compares both images in the middle: the fixed image pulled by
    ``exp(-v/2)`` and the moving one by ``exp(v/2)`` (halfway registration).
    """
    dev, f_img, m_img, mask_t = _tensors(fixed, moving, fixed_mask, device, seed)
    pre = torch.as_tensor(pre_affine, dtype=torch.float32, device=dev)
    velocity: torch.Tensor | None = None
    for factor, iters in zip(settings.shrink, settings.iterations, strict=True):
        f_lvl, f_aff = shrink(f_img, fixed_affine, factor)
        shape = tuple(f_lvl.shape[2:])
        m_lvl, m_aff = shrink(m_img, moving_affine, factor)
        w = None if mask_t is None else (shrink(mask_t, fixed_affine, factor)[0] > 0.5).float()
        w = None if w is None else box_mean(w, settings.ncc_radius + 2).gt(0).float()
        world = world_grid(shape, f_aff, dev)
        ident = _identity(shape, dev)
        norm = _to_normalised(shape, dev)
        if velocity is None:
            v = torch.zeros((1, 3, *shape), device=dev)
        else:
            # voxel units change with the grid: rescale each component by the size ratio
            ratio = torch.tensor(
                [(n - 1) / max(o - 1, 1) for n, o in zip(shape, velocity.shape[2:], strict=True)],
                device=dev,
            ).reshape(1, 3, 1, 1, 1)
            v = F.interpolate(velocity, size=shape, mode="trilinear", align_corners=True) * ratio
        v.requires_grad_(True)
        a_vox = torch.as_tensor(f_aff[:3, :3], dtype=torch.float32, device=dev)
        for _ in range(iters):
            v.grad = None
            scale = 0.5 if symmetric else 1.0
            disp = exp_svf(v * norm * scale, settings.squarings) / norm  # voxel units
            moved_world = world + (disp[0].permute(1, 2, 3, 0) @ a_vox.T)
            moved_world = moved_world @ pre[:3, :3].T + pre[:3, 3]
            warped = sample_world(m_lvl, m_aff, moved_world)
            if symmetric:
                back = exp_svf(-v * norm * 0.5, settings.squarings)
                target = _warp_field(f_lvl, back, ident)
            else:
                target = f_lvl
            loss = -local_ncc(target, warped, settings.ncc_radius, w)
            loss.backward()
            with torch.no_grad():
                # greedy-style step: smoothed gradient scaled so the largest update is
                # ``learning_rate`` voxels (a global, not per-voxel, normalisation)
                g = gaussian_smooth(v.grad, settings.fluid_sigma)
                g = g / g.norm(dim=1).max().clamp(min=1e-12)
                v -= settings.learning_rate * g
                v.copy_(gaussian_smooth(v, settings.elastic_sigma))
        velocity = v.detach()
    assert velocity is not None
    return velocity[0].cpu().numpy()


def svf_displacement(velocity: np.ndarray, *, squarings: int = 6, sign: float = 1.0) -> np.ndarray:
    """Return the displacement (voxel units) of ``exp(sign · v)`` for a voxel-unit SVF."""
    v = torch.from_numpy(np.ascontiguousarray(velocity, np.float32))[None]
    shape = tuple(v.shape[2:])
    norm = _to_normalised(shape, v.device)
    with torch.no_grad():
        disp = exp_svf(sign * v * norm, squarings) / norm
    return disp[0].numpy()
