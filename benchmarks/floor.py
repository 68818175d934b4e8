"""The floor: the kernel operations of a job's set-up and teardown, done in one process.

Run as root by the harness, in its namespace. The same operations the hooks make, with
nothing around them (no interpreter start, no imports, no config, no job record, no
lock): make the job's cgroup in every controller the hooks use and set its CPU weight,
attach a process, then (for an image) the stage: the self-bind made a slave, /proc, every
bind of the plan (bind, make slave, remount with its flags) and the read-only remount of
the root; teardown: freeze, SIGKILL, wait until the cgroup is empty, thaw, unmount from one
read of mountinfo deepest first, remove the cgroup. What no Python can avoid paying.

On cgroup v1 the first attach after a quiet spell waits for an RCU grace period
(cgroup_threadgroup_rwsem); back-to-back runs would hide it, so each run starts after a
pause, as a job start on a node does.
"""
import os
import signal
import time
from typing import Optional

from pbs_chroot import _sys, cgroups, mounts, stage
from pbs_chroot.config import Config

__all__ = ["Floor"]


class Floor:
    """One set of kernel operations per ``run``; timings in ns."""

    def __init__(self, cfg: Config, version: Optional[str], parent: str) -> None:
        self.version = version
        self.steps = mounts.plan(version, stage.bind_set(cfg)) if version else []
        layout = cgroups.detect()
        tops = {c: layout.v1[c] for c in cgroups.CONTROLLERS_V1 if c in layout.v1} \
            if layout.version == 1 else {"unified": str(layout.v2)}
        self.v1 = layout.version == 1
        self.dirs = sorted({os.path.join(t, parent, "floor") for t in tops.values()})
        self.freezer = os.path.join(tops["freezer"], parent, "floor") if "freezer" in tops \
            else None
        self.cpu = os.path.join(tops["cpu"], parent, "floor") if "cpu" in tops else None
        self.unified = None if self.v1 else self.dirs[0]

    def run(self, pause: float = 0.0) -> dict:
        """One job's worth, after ``pause`` s of quiet; ns per step, and totals."""
        pid, wfd = _sleeper()
        time.sleep(pause)
        try:
            t = [time.perf_counter_ns()]
            self._cgroup_create()
            t.append(time.perf_counter_ns())
            self._attach(pid)
            t.append(time.perf_counter_ns())
            if self.version:
                self._stage_up()
            t.append(time.perf_counter_ns())
            self._kill(pid)
            t.append(time.perf_counter_ns())
            if self.version:
                self._stage_down()
            t.append(time.perf_counter_ns())
            for d in self.dirs:
                os.rmdir(d)
            t.append(time.perf_counter_ns())
        finally:
            os.close(wfd)
        steps = dict(zip(("create", "attach", "binds", "kill", "umount", "rmdir"),
                         (b - a for a, b in zip(t, t[1:]))))
        return {**steps, "setup": t[3] - t[0], "teardown": t[6] - t[3], "total": t[6] - t[0]}

    def _cgroup_create(self) -> None:
        for d in self.dirs:
            os.makedirs(os.path.dirname(d), exist_ok=True)
            os.mkdir(d)
        if self.cpu:
            _write(os.path.join(self.cpu, "cpu.shares"), "1024")
        elif self.unified:
            _write(os.path.join(self.unified, "cpu.weight"), "100")

    def _attach(self, pid: int) -> None:
        for d in self.dirs:
            _write(os.path.join(d, "cgroup.procs"), str(pid))

    def _procs(self) -> list:
        pids: set = set()
        for d in self.dirs:
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids.update(f.read().split())
        return sorted(pids)

    def _kill(self, pid: int) -> None:
        if self.unified:
            _write(os.path.join(self.unified, "cgroup.kill"), "1")
        else:
            if self.freezer:
                _write(os.path.join(self.freezer, "freezer.state"), "FROZEN")
            for p in self._procs():
                os.kill(int(p), signal.SIGKILL)
            if self.freezer:
                _write(os.path.join(self.freezer, "freezer.state"), "THAWED")
        os.waitpid(pid, 0)
        while self._procs():
            time.sleep(0.0005)

    def _stage_up(self) -> None:
        v = self.version
        assert v is not None
        _sys.mount(v, v, None, _sys.MS_BIND)
        _sys.mount(None, v, None, _sys.MS_SLAVE | _sys.MS_REC)
        for step in self.steps:
            spec, target = step.spec, step.target
            if spec.source == "proc":
                _sys.mount("proc", target, "proc", _sys.MS_NOSUID | _sys.MS_NODEV | _sys.MS_NOEXEC)
                continue
            _sys.mount(spec.source, target, None, _sys.MS_BIND | (_sys.MS_REC if spec.rec else 0))
            _sys.mount(None, target, None, _sys.MS_SLAVE | _sys.MS_REC)
            flags = _sys.MS_NOSUID | (0 if spec.dev else _sys.MS_NODEV) \
                | (_sys.MS_RDONLY if spec.readonly else 0) | (_sys.MS_NOEXEC if spec.noexec else 0)
            _sys.mount(None, target, None, _sys.MS_REMOUNT | _sys.MS_BIND | flags)
        _sys.mount(None, v, None, _sys.MS_REMOUNT | _sys.MS_BIND | _sys.MS_RDONLY
                   | _sys.MS_NOSUID | _sys.MS_NODEV)

    def _stage_down(self) -> None:
        assert self.version is not None
        left = mounts.mounts_below(self.version, mounts.read_mountinfo())
        left.sort(key=lambda m: (m.mount_point.count("/"), m.mount_id), reverse=True)
        for m in left:
            _sys.umount2(m.mount_point, _sys.UMOUNT_NOFOLLOW)


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _sleeper() -> tuple:
    """A child that waits on a pipe (the job's process); its pid and the pipe's write end."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(w)
            os.read(r, 1)
        finally:
            os._exit(0)
    os.close(r)
    return pid, w
