"""Emulates Torque 6.1 pbs_mom running one node's jobs: prologue, chroot, job shell, epilogue.

Test infrastructure, not product. Run by the test process as root (single-threaded): it forks
a "job child" per job, which runs PBS_HOME/mom_priv/prologue as its own child, then does what
TMomFinalizeChild does (chroot to the first PBS_O_ROOTDIR* entry, become the user, chdir, exec
the login shell with the .SC path on a pipe); when the job ends, the emulator (as pbs_mom) runs
mom_priv/epilogue. Facts: shared/fixtures/torque-6.1 and Torque's resmom/start_exec.c and
prolog.c. Trusts the test driving it, not the hooks: they are SIGKILLed by session on their
alarm, and a wait() timeout kills and reaps all it started.

Torque behaviour kept here that a product must survive: a missing prologue counts as success,
and so does one killed by a signal other than pbs_mom's alarm (prolog.c reads WEXITSTATUS
only), so the job runs; a prologue refused by mom's permission check (-1) requeues the job;
a failed chdir to PBS_O_INITDIR (else home) fails the job ("PBS: chdir to '...' failed: ...",
exit 254); the shell is a login shell ("-sh": $source_login_batch defaults to true).
"""

import os
import shutil
import stat
import signal
import time
import traceback
import uuid
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from . import fakes

__all__ = [
    "EmuJob", "EmuResult", "MomEmulator", "RunningJob", "install_hook", "JOB_EXEC_FAIL2",
    "JOB_EXEC_RETRY", "PELOG_REFUSED", "PELOG_TIMEOUT",
]

EmuJob = fakes.EmuJob
install_hook = fakes.install_hook

JOB_EXEC_FAIL2 = -2      # start failed, no retry: prologue exit 1, chroot/chdir failure
JOB_EXEC_RETRY = -3      # requeue: any other prologue failure
PELOG_REFUSED = -1       # run_pelog(): the script failed the permission check
PELOG_TIMEOUT = -4       # run_pelog(): $prologalarm fired, session killed
PELOG_UNKILLABLE = -5    # run_pelog(): still alive 5 s after the SIGKILL
KILL_GRACE = 5.0         # pbs_mom's alarm(5) after killing a hook
POLL = 0.005


@dataclass
class EmuResult:
    """What became of one job. rc values are waitpid's, decoded like subprocess (signal -> -N)."""

    prologue_rc: int          # -1 refused, 0 if absent, -3 if the job child died first
    action: str               # "ran", "aborted", "requeued", "prologue_refused"; "killed" is
    #                           what poll() holds after a wait timeout or cleanup()
    job_rc: Optional[int]     # None unless the prologue passed; 254 if chroot/chdir failed
    epilogue_rc: Optional[int]  # None if there is no epilogue, -1 if refused
    stdout: str
    stderr: str
    mom_prologue_rc: int = 0  # run_pelog()'s value: exit code, 0 on signal, -1, -4, -5
    exit_status: int = 0      # EXIT_STATUS given to the epilogue (-2/-3 if not started)
    session_id: int = 0       # SESSION given to the epilogue (0 if not started)


@dataclass(frozen=True)
class _Plan:
    """Everything the job child needs, computed before the fork."""

    mom_priv: str
    sc_path: str
    ou_path: str
    er_path: str
    nodefile: str
    nodefile_text: str
    prologue_argv: tuple
    hook_env: dict
    job_env: dict
    rootdir: Optional[str]
    initdir: str
    uid: int
    gid: int
    groups: tuple
    shell: str
    argv0: str
    alarm: float
    job_starter: Optional[str] = None


# ---- process helpers (used in forked children and in the emulator) ----

def _run_child(body: Callable[[], int]) -> None:
    """Run body in a forked child and _exit with its code; never return into the test."""
    code = 255
    try:
        code = body()
    except BaseException:  # noqa: B902 - a forked child must never unwind into pytest
        _write(2, traceback.format_exc())
    finally:
        os._exit(code)


def _write(fd: int, text: str) -> None:
    with suppress(OSError):
        os.write(fd, text.encode("utf-8", "surrogateescape"))


def _reset_signals() -> None:
    """Undo what CPython does to signals, so exec'd programs start as under a C daemon."""
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _close_fds(keep: set) -> None:
    for name in os.listdir("/proc/self/fd"):
        if int(name) not in keep:
            with suppress(OSError):
                os.close(int(name))


def _dup_to(path: str, fd: int, flags: int) -> None:
    src = os.open(path, flags)
    if src != fd:
        os.dup2(src, fd)
        os.close(src)


def _session_members(sid: int) -> list:
    """Live (non-zombie) processes whose session id is sid, from /proc/PID/stat."""
    members = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != b"Z" and int(name) not in (os.getpid(), 1):
            members.append(int(name))
    return members


def _kill_session(sid: int) -> None:
    """SIGKILL a session, as pbs_mom's pelogalm()/kill_job() do, until no member is alive
    (SIGKILL is asynchronous; bounded by KILL_GRACE for processes stuck in the kernel)."""
    deadline = time.monotonic() + KILL_GRACE
    members = _session_members(sid)
    while members and time.monotonic() < deadline:
        for pid in members:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(POLL)
        members = _session_members(sid)


def _spawn_hook(argv: list, env: dict, out: tuple = (), cwd: Optional[str] = None,
                umask: Optional[int] = None) -> int:
    """Fork a hook in its own session: stdin /dev/null, stdout/stderr appended to `out`
    (epilogue) or inherited (the prologue: pbs_mom's PE_IO_TYPE_ASIS)."""
    pid = os.fork()
    if pid == 0:
        _run_child(lambda: _exec_hook(argv, env, out, cwd, umask))
    return pid


def _exec_hook(argv: list, env: dict, out: tuple, cwd: Optional[str],
               umask: Optional[int]) -> int:
    os.setsid()
    _reset_signals()
    if umask is not None:
        os.umask(umask)
    if cwd is not None:
        os.chdir(cwd)
    _dup_to("/dev/null", 0, os.O_RDONLY)
    for fd, path in zip((1, 2), out):
        try:
            _dup_to(path, fd, os.O_WRONLY | os.O_APPEND)
        except OSError:
            _dup_to("/dev/null", fd, os.O_WRONLY)
    _close_fds({0, 1, 2})
    try:
        os.execve(argv[0], argv, env)
    except OSError as err:
        _write(2, f"execv of {argv[0]} failed: {err.strerror}\n")
    return 255


class _HookRun:
    """One running hook under pbs_mom's alarm: on expiry SIGKILL its session, wait 5 s more."""

    def __init__(self, pid: int, alarm: float) -> None:
        self.pid = pid
        self.deadline = time.monotonic() + alarm
        self.killed_at: Optional[float] = None
        self.status: Optional[int] = None
        self.mom_rc: Optional[int] = None

    def poll(self) -> Optional[int]:
        """Advance without blocking; run_pelog()'s value once known."""
        if self.mom_rc is not None:
            return self.mom_rc
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        now = time.monotonic()
        if pid:
            self.status = status
            exited = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 0
            self.mom_rc = PELOG_TIMEOUT if self.killed_at is not None else exited
        elif self.killed_at is None and now >= self.deadline:
            self.killed_at = now
            with suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            _kill_session(self.pid)
        elif self.killed_at is not None and now >= self.killed_at + KILL_GRACE:
            self.mom_rc = PELOG_UNKILLABLE
        return self.mom_rc

    @property
    def rc(self) -> int:
        """The exit status as waitpid decodes it (-9 if it never could be reaped)."""
        return -signal.SIGKILL if self.status is None else os.waitstatus_to_exitcode(self.status)


# ---- the job child: TMomFinalizeChild ----

def _send(fd: int, message: str) -> None:
    os.write(fd, (message + "\n").encode())


def _job_child(plan: _Plan, status_fd: int) -> int:
    """Become the job: prologue, chroot, user, chdir, exec. Reports on status_fd:
    "P pid" (prologue forked), "R rc mom_rc" (prologue done), "S code" (0 = exec'ing)."""
    os.setsid()
    os.chdir(plan.mom_priv)
    _close_fds({0, 1, 2, status_fd})
    fd = os.open(plan.nodefile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    os.write(fd, plan.nodefile_text.encode("utf-8", "surrogateescape"))
    os.close(fd)
    os.umask(0o077)
    _job_stdio(plan)
    mom_rc = _run_prologue(plan, status_fd)
    code = 0 if mom_rc == 0 else JOB_EXEC_FAIL2 if mom_rc == 1 else JOB_EXEC_RETRY
    if code == 0:
        code = _enter_job(plan)
    _send(status_fd, f"S {code}")
    if code:
        return code & 0xFF
    _reset_signals()
    if plan.job_starter:
        # TMomFinalizeChild with $job_starter: STARTER SHELL, the shell's full
        # path and no login "-" (fixtures: env.job_starter.*, strace_mom_job_children).
        with suppress(OSError):
            os.execve(plan.job_starter, [plan.job_starter, plan.shell], plan.job_env)
        _write(2, f"PBS: exec of job starter '{plan.job_starter[:256]}' failed\n")
        return 254
    with suppress(OSError):
        os.execve(plan.shell, [plan.argv0], plan.job_env)
    _write(2, f"PBS: exec of shell '{plan.shell[:256]}' failed\n")
    return 254


def _job_stdio(plan: _Plan) -> None:
    """stdin: a pipe holding the .SC path (SHELL_INVOKE); stdout/stderr: the spool files."""
    r, w = os.pipe()
    os.write(w, (plan.sc_path + "\n").encode("utf-8", "surrogateescape"))
    os.close(w)
    if r != 0:
        os.dup2(r, 0)
        os.close(r)
    _dup_to(plan.ou_path, 1, os.O_WRONLY | os.O_APPEND)
    _dup_to(plan.er_path, 2, os.O_WRONLY | os.O_APPEND)


def _run_prologue(plan: _Plan, status_fd: int) -> int:
    """run_pelog(PE_PROLOG) in the job child; returns its value (0 = go on)."""
    refusal = fakes.check_pelog(plan.prologue_argv[0])
    if refusal is not None:
        _send(status_fd, f"R {refusal} {refusal}")
        return refusal
    hook = _HookRun(_spawn_hook(list(plan.prologue_argv), plan.hook_env), plan.alarm)
    _send(status_fd, f"P {hook.pid}")
    mom_rc = hook.poll()
    while mom_rc is None:
        time.sleep(POLL)
        mom_rc = hook.poll()
    _send(status_fd, f"R {hook.rc} {mom_rc}")
    return mom_rc


def _enter_job(plan: _Plan) -> int:
    """chroot (first PBS_O_ROOTDIR*), become the user, chdir: 0 or JOB_EXEC_FAIL2, having
    written pbs_mom's message to the job's stderr."""
    steps: list = [(os.chroot, plan.rootdir, "TMomFinalizeChild - PBS: chroot to '{}' failed: {}")]
    steps = steps if plan.rootdir is not None else []
    steps += [(lambda uid: _become(plan), str(plan.uid), "PBS: cannot become uid {}: {}"),
              (os.chdir, plan.initdir, "PBS: chdir to '{}' failed: {}")]
    for call, arg, message in steps:
        try:
            call(arg)
        except OSError as err:
            _write(2, message.format(arg[:256], err.strerror) + "\n")
            return JOB_EXEC_FAIL2
    return 0


def _become(plan: _Plan) -> None:
    os.setgroups(list(plan.groups))
    os.setgid(plan.gid)
    os.setuid(plan.uid)


# ---- the emulator: pbs_mom's side ----

class MomEmulator:
    """One pbs_mom with PBS_HOME=pbs_home, and a fake server (qstat, pbsnodes) beside it in
    pbs_home/fake_server. hook_env is added to the hooks' environment (fault injection)."""

    def __init__(self, pbs_home: Path, *, server: str = "vm", prologue_alarm: float = 300.0,
                 hook_env: Optional[dict] = None, source_login_batch: bool = True) -> None:
        self.pbs_home = Path(os.path.abspath(pbs_home))
        self.server = server
        self.prologue_alarm = prologue_alarm
        self.hook_env = dict(hook_env or {})
        self.source_login_batch = source_login_batch
        self.mom_priv = self.pbs_home / "mom_priv"
        self.prologue_path = self.mom_priv / "prologue"
        self.epilogue_path = self.mom_priv / "epilogue"
        self.fake_server = self.pbs_home / "fake_server"
        for path, mode in ((self.pbs_home, 0o755), (self.mom_priv, 0o751),
                           (self.mom_priv / "jobs", 0o751), (self.pbs_home / "spool", 0o1777),
                           (self.pbs_home / "aux", 0o755), (self.fake_server, 0o755)):
            if not path.exists():
                path.mkdir(mode)
                os.chmod(path, mode)
        self.qstat_jobs_dir = self.fake_server / "jobs"
        self.qstat_path = fakes.write_fake_qstat(self.fake_server / "bin", self.qstat_jobs_dir)
        self.pbsnodes_log = self.fake_server / "pbsnodes.log"
        self.pbsnodes_path = fakes.write_fake_pbsnodes(self.fake_server / "bin",
                                                       self.pbsnodes_log)
        self._jobs: list = []

    def start(self, job: EmuJob) -> "RunningJob":
        """Write the job's files and fork its job child; returns at once."""
        if os.geteuid() != 0:
            raise PermissionError("MomEmulator.start needs root (chown, chroot, setuid)")
        job.validate()
        ident = fakes.identity_of(job.user)
        plan = self._plan(job, ident)
        _write_owned(plan.sc_path, job.script.encode("utf-8", "surrogateescape"), 0o700, ident)
        _write_owned(plan.ou_path, b"", 0o600, ident)
        _write_owned(plan.er_path, b"", 0o600, ident)
        self.write_qstat_xml(job, ident)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            _run_child(lambda: _job_child(plan, w))
        os.close(w)
        os.set_blocking(r, False)
        running = RunningJob(self, job, ident, plan, pid, r)
        self._jobs.append(running)
        return running

    def run(self, job: EmuJob, timeout: float = 60) -> EmuResult:
        """start + wait."""
        return self.start(job).wait(timeout)

    def wait_all(self, jobs: list, timeout: float = 60) -> list:
        """Wait for several RunningJobs at once (their epilogues overlap, as on a mom)."""
        deadline = time.monotonic() + timeout
        while None in [job.poll() for job in jobs]:
            if time.monotonic() >= deadline:
                for job in jobs:
                    job.kill()
                raise TimeoutError(f"{len(jobs)} jobs not done within {timeout} s (killed)")
            time.sleep(POLL)
        return [job.poll() for job in jobs]

    def cleanup(self) -> None:
        """Kill and reap whatever is still running; remove the fake server directory."""
        for job in self._jobs:
            job.kill()
        self._jobs.clear()
        if self.fake_server.exists():
            shutil.rmtree(self.fake_server)

    def __enter__(self) -> "MomEmulator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def write_qstat_xml(self, job: EmuJob, ident: fakes.Identity,
                        session_id: Optional[int] = None) -> None:
        """(Re)write what the fake qstat answers for this job."""
        data = fakes.qstat_xml(job, server=self.server, session_id=session_id, ident=ident)
        fakes.install_file(self.qstat_jobs_dir / f"{job.job_id}.xml", data, 0o644)

    def _plan(self, job: EmuJob, ident: fakes.Identity) -> _Plan:
        varlist = fakes.server_variable_list(job, ident, self.server)
        shell = job.shell or ident.login_shell or "/bin/sh"
        name, home = os.path.basename(shell), str(self.pbs_home)
        sc_path = str(self.mom_priv / "jobs" / f"{job.job_id}.SC")
        hook_env = fakes.hook_environment(job, varlist, home, self.server)
        hook_env.update(self.hook_env)
        initdir = fakes.get_job_envvar(varlist, "PBS_O_INITDIR")
        return _Plan(
            mom_priv=str(self.mom_priv), sc_path=sc_path,
            ou_path=f"{home}/spool/{job.job_id}.OU", er_path=f"{home}/spool/{job.job_id}.ER",
            nodefile=f"{home}/aux/{job.job_id}",
            nodefile_text=fakes.nodefile_text(job, varlist, self.server),
            prologue_argv=(str(self.prologue_path), job.job_id, job.user, ident.group,
                           job.name, job.resource_list, job.queue, job.account, sc_path),
            hook_env=hook_env,
            job_env=fakes.job_environment(job, varlist, ident, home, self.server, shell,
                                          uuid.uuid4().hex.upper()),
            rootdir=fakes.get_job_envvar(varlist, "PBS_O_ROOTDIR"),
            initdir=ident.home if initdir is None else initdir,
            uid=ident.uid, gid=ident.gid, groups=tuple(os.getgrouplist(ident.user, ident.gid)),
            shell=shell, argv0=("-" + name) if self.source_login_batch else name,
            alarm=self.prologue_alarm, job_starter=self.job_starter())

    def job_starter(self) -> Optional[str]:
        """$job_starter of mom_priv/config (mom_job_starter)."""
        return mom_job_starter(self.mom_priv)


def mom_job_starter(mom_priv: Path) -> Optional[str]:
    """$job_starter of mom_priv/config, as pbs_mom's jobstarter() takes it: the last such
    line, kept only if it stat()s on the host as executable by its owner."""
    found = None
    config = mom_priv / "config"
    for line in config.read_text().splitlines() if config.exists() else []:
        words = line.split(None, 1)
        if words and words[0] == "$job_starter" and len(words) == 2:
            try:
                ok = os.stat(words[1].strip()).st_mode & stat.S_IXUSR
            except OSError:
                ok = 0
            found = words[1].strip() if ok else found
    return found


def _write_owned(path: str, data: bytes, mode: int, ident: fakes.Identity) -> None:
    if os.path.lexists(path):
        raise FileExistsError(f"{path} exists: a job with this id is on the mom already")
    fakes.install_file(Path(path), data, mode)
    os.chown(path, ident.uid, ident.gid)


class RunningJob:
    """A started job: `pid` is the job child (the future job process, the prologue's parent);
    poll() advances it without blocking, wait() drives it to its EmuResult."""

    def __init__(self, emu: MomEmulator, job: EmuJob, ident: fakes.Identity, plan: _Plan,
                 pid: int, status_fd: int) -> None:
        self.job = job
        self.pid = pid
        self._emu, self._ident, self._plan = emu, ident, plan
        self._fd: Optional[int] = status_fd
        self._buf = b""
        self._prologue_pid: Optional[int] = None
        self._prologue: Optional[tuple] = None    # (rc, mom rc)
        self._start: Optional[int] = None
        self._t0 = time.monotonic()
        self._status: Optional[int] = None     # the job child's wait status
        self._used = ""                         # resources_used, once it ran
        self._epilogue: Optional[_HookRun] = None
        self._epilogue_rc: Optional[int] = None
        self._epilogue_done = False
        self._result: Optional[EmuResult] = None
        # A job on several nodes (tests/multinode.py): called once, after the job shell is
        # reaped and before the epilogue: KILL_JOB to the sisters, whose obits come first.
        self.before_epilogue: Optional[Callable[["RunningJob"], None]] = None

    def prologue_pid(self) -> Optional[int]:
        """The prologue's pid while it runs, else None."""
        self._drain()
        running = self._prologue is None and self._status is None
        return self._prologue_pid if running else None

    def wait_for_prologue(self, timeout: float = 10) -> int:
        """Block until the prologue has been forked; its pid."""
        deadline = time.monotonic() + timeout
        while True:
            pid = self.prologue_pid()
            if pid is not None:
                return pid
            if self._prologue is not None or self.poll() is not None:
                raise RuntimeError(f"{self.job.job_id}: the prologue is not running")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.job.job_id}: no prologue within {timeout} s")
            time.sleep(POLL)

    def poll(self) -> Optional[EmuResult]:
        """Advance without blocking; the result once the epilogue is done."""
        if self._result is None:
            self._drain()
            if (self._status is not None or self._reap_job()) and self._sisters_done() \
                    and self._step_epilogue():
                self._result = self._finish()
        return self._result

    def wait(self, timeout: float = 60) -> EmuResult:
        """Drive the job to its end; on timeout kill all it started and raise TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.poll()
            if result is not None:
                return result
            if time.monotonic() >= deadline:
                self.kill()
                raise TimeoutError(f"job {self.job.job_id} not done within {timeout} s (killed)")
            time.sleep(POLL)

    def kill(self) -> None:
        """SIGKILL the job child's, prologue's and epilogue's sessions; reap; remove files."""
        if self._result is not None:
            return
        self._drain()
        if self._prologue_pid is not None:
            _kill_session(self._prologue_pid)
        live = [self.pid] if self._status is None else []
        if self._epilogue is not None and self._epilogue.status is None:
            live.append(self._epilogue.pid)
        for pid in live:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _kill_session(pid)
            with suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self._result = EmuResult(JOB_EXEC_RETRY, "killed", None, None, *self._collect())

    def _drain(self) -> None:
        while self._fd is not None:
            try:
                chunk = os.read(self._fd, 4096)
            except BlockingIOError:
                return
            if not chunk:
                os.close(self._fd)
                self._fd = None
            self._buf += chunk
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                self._on_message(line.decode().split())

    def _on_message(self, words: list) -> None:
        if words[0] == "P":
            self._prologue_pid = int(words[1])
        elif words[0] == "R":
            self._prologue = (int(words[1]), int(words[2]))
        elif words[0] == "S":
            self._start = int(words[1])
            if self._start == 0:
                self._emu.write_qstat_xml(self.job, self._ident, session_id=self.pid)
            self._write_jobfile(42 if self._start == 0 else 50)

    def _reap_job(self) -> bool:
        if os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            return False
        _kill_session(self.pid)   # kill_job(): the rest of the session dies with the job
        _, self._status, usage = os.wait4(self.pid, 0)
        self._drain()
        if self._start == 0:
            cput, wall = usage.ru_utime + usage.ru_stime, time.monotonic() - self._t0
            self._used = (f"cput={fakes.hms(cput)},vmem=0kb,walltime={fakes.hms(wall)},"
                          f"mem={usage.ru_maxrss}kb,energy_used=0")
        return True

    def _sisters_done(self) -> bool:
        hook, self.before_epilogue = self.before_epilogue, None
        if hook is not None:
            hook(self)
        return True

    def _step_epilogue(self) -> bool:
        """Start, then poll the epilogue; True once it is over (or was never run)."""
        if self._epilogue is None and not self._epilogue_done:
            self._write_jobfile(48 if self._start == 0 else 50)
            refusal = fakes.check_pelog(str(self._emu.epilogue_path))
            if refusal is not None:
                self._epilogue_rc, self._epilogue_done = (refusal or None), True
                return True
            out = (self._plan.ou_path, self._plan.er_path)
            pid = _spawn_hook(self._epilogue_argv(), self._plan.hook_env, out,
                              cwd=self._plan.mom_priv, umask=0o022)
            self._epilogue = _HookRun(pid, self._emu.prologue_alarm)
        if self._epilogue is not None and self._epilogue.poll() is not None:
            self._epilogue_rc, self._epilogue_done = self._epilogue.rc, True
        return self._epilogue_done

    def _exit_status(self) -> int:
        """The job's exit_status as pbs_mom keeps it: the start code, or 256 + signal."""
        if self._start is None:
            return JOB_EXEC_RETRY
        status = self._status
        if self._start != 0 or status is None:
            return self._start
        return 0x100 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    def _epilogue_argv(self) -> list:
        job = self.job
        session = str(self.pid) if self._start == 0 else "0"
        return [str(self._emu.epilogue_path), job.job_id, job.user, self._ident.group, job.name,
                session, job.resource_list, self._used, job.queue, job.account,
                str(self._exit_status()), self._plan.sc_path]

    def _write_jobfile(self, substate: int) -> None:
        data = fakes.mom_jobfile_xml(
            self.job, self._ident, server=self._emu.server,
            cookie=self._plan.job_env["PBS_JOBCOOKIE"], substate=substate,
            exit_status=self._exit_status(), session_id=self.pid if self._start == 0 else None,
            resources_used=self._used)
        fakes.install_file(Path(self._plan.mom_priv, "jobs", f"{self.job.job_id}.JB"), data,
                           0o644)

    def _finish(self) -> EmuResult:
        rc, mom_rc = self._prologue or (JOB_EXEC_RETRY, JOB_EXEC_RETRY)
        actions = {0: "ran", 1: "aborted", PELOG_REFUSED: "prologue_refused"}
        job_rc = None
        if mom_rc == 0 and self._start is not None and self._status is not None:
            job_rc = os.waitstatus_to_exitcode(self._status)
        session = self.pid if self._start == 0 else 0
        return EmuResult(rc, actions.get(mom_rc, "requeued"), job_rc, self._epilogue_rc,
                         *self._collect(), mom_rc, self._exit_status(), session)

    def _collect(self) -> tuple[str, str]:
        """Read .OU/.ER, then remove the job's files from the mom (not the qstat XML)."""
        plan = self._plan
        out, err = (Path(p).read_text(errors="replace") if os.path.exists(p) else ""
                    for p in (plan.ou_path, plan.er_path))
        jb = str(Path(plan.mom_priv, "jobs", f"{self.job.job_id}.JB"))
        for path in (plan.sc_path, plan.ou_path, plan.er_path, plan.nodefile, jb):
            with suppress(FileNotFoundError):
                os.unlink(path)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        return out, err
