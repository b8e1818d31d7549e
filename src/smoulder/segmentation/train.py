"""Training of the segmentation network on synthetic images (``smoulder train segmentation``).

One command reproduces the shipped weights; it resumes from ``OUT/checkpoint.pt`` when that
exists (model, optimiser, iteration, history), so a killed run continues where it stopped.
Every ``validate_every`` iterations the network is scored on a fixed set of synthetic patches
(seeded apart from training); the best state is written as a MONAI bundle in ``OUT/bundle``.

Samples are synthesised in a separate worker process while the network trains
(:mod:`smoulder.segmentation.synth`). Fine-tuning may mix in patches of real cases with expert
lesion masks (``real_cases``, :mod:`smoulder.segmentation.real`) at ``real_fraction`` of the
samples; such a run keeps its final state as its bundle (no real case is held back to choose
a "best" one), and the bundle names the cases, so evaluations stay leave-one-out. The sample
stream is seeded by the seed and by the iteration the run (re)started from: a run resumed at
the same iterations is reproduced exactly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smoulder.devices import torch_threads
from smoulder.segmentation.classes import CLASSES, LESION
from smoulder.segmentation.network import InferenceSettings, NetworkDef, save_bundle
from smoulder.segmentation.real import RealCase, prepare_case, real_patch
from smoulder.segmentation.synth import (
    SynthSettings,
    load_label_maps,
    load_lesion_shapes,
    synth_sample,
)

SHARED_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"


@dataclass(frozen=True)
class TrainSettings:
    """The training recipe (saved in the checkpoint and in the bundle's metadata)."""

    iterations: int = 3000
    batch: int = 2
    learning_rate: float = 2e-3
    lesion_weight: float = 3.0
    seed: int = 0
    checkpoint_every: int = 25
    validate_every: int = 250
    validation_samples: int = 16
    synth: SynthSettings = field(default_factory=SynthSettings)
    network: NetworkDef = field(default_factory=NetworkDef)
    init: str = ""  # a bundle or checkpoint whose weights start the run (fine-tuning)
    real_cases: tuple[str, ...] = ()  # folders of real cases (smoulder.segmentation.real)
    real_fraction: float = 0.5  # share of the samples cut from real cases, when there are any


class _Stream(torch.utils.data.IterableDataset):
    """Endless synthetic samples, mixed with real patches when given (one worker process)."""

    def __init__(
        self,
        label_dir: Path,
        lesion_dir: Path,
        seed: int,
        synth: SynthSettings,
        real: Sequence[Path] = (),
        real_fraction: float = 0.0,
    ):
        self.label_dir, self.lesion_dir, self.seed, self.synth = label_dir, lesion_dir, seed, synth
        self.real, self.real_fraction = list(real), real_fraction

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # this runs in the loader's own worker process, for the whole run: one thread there
        # leaves the cores to the training process (no count to restore, so no torch_threads)
        torch.set_num_threads(1)
        maps = load_label_maps(self.label_dir)
        shapes = load_lesion_shapes(self.lesion_dir)
        cases = [RealCase.load(p) for p in self.real]
        rng = np.random.default_rng(self.seed)
        while True:
            if cases and rng.random() < self.real_fraction:
                case = cases[rng.integers(len(cases))]
                x, y = real_patch(rng, case, self.synth.patch, p_t1=self.synth.p_t1)
            else:
                x, y = synth_sample(rng, maps, shapes, self.synth)
            yield torch.from_numpy(x), torch.from_numpy(y)


def dice_scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Return the Dice of each class (summed over the batch) of label maps ``pred``/``target``.

    Examples:
        >>> t = torch.tensor([[0, 1, 1, 5]]); p = torch.tensor([[0, 1, 5, 5]])
        >>> round(dice_scores(p, t)["lesion"], 4)
        0.6667
    """
    out = {}
    for index, name in enumerate(CLASSES[1:], start=1):
        a, b = pred == index, target == index
        denom = int(a.sum() + b.sum())
        out[name] = 2.0 * int((a & b).sum()) / denom if denom else 1.0
    return out


def _loss_fn(settings: TrainSettings) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from monai.losses import DiceCELoss

    weight = torch.ones(len(CLASSES))
    weight[LESION] = settings.lesion_weight
    loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, weight=weight)
    return lambda logits, y: loss(logits, y[:, None])


def _validation_set(label_dir: Path, lesion_dir: Path, s: TrainSettings):
    maps, shapes = load_label_maps(label_dir), load_lesion_shapes(lesion_dir)
    rng = np.random.default_rng(10**6 + s.seed)
    pairs = [synth_sample(rng, maps, shapes, s.synth) for _ in range(s.validation_samples)]
    return torch.from_numpy(np.stack([p[0] for p in pairs])), torch.from_numpy(
        np.stack([p[1] for p in pairs])
    )


def validate(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: str) -> dict:
    """Return per-class Dice of ``net`` on the validation patches and a summary ``score``."""
    net.eval()
    preds = []
    with torch.inference_mode():
        for i in range(len(x)):
            preds.append(net(x[i : i + 1].to(device)).argmax(1).cpu())
    net.train()
    scores = dice_scores(torch.cat(preds), y)
    tissue = np.mean([scores[c] for c in CLASSES[1:LESION]])  # every class but lesion
    scores["score"] = float((scores["lesion"] + tissue) / 2)
    return scores


def _save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def train(
    out: str | Path,
    *,
    settings: TrainSettings = TrainSettings(),
    label_dir: str | Path | None = None,
    lesion_dir: str | Path | None = None,
    device: str = "cpu",
    threads: int | None = None,
    say: Callable[[str], None] = print,
) -> Path:
    """Train (or resume training) into ``out``; return the folder of the best bundle.

    Args:
        out: run folder: ``checkpoint.pt``, ``history.json``, ``bundle/`` (best so far).
        settings: the recipe; resuming with another recipe than the checkpoint's is an error.
        label_dir: the SynthSeg label maps (default ``../shared/data/synthseg_label_maps``).
        lesion_dir: real lesion masks (default ``../shared/data/open_ms/lesion_masks_mni``).
        device: ``cpu`` or ``cuda``.
        threads: CPU threads of the training process.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    label_dir = Path(label_dir or SHARED_DATA / "synthseg_label_maps")
    lesion_dir = Path(lesion_dir or SHARED_DATA / "open_ms" / "lesion_masks_mni")
    with torch_threads(threads or None):
        return _train(out, settings, label_dir, lesion_dir, device, say)


@dataclass
class _Run:
    """The state of a training run: what its checkpoint holds."""

    net: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    #: the settings and device, as the checkpoint and the bundle record them
    recipe: dict[str, Any]
    iteration: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float = -1.0

    def checkpoint(self) -> dict[str, Any]:
        """Return what ``checkpoint.pt`` holds."""
        return {
            "model": self.net.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "iteration": self.iteration,
            "history": self.history,
            "best": self.best,
            "recipe": self.recipe,
        }


def _train(
    out: Path,
    settings: TrainSettings,
    label_dir: Path,
    lesion_dir: Path,
    device: str,
    say: Callable[[str], None],
) -> Path:
    """Return the bundle folder after training in ``out`` (see :func:`train`)."""
    torch.manual_seed(settings.seed)
    run = _start(out / "checkpoint.pt", settings, device, say)
    val_x, val_y = _validation_set(label_dir, lesion_dir, settings)
    real = [
        prepare_case(Path(folder), settings.init or None, out / "real")
        for folder in settings.real_cases
    ]
    loader = _loader(label_dir, lesion_dir, settings, real, run.iteration)
    loss_fn = _loss_fn(settings)
    tic, losses = time.perf_counter(), []
    for x, y in loader:
        if run.iteration >= settings.iterations:
            break
        losses.append(_step(run, loss_fn, x.to(device), y.to(device)))
        run.iteration += 1
        it = run.iteration
        if it % settings.validate_every == 0 or it == settings.iterations:
            scores = validate(run.net, val_x, val_y, device)
            entry = {
                "iteration": it,
                "loss": float(np.mean(losses)),
                **scores,
                "elapsed_s": time.perf_counter() - tic,
            }
            run.history.append(entry)
            losses = []
            say(
                json.dumps(
                    {k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}
                )
            )
            _keep_best(run, scores, settings, out / "bundle")
        if it % settings.checkpoint_every == 0 or it == settings.iterations:
            _save(run.checkpoint(), out / "checkpoint.pt")
            (out / "history.json").write_text(json.dumps(run.history, indent=1))
    return out / "bundle"


def _start(
    ckpt_file: Path, settings: TrainSettings, device: str, say: Callable[[str], None]
) -> _Run:
    """Return a new run, initialised from ``settings.init``, or the one ``ckpt_file`` holds."""
    net = settings.network.build().to(device)
    if settings.init:
        net.load_state_dict(_initial_weights(Path(settings.init)))
        say(f"initialised from {settings.init}")
    opt = torch.optim.AdamW(net.parameters(), lr=settings.learning_rate, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=settings.learning_rate, total_steps=settings.iterations, pct_start=0.05
    )
    run = _Run(net, opt, sched, {"settings": _plain(asdict(settings)), "device": device})
    if ckpt_file.is_file():
        ckpt = torch.load(ckpt_file, map_location=device, weights_only=False)
        check_recipe(ckpt["recipe"]["settings"], run.recipe["settings"], ckpt_file)
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        run.iteration, run.history, run.best = ckpt["iteration"], ckpt["history"], ckpt["best"]
        say(f"resuming at iteration {run.iteration} (best validation score {run.best:.3f})")
    return run


def _loader(
    label_dir: Path, lesion_dir: Path, settings: TrainSettings, real: list[Path], start: int
) -> torch.utils.data.DataLoader:
    """Return the endless stream of training batches of a run (re)started at ``start``.

    Seeded by the seed and ``start``: a run resumed at the same iterations is reproduced.
    """
    stream = _Stream(
        label_dir,
        lesion_dir,
        settings.seed * 100_003 + start,
        settings.synth,
        real,
        settings.real_fraction,
    )
    return torch.utils.data.DataLoader(
        stream,
        batch_size=settings.batch,
        num_workers=1,
        prefetch_factor=4,
        persistent_workers=True,
    )


def _step(
    run: _Run,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
) -> float:
    """Return the loss of one optimisation step on the batch ``x``, ``y``."""
    run.opt.zero_grad(set_to_none=True)
    loss = loss_fn(run.net(x), y)
    loss.backward()
    run.opt.step()
    run.sched.step()
    return float(loss.detach())


def _keep_best(run: _Run, scores: dict[str, float], settings: TrainSettings, bundle: Path) -> None:
    """Write the network as the ``bundle`` when it scores best so far.

    A run with real cases keeps its final state instead (no real case is held back to choose).
    """
    final = run.iteration == settings.iterations
    if scores["score"] > run.best or (settings.real_cases and final):
        run.best = max(run.best, scores["score"])
        save_bundle(
            bundle,
            run.net.state_dict(),
            settings.network,
            InferenceSettings(),
            training={**run.recipe, "iteration": run.iteration, "validation": scores},
        )


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def check_recipe(saved: dict[str, Any], now: dict[str, Any], where: Path) -> None:
    """Raise :class:`ConfigError` naming the first (dotted) entry of ``now`` that differs from
    the ``saved`` recipe a run was started with: a run resumes only with its own recipe."""
    from smoulder.errors import ConfigError

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(saved), flat(now)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        k = diff[0]
        raise ConfigError(
            f"{where}: expected the recipe this run was started with, found {k} = {b.get(k)!r} "
            f"(checkpoint: {a.get(k)!r}); resume with the same options or use a new folder"
        )


def _initial_weights(path: Path) -> dict[str, torch.Tensor]:
    """Return the network weights of a bundle folder or a training checkpoint."""
    from smoulder.errors import InputError

    if path.is_dir():
        path = path / "models" / "model.pt"
    if not path.is_file():
        raise InputError(str(path), expected="a bundle folder or checkpoint.pt", found="nothing")
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("model", state)
    return {k: v.float() for k, v in state.items()}
