"""Lesion tissue beyond the rim: T1 black holes on a T1w image, quantitative T1 from MP2RAGE.

**T1 black holes.** A T1 black hole is a T2/FLAIR lesion that is hypointense on a T1-weighted
image relative to normal-appearing white matter (NAWM), the strict reading being "close to grey
matter or CSF" (van Walderveen et al., Neurology 1998; Sahraian et al., Eur J Neurol 2010). Each
lesion's median intensity is compared with the NAWM within :data:`REFERENCE_RADIUS_MM` of it
(local, so a residual receive bias cancels): ``t1w_ratio = median(lesion) / median(NAWM)``. A
lesion is a black hole when it is darker than halfway from NAWM to cortical grey matter,
``t1w_ratio <= 1 - (1 - gm_ratio) / 2`` with ``gm_ratio = median(GM) / median(NAWM)`` over the
whole image, when a GM mask is given; without one, ``t1w_ratio <= 0.9`` (the same rule for the
usual 3 T grey/white contrast of ``gm_ratio ≈ 0.8``). Halfway, not all the way to GM, because a
lesion's median still holds partial-volume voxels at its edge.

**Quantitative T1 from MP2RAGE** (Marques et al., NeuroImage 2010 49:1271). Each cycle: an
inversion (``Mz → -eff Mz``), a delay, GRE block 1 (``NumberShots`` pulses of ``FlipAngle`` 1,
``RepetitionTimeExcitation`` apart), a delay, GRE block 2, a delay; the cycle lasts
``RepetitionTimePreparation`` and each ``InversionTime`` is the time from the inversion to the
block's k-space centre, its pulse ``NumberShots // 2``. The steady state has a closed form
(:func:`mp2rage_signals`); the uniform image ``UNIT1 = S1 S2 / (S1² + S2²)`` does not depend on
M0, T2* or the receive field, and is monotonic in T1 over the range that matters, so a lookup
table inverts it (:func:`unit1_lookup`, :func:`t1_map_ms`). Transmit-field (B1+) errors are not
corrected: they scale the flip angles and bias T1 by a few per cent.

UNIT1 scaling: the signal equation gives ``[-0.5, 0.5]``; scanners store
``round(4095 (UNIT1 + 0.5))`` in ``0..4095``. :func:`unit1_to_unit_range` tells them apart by
range (see there).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage as ndi

from smoulder.errors import InputError

#: Radius (mm) of the NAWM neighbourhood that is each lesion's T1w reference.
REFERENCE_RADIUS_MM = 10.0
#: Fewest NAWM voxels in a lesion's neighbourhood before the whole NAWM is used instead.
MIN_REFERENCE_VOXELS = 20
#: Black-hole ratio threshold without a GM mask (halfway to a grey/white ratio of 0.8).
BLACK_HOLE_RATIO = 0.9
#: The share of the NAWM→GM intensity step a lesion must cover to be a black hole.
BLACK_HOLE_GM_SHARE = 0.5
#: Inversion efficiency assumed when the sidecar does not state one (Marques et al. 2010).
DEFAULT_INVERSION_EFFICIENCY = 0.96
#: T1 range (ms) of the default lookup table.
T1_RANGE_MS = (100.0, 5000.0)
#: Largest scanner UNIT1 value (12-bit).
UNIT1_SCANNER_MAX = 4095.0
_UNIT_TOLERANCE = 1e-3


def _check_same_shape(reference: str, shape: tuple[int, ...], **others: np.ndarray | None) -> None:
    """Raise ValueError naming the first of ``others`` whose shape is not ``shape``."""
    for name, other in others.items():
        if other is not None and np.shape(other) != shape:
            raise ValueError(
                f"{name}: expected the shape of {reference} {shape}, found {np.shape(other)}"
            )


def _robust_sd(values: np.ndarray, centre: float) -> float:
    """Return 1.4826 × the median absolute deviation of ``values`` from ``centre``."""
    return 1.4826 * float(np.median(np.abs(values - centre)))


def t1_black_holes(
    t1w: np.ndarray,
    lesion_instances: np.ndarray,
    nawm_mask: np.ndarray,
    *,
    voxel_mm: Sequence[float] = (1.0, 1.0, 1.0),
    gm_mask: np.ndarray | None = None,
    reference_radius_mm: float = REFERENCE_RADIUS_MM,
) -> dict[int, dict[str, float | bool | int]]:
    """Return each lesion's T1w contrast against nearby NAWM and whether it is a T1 black hole.

    Args:
        t1w: A T1-weighted image (white matter bright: MPRAGE, SPGR, MP2RAGE UNIT1) on the grid
            of the instances.
        lesion_instances: Lesion IDs (0 background, 1..N lesions).
        nawm_mask: Normal-appearing white matter (lesions are removed from it here).
        voxel_mm: Voxel size along each array axis.
        gm_mask: Cortical grey matter; sets the threshold from the image's own GM/WM contrast.
        reference_radius_mm: Radius of each lesion's NAWM neighbourhood.

    Returns:
        ``{lesion_id: row}``, row keys: ``t1w_ratio`` (lesion median / NAWM median),
        ``t1w_z`` ((lesion median − NAWM median) / robust SD of that NAWM),
        ``t1w_ratio_threshold``, ``t1_black_hole``, ``n_voxels``, ``n_reference_voxels``.

    Raises:
        ValueError: shapes differ, or no NAWM outside the lesions.

    Examples:
        >>> t1w = np.full((12, 12, 12), 100.0)
        >>> ids = np.zeros(t1w.shape, int)
        >>> ids[2:5, 2:5, 2:5], ids[7:10, 7:10, 7:10] = 1, 2
        >>> t1w[ids == 1] = 70.0  # darker than halfway to GM (80): a black hole
        >>> t1w[ids == 2] = 95.0
        >>> gm = np.zeros(t1w.shape, bool); gm[0] = True; t1w[gm] = 80.0
        >>> rows = t1_black_holes(t1w, ids, ~gm, gm_mask=gm)
        >>> [(k, round(r["t1w_ratio"], 2), r["t1_black_hole"]) for k, r in rows.items()]
        [(1, 0.7, True), (2, 0.95, False)]
    """
    image = np.asarray(t1w, dtype=np.float64)
    ids = np.asarray(lesion_instances)
    if image.ndim != 3:
        raise ValueError(f"t1w: expected a 3-D image, found shape {image.shape}")
    _check_same_shape(
        "t1w", image.shape, lesion_instances=ids, nawm_mask=nawm_mask, gm_mask=gm_mask
    )
    lesions = ids > 0
    nawm = (np.asarray(nawm_mask) != 0) & ~lesions
    if not nawm.any():
        raise ValueError("nawm_mask: expected white matter outside the lesions, found none")
    nawm_median = float(np.median(image[nawm]))
    threshold = BLACK_HOLE_RATIO
    if gm_mask is not None and np.any(gm := (np.asarray(gm_mask) != 0) & ~lesions):
        gm_ratio = float(np.median(image[gm])) / nawm_median
        threshold = 1.0 - BLACK_HOLE_GM_SHARE * (1.0 - gm_ratio)
    voxel = np.asarray(voxel_mm, dtype=np.float64)
    margin = np.ceil(reference_radius_mm / voxel).astype(int)
    rows: dict[int, dict[str, float | bool | int]] = {}
    for lesion_id, box in _boxes(ids):
        grown = tuple(
            slice(max(0, s.start - m), min(n, s.stop + m))
            for s, m, n in zip(box, margin, image.shape, strict=True)
        )
        inside = ids[grown] == lesion_id
        near = ndi.distance_transform_edt(~inside, sampling=voxel) <= reference_radius_mm
        reference = image[grown][near & nawm[grown]]
        if reference.size < MIN_REFERENCE_VOXELS:
            reference = image[nawm]
        ref_median = float(np.median(reference))
        lesion_median = float(np.median(image[grown][inside]))
        sd = _robust_sd(reference, ref_median)
        ratio = lesion_median / ref_median if ref_median != 0 else float("nan")
        rows[lesion_id] = {
            "t1w_ratio": ratio,
            "t1w_z": (lesion_median - ref_median) / sd if sd > 0 else float("nan"),
            "t1w_ratio_threshold": threshold,
            "t1_black_hole": bool(ratio <= threshold),
            "n_voxels": int(inside.sum()),
            "n_reference_voxels": int(reference.size),
        }
    return rows


def _boxes(ids: np.ndarray) -> list[tuple[int, tuple[slice, ...]]]:
    """Return ``(lesion_id, bounding box)`` of every lesion present in ``ids``, by ID."""
    if not np.issubdtype(ids.dtype, np.integer):
        ids = ids.astype(np.int64)
    objects = ndi.find_objects(np.where(ids > 0, ids, 0))
    return [(i + 1, box) for i, box in enumerate(objects) if box is not None]


@dataclass(frozen=True)
class MP2RAGEParameters:
    """The MP2RAGE protocol that sets the UNIT1 → T1 relation (times in ms, angles in degrees).

    Attributes:
        tr_mp2rage_ms: Inversion to inversion (BIDS ``RepetitionTimePreparation``).
        ti1_ms: Inversion to block 1's k-space centre (INV1's ``InversionTime``).
        ti2_ms: Inversion to block 2's k-space centre (INV2's ``InversionTime``).
        flip1_deg: Flip angle of block 1 (INV1's ``FlipAngle``).
        flip2_deg: Flip angle of block 2 (INV2's ``FlipAngle``).
        n_readouts: Pulses per block (``NumberShots``).
        tr_gre_ms: Spacing of the pulses (``RepetitionTimeExcitation``).
        inversion_efficiency: ``Mz → -inversion_efficiency Mz`` at the inversion.
        notes: What was assumed rather than read (for the outputs' provenance).
    """

    tr_mp2rage_ms: float
    ti1_ms: float
    ti2_ms: float
    flip1_deg: float
    flip2_deg: float
    n_readouts: int
    tr_gre_ms: float
    inversion_efficiency: float = DEFAULT_INVERSION_EFFICIENCY
    notes: tuple[str, ...] = ()

    @property
    def delays_ms(self) -> tuple[float, float, float]:
        """Return the free-relaxation delays: inversion→block 1, block 1→block 2, block 2→end."""
        centres = np.array([self.ti1_ms, self.ti2_ms])
        starts = centres - (self.n_readouts // 2) * self.tr_gre_ms
        ends = starts + self.n_readouts * self.tr_gre_ms
        gaps = np.diff(np.concatenate([[0.0], np.column_stack([starts, ends]).ravel()]))[::2]
        return float(gaps[0]), float(gaps[1]), float(self.tr_mp2rage_ms - ends[1])


def mp2rage_parameters(
    inv1_sidecar: Mapping[str, object],
    inv2_sidecar: Mapping[str, object],
    *,
    inv1_path: str | Path = "INV1 sidecar",
    inv2_path: str | Path = "INV2 sidecar",
) -> MP2RAGEParameters:
    """Return the MP2RAGE protocol read from the two inversions' sidecars (BIDS, seconds).

    Read from each inversion: ``InversionTime`` (s) and ``FlipAngle`` (degrees). Read from
    either (they must agree where both hold them): ``RepetitionTimePreparation`` (s),
    ``RepetitionTimeExcitation`` (s), ``NumberShots`` and, if present,
    ``InversionEfficiency`` (else 0.96, noted in ``notes``).

    Args:
        inv1_sidecar: Merged metadata of the first inversion image.
        inv2_sidecar: Merged metadata of the second inversion image.
        inv1_path: INV1's sidecar file, for error messages.
        inv2_path: INV2's sidecar file, for error messages.

    Returns:
        The :class:`MP2RAGEParameters`.

    Raises:
        InputError: a key is missing (names the key and the file), a value is out of range
            (times in ms instead of s, for one), the two files disagree, or the timing is
            impossible (a block that overlaps the next).

    Examples:
        >>> common = {"RepetitionTimePreparation": 5.0, "RepetitionTimeExcitation": 0.007,
        ...           "NumberShots": 176}
        >>> p = mp2rage_parameters({**common, "InversionTime": 0.7, "FlipAngle": 4},
        ...                        {**common, "InversionTime": 2.5, "FlipAngle": 5})
        >>> p.ti1_ms, p.ti2_ms, p.n_readouts, p.inversion_efficiency
        (700.0, 2500.0, 176, 0.96)
        >>> mp2rage_parameters({**common, "FlipAngle": 4}, {**common, "InversionTime": 2.5,
        ...     "FlipAngle": 5}, inv1_path="inv-1.json")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        smoulder.errors.InputError: inv-1.json: expected InversionTime (s) ...
    """
    sides = ((inv1_sidecar, str(inv1_path)), (inv2_sidecar, str(inv2_path)))
    ti1, ti2 = (_number(s, p, "InversionTime", "s", 0.0, 10.0) * 1000 for s, p in sides)
    flip1, flip2 = (_number(s, p, "FlipAngle", "degrees", 0.0, 180.0) for s, p in sides)
    tr = _shared(sides, "RepetitionTimePreparation", "s", 0.0, 30.0) * 1000
    tr_gre = _shared(sides, "RepetitionTimeExcitation", "s", 0.0, 0.1) * 1000
    shots = _shared(sides, "NumberShots", "pulses per block", 0.0, 100_000.0)
    if shots != int(shots):
        raise InputError(
            str(inv1_path), expected="NumberShots as a whole number", found=repr(shots)
        )
    notes: tuple[str, ...] = ()
    if any("InversionEfficiency" in s for s, _ in sides):
        efficiency = _shared(sides, "InversionEfficiency", "(fraction)", 0.0, 1.0)
    else:
        efficiency = DEFAULT_INVERSION_EFFICIENCY
        notes = (f"InversionEfficiency absent: {efficiency} assumed (Marques et al. 2010)",)
    params = MP2RAGEParameters(
        tr_mp2rage_ms=tr,
        ti1_ms=ti1,
        ti2_ms=ti2,
        flip1_deg=flip1,
        flip2_deg=flip2,
        n_readouts=int(shots),
        tr_gre_ms=tr_gre,
        inversion_efficiency=efficiency,
        notes=notes,
    )
    names = ("InversionTime of INV1", "InversionTime of INV2", "RepetitionTimePreparation")
    for delay, name in zip(params.delays_ms, names, strict=True):
        if delay < 0:
            raise InputError(
                str(inv2_path),
                expected=f"{name} leaving room for {params.n_readouts} pulses "
                f"{tr_gre:g} ms apart around each k-space centre",
                found=f"an overlap of {-delay:g} ms (TI1 {ti1:g} ms, TI2 {ti2:g} ms, TR {tr:g} ms)",
                hint="check NumberShots (pulses per block, not per slab) and the units (s)",
            )
    return params


def _number(
    sidecar: Mapping[str, object], path: str, key: str, unit: str, low: float, high: float
) -> float:
    """Return ``sidecar[key]`` as a float in ``(low, high]``, or raise an InputError naming it."""
    if key not in sidecar:
        raise InputError(
            path, expected=f"{key} ({unit}) in the MP2RAGE sidecar", found="no such key"
        )
    value = sidecar[key]
    if isinstance(value, list | tuple) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(path, expected=f"{key} as a number ({unit})", found=repr(value))
    if not (low < value <= high):
        hint = "BIDS times are in seconds" if unit == "s" and value > high else None
        raise InputError(
            path, expected=f"{key} in ({low:g}, {high:g}] {unit}", found=repr(value), hint=hint
        )
    return float(value)


def _shared(
    sides: tuple[tuple[Mapping[str, object], str], ...],
    key: str,
    unit: str,
    low: float,
    high: float,
) -> float:
    """Return a key both inversions share, from whichever holds it; they must agree."""
    values = [(_number(s, p, key, unit, low, high), p) for s, p in sides if key in s]
    if not values:
        _number(*sides[0], key, unit, low, high)  # raises, naming INV1's file
    first, path = values[0]
    for other, other_path in values[1:]:
        if not math.isclose(first, other, rel_tol=1e-6):
            raise InputError(
                other_path,
                expected=f"the {key} of {path} ({first:g} {unit})",
                found=f"{other:g} {unit}",
            )
    return first


def mp2rage_signals(t1_ms: ArrayLike, params: MP2RAGEParameters) -> tuple[np.ndarray, np.ndarray]:
    """Return the steady-state signed signals ``(S1, S2)`` of both inversions, for M0 = 1.

    Marques et al. (2010), closed form: the longitudinal magnetisation just before each
    inversion is the fixed point of one cycle; each signal is ``sin(flip)`` times ``Mz`` just
    before the block's k-space-centre pulse. A train of ``m`` pulses (flip ``a``, spacing
    ``TR``, ``E = exp(-TR/T1)``) maps ``Mz → Mz (E cos a)^m + (1 - E)(1 - (E cos a)^m) /
    (1 - E cos a)``; a delay ``t`` maps ``Mz → Mz e^(-t/T1) + 1 - e^(-t/T1)``.

    Args:
        t1_ms: T1 values (ms, positive).
        params: The protocol.

    Returns:
        ``(S1, S2)``, float64 arrays of the shape of ``t1_ms``.
    """
    t1 = np.asarray(t1_ms, dtype=np.float64)
    if np.any(~np.isfinite(t1) | (t1 <= 0)):
        raise ValueError("t1_ms: expected positive finite values")
    n = params.n_readouts
    before, after = n // 2, n - n // 2
    e1 = np.exp(-params.tr_gre_ms / t1)
    a1, a2 = math.radians(params.flip1_deg), math.radians(params.flip2_deg)
    c1, c2 = math.cos(a1) * e1, math.cos(a2) * e1

    def train(mz: np.ndarray, c: np.ndarray, m: int) -> np.ndarray:
        cm = c**m
        return mz * cm + (1.0 - e1) * (1.0 - cm) / (1.0 - c)

    def delay(mz: np.ndarray | float, t_ms: float) -> np.ndarray:
        e = np.exp(-t_ms / t1)
        return mz * e + (1.0 - e)

    ta, tb, tc = params.delays_ms
    eff = params.inversion_efficiency
    # From Mz = 0 right after the inversion through the whole cycle: Mz_end = b; starting from
    # -eff Mz_ss instead multiplies that start by the cycle's total decay, so
    # Mz_ss = b / (1 + eff * decay).
    b = delay(train(delay(train(delay(0.0, ta), c1, n), tb), c2, n), tc)
    decay = np.exp(-(ta + tb + tc) / t1) * c1**n * c2**n
    mz_ss = b / (1.0 + eff * decay)
    mz1 = train(delay(-eff * mz_ss, ta), c1, before)
    mz2 = train(delay(train(mz1, c1, after), tb), c2, before)
    return np.sin(a1) * mz1, np.sin(a2) * mz2


def unit1_lookup(
    params: MP2RAGEParameters,
    t1_ms_range: tuple[float, float] = T1_RANGE_MS,
    *,
    step_ms: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Return the monotonic UNIT1-vs-T1 table of a protocol: ``(t1_ms, unit1)``, UNIT1 ascending.

    The curve is computed every ``step_ms`` over ``t1_ms_range`` and cut to its part between
    its extremes, where each UNIT1 has one T1 (UNIT1 falls as T1 grows there).

    Args:
        params: The protocol.
        t1_ms_range: Lowest and highest T1 of the table.
        step_ms: Table spacing.

    Returns:
        ``(t1_ms, unit1)``: float64 arrays, ``unit1`` strictly increasing (``t1_ms`` decreasing).

    Examples:
        >>> p = MP2RAGEParameters(5000.0, 700.0, 2500.0, 4.0, 5.0, 176, 7.0)
        >>> t1, u = unit1_lookup(p)
        >>> bool(np.all(np.diff(u) > 0)), float(u.min()) >= -0.5, float(u.max()) <= 0.5
        (True, True, True)
    """
    low, high = (float(v) for v in t1_ms_range)
    if not (0.0 < low < high) or step_ms <= 0:
        raise ValueError(
            f"t1_ms_range: expected 0 < low < high and step_ms > 0, found {t1_ms_range!r}, "
            f"{step_ms!r}"
        )
    t1 = np.arange(low, high + 0.5 * step_ms, step_ms)
    s1, s2 = mp2rage_signals(t1, params)
    unit1 = s1 * s2 / (s1**2 + s2**2)
    lo, hi = sorted((int(np.argmax(unit1)), int(np.argmin(unit1))))
    t1, unit1 = t1[lo : hi + 1], unit1[lo : hi + 1]
    if unit1[0] < unit1[-1]:
        raise ValueError("the UNIT1 curve rises with T1 over its monotonic part: check params")
    t1, unit1 = t1[::-1], unit1[::-1]
    keep = np.concatenate([[True], np.diff(unit1) > 0])  # strictly increasing for np.interp
    return t1[keep], unit1[keep]


def unit1_to_unit_range(unit1: np.ndarray, *, path: str | Path = "UNIT1") -> np.ndarray:
    """Return UNIT1 in the signal equation's ``[-0.5, 0.5]``, converting scanner ``0..4095``.

    Detection by the finite values' range: within ``[-0.5, 0.5]`` (1e-3 of tolerance) they are
    kept; otherwise within ``[0, 4095]`` they are the scanner's ``round(4095 (UNIT1 + 0.5))``
    and become ``value / 4095 - 0.5``.

    Args:
        unit1: The UNIT1 image as stored.
        path: Its file, for error messages.

    Returns:
        float32 UNIT1 in ``[-0.5, 0.5]`` (NaN kept).

    Raises:
        InputError: any other range.

    Examples:
        >>> unit1_to_unit_range(np.array([0.0, 2047.5, 4095.0])).tolist()
        [-0.5, 0.0, 0.5]
        >>> unit1_to_unit_range(np.array([-0.25, 0.4])).tolist()
        [-0.25, 0.4000000059604645]
    """
    values = np.asarray(unit1, dtype=np.float32)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return values
    lo, hi = float(finite.min()), float(finite.max())
    if lo >= -0.5 - _UNIT_TOLERANCE and hi <= 0.5 + _UNIT_TOLERANCE:
        return values
    if lo >= 0.0 and hi <= UNIT1_SCANNER_MAX + _UNIT_TOLERANCE:
        return (values / np.float32(UNIT1_SCANNER_MAX) - np.float32(0.5)).astype(np.float32)
    raise InputError(
        path,
        expected="UNIT1 in [-0.5, 0.5] or scanner values in [0, 4095]",
        found=f"values in [{lo:g}, {hi:g}]",
        hint="is this the UNIT1 (uniform) image of an MP2RAGE, not an inversion or a T1 map?",
    )


def t1_map_ms(
    unit1: np.ndarray,
    params: MP2RAGEParameters,
    *,
    t1_ms_range: tuple[float, float] = T1_RANGE_MS,
    path: str | Path = "UNIT1",
) -> np.ndarray:
    """Return the T1 map (ms) of a UNIT1 image by the protocol's lookup table.

    Args:
        unit1: UNIT1 as stored (either scaling, see :func:`unit1_to_unit_range`).
        params: The protocol (:func:`mp2rage_parameters`).
        t1_ms_range: T1 range of the table.
        path: The UNIT1 file, for error messages.

    Returns:
        float32 T1 in ms; NaN where UNIT1 lies outside the table (T1 outside ``t1_ms_range``
        or noise) or is not finite. A T1 beyond the monotonic part of the protocol's curve
        (long T1s with some protocols) shares its UNIT1 with a shorter one and comes out as
        that: check ``unit1_lookup(params)[0].max()`` against the longest T1 of interest.
    """
    u = unit1_to_unit_range(unit1, path=path)
    table_t1, table_u = unit1_lookup(params, t1_ms_range)
    out = np.interp(u, table_u, table_t1, left=np.nan, right=np.nan)
    return np.where(np.isfinite(u), out, np.nan).astype(np.float32)


def lesion_qt1_ms(t1_map: np.ndarray, instances: np.ndarray) -> dict[int, float]:
    """Return the median T1 (ms) of each lesion's finite voxels; NaN where it has none.

    Args:
        t1_map: T1 in ms (:func:`t1_map_ms`).
        instances: Lesion IDs on the same grid (0 background).

    Returns:
        ``{lesion_id: median T1 in ms}`` for every lesion present.

    Examples:
        >>> ids = np.array([[[0, 1, 1, 2]]])
        >>> lesion_qt1_ms(np.array([[[800.0, 1300.0, 1500.0, np.nan]]]), ids)
        {1: 1400.0, 2: nan}
    """
    t1 = np.asarray(t1_map, dtype=np.float64)
    ids = np.asarray(instances)
    _check_same_shape("t1_map", t1.shape, instances=ids)
    out: dict[int, float] = {}
    for lesion_id, box in _boxes(ids):
        values = t1[box][ids[box] == lesion_id]
        values = values[np.isfinite(values)]
        out[lesion_id] = float(np.median(values)) if values.size else float("nan")
    return out
