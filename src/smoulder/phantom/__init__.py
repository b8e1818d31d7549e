"""Synthetic MS dataset generator with exact ground truth."""
