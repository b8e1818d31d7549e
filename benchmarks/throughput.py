"""Benchmark: sessions per hour of the participant level, MultiProc against a local Slurm cluster.

    python benchmarks/throughput.py --out DIR [--quick] [--subjects N] [--resolution MM]
                                    [--cores 2] [--cache DIR] [--keep]

Case
----
A phantom archive (``smoulder phantom --subjects N --sessions 2 --resolution MM --seed 1``):
10 subjects x 2 sessions at 1 mm; ``--quick`` (under 10 minutes on 2 cores): 1 subject x 2
sessions at 3 mm, run with ``--fast`` (with 2 subjects it took 9-14 min on a shared 2-core
machine: each of the 228 Slurm jobs spends about 2 s starting). Generated once into
``--cache``, not timed.

Methods
-------
``smoulder-multiproc`` — ``smoulder BIDS OUT participant --nprocs CORES -w WORK
    --resource-monitor`` in a child process pinned to ``--cores`` CPUs.
``smoulder-slurm`` — the same command with ``--plugin-config``: Nipype's SLURMGraph plugin,
    every node a Slurm job (``--cpus-per-task=1 --mem=3G``: two at a time on a 2-CPU node),
    on a one-node cluster started for the run by ``.ci/slurm.sh start`` (its state in the run
    folder; stopped at the end). smoulder submits the graph, waits for the jobs and collects
    their results. Where Slurm cannot start, the record says why.

Measured
--------
``wall_s`` (the command, start to exit: input checks, the workflow, the reports),
``sessions_per_hour`` (sessions / wall_s x 3600), ``peak_rss_mb`` (the peak of the summed
resident memory of the command and its descendants, and for Slurm of ``slurmd``, of each
job's ``slurmstepd`` and of their descendants too: the jobs do not run under the command;
sampled every 0.2 s), and per kind of step (the run's provenance record,
``logs/provenance-*.json``): nodes, summed and largest run time, largest peak memory
(Nipype's resource monitor). For Slurm also the jobs
submitted and their mean time in Slurm (``sacct``), beside the nodes' own mean run time: the
difference is each job's start-up (a Python process loading Nipype and the node).

Writes ``DIR/throughput.json`` (a list of records: ``method``, ``case``, ``device``,
``status``, ``note``, ``sessions``, ``sessions_per_hour``, ``wall_s``, ``peak_rss_mb``,
``breakdown``...) and ``DIR/throughput.md`` (the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchenv  # noqa: E402

NAME = "throughput"
ROOT = Path(__file__).resolve().parents[1]
SLURM_SCRIPT = ROOT / ".ci" / "slurm.sh"
#: sbatch options of every node's job: two jobs at a time on a 2-CPU node.
SBATCH_ARGS = "--cpus-per-task=1 --mem=3G"
KEYS = ["method", "case", "device", "sessions", "sessions_per_hour", "wall_s", "peak_rss_mb"]


def phantom(cache: Path, subjects: int, resolution_mm: float) -> Path:
    """Return a ``subjects`` x 2-session phantom at ``resolution_mm`` (generated once)."""
    version = benchenv.source_fingerprint(*benchenv.PHANTOM_MODULES)
    root = cache / f"phantom-{subjects}x2-{resolution_mm:g}mm-{version}"
    if not (root / "dataset_description.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        cmd = [sys.executable, "-m", "smoulder.cli", "phantom", str(root), "--subjects"]
        cmd += [str(subjects), "--sessions", "2", "--resolution", str(resolution_mm)]
        print(f"generating {root.name} ...", flush=True)
        subprocess.run([*cmd, "--seed", "1", "-q"], check=True)
    return root


def slurm_steps(conf: str) -> list[int]:
    """Return the pids of the ``slurmstepd`` processes running jobs of the cluster configured
    by ``conf``: those whose job carries that ``SLURM_CONF`` (sbatch passes the submitter's
    environment on; slurmstepd's own is overwritten by its process title)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] != "slurmstepd":
            continue
        try:
            if any(c.environ().get("SLURM_CONF") == conf for c in proc.children()):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def run_command(
    cmd: list[str], log: Path, *, cores: int, env: dict[str, str], also: list[int]
) -> tuple[float, float, int]:
    """Return ``(wall_s, peak_rss_mb, exit status)`` of ``cmd`` pinned to ``cores`` CPUs, its
    output in ``log``; ``also``: more processes whose trees count in the peak memory, and with
    ``SLURM_CONF`` in ``env``, the trees of that cluster's jobs."""
    allowed = benchenv.cpus(cores)
    start = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=lambda: os.sched_setaffinity(0, allowed),
        )
        conf = env.get("SLURM_CONF")
        memory = benchenv.TreeMemory(
            [child.pid, *also], more=(lambda: slurm_steps(conf)) if conf else lambda: []
        )
        status = child.wait()
    wall = time.perf_counter() - start
    return round(wall, 1), memory.stop(), status


def step_kind(step: str) -> str:
    """Return the kind of a node: its name without pair labels; every ``ds_*`` is one kind.

    Examples:
        >>> [step_kind(s) for s in ("halfway_01_02", "ds_dseg", "segment", "jacobian_01_03")]
        ['halfway', 'publish outputs', 'segment', 'jacobian']
    """
    if step.startswith("ds_"):
        return "publish outputs"
    return re.sub(r"(_\d+)+$", "", step)


def breakdown(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return per kind of step that ran: nodes, total and largest run time, largest peak
    memory (MiB; ``None`` without the resource monitor), the longest first."""
    kinds: dict[str, list[dict[str, Any]]] = {}
    for n in nodes:
        if n["status"] == "ran":
            kinds.setdefault(step_kind(n["step"]), []).append(n)
    rows = []
    for kind, mine in kinds.items():
        durations = [n["duration_s"] or 0.0 for n in mine]
        memory = [n["mem_peak_gb"] for n in mine if n.get("mem_peak_gb") is not None]
        rows.append(
            {
                "step": kind,
                "nodes": len(mine),
                "total_s": round(sum(durations), 1),
                "max_s": round(max(durations), 1),
                "max_rss_mb": round(max(memory) * 1024) if memory else None,
            }
        )
    return sorted(rows, key=lambda r: -r["total_s"])


def provenance(out: Path) -> dict[str, Any]:
    """Return the newest provenance record of a run's outputs."""
    logs = sorted((out / "smoulder" / "logs").glob("provenance-*.json"))
    if not logs:
        raise RuntimeError(f"no provenance record in {out / 'smoulder' / 'logs'}")
    return json.loads(logs[-1].read_text())  # type: ignore[no-any-return]


def start_slurm(home: Path) -> tuple[dict[str, str], int]:
    """Return the environment for Slurm's clients and the ``slurmd`` pid of a cluster started
    under ``home``.

    Raises:
        benchenv.Skipped: the cluster did not start (the script's last error lines).
    """
    env = {**os.environ, "SLURM_HOME": str(home)}
    done = subprocess.run(
        ["bash", str(SLURM_SCRIPT), "start"], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise benchenv.Skipped(
            f"Slurm did not start ({SLURM_SCRIPT.name} start, exit {done.returncode}): "
            + " / ".join(lines[-6:])
        )
    conf = re.search(r"^export SLURM_CONF=(\S+)$", done.stdout, re.MULTILINE)
    if conf is None:
        raise benchenv.Skipped(f"{SLURM_SCRIPT.name} start printed no SLURM_CONF: {done.stdout}")
    env["SLURM_CONF"] = conf.group(1)
    return env, int((home / "run" / "slurmd.pid").read_text())


def stop_slurm(home: Path) -> None:
    """Stop the cluster started under ``home`` (whatever state it is in)."""
    env = {**os.environ, "SLURM_HOME": str(home)}
    subprocess.run(["bash", str(SLURM_SCRIPT), "stop"], env=env, capture_output=True)


def job_seconds(work: Path, env: dict[str, str]) -> tuple[int, float | None]:
    """Return the number of jobs the SLURMGraph run submitted and their mean time in Slurm (s,
    from ``sacct``; ``None`` without accounting)."""
    from smoulder.pipelines.slurm import SUBMISSIONS, read_submissions

    jobs = [s.job_id for s in read_submissions(work / "smoulder_wf" / "batch" / SUBMISSIONS)]
    ids = ",".join(j for j in jobs if j)
    cmd = ["sacct", "-n", "-P", "-X", "-o", "ElapsedRaw", "-j", ids]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = [int(v) for v in done.stdout.split() if v.isdigit()]
    return len(jobs), round(sum(elapsed) / len(elapsed), 2) if elapsed else None


def run_method(
    method: str, bids: Path, run_dir: Path, args: argparse.Namespace, case: str, sessions: int
) -> dict[str, Any]:
    """Return the record of one method on the case."""
    device = f"cpu ({len(benchenv.cpus(args.cores))} cores, {platform.machine()})"
    record: dict[str, Any] = {"method": method, "case": case, "device": device, "note": ""}
    out, work = run_dir / method / "out", run_dir / method / "work"
    cmd = [sys.executable, "-m", "smoulder.cli", str(bids), str(out), "participant"]
    cmd += ["--nprocs", str(args.cores), "-w", str(work), "--resource-monitor"]
    cmd += ["--fast"] if args.quick else []
    env, also = dict(os.environ), []
    home = run_dir / "slurm"
    try:
        if method == "smoulder-slurm":
            env, slurmd = start_slurm(home)
            also = [slurmd]
            plugin = run_dir / "slurmgraph.json"
            plugin_args = {"sbatch_args": SBATCH_ARGS, "dont_resubmit_completed_jobs": True}
            plugin.write_text(json.dumps({"plugin": "SLURMGraph", "plugin_args": plugin_args}))
            cmd += ["--plugin-config", str(plugin)]
        (run_dir / method).mkdir(parents=True, exist_ok=True)
        print(f"{method}: {' '.join(cmd[3:])}", flush=True)
        wall, peak, status = run_command(
            cmd, run_dir / method / "log.txt", cores=args.cores, env=env, also=also
        )
        if status != 0:
            tail = (run_dir / method / "log.txt").read_text()[-600:]
            return {**record, "status": "failed", "note": f"exit {status}: {tail}"}
        nodes = provenance(out)["nodes"]
        record.update(
            status="ok",
            sessions=sessions,
            sessions_per_hour=round(sessions * 3600 / wall, 2),
            wall_s=wall,
            peak_rss_mb=peak,
            steps=sum(n["kind"] == "step" for n in nodes),
            breakdown=breakdown(nodes),
        )
        if method == "smoulder-slurm":
            jobs, mean_job = job_seconds(work, env)
            ran = [n["duration_s"] or 0.0 for n in nodes if n["status"] == "ran"]
            record.update(
                jobs=jobs,
                mean_job_s=mean_job,
                mean_node_s=round(sum(ran) / len(ran), 2) if ran else None,
            )
            record["note"] = (
                f"{jobs} jobs, mean {mean_job} s each in Slurm for {record['mean_node_s']} s "
                f"of node run time ({SBATCH_ARGS})"
            )
        return record
    except benchenv.Skipped as exc:
        return {**record, "status": "skipped", "note": str(exc)}
    finally:
        if method == "smoulder-slurm":
            stop_slurm(home)


def write_outputs(args: argparse.Namespace, records: list[dict[str, Any]]) -> str:
    """Write ``throughput.json`` and ``throughput.md`` to ``--out``; return the Markdown."""
    args.threads = args.cores  # what the common head calls threads per method
    pkgs = benchenv.versions(("smoulder", "nipype", "torch", "picsl_greedy"))
    lines = benchenv.write_json_and_head(args, NAME, records, pkgs)
    lines += ["", *benchenv.results_table(records, KEYS)]
    for r in records:
        if r["status"] != "ok":
            continue
        cols = list(r["breakdown"][0]) if r["breakdown"] else []
        lines += ["", f"Time per kind of step, {r['method']} (summed over nodes):", ""]
        lines += benchenv.results_table([{**b, "status": "ok"} for b in r["breakdown"]], cols)
    lines += benchenv.note_lines(records) + benchenv.not_run_lines(records, [])
    lines += ["", (__doc__ or "").split("Case\n----\n", 1)[-1].strip()]
    text = "\n".join(lines) + "\n"
    (args.out / f"{NAME}.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from the command line; return the exit status."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="1 subject at 3 mm, --fast")
    parser.add_argument("--subjects", type=int, help="subjects (default 10; 1 with --quick)")
    parser.add_argument("--resolution", type=float, help="voxel mm (default 1; 3 with --quick)")
    parser.add_argument("--cores", type=int, default=2, help="CPUs the command may use")
    parser.add_argument("--methods", default="smoulder-multiproc,smoulder-slurm")
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "smoulder-throughput-cache"
    )
    parser.add_argument("--keep", action="store_true", help="keep the outputs and work folders")
    args = parser.parse_args(argv)
    subjects = args.subjects or (1 if args.quick else 10)
    resolution = args.resolution or (3.0 if args.quick else 1.0)
    args.cache.mkdir(parents=True, exist_ok=True)
    bids = phantom(args.cache, subjects, resolution)
    case = f"phantom {subjects} subject{'s' * (subjects != 1)} x 2 sessions, {resolution:g} mm"
    case += ", --fast" if args.quick else ""
    run_dir = Path(tempfile.mkdtemp(prefix="smoulder-throughput-", dir=args.cache))
    records = []
    try:
        for method in args.methods.split(","):
            records.append(run_method(method, bids, run_dir, args, case, subjects * 2))
            write_outputs(args, records)  # a run that stops keeps what it measured
    finally:
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    print(write_outputs(args, records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
