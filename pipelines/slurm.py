"""Slurm: waiting for the jobs of Nipype's ``SLURMGraph`` plugin; one array task per participant.

Nipype's ``SLURMGraph`` plugin writes one batch script per node and a ``submit_jobs.sh`` that
submits them all with ``sbatch --dependency=afterok:...``, runs it and returns at once: it does
not wait for the jobs, keeps their ids in shell variables of that script, and discards what
``sbatch`` printed, so a refused submission (no ``SLURM_CONF``, too much memory asked) still
looks like a success. smoulder reads the nodes' results only once they exist, so for this plugin
:func:`recording_sbatch` puts a small ``sbatch`` in front of the real one while the plugin
submits (it records each submission's job id or error), and :func:`wait_for_graph` checks the
submissions and polls ``squeue`` until every job has ended. A node whose job ended badly
without leaving a result (killed for memory or time) is marked failed by
:func:`mark_failed_jobs`; a job cancelled because a job it needed failed is left "not run",
as MultiProc leaves the steps downstream of a failure.

A rerun with the same work directory resumes: with ``dont_resubmit_completed_jobs`` the plugin
submits only the nodes that have not finished, and the output nodes (``ds_*``: Nipype always
runs a derivatives sink), each a job of a few seconds that copies files; nothing is waited for
when nothing was submitted.

The participant level can instead run as a job array (``--slurm-array``,
:func:`participant_array`): one task per participant whose outputs are not complete and current
(:func:`participants_to_do`, batch mode's test), each a plain MultiProc run of that participant
with its own work directory. :func:`array_script` writes the script, :func:`submit_script`
submits it.

Settings of the wait, read from ``execution.plugin_args`` (Nipype ignores them):
``wait_timeout_s`` (default: no limit) and ``poll_s`` (default 5 s).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smoulder.errors import ExpectedFoundError

#: The file of ``sbatch`` answers :func:`recording_sbatch` keeps in the batch folder.
SUBMISSIONS = "sbatch-submissions.jsonl"
#: States of a job that has ended (``squeue``/``sacct``; ``CANCELLED by 0`` is cut to its word).
ENDED = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "OUT_OF_MEMORY",
        "NODE_FAIL",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
    }
)
#: Ended states that mean the job itself went wrong (not merely cancelled before it ran).
BAD = ENDED - {"COMPLETED", "CANCELLED"}
#: What ``squeue`` gives as the reason of a job whose ``afterok`` dependency can never be met.
NEVER = "DependencyNeverSatisfied"
_LINE = re.compile(r"^(?P<name>\w+)=\$\(sbatch .* -J (?P=name) (?P<script>\S+) \|")
_SUBMITTED = re.compile(r"Submitted batch job (\d+)")


class SlurmError(ExpectedFoundError):
    """Slurm refused or lost work: which command or job, what was expected, what was found.

    Examples:
        >>> str(SlurmError("sbatch", expected="a job id", found="nothing", hint="SLURM_CONF?"))
        'sbatch: expected a job id, found nothing; SLURM_CONF?'
    """


# ------------------------------------------------------------------------ SLURMGraph: submitting


@dataclass(frozen=True)
class Submission:
    """One ``sbatch`` call of the plugin: the job's name and script, and what sbatch answered.

    Attributes:
        name: the job's name (``-J``), e.g. ``j3_coreg_t1w``.
        script: the batch script submitted.
        job_id: the id Slurm gave it (``None``: refused).
        returncode: sbatch's exit status.
        message: what sbatch printed on its error stream.
    """

    name: str
    script: str
    job_id: str | None
    returncode: int
    message: str


def recorder_text(sbatch: str, record: Path, *, python: str = sys.executable) -> str:
    """Return a Python script that runs ``sbatch`` with its arguments and appends the answer
    (arguments, exit status, output, errors) as one JSON line to ``record``.

    Its own output and exit status are sbatch's, so ``submit_jobs.sh`` reads job ids as before.
    """
    return f"""#!{python}
# Written by smoulder (smoulder.pipelines.slurm): records what sbatch answers to Nipype's
# SLURMGraph plugin, which keeps neither the job ids nor sbatch's errors.
import json, subprocess, sys
done = subprocess.run([{sbatch!r}, *sys.argv[1:]], capture_output=True, text=True)
with open({str(record)!r}, "a") as record:
    answer = {{"argv": sys.argv[1:], "returncode": done.returncode,
              "stdout": done.stdout, "stderr": done.stderr}}
    record.write(json.dumps(answer) + "\\n")
sys.stdout.write(done.stdout)
sys.stderr.write(done.stderr)
sys.exit(done.returncode)
"""


@contextmanager
def recording_sbatch(batch_dir: Path) -> Iterator[Path]:
    """Put a recording ``sbatch`` first on ``PATH`` for the block; yield its record file.

    The record (``batch_dir/sbatch-submissions.jsonl``) starts empty; ``PATH`` is restored
    afterwards.

    Raises:
        SlurmError: there is no ``sbatch`` on ``PATH``.
    """
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SlurmError(
            "plugin SLURMGraph",
            expected="Slurm's sbatch on PATH",
            found="no sbatch",
            hint="run on a Slurm submit host, or choose another plugin (--plugin-config)",
        )
    folder = batch_dir / ".sbatch"
    folder.mkdir(parents=True, exist_ok=True)
    record = batch_dir / SUBMISSIONS
    record.write_text("")
    shim = folder / "sbatch"
    shim.write_text(recorder_text(sbatch, record))
    shim.chmod(0o755)
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{folder}{os.pathsep}{saved}"
    try:
        yield record
    finally:
        os.environ["PATH"] = saved


def planned_jobs(submit_script: Path) -> dict[str, str]:
    """Return ``{job name: batch script}`` of the ``sbatch`` lines of Nipype's ``submit_jobs.sh``.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "submit_jobs.sh"
        >>> _ = path.write_text("#!/usr/bin/env bash\\n"
        ...     "j0_a=$(sbatch -o x.o -e x.e  --mem=1G -J j0_a /b/batchscript_a.sh | awk '')\\n")
        >>> planned_jobs(path)
        {'j0_a': '/b/batchscript_a.sh'}
    """
    jobs = {}
    for line in submit_script.read_text().splitlines():
        found = _LINE.match(line)
        if found:
            jobs[found["name"]] = found["script"]
    return jobs


def read_submissions(record: Path) -> list[Submission]:
    """Return the submissions in a record of :func:`recording_sbatch`, in order."""
    out = []
    for line in record.read_text().splitlines():
        if not line.strip():
            continue
        answer = json.loads(line)
        argv = answer["argv"]
        name = argv[argv.index("-J") + 1] if "-J" in argv else "?"
        found = _SUBMITTED.search(answer["stdout"])
        out.append(
            Submission(
                name=name,
                script=argv[-1] if argv else "?",
                job_id=found.group(1) if found and answer["returncode"] == 0 else None,
                returncode=int(answer["returncode"]),
                message=answer["stderr"].strip(),
            )
        )
    return out


def check_submissions(
    planned: dict[str, str], submitted: Sequence[Submission], *, submit_script: Path
) -> list[Submission]:
    """Return the submissions once every planned job was queued.

    Raises:
        SlurmError: a submission was refused (its message is sbatch's), or fewer jobs were
            queued than ``submit_jobs.sh`` submits.
    """
    refused = [s for s in submitted if s.job_id is None]
    if refused:
        first = refused[0]
        raise SlurmError(
            f"sbatch of job {first.name} ({first.script})",
            expected="'Submitted batch job <id>'",
            found=f"exit status {first.returncode}: {_one_line(first.message) or 'no message'}",
            hint=f"{len(refused)} of {len(planned)} submissions refused; check sbatch_args "
            "and SLURM_CONF, then rerun",
        )
    if len(submitted) < len(planned):
        raise SlurmError(
            str(submit_script),
            expected=f"{len(planned)} jobs queued",
            found=f"{len(submitted)}",
            hint="see sbatch's messages in the run log",
        )
    return list(submitted)


def _one_line(text: str) -> str:
    """Return the lines of ``text`` joined with `` | `` (messages are one line).

    Examples:
        >>> _one_line("sbatch: error: a\\nsbatch: error: b\\n")
        'sbatch: error: a | sbatch: error: b'
    """
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


# ------------------------------------------------------------------------ SLURMGraph: waiting


def parse_squeue(text: str) -> dict[str, tuple[str, str]]:
    """Return ``{job id: (state, reason)}`` from ``squeue -h -o '%i|%T|%r'``.

    Examples:
        >>> parse_squeue("12|RUNNING|None\\n13|PENDING|Dependency\\n")
        {'12': ('RUNNING', 'None'), '13': ('PENDING', 'Dependency')}
    """
    out = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 3:
            out[parts[0]] = (parts[1], parts[2])
    return out


def parse_sacct(text: str) -> dict[str, str]:
    """Return ``{job id: state}`` from ``sacct -n -P -X -o JobID,State`` (``CANCELLED by 0``:
    ``CANCELLED``).

    Examples:
        >>> parse_sacct("12|COMPLETED\\n13|CANCELLED by 0\\n14_1|FAILED\\n")
        {'12': 'COMPLETED', '13': 'CANCELLED', '14_1': 'FAILED'}
    """
    out = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 2 and parts[0]:
            out[parts[0]] = parts[1].split()[0] if parts[1] else "UNKNOWN"
    return out


def queue_states(job_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Return ``{job id: (state, reason)}`` of the jobs the controller still knows (ended ones
    stay known for its ``MinJobAge``, 300 s by default).

    Raises:
        SlurmError: squeue failed for another reason than all the jobs being gone.
    """
    cmd = ["squeue", "-h", "--states=all", "-o", "%i|%T|%r", "-j", ",".join(job_ids)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        if "Invalid job id" in done.stderr:
            return {}  # every one of them has left the controller's memory
        raise SlurmError(
            " ".join(cmd[:5]), expected="the jobs' states", found=done.stderr.strip() or "nothing"
        )
    return parse_squeue(done.stdout)


def accounted_states(job_ids: Sequence[str]) -> dict[str, str]:
    """Return ``{job id: state}`` from Slurm's accounting (empty where it is disabled)."""
    cmd = ["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(job_ids)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return {}
    return parse_sacct(done.stdout) if done.returncode == 0 else {}


def cancel(job_ids: Sequence[str]) -> None:
    """Cancel ``job_ids`` (jobs this run submitted that must not run or can never run)."""
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, check=False)


def job_state(job: str, states: dict[str, tuple[str, str]]) -> tuple[str, str] | None:
    """Return ``(state, reason)`` of ``job`` in :func:`parse_squeue`'s answer (``None``: not
    there). A job array's tasks (``12_1``, ``12_[2-4]``) merge: running before pending before
    ended; once all ended, the first that did not complete, else ``COMPLETED``.

    Examples:
        >>> job_state("12", {"12_1": ("COMPLETED", "None"), "12_[2-3]": ("PENDING", "None")})
        ('PENDING', 'None')
        >>> job_state("12", {"12_1": ("COMPLETED", "None"), "12_2": ("FAILED", "NonZeroExitCode")})
        ('FAILED', 'NonZeroExitCode')
    """
    mine = [v for k, v in states.items() if k == job or k.startswith(f"{job}_")]
    if not mine:
        return None
    active = [v for v in mine if v[0].split()[0] not in ENDED]
    if active:
        return min(active, key=lambda v: v[0] != "RUNNING")
    bad = [v for v in mine if v[0].split()[0] != "COMPLETED"]
    return (bad or mine)[0]


def wait_for_jobs(
    job_ids: Sequence[str],
    *,
    timeout_s: float | None = None,
    poll_s: float = 5.0,
    report: Callable[[str], None] | None = print,
    hint: str = "they go on running",
) -> dict[str, str]:
    """Return ``{job id: final state}`` once every job (or job array) has ended.

    Jobs left pending for a dependency that can never be met (a job they need failed, on a
    cluster without ``kill_invalid_depend``) are cancelled. A job gone from the queue before it
    was seen ending takes its state from accounting, else ``UNKNOWN``.

    Args:
        job_ids: the jobs.
        timeout_s: give up after this long (``None``: never).
        poll_s: seconds between two ``squeue`` calls.
        report: called with a line each time the counts of pending/running/ended jobs change.
        hint: what the time-limit error advises.

    Raises:
        SlurmError: jobs still queued after ``timeout_s``.
    """
    final: dict[str, str] = {}
    start = time.monotonic()
    shown = ""
    while True:
        waiting = [j for j in job_ids if j not in final]
        states = queue_states(waiting)
        now = {j: job_state(j, states) for j in waiting}
        for job, found in now.items():
            if found is None:
                final[job] = ""  # gone from the controller: state from accounting below
            elif found[0].split()[0] in ENDED:
                final[job] = found[0].split()[0]
        left = [j for j in job_ids if j not in final]
        if left and all(now[j] == ("PENDING", NEVER) for j in left):
            cancel(left)
            final.update({j: "CANCELLED" for j in left})
            left = []
        running = sum((now[j] or ("", ""))[0] == "RUNNING" for j in left)
        counts = (
            f"{len(job_ids)} jobs: {len(final)} ended, {running} running, "
            f"{len(left) - running} pending"
        )
        if report is not None and counts != shown:
            report(f"slurm: {counts} ({time.monotonic() - start:.0f} s)")
            shown = counts
        if not left:
            break
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise SlurmError(
                f"{len(left)} Slurm job(s) ({', '.join(left[:10])})",
                expected=f"ended within {timeout_s:g} s",
                found="still queued",
                hint=f"{hint} (squeue -j {','.join(left[:10])})",
            )
        time.sleep(poll_s)
    gone = [j for j, state in final.items() if not state]
    if gone:
        accounted = {k: (v, "") for k, v in accounted_states(gone).items()}
        for job in gone:
            found = job_state(job, accounted)
            final[job] = found[0] if found else "UNKNOWN"
    return final


@dataclass(frozen=True)
class GraphJob:
    """A job of a ``SLURMGraph`` run: its submission and the state it ended in."""

    submission: Submission
    state: str


def wait_for_graph(
    batch_dir: Path,
    record: Path,
    *,
    timeout_s: float | None = None,
    poll_s: float = 5.0,
    report: Callable[[str], None] | None = print,
) -> list[GraphJob]:
    """Return the jobs the plugin submitted, with their final state, once all have ended.

    Args:
        batch_dir: the plugin's folder (``<work dir>/<workflow>/batch``, with ``submit_jobs.sh``).
        record: the record of :func:`recording_sbatch`.
        timeout_s, poll_s, report: see :func:`wait_for_jobs`.

    Raises:
        SlurmError: a submission was refused (the jobs queued before it are cancelled: their
            dependencies are incomplete), fewer jobs were queued than planned, or they did not
            end within ``timeout_s``.
    """
    submit_script = batch_dir / "submit_jobs.sh"
    planned = planned_jobs(submit_script) if submit_script.is_file() else {}
    submitted = read_submissions(record)
    try:
        jobs = check_submissions(planned, submitted, submit_script=submit_script)
    except SlurmError:
        cancel([s.job_id for s in submitted if s.job_id])
        raise
    if not jobs:
        if report is not None:
            report("slurm: nothing to submit (every step had finished)")
        return []
    if report is not None:
        report(f"slurm: waiting for {len(jobs)} jobs ({jobs[0].job_id}-{jobs[-1].job_id})")
    ids = [s.job_id for s in jobs if s.job_id]
    states = wait_for_jobs(
        ids,
        timeout_s=timeout_s,
        poll_s=poll_s,
        report=report,
        hint="once they end, rerun the same command: it reuses what they computed",
    )
    return [GraphJob(s, states.get(s.job_id or "", "UNKNOWN")) for s in jobs]


def run_graph(
    wf: Any, plugin_args: dict[str, Any], *, report: Callable[[str], None] | None = print
) -> list[GraphJob]:
    """Return the jobs of ``wf`` run with ``SLURMGraph``, once they have all ended.

    Submits through :func:`recording_sbatch`, then :func:`wait_for_graph` with the
    ``wait_timeout_s`` and ``poll_s`` of ``plugin_args``.
    """
    batch_dir = Path(wf.base_dir).absolute() / wf.name / "batch"
    (batch_dir / "submit_jobs.sh").unlink(missing_ok=True)  # an earlier run's: not this one's
    with recording_sbatch(batch_dir) as record:
        wf.run(plugin="SLURMGraph", plugin_args=plugin_args)
    timeout = plugin_args.get("wait_timeout_s")
    return wait_for_graph(
        batch_dir,
        record,
        timeout_s=None if timeout is None else float(timeout),
        poll_s=float(plugin_args.get("poll_s", 5.0)),
        report=report,
    )


def mark_failed_jobs(records: Sequence[Any], jobs: Sequence[GraphJob], *, top: str) -> str | None:
    """Return a one-line summary of the jobs that ended badly (``None``: none did), once the
    nodes of those that left no result are marked failed.

    A node that raised an error already has its failure from its result file; a job killed by
    Slurm (memory, time, node) leaves none, so its record here says the job's state and the
    file its error stream went to.

    Args:
        records: the run's :class:`~smoulder.pipelines.execution.NodeRecord` list.
        jobs: from :func:`wait_for_graph`.
        top: the workflow's name (batch scripts are named ``..._<top>.<path>_<step>.sh``).
    """
    bad = [j for j in jobs if j.state in BAD]
    if not bad:
        return None
    by_script = {}
    for record in records:
        parent, _, step = record.node.rpartition(".")
        key = f"{top}.{parent}_{step}" if parent else f"{top}_{step}"
        by_script[key] = record
    for job in bad:
        name = Path(job.submission.script).name.removesuffix(".sh")
        record = next((r for k, r in by_script.items() if name.endswith(f"_{k}")), None)
        if record is None or record.status == "failed":
            continue
        record.status = "failed"
        record.error = (
            f"Slurm job {job.submission.job_id} ended {job.state} "
            f"(its errors: {job.submission.script}.e)"
        )
    names = ", ".join(f"{j.submission.job_id} {j.submission.name} {j.state}" for j in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    cancelled = sum(j.state == "CANCELLED" for j in jobs)
    after = f"; {cancelled} cancelled (a job they needed failed)" if cancelled else ""
    return f"{len(bad)} Slurm job(s) failed: {names}{more}{after}"


# ------------------------------------------------------------------------ one job per participant


def participants_to_do(
    cfg: Any,
    checked: Sequence[Any],
    *,
    output_dir: Path,
    bids_dir: Path,
    models: dict[str, str],
    force: bool = False,
    report: Callable[[str], None] | None = print,
) -> list[str]:
    """Return the labels (without ``sub-``) of the subjects whose outputs are not complete and
    current, the test batch mode applies before running a subject
    (:func:`smoulder.pipelines.batch.why_rerun` on its fingerprint).

    Args:
        cfg: the resolved configuration.
        checked: the selected sessions, checked (:func:`smoulder.inputs.validate_session`).
        output_dir: the BIDS-App output folder.
        bids_dir: the input dataset.
        models: name → version of every model the run uses.
        force: every subject is to do.
        report: called with a line per subject left out, and per subject with a fingerprint
            that runs again, saying why.
    """
    from smoulder import __version__
    from smoulder.pipelines.batch import (
        digest,
        fingerprint_path,
        output_configuration,
        read_fingerprint,
        subject_state,
        why_rerun,
    )
    from smoulder.registration.engines import resolve_engine

    engine, device = resolve_engine(cfg.registration.engine, cfg.execution.device)
    config_sha256 = digest(output_configuration(cfg, engine=engine, device=device))
    root = Path(output_dir).absolute() / "smoulder"
    todo = []
    for subject in sorted({s.subject for s in checked}):
        sessions = [s for s in checked if s.subject == subject]
        state = subject_state(
            sessions,
            bids_dir=bids_dir,
            configuration_sha256=config_sha256,
            models=models,
            smoulder_version=__version__,
        )
        saved = read_fingerprint(fingerprint_path(root, subject))
        reason = why_rerun(saved, state, bids_dir=Path(bids_dir), root=root)
        if force or reason is not None or any(s.errors for s in sessions):
            todo.append(subject)
            if saved is not None and report is not None:
                report(f"sub-{subject}: to do again: {'--force' if force else reason}")
        elif report is not None:
            report(f"sub-{subject}: outputs complete and current, left out")
    return todo


#: Options left out of each task's command (flag: whether it takes a value): the array's own,
#: and those each task sets itself (its participant, its work directory).
NOT_FOR_TASKS = {
    "--slurm-array": False,
    "--submit": False,
    "--sbatch-args": True,
    "--participant-label": True,
    "--participant_label": True,
    "-w": True,
    "--work-dir": True,
}


def task_argv(argv: Sequence[str]) -> list[str]:
    """Return the participant command's arguments without the array's options and without the
    participant labels and work directory (each task gives its own).

    ``argv`` holds no program name. Labels take one or more values (up to the next option).

    Examples:
        >>> task_argv(["bids", "out", "participant", "--slurm-array", "--sbatch-args=--mem=2G",
        ...            "--participant-label", "01", "02", "--fast", "-w", "/w", "--submit"])
        ['bids', 'out', 'participant', '--fast']
    """
    drop = NOT_FOR_TASKS
    out: list[str] = []
    skipping = False
    many = False
    for token in argv:
        flag = token.split("=", 1)[0]
        if flag in drop:
            skipping = drop[flag] and "=" not in token
            many = flag.startswith("--participant")
            continue
        if skipping and not token.startswith("-"):
            skipping = many  # a label list goes on; other options take one value
            continue
        skipping = False
        out.append(token)
    return out


def array_script(
    *,
    argv: Sequence[str],
    participants_file: Path,
    count: int,
    work_dir: Path,
    log_dir: Path,
    sbatch_args: str = "",
    cwd: Path | None = None,
    python: str = sys.executable,
) -> str:
    """Return a Slurm job-array script: task ``i`` runs the participant level for the
    participant on line ``i`` of ``participants_file``, with MultiProc on the task's CPUs and
    its own work directory ``<work_dir>/sub-<label>``.

    Args:
        argv: the participant command's arguments (:func:`task_argv`: no labels, no work dir).
        participants_file: one label (without ``sub-``) per line.
        count: the number of participants (tasks ``1-count``).
        work_dir: the parent of the tasks' work directories.
        log_dir: where each task's output goes (``task-<array job>_<i>.log``).
        sbatch_args: written as an ``#SBATCH`` line (e.g. ``--cpus-per-task=2 --mem=8G``).
        cwd: the tasks' working directory (default: this one), so relative paths still hold.
        python: the interpreter that runs ``smoulder.cli``.

    Examples:
        >>> text = array_script(argv=["bids", "out", "participant"], count=2,
        ...     participants_file=Path("/o/p.txt"), work_dir=Path("/w"), log_dir=Path("/o"),
        ...     sbatch_args="--mem=2G", cwd=Path("/d"), python="/py")
        >>> print(text.split("set -euo pipefail", 1)[1].strip())  # doctest: +NORMALIZE_WHITESPACE
        label=$(sed -n "${SLURM_ARRAY_TASK_ID}p" /o/p.txt)
        exec /py -m smoulder.cli bids out participant --nprocs "${SLURM_CPUS_PER_TASK:-1}" \\
            --participant-label "$label" -w "/w/sub-$label"
        >>> [line for line in text.splitlines() if line.startswith("#SBATCH")][1:]
        ['#SBATCH --array=1-2', '#SBATCH --chdir=/d', '#SBATCH --output=/o/task-%A_%a.log', \
'#SBATCH --mem=2G']
    """
    args = [shlex.quote(a) for a in argv]
    if not any(a.split("=", 1)[0] == "--nprocs" for a in argv):
        args += ["--nprocs", '"${SLURM_CPUS_PER_TASK:-1}"']
    lines = [
        "#!/bin/bash",
        "#SBATCH --job-name=smoulder",
        f"#SBATCH --array=1-{count}",
        f"#SBATCH --chdir={Path(cwd or Path.cwd()).absolute()}",
        f"#SBATCH --output={log_dir / 'task-%A_%a.log'}",
    ]
    if sbatch_args.strip():
        lines.append(f"#SBATCH {sbatch_args.strip()}")
    lines += [
        "# Written by smoulder --slurm-array: one participant per task, MultiProc inside it.",
        "set -euo pipefail",
        f'label=$(sed -n "${{SLURM_ARRAY_TASK_ID}}p" {shlex.quote(str(participants_file))})',
        f"exec {shlex.quote(python)} -m smoulder.cli {' '.join(args)} \\",
        f'    --participant-label "$label" -w "{work_dir}/sub-$label"',
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ArrayJob:
    """A written job-array script, the participants it runs, and its job id once submitted."""

    script: Path
    participants_file: Path
    participants: list[str]
    job_id: str | None = None


def write_array_job(
    folder: Path,
    participants: Sequence[str],
    *,
    argv: Sequence[str],
    work_dir: Path,
    sbatch_args: str = "",
) -> ArrayJob:
    """Return the job-array script and participants list written in ``folder`` (which also
    receives the tasks' logs) for ``participants`` (labels without ``sub-``)."""
    folder.mkdir(parents=True, exist_ok=True)
    participants_file = folder / "participants.txt"
    participants_file.write_text("".join(f"{p}\n" for p in participants))
    script = folder / "array.sh"
    script.write_text(
        array_script(
            argv=task_argv(argv),
            participants_file=participants_file.absolute(),
            count=len(participants),
            work_dir=Path(work_dir).absolute(),
            log_dir=folder.absolute(),
            sbatch_args=sbatch_args,
        )
    )
    return ArrayJob(script, participants_file, list(participants))


def submit_script(script: Path) -> str:
    """Return the job id of ``script`` submitted with ``sbatch --parsable``.

    Raises:
        SlurmError: there is no sbatch, or it refused the script (its message is kept).
    """
    if shutil.which("sbatch") is None:
        raise SlurmError(
            "--submit", expected="Slurm's sbatch on PATH", found="no sbatch",
            hint=f"submit {script} from a Slurm submit host",
        )  # fmt: skip
    done = subprocess.run(
        ["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=False
    )
    job_id = done.stdout.strip().split(";")[0]
    if done.returncode != 0 or not job_id.isdigit():
        raise SlurmError(
            f"sbatch {script}",
            expected="a job id",
            found=f"exit status {done.returncode}: {done.stderr.strip() or done.stdout.strip()}",
        )
    return job_id


#: Plugins a task may run its participant with: within the task's own CPUs.
TASK_PLUGINS = ("MultiProc", "LegacyMultiProc", "Linear")


def participant_array(
    cfg: Any,
    *,
    bids_dir: Path,
    output_dir: Path,
    work_dir: Path | None,
    participant_labels: list[str] | None,
    session_labels: list[str] | None,
    argv: Sequence[str],
    models: dict[str, str],
    sbatch_args: str = "",
    submit: bool = False,
    force: bool = False,
) -> int:
    """Return 0 once the job array over the participants still to do is written (and, with
    ``submit``, submitted; its job id printed).

    The script, the participants list and the tasks' logs go to
    ``<output_dir>/smoulder/logs/slurm-array-<run>/``; each task works in
    ``<work_dir>/sub-<label>`` (default work dir: ``<output_dir>/work``).

    Args:
        cfg: the resolved configuration (its plugin must run within one task: MultiProc).
        bids_dir, output_dir, work_dir, participant_labels, session_labels: as for the
            participant level.
        argv: the participant command's arguments (no program name), repeated in each task.
        models: name → version of every model the run uses
            (:func:`smoulder.pipelines.execution.model_versions`).
        sbatch_args: options of every task (``--cpus-per-task=4 --mem=16G --time=4:00:00``).
        submit: submit the script with ``sbatch``.
        force: every selected participant is to do, complete or not.

    Raises:
        ConfigError: the configured plugin is not one a task runs in (a ``SLURM*`` plugin
            would submit jobs from within a job).
        SlurmError: ``sbatch`` is missing or refused the script.
    """
    from smoulder.derivatives import DerivativesWriter
    from smoulder.errors import ConfigError
    from smoulder.inputs import discover, validate_session

    plugin = cfg.execution.plugin
    if plugin not in TASK_PLUGINS:
        raise ConfigError(
            f"--slurm-array: each task runs one participant with {' or '.join(TASK_PLUGINS)}; "
            f"found plugin {plugin} (from --config or --plugin-config): leave it out"
        )
    sessions = discover(
        bids_dir, participant_labels=participant_labels, session_labels=session_labels
    )
    checked = [validate_session(s, read_data=False) for s in sessions]  # tasks check voxels
    todo = participants_to_do(
        cfg,
        checked,
        output_dir=output_dir,
        bids_dir=bids_dir,
        models=models,
        force=force,
    )
    if not todo:
        print("nothing to submit: every selected participant's outputs are complete and current")
        return 0
    writer = DerivativesWriter(output_dir)
    job = write_array_job(
        writer.logs / f"slurm-array-{writer.stamp}",
        todo,
        argv=argv,
        work_dir=Path(work_dir or Path(output_dir) / "work"),
        sbatch_args=sbatch_args,
    )
    print(f"job array of {len(todo)} participant(s): {job.script}")
    if not submit:
        print(f"submit it with: sbatch {job.script}")
        return 0
    job_id = submit_script(job.script)
    print(f"submitted job array {job_id} (squeue -j {job_id}; sacct -j {job_id})")
    return 0
