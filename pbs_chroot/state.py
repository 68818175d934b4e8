"""On-disk state: the node lock, job records and atomic JSON files.

Run as root by the hooks, the runner and the admin CLI. The state directory
is root-only (0700); the job id is checked before it names any file, so a
job id can never point outside it. Layout::

    STATE_DIR/lock                  flock(2) for every stage change (never removed)
    STATE_DIR/jobs/JOBID.json       the job record, written before each step
    STATE_DIR/stages/KEY/info.json  a stage: its version path and pre-existing mounts
    STATE_DIR/stages/KEY/members/JOBID   one empty file per job in the stage
    STATE_DIR/audit/DEV-INO-CTIME   a version whose setuid files were reported once
"""
from __future__ import annotations

import fcntl
import os
import time

from . import jsonio
from .errors import StateError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Any, Optional

__all__ = ["is_job_id", "check_job_id", "ensure_layout", "node_lock", "write_json",
           "read_json", "record_path", "save_record", "load_record", "delete_record",
           "list_records"]

# Torque ids: 123.server, 123[4].server; runner ids: run-PID-TIME.host. That is
# [A-Za-z0-9][A-Za-z0-9._[]-]{0,199}, in plain string code (re costs a job ~5 ms).
_JOB_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._[]-"


def is_job_id(name: str) -> bool:
    """Whether ``name`` is a job id, safe as a file or cgroup name."""
    return (0 < len(name) <= 200 and name.isascii() and name[0].isalnum()
            and not name.strip(_JOB_ID_CHARS) and ".." not in name)


def check_job_id(job_id: str) -> str:
    """Return ``job_id`` if it is safe as a file name, else StateError."""
    if not is_job_id(job_id):
        raise StateError(f"refusing job id {job_id!r}: not a batch-system job id")
    return job_id


def ensure_layout(state_dir: str) -> None:
    """Create the root-only state directory tree if it is missing."""
    for sub in ("", "jobs", "stages", "audit", "shells"):
        path = os.path.join(state_dir, sub)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        except OSError as e:
            raise StateError(f"can't create state directory {path}: {e.strerror}") from e
        os.chmod(path, 0o700)


def node_lock(state_dir: str, timeout: float) -> _NodeLock:
    """Hold the node's stage lock (``with node_lock(...):``), waiting at most ``timeout`` s."""
    return _NodeLock(os.path.join(state_dir, "lock"), timeout)


class _NodeLock:
    """flock(2) on STATE_DIR/lock from ``with`` until its end (closing the file drops it)."""

    __slots__ = ("path", "timeout", "fd")

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self.fd = -1

    def __enter__(self) -> None:
        path, timeout = self.path, self.timeout
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StateError(f"can't open lock {path}: {e.strerror}") from e
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:  # EWOULDBLOCK: another holds it
                    pass
                except OSError as e:
                    raise StateError(f"can't lock {path}: {e.strerror}") from e
                if time.monotonic() > deadline:
                    raise StateError(f"timed out after {timeout:.0f} s waiting for lock {path}")
                time.sleep(0.005)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def __exit__(self, etype: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        fd, self.fd = self.fd, -1
        os.close(fd)


def write_json(path: str, data: Any) -> None:
    """Replace ``path`` atomically with ``data`` as JSON, mode 0600."""
    tmp = f"{path}.tmp.{os.getpid()}"
    text = jsonio.dumps(data).encode("ascii")  # json.dump's ensure_ascii
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            while text:
                text = text[os.write(fd, text):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        raise StateError(f"can't write {path}: {e.strerror}") from e


def read_json(path: str) -> Optional[Any]:
    """The JSON in ``path``, or None if it does not exist; StateError if unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"can't read {path}: {e.strerror}") from e
    try:
        with open(fd, "rb") as f:
            return jsonio.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise StateError(f"{path} is corrupt: {e}") from e


def record_path(state_dir: str, job_id: str) -> str:
    """Where the record of ``job_id`` lives."""
    return os.path.join(state_dir, "jobs", check_job_id(job_id) + ".json")


def save_record(state_dir: str, record: dict[str, Any]) -> None:
    """Write a job record (before the step it announces)."""
    write_json(record_path(state_dir, record["job_id"]), record)


def load_record(state_dir: str, job_id: str) -> Optional[dict[str, Any]]:
    """The job's record, or None if it has none."""
    rec = read_json(record_path(state_dir, job_id))
    if rec is not None and (not isinstance(rec, dict) or rec.get("job_id") != job_id):
        raise StateError(f"record of job {job_id} does not belong to it")
    return rec


def delete_record(state_dir: str, job_id: str) -> None:
    """Remove the job's record (idempotent)."""
    try:
        os.unlink(record_path(state_dir, job_id))
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StateError(f"can't remove record of job {job_id}: {e.strerror}") from e


def list_records(state_dir: str) -> list[str]:
    """Job ids that have a record."""
    try:
        names = os.listdir(os.path.join(state_dir, "jobs"))
    except FileNotFoundError:
        return []
    return sorted(n[:-5] for n in names if n.endswith(".json"))
