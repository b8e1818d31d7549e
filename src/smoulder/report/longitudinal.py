"""Lesions across sessions in the subject report: the longitudinal tables, each tracked lesion
pictured on the within-subject grid, and the activity per interval.

What it reads (written by the subject workflow, :mod:`smoulder.pipelines.subject`, for a
subject with two or more sessions): ``sub-X_desc-lesions_longitudinal.tsv`` (one row per
persistent lesion ID and session, :data:`smoulder.longitudinal.activity.COLUMNS`) and
``sub-X_desc-activity_longitudinal.tsv`` (one row per interval,
:data:`smoulder.longitudinal.activity.INTERVAL_COLUMNS`) with their sidecars (session dates and
the messages about missing ones); per session, the persistent-ID map on the within-subject grid
(``space-longitudinal_desc-lesions_dseg``), the displacement field that maps the grid's points
to the session's (``from-longitudinal_to-sesY``), and for every later session the expansion
map and the SEL candidates since the session before.

The numbers are shown as the tables give them: nothing is measured here. The only images
computed are pictures: each session's FLAIR is resampled onto the grid once (one
interpolation, :func:`smoulder.registration.transforms.resample`) so that every session shows
the same crop, centred on the lesion, of the same grid.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np

from smoulder.derivatives import bids_name
from smoulder.images import read_tsv
from smoulder.report import render

#: Entities (and suffix) of the lesion × session table and of the per-interval table.
LESIONS_TABLE: dict[str, str | int] = {"desc": "lesions"}
ACTIVITY_TABLE: dict[str, str | int] = {"desc": "activity"}
TABLE_SUFFIX = "longitudinal"
#: Entities of a session's maps on the within-subject grid: (entities, suffix).
GRID_LABELS: tuple[dict[str, str | int], str] = (
    {"space": "longitudinal", "desc": "lesions"},
    "dseg",
)
GRID_EXPANSION: tuple[dict[str, str | int], str] = (
    {"space": "longitudinal", "desc": "expansion"},
    "map",
)
GRID_SEL: tuple[dict[str, str | int], str] = ({"space": "longitudinal", "desc": "SEL"}, "mask")
#: Half-width of the expansion maps' colour scale (%/year, or %/interval without dates): fixed,
#: so that colours compare between lesions and subjects. Elliott's SEL seeds start at 12.5.
EXPANSION_WINDOW_PCT = 50.0
#: Fates a rater can filter the cards by (the table's ``fate`` at a later session).
FILTER_FATES = ("new", "enlarging", "shrinking", "resolved")
#: Columns of the activity table shown in the summary: (column, heading).
ACTIVITY_COLUMNS = (
    ("interval", "interval"),
    ("years", "years"),
    ("new_count", "new"),
    ("new_volume_ul", "new volume (µl)"),
    ("enlarging_count", "enlarging"),
    ("enlarging_volume_ul", "volume gained by enlarging (µl)"),
    ("shrinking_count", "shrinking"),
    ("resolved_count", "resolved"),
    ("sel_count", "SEL"),
    ("sel_volume_ul", "SEL candidate volume (µl)"),
    ("prl_count", "PRL"),
    ("prl_sel_count", "PRL ∧ SEL"),
    ("noise_floor", "noise floor (%/year)"),
)


def _e(value: Any) -> str:
    """Return ``value`` as HTML-escaped text (quotes too; None as empty)."""
    return html.escape("" if value is None else str(value), quote=True)


def _given(value: str | None) -> bool:
    """Return whether a table cell holds a value (not empty, ``n/a`` or ``nan``)."""
    return (value or "").strip().lower() not in ("", "n/a", "nan")


def show(row: Mapping[str, str], column: str, spec: str = "", unit: str = "") -> str:
    """Return the row's ``column`` for display, HTML-escaped: numbers with ``spec``, then
    ``unit``; ``n/a`` when the cell is empty or not given.

    Examples:
        >>> show({"rate": "30.3866"}, "rate", ".1f", " %/year"), show({"rate": "n/a"}, "rate")
        ('30.4 %/year', 'n/a')
        >>> show({"fate": "new <b>"}, "fate")
        'new &lt;b&gt;'
    """
    value = (row.get(column) or "").strip()
    if not _given(value):
        return "n/a"
    if spec:
        try:
            value = format(float(value), spec)
        except ValueError:
            pass
    return _e(value + unit)


def _float(row: Mapping[str, str], column: str) -> float | None:
    """Return the row's ``column`` as a number (None when not given)."""
    try:
        return float(row.get(column) or "") if _given(row.get(column)) else None
    except ValueError:
        return None


@dataclass
class LesionTracks:
    """A subject's longitudinal tables, as written.

    Attributes:
        sessions: the sessions' labels as the tables write them (``01``), in time order.
        rows: ``{lesion_id: {session: row}}`` of the lesion × session table.
        intervals: the rows of the activity table, one per interval.
        messages: what the run said about the sessions (a missing date...).
        dates: ``{session: date}`` and ``date_sources``: ``{session: where it was read}``.
    """

    sessions: list[str]
    rows: dict[int, dict[str, dict[str, str]]]
    intervals: list[dict[str, str]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    dates: dict[str, str] = field(default_factory=dict)
    date_sources: dict[str, str] = field(default_factory=dict)

    @property
    def ids(self) -> list[int]:
        """Return every persistent lesion ID, ascending."""
        return sorted(self.rows)

    def row(self, lid: int, session: str) -> dict[str, str]:
        """Return the row of lesion ``lid`` at ``session`` (empty when the table has none)."""
        return self.rows.get(lid, {}).get(session, {})

    def fates(self, lid: int) -> list[str]:
        """Return the lesion's fates at the later sessions, in session order."""
        return [self.row(lid, s).get("fate", "") for s in self.sessions[1:]]

    def sel_call(self, lid: int) -> str:
        """Return ``yes`` when any session calls the lesion an SEL, else ``no`` when one was
        decided, else ``n/a``."""
        calls = {self.row(lid, s).get("sel_call", "") for s in self.sessions}
        return "yes" if "yes" in calls else "no" if "no" in calls else "n/a"

    def first_instance(self, lid: int) -> tuple[str, int] | None:
        """Return ``(session, instance)``: the lesion's first session and its first instance
        ID there (the session's own lesion map), None when it is never present."""
        for s in self.sessions:
            cells = [c for c in self.row(lid, s).get("instances", "").split(";") if c.strip()]
            if cells:
                return s, int(float(cells[0]))
        return None

    def unit(self, session: str) -> str:
        """Return the unit of the rates of the interval ending at ``session``: ``%/year``, or
        ``%/interval`` when its length in years is not given."""
        for row in self.intervals:
            if row.get("to_session") == session:
                return "%/year" if _given(row.get("years")) else "%/interval"
        return "%/year"


def table_path(subject_dir: Path, subject: str, entities: Mapping[str, str | int]) -> Path:
    """Return the path of one of the subject's longitudinal tables (``.tsv``)."""
    name = bids_name(
        {"sub": subject.removeprefix("sub-"), **entities}, suffix=TABLE_SUFFIX, extension=".tsv"
    )
    return subject_dir / "anat" / name


def _sidecar(path: Path) -> dict[str, Any]:
    """Return the JSON sidecar of a table (empty without one)."""
    side = path.with_suffix(".json")
    return json.loads(side.read_text()) if side.exists() else {}


def read_lesion_tracks(subject_dir: str | Path, subject: str) -> LesionTracks | None:
    """Return the subject's :class:`LesionTracks`, None without a lesion × session table (one
    session, or a run from before the longitudinal step).

    Args:
        subject_dir: the subject's folder of the derivatives (``OUT/smoulder/sub-X``).
        subject: the subject's folder name, ``sub-X``.
    """
    subject_dir = Path(subject_dir)
    lesions = table_path(subject_dir, subject, LESIONS_TABLE)
    if not lesions.exists():
        return None
    rows: dict[int, dict[str, dict[str, str]]] = {}
    seen: list[str] = []
    for row in read_tsv(lesions):
        session = row.get("session", "")
        rows.setdefault(int(float(row["lesion_id"])), {})[session] = row
        if session not in seen:
            seen.append(session)
    activity = table_path(subject_dir, subject, ACTIVITY_TABLE)
    intervals = read_tsv(activity) if activity.exists() else []
    order = (
        [intervals[0]["from_session"], *(r["to_session"] for r in intervals)] if intervals else []
    )
    sessions = order if set(order) == set(seen) else seen
    meta, activity_meta = _sidecar(lesions), _sidecar(activity)
    messages = [str(m) for m in meta.get("Messages", [])]
    messages += [str(m) for m in activity_meta.get("Messages", []) if str(m) not in messages]
    return LesionTracks(
        sessions=sessions,
        rows=rows,
        intervals=intervals,
        messages=messages,
        dates={str(k): str(v) for k, v in (meta.get("SessionDates") or {}).items()},
        date_sources={str(k): str(v) for k, v in (meta.get("SessionDateSources") or {}).items()},
    )


# ------------------------------------------------------------------------------------ pictures


@dataclass(frozen=True)
class GridFiles:
    """One session's files for the pictures on the within-subject grid (None: not written).

    Attributes:
        name: the session's folder name, ``ses-Y`` (keys and captions).
        labels: its persistent-ID map on the grid (the grid itself).
        flair: its own FLAIR (preprocessed, on its own grid).
        to_session: the displacement field mapping the grid's points to the session's.
        expansion: the expansion map since the session before (later sessions).
        sel: the SEL candidates since the lesions' first session (later sessions).
    """

    name: str
    labels: Path | None
    flair: Path | None = None
    to_session: Path | None = None
    expansion: Path | None = None
    sel: Path | None = None


@dataclass
class _OnGrid:
    """One session's pictures' sources on the grid, RAS+ (see :class:`GridFiles`)."""

    name: str
    labels: np.ndarray
    flair: np.ndarray | None
    flair_window: render.Window | None
    expansion: np.ndarray | None
    sel: np.ndarray | None


def _nii(path: Path) -> nib.Nifti1Image:
    """Return the NIfTI image at ``path`` (typed for mypy)."""
    return cast(nib.Nifti1Image, nib.load(path))


def _on_grid(files: GridFiles, grid: nib.Nifti1Image) -> _OnGrid | None:
    """Return one session's sources on the grid of ``grid`` (None without its label map).

    A FLAIR the field does not bring onto the grid (no overlap) is left out: its crops say
    "not on the grid" rather than the report failing.
    """
    from smoulder.errors import RegistrationError
    from smoulder.registration.transforms import load_transform, resample

    if files.labels is None:
        return None
    labels = render.canonical(_nii(files.labels))[0].astype(np.int64)
    flair = window = None
    if files.flair is not None and files.to_session is not None:
        try:
            moved = resample(_nii(files.flair), grid, load_transform(files.to_session))
        except RegistrationError:
            moved = None
        if moved is not None:
            flair = render.canonical(moved)[0]
            window = render.percentile_window(flair)

    def same_grid(path: Path | None) -> np.ndarray | None:
        data = render.canonical(_nii(path))[0] if path is not None else None
        return data if data is not None and data.shape == labels.shape else None

    sel = same_grid(files.sel)
    return _OnGrid(
        files.name,
        labels,
        flair,
        window,
        same_grid(files.expansion),
        None if sel is None else sel > 0,
    )


def _union_centres(
    label_maps: Sequence[np.ndarray], ids: Sequence[int]
) -> dict[int, tuple[int, int, int]]:
    """Return, per ID, the voxel of its union over the sessions nearest the union's centroid."""
    from scipy import ndimage as ndi

    points: dict[int, list[np.ndarray]] = {lid: [] for lid in ids}
    for labels in label_maps:
        for i, box in enumerate(ndi.find_objects(labels), start=1):
            if box is not None and i in points:
                points[i].append(np.argwhere(labels[box] == i) + [b.start for b in box])
    out = {}
    for lid, found in points.items():
        if found:
            idx = np.unique(np.concatenate(found), axis=0)
            nearest = idx[np.argmin(((idx - idx.mean(0)) ** 2).sum(1))]
            out[lid] = (int(nearest[0]), int(nearest[1]), int(nearest[2]))
    return out


def expansion_window(unit: str) -> render.Window:
    """Return the expansion maps' colour scale (:data:`EXPANSION_WINDOW_PCT`), ``unit`` stated.

    Examples:
        >>> expansion_window("%/year").label
        'expansion ±50 %/year (blue shrinking, red growing)'
    """
    w = EXPANSION_WINDOW_PCT
    return render.Window(-w, w, f"expansion ±{w:g} {unit} (blue shrinking, red growing)")


def tracked_pictures(
    files: Sequence[GridFiles],
    ids: Sequence[int],
    units: Mapping[str, str] | None = None,
) -> dict[int, dict[str, dict[str, str]]]:
    """Return each lesion's crops on the within-subject grid, one per session and map.

    Every crop of a lesion is centred on the same grid voxel (of the lesion's union over the
    sessions), spans :data:`~smoulder.report.render.CROP_HALF_MM` each way, and shows the
    axial, coronal and sagittal planes side by side.

    Args:
        files: every session's :class:`GridFiles`, in time order.
        ids: the persistent lesion IDs to picture.
        units: ``{session name: unit of its expansion map}`` (``%/year`` by default).

    Returns:
        ``{lesion_id: {"<ses-Y>:FLAIR" | "<ses-Y>:expansion": {gray, contour, window}}}``:
        ``gray`` plain, ``contour`` with the outlines (FLAIR: the lesion red, other lesions
        yellow; expansion: the lesion at that session black, the SEL candidates green),
        ``window`` the display window stated.
    """
    first = next((f for f in files if f.labels is not None), None)
    if first is None or first.labels is None:
        return {}
    grid = _nii(first.labels)
    sources = [s for s in (_on_grid(f, grid) for f in files) if s is not None]
    sources = [s for s in sources if s.labels.shape == sources[0].labels.shape]
    spacing = np.sqrt((nib.as_closest_canonical(grid).affine[:3, :3] ** 2).sum(0))
    half = [max(3, int(round(render.CROP_HALF_MM / s))) for s in spacing]
    scale = max(1, render.CROP_PX // (2 * max(half) + 1))
    centres = _union_centres([s.labels for s in sources], ids)
    out: dict[int, dict[str, dict[str, str]]] = {}
    for lid, centre in centres.items():
        crops: dict[str, dict[str, str]] = {}
        for src in sources:
            crops.update(_session_crops(src, lid, centre, half, scale, (units or {})))
        out[lid] = crops
    return out


Outline = tuple[np.ndarray, tuple[int, int, int]]


def _outlined(
    bases: Sequence[np.ndarray], outlines: Sequence[Sequence[Outline]], scale: int
) -> tuple[str, str]:
    """Return ``(plain, outlined)`` PNG URIs of planes side by side, enlarged ``scale`` times
    before the masks' contours are drawn (thin outlines that leave the lesion visible)."""
    big = [render.enlarge(b, scale) for b in bases]
    plain = [render.compose(b, []) for b in big]
    lined = [
        render.compose(b, [(render.contour(render.enlarge(m, scale)), c) for m, c in lines])
        for b, lines in zip(big, outlines, strict=True)
    ]
    return render.png_uri(render.strip(plain)), render.png_uri(render.strip(lined))


def _session_crops(
    src: _OnGrid,
    lid: int,
    centre: tuple[int, int, int],
    half: list[int],
    scale: int,
    units: Mapping[str, str],
) -> dict[str, dict[str, str]]:
    """Return one session's crops of lesion ``lid`` (see :func:`tracked_pictures`)."""

    def crops(volume: np.ndarray) -> list[np.ndarray]:  # the three planes, from a small block
        return render.planes(render.block(volume, centre, half), half, half)

    labels = render.block(src.labels, centre, half)
    mine = [m > 0.5 for m in render.planes((labels == lid).astype(np.float32), half, half)]
    out = {}
    if src.flair is not None and src.flair_window is not None:
        window = src.flair_window
        others = render.planes(((labels > 0) & (labels != lid)).astype(np.float32), half, half)
        grays = [render.to_gray(p, window) for p in crops(src.flair)]
        lines = [
            [(o > 0.5, render.YELLOW), (m, render.RED)] for m, o in zip(mine, others, strict=True)
        ]
        gray, contour = _outlined(grays, lines, scale)
        out[f"{src.name}:FLAIR"] = {
            "gray": gray,
            "contour": contour,
            "window": f"FLAIR {window.label}: {window.low:.4g} to {window.high:.4g}",
        }
    if src.expansion is not None:
        window = expansion_window(units.get(src.name, "%/year"))
        colours = [render.diverging(p, window) for p in crops(src.expansion)]
        sel = (
            [p.astype(bool) for p in crops(src.sel)]
            if src.sel is not None
            else [np.zeros(m.shape, bool) for m in mine]
        )
        lines = [[(c, render.GREEN), (m, render.BLACK)] for m, c in zip(mine, sel, strict=True)]
        gray, contour = _outlined(colours, lines, scale)
        out[f"{src.name}:expansion"] = {"gray": gray, "contour": contour, "window": window.label}
    return out


def colour_bar_uri(unit: str = "%/year") -> str:
    """Return the expansion maps' colour bar as a PNG ``data:`` URI."""
    return render.png_uri(render.colour_bar(expansion_window(unit)))


# ---------------------------------------------------------------------------------- the HTML


def card_attributes(tracks: LesionTracks, lid: int) -> str:
    """Return the card's data attributes for filtering and sorting: the fates at the later
    sessions, the SEL call, the largest SEL candidate rate.

    Examples:
        >>> t = LesionTracks(["1", "2"], {3: {"1": {"fate": "present"},
        ...                              "2": {"fate": "enlarging", "sel_call": "yes",
        ...                                    "sel_rate": "12.5"}}})
        >>> card_attributes(t, 3)
        ' data-fates="enlarging" data-sel-call="yes" data-sel-rate="12.5"'
    """
    rates = [_float(tracks.row(lid, s), "sel_rate") for s in tracks.sessions]
    known = [r for r in rates if r is not None]
    return (
        f' data-fates="{_e(" ".join(f for f in tracks.fates(lid) if f))}"'
        f' data-sel-call="{_e(tracks.sel_call(lid))}"'
        f' data-sel-rate="{max(known) if known else ""}"'
    )


def header_text(tracks: LesionTracks, lid: int) -> str:
    """Return the card header's longitudinal part (HTML): fates per interval and SEL call.

    Examples:
        >>> t = LesionTracks(["1", "2"], {3: {"1": {"fate": "present"},
        ...     "2": {"fate": "enlarging", "sel_call": "yes", "sel_rate": "30.39",
        ...           "sel_noise_floor": "5.83", "rate_unit": "%/year"}}})
        >>> header_text(t, 3)
        "ses-2 <b class='fate fate-enlarging'>enlarging</b> · SEL: yes, 30.4 %/year (noise floor \
5.83 %/year)"
    """
    fates = " · ".join(
        f"ses-{_e(s)} <b class='fate fate-{_e(f)}'>{_e(f)}</b>"
        if f in FILTER_FATES
        else f"ses-{_e(s)} {_e(f or 'n/a')}"
        for s, f in zip(tracks.sessions[1:], tracks.fates(lid), strict=True)
    )
    call = tracks.sel_call(lid)
    if call == "n/a":
        return f"{fates} · SEL: n/a"
    last = next(
        (
            tracks.row(lid, s)
            for s in reversed(tracks.sessions)
            if _given(tracks.row(lid, s).get("sel_call"))
        ),
        {},
    )
    unit = last.get("rate_unit") if _given(last.get("rate_unit")) else "%/year"
    return (
        f"{fates} · SEL: {_e(call)}, {show(last, 'sel_rate', '.1f', ' ' + str(unit))} "
        f"(noise floor {show(last, 'sel_noise_floor', '.3g', ' ' + str(unit))})"
    )


def rim_text(tracks: LesionTracks, lid: int) -> str:
    """Return the lesion's rim calls per session (HTML; empty when no session has one).

    Examples:
        >>> t = LesionTracks(["1", "2"], {3: {"1": {"rim_call": "no", "rim_probability": "0.09"},
        ...                              "2": {"rim_call": "yes", "rim_probability": "0.53"}}})
        >>> rim_text(t, 3)
        'rim: ses-1 no (0.09), ses-2 yes (0.53)'
    """
    rows = [(s, tracks.row(lid, s)) for s in tracks.sessions]
    if not any(_given(r.get("rim_call")) for _, r in rows):
        return ""
    return "rim: " + ", ".join(
        f"ses-{_e(s)} {show(r, 'rim_call')}"
        + (f" ({show(r, 'rim_probability', '.2f')})" if _given(r.get("rim_probability")) else "")
        for s, r in rows
    )


def _lineage(row: Mapping[str, str]) -> str:
    """Return the row's merges and splits as text (empty without any)."""
    parts = []
    if _given(row.get("merged_from")) and row.get("merged_from", "").strip() not in ("0", ""):
        parts.append(f"lesions {_e(row['merged_from'])} merged into it")
    if (_float(row, "merged_into") or 0) > 0:
        parts.append(f"merged into lesion {show(row, 'merged_into', '.0f')}")
    if (_float(row, "split_from") or 0) > 0:
        parts.append(f"split off lesion {show(row, 'split_from', '.0f')}")
    return "; ".join(parts)


def _sel_cell(row: Mapping[str, str], n_sessions: int) -> str:
    """Return the row's SEL numbers (HTML; ``n/a`` when not decided there)."""
    if not _given(row.get("sel_call")):
        return "n/a"
    unit = str(row.get("rate_unit")) if _given(row.get("rate_unit")) else "%/year"
    parts = [
        f"<b>SEL {show(row, 'sel_call')}</b>:",
        f"candidate rate {show(row, 'sel_rate', '.1f', ' ' + unit)}",
        f"lesion rate {show(row, 'sel_lesion_rate', '.1f', ' ' + unit)}",
        f"noise floor {show(row, 'sel_noise_floor', '.3g', ' ' + unit)}",
        f"concentricity {show(row, 'sel_concentricity', '.2f')}",
    ]
    if n_sessions >= 3:
        parts.append(f"constancy (R²) {show(row, 'sel_constancy', '.2f')}")
    parts.append(f"candidate {show(row, 'sel_candidate_ul', '.0f', ' µl')}")
    return " ".join(parts[:1]) + " " + " · ".join(parts[1:])


def _crop(lid: int, key: str, picture: Mapping[str, str] | None, caption: str) -> str:
    """Return the ``<figure>`` of one grid crop (filled in by the page's script)."""
    if picture is None:
        return "<span class='note'>not on the grid</span>"
    return (
        f'<figure class="crop"><img data-lesion="{lid}" data-grid="{_e(key)}" '
        f'alt="{_e(caption)} lesion {lid}"><figcaption>{_e(caption)} — '
        f"{_e(picture['window'])}</figcaption></figure>"
    )


def _numbers(tracks: LesionTracks, lid: int, k: int) -> str:
    """Return the numbers of lesion ``lid`` at the ``k``-th session (HTML lines): fate and its
    evidence, merges and splits, volume, change over the interval, SEL, T1 change, rim."""
    s = tracks.sessions[k]
    row = tracks.row(lid, s)
    fate, evidence, lineage = row.get("fate", "n/a"), row.get("fate_evidence", ""), _lineage(row)
    lines = [f"<b class='fate fate-{_e(fate)}'>{_e(fate)}</b>"]
    if _given(evidence):
        lines[0] += f": <span class='evidence'>{_e(evidence)}</span>"
    if lineage:
        lines.append(f"<span class='lineage'>{lineage}</span>")
    instances = row.get("instances", "")
    lines.append(
        f"volume {show(row, 'volume_ul', '.1f', ' µl')}"
        + (f" <span class='note'>(instances {_e(instances)})</span>" if instances else "")
    )
    if k:
        lines.append(
            f"expansion {show(row, 'expansion_pct', '+.1f', ' %')} · rate "
            f"{show(row, 'rate', '+.1f', ' ' + tracks.unit(s))} · brightened growth "
            f"{show(row, 'growth_ul', '.0f', ' µl')} · FLAIR change z "
            f"{show(row, 'change_z', '+.2f')}"
        )
    sel = _sel_cell(row, len(tracks.sessions))
    if sel != "n/a":
        lines.append(f"<span class='sel'>{sel}</span>")
    if _given(row.get("t1_change_pct")):
        lines.append(f"T1 change {show(row, 't1_change_pct', '+.1f', ' %')} of NAWM")
    if _given(row.get("rim_call")):
        lines.append(f"rim {show(row, 'rim_call')} ({show(row, 'rim_probability', '.2f')})")
    return "<br>".join(lines)


def sessions_table(
    tracks: LesionTracks, lid: int, pictures: Mapping[str, Mapping[str, str]]
) -> str:
    """Return the card's table of lesion ``lid``: one row per session with its crops on the
    within-subject grid (FLAIR, and the expansion since the session before) and its numbers
    (:func:`_numbers`)."""
    head = (
        "<table class='tracked'><tr><th>session</th><th>FLAIR on the within-subject grid</th>"
        "<th>expansion since the session before</th><th>fate and numbers</th></tr>"
    )
    rows = []
    for k, s in enumerate(tracks.sessions):
        name, when = f"ses-{s}", tracks.dates.get(s, "")
        flair = _crop(lid, f"{name}:FLAIR", pictures.get(f"{name}:FLAIR"), f"{name} FLAIR")
        key = f"{name}:expansion"
        expansion = _crop(lid, key, pictures.get(key), f"{name} expansion") if k else ""
        rows.append(
            f"<tr data-session='{_e(s)}' data-fate='{_e(tracks.row(lid, s).get('fate', ''))}'>"
            f"<td>{_e(name)}"
            + (f"<br><span class='note'>{_e(when[:10])}</span>" if when else "")
            + f"</td><td>{flair}</td><td>{expansion}</td><td>{_numbers(tracks, lid, k)}</td></tr>"
        )
    return head + "".join(rows) + "</table>"


def activity_section(tracks: LesionTracks) -> str:
    """Return the summary's lesion activity: one row per interval, and the messages."""
    cells = "".join(f"<th>{_e(h)}</th>" for _, h in ACTIVITY_COLUMNS)
    rows = []
    for row in tracks.intervals:
        years = show(row, "years", ".2f")
        tds = [f"<td>{show(row, 'interval')}</td>", f"<td>{years}</td>"]
        for column, _ in ACTIVITY_COLUMNS[2:]:
            spec = ".0f" if column.endswith("_ul") else ".3g" if column == "noise_floor" else ""
            tds.append(f"<td class='{_e(column)}'>{show(row, column, spec)}</td>")
        rows.append(f"<tr data-interval='{_e(row.get('interval'))}'>{''.join(tds)}</tr>")
    dates = ", ".join(
        f"ses-{_e(s)}: {_e(tracks.dates.get(s) or 'no date')}"
        + (f" ({_e(tracks.date_sources[s])})" if tracks.date_sources.get(s) else "")
        for s in tracks.sessions
    )
    messages = "".join(f"<li>{_e(m)}</li>" for m in tracks.messages)
    return (
        "<h3>Lesion activity per interval</h3>"
        f"<table class='activity'><tr>{cells}</tr>{''.join(rows)}</table>"
        f"<p class='note'>Session dates: {dates}. Rates per year; per interval where a date is "
        "missing (years n/a). Noise floor: the 95th percentile of the mean expansion of "
        "lesion-sized spheres in normal-appearing white matter; an SEL's rate must clear it. "
        "PRL: rim call yes at the interval's later session.</p>"
        + (f"<ul class='messages warnings'>{messages}</ul>" if messages else "")
    )


def activity_line(intervals: Sequence[Mapping[str, str]]) -> str:
    """Return the activity table in one line for the cohort index (HTML; ``n/a`` without).

    Examples:
        >>> activity_line([{"interval": "01-02", "new_count": "2", "enlarging_count": "1",
        ...                 "sel_count": "0", "prl_sel_count": "0"}])
        '01-02: 2 new, 1 enlarging, 0 SEL, 0 PRL ∧ SEL'
    """
    return (
        "; ".join(
            f"{show(r, 'interval')}: {show(r, 'new_count')} new, {show(r, 'enlarging_count')} "
            f"enlarging, {show(r, 'sel_count')} SEL, {show(r, 'prl_sel_count')} PRL ∧ SEL"
            for r in intervals
        )
        or "n/a"
    )
