"""The cohort tables of the group level: every marker of every session and interval, gathered.

``smoulder BIDS OUT group`` reads what the participant level wrote for each subject and writes
two tables, each with its JSON column dictionary (units and sources):

* ``group_sessions.tsv`` — one row per session: lesion count and volume, paramagnetic rim
  lesions, brain, grey-matter, white-matter and intracranial volumes, brain parenchymal
  fraction, normalised brain volume, cord area;
* ``group_intervals.tsv`` — one row per interval between a subject's sessions: new and
  enlarging lesions, slowly expanding lesions (and those that are also PRL), PBVC, grey-matter
  and cord-area change, and the yearly rates with their classification.

Nothing is computed anew: each value is copied from the subject's own table (named in the
dictionary), so the cohort table and the subject reports cannot disagree. A marker whose
table no subject has (a run without susceptibility data has no rim calls) is left out as a
column rather than filled with ``n/a``; a subject that lacks a table another subject has gets
``n/a`` in those columns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from smoulder.images import read_tsv

NA = "n/a"


@dataclass(frozen=True)
class Column:
    """One cohort column: its name, description, unit, and the subject table it comes from."""

    name: str
    description: str
    units: str | None
    source: str


def _column(name: str, description: str, units: str | None, source: str) -> Column:
    return Column(name, description, units, source)


_LESIONS = "sub-X_ses-Y_desc-lesions_stats.tsv"
_SESSION_ATROPHY = "sub-X_ses-Y_desc-atrophy_stats.tsv"
_ACTIVITY = "sub-X_desc-activity_longitudinal.tsv"
_SUBJECT_ATROPHY = "sub-X_desc-atrophy_stats.tsv"

#: Session columns after participant_id and session_id, in order.
SESSION_COLUMNS: tuple[Column, ...] = (
    _column("lesion_count", "lesions (numbered instances)", None, _LESIONS),
    _column("lesion_volume_ml", "total lesion volume", "mL", _LESIONS),
    _column("prl_count", "lesions with a rim call 'yes' (paramagnetic rim lesions)", None,
            _LESIONS),
    _column("rim_assessed_count", "lesions assessed for a rim", None, _LESIONS),
    _column("brain_ml", "brain parenchyma volume", "mL", _SESSION_ATROPHY),
    _column("gm_ml", "grey-matter volume (cortical + deep)", "mL", _SESSION_ATROPHY),
    _column("cortical_gm_ml", "cortical grey-matter volume", "mL", _SESSION_ATROPHY),
    _column("deep_gm_ml", "deep grey-matter volume", "mL", _SESSION_ATROPHY),
    _column("wm_lesions_filled_ml", "white-matter volume with lesions filled", "mL",
            _SESSION_ATROPHY),
    _column("icv_ml", "intracranial volume", "mL", _SESSION_ATROPHY),
    _column("bpf", "brain parenchymal fraction (brain / intracranial)", None, _SESSION_ATROPHY),
    _column("nbv_ml", "brain volume normalised to a standard head size", "mL", _SESSION_ATROPHY),
    _column("cord_csa_mm2", "upper cervical cord cross-sectional area", "mm^2",
            _SESSION_ATROPHY),
    _column("cord_status", "whether the cord was measurable", None, _SESSION_ATROPHY),
)  # fmt: skip

#: Interval columns after participant_id, from_session and to_session, in order.
INTERVAL_COLUMNS: tuple[Column, ...] = (
    _column("years", "time between the sessions (n/a: a date is missing)", "year", _ACTIVITY),
    _column("new_count", "new lesions", None, _ACTIVITY),
    _column("new_volume_ml", "volume of the new lesions at the later session", "mL", _ACTIVITY),
    _column("enlarging_count", "enlarging lesions", None, _ACTIVITY),
    _column("enlarging_volume_ml", "volume gained by the enlarging lesions", "mL", _ACTIVITY),
    _column("sel_count", "slowly expanding lesions", None, _ACTIVITY),
    _column("sel_volume_ml", "volume of the slowly expanding lesion candidates", "mL",
            _ACTIVITY),
    _column("prl_sel_count", "lesions that are both PRL and SEL", None, _ACTIVITY),
    _column("pbvc_pct", "percentage brain volume change over the interval", "%",
            _SUBJECT_ATROPHY),
    _column("pbvc_per_year_pct", "PBVC per year", "%/year", _SUBJECT_ATROPHY),
    _column("pbvc_class", "the yearly PBVC against the published MS cut-off", None,
            _SUBJECT_ATROPHY),
    _column("gm_change_pct", "grey-matter volume change over the interval", "%",
            _SUBJECT_ATROPHY),
    _column("gm_per_year_pct", "grey-matter change per year", "%/year", _SUBJECT_ATROPHY),
    _column("cord_csa_change_pct", "cord area change over the interval", "%",
            _SUBJECT_ATROPHY),
    _column("cord_csa_per_year_pct", "cord area change per year", "%/year", _SUBJECT_ATROPHY),
)  # fmt: skip


def _float(text: str | None) -> float | None:
    try:
        return None if text in (None, "", NA) else float(text)
    except ValueError:
        return None


def _fmt(value: float | None, digits: int = 4) -> str:
    return NA if value is None else f"{round(value, digits):g}"


def _ul_to_ml(text: str | None) -> str:
    value = _float(text)
    return NA if value is None else _fmt(value / 1000.0)


def lesion_markers(rows: Sequence[dict[str, str]]) -> dict[str, str]:
    """Return a session's lesion columns from the rows of its lesion table.

    Examples:
        >>> rows = [{"volume_ul": "120", "rim_call": "yes", "rim_status": "assessed"},
        ...         {"volume_ul": "30", "rim_call": "no", "rim_status": "assessed"}]
        >>> m = lesion_markers(rows)
        >>> m["lesion_count"], m["lesion_volume_ml"], m["prl_count"], m["rim_assessed_count"]
        ('2', '0.15', '1', '2')
    """
    volume = sum(_float(r.get("volume_ul")) or 0.0 for r in rows) / 1000.0
    out = {"lesion_count": str(len(rows)), "lesion_volume_ml": _fmt(volume)}
    if rows and "rim_call" in rows[0]:
        assessed = [r for r in rows if r.get("rim_status") == "assessed"]
        out["prl_count"] = str(sum(r.get("rim_call") == "yes" for r in assessed))
        out["rim_assessed_count"] = str(len(assessed))
    return out


def _copy(row: dict[str, str], names: Sequence[str]) -> dict[str, str]:
    return {name: row[name] for name in names if name in row}


def _session_row(subject_dir: Path, ses_dir: Path) -> dict[str, str]:
    sub, ses = subject_dir.name, ses_dir.name
    anat = ses_dir / "anat"
    row = {"participant_id": sub, "session_id": ses}
    lesions = anat / f"{sub}_{ses}_desc-lesions_stats.tsv"
    if lesions.is_file():
        row.update(lesion_markers(read_tsv(lesions)))
    atrophy = anat / f"{sub}_{ses}_desc-atrophy_stats.tsv"
    if atrophy.is_file():
        rows = read_tsv(atrophy)
        if rows:
            names = [c.name for c in SESSION_COLUMNS if c.source == _SESSION_ATROPHY]
            row.update(_copy(rows[0], names))
    return row


def _interval_rows(subject_dir: Path) -> list[dict[str, str]]:
    sub = subject_dir.name
    anat = subject_dir / "anat"
    by_pair: dict[tuple[str, str], dict[str, str]] = {}
    activity = anat / f"{sub}_desc-activity_longitudinal.tsv"
    if activity.is_file():
        for r in read_tsv(activity):
            key = ("ses-" + r["from_session"], "ses-" + r["to_session"])
            row = by_pair.setdefault(key, {})
            row.update(_copy(r, ("years", "new_count", "enlarging_count", "sel_count",
                                 "prl_sel_count")))  # fmt: skip
            for name in ("new_volume", "enlarging_volume", "sel_volume"):
                if f"{name}_ul" in r:
                    row[f"{name}_ml"] = _ul_to_ml(r[f"{name}_ul"])
    atrophy = anat / f"{sub}_desc-atrophy_stats.tsv"
    if atrophy.is_file():
        previous: str | None = None
        previous_years: float | None = None
        for r in read_tsv(atrophy):
            session = "ses-" + r["session"].removeprefix("ses-")
            years = _float(r.get("years_from_baseline"))
            if previous is not None:
                row = by_pair.setdefault((previous, session), {})
                renamed = {
                    "pbvc_pct": r.get("pbvc_interval_pct", NA),
                    "gm_change_pct": r.get("gm_change_interval_pct", NA),
                    "cord_csa_change_pct": r.get("cord_csa_change_interval_pct", NA),
                }
                row.update(renamed)
                row.update(_copy(r, ("pbvc_per_year_pct", "pbvc_class", "gm_per_year_pct",
                                     "cord_csa_per_year_pct")))  # fmt: skip
                if "years" not in row:
                    known = years is not None and previous_years is not None
                    row["years"] = _fmt(years - previous_years) if known else NA  # type: ignore[operator]
            previous, previous_years = session, years
    return [
        {"participant_id": sub, "from_session": a, "to_session": b, **values}
        for (a, b), values in sorted(by_pair.items())
    ]


def _present(columns: Sequence[Column], rows: Sequence[dict[str, str]]) -> list[Column]:
    """Return the columns some row has (a marker no subject has is left out)."""
    return [c for c in columns if any(c.name in r for r in rows)]


def _filled(rows: list[dict[str, str]], names: Sequence[str]) -> list[dict[str, str]]:
    return [{name: r.get(name, NA) for name in names} for r in rows]


def _dictionary(keys: Sequence[tuple[str, str]], columns: Sequence[Column]) -> dict[str, dict]:
    out: dict[str, dict] = {name: {"Description": text} for name, text in keys}
    for c in columns:
        entry: dict[str, str] = {"Description": c.description, "Source": c.source}
        if c.units:
            entry["Units"] = c.units
        out[c.name] = entry
    return out


@dataclass(frozen=True)
class CohortTables:
    """The two cohort tables (rows as strings by column) and their column dictionaries."""

    sessions: list[dict[str, str]]
    intervals: list[dict[str, str]]
    session_dictionary: dict[str, dict]
    interval_dictionary: dict[str, dict]


def cohort_tables(derivatives: Path, participants: Sequence[str] | None = None) -> CohortTables:
    """Return the cohort tables of the participant-level outputs in ``derivatives``.

    Args:
        derivatives: the pipeline's output folder (``OUT/smoulder``).
        participants: labels without ``sub-`` to include (default: every subject there).
    """
    sessions: list[dict[str, str]] = []
    intervals: list[dict[str, str]] = []
    for subject_dir in sorted(p for p in derivatives.glob("sub-*") if p.is_dir()):
        if participants and subject_dir.name.removeprefix("sub-") not in participants:
            continue
        for ses_dir in sorted(p for p in subject_dir.glob("ses-*") if p.is_dir()):
            sessions.append(_session_row(subject_dir, ses_dir))
        intervals.extend(_interval_rows(subject_dir))
    s_cols = _present(SESSION_COLUMNS, sessions)
    i_cols = _present(INTERVAL_COLUMNS, intervals)
    s_keys = (("participant_id", "subject"), ("session_id", "session"))
    i_keys = (("participant_id", "subject"), ("from_session", "earlier session"),
              ("to_session", "later session"))  # fmt: skip
    return CohortTables(
        sessions=_filled(sessions, [k for k, _ in s_keys] + [c.name for c in s_cols]),
        intervals=_filled(intervals, [k for k, _ in i_keys] + [c.name for c in i_cols]),
        session_dictionary=_dictionary(s_keys, s_cols),
        interval_dictionary=_dictionary(i_keys, i_cols),
    )


def numeric_column(rows: Sequence[dict[str, str]], name: str) -> list[float]:
    """Return the numbers of column ``name`` (``n/a`` and text left out)."""
    values = (_float(r.get(name)) for r in rows)
    return [v for v in values if v is not None]


def trajectories(
    rows: Sequence[dict[str, str]], name: str, order: Callable[[dict[str, str]], str]
) -> dict[str, list[tuple[str, float]]]:
    """Return, per subject, ``(session or interval, value)`` of column ``name`` in ``order``."""
    out: dict[str, list[tuple[str, float]]] = {}
    for r in sorted(rows, key=order):
        value = _float(r.get(name))
        if value is not None:
            out.setdefault(r["participant_id"], []).append((order(r), value))
    return out
