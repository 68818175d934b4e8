"""The accounting log: one JSON line per job, appended with one locked write.

Run as root by the epilogue and the runner; read by `pbs-chroot report`.
The log is root-owned, mode 0640.
"""
from __future__ import annotations

import fcntl
import os

from . import jsonio
from .errors import StateError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["SCHEMA", "append"]

SCHEMA = 1


def append(path: str, record: dict[str, Any]) -> None:
    """Append ``record`` (plus the schema number) as one line, atomically for readers."""
    line = jsonio.dumps({"schema": SCHEMA, **record}) + "\n"
    try:
        os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o640)
    except OSError as e:
        raise StateError(f"can't open accounting log {path}: {e.strerror}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line.encode())
    except OSError as e:
        raise StateError(f"can't write accounting log {path}: {e.strerror}") from e
    finally:
        os.close(fd)
