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

from smoulder.segmentation.network import InferenceSettings, NetworkDef, save_bundle
from smoulder.segmentation.real import RealCase, prepare_case, real_patch
from smoulder.segmentation.synth import (
    CLASSES,
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
    weight[CLASSES.index("lesion")] = settings.lesion_weight
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
    tissue = np.mean([scores[c] for c in ("CSF", "cortical_GM", "deep_GM", "WM")])
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
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(out, settings, label_dir, lesion_dir, device, say)
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    out: Path,
    settings: TrainSettings,
    label_dir: Path,
    lesion_dir: Path,
    device: str,
    say: Callable[[str], None],
) -> Path:
    torch.manual_seed(settings.seed)
    ckpt_file = out / "checkpoint.pt"
    net = settings.network.build().to(device)
    if settings.init:
        net.load_state_dict(_initial_weights(Path(settings.init)))
        say(f"initialised from {settings.init}")
    opt = torch.optim.AdamW(net.parameters(), lr=settings.learning_rate, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=settings.learning_rate, total_steps=settings.iterations, pct_start=0.05
    )
    start, history, best = 0, [], -1.0
    recipe = {"settings": _plain(asdict(settings)), "device": device}
    if ckpt_file.is_file():
        ckpt = torch.load(ckpt_file, map_location=device, weights_only=False)
        _check_recipe(ckpt["recipe"]["settings"], recipe["settings"], ckpt_file)
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start, history, best = ckpt["iteration"], ckpt["history"], ckpt["best"]
        say(f"resuming at iteration {start} (best validation score {best:.3f})")
    val_x, val_y = _validation_set(label_dir, lesion_dir, settings)
    real = [
        prepare_case(Path(folder), settings.init or None, out / "real")
        for folder in settings.real_cases
    ]
    loader = torch.utils.data.DataLoader(
        _Stream(
            label_dir,
            lesion_dir,
            settings.seed * 100_003 + start,
            settings.synth,
            real,
            settings.real_fraction,
        ),
        batch_size=settings.batch,
        num_workers=1,
        prefetch_factor=4,
        persistent_workers=True,
    )
    loss_fn = _loss_fn(settings)
    tic, losses = time.perf_counter(), []
    it = start
    for x, y in loader:
        if it >= settings.iterations:
            break
        x, y = x.to(device), y.to(device)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        it += 1
        if it % settings.validate_every == 0 or it == settings.iterations:
            scores = validate(net, val_x, val_y, device)
            entry = {
                "iteration": it,
                "loss": float(np.mean(losses)),
                **scores,
                "elapsed_s": time.perf_counter() - tic,
            }
            history.append(entry)
            losses = []
            say(
                json.dumps(
                    {k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}
                )
            )
            final = it == settings.iterations
            if scores["score"] > best or (settings.real_cases and final):
                best = max(best, scores["score"])
                save_bundle(
                    out / "bundle",
                    net.state_dict(),
                    settings.network,
                    InferenceSettings(),
                    training={**recipe, "iteration": it, "validation": scores},
                )
        if it % settings.checkpoint_every == 0 or it == settings.iterations:
            _save(
                {
                    "model": net.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "iteration": it,
                    "history": history,
                    "best": best,
                    "recipe": recipe,
                },
                ckpt_file,
            )
            (out / "history.json").write_text(json.dumps(history, indent=1))
    return out / "bundle"


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _check_recipe(saved: dict[str, Any], now: dict[str, Any], where: Path) -> None:
    """Raise :class:`ConfigError` when a run would resume with another recipe."""
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
