"""A lean pbs_mom for the benchmarks: runs the installed hooks as Torque 6.1 does, and times them.

Run as root by the harness, inside its private mount namespace. What tests/momemu.py does,
without its 5 ms polling, so the figures are the hooks' own: a forked "job child" per job
(the future job process) starts the prologue as its own child, in a session of its own,
with pbs_mom's argv, environment (tests.fakes.hook_environment), umask 0077, cwd mom_priv,
stdin /dev/null and stdout/stderr on the job's .OU/.ER files; it times it from
posix_spawn to waitpid. Then the job child either exits (the job is empty), holds (stays in
the job's cgroup until released) or becomes the job: chroot into PBS_O_ROOTDIR, drop to the
user, chdir home, exec /bin/sh -c SCRIPT with a release pipe as stdin. When the job child
is gone, the harness (as pbs_mom) runs the epilogue the same way (umask 0022) and times it.
Waiting is on pidfds and pipes, never on a timer.

Only processes started here are ever signalled, by pid (``Mom.kill_all``).
"""
import os
import select
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from tests import fakes

from .node import SERVER, USER, Node

USED = "cput=00:00:00,vmem=0kb,walltime=00:00:01,mem=0kb,energy_used=0"
_SIGDEF = (signal.SIGPIPE, signal.SIGXFSZ)


@dataclass
class Job:
    """One job and what became of it."""

    job_id: str
    variables: list
    body: str = "exit"              # exit | hold | shell
    script: str = ""
    prologue_cmd: tuple = ()        # e.g. (python, "-X", "importtime", "-IS"): before the hook
    epilogue_cmd: tuple = ()
    prologue_path: str = ""
    epilogue_path: str = ""
    hooks: bool = True              # False: pbs_mom without a prologue or epilogue
    # results
    pid: int = 0
    pro_ns: Optional[int] = None
    pro_rc: Optional[int] = None
    start_code: Optional[int] = None
    job_rc: Optional[int] = None
    epi_ns: Optional[int] = None
    epi_rc: Optional[int] = None
    t_start: int = 0
    t_running: Optional[int] = None
    t_done: Optional[int] = None
    stderr: str = ""
    stdout: str = ""
    release_w: Optional[int] = None
    _status_r: Optional[int] = None
    _pidfd: Optional[int] = None
    _epi_pid: int = 0
    _epi_pidfd: Optional[int] = None
    _epi_t0: int = 0
    _buf: bytes = b""
    env: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (self.pro_rc == 0 and self.epi_rc == 0 and self.job_rc == 0
                and (self.body != "shell" or self.start_code == 0))

    def failure(self) -> str:
        return (f"job {self.job_id}: prologue {self.pro_rc}, start {self.start_code}, "
                f"job {self.job_rc}, epilogue {self.epi_rc}; stderr: {self.stderr.strip()[:300]}")


class Mom:
    """Starts jobs and their hooks; ``step`` advances every live job without polling."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.ident = fakes.identity_of(USER)
        self.groups = tuple(os.getgrouplist(self.ident.user, self.ident.gid))
        self.live: list = []
        self.started: list = []   # every pid started here (job children, epilogues)
        os.chdir(node.mom_priv)   # the epilogue's cwd (posix_spawn cannot chdir)
        os.umask(0o022)           # the epilogue's umask

    # -- job files --------------------------------------------------------------------------
    def _prepare(self, job: Job) -> fakes.EmuJob:
        emu = fakes.EmuJob(job.job_id, self.ident.user, "", list(job.variables))
        data = fakes.qstat_xml(emu, server=SERVER, ident=self.ident)
        fakes.install_file(self.node.jobs_xml / f"{job.job_id}.xml", data, 0o644)
        for suffix in ("OU", "ER"):
            path = self.node.spool / f"{job.job_id}.{suffix}"
            fakes.install_file(path, b"", 0o600)
            os.chown(path, self.ident.uid, self.ident.gid)
        varlist = fakes.server_variable_list(emu, self.ident, SERVER)
        job.env = fakes.hook_environment(emu, varlist, str(self.node.pbs_home), SERVER)
        job.prologue_path = job.prologue_path or str(self.node.prologue)
        job.epilogue_path = job.epilogue_path or str(self.node.epilogue)
        return emu

    def _files(self, job: Job) -> tuple:
        return (str(self.node.spool / f"{job.job_id}.OU"),
                str(self.node.spool / f"{job.job_id}.ER"))

    # -- starting ---------------------------------------------------------------------------
    def start(self, job: Job) -> Job:
        emu = self._prepare(job)
        argv = [*job.prologue_cmd, job.prologue_path, job.job_id, emu.user, self.ident.group,
                emu.name, emu.resource_list, emu.queue, emu.account,
                str(self.node.mom_priv / "jobs" / f"{job.job_id}.SC")]
        release_r = None
        if job.body in ("hold", "shell"):
            release_r, job.release_w = os.pipe()
        status_r, status_w = os.pipe()
        job.t_start = time.perf_counter_ns()
        pid = os.fork()
        if pid == 0:
            code = 255
            try:
                code = _job_child(self, job, argv, status_w, release_r)
            except BaseException as e:  # noqa: B902 - never unwind into the harness
                os.write(2, f"job child: {e!r}\n".encode())
            finally:
                os._exit(code)
        os.close(status_w)
        if release_r is not None:
            os.close(release_r)
        job.pid, job._status_r, job._pidfd = pid, status_r, os.pidfd_open(pid)
        self.started.append(pid)
        self.live.append(job)
        return job

    def release(self, job: Job) -> None:
        if job.release_w is not None:
            os.close(job.release_w)
            job.release_w = None

    def _start_epilogue(self, job: Job) -> None:
        emu = fakes.EmuJob(job.job_id, self.ident.user, "")
        argv = [*job.epilogue_cmd, job.epilogue_path, job.job_id, emu.user, self.ident.group,
                emu.name, str(job.pid), emu.resource_list, USED, emu.queue, emu.account,
                str(job.job_rc if job.job_rc is not None else 0),
                str(self.node.mom_priv / "jobs" / f"{job.job_id}.SC")]
        out, err = self._files(job)
        actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 1, out, os.O_WRONLY | os.O_APPEND, 0),
                   (os.POSIX_SPAWN_OPEN, 2, err, os.O_WRONLY | os.O_APPEND, 0)]
        job._epi_t0 = time.perf_counter_ns()
        pid = os.posix_spawn(argv[0], argv, job.env, file_actions=actions, setsid=True,
                             setsigdef=_SIGDEF, setsigmask=())
        job._epi_pid, job._epi_pidfd = pid, os.pidfd_open(pid)
        self.started.append(pid)

    # -- advancing --------------------------------------------------------------------------
    def step(self, timeout: float) -> list:
        """Wait up to ``timeout`` s for something to happen; return the jobs that finished."""
        fds = {}
        for job in self.live:
            for fd in (job._status_r, job._pidfd, job._epi_pidfd):
                if fd is not None:
                    fds[fd] = job
        if not fds:
            return []
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN | select.POLLHUP)
        done = []
        for fd, _ in poller.poll(timeout * 1000):
            job = fds[fd]
            if fd == job._status_r:
                self._read_status(job)
            elif fd == job._pidfd and job._status_r is None:
                self._reap_job(job)
            elif fd == job._epi_pidfd:
                self._reap_epilogue(job)
                done.append(job)
        self.live = [j for j in self.live if j not in done]
        return done

    def _read_status(self, job: Job) -> None:
        assert job._status_r is not None
        chunk = os.read(job._status_r, 4096)
        if not chunk:
            os.close(job._status_r)
            job._status_r = None
            return
        job._buf += chunk
        while b"\n" in job._buf:
            line, job._buf = job._buf.split(b"\n", 1)
            words = line.decode().split()
            if words[0] == "P":
                job.pro_ns, job.pro_rc = int(words[1]), int(words[2])
            elif words[0] == "S":
                job.start_code = int(words[1])
                job.t_running = time.perf_counter_ns()

    def _reap_job(self, job: Job) -> None:
        _, status = os.waitpid(job.pid, 0)
        assert job._pidfd is not None
        os.close(job._pidfd)
        job._pidfd = None
        job.job_rc = os.waitstatus_to_exitcode(status)
        if not job.hooks:  # no epilogue installed
            job.epi_ns, job.epi_rc = 0, 0
            self._finish(job)
        elif job.pro_rc is not None:
            self._start_epilogue(job)
        else:  # the job child died before its prologue ended: nothing to tear down by us
            job.epi_rc = -1
            self._finish(job)

    def _reap_epilogue(self, job: Job) -> None:
        _, status = os.waitpid(job._epi_pid, 0)
        job.epi_ns = time.perf_counter_ns() - job._epi_t0
        job.epi_rc = os.waitstatus_to_exitcode(status)
        assert job._epi_pidfd is not None
        os.close(job._epi_pidfd)
        job._epi_pidfd = None
        self._finish(job)

    def _finish(self, job: Job) -> None:
        job.t_done = time.perf_counter_ns()
        out, err = self._files(job)
        job.stdout, job.stderr = (Path(p).read_text(errors="replace") for p in (out, err))
        for path in (out, err, str(self.node.jobs_xml / f"{job.job_id}.xml")):
            os.unlink(path)
        self.release(job)

    def run(self, job: Job, timeout: float = 120) -> Job:
        """Start one job and drive it to its end (its epilogue done)."""
        self.start(job)
        self.wait([job], timeout)
        return job

    def wait(self, jobs: list, timeout: float = 300,
             on_step: Optional[Callable[[], None]] = None) -> None:
        deadline = time.monotonic() + timeout
        while any(j.t_done is None for j in jobs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{sum(j.t_done is None for j in jobs)} job(s) not done "
                                   f"within {timeout} s")
            self.step(0.05 if on_step is None else 0.005)
            if on_step is not None:
                on_step()

    def kill_all(self) -> None:
        """SIGKILL whatever this Mom started that is still alive (by pid) and reap it."""
        for pid in self.started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self.live = []


# -- the job child (a forked copy of the harness) -------------------------------------------

def _job_child(mom: Mom, job: Job, argv: list, status_w: int, release_r: Optional[int]) -> int:
    os.setsid()
    os.umask(0o077)
    out, err = mom._files(job)
    keep = sorted({status_w} | ({release_r} if release_r is not None else set()))
    _stdio(release_r if job.body == "shell" else None, out, err)
    low = 3
    for fd in keep:  # nothing of the harness's reaches the hooks or the job
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))
    if not job.hooks:  # no prologue installed: straight on to the job
        os.write(status_w, b"P 0 0\n")
        return _become_job(mom, job, status_w) if job.body == "shell" else 0
    t0 = time.perf_counter_ns()
    pid = os.posix_spawn(argv[0], argv, job.env,
                         file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)],
                         setsid=True, setsigdef=_SIGDEF, setsigmask=())
    _, status = os.waitpid(pid, 0)
    ns = time.perf_counter_ns() - t0
    rc = os.waitstatus_to_exitcode(status)
    os.write(status_w, f"P {ns} {rc}\n".encode())
    if rc != 0:  # pbs_mom: 1 aborts the job, anything else requeues it
        return 0
    if job.body == "hold":
        assert release_r is not None
        while os.read(release_r, 4096):
            pass
        return 0
    if job.body == "shell":
        return _become_job(mom, job, status_w)
    return 0


def _stdio(stdin_fd: Optional[int], out: str, err: str) -> None:
    fd = os.open("/dev/null", os.O_RDONLY) if stdin_fd is None else stdin_fd
    os.dup2(fd, 0)
    for target, path in ((1, out), (2, err)):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.dup2(fd, target)
        os.close(fd)


def _become_job(mom: Mom, job: Job, status_w: int) -> int:
    """TMomFinalizeChild, shortened: chroot by name, drop to the user, chdir, exec."""
    rootdir = fakes.get_job_envvar(job.variables, "PBS_O_ROOTDIR")
    try:
        if rootdir is not None:
            os.chroot(rootdir)
        os.setgroups(list(mom.groups))
        os.setgid(mom.ident.gid)
        os.setuid(mom.ident.uid)
        os.chdir(mom.ident.home)
    except OSError as e:
        os.write(2, f"PBS: can't start the job: {e}\n".encode())
        os.write(status_w, b"S 254\n")
        return 254
    os.write(status_w, b"S 0\n")
    env = {"PATH": "/bin:/usr/bin", "HOME": mom.ident.home, "USER": mom.ident.user,
           "LOGNAME": mom.ident.user, "PBS_JOBID": job.job_id, "SHELL": "/bin/sh"}
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.execve("/bin/sh", ["sh", "-c", job.script], env)
    return 254
