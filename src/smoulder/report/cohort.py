"""The cohort page (``cohort.html``): distributions, each subject's trajectory, links to reports.

Built from :class:`smoulder.cohort.CohortTables` (the group level's tables); nothing is
computed here beyond placing the numbers on a plot. One self-contained page with inline SVG,
like the run's other pages.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from smoulder import __version__
from smoulder.cohort import CohortTables, numeric_column, trajectories
from smoulder.report.pages import _page

#: Session markers plotted over time, per subject (column, title).
TRAJECTORY_MARKERS: tuple[tuple[str, str], ...] = (
    ("lesion_volume_ml", "lesion volume (mL)"),
    ("lesion_count", "lesions"),
    ("prl_count", "paramagnetic rim lesions"),
    ("nbv_ml", "normalised brain volume (mL)"),
    ("gm_ml", "grey matter (mL)"),
    ("cord_csa_mm2", "cord area (mm²)"),
)
#: Interval markers shown as distributions (column, title).
INTERVAL_MARKERS: tuple[tuple[str, str], ...] = (
    ("new_count", "new lesions per interval"),
    ("enlarging_count", "enlarging lesions per interval"),
    ("sel_count", "slowly expanding lesions"),
    ("pbvc_per_year_pct", "PBVC per year (%)"),
    ("gm_per_year_pct", "grey-matter change per year (%)"),
    ("cord_csa_per_year_pct", "cord area change per year (%)"),
)


def histogram_svg(values: Sequence[float], *, bins: int = 12, width=220, height=90) -> str:
    """Return an inline SVG histogram of ``values`` (its range and count labelled).

    Examples:
        >>> svg = histogram_svg([1.0, 2.0, 2.5, 4.0])
        >>> svg.count("<rect"), "n = 4" in svg
        (12, True)
        >>> "no data" in histogram_svg([])
        True
    """
    if not values:
        return f'<svg width="{width}" height="{height}"><text x="4" y="20">no data</text></svg>'
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(int((v - low) / span * bins), bins - 1)] += 1
    top, m = max(counts), 14
    bar = (width - 2 * m) / bins
    rects = "".join(
        f'<rect x="{m + i * bar:.1f}" y="{height - m - c / top * (height - 2 * m):.1f}" '
        f'width="{bar - 1:.1f}" height="{c / top * (height - 2 * m):.1f}" fill="steelblue"/>'
        for i, c in enumerate(counts)
    )
    return (
        f'<svg width="{width}" height="{height}" role="img" aria-label="histogram">{rects}'
        f'<text x="2" y="10" font-size="9">n = {len(values)}</text>'
        f'<text x="{m}" y="{height - 2}" font-size="9">{low:.4g}</text>'
        f'<text x="{width - m}" y="{height - 2}" font-size="9" text-anchor="end">{high:.4g}</text>'
        "</svg>"
    )


def trajectories_svg(series: dict[str, list[tuple[str, float]]], *, width=320, height=140) -> str:
    """Return an inline SVG with one line per subject over its sessions (in session order).

    Examples:
        >>> svg = trajectories_svg({"sub-01": [("ses-01", 1.0), ("ses-02", 2.0)]})
        >>> svg.count("<polyline"), "sub-01" in svg
        (1, True)
    """
    if not series:
        return f'<svg width="{width}" height="{height}"><text x="4" y="20">no data</text></svg>'
    values = [v for points in series.values() for _, v in points]
    low, high = min(values), max(values)
    span = (high - low) or max(abs(high), 1.0)
    steps = max(len(points) for points in series.values()) - 1 or 1
    m = 16
    lines = []
    for k, (subject, points) in enumerate(sorted(series.items())):
        hue = (k * 137) % 360
        xy = [
            (m + i / steps * (width - 2 * m), height - m - (v - low) / span * (height - 2 * m))
            for i, (_, v) in enumerate(points)
        ]
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
        lines.append(
            f'<polyline points="{coords}" fill="none" stroke="hsl({hue},60%,40%)">'
            f"<title>{html.escape(subject)}</title></polyline>"
        )
    return (
        f'<svg width="{width}" height="{height}" role="img" aria-label="trajectories">'
        + "".join(lines)
        + f'<text x="2" y="10" font-size="9">{high:.4g}</text>'
        f'<text x="2" y="{height - 2}" font-size="9">{low:.4g}</text></svg>'
    )


def _session_key(row: dict[str, str]) -> str:
    return row["session_id"]


def cohort_page(tables: CohortTables, subjects_with_reports: Sequence[str]) -> str:
    """Return the HTML of ``cohort.html``.

    Args:
        tables: the group level's cohort tables.
        subjects_with_reports: subjects (``sub-X``) whose report ``sub-X.html`` exists.
    """
    parts = [f"<h1>smoulder cohort</h1><p>smoulder {html.escape(__version__)}; "
             f"{len({r['participant_id'] for r in tables.sessions})} subjects, "
             f"{len(tables.sessions)} sessions, {len(tables.intervals)} intervals. Tables: "
             "<a href='group_sessions.tsv'>group_sessions.tsv</a>, "
             "<a href='group_intervals.tsv'>group_intervals.tsv</a> (with JSON "
             "dictionaries).</p>"]  # fmt: skip
    parts.append("<h2>Each subject over time</h2><table><tr>")
    shown = [(c, t) for c, t in TRAJECTORY_MARKERS if c in tables.session_dictionary]
    for column, title in shown:
        svg = trajectories_svg(trajectories(tables.sessions, column, _session_key))
        parts.append(f"<td><b>{html.escape(title)}</b><br>{svg}</td>")
    parts.append("</tr></table><h2>Distributions</h2><table><tr>")
    for column, title in shown:
        svg = histogram_svg(numeric_column(tables.sessions, column))
        parts.append(f"<td><b>{html.escape(title)}</b> (sessions)<br>{svg}</td>")
    parts.append("</tr><tr>")
    for column, title in INTERVAL_MARKERS:
        if column in tables.interval_dictionary:
            svg = histogram_svg(numeric_column(tables.intervals, column))
            parts.append(f"<td><b>{html.escape(title)}</b><br>{svg}</td>")
    parts.append("</tr></table><h2>Subjects</h2><ul>")
    for subject in sorted({r["participant_id"] for r in tables.sessions}):
        name = html.escape(subject)
        link = f"<a href='{name}.html'>{name}</a>" if subject in subjects_with_reports else name
        n = sum(r["participant_id"] == subject for r in tables.sessions)
        parts.append(f"<li>{link}: {n} session{'s' if n != 1 else ''}</li>")
    parts.append("</ul>")
    return _page("smoulder cohort", "".join(parts))
