"""MR physics of the synthetic MS phantom at 3 T: tissues, signal equations, dipole field, noise.

Pure numpy/scipy; every function is deterministic given its inputs (and ``rng`` state).

Conventions:
    * Tissue-parameter arguments broadcast: scalars in give 0-d results, arrays work elementwise.
      Partial volume is the caller's business: a mixed voxel is the sum over tissue classes of
      ``fraction_c * signal(params_c)``, so signal functions take the parameters of pure classes.
    * ``pd`` is the proton density relative to water (CSF = 1) and doubles as M0: signals are in
      that arbitrary unit. T2* values are intrinsic; macroscopic dephasing from field gradients
      is what the simulation adds on top.
    * ``chi_ppm`` is the volume susceptibility (SI, ppm) relative to CSF = 0. ``field_ppm`` is
      the relative field shift ``dBz / B0`` in ppm along B0.
    * Phase: ``phase(TE) = phase_offset + 2 pi * gamma_bar * B0 * field_ppm * 1e-6 * TE`` with
      ``gamma_bar = 42.577478 MHz/T``. A paramagnetic (chi > 0) source gives a positive field
      along B0 and a positive phase. Vendors differ in handedness; flip the sign on export to
      mimic one that stores the opposite convention.
    * Grids are axis-aligned; ``b0_dir`` is in array-axis coordinates and defaults to the third
      axis, ``(0, 0, 1)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.fft
from numpy.typing import ArrayLike, NDArray

GAMMA_BAR_MHZ_PER_T = 42.577478
_CHI_JITTER_PPM = 0.005


def _array(name: str, value: ArrayLike, *, allow_zero: bool = False) -> NDArray[np.float64]:
    arr = np.asarray(value, dtype=np.float64)
    bad = ~np.isfinite(arr) | ((arr < 0) if allow_zero else (arr <= 0))
    if np.any(bad):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be {kind} and finite, got {arr[bad].flat[0]!r}")
    return arr


def _scalar(name: str, value: float, *, allow_zero: bool = False) -> float:
    return float(_array(name, value, allow_zero=allow_zero))


def _flip_rad(name: str, flip_deg: float) -> float:
    flip = float(flip_deg)
    if not (math.isfinite(flip) and 0.0 < flip <= 180.0):
        raise ValueError(f"{name} must lie in (0, 180] degrees, got {flip_deg!r}")
    return math.radians(flip)


@dataclass(frozen=True)
class Tissue:
    """MR properties of one pure tissue class.

    Attributes:
        name: Class name (a key of :data:`TISSUES_3T`).
        pd: Proton density relative to water.
        t1_ms: Longitudinal relaxation time.
        t2_ms: Transverse relaxation time.
        t2star_ms: Intrinsic effective transverse relaxation time (not above ``t2_ms``).
        chi_ppm: Volume susceptibility relative to CSF.
    """

    name: str
    pd: float
    t1_ms: float
    t2_ms: float
    t2star_ms: float
    chi_ppm: float

    def __post_init__(self) -> None:
        _scalar(f"{self.name}.pd", self.pd, allow_zero=True)
        for field_name in ("t1_ms", "t2_ms", "t2star_ms"):
            _scalar(f"{self.name}.{field_name}", getattr(self, field_name))
        if self.t2star_ms > self.t2_ms:
            raise ValueError(f"{self.name}: t2star_ms={self.t2star_ms} exceeds t2_ms={self.t2_ms}")
        if not math.isfinite(self.chi_ppm):
            raise ValueError(f"{self.name}: chi_ppm must be finite, got {self.chi_ppm!r}")


# Sources (3 T, rounded): T1/T2 Wansapura 1999 JMRI, Stanisz 2005 MRM; CSF T1 Lu 2005 JMRI;
# T2* Peters 2007 MRI; PD Neeb 2006 NeuroImage; chi Li 2011 NeuroImage, Deistung 2013 NeuroImage
# (deep GM: a caudate/putamen/pallidum/thalamus composite); lesions and iron rims Wisnieff 2015
# MRM, Dal-Bianco 2017 Acta Neuropathol; venous blood T1 Lu 2004 MRM, chi Spees 2001 MRM
# (Hct 0.4, 70 % saturation); bone Hopkins & Wehrli 1997 MRM; air vs water Schenck 1996 Med Phys.
# Air and bone relaxation times only need to be finite: with pd ~ 0 they never show.
TISSUES_3T: dict[str, Tissue] = {
    t.name: t
    for t in (
        Tissue("csf", pd=1.00, t1_ms=4200.0, t2_ms=2000.0, t2star_ms=1000.0, chi_ppm=0.0),
        Tissue("gm", pd=0.80, t1_ms=1350.0, t2_ms=100.0, t2star_ms=66.0, chi_ppm=0.01),
        Tissue("deep_gm", pd=0.78, t1_ms=1150.0, t2_ms=70.0, t2star_ms=38.0, chi_ppm=0.06),
        Tissue("wm", pd=0.69, t1_ms=850.0, t2_ms=80.0, t2star_ms=53.0, chi_ppm=-0.03),
        Tissue("lesion", pd=0.82, t1_ms=1400.0, t2_ms=140.0, t2star_ms=70.0, chi_ppm=0.01),
        Tissue("rim", pd=0.80, t1_ms=1350.0, t2_ms=120.0, t2star_ms=30.0, chi_ppm=0.07),
        Tissue("vein", pd=0.85, t1_ms=1650.0, t2_ms=50.0, t2star_ms=12.0, chi_ppm=0.40),
        # Scalp: fat (chi ~ +0.6) mixed with skin and muscle (chi ~ 0), fat-like short T1.
        Tissue("soft_tissue", pd=0.90, t1_ms=450.0, t2_ms=80.0, t2star_ms=35.0, chi_ppm=0.10),
        Tissue("bone", pd=0.05, t1_ms=250.0, t2_ms=1.0, t2star_ms=0.5, chi_ppm=-2.0),
        Tissue("air", pd=0.0, t1_ms=1000.0, t2_ms=1.0, t2star_ms=1.0, chi_ppm=9.2),
    )
}

# Their susceptibility is a material constant, not a between-subject trait.
_FIXED_CHI = frozenset({"air", "bone"})


def sample_tissues(rng: np.random.Generator, *, spread: float = 0.05) -> dict[str, Tissue]:
    """Return one subject's tissue table: :data:`TISSUES_3T` with between-subject jitter.

    PD, T1, T2 and T2* are scaled by mean-one lognormal factors of relative sd ``spread``
    (PD capped at 1, T2* capped at T2); chi gets additive N(0, 0.005 ppm) noise except for air
    and bone. The same ``rng`` state always gives the same table.

    Args:
        rng: Random generator; consumed by a fixed number of draws.
        spread: Relative standard deviation of the multiplicative jitter, in [0, 0.5).

    Returns:
        A new dict with the same keys (and order) as :data:`TISSUES_3T`.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if not (math.isfinite(spread) and 0.0 <= spread < 0.5):
        raise ValueError(f"spread must lie in [0, 0.5), got {spread!r}")
    names = list(TISSUES_3T)
    factors = np.exp(spread * rng.standard_normal((len(names), 4)) - 0.5 * spread**2)
    dchi = rng.normal(0.0, _CHI_JITTER_PPM, len(names))
    out = {}
    for name, f, dc in zip(names, factors, dchi, strict=True):
        t = TISSUES_3T[name]
        t2 = t.t2_ms * f[2]
        out[name] = Tissue(
            name,
            pd=float(min(t.pd * f[0], 1.0)),
            t1_ms=float(t.t1_ms * f[1]),
            t2_ms=float(t2),
            t2star_ms=float(min(t.t2star_ms * f[3], t2)),
            chi_ppm=float(t.chi_ppm if name in _FIXED_CHI else t.chi_ppm + dc),
        )
    return out


def flair_signal(
    pd: ArrayLike,
    t1_ms: ArrayLike,
    t2_ms: ArrayLike,
    *,
    tr_ms: float = 9000.0,
    ti_ms: float = 2500.0,
    te_ms: float = 90.0,
) -> NDArray[np.float64]:
    """Return the FLAIR (inversion-recovery) magnitude ``|PD (1 - 2e^-TI/T1 + e^-TR/T1) e^-TE/T2|``.

    Args:
        pd: Proton density.
        t1_ms: T1 of each class.
        t2_ms: T2 of each class.
        tr_ms: Repetition time.
        ti_ms: Inversion time (shorter than ``tr_ms``).
        te_ms: Echo time.

    Returns:
        The magnitude signal, broadcast over the tissue parameters.
    """
    pd_, t1, t2 = _array("pd", pd, allow_zero=True), _array("t1_ms", t1_ms), _array("t2_ms", t2_ms)
    tr, ti = _scalar("tr_ms", tr_ms), _scalar("ti_ms", ti_ms)
    te = _scalar("te_ms", te_ms, allow_zero=True)
    if ti >= tr:
        raise ValueError(f"ti_ms={ti_ms} must be shorter than tr_ms={tr_ms}")
    mz = 1.0 - 2.0 * np.exp(-ti / t1) + np.exp(-tr / t1)
    return np.abs(pd_ * mz * np.exp(-te / t2))


def flair_null_ti_ms(t1_ms: ArrayLike, tr_ms: float) -> NDArray[np.float64]:
    """Return the inversion time that nulls tissue of ``t1_ms`` in :func:`flair_signal`.

    Solves ``1 - 2e^-TI/T1 + e^-TR/T1 = 0``, i.e. ``TI = T1 ln(2 / (1 + e^-TR/T1))``.

    Args:
        t1_ms: T1 to null.
        tr_ms: Repetition time.

    Returns:
        The nulling TI in ms.

    Examples:
        >>> round(float(flair_null_ti_ms(4200.0, 9000.0)), 1)
        2445.3
    """
    t1, tr = _array("t1_ms", t1_ms), _scalar("tr_ms", tr_ms)
    return t1 * (math.log(2.0) - np.log1p(np.exp(-tr / t1)))


def spgr_signal(
    pd: ArrayLike,
    t1_ms: ArrayLike,
    t2star_ms: ArrayLike,
    *,
    tr_ms: float,
    flip_deg: float,
    te_ms: float,
) -> NDArray[np.float64]:
    """Return the spoiled-GRE steady state ``PD sin(a) (1 - E1) / (1 - cos(a) E1) e^-TE/T2*``.

    Args:
        pd: Proton density.
        t1_ms: T1 of each class.
        t2star_ms: T2* of each class.
        tr_ms: Repetition time.
        flip_deg: Flip angle in (0, 180].
        te_ms: Echo time.

    Returns:
        The (real, non-negative) signal, broadcast over the tissue parameters.

    Examples:
        >>> round(float(spgr_signal(1.0, 1000.0, 50.0, tr_ms=1e6, flip_deg=90.0, te_ms=0.0)), 6)
        1.0
    """
    pd_, t1 = _array("pd", pd, allow_zero=True), _array("t1_ms", t1_ms)
    t2s = _array("t2star_ms", t2star_ms)
    tr, te = _scalar("tr_ms", tr_ms), _scalar("te_ms", te_ms, allow_zero=True)
    flip = _flip_rad("flip_deg", flip_deg)
    e1 = np.exp(-tr / t1)
    steady = -np.expm1(-tr / t1) / (1.0 - math.cos(flip) * e1)
    return pd_ * math.sin(flip) * steady * np.exp(-te / t2s)


# FLASH-like T1 weighting: short TR and a flip well above the GM/WM Ernst angle (~10 deg) make
# the shortest T1 brightest, WM > GM > CSF.
T1W_DEFAULTS: dict[str, float] = {"tr_ms": 20.0, "flip_deg": 25.0, "te_ms": 4.0}


@dataclass(frozen=True)
class MP2RAGEParams:
    """MP2RAGE protocol (Marques et al. 2010 NeuroImage 49:1271); defaults are a common 3 T one.

    Each cycle: adiabatic inversion, delay TA, GRE block 1 (``n_readouts`` pulses of ``flip1_deg``
    every ``tr_gre_ms``), delay TB, GRE block 2 (``flip2_deg``), delay TC. Pulse ``n_readouts // 2``
    of each block samples the k-space centre and happens at ``ti1_ms`` / ``ti2_ms`` after the
    inversion.

    Attributes:
        tr_mp2rage_ms: Cycle length (inversion to inversion).
        ti1_ms: Inversion to k-space centre of block 1.
        ti2_ms: Inversion to k-space centre of block 2.
        flip1_deg: Flip angle of block 1.
        flip2_deg: Flip angle of block 2.
        n_readouts: RF pulses per block.
        tr_gre_ms: Spacing of the pulses within a block.
        inversion_efficiency: Mz after inversion is ``-inversion_efficiency * Mz``.
    """

    tr_mp2rage_ms: float = 5000.0
    ti1_ms: float = 700.0
    ti2_ms: float = 2500.0
    flip1_deg: float = 4.0
    flip2_deg: float = 5.0
    n_readouts: int = 176
    tr_gre_ms: float = 7.0
    inversion_efficiency: float = 0.96

    def __post_init__(self) -> None:
        for name in ("tr_mp2rage_ms", "ti1_ms", "ti2_ms", "tr_gre_ms"):
            _scalar(name, getattr(self, name))
        _flip_rad("flip1_deg", self.flip1_deg)
        _flip_rad("flip2_deg", self.flip2_deg)
        if isinstance(self.n_readouts, bool) or not isinstance(self.n_readouts, int | np.integer):
            raise ValueError(f"n_readouts must be an integer, got {self.n_readouts!r}")
        if self.n_readouts < 1:
            raise ValueError(f"n_readouts must be at least 1, got {self.n_readouts}")
        if not (math.isfinite(self.inversion_efficiency) and 0.0 < self.inversion_efficiency <= 1):
            raise ValueError(
                f"inversion_efficiency must lie in (0, 1], got {self.inversion_efficiency!r}"
            )
        ta, tb, tc = self.delays_ms
        block = self.n_readouts * self.tr_gre_ms
        if ta < 0:
            raise ValueError(
                f"ti1_ms={self.ti1_ms} is too short: block 1 would start {-ta:g} ms before the "
                f"inversion (n_readouts // 2 * tr_gre_ms = {self.ti1_ms - ta:g} ms)"
            )
        if tb < 0:
            raise ValueError(
                f"ti2_ms - ti1_ms = {self.ti2_ms - self.ti1_ms:g} ms is shorter than one GRE block "
                f"(n_readouts * tr_gre_ms = {block:g} ms)"
            )
        if tc < 0:
            raise ValueError(
                f"tr_mp2rage_ms={self.tr_mp2rage_ms} is too short: block 2 ends at "
                f"{self.tr_mp2rage_ms - tc:g} ms"
            )

    @property
    def delays_ms(self) -> tuple[float, float, float]:
        """Return the free-relaxation delays (TA, TB, TC) around the two GRE blocks, in ms."""
        before = (self.n_readouts // 2) * self.tr_gre_ms
        after = (self.n_readouts - self.n_readouts // 2) * self.tr_gre_ms
        return (
            self.ti1_ms - before,
            self.ti2_ms - self.ti1_ms - self.n_readouts * self.tr_gre_ms,
            self.tr_mp2rage_ms - self.ti2_ms - after,
        )


# Each stage of a cycle maps Mz affinely, Mz -> a Mz + b; stages compose into one map whose
# fixed point is the steady state, so no cycle-by-cycle iteration is needed.
_Affine = tuple[NDArray[np.float64], NDArray[np.float64]]


def _compose(*maps: _Affine) -> _Affine:
    a, b = maps[0]
    for a2, b2 in maps[1:]:
        a, b = a2 * a, a2 * b + b2
    return a, b


def _relax(t_ms: float, t1: NDArray[np.float64], m0: NDArray[np.float64]) -> _Affine:
    e = np.exp(-t_ms / t1)
    return e, -m0 * np.expm1(-t_ms / t1)


def _pulse_train(
    k: int, flip_rad: float, tr_ms: float, t1: NDArray[np.float64], m0: NDArray[np.float64]
) -> _Affine:
    a1, b1 = _relax(tr_ms, t1, m0)
    a1 = a1 * math.cos(flip_rad)
    ak = a1**k
    one_minus = 1.0 - a1
    # The geometric sum of k steps; its limit k where a1 -> 1 (vanishing flip and relaxation).
    safe = np.abs(one_minus) > 1e-12
    geo = np.where(safe, (1.0 - ak) / np.where(safe, one_minus, 1.0), float(k))
    return ak, b1 * geo


def mp2rage_signals(
    pd: ArrayLike,
    t1_ms: ArrayLike,
    t2star_ms: ArrayLike | None = None,
    *,
    params: MP2RAGEParams,
    te_ms: float = 3.0,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Return the signed steady-state INV1 and INV2 signals at the k-space centre.

    Exact: the steady state is the fixed point of one cycle's affine map of Mz. The sample is
    ``Mz`` just before pulse ``n_readouts // 2`` of each block, times ``sin(flip) e^-TE/T2*``.

    Args:
        pd: Proton density.
        t1_ms: T1 of each class.
        t2star_ms: T2* of each class; ``None`` ignores T2* decay.
        params: The protocol.
        te_ms: Echo time of the GRE readouts (shorter than ``params.tr_gre_ms``).

    Returns:
        ``(inv1, inv2)``, real arrays broadcast over the tissue parameters.
    """
    m0, t1 = _array("pd", pd, allow_zero=True), _array("t1_ms", t1_ms)
    te = _scalar("te_ms", te_ms, allow_zero=True)
    if te >= params.tr_gre_ms:
        raise ValueError(f"te_ms={te_ms} must be shorter than tr_gre_ms={params.tr_gre_ms}")
    decay = 1.0 if t2star_ms is None else np.exp(-te / _array("t2star_ms", t2star_ms))
    n, half = params.n_readouts, params.n_readouts // 2
    ta, tb, tc = params.delays_ms
    fa1, fa2 = math.radians(params.flip1_deg), math.radians(params.flip2_deg)
    inversion = (np.full_like(t1, -params.inversion_efficiency), np.zeros_like(m0))

    to_centre1 = _compose(
        inversion, _relax(ta, t1, m0), _pulse_train(half, fa1, params.tr_gre_ms, t1, m0)
    )
    to_centre2 = _compose(
        to_centre1,
        _pulse_train(n - half, fa1, params.tr_gre_ms, t1, m0),
        _relax(tb, t1, m0),
        _pulse_train(half, fa2, params.tr_gre_ms, t1, m0),
    )
    cycle = _compose(
        to_centre2, _pulse_train(n - half, fa2, params.tr_gre_ms, t1, m0), _relax(tc, t1, m0)
    )
    # |a| < 1 always: the inversion efficiency is at most 1 and T1 relaxation is strict.
    mz_start = cycle[1] / (1.0 - cycle[0])
    inv1 = (to_centre1[0] * mz_start + to_centre1[1]) * math.sin(fa1) * decay
    inv2 = (to_centre2[0] * mz_start + to_centre2[1]) * math.sin(fa2) * decay
    return np.asarray(inv1), np.asarray(inv2)


def mp2rage_unit1(inv1: ArrayLike, inv2: ArrayLike) -> NDArray[np.floating]:
    """Return the MP2RAGE uniform image ``Re(S1* S2) / (|S1|^2 + |S2|^2)`` in [-0.5, 0.5].

    Args:
        inv1: INV1 signal (real or complex).
        inv2: INV2 signal (real or complex).

    Returns:
        UNIT1; 0 where both signals are 0.
    """
    s1, s2 = np.asarray(inv1), np.asarray(inv2)
    dtype = np.result_type(s1.real.dtype, s2.real.dtype, np.float32)
    num = np.real(np.conj(s1) * s2).astype(dtype, copy=False)
    den = (np.abs(s1) ** 2 + np.abs(s2) ** 2).astype(dtype, copy=False)
    out = np.zeros(np.broadcast_shapes(num.shape, den.shape), dtype=dtype)
    return np.divide(num, den, out=out, where=den > 0)


def _unit_b0(b0_dir: Sequence[float]) -> NDArray[np.float64]:
    b = np.asarray(b0_dir, dtype=np.float64)
    norm = float(np.linalg.norm(b)) if b.shape == (3,) and np.all(np.isfinite(b)) else 0.0
    if norm == 0.0:
        raise ValueError(f"b0_dir must be a finite non-zero 3-vector, got {b0_dir!r}")
    return b / norm


def _voxel_size(voxel_size_mm: Sequence[float]) -> NDArray[np.float64]:
    v = np.asarray(voxel_size_mm, dtype=np.float64)
    if v.shape != (3,):
        raise ValueError(f"voxel_size_mm must have 3 entries, got {voxel_size_mm!r}")
    return _array("voxel_size_mm", v)


def _kernel(
    shape: Sequence[int], voxel: NDArray[np.float64], b0: NDArray[np.float64], *, half: bool
) -> NDArray[np.float32]:
    freqs = [np.fft.fftfreq(n, d) for n, d in zip(shape[:2], voxel[:2], strict=True)]
    freqs.append((np.fft.rfftfreq if half else np.fft.fftfreq)(shape[2], voxel[2]))
    axes = [[-1 if i == ax else 1 for i in range(3)] for ax in range(3)]
    k = [f.astype(np.float32).reshape(s) for f, s in zip(freqs, axes, strict=True)]
    # Cross terms k_i k_j (oblique B0 only) use central-difference frequencies sin(2 pi f d) /
    # (2 pi d): plain k_i k_j jumps across the Nyquist boundary, which rings as a checkerboard of
    # a few per cent of delta-chi next to sharp edges; this form is periodic, zero at Nyquist.
    c = [
        (np.sin(2 * np.pi * f * d) / (2 * np.pi * d)).astype(np.float32).reshape(s)
        for f, d, s in zip(freqs, voxel, axes, strict=True)
    ]
    b = [np.float32(x) for x in b0]
    kb2 = c[0] * b[0] + c[1] * b[1] + c[2] * b[2]
    kb2 *= kb2
    kb2 += sum((ki**2 - ci**2) * bi**2 for ki, ci, bi in zip(k, c, b, strict=True))
    k2 = k[0] ** 2 + k[1] ** 2 + k[2] ** 2
    k2[0, 0, 0] = 1.0
    np.divide(kb2, k2, out=kb2)
    del k2
    np.subtract(np.float32(1.0 / 3.0), kb2, out=kb2)
    kb2[0, 0, 0] = 0.0
    return kb2


def dipole_kernel(
    shape: Sequence[int], voxel_size_mm: Sequence[float], *, b0_dir: Sequence[float] = (0, 0, 1)
) -> NDArray[np.float32]:
    """Return the k-space dipole kernel ``D = 1/3 - (k.b)^2 / |k|^2`` with ``D(0) = 0``.

    For B0 along an array axis this is exact on the FFT grid. For oblique B0 the cross terms
    ``k_i k_j`` are evaluated with central-difference frequencies ``sin(2 pi f d) / (2 pi d)``,
    which match ``k`` at low frequency and avoid Nyquist ringing next to sharp edges.

    Args:
        shape: Grid shape (3 positive integers).
        voxel_size_mm: Voxel size per axis (anisotropic voxels give the right k directions).
        b0_dir: B0 direction in array-axis coordinates (normalised here).

    Returns:
        A float32 array of ``shape`` in unshifted FFT order (DC at index 0).
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive integers, got {shape!r}")
    return _kernel(shape, _voxel_size(voxel_size_mm), _unit_b0(b0_dir), half=False)


def field_from_chi(
    chi_ppm: ArrayLike,
    voxel_size_mm: Sequence[float],
    *,
    b0_dir: Sequence[float] = (0, 0, 1),
    pad_voxels: int | None = None,
    background_ppm: float | None = None,
) -> NDArray[np.float32]:
    """Return the relative field shift (ppm along B0) induced by a susceptibility map.

    Convolves with the dipole kernel by FFT (float32, all cores) on a zero-padded grid. Outside
    the grid the susceptibility is taken to be ``background_ppm``; since a uniform susceptibility
    induces no field (``D(0) = 0``), this amounts to padding ``chi - background`` with zeros.

    Args:
        chi_ppm: 3-D susceptibility map.
        voxel_size_mm: Voxel size per axis.
        b0_dir: B0 direction in array-axis coordinates.
        pad_voxels: Padding on each side of every axis; ``None`` pads a quarter of each axis
            (the grid grows 1.5x per axis, which keeps a 1 mm head under ~1 GB).
        background_ppm: Susceptibility beyond the grid; ``None`` uses the mean over the grid's
            boundary voxels (a head in air stays in air), which keeps the map linear in chi.

    Returns:
        ``field_ppm``, float32, same shape as ``chi_ppm``.
    """
    chi = np.asarray(chi_ppm)
    if chi.ndim != 3 or chi.size == 0:
        raise ValueError(f"chi_ppm must be a non-empty 3-D array, got shape {chi.shape}")
    if not np.all(np.isfinite(chi)):
        raise ValueError("chi_ppm contains non-finite values")
    voxel, b0 = _voxel_size(voxel_size_mm), _unit_b0(b0_dir)
    if pad_voxels is not None and pad_voxels < 0:
        raise ValueError(f"pad_voxels must be non-negative, got {pad_voxels}")
    pads = [(n + 3) // 4 if pad_voxels is None else int(pad_voxels) for n in chi.shape]
    if background_ppm is None:
        inner = chi[1:-1, 1:-1, 1:-1]
        n_edge = chi.size - inner.size
        background = (chi.sum(dtype=np.float64) - inner.sum(dtype=np.float64)) / n_edge
    else:
        background = float(background_ppm)
        if not math.isfinite(background):
            raise ValueError(f"background_ppm must be finite, got {background_ppm!r}")

    padded_shape = [
        scipy.fft.next_fast_len(n + 2 * p, real=True) for n, p in zip(chi.shape, pads, strict=True)
    ]
    crop = tuple(slice(p, p + n) for n, p in zip(chi.shape, pads, strict=True))
    padded = np.zeros(padded_shape, dtype=np.float32)
    padded[crop] = chi
    padded[crop] -= np.float32(background)
    spectrum = scipy.fft.rfftn(padded, workers=-1, overwrite_x=True)
    del padded
    spectrum *= _kernel(padded_shape, voxel, b0, half=True)
    field = scipy.fft.irfftn(spectrum, s=padded_shape, workers=-1, overwrite_x=True)
    del spectrum
    return np.ascontiguousarray(field[crop], dtype=np.float32)


def gre_signal(
    pd: ArrayLike,
    t1_ms: ArrayLike,
    t2star_ms: ArrayLike,
    field_ppm: ArrayLike,
    *,
    echo_times_ms: Sequence[float],
    tr_ms: float = 30.0,
    flip_deg: float = 15.0,
    b0_tesla: float = 3.0,
    phase_offset_rad: ArrayLike = 0.0,
) -> NDArray[np.complex64]:
    """Return complex multi-echo spoiled-GRE signals with the module's phase convention.

    Echo ``k`` is ``S_spgr(TE=0) * exp(-TE_k / T2*) * exp(i * phase(TE_k))``: the spoiled
    steady state decaying with T2*, its phase as in the module's conventions (a paramagnetic
    source advances it).

    Args:
        pd: Proton density.
        t1_ms: T1 of each class.
        t2star_ms: T2* of each class.
        field_ppm: Field shift along B0 (e.g. from :func:`field_from_chi`).
        echo_times_ms: Echo times, each in [0, tr_ms).
        tr_ms: Repetition time.
        flip_deg: Flip angle.
        b0_tesla: Main field strength.
        phase_offset_rad: Echo-independent (transceive) phase, broadcastable.

    Returns:
        complex64 array of shape ``(n_echoes, *broadcast_shape)``.
    """
    b0, tr = _scalar("b0_tesla", b0_tesla), _scalar("tr_ms", tr_ms)
    tes = np.atleast_1d(np.asarray(echo_times_ms, dtype=np.float64))
    if tes.ndim != 1 or tes.size == 0:
        raise ValueError(f"echo_times_ms must be a non-empty 1-D sequence, got {echo_times_ms!r}")
    _array("echo_times_ms", tes, allow_zero=True)
    if np.any(tes >= tr):
        raise ValueError(f"echo_times_ms={tes.tolist()} must all be shorter than tr_ms={tr_ms}")
    s0 = spgr_signal(pd, t1_ms, t2star_ms, tr_ms=tr, flip_deg=flip_deg, te_ms=0.0)
    r2s = 1.0 / _array("t2star_ms", t2star_ms)
    field = np.asarray(field_ppm, dtype=np.float32)
    offset = np.asarray(phase_offset_rad, dtype=np.float32)
    if not (np.all(np.isfinite(field)) and np.all(np.isfinite(offset))):
        raise ValueError("field_ppm and phase_offset_rad must be finite")
    omega_rad_per_ms = np.float32(2e-3 * math.pi * GAMMA_BAR_MHZ_PER_T * b0) * field
    shape = np.broadcast_shapes(s0.shape, r2s.shape, field.shape, offset.shape)
    out = np.empty((tes.size, *shape), dtype=np.complex64)
    for e, te in enumerate(tes):
        magnitude = (s0 * np.exp(-te * r2s)).astype(np.float32)
        out[e] = magnitude * np.exp(1j * (offset + np.float32(te) * omega_rad_per_ms))
    return out


def wrap_phase(phase_rad: ArrayLike) -> NDArray[np.floating]:
    """Return the phase wrapped into [-pi, pi).

    Args:
        phase_rad: Phase in radians.

    Returns:
        Wrapped phase, same shape (float dtype preserved).

    Examples:
        >>> wrap_phase([0.0, np.pi, -np.pi, 1.5 * np.pi]).round(4).tolist()
        [0.0, -3.1416, -3.1416, -1.5708]
    """
    p = np.asarray(phase_rad)
    if not np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float64)
    w = np.mod(p + np.pi, 2 * np.pi) - np.pi
    # Rounding in mod can land exactly on +pi for inputs just below an odd multiple of -pi.
    return np.where(w >= np.pi, w - 2 * np.pi, w).astype(p.dtype, copy=False)


def _noise_parts(
    signal: ArrayLike, sigma: ArrayLike, rng: np.random.Generator
) -> tuple[NDArray[np.floating], NDArray[np.floating]]:
    s = np.asarray(signal)
    sig = _array("sigma", sigma, allow_zero=True)
    single = s.dtype in (np.float32, np.complex64)
    dtype = np.float32 if single else np.float64
    shape = np.broadcast_shapes(s.shape, sig.shape)
    sig = sig.astype(dtype)
    real = s.real + sig * rng.standard_normal(shape, dtype=dtype)
    imag = (s.imag if np.iscomplexobj(s) else 0) + sig * rng.standard_normal(shape, dtype=dtype)
    return real.astype(dtype, copy=False), imag.astype(dtype, copy=False)


def add_rician_noise(
    signal: ArrayLike, sigma: ArrayLike, rng: np.random.Generator
) -> NDArray[np.floating]:
    """Return the magnitude of ``signal`` after complex Gaussian noise (Rician statistics).

    Args:
        signal: Real or complex noise-free signal.
        sigma: Noise sd of each of the real and imaginary channels (broadcastable, >= 0).
        rng: Random generator.

    Returns:
        Noisy magnitude; float32 for float32/complex64 input, else float64.
    """
    real, imag = _noise_parts(signal, sigma, rng)
    return np.hypot(real, imag)


def add_complex_noise(
    signal: ArrayLike, sigma: ArrayLike, rng: np.random.Generator
) -> NDArray[np.complexfloating]:
    """Return ``signal`` plus independent Gaussian noise on its real and imaginary parts.

    Args:
        signal: Real or complex noise-free signal.
        sigma: Noise sd per channel (broadcastable, >= 0).
        rng: Random generator.

    Returns:
        Complex noisy signal; complex64 for float32/complex64 input, else complex128.
    """
    real, imag = _noise_parts(signal, sigma, rng)
    return real + 1j * imag


def _smooth_field(
    shape: Sequence[int], rng: np.random.Generator, scale_voxels: float | None
) -> NDArray[np.float64]:
    shape = tuple(int(n) for n in shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"shape must be positive integers, got {shape!r}")
    scale = max(shape) / 2 if scale_voxels is None else _scalar("scale_voxels", scale_voxels)
    # Separable cosine basis: the highest term per axis has a half-period of about `scale`, and
    # a tensor contraction builds the full grid in a few BLAS passes.
    n_terms = [max(1, round(n / scale)) + 1 for n in shape]
    index = np.meshgrid(*[np.arange(k) for k in n_terms], indexing="ij")
    coeffs = rng.standard_normal(n_terms) / (1.0 + sum(i.astype(np.float64) ** 2 for i in index))
    coeffs.flat[0] = 0.0
    field = coeffs
    for n, k in zip(shape, n_terms, strict=True):
        basis = np.cos(np.pi * np.outer((np.arange(n) + 0.5) / n, np.arange(k)))
        field = np.tensordot(field, basis, axes=([0], [1]))
    return field - field.mean()


def smooth_bias_field(
    shape: Sequence[int],
    rng: np.random.Generator,
    *,
    strength: float = 0.2,
    scale_voxels: float | None = None,
) -> NDArray[np.float32]:
    """Return a smooth positive multiplicative bias field with mean 1 and max/min = 1 + 2 strength.

    Args:
        shape: Grid shape.
        rng: Random generator (same state, same field).
        strength: Half the relative peak-to-peak variation, >= 0.
        scale_voxels: Smallest length scale of variation; ``None`` is half the largest axis.

    Returns:
        float32 field of ``shape``.
    """
    strength = _scalar("strength", strength, allow_zero=True)
    log_field = _smooth_field(shape, rng, scale_voxels)
    span = float(log_field.max() - log_field.min())
    if span > 0:
        log_field *= math.log1p(2.0 * strength) / span
    bias = np.exp(log_field)
    return (bias / bias.mean()).astype(np.float32)


def smooth_phase_offset(
    shape: Sequence[int],
    rng: np.random.Generator,
    *,
    max_rad: float = 1.0,
    scale_voxels: float | None = None,
) -> NDArray[np.float32]:
    """Return a smooth echo-independent (transceive) phase with zero mean and max |phase| = max_rad.

    Args:
        shape: Grid shape.
        rng: Random generator (same state, same field).
        max_rad: Largest absolute phase, >= 0.
        scale_voxels: Smallest length scale of variation; ``None`` is half the largest axis.

    Returns:
        float32 phase in radians, of ``shape``.
    """
    max_rad = _scalar("max_rad", max_rad, allow_zero=True)
    phase = _smooth_field(shape, rng, scale_voxels)
    peak = float(np.abs(phase).max())
    if peak > 0:
        phase *= max_rad / peak
    return phase.astype(np.float32)
