"""``smoulder train rims`` from the command line (wired into ``smoulder train`` by the CLI).

``smoulder train rims RUN --simulate N [--jobs J]`` first simulates N phantom sessions
(:func:`smoulder.rims.simulate.simulate_shards`) into ``RUN/shards``, then trains; ``smoulder
train rims RUN --shards DIR [...]`` trains (or resumes) the rim classifier on patch shards
(:func:`smoulder.rims.train.train`); ``RUN/bundle`` holds the calibrated model and
``RUN/metrics.json`` its validation figures.

``smoulder train rims RUN --ratings TSV --init BUNDLE --shards DIR [--write]`` evaluates
fine-tuning on a site's ratings by k-fold (:func:`smoulder.rims.train.fine_tune`) and prints the
starting and the fine-tuned model's AUCs with confidence intervals; only with ``--write`` is
the fine-tuned bundle then trained on every rated lesion and written to ``RUN/bundle`` (never
over the starting bundle or the package's models).

``smoulder train rims RUN --recalibrate --init BUNDLE --shards DIR [--write]`` keeps a bundle's
network and fits its calibration anew on labelled shards, per acquisition stratum
(:func:`smoulder.rims.train.recalibrate`): it prints the out-of-fold ECE per stratum of the
bundle's calibration and of the new one, and writes ``RUN/bundle`` only with ``--write``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def train_parser() -> argparse.ArgumentParser:
    """Return the parser of ``smoulder train rims``."""
    from smoulder.rims.train import RimTrainSettings

    d = RimTrainSettings()
    p = argparse.ArgumentParser(
        prog="smoulder train rims",
        description="Train the paramagnetic rim classifier on lesion patch shards (rerunning "
        "with the same RUN resumes from its checkpoint), or, with --ratings, evaluate and "
        "optionally write its fine-tuning on a site's rim ratings.",
    )
    p.add_argument("run", type=Path, help="run folder (checkpoint, history, metrics, bundle)")
    p.add_argument(
        "--shards",
        type=Path,
        nargs="+",
        help="patch shards (.npz) or folders of them; with --ratings, the rated lesions' "
        "patches (default: RUN/shards, what --simulate writes)",
    )
    p.add_argument(
        "--simulate",
        type=int,
        metavar="N",
        help="first simulate N phantom sessions into RUN/shards (seeds from --first-seed; "
        "existing shards are kept, so a rerun resumes), then train on them",
    )
    p.add_argument("--first-seed", type=int, default=0, help="first phantom seed (--simulate)")
    p.add_argument("--jobs", type=int, default=1, help="sessions simulated at once (--simulate)")
    p.add_argument("--epochs", type=int, help=f"default {d.epochs} (fine-tuning: 10)")
    p.add_argument("--batch-size", type=int, help=f"default {d.batch_size} (fine-tuning: 16)")
    p.add_argument(
        "--learning-rate", type=float, help=f"default {d.learning_rate} (fine-tuning: 1e-4)"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--channels",
        default=",".join(map(str, d.network.channels)),
        help="Classifier channels per level, comma-separated (a run from scratch)",
    )
    p.add_argument("--init", type=Path, help="rim bundle to start from (required with --ratings)")
    p.add_argument(
        "--ratings",
        type=Path,
        help="the report's review TSV or a participant/session/lesion/rim table: fine-tune",
    )
    p.add_argument(
        "--recalibrate",
        action="store_true",
        help="keep --init's network and fit its calibration anew on --shards (phantom "
        "labels), per input kind and field strength",
    )
    p.add_argument(
        "--folds", type=int, default=5, help="k of the k-fold evaluation (--ratings, --recalibrate)"
    )
    p.add_argument("--bundle-version", help="version of the written bundle (--write)")
    p.add_argument(
        "--rim-share",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="--recalibrate: thin each subject's rims to a share of its lesions drawn in "
        "[LOW, HIGH] first, so the calibration sees the population's prevalence (the "
        "phantom's training sessions carry more rims)",
    )
    p.add_argument(
        "--probable",
        choices=["exclude", "rim", "no_rim"],
        default="exclude",
        help="what a 'probable' rim rating counts as (default: left out)",
    )
    p.add_argument(
        "--write",
        action="store_true",
        help="with --ratings: after the evaluation, train on every rated lesion and write "
        "RUN/bundle; with --recalibrate: write the recalibrated RUN/bundle",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int)
    return p


def run_train(args: argparse.Namespace) -> int:
    """Run ``smoulder train rims``; return the exit status."""
    from smoulder.devices import resolve_device
    from smoulder.errors import ConfigError
    from smoulder.rims import train as rt
    from smoulder.rims.network import RimNetworkDef, load_bundle

    device = resolve_device(args.device)
    if args.simulate:
        from smoulder.rims.simulate import simulate_shards

        seeds = range(args.first_seed, args.first_seed + args.simulate)
        simulate_shards(args.run / "shards", seeds, jobs=args.jobs)
    if not args.shards:
        if not (args.run / "shards").is_dir():
            raise ConfigError("expected --shards DIR or --simulate N, found neither")
        args.shards = [args.run / "shards"]
    if args.recalibrate:
        return _recalibrate(args, device)
    if args.ratings is None:
        try:
            channels = tuple(int(c) for c in args.channels.split(","))
        except ValueError as exc:
            raise ConfigError(f"--channels: expected integers, found {args.channels!r}") from exc
        d = rt.RimTrainSettings()
        metrics = rt.train(
            args.run,
            args.shards,
            epochs=args.epochs or d.epochs,
            batch_size=args.batch_size or d.batch_size,
            lr=args.learning_rate or d.learning_rate,
            seed=args.seed,
            device=device,
            threads=args.threads,
            init=args.init,
            network=RimNetworkDef(channels=channels, strides=(2,) * len(channels)),
        )
        print(f"bundle: {metrics['bundle']}")
        return 0
    if args.init is None:
        raise ConfigError("--ratings: expected --init BUNDLE (the model to fine-tune), found none")
    init = load_bundle(args.init, device)
    patches = rt.load_shards(args.shards).by_key()
    report = rt.fine_tune(
        args.ratings,
        patches,
        init,
        folds=args.folds,
        epochs=args.epochs or 10,
        batch_size=args.batch_size or 16,
        lr=args.learning_rate or 1e-4,
        seed=args.seed,
        probable=args.probable,
        device=device,
        threads=args.threads,
    )
    print("\n".join(report.lines()))
    if not args.write:
        print("nothing written (add --write to train on every rated lesion and save the bundle)")
        return 0
    out = rt.write_fine_tuned(
        report, patches, init, args.run / "bundle", device=device, threads=args.threads
    )
    print(f"bundle: {out}")
    return 0


def _recalibrate(args: argparse.Namespace, device: str) -> int:
    """Run ``smoulder train rims RUN --recalibrate``; return the exit status."""
    from smoulder.errors import ConfigError
    from smoulder.images import save_json
    from smoulder.rims import train as rt
    from smoulder.rims.network import load_bundle

    if args.init is None:
        raise ConfigError("--recalibrate: expected --init BUNDLE (the model), found none")
    init = load_bundle(args.init, device)
    data = rt.load_shards(args.shards)
    if args.rim_share:
        data = rt.thin_rims(data, tuple(args.rim_share), seed=args.seed)
        share = tuple(args.rim_share)
        print(f"rims thinned to {share} per subject: {len(data)} patches, {data.labels.sum()} rims")
    result = rt.recalibrate(
        init,
        data,
        folds=args.folds,
        seed=args.seed,
        device=device,
        threads=args.threads,
    )
    result["report"]["data"]["rim_share"] = list(args.rim_share) if args.rim_share else None
    save_json(result["report"], args.run / "recalibration.json")
    if not args.write:
        print("nothing written (add --write to save the recalibrated bundle)")
        return 0
    out = rt.write_recalibrated(init, result, args.run / "bundle", version=args.bundle_version)
    print(f"bundle: {out}")
    return 0
