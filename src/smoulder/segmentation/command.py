"""``smoulder segment`` and ``smoulder train segmentation`` from the command line.

``smoulder segment FLAIR [--t1 T1] -o OUT [--prefix P]`` writes, into ``OUT`` on the FLAIR grid:
``<P>desc-brain_mask``, ``<P>dseg`` + ``_dseg.tsv``, ``<P>label-{CSF,GM,WM,lesion}_probseg``,
``<P>desc-lesions_dseg`` (one index per lesion) and ``<P>desc-lesions_stats.tsv`` with its JSON
column dictionary. Every file is written atomically.

``smoulder train segmentation OUT [--iterations N] ...`` trains (or resumes) the network on
synthetic images (:mod:`smoulder.segmentation.train`); ``OUT/bundle`` holds the best weights.

``smoulder train candidates OUT [--install BUNDLE]`` trains (or resumes) the lesion-candidate
classifier on phantoms (:mod:`smoulder.segmentation.train_candidates`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from smoulder.segmentation.refine import LESION_PRIOR_FLOOR


def parser() -> argparse.ArgumentParser:
    """Return the parser of ``smoulder segment``."""
    p = argparse.ArgumentParser(
        prog="smoulder segment",
        description="Brain mask, tissue classes and lesions (with a per-lesion table) of one "
        "session's FLAIR, with a T1w/UNIT1 aligned to it when given.",
    )
    p.add_argument("flair", type=Path, help="FLAIR image (NIfTI)")
    p.add_argument("--t1", type=Path, help="T1w or UNIT1 aligned to the FLAIR (world space)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    p.add_argument("--prefix", default="", help="prepended to every output name, e.g. 'sub-01_'")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--model", help="MONAI bundle folder (default: the shipped model)")
    p.add_argument("--min-lesion-ul", type=float, default=10.0, help="smallest lesion kept (µl)")
    p.add_argument("--min-lesion-voxels", type=int, default=3, help="smallest lesion kept (voxels)")
    p.add_argument(
        "--no-refine",
        dest="refine",
        action="store_false",
        help="the raw network: no subject-specific intensity refinement",
    )
    p.add_argument(
        "--lesion-prior-floor",
        type=float,
        default=LESION_PRIOR_FLOOR,
        help="least lesion prior in the refinement, as a share of the parenchyma probability "
        f"(default {LESION_PRIOR_FLOOR}; 0 trusts the network's lesion probability alone; "
        "higher finds fainter lesions and risks false ones)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``smoulder segment``; return the exit status."""
    import numpy as np

    from smoulder.devices import resolve_device
    from smoulder.images import load_image
    from smoulder.segmentation.inference import segment
    from smoulder.segmentation.outputs import write_outputs

    device = resolve_device(args.device)
    flair = load_image(args.flair)
    t1 = load_image(args.t1) if args.t1 else None
    result = segment(
        flair,
        t1,
        device=device,
        model=args.model,
        min_lesion_ul=args.min_lesion_ul,
        min_lesion_voxels=args.min_lesion_voxels,
        refine=args.refine,
        lesion_prior_floor=args.lesion_prior_floor,
    )
    sources = [str(args.flair)] + ([str(args.t1)] if args.t1 else [])
    files = write_outputs(result, args.out, args.prefix, sources)
    n = int(np.asarray(result.instances.dataobj).max())
    print(
        f"segmented {args.flair.name} ({'FLAIR+T1' if t1 is not None else 'FLAIR only'}) "
        f"on {device} in {result.wall_s:.1f} s: {n} lesions; {len(files)} files in {args.out}"
    )
    return 0


def train_parser() -> argparse.ArgumentParser:
    """Return the parser of ``smoulder train segmentation``."""
    from smoulder.segmentation.train import TrainSettings

    d = TrainSettings()
    p = argparse.ArgumentParser(
        prog="smoulder train segmentation",
        description="Train the segmentation network on synthetic images from label maps; "
        "rerunning with the same OUT resumes from its checkpoint.",
    )
    p.add_argument("out", type=Path, help="run folder (checkpoint, history, best bundle)")
    p.add_argument("--iterations", type=int, default=d.iterations)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--patch", type=int, default=d.synth.patch, help="patch edge (1 mm voxels)")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--validate-every", type=int, default=d.validate_every)
    p.add_argument(
        "--channels",
        default=",".join(map(str, d.network.channels)),
        help="UNet channels per level, comma-separated",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--lesions-per-patch",
        default=",".join(str(n) for n in d.synth.lesions_per_patch),
        help="fewest,most real lesion shapes pasted per patch",
    )
    for flag, default, meaning in (
        (
            "--periventricular",
            d.synth.p_periventricular,
            "share of pasted lesions centred within 5 mm of a lateral ventricle",
        ),
        (
            "--csf-artifacts",
            d.synth.p_csf_artifact,
            "share of samples whose ventricles/cisterns have FLAIR-bright CSF (class CSF)",
        ),
        ("--lesion-weight", d.lesion_weight, "weight of the lesion class in the cross-entropy"),
        ("--real-fraction", d.real_fraction, "share of the samples cut from the real cases"),
    ):
        p.add_argument(flag, type=float, default=default, help=meaning)
    p.add_argument("--init", type=Path, help="bundle or checkpoint to start from (fine-tuning)")
    p.add_argument(
        "--real-case",
        type=Path,
        action="append",
        default=[],
        help="folder of a real case (FLAIR, T1, expert lesion mask) to fine-tune on; repeatable",
    )
    p.add_argument("--label-maps", type=Path, help="folder of training_seg_*.nii.gz")
    p.add_argument("--lesion-masks", type=Path, help="folder of real lesion masks")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int)
    return p


def run_train(argv: list[str]) -> int:
    """Run ``smoulder train <what> ...``; return the exit status."""
    from dataclasses import replace

    from smoulder.devices import resolve_device
    from smoulder.errors import ConfigError
    from smoulder.segmentation.network import NetworkDef
    from smoulder.segmentation.train import TrainSettings, train

    if not argv or argv[0] != "segmentation":
        raise ConfigError(
            f"smoulder train segmentation: expected 'segmentation', found {argv[:1] or 'nothing'}"
        )
    args = train_parser().parse_args(argv[1:])
    device = resolve_device(args.device)
    d = TrainSettings()
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
        low, high = (int(c) for c in args.lesions_per_patch.split(","))
    except ValueError as exc:
        raise ConfigError(
            f"--channels/--lesions-per-patch: expected integers, found {args.channels!r}, "
            f"{args.lesions_per_patch!r}"
        ) from exc
    settings = replace(
        d,
        iterations=args.iterations,
        batch=args.batch,
        learning_rate=args.learning_rate,
        validate_every=args.validate_every,
        seed=args.seed,
        lesion_weight=args.lesion_weight,
        init=str(args.init or ""),
        real_cases=tuple(str(p.resolve()) for p in args.real_case),
        real_fraction=args.real_fraction,
        synth=replace(
            d.synth,
            patch=args.patch,
            lesions_per_patch=(low, high),
            p_periventricular=args.periventricular,
            p_csf_artifact=args.csf_artifacts,
        ),
        network=NetworkDef(channels=channels, strides=(2,) * (len(channels) - 1)),
    )
    bundle = train(
        args.out,
        settings=settings,
        label_dir=args.label_maps,
        lesion_dir=args.lesion_masks,
        device=device,
        threads=args.threads,
    )
    print(f"best weights: {bundle}")
    return 0


def candidates_parser() -> argparse.ArgumentParser:
    """Return the parser of ``smoulder train candidates``."""
    p = argparse.ArgumentParser(
        prog="smoulder train candidates",
        description="Train (or resume) the lesion-candidate classifier on generated phantoms.",
    )
    p.add_argument("out", type=Path, help="run folder (tables, candidates.json, summary.json)")
    p.add_argument(
        "--install",
        type=Path,
        metavar="BUNDLE",
        help="copy the trained classifier into this bundle folder's configs/",
    )
    return p


def run_train_candidates(args: argparse.Namespace) -> int:
    """Run ``smoulder train candidates``; return the exit status."""
    from smoulder.segmentation.train_candidates import install, train

    trained = train(args.out)
    print(f"classifier: {trained}")
    if args.install:
        print(f"installed: {install(trained, args.install)}")
    return 0
