"""QSM of one multi-echo GRE: reading and checking the echoes, then :mod:`smoulder.qsm.core`.

``reconstruct`` runs: Laplacian unwrapping per echo → magnitude²-weighted fit of phase over
TE (field in ppm) → V-SHARP → dipole inversion (``tv``: total variation by ADMM, its data
term weighted by the field's reliability, or ``tkd``) → referencing to the mean χ of the mask
or of a reference mask. Everything stays on the GRE's own grid and
orientation; B0's direction in voxel coordinates comes from the affine.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from smoulder.devices import available_cpus
from smoulder.errors import InputError
from smoulder.grids import voxel_sizes
from smoulder.images import phase_to_radians, read_voxels
from smoulder.qsm import core

if TYPE_CHECKING:
    import torch

#: Defaults of the iterative inversion (chosen on the phantom, see benchmarks/qsm.py).
TV_LAMBDA, TV_RHO, TV_MU, TV_ITERATIONS, TV_EDGE_SHARE = 5e-4, 2e-2, 0.3, 30, 0.3
#: How TV weights its data term: "reliability" (1/noise of the field fit, 0 outside the mask)
#: or "uniform" (every voxel of the box alike, the field taken as 0 outside the mask).
DATA_WEIGHTS = ("reliability", "uniform")
TKD_THRESHOLD = 0.19
UNWRAP_TOLERANCE = 1e-3
#: Fewest voxels of a reference mask (e.g. CSF) inside the QSM mask for it to be used.
MIN_REFERENCE_VOXELS = 100
#: Margin (voxels) kept around the V-SHARP mask for the dipole inversion.
INVERSION_MARGIN = 8
VSHARP_RADII_MM = (12.0, 9.0, 6.0, 4.0, 2.0)


@dataclass
class Echoes:
    """Magnitude and phase (rad) of every echo of one GRE, with what QSM needs to know."""

    magnitude: np.ndarray  # (E, X, Y, Z)
    phase: np.ndarray  # (E, X, Y, Z), radians
    echo_times_ms: list[float]
    b0_tesla: float
    affine: np.ndarray
    sources: list[str] = field(default_factory=list)

    @property
    def voxel_mm(self) -> tuple[float, float, float]:
        """Voxel size along each array axis."""
        return tuple(float(v) for v in voxel_sizes(self.affine))  # type: ignore[return-value]


def _read_sidecar(path: Path) -> dict[str, Any]:
    """Return the JSON sidecar of the image ``path`` (``.nii[.gz]`` → ``.json``) as a dict."""
    side = Path(str(path).removesuffix(".gz").removesuffix(".nii") + ".json")
    if not side.exists():
        raise InputError(
            str(side),
            expected="the image's JSON sidecar (EchoTime, MagneticFieldStrength)",
            found="no file",
        )
    return json.loads(side.read_text())


def load_echoes(magnitudes: list[Path], phases: list[Path]) -> Echoes:
    """Return the echoes of one GRE, checked: same count, same grid, TE and B0 present."""
    if len(magnitudes) != len(phases) or not magnitudes:
        raise InputError(
            ", ".join(map(str, phases)) or "phase",
            expected=f"one phase image per magnitude image ({len(magnitudes)})",
            found=f"{len(phases)}",
        )
    tes, b0s = [], []
    affine = None
    shape = None
    for m_path, p_path in zip(magnitudes, phases, strict=True):
        m_img, p_img = nib.load(m_path), nib.load(p_path)
        m_shape, p_shape = m_img.shape, p_img.shape  # type: ignore[attr-defined]
        if len(m_shape) != 3 or len(p_shape) != 3:
            raise InputError(
                str(m_path if len(m_shape) != 3 else p_path),
                expected="a 3D echo",
                found=f"shape {m_shape if len(m_shape) != 3 else p_shape}",
            )
        if m_shape != p_shape or not np.allclose(m_img.affine, p_img.affine, atol=1e-3):  # type: ignore[attr-defined]
            raise InputError(
                str(p_path),
                expected=f"the grid of {m_path.name} ({m_shape})",
                found=f"{p_shape} or another affine",
            )
        if shape is None:
            shape, affine = m_shape, m_img.affine  # type: ignore[attr-defined]
        elif m_shape != shape or not np.allclose(m_img.affine, affine, atol=1e-3):  # type: ignore[attr-defined, arg-type]
            raise InputError(
                str(m_path),
                expected=f"the grid of the first echo ({shape})",
                found=f"{m_shape} or another affine",
            )
        side = {**_read_sidecar(m_path), **_read_sidecar(p_path)}
        if "EchoTime" not in side:
            raise InputError(str(p_path), expected="EchoTime (s) in the sidecar", found="none")
        if "MagneticFieldStrength" not in side:
            raise InputError(
                str(p_path), expected="MagneticFieldStrength (T) in the sidecar", found="none"
            )
        tes.append(float(side["EchoTime"]) * 1000.0)
        b0s.append(float(side["MagneticFieldStrength"]))
    assert shape is not None
    order = [int(i) for i in np.argsort(tes)]
    magnitude = np.empty((len(order), *shape), np.float32)
    phase = np.empty_like(magnitude)

    def read(job: tuple[int, int]) -> None:
        slot, kind = job  # each file goes straight into its echo's slot: no stacking copy
        i = order[slot]
        if kind == 0:
            magnitude[slot] = read_voxels(magnitudes[i])
        else:
            phase[slot] = phase_to_radians(read_voxels(phases[i]), phases[i])

    # decompression and conversion release the GIL: read the files side by side
    with ThreadPoolExecutor(max_workers=min(4, available_cpus())) as pool:
        list(pool.map(read, [(slot, kind) for slot in range(len(order)) for kind in (0, 1)]))
    return Echoes(
        magnitude=magnitude,
        phase=phase,
        echo_times_ms=[tes[i] for i in order],
        b0_tesla=b0s[0],
        affine=np.asarray(affine),
        sources=[str(p) for p in magnitudes] + [str(p) for p in phases],
    )


def magnitude_mask(magnitude: np.ndarray) -> np.ndarray:
    """Return a head mask from the first echo's magnitude: Otsu threshold, largest piece, holes
    filled. Refine it with the session's brain mask for QSM (the scalp is not brain)."""
    from skimage.filters import threshold_otsu

    mag = magnitude[0] if magnitude.ndim == 4 else magnitude
    mask = mag > threshold_otsu(mag)
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndi.binary_fill_holes(labels == sizes.argmax())


def quality_unwrap(phase: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Return ``phase`` (rad) unwrapped by reliability-guided region growing, inside ``mask``.

    Voxel pairs are joined in order of decreasing reliability (the smoothness of each voxel's
    second differences), so noisy regions are reached last and their errors stay local
    (Herráez et al., Applied Optics 2002; scikit-image's ``unwrap_phase``). Outside the mask
    the result is 0.

    Examples:
        >>> x = np.linspace(0, 1, 24)[:, None, None] * np.ones((24, 24, 24))
        >>> truth = 18.0 * x**2
        >>> out = quality_unwrap(np.angle(np.exp(1j * truth)), np.ones(truth.shape, bool))
        >>> bool(np.abs((out - truth) - (out - truth).mean()).max() < 1e-4)
        True
    """
    from skimage.restoration import unwrap_phase

    wrapped = np.ma.masked_array(np.asarray(phase, np.float64), mask=~np.asarray(mask, bool))
    out = unwrap_phase(wrapped)
    return np.asarray(np.ma.filled(out, 0.0), np.float32)


def unwrap_echoes(
    phase: torch.Tensor,
    magnitude: torch.Tensor,
    echo_times_ms: list[float],
    voxel_mm: tuple[float, float, float],
    mask: torch.Tensor,
    method: str = "laplacian",
) -> torch.Tensor:
    """Return the phases of all echoes unwrapped in space and time (E, X, Y, Z), radians.

    Spatial unwrapping is done once, on the magnitude-weighted mean phase difference of
    consecutive echoes (its gradients are TE/ΔTE times smaller than those of a late echo, and
    the receiver phase offset cancels); each echo is then unwrapped in time against the line
    that difference predicts. One echo: Laplacian unwrapping of that echo.
    """
    import torch

    def spatial(p: torch.Tensor) -> torch.Tensor:
        if method == "quality":
            out = quality_unwrap(p.cpu().numpy(), mask.bool().cpu().numpy())
            return torch.from_numpy(out).to(p.device)
        return core.laplacian_unwrap(p, voxel_mm, mask, tolerance=UNWRAP_TOLERANCE)

    if phase.shape[0] == 1:
        return spatial(phase[0])[None]
    te = [float(t) for t in echo_times_ms]
    step = (te[-1] - te[0]) / (len(te) - 1)
    # angle of Σ m_e m_(e−1) exp(i(φ_e − φ_(e−1))), in real arithmetic one pair at a time
    # (a complex copy of every echo costs twice the memory of the echoes themselves)
    re, im = torch.zeros_like(phase[0]), torch.zeros_like(phase[0])
    d, w = torch.empty_like(phase[0]), torch.empty_like(phase[0])
    for e in range(1, phase.shape[0]):
        torch.sub(phase[e], phase[e - 1], out=d)
        torch.mul(magnitude[e], magnitude[e - 1], out=w)
        re.addcmul_(w, torch.cos(d))
        im.addcmul_(w, d.sin_())
    dphi = torch.atan2(im, re)
    del re, im, w
    # the solve only has to land within ±π of the truth: the result is made congruent with
    # the measured difference below, so a loose tolerance loses nothing
    du = spatial(dphi)
    mf = mask.to(du.dtype)
    torch.sub(dphi, du, out=d)
    shift = torch.atan2((torch.sin(d) * mf).sum(), (d.cos_() * mf).sum())
    du.add_(shift)  # align with dphi on average
    # then exactly congruent with dphi
    du = dphi + (2 * math.pi) * torch.round((du - dphi) / (2 * math.pi))
    mean = float((du * mf).sum() / mf.sum().clamp(min=1))
    du.sub_(2 * math.pi * round(mean / (2 * math.pi)))  # brain mean field ~ 0
    rate = du.div_(step)  # rad/ms
    offset = core.wrap(phase[0] - rate * te[0])
    out = torch.empty_like(phase)
    for e, t in enumerate(te):  # each echo moved by whole turns onto the line offset + rate·TE
        model = torch.add(offset, rate, alpha=t).sub_(phase[e])
        model.div_(2 * math.pi).round_().mul_(2 * math.pi)
        torch.add(phase[e], model, out=out[e])
    return out


def fft_box(mask: np.ndarray, margin: Sequence[int]) -> tuple[slice, ...]:
    """Return the box of ``mask`` grown by ``margin`` voxels, each edge a fast FFT size.

    The box may reach past the array's end; :func:`crop_pad` fills that part with zeros. It
    always does where the mask comes within ``margin`` of the end (a slab whose brain fills
    its first or last slices): the FFTs are periodic, and without those zeros the slab's first
    and last slices would be each other's neighbours (V-SHARP would not erode them, and the
    background field of a slab would stay in its local field).

    Examples:
        >>> m = np.zeros((300, 300, 300), bool); m[10:99, 10:110, 10:120] = True
        >>> [(s.start, s.stop) for s in fft_box(m, [2, 2, 2])]
        [(8, 104), (8, 116), (8, 128)]
        >>> m = np.zeros((20, 20, 40), bool); m[5:15, 5:15, :] = True  # a slab filled end to end
        >>> [(s.start, s.stop) for s in fft_box(m, [4, 4, 4])]
        [(1, 19), (1, 19), (0, 45)]
    """
    mask = np.asarray(mask, bool)
    box = []
    for axis, m in enumerate(margin):
        # the mask's extent along this axis, from its projection (no labelled copy of the mask)
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        start, stop = max(0, int(hit[0]) - m), int(hit[-1]) + 1 + m
        box.append(slice(start, start + core.fast_size(stop - start)))
    return tuple(box)


def crop_pad(array: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """Return ``array[..., box]`` (box on the last three axes), zero-filled past the end."""
    lead = array.ndim - 3
    inside = tuple(
        slice(b.start, min(b.stop, n)) for b, n in zip(box, array.shape[lead:], strict=True)
    )
    out = np.zeros(array.shape[:lead] + tuple(b.stop - b.start for b in box), array.dtype)
    # one copy into zeroed memory (np.pad of a 5-echo volume took five times as long)
    out[(slice(None),) * lead + tuple(slice(0, i.stop - i.start) for i in inside)] = array[
        (slice(None),) * lead + inside
    ]
    return out


def crop_pad_t(x: torch.Tensor, box: tuple[slice, ...]) -> torch.Tensor:
    """:func:`crop_pad` for a 3D tensor."""
    import torch

    inside = tuple(slice(b.start, min(b.stop, n)) for b, n in zip(box, x.shape, strict=True))
    part = x[inside]
    pad: list[int] = []
    for b, i in reversed(list(zip(box, inside, strict=True))):
        pad += [0, (b.stop - b.start) - (i.stop - i.start)]
    if part.dtype == torch.bool:
        return torch.nn.functional.pad(part.to(torch.uint8), pad).bool()
    return torch.nn.functional.pad(part, pad)


@dataclass
class QsmResult:
    """Outputs of :func:`reconstruct` (GRE grid)."""

    chi_ppm: np.ndarray
    total_field_ppm: np.ndarray
    local_field_ppm: np.ndarray
    mask: np.ndarray
    method: str
    parameters: dict[str, Any]
    timings: dict[str, float]


@dataclass(frozen=True)
class InversionSettings:
    """Settings of the background removal and the dipole inversion of :func:`reconstruct`.

    Attributes:
        tv_lambda: TV's regularisation weight, per mm of gradient (:func:`core.tv_admm`).
        tv_rho: ADMM's penalty of the gradient split.
        tv_mu: ADMM's penalty of the field split (used with a data weight).
        tv_iterations: ADMM iterations.
        data_weight: how TV weights its data term, one of :data:`DATA_WEIGHTS`.
        edge_share: share of the magnitude's strongest edges kept sharp (0: none).
        tkd_threshold: TKD's truncation of the dipole kernel.
        vsharp_radii_mm: V-SHARP's ball radii, largest first.

    Examples:
        >>> InversionSettings(data_weight="uniform").tv_iterations == TV_ITERATIONS
        True
    """

    tv_lambda: float = TV_LAMBDA
    tv_rho: float = TV_RHO
    tv_mu: float = TV_MU
    tv_iterations: int = TV_ITERATIONS
    data_weight: str = "reliability"
    edge_share: float = TV_EDGE_SHARE
    tkd_threshold: float = TKD_THRESHOLD
    vsharp_radii_mm: tuple[float, ...] = VSHARP_RADII_MM

    def admm_keywords(self) -> dict[str, Any]:
        """Return the keywords of :func:`core.tv_admm` that these settings set."""
        lam, rho, mu = self.tv_lambda, self.tv_rho, self.tv_mu
        return {"lam": lam, "rho": rho, "mu": mu, "iterations": self.tv_iterations}

    def tv_parameters(self, *, weighted: bool) -> dict[str, Any]:
        """Return the TV settings as the sidecar states them (``mu`` only where it was used:
        with a data weight)."""
        params: dict[str, Any] = {"lambda": self.tv_lambda, "rho": self.tv_rho}
        params.update(iterations=self.tv_iterations, edge_share=self.edge_share)
        params["data_weight"] = self.data_weight
        if weighted:
            params["mu"] = self.tv_mu
        return params


def reconstruct(
    echoes: Echoes,
    mask: np.ndarray,
    *,
    method: str = "tv",
    device: str = "cpu",
    unwrap: str = "laplacian",
    reference_mask: np.ndarray | None = None,
    settings: InversionSettings = InversionSettings(),
) -> QsmResult:
    """Return χ (ppm) and the fields of ``echoes`` inside ``mask`` (see the module docstring).

    χ is referenced to its mean inside ``reference_mask`` (e.g. the ventricles' CSF, on the
    GRE grid) where at least :data:`MIN_REFERENCE_VOXELS` of it lie in the QSM mask, else to
    the QSM mask's mean; ``parameters["reference"]`` says which was used.

    Args:
        echoes: the GRE's echoes (:func:`load_echoes`).
        mask: brain mask on the GRE grid.
        method: dipole inversion, ``tv`` or ``tkd``.
        device: ``cpu`` or ``cuda`` (a resolved device: :func:`smoulder.devices.resolve_device`).
        unwrap: spatial unwrapping, ``laplacian`` or ``quality``.
        reference_mask: optional mask (GRE grid) whose mean χ is the zero.
        settings: background removal and inversion settings.
    """
    import torch

    _check_options(method, unwrap, settings)
    _check_masks(echoes, mask, reference_mask)
    # work inside the mask's box plus the largest V-SHARP radius: a whole-head field of view
    # is often twice the brain's volume
    vox = echoes.voxel_mm
    margin = [int(math.ceil(max(settings.vsharp_radii_mm) / v)) + 2 for v in vox]
    box = fft_box(mask, margin)
    full_shape = mask.shape
    ref_box = None if reference_mask is None else crop_pad(np.asarray(reference_mask, bool), box)
    echoes = Echoes(
        magnitude=crop_pad(echoes.magnitude, box),
        phase=crop_pad(echoes.phase, box),
        echo_times_ms=echoes.echo_times_ms,
        b0_tesla=echoes.b0_tesla,
        affine=echoes.affine,
        sources=echoes.sources,
    )
    timings: dict[str, float] = {}
    dev = torch.device(device)
    total, local, kept, reliability = _fields(
        echoes, crop_pad(mask, box), method, unwrap, settings, dev, timings
    )
    tic = time.perf_counter()
    b0 = core.b0_in_voxels(echoes.affine)
    chi, params = _invert(echoes, local, kept, reliability, b0, method, settings)
    chi, reference = _referenced(chi, kept, ref_box)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    timings["inversion_s"] = time.perf_counter() - tic
    params.update(
        {
            "vsharp_radii_mm": list(settings.vsharp_radii_mm),
            "unwrapping": unwrap,
            "reference": reference,
            "b0_direction_voxels": [round(float(v), 6) for v in b0],
        }
    )
    return QsmResult(
        chi_ppm=_uncropped(chi, box, full_shape),
        total_field_ppm=_uncropped(total, box, full_shape),
        local_field_ppm=_uncropped(local, box, full_shape),
        mask=_uncropped(kept, box, full_shape),
        method=method,
        parameters=params,
        timings=timings,
    )


def _check_options(method: str, unwrap: str, settings: InversionSettings) -> None:
    """Raise ValueError naming the first unknown method, unwrapping or data weight."""
    if method not in ("tv", "tkd"):
        raise ValueError(f"method: expected 'tv' or 'tkd', found {method!r}")
    if settings.data_weight not in DATA_WEIGHTS:
        found = settings.data_weight
        raise ValueError(f"data_weight: expected one of {DATA_WEIGHTS}, found {found!r}")
    if unwrap not in ("laplacian", "quality"):
        raise ValueError(f"unwrap: expected 'laplacian' or 'quality', found {unwrap!r}")


def _check_masks(echoes: Echoes, mask: np.ndarray, reference_mask: np.ndarray | None) -> None:
    """Raise InputError unless ``mask`` (non-empty) and ``reference_mask`` are on the GRE grid."""
    if mask.shape != echoes.magnitude.shape[1:] or not mask.any():
        raise InputError(
            "mask",
            expected=f"a non-empty mask on the GRE grid {echoes.magnitude.shape[1:]}",
            found=f"{mask.shape}, {int(mask.sum())} voxels",
        )
    if reference_mask is not None and reference_mask.shape != mask.shape:
        raise InputError(
            "reference mask",
            expected=f"a mask on the GRE grid {mask.shape}",
            found=f"{reference_mask.shape}",
        )


def _fields(
    echoes: Echoes,
    mask: np.ndarray,
    method: str,
    unwrap: str,
    settings: InversionSettings,
    dev: torch.device,
    timings: dict[str, float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Return the total field, the local field (ppm), V-SHARP's mask and, for a reliability
    weighted TV, the field's reliability; ``timings`` gets ``unwrap_s`` and ``background_s``.

    All on ``echoes``' (cropped) grid; ``mask`` is the brain mask there.
    """
    import torch

    vox = echoes.voxel_mm
    tic = time.perf_counter()
    m = torch.from_numpy(np.ascontiguousarray(mask)).to(dev)
    head = torch.from_numpy(np.ascontiguousarray(ndi.binary_dilation(mask, iterations=2))).to(dev)
    mags = torch.from_numpy(echoes.magnitude).to(dev)
    unwrapped = unwrap_echoes(
        torch.from_numpy(echoes.phase).to(dev), mags, echoes.echo_times_ms, vox, head, unwrap
    )
    timings["unwrap_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    slope, _ = core.fit_field(unwrapped, mags, echoes.echo_times_ms)
    total = slope / core.rad_per_ms_per_ppm(echoes.b0_tesla) * m
    del unwrapped
    local, kept = core.vsharp(total, m, vox, radii_mm=settings.vsharp_radii_mm)
    reliability = None
    if method == "tv" and settings.data_weight == "reliability":
        reliability = core.field_reliability(mags, echoes.echo_times_ms, kept)
    del mags
    timings["background_s"] = time.perf_counter() - tic
    if not bool(kept.any()):
        raise InputError(
            "mask",
            expected="a mask thicker than V-SHARP's smallest ball "
            f"({min(settings.vsharp_radii_mm)} mm)",
            found=f"{int(m.sum())} voxels, none left after erosion",
        )
    return total, local, kept, reliability


def _invert(
    echoes: Echoes,
    local: torch.Tensor,
    kept: torch.Tensor,
    reliability: torch.Tensor | None,
    b0: np.ndarray,
    method: str,
    settings: InversionSettings,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Return χ (ppm, unreferenced, on ``local``'s grid) and the inversion's parameters.

    The inversion runs in the box of V-SHARP's mask ``kept`` with a margin of zero field
    (:data:`INVERSION_MARGIN`), not on the whole grid; ``b0`` is the field's direction in
    voxel coordinates.
    """
    import torch

    vox, dev = echoes.voxel_mm, local.device
    inner = fft_box(kept.cpu().numpy(), [INVERSION_MARGIN] * 3)
    inner_t = tuple(slice(s.start, min(s.stop, n)) for s, n in zip(inner, kept.shape, strict=True))
    local_in = crop_pad_t(local, inner)
    kernel = core.dipole_kernel(local_in.shape, vox, tuple(float(v) for v in b0), device=dev)
    if method == "tkd":
        chi_in = core.tkd(local_in, kernel, settings.tkd_threshold)
        params: dict[str, Any] = {"threshold": settings.tkd_threshold}
    else:
        weights = None
        if settings.edge_share > 0:  # keep the magnitude's edges (rims darken the late echoes)
            mean_mag = crop_pad_t(torch.from_numpy(echoes.magnitude.mean(0)).to(dev), inner)
            kept_in = crop_pad_t(kept, inner)
            weights = core.edge_weights(mean_mag, kept_in, edge_share=settings.edge_share)
        # 0 outside V-SHARP's mask, where the field is unknown (not 0)
        data_w = None if reliability is None else crop_pad_t(reliability, inner)
        tv = settings.admm_keywords()
        chi_in = core.tv_admm(local_in, kernel, vox, weights=weights, data_weight=data_w, **tv)
        params = settings.tv_parameters(weighted=data_w is not None)
    chi = torch.zeros_like(local)
    chi[inner_t] = chi_in[tuple(slice(0, s.stop - s.start) for s in inner_t)]
    return chi, params


def _referenced(
    chi: torch.Tensor, kept: torch.Tensor, ref_box: np.ndarray | None
) -> tuple[torch.Tensor, str]:
    """Return χ minus its mean in the reference region, zero outside ``kept``, and what the
    reference was (the reference mask where enough of it lies in ``kept``, else ``kept``)."""
    import torch

    reference = "mean susceptibility of the QSM mask"
    ref = kept
    if ref_box is not None:
        candidate = torch.from_numpy(ref_box).to(kept.device) & kept
        count = int(candidate.sum())
        if count >= MIN_REFERENCE_VOXELS:
            ref = candidate
            reference = f"mean susceptibility of the reference mask ({count} voxels)"
        else:
            reference += f" (the reference mask had {count} voxels in it, fewer than "
            reference += f"{MIN_REFERENCE_VOXELS})"
    return (chi - chi[ref].mean()) * kept, reference


def _uncropped(x: torch.Tensor, box: tuple[slice, ...], full_shape: tuple[int, ...]) -> np.ndarray:
    """Return the cropped ``x`` put back into a zero array of ``full_shape`` (bool stays bool,
    everything else becomes float32)."""
    import torch

    out: np.ndarray = np.zeros(full_shape, dtype=np.bool_ if x.dtype == torch.bool else np.float32)
    inside = tuple(slice(b.start, min(b.stop, n)) for b, n in zip(box, full_shape, strict=True))
    out[inside] = x.cpu().numpy()[tuple(slice(0, s.stop - s.start) for s in inside)]
    return out


def filtered_phase(echoes: Echoes, echo: int = -1, *, kernel_fraction: float = 0.125) -> np.ndarray:
    """Return homodyne high-pass filtered phase (rad) of one echo (default the last).

    The complex image is divided by its own low-pass copy (a Hann window over the central
    ``kernel_fraction`` of k-space), which removes the smooth background phase.
    """
    from scipy import fft

    mag, phase = echoes.magnitude[echo], echoes.phase[echo]
    z = np.empty(mag.shape, np.complex64)  # single precision, FFTs on every allowed core
    z.real, z.imag = mag * np.cos(phase), mag * np.sin(phase)
    workers = available_cpus()
    k = fft.fftn(z, workers=workers)
    for axis, n in enumerate(z.shape):  # the separable window, centred on k = 0
        w = max(3, int(round(n * kernel_fraction)))
        h = np.zeros(n, np.float32)
        start = n // 2 - w // 2
        h[start : start + w] = np.hanning(w)
        shape = [1, 1, 1]
        shape[axis] = n
        k *= np.fft.ifftshift(h).reshape(shape)
    low = fft.ifftn(k, workers=workers, overwrite_x=True)
    return np.angle(z * np.conj(low)).astype(np.float32)


def swi(
    echoes: Echoes, hp_phase: np.ndarray, *, power: int = 4, minip_mm: float = 8.0
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(SWI, minIP)``: magnitude times the negative-phase mask to ``power``, and its
    minimum intensity projection over a slab of ``minip_mm`` along the third axis."""
    mask = np.where(hp_phase < 0, 1.0 + hp_phase / np.pi, 1.0)
    image = (echoes.magnitude[-1] * mask**power).astype(np.float32)
    n = max(1, int(round(minip_mm / echoes.voxel_mm[2])))
    minip = ndi.minimum_filter1d(image, n, axis=2).astype(np.float32)
    return image, minip
