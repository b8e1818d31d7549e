"""The run's plain pages: ``inputs.html`` (each session's inputs and checks) and ``report.html``
(what each session produced, what failed, how long each step took).

Functions here return HTML text from tables the caller prepared; the derivatives writer names
and writes the files. Both pages share one stylesheet, :data:`RUN_CSS`, inlined so that a page
opens alone (from a file share, inside a container).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from smoulder import __version__

#: The stylesheet of the run's plain pages.
RUN_CSS = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
    ".fail{background:#fde2e2}.pass{background:#e6f5e6}"
)
#: Status values (prefixes) shown as failures in the sessions table.
FAILED_STATUS = ("failed", "skipped", "not run", "incomplete")


def _page(title: str, body: str) -> str:
    """Return a complete page: ``title``, the inlined :data:`RUN_CSS`, ``body``."""
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>{RUN_CSS}</style></head><body>" + body + "</body></html>\n"
    )


def inputs_page(sessions: Sequence[Mapping[str, Any]]) -> str:
    """Return the HTML of ``inputs.html``: one row per session, coloured by its checks.

    Args:
        sessions: one summary per session, with ``subject`` (``sub-X``), ``session``
            (``ses-Y`` or ``n/a``), ``found`` (modality names), ``analyses``, ``n_errors``,
            ``errors`` and ``warnings`` (messages).

    Examples:
        >>> row = {"subject": "sub-01", "session": "n/a", "found": ["FLAIR"], "analyses": [],
        ...        "n_errors": 1, "errors": ["no <T1w>"], "warnings": []}
        >>> page = inputs_page([row])
        >>> "<tr class='fail'><td>sub-01</td>" in page, "no &lt;T1w&gt;" in page
        (True, True)
    """
    rows = []
    for r in sessions:
        status = "fail" if r["n_errors"] else "pass"
        errors = "".join(f"<li>{html.escape(e)}</li>" for e in r["errors"])
        warnings = "".join(f"<li>{html.escape(w)}</li>" for w in r["warnings"])
        rows.append(
            f"<tr class='{status}'><td>{html.escape(r['subject'])}</td>"
            f"<td>{html.escape(r['session'])}</td><td>{html.escape(', '.join(r['found']))}</td>"
            f"<td>{html.escape(', '.join(r['analyses']))}</td><td>{status}</td>"
            f"<td><ul>{errors}{warnings}</ul></td></tr>"
        )
    return _page(
        "smoulder inputs",
        f"<h1>smoulder {html.escape(__version__)}: inputs</h1>"
        f"<p>{len(sessions)} session(s); "
        f"{sum(1 for r in sessions if r['n_errors'])} with errors.</p>"
        "<table><thead><tr><th>subject</th><th>session</th><th>found</th><th>analyses</th>"
        "<th>status</th><th>messages</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>",
    )


def _status_cell(key: str, value: Any) -> str:
    """Return a table cell of ``value``; a ``status`` cell is marked pass or fail."""
    css = ""
    if key == "status":
        text = str(value)
        css = (
            " class='pass'"
            if text == "ok"
            else " class='fail'"
            if text.startswith(FAILED_STATUS)
            else ""
        )
    return f"<td{css}>{html.escape(str(value))}</td>"


def _sessions_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Return the sessions table: one column per key of the first row."""
    header = list(rows[0]) if rows else []
    summary = "".join(
        "<tr>" + "".join(_status_cell(k, r[k]) for k in header) + "</tr>" for r in rows
    )
    return (
        "<table><thead><tr>"
        + "".join(f"<th>{html.escape(k)}</th>" for k in header)
        + f"</tr></thead><tbody>{summary}</tbody></table>"
    )


def _steps_table(nodes: Sequence[Any]) -> str:
    """Return the table of each step's status, seconds and peak memory (MiB)."""
    timing_rows = []
    for n in nodes:
        if getattr(n, "kind", "step") != "step":
            continue
        duration = "" if n.duration_s is None else f"{n.duration_s:.1f}"
        memory = "" if n.mem_peak_gb is None else f"{n.mem_peak_gb * 1024:.0f}"
        timing_rows.append(
            f"<tr><td>{html.escape(n.node)}</td><td>{html.escape(n.status)}</td>"
            f"<td>{duration}</td><td>{memory}</td></tr>"
        )
    return (
        "<table><thead><tr><th>step</th><th>status</th><th>seconds</th>"
        "<th>peak MiB</th></tr></thead><tbody>" + "".join(timing_rows) + "</tbody></table>"
    )


def run_page(
    rows: Sequence[Mapping[str, Any]],
    failures: Sequence[str],
    *,
    run: str,
    nodes: Sequence[Any] = (),
    methods: str = "",
) -> str:
    """Return the HTML of ``report.html``: what each session produced and what failed.

    Args:
        rows: one per subject and session (``subject``, ``session``, ``steps``, ``ran``,
            ``cached``, ``outputs``, ``status``), as the console summary shows them.
        failures: one line per failed step (session, step, inputs, error, crash file).
        run: the run's stamp, named in the title.
        nodes: per-node records (``node``, ``status``, ``duration_s``, ``mem_peak_gb``...)
            for the timing table.
        methods: the methods paragraph to cite the run (``HowToAcknowledge``), or empty.

    Examples:
        >>> page = run_page([{"session": "ses-01", "status": "ok"}], [], run="R1")
        >>> "<td class='pass'>ok</td>" in page, "<li>none</li>" in page
        (True, True)
    """
    failed = "".join(f"<li>{html.escape(line)}</li>" for line in failures) or "<li>none</li>"
    return _page(
        "smoulder run",
        f"<h1>smoulder {html.escape(__version__)}: run {html.escape(run)}</h1>"
        "<p>Inputs and their checks: <a href='inputs.html'>inputs.html</a>; "
        "configuration, provenance, log and crash files: <code>logs/</code>.</p>"
        f"<h2>Sessions</h2>{_sessions_table(rows)}"
        f"<h2>Failures</h2><ul>{failed}</ul>"
        f"<h2>Steps</h2>{_steps_table(nodes)}"
        + (f"<h2>Methods and citation</h2><p>{html.escape(methods)}</p>" if methods else ""),
    )
