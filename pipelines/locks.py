"""Per-participant locks: one run at a time writes a subject's outputs.

Two ``participant`` runs pointed at the same output folder (two Slurm jobs, a job and a person
at a terminal) would otherwise both compute a subject and both write its derivatives. Before a
run processes a subject it takes ``<OUTPUT_DIR>/smoulder/.locks/sub-<label>.lock``:

* the file is created with ``O_CREAT | O_EXCL``, which succeeds for exactly one process, also
  on NFS (v3 and later); it holds the host, the process id and its start time, the time the
  lock was taken and the command, so that a run finding it can say who holds it;
* a run that finds the lock taken leaves the subject (``locked``) and goes on with the others;
  it does not wait: the subject's run may last hours, and rerunning later skips what is done;
* a lock is stale when its process is gone: on the same host, when the process id is not
  running (or now names another process, told apart by its start time, or the machine has
  restarted since); from another host, whose processes cannot be seen, when it is older than
  :data:`MAX_AGE_H` (``--lock-max-age-hours``). A stale lock is taken over, with a message;
* the run removes its locks at its end, also when the subject fails (``try``/``finally``) and
  when the process is stopped with SIGTERM (Slurm's time limit, ``scancel``), which
  :func:`terminate_as_exit` turns into an exception for that purpose. A SIGKILL or a crash of
  the machine leaves the lock behind: it is then stale as above.

A lock file is written in one ``write`` right after its creation; a reader that finds it empty
or half-written (that instant, or a run killed then) treats it as held by an unknown run, stale
once older than :data:`UNREADABLE_GRACE_S`.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

#: Age in hours after which a lock taken on another host counts as stale (its process cannot
#: be checked from here). Longer than any one subject's run: a 1-mm subject with QSM and three
#: sessions takes a few hours on 8 CPUs.
MAX_AGE_H = 48.0
#: An empty or unreadable lock file younger than this is a run writing it, not a dead one.
UNREADABLE_GRACE_S = 60.0


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock: the contents of the lock file.

    Attributes:
        host: the host name of the holder.
        pid: its process id.
        started: UTC ISO time the lock was taken.
        process_start: the process's start, in clock ticks after boot (``/proc/<pid>/stat``);
            with ``boot_id`` it tells a reused process id apart (``None`` where unknown).
        boot_id: the kernel's boot id (``/proc/sys/kernel/random/boot_id``), or ``None``.
        command: the holder's command line, for the message.
        token: random, tells this run's own lock apart when releasing it.
    """

    host: str
    pid: int
    started: str
    process_start: int | None = None
    boot_id: str | None = None
    command: str = ""
    token: str = ""

    def describe(self) -> str:
        """Return ``host <h>, process <pid> (<command>), since <time>`` for messages.

        Examples:
            >>> holder = LockHolder("node7", 4242, "2026-01-02T03:04:05+00:00", command="smoulder")
            >>> holder.describe()
            'host node7, process 4242 (smoulder), since 2026-01-02T03:04:05+00:00'
        """
        command = f" ({self.command})" if self.command else ""
        return f"host {self.host}, process {self.pid}{command}, since {self.started}"


def this_process(*, command: str | None = None) -> LockHolder:
    """Return the :class:`LockHolder` of the calling process (a new token)."""
    return LockHolder(
        host=socket.gethostname(),
        pid=os.getpid(),
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        process_start=process_start(os.getpid()),
        boot_id=boot_id(),
        command=command if command is not None else " ".join(sys.argv)[:200],
        token=secrets.token_hex(8),
    )


def process_start(pid: int) -> int | None:
    """Return the start of process ``pid`` in clock ticks after boot (Linux), else ``None``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: split after it
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def boot_id() -> str | None:
    """Return the kernel's boot id (Linux), else ``None``."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def is_running(holder: LockHolder) -> bool:
    """Return whether the holder's process still runs on this host (the holder's own host).

    A process id that runs but started at another time than the holder's is another process
    (ids are reused); so is any process after the machine restarted (another boot id).
    """
    if holder.boot_id and boot_id() and holder.boot_id != boot_id():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        pass
    now = process_start(holder.pid)
    return holder.process_start is None or now is None or now == holder.process_start


def stale_reason(
    holder: LockHolder | None,
    *,
    age_s: float,
    max_age_h: float = MAX_AGE_H,
    host: str | None = None,
) -> str | None:
    """Return why a lock is stale, or ``None`` while its holder may still run.

    Args:
        holder: the lock's contents; ``None`` when the file is empty or unreadable.
        age_s: seconds since the lock file was written.
        max_age_h: age after which another host's lock is stale.
        host: this host's name (default: :func:`socket.gethostname`).

    Examples:
        >>> other = LockHolder("elsewhere", 1, "2026-01-01T00:00:00+00:00")
        >>> stale_reason(other, age_s=3600.0, host="here") is None
        True
        >>> stale_reason(other, age_s=50 * 3600.0, host="here")
        'taken 50.0 h ago on host elsewhere (more than 48 h: --lock-max-age-hours)'
    """
    if holder is None:
        if age_s > UNREADABLE_GRACE_S:
            return f"the lock file is empty or unreadable, written {age_s:.0f} s ago"
        return None
    if holder.host == (host or socket.gethostname()):
        if not is_running(holder):
            return f"process {holder.pid} on host {holder.host} is no longer running"
        return None
    if age_s > max_age_h * 3600.0:
        return (
            f"taken {age_s / 3600.0:.1f} h ago on host {holder.host} "
            f"(more than {max_age_h:g} h: --lock-max-age-hours)"
        )
    return None


def read_holder(path: Path) -> LockHolder | None:
    """Return the holder written in the lock file ``path``; ``None`` if empty or unreadable.

    Raises:
        FileNotFoundError: there is no lock file (anymore).
    """
    try:
        data = json.loads(path.read_text())
        fields = {k: data[k] for k in LockHolder.__dataclass_fields__ if k in data}
        return LockHolder(**fields)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, TypeError, KeyError):
        return None


@dataclass
class Lock:
    """A lock this process holds; :meth:`release` removes it (if it is still its own)."""

    path: Path
    holder: LockHolder

    def release(self) -> None:
        """Remove the lock file, unless another run has taken it over meanwhile."""
        try:
            current = read_holder(self.path)
        except FileNotFoundError:
            return
        if current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)


@dataclass
class LockAttempt:
    """The outcome of :func:`acquire`.

    Attributes:
        lock: the lock taken, or ``None`` when another run holds it.
        holder: who holds it when not taken (``None`` if its file is unreadable).
        replaced: the stale holder taken over, and why it was stale.
    """

    lock: Lock | None
    holder: LockHolder | None = None
    replaced: tuple[LockHolder | None, str] | None = None


def acquire(path: Path, *, max_age_h: float = MAX_AGE_H, command: str | None = None) -> LockAttempt:
    """Return the attempt to take the lock ``path``: taken, held by another run, or taken over.

    Args:
        path: the lock file (its folder is made).
        max_age_h: age after which another host's lock is stale.
        command: what the lock file says the holder runs (default: this process's command).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    me = this_process(command=command)
    replaced = None
    for _ in range(3):  # created; or stale, set aside, created; a race lost twice: give up
        if _create(path, me):
            return LockAttempt(Lock(path, me), replaced=replaced)
        try:
            holder = read_holder(path)
            age_s = time.time() - path.stat().st_mtime
        except FileNotFoundError:  # released between our attempt and the read: try again
            continue
        reason = stale_reason(holder, age_s=age_s, max_age_h=max_age_h)
        if reason is None or not _set_aside(path, holder):
            return LockAttempt(None, holder=holder)
        replaced = (holder, reason)
    return LockAttempt(None, holder=None)


def _create(path: Path, holder: LockHolder) -> bool:
    """Return whether the lock file was created (``O_EXCL``: it did not exist) and written."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, (json.dumps(asdict(holder), indent=2) + "\n").encode())
    finally:
        os.close(fd)
    return True


def _set_aside(path: Path, stale: LockHolder | None) -> bool:
    """Return whether the stale lock ``path`` was removed, and only that one.

    It is renamed to a name of its own first (atomic): should another run have replaced it
    between the check and the rename, the lock moved is not the stale one and goes back.
    """
    aside = path.with_name(f"{path.name}.stale-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # removed meanwhile: the path is free
    try:
        moved = read_holder(aside)
    except FileNotFoundError:
        moved = None
    if moved != stale:
        try:
            os.link(aside, path)  # put it back, unless a third run has made a new one
        except OSError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


@contextmanager
def terminate_as_exit() -> Iterator[None]:
    """Turn SIGTERM into :class:`SystemExit` (status 143) while the block runs.

    Python ends on SIGTERM without unwinding, so locks would stay behind a job stopped by
    Slurm's time limit or ``scancel``; as an exception, the ``finally`` blocks release them.
    The previous handler is restored afterwards. Outside the main thread (where signals
    cannot be set) nothing changes.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
