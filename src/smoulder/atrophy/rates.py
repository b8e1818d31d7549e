"""Yearly rates of change of a measure followed over sessions (volumes, areas)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def annual_rate_percent(years: Sequence[float | None], values: Sequence[float]) -> float | None:
    """Return the least-squares slope of ``values`` over ``years`` in % of the first per year.

    Args:
        years: each session's time after the first (years; None where a date is missing).
        values: the measure at each session.

    Returns:
        The rate (%/year), or None with fewer than two sessions, a missing date, a first value
        of zero, or all sessions at the same time.

    Examples:
        >>> round(annual_rate_percent([0.0, 1.0, 2.0], [100.0, 99.0, 98.0]), 3)
        -1.0
        >>> annual_rate_percent([None, None], [1.0, 2.0]) is None
        True
    """
    if len(values) < 2 or any(y is None for y in years) or not values[0]:
        return None
    t = np.array(years, float)
    if np.ptp(t) <= 0:
        return None
    slope = float(np.polyfit(t, np.array(values, float), 1)[0])
    return 100.0 * slope / values[0]
