"""Slurm for real: a one-node cluster, Nipype's SLURMGraph plugin and one job per participant.

The module's cluster is started once by ``.ci/slurm.sh start`` (its state under the test's
temporary folder) and stopped at the end whatever happened. Where Slurm cannot start, the
tests that need it skip with the daemons' own error.

Quick checks on tiny workflows and jobs: what the wait reports of failed, cancelled and refused
jobs, and its time limit. Then, on the 2-subject phantom of ``test_pipelines`` (one run each,
module-scoped, about ten minutes on 2 cores):

1. MultiProc, the reference;
2. SLURMGraph, every node a Slurm job: the jobs completed (``sacct``), the derivatives equal
   the reference's; a rerun of one participant from the same work directory resubmits only
   the output nodes (Nipype always reruns those), not a single computing step;
3. ``--slurm-array --submit`` in the SLURMGraph run's outputs once one of sub-02's files is
   deleted: one task, for sub-02 only (sub-01 is complete and current); it completes and
   puts back the same outputs.
"""

from __future__ import annotations

import doctest
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from smoulder import config as cfgmod
from smoulder.cli import main
from smoulder.phantom.dataset import generate_dataset
from smoulder.phantom.generate import PhantomConfig
from smoulder.pipelines import slurm
from smoulder.pipelines.execution import NodeRecord, run_workflow
from smoulder.pipelines.slurm import GraphJob, SlurmError, Submission

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "slurm.sh"
PHANTOM = PhantomConfig(
    subjects=2, sessions=2, resolution_mm=4.0, lesions=4, new_lesions_per_session=1, seed=5
)
# The runs compare plugins, not methods: the steps of the lesion tables (segmentation and the
# longitudinal lesion activity, with the T1w co-registered) on coarse grids; QSM, rims and
# atrophy add nodes, not other ways of running them.
SETTINGS = """\
registration:
  session:
    modalities: [T1w]
    resolution_mm: 6
segmentation:
  refine: false
qsm:
  enabled: false
rims:
  enabled: false
atrophy:
  enabled: false
"""
#: Every job must fit the 2-CPU test node, two at a time.
SBATCH_ARGS = "--cpus-per-task=1 --mem=2G"


# ----------------------------------------------------------------------------- no cluster


def test_slurm_doctests() -> None:
    result = doctest.testmod(slurm)
    assert result.attempted > 0 and result.failed == 0


def test_submissions_read_from_the_plugin_files(tmp_path: Path) -> None:
    """The jobs planned in submit_jobs.sh and sbatch's answers pair up; a refusal is named."""
    script = tmp_path / "submit_jobs.sh"
    script.write_text(
        "#!/usr/bin/env bash\n# Condense format attempted\n"
        "j0_a=$(sbatch -o /b/s_a.sh.o -e /b/s_a.sh.e --mem=2G  -J j0_a /b/s_a.sh | awk '')\n"
        "j1_b=$(sbatch -o /b/s_b.sh.o -e /b/s_b.sh.e --mem=2G --dependency=afterok:${j0_a} "
        "-J j1_b /b/s_b.sh | awk '')\n"
    )
    planned = slurm.planned_jobs(script)
    assert planned == {"j0_a": "/b/s_a.sh", "j1_b": "/b/s_b.sh"}
    record = tmp_path / slurm.SUBMISSIONS
    answers = [
        {"argv": ["-J", "j0_a", "/b/s_a.sh"], "returncode": 0, "stdout": "Submitted batch job 7\n",
         "stderr": ""},
        {"argv": ["-J", "j1_b", "/b/s_b.sh"], "returncode": 1, "stdout": "",
         "stderr": "sbatch: error: Batch job submission failed: Invalid dependency\n"},
    ]  # fmt: skip
    record.write_text("".join(json.dumps(a) + "\n" for a in answers))
    submitted = slurm.read_submissions(record)
    assert [(s.name, s.job_id) for s in submitted] == [("j0_a", "7"), ("j1_b", None)]
    with pytest.raises(SlurmError, match="j1_b.*Invalid dependency.*1 of 2 submissions refused"):
        slurm.check_submissions(planned, submitted, submit_script=script)
    with pytest.raises(SlurmError, match="expected 2 jobs queued, found 1"):
        slurm.check_submissions(planned, submitted[:1], submit_script=script)


def test_jobs_killed_by_slurm_fail_their_node() -> None:
    """A job that ended badly without a result fails its node; a cancelled one stays not run."""
    records = [
        NodeRecord("sub_01_wf.ses_01_wf.segment", "01", "01", "segment", "step"),
        NodeRecord("sub_01_wf.ses_01_wf.ds_dseg", "01", "01", "ds_dseg", "output"),
    ]
    batch = "/w/top/batch/batchscript_pyscript_20260101_000000_top.sub_01_wf.ses_01_wf"
    jobs = [
        GraphJob(Submission("j0_segment", f"{batch}_segment.sh", "41", 0, ""), "OUT_OF_MEMORY"),
        GraphJob(Submission("j1_ds_dseg", f"{batch}_ds_dseg.sh", "42", 0, ""), "CANCELLED"),
    ]
    error = slurm.mark_failed_jobs(records, jobs, top="top")
    cancelled = "1 cancelled (a job they needed failed)"
    assert error == f"1 Slurm job(s) failed: 41 j0_segment OUT_OF_MEMORY; {cancelled}"
    assert records[0].status == "failed" and "ended OUT_OF_MEMORY" in (records[0].error or "")
    assert records[1].status == "not run"
    assert slurm.mark_failed_jobs(records, [], top="top") is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--submit"], "--submit and --sbatch-args: expected with --slurm-array, found alone"),
        (["--slurm-array", "--config", "slurm"], "found plugin SLURMGraph"),
    ],
)
def test_array_options_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    argv = [str(tmp_path / "bids"), str(tmp_path / "out"), "participant", *options]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- the cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> str:
    """Return ``SLURM_CONF`` of a running one-node cluster (set in the environment)."""
    if shutil.which("bash") is None or not SCRIPT.is_file():
        pytest.skip(f"no bash or no {SCRIPT}")
    env = {**os.environ, "SLURM_HOME": str(tmp_path_factory.mktemp("slurm"))}

    def stop() -> None:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=180)

    request.addfinalizer(stop)  # first: a cluster that half started is stopped too
    started = subprocess.run(
        ["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=900
    )
    if started.returncode != 0:
        pytest.skip(
            f"Slurm did not start ({SCRIPT.name} start, exit {started.returncode}):\n"
            + started.stderr[-3000:]
        )
    conf = re.search(r"^export SLURM_CONF=(\S+)$", started.stdout, re.MULTILINE)
    assert conf, f"{SCRIPT.name} start printed no 'export SLURM_CONF=...': {started.stdout}"
    patch = pytest.MonkeyPatch()
    patch.setenv("SLURM_CONF", conf.group(1))
    request.addfinalizer(patch.undo)
    return conf.group(1)


def sbatch(*args: str) -> str:
    """Return the id of a job submitted with ``sbatch --parsable``."""
    done = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def accounted(job_id: str, *, tasks: int = 1, timeout_s: float = 60) -> dict[str, str]:
    """Return ``{job id: state}`` from ``sacct`` once it lists ``tasks`` ended jobs of ``job_id``
    (the accounting database lags the controller by a moment)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = slurm.accounted_states([job_id])
        if len(states) == tasks and set(states.values()) <= slurm.ENDED:
            return states
        assert time.monotonic() < deadline, f"sacct -j {job_id}: {states}"
        time.sleep(1)


def test_wait_reports_how_jobs_ended(cluster: str, tmp_path: Path) -> None:
    """Completed, failed, and cancelled because the job it needed failed."""
    ok = sbatch("--wrap", "true", "-o", str(tmp_path / "ok.o"), *SBATCH_ARGS.split())
    bad = sbatch("--wrap", "exit 3", "-o", str(tmp_path / "bad.o"), *SBATCH_ARGS.split())
    after = sbatch("--wrap", "true", f"--dependency=afterok:{bad}", *SBATCH_ARGS.split())
    lines: list[str] = []
    states = slurm.wait_for_jobs([ok, bad, after], poll_s=0.5, timeout_s=120, report=lines.append)
    assert states == {ok: "COMPLETED", bad: "FAILED", after: "CANCELLED"}
    assert lines[-1].startswith("slurm: 3 jobs: 3 ended, 0 running, 0 pending")


def test_wait_gives_up_after_its_time_limit(cluster: str, tmp_path: Path) -> None:
    job = sbatch("--wrap", "sleep 120", "-o", str(tmp_path / "sleep.o"), *SBATCH_ARGS.split())
    try:
        with pytest.raises(SlurmError, match=f"{job}.*still queued.*squeue -j {job}"):
            slurm.wait_for_jobs([job], timeout_s=1, poll_s=0.5, report=None)
    finally:
        slurm.cancel([job])


def _add(x: int) -> int:
    return x + 1


def _boom(x: int) -> int:
    raise ValueError(f"boom at {x}")


def tiny_workflow(base: Path) -> Any:
    """Return ``first -> boom -> last``: Function nodes, the middle one raising."""
    from nipype.interfaces.utility import Function
    from nipype.pipeline import engine as pe

    wf = pe.Workflow(name="tiny", base_dir=str(base))
    nodes = {}
    for name, function in (("first", _add), ("boom", _boom), ("last", _add)):
        iface = Function(input_names=["x"], output_names=["y"], function=function)
        nodes[name] = pe.Node(iface, name=name)
    nodes["first"].inputs.x = 1
    wf.connect([(nodes["first"], nodes["boom"], [("y", "x")])])
    wf.connect([(nodes["boom"], nodes["last"], [("y", "x")])])
    return wf


def graph_config(sbatch_args: str = SBATCH_ARGS) -> cfgmod.Config:
    args = {"sbatch_args": sbatch_args, "dont_resubmit_completed_jobs": True, "poll_s": 0.5}
    execution = {"plugin": "SLURMGraph", "plugin_args": args}
    return cfgmod.resolve(overrides={"execution": execution})


def test_slurmgraph_waits_and_reports_a_failing_node(cluster: str, tmp_path: Path) -> None:
    result = run_workflow(
        tiny_workflow(tmp_path), graph_config(), crash_dir=tmp_path / "crash", progress=False
    )
    status = {r.step: r.status for r in result.records}
    assert status == {"first": "ran", "boom": "failed", "last": "not run"}
    boom = next(r for r in result.records if r.step == "boom")
    assert boom.error == "ValueError: boom at 2"
    assert boom.crash_file and Path(boom.crash_file).is_file()
    ids = [s.job_id for s in slurm.read_submissions(tmp_path / "tiny/batch" / slurm.SUBMISSIONS)]
    assert [accounted(str(i))[str(i)] for i in ids] == ["COMPLETED", "FAILED", "CANCELLED"]
    cancelled = "1 cancelled (a job they needed failed)"
    assert result.error == f"1 Slurm job(s) failed: {ids[1]} j1_boom FAILED; {cancelled}"


@pytest.mark.parametrize(
    ("sbatch_args", "unset_conf", "message"),
    [
        ("--cpus-per-task=1 --mem=900G", False, "Memory specification can not be satisfied"),
        (SBATCH_ARGS, True, "configuration source"),  # SLURM_CONF unset: no controller
    ],
)
def test_refused_submissions_are_an_error(
    cluster: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sbatch_args: str,
    unset_conf: bool,
    message: str,
) -> None:
    """Nipype logs success when sbatch refuses; the run stops with sbatch's own message."""
    if unset_conf:
        monkeypatch.delenv("SLURM_CONF")
    with pytest.raises(SlurmError, match=f"sbatch of job j0_first.*{message}") as caught:
        run_workflow(
            tiny_workflow(tmp_path),
            graph_config(sbatch_args),
            crash_dir=tmp_path / "crash",
            progress=False,
        )
    assert "3 of 3 submissions refused" in str(caught.value)
    monkeypatch.setenv("SLURM_CONF", cluster)
    queued = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True)
    assert not any(name.endswith(("_first", "_boom", "_last")) for name in queued.stdout.split())


# ----------------------------------------------------------------------------- the phantom runs


@dataclass
class Runs:
    bids: Path
    reference: Path
    graph: Path
    graph_first: Path
    graph_status: int
    graph_jobs: list[Submission]
    rerun_status: int
    rerun_jobs: list[Submission]
    rerun_nodes: list[dict[str, Any]]


def _latest_provenance(out: Path) -> dict[str, Any]:
    logs = (out / "smoulder" / "logs").glob("provenance-*.json")
    return json.loads(max(logs, key=lambda p: p.stat().st_mtime_ns).read_text())


@pytest.fixture(scope="module")
def runs(cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("slurm_runs")
    bids = generate_dataset(root / "pristine", PHANTOM)
    settings = root / "settings.yaml"
    settings.write_text(SETTINGS)
    plugin = root / "plugin.json"
    args = {"sbatch_args": SBATCH_ARGS, "dont_resubmit_completed_jobs": True, "poll_s": 1}
    plugin.write_text(json.dumps({"plugin": "SLURMGraph", "plugin_args": args}))
    common = ["participant", "--fast", "--skip-data-check", "--config", str(settings)]
    reference = root / "multiproc"
    assert main([str(bids), str(reference), *common, "--nprocs", "2", "-w", str(root / "mw")]) == 0
    graph, work = root / "slurmgraph", root / "sw"
    graph_argv = [str(bids), str(graph), *common, "--plugin-config", str(plugin), "-w", str(work)]
    graph_status = main(graph_argv)
    # as this run left them: the rerun below rewrites the run-wide pages for sub-01 alone
    snapshot = shutil.copytree(graph, root / "slurmgraph-first-run")
    record = work / "smoulder_wf" / "batch" / slurm.SUBMISSIONS
    graph_jobs = slurm.read_submissions(record)
    # --force: sub-01 is complete and current, which batch mode would skip without a look
    rerun_status = main([*graph_argv, "--participant-label", "01", "--force"])
    rerun_jobs = slurm.read_submissions(record)
    rerun_nodes = _latest_provenance(graph)["nodes"]
    return Runs(
        bids, reference, graph, snapshot, graph_status, graph_jobs, rerun_status, rerun_jobs,
        rerun_nodes,
    )  # fmt: skip


#: What differs between two runs of the same data by design, and is left out of the
#: comparison: ``logs/`` (each run's id, command, log, timings and provenance) and
#: ``report.html`` (the run report: run id and step timings). A run holds no other clock.
RUN_RECORDS = ("logs/", "report.html")
#: Keys of a subject's fingerprint that name the run that wrote it and when.
FINGERPRINT_RUN_KEYS = ("run", "written")


def outputs(root: Path, prefix: str = "") -> set[str]:
    """Return the files under ``root/smoulder`` (POSIX, relative) but the run records."""
    base = root / "smoulder"
    names = {p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()}
    return {n for n in names if n.startswith(prefix) and not n.startswith(RUN_RECORDS)}


def assert_same_outputs(a: Path, b: Path, names: set[str]) -> None:
    """Images equal within 1e-4 (same grid), fingerprints equal but for the run, the rest
    byte for byte (lesion tables, sidecars, transforms, QA pages)."""
    for name in sorted(names):
        x, y = a / "smoulder" / name, b / "smoulder" / name
        if name.endswith((".nii", ".nii.gz")):
            ix, iy = nib.Nifti1Image.from_filename(x), nib.Nifti1Image.from_filename(y)
            assert ix.shape == iy.shape and np.allclose(ix.affine, iy.affine, atol=1e-6), name
            dx, dy = np.asarray(ix.dataobj), np.asarray(iy.dataobj)
            assert np.allclose(dx, dy, atol=1e-4, rtol=0, equal_nan=True), name
        elif name.endswith("_fingerprint.json"):
            fx, fy = (json.loads(p.read_text()) for p in (x, y))
            for key in FINGERPRINT_RUN_KEYS:
                fx.pop(key), fy.pop(key)
            assert fx == fy, name
        else:
            assert x.read_bytes() == y.read_bytes(), name


@pytest.mark.slow
def test_slurmgraph_runs_every_node_as_a_job(runs: Runs) -> None:
    assert runs.graph_status == 0
    record = _latest_provenance(runs.graph_first)
    assert record["plugin"] == "SLURMGraph"
    assert {n["status"] for n in record["nodes"]} == {"ran"}
    ids = [s.job_id for s in runs.graph_jobs]
    assert len(ids) >= 50 and all(ids)
    states = slurm.accounted_states([str(i) for i in ids])
    assert set(states) == set(ids) and set(states.values()) == {"COMPLETED"}


@pytest.mark.slow
def test_slurmgraph_outputs_equal_multiproc(runs: Runs) -> None:
    names = outputs(runs.reference)
    assert any(n.endswith("_desc-lesions_stats.tsv") for n in names)
    assert any(n.endswith("_desc-lesions_longitudinal.tsv") for n in names)
    assert outputs(runs.graph_first) == names
    assert_same_outputs(runs.reference, runs.graph_first, names)


@pytest.mark.slow
def test_slurmgraph_rerun_resumes_from_the_work_directory(runs: Runs) -> None:
    """Only the output nodes (``ds_*``, always run by Nipype) are submitted again."""
    assert runs.rerun_status == 0
    assert runs.rerun_jobs and all(s.job_id for s in runs.rerun_jobs)
    assert {s.name.split("_", 1)[1].startswith("ds_") for s in runs.rerun_jobs} == {True}
    steps = [n for n in runs.rerun_nodes if n["kind"] == "step"]
    assert steps and {n["status"] for n in steps} == {"cached"}
    assert {n["subject"] for n in runs.rerun_nodes} == {"01"}


@pytest.mark.slow
def test_one_array_task_per_participant_still_to_do(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = runs.graph
    tables = sorted((out / "smoulder" / "sub-02").rglob("*_desc-lesions_stats.tsv"))
    gone = tables[0]
    gone.unlink()  # sub-02 is no longer complete; sub-01 is, and current
    argv = [str(runs.bids), str(out), "participant", "--fast", "--skip-data-check"]
    argv += ["--config", str(runs.graph.parent / "settings.yaml"), "-w", str(tmp_path / "w")]
    argv += ["--slurm-array", "--sbatch-args=--cpus-per-task=2 --mem=4G", "--submit"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "sub-01: outputs complete and current, left out" in printed
    job = re.search(r"submitted job array (\d+)", printed)
    assert job, printed
    folder = max((out / "smoulder" / "logs").glob("slurm-array-*"))
    assert (folder / "participants.txt").read_text() == "02\n"
    assert "--array=1-1" in (folder / "array.sh").read_text()
    slurm.wait_for_jobs([job.group(1)], timeout_s=1500, poll_s=2, report=None)
    assert accounted(job.group(1)) == {f"{job.group(1)}_1": "COMPLETED"}
    log = (folder / f"task-{job.group(1)}_1.log").read_text()
    assert "sub-02" in log and (tmp_path / "w" / "sub-02").is_dir()
    assert gone.is_file()
    assert_same_outputs(runs.reference, out, outputs(runs.reference, "sub-02/"))
    # everything is complete now: nothing to submit
    assert main(argv) == 0
    assert "nothing to submit" in capsys.readouterr().out
