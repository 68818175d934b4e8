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
import errno
import fcntl
import json
import os
import re
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from .errors import StateError

__all__ = ["JOB_ID_RE", "is_job_id", "check_job_id", "ensure_layout", "node_lock", "write_json",
           "read_json", "record_path", "save_record", "load_record", "delete_record",
           "list_records"]

# Torque ids: 123.server, 123[4].server; runner ids: run-PID-TIME.host.
JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\[\]-]{0,199}\Z")


def is_job_id(name: str) -> bool:
    """Whether ``name`` is a job id, safe as a file or cgroup name."""
    return bool(JOB_ID_RE.match(name)) and ".." not in name


def check_job_id(job_id: str) -> str:
    """Return ``job_id`` if it is safe as a file name, else StateError."""
    if not is_job_id(job_id):
        raise StateError(f"refusing job id {job_id!r}: not a batch-system job id")
    return job_id


def ensure_layout(state_dir: str) -> None:
    """Create the root-only state directory tree if it is missing."""
    for sub in ("", "jobs", "stages", "audit"):
        path = os.path.join(state_dir, sub)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        except OSError as e:
            raise StateError(f"can't create state directory {path}: {e.strerror}") from e
        os.chmod(path, 0o700)


@contextmanager
def node_lock(state_dir: str, timeout: float) -> Iterator[None]:
    """Hold the node's stage lock, waiting at most ``timeout`` seconds."""
    path = os.path.join(state_dir, "lock")
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
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise StateError(f"can't lock {path}: {e.strerror}") from e
            if time.monotonic() > deadline:
                raise StateError(f"timed out after {timeout:.0f} s waiting for lock {path}")
            time.sleep(0.005)
        yield
    finally:
        os.close(fd)


def write_json(path: str, data: Any) -> None:
    """Replace ``path`` atomically with ``data`` as JSON, mode 0600."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, sort_keys=True)
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
        with os.fdopen(fd) as f:
            return json.load(f)
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
