"""Session dates and the time between sessions, in years."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

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
