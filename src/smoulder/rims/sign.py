"""Which sign a susceptibility or phase image gives paramagnetic tissue: the sidecar, then the data.

Convention (smoulder's, the phantom's, :mod:`smoulder.qsm`'s): **paramagnetic positive**. A
paramagnetic source (χ > 0: deoxygenated venous blood, iron in a rim or in deep grey matter)
has positive χ on the QSM (``_Chimap``, ppm relative to CSF) and advances the phase: the field
shift ``dBz/B0`` along B0 is positive inside a paramagnetic structure lying along B0, and the
GRE phase grows as ``+2π γ̄ B0 field TE`` (:mod:`smoulder.phantom.physics`). Scanners differ in
handedness: on some, the stored phase of the same vein is negative, so paramagnetic rims look
dark on their filtered phase. Everything downstream of this module (patches, rules, network)
expects paramagnetic positive; :func:`apply_sign` brings an image there.

The sign is settled in two steps:

1. :func:`phase_sign_from_sidecar` reads a stated convention, if any (the keys it recognises
   are listed there; BIDS defines none, so most files state nothing);
2. :func:`check_paramagnetic_sign` checks it on the data: veins are thin, tubular and dark on a
   late-echo magnitude (deoxyhaemoglobin shortens T2*) and paramagnetic. On a QSM their χ is
   above that of the brain; on a filtered phase the field inside a vessel is
   ``Δχ (3 cos²θ − 1) / 6`` (θ: the vessel's angle to B0), positive along B0 and negative
   across it, so each vessel voxel's phase is compared after multiplying by the sign of
   ``3 cos²θ − 1``. A compact (non-tubular) paramagnetic structure, such as a deep grey
   nucleus, has little internal field, so only QSM may fall back on dark voxels that are not
   tubular.

:func:`resolve_sign` combines the two: the data decide when they are conclusive, the sidecar
otherwise, and the returned sentence says which convention was used and why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from smoulder.errors import InputError
from smoulder.rims.rules import robust_sd

#: Sidecar keys read by :func:`phase_sign_from_sidecar`, in order of precedence.
SIGN_KEYS: tuple[str, ...] = (
    "PhaseSign",
    "PhaseConvention",
    "SusceptibilitySign",
    "SusceptibilityConvention",
    "ParamagneticSign",
)
#: The ``convention`` sentences of :class:`SignCheck` and :func:`resolve_sign`.
AS_STORED = "paramagnetic positive (as stored)"
INVERTED = "inverted: paramagnetic negative in the file"
#: Fraction of the (eroded) brain, darkest on the locally normalised magnitude, taken as
#: candidate vessels.
DARK_FRACTION = 0.03
#: Fewest evidence voxels for a conclusive check.
MIN_EVIDENCE_VOXELS = 10
#: Largest two-sided sign-test p-value for a conclusive check.
MAX_P_VALUE = 1e-3
#: Scale (mm) of the local mean that removes the receive bias from the magnitude.
BIAS_SCALE_MM = 8.0
#: Least |3 cos²θ − 1| for a vessel voxel to count on phase (near the magic angle the
#: internal field vanishes and the phase says nothing).
MIN_ORIENTATION_FACTOR = 0.5

_POSITIVE_WORDS = frozenset({"paramagnetic positive", "paramagnetic_positive", "positive", "+"})
_NEGATIVE_WORDS = frozenset({"paramagnetic negative", "paramagnetic_negative", "negative", "-"})


@dataclass(frozen=True)
class SignCheck:
    """What the data say about the sign of paramagnetic tissue.

    Attributes:
        sign: +1 when vessels come out positive (paramagnetic positive as stored), −1 when
            they come out negative; the better-supported sign even when not conclusive.
        conclusive: Enough evidence voxels and a sign test below :data:`MAX_P_VALUE`.
        agreement: Fraction of evidence voxels whose (orientation-corrected) value has ``sign``.
        p_value: Two-sided sign test of the evidence voxels against a median of zero.
        margin_sd: Median evidence value over the robust SD of the brain (effect size, ≥ 0).
        n_evidence_voxels: Voxels that entered the test.
        evidence: ``"dark tubular"`` (vessels) or ``"dark"`` (QSM fallback without tubes).
        vessel_median: Median value at the evidence voxels, as stored (ppm or rad).
        brain_median: Median value of the brain, as stored.
        kind: ``"qsm"`` or ``"phase"``.
        convention: :data:`AS_STORED`, :data:`INVERTED` or a sentence saying it is undetermined.
    """

    sign: int
    conclusive: bool
    agreement: float
    p_value: float
    margin_sd: float
    n_evidence_voxels: int
    evidence: str
    vessel_median: float
    brain_median: float
    kind: str
    convention: str


def phase_sign_from_sidecar(
    sidecar: Mapping[str, object], *, path: str | Path = "sidecar"
) -> int | None:
    """Return the sign of paramagnetic tissue stated in a sidecar: +1, −1, or ``None`` if unstated.

    Recognised keys (first present wins, see :data:`SIGN_KEYS`): ``PhaseSign``,
    ``PhaseConvention``, ``SusceptibilitySign``, ``SusceptibilityConvention``,
    ``ParamagneticSign``. Values: the numbers ``1`` / ``-1`` (also as text, ``"+1"``), or the
    words ``"paramagnetic positive"`` / ``"positive"`` and ``"paramagnetic negative"`` /
    ``"negative"`` (case and ``_`` vs space ignored). Handedness words (``"left-handed"``) are
    not interpreted: the literature uses them both ways, and the data check decides instead.

    Args:
        sidecar: The image's JSON sidecar (merged BIDS metadata).
        path: The sidecar's file, for error messages.

    Returns:
        +1 (paramagnetic positive as stored), −1 (paramagnetic negative) or ``None``.

    Raises:
        InputError: a recognised key holds a value that is none of the above.

    Examples:
        >>> phase_sign_from_sidecar({"EchoTime": 0.02}) is None
        True
        >>> phase_sign_from_sidecar({"PhaseSign": -1}), phase_sign_from_sidecar(
        ...     {"PhaseConvention": "Paramagnetic_Positive"})
        (-1, 1)
    """
    for key in SIGN_KEYS:
        if key not in sidecar:
            continue
        value = sidecar[key]
        sign = _parse_sign(value)
        if sign is None:
            raise InputError(
                path,
                expected=f'{key} of 1, -1, "paramagnetic positive" or "paramagnetic negative"',
                found=repr(value),
                hint=f"correct or remove {key}; without it the sign is checked on the data",
            )
        return sign
    return None


def _parse_sign(value: object) -> int | None:
    """Return +1/−1 for a recognised sign value, else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return int(value) if value in (1, -1) else None
    if isinstance(value, str):
        text = " ".join(value.strip().lower().replace("_", " ").split())
        if text in ("1", "+1", "1.0", "+1.0") or text in _POSITIVE_WORDS:
            return 1
        if text in ("-1", "-1.0") or text in _NEGATIVE_WORDS:
            return -1
    return None


def apply_sign(data: np.ndarray, sign: int) -> np.ndarray:
    """Return ``data`` in the paramagnetic-positive convention: ``data * sign`` (float kept).

    Args:
        data: A χ (ppm) or phase (rad) image as stored.
        sign: +1 (already paramagnetic positive) or −1 (inverted in the file).

    Returns:
        A new array; float32 for non-float input, the input's float dtype otherwise.

    Examples:
        >>> apply_sign(np.array([0.1, -0.2], np.float32), -1).tolist()
        [-0.10000000149011612, 0.20000000298023224]
    """
    if isinstance(sign, bool) or sign not in (1, -1):
        raise ValueError(f"sign: expected +1 or -1, found {sign!r}")
    arr = np.asarray(data)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    return arr * arr.dtype.type(sign)


def check_paramagnetic_sign(
    susceptibility: np.ndarray,
    magnitude: np.ndarray,
    brain_mask: np.ndarray,
    voxel_mm: Sequence[float],
    *,
    kind: Literal["qsm", "phase"] = "qsm",
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    dark_fraction: float = DARK_FRACTION,
) -> SignCheck:
    """Return whether veins come out positive (paramagnetic) in ``susceptibility``, with evidence.

    Candidate vessels are the ``dark_fraction`` darkest voxels of the eroded brain on the
    magnitude divided by its local mean (which removes the receive bias); a vessel is tubular
    when the magnitude's Hessian has two large positive eigenvalues and a small one, whose
    eigenvector is the vessel's direction. Each evidence voxel's value minus the brain median is
    multiplied by 1 (QSM) or by the sign of ``3 cos²θ − 1`` (phase; voxels with
    ``|3 cos²θ − 1| < 0.5`` are left out), and a sign test decides.

    Args:
        susceptibility: χ (ppm, ``kind="qsm"``) or high-pass filtered phase (rad,
            ``kind="phase"``), as stored; 3-D.
        magnitude: A late-echo (or echo-combined) GRE magnitude on the same grid.
        brain_mask: Brain voxels (non-zero), same grid.
        voxel_mm: Voxel size along each array axis.
        kind: What ``susceptibility`` holds.
        b0_dir: B0's direction in array-axis coordinates
            (:func:`smoulder.qsm.core.b0_in_voxels` of the image's affine); phase only.
        dark_fraction: Fraction of the brain taken as candidate vessels, in (0, 0.5).

    Returns:
        The :class:`SignCheck`.

    Raises:
        ValueError: shapes differ, an empty mask, or a bad ``kind`` or ``dark_fraction``.
    """
    chi = np.asarray(susceptibility, dtype=np.float32)
    mag = np.asarray(magnitude, dtype=np.float32)
    mask = np.asarray(brain_mask) != 0
    voxel = _check_inputs(chi, mag, mask, voxel_mm, kind, dark_fraction)
    inner = _eroded(mask, voxel)
    brain_values = chi[inner]
    brain_median = float(np.median(brain_values))
    scale = robust_sd(brain_values)

    candidates = _dark_voxels(mag, inner, voxel, dark_fraction)
    tubular, direction = _tubes(mag, candidates, voxel)
    evidence_name = "dark tubular"
    idx = candidates[:, tubular]
    weights = np.ones(idx.shape[1], dtype=np.float32)
    if kind == "phase":
        b0 = np.asarray(b0_dir, dtype=np.float64)
        b0 = b0 / np.linalg.norm(b0)
        cos = direction[tubular] @ b0
        factor = 3.0 * cos**2 - 1.0
        keep = np.abs(factor) >= MIN_ORIENTATION_FACTOR
        idx, weights = idx[:, keep], np.sign(factor[keep]).astype(np.float32)
    elif idx.shape[1] < MIN_EVIDENCE_VOXELS:
        idx, weights, evidence_name = candidates, np.ones(candidates.shape[1], np.float32), "dark"

    values = chi[tuple(idx)]
    evidence = weights * (values - brain_median)
    return _decide(evidence, values, brain_median, scale, kind, evidence_name)


def _check_inputs(
    chi: np.ndarray,
    mag: np.ndarray,
    mask: np.ndarray,
    voxel_mm: Sequence[float],
    kind: str,
    dark_fraction: float,
) -> np.ndarray:
    """Return the voxel size as an array after checking every argument."""
    if chi.ndim != 3:
        raise ValueError(f"susceptibility: expected a 3-D image, found shape {chi.shape}")
    for name, other in (("magnitude", mag), ("brain_mask", mask)):
        if other.shape != chi.shape:
            raise ValueError(
                f"{name}: expected the shape of susceptibility {chi.shape}, found {other.shape}"
            )
    if kind not in ("qsm", "phase"):
        raise ValueError(f'kind: expected "qsm" or "phase", found {kind!r}')
    if not (0.0 < dark_fraction < 0.5):
        raise ValueError(f"dark_fraction: expected a value in (0, 0.5), found {dark_fraction!r}")
    if not mask.any():
        raise ValueError("brain_mask: expected brain voxels, found none")
    voxel = np.asarray(voxel_mm, dtype=np.float64)
    if voxel.shape != (3,) or not np.all(voxel > 0):
        raise ValueError(f"voxel_mm: expected 3 positive sizes, found {voxel_mm!r}")
    return voxel


def _eroded(mask: np.ndarray, voxel: np.ndarray) -> np.ndarray:
    """Return the mask eroded by about 3 mm (the brain edge holds air–tissue artefacts)."""
    steps = max(1, int(math.ceil(3.0 / float(voxel.min()))))
    inner = ndi.binary_erosion(mask, iterations=steps)
    return inner if inner.sum() >= 0.2 * mask.sum() else mask


def _dark_voxels(
    mag: np.ndarray, inner: np.ndarray, voxel: np.ndarray, dark_fraction: float
) -> np.ndarray:
    """Return the indices ``(3, N)`` of the darkest voxels of ``inner``, bias removed."""
    sigma = BIAS_SCALE_MM / voxel
    weight = inner.astype(np.float32)
    local = ndi.gaussian_filter(mag * weight, sigma) / np.maximum(
        ndi.gaussian_filter(weight, sigma), 1e-6
    )
    relative = mag / np.maximum(local, 1e-12 * max(float(np.abs(mag).max()), 1e-30))
    cut = float(np.quantile(relative[inner], dark_fraction))
    return np.array(np.nonzero(inner & (relative <= cut)))


def _tubes(mag: np.ndarray, idx: np.ndarray, voxel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return which voxels ``idx`` are dark tubes, and each voxel's tube direction ``(N, 3)``.

    A dark tube is a valley across two directions: the magnitude's Hessian (Gaussian scale of
    one voxel, at least 1 mm) has its two largest eigenvalues positive and its smallest in
    absolute value below half of the middle one; that eigenvalue's eigenvector is the axis.
    """
    n = idx.shape[1]
    if n == 0:
        return np.zeros(0, bool), np.zeros((0, 3))
    sigma = np.full(3, max(1.0, float(voxel.min()))) / voxel
    hess = np.empty((n, 3, 3), dtype=np.float64)
    for i in range(3):
        for j in range(i, 3):
            derivative = [0, 0, 0]
            derivative[i] += 1
            derivative[j] += 1
            d = ndi.gaussian_filter(mag, sigma, order=derivative)[tuple(idx)] / (
                voxel[i] * voxel[j]
            )
            hess[:, i, j] = hess[:, j, i] = d
    eigval, eigvec = np.linalg.eigh(hess)
    order = np.argsort(np.abs(eigval), axis=1)
    val = np.take_along_axis(eigval, order, axis=1)
    small, middle, large = val[:, 0], val[:, 1], val[:, 2]
    tubular = (middle > 0) & (large > 0) & (np.abs(small) < 0.5 * middle)
    direction = np.take_along_axis(eigvec, order[:, None, :1], axis=2)[:, :, 0]
    return tubular, direction


def _decide(
    evidence: np.ndarray,
    values: np.ndarray,
    brain_median: float,
    scale: float,
    kind: str,
    evidence_name: str,
) -> SignCheck:
    """Return the :class:`SignCheck` of the orientation-corrected evidence values."""
    from scipy.stats import binomtest

    nonzero = evidence[evidence != 0]
    n = int(nonzero.size)
    positive = int((nonzero > 0).sum())
    median = float(np.median(evidence)) if evidence.size else 0.0
    sign = 1 if (positive * 2 >= n if median == 0 else median > 0) else -1
    p_value = float(binomtest(positive, n).pvalue) if n else 1.0
    agreement = (positive if sign > 0 else n - positive) / n if n else 0.5
    conclusive = n >= MIN_EVIDENCE_VOXELS and p_value <= MAX_P_VALUE and agreement > 0.5
    if conclusive:
        convention = AS_STORED if sign > 0 else INVERTED
    else:
        convention = f"undetermined from the data ({n} vessel voxels, sign-test p = {p_value:.2g})"
    return SignCheck(
        sign=sign,
        conclusive=conclusive,
        agreement=float(agreement),
        p_value=p_value,
        margin_sd=abs(median) / scale if scale > 0 else float("inf") if median else 0.0,
        n_evidence_voxels=n,
        evidence=evidence_name,
        vessel_median=float(np.median(values)) if values.size else float("nan"),
        brain_median=brain_median,
        kind=kind,
        convention=convention,
    )


def resolve_sign(stated: int | None, check: SignCheck | None) -> tuple[int, str]:
    """Return the sign to apply and the sentence saying which convention was used, and why.

    The data decide when their check is conclusive (and a disagreeing sidecar is named); a
    stated sign is used otherwise; with neither, the image is taken as stored.

    Args:
        stated: :func:`phase_sign_from_sidecar`'s answer.
        check: :func:`check_paramagnetic_sign`'s answer, or ``None`` when not run.

    Returns:
        ``(sign, convention)``: the sign for :func:`apply_sign` and a sentence for the outputs.

    Examples:
        >>> resolve_sign(-1, None)
        (-1, 'inverted: paramagnetic negative in the file (stated by the sidecar)')
        >>> resolve_sign(None, None)
        (1, 'paramagnetic positive (as stored) (assumed: neither sidecar nor data say)')
    """

    def name(sign: int) -> str:
        return AS_STORED if sign > 0 else INVERTED

    if check is not None and check.conclusive:
        why = f"checked on {check.n_evidence_voxels} vessel voxels"
        if stated is not None and stated != check.sign:
            why += f"; the sidecar states the opposite ({name(stated)}), overruled by the data"
        elif stated is not None:
            why += "; agrees with the sidecar"
        return check.sign, f"{name(check.sign)} ({why})"
    if stated is not None:
        return stated, f"{name(stated)} (stated by the sidecar)"
    if check is not None:
        return 1, f"{AS_STORED} (assumed: {check.convention})"
    return 1, f"{AS_STORED} (assumed: neither sidecar nor data say)"
