"""Segmentation metrics on tiny hand-made masks whose answers can be counted by eye."""

from __future__ import annotations

import math

import numpy as np
import pytest

from smoulder.segmentation.metrics import (
    dice,
    lesion_components,
    lesion_detection,
    volume_error_ml,
)


def mask(shape: tuple[int, ...], *boxes: tuple[slice, ...]) -> np.ndarray:
    """Return a uint8 mask of ``shape`` with 1 in each box."""
    out = np.zeros(shape, np.uint8)
    for box in boxes:
        out[box] = 1
    return out


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([1, 1, 0, 0], [0, 1, 1, 0], 0.5),  # 2·1 / (2 + 2)
        ([1, 1, 1, 0], [1, 1, 1, 0], 1.0),
        ([1, 0, 0, 0], [0, 0, 0, 1], 0.0),
        ([0, 0, 0, 0], [0, 0, 0, 0], 1.0),  # both empty: agreement, by convention
        ([0, 0, 0, 0], [0, 1, 0, 0], 0.0),
        ([3, 7, 0, 0], [1, 1, 1, 0], 0.8),  # labels are read as a binary mask: 2·2 / (2 + 3)
        ([True, False], [True, True], 2 / 3),
    ],
)
def test_dice(a: list, b: list, expected: float) -> None:
    assert dice(np.array(a), np.array(b)) == pytest.approx(expected)
    assert dice(np.array(b), np.array(a)) == pytest.approx(expected)


def test_dice_rejects_different_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(4,\)"):
        dice(np.ones((2, 2)), np.ones(4))


@pytest.mark.parametrize(
    ("n_pred", "n_truth", "voxel_ml", "expected"),
    [(5, 2, 0.001, 0.003), (2, 5, 0.001, 0.003), (4, 4, 0.5, 0.0), (0, 3, 0.008, 0.024)],
)
def test_volume_error_ml(n_pred: int, n_truth: int, voxel_ml: float, expected: float) -> None:
    pred = np.zeros(10)
    truth = np.zeros(10)
    pred[:n_pred] = 1
    truth[-n_truth:] = 1 if n_truth else 0
    assert volume_error_ml(pred, truth, voxel_ml) == pytest.approx(expected)


def test_volume_error_needs_a_positive_voxel() -> None:
    with pytest.raises(ValueError, match="voxel_ml"):
        volume_error_ml(np.ones(2), np.ones(2), 0.0)


@pytest.mark.parametrize(
    ("voxels", "n_lesions"),
    [
        ([(0, 0, 0), (0, 0, 1)], 1),  # share a face
        ([(0, 0, 0), (0, 1, 1)], 1),  # share an edge
        ([(0, 0, 0), (1, 1, 1)], 1),  # share only a corner: still one lesion (26-connectivity)
        ([(0, 0, 0), (0, 0, 2)], 2),  # one voxel apart
        ([], 0),
    ],
)
def test_lesion_components_are_26_connected(voxels: list, n_lesions: int) -> None:
    m = np.zeros((3, 3, 3))
    for v in voxels:
        m[v] = 1
    labels, n = lesion_components(m)
    assert n == n_lesions
    assert labels.max() == n_lesions


# Three true lesions, one per size bin (1 µl voxels):
#   A 2x2x2 =   8 µl (< 10)       found by P1
#   B 3x3x3 =  27 µl (10-100)     missed
#   C 5x5x5 = 125 µl (>= 100)     found by P2
# Four predicted lesions:
#   P1 1 voxel inside A (1 µl, correct), P2 = C (125 µl, correct),
#   P3 4x4x1 = 16 µl far away (false positive), P4 1 voxel far away (false positive).
SHAPE = (20, 20, 20)
TRUTH = mask(
    SHAPE,
    np.s_[1:3, 1:3, 1:3],
    np.s_[10:13, 10:13, 10:13],
    np.s_[14:19, 1:6, 1:6],
)
PRED = mask(
    SHAPE,
    np.s_[2, 2, 2],
    np.s_[14:19, 1:6, 1:6],
    np.s_[1:5, 10:14, 18],
    np.s_[18, 18, 18],
)


def test_lesion_detection_counts_and_scores() -> None:
    r = lesion_detection(PRED, TRUTH, voxel_ul=1.0)
    assert (r.n_truth, r.n_truth_detected, r.n_pred, r.n_pred_correct) == (3, 2, 4, 2)
    assert r.recall == pytest.approx(2 / 3)
    assert r.precision == pytest.approx(0.5)
    assert r.f1 == pytest.approx(4 / 7)  # 2 · 0.5 · 2/3 / (0.5 + 2/3)


def test_lesion_detection_by_size() -> None:
    small, medium, large = lesion_detection(PRED, TRUTH, voxel_ul=1.0).bins
    # small: A found (recall 1); P1 correct, P4 false (precision 1/2)
    assert (small.n_truth, small.n_truth_detected, small.n_pred, small.n_pred_correct) == (
        1,
        1,
        2,
        1,
    )
    assert (small.recall, small.precision) == (1.0, 0.5)
    assert small.f1 == pytest.approx(2 / 3)
    # medium: B missed, P3 false
    assert (medium.recall, medium.precision, medium.f1) == (0.0, 0.0, 0.0)
    # large: C found by P2
    assert (large.recall, large.precision, large.f1) == (1.0, 1.0, 1.0)
    assert (small.low_ul, small.high_ul, large.high_ul) == (0.0, 10.0, math.inf)


def test_voxel_volume_moves_lesions_between_bins() -> None:
    # at 2 µl per voxel, A (8 voxels) is 16 µl: medium, beside B (54 µl)
    _small, medium, _large = lesion_detection(PRED, TRUTH, voxel_ul=2.0).bins
    assert (medium.n_truth, medium.n_truth_detected) == (2, 1)
    assert medium.recall == 0.5


def test_bins_are_half_open() -> None:
    truth = mask((1, 1, 12), np.s_[..., 0:5])  # 5 voxels x 2 µl = exactly 10 µl
    r = lesion_detection(truth, truth, voxel_ul=2.0)
    assert [b.n_truth for b in r.bins] == [0, 1, 0]


def test_custom_bins() -> None:
    r = lesion_detection(PRED, TRUTH, voxel_ul=1.0, bins=((0, 30), (30, 1000)))
    assert [b.n_truth for b in r.bins] == [2, 1]
    assert [b.n_pred for b in r.bins] == [3, 1]


def test_one_voxel_of_overlap_detects_a_lesion() -> None:
    truth = mask((10, 10, 10), np.s_[2:6, 2:6, 2:6])
    pred = mask((10, 10, 10), np.s_[5:9, 5:9, 5:9])  # overlaps truth in the single voxel 5,5,5
    r = lesion_detection(pred, truth, voxel_ul=1.0)
    assert (r.recall, r.precision, r.f1) == (1.0, 1.0, 1.0)


def test_corner_touching_truth_is_one_lesion() -> None:
    truth = np.zeros((4, 4, 4))
    truth[0, 0, 0] = truth[1, 1, 1] = 1
    pred = np.zeros((4, 4, 4))
    pred[0, 0, 0] = 1
    r = lesion_detection(pred, truth, voxel_ul=1.0)
    assert (r.n_truth, r.recall) == (1, 1.0)


def test_empty_masks() -> None:
    empty = np.zeros(SHAPE)
    none = lesion_detection(empty, empty, voxel_ul=1.0)
    assert all(math.isnan(v) for v in (none.precision, none.recall, none.f1))
    assert all(math.isnan(b.f1) for b in none.bins)

    missed = lesion_detection(empty, TRUTH, voxel_ul=1.0)  # nothing predicted
    assert math.isnan(missed.precision)
    assert (missed.recall, missed.f1) == (0.0, 0.0)

    spurious = lesion_detection(PRED, empty, voxel_ul=1.0)  # no true lesions
    assert math.isnan(spurious.recall)
    assert (spurious.precision, spurious.f1) == (0.0, 0.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"voxel_ul": 0.0}, "voxel_ul"),
        ({"voxel_ul": 1.0, "bins": ((10, 10),)}, "size bin"),
    ],
)
def test_lesion_detection_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lesion_detection(PRED, TRUTH, **kwargs)
