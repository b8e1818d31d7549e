"""Session dates and the time between sessions, in years."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path

#: Seconds in a Julian year (365.25 days), the year of every rate per year.
SECONDS_PER_YEAR = 365.25 * 86400


def session_dates(rows: Iterable[Mapping[str, str]]) -> dict[str, datetime]:
    """Return ``{session: acquisition time}`` from the rows of a BIDS ``sessions.tsv``.

    Rows whose ``acq_time`` is missing or not ISO 8601 are left out.

    Examples:
        >>> session_dates([{"session_id": "ses-01", "acq_time": "2020-01-01T09:00:00"},
        ...                {"session_id": "ses-02", "acq_time": "n/a"}])
        {'ses-01': datetime.datetime(2020, 1, 1, 9, 0)}
    """
    out = {}
    for row in rows:
        try:
            out[row["session_id"]] = datetime.fromisoformat(row.get("acq_time", ""))
        except ValueError:
            continue
    return out


def years_since_first(times: Sequence[datetime | None]) -> list[float | None]:
    """Return each session's time after the first, in years (all None if a date is missing).

    Examples:
        >>> years_since_first([datetime(2020, 1, 1), datetime(2021, 1, 1)])  # 366 days
        [0.0, 1.002053388090349]
        >>> years_since_first([datetime(2020, 1, 1), None])
        [None, None]
    """
    if not times or any(t is None for t in times):
        return [None] * len(times)
    first = times[0]
    return [(t - first).total_seconds() / SECONDS_PER_YEAR for t in times]  # type: ignore[operator]


def session_times(
    bids_dir: str | Path, subject: str, sessions: Sequence[str]
) -> tuple[list[datetime | None], dict[str, str]]:
    """Return each session's acquisition time and where it was read.

    In order of preference (BIDS): the subject's ``sessions.tsv`` (``acq_time``), the
    session's ``scans.tsv`` (the earliest ``acq_time``), the images' JSON sidecars (the
    earliest ``AcquisitionDateTime``, or ``AcquisitionDate`` with ``AcquisitionTime``).

    Args:
        bids_dir: the raw BIDS dataset.
        subject: subject label (without ``sub-``).
        sessions: session labels (without ``ses-``), time order.

    Returns:
        ``(times, sources)``: a time per session (None where none was found) and
        ``{session: "sessions.tsv" | "scans.tsv" | "sidecar <file>" | "missing"}``.
    """
    from smoulder.images import read_tsv

    root = Path(bids_dir) / f"sub-{subject}"
    listed: dict[str, datetime] = {}
    table = root / f"sub-{subject}_sessions.tsv"
    if table.is_file():
        listed = session_dates(read_tsv(table))
    times: list[datetime | None] = []
    sources: dict[str, str] = {}
    for ses in sessions:
        when, source = listed.get(f"ses-{ses}"), "sessions.tsv"
        folder = root / f"ses-{ses}"
        if when is None:
            scans = folder / f"sub-{subject}_ses-{ses}_scans.tsv"
            source = "scans.tsv"
            if scans.is_file():
                stamps = [
                    t for r in read_tsv(scans) if (t := _iso(r.get("acq_time", ""))) is not None
                ]
                when = min(stamps) if stamps else None
        if when is None:
            when, source = _sidecar_time(folder)
        times.append(when)
        sources[ses] = source if when is not None else "missing"
    return times, sources


def _iso(text: str) -> datetime | None:
    """Return the ISO 8601 time in ``text`` (None when it is not one)."""
    try:
        return datetime.fromisoformat(str(text).strip())
    except ValueError:
        return None


def _sidecar_time(folder: Path) -> tuple[datetime | None, str]:
    """Return the earliest acquisition time in the JSON sidecars under ``folder``."""
    import json

    best: tuple[datetime | None, str] = (None, "missing")
    for sidecar in sorted(folder.rglob("*.json")) if folder.is_dir() else []:
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            continue
        when = _iso(meta.get("AcquisitionDateTime", ""))
        if when is None and meta.get("AcquisitionDate"):
            when = _iso(f"{meta['AcquisitionDate']}T{meta.get('AcquisitionTime', '00:00:00')}")
        if when is not None and (best[0] is None or when < best[0]):
            best = (when, f"sidecar {sidecar.name}")
    return best


def missing_dates(sources: Mapping[str, str]) -> list[str]:
    """Return the message naming the sessions without a date (none when every one has one).

    Examples:
        >>> missing_dates({"01": "sessions.tsv", "02": "missing"})[0][:38]
        'no acquisition date for session(s) 02 '
        >>> missing_dates({"01": "scans.tsv"})
        []
    """
    missing = [s for s, src in sources.items() if src == "missing"]
    if not missing:
        return []
    return [
        f"no acquisition date for session(s) {', '.join(missing)} (sessions.tsv acq_time, "
        "scans.tsv, AcquisitionDateTime)"
    ]
