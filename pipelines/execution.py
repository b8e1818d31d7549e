"""Running the participant workflow: plugin, live progress, crash reports and node timings.

:func:`run_participant` is the participant level of the BIDS App: it checks the inputs, builds
the workflow of the usable sessions, runs it, and leaves the resolved configuration, a log, a
run report and a provenance record beside the outputs.

:func:`run_workflow` runs a workflow with the Nipype plugin of the configuration and returns a
:class:`RunResult`: one :class:`NodeRecord` per node (ran, cached, failed or not run, with
timings, memory when the resource monitor is on, and the error of a failed node). The work
directory is Nipype's cache: a rerun recomputes only nodes whose inputs changed or that did not
finish, so an interrupted run resumes and a changed setting reruns only the nodes it reaches.

Progress comes from the plugin's ``status_callback`` (Linear, MultiProc and the per-node batch
plugins call it; the ``*Graph`` plugins submit everything at once and do not): a line per
subject, ``steps done/total``, outputs written and time elapsed. Steps are the computing nodes;
publishing a derivative counts as an output, not a step.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from smoulder.config import Config, as_dict, omp_threads
from smoulder.devices import available_cpus
from smoulder.pipelines.slurm import GraphJob, mark_failed_jobs, run_graph

LOG = logging.getLogger("smoulder.run")

#: Plugins that submit the whole graph at once: no status callback, no live progress.
GRAPH_PLUGINS = ("SLURMGraph", "SGEGraph", "PBSGraph", "DAGMan")
_SUBJECT = re.compile(r"(?:^|\.)sub_([A-Za-z0-9]+)_wf(?:\.|$)")
_SESSION = re.compile(r"(?:^|\.)ses_([A-Za-z0-9]+)_wf(?:\.|$)")
LONGITUDINAL = "longitudinal"


# ------------------------------------------------------------------------------------ plugin


def plugin_settings(cfg: Config, *, device: str = "cpu") -> tuple[str, dict[str, Any]]:
    """Return the Nipype plugin name and its arguments from the configuration.

    For MultiProc: ``n_procs`` from ``execution.nprocs`` (else the plugin file, else every CPU
    this process may use), ``memory_gb`` from ``execution.mem_gb``, ``n_gpu_procs`` from
    ``execution.gpu_slots`` (else, on CUDA, the number of GPUs), ``raise_insufficient`` false
    (a step larger than the budget runs alone rather than aborting the run) and the ``spawn``
    start method: a forked worker can hang in PyTorch's OpenMP pool when the parent process
    has already used it.

    Examples:
        >>> from smoulder.config import resolve
        >>> name, args = plugin_settings(resolve(overrides={"execution": {"nprocs": 3}}))
        >>> name, args["n_procs"], args["mp_context"]
        ('MultiProc', 3, 'spawn')
    """
    ex = cfg.execution
    plugin = ex.plugin
    args = dict(ex.plugin_args)
    if plugin in ("MultiProc", "LegacyMultiProc"):
        args["n_procs"] = int(ex.nprocs or args.get("n_procs") or available_cpus())
        if ex.mem_gb:
            args["memory_gb"] = float(ex.mem_gb)
        if ex.gpu_slots:
            args["n_gpu_procs"] = int(ex.gpu_slots)
        elif device == "cuda" and "n_gpu_procs" not in args:
            import torch

            args["n_gpu_procs"] = max(1, torch.cuda.device_count())
        args.setdefault("raise_insufficient", False)
        if plugin == "MultiProc":  # LegacyMultiProc has no start-method option
            args.setdefault("mp_context", "spawn")
    return plugin, args


# ------------------------------------------------------------------------------------ records


@dataclass
class NodeRecord:
    """What happened to one node in a run.

    Attributes:
        node: its path in the workflow (``sub_01_wf.ses_01_wf.coreg_t1w``).
        subject, session: parsed from the path; ``session`` is ``longitudinal`` for the
            subject workflow and ``None`` in a dataset without sessions.
        step: the node name.
        kind: ``step`` (computes) or ``output`` (publishes a derivative).
        status: ``ran``, ``cached`` (finished in an earlier run), ``failed`` or ``not run``
            (blocked by a failure upstream, or the run stopped first).
        start, end: UTC ISO times from Nipype's runtime record (``None`` when unknown).
        duration_s: run time of the node (of its earlier run when cached).
        mem_peak_gb, cpu_percent: from the resource monitor (``--resource-monitor``).
        error: the last line of a failed node's traceback.
        inputs: the node's file inputs.
        out_file: the derivative written (``output`` nodes).
        crash_file: Nipype's crash report of a failed node.
    """

    node: str
    subject: str | None
    session: str | None
    step: str
    kind: str
    status: str = "not run"
    start: str | None = None
    end: str | None = None
    duration_s: float | None = None
    mem_peak_gb: float | None = None
    cpu_percent: float | None = None
    error: str | None = None
    inputs: list[str] = field(default_factory=list)
    out_file: str | None = None
    crash_file: str | None = None

    @property
    def group(self) -> tuple[str, str]:
        """Return ``(subject, session or 'longitudinal' or '-')`` for tables."""
        return (self.subject or "-", self.session or "-")


@dataclass
class RunResult:
    """The outcome of :func:`run_workflow`."""

    records: list[NodeRecord]
    plugin: str
    plugin_args: dict[str, Any]
    wall_s: float
    error: str | None = None

    @property
    def failures(self) -> list[NodeRecord]:
        """Return the failed nodes."""
        return [r for r in self.records if r.status == "failed"]

    def to_json(self) -> dict[str, Any]:
        """Return the result as JSON-friendly data (for the provenance record)."""
        args = {k: v for k, v in self.plugin_args.items() if k != "status_callback"}
        return {
            "plugin": self.plugin,
            "plugin_args": {k: v if _jsonable(v) else repr(v) for k, v in args.items()},
            "wall_s": round(self.wall_s, 2),
            "error": self.error,
            "nodes": [asdict(r) for r in self.records],
        }


def _session_label(record: NodeRecord) -> str:
    """Return ``"ses-<y> "``, ``"longitudinal "`` or ``""`` for messages."""
    if record.session == LONGITUDINAL:
        return f"{LONGITUDINAL} "
    return f"ses-{record.session} " if record.session else ""


def _jsonable(value: Any) -> bool:
    return isinstance(value, str | int | float | bool | type(None) | list | dict)


def _location(path: str) -> tuple[str | None, str | None]:
    """Return ``(subject, session)`` of a node path (``longitudinal``: the subject workflow).

    Examples:
        >>> _location("sub_01_wf.ses_02_wf.conform_flair")
        ('01', '02')
        >>> _location("sub_01_wf.subject_wf.halfway_01_02")
        ('01', 'longitudinal')
    """
    # deferred: the workflow modules import Nipype, which a reader of run records needs not
    from smoulder.pipelines.subject import SUBJECT_WF

    subject = _SUBJECT.search(path)
    session = _SESSION.search(path)
    if f".{SUBJECT_WF}." in f".{path}.":
        return (subject.group(1) if subject else None, LONGITUDINAL)
    return (subject.group(1) if subject else None, session.group(1) if session else None)


def workflow_nodes(wf: Any) -> dict[str, Any]:
    """Return the nodes that compute or publish: not the wiring (identity nodes dissolve when
    Nipype flattens the graph; list merges and picks only route files)."""
    nodes = {}
    for name in wf.list_node_names():
        node = wf.get_node(name)
        if not _is_wiring(node):
            nodes[name] = node
    return nodes


def _is_wiring(node: Any) -> bool:
    """Return whether ``node`` only routes values (identity, list merge, list pick)."""
    from nipype.interfaces.utility import IdentityInterface, Merge, Select

    return isinstance(node.interface, IdentityInterface | Merge | Select)


def _is_output(node: Any) -> bool:
    from smoulder.pipelines.interfaces import DerivativesSink

    return isinstance(node.interface, DerivativesSink)


# ------------------------------------------------------------------------------------ monitor


class RunMonitor:
    """Nipype ``status_callback``: records every node and prints progress per subject.

    Args:
        wf: the workflow about to run (its nodes give the totals).
        progress: print progress lines.
        stream: where they go (default: standard output at the time of the call).
        live: redraw one line per subject in place (default: when ``stream`` is a terminal);
            otherwise a subject's line is printed each time one of its steps ends.
    """

    def __init__(
        self,
        wf: Any,
        *,
        progress: bool = True,
        stream: IO[str] | None = None,
        live: bool | None = None,
    ) -> None:
        self.top = wf.name
        self.started = datetime.now(timezone.utc)
        self.stream = (stream or sys.stdout) if progress else None
        self.live = bool(
            live if live is not None else self.stream is not None and self.stream.isatty()
        )
        self.records: dict[str, NodeRecord] = {}
        for path, node in workflow_nodes(wf).items():
            subject, session = _location(path)
            self.records[path] = NodeRecord(
                node=path,
                subject=subject,
                session=session,
                step=node.name,
                kind="output" if _is_output(node) else "step",
            )
        self.subjects = sorted({r.subject for r in self.records.values() if r.subject})
        self._first: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self._running: dict[str, dict[str, str]] = {}  # subject -> {node: step label}
        self._drawn = 0
        self.seen = False

    # -- the callback
    def __call__(self, node: Any, status: str) -> None:
        """Record a node's ``start``, ``end`` or ``exception`` (Nipype's callback protocol)."""
        self.seen = True
        if _is_wiring(node):
            return
        path = self._path(node)
        record = self.records.get(path)
        if record is None:  # a node added after the monitor was made: keep it anyway
            subject, session = _location(path)
            kind = "output" if _is_output(node) else "step"
            record = NodeRecord(path, subject, session, node.name, kind)
            self.records[path] = record
        now = time.monotonic()
        subject = record.subject or "-"
        self._first.setdefault(subject, now)
        self._last[subject] = now
        running = self._running.setdefault(subject, {})
        if status == "start":
            running[path] = _session_label(record) + record.step
            return
        running.pop(path, None)
        self._fill_from_result(record, node)
        if status == "end":
            record.status = "ran" if self._ran_now(record) else "cached"
            LOG.info(
                "%s: %s%s",
                self._where(record),
                record.status,
                f" in {record.duration_s:.1f} s" if record.duration_s is not None else "",
            )
        else:
            record.status = "failed"
            record.error = record.error or "failed (see the crash file)"
            self._drawn = 0  # the error line goes below the progress block: draw a new one
            LOG.error("%s", failure_line(record))
        if record.kind == "step":
            self._show(subject)

    def _path(self, node: Any) -> str:
        return self._path_of(str(node.fullname))

    def _where(self, record: NodeRecord) -> str:
        subject = f"sub-{record.subject} " if record.subject else ""
        return subject + _session_label(record) + record.step

    def _ran_now(self, record: NodeRecord) -> bool:
        if record.start is None:
            return True
        return _parse_time(record.start) >= self.started

    def _fill_from_result(self, record: NodeRecord, node: Any) -> None:
        try:
            result = node.result
        except Exception:  # no result file: the node failed before running its interface
            return
        fill_record(record, result)

    # -- progress
    def counts(self, subject: str) -> tuple[int, int, int, int]:
        """Return ``(steps done, steps total, failed, outputs written)`` of a subject."""
        mine = [r for r in self.records.values() if (r.subject or "-") == subject]
        steps = [r for r in mine if r.kind == "step"]
        done = sum(r.status in ("ran", "cached") for r in steps)
        failed = sum(r.status == "failed" for r in mine)
        outputs = sum(r.kind == "output" and r.status in ("ran", "cached") for r in mine)
        return done, len(steps), failed, outputs

    def line(self, subject: str) -> str:
        """Return the progress line of ``subject``."""
        done, total, failed, outputs = self.counts(subject)
        running = self._running.get(subject) or {}
        end = time.monotonic() if running else self._last.get(subject, 0.0)
        elapsed = end - self._first.get(subject, end)
        text = f"sub-{subject}  {done}/{total} steps  {outputs} outputs  {_clock(elapsed)}"
        if failed:
            text += f"  {failed} failed"
        if running:
            text += "  running: " + ", ".join(sorted(running.values()))
        return text

    def _show(self, subject: str) -> None:
        if self.stream is None:
            return
        if self.live:
            if self._drawn:
                self.stream.write(f"\x1b[{self._drawn}F")
            for s in self.subjects:
                self.stream.write("\x1b[2K" + self.line(s) + "\n")
            self._drawn = len(self.subjects)
        else:
            self.stream.write(self.line(subject) + "\n")
        self.stream.flush()

    def finish(self, work_dir: Path, crash_dir: Path) -> list[NodeRecord]:
        """Return the records, completing those the callback could not see.

        Without callbacks (graph plugins) every node's status is read from its result file in
        the work directory; crash files fill in the error of failed nodes missing one.
        """
        if not self.seen:
            for record in self.records.values():
                result_file = (
                    work_dir
                    / self.top
                    / Path(*record.node.split("."))
                    / (f"result_{record.step}.pklz")
                )
                if result_file.is_file():
                    from nipype.pipeline.engine.utils import load_resultfile

                    fill_record(record, load_resultfile(str(result_file)))
                    failed = record.error is not None
                    record.status = (
                        "failed" if failed else "ran" if self._ran_now(record) else "cached"
                    )
        crashes: dict[str, Path] = {}
        for crash in sorted(crash_dir.glob("crash-*.txt")) if crash_dir.is_dir() else []:
            text = crash.read_text(errors="replace")
            first = text.splitlines()[0] if text else ""
            if first.startswith("Node: "):
                crashes[self._path_of(first[len("Node: ") :].strip())] = crash
        for record in self.records.values():
            found = crashes.get(record.node)
            if record.status != "failed" or found is None:
                continue
            record.crash_file = str(found)
            if record.error == "failed (see the crash file)":
                record.error = _last_line(found.read_text(errors="replace"))
        return list(self.records.values())

    def _path_of(self, fullname: str) -> str:
        prefix = f"{self.top}."
        return fullname[len(prefix) :] if fullname.startswith(prefix) else fullname


def fill_record(record: NodeRecord, result: Any) -> None:
    """Copy timings, memory, file inputs, the output file and any error from a Nipype result."""
    runtime = getattr(result, "runtime", None)
    if runtime is not None and not isinstance(runtime, list):
        record.start = getattr(runtime, "startTime", None)
        record.end = getattr(runtime, "endTime", None)
        duration = getattr(runtime, "duration", None)
        record.duration_s = round(float(duration), 3) if duration is not None else None
        for key in ("mem_peak_gb", "cpu_percent"):
            value = getattr(runtime, key, None)
            if isinstance(value, int | float):
                setattr(record, key, round(float(value), 4))
        traceback = getattr(runtime, "traceback", None)
        if traceback:
            record.error = _last_line(traceback)
    inputs = getattr(result, "inputs", None) or {}
    if isinstance(inputs, dict):
        files = []
        for value in inputs.values():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and os.path.isfile(item):
                    files.append(item)
        record.inputs = files
    outputs = getattr(result, "outputs", None)
    if record.kind == "output" and outputs is not None:
        out = getattr(outputs, "out_file", None)
        record.out_file = str(out) if isinstance(out, str) else None


def _last_line(text: str) -> str:
    """Return the last non-empty line of a traceback, without the module of the exception.

    Examples:
        >>> _last_line("Traceback...\\nsmoulder.errors.InputError: a.nii: expected x, found y\\n")
        'InputError: a.nii: expected x, found y'
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "failed (no message)"
    last = lines[-1]
    return re.sub(r"^(?:[A-Za-z_][\w]*\.)+(?=\w*(?:Error|Exception|Interrupt)\b)", "", last)


def _parse_time(text: str) -> datetime:
    stamp = datetime.fromisoformat(text)
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def _clock(seconds: float) -> str:
    """Return ``h:mm:ss``.

    Examples:
        >>> _clock(3725.2)
        '1:02:05'
    """
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ------------------------------------------------------------------------------------ running


@contextmanager
def nipype_environment(
    folder: Path, *, resource_monitor: bool, verbose: int, here: bool = False
) -> Iterator[None]:
    """Set Nipype's configuration for this process and its workers; restore it afterwards.

    Worker processes start fresh (``spawn``) and read Nipype's configuration file when they
    import it, so the settings go to ``folder/nipype.cfg`` with ``NIPYPE_CONFIG_DIR`` pointing
    there: no version check over the network, quiet logs, the resource monitor on request.
    ``here``: the nodes run in this process (Linear), so monitor them here too; otherwise the
    monitor stays off here (on, Nipype would look for profiles of nodes it never ran itself).
    """
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    level = "INFO" if verbose >= 2 else "WARNING"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nipype.cfg").write_text(
        "[execution]\ncheck_version = false\nresource_monitor_frequency = 0.5\n"
        f"[logging]\nworkflow_level = {level}\ninterface_level = {level}\n"
        f"utils_level = {level}\n"
        f"[monitoring]\nenabled = {str(resource_monitor).lower()}\n"
    )
    saved_env = {k: os.environ.get(k) for k in ("NIPYPE_CONFIG_DIR", "NIPYPE_NO_ET")}
    saved_monitor = nipype_config.resource_monitor
    saved_logging = {k: nipype_config.get("logging", k) for k in _LOG_KEYS}
    os.environ["NIPYPE_CONFIG_DIR"] = str(folder)
    os.environ["NIPYPE_NO_ET"] = "1"
    nipype_config.set("execution", "check_version", "false")
    for key in _LOG_KEYS:
        nipype_config.set("logging", key, level)
    nipype_logging.update_logging(nipype_config)
    nipype_config.resource_monitor = resource_monitor and here
    try:
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        nipype_config.resource_monitor = saved_monitor
        for key, value in saved_logging.items():
            nipype_config.set("logging", key, value)
        nipype_logging.update_logging(nipype_config)


_LOG_KEYS = ("workflow_level", "interface_level", "utils_level")


def run_workflow(
    wf: Any,
    cfg: Config,
    *,
    device: str = "cpu",
    crash_dir: Path,
    progress: bool = True,
    stream: IO[str] | None = None,
    live: bool | None = None,
    verbose: int = 0,
) -> RunResult:
    """Run ``wf`` with the configured plugin; return what happened to every node.

    A failing node does not stop the others (unless ``execution.stop_on_first_crash``): the
    nodes that need its outputs are not run, everything else is. Nipype's exception at the end
    of such a run is caught and its first line kept in :attr:`RunResult.error`. ``SLURMGraph``
    submits every node as a job and returns at once: the run waits for the jobs to end
    (:func:`smoulder.pipelines.slurm.run_graph`) before reading their results.

    Args:
        wf: the workflow (its ``base_dir`` is the work directory).
        cfg: the resolved configuration (``execution`` section).
        device: the resolved device (``cuda`` sets GPU slots).
        crash_dir: where Nipype writes crash reports (text).
        progress: print a progress line per subject.
        stream: where progress lines go (default: standard output).
        live: redraw progress in place (default: when ``stream`` is a terminal).
        verbose: 2 or more lets Nipype's own INFO messages through.
    """
    ex = cfg.execution
    plugin, args = plugin_settings(cfg, device=device)
    monitor = RunMonitor(wf, progress=progress, stream=stream, live=live)
    if plugin not in GRAPH_PLUGINS:
        args["status_callback"] = monitor
    work_dir = Path(wf.base_dir).absolute()
    work_dir.mkdir(parents=True, exist_ok=True)
    crash_dir = Path(crash_dir).absolute()
    wf.config["execution"].update(
        {
            "crashdump_dir": str(crash_dir),
            "crashfile_format": "txt",
            "stop_on_first_crash": str(bool(ex.stop_on_first_crash)).lower(),
            "poll_sleep_duration": "0.1",
            "check_version": "false",
            "hash_method": "timestamp",
            "resource_monitor_frequency": "0.5",
        }
    )
    error = None
    jobs: list[GraphJob] = []
    start = time.perf_counter()
    with nipype_environment(
        work_dir / ".nipype",
        resource_monitor=bool(ex.resource_monitor),
        verbose=verbose,
        here=plugin == "Linear",
    ):
        # MultiProc runs a full garbage collection before every round of submissions; with
        # PyTorch imported that scans millions of objects (0.15 s in the command, more in a
        # test session) per round. Freezing what exists now keeps each collection to the
        # objects the run itself makes.
        gc.freeze()
        # Nipype's workers start in the scheduler's working directory, and its resource monitor
        # leaves a .proc-* file there per step: keep them in the work directory.
        previous = Path.cwd()
        os.chdir(work_dir)
        try:
            if plugin == "SLURMGraph":  # it submits the jobs and returns: wait for them to end
                jobs = run_graph(wf, args, report=print if progress else None)
            else:
                wf.run(plugin=plugin, plugin_args=args)
        except RuntimeError as exc:  # Nipype's "Workflow did not execute cleanly" (or the crash)
            error = _first_line(str(exc))
        finally:
            os.chdir(previous)
            gc.unfreeze()
    wall = time.perf_counter() - start
    records = monitor.finish(work_dir, crash_dir)
    error = error or mark_failed_jobs(records, jobs, top=wf.name)
    return RunResult(records, plugin, args, wall, error)


def _first_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0].strip() if lines else "workflow failed"


# ------------------------------------------------------------------------------------ summary


def summary_rows(result: RunResult | None, skipped: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Return one row per subject and session (and per subject's longitudinal part).

    Columns: ``subject``, ``session``, ``steps`` (done/total), ``ran``, ``cached``,
    ``outputs`` (derivatives written), ``status`` (``ok``, ``failed: <step>``, ``not run``,
    ``skipped: <reason>``). ``skipped`` holds session plans with a ``skipped`` reason.
    """
    rows: list[dict[str, Any]] = []
    groups: dict[tuple[str, str], list[NodeRecord]] = {}
    for record in result.records if result else []:
        groups.setdefault(record.group, []).append(record)
    for plan in skipped:
        groups.setdefault((plan.subject, plan.session or "-"), [])
    reasons = {(p.subject, p.session or "-"): p.skipped for p in skipped}

    def order(key: tuple[str, str]) -> tuple[str, int, str]:
        return (key[0], key[1] == LONGITUDINAL, key[1])

    for key in sorted(groups, key=order):
        records = groups[key]
        steps = [r for r in records if r.kind == "step"]
        done = [r for r in steps if r.status in ("ran", "cached")]
        failed = [r for r in records if r.status == "failed"]
        if key in reasons:
            status = f"skipped: {reasons[key]}"
        elif failed:
            status = "failed: " + ", ".join(r.step for r in failed)
        elif steps and len(done) == len(steps):
            status = "ok"
        elif not done:
            status = "not run"
        else:
            status = "incomplete"
        rows.append(
            {
                "subject": f"sub-{key[0]}",
                "session": key[1] if key[1] in (LONGITUDINAL, "-") else f"ses-{key[1]}",
                "steps": f"{len(done)}/{len(steps)}" if steps else "-",
                "ran": sum(r.status == "ran" for r in steps),
                "cached": sum(r.status == "cached" for r in steps),
                "outputs": sum(
                    r.kind == "output" and r.status in ("ran", "cached") for r in records
                ),
                "status": status,
            }
        )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Return rows (dicts with the same keys) as an aligned plain-text table.

    Examples:
        >>> print(format_table([{"a": 1, "bb": "x"}, {"a": 22, "bb": "yy"}]))
        a   bb
        --  --
        1   x
        22  yy
    """
    if not rows:
        return "(nothing)"
    header = list(rows[0])
    cells = [header] + [[str(r[k]) for k in header] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def failure_line(r: NodeRecord) -> str:
    """Return ``<sub> <ses> step <step> (inputs: <files>): <error>[ [crash file: <path>]]``."""
    where = (f"sub-{r.subject} " if r.subject else "") + _session_label(r)
    inputs = ", ".join(Path(p).name for p in r.inputs) or "n/a"
    line = f"{where}step {r.step} (inputs: {inputs}): {r.error}"
    if r.crash_file:
        line += f" [crash file: {r.crash_file}]"
    return line


def failure_lines(result: RunResult) -> list[str]:
    """Return one line per failed node: where, which inputs, the error, the crash file."""
    lines = [failure_line(r) for r in result.failures]
    blocked = [r for r in result.records if r.status == "not run"]
    if blocked and result.failures:
        lines.append(f"{len(blocked)} node(s) not run because of these failures")
    return lines


# ------------------------------------------------------------------------- participant level


def run_participant(
    cfg: Config,
    *,
    bids_dir: Path,
    output_dir: Path,
    work_dir: Path | None = None,
    participant_labels: list[str] | None = None,
    session_labels: list[str] | None = None,
    argv: Sequence[str],
    force: bool = False,
    lock_max_age_h: float | None = None,
    verbose: int = 0,
) -> int:
    """Return the exit status of the participant level: 1 when an input or a step failed, else 0.

    Checks every selected session's inputs, runs the workflow of the usable sessions
    (:func:`run_sessions`) and rebuilds the QA reports. The work directory is Nipype's cache, so
    the same call after an interruption resumes; a step that fails is reported (session, step,
    inputs, error) and the other sessions go on. The resolved configuration (with the work
    directory) and the run's log are saved under ``<output_dir>/smoulder/logs``.

    Batch mode (:mod:`smoulder.pipelines.batch`): each subject is locked while this run
    processes it; subjects locked by another run, and those whose outputs are complete and
    current, are left out; every session's outcome goes to ``logs/summary-<run>.tsv``.

    Args:
        cfg: the resolved configuration.
        bids_dir: the input BIDS dataset.
        output_dir: the BIDS-App output folder (derivatives go to ``<output_dir>/smoulder``).
        work_dir: Nipype's cache (default: ``<output_dir>/work``).
        participant_labels: subjects to process, without ``sub-`` (default: all).
        session_labels: sessions to process, without ``ses-`` (default: all).
        argv: the command line, for the provenance record.
        force: process subjects whose outputs are complete and current too.
        lock_max_age_h: hours after which a lock taken on another host is stale (default:
            :data:`smoulder.pipelines.locks.MAX_AGE_H`).
        verbose: console verbosity (``-v`` count); the log file gets every event.
    """
    from smoulder.derivatives import DerivativesWriter
    from smoulder.pipelines.batch import ParticipantBatch

    writer = DerivativesWriter(output_dir, raw_dir=bids_dir)
    work_dir = Path(work_dir or output_dir / "work").absolute()
    saved = as_dict(cfg)
    saved["execution"]["work_dir"] = str(work_dir)  # the run's record says where its cache is
    writer.save_config(saved, argv=list(argv))
    with run_log(writer.logs / f"run-{writer.stamp}.log", verbose=verbose):
        models = model_versions(cfg)
        checked, inputs_page = check_inputs(
            writer,
            bids_dir,
            participant_labels=participant_labels,
            session_labels=session_labels,
            read_data=cfg.inputs.read_data,
            models=models,
        )
        batch = ParticipantBatch(
            cfg,
            writer=writer,
            bids_dir=bids_dir,
            models=models,
            force=force,
            lock_max_age_h=lock_max_age_h,
        )
        with batch.claim(checked) as todo:  # the subjects locked, not complete and current
            result = run_sessions(
                cfg,
                todo,
                writer=writer,
                bids_dir=bids_dir,
                output_dir=output_dir,
                work_dir=work_dir,
                argv=list(argv),
                verbose=verbose,
            )
            batch.finish(result)
        _build_reports(output_dir, participant_labels)
    print(f"outputs: {writer.root}")
    print(f"report:  {writer.root / 'report.html'} (inputs: {inputs_page})")
    input_errors = [s for s in checked if s.errors]
    return 1 if input_errors or (result is not None and result.failures) else 0


def check_inputs(
    writer: Any,
    bids_dir: Path,
    *,
    participant_labels: list[str] | None,
    session_labels: list[str] | None,
    read_data: bool,
    models: dict[str, str] | None = None,
) -> tuple[list[Any], Path]:
    """Return the checked sessions and the inputs page, once the check is printed and saved.

    ``models`` (bundle name → version) go into the dataset description's ``GeneratedBy``.

    Saves each subject's inputs table, the dataset description and the inputs report.
    """
    from smoulder.inputs import discover, sessions_to_records, summarize, validate_session

    sessions = discover(
        bids_dir,
        participant_labels=participant_labels,
        session_labels=session_labels,
    )
    checked = [validate_session(s, read_data=read_data) for s in sessions]
    print(summarize(checked))
    records = sessions_to_records(checked)
    for subject in sorted({s.subject for s in checked}):
        writer.save_subject_inputs(subject, [r for r in records if r["subject"] == subject])
    analyses = sorted({a for r in records for a in r.get("analyses", [])})
    per_subject = [sum(r["subject"] == s for r in records) for s in {r["subject"] for r in records}]
    if any(n >= 2 for n in per_subject):
        analyses.append("longitudinal")  # the subject-level steps of a second session
    writer.save_description(models, analyses)
    return checked, writer.save_inputs_report(records)


def model_versions(cfg: Config) -> dict[str, str]:
    """Return the name and version of every trained network the run uses (its bundles')."""
    import json

    from smoulder.rims.network import DEFAULT_BUNDLE as RIMS
    from smoulder.segmentation.network import DEFAULT_BUNDLE as SEGMENTATION
    from smoulder.segmentation.network import bundle_dir

    used = []
    if cfg.segmentation.enabled:
        used.append(cfg.segmentation.model or SEGMENTATION)
        if cfg.rims.enabled:
            used.append(cfg.rims.model or RIMS)
    versions = {}
    for model in used:
        folder = bundle_dir(model)
        meta = json.loads((folder / "configs" / "metadata.json").read_text())
        versions[folder.name] = str(meta.get("version", "unknown"))
    return versions


def run_sessions(
    cfg: Config,
    checked: Sequence[Any],
    *,
    writer: Any,
    bids_dir: Path,
    output_dir: Path,
    work_dir: Path,
    argv: list[str],
    verbose: int = 0,
) -> RunResult | None:
    """Return what happened to every step once the usable sessions' workflow has run (``None``
    when no session could run).

    Sessions without a usable FLAIR are skipped (and listed as such). Prints the summary table
    and the failures, and saves them in the run report and the provenance record.
    """
    from smoulder.devices import resolve_device
    from smoulder.pipelines.participant import init_participant_wf, plan_sessions
    from smoulder.registration.engines import resolve_engine

    plans = plan_sessions(checked, modalities=cfg.registration.session.modalities)
    # the engine may be CPU-only (greedy, ants); segmentation, QSM and rims keep the device
    engine, _ = resolve_engine(cfg.registration.engine, cfg.execution.device)
    device = resolve_device(cfg.execution.device)
    runnable = [p for p in plans if not p.skipped]
    result = None
    if runnable:
        wf = init_participant_wf(
            plans=runnable,
            cfg=cfg,
            omp_nthreads=omp_threads(cfg),
            output_dir=output_dir,
            bids_dir=bids_dir,
            work_dir=work_dir,
            engine=engine,
            device=device,
        )
        print(f"processing {len(runnable)} session(s) with {cfg.execution.plugin} ...")
        crash_dir = writer.logs / f"crash-{writer.stamp}"
        result = run_workflow(wf, cfg, device=device, crash_dir=crash_dir, verbose=verbose)
    run: dict[str, Any] = {
        "device": device_info(device),
        "engine": engine,
        "omp_nthreads": omp_threads(cfg),
        "cpus": available_cpus(),
        "work_dir": str(work_dir),
    }
    record_run(
        writer,
        result,
        [*(p for p in plans if p.skipped), *cross_sectional(runnable)],
        run,
        argv=argv,
    )
    return result


def cross_sectional(plans: Sequence[Any]) -> list[Any]:
    """Return a ``longitudinal`` row's plan, skipped with its reason, for every subject of
    ``plans`` with sessions but only one of them (no change between sessions to measure).

    Examples:
        >>> from types import SimpleNamespace as P
        >>> [r.skipped for r in cross_sectional([P(subject="01", session="01")])]
        ['one session: cross-sectional outputs only (lesion activity needs two or more)']
        >>> cross_sectional([P(subject="01", session="01"), P(subject="01", session="02")])
        []
    """
    from types import SimpleNamespace

    sessions: dict[str, set[str]] = {}
    for p in plans:
        if p.session is not None:
            sessions.setdefault(p.subject, set()).add(p.session)
    reason = "one session: cross-sectional outputs only (lesion activity needs two or more)"
    return [
        SimpleNamespace(subject=s, session=LONGITUDINAL, skipped=reason)
        for s, found in sorted(sessions.items())
        if len(found) == 1
    ]


def record_run(
    writer: Any,
    result: RunResult | None,
    skipped: Sequence[Any],
    run: dict[str, Any],
    *,
    argv: list[str],
) -> None:
    """Print the summary table and the failures; save the run report and the provenance record.

    Args:
        writer: the run's :class:`~smoulder.derivatives.DerivativesWriter`.
        result: what happened to every node (``None`` when nothing ran).
        skipped: the session plans left out, with their reason.
        run: what the provenance record says of the run (device, engine, threads, ...).
        argv: the command line.
    """
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
    nodes = [] if result is None else result.records
    writer.save_run_report(rows, failures, nodes=nodes, latest=bool(nodes))
    run = {**run, "summary": rows, "failures": failures}
    if result is not None:
        run.update(result.to_json())
    writer.save_provenance(run, argv=argv)


def device_info(device: str) -> dict[str, Any]:
    """Return the device a run used, the processor, and on CUDA the GPU and CUDA version."""
    import platform

    info: dict[str, Any] = {"device": device, "processor": platform.processor() or "unknown"}
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


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
def run_log(path: Path, *, verbose: int) -> Iterator[None]:
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
    nipype_log = logging.getLogger("nipype.workflow")
    saved = (LOG.level, LOG.propagate)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    LOG.addHandler(file_handler)
    LOG.addHandler(console)
    nipype_log.addHandler(file_handler)
    try:
        yield
    finally:
        LOG.removeHandler(file_handler)
        LOG.removeHandler(console)
        nipype_log.removeHandler(file_handler)
        LOG.setLevel(saved[0])
        LOG.propagate = saved[1]
        file_handler.close()
