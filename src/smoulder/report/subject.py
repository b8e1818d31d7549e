"""One subject's report, ``sub-<label>.html``, built from the derivatives alone.

What it reads (all written by ``smoulder BIDS OUT participant``): the per-session anat
derivatives (preprocessed FLAIR, the other modalities on the FLAIR grid, class map, lesion
instances and their table), the session-to-session transforms, the subject's inputs table, the
latest provenance record and the raw dataset's ``sessions.tsv`` (linked from
``dataset_description.json``) for the session dates. Nothing is recomputed but pictures; the
numbers come from the marker modules (:mod:`smoulder.atrophy` for volumes and rates,
:mod:`smoulder.longitudinal` for intervals and lesions across sessions), so ``smoulder report
OUT`` rebuilds it at any time.

Lesions are the subject's tracked lesions when the run wrote the longitudinal tables (two or
more sessions, :mod:`smoulder.report.longitudinal`): one card per persistent lesion ID with its
fate, volume, expansion, SEL and rim numbers per session as the table gives them, and crops of
every session on the within-subject grid; the summary shows the activity per interval.
Without the tables (one session, or a run from before the longitudinal step) they are the
reference (first) session's lesions, their volume in a later session the volume of that
session's lesions mapped onto the reference grid through the longitudinal transform, inside
the reference lesion (0 µl: gone or not yet matched).

Paramagnetic rim lesions (PRL) come from the rim step's columns of the lesion table and its
sidecar (:class:`RimEvidence`, :func:`prl_count`); a table without them was written by a run
without that step, and its lesions show "not measured". The rim crop is a slice of the
susceptibility image the classifier read, on the GRE's own grid (never resampled): the lesion
instances are brought to it through the inverse of the GRE's co-registration onto the FLAIR
(:func:`smoulder.rims.patches.lesion_labels_in_gre`), and the table's ``rim_sectors`` are drawn
as arcs around the lesion in the same voxel axes they were measured in.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import nibabel as nib
import numpy as np

from smoulder import __version__
from smoulder.atrophy.volumes import tissue_volumes_ml
from smoulder.derivatives import bids_name, is_bids_label
from smoulder.images import read_tsv, save_text
from smoulder.longitudinal.intervals import session_dates, years_since_first
from smoulder.longitudinal.matching import lesion_volumes_ul, map_instances
from smoulder.report import atrophy as atrophy_report
from smoulder.report import longitudinal as tracked
from smoulder.report import render
from smoulder.report.render import CROP_HALF_MM, CROP_PX
from smoulder.report.review import read_review, review_path
from smoulder.segmentation.classes import LESION, class_indices

if TYPE_CHECKING:
    from smoulder.registration.transforms import AffineTransform

#: QSM window (ppm), stated on every card.
QSM_WINDOW_PPM = 0.15
#: Rows of the atrophy table: (name shown, tissue of :data:`smoulder.segmentation.classes.
#: TISSUES` measured). The report's "WM" counts the lesions as white matter, as atrophy does.
VOLUME_ROWS = (
    ("brain", "brain"),
    ("GM", "GM"),
    ("WM", "WM_lesions_filled"),
    ("lesion", "lesion"),
)
#: Entities of the session's preprocessed images on the FLAIR grid.
ON_FLAIR: dict[str, str | int] = {"space": "FLAIR", "desc": "preproc"}
#: Entities of the GRE's first-echo magnitude on the FLAIR grid.
GRE_ON_FLAIR: dict[str, str | int] = {"echo": 1, "part": "mag", **ON_FLAIR}
#: Entities of the lesion table (``_stats.tsv``), in the order looked for: the name the
#: segmentation publishes, then the rim step's ``space-FLAIR`` name.
LESION_TABLE: tuple[dict[str, str | int], ...] = (
    {"desc": "lesions"},
    {"space": "FLAIR", "desc": "lesions"},
)
#: The susceptibility image the rim classifier read, on the GRE's own grid, by ``rim_input``:
#: (entities, suffix, name shown, unit). Sign-corrected: paramagnetic positive.
RIM_IMAGES: dict[str, tuple[dict[str, str | int], str, str, str]] = {
    "qsm": ({"desc": "rims"}, "Chimap", "QSM", "ppm"),
    "phase": ({"part": "phase", "desc": "rims"}, "MEGRE", "phase", "rad"),
}
#: Entities of the GRE's co-registration onto the FLAIR (maps FLAIR points to GRE points).
GRE_TO_FLAIR: dict[str, str | int] = {"from": "MEGRE", "to": "FLAIR", "mode": "image"}
#: Half-width of the filtered-phase window, in robust SDs of the slice.
PHASE_WINDOW_SPREADS = 3.0
#: Rim calls (``rim_call``) of an assessed lesion.
RIM_CALLS = ("yes", "no")
#: Colour of the dotted arcs of the sectors without a rim.
DIM_CYAN = (0, 120, 140)
#: Distance (mm) of the sector arcs beyond the lesion's farthest voxel centre: rims lie on the
#: lesion's edge, so the arcs leave them visible between contour and arc.
SECTOR_ARC_GAP_MM = 1.5


@dataclass
class SessionData:
    """What the report uses of one session."""

    label: str
    anat: Path
    entities: dict[str, str]
    when: datetime | None = None
    volumes_ml: dict[str, float] = field(default_factory=dict)
    lesions: list[dict[str, str]] = field(default_factory=list)
    #: The lesion table's JSON sidecar (column dictionary, PRL counts, rim model).
    lesion_meta: dict[str, Any] = field(default_factory=dict)

    def path(
        self,
        suffix: str,
        entities: Mapping[str, str | int] | None = None,
        extension: str = ".nii.gz",
    ) -> Path:
        """Return the path of the session's derivative with ``entities`` and ``suffix``."""
        name = bids_name({**self.entities, **(entities or {})}, suffix=suffix, extension=extension)
        return self.anat / name

    def file(
        self,
        suffix: str,
        entities: Mapping[str, str | int] | None = None,
        extension: str = ".nii.gz",
    ) -> Path | None:
        """Return the session's derivative (see :meth:`path`) if it exists, else None."""
        path = self.path(suffix, entities, extension)
        return path if path.exists() else None


def _nii(path: Path) -> nib.Nifti1Image:
    """Return the NIfTI image at ``path`` (typed for mypy; nibabel returns a generic image)."""
    return cast(nib.Nifti1Image, nib.load(path))


def _subject_entities(subject: str) -> dict[str, str]:
    """Return the BIDS entities of the subject folder ``sub-<label>``."""
    return {"sub": subject.removeprefix("sub-")}


def _session_dates(root: Path, subject: str) -> dict[str, datetime]:
    """Return ``{session: acquisition time}`` from the raw dataset's ``sessions.tsv``."""
    desc = root / "dataset_description.json"
    raw = None
    if desc.exists():
        links = json.loads(desc.read_text()).get("DatasetLinks", {})
        raw = links.get("raw")
    if not raw:
        return {}
    raw_path = Path(str(raw).removeprefix("file://"))
    name = bids_name(_subject_entities(subject), suffix="sessions", extension=".tsv")
    table = raw_path / subject / name
    if not table.exists():
        return {}
    return session_dates(read_tsv(table))


def _volumes_ml(ses: SessionData, dseg_path: Path) -> dict[str, float]:
    """Return the session's tissue volumes (ml), keyed by tissue, from its class map."""
    img = _nii(dseg_path)
    rows = read_tsv(ses.path("dseg", extension=".tsv"))
    names = {r["name"]: int(r["index"]) for r in rows}
    tissues = [tissue for _, tissue in VOLUME_ROWS]
    return tissue_volumes_ml(np.asarray(img.dataobj), img.affine, names, tissues)


def collect_sessions(root: Path, subject: str) -> list[SessionData]:
    """Return the subject's sessions that have segmentation outputs, in session order."""
    dates = _session_dates(root, subject)
    sessions = []
    for ses_dir in sorted((root / subject).glob("ses-*")):
        label = ses_dir.name.removeprefix("ses-")
        if not is_bids_label(label):
            continue  # not a folder the derivatives writer makes
        entities = {**_subject_entities(subject), "ses": label}
        ses = SessionData(ses_dir.name, ses_dir / "anat", entities, dates.get(ses_dir.name))
        dseg = ses.file("dseg")
        if dseg is None:
            continue
        ses.volumes_ml = _volumes_ml(ses, dseg)
        stats = lesion_table(ses)
        ses.lesions = read_tsv(stats) if stats else []
        side = stats.with_suffix(".json") if stats else None
        ses.lesion_meta = json.loads(side.read_text()) if side and side.exists() else {}
        sessions.append(ses)
    return sessions


def lesion_table(ses: SessionData) -> Path | None:
    """Return the session's lesion table (see :data:`LESION_TABLE`), None without one."""
    for entities in LESION_TABLE:
        path = ses.file("stats", entities, ".tsv")
        if path is not None:
            return path
    return None


def session_years(sessions: list[SessionData]) -> list[float | None]:
    """Return each session's time after the first, in years (None without dates)."""
    return years_since_first([s.when for s in sessions])


def _longitudinal_xfm(ref: SessionData, later: SessionData) -> Path | None:
    """Return ``later``'s transform from the reference grid to its own, if it exists."""
    entities = {
        "from": later.label.replace("-", ""),
        "to": ref.label.replace("-", ""),
        "mode": "image",
    }
    return later.file("xfm", entities)


def lesion_volumes_by_session(sessions: list[SessionData]) -> dict[int, list[float | None]]:
    """Return ``{reference lesion id: [volume µl per session]}`` (None: session not mapped)."""
    from smoulder.registration.transforms import load_transform

    ref = sessions[0]
    ref_path = ref.file("dseg", {"desc": "lesions"})
    if ref_path is None:
        return {}
    ref_img = _nii(ref_path)

    def mapped(later: SessionData) -> np.ndarray | None:
        xfm = _longitudinal_xfm(ref, later)
        inst = later.file("dseg", {"desc": "lesions"})
        if xfm is None or inst is None:
            return None
        return map_instances(_nii(inst), ref_img, load_transform(xfm))

    later_instances = (mapped(later) for later in sessions[1:])
    return lesion_volumes_ul(np.asarray(ref_img.dataobj), ref_img.affine, later_instances)


# ---------------------------------------------------------------------------------- rim results


@dataclass(frozen=True)
class RimEvidence:
    """One lesion's paramagnetic-rim results, as its row of the lesion table states them.

    ``call`` is ``""`` when the table has no ``rim_call`` column (a run without the rim step:
    not measured), else ``yes`` or ``no`` (at the model's balanced operating point) or ``not
    assessed``, the reason in ``status``. Values the row lacks (``n/a``) are None.
    """

    call: str = ""
    status: str = ""
    probability: float | None = None
    input_kind: str | None = None
    coverage: float | None = None
    consensus: bool | None = None
    rule_call: bool | None = None
    central_vein: bool | None = None
    rim_core_shell: tuple[float | None, float | None, float | None] = (None, None, None)
    slice_k: int | None = None
    sectors: str | None = None
    t1_black_hole: bool | None = None
    t1w_ratio: float | None = None
    qt1_ms: float | None = None

    @property
    def assessed(self) -> bool:
        """Return whether the lesion was assessed for a rim (called ``yes`` or ``no``)."""
        return self.call in RIM_CALLS


def _cell(row: Mapping[str, str], column: str) -> str | None:
    """Return the row's ``column`` stripped (None when absent, empty or ``n/a``)."""
    value = (row.get(column) or "").strip()
    return None if value.lower() in ("", "n/a", "nan") else value


def _number(row: Mapping[str, str], column: str) -> float | None:
    """Return the row's ``column`` as a finite number (None when missing or not a number)."""
    value = _cell(row, column)
    try:
        number = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _flag(row: Mapping[str, str], column: str) -> bool | None:
    """Return the row's ``column`` as a truth value (``True``/``False``; None otherwise)."""
    value = (_cell(row, column) or "").lower()
    return (
        True if value in ("true", "yes", "1") else False if value in ("false", "no", "0") else None
    )


def rim_evidence(row: Mapping[str, str]) -> RimEvidence:
    """Return the rim results of one lesion-table row (not measured without ``rim_call``).

    Examples:
        >>> rim_evidence({"index": "1"}).call
        ''
        >>> r = rim_evidence({"rim_call": "yes", "rim_probability": "0.87", "rim_input": "qsm",
        ...                   "rim_chi_ppm": "0.03", "rim_slice": "7", "rim_sectors": "1" * 12})
        >>> r.assessed, r.probability, r.rim_core_shell[0], r.slice_k, r.sectors == "1" * 12
        (True, 0.87, 0.03, 7, True)
    """
    if "rim_call" not in row:
        return RimEvidence()
    kind = (_cell(row, "rim_input") or "").lower()
    columns = {"qsm": "chi_ppm", "phase": "phase_rad"}
    suffix = columns.get(kind) or next(
        (c for c in columns.values() if _cell(row, f"rim_{c}") is not None), "chi_ppm"
    )
    sectors = _cell(row, "rim_sectors")
    k = _number(row, "rim_slice")
    return RimEvidence(
        call=(_cell(row, "rim_call") or "not assessed").lower(),
        status=_cell(row, "rim_status") or "",
        probability=_number(row, "rim_probability"),
        input_kind=kind if kind in columns else None,
        coverage=_number(row, "rim_coverage"),
        consensus=_flag(row, "rim_consensus"),
        rule_call=_flag(row, "rim_rule_call"),
        central_vein=_flag(row, "central_vein"),
        rim_core_shell=(
            _number(row, f"rim_{suffix}"),
            _number(row, f"core_{suffix}"),
            _number(row, f"shell_{suffix}"),
        ),
        slice_k=None if k is None else int(k),
        sectors=sectors if sectors and re.fullmatch(r"[01-]+", sectors) else None,
        t1_black_hole=_flag(row, "t1_black_hole"),
        t1w_ratio=_number(row, "t1w_ratio"),
        qt1_ms=_number(row, "qt1_ms"),
    )


def prl_count(ses: SessionData) -> int | None:
    """Return the session's paramagnetic rim lesions (None: no lesion assessed for rims).

    The sidecar's ``PRLCount`` when it has one, else the lesions the table calls ``yes``.
    """
    meta = ses.lesion_meta
    if "LesionsAssessedForRims" in meta and not meta["LesionsAssessedForRims"]:
        return None
    count = meta.get("PRLCount")
    if isinstance(count, int) and not isinstance(count, bool):
        return count
    rims = [rim_evidence(row) for row in ses.lesions]
    if not any(r.assessed for r in rims):
        return None
    return sum(r.call == "yes" for r in rims)


def _rims_measured(ses: SessionData) -> bool:
    """Return whether the session's run had the rim step (rim columns or sidecar keys)."""
    return "PRLCount" in ses.lesion_meta or any("rim_call" in row for row in ses.lesions)


# ------------------------------------------------------------------------------------ pictures


def _load(path: Path | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Return ``(data, affine)`` of the image at ``path`` in RAS+ (None without a path)."""
    return None if path is None else render.canonical(_nii(path))


def _susceptibility(ses: SessionData) -> tuple[Path | None, str, render.Window | None]:
    """Return the susceptibility picture source, its name and fixed window (if any)."""
    chi = ses.file("Chimap", {"space": "FLAIR"})
    if chi is not None:
        w = render.Window(-QSM_WINDOW_PPM, QSM_WINDOW_PPM, f"QSM ±{QSM_WINDOW_PPM:g} ppm")
        return chi, "QSM", w
    mag = ses.file("MEGRE", GRE_ON_FLAIR)
    return mag, "GRE magnitude (echo 1; no QSM yet)", None


def lesion_pictures(
    ses: SessionData, max_lesions: int | None = None, ids: Collection[int] | None = None
) -> dict[int, dict[str, Any]]:
    """Return, per lesion of ``ses`` (those of ``ids`` when given), its crops:
    ``{id: {modality: {gray, contour, window}}}``."""
    inst = _load(ses.file("dseg", {"desc": "lesions"}))
    if inst is None:
        return {}
    labels, affine = inst
    labels = labels.astype(np.int64)
    t1 = ses.file("T1w", ON_FLAIR) or ses.file("UNIT1", ON_FLAIR)
    t1_name = "T1w" if t1 and "T1w" in t1.name else "UNIT1"
    chi_path, chi_name, chi_window = _susceptibility(ses)
    sources = [
        ("FLAIR", ses.file("FLAIR", {"desc": "preproc"}), None),
        (t1_name, t1, None),
        (chi_name, chi_path, chi_window),
    ]
    volumes = {}
    for name, path, window in sources:
        loaded = _load(path)
        if loaded is None:
            continue
        data = loaded[0]
        if data.shape != labels.shape:
            continue
        volumes[name] = (data, window or render.percentile_window(data))
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    half = [max(3, int(round(CROP_HALF_MM / s))) for s in spacing]
    scale = max(1, CROP_PX // (2 * max(half) + 1))
    centres = {i: c for i, c in enumerate(_centres(labels), start=0) if i > 0 and c is not None}
    out: dict[int, dict[str, Any]] = {}
    chosen = [(i, c) for i, c in centres.items() if ids is None or i in ids][:max_lesions]
    for lid, centre in chosen:
        mask_planes = render.planes((labels == lid).astype(np.float32), centre, half)
        other_planes = render.planes(
            ((labels > 0) & (labels != lid)).astype(np.float32), centre, half
        )
        cards: dict[str, Any] = {}
        for name, (data, window) in volumes.items():
            grays = [render.to_gray(p, window) for p in render.planes(data, centre, half)]
            plain = [render.compose(g, []) for g in grays]
            lined = [
                render.compose(
                    g,
                    [
                        (render.contour(o > 0.5), render.YELLOW),
                        (render.contour(m > 0.5), render.RED),
                    ],
                )
                for g, m, o in zip(grays, mask_planes, other_planes, strict=True)
            ]
            cards[name] = {
                "gray": render.png_uri(render.strip(plain), scale),
                "contour": render.png_uri(render.strip(lined), scale),
                "window": f"{window.label}: {window.low:.4g} to {window.high:.4g}",
            }
        out[lid] = cards
    return out


def _centres(labels: np.ndarray) -> list[tuple[int, int, int] | None]:
    """Return the voxel of each label nearest its centroid that belongs to it (index = label)."""
    from scipy import ndimage as ndi

    n = int(labels.max())
    out: list[tuple[int, int, int] | None] = [None] * (n + 1)
    for i, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        idx = np.argwhere(labels[box] == i) + [b.start for b in box]
        mean = idx.mean(0)
        out[i] = tuple(int(v) for v in idx[np.argmin(((idx - mean) ** 2).sum(1))])  # type: ignore[assignment]
    return out


@dataclass(frozen=True)
class RimImage:
    """A session's classified susceptibility image on the GRE grid and its lesions, read once.

    Attributes:
        name: ``QSM`` or ``phase``; unit: ``ppm`` or ``rad``.
        data: the image (3D, the GRE's own voxel axes), paramagnetic positive.
        affine: its voxel-to-world matrix.
        axis: its slice axis, the voxel axis closest to inferior–superior
            (:func:`smoulder.rims.rules.axial_axis`: ``rim_slice`` counts along it, and
            ``rim_sectors`` lie in the plane of the other two, in order).
        lesions: the lesion instances (FLAIR grid) and ``lesions_affine`` their matrix.
        flair_to_gre: the GRE's co-registration onto the FLAIR (FLAIR points → GRE points).
    """

    name: str
    unit: str
    data: np.ndarray
    affine: np.ndarray
    axis: int
    lesions: np.ndarray
    lesions_affine: np.ndarray
    flair_to_gre: AffineTransform

    def plane(self, k: int) -> np.ndarray:
        """Return slice ``k`` (along :attr:`axis`), its axes the two in-plane voxel axes."""
        return np.take(self.data, k, axis=self.axis)

    def in_plane(self, values: np.ndarray) -> np.ndarray:
        """Return the in-plane entries of a per-voxel-axis vector (drops :attr:`axis`)."""
        return np.delete(np.asarray(values, float), self.axis)

    def window(self, k: int) -> render.Window:
        """Return the display window of slice ``k``: fixed for QSM, robust for the phase."""
        if self.name == "QSM":
            return render.Window(-QSM_WINDOW_PPM, QSM_WINDOW_PPM, f"QSM ±{QSM_WINDOW_PPM:g} ppm")
        return render.symmetric_window(self.plane(k), spreads=PHASE_WINDOW_SPREADS, unit=self.unit)


def rim_image(ses: SessionData) -> RimImage | None:
    """Return the session's :class:`RimImage` (None without the image or the lesion map).

    The image of the sidecar's ``RimInput`` is looked for first. Without the co-registration
    file the GRE and the FLAIR share the scanner's space (identity).
    """
    from smoulder.registration.transforms import AffineTransform
    from smoulder.rims.rules import axial_axis

    lesions = ses.file("dseg", {"desc": "lesions"})
    wanted = ses.lesion_meta.get("RimInput")
    for kind in sorted(RIM_IMAGES, key=lambda k: k != wanted):
        entities, suffix, name, unit = RIM_IMAGES[kind]
        path = ses.file(suffix, entities)
        if path is None or lesions is None:
            continue
        img, lesion_img = _nii(path), _nii(lesions)
        data = np.asarray(img.dataobj, np.float32)
        xfm = ses.file("xfm", GRE_TO_FLAIR, ".mat")
        return RimImage(
            name,
            unit,
            data[..., 0] if data.ndim == 4 else data,
            img.affine,
            axial_axis(img.affine),
            np.asarray(lesion_img.dataobj).reshape(lesion_img.shape[:3]),
            lesion_img.affine,
            AffineTransform.load(xfm) if xfm else AffineTransform.identity(),
        )
    return None


def _lesion_centres_gre(src: RimImage, ids: Sequence[int]) -> dict[int, np.ndarray]:
    """Return each lesion's FLAIR centroid in GRE voxel coordinates (lesions with voxels)."""
    from scipy import ndimage as ndi

    if not ids:
        return {}
    with np.errstate(invalid="ignore", divide="ignore"):  # NaN for an id without voxels
        voxels = np.array(ndi.center_of_mass(src.lesions > 0, src.lesions, list(ids)), float)
    world = voxels @ src.lesions_affine[:3, :3].T + src.lesions_affine[:3, 3]
    to_vox = np.linalg.inv(src.affine)
    gre = src.flair_to_gre.apply(np.nan_to_num(world)) @ to_vox[:3, :3].T + to_vox[:3, 3]
    found = np.isfinite(voxels).all(1)
    return {int(i): g for i, g, ok in zip(ids, gre, found, strict=True) if ok}


def _grid_affine(affine: np.ndarray, origin_vox: render.Floats) -> np.ndarray:
    """Return ``affine`` of a grid whose first voxel is voxel ``origin_vox`` of ``affine``."""
    out = np.array(affine, float)
    out[:3, 3] = affine[:3, :3] @ np.asarray(origin_vox, float) + affine[:3, 3]
    return out


def _flair_lesions_near(
    src: RimImage, affine: np.ndarray, shape: tuple[int, ...]
) -> nib.Nifti1Image | None:
    """Return the part of the FLAIR lesion map that a GRE grid (``affine``, ``shape``) reaches
    through the co-registration (None when they do not overlap)."""
    corners = np.array(list(np.ndindex(2, 2, 2)), float) * (np.array(shape) - 1)
    corners = np.vstack([corners - 0.5, corners + 0.5])
    world = src.flair_to_gre.inverse().apply(corners @ affine[:3, :3].T + affine[:3, 3])
    to_vox = np.linalg.inv(src.lesions_affine)
    vox = world @ to_vox[:3, :3].T + to_vox[:3, 3]
    lo = np.maximum(np.floor(vox.min(0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(vox.max(0)).astype(int) + 1, np.array(src.lesions.shape) - 1)
    if np.any(hi < lo):
        return None
    data = src.lesions[tuple(slice(a, b + 1) for a, b in zip(lo, hi, strict=True))]
    return nib.Nifti1Image(np.ascontiguousarray(data), _grid_affine(src.lesions_affine, lo))


def lesion_labels_on_slice(
    src: RimImage, k: int, centre: render.Floats, half: render.Floats
) -> np.ndarray:
    """Return the lesion instances on GRE slice ``k`` within ``centre ± half`` (in-plane voxels).

    Only this crop of the GRE grid, and the part of the FLAIR map it reaches, are resampled
    (:func:`smoulder.rims.patches.lesion_labels_in_gre`): cheap for any number of lesions.
    """
    from smoulder.errors import RegistrationError
    from smoulder.rims.patches import lesion_labels_in_gre

    size = [2 * int(h) + 1 for h in half]
    shape = tuple(int(n) for n in np.insert(size, src.axis, 1))
    origin = np.insert(np.subtract(centre, half), src.axis, k)
    affine = _grid_affine(src.affine, origin)
    moving = _flair_lesions_near(src, affine, shape)
    if moving is None:
        return np.zeros(size, src.lesions.dtype)
    reference = nib.Nifti1Image(np.zeros(shape, np.uint8), affine)
    try:
        labels = lesion_labels_in_gre(moving, reference, src.flair_to_gre)
    except RegistrationError:  # the crop lies beyond the FLAIR
        return np.zeros(size, src.lesions.dtype)
    return np.take(labels, 0, axis=src.axis)


def rim_picture(
    src: RimImage, lid: int, guess: np.ndarray, k: int, sectors: str | None
) -> dict[str, str]:
    """Return the rim crop of lesion ``lid``: ``{gray, contour, window}`` (as the other crops).

    Slice ``k`` of the GRE grid, centred on the lesion's centroid on that slice (``guess``, its
    FLAIR centroid in GRE voxels, when the slice misses it), with the lesion's contour (red),
    the other lesions' (yellow) and the ``sectors`` (``rim_sectors``) just outside the lesion:
    cyan arcs where a sector says ``1``, dotted where ``0``.
    """
    from smoulder.grids import voxel_sizes

    spacing = src.in_plane(voxel_sizes(src.affine))
    half = np.array([max(3, int(round(CROP_HALF_MM / s))) for s in spacing])
    start = np.rint(src.in_plane(guess)).astype(int)
    labels = lesion_labels_on_slice(src, k, start, 2 * half)
    inside = np.argwhere(labels == lid)
    centroid = inside.mean(0) + start - 2 * half if len(inside) else src.in_plane(guess)
    centre = np.rint(centroid).astype(int)
    labels = render.crop(labels, centre - start + 2 * half, half)
    f = max(1, CROP_PX // (2 * int(half.max()) + 1))
    window = src.window(k)
    gray = render.to_gray(render.enlarge(render.crop(src.plane(k), centre, half), f), window)
    mask, others = (render.enlarge(m, f) for m in (labels == lid, (labels > 0) & (labels != lid)))
    fine = (centroid - (centre - half) + 0.5) * f - 0.5
    marks = _sector_arcs(mask, fine, sectors, spacing / f, float(spacing.max()))
    shown = [render.display_native(a, src.affine, src.axis) for a in (gray, mask, others, *marks)]
    lined = render.compose(
        shown[0],
        [
            (render.contour(shown[2]), render.YELLOW),
            (render.contour(shown[1]), render.RED),
            (shown[4], DIM_CYAN),
            (shown[3], render.CYAN),
        ],
    )
    return {
        "gray": render.png_uri(render.compose(shown[0], [])),
        "contour": render.png_uri(lined),
        "window": f"{window.label}: {window.low:.4g} to {window.high:.4g}",
    }


def _sector_arcs(
    mask: np.ndarray,
    centre: np.ndarray,
    sectors: str | None,
    spacing_mm: np.ndarray,
    width_mm: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Return the ``(rim, no_rim)`` arcs of ``sectors`` (:func:`render.sector_marks`), each
    :data:`SECTOR_ARC_GAP_MM` beyond the lesion's farthest pixel in its sector."""
    if not sectors:
        empty = np.zeros(mask.shape, bool)
        return empty, empty
    radii = render.sector_radii_mm(mask, centre, len(sectors), spacing_mm) + SECTOR_ARC_GAP_MM
    return render.sector_marks(
        mask.shape, centre, sectors, radii, spacing_mm=spacing_mm, width_mm=width_mm
    )


def rim_pictures(ses: SessionData, rims: Mapping[int, RimEvidence]) -> dict[int, dict[str, str]]:
    """Return the rim crop of each assessed lesion of ``rims``: ``{id: picture}``.

    Each picture is :func:`rim_picture`'s, plus its ``name`` (the image and the slice, ``QSM
    (GRE grid, slice 12)``). The slice is ``rim_slice``; a lesion assessed without one (its
    sections too small for sectors) gets the slice through its centre, without sector marks.
    Lesions not assessed, mapped outside the GRE's field of view, or of a session without the
    image get none.
    """
    wanted = {i: r for i, r in rims.items() if r.assessed}
    src = rim_image(ses) if wanted else None
    if src is None:
        return {}
    guesses = _lesion_centres_gre(src, list(wanted))
    shape = np.array(src.data.shape[:3])
    out: dict[int, dict[str, str]] = {}
    for lid, rim in wanted.items():
        guess = guesses.get(lid)
        if guess is None:
            continue
        k = int(round(guess[src.axis])) if rim.slice_k is None else rim.slice_k
        at, size = src.in_plane(guess), src.in_plane(shape)
        if not 0 <= k < shape[src.axis] or np.any(at < -0.5) or np.any(at > size - 0.5):
            continue  # the lesion maps outside the GRE's field of view: nothing to show
        sectors = rim.sectors if rim.slice_k is not None else None
        name = f"{src.name} (GRE grid, slice {k}{'' if sectors else ', no sectors'})"
        out[lid] = {"name": name, **rim_picture(src, lid, guess, k, sectors)}
    return out


def segmentation_mosaic(ses: SessionData, n: int = 8) -> str | None:
    """Return a FLAIR mosaic with lesion (red), GM (yellow) and WM (cyan) contours."""
    flair = _load(ses.file("FLAIR", {"desc": "preproc"}))
    dseg = _load(ses.file("dseg"))
    if flair is None or dseg is None or flair[0].shape != dseg[0].shape:
        return None
    data, labels = flair[0], dseg[0].astype(np.int64)
    window = render.percentile_window(data, labels > 0)
    tiles = []
    for z in render.mosaic_slices(labels > 0, n):
        gray = render.to_gray(render.display(data[:, :, z]), window)
        lab = render.display(labels[:, :, z])
        tiles.append(
            render.compose(
                gray,
                [
                    (render.contour(np.isin(lab, class_indices("GM"))), render.YELLOW),
                    (render.contour(np.isin(lab, class_indices("WM"))), render.CYAN),
                    (render.contour(lab == LESION), render.RED),
                ],
            )
        )
    return render.png_uri(render.tile(tiles, 4), 2)


def edge_mosaic(
    reference: np.ndarray, moving: np.ndarray, brain: np.ndarray | None = None, n: int = 4
) -> str:
    """Return slices of ``reference`` with the edges of ``moving`` (same grid) in magenta,
    edges taken inside the (dilated) ``brain`` mask when given."""
    from scipy import ndimage as ndi

    region = (
        ndi.binary_dilation(brain, iterations=3)
        if brain is not None and brain.any()
        else reference > np.percentile(reference, 60)
    )
    window = render.percentile_window(reference, region)
    smooth = ndi.gaussian_filter(moving, 0.7)
    tiles = []
    for z in render.mosaic_slices(region, n):
        gray = render.to_gray(render.display(reference[:, :, z]), window)
        plane = render.display(np.where(region[:, :, z], smooth[:, :, z], 0.0))
        tiles.append(render.compose(gray, [(render.edges(plane), render.MAGENTA)]))
    return render.png_uri(render.tile(tiles, n), 2)


def registration_checks(sessions: list[SessionData]) -> list[tuple[str, str]]:
    """Return ``(caption, picture)`` pairs: each modality on its session's FLAIR, and each
    later session's FLAIR (mapped through the longitudinal transform) on the first's."""
    from smoulder.registration.transforms import load_transform, resample

    out = []
    for ses in sessions:
        flair_path = ses.file("FLAIR", {"desc": "preproc"})
        if flair_path is None:
            continue
        flair = render.canonical(_nii(flair_path))[0]
        mask_path = ses.file("mask", {"desc": "brain"})
        brain = render.canonical(_nii(mask_path))[0] > 0 if mask_path else None
        for name in ("T1w", "UNIT1"):
            path = ses.file(name, ON_FLAIR)
            if path is not None:
                out.append(
                    (
                        f"{ses.label}: {name} edges on FLAIR",
                        edge_mosaic(flair, render.canonical(_nii(path))[0], brain),
                    )
                )
        gre = ses.file("MEGRE", GRE_ON_FLAIR)
        if gre is not None:
            out.append(
                (
                    f"{ses.label}: GRE edges on FLAIR",
                    edge_mosaic(flair, render.canonical(_nii(gre))[0], brain),
                )
            )
    if not sessions:
        return out
    ref = sessions[0]
    ref_path = ref.file("FLAIR", {"desc": "preproc"})
    if ref_path is None or len(sessions) < 2:
        return out
    ref_img = _nii(ref_path)
    ref_data = render.canonical(ref_img)[0]
    ref_mask = ref.file("mask", {"desc": "brain"})
    ref_brain = render.canonical(_nii(ref_mask))[0] > 0 if ref_mask else None
    for later in sessions[1:]:
        xfm = _longitudinal_xfm(ref, later)
        later_flair = later.file("FLAIR", {"desc": "preproc"})
        if xfm is None or later_flair is None:
            continue
        moved = resample(_nii(later_flair), ref_img, load_transform(xfm))
        out.append(
            (
                f"{later.label} FLAIR edges on {ref.label} FLAIR (longitudinal transform)",
                edge_mosaic(ref_data, render.canonical(moved)[0], ref_brain),
            )
        )
    return out


# ---------------------------------------------------------------------------------- the page


def _static(name: str) -> str:
    """Return the text of the report's static file ``name`` (stylesheet, script)."""
    return resources.files("smoulder.report").joinpath("static", name).read_text(encoding="utf-8")


def _json_for_script(obj: Any) -> str:
    """Return JSON safe inside ``<script type="application/json">`` (no ``</`` breakout)."""
    return json.dumps(obj).replace("</", "<\\/").replace("<!--", "<\\!--")


def _latest_provenance(root: Path) -> dict[str, Any]:
    """Return the latest run's provenance record (empty without one)."""
    runs = sorted((root / "logs").glob("provenance-*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(runs[-1].read_text()) if runs else {}


def _versions(root: Path, sessions: list[SessionData]) -> list[tuple[str, str]]:
    """Return ``(what, version)`` pairs: this report, the run, the segmentation model."""
    out = [("smoulder (this report)", __version__)]
    desc = root / "dataset_description.json"
    if desc.exists():
        for gen in json.loads(desc.read_text()).get("GeneratedBy", []):
            out.append((f"{gen.get('Name', '?')} (run)", str(gen.get("Version", "?"))))
    for ses in sessions[:1]:
        side = ses.file("dseg", extension=".json")
        if side:
            meta = json.loads(side.read_text())
            for key in ("ModelVersion", "Model"):
                if key in meta:
                    out.append((f"segmentation {key}", str(meta[key])))
    rim_models = {str(s.lesion_meta["RimModel"]) for s in sessions if s.lesion_meta.get("RimModel")}
    out.extend(("rim model", m) for m in sorted(rim_models))
    return out


def _e(value: Any) -> str:
    """Return ``value`` as HTML-escaped text (quotes too; None as empty)."""
    return html.escape("" if value is None else str(value), quote=True)


def _rim_summary(sessions: list[SessionData]) -> str:
    """Return the summary's paramagnetic rim lesions per session (n/a: none assessed)."""
    if not any(_rims_measured(s) for s in sessions):
        return "<p>Paramagnetic rim lesions: not measured by this run.</p>"
    parts = [
        "<h3>Paramagnetic rim lesions</h3><table><tr><th>session</th><th>PRL</th>"
        "<th>lesions assessed</th><th>input</th><th>model</th></tr>"
    ]
    for ses in sessions:
        count, meta = prl_count(ses), ses.lesion_meta
        assessed = meta.get(
            "LesionsAssessedForRims", sum(rim_evidence(r).assessed for r in ses.lesions)
        )
        parts.append(
            f"<tr data-session='{_e(ses.label)}'><td>{_e(ses.label)}</td>"
            f"<td class='prl'>{'n/a' if count is None else count}</td><td>{_e(assessed)}</td>"
            f"<td>{_e(meta.get('RimInput') or 'n/a')}</td>"
            f"<td>{_e(meta.get('RimModel') or 'n/a')}</td></tr>"
        )
    parts.append("</table>")
    parts.extend(
        f"<p class='note'>{_e(s.label)}: {_e(s.lesion_meta['SignConvention'])}</p>"
        for s in sessions
        if s.lesion_meta.get("SignConvention")
    )
    return "".join(parts)


def _summary_section(
    root: Path,
    subject: str,
    sessions: list[SessionData],
    tracks: tracked.LesionTracks | None = None,
) -> str:
    """Return the summary section: inputs, run status, rim lesions, lesion activity per
    interval (``tracks``, the longitudinal tables), versions, warnings and crashes."""
    inputs = (
        root / subject / bids_name(_subject_entities(subject), suffix="inputs", extension=".tsv")
    )
    input_rows = read_tsv(inputs) if inputs.exists() else []
    prov = _latest_provenance(root)
    warnings = [f for f in prov.get("failures", []) if subject in f]
    status_rows = [r for r in prov.get("summary", []) if r.get("subject") == subject]
    parts = ['<section id="summary"><h2>Summary</h2>']
    parts.append("<table><tr><th>session</th><th>found</th><th>analyses</th><th>errors</th></tr>")
    for row in input_rows:
        parts.append(
            f"<tr><td>{_e(row.get('session_id'))}</td><td>{_e(row.get('found'))}</td>"
            f"<td>{_e(row.get('analyses'))}</td><td>{_e(row.get('errors'))}</td></tr>"
        )
    parts.append("</table><table><tr><th>session</th><th>steps</th><th>status</th></tr>")
    for row in status_rows:
        parts.append(
            f"<tr><td>{_e(row.get('session'))}</td><td>{_e(row.get('steps'))}</td>"
            f"<td>{_e(row.get('status'))}</td></tr>"
        )
    parts.append("</table>")
    parts.append(_rim_summary(sessions))
    if tracks is not None:
        parts.append(tracked.activity_section(tracks))
    elif len(sessions) > 1:
        parts.append("<p>Lesion activity: not measured by this run (no longitudinal table).</p>")
    parts.append("<h3>Versions</h3><ul>")
    parts.extend(f"<li>{_e(k)}: {_e(v)}</li>" for k, v in _versions(root, sessions))
    parts.append("</ul><h3>Warnings and crashes</h3>")
    parts.append(
        "<ul class='warnings'>" + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul>"
        if warnings
        else "<p>None in the latest run.</p>"
    )
    parts.append("</section>")
    return "".join(parts)


def _figure(uri: str, alt: str, caption: str) -> str:
    """Return a ``<figure>`` of the picture ``uri`` (``alt`` and ``caption`` already escaped)."""
    return f'<figure><img src="{uri}" alt="{alt}"><figcaption>{caption}</figcaption></figure>'


def _registration_section(sessions: list[SessionData]) -> str:
    """Return the registration checks section: edges of each image on the reference FLAIR."""
    figures = [_figure(uri, _e(c), _e(c)) for c, uri in registration_checks(sessions)]
    return (
        '<section id="registration"><h2>Registration checks</h2>'
        + "".join(figures)
        + "<p class='note'>Edges (magenta) of each image drawn on the reference FLAIR. "
        "The halfway space is not published yet: later sessions are shown on the first.</p>"
        "</section>"
    )


def _segmentation_section(sessions: list[SessionData]) -> str:
    """Return the segmentation section: one contour mosaic per session."""
    parts = ['<section id="segmentation"><h2>Segmentation</h2>']
    for ses in sessions:
        mosaic = segmentation_mosaic(ses)
        if mosaic:
            caption = f"{_e(ses.label)}: lesions red, GM yellow, WM cyan contours on FLAIR"
            parts.append(_figure(mosaic, f"segmentation {_e(ses.label)}", caption))
    parts.append("</section>")
    return "".join(parts)


def _lesion_records(
    sessions: list[SessionData],
    max_lesions: int | None,
    tracks: tracked.LesionTracks | None = None,
) -> list[dict[str, Any]]:
    """Return one record per pictured lesion, in lesion order: the tracked lesions when the
    subject has the longitudinal table (:func:`_tracked_records`), else the reference
    session's lesions.

    Each holds ``id``, ``location``, ``probability`` (None: not given), ``volume_ul``,
    ``volumes`` (µl per session), ``rim`` (:class:`RimEvidence`), ``images``
    (:func:`lesion_pictures`) and ``rim_image`` (:func:`rim_pictures`; None without).
    """
    if tracks is not None:
        return _tracked_records(sessions, tracks, max_lesions)
    ref = sessions[0] if sessions else None
    by_session = lesion_volumes_by_session(sessions) if sessions and tracks is None else {}
    pictures = lesion_pictures(ref, max_lesions) if ref else {}
    table = {int(r["index"]): r for r in (ref.lesions if ref else [])}
    rims = {lid: rim_evidence(table.get(lid, {})) for lid in pictures}
    rim_crops = rim_pictures(ref, rims) if ref else {}
    lesions: list[dict[str, Any]] = []
    for lid in sorted(pictures):
        row = table.get(lid, {})
        prob = row.get("mean_probability")
        lesions.append(
            {
                "id": lid,
                "location": row.get("location", "n/a"),
                "probability": float(prob) if prob not in (None, "", "n/a") else None,
                "volume_ul": float(row.get("volume_ul", "nan") or "nan"),
                "volumes": by_session.get(lid, []),
                "rim": rims[lid],
                "images": pictures[lid],
                "rim_image": rim_crops.get(lid),
            }
        )
    return lesions


def _grid_files(
    sessions: list[SessionData], tracks: tracked.LesionTracks
) -> list[tracked.GridFiles]:
    """Return each tracked session's files on the within-subject grid (in the table's order)."""
    by_label = {s.label: s for s in sessions}
    out = []
    for label in tracks.sessions:
        ses = by_label.get(f"ses-{label}")
        if ses is None:
            out.append(tracked.GridFiles(f"ses-{label}", None))
            continue
        to_session = {"from": "longitudinal", "to": f"ses{label}", "mode": "image"}
        out.append(
            tracked.GridFiles(
                ses.label,
                ses.file(tracked.GRID_LABELS[1], tracked.GRID_LABELS[0]),
                flair=ses.file("FLAIR", {"desc": "preproc"}),
                to_session=ses.file("xfm", to_session),
                expansion=ses.file(tracked.GRID_EXPANSION[1], tracked.GRID_EXPANSION[0]),
                sel=ses.file(tracked.GRID_SEL[1], tracked.GRID_SEL[0]),
            )
        )
    return out


def _tracked_records(
    sessions: list[SessionData], tracks: tracked.LesionTracks, max_lesions: int | None
) -> list[dict[str, Any]]:
    """Return one record per persistent lesion of the longitudinal table (see
    :func:`_lesion_records`), its numbers from the table.

    The session crops, the lesion-table row (location, probability, rim evidence) and the
    rim crop are those of the lesion's first instance at its first session (``source``);
    ``grid`` holds its crops on the within-subject grid, every session
    (:func:`smoulder.report.longitudinal.tracked_pictures`).
    """
    ids = tracks.ids[:max_lesions]
    by_label = {s.label: s for s in sessions}
    wanted: dict[str, dict[int, int]] = {}  # session -> {instance: persistent ID}
    for lid in ids:
        where = tracks.first_instance(lid)
        if where is not None:
            wanted.setdefault(f"ses-{where[0]}", {})[where[1]] = lid
    found: dict[int, dict[str, Any]] = {}
    for label, instances in wanted.items():
        ses = by_label.get(label)
        if ses is None:
            continue
        pictures = lesion_pictures(ses, ids=set(instances))
        table = {int(r["index"]): r for r in ses.lesions}
        rims = {i: rim_evidence(table.get(i, {})) for i in instances}
        crops = rim_pictures(ses, rims)
        for inst, lid in instances.items():
            found[lid] = {
                "row": table.get(inst, {}),
                "rim": rims[inst],
                "images": pictures.get(inst, {}),
                "rim_image": crops.get(inst),
                "source": f"{label} lesion {inst}",
            }
    units = {f"ses-{s}": tracks.unit(s) for s in tracks.sessions}
    grid = tracked.tracked_pictures(_grid_files(sessions, tracks), ids, units)
    records = []
    for lid in ids:
        first = found.get(lid, {})
        row = first.get("row", {})
        volumes = [_number(tracks.row(lid, s), "volume_ul") for s in tracks.sessions]
        records.append(
            {
                "id": lid,
                "location": row.get("location", "n/a"),
                "probability": _number(row, "mean_probability"),
                "volume_ul": max((v for v in volumes if v is not None), default=math.nan),
                "volumes": volumes,
                "rim": first.get("rim", RimEvidence()),
                "images": first.get("images", {}),
                "rim_image": first.get("rim_image"),
                "source": first.get("source"),
                "grid": grid.get(lid, {}),
            }
        )
    return records


#: The lesion section's filters: (value, label); with the longitudinal table, :data:`FATE_FILTERS`
#: follow.
FILTERS = (
    ("all", "all"),
    ("unrated", "unrated"),
    ("rim", "rim candidates"),
    ("sel", "SEL (rated)"),
)
#: Filters by the longitudinal table: a fate at a later session, or the SEL call.
FATE_FILTERS = (
    *((f"fate-{fate}", fate) for fate in tracked.FILTER_FATES),
    ("sel-call", "SEL (called)"),
)
#: The lesion section's sort orders: (value, label); ``sel-rate`` with the longitudinal table.
SORTS = (
    ("id", "ID"),
    ("probability", "probability"),
    ("rim", "rim probability"),
    ("volume", "volume"),
)


def _options(choices: Sequence[tuple[str, str]]) -> str:
    """Return the ``<option>`` elements of ``(value, label)`` pairs."""
    return "".join(f'<option value="{_e(v)}">{_e(label)}</option>' for v, label in choices)


def toolbar(tracks: tracked.LesionTracks | None = None) -> str:
    """Return the lesion section's toolbar (rater, filters, sort, export) and its keyboard help;
    with the longitudinal table, the filters by fate and SEL call and the sort by SEL rate."""
    filters = (*FILTERS, *(FATE_FILTERS if tracks is not None else ()))
    sorts = (*SORTS, *((("sel-rate", "SEL rate"),) if tracks is not None else ()))
    return (
        '<div class="toolbar"><label>Rater <input id="rater" autocomplete="off" '
        'placeholder="your ID"></label> '
        f'<label>Show <select id="filter">{_options(filters)}</select></label> '
        f'<label>Sort <select id="sort">{_options(sorts)}</select></label> '
        '<label><input type="checkbox" id="contours" checked> contours (c)</label> '
        '<button id="export">Export TSV</button> <label class="import">Import TSV '
        '<input type="file" id="import" accept=".tsv,text/tab-separated-values"></label> '
        '<span id="status" role="status"></span></div>'
        "<p class='note'>Keys: j/k next/previous, y/n lesion, 1/2/3 rim definite/probable/none, "
        "s SEL yes, x SEL no, e note, c contours. Windows are stated on each image.</p>"
    )


def _review_form(lid: int) -> str:
    """Return the rater's form of lesion ``lid``: lesion, rim, SEL and a note."""
    return (
        '<div class="review">'
        f'<fieldset><legend>Lesion</legend><label><input type="radio" name="lesion-{lid}" '
        'value="yes">yes</label>'
        f'<label><input type="radio" name="lesion-{lid}" value="no">no</label></fieldset>'
        f'<fieldset><legend>Rim</legend><label><input type="radio" name="rim-{lid}" '
        'value="definite">definite</label>'
        f'<label><input type="radio" name="rim-{lid}" value="probable">probable</label>'
        f'<label><input type="radio" name="rim-{lid}" value="none">none</label></fieldset>'
        f'<fieldset><legend>SEL</legend><label><input type="radio" name="sel-{lid}" '
        'value="yes">yes</label>'
        f'<label><input type="radio" name="sel-{lid}" value="no">no</label></fieldset>'
        f'<label class="notelabel">Note <input class="note" name="note-{lid}" '
        'maxlength="2000"></label>'
        "</div>"
    )


def _yes_no(flag: bool) -> str:
    """Return ``yes`` or ``no``."""
    return "yes" if flag else "no"


def rim_header(rim: RimEvidence) -> str:
    """Return the card header's rim part (HTML-escaped): probability and call, or why not.

    Examples:
        >>> rim_header(RimEvidence(call="yes", probability=0.871))
        'rim probability 0.87 · rim: yes'
        >>> rim_header(RimEvidence(call="not assessed", status="too small on the GRE grid"))
        'rim: not assessed (too small on the GRE grid)'
        >>> rim_header(RimEvidence())
        'rim probability: not measured'
    """
    if not rim.call:
        return "rim probability: not measured"
    if not rim.assessed:
        reason = rim.status if rim.status and rim.status != "assessed" else ""
        return f"rim: {_e(rim.call)}" + (f" ({_e(reason)})" if reason else "")
    prob = "n/a" if rim.probability is None else f"{rim.probability:.2f}"
    return f"rim probability {prob} · rim: {_e(rim.call)}"


def rim_evidence_line(rim: RimEvidence) -> str:
    """Return the lesion's rim and T1 evidence as one short line (HTML; empty without any).

    Examples:
        >>> rim_evidence_line(RimEvidence(call="yes", coverage=0.75, consensus=True,
        ...                               input_kind="qsm", rim_core_shell=(0.04, 0.01, 0.0)))
        'rim coverage 75 % · consensus yes · χ rim +0.040 / core +0.010 / shell +0.000 ppm (QSM)'
    """
    parts = []
    if rim.assessed:
        if rim.coverage is not None:
            parts.append(f"rim coverage {100 * rim.coverage:.0f} %")
        for name, flag in (
            ("consensus", rim.consensus),
            ("rule-based rim", rim.rule_call),
            ("central vein", rim.central_vein),
        ):
            if flag is not None:
                parts.append(f"{name} {_yes_no(flag)}")
        if any(v is not None for v in rim.rim_core_shell):
            phase = rim.input_kind == "phase"
            text = " / ".join(
                f"{where} {'n/a' if v is None else f'{v:+.3f}'}"
                for where, v in zip(("rim", "core", "shell"), rim.rim_core_shell, strict=True)
            )
            parts.append(
                ("phase " if phase else "χ ") + text + (" rad (phase)" if phase else " ppm (QSM)")
            )
    if rim.t1_black_hole is not None:
        parts.append(f"T1 black hole {_yes_no(rim.t1_black_hole)}")
    if rim.t1w_ratio is not None:
        parts.append(f"T1w ratio {rim.t1w_ratio:.2f}")
    if rim.qt1_ms is not None:
        parts.append(f"qT1 {rim.qt1_ms:.0f} ms")
    return " · ".join(parts)


def _lesion_card(
    les: dict[str, Any],
    labels: list[str],
    times: list[float],
    tracks: tracked.LesionTracks | None = None,
) -> str:
    """Return one lesion's card: header, crops (filled in by the page's script), volumes, form.

    ``labels`` name the sessions of ``les["volumes"]``; with ``tracks`` (the longitudinal
    table) the card also holds the lesion's table of sessions on the within-subject grid.
    """
    lid = int(les["id"])
    vols = ", ".join(
        f"{_e(label)}: {'n/a' if v is None else f'{v:.0f} µl'}"
        for label, v in zip(labels, list(les["volumes"]), strict=False)
    )
    svg = render.trajectory_svg(times[: len(les["volumes"])], les["volumes"], unit="µl")
    source = f", {les['source']}" if les.get("source") else ""
    imgs = "".join(
        f'<figure class="crop"><img data-lesion="{lid}" data-modality="{_e(name)}" '
        f'alt="{_e(name)} lesion {lid}">'
        f"<figcaption>{_e(name)}{_e(source)} — {_e(info['window'])}</figcaption></figure>"
        for name, info in les["images"].items()
    )
    crop = les.get("rim_image")
    if crop:  # one GRE-grid slice with the rim sectors: filled in from the rim images
        imgs += (
            f'<figure class="crop rim-crop"><img data-lesion="{lid}" data-rim-crop="1" '
            f'alt="{_e(crop["name"])} lesion {lid}">'
            f"<figcaption>{_e(crop['name'])}{_e(source)} — {_e(crop['window'])}</figcaption>"
            "</figure>"
        )
    prob = "n/a" if les["probability"] is None else f"{les['probability']:.2f}"
    rim: RimEvidence = les["rim"]
    rim_prob, rim_call = rim.probability, rim.call
    activity, attributes, sessions_table = "SEL: not measured", "", ""
    volume = les["volume_ul"]
    size = "n/a" if math.isnan(volume) else f"{volume:.0f} µl"
    rim_text, evidence = rim_header(rim), rim_evidence_line(rim)
    if tracks is not None:
        rows = [tracks.row(lid, s) for s in tracks.sessions]
        calls = [_cell(r, "rim_call") for r in rows]
        probs = [p for p in (_number(r, "rim_probability") for r in rows) if p is not None]
        rim_call = "yes" if "yes" in calls else rim_call
        rim_prob = max(probs, default=rim_prob)
        activity = tracked.header_text(tracks, lid)
        attributes = tracked.card_attributes(tracks, lid)
        sessions_table = tracked.sessions_table(tracks, lid, les.get("grid", {}))
        size = f"largest {size}"
        rim_text = tracked.rim_text(tracks, lid) or rim_text
        evidence = (
            f"{_e(les['source'])}: {evidence}" if evidence and les.get("source") else evidence
        )
    return (
        f'<article class="card" tabindex="0" data-lesion-id="{lid}" data-probability="{prob}" '
        f'data-volume="{volume:.1f}" '
        f'data-rim-probability="{"" if rim_prob is None else f"{rim_prob:.3f}"}" '
        f'data-rim-call="{_e(rim_call)}"{attributes}>'
        f"<header><b>Lesion {lid}</b> · {_e(les['location'])} · {size} · "
        f"probability {prob} · {rim_text} · {activity}</header>"
        + (f'<div class="rim">{evidence}</div>' if evidence else "")
        + sessions_table
        + f'<div class="crops">{imgs}</div><div class="meta">Volume per session: {vols} {svg}</div>'
        + _review_form(lid)
        + "</article>"
    )


def _tracked_note(tracks: tracked.LesionTracks) -> str:
    """Return the note on the tracked lesions' cards: IDs, crops, outlines, colour scale."""
    units = sorted({tracks.unit(s) for s in tracks.sessions[1:]}) or ["%/year"]
    bars = " ".join(
        f"<img class='colour-bar' src='{tracked.colour_bar_uri(u)}' "
        f"alt='expansion colour scale'> {_e(tracked.expansion_window(u).label)}"
        for u in units
    )
    return (
        "<p class='note'>Lesion IDs are the subject's persistent IDs (the longitudinal table, "
        "one per lesion over all sessions); the review table keeps them. Each card's table "
        "shows the lesion at every session on the within-subject grid, same crop: the "
        "session's FLAIR resampled onto the grid (lesion red, other lesions yellow; window per "
        "session) and the expansion map since the session before (lesion at that session "
        f"black, SEL candidates green): {bars}. Fates, volumes, rates and SEL numbers are the "
        "table's. The crops below it are of the lesion's first session on that session's own "
        "grid.</p>"
    )


def _rim_note(ses: SessionData) -> str:
    """Return the note on the rim calls and crops of the reference session (empty without)."""
    if not _rims_measured(ses):
        return ""
    meta = ses.lesion_meta
    point = (meta.get("RimOperatingPoints") or {}).get("balanced")
    model = meta.get("RimModel")
    if isinstance(point, int | float):
        point = f"{point:.2f}"
    at = "the model's balanced operating point" + (f" ({_e(point)})" if point is not None else "")
    return (
        f"<p class='note'>Rim calls at {at}{f'; model {_e(model)}' if model else ''}. "
        "The rim crop is a slice of the classified susceptibility image on the GRE's own grid "
        "(not resampled): the one where the rim sectors were measured, else the one through "
        "the lesion's centre. Lesion contour red, other lesions yellow; sectors with a rim "
        "cyan arcs, without a rim dotted arcs.</p>"
    )


def _lesions_section(
    lesions: list[dict[str, Any]],
    sessions: list[SessionData],
    years: list[float | None],
    tracks: tracked.LesionTracks | None = None,
) -> str:
    """Return the lesions section: the toolbar and one card per lesion (tracked over the
    sessions when ``tracks``, the longitudinal table, is given)."""
    if tracks is None:
        labels = [s.label for s in sessions]
        times = [y if y is not None else float(i) for i, y in enumerate(years)]
        title = f"reference {_e(sessions[0].label if sessions else 'n/a')}"
    else:
        labels = [f"ses-{s}" for s in tracks.sessions]
        known = dict(zip([s.label for s in sessions], years, strict=True))
        times = [
            y if (y := known.get(label)) is not None else float(i) for i, label in enumerate(labels)
        ]
        title = f"tracked over {len(labels)} sessions"
    return (
        f'<section id="lesions"><h2>Lesions ({len(lesions)}, {title})</h2>'
        + toolbar(tracks)
        + (_tracked_note(tracks) if tracks is not None else "")
        + (_rim_note(sessions[0]) if sessions else "")
        + '<div id="cards">'
        + "".join(_lesion_card(les, labels, times, tracks) for les in lesions)
        + "</div></section>"
    )


def _page(
    subject: str,
    body: str,
    data: dict[str, Any],
    images: dict[str, Any],
    rim_images: dict[str, Any] | None = None,
    grid_images: dict[str, Any] | None = None,
) -> str:
    """Return the self-contained page: ``body``, its data and images as JSON, style, script.

    ``images`` holds each lesion's modality crops, ``rim_images`` its GRE-grid rim crop,
    ``grid_images`` its crops on the within-subject grid (tracked lesions).
    """
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(subject)} — smoulder report</title>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'\">"
        f"<style>{_static('report.css')}</style></head><body>"
        + body
        + f'<script type="application/json" id="report-data">{_json_for_script(data)}</script>'
        + f'<script type="application/json" id="lesion-images">{_json_for_script(images)}</script>'
        + '<script type="application/json" id="rim-images">'
        + f"{_json_for_script(rim_images or {})}</script>"
        + '<script type="application/json" id="grid-images">'
        + f"{_json_for_script(grid_images or {})}</script>"
        + f"<script>{_static('report.js')}</script></body></html>"
    )


def build_subject_report(
    root: str | Path,
    subject: str,
    *,
    max_lesions: int | None = None,
    sessions: list[SessionData] | None = None,
) -> Path:
    """Write ``ROOT/sub-<label>.html`` from the derivatives in ``root``; return its path.

    ``sessions`` (from :func:`collect_sessions`) saves reading them again when the caller has
    them; ``max_lesions`` caps the cards (all by default).
    """
    root = Path(root)
    if sessions is None:
        sessions = collect_sessions(root, subject)
    years = session_years(sessions)
    tracks = tracked.read_lesion_tracks(root / subject, subject)
    lesions = _lesion_records(sessions, max_lesions, tracks)
    saved = read_review(review_path(root / subject, subject))
    body = (
        f"<h1>{_e(subject)}</h1>"
        + _summary_section(root, subject, sessions, tracks)
        + _registration_section(sessions)
        + _segmentation_section(sessions)
        + atrophy_report.atrophy_section(root / subject, subject, [s.label for s in sessions])
        + _lesions_section(lesions, sessions, years, tracks)
    )
    images = {str(le["id"]): le["images"] for le in lesions}
    rim_images = {str(le["id"]): le["rim_image"] for le in lesions if le["rim_image"]}
    grid_images = {str(le["id"]): le["grid"] for le in lesions if le.get("grid")}
    data = {
        "subject": subject,
        "review": saved,
        "version": __version__,
        "lesionIds": "longitudinal" if tracks is not None else "reference session",
    }
    page = _page(subject, body, data, images, rim_images, grid_images)
    return save_text(page, root / f"{subject}.html")


def subject_summary(
    root: Path, subject: str, sessions: list[SessionData] | None = None
) -> dict[str, Any]:
    """Return the index page's numbers for one subject.

    ``prl`` holds ``(session, paramagnetic rim lesions)`` pairs (None: none assessed);
    ``lesions`` counts the tracked lesions when the subject has the longitudinal table (else
    the reference session's); ``activity`` holds its activity table's rows (empty without).
    """
    if sessions is None:
        sessions = collect_sessions(root, subject)
    tracks = tracked.read_lesion_tracks(root / subject, subject)
    n_lesions = len(tracks.ids) if tracks else len(sessions[0].lesions) if sessions else 0
    reviewed = {
        r["lesion_id"] for r in read_review(review_path(root / subject, subject)) if r["lesion"]
    }
    rate = atrophy_report.brain_rate(root / subject, subject)  # within the subject only
    return {
        "subject": subject,
        "sessions": len(sessions),
        "lesions": n_lesions,
        "lesion_ml": sessions[-1].volumes_ml.get("lesion") if sessions else None,
        "brain_rate": None if rate is None or math.isnan(rate) else rate,
        "reviewed": len(reviewed),
        "prl": [(s.label, prl_count(s)) for s in sessions],
        "activity": tracks.intervals if tracks else [],
    }


def build_index(
    root: str | Path, subjects: list[str], known: dict[str, list[SessionData]] | None = None
) -> Path:
    """Write ``ROOT/index.html``: one row per subject, its key numbers and review status.

    ``known`` maps subjects to sessions already collected; the others are read here.
    """
    root = Path(root)
    rows = []
    for subject in subjects:
        s = subject_summary(root, subject, (known or {}).get(subject))
        status = (
            "not started"
            if s["reviewed"] == 0
            else ("done" if s["reviewed"] >= s["lesions"] else "in progress")
        )
        rate = "n/a" if s["brain_rate"] is None else f"{s['brain_rate']:+.2f}"
        lesion_ml = "n/a" if s["lesion_ml"] is None else f"{s['lesion_ml']:.2f}"
        prl = ", ".join(f"{_e(label)}: {'n/a' if n is None else n}" for label, n in s["prl"])
        rows.append(
            f"<tr data-subject='{_e(subject)}'><td><a href='{_e(subject)}.html'>{_e(subject)}</a></td>"
            f"<td>{s['sessions']}</td><td>{s['lesions']}</td><td>{lesion_ml}</td><td>{rate}</td>"
            f"<td class='prl'>{prl or 'n/a'}</td>"
            f"<td class='activity'>{tracked.activity_line(s['activity'])}</td>"
            f"<td>{s['reviewed']}/{s['lesions']} ({status})</td></tr>"
        )
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>smoulder cohort</title>"
        f"<style>{_static('report.css')}</style></head><body><h1>smoulder cohort</h1>"
        "<table><tr><th>subject</th><th>sessions</th>"
        "<th>lesions (tracked over sessions, else of the reference session)</th>"
        "<th>lesion volume, last session (ml)</th><th>brain volume change (%/year)</th>"
        "<th>paramagnetic rim lesions per session</th><th>lesion activity per interval</th>"
        "<th>reviewed lesions</th></tr>" + "".join(rows) + "</table></body></html>"
    )
    return save_text(page, root / "index.html")
