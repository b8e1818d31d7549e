"""One session's rim assessment: every lesion's rim probability, call, evidence and tissue.

What the session workflow's ``rims`` step runs (:func:`assess_session`), as a methods section:

1. **Input.** The session's QSM (the ``_Chimap`` the user gave, or the one the pipeline
   reconstructs), else the homodyne-filtered phase of the GRE's last echo
   (:func:`smoulder.qsm.reconstruct.filtered_phase`); both on the GRE's own grid.
2. **Sign.** The convention stated in the sidecar (:func:`~smoulder.rims.sign.
   phase_sign_from_sidecar`) is checked on the data: veins must come out paramagnetic
   (:func:`~smoulder.rims.sign.check_paramagnetic_sign`); the data overrule a sidecar they
   contradict, and the sentence saying which convention was used goes into the outputs.
3. **Lesions in GRE space.** The FLAIR lesion instances are mapped onto the GRE grid through the
   inverse of the GRE → FLAIR co-registration (labels kept); the susceptibility image is never
   resampled. A lesion with less than half of its voxels inside the GRE's valid field of view,
   or without a voxel on the GRE grid, is *not assessed* (never "no rim").
4. **Measures and classifier.** Per lesion, the rule-based measures
   (:func:`smoulder.rims.rules.measure_rim`) and the classifier's calibrated probability on its
   patch (:mod:`smoulder.rims.patches`, :func:`smoulder.rims.network.predict`, 8-flip TTA); the
   call is made at the bundle's balanced operating point.
5. **Tissue beyond the rim.** With a T1-weighted image on the FLAIR grid, the T1 black-hole
   measure (:func:`smoulder.rims.tissue.t1_black_holes`); with an MP2RAGE UNIT1 and both
   inversions' sequence parameters, the lesion's quantitative T1 by the protocol's lookup table
   (:func:`smoulder.rims.tissue.t1_map_ms`).

Every column is described, with units, in :data:`RIM_COLUMNS` (the lesion table's JSON
dictionary); the session's summary (:class:`RimSummary`) goes into the table's sidecar.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from smoulder.rims.patches import MIN_FOV_FRACTION, field_of_view_fraction, lesion_labels_in_gre
from smoulder.rims.rules import axial_axis

if TYPE_CHECKING:
    from smoulder.registration.transforms import AffineTransform
    from smoulder.rims.network import RimBundle
    from smoulder.rims.rules import InputKind, RimMeasures
    from smoulder.rims.train import PatchSet

#: The rim call of a lesion that could not be assessed: never "no".
NOT_ASSESSED = "not assessed"
#: ``rim_status`` of an assessed lesion.
ASSESSED = "assessed"
#: Why no lesion of a session is assessed when it has no susceptibility image.
NO_SUSCEPTIBILITY = "no susceptibility data in this session"
#: Why no lesion is assessed when the configuration turns the rim assessment off.
RIMS_OFF = "rim assessment turned off (rims.enabled: false)"

_MEASURE_UNITS = {"chi_ppm": ("χ", "ppm"), "phase_rad": ("filtered phase", "rad")}

#: The lesion-table columns this step adds, with their descriptions and units.
RIM_COLUMNS: dict[str, dict[str, Any]] = {
    "rim_probability": {
        "Description": "calibrated probability that the lesion carries a paramagnetic rim "
        "(classifier on the susceptibility patch, mean logit over 8 flips); n/a: not assessed"
    },
    "rim_call": {
        "Description": "paramagnetic rim lesion call at the classifier's balanced operating "
        "point (see RimOperatingPoints in this sidecar)",
        "Levels": {"yes": "rim", "no": "no rim", NOT_ASSESSED: "see rim_status"},
    },
    "rim_status": {"Description": f"'{ASSESSED}', or why the lesion was not assessed"},
    "rim_input": {
        "Description": "image the rim was assessed on",
        "Levels": {"qsm": "susceptibility map (ppm)", "phase": "high-pass filtered phase (rad)"},
    },
    "rim_fov_fraction": {
        "Description": "fraction of the lesion's FLAIR voxels inside the GRE's valid field of view"
    },
    **{
        f"{region}_{unit}": {
            "Description": f"{what} of the lesion's {text}, paramagnetic positive",
            "Units": units,
        }
        for unit, (what, units) in _MEASURE_UNITS.items()
        for region, text in (
            ("rim", "rim band (peak of its radial profile)"),
            ("core", "core (mean)"),
            ("shell", "perilesional white-matter shell (mean)"),
            ("shell_spread", "perilesional shell (robust SD)"),
        )
    },
    "rim_coverage": {
        "Description": "fraction of the lesion edge's 3D sectors whose χ stands above the "
        "surrounding white matter (rule-based)"
    },
    "rim_slices": {
        "Description": "longest run of consecutive axial GRE slices with a rim around at least "
        "2/3 of the edge"
    },
    "rim_consensus": {
        "Description": "raters' consensus criterion: a rim around at least 2/3 of the edge on at "
        "least 2 consecutive slices"
    },
    "rim_rule_call": {
        "Description": "rule-based rim call: the consensus criterion and coverage >= 0.6"
    },
    "central_vein": {"Description": "central-vein sign (a paramagnetic line through the lesion)"},
    "central_vein_fraction": {
        "Description": "fraction of bright samples along the best line through the lesion core"
    },
    "rim_slice": {
        "Description": "index (0-based) of the GRE slice, along its axial voxel axis, through "
        "the lesion's largest section, where rim_sectors were measured"
    },
    "rim_sectors": {
        "Description": "one character per 30-degree in-plane sector of that slice, from angle "
        "-180 degrees of atan2(second axis, first axis): 1 rim, 0 no rim, - no edge voxel"
    },
}

#: The lesion-table columns of the lesion's tissue beyond the rim.
TISSUE_COLUMNS: dict[str, dict[str, Any]] = {
    "t1w_ratio": {
        "Description": "median T1w intensity of the lesion over that of nearby normal-appearing "
        "white matter"
    },
    "t1_black_hole": {
        "Description": "T1 black hole: T1w ratio at or below halfway from white to grey matter"
    },
    "qt1_ms": {
        "Description": "median quantitative T1 of the lesion from the MP2RAGE signal equation "
        "(lookup table of UNIT1 against T1)",
        "Units": "ms",
    },
}


@dataclass
class GreLesions:
    """A session's lesions on its GRE grid, with what their patches and measures read.

    Attributes:
        affine: the GRE grid's voxel-to-world matrix.
        magnitude: the GRE magnitude (echo 1).
        valid: where the susceptibility is defined (the QSM mask), boolean.
        wm: white-matter probability on the GRE grid (``None``: any tissue).
        labels: lesion instances on the GRE grid (0 outside lesions).
        flair: the session's FLAIR (the patch's FLAIR channel).
        flair_to_gre: maps FLAIR points to GRE points.
    """

    affine: np.ndarray
    magnitude: np.ndarray
    valid: np.ndarray
    wm: np.ndarray | None
    labels: np.ndarray
    flair: nib.Nifti1Image
    flair_to_gre: AffineTransform

    def __post_init__(self) -> None:
        # every lesion's patch reads a crop of the FLAIR: hold it in memory, not in a .gz file
        if not isinstance(self.flair.dataobj, np.ndarray):
            data = np.asarray(self.flair.dataobj, np.float32)
            self.flair = nib.Nifti1Image(data, self.flair.affine)
        self._boxes = ndi.find_objects(np.asarray(self.labels).astype(np.int64, copy=False))

    def present(self) -> list[int]:
        """Return the ids of the lesions with at least one voxel on the GRE grid."""
        return [i for i, box in enumerate(self._boxes, start=1) if box is not None]

    def _crop(self, lesion: int) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """Return the crop of the grid around ``lesion`` that its patch and measures read, and
        the crop's voxel-to-world matrix; ``None`` without a voxel of the lesion.

        The crop holds the lesion's cube (:func:`~smoulder.rims.patches.lesion_box`: half its
        longest extent plus the margin, around its centre), the perilesional shell, and two
        voxels for the interpolation, so results equal those on the whole grid.
        """
        from smoulder.grids import voxel_sizes
        from smoulder.rims.patches import MIN_MARGIN_MM
        from smoulder.rims.rules import SHELL_MM

        box = self._boxes[lesion - 1] if 0 < lesion <= len(self._boxes) else None
        if box is None:
            return None
        voxel = voxel_sizes(self.affine)
        extent_mm = np.array([s.stop - s.start for s in box]) * voxel
        reach_mm = max(extent_mm.max() / 2 + MIN_MARGIN_MM, SHELL_MM[1] + 1.0)
        pad = np.ceil(reach_mm / voxel).astype(int) + 2
        crop = tuple(
            slice(max(s.start - int(p), 0), min(s.stop + int(p), n))
            for s, p, n in zip(box, pad, self.labels.shape, strict=True)
        )
        affine = self.affine.copy()
        affine[:3, 3] = self.affine[:3, :3] @ np.array([s.start for s in crop]) + affine[:3, 3]
        return crop, affine

    def _inputs(self, lesion: int, data: np.ndarray) -> dict[str, Any] | None:
        """Return the lesion's arrays on its crop (``None`` without a voxel of the lesion)."""
        found = self._crop(lesion)
        if found is None:
            return None
        crop, affine = found
        labels = self.labels[crop]
        return {
            "data": np.asarray(data[crop]),
            "mask": (labels == lesion).astype(np.float32),
            "others": (labels > 0) & (labels != lesion),
            "affine": affine,
            "magnitude": self.magnitude[crop],
            "valid": self.valid[crop],
            "wm": None if self.wm is None else self.wm[crop],
            "offset": np.array([s.start for s in crop]),
        }

    def assess(
        self, lesion: int, data: np.ndarray, kind: InputKind
    ) -> tuple[np.ndarray, RimMeasures] | None:
        """Return the lesion's classifier patch and rule-based measures from ``data`` (χ or
        phase), its regions computed once; ``None`` without a voxel on the GRE grid."""
        from smoulder.rims.patches import extract_patch, lesion_box, susceptibility_scale
        from smoulder.rims.rules import lesion_regions, measure_rim

        c = self._inputs(lesion, data)
        if c is None:
            return None
        common = {"wm": c["wm"], "other_lesions": c["others"], "valid": c["valid"]}
        regions = lesion_regions(c["mask"], c["affine"], **common)
        args = (c["data"], c["mask"], c["affine"])
        scale = susceptibility_scale(*args, input_kind=kind, regions=regions, **common)
        patch = extract_patch(
            lesion_box(c["mask"], c["affine"]),
            susceptibility=c["data"],
            magnitude=c["magnitude"],
            lesion_mask=c["mask"],
            gre_affine=c["affine"],
            flair=self.flair,
            flair_to_gre=self.flair_to_gre,
            scale=scale,
            brain_mask=c["valid"],
        )
        m = measure_rim(*args, input_kind=kind, regions=regions, **common)
        if m.sector_slice >= 0:
            shift = int(c["offset"][axial_axis(self.affine)])
            m = replace(m, sector_slice=m.sector_slice + shift)
        return patch, m

    def patch(self, lesion: int, data: np.ndarray, kind: InputKind) -> np.ndarray | None:
        """Return the lesion's classifier patch (:meth:`assess`), ``None`` without a voxel."""
        found = self.assess(lesion, data, kind)
        return None if found is None else found[0]

    def measure(self, lesion: int, data: np.ndarray, kind: InputKind) -> RimMeasures:
        """Return the lesion's rule-based measures (:meth:`assess`).

        Raises:
            InputError: the lesion has no voxel on the GRE grid.
        """
        from smoulder.errors import InputError

        found = self.assess(lesion, data, kind)
        if found is None:
            raise InputError(f"lesion {lesion}", expected="a voxel on the GRE grid", found="none")
        return found[1]


@dataclass(frozen=True)
class Susceptibility:
    """The image rims are assessed on, on the GRE grid, paramagnetic positive.

    Attributes:
        data: χ (ppm) or filtered phase (rad), sign-corrected.
        kind: ``"qsm"`` or ``"phase"``.
        convention: the sentence saying which sign convention was used and why.
        b0_tesla: the acquisition's field (``MagneticFieldStrength``; ``None``: not stated),
            which picks the classifier's calibration stratum.
    """

    data: np.ndarray
    kind: Literal["qsm", "phase"]
    convention: str
    b0_tesla: float | None = None


def paramagnetic_positive(
    data: np.ndarray,
    kind: Literal["qsm", "phase"],
    *,
    magnitude: np.ndarray,
    valid: np.ndarray,
    affine: np.ndarray,
    sidecar: Mapping[str, object] | None = None,
    sidecar_path: str = "sidecar",
    b0_tesla: float | None = None,
) -> Susceptibility:
    """Return ``data`` in the paramagnetic-positive convention, the sign decided as the module
    docstring says (sidecar, checked on the veins of the data)."""
    from smoulder.grids import voxel_sizes
    from smoulder.qsm.core import b0_in_voxels
    from smoulder.rims.sign import (
        apply_sign,
        check_paramagnetic_sign,
        phase_sign_from_sidecar,
        resolve_sign,
    )

    stated = phase_sign_from_sidecar(sidecar or {}, path=sidecar_path)
    try:
        check = check_paramagnetic_sign(
            data,
            magnitude,
            valid,
            voxel_sizes(affine).tolist(),
            kind=kind,
            b0_dir=b0_in_voxels(affine).tolist(),
        )
    except ValueError:  # an empty or tiny mask: nothing to check on
        check = None
    sign, convention = resolve_sign(stated, check)
    return Susceptibility(apply_sign(data, sign), kind, convention, b0_tesla)


@dataclass
class RimSummary:
    """A session's rim summary: the sidecar fields of its lesion table."""

    prl_count: int | None = None
    assessed: int = 0
    input_kind: str | None = None
    convention: str | None = None
    model: str | None = None
    operating_points: dict[str, float] = field(default_factory=dict)
    b0_tesla: float | None = None
    calibration: str | None = None

    def sidecar(self) -> dict[str, Any]:
        """Return the fields for the lesion table's JSON sidecar."""
        return {
            "PRLCount": self.prl_count,
            "LesionsAssessedForRims": self.assessed,
            "RimInput": self.input_kind,
            "SignConvention": self.convention,
            "RimModel": self.model,
            "RimOperatingPoints": self.operating_points,
            "MagneticFieldStrength": self.b0_tesla,
            "RimCalibration": self.calibration,
        }


@dataclass
class RimAssessment:
    """A session's rim assessment: each lesion's columns, the summary, and what was classified.

    Attributes:
        rows: the rim columns of every lesion, by lesion id.
        summary: the session's summary (the lesion table's sidecar fields).
        lesion_ids: the assessed lesions, in the order of ``patches`` and ``features``.
        patches: their classifier patches, ``(N, 4, 24, 24, 24)`` float32.
        features: their rule-based measures, ``(N, len(FEATURES))`` float32.
    """

    rows: dict[int, dict[str, Any]]
    summary: RimSummary
    lesion_ids: list[int] = field(default_factory=list)
    patches: np.ndarray | None = None
    features: np.ndarray | None = None


def not_assessed(reason: str, fov_fraction: float | None = None) -> dict[str, Any]:
    """Return the rim columns of a lesion that is not assessed (every measure ``None``)."""
    row: dict[str, Any] = dict.fromkeys(RIM_COLUMNS)
    row.update(rim_call=NOT_ASSESSED, rim_status=reason, rim_fov_fraction=fov_fraction)
    return row


def assess_rims(
    instances: nib.Nifti1Image,
    lesions: GreLesions | None,
    source: Susceptibility | None,
    bundle: RimBundle | None,
    *,
    device: str = "cpu",
    unassessed: str = NO_SUSCEPTIBILITY,
) -> RimAssessment:
    """Return each lesion's rim columns (by lesion id), the session's summary, and the patches
    and measures that were classified.

    Args:
        instances: lesion instances on the FLAIR grid (every id gets a row).
        lesions: the session's lesions on its GRE grid; ``None``: no susceptibility data.
        source: the susceptibility image (paramagnetic positive); ``None`` likewise.
        bundle: the rim classifier (:func:`smoulder.rims.network.load_bundle`); ``None``: the
            rule-based measures only (``rim_probability`` n/a, the call from the rules).
        device: where the classifier runs.
        unassessed: the reason given for every lesion when ``lesions`` or ``source`` is None.
    """
    ids = sorted(int(i) for i in np.unique(np.asarray(instances.dataobj)) if i > 0)
    if lesions is None or source is None:
        return RimAssessment({i: not_assessed(unassessed) for i in ids}, RimSummary())
    rows: dict[int, dict[str, Any]] = {}
    patches: list[np.ndarray] = []
    features: list[np.ndarray] = []
    on_grid = set(lesions.present())
    gre = nib.Nifti1Image(np.zeros(lesions.labels.shape, np.uint8), lesions.affine)
    for lid in ids:
        fraction = field_of_view_fraction(
            instances, gre, lesions.flair_to_gre, label=lid, valid=lesions.valid
        )
        if fraction < MIN_FOV_FRACTION:
            reason = f"outside the GRE field of view ({100 * fraction:.0f} % inside)"
            rows[lid] = not_assessed(reason, round(fraction, 3))
            continue
        found = lesions.assess(lid, source.data, source.kind) if lid in on_grid else None
        if found is None:
            rows[lid] = not_assessed("too small on the GRE grid", round(fraction, 3))
            continue
        patch, measures = found
        patches.append(patch)
        features.append(measures.features())
        rows[lid] = {
            **not_assessed(ASSESSED, round(fraction, 3)),
            **measures.row(),
            "rim_input": source.kind,
        }
    summary = RimSummary(
        assessed=len(patches),
        input_kind=source.kind,
        convention=source.convention,
        b0_tesla=source.b0_tesla,
    )
    _classify(rows, (patches, features), bundle, summary, device)
    assessed = [lid for lid, r in rows.items() if r["rim_status"] == ASSESSED]
    return RimAssessment(
        rows,
        summary,
        assessed,
        np.stack(patches) if patches else None,
        np.stack(features) if features else None,
    )


def _classify(
    rows: dict[int, dict[str, Any]],
    inputs: tuple[list[np.ndarray], list[np.ndarray]],
    bundle: RimBundle | None,
    summary: RimSummary,
    device: str,
) -> None:
    """Fill the probability and call of the assessed rows (in place) and the PRL count;
    ``inputs`` holds the assessed lesions' patches and rule-based measures, in row order."""
    assessed = [lid for lid, r in rows.items() if r["rim_status"] == ASSESSED]
    if bundle is None:
        for lid in assessed:
            rows[lid]["rim_call"] = "yes" if rows[lid]["rim_rule_call"] else "no"
    elif assessed:
        from smoulder.rims.network import predict

        patches, features = inputs
        prob = predict(
            bundle,
            np.stack(patches),
            device,
            features=np.stack(features),
            input_kind=summary.input_kind,
            b0_tesla=summary.b0_tesla,
        )
        threshold = bundle.operating_points["balanced"]
        for lid, p in zip(assessed, prob.tolist(), strict=True):
            rows[lid]["rim_probability"] = round(float(p), 4)
            rows[lid]["rim_call"] = "yes" if p >= threshold else "no"
    if bundle is not None:
        summary.model = f"{bundle.path.name} {bundle.version}"
        summary.operating_points = dict(bundle.operating_points)
        stratum = bundle.calibration.stratum_of(summary.input_kind, summary.b0_tesla)
        summary.calibration = f"{bundle.calibration.map_of(stratum).method}, " + (
            f"stratum {stratum}" if stratum else "pooled over acquisitions"
        )
    summary.prl_count = sum(rows[lid]["rim_call"] == "yes" for lid in assessed)


def lesions_on_gre(
    instances: nib.Nifti1Image,
    flair: nib.Nifti1Image,
    gre: nib.Nifti1Image,
    flair_to_gre: AffineTransform,
    *,
    magnitude: np.ndarray,
    valid: np.ndarray,
    wm_flair: nib.Nifti1Image | None = None,
) -> GreLesions:
    """Return a session's :class:`GreLesions`: instances and white matter mapped onto the GRE
    grid through the inverse of the co-registration (labels kept; white matter linear)."""
    from smoulder.registration.transforms import resample

    wm = None
    if wm_flair is not None:
        wm = np.asarray(resample(wm_flair, gre, flair_to_gre.inverse()).dataobj, np.float32)
    return GreLesions(
        affine=gre.affine,
        magnitude=magnitude,
        valid=np.asarray(valid, bool),
        wm=wm,
        labels=lesion_labels_in_gre(instances, gre, flair_to_gre),
        flair=flair,
        flair_to_gre=flair_to_gre,
    )


def lesion_tissue(
    instances: nib.Nifti1Image,
    *,
    t1w: nib.Nifti1Image | None = None,
    wm: nib.Nifti1Image | None = None,
    gm: nib.Nifti1Image | None = None,
    unit1: nib.Nifti1Image | None = None,
    mp2rage: tuple[Path, Path] | None = None,
) -> dict[int, dict[str, Any]]:
    """Return each lesion's tissue columns (:data:`TISSUE_COLUMNS`), ``None`` where not measured.

    Args:
        instances: lesion instances on the FLAIR grid.
        t1w: a T1-weighted image on the same grid (T1w, else UNIT1); ``None``: n/a.
        wm: white-matter probability on the same grid (normal-appearing WM: ≥ 0.5).
        gm: cortical grey-matter probability on the same grid (sets the black-hole threshold).
        unit1: the MP2RAGE UNIT1 on the same grid, for quantitative T1.
        mp2rage: the INV1 and INV2 images, whose JSON sidecars hold the sequence parameters
            (:func:`smoulder.rims.tissue.mp2rage_parameters`); ``None``: ``qt1_ms`` is n/a.
    """
    from smoulder.grids import voxel_sizes
    from smoulder.inputs import read_sidecar, sidecar_path
    from smoulder.rims.tissue import lesion_qt1_ms, mp2rage_parameters, t1_black_holes, t1_map_ms

    ids = np.asarray(instances.dataobj).astype(np.int64)
    rows = {int(i): dict.fromkeys(TISSUE_COLUMNS) for i in np.unique(ids) if i > 0}
    if t1w is not None and wm is not None and rows:
        holes = t1_black_holes(
            np.asarray(t1w.dataobj),
            ids,
            np.asarray(wm.dataobj) >= 0.5,
            voxel_mm=voxel_sizes(instances.affine).tolist(),
            gm_mask=None if gm is None else np.asarray(gm.dataobj) >= 0.5,
        )
        for lid, hole in holes.items():
            rows[lid].update(t1w_ratio=round(float(hole["t1w_ratio"]), 3),
                             t1_black_hole=bool(hole["t1_black_hole"]))  # fmt: skip
    if unit1 is not None and mp2rage is not None and rows:
        inv1, inv2 = mp2rage
        params = mp2rage_parameters(
            read_sidecar(inv1),
            read_sidecar(inv2),
            inv1_path=sidecar_path(Path(inv1)),
            inv2_path=sidecar_path(Path(inv2)),
        )
        t1_map = t1_map_ms(np.asarray(unit1.dataobj), params)
        for lid, value in lesion_qt1_ms(t1_map, ids).items():
            rows[lid]["qt1_ms"] = None if np.isnan(value) else round(value, 1)
    return rows


@dataclass(frozen=True)
class GreInputs:
    """A session's GRE files for the rim step (paths; all on the GRE's own grid).

    Attributes:
        magnitudes: every echo's magnitude (echo 1 is the patch's magnitude channel).
        phases: every echo's phase (for the filtered-phase input); empty when absent.
        chimap: a susceptibility map (ppm): the user's ``_Chimap`` or the pipeline's QSM.
        chimap_sidecar: the file whose sidecar states the map's sign convention (the Chimap
            itself, or the phase the QSM was reconstructed from).
        qsm_mask: where the QSM is defined; ``None``: the brain mask mapped onto the grid.
    """

    magnitudes: tuple[Path, ...] = ()
    phases: tuple[Path, ...] = ()
    chimap: Path | None = None
    chimap_sidecar: Path | None = None
    qsm_mask: Path | None = None


def choose_input(files: GreInputs, preference: str) -> Literal["qsm", "phase"] | None:
    """Return the image the rims are assessed on (``preference``: auto, qsm or phase).

    Examples:
        >>> m, p = (Path("m.nii"),), (Path("p.nii"),)
        >>> choose_input(GreInputs(m, p, Path("chi.nii")), "auto"), choose_input(
        ...     GreInputs(m, p), "auto"), choose_input(GreInputs(m, p, Path("chi.nii")), "phase")
        ('qsm', 'phase', 'phase')
        >>> choose_input(GreInputs(), "auto") is None
        True
    """
    has_qsm = files.chimap is not None
    has_phase = bool(files.magnitudes) and bool(files.phases)
    if preference == "phase":
        return "phase" if has_phase else ("qsm" if has_qsm else None)
    return "qsm" if has_qsm else ("phase" if has_phase else None)


def load_gre_session(
    files: GreInputs,
    preference: str,
    *,
    instances: nib.Nifti1Image,
    flair: nib.Nifti1Image,
    brain_mask: nib.Nifti1Image,
    flair_to_gre: AffineTransform,
    wm_flair: nib.Nifti1Image | None = None,
) -> tuple[GreLesions, Susceptibility] | None:
    """Return the session's lesions on the GRE grid and the image to assess, or ``None``
    when the session has no susceptibility data."""
    from smoulder.grids import resample_to_grid
    from smoulder.inputs import read_sidecar, sidecar_path
    from smoulder.qsm.masks import session_masks
    from smoulder.qsm.reconstruct import filtered_phase, load_echoes

    kind = choose_input(files, preference)
    if kind is None:
        return None
    if kind == "phase":
        echoes = load_echoes(list(files.magnitudes), list(files.phases))
        grid = nib.load(files.magnitudes[0])
        valid, _ = session_masks(echoes.magnitude, grid, brain_mask, flair_to_gre)
        data, magnitude = filtered_phase(echoes), echoes.magnitude[0]
        stated_in = files.phases[-1]
    else:
        assert files.chimap is not None
        grid = nib.load(files.chimap)
        data = np.asarray(grid.dataobj, np.float32)
        magnitude = np.ones(grid.shape[:3], np.float32)
        if files.magnitudes:  # the echo-1 magnitude, in the map's grid (same scanner space)
            mag = nib.load(files.magnitudes[0])
            magnitude = resample_to_grid(
                np.asarray(mag.dataobj, np.float32), mag.affine, grid.shape[:3], grid.affine
            )
        valid = _valid_mask(files.qsm_mask, data, grid, brain_mask, flair_to_gre)
        stated_in = files.chimap_sidecar or files.chimap
    source = paramagnetic_positive(
        data,
        kind,
        magnitude=magnitude,
        valid=valid,
        affine=grid.affine,
        sidecar=read_sidecar(stated_in),
        sidecar_path=str(sidecar_path(Path(stated_in))),
        b0_tesla=field_strength([stated_in, *files.magnitudes, *files.phases]),
    )
    lesions = lesions_on_gre(
        instances, flair, grid, flair_to_gre, magnitude=magnitude, valid=valid, wm_flair=wm_flair
    )
    return lesions, source


def field_strength(images: Sequence[Path]) -> float | None:
    """Return the first ``MagneticFieldStrength`` (tesla, in (0, 20]) stated in the sidecars
    of ``images``, or ``None`` when none states one."""
    from smoulder.inputs import read_sidecar

    for image in images:
        value = read_sidecar(image).get("MagneticFieldStrength")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 20:
            return float(value)
    return None


def _valid_mask(
    qsm_mask: Path | None,
    chi: np.ndarray,
    grid: nib.Nifti1Image,
    brain_mask: nib.Nifti1Image,
    flair_to_gre: AffineTransform,
) -> np.ndarray:
    """Return where a susceptibility map is defined: its QSM mask, else the brain mask mapped
    onto its grid, in both cases where the map is finite and not exactly 0."""
    from smoulder.registration.transforms import resample

    if qsm_mask is not None:
        valid = np.asarray(nib.load(qsm_mask).dataobj) > 0
    else:
        moved = resample(brain_mask, grid, flair_to_gre.inverse(), interpolation="linear")
        valid = np.asarray(moved.dataobj) >= 0.5
    return valid & np.isfinite(chi) & (chi != 0)


def merge_lesion_rows(
    rows: list[dict[str, Any]], *extra: Mapping[int, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Return the lesion table's rows with each lesion's ``extra`` columns added (by ``index``).

    Examples:
        >>> merge_lesion_rows([{"index": "2", "volume_ul": "30"}], {2: {"rim_call": "no"}})
        [{'index': '2', 'volume_ul': '30', 'rim_call': 'no'}]
    """
    return [{**row, **{k: v for e in extra for k, v in e.get(int(row["index"]), {}).items()}}
            for row in rows]  # fmt: skip


def patch_shard(result: RimAssessment, kind: str, subject: str, session: str) -> PatchSet:
    """Return the classified lesions as a rim shard (labels 0: unknown until rated), which
    ``smoulder train rims --ratings`` reads beside a site's ratings."""
    from smoulder.rims.patches import CHANNELS, PATCH_SHAPE
    from smoulder.rims.rules import FEATURES
    from smoulder.rims.train import PatchSet

    n = len(result.lesion_ids)
    empty = np.zeros((0, len(CHANNELS), *PATCH_SHAPE), np.float32)
    return PatchSet(
        patches=result.patches if result.patches is not None else empty,
        labels=np.zeros(n, np.uint8),
        input_kind=np.array([kind] * n, "<U5"),
        lesion_id=np.array(result.lesion_ids, np.int32),
        subject=np.array([subject] * n, "<U64"),
        session=np.array([session] * n, "<U64"),
        features=result.features
        if result.features is not None
        else np.zeros((0, len(FEATURES)), np.float32),
    )
