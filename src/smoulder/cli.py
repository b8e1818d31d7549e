"""The ``smoulder`` command: a BIDS App plus the ``phantom``, ``validate`` and ``demo`` tools.

Only argument parsing lives here; each command calls library functions. Heavy imports (numpy,
nibabel, torch) are deferred into the commands so that ``smoulder --help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TOOLS = ("phantom", "validate", "demo", "register", "segment", "train", "report", "review", "qsm")
LOG = logging.getLogger("smoulder.run")

USAGE = """\
smoulder BIDS_DIR OUTPUT_DIR {participant,group} [options]
       smoulder phantom OUTPUT_DIR [options]
       smoulder validate BIDS_DIR [options]
       smoulder register FIXED MOVING -o OUT_DIR [options]
       smoulder segment FLAIR [--t1 T1] -o OUT_DIR [options]
       smoulder train segmentation RUN_DIR [options]
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
  train     train the segmentation network on synthetic images (resumable)
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
        help="subjects to process (with or without 'sub-'); default: all",
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
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where GPU-capable steps run")
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
        "--resource-monitor",
        action="store_true",
        help="record each step's peak memory and CPU use in the provenance record",
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
            if tool == "register":
                from smoulder.registration import command

                return command.run(command.parser().parse_args(rest))
            if tool == "segment":
                from smoulder.segmentation import command as seg

                return seg.run_segment(seg.segment_parser().parse_args(rest))
            if tool == "qsm":
                from smoulder.qsm import command as qsm

                return qsm.run(qsm.parser().parse_args(rest))
            if tool in ("report", "review"):
                from smoulder.report import command as rep

                if tool == "report":
                    return rep.run_report(rep.report_parser().parse_args(rest))
                return rep.run_review(rep.review_parser().parse_args(rest))
            if tool == "train":
                from smoulder.segmentation import command as seg

                return seg.run_train(rest)
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
    """Run the participant level: check inputs, then process every usable session.

    The per-session and per-subject workflows run under Nipype (``smoulder.pipelines``); the
    work directory is their cache, so the same command after an interruption resumes. A step
    that fails is reported (session, step, inputs, error) and the other sessions go on.
    """
    from smoulder import config as cfgmod
    from smoulder.derivatives import DerivativesWriter
    from smoulder.inputs import discover, sessions_to_records, summarize, validate_session

    logging.basicConfig(
        level=max(logging.WARNING - 10 * args.verbose, logging.DEBUG),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
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
    if args.reports_only:
        from smoulder.report.command import build_reports

        for page in build_reports(args.output_dir, _labels(args.participant_label, "sub-")):
            print(f"report: {page}")
        return 0
    cfg = cfgmod.resolve(config_file=args.config, fast=args.fast, overrides=overrides)
    writer = DerivativesWriter(args.output_dir, raw_dir=args.bids_dir)
    work_dir = Path(args.work_dir or args.output_dir / "work").absolute()
    cfg["execution"]["work_dir"] = str(work_dir)
    argv = getattr(args, "argv", sys.argv)
    writer.save_config(cfg, argv=argv)
    with _run_log(writer.logs / f"run-{writer.stamp}.log", verbose=args.verbose):
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
        inputs_page = writer.save_inputs_report(records)
        failed_nodes = _process(args, cfg, writer, checked, work_dir, argv)
        _build_reports(args.output_dir, _labels(args.participant_label, "sub-"))
    print(f"outputs: {writer.root}")
    print(f"report:  {writer.root / 'report.html'} (inputs: {inputs_page})")
    input_errors = [s for s in checked if s.errors]
    return 1 if input_errors or failed_nodes else 0


def _build_reports(output_dir: Path, participants: list[str] | None) -> None:
    """Build the QA reports; a failure is logged and does not fail the run (outputs stand)."""
    from smoulder.report.command import build_reports

    try:
        pages = build_reports(output_dir, participants)
        print(f"QA reports: {', '.join(p.name for p in pages)}")
    except Exception:  # noqa: BLE001 - the run's outputs are complete; the report can be rebuilt
        LOG.exception("building the QA reports failed; rerun 'smoulder report %s'", output_dir)
        print(f"warning: QA reports not built; see the log, then 'smoulder report {output_dir}'")


@contextmanager
def _run_log(path: Path, *, verbose: int) -> Iterator[None]:
    """Copy the run's events (``smoulder.run``) and Nipype's warnings to ``path``.

    Step-by-step events go to the file only; on the console they show from ``-vv``, failures
    always (as errors).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(max(logging.WARNING - 10 * verbose, logging.DEBUG))
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    run_log = logging.getLogger("smoulder.run")
    nipype_log = logging.getLogger("nipype.workflow")
    saved = (run_log.level, run_log.propagate)
    run_log.setLevel(logging.INFO)
    run_log.propagate = False
    run_log.addHandler(file_handler)
    run_log.addHandler(console)
    nipype_log.addHandler(file_handler)
    try:
        yield
    finally:
        run_log.removeHandler(file_handler)
        run_log.removeHandler(console)
        nipype_log.removeHandler(file_handler)
        run_log.setLevel(saved[0])
        run_log.propagate = saved[1]
        file_handler.close()


def _process(
    args: argparse.Namespace,
    cfg: dict[str, Any],
    writer: Any,
    checked: list[Any],
    work_dir: Path,
    argv: list[str],
) -> int:
    """Build and run the participant workflow; write the report; return the failed steps."""
    from smoulder.config import omp_threads
    from smoulder.devices import available_cpus
    from smoulder.pipelines.execution import (
        failure_lines,
        format_table,
        run_workflow,
        summary_rows,
    )
    from smoulder.pipelines.participant import init_participant_wf, plan_sessions
    from smoulder.registration.engines import resolve_engine

    plans = plan_sessions(checked, modalities=cfg["registration"]["session"]["modalities"])
    engine, device = resolve_engine(cfg["registration"]["engine"], cfg["execution"]["device"])
    threads = omp_threads(cfg)
    runnable = [p for p in plans if not p.skipped]
    result = None
    if runnable:
        wf = init_participant_wf(
            plans=runnable,
            cfg=cfg,
            output_dir=args.output_dir,
            bids_dir=args.bids_dir,
            work_dir=work_dir,
            engine=engine,
            device=device,
            omp_nthreads=threads,
        )
        print(f"processing {len(runnable)} session(s) with {cfg['execution']['plugin']} ...")
        result = run_workflow(
            wf,
            cfg,
            device=device,
            crash_dir=writer.logs / f"crash-{writer.stamp}",
            verbose=args.verbose,
        )
    skipped = [p for p in plans if p.skipped]
    rows = summary_rows(result, skipped)
    failures = failure_lines(result) if result else []
    table = format_table(rows)
    print()
    print(table)
    LOG.info("summary\n%s", table)
    if failures:
        print("\nFailures:")
        print("\n".join(f"  {line}" for line in failures))
        LOG.info("failures:\n%s", "\n".join(failures))
    writer.save_run_report(rows, failures, nodes=[] if result is None else result.records)
    run: dict[str, Any] = {
        "device": _device_info(device),
        "engine": engine,
        "omp_nthreads": threads,
        "cpus": available_cpus(),
        "work_dir": str(work_dir),
        "summary": rows,
        "failures": failures,
    }
    if result is not None:
        run.update(result.to_json())
    writer.save_provenance(run, argv=argv)
    return 0 if result is None else len(result.failures)


def _device_info(device: str) -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {"device": device, "processor": platform.processor() or "unknown"}
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


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
