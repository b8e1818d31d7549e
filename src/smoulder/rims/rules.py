"""The rule-based rim detector and its companion measures, per lesion, in the GRE grid.

What a rater checks, written as arithmetic on the susceptibility map (sign-corrected,
paramagnetic positive: χ in ppm from QSM, or filtered phase in rad) around one lesion:

* **regions** (:func:`lesion_regions`), from the signed distance to the lesion edge (mm,
  negative inside): the *rim band* from :data:`RIM_INNER_MM` inside the edge to
  :data:`RIM_OUTER_MM` outside it; the *core*, the lesion deeper than :data:`CORE_DEPTH_MM` (or
  than half the lesion's depth, for small lesions), taken out of the band; the *perilesional
  shell*, :data:`SHELL_MM` outside the edge, white matter only, other lesions excluded;
* **reference** — the larger of the shell's and the core's median: a rim must stand out from
  both the white matter around it and the lesion inside it, so a lesion that is paramagnetic
  throughout is not a rim; the **spread** is the shell's robust standard deviation
  (1.4826 × MAD, floored at :data:`SPREAD_FLOOR`);
* **coverage** — the band split into angular sectors around the lesion centroid
  (:data:`SECTORS` azimuth × equal-area polar bins about the axial direction); a sector's value
  is the highest mean over its layers of :data:`LAYER_MM` of signed distance (a radial profile,
  so the rim counts wherever it sits across the band), and the sector is positive when that
  exceeds the reference by :data:`CONTRAST_SPREADS` spreads; coverage = positive sectors /
  sectors holding band voxels; it is the rule-based score;
* **consensus** — the raters' criterion: on each axial slice of the GRE grid whose lesion
  section is large enough, the same test on :data:`SLICE_SECTORS` in-plane sectors (in-plane
  distances); a rim around ≥ :data:`CONSENSUS_COVERAGE` of the edge on ≥
  :data:`CONSENSUS_SLICES` consecutive slices;
* **rule-based call** — consensus *and* coverage ≥ :data:`CALL_MIN_COVERAGE`: a partial rim
  whose cap faces the slice direction reads as complete rings on the slices that cut the cap,
  and passes the in-plane criterion (on phantom lesions, 8 of 20 partial rims of coverage
  0.25–0.5 did) although it covers less than half the lesion in 3D;
* **central-vein sign** — a thin paramagnetic line through the lesion centre: along lines
  through the centroid in :data:`VEIN_DIRECTIONS` directions, the fraction of samples inside
  the core that exceed the reference by :data:`VEIN_SPREADS` spreads; the sign holds when some
  line reaches :data:`VEIN_LINE_FRACTION` while at most :data:`VEIN_MAX_CORE_FRACTION` of the
  core is that bright (thin, not a uniformly paramagnetic lesion).

A vein passing beside a lesion or an iso-intense rim (visible on the magnitude, χ unchanged)
touches few sectors and no consecutive slices all round, so neither is called. Units follow the
input: ``_chi_ppm`` fields for QSM, ``_phase_rad`` for phase (:meth:`RimMeasures.row`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from smoulder.errors import InputError
from smoulder.grids import voxel_sizes

InputKind = Literal["qsm", "phase"]

#: Floor of the shell's spread (and of the patch scale) per input kind: ppm for QSM, rad for
#: phase; of the order of the noise of a good acquisition, so noise-free data stay well posed.
SPREAD_FLOOR: dict[str, float] = {"qsm": 0.005, "phase": 0.05}
#: How far the rim band reaches inside (mm) and outside (mm) the lesion edge.
RIM_INNER_MM = 2.0
RIM_OUTER_MM = 1.0
#: Depth (mm) below which the lesion is core; half the lesion's depth when that is less.
CORE_DEPTH_MM = 2.0
#: Perilesional shell: distances (mm) outside the lesion edge.
SHELL_MM: tuple[float, float] = (2.0, 5.0)
#: Fewest white-matter voxels in the shell; with fewer, the shell takes any tissue.
MIN_SHELL_VOXELS = 10
#: Fewest core voxels for the core to count in the reference.
MIN_CORE_VOXELS = 3
#: Thickness (mm) of the layers of a sector's radial profile.
LAYER_MM = 0.5
#: 3D sectors: azimuth bins × polar bins (equal area: uniform in cos θ about the axial axis).
SECTORS: tuple[int, int] = (8, 4)
#: In-plane sectors of the per-slice (consensus) check.
SLICE_SECTORS = 12
#: A sector is positive above the reference by this many spreads.
CONTRAST_SPREADS = 2.0
#: Consensus: fraction of the edge, and consecutive slices.
CONSENSUS_COVERAGE = 2.0 / 3.0
CONSENSUS_SLICES = 2
#: The rule-based call also needs this 3D coverage (see the module docstring).
CALL_MIN_COVERAGE = 0.6
#: A slice joins the consensus check when its lesion section has at least this equivalent
#: radius (mm): near a lesion's poles the section is a cap, with no edge to go around.
MIN_SLICE_RADIUS_MM = 1.5
#: Central vein: directions of the lines, their samples' threshold (spreads above the
#: reference), the fraction of one line's core samples that must pass, and the most of the
#: core that may pass (a vein is thin).
VEIN_DIRECTIONS = 128
VEIN_SPREADS = 3.0
VEIN_LINE_FRACTION = 0.6
VEIN_MAX_CORE_FRACTION = 0.5
#: 1.4826 × MAD estimates a normal distribution's standard deviation.
_MAD_TO_SD = 1.4826


def spread_floor(input_kind: str) -> float:
    """Return :data:`SPREAD_FLOOR` of ``input_kind`` (ppm for ``"qsm"``, rad for ``"phase"``).

    Raises:
        InputError: an unknown input kind.

    Examples:
        >>> spread_floor("qsm"), spread_floor("phase")
        (0.005, 0.05)
    """
    if input_kind not in SPREAD_FLOOR:
        raise InputError(
            "susceptibility input kind",
            expected=" or ".join(repr(k) for k in SPREAD_FLOOR),
            found=repr(input_kind),
        )
    return SPREAD_FLOOR[input_kind]


def axial_axis(affine: np.ndarray) -> int:
    """Return the voxel axis closest to the world's inferior–superior axis (the slice axis).

    Examples:
        >>> axial_axis(np.diag([1.0, 1.0, 2.0, 1.0]))
        2
        >>> coronal = np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
        >>> axial_axis(coronal)  # stored coronal: the second voxel axis runs up
        1
    """
    linear = np.asarray(affine, float)[:3, :3]
    return int(np.argmax(np.abs(linear[2]) / voxel_sizes(affine)))


# ------------------------------------------------------------------------------------ regions


@dataclass(frozen=True)
class LesionRegions:
    """A lesion's regions on a crop of the grid around it.

    Attributes:
        slices: the crop, as slices of the full grid.
        lesion: the lesion (fraction ≥ 0.5), crop.
        sdf_mm: signed distance to the lesion edge (mm, negative inside), crop.
        core: the core (see the module docstring), crop.
        band: the rim band, crop.
        shell: the perilesional white-matter shell, crop.
        usable: voxels that may enter any region (valid, no other lesion), crop.
        centroid_vox: the lesion's fraction-weighted centroid, crop voxel coordinates.
        voxel_mm: the grid's voxel sizes.
        axial: the slice axis (:func:`axial_axis`).
    """

    slices: tuple[slice, slice, slice]
    lesion: np.ndarray
    sdf_mm: np.ndarray
    core: np.ndarray
    band: np.ndarray
    shell: np.ndarray
    usable: np.ndarray
    centroid_vox: np.ndarray
    voxel_mm: np.ndarray
    axial: int


def lesion_regions(
    lesion_mask: np.ndarray,
    affine: np.ndarray,
    *,
    wm: np.ndarray | None = None,
    other_lesions: np.ndarray | None = None,
    valid: np.ndarray | None = None,
) -> LesionRegions:
    """Return the rim band, core and perilesional shell of one lesion, on a crop around it.

    The crop spans the lesion plus the shell's outer distance and a voxel, clipped to the grid.

    Args:
        lesion_mask: the lesion's fraction (or binary mask) on the grid.
        affine: the grid's voxel-to-world matrix.
        wm: normal-appearing white-matter probability (or mask) on the grid; ``None``: the
            shell takes any tissue.
        other_lesions: the session's other lesions (boolean), kept out of every region.
        valid: where the susceptibility is defined (the QSM mask); ``None``: everywhere.

    Returns:
        The :class:`LesionRegions`.

    Raises:
        InputError: the lesion mask is empty.
    """
    mask = np.asarray(lesion_mask)
    voxel_mm = voxel_sizes(affine)
    inside = mask >= 0.5
    if not inside.any():
        inside = mask > 0
    if not inside.any():
        raise InputError("lesion mask", expected="at least one voxel > 0", found="an empty mask")
    pad = np.ceil((SHELL_MM[1] + 1.0) / voxel_mm).astype(int)
    idx = np.argwhere(inside)
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, mask.shape)
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    lesion = inside[crop]
    sdf = _signed_distance_mm(lesion, voxel_mm)
    usable = np.ones(lesion.shape, bool)
    if other_lesions is not None:
        usable &= ~np.asarray(other_lesions, bool)[crop]
    if valid is not None:
        usable &= np.asarray(valid, bool)[crop]
    depth = float(-sdf[lesion].min())
    core = lesion & (sdf <= -min(CORE_DEPTH_MM, 0.5 * depth)) & usable
    band = (sdf >= -RIM_INNER_MM) & (sdf <= RIM_OUTER_MM) & ~core & usable
    ring = (sdf >= SHELL_MM[0]) & (sdf <= SHELL_MM[1]) & usable
    shell = ring
    if wm is not None:
        shell = ring & (np.asarray(wm)[crop] >= 0.5)
        if shell.sum() < MIN_SHELL_VOXELS:
            shell = ring
    weights = np.clip(mask[crop].astype(np.float64), 0.0, 1.0) * lesion
    centroid = np.array(ndi.center_of_mass(weights))
    return LesionRegions(
        crop, lesion, sdf, core, band, shell, usable, centroid, voxel_mm, axial_axis(affine)
    )


def _signed_distance_mm(inside: np.ndarray, voxel_mm: np.ndarray) -> np.ndarray:
    """Return the signed distance (mm, negative inside) of the voxels to a mask's edge.

    The edge lies half the smallest voxel size beyond the outermost voxel centres.
    """
    half = 0.5 * float(np.min(voxel_mm))
    depth = ndi.distance_transform_edt(inside, sampling=voxel_mm)
    away = ndi.distance_transform_edt(~inside, sampling=voxel_mm)
    return np.where(inside, half - depth, away - half).astype(np.float32)


# ----------------------------------------------------------------------------------- measures


@dataclass(frozen=True)
class RimMeasures:
    """The rule-based measures of one lesion; values in the input's unit (ppm or rad).

    Attributes:
        input_kind: ``"qsm"`` (χ, ppm) or ``"phase"`` (filtered phase, rad).
        rim_mean: the rim's level: the highest mean of the band's layers of signed distance
            (its radial profile's peak; NaN without band voxels).
        core_mean: mean of the core (NaN without core voxels).
        shell_mean: mean of the perilesional white-matter shell (NaN when empty).
        shell_spread: robust SD of the shell (1.4826 × MAD, floored).
        reference: the level a rim must exceed before the contrast threshold.
        rim_coverage: fraction of the edge's sectors with a rim (NaN without band voxels).
        rim_slices: the longest run of consecutive axial slices with a rim around ≥ 2/3 of the
            edge.
        rim_consensus: the raters' criterion: ``rim_slices`` ≥ :data:`CONSENSUS_SLICES`.
        central_vein_fraction: the best line's fraction of bright core samples.
        central_vein: the central-vein sign.
    """

    input_kind: str
    rim_mean: float
    core_mean: float
    shell_mean: float
    shell_spread: float
    reference: float
    rim_coverage: float
    rim_slices: int
    rim_consensus: bool
    central_vein_fraction: float
    central_vein: bool

    @property
    def rule_score(self) -> float:
        """Return the rule-based score in ``[0, 1]`` (the coverage; 0 when not measurable)."""
        return 0.0 if np.isnan(self.rim_coverage) else float(self.rim_coverage)

    @property
    def rule_call(self) -> bool:
        """Return the rule-based call: consensus and coverage ≥ :data:`CALL_MIN_COVERAGE`."""
        return self.rim_consensus and self.rule_score >= CALL_MIN_COVERAGE

    def row(self) -> dict[str, object]:
        """Return the lesion-table columns, units in the names (``_chi_ppm`` or ``_phase_rad``).

        Examples:
            >>> m = RimMeasures("qsm", 0.06, 0.01, -0.03, 0.01, 0.01, 0.9, 5, True, 0.0, False)
            >>> sorted(m.row())[:4]
            ['central_vein', 'central_vein_fraction', 'core_chi_ppm', 'rim_chi_ppm']
        """
        unit = "chi_ppm" if self.input_kind == "qsm" else "phase_rad"
        return {
            f"rim_{unit}": _rounded(self.rim_mean),
            f"core_{unit}": _rounded(self.core_mean),
            f"shell_{unit}": _rounded(self.shell_mean),
            f"shell_spread_{unit}": _rounded(self.shell_spread),
            "rim_coverage": _rounded(self.rim_coverage, 3),
            "rim_slices": self.rim_slices,
            "rim_consensus": self.rim_consensus,
            "rim_rule_call": self.rule_call,
            "central_vein": self.central_vein,
            "central_vein_fraction": _rounded(self.central_vein_fraction, 3),
        }


def measure_rim(
    susceptibility: np.ndarray,
    lesion_mask: np.ndarray,
    affine: np.ndarray,
    *,
    input_kind: InputKind,
    wm: np.ndarray | None = None,
    other_lesions: np.ndarray | None = None,
    valid: np.ndarray | None = None,
) -> RimMeasures:
    """Return the rule-based measures of one lesion (see the module docstring).

    Args:
        susceptibility: χ (ppm) or filtered phase (rad) on the GRE grid, sign-corrected so that
            paramagnetic is positive; non-finite voxels are left out.
        lesion_mask: the lesion's fraction on the same grid
            (:func:`smoulder.rims.patches.lesion_mask_in_gre`).
        affine: the grid's voxel-to-world matrix.
        input_kind: ``"qsm"`` or ``"phase"``.
        wm: normal-appearing white-matter probability on the grid; ``None``: any tissue.
        other_lesions: the session's other lesions (boolean), kept out of every region.
        valid: where the susceptibility is defined (the QSM mask).

    Returns:
        The :class:`RimMeasures`.

    Raises:
        InputError: unknown ``input_kind``, arrays of different shapes, or an empty lesion.
    """
    floor = spread_floor(input_kind)
    chi_full = np.asarray(susceptibility)
    if chi_full.shape != np.shape(lesion_mask):
        raise InputError(
            "lesion mask",
            expected=f"the susceptibility's grid shape {chi_full.shape}",
            found=str(np.shape(lesion_mask)),
        )
    regions = lesion_regions(lesion_mask, affine, wm=wm, other_lesions=other_lesions, valid=valid)
    chi = chi_full[regions.slices].astype(np.float64)
    finite = np.isfinite(chi)
    if not finite.all():
        regions = replace(
            regions,
            core=regions.core & finite,
            band=regions.band & finite,
            shell=regions.shell & finite,
            usable=regions.usable & finite,
        )
        chi = np.where(finite, chi, 0.0)
    shell = chi[regions.shell]
    core = chi[regions.core]
    spread = floor
    reference = -np.inf
    if shell.size:
        median = float(np.median(shell))
        spread = max(_MAD_TO_SD * float(np.median(np.abs(shell - median))), floor)
        reference = median
    if core.size >= MIN_CORE_VOXELS:
        reference = max(reference, float(np.median(core)))
    if not np.isfinite(reference):  # neither shell nor core: the band's own median
        reference = float(np.median(chi[regions.band])) if regions.band.any() else 0.0
    threshold = reference + CONTRAST_SPREADS * spread
    runs = _slice_coverages(chi, regions, threshold) >= CONSENSUS_COVERAGE
    longest = _longest_run(runs)
    vein_fraction, vein = _central_vein(chi, regions, reference + VEIN_SPREADS * spread)
    return RimMeasures(
        input_kind=input_kind,
        rim_mean=_profile_peak(chi, regions),
        core_mean=_mean(core),
        shell_mean=_mean(shell),
        shell_spread=spread,
        reference=reference,
        rim_coverage=_coverage_3d(chi, regions, threshold),
        rim_slices=longest,
        rim_consensus=longest >= CONSENSUS_SLICES,
        central_vein_fraction=vein_fraction,
        central_vein=vein,
    )


# ----------------------------------------------------------------------------------- coverage


def _coverage_3d(chi: np.ndarray, regions: LesionRegions, threshold: float) -> float:
    """Return the fraction of 3D sectors of the band whose radial peak exceeds ``threshold``."""
    pts = np.argwhere(regions.band)
    if len(pts) == 0:
        return float("nan")
    offsets = (pts - regions.centroid_vox) * regions.voxel_mm
    in_plane = [a for a in range(3) if a != regions.axial]
    x, y, z = offsets[:, in_plane[0]], offsets[:, in_plane[1]], offsets[:, regions.axial]
    n_az, n_polar = SECTORS
    cos_polar = z / np.maximum(np.linalg.norm(offsets, axis=1), 1e-6)
    polar = np.clip(np.floor((cos_polar + 1) / 2 * n_polar).astype(int), 0, n_polar - 1)
    sector = polar * n_az + _azimuth_bins(x, y, n_az)
    peaks = _sector_peaks(sector, regions.sdf_mm[regions.band], chi[regions.band], n_az * n_polar)
    return _positive_fraction(peaks, threshold)


def _profile_peak(chi: np.ndarray, regions: LesionRegions) -> float:
    """Return the highest mean of the whole band's signed-distance layers (NaN: no band)."""
    if not regions.band.any():
        return float("nan")
    values = chi[regions.band]
    return float(
        _sector_peaks(np.zeros(values.size, int), regions.sdf_mm[regions.band], values, 1)[0]
    )


def _slice_coverages(chi: np.ndarray, regions: LesionRegions, threshold: float) -> np.ndarray:
    """Return the in-plane coverage of every axial slice of the crop (0 for skipped slices)."""
    ax = regions.axial
    plane_mm = np.delete(regions.voxel_mm, ax)
    min_area_mm2 = np.pi * MIN_SLICE_RADIUS_MM**2
    centre_2d = np.delete(regions.centroid_vox, ax)
    out = np.zeros(regions.lesion.shape[ax])
    for k in range(len(out)):
        lesion = np.take(regions.lesion, k, axis=ax)
        if lesion.sum() * plane_mm.prod() < min_area_mm2:
            continue
        sdf = _signed_distance_mm(lesion, plane_mm)
        depth = float(-sdf[lesion].min())
        core = lesion & (sdf <= -min(CORE_DEPTH_MM, 0.5 * depth))
        band = (sdf >= -RIM_INNER_MM) & (sdf <= RIM_OUTER_MM) & ~core
        band &= np.take(regions.usable, k, axis=ax)
        pts = np.argwhere(band)
        if len(pts) == 0:
            continue
        centre = np.array(ndi.center_of_mass(lesion)) if lesion.any() else centre_2d
        offsets = (pts - centre) * plane_mm
        sector = _azimuth_bins(offsets[:, 0], offsets[:, 1], SLICE_SECTORS)
        values = np.take(chi, k, axis=ax)[band]
        peaks = _sector_peaks(sector, sdf[band], values, SLICE_SECTORS)
        out[k] = _positive_fraction(peaks, threshold)
    return out


def _azimuth_bins(x: np.ndarray, y: np.ndarray, n: int) -> np.ndarray:
    """Return the index (0…n−1) of the angular sector of the in-plane offsets ``(x, y)``."""
    angle = np.arctan2(y, x)
    return np.clip(np.floor((angle + np.pi) / (2 * np.pi) * n).astype(int), 0, n - 1)


def _sector_peaks(
    sector: np.ndarray, sdf_mm: np.ndarray, values: np.ndarray, n_sectors: int
) -> np.ndarray:
    """Return per sector the highest mean over its signed-distance layers (NaN when empty).

    Layers are :data:`LAYER_MM` thick from the band's inner face outwards.
    """
    n_layers = int(np.ceil((RIM_INNER_MM + RIM_OUTER_MM) / LAYER_MM)) + 1
    layer = np.clip(((sdf_mm + RIM_INNER_MM) / LAYER_MM).astype(int), 0, n_layers - 1)
    index = sector * n_layers + layer
    size = n_sectors * n_layers
    counts = np.bincount(index, minlength=size).reshape(n_sectors, n_layers)
    sums = np.bincount(index, weights=values, minlength=size).reshape(n_sectors, n_layers)
    means = np.where(counts > 0, sums / np.maximum(counts, 1), -np.inf)
    peaks = means.max(axis=1)
    peaks[counts.sum(axis=1) == 0] = np.nan
    return peaks


def _positive_fraction(peaks: np.ndarray, threshold: float) -> float:
    """Return the fraction of non-empty sectors whose peak exceeds ``threshold`` (NaN: none)."""
    measured = np.isfinite(peaks)
    if not measured.any():
        return float("nan")
    return float((peaks[measured] > threshold).sum() / measured.sum())


def _longest_run(flags: np.ndarray) -> int:
    """Return the length of the longest run of consecutive ``True`` in ``flags``.

    Examples:
        >>> _longest_run(np.array([True, False, True, True, True, False]))
        3
    """
    best = run = 0
    for flag in flags:
        run = run + 1 if flag else 0
        best = max(best, run)
    return best


# ------------------------------------------------------------------------------- central vein


def _central_vein(chi: np.ndarray, regions: LesionRegions, threshold: float) -> tuple[float, bool]:
    """Return ``(best line fraction, sign)`` of a thin bright line through the lesion centre."""
    core = regions.core
    if core.sum() < MIN_CORE_VOXELS:
        return 0.0, False
    core_fraction = float((chi[core] > threshold).mean())
    pts = np.argwhere(core)
    reach_mm = float(np.linalg.norm((pts - regions.centroid_vox) * regions.voxel_mm, axis=1).max())
    steps_mm = np.arange(-reach_mm - LAYER_MM, reach_mm + LAYER_MM + 1e-9, LAYER_MM / 2)
    directions = _hemisphere_directions(VEIN_DIRECTIONS) / regions.voxel_mm  # voxels per mm
    coords = (
        regions.centroid_vox[None, :, None] + directions[:, :, None] * steps_mm[None, None, :]
    )  # (directions, 3, steps)
    flat = coords.transpose(1, 0, 2).reshape(3, -1)
    in_core = ndi.map_coordinates(core.astype(np.float32), flat, order=1, cval=0.0) >= 0.5
    bright = ndi.map_coordinates(chi, flat, order=1, mode="nearest") > threshold
    in_core = in_core.reshape(len(directions), -1)
    bright = bright.reshape(len(directions), -1) & in_core
    counts = in_core.sum(axis=1)
    fractions = np.where(counts >= 3, bright.sum(axis=1) / np.maximum(counts, 1), 0.0)
    best = float(fractions.max())
    return best, bool(best >= VEIN_LINE_FRACTION and core_fraction <= VEIN_MAX_CORE_FRACTION)


def _hemisphere_directions(n: int) -> np.ndarray:
    """Return ``n`` unit vectors spread evenly over a hemisphere (a Fibonacci lattice).

    A line and its reverse are the same line, so one hemisphere covers every direction.
    """
    k = np.arange(n) + 0.5
    z = k / n  # uniform in cos θ over (0, 1]
    phi = np.pi * (1 + 5**0.5) * k
    r = np.sqrt(1 - z**2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def _rounded(value: float, digits: int = 4) -> float:
    return float(value) if np.isnan(value) else round(float(value), digits)
