"""Lesion-level false-positive control: a small classifier over candidate lesions.

The voxel-wise segmentation leaves candidate lesions that are not lesions: on a coarse FLAIR,
blocks of cortex (3-mm phantom: 53 of 61 candidates lie in the true grey matter); on real
FLAIR, unnulled CSF and the choroid plexus next to the ventricles. Each candidate is
described by a few measures a rater would look at, every one free of the voxel size:

=============  ================================================================================
``log_ul``      log10 of the volume (µl)
``p_max``       largest lesion probability in it
``p_mean``      mean lesion probability
``flair_wm``    mean FLAIR over the white matter's median FLAIR (normal-appearing WM)
``flair_ring``  mean FLAIR over the mean FLAIR of a 2-mm shell around it
``t1_wm``       mean T1-weighted intensity over the white matter's median (1 without a T1)
``t1_ring``     mean T1-weighted intensity over the shell's mean (1 without a T1)
``csf_ring``    mean CSF probability in the shell
``gm_ring``     mean cortical grey-matter probability in the shell
``wm_ring``     mean white-matter probability in the shell
``csf_mm``      distance from the candidate to the nearest CSF voxel (mm, at most 5)
=============  ================================================================================

and a logistic regression over the standardised measures says how likely it is a lesion.
Two models ship, one with the T1 measures and one without (FLAIR-only sessions). They are
trained on the phantom's candidates, labelled by the phantom's truth
(:func:`smoulder.segmentation.train_candidates.train`), and stored with the segmentation
bundle as ``configs/candidates.json``; the operating threshold is the one that maximised the
lesion-wise F1 on the training candidates.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from smoulder.segmentation.classes import CLASSES, LESION

FEATURES: tuple[str, ...] = (
    "log_ul",
    "p_max",
    "p_mean",
    "flair_wm",
    "flair_ring",
    "t1_wm",
    "t1_ring",
    "csf_ring",
    "gm_ring",
    "wm_ring",
    "csf_mm",
)
#: The measures a FLAIR-only model leaves out.
T1_FEATURES: tuple[str, ...] = ("t1_wm", "t1_ring")
#: Width of the shell around a candidate (mm).
RING_MM = 2.0
#: Distances to CSF are capped here (mm): farther is simply "not next to CSF".
CSF_CAP_MM = 5.0
_FULL = np.ones((3, 3, 3), dtype=bool)
_CSF, _WM, _CGM = CLASSES.index("CSF"), CLASSES.index("WM"), CLASSES.index("cortical_GM")


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 1e-6 else 1.0


def candidate_features(
    instances: np.ndarray,
    probs: np.ndarray,
    flair: np.ndarray,
    t1: np.ndarray | None,
    zooms_mm: tuple[float, float, float],
) -> np.ndarray:
    """Return the measures of every candidate: an ``(n, len(FEATURES))`` float array.

    Args:
        instances: candidate labels 1..n (0 elsewhere), on the image grid.
        probs: class probabilities on the same grid, ``(classes, *grid)``.
        flair: the FLAIR on the same grid.
        t1: the T1-weighted image on the same grid, or ``None``.
        zooms_mm: voxel size (mm) along the three axes.

    Examples:
        >>> probs = np.zeros((6, 12, 12, 12), np.float32); probs[4] = 1.0
        >>> inst = np.zeros((12, 12, 12), np.int32); inst[5:8, 5:8, 5:8] = 1
        >>> probs[4][inst > 0], probs[5][inst > 0] = 0.0, 0.9
        >>> flair = np.where(inst > 0, 2.0, 1.0).astype(np.float32)
        >>> f = candidate_features(inst, probs, flair, None, (1.0, 1.0, 1.0))
        >>> f.shape, round(float(f[0, 0]), 3), float(f[0, 3]), float(f[0, 5])
        ((1, 11), 1.431, 2.0, 1.0)
    """
    n = int(instances.max()) if instances.size else 0
    out = np.zeros((n, len(FEATURES)), dtype=np.float64)
    if n == 0:
        return out
    zooms = np.asarray(zooms_mm, dtype=float)
    voxel_ul = float(np.prod(zooms))
    dseg = probs.argmax(0)
    wm = dseg == _WM
    flair_wm = float(np.median(flair[wm])) if wm.any() else float(np.median(flair[flair > 0]))
    t1_wm = 1.0
    if t1 is not None:
        t1_wm = float(np.median(t1[wm])) if wm.any() else float(np.median(t1[t1 > 0]))
    csf = dseg == _CSF
    ring_steps = max(1, int(round(RING_MM / float(zooms.min()))))
    lesion_p = probs[LESION]
    # the box around a candidate reaches CSF_CAP_MM beyond it: distances up to the cap are
    # exact inside it, and farther ones are capped anyway
    pad = np.maximum(np.ceil(CSF_CAP_MM / zooms).astype(int) + 1, ring_steps + 1)
    for index, box in enumerate(ndi.find_objects(instances), start=1):
        if box is None:
            continue
        wide = tuple(
            slice(max(s.start - p, 0), min(s.stop + p, dim))
            for s, p, dim in zip(box, pad, instances.shape, strict=True)
        )
        inside = instances[wide] == index
        ring = ndi.binary_dilation(inside, _FULL, iterations=ring_steps) & (instances[wide] == 0)
        if not ring.any():
            ring = ~inside
        fl_in, fl_ring = float(flair[wide][inside].mean()), float(flair[wide][ring].mean())
        row = {
            "log_ul": math.log10(inside.sum() * voxel_ul),
            "p_max": float(lesion_p[wide][inside].max()),
            "p_mean": float(lesion_p[wide][inside].mean()),
            "flair_wm": _ratio(fl_in, flair_wm),
            "flair_ring": _ratio(fl_in, fl_ring),
            "t1_wm": 1.0,
            "t1_ring": 1.0,
            "csf_ring": float(probs[_CSF][wide][ring].mean()),
            "gm_ring": float(probs[_CGM][wide][ring].mean()),
            "wm_ring": float(probs[_WM][wide][ring].mean()),
            "csf_mm": _distance_mm(csf[wide], inside, zooms),
        }
        if t1 is not None:
            t1_in = float(t1[wide][inside].mean())
            row["t1_wm"] = _ratio(t1_in, t1_wm)
            row["t1_ring"] = _ratio(t1_in, float(t1[wide][ring].mean()))
        out[index - 1] = [row[name] for name in FEATURES]
    return out


def _distance_mm(csf: np.ndarray, inside: np.ndarray, zooms: np.ndarray) -> float:
    """Return the distance (mm, at most :data:`CSF_CAP_MM`) from ``inside`` to ``csf``."""
    if not csf.any():
        return CSF_CAP_MM
    to_csf = ndi.distance_transform_edt(~csf, sampling=zooms)
    return min(float(to_csf[inside].min()), CSF_CAP_MM)


@dataclass(frozen=True)
class LogisticModel:
    """A logistic regression over standardised measures, with its operating threshold."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]  # one per feature, then the intercept
    threshold: float

    def probability(self, table: np.ndarray) -> np.ndarray:
        """Return the lesion probability of each row of ``table`` (columns: :data:`FEATURES`)."""
        cols = [FEATURES.index(name) for name in self.features]
        z = (table[:, cols] - np.asarray(self.mean)) / np.asarray(self.scale)
        logit = z @ np.asarray(self.weights[:-1]) + self.weights[-1]
        return 1.0 / (1.0 + np.exp(-np.clip(logit, -50, 50)))

    def to_json(self) -> dict[str, Any]:
        """Return the model as plain JSON values."""
        return {
            "features": list(self.features),
            "mean": list(self.mean),
            "scale": list(self.scale),
            "weights": list(self.weights),
            "threshold": self.threshold,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LogisticModel:
        """Return the model stored by :meth:`to_json`."""
        unknown = set(data["features"]) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown candidate measures {sorted(unknown)}")
        return cls(
            features=tuple(data["features"]),
            mean=tuple(float(v) for v in data["mean"]),
            scale=tuple(float(v) for v in data["scale"]),
            weights=tuple(float(v) for v in data["weights"]),
            threshold=float(data["threshold"]),
        )


def fit_logistic(
    table: np.ndarray,
    labels: np.ndarray,
    features: tuple[str, ...] = FEATURES,
    *,
    l2: float = 1e-2,
    iterations: int = 4000,
) -> LogisticModel:
    """Return a logistic regression of ``labels`` (1 = lesion) on ``table``'s ``features``.

    Gradient descent on the mean log-loss plus ``l2`` times the squared weights (intercept
    free), classes weighted equally. The threshold is the one of the fitted probabilities
    that gives the highest F1 on these rows.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(200, len(FEATURES))); y = (x[:, 1] > 0).astype(float)
        >>> m = fit_logistic(x, y)
        >>> bool((m.probability(x) >= m.threshold).mean() > 0.4)
        True
    """
    labels = np.asarray(labels, dtype=float)
    if labels.min() == labels.max():
        raise ValueError("the training candidates must hold both lesions and non-lesions")
    cols = [FEATURES.index(name) for name in features]
    x = table[:, cols]
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = np.c_[(x - mean) / scale, np.ones(len(x))]
    share = labels.mean()
    sample_w = np.where(labels > 0, 0.5 / share, 0.5 / (1 - share)) / len(labels)
    w = np.zeros(z.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -50, 50)))
        grad = z.T @ (sample_w * (p - labels)) + l2 * np.r_[w[:-1], 0.0]
        w -= 1.0 * grad
    model = LogisticModel(
        tuple(features), tuple(mean.tolist()), tuple(scale.tolist()), tuple(w.tolist()), 0.5
    )
    prob = model.probability(table)
    best, best_f1 = 0.5, -1.0
    for t in np.unique(np.round(prob, 3)):
        keep = prob >= t
        tp = float((keep & (labels > 0)).sum())
        f1 = 2 * tp / (keep.sum() + labels.sum()) if keep.any() else 0.0
        if f1 > best_f1:
            best, best_f1 = float(t), f1
    return LogisticModel(model.features, model.mean, model.scale, model.weights, best)


@dataclass(frozen=True)
class CandidateClassifier:
    """The two shipped models: with the T1 measures, and for FLAIR-only sessions."""

    with_t1: LogisticModel
    flair_only: LogisticModel

    def model(self, has_t1: bool) -> LogisticModel:
        """Return the model for a session with or without a T1-weighted image."""
        return self.with_t1 if has_t1 else self.flair_only

    def save(self, path: Path) -> None:
        """Write the classifier as JSON (a temporary name, then renamed)."""
        tmp = path.with_name(path.name + ".tmp")
        payload = {"with_t1": self.with_t1.to_json(), "flair_only": self.flair_only.to_json()}
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> CandidateClassifier | None:
        """Return the classifier stored at ``path``, or ``None`` where there is none."""
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(
            LogisticModel.from_json(data["with_t1"]), LogisticModel.from_json(data["flair_only"])
        )


def keep_candidates(instances: np.ndarray, probability: np.ndarray, threshold: float) -> np.ndarray:
    """Return ``instances`` without the candidates whose ``probability`` is under ``threshold``.

    Kept candidates are renumbered 1..m in their order.

    Examples:
        >>> inst = np.array([0, 1, 1, 2, 3])
        >>> keep_candidates(inst, np.array([0.9, 0.1, 0.6]), 0.5).tolist()
        [0, 1, 1, 0, 2]
    """
    keep = np.asarray(probability) >= threshold
    lookup = np.zeros(len(keep) + 1, dtype=instances.dtype)
    lookup[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=instances.dtype)
    return lookup[instances]
