"""Attach the future job process to its cgroup while the prologue asks the server.

Run as root by the prologue, after the job's record and cgroup exist. On cgroup
v1 the first write to a ``cgroup.procs`` after a quiet spell waits for an RCU
grace period (``cgroup_threadgroup_rwsem``, 5-8 ms on the development machine):
a thread makes that write while the main thread reads the job's variables and
checks the request, so the two waits overlap.

Why this is safe: the process attached is the prologue's parent, which pbs_mom
makes the job only after the prologue has exited 0; being in its cgroup early
grants it nothing (a cgroup only confines). If the request is refused, or
anything else fails, ``detach`` moves it back into the very cgroups it came
from (read from /proc/PID/cgroup before the move), so the job's cgroup can be
removed and a refused job is never left in one. Trusts /proc and the cgroup
mounts found by cgroups.detect.
"""
from __future__ import annotations

import _thread
import os

from .cgroups import JobCgroup, Layout, write_file
from .errors import CgroupError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

__all__ = ["EarlyAttach", "origin_dirs"]


def origin_dirs(cg: JobCgroup, layout: Layout, pid: int) -> Optional[list[str]]:
    """The cgroup directories ``pid`` is in now, one per directory ``cg.attach`` writes to,
    in the same order; None if they cannot be told (then attach late, as before)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    where: dict[str, str] = {}  # controller ("" for v2) -> path in its hierarchy
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/") or "/.." in parts[2] + "/":
            return None  # a cgroup namespace's view: not a path we can write to
        for ctrl in parts[1].split(",") if parts[1] else [""]:
            where[ctrl] = parts[2]
    out = []
    if layout.version == 1:
        dirs = getattr(cg, "dirs", {})
        for target in sorted(set(dirs.values())):
            ctrl = next(c for c in sorted(dirs) if dirs[c] == target)
            if ctrl not in where or ctrl not in layout.v1:
                return None
            out.append(os.path.normpath(layout.v1[ctrl] + where[ctrl]))
    else:
        if "" not in where or layout.v2 is None:
            return None
        out.append(os.path.normpath(layout.v2 + where[""]))
    return out


class EarlyAttach:
    """``cg.attach(pid)`` running in a thread from construction; wait() or detach() it."""

    __slots__ = ("cg", "pid", "origin", "_done", "_error")

    def __init__(self, cg: JobCgroup, pid: int, origin: list[str]) -> None:
        self.cg = cg
        self.pid = pid
        self.origin = origin
        self._error: Optional[BaseException] = None
        self._done = _thread.allocate_lock()
        self._done.acquire()
        _thread.start_new_thread(self._run, ())

    def _run(self) -> None:
        try:
            self.cg.attach(self.pid)
        except BaseException as e:  # noqa: B902 - handed to the main thread by wait()
            self._error = e
        finally:
            self._done.release()

    def _join(self, timeout: float) -> None:
        if not self._done.acquire(True, timeout):
            raise CgroupError(f"moving process {self.pid} into cgroup {self.cg.name} did not "
                              f"end within {timeout:.0f} s")
        self._done.release()

    def wait(self, timeout: float) -> None:
        """Until the attach is done; its error (CgroupError) if it failed."""
        self._join(timeout)
        if self._error is not None:
            raise self._error

    def detach(self, timeout: float) -> None:
        """Undo: the process back into the cgroups it came from (after the attach ended,
        whether or not it succeeded: a v1 attach may have moved it in some hierarchies)."""
        self._join(timeout)
        for path in self.origin:
            try:
                write_file(os.path.join(path, "cgroup.procs"), str(self.pid))
            except CgroupError:
                if os.path.exists(f"/proc/{self.pid}"):
                    raise
