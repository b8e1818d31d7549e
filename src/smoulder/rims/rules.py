"""The rule-based rim detector and its companion measures, per lesion, in the GRE grid.

What a rater checks, written as arithmetic on the susceptibility map (sign-corrected,
paramagnetic positive: χ in ppm from QSM, or filtered phase in rad) around one lesion:

* **regions** (:func:`lesion_regions`), from the signed distance to the lesion edge (mm,
  negative inside): the *rim band* from :data:`RIM_INNER_MM` inside the edge to
  :data:`RIM_OUTER_MM` outside it; the *core*, the lesion deeper than :data:`CORE_DEPTH_MM` (a
  small lesion's innermost :data:`CORE_MIN_MM`), taken out of the band; the *perilesional
  shell*, :data:`SHELL_MM` outside the edge, white matter only, other lesions excluded;
* **reference** — the larger of the shell's and the core's median: a rim must stand out from
  both the white matter around it and the lesion inside it, so a lesion that is paramagnetic
  throughout is not a rim;
* **coverage** — the map smoothed by :data:`SMOOTH_MM` (within usable voxels), the band split
  into angular sectors around the lesion centroid (:data:`SECTORS`: azimuth × equal-area polar
  bins about the axial direction); a sector's value is the highest mean over its layers of
  :data:`LAYER_MM` of signed distance (a radial profile, so the rim counts wherever it sits
  across the band), and the sector is positive when that exceeds the reference by
  :data:`CONTRAST_SPREADS` times the robust SD of the smoothed map over the shell (which holds
  the noise, its spatial correlation and the tissue's own variation); coverage = positive
  sectors / sectors holding band voxels; it is the rule-based score (phantom-made lesions, 0.8
  mm, blur 0.4 mm, noise 0.01 ppm: ROC-AUC 1.0 against rim yes/partial/none/mimics);
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
  the core that exceed the reference by :data:`VEIN_SPREADS` times the shell's robust SD
  (1.4826 × MAD of χ, floored at :data:`SPREAD_FLOOR`); the sign holds when some
  line reaches :data:`VEIN_LINE_FRACTION` while at most :data:`VEIN_MAX_CORE_FRACTION` of the
  core is that bright (thin, not a uniformly paramagnetic lesion).

A vein passing beside a lesion or an iso-intense rim (visible on the magnitude, χ unchanged)
touches few sectors and no consecutive slices all round, so neither is called. A small lesion
whose rim fills it (no core darker than the rim) is not called either: with blur 0.6 mm, rims
of 1.5–2 mm in lesions of radius ≈ 3 mm are missed (the network is there for those). Units
follow the input: ``_chi_ppm`` fields for QSM, ``_phase_rad`` for phase
(:meth:`RimMeasures.row`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from smoulder.errors import InputError
from smoulder.grids import voxel_sizes

InputKind = Literal["qsm", "phase"]

#: Floor of the shell's spreads (and of the patch scale) per input kind: ppm for QSM, rad for
#: phase; of the order of the noise of a good acquisition, so noise-free data stay well posed.
SPREAD_FLOOR: dict[str, float] = {"qsm": 0.005, "phase": 0.05}
#: How far the rim band reaches inside (mm) and outside (mm) the lesion edge.
RIM_INNER_MM = 2.0
RIM_OUTER_MM = 1.0
#: Depth (mm) below which the lesion is core, and the core's least thickness (mm): a lesion too
#: shallow for both keeps its innermost :data:`CORE_MIN_MM` as core.
CORE_DEPTH_MM = 2.0
CORE_MIN_MM = 1.0
#: Perilesional shell: distances (mm) outside the lesion edge.
SHELL_MM: tuple[float, float] = (2.0, 5.0)
#: Fewest white-matter voxels in the shell; with fewer, the shell takes any tissue.
MIN_SHELL_VOXELS = 10
#: Fewest core voxels for the core to count in the reference.
MIN_CORE_VOXELS = 3
#: Thickness (mm) of the layers of a sector's radial profile.
LAYER_MM = 0.5
#: 3D sectors: azimuth bins × polar bins (equal area: uniform in cos θ about the axial axis).
SECTORS: tuple[int, int] = (12, 6)
#: In-plane sectors of the per-slice (consensus) check.
SLICE_SECTORS = 12
#: Gaussian smoothing (σ, mm) of the susceptibility before the sector test.
SMOOTH_MM = 0.5
#: A sector is positive when one of its layers stands above the reference by this many
#: spreads of the smoothed map over the shell.
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
#: The rule-based measures the classifier's fusion reads (:meth:`RimMeasures.features`).
FEATURES = (
    "rim_coverage",
    "rim_slices",
    "rim_contrast_spreads",
    "core_contrast_spreads",
    "central_vein_fraction",
    "rim_consensus",
)
#: Consecutive rim slices beyond this count add no evidence (a large lesion has many slices).
MAX_FEATURE_SLICES = 10


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
        shell_tissue: voxels that may be shell (usable white matter; any usable voxel when the
            shell would hold too little white matter), crop.
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
    shell_tissue: np.ndarray
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
    crop: tuple[slice, slice, slice] = tuple(  # type: ignore[assignment]
        slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True)
    )
    lesion = inside[crop]
    sdf = _signed_distance_mm(lesion, voxel_mm)
    usable = np.ones(lesion.shape, bool)
    if other_lesions is not None:
        usable &= ~np.asarray(other_lesions, bool)[crop]
    if valid is not None:
        usable &= np.asarray(valid, bool)[crop]
    core = _core(lesion, sdf) & usable
    band = (sdf >= -RIM_INNER_MM) & (sdf <= RIM_OUTER_MM) & ~core & usable
    ring = (sdf >= SHELL_MM[0]) & (sdf <= SHELL_MM[1]) & usable
    tissue = usable
    if wm is not None and (ring & (np.asarray(wm)[crop] >= 0.5)).sum() >= MIN_SHELL_VOXELS:
        tissue = usable & (np.asarray(wm)[crop] >= 0.5)
    weights = np.clip(mask[crop].astype(np.float64), 0.0, 1.0) * lesion
    centroid = np.array(ndi.center_of_mass(weights))
    return LesionRegions(
        slices=crop,
        lesion=lesion,
        sdf_mm=sdf,
        core=core,
        band=band,
        shell=ring & tissue,
        usable=usable,
        shell_tissue=tissue,
        centroid_vox=centroid,
        voxel_mm=voxel_mm,
        axial=axial_axis(affine),
    )


def _core(lesion: np.ndarray, sdf_mm: np.ndarray) -> np.ndarray:
    """Return the lesion's core: deeper than :data:`CORE_DEPTH_MM`, or its innermost part.

    A lesion not deep enough for a core of :data:`CORE_MIN_MM` below that depth keeps the part
    deeper than its greatest depth less :data:`CORE_MIN_MM` (and at least half that depth).
    """
    deepest = float(-sdf_mm[lesion].min())
    cut = CORE_DEPTH_MM
    if deepest < CORE_DEPTH_MM + CORE_MIN_MM:
        cut = max(deepest - CORE_MIN_MM, 0.5 * deepest)
    return lesion & (sdf_mm <= -cut)


def _signed_distance_mm(inside: np.ndarray, voxel_mm: np.ndarray) -> np.ndarray:
    """Return the signed distance (mm, negative inside) of the voxels to a mask's edge.

    The edge lies half the smallest voxel size beyond the outermost voxel centres.
    """
    half = 0.5 * float(np.min(voxel_mm))
    depth = depth_inside(inside, voxel_mm)
    away = ndi.distance_transform_edt(~inside, sampling=voxel_mm)
    return np.where(inside, half - depth, away - half).astype(np.float32)


def depth_inside(inside: np.ndarray, sampling: np.ndarray) -> np.ndarray:
    """Return the Euclidean distance (mm) of each voxel of ``inside`` to the nearest voxel
    outside it (0 outside), as ``ndimage.distance_transform_edt(inside, sampling=...)``.

    Computed on the mask's bounding box grown by one voxel, which holds every nearest outside
    voxel: an outside voxel beyond that layer, clamped onto it, is an outside voxel that is no
    farther along any axis. A lesion's box is far smaller than its measuring crop.

    Examples:
        >>> m = np.zeros((9, 9, 9), bool); m[3:6, 2:7, 4] = True
        >>> bool(np.array_equal(depth_inside(m, np.ones(3)), ndi.distance_transform_edt(m)))
        True
    """
    out = np.zeros(inside.shape, np.float64)
    idx = np.argwhere(inside)
    if not idx.size:
        return out
    box = tuple(
        slice(max(int(a) - 1, 0), int(b) + 2) for a, b in zip(idx.min(0), idx.max(0), strict=True)
    )
    sub = np.asarray(inside[box], bool)
    if sub.all():  # the mask reaches the grid's edge all round: nothing outside in the box
        return ndi.distance_transform_edt(inside, sampling=sampling)
    out[box] = ndi.distance_transform_edt(sub, sampling=sampling)
    return out


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
        sector_slice: the full grid's index, along the slice axis, of the lesion's largest
            axial section (−1: none measurable), where ``sectors`` were measured.
        sectors: one character per in-plane sector of that slice (:func:`slice_sectors`):
            ``1`` rim, ``0`` no rim, ``-`` no edge voxel; empty when not measurable.
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
    sector_slice: int = -1
    sectors: str = ""

    @property
    def rule_score(self) -> float:
        """Return the rule-based score in ``[0, 1]`` (the coverage; 0 when not measurable)."""
        return 0.0 if np.isnan(self.rim_coverage) else float(self.rim_coverage)

    @property
    def rule_call(self) -> bool:
        """Return the rule-based call: consensus and coverage ≥ :data:`CALL_MIN_COVERAGE`."""
        return self.rim_consensus and self.rule_score >= CALL_MIN_COVERAGE

    def features(self) -> np.ndarray:
        """Return the measures the classifier's fusion reads (:data:`FEATURES`), float32.

        Contrasts are in shell spreads; a measure that cannot be taken is 0.

        Examples:
            >>> m = RimMeasures("qsm", 0.06, 0.01, -0.03, 0.01, 0.01, 0.9, 5, True, 0.2, False)
            >>> [round(float(v), 2) for v in m.features()]
            [0.9, 5.0, 5.0, 4.0, 0.2, 1.0]
        """
        spread = self.shell_spread if self.shell_spread > 0 else 1.0
        values = [
            self.rim_coverage,
            min(self.rim_slices, MAX_FEATURE_SLICES),
            (self.rim_mean - self.reference) / spread,
            (self.core_mean - self.shell_mean) / spread,
            self.central_vein_fraction,
            float(self.rim_consensus),
        ]
        return np.nan_to_num(np.array(values, np.float32), nan=0.0, posinf=0.0, neginf=0.0)

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
            "rim_slice": self.sector_slice if self.sectors else None,
            "rim_sectors": self.sectors or None,
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
    regions: LesionRegions | None = None,
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
        regions: the lesion's :func:`lesion_regions` of these arguments, when computed already.

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
    if regions is None:
        regions = lesion_regions(
            lesion_mask, affine, wm=wm, other_lesions=other_lesions, valid=valid
        )
    chi = chi_full[regions.slices].astype(np.float64)
    finite = np.isfinite(chi)
    if not finite.all():
        regions = replace(
            regions,
            core=regions.core & finite,
            band=regions.band & finite,
            shell=regions.shell & finite,
            usable=regions.usable & finite,
            shell_tissue=regions.shell_tissue & finite,
        )
        chi = np.where(finite, chi, 0.0)
    shell, core = chi[regions.shell], chi[regions.core]
    spread = max(robust_sd(shell), floor) if shell.size else floor
    reference = _reference(chi, regions)
    smooth = _smoothed(chi, regions.usable, regions.voxel_mm)
    noise = max(robust_sd(smooth[regions.shell]), floor) if shell.size else floor
    threshold = reference + CONTRAST_SPREADS * noise
    plane_sdf = _in_plane_distance_mm(regions)
    coverages = _slice_coverages(smooth, regions, threshold, plane_sdf)
    longest = _longest_run(coverages >= CONSENSUS_COVERAGE)
    vein_fraction, vein = _central_vein(chi, regions, reference + VEIN_SPREADS * spread)
    k, flags = _largest_section_sectors(smooth, regions, threshold, plane_sdf)
    return RimMeasures(
        input_kind=input_kind,
        rim_mean=_profile_peak(chi, regions),
        core_mean=_mean(core),
        shell_mean=_mean(shell),
        shell_spread=spread,
        reference=reference,
        rim_coverage=_coverage_3d(smooth, regions, threshold),
        rim_slices=longest,
        rim_consensus=longest >= CONSENSUS_SLICES,
        central_vein_fraction=vein_fraction,
        central_vein=vein,
        sector_slice=-1 if flags is None else regions.slices[regions.axial].start + k,
        sectors="" if flags is None else "".join("-01"[f + 1] for f in flags.tolist()),
    )


def _largest_section_sectors(
    smooth: np.ndarray, regions: LesionRegions, threshold: float, plane_sdf: np.ndarray
) -> tuple[int, np.ndarray | None]:
    """Return the crop index of the lesion's largest axial section and its sector flags."""
    areas = regions.lesion.sum(axis=tuple(a for a in range(3) if a != regions.axial))
    k = int(np.argmax(areas))
    return k, slice_sectors(smooth, regions, threshold, k, plane_sdf)


def _in_plane_distance_mm(regions: LesionRegions) -> np.ndarray:
    """Return every axial slice's own signed distance (mm) to the lesion's edge in that slice.

    One 3D transform whose spacing along the slice axis is too large to matter: the nearest
    voxel of the other kind always lies in the same slice, as :func:`_signed_distance_mm` of
    each slice alone would find it.
    """
    spacing = np.array(regions.voxel_mm, np.float64)
    spacing[regions.axial] = 1e6
    half = 0.5 * float(np.min(np.delete(regions.voxel_mm, regions.axial)))
    depth = depth_inside(regions.lesion, spacing)
    away = ndi.distance_transform_edt(~regions.lesion, sampling=spacing)
    return np.where(regions.lesion, half - depth, away - half).astype(np.float32)


def _reference(chi: np.ndarray, regions: LesionRegions) -> float:
    """Return the level a rim must stand above: the larger of the shell's and core's median.

    Without either, the band's own median (0 without band).
    """
    levels = []
    if regions.shell.any():
        levels.append(float(np.median(chi[regions.shell])))
    if regions.core.sum() >= MIN_CORE_VOXELS:
        levels.append(float(np.median(chi[regions.core])))
    if levels:
        return max(levels)
    return float(np.median(chi[regions.band])) if regions.band.any() else 0.0


# ----------------------------------------------------------------------------------- coverage


def _coverage_3d(smooth: np.ndarray, regions: LesionRegions, threshold: float) -> float:
    """Return the fraction of the band's 3D sectors with a rim (see the module docstring)."""
    sectors = _sectors_3d(regions, regions.band)
    n_sectors = SECTORS[0] * SECTORS[1]
    means, counts = _cells(smooth, regions.sdf_mm, regions.band, sectors, -RIM_INNER_MM, n_sectors)
    return _positive_fraction(means, counts, threshold)


def _smoothed(values: np.ndarray, weights: np.ndarray, voxel_mm: np.ndarray) -> np.ndarray:
    """Return ``values`` smoothed by a Gaussian of :data:`SMOOTH_MM`, over ``weights`` only.

    Normalised convolution: voxels outside ``weights`` (other lesions, no data) neither
    contribute nor are filled from far away; where no weight is near, the value is kept.
    """
    sigma = SMOOTH_MM / np.asarray(voxel_mm, float)
    w = weights.astype(np.float64)
    num = ndi.gaussian_filter(values * w, sigma, mode="nearest")
    den = ndi.gaussian_filter(w, sigma, mode="nearest")
    out = np.array(values, np.float64)
    np.divide(num, den, out=out, where=den > 1e-3)
    return out


def _sectors_3d(regions: LesionRegions, mask: np.ndarray) -> np.ndarray:
    """Return the 3D sector (azimuth × equal-area polar bin) of every voxel of ``mask``."""
    offsets = (np.argwhere(mask) - regions.centroid_vox) * regions.voxel_mm
    in_plane = [a for a in range(3) if a != regions.axial]
    n_az, n_polar = SECTORS
    cos_polar = offsets[:, regions.axial] / np.maximum(np.linalg.norm(offsets, axis=1), 1e-6)
    polar = np.clip(np.floor((cos_polar + 1) / 2 * n_polar).astype(int), 0, n_polar - 1)
    return polar * n_az + sector_index(offsets[:, in_plane[0]], offsets[:, in_plane[1]], n_az)


def _profile_peak(chi: np.ndarray, regions: LesionRegions) -> float:
    """Return the highest mean of the whole band's signed-distance layers (NaN: no band)."""
    if not regions.band.any():
        return float("nan")
    sector = np.zeros(int(regions.band.sum()), int)
    means, _ = _cells(chi, regions.sdf_mm, regions.band, sector, -RIM_INNER_MM, 1)
    return float(np.nanmax(means))


def _slice_coverages(
    smooth: np.ndarray, regions: LesionRegions, threshold: float, plane_sdf: np.ndarray
) -> np.ndarray:
    """Return the in-plane coverage of every axial slice of the crop (0 for skipped slices)."""
    out = np.zeros(regions.lesion.shape[regions.axial])
    for k in range(len(out)):
        flags = slice_sectors(smooth, regions, threshold, k, plane_sdf)
        if flags is not None and (flags >= 0).any():
            out[k] = float((flags == 1).sum() / (flags >= 0).sum())
    return out


def slice_sectors(
    smooth: np.ndarray,
    regions: LesionRegions,
    threshold: float,
    k: int,
    plane_sdf: np.ndarray,
) -> np.ndarray | None:
    """Return the rim flag of each in-plane sector of axial slice ``k`` of the crop.

    ``int8 (SLICE_SECTORS,)``: 1 where the sector's highest band layer mean exceeds
    ``threshold``, 0 where it does not, −1 where the sector has no band voxel. Sector ``s``
    covers the angles ``[−π + 2πs/n, −π + 2π(s+1)/n)`` of ``atan2(y, x)``, ``x`` and ``y`` the
    offsets (mm) along the first and second in-plane voxel axes from the slice's lesion
    centroid. ``None`` for a slice whose lesion section is below :data:`MIN_SLICE_RADIUS_MM`
    or has no band. ``plane_sdf``: every slice's in-plane signed distance to the lesion's edge
    (:func:`_in_plane_distance_mm`).
    """
    ax = regions.axial
    plane_mm = np.delete(regions.voxel_mm, ax)
    lesion = np.take(regions.lesion, k, axis=ax)
    if lesion.sum() * plane_mm.prod() < np.pi * MIN_SLICE_RADIUS_MM**2:
        return None
    sdf = np.take(plane_sdf, k, axis=ax)
    usable = np.take(regions.usable, k, axis=ax)
    band = (sdf >= -RIM_INNER_MM) & (sdf <= RIM_OUTER_MM) & ~_core(lesion, sdf) & usable
    if not band.any():
        return None
    sectors = _plane_sectors(band, np.argwhere(lesion).mean(0), plane_mm)
    values = np.take(smooth, k, axis=ax)
    means, counts = _cells(values, sdf, band, sectors, -RIM_INNER_MM, SLICE_SECTORS)
    filled = counts > 0
    peaks = np.where(filled, means, -np.inf).max(axis=1)
    return np.where(filled.any(axis=1), (peaks > threshold).astype(np.int8), -1).astype(np.int8)


def _plane_sectors(mask: np.ndarray, centre: np.ndarray, plane_mm: np.ndarray) -> np.ndarray:
    """Return the in-plane sector of every voxel of the 2D ``mask`` around ``centre``."""
    offsets = (np.argwhere(mask) - centre) * plane_mm
    return sector_index(offsets[:, 0], offsets[:, 1], SLICE_SECTORS)


def sector_index(x: np.ndarray, y: np.ndarray, n: int) -> np.ndarray:
    """Return the angular sector (0…n−1) of each in-plane offset ``(x, y)`` (mm).

    Sector ``s`` covers the angles ``[−π + 2πs/n, −π + 2π(s+1)/n)`` of ``atan2(y, x)``: the
    convention of the lesion table's ``rim_sectors`` (:func:`slice_sectors`), which the report
    draws.

    Examples:
        >>> sector_index(np.array([-1.0, 1.0, 0.0]), np.array([-0.1, 0.1, -1.0]), 12).tolist()
        [0, 6, 3]
    """
    angle = np.arctan2(np.asarray(y, float), np.asarray(x, float))
    return np.clip(np.floor((angle + np.pi) / (2 * np.pi) * n).astype(int), 0, n - 1)


def _cells(
    values: np.ndarray,
    sdf_mm: np.ndarray,
    mask: np.ndarray,
    sector: np.ndarray,
    start_mm: float,
    n_sectors: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(means, counts)`` of the voxels of ``mask`` per sector and layer.

    ``sector`` holds the sector of each voxel of ``mask`` (in ``argwhere`` order); layers are
    :data:`LAYER_MM` of signed distance from ``start_mm`` outwards. Both arrays are
    ``(n_sectors, layers)``; empty cells have mean NaN and count 0.
    """
    distance = sdf_mm[mask]
    layer = np.maximum(((distance - start_mm) / LAYER_MM).astype(int), 0)
    n_layers = int(layer.max()) + 1 if layer.size else 1
    index = sector * n_layers + layer
    size = n_sectors * n_layers
    counts = np.bincount(index, minlength=size)
    sums = np.bincount(index, weights=values[mask], minlength=size)
    means = np.full(size, np.nan)
    np.divide(sums, counts, out=means, where=counts > 0)
    return means.reshape(n_sectors, n_layers), counts.reshape(n_sectors, n_layers)


def _positive_fraction(means: np.ndarray, counts: np.ndarray, threshold: float) -> float:
    """Return the fraction of sectors whose highest layer mean exceeds ``threshold``.

    ``means`` and ``counts`` are :func:`_cells`' ``(sectors, layers)``; NaN when no sector
    holds voxels.
    """
    filled = counts > 0
    sectors = filled.any(axis=1)
    if not sectors.any():
        return float("nan")
    peaks = np.where(filled, means, -np.inf).max(axis=1)[sectors]
    return float((peaks > threshold).mean())


def robust_sd(values: np.ndarray) -> float:
    """Return 1.4826 × the median absolute deviation of ``values`` (a normal's SD).

    Examples:
        >>> round(robust_sd(np.random.default_rng(0).normal(0.0, 2.0, 100_000)), 1)
        2.0
    """
    return _MAD_TO_SD * float(np.median(np.abs(values - np.median(values))))


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
