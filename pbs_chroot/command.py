"""Run a helper program (qstat) in a session of its own, with a deadline.

Run as root by the prologue; trusts its caller for the argv (an absolute
path from the config) and the environment. This is
``subprocess.Popen(argv, stdin=DEVNULL, stdout=PIPE, stderr=PIPE, env=env,
start_new_session=True).communicate(timeout)`` on os.posix_spawn: importing
subprocess (selectors, signal and enum, threading ...) costs every job about
10 ms. As with subprocess, the child gets /dev/null, the two pipes and no
other descriptor, and SIGPIPE and SIGXFSZ back at their defaults. A glibc too
old to start a session or report a failed exec through posix_spawn (< 2.26)
gets subprocess itself.
"""
from __future__ import annotations

import fcntl
import os
import select
import time

import _signal  # type: ignore[import-not-found]  # the signal module imports enum

from .record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, Sequence

__all__ = ["Completed", "Running", "run", "start", "wait_child"]

_CHUNK = 65536


class Completed(Record):
    """How a command ended: its exit code (-N: killed by signal N) and output."""

    __slots__ = ("returncode", "stdout", "stderr", "timed_out")

    def __init__(self, returncode: Optional[int], stdout: bytes, stderr: bytes,
                 timed_out: bool = False) -> None:
        self.returncode = returncode  # None if it timed out
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out


def run(argv: Sequence[str], env: dict[str, str], timeout: float) -> Completed:
    """Run ``argv`` to its end; past ``timeout`` seconds, SIGKILL its whole session.

    OSError (with the exec's errno) if it cannot be started.
    """
    return start(argv, env, timeout).finish()


class Running:
    """A command started by start(): finish() waits for it (once); cancel() kills its
    session and reaps it (idempotent; after finish, nothing)."""

    def __init__(self, pid: int, out_r: int, err_r: int, deadline: float,
                 done: Optional[Completed] = None) -> None:
        self.pid, self.out_r, self.err_r, self.deadline = pid, out_r, err_r, deadline
        self.done = done

    def finish(self) -> Completed:
        if self.done is not None:
            return self.done
        try:
            output = _read_until_eof(self.out_r, self.err_r, self.deadline)
            status = _wait(self.pid, self.deadline) if output is not None else None
        except BaseException:
            self.cancel()
            raise
        self._close()
        if output is None or status is None:
            _kill_session(self.pid)
            self.done = Completed(None, b"", b"", timed_out=True)
        else:
            self.done = Completed(os.waitstatus_to_exitcode(status), output[0], output[1])
        return self.done

    def cancel(self) -> None:
        if self.done is None:
            self._close()
            _kill_session(self.pid)
            self.done = Completed(None, b"", b"", timed_out=True)

    def _close(self) -> None:
        for fd in (self.out_r, self.err_r):
            try:
                os.close(fd)
            except OSError:
                pass


def start(argv: Sequence[str], env: dict[str, str], timeout: float) -> Running:
    """run(), begun: the command runs while the caller does something else."""
    inherited = _inheritable_fds()
    if inherited is None or not _posix_spawn_starts_sessions():
        # subprocess closes every descriptor itself; it runs to its end here
        return Running(0, -1, -1, 0.0, done=_run_subprocess(argv, env, timeout))
    deadline = time.monotonic() + timeout
    out_r, out_w = _pipe()
    err_r, err_w = _pipe()
    try:
        pid = os.posix_spawn(argv[0], list(argv), env, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDWR, 0),  # as DEVNULL
            (os.POSIX_SPAWN_DUP2, out_w, 1),
            (os.POSIX_SPAWN_DUP2, err_w, 2),
        ] + [(os.POSIX_SPAWN_CLOSE, fd) for fd in inherited],
            setsid=True, setsigdef=(_signal.SIGPIPE, _signal.SIGXFSZ))
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    return Running(pid, out_r, err_r, deadline)


def _kill_session(pid: int) -> None:
    """SIGKILL the session ``pid`` leads (qstat and whatever it started) and reap ``pid``."""
    try:
        os.killpg(pid, _signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone: nothing left to kill
    os.waitpid(pid, 0)


def _posix_spawn_starts_sessions() -> bool:
    """Whether posix_spawn can setsid (glibc 2.26) and reports exec errors (2.24)."""
    try:
        name, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").split()
        major, minor = version.split(".")[:2]
        return name == "glibc" and (int(major), int(minor)) >= (2, 26)
    except (ValueError, OSError):
        return False


def _pipe() -> tuple[int, int]:
    """A pipe whose ends are above 0, 1 and 2 (which may be closed in a hook)."""
    ends = []
    for fd in os.pipe():
        if fd < 3:
            high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
            os.close(fd)
            fd = high
        ends.append(fd)
    return ends[0], ends[1]


def _inheritable_fds() -> Optional[list[int]]:
    """Descriptors above 2 that an exec would pass on (subprocess's close_fds); None if
    they can't be listed (no /proc, no descriptor left)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    fds = []
    for name in names:
        try:
            if int(name) > 2 and os.get_inheritable(int(name)):
                fds.append(int(name))
        except (ValueError, OSError):
            continue  # the listing's own descriptor, closed by now
    return fds


def _read_until_eof(out_fd: int, err_fd: int, deadline: float) -> Optional[tuple[bytes, bytes]]:
    """Both pipes' contents once both are closed; None at the deadline."""
    chunks: dict[int, list[bytes]] = {out_fd: [], err_fd: []}
    poller = select.poll()
    for fd in chunks:
        poller.register(fd, select.POLLIN)
    left = 2
    while left:
        wait = deadline - time.monotonic()
        if wait <= 0:
            return None
        for fd, _ in poller.poll(wait * 1000):
            data = os.read(fd, _CHUNK)
            if data:
                chunks[fd].append(data)
            else:
                poller.unregister(fd)
                left -= 1
    return b"".join(chunks[out_fd]), b"".join(chunks[err_fd])


def _wait(pid: int, deadline: float) -> Optional[int]:
    return wait_child(pid, deadline)


def wait_child(pid: int, deadline: float) -> Optional[int]:
    """Child ``pid``'s wait status once it exits; None at the ``deadline`` (monotonic).

    On a pidfd (Linux >= 5.3): woken the moment it exits, where polling with
    subprocess's growing pauses added ~1 ms to each wait of a job's hooks.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = -1
    try:
        pause = 0.0005
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            wait = deadline - time.monotonic()
            if wait <= 0:
                return None
            if pidfd >= 0:
                select.select([pidfd], [], [], wait)
            else:
                time.sleep(min(pause, wait))
                pause = min(pause * 2, 0.05)
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _run_subprocess(argv: Sequence[str], env: dict[str, str], timeout: float) -> Completed:
    import subprocess

    with subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=env, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, _signal.SIGKILL)
            except ProcessLookupError:
                pass  # already gone: nothing left to kill
            proc.wait()
            return Completed(None, b"", b"", timed_out=True)
    return Completed(proc.returncode, out, err)
