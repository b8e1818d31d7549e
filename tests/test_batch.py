"""Batch mode for archives: label files, locks, fingerprints and the run summary.

The end-to-end runs share one phantom (2 subjects x 1 session at 4 mm) and one output folder.
Segmentation, QSM and co-registration are off, so a run only conforms the FLAIRs: these runs
test the bookkeeping around the workflow, not the workflow. In order:

1. ``--participant-label @labels.txt``, sub-02's FLAIR truncated: sub-01 finishes, sub-02
   fails and is listed as failed; no lock is left behind;
2. the file restored, the same command: sub-01 is skipped (complete and current), sub-02 runs;
3. the same command while another process holds sub-01's lock and a dead process left one on
   sub-02: sub-01 is locked (its holder named), sub-02's lock is taken over and it is skipped;
4. a setting changed: both run again; 5. ``--force``: both run again although current.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from smoulder.cli import main
from smoulder.errors import InputError
from smoulder.inputs import SessionInputs
from smoulder.phantom.dataset import generate_dataset
from smoulder.phantom.generate import PhantomConfig
from smoulder.pipelines.batch import (
    SUMMARY_COLUMNS,
    expand_labels,
    fingerprint_path,
    read_label_file,
    save_fingerprint,
    subject_state,
    why_rerun,
    with_hashes,
)
from smoulder.pipelines.locks import LockHolder, acquire, read_holder
from tests.conftest import Capture

BATCH_PHANTOM = PhantomConfig(subjects=2, sessions=1, resolution_mm=4.0, lesions=4, seed=5)
BROKEN = "sub-02/ses-01/anat/sub-02_ses-01_FLAIR.nii.gz"
#: Only the FLAIR's conforming runs: the bookkeeping is under test, not the steps.
SETTINGS = (
    "registration:\n  session:\n    modalities: []\n"
    "segmentation:\n  enabled: false\nqsm:\n  enabled: false\n"
)
#: A process that holds the lock named on its command line until SIGTERM.
HOLD = """
import sys, time
from pathlib import Path
from smoulder.pipelines.locks import acquire, terminate_as_exit
with terminate_as_exit():
    attempt = acquire(Path(sys.argv[1]), command="lock holder of the test")
    try:
        print("held" if attempt.lock else "busy", flush=True)
        time.sleep(300)
    finally:
        if attempt.lock:
            attempt.lock.release()
"""


@pytest.mark.parametrize("module", ["batch", "locks"])
def test_doctests(module: str) -> None:
    """``pipelines/`` lies outside ``src/``, so ``--doctest-modules src`` does not reach it."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"smoulder.pipelines.{module}"))
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    ("text", "labels"),
    [
        ("01\n02\n", ["01", "02"]),
        ("sub-01\n\n  sub-02  \n", ["01", "02"]),
        ("# cohort A\n01  # rescanned\n#02\n03\n01\n", ["01", "03"]),
    ],
)
def test_label_file_lists_one_label_per_line(tmp_path: Path, text: str, labels: list[str]) -> None:
    path = tmp_path / "labels.txt"
    path.write_text(text)
    assert read_label_file(path) == labels
    assert expand_labels([f"@{path}"]) == labels
    assert expand_labels(["sub-09", str(path)]) == ["sub-09", *labels]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "found no label"),
        ("# only a comment\n\n", "found no label"),
        ("01\nsub-02 03\n", "found 'sub-02 03' on line 2"),
        ("01\nsub_02\n", "found 'sub_02' on line 2"),
    ],
)
def test_bad_label_file_is_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "labels.txt"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as caught:
        expand_labels([f"@{path}"])
    assert str(path) in str(caught.value)


def test_missing_or_unreadable_label_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="readable text file.*No such file") as caught:
        expand_labels([f"@{tmp_path / 'absent.txt'}"])
    assert "absent.txt" in str(caught.value)
    with pytest.raises(InputError, match="neither a label nor an existing file"):
        expand_labels([str(tmp_path / "absent.txt")])
    with pytest.raises(InputError, match="readable text file"):
        expand_labels([f"@{tmp_path}"])  # a folder
    binary = tmp_path / "labels.bin"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match="labels.bin"):
        expand_labels([str(binary)])


def test_a_label_is_a_label_even_when_a_file_has_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "01").write_text("02\n")
    assert expand_labels(["01"]) == ["01"]
    assert expand_labels(["@01"]) == ["02"]


# -------------------------------------------------------------------------------- locks


def test_a_lock_is_taken_once_and_released_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / ".locks" / "sub-01.lock"
    first = acquire(path, command="first run")
    assert first.lock is not None and first.replaced is None
    second = acquire(path, command="second run")  # this process runs: its lock holds
    assert second.lock is None and second.holder == first.lock.holder
    text = second.holder.describe()
    assert f"host {socket.gethostname()}, process {os.getpid()} (first run), since " in text
    intruder = LockHolder(socket.gethostname(), os.getpid(), "now", token="other")
    path.write_text(json.dumps(intruder.__dict__))  # as if another run had taken it over
    first.lock.release()
    assert read_holder(path) == intruder  # not ours any more: left alone
    path.unlink()
    third = acquire(path)
    assert third.lock is not None
    third.lock.release()
    assert not path.exists()


def _dead_pid() -> int:
    """Return the process id of a process that has ended."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)


def _write_lock(path: Path, holder: LockHolder, *, age_s: float = 0.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(holder.__dict__))
    then = time.time() - age_s
    os.utime(path, (then, then))


def _holder(kind: str) -> LockHolder:
    """Return a lock's holder: of this host (a dead process, this one, this process id with
    another start time: a reused id) or of another host."""
    here, then = socket.gethostname(), "2026-01-01T00:00:00+00:00"
    return {
        "dead": LockHolder(here, _dead_pid(), then),
        "running": LockHolder(here, os.getpid(), then),
        "reused pid": LockHolder(here, os.getpid(), then, process_start=1),
        "other host": LockHolder("elsewhere", 1, then),
    }[kind]


@pytest.mark.parametrize(
    ("kind", "age_s", "stale"),
    [
        ("dead", 0, True),
        ("running", 1e6, False),  # this host: age does not matter, the process runs
        ("reused pid", 0, True),
        ("other host", 3600, False),  # another host: by age
        ("other host", 49 * 3600, True),
    ],
)
def test_stale_locks_are_taken_over(tmp_path: Path, kind: str, age_s: float, stale: bool) -> None:
    holder = _holder(kind)
    path = tmp_path / "sub-01.lock"
    _write_lock(path, holder, age_s=age_s)
    attempt = acquire(path, max_age_h=48)
    assert (attempt.lock is not None) == stale
    if stale:
        assert attempt.lock is not None and attempt.replaced is not None
        assert attempt.replaced[0] == holder
        expected = "h ago on host elsewhere" if kind == "other host" else f"process {holder.pid}"
        assert expected in attempt.replaced[1]
        assert read_holder(path) == attempt.lock.holder
    else:
        assert attempt.holder == holder and read_holder(path) == holder


def test_an_empty_lock_file_is_held_until_it_is_old(tmp_path: Path) -> None:
    path = tmp_path / "sub-01.lock"
    path.write_text("")  # a run between creating and writing it, or killed then
    attempt = acquire(path)
    assert attempt.lock is None and attempt.holder is None
    old = time.time() - 3600
    os.utime(path, (old, old))
    attempt = acquire(path)
    assert attempt.lock is not None and "empty or unreadable" in attempt.replaced[1]


def test_a_lock_held_by_another_process_is_released_on_sigterm(tmp_path: Path) -> None:
    path = tmp_path / "sub-01.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        attempt = acquire(path)
        assert attempt.lock is None and attempt.holder is not None
        assert attempt.holder.pid == holder.pid and "lock holder" in attempt.holder.describe()
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        holder.kill()
        holder.wait()
    assert not path.exists()  # released on the way out, not left to go stale
    assert acquire(path).lock is not None


# -------------------------------------------------------------------------- fingerprints


def test_fingerprint_notices_what_changes_the_outputs(tmp_path: Path) -> None:
    bids, root = tmp_path / "bids", tmp_path / "out" / "smoulder"
    flair = bids / "sub-01" / "anat" / "sub-01_FLAIR.nii.gz"
    flair.parent.mkdir(parents=True)
    flair.write_bytes(b"0123456789")
    output = root / "sub-01" / "anat" / "sub-01_desc-preproc_FLAIR.nii.gz"
    output.parent.mkdir(parents=True)
    output.write_bytes(b"out")
    session = SessionInputs("01", flair=flair, metadata={str(flair): {"RepetitionTime": 5.0}})

    def state(**changes: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"configuration_sha256": "c1", "models": {"seg": "1.0"}}
        kwargs |= {"smoulder_version": "0.1"} | changes
        return subject_state([session], bids_dir=bids, **kwargs)

    path = fingerprint_path(root, "01")
    hashed = with_hashes(state(), bids_dir=bids)
    save_fingerprint(path, hashed, outputs=[str(output.relative_to(root))], run="r")
    saved = json.loads(path.read_text())
    assert saved["inputs"][0]["path"] == "sub-01/anat/sub-01_FLAIR.nii.gz"

    def why(**changes: Any) -> str | None:
        return why_rerun(saved, state(**changes), bids_dir=bids, root=root)

    assert why() is None
    assert why(configuration_sha256="c2") == "the configuration changed"
    assert why(models={"seg": "1.1"}) == "models seg 1.0 then, seg 1.1 now"
    assert why(smoulder_version="0.2") == "smoulder 0.1 then, 0.2 now"
    os.utime(flair, (1e9, 1e9))  # copied without its times: same content, still current
    assert why() is None
    flair.write_bytes(b"0123456780")  # same size, new content
    assert why() == "input sub-01/anat/sub-01_FLAIR.nii.gz changed (content)"
    flair.write_bytes(b"01234")
    assert "changed (size 10 then, 5 now)" in str(why())
    flair.write_bytes(b"0123456789")
    session.metadata[str(flair)]["RepetitionTime"] = 6.0
    assert why() == "the sidecar metadata of an input changed"
    session.metadata[str(flair)]["RepetitionTime"] = 5.0
    output.unlink()
    assert why() == "output sub-01/anat/sub-01_desc-preproc_FLAIR.nii.gz is missing"
    assert why_rerun(None, state(), bids_dir=bids, root=root) == "no record of a finished run"


# ------------------------------------------------------------------------ end to end


@dataclass
class Run:
    status: int
    out: str
    summary: list[dict[str, str]]
    nodes: dict[str, str]
    fingerprints: list[str]  # the subjects with one after the run
    locks: list[str]  # the lock files left after the run
    report: str  # report.html after the run


@dataclass
class Runs:
    root: Path
    out: Path
    crashed: Run
    resumed: Run
    locked: Run
    changed: Run
    forced: Run
    holder_pid: int
    dead_pid: int


def _run(argv: list[str], out: Path, capsys: Any) -> Run:
    before = set((out / "smoulder" / "logs").glob("summary-*.tsv"))
    status = main(argv)
    printed = capsys.readouterr()
    (summary,) = set((out / "smoulder" / "logs").glob("summary-*.tsv")) - before
    with summary.open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    provenance = max(
        (out / "smoulder" / "logs").glob("provenance-*.json"), key=lambda p: p.stat().st_mtime_ns
    )
    nodes = {n["node"]: n["status"] for n in json.loads(provenance.read_text()).get("nodes", [])}
    smoulder = out / "smoulder"
    fingerprints = sorted(p.parent.name for p in smoulder.glob("sub-*/*_fingerprint.json"))
    locks = sorted(p.name for p in (smoulder / ".locks").iterdir())
    report = (smoulder / "report.html").read_text()
    return Run(status, printed.out + printed.err, rows, nodes, fingerprints, locks, report)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("batch")
    pristine = generate_dataset(root / "pristine", BATCH_PHANTOM)
    bids = root / "bids"
    shutil.copytree(pristine, bids, ignore=shutil.ignore_patterns("derivatives"))
    broken = bids / BROKEN
    raw = gzip.decompress(broken.read_bytes())
    broken.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    settings = root / "settings.yaml"
    settings.write_text(SETTINGS)
    labels = root / "labels.txt"
    labels.write_text("# the cohort\nsub-01\n\n02  # the broken one\n")
    out = root / "out"
    argv = [str(bids), str(out), "participant", "--fast", "--nprocs", "2", "--skip-data-check"]
    argv += ["-w", str(root / "work"), "--config", str(settings)]
    argv += ["--participant-label", f"@{labels}"]
    locks = out / "smoulder" / ".locks"
    with pytest.MonkeyPatch.context() as mp:
        capture = Capture()
        mp.setattr("sys.stdout", capture.out)
        mp.setattr("sys.stderr", capture.err)
        crashed = _run([*argv, "--resource-monitor"], out, capture)
        shutil.copyfile(pristine / BROKEN, broken)
        resumed = _run(argv, out, capture)
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(locks / "sub-01.lock")],
            stdout=subprocess.PIPE,
            text=True,
        )
        dead = _dead_pid()
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            _write_lock(locks / "sub-02.lock", LockHolder(socket.gethostname(), dead, "then"))
            locked = _run(argv, out, capture)
        finally:
            holder.terminate()
            holder.wait(timeout=30)
        settings.write_text(SETTINGS + "atrophy:\n  standard_icv_ml: 1400.0\n")
        changed = _run(argv, out, capture)
        forced = _run([*argv, "--force"], out, capture)
    return Runs(root, out, crashed, resumed, locked, changed, forced, holder.pid, dead)


def _status(run: Run) -> dict[str, tuple[str, str]]:
    return {r["participant"]: (r["status"], r["error"]) for r in run.summary}


@pytest.mark.slow  # the five runs of the module's fixture: about 45 s on 2 cores
def test_a_failing_subject_does_not_stop_the_others(runs: Runs) -> None:
    run = runs.crashed
    assert run.status == 1
    assert [(r["participant"], r["session"]) for r in run.summary] == [
        ("sub-01", "ses-01"),
        ("sub-02", "ses-01"),
    ]
    status = _status(run)
    assert status["sub-01"] == ("done", "n/a")
    assert status["sub-02"][0] == "failed"
    assert "step conform_flair: InputError" in status["sub-02"][1]
    assert "sub-02_ses-01_FLAIR.nii.gz" in status["sub-02"][1]
    done = run.summary[0]
    assert float(done["duration_s"]) > 0 and float(done["peak_memory_mb"]) > 10  # monitored
    # the finished subject has its fingerprint, the failed one none; no lock is left behind
    assert run.fingerprints == ["sub-01"] and run.locks == []
    logs = runs.out / "smoulder" / "logs"
    dictionaries = [json.loads(p.read_text()) for p in logs.glob("summary-*.json")]
    assert dictionaries and all(set(d) == set(SUMMARY_COLUMNS) for d in dictionaries)


@pytest.mark.slow  # the five runs of the module's fixture: about 45 s on 2 cores
def test_a_second_run_skips_what_is_complete_and_current(runs: Runs) -> None:
    run = runs.resumed
    assert run.status == 0, run.out
    status = _status(run)
    assert status["sub-01"][0] == "skipped" and "complete and current" in status["sub-01"][1]
    assert status["sub-02"] == ("done", "n/a")
    assert "sub-01: skipped: outputs complete and current" in run.out
    assert run.nodes and not any(n.startswith("sub_01_wf") for n in run.nodes)  # not built
    assert run.summary[0]["duration_s"] == run.summary[0]["peak_memory_mb"] == "n/a"
    assert run.fingerprints == ["sub-01", "sub-02"] and run.locks == []


@pytest.mark.slow  # the five runs of the module's fixture: about 45 s on 2 cores
def test_a_locked_subject_is_left_to_its_run_and_a_stale_lock_taken_over(runs: Runs) -> None:
    run = runs.locked
    assert run.status == 0, run.out
    status = _status(run)
    assert status["sub-01"][0] == "locked"
    holder = f"host {socket.gethostname()}, process {runs.holder_pid} (lock holder of the test)"
    assert holder in status["sub-01"][1] and f"sub-01: locked: held by another run: {holder}" in (
        run.out
    )
    assert f"sub-02: stale lock taken over (process {runs.dead_pid} on host" in run.out
    assert status["sub-02"][0] == "skipped"
    assert not run.nodes  # nothing to run
    # so report.html still shows the run that did the work; this one's page is under logs/
    assert run.report == runs.resumed.report
    assert len(list((runs.out / "smoulder" / "logs").glob("report-*.html"))) == 5
    assert run.locks == ["sub-01.lock"]  # the other process's, left alone; sub-02's released
    assert runs.changed.locks == []  # the other process released its own at SIGTERM


@pytest.mark.slow  # the five runs of the module's fixture: about 45 s on 2 cores
def test_a_changed_setting_or_force_runs_again(runs: Runs) -> None:
    for run in (runs.changed, runs.forced):
        assert run.status == 0, run.out
        assert {s for s, _ in _status(run).values()} == {"done"}
        assert {n for n, status in run.nodes.items() if "conform" in n} == {
            "sub_01_wf.ses_01_wf.conform_flair",
            "sub_02_wf.ses_01_wf.conform_flair",
        }
    assert "sub-01: running again: the configuration changed" in runs.changed.out
    assert "sub-02: running again: --force" in runs.forced.out
