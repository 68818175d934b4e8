"""Adopt a multi-node job's TM tasks into the job's cgroup on this node.

Run as root: forked, detached, by the prologue (mother superior of a job on
several nodes) or prologue.parallel (a sister). Torque's pbs_mom starts every
TM task (pbsdsh, mpiexec's tm_spawn) itself, in start_process(): a child of
the pbs_mom daemon in a session of its own, chrooted into PBS_O_ROOTDIR,
never a descendant of the job shell and never in a cgroup pbs_chroot made
(docs/torque-multinode.md). No hook runs per task, so this process watches
the kernel's process events (the netlink proc connector, connector(4)):

- FORK of a direct child of pbs_mom: it is still pbs_mom's code (start_process
  sets up stdio, the session, limits, chroot and the user before it execs),
  so it is seized with ptrace(2) (PTRACE_SEIZE, PTRACE_O_TRACEEXEC) and
  stops at its exec before one instruction of the new program runs. There its
  environment names the job (pbs_mom sets PBS_JOBID itself, over anything the
  spawner sent): a job with a cgroup on this node gets the process, which is
  then let go (PTRACE_DETACH). Any other stop lets it go at once, the signal
  re-delivered. Nothing else of pbs_mom's children is touched.
- EXEC of a direct child of pbs_mom that could not be seized before its exec
  (the FORK event came late) -> seized now if it was not, stopped
  (PTRACE_INTERRUPT), placed and let go: the late path. The job starter
  (starter/job_starter.c, pbs_mom's $job_starter) holds a TM task of a job on
  several cores or nodes until a cgroup of its job shows in /proc/self/cgroup,
  so nothing of the user's runs before. (Another adopter holding it places it.)
- FORK of an adopted process -> its child too (forked before its parent was
  moved, or it would be in the cgroup already).

Trusts pbs_mom's pid (the hook's parent or grandparent, checked by the hook)
and the job records; nothing the job's user controls decides where a process
goes. Torque built with cgroups does this itself (start_process joins its job
cgroup; lifecycle then uses that cgroup and starts no adopter). The process
ends when the job's record goes (epilogue, reconciler) or its cgroup does,
and end_job kills it.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time

from . import _sys
from .errors import CgroupError
from . import log as _log
from .log import get_logger

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Optional

    from .cgroups import JobCgroup

__all__ = ["start", "stop", "Adopter", "proc_starttime", "children_of"]

log = get_logger(__name__)

# linux/connector.h, linux/cn_proc.h
_NETLINK_CONNECTOR = 11
_CN_IDX_PROC = 1
_CN_VAL_PROC = 1
_PROC_CN_MCAST_LISTEN = 1
_PROC_EVENT_FORK = 0x1
_PROC_EVENT_EXEC = 0x2
_PROC_EVENT_EXIT = 0x80000000
_NLMSG_DONE = 3
_NLMSG_HDR = struct.Struct("=IHHII")        # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")          # idx, val, seq, ack, len, flags
_EVENT_HDR = struct.Struct("=IIQ")          # what, cpu, timestamp_ns
_TICK = 1.0                                 # how often the record is checked
_HOLD = 0.5                                 # the longest wait for a task's stop


def proc_starttime(pid: int) -> Optional[int]:
    """Field 22 of /proc/PID/stat (start time in clock ticks), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _ppid(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def children_of(pid: int) -> list[int]:
    """The children of every thread of ``pid`` (/proc/PID/task/TID/children, proc(5))."""
    kids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(p) for p in f.read().split()]
        except (OSError, ValueError):
            continue
    return kids


def _job_of(pid: int) -> Optional[str]:
    """The PBS_JOBID of the process's initial environment (pbs_mom sets it); None if there
    is none, or more than one value (a user may add copies: then no job is chosen, and
    the job starter, which reads every copy the same way, refuses to run the task)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return None
    ids = {entry[10:] for entry in env.split(b"\0") if entry.startswith(b"PBS_JOBID=")}
    return ids.pop().decode("utf-8", "replace") if len(ids) == 1 else None


def _uid_of(pid: int) -> Optional[int]:
    """The real uid of ``pid`` (proc(5) status)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class Adopter:
    """The watch of one job on one node: pbs_mom's pid, the job, its cgroup."""

    def __init__(self, mom_pid: int, job_id: str, cgroup: JobCgroup,
                 alive: Callable[[], bool],
                 cgroup_for: Callable[[str], Optional[JobCgroup]],
                 owner: Optional[Callable[[str], Optional[int]]] = None) -> None:
        self.mom_pid = mom_pid
        self.job_id = job_id
        self.cgroup = cgroup
        self.alive = alive            # False once the job's record is gone
        self.cgroup_for = cgroup_for  # another job's cgroup on this node, or None
        self._owner = owner           # the uid of a job's user (None: unknown)
        self._owners: dict[str, Optional[int]] = {}
        self.adopted: set[int] = set()
        self.traced: set[int] = set()
        self.wake: Optional[int] = None  # readable when a SIGCHLD came (run())

    def listen(self) -> socket.socket:
        """A proc connector socket subscribed to process events (needs CAP_NET_ADMIN)."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_CONNECTOR)
        sock.bind((0, _CN_IDX_PROC))
        op = struct.pack("=I", _PROC_CN_MCAST_LISTEN)
        cn = _CN_MSG.pack(_CN_IDX_PROC, _CN_VAL_PROC, 0, 0, len(op), 0) + op
        sock.send(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(cn), _NLMSG_DONE, 0, 0, 0) + cn)
        return sock

    def owner(self, job_id: str) -> Optional[int]:
        """The uid of ``job_id``'s user, looked up once (a record and a passwd lookup)."""
        if job_id in self._owners or self._owner is None:
            return self._owners.get(job_id)
        uid = self._owner(job_id)
        if uid is not None:  # (a job whose record is not there yet is asked again)
            self._owners[job_id] = uid
        return uid

    def _job(self, pid: int) -> Optional[str]:
        """The job ``pid`` is a task of: its PBS_JOBID, if the process is that job's user's.

        Once a task runs, its environment is its user's to rewrite: a process
        claiming another user's job is never moved into that job's cgroup.
        """
        job_id = _job_of(pid)
        if job_id is None or self._owner is None:
            return job_id
        uid = _uid_of(pid)
        return job_id if uid is not None and uid == self.owner(job_id) else None

    def scan(self) -> None:
        """Adopt the job's tasks that pbs_mom started before (or while events were lost)."""
        for pid in children_of(self.mom_pid):
            if pid not in self.adopted and self._job(pid) == self.job_id:
                self.adopt_tree(pid)

    def _resync(self) -> None:
        """After lost events: what is adopted is what the cgroup holds now (an EXIT missed
        would leave a pid that the kernel may give to anyone's process), then a scan."""
        try:
            self.adopted = set(self.cgroup.procs())
        except CgroupError:
            self.adopted = set()
        self.scan()

    def adopt_tree(self, pid: int) -> None:
        """Move ``pid`` and its descendants into the job's cgroup (only the job user's)."""
        owner = self.owner(self.job_id)
        todo = [pid]
        while todo:
            p = todo.pop()
            if p in self.adopted or p == os.getpid():
                continue
            if owner is not None and _uid_of(p) != owner:
                continue  # not the job's user's: never moved into its cgroup
            try:
                self.cgroup.attach(p)
            except CgroupError as e:  # gone meanwhile (ESRCH), or the cgroup is gone
                log.debug("job %s: can't adopt %d: %s", self.job_id, p, e.detail)
                continue
            self.adopted.add(p)
            log.debug("job %s: adopted process %d", self.job_id, p)
            todo += children_of(p)

    def _adopt_late(self, pid: int) -> None:
        """A task of this job that exec'd unseized: place it (and what it forked) now."""
        try:
            late = pid not in self.cgroup.procs()  # the job shell is there already
        except CgroupError:
            late = True
        self.adopt_tree(pid)
        if late:
            log.warning("job %s: TM task %d exec'd before it could be seized: placed "
                        "at its exec event (the job starter holds it until then)",
                        self.job_id, pid)

    def on_event(self, what: int, data: bytes) -> None:
        """Handle one proc connector event."""
        if what == _PROC_EVENT_FORK:
            _, parent_tgid, child_pid, child_tgid = struct.unpack_from("=IIII", data)
            if child_pid != child_tgid:
                return  # a thread
            if parent_tgid == self.mom_pid:
                self._seize(child_pid)
            elif parent_tgid in self.adopted:
                self.adopt_tree(child_pid)
        elif what == _PROC_EVENT_EXEC:
            pid, tgid = struct.unpack_from("=II", data)
            if pid != tgid or pid in self.adopted:
                return
            if pid in self.traced:
                # A stopped tracee sends this event only once let go: so it exec'd
                # before the seize took hold, and no exec stop will come.
                self._hold_and_place(pid)
            elif _ppid(pid) == self.mom_pid and self._job(pid) == self.job_id:
                try:  # unseized (its FORK event came late): hold it while it is placed
                    _sys.ptrace(_sys.PTRACE_SEIZE, pid, _sys.PTRACE_O_TRACEEXEC)
                except OSError as e:  # gone, or another adopter holds it (and places it)
                    if e.errno == errno.EPERM:  # (another job's adopter, usually)
                        log.debug("job %s: TM task %d is traced by another process",
                                  self.job_id, pid)
                    self._adopt_late(pid)
                    return
                self.traced.add(pid)
                self._hold_and_place(pid)
        elif what == _PROC_EVENT_EXIT:
            pid, tgid = struct.unpack_from("=II", data)
            if pid == tgid:
                self.adopted.discard(pid)

    def _hold_and_place(self, pid: int) -> None:
        """Stop a traced task that exec'd unplaced, place it, let it go: the job starter
        (job_starter.c) runs nothing of the user's until a cgroup of its job shows in
        /proc/self/cgroup, and on cgroup v1 that is several writes, all done while
        the task is stopped."""
        try:
            _sys.ptrace(_sys.PTRACE_INTERRUPT, pid)
        except OSError:  # ended meanwhile
            self.traced.discard(pid)
            return
        deadline = time.monotonic() + _HOLD
        while True:
            try:
                done, status = os.waitpid(pid, _sys.WALL | os.WNOHANG)
            except ChildProcessError:
                self.traced.discard(pid)
                return
            left = deadline - time.monotonic()
            if done or left <= 0:
                break
            if self.wake is None:
                time.sleep(0.0002)
            elif select.select([self.wake], [], [], left)[0]:  # a tracee's stop: SIGCHLD
                while _drain(self.wake):
                    pass
        if done and not os.WIFSTOPPED(status):  # exited or killed
            self.traced.discard(pid)
            return
        self._place(pid, late=True)
        if done:  # else: its stop comes later, and reap_traced lets it go
            event = status >> 16
            self._release(pid, os.WSTOPSIG(status) if event == 0 else 0)

    def _seize(self, pid: int) -> None:
        """Trace pbs_mom's new child until its exec (or any other stop)."""
        try:
            _sys.ptrace(_sys.PTRACE_SEIZE, pid, _sys.PTRACE_O_TRACEEXEC)
        except OSError as e:  # EPERM: another adopter holds it
            if e.errno == errno.ESRCH:
                log.warning("job %s: pbs_mom's child %d ended before it could be seized: "
                            "if it was a TM task, it ran outside any job cgroup",
                            self.job_id, pid)
            return
        self.traced.add(pid)

    def reap_traced(self) -> None:
        """Handle the stops of seized processes: place at exec, then let go."""
        for pid in list(self.traced):
            try:
                done, status = os.waitpid(pid, _sys.WALL | os.WNOHANG)
            except ChildProcessError:
                self.traced.discard(pid)
                continue
            if not done:
                continue
            if not os.WIFSTOPPED(status):  # exited or killed before its exec
                self.traced.discard(pid)
                continue
            sig, event = os.WSTOPSIG(status), status >> 16
            if event == _sys.PTRACE_EVENT_EXEC:
                self._place(pid)
            self._release(pid, sig if event == 0 else 0)

    def _place(self, pid: int, late: bool = False) -> None:
        job_id = self._job(pid)
        if job_id == self.job_id:
            self._adopt_late(pid) if late else self.adopt_tree(pid)
        elif job_id is not None:
            cg = self.cgroup_for(job_id)
            if cg is not None:
                try:
                    cg.attach(pid)
                except CgroupError as e:
                    log.debug("job %s: can't place %d: %s", job_id, pid, e.detail)

    def _release(self, pid: int, sig: int) -> None:
        self.traced.discard(pid)
        try:
            _sys.ptrace(_sys.PTRACE_DETACH, pid, sig)
        except OSError:
            pass

    def run(self, sock: socket.socket) -> None:
        """Handle events until the job's record or cgroup is gone."""
        import signal
        wake_r, wake_w = os.pipe()  # a tracee's stop sends SIGCHLD to its tracer
        os.set_blocking(wake_w, False)
        os.set_blocking(wake_r, False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.set_wakeup_fd(wake_w)
        self.wake = wake_r
        self.scan()
        mom = proc_starttime(self.mom_pid)
        while self.alive() and self.cgroup.exists():
            if proc_starttime(self.mom_pid) != mom:
                # pbs_mom restarted: its pid may be anyone's now, whose children
                # must never be seized. (The reconciler has the job from here.)
                log.warning("job %s: pbs_mom %d is gone: the task adopter stops",
                            self.job_id, self.mom_pid)
                break
            ready = select.select([sock, wake_r], [], [], _TICK)[0]
            if wake_r in ready:
                while _drain(wake_r):
                    pass
            if sock in ready:
                try:
                    data = sock.recv(1 << 16)
                except OSError:  # ENOBUFS: events were dropped; look again
                    self._resync()
                    data = b""
                self._dispatch(data)
            self.reap_traced()
        for pid in list(self.traced):
            self._release(pid, 0)

    def _dispatch(self, data: bytes) -> None:
        off = 0
        while off + _NLMSG_HDR.size <= len(data):
            length = _NLMSG_HDR.unpack_from(data, off)[0]
            body = off + _NLMSG_HDR.size + _CN_MSG.size
            if length < _NLMSG_HDR.size or body + _EVENT_HDR.size > len(data):
                return
            what = _EVENT_HDR.unpack_from(data, body)[0]
            self.on_event(what, data[body + _EVENT_HDR.size:off + length])
            off += (length + 3) & ~3


def _drain(fd: int) -> bool:
    try:
        return bool(os.read(fd, 512))
    except BlockingIOError:
        return False


def start(job_id: str, mom_pid: int, cgroup: JobCgroup, alive: Callable[[], bool],
          cgroup_for: Callable[[str], Optional[JobCgroup]],
          owner: Optional[Callable[[str], Optional[int]]] = None) -> tuple[int, int]:
    """Fork the detached adopter; return its (pid, start time) once it listens.

    Returns after the proc connector socket is subscribed, so a task pbs_mom
    starts after the hook has ended is seen; those started earlier are found
    by the first scan.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the middle child: exits at once, so the adopter is nobody's child
        os.close(r)
        code = 1
        try:
            os.setsid()
            grandchild = os.fork()
            if grandchild == 0:
                _adopter_main(Adopter(mom_pid, job_id, cgroup, alive, cgroup_for, owner), w)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        reply = f.read().split()
    if len(reply) != 2 or reply[0] != b"ok":
        raise CgroupError(f"job {job_id}: the task adopter did not start: "
                          f"{b' '.join(reply).decode(errors='replace') or 'no reply'}")
    adopter = int(reply[1])
    return adopter, proc_starttime(adopter) or 0


def _adopter_main(adopter: Adopter, w: int) -> None:
    """The adopter's body; never returns."""
    code = 0
    try:
        null = os.open(os.devnull, os.O_RDWR)
        # Nothing of the hook's stays open for the job's lifetime: its syslog socket, a
        # lock's file, the hook server's connection, a pipe pbs_mom waits on. Each number
        # gets /dev/null rather than being closed, so an object of the hook's that closes
        # its number later closes only that, never a socket of ours that took it.
        _log.reset()
        for fd in (0, 1, 2, *_open_fds()):
            if fd not in (w, null):
                os.dup2(null, fd)
        os.chdir("/")
        try:  # the hook shielded itself from the OOM killer; a long-lived daemon must not be
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("0")
        except OSError:
            pass
        try:
            sock = adopter.listen()
        except OSError as e:
            os.write(w, f"can't listen to process events: {e.strerror}".encode())
            raise
        os.write(w, f"ok {os.getpid()}".encode())
        os.close(w)
        log.info("job %s: adopting the TM tasks pbs_mom %d starts", adopter.job_id,
                 adopter.mom_pid)
        adopter.run(sock)
    except BaseException as e:  # noqa: B902 - a forked child must never unwind into its parent
        log.error("job %s: task adopter failed: %r", adopter.job_id, e)
        code = 1
    finally:
        os._exit(code)


def _open_fds() -> list[int]:
    try:
        return [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: the numbers a hook can have
        return list(range(3, 256))


def stop(pid: int, starttime: int) -> None:
    """SIGKILL the adopter ``pid`` if it is still the one started at ``starttime``."""
    if proc_starttime(pid) != starttime:
        return  # gone (or the pid was reused): nothing of ours to end
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass
