"""The report's "Atrophy and cord" section, built on the atrophy tables only.

Volumes per session come from each session's ``desc-atrophy_stats.tsv``; changes and yearly
rates only from the subject's ``sub-X_desc-atrophy_stats.tsv``, which measures them within
the subject (:mod:`smoulder.atrophy.subject`). No rate is ever computed here from two
sessions' independent volumes: a subject without the within-subject table shows its volumes
and says that no change was measured. Beside every rate stands its scan-rescan uncertainty,
the figure :data:`smoulder.atrophy.columns.SCAN_RESCAN` records from the benchmark.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from smoulder.atrophy.columns import SCAN_RESCAN, SCAN_RESCAN_SOURCE
from smoulder.derivatives import bids_name
from smoulder.images import read_tsv
from smoulder.report import render

#: Session rows shown: (column, label, format).
SESSION_ROWS = (
    ("brain_ml", "brain volume (ml)", "{:.1f}"),
    ("nbv_ml", "normalised brain volume (ml)", "{:.1f}"),
    ("bpf", "brain parenchymal fraction", "{:.4f}"),
    ("gm_ml", "grey matter (ml)", "{:.1f}"),
    ("cortical_gm_ml", "cortical grey matter (ml)", "{:.1f}"),
    ("deep_gm_ml", "deep grey matter (ml)", "{:.1f}"),
    ("wm_lesions_filled_ml", "white matter, lesions filled (ml)", "{:.1f}"),
    ("lesion_ml", "lesions (ml)", "{:.2f}"),
    ("icv_ml", "intracranial volume (ml)", "{:.1f}"),
    ("cord_csa_mm2", "cord area (mm²)", "{:.1f}"),
)
#: Change rows: (measure, label, change-since-baseline column, yearly-rate column, class column).
CHANGE_ROWS = (
    ("pbvc", "brain (PBVC)", "pbvc_from_baseline_pct", "pbvc_per_year_pct", "pbvc_class"),
    ("gm", "grey matter", "gm_change_from_baseline_pct", "gm_per_year_pct", "gm_class"),
    ("cord_csa", "cord area", "cord_csa_change_from_baseline_pct", "cord_csa_per_year_pct",
     "cord_csa_class"),
)  # fmt: skip


def _e(text: object) -> str:
    return html.escape(str(text))


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out == out else None  # NaN → None


def session_rows(subject_dir: Path, subject: str, labels: list[str]) -> list[dict[str, Any]]:
    """Return each session's cross-sectional row (empty where the session has none)."""
    rows = []
    for label in (x.removeprefix("ses-") for x in labels):
        entities = {"sub": subject.removeprefix("sub-"), "ses": label, "desc": "atrophy"}
        path = (
            subject_dir
            / f"ses-{label}"
            / "anat"
            / bids_name(entities, suffix="stats", extension=".tsv")
        )
        rows.append(read_tsv(path)[0] if path.is_file() else {})
    return rows


def subject_table(subject_dir: Path, subject: str) -> list[dict[str, Any]]:
    """Return the subject's within-subject atrophy table (empty when it has none)."""
    entities = {"sub": subject.removeprefix("sub-"), "desc": "atrophy"}
    path = subject_dir / bids_name(entities, suffix="stats", extension=".tsv")
    return read_tsv(path) if path.is_file() else []


def brain_rate(subject_dir: Path, subject: str) -> float | None:
    """Return the subject's PBVC per year measured within the subject (None without)."""
    table = subject_table(subject_dir, subject)
    return _number(table[-1].get("pbvc_per_year_pct")) if len(table) > 1 else None


def _uncertainty(measure: str) -> str:
    figure = SCAN_RESCAN.get(measure)
    return "" if figure is None else f" <span class='uncertainty'>± {figure:.2f}</span>"


def atrophy_section(subject_dir: Path, subject: str, labels: list[str]) -> str:
    """Return the section: per-session volumes and cord area, then the within-subject changes
    since the first session with their yearly rates, classes, uncertainty and trends."""
    rows = session_rows(subject_dir, subject, labels)
    table = {r["session"]: r for r in subject_table(subject_dir, subject)}
    bare = [x.removeprefix("ses-") for x in labels]
    parts = ['<section id="atrophy"><h2>Atrophy and cord</h2>']
    parts.append(
        "<table class='volumes'><tr><th>measure</th>"
        + "".join(f"<th>{_e(s)}</th>" for s in labels)
        + "</tr>"
    )
    for column, label, fmt in SESSION_ROWS:
        values = [_number(r.get(column)) for r in rows]
        cells = "".join(f"<td>{'n/a' if v is None else fmt.format(v)}</td>" for v in values)
        parts.append(f"<tr><td>{_e(label)}</td>{cells}</tr>")
    parts.append("</table>")
    reasons = [
        f"{_e(s)}: {_e(r.get('cord_reason', ''))}"
        for s, r in zip(labels, rows, strict=True)
        if r and r.get("cord_status") != "measured"
    ]
    flags = [f"{_e(s)}: cord on the FLAIR (no T1w)" for s, r in zip(labels, rows, strict=True)
             if r.get("cord_flag", "none") not in ("none", "")]  # fmt: skip
    if reasons or flags:
        parts.append("<p class='note'>Cord " + "; ".join(reasons + flags) + "</p>")
    if len(table) < 2:
        parts.append(
            "<p class='note'>No change measured: the within-subject atrophy needs two or more "
            "sessions (volumes of independent segmentations are not compared).</p></section>"
        )
        return "".join(parts)
    ordered = [table[s] for s in bare if s in table]
    years = [_number(r.get("years_from_baseline")) for r in ordered]
    times = [y if y is not None else float(k) for k, y in enumerate(years)]
    method = ordered[-1].get("pbvc_method", "jacobian")
    parts.append(
        "<table class='changes'><tr><th>change since the first session (%)</th>"
        + "".join(f"<th>{_e(s)}</th>" for s in labels[1:])
        + "<th>rate %/year (± scan-rescan)</th><th>class</th><th>trend</th></tr>"
    )
    for measure, label, column, rate_column, class_column in CHANGE_ROWS:
        changes = [_number(r.get(column)) for r in ordered[1:]]
        rate = _number(ordered[-1].get(rate_column))
        klass = ordered[-1].get(class_column, "n/a")
        svg = render.trajectory_svg(times, [0.0, *changes], unit="%")
        parts.append(
            f"<tr data-measure='{measure}'><td>{_e(label)}</td>"
            + "".join(f"<td>{'n/a' if c is None else f'{c:+.2f}'}</td>" for c in changes)
            + f"<td>{'n/a' if rate is None else f'{rate:+.2f}'}{_uncertainty(measure)}</td>"
            f"<td>{_e(klass)}</td><td>{svg}</td></tr>"
        )
    how = (
        "Jacobian integration over the within-subject registration"
        if method == "jacobian"
        else "boundary shift (edge motion)"
    )
    parts.append(
        f"</table><p class='note'>Measured within the subject: PBVC by {how}"
        " (both estimators are in the table), grey matter by Jacobian integration over the "
        "joint grey-matter map, the cord at one level for all sessions. Whole-brain cut-off "
        "-0.4 %/year (De Stefano et al., JNNP 2016). ± : the scan-rescan error per interval of "
        f"smoulder's benchmark ({_e(SCAN_RESCAN_SOURCE)}).</p></section>"
    )
    return "".join(parts)
