"""Trained networks as MONAI bundles (installed as ``smoulder.models``)."""
