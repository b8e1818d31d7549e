"""Atrophy: tissue volumes of a class map and yearly rates, on tiny arrays."""

from __future__ import annotations

import numpy as np
import pytest

from smoulder.atrophy.rates import annual_rate_percent
from smoulder.atrophy.volumes import ATROPHY_TISSUES, tissue_volumes_ml
from smoulder.segmentation.classes import CLASSES

NAMES = {name: i for i, name in enumerate(CLASSES)}


def _dseg() -> np.ndarray:
    """Return a class map holding ``i + 1`` voxels of class ``i`` (background: 1 voxel)."""
    labels = np.concatenate([np.full(i + 1, i) for i in range(len(CLASSES))])
    return labels.reshape(1, 1, -1).astype(np.uint8)


@pytest.mark.parametrize(
    ("tissue", "voxels"),
    [
        ("brain", 3 + 4 + 5 + 6),  # cortical GM, deep GM, WM, lesion
        ("GM", 3 + 4),
        ("WM", 5),  # lesions excluded
        ("WM_lesions_filled", 5 + 6),  # lesions counted as WM, as atrophy measures do
        ("lesion", 6),
        ("CSF", 2),
    ],
)
def test_tissue_volume_sums_the_classes_of_the_tissue(tissue: str, voxels: int) -> None:
    affine = np.diag([2.0, 1.0, 0.5, 1.0])  # 1 mm³ voxels, anisotropic
    affine[:3, 3] = 10.0
    volumes = tissue_volumes_ml(_dseg(), affine, NAMES, (tissue,))
    assert volumes == {tissue: pytest.approx(voxels / 1000.0)}


def test_tissue_volumes_default_to_the_atrophy_tissues_and_skip_missing_classes() -> None:
    dseg = np.array([[[0, 4, 4]]], np.int16)
    volumes = tissue_volumes_ml(dseg, np.diag([10.0, 10.0, 10.0, 1.0]), {"bg": 0, "WM": 4})
    assert list(volumes) == list(ATROPHY_TISSUES)
    assert volumes == {"brain": 2.0, "GM": 0.0, "WM_lesions_filled": 2.0, "lesion": 0.0}


@pytest.mark.parametrize(
    ("years", "values", "expected"),
    [
        ([0.0, 1.0, 2.0], [100.0, 99.0, 98.0], -1.0),
        ([0.0, 0.5], [200.0, 201.0], 1.0),
        ([0.0, 1.0], [0.0, 1.0], None),  # no first value to divide by
        ([0.0, None], [1.0, 2.0], None),  # a date is missing
        ([1.0, 1.0], [1.0, 2.0], None),  # no time between sessions
        ([0.0], [1.0], None),  # one session
    ],
)
def test_annual_rate_percent(
    years: list[float | None], values: list[float], expected: float | None
) -> None:
    rate = annual_rate_percent(years, values)
    assert rate == (None if expected is None else pytest.approx(expected))
