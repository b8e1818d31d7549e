"""Batch mode for archives: lists of participants, finished subjects skipped, locks, a summary.

A participant-level run over an archive is started again and again (a cluster job hit its time
limit, a few subjects failed, new subjects arrived), sometimes twice at once. So, per subject:

* **labels from a file**: ``--participant-label @labels.txt`` (or a path to a file): one label
  per line, ``sub-`` optional, blank lines and ``#`` comments ignored (:func:`expand_labels`);
* **a lock** (:mod:`smoulder.pipelines.locks`): a subject another run is processing is left to
  it (``locked``) and the run goes on with the others;
* **a fingerprint**, ``sub-<s>/sub-<s>_desc-run_fingerprint.json``, written when every session
  of the subject finished without an input error or a failed step. It holds what decides the
  subject's outputs: each input image (path in the dataset, size, modification time, SHA-256),
  the sidecar metadata of the images (inherited values included), the sessions, the resolved
  configuration (every section but ``execution``, ``inputs`` and ``phantom``, which decide how
  the run goes, not what it writes; the registration engine and device resolved), smoulder's
  version and the version of every model used, and the outputs written. A later run skips the
  subject when all of that is unchanged and every output listed is still there (``skipped``);
  otherwise it says why it runs the subject again. ``--force`` runs it anyway;
* **a row per session** (and per subject's longitudinal part) in
  ``logs/summary-<run>.tsv``, with its column dictionary beside it (:data:`SUMMARY_COLUMNS`).

Inputs are compared by size and modification time first (a ``stat``, as Nipype's
``timestamp`` hashing of the work directory does); a file whose time changed but whose size did
not is then compared by content, so an archive copied or restored without its times is not
recomputed, while a file rewritten in place is. Hashing costs one read of a subject's inputs
when its fingerprint is written, nothing when it is skipped unchanged.

One subject failing does not stop the others: the workflow runs every subject's nodes and
only those downstream of a failure are left out
(:func:`~smoulder.pipelines.execution.run_workflow`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from smoulder.derivatives import bids_name, is_bids_label
from smoulder.errors import InputError
from smoulder.images import save_json, save_tsv
from smoulder.inputs import SessionInputs
from smoulder.pipelines.locks import MAX_AGE_H, Lock, acquire, terminate_as_exit

LOG = logging.getLogger("smoulder.run")

#: Version of the fingerprint's layout: a fingerprint of another layout is not current.
FINGERPRINT_FORMAT = 1
#: Configuration sections that do not change what a subject's run writes.
RUN_ONLY_SECTIONS = ("execution", "inputs", "phantom")

#: Columns of the run summary, with their meaning (the JSON dictionary beside the TSV).
SUMMARY_COLUMNS: dict[str, str] = {
    "participant": "subject label (sub-<label>)",
    "session": "session label (ses-<label>), 'longitudinal' for the steps across the subject's "
    "sessions, n/a in a dataset without sessions",
    "status": "done (every step finished, now or in an earlier run of the same work "
    "directory), skipped (outputs complete and current, or nothing to run: see error), "
    "failed (a step failed or was blocked by a failure), input error (the inputs have errors; "
    "usable images were still processed) or locked (another run holds the subject's lock)",
    "error": "why the session failed, was skipped or locked",
    "duration_s": "seconds from the first step of the session that ran in this run to the end "
    "of its last (wall clock; 0 when every step was cached; n/a when nothing was run)",
    "peak_memory_mb": "the largest peak resident memory of any one step of the session run "
    "in this run, in MiB, from Nipype's resource monitor (sampled every 0.5 s; steps running "
    "at the same time add up and are not summed here); n/a without --resource-monitor",
}


# ---------------------------------------------------------------------------------- labels


def read_label_file(path: str | Path) -> list[str]:
    """Return the participant labels listed in ``path``, without ``sub-``, in file order.

    One label per line, ``sub-`` optional; blank lines and ``#`` comments are ignored.

    Raises:
        InputError: the file cannot be read, a line is not one label, or it lists none.

    Examples:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "labels.txt"
        >>> _ = f.write_text("# cohort A\\nsub-01\\n\\n02  # rescanned\\n01\\n")
        >>> read_label_file(f)
        ['01', '02']
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(
            path, expected="a readable text file of participant labels", found=str(exc)
        ) from exc
    labels: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        label = entry[len("sub-") :] if entry.startswith("sub-") else entry
        if not is_bids_label(label):
            raise InputError(
                path,
                expected="one participant label per line (letters and digits, 'sub-' optional)",
                found=f"{entry!r} on line {number}",
            )
        if label not in labels:
            labels.append(label)
    if not labels:
        raise InputError(
            path,
            expected="participant labels, one per line",
            found="no label (only blank lines or # comments)",
        )
    return labels


def expand_labels(values: Sequence[str] | None) -> list[str] | None:
    """Return ``--participant-label`` values with each label file replaced by its labels.

    A value is a file when it starts with ``@`` (``@labels.txt``), or when it is not a label
    (letters and digits after an optional ``sub-``) and names an existing file. Labels keep
    their ``sub-`` prefix, if any; those read from files have none.

    Raises:
        InputError: a file cannot be read or lists no label, or a value is neither a label
            nor an existing file.

    Examples:
        >>> expand_labels(["sub-01", "02"])
        ['sub-01', '02']
        >>> expand_labels(None) is None
        True
    """
    if values is None:
        return None
    out: list[str] = []
    for value in values:
        bare = value[len("sub-") :] if value.startswith("sub-") else value
        if value.startswith("@"):
            out += read_label_file(value[1:])
        elif is_bids_label(bare):
            out.append(value)
        elif Path(value).is_file():
            out += read_label_file(value)
        else:
            raise InputError(
                value,
                expected="a participant label (letters and digits, 'sub-' optional), "
                "@FILE or a file of labels",
                found="neither a label nor an existing file",
            )
    return out


# ---------------------------------------------------------------------------- fingerprints


def fingerprint_path(root: Path, subject: str) -> Path:
    """Return where the subject's fingerprint goes under the derivatives root ``root``.

    Examples:
        >>> fingerprint_path(Path("out/smoulder"), "01").as_posix()
        'out/smoulder/sub-01/sub-01_desc-run_fingerprint.json'
    """
    name = bids_name({"sub": subject, "desc": "run"}, suffix="fingerprint", extension=".json")
    return root / f"sub-{subject}" / name


def output_configuration(cfg: Any, *, engine: str, device: str) -> dict[str, Any]:
    """Return what of the resolved configuration decides the outputs (see the module notes).

    Examples:
        >>> from smoulder.config import resolve
        >>> kept = output_configuration(resolve(), engine="greedy", device="cpu")
        >>> "execution" in kept, kept["registration"]["engine"], kept["device"]
        (False, 'greedy', 'cpu')
    """
    from smoulder.config import as_dict

    kept = {k: v for k, v in as_dict(cfg).items() if k not in RUN_ONLY_SECTIONS}
    kept["registration"] = {**kept["registration"], "engine": engine}
    kept["device"] = device
    return kept


def digest(data: Any) -> str:
    """Return the SHA-256 of ``data`` as canonical JSON (sorted keys).

    Examples:
        >>> digest({"b": 1, "a": [1, 2]}) == digest({"a": [1, 2], "b": 1})
        True
    """
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """Return the SHA-256 of the file's content (read in 1 MiB blocks)."""
    sha = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def subject_state(
    sessions: Sequence[SessionInputs],
    *,
    bids_dir: Path,
    configuration_sha256: str,
    models: Mapping[str, str],
    smoulder_version: str,
) -> dict[str, Any]:
    """Return what a subject's outputs are made from, as its fingerprint records it.

    Keys: ``format``, ``smoulder``, ``models`` (name → version), ``configuration_sha256``,
    ``sessions``, ``inputs`` (``path`` in the dataset, ``size``, ``mtime_ns``) and
    ``metadata_sha256`` (of every image's sidecar metadata, inherited values included).
    """
    root = Path(bids_dir).resolve()
    inputs: dict[str, dict[str, Any]] = {}
    metadata: dict[str, Any] = {}
    for s in sessions:
        for _, path in s.images():
            name = _in_dataset(path, root)
            stat = os.stat(path)
            inputs[name] = {"path": name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            metadata[name] = s.metadata.get(str(path), {})
    return {
        "format": FINGERPRINT_FORMAT,
        "smoulder": smoulder_version,
        "models": dict(sorted(models.items())),
        "configuration_sha256": configuration_sha256,
        "sessions": sorted(s.session or "" for s in sessions),
        "inputs": [inputs[k] for k in sorted(inputs)],
        "metadata_sha256": digest(metadata),
    }


def _in_dataset(path: Path, root: Path) -> str:
    """Return ``path`` relative to the dataset ``root`` (POSIX), else absolute."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).absolute().as_posix()


def why_rerun(
    saved: Mapping[str, Any] | None, state: Mapping[str, Any], *, bids_dir: Path, root: Path
) -> str | None:
    """Return why the subject must run again, or ``None`` when its outputs are current.

    Args:
        saved: the subject's fingerprint (``None`` when there is none).
        state: :func:`subject_state` now.
        bids_dir: the input dataset (the fingerprint's input paths are relative to it).
        root: the derivatives root (its output paths are relative to it).

    Examples:
        >>> import pathlib
        >>> state = {"format": 1, "smoulder": "1.1", "models": {}, "sessions": [], "inputs": []}
        >>> why_rerun({**state, "smoulder": "1.0", "outputs": []}, state,
        ...           bids_dir=pathlib.Path("."), root=pathlib.Path("."))
        'smoulder 1.0 then, 1.1 now'
    """
    if saved is None:
        return "no record of a finished run"
    checks = (
        ("format", "the fingerprint's format"),
        ("smoulder", "smoulder"),
        ("models", "models"),
        ("configuration_sha256", "configuration"),
        ("sessions", "sessions"),
    )
    for key, what in checks:
        if saved.get(key) != state.get(key):
            if key == "configuration_sha256":
                return "the configuration changed"
            return f"{what} {_shown(saved.get(key))} then, {_shown(state.get(key))} now"
    changed = _changed_input(saved.get("inputs") or [], state["inputs"], Path(bids_dir))
    if changed:
        return changed
    if saved.get("metadata_sha256") != state.get("metadata_sha256"):
        return "the sidecar metadata of an input changed"
    for name in saved.get("outputs") or []:
        if not (root / name).exists():
            return f"output {name} is missing"
    return None


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        return ", ".join(f"ses-{v}" if v else "no session" for v in value) or "none"
    return str(value)


def _changed_input(
    saved: Sequence[Mapping[str, Any]], now: Sequence[Mapping[str, Any]], bids_dir: Path
) -> str | None:
    """Return which input changed (size; else content, when only its time changed), or None."""
    before = {e["path"]: e for e in saved}
    after = {e["path"]: e for e in now}
    for name in sorted(set(before) ^ set(after)):
        return f"input {name} {'added' if name in after else 'removed'}"
    for name, entry in after.items():
        old = before[name]
        if old.get("size") != entry["size"]:
            return f"input {name} changed (size {old.get('size')} then, {entry['size']} now)"
        if old.get("mtime_ns") != entry["mtime_ns"]:
            path = Path(name) if Path(name).is_absolute() else Path(bids_dir).resolve() / name
            if file_sha256(path) != old.get("sha256"):
                return f"input {name} changed (content)"
    return None


def read_fingerprint(path: Path) -> dict[str, Any] | None:
    """Return the fingerprint at ``path``; ``None`` when absent or unreadable (run again)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def with_hashes(state: Mapping[str, Any], *, bids_dir: Path) -> dict[str, Any]:
    """Return ``state`` (:func:`subject_state`) with the SHA-256 of every input added."""
    root = Path(bids_dir).resolve()
    inputs = []
    for entry in state["inputs"]:
        name = Path(entry["path"])
        inputs.append({**entry, "sha256": file_sha256(name if name.is_absolute() else root / name)})
    return {**state, "inputs": inputs}


def save_fingerprint(
    path: Path, state: Mapping[str, Any], *, outputs: Sequence[str], run: str
) -> Path:
    """Return ``path`` after writing the fingerprint: ``state`` (:func:`with_hashes`), the
    outputs written (relative to the derivatives root) and the run."""
    record = {
        **state,
        "outputs": sorted(set(outputs)),
        "run": run,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return save_json(record, path)


# --------------------------------------------------------------------------------- summary


def session_name(session: str | None) -> str:
    """Return the summary's session column: ``ses-<y>``, ``n/a`` or the value as it is.

    Examples:
        >>> session_name("01"), session_name(None), session_name("longitudinal")
        ('ses-01', 'n/a', 'longitudinal')
    """
    if session is None:
        return "n/a"
    return session if session == "longitudinal" else f"ses-{session}"


def summary_row(
    subject: str,
    session: str | None,
    status: str,
    error: str | None = None,
    *,
    duration_s: float | None = None,
    peak_memory_mb: float | None = None,
) -> dict[str, Any]:
    """Return one row of the run summary (:data:`SUMMARY_COLUMNS`); the error on one line."""
    return {
        "participant": f"sub-{subject}",
        "session": session_name(session),
        "status": status,
        "error": " ".join(error.split()) if error else None,
        "duration_s": None if duration_s is None else round(duration_s, 1),
        "peak_memory_mb": None if peak_memory_mb is None else round(peak_memory_mb, 1),
    }


def records_row(
    subject: str, session: str | None, records: Sequence[Any], run_error: str | None
) -> dict[str, Any]:
    """Return the summary row of a session (or longitudinal part) from its node records.

    Args:
        subject, session: where the records belong.
        records: its :class:`~smoulder.pipelines.execution.NodeRecord` objects.
        run_error: the workflow's error (why nodes did not run), if any.
    """
    failed = [r for r in records if r.status == "failed"]
    blocked = [r for r in records if r.status == "not run"]
    now = [r for r in records if r.status in ("ran", "failed") and r.start and r.end]
    duration = None
    if records:
        duration = 0.0
        if now:
            first = min(_time(r.start) for r in now)
            duration = (max(_time(r.end) for r in now) - first).total_seconds()
    peaks = [r.mem_peak_gb for r in records if r.status == "ran" and r.mem_peak_gb is not None]
    memory = max(peaks) * 1024.0 if peaks else None
    if failed:
        error = "; ".join(_failure(r) for r in failed)
    elif blocked:
        error = f"{len(blocked)} step(s) not run: " + (run_error or "blocked by a failure")
    else:
        return summary_row(subject, session, "done", duration_s=duration, peak_memory_mb=memory)
    return summary_row(
        subject, session, "failed", error, duration_s=duration, peak_memory_mb=memory
    )


def _failure(record: Any) -> str:
    crash = f" [crash file: {record.crash_file}]" if record.crash_file else ""
    return f"step {record.step}: {record.error}{crash}"


def _time(text: str) -> datetime:
    stamp = datetime.fromisoformat(text)
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def save_summary(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Return ``path`` after writing the summary TSV (``n/a`` for no value) and its column
    dictionary beside it."""
    save_json(
        {k: {"Description": v} for k, v in SUMMARY_COLUMNS.items()}, path.with_suffix(".json")
    )
    table = [{k: "n/a" if v is None else v for k, v in r.items()} for r in rows]
    return save_tsv(table, path, columns=list(SUMMARY_COLUMNS))


# ---------------------------------------------------------------------------- the batch


class ParticipantBatch:
    """The bookkeeping of one participant-level run over many subjects.

    :meth:`claim` takes each subject's lock and leaves out the subjects locked by another run
    and those complete and current; :meth:`finish` writes the fingerprints of the subjects
    that finished and the run summary.

    Args:
        cfg: the resolved configuration.
        writer: the run's :class:`~smoulder.derivatives.DerivativesWriter`.
        bids_dir: the input dataset.
        models: name → version of every model the run uses.
        force: run subjects whose outputs are complete and current too.
        lock_max_age_h: hours after which a lock taken on another host is stale (default
            :data:`~smoulder.pipelines.locks.MAX_AGE_H`).
    """

    def __init__(
        self,
        cfg: Any,
        *,
        writer: Any,
        bids_dir: Path,
        models: Mapping[str, str],
        force: bool = False,
        lock_max_age_h: float | None = None,
    ) -> None:
        from smoulder import __version__
        from smoulder.registration.engines import resolve_engine

        engine, device = resolve_engine(cfg.registration.engine, cfg.execution.device)
        self.cfg = cfg
        self.writer = writer
        self.bids_dir = Path(bids_dir)
        self.force = force
        self.lock_max_age_h = MAX_AGE_H if lock_max_age_h is None else lock_max_age_h
        self.config_sha256 = digest(output_configuration(cfg, engine=engine, device=device))
        self.models = dict(models)
        self.version = __version__
        self.locks: dict[str, Lock] = {}
        self.states: dict[str, dict[str, Any]] = {}
        self.processed: list[SessionInputs] = []
        self.left_out: list[dict[str, Any]] = []

    @contextmanager
    def claim(self, checked: Sequence[SessionInputs]) -> Iterator[list[SessionInputs]]:
        """Yield the sessions this run processes; release every lock when the block ends.

        Messages name the subjects left out (locked by another run, with its host, process
        and start; or complete and current), stale locks taken over, and why a subject with
        a fingerprint runs again.
        """
        with terminate_as_exit():
            try:
                for subject in sorted({s.subject for s in checked}):
                    sessions = [s for s in checked if s.subject == subject]
                    if self._take(subject, sessions):
                        self.processed += sessions
                yield list(self.processed)
            finally:
                for lock in self.locks.values():
                    lock.release()
                self.locks.clear()

    def _take(self, subject: str, sessions: list[SessionInputs]) -> bool:
        """Return whether this run processes ``subject`` (its lock is then held)."""
        path = self.writer.root / ".locks" / f"sub-{subject}.lock"
        attempt = acquire(path, max_age_h=self.lock_max_age_h)
        if attempt.lock is None:
            holder = attempt.holder.describe() if attempt.holder else "an unknown run"
            self._leave_out(subject, sessions, "locked", f"held by another run: {holder}")
            return False
        self.locks[subject] = attempt.lock
        if attempt.replaced is not None:
            old, reason = attempt.replaced
            was = old.describe() if old else "an unknown run"
            _say(f"sub-{subject}: stale lock taken over ({reason}; it was {was})")
        state = subject_state(
            sessions,
            bids_dir=self.bids_dir,
            configuration_sha256=self.config_sha256,
            models=self.models,
            smoulder_version=self.version,
        )
        fingerprint = fingerprint_path(self.writer.root, subject)
        saved = read_fingerprint(fingerprint)
        reason = why_rerun(saved, state, bids_dir=self.bids_dir, root=self.writer.root)
        if self.force or any(s.errors for s in sessions) or reason is not None:
            if saved is not None:
                why = "--force" if self.force else reason or "its inputs have errors"
                _say(f"sub-{subject}: running again: {why}")
            # hashed before the run: a file changed during it no longer matches afterwards
            self.states[subject] = with_hashes(state, bids_dir=self.bids_dir)
            return True
        self.locks.pop(subject).release()
        where = fingerprint.relative_to(self.writer.root)
        self._leave_out(subject, sessions, "skipped", f"outputs complete and current ({where})")
        return False

    def _leave_out(
        self, subject: str, sessions: Sequence[SessionInputs], status: str, why: str
    ) -> None:
        _say(f"sub-{subject}: {status}: {why}")
        self.left_out += [summary_row(subject, s.session, status, why) for s in sessions]

    def finish(self, result: Any) -> tuple[list[dict[str, Any]], Path]:
        """Return the summary rows and the summary's path, once the fingerprints are written.

        Args:
            result: the :class:`~smoulder.pipelines.execution.RunResult` of the processed
                sessions (``None`` when none ran).
        """
        records = list(result.records) if result is not None else []
        run_error = result.error if result is not None else None
        rows = list(self.left_out)
        for subject in sorted({s.subject for s in self.processed}):
            sessions = [s for s in self.processed if s.subject == subject]
            mine = [r for r in records if r.subject == subject]
            subject_rows = self._subject_rows(subject, sessions, mine, run_error)
            rows += subject_rows
            if all(r["status"] in ("done", "skipped") for r in subject_rows):
                outputs = [
                    Path(r.out_file).relative_to(self.writer.root).as_posix()
                    for r in mine
                    if r.kind == "output" and r.out_file and r.status in ("ran", "cached")
                ]
                save_fingerprint(
                    fingerprint_path(self.writer.root, subject),
                    self.states[subject],
                    outputs=outputs,
                    run=self.writer.stamp,
                )
        rows.sort(key=lambda r: (r["participant"], r["session"] == "longitudinal", r["session"]))
        path = save_summary(rows, self.writer.logs / f"summary-{self.writer.stamp}.tsv")
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        shown = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        _say(f"run summary ({shown or 'no session'}): {path}")
        return rows, path

    def _subject_rows(
        self,
        subject: str,
        sessions: Sequence[SessionInputs],
        records: Sequence[Any],
        run_error: str | None,
    ) -> list[dict[str, Any]]:
        """Return the rows of a processed subject: its sessions', then its longitudinal one."""
        from smoulder.pipelines.participant import plan_sessions

        plans = plan_sessions(sessions, modalities=self.cfg.registration.session.modalities)
        skipped = {p.session: p.skipped for p in plans}
        rows = []
        for s in sessions:
            mine = [r for r in records if r.session == s.session]
            errors = " | ".join(s.errors) or None
            if not mine:  # left out of the workflow: unusable inputs, or nothing to run
                reason = skipped.get(s.session)
                status = "input error" if errors else "skipped" if reason else "failed"
                rows.append(summary_row(subject, s.session, status, errors or reason or "not run"))
                continue
            row = records_row(subject, s.session, mine, run_error)
            if errors and row["status"] == "done":
                row.update(status="input error", error=" ".join(errors.split()))
            rows.append(row)
        labels = {s.session for s in sessions}
        for part in sorted({r.session for r in records} - labels, key=str):
            rows.append(
                records_row(subject, part, [r for r in records if r.session == part], run_error)
            )
        return rows


def _say(message: str) -> None:
    """Print ``message`` and put it in the run's log."""
    print(message, flush=True)
    LOG.info("%s", message)
