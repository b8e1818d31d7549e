"""Calibrated rim probabilities and how good they are: calibration, AUCs, operating points.

All functions take plain numpy arrays: ``scores``/``prob`` one value per lesion (higher = more
likely a rim), ``labels`` 1 for a rim and 0 otherwise. Conventions:

- **logits in, probabilities out**: a :class:`Calibration` maps the network's logit (averaged
  over the flips of test-time augmentation) to a probability. Three maps are fitted on the
  *calibration split* (lesions of subjects neither trained on nor validated on):
  ``temperature`` (``sigmoid(z / T)``, T by least negative log-likelihood), ``platt``
  (``sigmoid(a z + b)``; it also undoes the prior shift of class-balanced training, where the
  network saw rims half the time) and ``isotonic`` (pool-adjacent-violators on the logits,
  linear between blocks, flat beyond the ends). :func:`fit_calibration` chooses among them by
  the expected calibration error of 5-fold cross-fits *inside* the calibration split (fitting
  and scoring on the same lesions would always favour isotonic) and ties to the map with fewer
  parameters.
- **ECE**: 10 equal-width bins on [0, 1], the lesion-weighted mean of ``|mean prob - rim rate|``.
- **AUCs**: ROC-AUC is the Mann-Whitney probability that a rim scores above a non-rim (ties
  count one half); PR-AUC is the average precision (``sum (R_k - R_k-1) P_k`` over the distinct
  scores, as scikit-learn), the figure to read when rims are rare. Both are ``nan`` without
  both classes.
- **Confidence intervals** of a ROC-AUC use DeLong's variance (DeLong et al., Biometrics 1988;
  midrank algorithm of Sun & Xu, IEEE SPL 2014): deterministic, no resampling, and paired for
  two scores on the same lesions (:func:`auc_difference_interval`); the normal interval is
  clipped to [0, 1]. It needs at least two lesions of each class (else ``nan``).
- **Operating points**: a lesion is called a rim when ``prob >= threshold``. ``balanced`` is
  Youden's (max sensitivity + specificity - 1; the lowest of tied thresholds),
  ``high_specificity`` the lowest threshold whose specificity is >= 0.95 and
  ``high_sensitivity`` the highest threshold whose sensitivity is >= 0.95. Candidate
  thresholds are the observed probabilities and one just above the largest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

#: Calibration maps, fewest parameters first (the order ties are broken in).
METHODS = ("temperature", "platt", "isotonic")

#: Names of the stored operating points.
OPERATING_POINTS = ("balanced", "high_specificity", "high_sensitivity")

#: Specificity (sensitivity) the high-specificity (high-sensitivity) point must reach.
TARGET_RATE = 0.95


def _pair(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Return scores as float64 and labels as bool, or raise naming the mismatch."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores have {s.size} values but labels {y.size}: one per lesion each")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, found {sorted(set(y.tolist()) - {0, 1})[:5]}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (a nan or inf score cannot be ranked)")
    return s, y.astype(bool)


def sigmoid(logits: ArrayLike) -> np.ndarray:
    """Return ``1 / (1 + exp(-logits))``, computed without overflow.

    Examples:
        >>> sigmoid([0.0, 800.0, -800.0]).tolist()
        [0.5, 1.0, 0.0]
    """
    z = np.asarray(logits, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def _nll(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy of ``sigmoid(logits)`` against ``labels`` (stable)."""
    return float(np.mean(np.logaddexp(0.0, logits) - labels * logits))


def fit_temperature(logits: ArrayLike, labels: ArrayLike) -> float:
    """Return the temperature T minimising the NLL of ``sigmoid(logits / T)`` (0.05 <= T <= 20).

    Examples:
        >>> z = np.array([-8.0, -6.0, -4.0, 4.0, 6.0, 8.0, 5.0, -5.0])
        >>> y = np.array([0, 0, 1, 1, 1, 1, 0, 0])      # overconfident: T > 1 softens it
        >>> fit_temperature(z, y) > 1
        True
    """
    from scipy.optimize import minimize_scalar

    z, y = _pair(logits, labels)
    res = minimize_scalar(
        lambda log_t: _nll(z / np.exp(log_t), y),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
    )
    return float(np.exp(res.x))


def fit_platt(logits: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """Return ``(a, b)`` minimising the NLL of ``sigmoid(a * logits + b)`` (Platt scaling).

    Examples:
        >>> z = np.array([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0])
        >>> a, b = fit_platt(z, [0, 0, 0, 1, 0, 1])
        >>> a > 0
        True
    """
    from scipy.optimize import minimize

    z, y = _pair(logits, labels)
    # a small ridge keeps (a, b) finite on separable data
    res = minimize(
        lambda p: _nll(p[0] * z + p[1], y) + 1e-4 * (p[0] ** 2 + p[1] ** 2),
        x0=np.array([1.0, 0.0]),
        method="L-BFGS-B",
    )
    return float(res.x[0]), float(res.x[1])


def fit_isotonic(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Return the knots ``(x, y)`` of the isotonic (non-decreasing) fit of labels on scores.

    Pool-adjacent-violators on the distinct scores (tied scores form one block first); each
    block keeps its first and last score, so ``np.interp(s, x, y)`` is flat inside a block,
    linear between blocks and flat beyond the ends.

    Examples:
        >>> x, y = fit_isotonic([1, 2, 3, 4], [0, 1, 0, 1])
        >>> x.tolist(), y.tolist()
        ([1.0, 2.0, 3.0, 4.0], [0.0, 0.5, 0.5, 1.0])
    """
    s, lab = _pair(scores, labels)
    if s.size == 0:
        raise ValueError("isotonic calibration needs at least one lesion")
    xs, inverse = np.unique(s, return_inverse=True)
    weight = np.bincount(inverse).astype(np.float64)
    mean = np.bincount(inverse, weights=lab.astype(np.float64)) / weight
    values: list[float] = []
    weights: list[float] = []
    ends: list[int] = []  # index in xs of each block's last distinct score
    for i in range(xs.size):
        values.append(mean[i])
        weights.append(weight[i])
        ends.append(i)
        while len(values) > 1 and values[-2] > values[-1]:
            v, w, e = values.pop(), weights.pop(), ends.pop()
            total = weights[-1] + w
            values[-1] = (values[-1] * weights[-1] + v * w) / total
            weights[-1], ends[-1] = total, e
    knots_x: list[float] = []
    knots_y: list[float] = []
    start = 0
    for v, e in zip(values, ends, strict=True):
        for j in sorted({start, e}):
            knots_x.append(float(xs[j]))
            knots_y.append(float(v))
        start = e + 1
    return np.asarray(knots_x), np.asarray(knots_y)


@dataclass(frozen=True)
class Calibration:
    """A map from network logits to calibrated probabilities (stored in the bundle).

    ``method`` is ``none`` (plain sigmoid), ``temperature``, ``platt`` or ``isotonic``.

    Examples:
        >>> Calibration("temperature", temperature=2.0)([2.0]).round(4).tolist()
        [0.7311]
        >>> iso = Calibration("isotonic", knots=([0.0, 1.0], [0.2, 0.9]))
        >>> Calibration.from_json(iso.to_json())([-5.0, 0.5, 5.0]).tolist()
        [0.2, 0.55, 0.9]
    """

    method: str = "none"
    temperature: float = 1.0
    slope: float = 1.0
    offset: float = 0.0
    knots: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))

    def __post_init__(self) -> None:
        if self.method not in ("none", *METHODS):
            raise ValueError(
                f"calibration method: expected none or one of {METHODS}, found {self.method!r}"
            )
        if self.method == "isotonic" and not len(self.knots[0]):
            raise ValueError("isotonic calibration needs its knots")

    def __call__(self, logits: ArrayLike) -> np.ndarray:
        """Return the calibrated probabilities of ``logits`` (float64, same shape)."""
        z = np.asarray(logits, dtype=np.float64)
        if self.method == "temperature":
            return sigmoid(z / self.temperature)
        if self.method == "platt":
            return sigmoid(self.slope * z + self.offset)
        if self.method == "isotonic":
            return np.interp(z, self.knots[0], self.knots[1])
        return sigmoid(z)

    def to_json(self) -> dict[str, Any]:
        """Return the calibration as JSON-ready values (``configs/inference.json``)."""
        if self.method == "temperature":
            return {"method": self.method, "temperature": self.temperature}
        if self.method == "platt":
            return {"method": self.method, "slope": self.slope, "offset": self.offset}
        if self.method == "isotonic":
            return {
                "method": self.method,
                "logit": list(self.knots[0]),
                "prob": list(self.knots[1]),
            }
        return {"method": "none"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        """Return the calibration that :meth:`to_json` wrote."""
        method = str(data.get("method", "none"))
        if method == "isotonic":
            knots = ([float(v) for v in data["logit"]], [float(v) for v in data["prob"]])
            return cls(method, knots=knots)
        return cls(
            method,
            temperature=float(data.get("temperature", 1.0)),
            slope=float(data.get("slope", 1.0)),
            offset=float(data.get("offset", 0.0)),
        )


def fit_method(logits: ArrayLike, labels: ArrayLike, method: str) -> Calibration:
    """Return the calibration ``method`` (see :data:`METHODS`) fitted on ``logits``/``labels``.

    Examples:
        >>> fit_method([-1.0, 1.0], [0, 1], "isotonic")([0.0]).tolist()
        [0.5]
    """
    z, y = _pair(logits, labels)
    if method == "temperature":
        return Calibration(method, temperature=fit_temperature(z, y))
    if method == "platt":
        slope, offset = fit_platt(z, y)
        return Calibration(method, slope=slope, offset=offset)
    if method == "isotonic":
        x, p = fit_isotonic(z, y)
        return Calibration(method, knots=(x.tolist(), p.tolist()))
    raise ValueError(f"calibration method: expected one of {METHODS}, found {method!r}")


@dataclass(frozen=True)
class Fusion:
    """A logistic regression of the network's logit and the rule-based measures: the fused
    logit that the calibration then maps to a probability (stored in the bundle).

    ``fused = bias + w0 * logit + sum_i w_i * (feature_i - mean_i) / scale_i``.

    Examples:
        >>> f = Fusion(("rim_coverage",), mean=(0.5,), scale=(0.25,), weights=(1.0, 2.0))
        >>> f([0.0, 1.0], [[0.5], [0.75]]).tolist()
        [0.0, 3.0]
        >>> Fusion.from_json(f.to_json()) == f
        True
    """

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]  # the logit's first, then one per feature
    bias: float = 0.0

    def __call__(self, logits: ArrayLike, features: ArrayLike) -> np.ndarray:
        """Return the fused logits (float64, one per lesion)."""
        z = np.asarray(logits, dtype=np.float64).reshape(-1)
        x = np.asarray(features, dtype=np.float64).reshape(z.size, len(self.features))
        x = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        w = np.asarray(self.weights)
        return self.bias + w[0] * z + x @ w[1:]

    def to_json(self) -> dict[str, Any]:
        """Return the fusion as JSON-ready values (``configs/inference.json``)."""
        return {
            "features": list(self.features),
            "mean": list(self.mean),
            "scale": list(self.scale),
            "weights": list(self.weights),
            "bias": self.bias,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fusion:
        """Return the fusion that :meth:`to_json` wrote."""
        return cls(
            tuple(str(f) for f in data["features"]),
            tuple(float(v) for v in data["mean"]),
            tuple(float(v) for v in data["scale"]),
            tuple(float(v) for v in data["weights"]),
            float(data.get("bias", 0.0)),
        )


def fit_fusion(
    logits: ArrayLike,
    features: ArrayLike,
    labels: ArrayLike,
    names: Sequence[str],
    *,
    ridge: float = 1e-2,
) -> Fusion:
    """Return the :class:`Fusion` fitted by ridge-penalised logistic regression.

    The features are standardised on these lesions first (mean, SD floored at 1e-6); the
    penalty ``ridge * |w|²`` (not on the bias) keeps the weights finite on separable data.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> y = (rng.random(300) < 0.4).astype(int)
        >>> cov = y * 0.5 + rng.normal(0.3, 0.2, 300)    # informative measure
        >>> z = rng.normal(0, 1, 300)                    # uninformative logit
        >>> f = fit_fusion(z, cov[:, None], y, ["rim_coverage"])
        >>> abs(f.weights[1]) > 5 * abs(f.weights[0])
        True
    """
    from scipy.optimize import minimize

    z, y = _pair(logits, labels)
    x = np.asarray(features, dtype=np.float64).reshape(z.size, len(names))
    mean, scale = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
    design = np.column_stack([z, (x - mean) / scale])

    def loss(p: np.ndarray) -> float:
        return _nll(p[0] + design @ p[1:], y) + ridge * float(p[1:] @ p[1:])

    res = minimize(loss, x0=np.zeros(design.shape[1] + 1), method="L-BFGS-B")
    return Fusion(
        tuple(names),
        tuple(mean.tolist()),
        tuple(scale.tolist()),
        tuple(float(v) for v in res.x[1:]),
        float(res.x[0]),
    )


def _stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Return a fold number per lesion, each class dealt round-robin after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    fold = np.empty(labels.size, dtype=np.int64)
    for cls in (False, True):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        fold[idx] = np.arange(idx.size) % folds
    return fold


def fit_calibration(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    folds: int = 5,
    bins: int = 10,
    seed: int = 0,
    methods: Sequence[str] = METHODS,
) -> tuple[Calibration, dict[str, float]]:
    """Return the best calibration of the calibration split and each method's cross-fit ECE.

    Each method of ``methods`` (default :data:`METHODS`) is fitted on ``folds - 1`` folds and
    scored (ECE) on the held-out one; the method with the lowest pooled held-out ECE (ties:
    fewer parameters) is refitted on all lesions. With fewer than two lesions of a class nothing
    can be fitted and the plain sigmoid (``none``) is returned.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> y = rng.random(400) < 0.3
        >>> z = 3.0 * (2 * y - 1) + rng.normal(0, 3, 400)   # overconfident logits
        >>> cal, ece = fit_calibration(z, y)
        >>> ece[cal.method] == min(ece.values())
        True
    """
    z, y = _pair(logits, labels)
    n_pos = int(y.sum())
    if min(n_pos, y.size - n_pos) < 2:
        return Calibration("none"), {}
    folds = max(2, min(folds, n_pos, y.size - n_pos))
    fold = _stratified_folds(y, folds, seed)
    scores: dict[str, float] = {}
    for method in methods:
        held = np.empty(y.size)
        for k in range(folds):
            test = fold == k
            held[test] = fit_method(z[~test], y[~test], method)(z[test])
        scores[method] = expected_calibration_error(held, y, bins=bins)
    best = min(methods, key=lambda m: (round(scores[m], 12), METHODS.index(m)))
    return fit_method(z, y, best), scores


def expected_calibration_error(prob: ArrayLike, labels: ArrayLike, bins: int = 10) -> float:
    """Return the expected calibration error of probabilities ``prob`` (equal-width bins).

    ``ECE = sum_b n_b / N * |mean(prob in b) - mean(labels in b)|``; a probability of exactly
    1 falls in the last bin.

    Examples:
        >>> expected_calibration_error([0.9, 0.9, 0.1, 0.1], [1, 1, 0, 0])
        0.1
        >>> expected_calibration_error([0.5, 0.5], [0, 1])
        0.0
    """
    p, y = _pair(prob, labels)
    if p.size == 0:
        return float("nan")
    if (p < 0).any() or (p > 1).any():
        raise ValueError("probabilities must lie in [0, 1]")
    index = np.minimum((p * bins).astype(np.int64), bins - 1)
    gap = np.bincount(index, weights=p - y, minlength=bins)  # per bin: sum of prob - label
    return float(round(np.abs(gap).sum() / p.size, 12))


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Return the area under the ROC curve (Mann-Whitney; ties count one half).

    Examples:
        >>> roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        0.75
        >>> roc_auc([0.2, 0.3], [0, 0])
        nan
    """
    from scipy.stats import rankdata

    s, y = _pair(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pr_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Return the average precision: ``sum_k (R_k - R_k-1) P_k`` over the distinct scores.

    Examples:
        >>> round(pr_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]), 4)
        0.8333
        >>> pr_auc([0.9, 0.1], [1, 0])
        1.0
    """
    s, y = _pair(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last lesion of each distinct score
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _delong(scores: list[np.ndarray], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the AUCs of several scores on the same lesions and their DeLong covariance."""
    from scipy.stats import rankdata

    pos, neg = [s[labels] for s in scores], [s[~labels] for s in scores]
    m, n = pos[0].size, neg[0].size
    aucs, v10, v01 = [], [], []
    for p, q in zip(pos, neg, strict=True):
        tz = rankdata(np.r_[p, q])
        tx, ty = rankdata(p), rankdata(q)
        aucs.append((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((tz[:m] - tx) / n)  # per rim: share of non-rims it outscores
        v01.append(1.0 - (tz[m:] - ty) / m)  # per non-rim: share of rims outscoring it
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return np.asarray(aucs), cov


def _normal_interval(
    centre: float, var: float, level: float, low: float, high: float
) -> tuple[float, float]:
    from scipy.stats import norm

    half = float(norm.ppf(0.5 + level / 2)) * float(np.sqrt(max(var, 0.0)))
    return float(max(low, centre - half)), float(min(high, centre + half))


def auc_confidence_interval(
    scores: ArrayLike, labels: ArrayLike, level: float = 0.95
) -> tuple[float, float]:
    """Return the DeLong confidence interval ``(low, high)`` of the ROC-AUC, clipped to [0, 1].

    ``(nan, nan)`` with fewer than two lesions of either class.

    Examples:
        >>> low, high = auc_confidence_interval([0.1, 0.4, 0.35, 0.8, 0.2, 0.9], [0, 0, 1, 1, 0, 1])
        >>> round(low, 3), round(high, 3)
        (0.581, 1.0)
    """
    s, y = _pair(scores, labels)
    if min(int(y.sum()), int((~y).sum())) < 2:
        return float("nan"), float("nan")
    aucs, cov = _delong([s], y)
    return _normal_interval(float(aucs[0]), float(cov[0, 0]), level, 0.0, 1.0)


def auc_difference_interval(
    scores_a: ArrayLike, scores_b: ArrayLike, labels: ArrayLike, level: float = 0.95
) -> tuple[float, float, float]:
    """Return ``AUC(b) - AUC(a)`` and its paired DeLong interval (same lesions, two scores).

    Examples:
        >>> y = [0, 0, 0, 1, 1, 1]
        >>> d, low, high = auc_difference_interval([1, 2, 4, 3, 5, 6], [1, 2, 3, 4, 5, 6], y)
        >>> round(d, 4), low < d < high
        (0.1111, True)
    """
    a, y = _pair(scores_a, labels)
    b, _ = _pair(scores_b, labels)
    if min(int(y.sum()), int((~y).sum())) < 2:
        return float("nan"), float("nan"), float("nan")
    aucs, cov = _delong([a, b], y)
    diff = float(aucs[1] - aucs[0])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    return (diff, *_normal_interval(diff, var, level, -1.0, 1.0))


def sensitivity_specificity(
    prob: ArrayLike, labels: ArrayLike, threshold: float
) -> tuple[float, float]:
    """Return ``(sensitivity, specificity)`` of calling a rim where ``prob >= threshold``.

    Examples:
        >>> sensitivity_specificity([0.2, 0.6, 0.7, 0.9], [0, 0, 1, 1], 0.6)
        (1.0, 0.5)
    """
    p, y = _pair(prob, labels)
    call = p >= threshold
    sens = float(call[y].mean()) if y.any() else float("nan")
    spec = float((~call[~y]).mean()) if (~y).any() else float("nan")
    return sens, spec


def operating_points(prob: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Return the thresholds of the three operating points (see the module's conventions).

    Args:
        prob: calibrated probabilities (or any score), one per lesion.
        labels: 1 for a rim, 0 otherwise; both classes must be present.

    Returns:
        ``{"balanced": t, "high_specificity": t, "high_sensitivity": t}``; call ``prob >= t``.

    Examples:
        >>> p = [0.1, 0.2, 0.3, 0.4, 0.6, 0.35, 0.7, 0.8, 0.9]
        >>> y = [0, 0, 0, 0, 0, 1, 1, 1, 1]
        >>> operating_points(p, y)
        {'balanced': 0.7, 'high_specificity': 0.7, 'high_sensitivity': 0.35}
    """
    p, y = _pair(prob, labels)
    if not y.any() or y.all():
        raise ValueError("operating points need lesions of both classes (rims and non-rims)")
    candidates = np.unique(np.r_[p, np.nextafter(p.max(), np.inf)])
    pos, neg = np.sort(p[y]), np.sort(p[~y])
    sens = 1.0 - np.searchsorted(pos, candidates, side="left") / pos.size
    spec = np.searchsorted(neg, candidates, side="left") / neg.size
    youden = sens + spec - 1.0
    balanced = candidates[np.flatnonzero(youden >= youden.max() - 1e-12)[0]]
    high_spec = candidates[spec >= TARGET_RATE].min()
    high_sens = candidates[sens >= TARGET_RATE].max()
    return {
        "balanced": float(balanced),
        "high_specificity": float(high_spec),
        "high_sensitivity": float(high_sens),
    }


# ----------------------------------------------------------------------------- strata

#: The maps a stratified calibration chooses among: strictly increasing ones, so that the
#: calibrated probabilities keep the order of the fused logits within a stratum (and its AUC).
#: Isotonic steps tie lesions that the network told apart: on held-out QSM sets they cost
#: 0.01-0.04 of ROC- and PR-AUC.
RANK_PRESERVING = ("temperature", "platt")

#: Each lesion's input kind, or one for all (``None``: unknown).
Kinds = Sequence[str | None] | np.ndarray | str | None
#: Each lesion's field strength in tesla, or one for all (``None`` or NaN: unknown).
Fields = Sequence[float | None] | np.ndarray | float | None

#: Fewest lesions (and rims, and non-rims) a stratum needs for a calibration of its own.
MIN_STRATUM_LESIONS = 120
MIN_STRATUM_CLASS = 20


def stratum_keys(input_kind: str | None, b0_tesla: float | None) -> list[str]:
    """Return the calibration strata of an acquisition, most specific first.

    A lesion is calibrated by the first stratum the bundle has: its input and field
    (``qsm@7T``), else its input (``qsm``), else the pooled map (``""``). The field is
    rounded to the tesla (1.5 T falls in ``2T``; an unknown field skips that stratum).

    Examples:
        >>> stratum_keys("qsm", 7.0)
        ['qsm@7T', 'qsm', '']
        >>> stratum_keys("phase", None)
        ['phase', '']
        >>> stratum_keys(None, 3.0)
        ['']
    """
    if not input_kind:
        return [""]
    keys = [f"{input_kind}@{round(b0_tesla):d}T"] if b0_tesla else []
    return [*keys, str(input_kind), ""]


@dataclass(frozen=True)
class StratifiedCalibration:
    """Calibration maps per acquisition stratum (:func:`stratum_keys`) over a pooled one.

    The network's evidence is not equally sharp for every input: at 7 T rims stand out more
    than at 3 T and the filtered phase shows less than the QSM, so one temperature is too soft
    for one and too sharp for another. Each stratum with enough calibration lesions gets its
    own map; the rest, and lesions of an unknown stratum, use the pooled one.

    Examples:
        >>> cal = StratifiedCalibration(
        ...     Calibration("temperature", temperature=1.0),
        ...     {"qsm@7T": Calibration("temperature", temperature=0.5)},
        ... )
        >>> cal([1.0, 1.0], ["qsm", "qsm"], [7.0, 3.0]).round(3).tolist()
        [0.881, 0.731]
        >>> cal.stratum_of("qsm", 7.0), cal.stratum_of("phase", 3.0)
        ('qsm@7T', '')
        >>> StratifiedCalibration.from_json(cal.to_json()) == cal
        True
    """

    pooled: Calibration
    strata: dict[str, Calibration] = field(default_factory=dict)

    def stratum_of(self, input_kind: str | None, b0_tesla: float | None) -> str:
        """Return the stratum whose map calibrates this acquisition (``""``: the pooled)."""
        return next(k for k in stratum_keys(input_kind, b0_tesla) if k == "" or k in self.strata)

    def map_of(self, stratum: str) -> Calibration:
        """Return the map of ``stratum`` (the pooled one for ``""``)."""
        return self.strata[stratum] if stratum else self.pooled

    def __call__(
        self,
        logits: ArrayLike,
        input_kind: Kinds = None,
        b0_tesla: Fields = None,
    ) -> np.ndarray:
        """Return the calibrated probabilities of ``logits``, each by its stratum.

        ``input_kind`` and ``b0_tesla``: one per lesion, or one for all (``None``: unknown).
        """
        z = np.asarray(logits, dtype=np.float64).reshape(-1)
        kinds, fields = _per_lesion(z.size, input_kind, b0_tesla)
        out = np.empty(z.size)
        names = [self.stratum_of(k, f) for k, f in zip(kinds, fields, strict=True)]
        for name in set(names):
            take = np.array([n == name for n in names])
            out[take] = self.map_of(name)(z[take])
        return out

    @property
    def method(self) -> str:
        """The pooled map's method, and the strata that have their own (for model cards)."""
        if not self.strata:
            return self.pooled.method
        return f"{self.pooled.method}, per stratum ({', '.join(sorted(self.strata))})"

    def to_json(self) -> dict[str, Any]:
        """Return the maps as JSON-ready values: the pooled map's keys, plus ``strata``."""
        out = self.pooled.to_json()
        if self.strata:
            out["strata"] = {k: c.to_json() for k, c in sorted(self.strata.items())}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StratifiedCalibration:
        """Return the maps that :meth:`to_json` wrote (a plain :class:`Calibration`'s JSON
        is a stratified calibration without strata)."""
        strata = {str(k): Calibration.from_json(v) for k, v in data.get("strata", {}).items()}
        pooled = Calibration.from_json({k: v for k, v in data.items() if k != "strata"})
        return cls(pooled, strata)


def fit_stratified_calibration(
    logits: ArrayLike,
    labels: ArrayLike,
    input_kind: Kinds,
    b0_tesla: Fields = None,
    *,
    min_lesions: int = MIN_STRATUM_LESIONS,
    min_class: int = MIN_STRATUM_CLASS,
    seed: int = 0,
) -> tuple[StratifiedCalibration, dict[str, dict[str, Any]]]:
    """Return the pooled and per-stratum calibrations of a calibration split, and a report.

    Every map is one of :data:`RANK_PRESERVING`. Every stratum of :func:`stratum_keys` with at
    least ``min_lesions`` lesions and ``min_class`` of each class is fitted by
    :func:`fit_calibration` on its own lesions; it is kept only when its own map's cross-fit
    ECE there is below the ECE of the map it would otherwise fall back to. That fallback was
    fitted on a superset of these lesions, so the comparison favours it: a stratum gets a map
    of its own only when the pooled one clearly misses there.

    Returns:
        The calibration, and per stratum tried (``""``: pooled) its lesions, rims, the ECE of
        its own map and of the fallback, and whether it was kept.
    """
    z, y = _pair(logits, labels)
    kinds, fields = _per_lesion(z.size, input_kind, b0_tesla)
    pooled, pooled_ece = fit_calibration(z, y, seed=seed, methods=RANK_PRESERVING)
    report: dict[str, dict[str, Any]] = {
        "": {
            "lesions": int(z.size),
            "rims": int(y.sum()),
            "method": pooled.method,
            "ece": pooled_ece.get(pooled.method),
            "kept": True,
        }
    }
    memberships = [stratum_keys(k, f) for k, f in zip(kinds, fields, strict=True)]
    strata: dict[str, Calibration] = {}
    # kind strata first: a field stratum falls back to its kind's map where that was kept
    names = sorted({k for m in memberships for k in m if k}, key=lambda k: ("@" in k, k))
    for name in names:
        take = np.array([name in m for m in memberships])
        zs, ys = z[take], y[take]
        n_pos = int(ys.sum())
        entry: dict[str, Any] = {"lesions": int(zs.size), "rims": n_pos, "kept": False}
        report[name] = entry
        if zs.size < min_lesions or min(n_pos, zs.size - n_pos) < min_class:
            entry["why"] = f"fewer than {min_lesions} lesions or {min_class} of a class"
            continue
        own, own_ece = fit_calibration(zs, ys, seed=seed, methods=RANK_PRESERVING)
        fallback = StratifiedCalibration(pooled, dict(strata)).map_of(
            next(k for k in stratum_keys(*_split(name)) if k != name and (k == "" or k in strata))
        )
        # the fallback was fitted on a superset of these lesions (it has seen them): the
        # comparison favours it, the conservative side
        entry.update(
            method=own.method,
            ece=own_ece[own.method],
            fallback_ece=expected_calibration_error(fallback(zs), ys),
        )
        if entry["ece"] < entry["fallback_ece"]:
            strata[name], entry["kept"] = own, True
    return StratifiedCalibration(pooled, strata), report


def _per_lesion(
    n: int, input_kind: Kinds, b0_tesla: Fields
) -> tuple[list[str | None], list[float | None]]:
    """Return one input kind and one field (``None``: unknown) per lesion of ``n``."""
    kinds: list[Any] = (
        list(input_kind) if isinstance(input_kind, (list, tuple, np.ndarray)) else [input_kind] * n
    )
    values: list[Any] = (
        list(b0_tesla) if isinstance(b0_tesla, (list, tuple, np.ndarray)) else [b0_tesla] * n
    )
    fields = [None if f is None or not np.isfinite(f) else float(f) for f in values]
    if len(kinds) != n or len(fields) != n:
        raise ValueError(f"{n} logits but {len(kinds)} input kinds and {len(fields)} fields")
    return [None if k is None else str(k) for k in kinds], fields


def _split(name: str) -> tuple[str, float | None]:
    """Return the input kind and field of a stratum name (``qsm@7T`` → ``("qsm", 7.0)``)."""
    kind, _, tesla = name.partition("@")
    return kind, float(tesla[:-1]) if tesla else None
