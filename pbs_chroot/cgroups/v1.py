"""cgroup v1 backend: one directory per controller hierarchy (memory, cpuacct, cpu, freezer, pids).

Run as root by the hooks and the runner; files as in the kernel's
Documentation/admin-guide/cgroup-v1/. Only directories below the configured
parent are created, written and removed.
"""
from __future__ import annotations

import os
import time

from ..errors import CgroupError
from . import (CONTROLLERS_V1, JobCgroup, Limits, Usage, keyed, make_dir, read_file,
               remove_dir, write_file)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

__all__ = ["CgroupV1"]

_UNLIMITED = 1 << 62  # v1 reports "no limit" as PAGE_COUNTER_MAX pages: a huge number


class CgroupV1(JobCgroup):
    """A job's cgroup on a v1 node."""

    version = 1

    def __init__(self, name: str, mounts: dict[str, str]) -> None:
        super().__init__(name)
        self.dirs = {c: os.path.join(mounts[c], name) for c in CONTROLLERS_V1 if c in mounts}

    def _unique_dirs(self) -> list[str]:
        # cpu and cpuacct are often co-mounted ("cpu,cpuacct"): one directory.
        return sorted(set(self.dirs.values()))

    def _file(self, ctrl: str, name: str) -> str:
        return os.path.join(self.dirs[ctrl], name)

    def create(self) -> None:
        for path in self._unique_dirs():
            for attempt in range(3):
                make_dir(os.path.dirname(path))
                try:
                    make_dir(path)
                    break
                except CgroupError:
                    # Our parent removed between the two mkdirs (remove_parent_if_empty,
                    # by `run` or `selftest` as their last job ends): make it again.
                    if attempt == 2 or os.path.isdir(os.path.dirname(path)):
                        raise

    def set_limits(self, limits: Limits) -> None:
        hard = limits.hard_memory()
        if limits.policy == "soft" and limits.mem_request:
            write_file(self._file("memory", "memory.soft_limit_in_bytes"),
                       str(limits.mem_request))
        if hard:
            write_file(self._file("memory", "memory.limit_in_bytes"), str(hard))
        memsw = self._file("memory", "memory.memsw.limit_in_bytes")
        if hard and limits.memsw and limits.policy != "none" and os.path.exists(memsw):
            # memsw may not be below memory.limit_in_bytes (EINVAL).
            write_file(memsw, str(max(limits.memsw, hard)))
        if limits.pids_max and "pids" in self.dirs:
            write_file(self._file("pids", "pids.max"), str(limits.pids_max))
        if "cpu" in self.dirs:
            write_file(self._file("cpu", "cpu.shares"), str(1024 * max(1, limits.cpus)))

    def attach(self, pid: int) -> None:
        # memory last: the job starter (starter/job_starter.c) lets a task run once its
        # memory and cpuacct lines name the job, so every other move is done by then.
        memory = self.dirs.get("memory")
        for path in sorted(self._unique_dirs(), key=lambda p: p == memory):
            write_file(os.path.join(path, "cgroup.procs"), str(pid))

    def procs(self) -> list[int]:
        pids: set[int] = set()
        for path in self._unique_dirs():
            try:
                with open(os.path.join(path, "cgroup.procs")) as f:
                    pids.update(int(p) for p in f.read().split())
            except FileNotFoundError:
                continue
            except OSError as e:
                raise CgroupError(f"can't read {path}/cgroup.procs: {e.strerror}") from e
        return sorted(pids)

    def _freeze(self, frozen: bool) -> bool:
        if "freezer" not in self.dirs or not os.path.isdir(self.dirs["freezer"]):
            return False
        state = self._file("freezer", "freezer.state")
        want = "FROZEN" if frozen else "THAWED"
        write_file(state, want)
        deadline = time.monotonic() + 2.0
        while read_file(state).strip() != want and time.monotonic() < deadline:
            time.sleep(0.005)  # FREEZING: tasks in D state take a moment
        return True

    def _limit(self) -> Optional[int]:
        value = int(read_file(self._file("memory", "memory.limit_in_bytes")))
        return None if value >= _UNLIMITED else value

    def usage(self) -> Usage:
        acct = self.dirs["cpuacct"]
        user = int(read_file(os.path.join(acct, "cpuacct.usage_user"))) // 1000
        system = int(read_file(os.path.join(acct, "cpuacct.usage_sys"))) // 1000
        stat = keyed(read_file(self._file("memory", "memory.stat")))
        oom = keyed(read_file(self._file("memory", "memory.oom_control")))
        return Usage(
            cpu_user_usec=user, cpu_system_usec=system,
            mem_peak_bytes=int(read_file(self._file("memory", "memory.max_usage_in_bytes"))),
            mem_anon_bytes=stat.get("total_rss"), mem_file_bytes=stat.get("total_cache"),
            swap_peak_bytes=None,  # v1 has a memory+swap peak, not a swap peak
            oom_kills=oom.get("oom_kill", 0), mem_limit_bytes=self._limit())

    def remove(self) -> None:
        for path in self._unique_dirs():
            remove_dir(path)

    def exists(self) -> bool:
        return any(os.path.isdir(p) for p in self._unique_dirs())
