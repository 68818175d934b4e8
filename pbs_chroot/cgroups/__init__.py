"""Per-job cgroups: detection of the node's hierarchy and one interface for v1 and v2.

Run as root by the hooks and the runner. Everything is created, written and
removed below one configured parent (e.g. ``pbs_chroot``) in each hierarchy;
nothing outside it is ever touched. The job id (checked by state.check_job_id)
names the job's cgroup.
"""
from __future__ import annotations

import os
import time

import _signal  # type: ignore[import-not-found]  # the signal module imports enum

from ..errors import CgroupError
from ..record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, Sequence

__all__ = ["CONTROLLERS_V1", "Layout", "Limits", "Usage", "JobCgroup", "detect", "job_cgroup",
           "remove_parent_if_empty",
           "read_file", "write_file", "keyed", "make_dir", "remove_dir"]

# v1 controllers we use; memory and cpuacct are required, the others optional.
CONTROLLERS_V1 = ("memory", "cpuacct", "cpu", "freezer", "pids")
_POLL = 0.01


class Layout(Record):
    """Where the node's cgroup controllers are mounted."""

    __slots__ = ("version", "v1", "v2")

    def __init__(self, version: int, v1: dict[str, str], v2: Optional[str]) -> None:
        self.version = version    # 1 or 2
        self.v1 = v1              # controller -> mount point (version 1)
        self.v2 = v2              # the cgroup2 mount (version 2)


class Limits(Record):
    """What the job may use, from its Resource_List and the site's policy."""

    __slots__ = ("mem_request", "policy", "mem_cap", "memsw", "pids_max", "cpus")

    def __init__(self, mem_request: Optional[int] = None, policy: str = "hard",
                 mem_cap: Optional[int] = None, memsw: Optional[int] = None,
                 pids_max: Optional[int] = None, cpus: int = 1) -> None:
        self.mem_request = mem_request  # bytes
        self.policy = policy            # hard | soft | none
        self.mem_cap = mem_cap          # soft: the hard limit (None: none)
        self.memsw = memsw              # memory + swap (v1 memsw; v2 swap.max = memsw - mem)
        self.pids_max = pids_max
        self.cpus = cpus

    def hard_memory(self) -> Optional[int]:
        """The hard memory limit: the request (hard), the cap (soft), and with swap
        limited but no other limit, the memory+swap figure itself."""
        hard = {"hard": self.mem_request, "soft": self.mem_cap}.get(self.policy)
        return hard or (self.memsw if self.policy != "none" else None)


class Usage(Record):
    """What the job used, in normalised units; None where the kernel does not tell."""

    __slots__ = ("cpu_user_usec", "cpu_system_usec", "mem_peak_bytes", "mem_anon_bytes",
                 "mem_file_bytes", "swap_peak_bytes", "oom_kills", "mem_limit_bytes")

    def __init__(self, cpu_user_usec: int, cpu_system_usec: int,
                 mem_peak_bytes: Optional[int], mem_anon_bytes: Optional[int],
                 mem_file_bytes: Optional[int], swap_peak_bytes: Optional[int],
                 oom_kills: int, mem_limit_bytes: Optional[int]) -> None:
        self.cpu_user_usec = cpu_user_usec
        self.cpu_system_usec = cpu_system_usec
        self.mem_peak_bytes = mem_peak_bytes
        self.mem_anon_bytes = mem_anon_bytes
        self.mem_file_bytes = mem_file_bytes
        self.swap_peak_bytes = swap_peak_bytes
        self.oom_kills = oom_kills
        self.mem_limit_bytes = mem_limit_bytes


def read_file(path: str) -> str:
    """A cgroup file's text; CgroupError if it cannot be read."""
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        raise CgroupError(f"can't read {path}: {e.strerror}") from e


def write_file(path: str, value: str) -> None:
    """Write one value to a cgroup file; CgroupError (with errno) on failure."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise CgroupError(f"can't open {path}: {e.strerror}") from e
    try:
        os.write(fd, value.encode())
    except OSError as e:
        raise CgroupError(f"can't write {value!r} to {path}: {e.strerror}") from e
    finally:
        os.close(fd)


def make_dir(path: str) -> None:
    """mkdir a cgroup; fine if it exists."""
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass
    except OSError as e:
        raise CgroupError(f"can't create cgroup {path}: {e.strerror}") from e


def remove_dir(path: str) -> None:
    """rmdir an (empty) cgroup; fine if it is gone."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        import errno
        hint = " (processes left)" if e.errno == errno.EBUSY else ""
        raise CgroupError(f"can't remove cgroup {path}: {e.strerror}{hint}") from e


def keyed(text: str) -> dict[str, int]:
    """'key value' lines (memory.stat, cpu.stat, memory.events ...) as a dict of ints."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


class JobCgroup:
    """A job's cgroup. Subclasses: cgroups.v1.CgroupV1, cgroups.v2.CgroupV2."""

    version = 0

    def __init__(self, name: str) -> None:
        self.name = name  # PARENT/JOBID, relative to each hierarchy's root

    def create(self) -> None:
        """Make the job's cgroup (and our parent if needed); idempotent."""
        raise NotImplementedError

    def set_limits(self, limits: Limits) -> None:
        """Apply memory, swap, pids and CPU-weight limits."""
        raise NotImplementedError

    def attach(self, pid: int) -> None:
        """Move ``pid`` (and, later, all it forks) into the cgroup."""
        raise NotImplementedError

    def procs(self) -> list[int]:
        """Pids in the cgroup ([] if it does not exist)."""
        raise NotImplementedError

    def usage(self) -> Usage:
        """Accounting, read before removal."""
        raise NotImplementedError

    def remove(self) -> None:
        """Remove the (empty) cgroup; idempotent."""
        raise NotImplementedError

    def exists(self) -> bool:
        raise NotImplementedError

    def _freeze(self, frozen: bool) -> bool:
        """Freeze or thaw; False if this node cannot freeze."""
        return False

    def _kill_all_at_once(self) -> bool:
        """Kill every process in one step (v2 cgroup.kill); False if unsupported."""
        return False

    def kill(self, timeout: float) -> int:
        """SIGKILL everything in the cgroup and wait until it is empty; return how many.

        Frozen first, so nothing forks away between reading the list and the
        kill. A process that outlives ``timeout`` (D state, or frozen by a
        foreign freezer) is a CgroupError: a site fault.
        """
        deadline = time.monotonic() + timeout
        killed: set[int] = set()
        listed = self.procs()  # before: killed processes leave cgroup.procs at once
        if os.getpid() in listed:  # it would freeze (and kill) itself, forever
            raise CgroupError(f"cgroup {self.name}: refusing to kill the cgroup this process "
                              f"({os.getpid()}) runs in; was its parent moved into it?")
        if self._kill_all_at_once():
            killed.update(listed)
        elif listed:  # (an empty cgroup: nothing can fork in it, so no freeze)
            frozen = self._freeze(True)
            try:
                for pid in self.procs():
                    _sigkill(pid)
                    killed.add(pid)
            finally:
                if frozen:
                    self._freeze(False)
        left = self.procs()
        while left:
            if time.monotonic() > deadline:
                raise CgroupError(f"cgroup {self.name}: {len(left)} process(es) survive SIGKILL "
                                  f"after {timeout:.0f} s: {_describe(left)}")
            for pid in left:  # forked before the freeze took hold, or no freezer
                _sigkill(pid)
                killed.add(pid)
            time.sleep(_POLL)
            left = self.procs()
        return len(killed)


def _sigkill(pid: int) -> None:
    try:
        os.kill(pid, _signal.SIGKILL)
    except ProcessLookupError:
        pass


def _describe(pids: Sequence[int]) -> str:
    out = []
    for pid in pids[:5]:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)
            comm = fields[0].split("(", 1)[1].encode("unicode_escape").decode("ascii")
            out.append(f"{pid} ({comm}, state {fields[1].split()[0]})")  # comm: user's text
        except (OSError, IndexError):
            out.append(str(pid))
    return ", ".join(out)


def detect(table: Optional[Sequence[object]] = None) -> Layout:
    """The node's cgroup layout: v1 if the v1 memory controller is mounted, else v2."""
    from ..mounts import read_mountinfo
    v1: dict[str, str] = {}
    v2 = None
    for m in (table if table is not None else read_mountinfo()):
        if m.fstype == "cgroup":  # type: ignore[attr-defined]
            for ctrl in CONTROLLERS_V1:
                if ctrl in m.super_options and ctrl not in v1:  # type: ignore[attr-defined]
                    v1[ctrl] = m.mount_point  # type: ignore[attr-defined]
        elif m.fstype == "cgroup2" and v2 is None:  # type: ignore[attr-defined]
            v2 = m.mount_point  # type: ignore[attr-defined]
    if "memory" in v1:
        if "cpuacct" not in v1:
            raise CgroupError("cgroup v1 without the cpuacct controller: no CPU accounting")
        return Layout(1, v1, v2)
    if v2 is not None:
        return Layout(2, {}, v2)
    raise CgroupError("no cgroup memory controller mounted (neither v1 nor v2)")


def remove_parent_if_empty(layout: Layout, parent: str) -> None:
    """rmdir our parent cgroup (only its last component) where no job cgroup is left in it.

    For the one-shot commands (`run`, `selftest`) when their job is gone; a prologue
    that makes a job cgroup meanwhile makes the parent again (create() retries).
    """
    tops = sorted(set(layout.v1.values())) if layout.version == 1 else [str(layout.v2)]
    for top in tops:
        try:
            os.rmdir(os.path.join(top, parent))
        except OSError:
            pass  # gone, or jobs still in it (EBUSY/ENOTEMPTY): theirs to keep


def job_cgroup(layout: Layout, parent: str, job_id: str) -> JobCgroup:
    """The cgroup of ``job_id`` below ``parent``, for this node's layout."""
    name = f"{parent}/{job_id}"
    if layout.version == 1:
        from .v1 import CgroupV1
        return CgroupV1(name, layout.v1)
    from .v2 import CgroupV2
    assert layout.v2 is not None
    return CgroupV2(name, layout.v2)
