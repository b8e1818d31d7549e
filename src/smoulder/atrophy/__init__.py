"""Atrophy: tissue volumes from a class map and their yearly rates of change.

Modules: ``volumes`` (millilitres of each named tissue of a class map), ``rates`` (the
least-squares yearly change of a measure, in % of its first value). Pure functions on arrays
and tables; reading the derivatives is the caller's (the report, later a ``command``).
"""
