"""Susceptibility: QSM from multi-echo GRE (magnitude + phase), filtered phase and SWI."""
