"""Training of the rim classifier on patch shards, and its fine-tuning on a site's ratings.

The recipe (``smoulder train rims RUN --shards ...``), as a methods section:

1. **Data**: lesion patches from ``.npz`` shards (``patches (N, 4, 24, 24, 24)``, ``labels``
   1 = rim, ``input_kind``, ``lesion_id``, ``subject``, ``session``; written from the phantom's
   truth by the patch extraction of :mod:`smoulder.rims.patches`).
2. **Split by subject**: subjects are shuffled (seeded) and dealt to validation, calibration
   and training until each holds its share of the lesions (20 %, 20 %, the rest); no subject is
   in two splits. Validation and calibration must each hold rims and non-rims.
3. **Training**: each epoch draws as many training patches as there are, class-balanced
   (rims are rare: each class drawn half the time), augmented by random flips, a rotation by a
   multiple of 90° about the field's axis, and intensity jitter of the image channels (a random
   gain and Gaussian noise; the mask channel is kept). Binary cross-entropy, AdamW, one-cycle
   learning rate. Epoch ``e``'s sampling is seeded by ``(seed, e)``, so a resumed run draws
   what an uninterrupted one would have.
4. **Model choice**: after each epoch the network is scored on the validation split (no TTA);
   the epoch with the best PR-AUC is kept (ties: the lower validation loss).
5. **Calibration**: the kept network's logits (8-flip TTA) on the calibration split, fused
   with the rule-based measures, fit the calibration: a pooled map and one per acquisition
   stratum (input kind, and field where the shards state it) with enough lesions
   (:func:`smoulder.rims.calibration.fit_stratified_calibration`), and the three operating
   points on the calibrated probabilities; the validation split then gives the figures of
   the model card (ROC-AUC with its DeLong interval, PR-AUC, ECE before and after
   calibration, sensitivity/specificity at each operating point). The bundle is written to
   ``RUN/bundle`` and the figures to ``RUN/metrics.json``.

A run resumes from ``RUN/checkpoint.pt`` (written after every epoch: model, optimiser,
scheduler, epoch, history, best state, recipe) and refuses to resume with another recipe, as
the segmentation trainer does.

Fine-tuning (:func:`fine_tune`) starts from a bundle, reads a ratings table, and runs a k-fold
evaluation: the shipped model's and the fine-tuned model's out-of-fold AUCs with DeLong
intervals, and their paired difference. :func:`write_fine_tuned` then trains on every rated
lesion and writes a new bundle (never over the one it started from, nor into the package).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from smoulder.errors import ConfigError, InputError
from smoulder.rims.calibration import (
    MIN_STRATUM_LESIONS,
    Fields,
    Kinds,
    StratifiedCalibration,
    auc_confidence_interval,
    auc_difference_interval,
    expected_calibration_error,
    fit_calibration,
    fit_fusion,
    fit_stratified_calibration,
    operating_points,
    pr_auc,
    roc_auc,
    sensitivity_specificity,
    sigmoid,
    stratum_keys,
)
from smoulder.rims.network import (
    RimBundle,
    RimNetworkDef,
    check_patches,
    count_parameters,
    predict_logits,
    save_bundle,
)
from smoulder.rims.rules import FEATURES

if TYPE_CHECKING:
    import torch

#: Arrays every training shard holds.
SHARD_ARRAYS = ("patches", "labels", "input_kind", "lesion_id", "subject", "session")
#: Arrays a shard may hold: the rule-based measures of each patch's lesion
#: (``(N, len(smoulder.rims.rules.FEATURES))``), for the classifier's fusion; and the field
#: strength of each patch's acquisition (tesla; NaN: unknown), for the stratified calibration.
OPTIONAL_ARRAYS = ("features", "b0_tesla")

#: A lesion's key in ratings and patch tables: (participant, session, lesion ID), the
#: participant and session without their ``sub-``/``ses-`` prefixes.
LesionKey = tuple[str, str, int]


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class PatchSet:
    """Lesion patches and what is known of each (the arrays of :data:`SHARD_ARRAYS`)."""

    patches: np.ndarray
    labels: np.ndarray
    input_kind: np.ndarray
    lesion_id: np.ndarray
    subject: np.ndarray
    session: np.ndarray
    features: np.ndarray | None = None
    b0_tesla: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.size)

    def subset(self, index: np.ndarray) -> PatchSet:
        """Return the patches at ``index`` (integers or a boolean mask)."""
        optional = [None if (a := getattr(self, n)) is None else a[index] for n in OPTIONAL_ARRAYS]
        return PatchSet(*(getattr(self, name)[index] for name in SHARD_ARRAYS), *optional)

    def fields(self) -> np.ndarray:
        """Return each patch's field strength in tesla (NaN where the shard does not say)."""
        if self.b0_tesla is None:
            return np.full(len(self), np.nan)
        return np.asarray(self.b0_tesla, np.float64)

    def keys(self) -> list[LesionKey]:
        """Return each patch's :data:`LesionKey`."""
        return [
            lesion_key(s, t, i)
            for s, t, i in zip(self.subject, self.session, self.lesion_id, strict=True)
        ]

    def by_key(self, prefer: Sequence[str] = ("qsm", "phase")) -> dict[LesionKey, np.ndarray]:
        """Return one patch per :data:`LesionKey` (what :func:`fine_tune` reads).

        A lesion with patches of several input kinds (the phantom's shards hold a QSM and a
        phase patch of each) keeps the first kind in ``prefer``.
        """
        rank = {kind: i for i, kind in enumerate(prefer)}
        out: dict[LesionKey, np.ndarray] = {}
        kind_of: dict[LesionKey, int] = {}
        for key, kind, patch in zip(self.keys(), self.input_kind, self.patches, strict=True):
            r = rank.get(str(kind), len(rank))
            if key not in out or r < kind_of[key]:
                out[key], kind_of[key] = patch, r
        return out


def lesion_key(participant: object, session: object, lesion: object) -> LesionKey:
    """Return the :data:`LesionKey` of a lesion, prefixes and blanks removed.

    Examples:
        >>> lesion_key("sub-01", "ses-02", "7")
        ('01', '02', 7)
        >>> lesion_key("01", "n/a", 7.0)
        ('01', '', 7)
    """
    p = str(participant).strip().removeprefix("sub-")
    s = str(session).strip().removeprefix("ses-")
    return p, ("" if s in ("n/a", "None") else s), int(float(str(lesion)))


def write_shard(patch_set: PatchSet, path: str | Path) -> Path:
    """Return ``path`` after writing ``patch_set`` there as a compressed shard, atomically.

    The arrays of :data:`SHARD_ARRAYS`, patches in half precision (what :func:`load_shards`
    reads back).
    """
    from smoulder.images import atomic_path

    arrays = {name: getattr(patch_set, name) for name in SHARD_ARRAYS}
    arrays["patches"] = np.asarray(arrays["patches"], np.float16)
    if patch_set.features is not None:
        arrays["features"] = np.asarray(patch_set.features, np.float32)
    if patch_set.b0_tesla is not None:
        arrays["b0_tesla"] = np.asarray(patch_set.b0_tesla, np.float32)
    with atomic_path(path, suffix=".npz") as tmp, tmp.open("wb") as handle:
        np.savez_compressed(handle, **arrays)
    return Path(path)


def load_shards(shards: Iterable[str | Path]) -> PatchSet:
    """Return the patches of ``.npz`` shard files, or of every ``*.npz`` under given folders
    (a run's shards, or a pipeline's derivatives with their ``desc-rims_patches.npz``).

    Raises:
        InputError: no shard found, or a shard without one of :data:`SHARD_ARRAYS`, with
            patches of another shape, or arrays of different lengths.
    """
    shards = list(shards)
    files: list[Path] = []
    for item in shards:
        path = Path(item)
        files.extend(sorted(path.rglob("*.npz")) if path.is_dir() else [path])
    if not files:
        raise InputError(
            ", ".join(map(str, shards)), expected="rim patch shards (*.npz)", found="none"
        )
    parts: dict[str, list[np.ndarray]] = {name: [] for name in (*SHARD_ARRAYS, *OPTIONAL_ARRAYS)}
    for f in files:
        if not f.is_file():
            raise InputError(str(f), expected="a rim patch shard (.npz)", found="no such file")
        with np.load(f, allow_pickle=False) as data:
            missing = [name for name in SHARD_ARRAYS if name not in data]
            if missing:
                raise InputError(
                    str(f), expected=f"arrays {', '.join(SHARD_ARRAYS)}", found=f"no {missing}"
                )
            names = [n for n in (*SHARD_ARRAYS, *OPTIONAL_ARRAYS) if n in data]
            arrays = {name: data[name] for name in names}
        check_patches(arrays["patches"][:0], str(f))
        n = len(arrays["patches"])
        lengths = {name: len(a) for name, a in arrays.items()}
        if set(lengths.values()) != {n}:
            raise InputError(
                str(f), expected="one entry per patch in every array", found=str(lengths)
            )
        # the field where a shard states it, NaN where it does not
        arrays.setdefault("b0_tesla", np.full(n, np.nan, np.float32))
        if not np.isin(arrays["labels"], (0, 1)).all():
            raise InputError(
                str(f), expected="labels 0 or 1", found=str(np.unique(arrays["labels"]))
            )
        for name in arrays:
            parts[name].append(arrays[name])
    cat = {name: np.concatenate(parts[name]) for name in SHARD_ARRAYS}
    # the measures only when every shard has them
    features = parts["features"]
    cat["features"] = np.concatenate(features) if len(features) == len(files) else None
    fields = np.concatenate(parts["b0_tesla"]).astype(np.float64)
    cat["b0_tesla"] = fields if np.isfinite(fields).any() else None
    cat["labels"] = cat["labels"].astype(np.uint8)
    for name in ("input_kind", "subject", "session"):
        cat[name] = cat[name].astype(str)
    return PatchSet(**cat)


def split_by_subject(
    subjects: np.ndarray, seed: int, shares: tuple[float, float] = (0.2, 0.2)
) -> dict[str, np.ndarray]:
    """Return boolean masks ``train``/``calibration``/``validation``, whole subjects each.

    Subjects are shuffled by ``seed`` and dealt to validation until it holds ``shares[1]``
    of the lesions, then to calibration until it holds ``shares[0]``, the rest to training;
    each split gets at least one subject.

    Examples:
        >>> s = np.array(["a", "a", "b", "c", "c", "d", "e"])
        >>> split = split_by_subject(s, seed=0)
        >>> [len(set(s[m])) > 0 for m in split.values()], int(sum(m.sum() for m in split.values()))
        ([True, True, True], 7)
    """
    names = np.unique(subjects)
    if names.size < 3:
        raise InputError(
            "shards",
            expected="lesions of at least 3 subjects (training, calibration, validation)",
            found=f"{names.size} subject(s)",
        )
    order = np.random.default_rng(seed).permutation(names)
    count = Counter(subjects.tolist())
    total = len(subjects)
    split_of: dict[str, str] = {}
    filled = {"validation": 0, "calibration": 0}
    targets = {"validation": shares[1] * total, "calibration": shares[0] * total}
    remaining = list(order)
    for name in ("validation", "calibration"):
        while remaining and (filled[name] == 0 or filled[name] < targets[name]):
            if len(remaining) <= (2 if name == "validation" else 1):
                break  # leave a subject for each later split
            subject = remaining.pop(0)
            split_of[subject] = name
            filled[name] += count[subject]
    for subject in remaining:
        split_of[subject] = "train"
    which = np.array([split_of[s] for s in subjects.tolist()])
    return {name: which == name for name in ("train", "calibration", "validation")}


def balanced_indices(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Return ``n`` indices drawn with replacement, each class present drawn equally often.

    Examples:
        >>> y = np.array([0] * 98 + [1] * 2)
        >>> idx = balanced_indices(y, 1000, np.random.default_rng(0))
        >>> bool(0.4 < y[idx].mean() < 0.6)
        True
    """
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    weight = 1.0 / counts[labels]
    return rng.choice(labels.size, size=n, replace=True, p=weight / weight.sum())


def augment(
    patches: np.ndarray, rng: np.random.Generator, *, gain: float = 0.1, noise: float = 0.05
) -> np.ndarray:
    """Return randomly flipped, 90°-rotated and intensity-jittered copies of ``patches``.

    Per patch: each spatial axis flipped with probability 1/2 (the dipole kernel is symmetric
    under each); a rotation by ``k`` × 90° (``k`` in 0..3) about the third axis only, the
    field's direction in the GRE grid (a rotation tilting it would move a vein's or a rim's
    dipolar phase pattern where no acquisition puts it); the image channels (all but the last,
    the mask) multiplied by ``exp(N(0, gain))`` and given Gaussian noise of SD ``noise``.

    Examples:
        >>> x = np.random.default_rng(1).random((2, 4, 24, 24, 24)).astype(np.float32)
        >>> y = augment(x, np.random.default_rng(0))
        >>> y.shape, y.dtype, bool(np.allclose(np.sort(y[:, 3].ravel()), np.sort(x[:, 3].ravel())))
        ((2, 4, 24, 24, 24), dtype('float32'), True)
    """
    out = np.empty(patches.shape, dtype=np.float32)
    for i, patch in enumerate(patches.astype(np.float32, copy=False)):
        flip = tuple(ax for ax in (1, 2, 3) if rng.random() < 0.5)
        p = np.flip(patch, flip) if flip else patch
        # only about the B0 axis (the GRE's third): a dipole's pattern turns with the field
        p = np.rot90(p, k=int(rng.integers(4)), axes=(1, 2))
        p = np.array(p, dtype=np.float32)
        image = p[:-1]
        image *= np.exp(rng.normal(0.0, gain, (len(image), 1, 1, 1))).astype(np.float32)
        image += rng.normal(0.0, noise, image.shape).astype(np.float32)
        out[i] = p
    return out


# ----------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class RimTrainSettings:
    """The training recipe (saved in the checkpoint and in the bundle's metadata)."""

    epochs: int = 40
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 0
    network: RimNetworkDef = field(default_factory=RimNetworkDef)
    init: str = ""  # a rim bundle whose weights start the run
    calibration_share: float = 0.2  # share of lesions (whole subjects) held out to calibrate
    validation_share: float = 0.2  # share of lesions (whole subjects) held out to validate
    gain: float = 0.1  # SD of the log intensity gain of the image channels
    noise: float = 0.05  # SD of the Gaussian noise added to the image channels
    fusion: bool = True  # fuse the rule-based measures with the logit, where shards hold them


def _recipe(settings: RimTrainSettings, data: PatchSet) -> dict[str, Any]:
    """Return what a run must keep across resumes: the settings and the data trained on."""
    return {
        "settings": json.loads(json.dumps(asdict(settings))),  # tuples as lists
        "data": {
            "patches": len(data),
            "rims": int(data.labels.sum()),
            "subjects": int(np.unique(data.subject).size),
        },
    }


@dataclass
class _Run:
    """The state of a training run: what its checkpoint holds."""

    net: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    recipe: dict[str, Any]
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: tuple[float, float] = (-math.inf, -math.inf)  # (PR-AUC, -loss) on validation
    best_epoch: int = 0
    best_state: dict[str, Any] = field(default_factory=dict)

    def checkpoint(self) -> dict[str, Any]:
        """Return what ``checkpoint.pt`` holds."""
        return {
            "model": self.net.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "epoch": self.epoch,
            "history": self.history,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "recipe": self.recipe,
        }


def _optimiser(net: torch.nn.Module, lr: float, total_steps: int) -> tuple[Any, Any]:
    import torch

    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(1, total_steps), pct_start=0.1
    )
    return opt, sched


def _epoch(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    data: PatchSet,
    settings: RimTrainSettings,
    epoch: int,
    device: str,
) -> float:
    """Return the mean loss of one epoch of class-balanced, augmented batches."""
    import torch

    rng = np.random.default_rng([settings.seed, epoch])
    torch.manual_seed(settings.seed * 100_003 + epoch)
    order = balanced_indices(data.labels, len(data), rng)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    net.train()
    losses = []
    for start in range(0, len(order), settings.batch_size):
        idx = order[start : start + settings.batch_size]
        x = torch.from_numpy(
            augment(data.patches[idx], rng, gain=settings.gain, noise=settings.noise)
        )
        y = torch.from_numpy(data.labels[idx].astype(np.float32))
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x.to(device)).reshape(-1), y.to(device))
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


def _steps(n: int, batch: int) -> int:
    return -(-n // batch)


def _start(
    ckpt_file: Path,
    settings: RimTrainSettings,
    recipe: dict[str, Any],
    n_train: int,
    device: str,
    say: Callable[[str], None],
) -> _Run:
    """Return a new run (from ``settings.init`` when set) or the one ``ckpt_file`` holds."""
    import torch

    net = settings.network.build().to(device)
    if settings.init:
        from smoulder.rims.network import load_bundle

        net.load_state_dict(load_bundle(settings.init).network.state_dict())
        say(f"initialised from {settings.init}")
    total = settings.epochs * _steps(n_train, settings.batch_size)
    opt, sched = _optimiser(net, settings.learning_rate, total)
    run = _Run(net, opt, sched, recipe)
    if ckpt_file.is_file():
        ckpt = torch.load(ckpt_file, map_location=device, weights_only=False)
        from smoulder.segmentation.train import check_recipe

        check_recipe(ckpt["recipe"], recipe, ckpt_file)
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        run.epoch, run.history = ckpt["epoch"], ckpt["history"]
        run.best, run.best_epoch, run.best_state = (
            ckpt["best"],
            ckpt["best_epoch"],
            ckpt["best_state"],
        )
        say(f"resuming after epoch {run.epoch} (best validation PR-AUC {run.best[0]:.3f})")
    return run


def _save_checkpoint(run: _Run, path: Path) -> None:
    import torch

    from smoulder.images import atomic_path

    with atomic_path(path) as tmp:
        torch.save(run.checkpoint(), tmp)


def _scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Return the rank figures of ``logits`` (ROC-AUC, its interval, PR-AUC)."""
    low, high = auc_confidence_interval(logits, labels)
    return {
        "roc_auc": roc_auc(logits, labels),
        "roc_auc_ci": [low, high],
        "pr_auc": pr_auc(logits, labels),
    }


def evaluate(
    logits: np.ndarray,
    labels: np.ndarray,
    calibration: StratifiedCalibration,
    points: Mapping[str, float],
    *,
    input_kind: Kinds = None,
    b0_tesla: Fields = None,
) -> dict[str, Any]:
    """Return the figures of a model card on one split: AUCs, ECE, operating points.

    Args:
        logits: the network's mean logits on the split's lesions.
        labels: 1 for a rim, 0 otherwise.
        calibration: the maps to judge (each lesion's by its input kind and field; with
            strata, the AUCs rank the calibrated probabilities, whose order across strata
            differs from the logits').
        points: the operating points' thresholds.
        input_kind, b0_tesla: each lesion's acquisition (for a stratified calibration).
    """
    prob = calibration(logits, input_kind, b0_tesla)
    out: dict[str, Any] = {
        "lesions": int(labels.size),
        "rims": int(labels.sum()),
        **_scores(prob if calibration.strata else logits, labels),
        "ece_uncalibrated": expected_calibration_error(sigmoid(logits), labels),
        "ece": expected_calibration_error(prob, labels),
    }
    for name, t in points.items():
        sens, spec = sensitivity_specificity(prob, labels, t)
        out[name] = {"threshold": t, "sensitivity": sens, "specificity": spec}
    return out


def train(
    run_dir: str | Path,
    shards: Sequence[str | Path],
    *,
    epochs: int = RimTrainSettings.epochs,
    batch_size: int = RimTrainSettings.batch_size,
    lr: float = RimTrainSettings.learning_rate,
    seed: int = RimTrainSettings.seed,
    device: str = "cpu",
    threads: int | None = None,
    init: str | Path | None = None,
    network: RimNetworkDef | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train (or resume training) the rim classifier into ``run_dir``; return its figures.

    Args:
        run_dir: run folder: ``checkpoint.pt``, ``history.json``, ``metrics.json``, ``bundle/``.
        shards: ``.npz`` shard files or folders of them.
        epochs: passes over the training split (class-balanced draws).
        batch_size: patches per optimisation step.
        lr: peak learning rate (one-cycle schedule).
        seed: seeds the subject split, the sampling and the weights.
        device: ``cpu`` or ``cuda``.
        threads: CPU threads of PyTorch during the run (restored afterwards).
        init: a rim bundle to start from (its network definition is used).
        network: the network definition of a run from scratch (default :class:`RimNetworkDef`).
        say: where progress lines go.

    Returns:
        ``{"best_epoch", "epochs", "parameters", "calibration", "calibration_strata",
        "operating_points", "validation", "bundle"}``, also written to ``metrics.json``.
    """
    from smoulder.devices import torch_threads

    if init:
        from smoulder.rims.network import load_bundle

        network = load_bundle(init).network_def
    settings = RimTrainSettings(
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=lr,
        seed=seed,
        network=network or RimNetworkDef(),
        init=str(init or ""),
    )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = load_shards(shards)
    with torch_threads(threads):
        return _train(run_dir, data, settings, device, say)


def _train(
    run_dir: Path,
    data: PatchSet,
    settings: RimTrainSettings,
    device: str,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Return the figures of a run in ``run_dir`` (see :func:`train`)."""
    import torch

    from smoulder.images import save_json

    split = split_by_subject(
        data.subject, settings.seed, (settings.calibration_share, settings.validation_share)
    )
    parts = {name: data.subset(mask) for name, mask in split.items()}
    for name in ("calibration", "validation"):
        n_rim = int(parts[name].labels.sum())
        if n_rim == 0 or n_rim == len(parts[name]):
            raise InputError(
                "shards",
                expected=f"rims and non-rims in the {name} split (whole subjects)",
                found=f"{n_rim} rim(s) among {len(parts[name])} lesions",
                hint="add subjects with rims, or change --seed to deal the subjects anew",
            )
    say(
        "split by subject: "
        + ", ".join(
            f"{k} {len(v)} lesions ({int(v.labels.sum())} rims, "
            f"{np.unique(v.subject).size} subjects)"
            for k, v in parts.items()
        )
    )
    torch.manual_seed(settings.seed)
    run = _start(
        run_dir / "checkpoint.pt",
        settings,
        _recipe(settings, data),
        len(parts["train"]),
        device,
        say,
    )
    val = parts["validation"]
    tic = time.perf_counter()
    while run.epoch < settings.epochs:
        loss = _epoch(run.net, run.opt, run.sched, parts["train"], settings, run.epoch, device)
        run.epoch += 1
        logits = predict_logits(run.net, val.patches, device, tta=False)
        entry = {
            "epoch": run.epoch,
            "loss": loss,
            "validation_loss": float(np.mean(np.logaddexp(0.0, logits) - val.labels * logits)),
            **_scores(logits, val.labels),
        }
        entry["elapsed_s"] = time.perf_counter() - tic
        run.history.append(entry)
        score = (entry["pr_auc"], -entry["validation_loss"])
        if score > run.best:
            run.best, run.best_epoch = score, run.epoch
            run.best_state = {k: v.detach().cpu().clone() for k, v in run.net.state_dict().items()}
        _save_checkpoint(run, run_dir / "checkpoint.pt")
        save_json(run.history, run_dir / "history.json")
        say(json.dumps({k: _rounded(v) for k, v in entry.items()}))
    return _finish(run, parts, settings, run_dir, device, say)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _finish(
    run: _Run,
    parts: dict[str, PatchSet],
    settings: RimTrainSettings,
    run_dir: Path,
    device: str,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Return the figures after calibrating the best network; write the bundle and metrics."""
    from smoulder.images import save_json

    if run.best_state:
        run.net.load_state_dict(run.best_state)
    cal, val = parts["calibration"], parts["validation"]
    cal_logits = predict_logits(run.net, cal.patches, device, tta=True)
    val_logits = predict_logits(run.net, val.patches, device, tta=True)
    network_only = _scores(val_logits, val.labels)
    fusion = None
    if settings.fusion and cal.features is not None and val.features is not None:
        fusion = fit_fusion(cal_logits, cal.features, cal.labels, FEATURES)
        cal_logits, val_logits = fusion(cal_logits, cal.features), fusion(val_logits, val.features)
    calibration, strata = fit_stratified_calibration(
        cal_logits, cal.labels, cal.input_kind, cal.fields()
    )
    points = operating_points(calibration(cal_logits, cal.input_kind, cal.fields()), cal.labels)
    figures = evaluate(
        val_logits,
        val.labels,
        calibration,
        points,
        input_kind=val.input_kind,
        b0_tesla=val.fields(),
    )
    metrics: dict[str, Any] = {
        "best_epoch": run.best_epoch,
        "epochs": run.epoch,
        "parameters": count_parameters(run.net),
        "calibration": calibration.to_json(),
        "calibration_strata": strata,
        "operating_points": points,
        "validation": figures,
        "validation_network_only": network_only,
        "fusion": None if fusion is None else fusion.to_json(),
        "input_kinds": dict(Counter(parts["train"].input_kind.tolist())),
    }
    bundle = save_bundle(
        run_dir / "bundle",
        run.net,
        calibration,
        points,
        {"training": {**run.recipe, **metrics}},
        network_def=settings.network,
        fusion=fusion,
    )
    metrics["bundle"] = str(bundle)
    save_json(metrics, run_dir / "metrics.json")
    say(
        f"best epoch {run.best_epoch}: validation ROC-AUC {figures['roc_auc']:.3f}, "
        f"PR-AUC {figures['pr_auc']:.3f}, calibration {calibration.method}; "
        f"bundle {bundle}"
    )
    return metrics


# ----------------------------------------------------------------------------- fine-tuning

#: How rater answers become labels: definite/yes → 1, none/no → 0. ``probable`` is left out
#: by default: the rater was unsure, and either label would put that doubt into training.
RATING_VALUES = {"yes": 1, "definite": 1, "no": 0, "none": 0}


@dataclass(frozen=True)
class Ratings:
    """Labels of rated lesions and the rows left out, with why."""

    labels: dict[LesionKey, int]
    left_out: dict[str, int]
    source: str


def read_ratings(path: str | Path, *, probable: str = "exclude") -> Ratings:
    """Return the rim labels of a ratings table: plain ``participant, session, lesion, rim``
    or the report's review table (``sub-X_desc-review_lesions.tsv``).

    A review table has no participant or session column: the participant is read from the file
    name, and its lesion IDs (the subject's, tracked across sessions) match that lesion in
    every session. Several rows on one lesion (raters) are combined by majority; a tie leaves
    the lesion out. Unrated rows (empty or ``n/a``) are skipped.

    Args:
        path: the TSV file.
        probable: what a ``probable`` rim counts as: ``exclude`` (default), ``rim`` or ``no_rim``.

    Raises:
        InputError: missing columns or a rim value that is not one of the known answers.
    """
    if probable not in ("exclude", "rim", "no_rim"):
        raise ConfigError(f"--probable: expected exclude, rim or no_rim, found {probable!r}")
    path = Path(path)
    values = dict(RATING_VALUES)
    if probable != "exclude":
        values["probable"] = int(probable == "rim")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(str(path), expected="a ratings table (TSV)", found=str(exc)) from exc
    reader = csv.DictReader(text.splitlines(), delimiter="\t")
    columns = reader.fieldnames or []
    review = "lesion_id" in columns
    need = ("lesion_id", "rim") if review else ("participant", "session", "lesion", "rim")
    if not set(need) <= set(columns):
        raise InputError(
            str(path),
            expected="columns participant, session, lesion, rim (or the review table's "
            "lesion_id, rater, rim)",
            found=f"columns {columns}",
        )
    participant = path.name.split("_")[0] if review else ""
    votes: dict[LesionKey, list[int]] = {}
    left_out: Counter[str] = Counter()
    for n, row in enumerate(reader, start=2):
        answer = (row.get("rim") or "").strip().lower()
        if answer in ("", "n/a"):
            left_out["unrated"] += 1
            continue
        if answer == "probable" and probable == "exclude":
            left_out["probable"] += 1
            continue
        if answer not in values:
            raise InputError(
                f"{path}:{n}",
                expected=f"rim one of {', '.join([*values, 'probable'][:6])} or empty",
                found=repr(answer),
            )
        try:
            key = (
                lesion_key(participant, "", row["lesion_id"])
                if review
                else lesion_key(row["participant"], row["session"], row["lesion"])
            )
        except ValueError as exc:
            raise InputError(
                f"{path}:{n}", expected="an integer lesion ID", found=str(exc)
            ) from exc
        votes.setdefault(key, []).append(values[answer])
    labels: dict[LesionKey, int] = {}
    for key, v in votes.items():
        share = float(np.mean(v))
        if share == 0.5:
            left_out["raters disagree"] += 1
        else:
            labels[key] = int(share > 0.5)
    return Ratings(labels, dict(left_out), str(path))


def match_ratings(
    ratings: Ratings, patches_by_key: Mapping[LesionKey, np.ndarray]
) -> tuple[list[LesionKey], np.ndarray]:
    """Return the patch keys of the rated lesions and their labels.

    A rating without a session matches the lesion in every session of its participant.

    Raises:
        InputError: rated lesions that have no patch, named (the first ten).
    """
    by_lesion: dict[LesionKey, list[LesionKey]] = {}
    for key in patches_by_key:
        by_lesion.setdefault((key[0], "", key[2]), []).append(key)
    keys: list[LesionKey] = []
    labels: list[int] = []
    unknown: list[LesionKey] = []
    for key, label in ratings.labels.items():
        found = [key] if key in patches_by_key else (by_lesion.get(key, []) if not key[1] else [])
        if not found:
            unknown.append(key)
        for k in sorted(found):
            keys.append(k)
            labels.append(label)
    if unknown:
        names = ", ".join(
            f"sub-{p}{f' ses-{s}' if s else ''} lesion {i}" for p, s, i in sorted(unknown)[:10]
        )
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise InputError(
            ratings.source,
            expected="ratings of lesions that exist in the sessions' lesion tables",
            found=f"{len(unknown)} unknown lesion(s): {names}{more}",
            hint="check the participant, session and lesion IDs against the report's lesion table",
        )
    return keys, np.asarray(labels, dtype=np.uint8)


def _folds(
    keys: list[LesionKey], labels: np.ndarray, folds: int, seed: int
) -> tuple[np.ndarray, str]:
    """Return a fold per lesion and how the folds were made (by participant or by lesion)."""
    rng = np.random.default_rng(seed)
    participants = sorted({k[0] for k in keys})
    if len(participants) >= folds:
        rims = {p: 0 for p in participants}
        for k, y in zip(keys, labels, strict=True):
            rims[k[0]] += int(y)
        shuffled = [participants[i] for i in rng.permutation(len(participants))]
        ranked = sorted(shuffled, key=lambda p: -rims[p])  # deal rims evenly over the folds
        fold_of = {p: i % folds for i, p in enumerate(ranked)}
        return np.array([fold_of[k[0]] for k in keys]), "participant"
    fold = np.empty(len(keys), dtype=np.int64)
    for cls in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        fold[idx] = np.arange(idx.size) % folds
    return fold, "lesion"


@dataclass
class FineTuneReport:
    """The k-fold comparison of the starting bundle and the fine-tuned model.

    ``initial``/``fine_tuned`` hold the pooled out-of-fold ``roc_auc``, ``roc_auc_ci``,
    ``pr_auc`` and the per-fold ``fold_roc_auc``; ``difference`` is the paired DeLong
    ``[AUC(fine-tuned) - AUC(initial), low, high]``.
    """

    ratings: str
    init: str
    lesions: int
    rims: int
    left_out: dict[str, int]
    folds: int
    grouped_by: str
    initial: dict[str, Any]
    fine_tuned: dict[str, Any]
    difference: list[float]
    settings: dict[str, Any]
    keys: list[LesionKey] = field(repr=False)
    labels: np.ndarray = field(repr=False)
    oof_logits: np.ndarray = field(repr=False)
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Return the report as the lines the command prints."""

        def auc(d: dict[str, Any]) -> str:
            low, high = d["roc_auc_ci"]
            return (
                f"ROC-AUC {d['roc_auc']:.3f} (95 % CI {low:.3f}-{high:.3f}), "
                f"PR-AUC {d['pr_auc']:.3f}"
            )

        left = ", ".join(f"{v} {k}" for k, v in self.left_out.items()) or "none"
        d, low, high = self.difference
        return [
            f"ratings {self.ratings}: {self.lesions} lesions, {self.rims} rims (left out: {left})",
            f"{self.folds}-fold evaluation, folds by {self.grouped_by}",
            f"shipped model {self.init}: {auc(self.initial)}",
            f"fine-tuned model:  {auc(self.fine_tuned)}",
            f"difference in ROC-AUC: {d:+.3f} (95 % CI {low:+.3f} to {high:+.3f}, paired DeLong)",
            *[f"warning: {w}" for w in self.warnings],
        ]

    def to_json(self) -> dict[str, Any]:
        """Return the report's figures as JSON-ready values."""
        skip = {"keys", "labels", "oof_logits"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


def _fit(
    net: torch.nn.Module, data: PatchSet, settings: RimTrainSettings, device: str
) -> torch.nn.Module:
    """Return ``net`` after ``settings.epochs`` epochs on ``data``."""
    opt, sched = _optimiser(
        net, settings.learning_rate, settings.epochs * _steps(len(data), settings.batch_size)
    )
    for epoch in range(settings.epochs):
        _epoch(net, opt, sched, data, settings, epoch, device)
    return net


def _rated_set(
    keys: list[LesionKey], labels: np.ndarray, patches_by_key: Mapping[LesionKey, np.ndarray]
) -> PatchSet:
    patches = np.stack([np.asarray(patches_by_key[k], dtype=np.float32) for k in keys])
    n = len(keys)
    return PatchSet(
        check_patches(patches, "rated lesions' patches"),
        labels,
        np.array(["unknown"] * n),
        np.array([k[2] for k in keys]),
        np.array([k[0] for k in keys]),
        np.array([k[1] for k in keys]),
    )


def _copy_of(bundle: RimBundle, device: str) -> torch.nn.Module:
    net = bundle.network_def.build()
    net.load_state_dict(bundle.network.state_dict())
    return net.to(device)


def fine_tune(
    ratings_tsv: str | Path,
    patches_by_key: Mapping[LesionKey, np.ndarray],
    init_bundle: RimBundle,
    *,
    folds: int = 5,
    epochs: int = 10,
    batch_size: int = 16,
    lr: float = 1e-4,
    seed: int = 0,
    probable: str = "exclude",
    device: str = "cpu",
    threads: int | None = None,
    say: Callable[[str], None] = print,
) -> FineTuneReport:
    """Return the k-fold comparison of ``init_bundle`` and its fine-tuning on a site's ratings.

    Each fold's model starts from the bundle's weights and trains ``epochs`` class-balanced,
    augmented epochs on the other folds' lesions; both models' logits (8-flip TTA) on the
    held-out lesions are pooled over the folds. Folds keep a participant's lesions together
    when there are at least ``folds`` participants (else they split lesions, with a warning).
    Nothing is written.

    Args:
        ratings_tsv: a ratings table (see :func:`read_ratings`).
        patches_by_key: the patch of each lesion by :data:`LesionKey`
            (e.g. ``load_shards(...).by_key()``).
        init_bundle: the bundle to start from (:func:`smoulder.rims.network.load_bundle`).
        folds: number of folds (at least 2).
        epochs: fine-tuning epochs per fold.
        batch_size: patches per step.
        lr: peak learning rate.
        seed: seeds the folds, the sampling and the augmentation.
        probable: what a ``probable`` rim counts as (see :func:`read_ratings`).
        device: ``cpu`` or ``cuda``.
        threads: CPU threads of PyTorch (restored afterwards).
        say: where progress lines go.

    Raises:
        InputError: rated lesions without a patch (named), or fewer than two rims or two
            non-rims among the rated lesions.
    """
    from smoulder.devices import torch_threads

    if folds < 2:
        raise ConfigError(f"--folds: expected at least 2, found {folds}")
    ratings = read_ratings(ratings_tsv, probable=probable)
    keys, labels = match_ratings(ratings, patches_by_key)
    n_rim = int(labels.sum())
    if min(n_rim, labels.size - n_rim) < 2:
        raise InputError(
            str(ratings_tsv),
            expected="at least two rated rims and two rated non-rims",
            found=f"{n_rim} rim(s) and {labels.size - n_rim} non-rim(s)",
        )
    data = _rated_set(keys, labels, patches_by_key)
    fold, grouped_by = _folds(keys, labels, folds, seed)
    warnings = []
    if grouped_by == "lesion":
        warnings.append(
            f"fewer participants than folds ({len({k[0] for k in keys})} < {folds}): folds "
            "split lesions of one participant, so the figures are optimistic"
        )
    settings = RimTrainSettings(
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=lr,
        seed=seed,
        init=str(init_bundle.path),
    )
    oof = np.zeros(len(data))
    with torch_threads(threads):
        initial = predict_logits(init_bundle.network, data.patches, device, tta=True)
        for k in range(folds):
            test = fold == k
            if not test.any():
                continue
            net = _fit(_copy_of(init_bundle, device), data.subset(~test), settings, device)
            oof[test] = predict_logits(net, data.patches[test], device, tta=True)
            say(f"fold {k + 1}/{folds}: {int(test.sum())} held-out lesions")

    def summary(logits: np.ndarray) -> dict[str, Any]:
        per_fold = [roc_auc(logits[fold == k], labels[fold == k]) for k in range(folds)]
        return {**_scores(logits, labels), "fold_roc_auc": per_fold}

    return FineTuneReport(
        ratings=str(ratings_tsv),
        init=f"{init_bundle.path} (version {init_bundle.version})",
        lesions=int(labels.size),
        rims=n_rim,
        left_out=ratings.left_out,
        folds=folds,
        grouped_by=grouped_by,
        initial=summary(initial),
        fine_tuned=summary(oof),
        difference=list(auc_difference_interval(initial, oof, labels)),
        settings=json.loads(json.dumps(asdict(replace(settings, network=init_bundle.network_def)))),
        keys=keys,
        labels=labels,
        oof_logits=oof,
        warnings=warnings,
    )


def _shipped_models() -> Path:
    from importlib.resources import files

    return Path(str(files("smoulder.models"))).resolve()


def _new_bundle_folder(out: str | Path, init_bundle: RimBundle) -> Path:
    """Return ``out`` if a new bundle may be written there, else raise ConfigError: never over
    the starting bundle, into the package's models, or over another bundle."""
    out = Path(out)
    target = out.resolve()
    if target == init_bundle.path.resolve() or target.is_relative_to(_shipped_models()):
        raise ConfigError(
            f"{out}: expected a new folder for the new bundle, found the starting bundle "
            "or the package's models (a site's model never replaces the shipped one)"
        )
    if (out / "configs" / "metadata.json").exists():
        raise ConfigError(f"{out}: expected a new folder, found a bundle there; choose another")
    return out


def write_fine_tuned(
    report: FineTuneReport,
    patches_by_key: Mapping[LesionKey, np.ndarray],
    init_bundle: RimBundle,
    out: str | Path,
    *,
    version: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    say: Callable[[str], None] = print,
) -> Path:
    """Train on every rated lesion of ``report`` and write the new bundle to ``out``.

    The calibration and operating points are fitted on the out-of-fold logits of the k-fold
    models (each lesion scored by a model that did not train on it).

    Raises:
        ConfigError: ``out`` is the starting bundle, lies inside the package's models, or
            already holds a bundle.
    """
    from smoulder.devices import torch_threads

    out = _new_bundle_folder(out, init_bundle)
    s = report.settings
    settings = RimTrainSettings(
        epochs=s["epochs"],
        batch_size=s["batch_size"],
        learning_rate=s["learning_rate"],
        seed=s["seed"],
    )
    data = _rated_set(report.keys, report.labels, patches_by_key)
    with torch_threads(threads):
        net = _fit(_copy_of(init_bundle, device), data, settings, device)
    calibration, cv_ece = fit_calibration(report.oof_logits, report.labels)
    points = operating_points(calibration(report.oof_logits), report.labels)
    base = init_bundle.version
    meta = {
        "version": version or f"{base}+site",
        "fine_tuned": {
            "from": str(init_bundle.path),
            "from_version": base,
            "report": report.to_json(),
            "calibration_ece": cv_ece,
        },
    }
    say(f"writing the fine-tuned bundle to {out}")
    return save_bundle(out, net, calibration, points, meta, network_def=init_bundle.network_def)


# ----------------------------------------------------------------------------- recalibration


def _stratum_figures(
    prob: np.ndarray, labels: np.ndarray, strata: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Return lesions, rims and ECE of ``prob`` per stratum name, and pooled (``"all"``)."""
    names = np.asarray(strata)
    out = {}
    for name in ["all", *sorted(set(names.tolist()))]:
        take = names == name if name != "all" else np.ones(labels.size, bool)
        out[name] = {
            "lesions": int(take.sum()),
            "rims": int(labels[take].sum()),
            "ece": expected_calibration_error(prob[take], labels[take]),
        }
    return out


def thin_rims(data: PatchSet, share: tuple[float, float], seed: int = 0) -> PatchSet:
    """Return ``data`` with each subject's rim lesions thinned to a share of its lesions drawn
    uniformly in ``share`` (all patches of a lesion kept or dropped together).

    Training sessions carry many rims (the network learns from them); a calibration must see
    rims as often as the population it will serve, or its probabilities carry the training
    prevalence. A subject keeps ``round(s / (1 - s) * non-rims)`` of its rims (at most all).

    Examples:
        >>> n, same = 40, lambda v: np.array([v] * 40)
        >>> labels = (np.arange(n) < 20).astype(np.uint8)
        >>> patches = np.zeros((n, 4, 24, 24, 24), np.float16)
        >>> d = PatchSet(patches, labels, same("qsm"), np.arange(n), same("a"), same("1"))
        >>> int(thin_rims(d, (0.2, 0.2)).labels.sum())   # 0.2 / 0.8 * 20 non-rims
        5
    """
    lo, hi = share
    if not 0 <= lo <= hi < 1:
        raise ConfigError(f"rim share: expected 0 <= low <= high < 1, found {share}")
    keep = np.ones(len(data), bool)
    for k, subject in enumerate(sorted(set(data.subject.tolist()))):
        rng = np.random.default_rng([seed, k])
        of = data.subject == subject
        triples = zip(data.session[of], data.lesion_id[of], data.labels[of], strict=True)
        lesions = {(str(t), int(i)): int(y) for t, i, y in triples}
        rims = sorted(key for key, y in lesions.items() if y)
        s = rng.uniform(lo, hi)
        n = min(len(rims), round(s / (1 - s) * (len(lesions) - len(rims))))
        dropped = {rims[i] for i in rng.permutation(len(rims))[n:]}
        for j in np.flatnonzero(of):
            if (str(data.session[j]), int(data.lesion_id[j])) in dropped:
                keep[j] = False
    return data.subset(keep)


def recalibrate(
    init_bundle: RimBundle,
    data: PatchSet,
    *,
    folds: int = 5,
    seed: int = 0,
    min_stratum_lesions: int = MIN_STRATUM_LESIONS,
    device: str = "cpu",
    threads: int | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fit a bundle's calibration anew, per acquisition stratum, on labelled patches.

    The network and its fusion are kept; only the map from fused logit to probability and
    the operating points change. Before anything is fitted on all of ``data``, a k-fold by
    subject scores it honestly: each fold's lesions are calibrated by maps fitted on the other
    folds, and the out-of-fold ECE per stratum (input kind and field) is reported beside the
    bundle's own calibration's.

    Args:
        init_bundle: the bundle to recalibrate (its network scores ``data``).
        data: labelled patches (phantom shards), with the rule-based measures when the bundle
            fuses them, and each patch's field (``b0_tesla``) for the field strata.
        min_stratum_lesions: fewest lesions of a stratum with a map of its own (more than
            ``data`` holds: one pooled map).

    Returns:
        ``{"calibration": StratifiedCalibration, "operating_points", "report"}``; the report
        holds the strata fitted, the out-of-fold figures before and after, and the data.

    Raises:
        ConfigError: fewer than two subjects (no honest out-of-fold figure), or a bundle
            with a fusion and shards without the rule-based measures.
    """
    from smoulder.devices import torch_threads

    if init_bundle.fusion is not None and data.features is None:
        raise ConfigError(
            f"{init_bundle.path}: this bundle fuses the rule-based measures; expected shards "
            "that hold them (features), found shards without"
        )
    subjects = sorted(set(data.subject.tolist()))
    if len(subjects) < 2:
        raise ConfigError(f"recalibration: expected patches of >= 2 subjects, found {subjects}")
    with torch_threads(threads):
        logits = predict_logits(init_bundle.network, data.patches, device, tta=True)
    if init_bundle.fusion is not None:
        assert data.features is not None  # checked above
        logits = init_bundle.fusion(logits, data.features)
    labels, kinds, fields = data.labels.astype(bool), data.input_kind, data.fields()
    strata = [
        stratum_keys(k, None if np.isnan(f) else f)[0] for k, f in zip(kinds, fields, strict=True)
    ]
    keys = data.keys()
    fold, grouped_by = _folds(keys, labels.astype(int), min(folds, len(subjects)), seed)
    oof = np.empty(labels.size)
    for k in np.unique(fold):
        test = fold == k
        cal, _ = fit_stratified_calibration(
            logits[~test],
            labels[~test],
            kinds[~test],
            fields[~test],
            seed=seed,
            min_lesions=min_stratum_lesions,
        )
        oof[test] = cal(logits[test], kinds[test], fields[test])
    before = init_bundle.calibration(logits, kinds, fields)
    calibration, fitted = fit_stratified_calibration(
        logits, labels, kinds, fields, seed=seed, min_lesions=min_stratum_lesions
    )
    prob = calibration(logits, kinds, fields)
    points = operating_points(prob, labels)
    report: dict[str, Any] = {
        "data": {
            "patches": int(labels.size),
            "rims": int(labels.sum()),
            "subjects": len(subjects),
            "folds": int(np.unique(fold).size),
            "grouped_by": grouped_by,
        },
        "strata_fitted": fitted,
        "out_of_fold": {
            "before": _stratum_figures(before, labels, strata),
            "after": _stratum_figures(oof, labels, strata),
        },
        "roc_auc_before": roc_auc(before, labels),
        "roc_auc_after": roc_auc(oof, labels),
    }
    for name, row in report["out_of_fold"]["after"].items():
        was = report["out_of_fold"]["before"][name]["ece"]
        say(
            f"{name}: {row['lesions']} lesions, {row['rims']} rims: ECE {was:.3f} with the "
            f"bundle's calibration, {row['ece']:.3f} recalibrated (out of fold)"
        )
    return {"calibration": calibration, "operating_points": points, "report": report}


def write_recalibrated(
    init_bundle: RimBundle,
    result: Mapping[str, Any],
    out: str | Path,
    *,
    version: str | None = None,
    say: Callable[[str], None] = print,
) -> Path:
    """Write ``init_bundle`` with the calibration and operating points of :func:`recalibrate`
    to ``out`` (a new folder; never the starting bundle nor the package's models)."""
    out = _new_bundle_folder(out, init_bundle)
    # what _metadata writes anew is left out; the rest (training record, changelog) is kept
    written = {
        "network_def",
        "monai_version",
        "pytorch_version",
        "name",
        "task",
        "network_data_format",
    }
    meta = {
        **{k: v for k, v in init_bundle.metadata.items() if k not in written},
        "version": version or f"{init_bundle.version}+recalibrated",
        "recalibrated": {
            "from": init_bundle.path.name,
            "from_version": init_bundle.version,
            **result["report"],
        },
    }
    say(f"writing the recalibrated bundle to {out}")
    return save_bundle(
        out,
        init_bundle.network,
        result["calibration"],
        result["operating_points"],
        meta,
        network_def=init_bundle.network_def,
        fusion=init_bundle.fusion,
    )
