"""The ``smoulder`` command: a BIDS App plus the ``phantom``, ``validate`` and ``demo`` tools.

Only argument parsing lives here; each command calls library functions. Heavy imports (numpy,
nibabel, torch) are deferred into the commands so that ``smoulder --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

TOOLS = ("phantom", "validate", "demo")

USAGE = """\
smoulder BIDS_DIR OUTPUT_DIR {participant,group} [options]
       smoulder phantom OUTPUT_DIR [options]
       smoulder validate BIDS_DIR [options]
       smoulder demo [OUTPUT_DIR]"""

DESCRIPTION = """\
MRI markers of smouldering multiple sclerosis from BIDS data: paramagnetic rim lesions,
slowly expanding lesions, new/enlarging lesions, brain, grey-matter and cord atrophy.

tools:
  phantom   write a synthetic BIDS dataset with exact truth (smoulder phantom --help)
  validate  check a BIDS dataset's inputs without running anything
  demo      generate a small phantom and run the pipeline on it
"""


def _labels(values: list[str] | None, prefix: str) -> list[str] | None:
    if not values:
        return None
    return [v[len(prefix) :] if v.startswith(prefix) else v for v in values]


def bids_app_parser() -> argparse.ArgumentParser:
    """Return the parser of ``smoulder BIDS_DIR OUTPUT_DIR {participant,group}``."""
    p = argparse.ArgumentParser(
        prog="smoulder",
        usage=USAGE,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bids_dir", type=Path, help="root of the BIDS dataset")
    p.add_argument("output_dir", type=Path, help="where derivatives go (<OUTPUT_DIR>/smoulder)")
    p.add_argument("analysis_level", choices=["participant", "group"], help="BIDS-Apps level")
    p.add_argument(
        "--participant-label",
        "--participant_label",
        nargs="+",
        metavar="LABEL",
        help="subjects to process (with or without 'sub-'); default: all",
    )
    p.add_argument(
        "--session-label",
        "--session_label",
        nargs="+",
        metavar="LABEL",
        help="sessions to process (with or without 'ses-'); default: all",
    )
    p.add_argument("-w", "--work-dir", type=Path, help="work directory (cache; reuse it to resume)")
    p.add_argument("--nprocs", type=int, help="processes to run at once (default: all CPUs)")
    p.add_argument("--omp-nthreads", type=int, help="threads per step")
    p.add_argument("--mem-gb", type=float, help="memory budget in GB")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where GPU-capable steps run")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="YAML preset: a file or a shipped name "
        "(default, fast, cpu, slurm); command-line values win",
    )
    p.add_argument("--fast", action="store_true", help="lower-cost preset for tests and previews")
    p.add_argument(
        "--skip-data-check",
        action="store_true",
        help="check headers and sidecars only, not every voxel",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("--version", action="version", version=_version())
    return p


def phantom_parser() -> argparse.ArgumentParser:
    """Return the parser of ``smoulder phantom``."""
    p = argparse.ArgumentParser(
        prog="smoulder phantom",
        description="Write a BIDS dataset of synthetic MS subjects with exact truth in "
        "derivatives/truth (lesions, rims, SELs, atrophy, cord CSA, deformations).",
    )
    p.add_argument("output_dir", type=Path)
    p.add_argument("--subjects", type=int, help="number of subjects (default 1)")
    p.add_argument("--sessions", type=int, help="sessions per subject (default 2)")
    p.add_argument("--interval-years", type=float, help="years between sessions (default 1)")
    p.add_argument("--seed", type=int, help="random seed (default 0): same seed, same dataset")
    p.add_argument(
        "--resolution",
        type=float,
        dest="resolution_mm",
        metavar="MM",
        help="voxel size of the truth and T1w grids (default 1 mm)",
    )
    p.add_argument("--flair-slice-mm", type=float, help="FLAIR slice thickness (default: MM)")
    p.add_argument("--gre-voxel-mm", type=float, help="isotropic GRE voxel (default: MM)")
    p.add_argument("--lesions", type=int, help="baseline lesions per subject (default 12)")
    p.add_argument("--new-lesions-per-session", type=int, help="new lesions per follow-up")
    p.add_argument("--pbvc-per-year", type=float, help="whole-brain volume change, %%/year")
    p.add_argument(
        "--anatomy",
        type=Path,
        metavar="DIR",
        help="whole-brain label map (file or directory; FreeSurfer/SynthSeg labels) "
        "instead of the MNI152 template",
    )
    p.add_argument(
        "--lesion-masks",
        type=Path,
        metavar="DIR",
        help="directory of binary lesion masks whose shapes are reused",
    )
    p.add_argument(
        "--fast", action="store_true", help="low resolution (3 mm), few lesions: seconds"
    )
    p.add_argument("--config", metavar="FILE", help="YAML preset with a 'phantom' section")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def validate_parser() -> argparse.ArgumentParser:
    """Return the parser of ``smoulder validate``."""
    p = argparse.ArgumentParser(
        prog="smoulder validate",
        description="Check a BIDS dataset's inputs (files, headers, voxels, sidecars) and report, "
        "per session, what was found and which analyses it allows. Exit status 1 when any "
        "session has an error.",
    )
    p.add_argument("bids_dir", type=Path)
    p.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL")
    p.add_argument("--session-label", "--session_label", nargs="+", metavar="LABEL")
    p.add_argument("--skip-data-check", action="store_true", help="headers and sidecars only")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    return p


def demo_parser() -> argparse.ArgumentParser:
    """Return the parser of ``smoulder demo``."""
    p = argparse.ArgumentParser(
        prog="smoulder demo",
        description="Generate a small phantom dataset and run the participant pipeline on it.",
    )
    p.add_argument("output_dir", type=Path, nargs="?", default=Path("smoulder-demo"))
    p.add_argument(
        "--resolution",
        type=float,
        default=3.0,
        metavar="MM",
        help="phantom voxel size (default 3 mm: about a minute on 2 cores)",
    )
    p.add_argument("--subjects", type=int, default=1)
    return p


def _version() -> str:
    from smoulder import __version__

    return f"smoulder {__version__}"


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from smoulder.errors import SmoulderError

    try:
        if argv and argv[0] in TOOLS:
            tool, rest = argv[0], argv[1:]
            if tool == "phantom":
                return run_phantom(phantom_parser().parse_args(rest))
            if tool == "validate":
                return run_validate(validate_parser().parse_args(rest))
            return run_demo(demo_parser().parse_args(rest))
        args = bids_app_parser().parse_args(argv)
        if args.analysis_level == "participant":
            return run_participant(args)
        return run_group(args)
    except SmoulderError as exc:
        print(f"smoulder: error: {exc}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------- commands


def run_phantom(args: argparse.Namespace) -> int:
    """Generate a phantom dataset (``smoulder phantom``)."""
    from dataclasses import fields

    from smoulder import config as cfgmod
    from smoulder.phantom.dataset import generate_dataset
    from smoulder.phantom.generate import PhantomConfig

    keys = {f.name for f in fields(PhantomConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in keys and v is not None}
    for key in ("anatomy", "lesion_masks"):
        if key in overrides:
            overrides[key] = str(overrides[key])
    section = cfgmod.resolve(config_file=args.config, fast=args.fast)["phantom"]
    section["echo_times_ms"] = tuple(section["echo_times_ms"])
    try:
        phantom_cfg = PhantomConfig(**{**section, **overrides})
    except ValueError as exc:
        from smoulder.errors import ConfigError

        raise ConfigError(str(exc)) from exc
    say = (lambda _m: None) if args.quiet else (lambda m: print(m, flush=True))
    start = time.perf_counter()
    out = generate_dataset(args.output_dir, phantom_cfg, progress=say)
    say(
        f"phantom dataset: {out} (truth in {out / 'derivatives' / 'truth'}) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


def run_validate(args: argparse.Namespace) -> int:
    """Check inputs and print the per-session report (``smoulder validate``)."""
    from smoulder.images import save_json
    from smoulder.inputs import discover, sessions_to_records, summarize, validate_session

    sessions = discover(
        args.bids_dir,
        participant_labels=_labels(args.participant_label, "sub-"),
        session_labels=_labels(args.session_label, "ses-"),
    )
    checked = [validate_session(s, read_data=not args.skip_data_check) for s in sessions]
    print(summarize(checked))
    if args.json:
        save_json(sessions_to_records(checked), args.json)
    return 1 if any(s.errors for s in checked) else 0


def run_participant(args: argparse.Namespace) -> int:
    """Run the participant level: check inputs, then process every usable session."""
    import logging

    from smoulder import config as cfgmod
    from smoulder.derivatives import DerivativesWriter
    from smoulder.inputs import discover, sessions_to_records, summarize, validate_session

    logging.basicConfig(
        level=max(logging.WARNING - 10 * args.verbose, logging.DEBUG),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    overrides: dict[str, Any] = {
        "execution": {
            "nprocs": args.nprocs,
            "omp_nthreads": args.omp_nthreads,
            "mem_gb": args.mem_gb,
            "device": args.device,
        }
    }
    overrides["execution"] = {k: v for k, v in overrides["execution"].items() if v is not None}
    if args.skip_data_check:
        overrides["inputs"] = {"read_data": False}
    cfg = cfgmod.resolve(config_file=args.config, fast=args.fast, overrides=overrides)
    writer = DerivativesWriter(args.output_dir)
    work_dir = args.work_dir or args.output_dir / "work"
    cfg["execution"]["work_dir"] = str(Path(work_dir).resolve())
    writer.save_config(cfg, argv=sys.argv)

    sessions = discover(
        args.bids_dir,
        participant_labels=_labels(args.participant_label, "sub-"),
        session_labels=_labels(args.session_label, "ses-"),
    )
    checked = [validate_session(s, read_data=cfg["inputs"]["read_data"]) for s in sessions]
    print(summarize(checked))
    records = sessions_to_records(checked)
    for subject in sorted({s.subject for s in checked}):
        writer.save_subject_inputs(subject, [r for r in records if r["subject"] == subject])
    writer.save_description()
    report = writer.save_inputs_report(records)
    print(f"outputs: {writer.root}")
    print(f"report:  {report}")
    failed = [s for s in checked if s.errors]
    return 1 if failed else 0


def run_group(args: argparse.Namespace) -> int:
    """Run the group level: gather the per-subject tables into cohort tables."""
    from smoulder.derivatives import DerivativesWriter

    writer = DerivativesWriter(args.output_dir)
    table = writer.gather_inputs(participants=_labels(args.participant_label, "sub-"))
    print(f"cohort table: {table}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """Generate a small phantom and run the participant level on it (``smoulder demo``)."""
    out = args.output_dir
    bids = out / "bids"
    status = main(
        [
            "phantom",
            str(bids),
            "--fast",
            "--resolution",
            str(args.resolution),
            "--subjects",
            str(args.subjects),
        ]
    )
    if status:
        return status
    status = main(
        [str(bids), str(out / "derivatives"), "participant", "--fast", "-w", str(out / "work")]
    )
    if status == 0:
        status = main([str(bids), str(out / "derivatives"), "group"])
    return status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
