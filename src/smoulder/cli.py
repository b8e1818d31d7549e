"""The ``smoulder`` command: a BIDS App plus the ``phantom``, ``validate`` and ``demo`` tools.

Only argument parsing lives here; each command calls library functions. Heavy imports (numpy,
nibabel, torch) are deferred into the commands so that ``smoulder --help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from smoulder.devices import DEVICES

TOOLS = ("phantom", "validate", "demo", "register", "segment", "train", "report", "review", "qsm")

USAGE = """\
smoulder BIDS_DIR OUTPUT_DIR {participant,group} [options]
       smoulder phantom OUTPUT_DIR [options]
       smoulder validate BIDS_DIR [options]
       smoulder register FIXED MOVING -o OUT_DIR [options]
       smoulder segment FLAIR [--t1 T1] -o OUT_DIR [options]
       smoulder train segmentation RUN_DIR [options]
       smoulder train rims RUN_DIR --shards DIR [options]
       smoulder train candidates RUN_DIR [--install BUNDLE]
       smoulder qsm --magnitude M1 M2 ... --phase P1 P2 ... -o OUT_DIR [options]
       smoulder report OUTPUT_DIR [--participant-label ...]
       smoulder review OUTPUT_DIR [--host 127.0.0.1] [--port 8765]
       smoulder demo [OUTPUT_DIR]"""

DESCRIPTION = """\
MRI markers of smouldering multiple sclerosis from BIDS data: paramagnetic rim lesions,
slowly expanding lesions, new/enlarging lesions, brain, grey-matter and cord atrophy.

tools:
  phantom   write a synthetic BIDS dataset with exact truth (smoulder phantom --help)
  validate  check a BIDS dataset's inputs without running anything
  register  register two images, or move two sessions half way (ITK/ANTs transforms)
  segment   brain mask, tissue classes and numbered lesions of one FLAIR (+T1w)
  train     train the segmentation network or the rim classifier (resumable)
  qsm       QSM (ppm), field maps, filtered phase and SWI from multi-echo GRE
  report    rebuild the per-subject QA reports and the cohort index from the outputs
  review    serve the reports on this machine; raters' decisions go to a TSV per subject
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
        help="subjects to process (with or without 'sub-'), or @FILE: a file of labels, one "
        "per line ('#' comments); default: all",
    )
    p.add_argument(
        "--session-label",
        "--session_label",
        nargs="+",
        metavar="LABEL",
        help="sessions to process (with or without 'ses-'); default: all",
    )
    p.add_argument(
        "-w",
        "--work-dir",
        type=Path,
        help="work directory: Nipype's cache; rerun with the same one to resume "
        "(default: OUTPUT_DIR/work)",
    )
    p.add_argument("--nprocs", type=int, help="processes to run at once (default: all CPUs)")
    p.add_argument(
        "--omp-nthreads", type=int, help="threads per step (default: half of --nprocs, at most 8)"
    )
    p.add_argument("--mem-gb", type=float, help="memory budget in GB")
    p.add_argument("--device", choices=DEVICES, help="where GPU-capable steps run")
    p.add_argument(
        "--gpu-slots",
        type=int,
        metavar="N",
        help="GPU steps running at once (MultiProc n_gpu_procs; default: the GPUs visible)",
    )
    p.add_argument(
        "--plugin-config",
        type=Path,
        metavar="FILE",
        help="YAML/JSON file naming a Nipype plugin and its arguments "
        "(plugin: SLURM, plugin_args: {sbatch_args: ...}); default: MultiProc",
    )
    p.add_argument(
        "--stop-on-first-crash",
        action="store_true",
        help="stop the whole run at the first failing step (default: finish the other sessions)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="process subjects whose outputs are complete and current too "
        "(default: skip them, with a message)",
    )
    p.add_argument(
        "--lock-max-age-hours",
        type=float,
        metavar="H",
        help="a subject's lock taken on another host counts as stale (its run dead) after H "
        "hours (default 48); on this host, as soon as its process is gone",
    )
    p.add_argument(
        "--resource-monitor",
        action="store_true",
        help="record each step's peak memory and CPU use in the provenance record",
    )
    p.add_argument(
        "--slurm-array",
        action="store_true",
        help="instead of running, write a Slurm job array: one task per participant whose "
        "outputs are not complete and current, each running this command for it with "
        "MultiProc and its own work directory WORK/sub-<label> (script and task logs in "
        "OUTPUT_DIR/smoulder/logs/slurm-array-<run>/)",
    )
    p.add_argument(
        "--sbatch-args",
        default="",
        metavar="ARGS",
        help="with --slurm-array: sbatch options of each task, with '=': "
        "--sbatch-args='--cpus-per-task=4 --mem=16G --time=04:00:00'",
    )
    p.add_argument(
        "--submit",
        action="store_true",
        help="with --slurm-array: submit the job array with sbatch and print its job id",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="YAML preset: a file or a shipped name "
        "(default, fast, cpu, slurm); command-line values win",
    )
    p.add_argument("--fast", action="store_true", help="lower-cost preset for tests and previews")
    p.add_argument(
        "--reports-only",
        action="store_true",
        help="only rebuild the QA reports (sub-X.html, index.html) from existing outputs",
    )
    p.add_argument(
        "--skip-data-check",
        action="store_true",
        help="check headers and sidecars only, not every voxel",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("--version", action="version", version=_version())
    return p


#: ``smoulder phantom`` options that set a key of the configuration's ``phantom`` section (the
#: flag's name with underscores): flag, type, help.
PHANTOM_OPTIONS: tuple[tuple[str, type, str], ...] = (
    ("--subjects", int, "number of subjects (default 1)"),
    ("--sessions", int, "sessions per subject (default 2)"),
    ("--interval-years", float, "years between sessions (default 1)"),
    ("--seed", int, "random seed (default 0): same seed, same dataset"),
    ("--flair-slice-mm", float, "FLAIR slice thickness (default: MM)"),
    ("--gre-voxel-mm", float, "isotropic GRE voxel (default: MM)"),
    ("--gre-tilt-deg", float, "GRE slab tilted about left-right, degrees (default 0)"),
    ("--gre-slab-mm", float, "GRE slab thickness, mm (default: the whole head)"),
    ("--lesions", int, "baseline lesions per subject (default 12)"),
    ("--new-lesions-per-session", int, "new lesions per follow-up"),
    ("--pbvc-per-year", float, "whole-brain volume change, %%/year"),
)


def phantom_parser() -> argparse.ArgumentParser:
    """Return the parser of ``smoulder phantom``."""
    p = argparse.ArgumentParser(
        prog="smoulder phantom",
        description="Write a BIDS dataset of synthetic MS subjects with exact truth in "
        "derivatives/truth (lesions, rims, SELs, atrophy, cord CSA, deformations).",
    )
    p.add_argument("output_dir", type=Path)
    p.add_argument(
        "--resolution",
        type=float,
        dest="resolution_mm",
        metavar="MM",
        help="voxel size of the truth and T1w grids (default 1 mm)",
    )
    for flag, kind, text in PHANTOM_OPTIONS:
        p.add_argument(flag, type=kind, help=text)
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
            if tool == "register":
                from smoulder.registration import command

                return command.run(command.parser().parse_args(rest))
            if tool == "segment":
                from smoulder.segmentation import command as seg

                return seg.run(seg.parser().parse_args(rest))
            if tool == "qsm":
                from smoulder.qsm import command as qsm

                return qsm.run(qsm.parser().parse_args(rest))
            if tool in ("report", "review"):
                from smoulder.report import command as rep

                if tool == "report":
                    return rep.run(rep.parser().parse_args(rest))
                return rep.run_review(rep.review_parser().parse_args(rest))
            if tool == "train":
                return run_train(rest)
            return run_demo(demo_parser().parse_args(rest))
        args = bids_app_parser().parse_args(argv)
        args.argv = ["smoulder", *argv]
        if args.analysis_level == "participant":
            return run_participant(args)
        return run_group(args)
    except SmoulderError as exc:
        print(f"smoulder: error: {exc}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------- commands


def run_train(rest: list[str]) -> int:
    """Run ``smoulder train {segmentation,candidates,rims} ...``; return the exit status."""
    from smoulder.errors import ConfigError

    if rest[:1] == ["rims"]:
        from smoulder.rims import command as rims

        return rims.run_train(rims.train_parser().parse_args(rest[1:]))
    if rest[:1] == ["segmentation"]:
        from smoulder.segmentation import command as seg

        return seg.run_train(rest)
    if rest[:1] == ["candidates"]:
        from smoulder.segmentation import command as seg

        return seg.run_train_candidates(seg.candidates_parser().parse_args(rest[1:]))
    raise ConfigError(
        "smoulder train: expected 'segmentation', 'candidates' or 'rims', "
        f"found {rest[:1] or 'nothing'}"
    )


def run_phantom(args: argparse.Namespace) -> int:
    """Generate a phantom dataset (``smoulder phantom``)."""
    from dataclasses import asdict, fields

    from smoulder import config as cfgmod
    from smoulder.phantom.dataset import generate_dataset
    from smoulder.phantom.generate import PhantomConfig

    keys = {f.name for f in fields(PhantomConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in keys and v is not None}
    for key in ("anatomy", "lesion_masks"):
        if key in overrides:
            overrides[key] = str(overrides[key])
    section = asdict(cfgmod.resolve(config_file=args.config, fast=args.fast).phantom)
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
    """Run the participant level (:func:`smoulder.pipelines.execution.run_participant`).

    Returns:
        The exit status: 1 when an input had errors or a step failed, else 0.
    """
    from smoulder import config as cfgmod
    from smoulder.pipelines.batch import expand_labels
    from smoulder.pipelines.execution import run_participant as run_level

    args.participant_label = expand_labels(args.participant_label)  # @FILE: its labels
    logging.basicConfig(
        level=max(logging.WARNING - 10 * args.verbose, logging.DEBUG),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    overrides = _participant_overrides(args)
    if args.reports_only:
        from smoulder.report import command as rep

        return rep.run(args)  # the same output_dir and participant_label arguments
    cfg = cfgmod.resolve(config_file=args.config, fast=args.fast, overrides=overrides)
    if (args.submit or args.sbatch_args) and not args.slurm_array:
        from smoulder.errors import ConfigError

        raise ConfigError("--submit and --sbatch-args: expected with --slurm-array, found alone")
    if args.slurm_array:
        from smoulder.pipelines.execution import model_versions
        from smoulder.pipelines.slurm import participant_array

        return participant_array(
            cfg,
            bids_dir=args.bids_dir,
            output_dir=args.output_dir,
            work_dir=args.work_dir,
            participant_labels=_labels(args.participant_label, "sub-"),
            session_labels=_labels(args.session_label, "ses-"),
            argv=getattr(args, "argv", sys.argv)[1:],
            models=model_versions(cfg),
            sbatch_args=args.sbatch_args,
            submit=args.submit,
            force=args.force,
        )
    return run_level(
        cfg,
        bids_dir=args.bids_dir,
        output_dir=args.output_dir,
        work_dir=args.work_dir,
        participant_labels=_labels(args.participant_label, "sub-"),
        session_labels=_labels(args.session_label, "ses-"),
        argv=getattr(args, "argv", sys.argv),
        force=args.force,
        lock_max_age_h=args.lock_max_age_hours,
        verbose=args.verbose,
    )


def _participant_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Return the configuration sections set on the command line (and by ``--plugin-config``)."""
    from smoulder import config as cfgmod

    execution: dict[str, Any] = {
        "nprocs": args.nprocs,
        "omp_nthreads": args.omp_nthreads,
        "mem_gb": args.mem_gb,
        "device": args.device,
        "gpu_slots": args.gpu_slots,
    }
    execution = {k: v for k, v in execution.items() if v is not None}
    if args.plugin_config is not None:
        execution.update(cfgmod.load_plugin_config(args.plugin_config))
    if args.stop_on_first_crash:
        execution["stop_on_first_crash"] = True
    if args.resource_monitor:
        execution["resource_monitor"] = True
    overrides: dict[str, Any] = {"execution": execution}
    if args.skip_data_check:
        overrides["inputs"] = {"read_data": False}
    return overrides


def run_group(args: argparse.Namespace) -> int:
    """Run the group level: gather the per-subject tables into cohort tables."""
    from smoulder.derivatives import DerivativesWriter
    from smoulder.pipelines.batch import expand_labels

    writer = DerivativesWriter(args.output_dir)
    participants = _labels(expand_labels(args.participant_label), "sub-")  # @FILE: its labels
    table = writer.gather_inputs(participants=participants)
    print(f"inputs table: {table}")
    for path in writer.save_cohort(participants):
        if path.suffix != ".json":
            print(f"cohort: {path}")
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
    if status == 0:
        from smoulder.config import resolve
        from smoulder.phantom.check import compare_with_truth, format_comparison

        seg = resolve(fast=True).segmentation
        minimum = (float(seg.min_lesion_ul), int(seg.min_lesion_voxels))
        rows = compare_with_truth(bids, out / "derivatives" / "smoulder", minimum)
        print("\nmeasured on the phantom, beside its truth:")
        print(format_comparison(rows))
    return status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
