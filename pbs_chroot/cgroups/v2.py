"""cgroup v2 backend: one unified hierarchy (memory, cpu, pids; cgroup.kill and cgroup.freeze).

Run as root by the hooks and the runner; files as in the kernel's
Documentation/admin-guide/cgroup-v2.rst. Only our parent and the jobs below
it are created and written: the controllers must already be enabled in the
subtree_control of the parent's parent (under systemd: a delegated unit, see
the README).
"""
from __future__ import annotations

import os
import time

from ..errors import CgroupError
from . import JobCgroup, Limits, Usage, keyed, make_dir, read_file, remove_dir, write_file

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

__all__ = ["CgroupV2"]

_WANT = ("memory", "cpu", "pids")


class CgroupV2(JobCgroup):
    """A job's cgroup on a v2 node."""

    version = 2

    def __init__(self, name: str, mount: str) -> None:
        super().__init__(name)
        self.path = os.path.join(mount, name)
        self.parent = os.path.dirname(self.path)

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def create(self) -> None:
        for attempt in range(3):
            try:
                return self._create()
            except CgroupError:
                # Our parent removed meanwhile (remove_parent_if_empty): make it again.
                if attempt == 2 or os.path.isdir(self.parent):
                    raise

    def _create(self) -> None:
        if not os.path.isdir(self.parent):
            make_dir(self.parent)
        available = read_file(os.path.join(self.parent, "cgroup.controllers")).split()
        missing = [c for c in ("memory", "cpu") if c not in available]
        if missing:
            raise CgroupError(f"cgroup v2 controllers {missing} are not enabled for "
                              f"{self.parent}: enable them in its parent's "
                              "cgroup.subtree_control (systemd: Delegate=yes)")
        enabled = read_file(os.path.join(self.parent, "cgroup.subtree_control")).split()
        todo = [c for c in _WANT if c in available and c not in enabled]
        if todo:
            write_file(os.path.join(self.parent, "cgroup.subtree_control"),
                       " ".join("+" + c for c in todo))
        make_dir(self.path)

    def set_limits(self, limits: Limits) -> None:
        hard = limits.hard_memory()
        if limits.policy == "soft" and limits.mem_request:
            write_file(self._file("memory.low"), str(limits.mem_request))
        if hard:
            write_file(self._file("memory.max"), str(hard))
        swap = self._file("memory.swap.max")
        if hard and limits.memsw and limits.policy != "none" and os.path.exists(swap):
            write_file(swap, str(max(0, limits.memsw - hard)))  # memory+swap, as v1 memsw
        if limits.pids_max and os.path.exists(self._file("pids.max")):
            write_file(self._file("pids.max"), str(limits.pids_max))
        # cpu.weight 1..10000, 100 per core asked for.
        write_file(self._file("cpu.weight"), str(min(10000, 100 * max(1, limits.cpus))))

    def attach(self, pid: int) -> None:
        write_file(self._file("cgroup.procs"), str(pid))

    def procs(self) -> list[int]:
        try:
            with open(self._file("cgroup.procs")) as f:
                return sorted(int(p) for p in f.read().split())
        except FileNotFoundError:
            return []
        except OSError as e:
            raise CgroupError(f"can't read {self.path}/cgroup.procs: {e.strerror}") from e

    def _kill_all_at_once(self) -> bool:
        if not os.path.exists(self._file("cgroup.kill")):  # Linux < 5.14
            return False
        write_file(self._file("cgroup.kill"), "1")
        return True

    def _freeze(self, frozen: bool) -> bool:
        if not os.path.exists(self._file("cgroup.freeze")):
            return False
        write_file(self._file("cgroup.freeze"), "1" if frozen else "0")
        deadline = time.monotonic() + 2.0
        want = "frozen 1" if frozen else "frozen 0"
        while want not in read_file(self._file("cgroup.events")) and \
                time.monotonic() < deadline:
            time.sleep(0.005)
        return True

    def usage(self) -> Usage:
        cpu = keyed(read_file(self._file("cpu.stat")))
        stat = keyed(read_file(self._file("memory.stat")))
        events = keyed(read_file(self._file("memory.events")))
        return Usage(cpu_user_usec=cpu.get("user_usec", 0),
                     cpu_system_usec=cpu.get("system_usec", 0),
                     mem_peak_bytes=_optional_int(self._file("memory.peak")),  # Linux >= 5.19
                     mem_anon_bytes=stat.get("anon"), mem_file_bytes=stat.get("file"),
                     swap_peak_bytes=_optional_int(self._file("memory.swap.peak")),
                     oom_kills=events.get("oom_kill", 0),
                     mem_limit_bytes=_optional_int(self._file("memory.max")))

    def remove(self) -> None:
        remove_dir(self.path)

    def exists(self) -> bool:
        return os.path.isdir(self.path)


def _optional_int(path: str) -> Optional[int]:
    """A number file that older kernels lack, or 'max' (no limit): None."""
    try:
        text = read_file(path).strip()
    except CgroupError:
        return None
    return int(text) if text.isdigit() else None
