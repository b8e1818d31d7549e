"""Longitudinal: what changes between a subject's sessions.

Modules: ``intervals`` (session dates and the time between sessions), ``matching`` (the
reference session's lesions followed into later sessions through the longitudinal transforms).
Pure functions on arrays and tables; reading the derivatives is the caller's (the report, later
a ``command``).
"""
