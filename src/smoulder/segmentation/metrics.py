"""Agreement between a predicted and a true segmentation: voxel-wise, lesion-wise, volume.

Every function takes plain numpy arrays on one grid (resample first) and reads them as binary
masks: any non-zero voxel is foreground, so an instance map or a label image restricted to one
label can be passed as it is. Threshold probability maps before calling.

Lesions are the connected components of a mask under **26-connectivity** (voxels touching by a
face, an edge or a corner belong to one lesion), the convention of most MS lesion-counting
tools. Volumes are in microlitres (µl, mm³) for lesion sizes and millilitres (ml) for totals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

#: Default lesion-size bins in µl, half-open ``[low, high)``: small, medium, large.
SIZE_BINS_UL: tuple[tuple[float, float], ...] = ((0.0, 10.0), (10.0, 100.0), (100.0, math.inf))

_CONNECTIVITY_26 = ndimage.generate_binary_structure(3, 3)
_D = TypeVar("_D", bound="Detection")


def _masks(a: ArrayLike, b: ArrayLike, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Return two boolean masks of one shape, or raise naming the mismatch."""
    ma, mb = np.asarray(a) != 0, np.asarray(b) != 0
    if ma.shape != mb.shape:
        raise ValueError(
            f"{names[0]} has shape {ma.shape} but {names[1]} has shape {mb.shape}: "
            "resample both onto one grid before comparing them"
        )
    return ma, mb


def dice(a: ArrayLike, b: ArrayLike) -> float:
    """Return the Dice overlap ``2|A∩B| / (|A|+|B|)`` of two masks, in [0, 1].

    Both masks empty is perfect agreement and returns 1.0 (not 0/0), so a case without
    lesions scores 1.0 when nothing is predicted and 0.0 when anything is.

    Args:
        a: First mask (non-zero = foreground).
        b: Second mask, same shape.

    Returns:
        The Dice coefficient.

    Examples:
        >>> import numpy as np
        >>> dice(np.array([1, 1, 0, 0]), np.array([0, 1, 1, 0]))
        0.5
        >>> dice(np.zeros(3), np.zeros(3))
        1.0
    """
    ma, mb = _masks(a, b, ("a", "b"))
    total = int(ma.sum()) + int(mb.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(ma, mb).sum()) / total


def volume_error_ml(pred: ArrayLike, truth: ArrayLike, voxel_ml: float) -> float:
    """Return the absolute difference of the two masks' volumes, in ml.

    Args:
        pred: Predicted mask (non-zero = foreground).
        truth: True mask, same shape.
        voxel_ml: Volume of one voxel in ml (a 1 mm isotropic voxel is 0.001 ml).

    Returns:
        ``|V_pred − V_truth|`` in ml.

    Examples:
        >>> import numpy as np
        >>> volume_error_ml(np.array([1, 1, 1, 1, 1]), np.array([0, 0, 1, 1, 0]), voxel_ml=0.001)
        0.003
    """
    if not voxel_ml > 0:
        raise ValueError(f"voxel_ml must be positive, got {voxel_ml!r}")
    mp, mt = _masks(pred, truth, ("pred", "truth"))
    return abs(int(mp.sum()) - int(mt.sum())) * float(voxel_ml)


def lesion_components(mask: ArrayLike) -> tuple[np.ndarray, int]:
    """Return the lesions of a mask: a label image (1..n, 0 outside) and their number ``n``.

    Components use 26-connectivity in 3-D (full connectivity in other dimensions).

    Examples:
        >>> import numpy as np
        >>> m = np.zeros((3, 3, 3)); m[0, 0, 0] = m[1, 1, 1] = 1  # corner-touching: one lesion
        >>> lesion_components(m)[1]
        1
    """
    m = np.asarray(mask) != 0
    structure = (
        _CONNECTIVITY_26 if m.ndim == 3 else ndimage.generate_binary_structure(m.ndim, m.ndim)
    )
    labels, n = ndimage.label(m, structure=structure)
    return labels, int(n)


@dataclass(frozen=True)
class Detection:
    """Lesion-wise counts and scores of a predicted lesion mask against the true one.

    ``nan`` marks a score with nothing to count (see :func:`lesion_detection`).
    """

    n_truth: int
    n_truth_detected: int
    n_pred: int
    n_pred_correct: int
    precision: float
    recall: float
    f1: float

    @classmethod
    def of(cls: type[_D], hit_truth: np.ndarray, hit_pred: np.ndarray, **more: Any) -> _D:
        """Return the detection scored from which lesions were found.

        Args:
            hit_truth: per true lesion, whether the prediction found it.
            hit_pred: per predicted lesion, whether it is a true one.
            more: the fields a subclass adds.

        Examples:
            >>> Detection.of(np.array([True, False]), np.array([True])).f1
            0.6666666666666666
        """
        precision = _ratio(int(hit_pred.sum()), int(hit_pred.size))
        recall = _ratio(int(hit_truth.sum()), int(hit_truth.size))
        return cls(
            n_truth=int(hit_truth.size),
            n_truth_detected=int(hit_truth.sum()),
            n_pred=int(hit_pred.size),
            n_pred_correct=int(hit_pred.sum()),
            precision=precision,
            recall=recall,
            f1=_f1(precision, recall),
            **more,
        )


@dataclass(frozen=True)
class SizeBinDetection(Detection):
    """Lesion-wise scores for lesions whose volume lies in ``[low_ul, high_ul)``.

    Truth lesions are binned by their own volume (for recall), predicted lesions by theirs
    (for precision).
    """

    low_ul: float
    high_ul: float


@dataclass(frozen=True)
class LesionDetection(Detection):
    """Lesion-wise precision, recall and F1 over all lesions, and per size bin."""

    bins: tuple[SizeBinDetection, ...]


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def _f1(precision: float, recall: float) -> float:
    """Harmonic mean of the defined scores (a nan score had nothing to count and is left out)."""
    if math.isnan(precision) and math.isnan(recall):
        return math.nan
    if math.isnan(precision):
        return recall
    if math.isnan(recall):
        return precision
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def lesion_detection(
    pred: ArrayLike,
    truth: ArrayLike,
    voxel_ul: float,
    *,
    bins: Sequence[tuple[float, float]] = SIZE_BINS_UL,
) -> LesionDetection:
    """Return lesion-wise precision, recall and F1 of a predicted lesion mask, overall and by size.

    Lesions are the 26-connected components of each mask. A true lesion is *detected* when at
    least one of its voxels is in the predicted mask; a predicted lesion is *correct* when at
    least one of its voxels is in the true mask. Then

    * recall = detected true lesions / true lesions,
    * precision = correct predicted lesions / predicted lesions,
    * F1 = 2 · precision · recall / (precision + recall) (0 when both are 0).

    Per size bin ``[low, high)`` (µl), recall counts the true lesions of that volume and
    precision the predicted lesions of that volume, so a small true lesion found by a large
    predicted one adds to the small bin's recall and the large bin's precision.

    A score whose denominator is zero is ``nan`` (no predicted lesions: precision; no true
    lesions: recall). F1 is then the other score — with no true lesions, F1 is the precision
    (0 if anything was predicted), and with no predicted lesions it is the recall (0 overall,
    since nothing can be detected) — and ``nan`` when both masks have no lesions there.

    Args:
        pred: Predicted lesion mask (non-zero = lesion).
        truth: True lesion mask, same shape.
        voxel_ul: Volume of one voxel in µl (= mm³; 1.0 for a 1 mm isotropic grid).
        bins: Volume bins ``(low_ul, high_ul)``, half-open; ``math.inf`` for no upper bound.

    Returns:
        The counts and scores, overall and per bin (in the order given).

    Examples:
        >>> import numpy as np
        >>> truth = np.zeros((1, 1, 9)); truth[..., [0, 4]] = 1   # two 1-voxel lesions
        >>> pred = np.zeros((1, 1, 9)); pred[..., [0, 8]] = 1     # one hit, one false positive
        >>> r = lesion_detection(pred, truth, voxel_ul=1.0)
        >>> r.precision, r.recall, r.f1
        (0.5, 0.5, 0.5)
    """
    if not voxel_ul > 0:
        raise ValueError(f"voxel_ul must be positive, got {voxel_ul!r}")
    for low, high in bins:
        if not low < high:
            raise ValueError(f"size bin ({low}, {high}) is empty: low must be below high")
    mp, mt = _masks(pred, truth, ("pred", "truth"))
    lab_t, n_t = lesion_components(mt)
    lab_p, n_p = lesion_components(mp)
    # per component (index 0 = background, dropped): volume, and overlap with the other mask
    vol_t = np.bincount(lab_t.ravel(), minlength=n_t + 1)[1:] * float(voxel_ul)
    vol_p = np.bincount(lab_p.ravel(), minlength=n_p + 1)[1:] * float(voxel_ul)
    hit_t = np.bincount(lab_t[mp], minlength=n_t + 1)[1:] > 0
    hit_p = np.bincount(lab_p[mt], minlength=n_p + 1)[1:] > 0

    per_bin = []
    for low, high in bins:
        in_t = (vol_t >= low) & (vol_t < high)
        in_p = (vol_p >= low) & (vol_p < high)
        bin_scores = SizeBinDetection.of(
            hit_t[in_t], hit_p[in_p], low_ul=float(low), high_ul=float(high)
        )
        per_bin.append(bin_scores)
    return LesionDetection.of(hit_t, hit_p, bins=tuple(per_bin))
