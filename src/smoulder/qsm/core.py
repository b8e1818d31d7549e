"""Quantitative susceptibility mapping on arrays (PyTorch: the same code on CUDA and the CPU).

The steps, each a function on tensors of one 3D grid with voxel sizes in mm:

- :func:`dipole_kernel` — the unit dipole's response in k-space, ``1/3 - (k·b0)²/|k|²``, with
  the B0 direction in voxel coordinates (:func:`b0_in_voxels`, oblique acquisitions included);
- :func:`laplacian_unwrap` — least-squares (Laplacian) phase unwrapping: the phase whose
  Laplacian is that of the wrapped neighbour differences, solved by FFT (Poisson) or, inside
  a mask, by conjugate gradients with the FFT solve as preconditioner;
- :func:`fit_field` — multi-echo combination: a per-voxel least-squares line through the
  unwrapped phases over TE, weighted by magnitude² (the phase noise variance is 1/SNR²);
- :func:`vsharp` — background-field removal by V-SHARP (spherical mean value filtering with
  radii shrinking towards the brain edge, then deconvolution with the largest kernel);
- :func:`tkd` — truncated k-space division, the baseline;
- :func:`tv_admm` — total-variation-regularised inversion, solved with ADMM where every
  linear step is a closed-form division in k-space (Bilgic et al.'s fast TV-QSM).

Units: phase in radians, TE in ms, fields and susceptibility in ppm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

GAMMA_BAR_MHZ_PER_T = 42.577478


def rad_per_ms_per_ppm(b0_tesla: float) -> float:
    """Return the phase accrual rate of a 1 ppm field offset, rad/ms, at ``b0_tesla``.

    Examples:
        >>> round(rad_per_ms_per_ppm(3.0), 4)
        0.8026
    """
    return 2 * math.pi * GAMMA_BAR_MHZ_PER_T * b0_tesla * 1e-3


def b0_in_voxels(affine: np.ndarray, b0_world: Sequence[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """Return the unit B0 direction in voxel-axis coordinates of ``affine``.

    B0 is along the scanner's z axis (the NIfTI world frame); an oblique or reoriented grid
    sees it along a mix of its axes.

    Examples:
        >>> b0_in_voxels(np.diag([1.0, 1.0, 1.0, 1.0])).round(3).tolist()
        [0.0, 0.0, 1.0]
        >>> sag = np.array([[0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])
        >>> b0_in_voxels(sag).round(3).tolist()  # voxel axis 1 points along world z
        [0.0, 1.0, 0.0]
    """
    a = np.asarray(affine, float)[:3, :3]
    unit_axes = a / np.linalg.norm(a, axis=0)
    b0 = np.linalg.solve(unit_axes, np.asarray(b0_world, float))
    return b0 / np.linalg.norm(b0)


def _frequencies(
    shape: Sequence[int], voxel_mm: Sequence[float], device, dtype
) -> list[torch.Tensor]:
    """Return k-space coordinates (cycles/mm) per axis, broadcastable to ``shape``."""
    out = []
    for axis, (n, h) in enumerate(zip(shape, voxel_mm, strict=True)):
        k = torch.fft.fftfreq(n, d=float(h), device=device, dtype=dtype)
        view = [1, 1, 1]
        view[axis] = n
        out.append(k.reshape(view))
    return out


def fast_size(n: int) -> int:
    """Return the smallest ``m ≥ n`` whose only prime factors are 2, 3 and 5 (fast FFTs).

    A volume cropped to the brain has edges like 289 = 17²; its FFT costs 2–3 times that of
    the 5-smooth size a few voxels larger.

    Examples:
        >>> fast_size(289), fast_size(238), fast_size(64)
        (300, 240, 64)
    """
    m = max(1, int(n))
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def _half(kernel: torch.Tensor) -> torch.Tensor:
    """Return the part of a full k-space ``kernel`` that ``rfftn`` computes (last axis halved)."""
    return kernel[..., : kernel.shape[-1] // 2 + 1]


def _convolve(x: torch.Tensor, kernel_half: torch.Tensor) -> torch.Tensor:
    """Return the periodic convolution of real ``x`` with a real symmetric kernel (rfft half)."""
    return torch.fft.irfftn(kernel_half * torch.fft.rfftn(x), s=x.shape)


def dipole_kernel(
    shape: Sequence[int],
    voxel_mm: Sequence[float],
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return the dipole kernel ``D(k) = 1/3 − (k·b̂0)²/|k|²`` (``D(0) = 0``) on ``shape``.

    Examples:
        >>> d = dipole_kernel((8, 8, 8), (1, 1, 1))
        >>> float(d[0, 0, 0]), round(float(d[1, 0, 0]), 4), round(float(d[0, 0, 1]), 4)
        (0.0, 0.3333, -0.6667)
    """
    kx, ky, kz = _frequencies(shape, voxel_mm, device, dtype)
    b = torch.as_tensor(np.asarray(b0_dir, float) / np.linalg.norm(b0_dir), dtype=dtype)
    k2 = kx**2 + ky**2 + kz**2
    kb = kx * float(b[0]) + ky * float(b[1]) + kz * float(b[2])
    d = 1.0 / 3.0 - kb**2 / torch.where(k2 > 0, k2, torch.ones_like(k2))
    d[0, 0, 0] = 0.0
    # an oblique B0 makes the cross terms differ between a Nyquist frequency and its mirror
    # (both are the same sample): average the two, so D(k) = D(−k) exactly and real FFTs give
    # the real part of the full complex convolution
    axes = (0, 1, 2)
    return 0.5 * (d + torch.roll(torch.flip(d, axes), (1, 1, 1), axes))


def forward_field(chi: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Return the field (ppm) of susceptibility ``chi`` (ppm): ``F⁻¹ D F χ`` (periodic grid)."""
    return _convolve(chi, _half(kernel))


def _laplacian_kernel(shape, voxel_mm, device, dtype) -> torch.Tensor:
    """Return the discrete 7-point Laplacian's k-space response."""
    out = torch.zeros(tuple(shape), device=device, dtype=dtype)
    for axis, (n, h) in enumerate(zip(shape, voxel_mm, strict=True)):
        k = torch.arange(n, device=device, dtype=dtype)
        term = 2.0 * (torch.cos(2 * math.pi * k / n) - 1.0) / float(h) ** 2
        view = [1, 1, 1]
        view[axis] = n
        out = out + term.reshape(view)
    return out


def laplacian_unwrap(
    phase: torch.Tensor,
    voxel_mm: Sequence[float],
    mask: torch.Tensor | None = None,
    *,
    iterations: int = 100,
    tolerance: float = 1e-5,
) -> torch.Tensor:
    """Return the Laplacian-unwrapped ``phase`` (rad): the least-squares solution whose
    neighbour differences match the wrapped neighbour differences of ``phase``.

    Exact (up to a constant) wherever the true phase changes by less than π between
    neighbours (Ghiglia & Romero's least-squares unwrapping). Without ``mask`` the Poisson
    equation is solved directly by FFT on the mirrored volume; with ``mask`` only differences
    between two voxels inside it count and the weighted equation is solved by conjugate
    gradients preconditioned with that FFT solve, so noise outside the head does not leak in.

    Examples:
        >>> x = torch.linspace(0, 1, 32)[:, None, None].expand(32, 32, 32)
        >>> truth = 20.0 * x**2  # wraps several times along the first axis
        >>> wrapped = torch.angle(torch.exp(1j * truth))
        >>> out = laplacian_unwrap(wrapped, (1, 1, 1))
        >>> bool(((out - truth) - (out - truth).mean()).abs().max() < 1e-3)
        True
        >>> noise = torch.rand(32, 32, 32) * 6.28 - 3.14  # outside a slab: pure noise
        >>> mask = torch.zeros(32, 32, 32, dtype=torch.bool); mask[:, 4:28, 4:28] = True
        >>> out = laplacian_unwrap(torch.where(mask, wrapped, noise), (1, 1, 1), mask)
        >>> d = (out - truth)[mask]
        >>> bool((d - d.mean()).abs().max() < 1e-2)
        True
    """
    if mask is None:
        rhs = _wrapped_divergence(phase, _links(torch.ones_like(phase)), voxel_mm)
        return _poisson_mirrored(rhs, voxel_mm)
    w = mask.to(phase.dtype)
    links = _links(w)  # per axis: 1 where a voxel and its next neighbour are both inside
    b = _wrapped_divergence(phase, links, voxel_mm)
    scale = [1.0 / float(h) ** 2 for h in voxel_mm]

    diff = torch.empty_like(b)
    spare = torch.empty_like(b)

    def apply(x: torch.Tensor) -> torch.Tensor:
        # Σ_axes (link·∇x − roll(link·∇x, 1)) / h²: the masked Laplacian, zero flux at the edges
        out = torch.zeros_like(x)
        for axis in range(3):
            forward_difference(x, axis, out=diff).mul_(links[axis])
            out.add_(backward_difference(diff, axis, out=spare), alpha=-scale[axis])
        return out

    lap_k = _laplacian_kernel(b.shape, voxel_mm, b.device, b.dtype)
    nonzero = lap_k != 0
    inv_k = torch.where(nonzero, 1.0 / torch.where(nonzero, lap_k, torch.ones_like(lap_k)), 0.0)

    inv_k = _half(inv_k)

    def precondition(v: torch.Tensor) -> torch.Tensor:
        # periodic Poisson solve on the volume itself: an eighth of the mirrored one's cost,
        # and as good a preconditioner where the mask stays clear of the edges
        return _convolve(v, inv_k)

    x = precondition(b) * w
    r = b - apply(x)
    z = precondition(r)
    p = z.clone()
    rz = torch.sum(r * z)
    norm_b = torch.linalg.vector_norm(b) + 1e-30
    for _ in range(iterations):
        ap = apply(p)
        alpha = float(rz / (torch.dot(p.flatten(), ap.flatten()) + 1e-30))
        x.add_(p, alpha=alpha)
        r.sub_(ap, alpha=alpha)
        del ap
        if float(torch.linalg.vector_norm(r) / norm_b) < tolerance:
            break
        z = precondition(r)
        rz_new = torch.dot(r.flatten(), z.flatten())
        p = z.add_(p, alpha=float(rz_new / (rz + 1e-30)))
        rz = rz_new
    return x


def forward_difference(x: torch.Tensor, axis: int, *, out: torch.Tensor) -> torch.Tensor:
    """Write ``roll(x, −1, axis) − x`` (periodic forward difference) into ``out``; return it.

    Two subtractions of shifted views: a quarter of the time of ``torch.roll`` and a subtraction.

    Examples:
        >>> x = torch.tensor([[[0.0], [1.0], [3.0]]])
        >>> forward_difference(x, 1, out=torch.empty_like(x)).flatten().tolist()
        [1.0, 2.0, -3.0]
    """
    n = x.shape[axis]
    torch.sub(x.narrow(axis, 1, n - 1), x.narrow(axis, 0, n - 1), out=out.narrow(axis, 0, n - 1))
    torch.sub(x.narrow(axis, 0, 1), x.narrow(axis, n - 1, 1), out=out.narrow(axis, n - 1, 1))
    return out


def backward_difference(x: torch.Tensor, axis: int, *, out: torch.Tensor) -> torch.Tensor:
    """Write ``roll(x, 1, axis) − x`` into ``out`` (minus the adjoint of
    :func:`forward_difference`'s operator applied to ``x``); return it.

    Examples:
        >>> x = torch.tensor([[[0.0], [1.0], [3.0]]])
        >>> backward_difference(x, 1, out=torch.empty_like(x)).flatten().tolist()
        [3.0, -1.0, -2.0]
    """
    n = x.shape[axis]
    torch.sub(x.narrow(axis, 0, n - 1), x.narrow(axis, 1, n - 1), out=out.narrow(axis, 1, n - 1))
    torch.sub(x.narrow(axis, n - 1, 1), x.narrow(axis, 0, 1), out=out.narrow(axis, 0, 1))
    return out


def _links(w: torch.Tensor) -> list[torch.Tensor]:
    """Return per axis 1 where a voxel and its next neighbour both have weight ``w`` = 1 (their
    product), 0 at the last slice (no wrap-around at the edge)."""
    links = []
    for axis in range(3):
        link = torch.empty_like(w)
        n = w.shape[axis]
        torch.mul(
            w.narrow(axis, 0, n - 1), w.narrow(axis, 1, n - 1), out=link.narrow(axis, 0, n - 1)
        )
        link.narrow(axis, n - 1, 1).zero_()
        links.append(link)
    return links


def _wrapped_divergence(
    phase: torch.Tensor, links: Sequence[torch.Tensor], voxel_mm: Sequence[float]
) -> torch.Tensor:
    """Return the discrete Laplacian of the wrapped neighbour differences between linked
    voxels (:func:`_links`; zero flux across the edges)."""
    out = torch.zeros_like(phase)
    d = torch.empty_like(phase)
    spare = torch.empty_like(phase)
    for axis, h in enumerate(voxel_mm):
        wrap(forward_difference(phase, axis, out=d)).mul_(links[axis])
        out.add_(backward_difference(d, axis, out=spare), alpha=-1.0 / float(h) ** 2)
    return out


def _poisson_mirrored(rhs: torch.Tensor, voxel_mm: Sequence[float]) -> torch.Tensor:
    """Return ``x`` with ``∇²x = rhs`` and zero flux at the edges (FFT of the mirrored volume)."""
    p = rhs
    for axis in range(3):
        p = torch.cat([p, torch.flip(p, dims=(axis,))], dim=axis)
    lap_k = _laplacian_kernel(p.shape, voxel_mm, p.device, p.dtype)
    nonzero = lap_k != 0
    inv = torch.where(nonzero, 1.0 / torch.where(nonzero, lap_k, torch.ones_like(lap_k)), 0.0)
    out = _convolve(p, _half(inv))
    nx, ny, nz = rhs.shape
    return out[:nx, :ny, :nz].contiguous()


def wrap(x: torch.Tensor) -> torch.Tensor:
    """Wrap ``x`` (radians) into [-π, π) in place; return it.

    Examples:
        >>> [round(v, 3) for v in wrap(torch.tensor([0.5, 4.0, -4.0])).tolist()]
        [0.5, -2.283, 2.283]
    """
    return torch.remainder(x.add_(math.pi), 2 * math.pi, out=x).sub_(math.pi)


def fit_field(
    phases: torch.Tensor, magnitudes: torch.Tensor, echo_times_ms: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(slope rad/ms, intercept rad)`` of unwrapped ``phases`` (E, X, Y, Z) over TE.

    Weighted least squares per voxel with weights magnitude²; one echo gives phase / TE.

    Examples:
        >>> te = [5.0, 10.0, 15.0]
        >>> ph = torch.stack([0.3 + 0.02 * t * torch.ones(2, 2, 2) for t in te])
        >>> slope, icpt = fit_field(ph, torch.ones_like(ph), te)
        >>> round(float(slope.mean()), 4), round(float(icpt.mean()), 4)
        (0.02, 0.3)
    """
    te = [float(t) for t in echo_times_ms]
    if phases.shape[0] == 1:
        return phases[0] / te[0], torch.zeros_like(phases[0])
    # sums over echoes, accumulated one echo at a time (no (E, X, Y, Z) temporaries)
    sw, st, stt, sp, stp = (torch.zeros_like(phases[0]) for _ in range(5))
    w, wp = torch.empty_like(phases[0]), torch.empty_like(phases[0])
    for e, t in enumerate(te):
        torch.mul(magnitudes[e], magnitudes[e], out=w).add_(1e-12)
        sw.add_(w)
        st.add_(w, alpha=t)
        stt.add_(w, alpha=t * t)
        torch.mul(w, phases[e], out=wp)
        sp.add_(wp)
        stp.add_(wp, alpha=t)
    del w, wp
    det = sw * stt - st * st
    det = torch.where(det.abs() > 1e-12, det, torch.full_like(det, 1e-12))
    slope = (sw * stp - st * sp).div_(det)
    intercept = (sp - slope * st).div_(sw)
    return slope, intercept


def _ball_mean_kernel(shape, voxel_mm, radius_mm: float, device, dtype) -> torch.Tensor:
    """Return the k-space response (``rfftn`` half) of the mean over a ball of ``radius_mm``.

    The ball is built in its own bounding box only (wrapped around the origin), not over the
    whole volume.
    """
    reach = [min(int(radius_mm / float(h)), n // 2) for n, h in zip(shape, voxel_mm, strict=True)]
    offs = [
        torch.arange(-r, r + 1, device=device, dtype=dtype) * float(h)
        for r, h in zip(reach, voxel_mm, strict=True)
    ]
    x, y, z = torch.meshgrid(*offs, indexing="ij")
    inside = (x**2 + y**2 + z**2) <= radius_mm**2
    ball = torch.zeros(tuple(shape), device=device, dtype=dtype)
    idx = [
        torch.remainder(torch.arange(-r, r + 1, device=device), n)
        for r, n in zip(reach, shape, strict=True)
    ]
    ball[torch.meshgrid(*idx, indexing="ij")] = inside.to(dtype)
    ball = ball / ball.sum()
    return torch.fft.rfftn(ball).real


def _erode(mask: torch.Tensor, mask_k: torch.Tensor, mean_k: torch.Tensor) -> torch.Tensor:
    """Return ``mask`` eroded by a ball: a voxel stays if its ball lies wholly inside.

    ``mask_k`` is the mask's ``rfftn``, ``mean_k`` the ball's (:func:`_ball_mean_kernel`).
    """
    mean = torch.fft.irfftn(mean_k * mask_k, s=mask.shape)
    return mask & (mean > 0.999)


def vsharp(
    field: torch.Tensor,
    mask: torch.Tensor,
    voxel_mm: Sequence[float],
    *,
    radii_mm: Sequence[float] = (12.0, 9.0, 6.0, 4.0, 2.0),
    threshold: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(local field, eroded mask)``: the background (harmonic) field removed.

    Examples:
        >>> g = torch.stack(torch.meshgrid(*[torch.arange(40.0)] * 3, indexing="ij"))
        >>> mask = ((g - 20) ** 2).sum(0) < 15**2
        >>> background = 0.01 * (g[0] - 20) + 0.002 * ((g[0] - 20) ** 2 - (g[1] - 20) ** 2)
        >>> local, kept = vsharp(background * mask, mask, (1, 1, 1), radii_mm=(6, 4, 2))
        >>> bool(local[kept].abs().max() < 1e-3)
        True
    """
    radii = sorted(radii_mm, reverse=True)
    f = field * mask
    hp = torch.zeros_like(f)
    filled = torch.zeros_like(mask)
    f_k = torch.fft.rfftn(f)
    mask_k = torch.fft.rfftn(mask.float())
    big = None
    for r in radii:
        mean_k = _ball_mean_kernel(f.shape, voxel_mm, r, f.device, f.dtype)
        s = 1.0 - mean_k
        if big is None:
            big = s
        inside = _erode(mask, mask_k, mean_k) & ~filled
        hp = torch.where(inside, torch.fft.irfftn(s * f_k, s=f.shape), hp)
        filled = filled | inside
    assert big is not None
    inv = torch.where(
        big.abs() > threshold,
        1.0 / torch.where(big.abs() > threshold, big, torch.ones_like(big)),
        torch.zeros_like(big),
    )
    local = _convolve(hp, inv) * filled
    return local, filled


def tkd(field: torch.Tensor, kernel: torch.Tensor, threshold: float = 0.19) -> torch.Tensor:
    """Return χ (ppm) by truncated k-space division: ``1/D`` where ``|D| > t``, else ``sign(D)/t``."""
    safe = torch.where(kernel.abs() > threshold, kernel, torch.sign(kernel) * threshold)
    safe = torch.where(safe == 0, torch.full_like(safe, threshold), safe)
    inv = 1.0 / safe
    inv[0, 0, 0] = 0.0
    return _convolve(field, _half(inv))


def tv_admm(
    field: torch.Tensor,
    kernel: torch.Tensor,
    voxel_mm: Sequence[float],
    *,
    lam: float = 2e-4,
    rho: float = 2e-2,
    iterations: int = 60,
    weights: Sequence[torch.Tensor] | None = None,
    data_weight: torch.Tensor | None = None,
    mu: float = 0.3,
) -> torch.Tensor:
    """Return χ (ppm) minimising ``½‖W(Dχ − f)‖² + λ‖∇χ‖₁`` (anisotropic TV) by ADMM.

    ``data_weight`` is ``W`` (e.g. :func:`field_reliability`: 0 outside the mask, where the
    field is unknown, and small where the phase is noise); without it ``W = 1`` everywhere.
    ``weights`` (one map per axis, 0–1) scale ``lam`` voxel by voxel: a small weight where the
    anatomy has an edge (:func:`edge_weights`) keeps that edge sharp, as MEDI does.
    ``lam`` and ``rho`` (the gradient split's penalty) are per mm of gradient.

    Without ``W`` every χ-update is the closed-form k-space solve
    ``(|D|² + ρ|E|²)χ = D f + ρ Eᴴ(g − u)``: one real FFT pair per iteration. With ``W`` the
    field is split too (``y = Dχ``, penalty ``mu``): the χ-update becomes
    ``(μ|D|² + ρ|E|²)χ = μ D(y − s) + ρ Eᴴ(g − u)`` and the y-update is voxel-wise,
    ``y = (W²f + μ(Dχ + s)) / (W² + μ)``; two FFT pairs per iteration.
    The gradient's shrinkage is fused: with scaled dual ``u``,
    ``u ← clamp(∇χ + u, ±λ/ρ)``, ``g = ∇χ + u_old − u``, so ``g − u = v − 2u`` and neither
    ``g`` nor the soft threshold needs its own array.
    """
    shape = field.shape
    k_half = _half(kernel)
    # ∇ᴴ∇ of forward differences is minus the 7-point Laplacian
    lap = _laplacian_kernel(shape, voxel_mm, field.device, torch.float32)
    split = data_weight is not None
    scale = mu if split else 1.0
    denom = scale * k_half**2 - rho * _half(lap)
    del lap
    # k = 0 is in neither operator's range (χ is relative): its rounding noise must not blow up
    inv_denom = torch.where(denom > 1e-12, 1.0 / torch.where(denom > 1e-12, denom, 1.0), 0.0)
    del denom
    rho_inv = (rho * inv_denom).unsqueeze(-1)  # trailing axis: multiplies view_as_real(·)
    k_real = k_half.unsqueeze(-1)
    if split:
        assert data_weight is not None
        # the y-update y = (W²f + μv)/(W² + μ) and the new s = v − y, y − s = v − 2s, folded
        # into one multiply-add: s = v·W²/(W² + μ) − W²f/(W² + μ)
        w2 = data_weight**2
        keep = w2 / (w2 + mu)
        offset = -(w2 * field) / (w2 + mu)
        del w2
        y_minus_s = field.clone()
        s = torch.zeros_like(field)
        data_k = (mu * k_half * inv_denom).unsqueeze(-1)
    else:
        dtf = torch.fft.rfftn(field)
        torch.view_as_real(dtf).mul_((k_half * inv_denom).unsqueeze(-1))
    del inv_denom
    h = [float(v) for v in voxel_mm]
    shrink = lam / rho
    # thresholds on the differences times h (not divided by h: one pass saved)
    limits: list[torch.Tensor | float] = [
        shrink * h[i] if weights is None else (shrink * h[i]) * weights[i] for i in range(3)
    ]
    lows = [-lim for lim in limits]
    u = [torch.zeros_like(field) for _ in range(3)]  # scaled duals, in units of differences·h
    w = [torch.zeros_like(field) for _ in range(3)]  # g − u, same units
    back = torch.empty_like(field)
    buf = torch.empty_like(field)
    chi = torch.zeros_like(field)
    for _ in range(iterations):
        # ∇ᴴ(g − u) with ∇ᴴ of the forward difference: (roll(+1) − x)/h²
        backward_difference(w[0], 0, out=back)
        if h[0] != 1.0:
            back.mul_(1.0 / h[0] ** 2)
        for i in (1, 2):
            back.add_(backward_difference(w[i], i, out=buf), alpha=1.0 / h[i] ** 2)
        back_k = torch.fft.rfftn(back)
        torch.view_as_real(back_k).mul_(rho_inv)
        if split:
            chi_k = torch.fft.rfftn(y_minus_s)
            torch.view_as_real(chi_k).mul_(data_k)
            chi_k.add_(back_k)
            del back_k
            chi = torch.fft.irfftn(chi_k, s=shape)
            torch.view_as_real(chi_k).mul_(k_real)
            v = torch.fft.irfftn(chi_k, s=shape).add_(s)  # Dχ + s
            del chi_k
            torch.addcmul(offset, keep, v, out=s)
            torch.add(v, s, alpha=-2.0, out=y_minus_s)
            del v
        else:
            chi = torch.fft.irfftn(back_k.add_(dtf), s=shape)
            del back_k
        for i in range(3):
            forward_difference(chi, i, out=buf).add_(u[i])  # (∇χ)·h + u
            torch.clamp(buf, min=lows[i], max=limits[i], out=u[i])  # type: ignore[call-overload, arg-type]
            torch.add(buf, u[i], alpha=-2.0, out=w[i])
    return chi


def field_reliability(
    magnitudes: torch.Tensor, echo_times_ms: Sequence[float], mask: torch.Tensor
) -> torch.Tensor:
    """Return the field map's reliability: 1 / its noise's standard deviation, up to a scale.

    With phase noise ``σ/mᵢ`` at echo ``i``, the magnitude²-weighted slope of :func:`fit_field`
    has variance ``σ² / Σ mᵢ²(tᵢ − t̄)²`` (``t̄`` the weighted mean TE); one echo gives
    ``σ² / (m t)²``. The square root of the denominator, set to 0 outside ``mask`` and scaled
    to mean 1 inside it, weights :func:`tv_admm`'s data term.

    Examples:
        >>> mags = torch.ones(3, 2, 2, 2); mags[:, 0] = 0.1
        >>> w = field_reliability(mags, [5.0, 10.0, 15.0], torch.ones(2, 2, 2, dtype=torch.bool))
        >>> round(float(w[1, 0, 0] / w[0, 0, 0]), 3), round(float(w.mean()), 3)
        (10.0, 1.0)
    """
    te = [float(t) for t in echo_times_ms]
    # Σ m²(t − t̄)² = Σ m²t² − (Σ m²t)² / Σ m², accumulated one echo at a time
    s0, s1, s2 = (torch.zeros_like(magnitudes[0]) for _ in range(3))
    m2 = torch.empty_like(magnitudes[0])
    for e, t in enumerate(te):
        torch.mul(magnitudes[e], magnitudes[e], out=m2)
        s0.add_(m2)
        s1.add_(m2, alpha=t)
        s2.add_(m2, alpha=t * t)
    if len(te) == 1:
        spread = s2
    else:
        spread = s2.sub_(s1.mul_(s1).div_(s0.add_(1e-12))).clamp_(min=0.0)
    out = torch.sqrt(spread) * mask
    inside = out[mask.bool()]
    mean = float(inside.mean()) if inside.numel() else 0.0
    return out / mean if mean > 0 else mask.to(out.dtype)


def edge_weights(
    image: torch.Tensor, mask: torch.Tensor, *, edge_share: float = 0.3, floor: float = 0.1
) -> list[torch.Tensor]:
    """Return per-axis TV weights: ``floor`` at the ``edge_share`` strongest forward
    differences of ``image`` inside ``mask`` (anatomical edges), 1 elsewhere.

    Examples:
        >>> img = torch.zeros(8, 8, 8); img[4:] = 1.0
        >>> w = edge_weights(img, torch.ones(8, 8, 8, dtype=torch.bool))
        >>> [round(float(v), 3) for v in (w[0][3, 0, 0], w[0][1, 0, 0], w[1][3, 0, 0])]
        [0.1, 1.0, 1.0]
    """
    out = []
    m = mask.bool()
    for axis in range(3):
        d = (torch.roll(image, -1, axis) - image).abs()
        values = d[m]
        if values.numel() == 0 or float(values.max()) == 0.0:
            out.append(torch.ones_like(image))
            continue
        k = max(1, int(round((1 - edge_share) * values.numel())))
        cut = values.kthvalue(k).values
        out.append(torch.where((d > cut) & m, torch.full_like(d, floor), torch.ones_like(d)))
    return out
