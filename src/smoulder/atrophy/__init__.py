"""Atrophy: brain, grey-matter and cord volume loss, measured within the subject.

Modules: ``volumes`` (tissue volumes of a class map; a session's ICV, BPF and normalised brain
volume), ``session`` (a session's cross-sectional row with its cord area, :mod:`smoulder.cord`),
``change`` (PBVC by Jacobian integration and by boundary shift, grey-matter change, on the
within-subject grid), ``subject`` (a subject's table: per session, per interval, yearly rates
classified against published cut-offs), ``columns`` (the tables' columns and units).
"""
