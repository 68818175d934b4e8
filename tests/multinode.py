"""Emulates the sister pbs_moms of a Torque 6.1 job on several nodes, and TM task spawns.

Test infrastructure, not product. What is modelled, and where Torque does it
(docs/torque-multinode.md has the citations):

- A sister is a pbs_mom daemon of its own: here a forked process in a mount
  namespace of its own (its mounts are invisible to the other nodes), with its
  own PBS_HOME, state directory and cgroup parent (the site config it is given).
- JOIN_JOB (mom_comm.c im_join_job_as_sister): the daemon itself runs
  mom_priv/prologue.parallel (run_prologue_scripts -> run_pelog(PE_PROLOG,
  path_prologp, PE_IO_TYPE_ASIS)): argv as a prologue's, stdio the daemon's,
  its parent the daemon, waited for synchronously. Any non-zero result is
  PBSE_SYSTEM to the mother superior, and the sister purges the job.
- The mother superior, on that error (im_request IM_ERROR/IM_JOIN_JOB ->
  job_start_error -> exec_bail(JOB_EXEC_RETRY)): ABORT_JOB to the sisters
  that joined (they purge the job, no epilogue.parallel) and requeue; its own
  prologue never ran (it runs only once every sister joined), its epilogue runs.
- TM tasks (im_spawn_task -> start_exec.c start_process), on every node, the
  mother superior's included: a child of the pbs_mom daemon, setsid, chroot to
  the first PBS_O_ROOTDIR* entry, setgroups/setgid/setuid, chdir to
  PBS_O_INITDIR or home, then, with a $job_starter, execvp(STARTER, [STARTER,
  ARGV...]) (start_exec.cpp start_process of 6.x, read in the review of issue
  11; the older start_exec.c read first had no starter there), else
  execvp(ARGV[0]); no hook runs.
- KILL_JOB at the job's end (catch_child.c scan_for_exiting -> send_sisters):
  each sister kills its tasks, runs epilogue.parallel (exit_mom_job ->
  run_any_epilogues) as the daemon's child, sends its usage to the mother
  superior (send_job_obit_to_ms) and purges the job; only then does the
  mother superior run its epilogue, with RESOURCES_USED summed over the nodes.
"""
import json
import os
import signal
import socket
import time
from contextlib import suppress
from pathlib import Path
from typing import Callable, Optional

from . import fakes
from .momemu import (JOB_EXEC_RETRY, POLL, EmuJob, MomEmulator, RunningJob, _HookRun,
                     _kill_session, _run_child, _spawn_hook, _write, mom_job_starter)

__all__ = ["TaskSpec", "start_process", "SisterMom", "MultiNodeJob"]


class TaskSpec:
    """What start_process needs of a job on one node (computed before the fork)."""

    def __init__(self, job: EmuJob, pbs_home: str, server: str, nodeid: int,
                 cookie: str) -> None:
        ident = fakes.identity_of(job.user)
        varlist = fakes.server_variable_list(job, ident, server)
        shell = job.shell or ident.login_shell or "/bin/sh"
        self.env = fakes.job_environment(job, varlist, ident, pbs_home, server, shell, cookie)
        self.env.update(PBS_NODENUM=str(nodeid), PBS_VNODENUM=str(nodeid))
        self.rootdir = fakes.get_job_envvar(varlist, "PBS_O_ROOTDIR")
        initdir = fakes.get_job_envvar(varlist, "PBS_O_INITDIR")
        self.initdir = ident.home if initdir is None else initdir
        self.uid, self.gid = ident.uid, ident.gid
        self.groups = tuple(os.getgrouplist(ident.user, ident.gid))
        self.job_starter = mom_job_starter(Path(pbs_home) / "mom_priv")


def start_process(spec: TaskSpec, argv: list, out: str, tasknum: int,
                  envp: Optional[dict] = None) -> int:
    """Fork a TM task as pbs_mom's start_process does; its pid (a child of this process).
    envp: what the spawner sent with tm_spawn (here laid over the job's environment, the
    spawner's word winning: the worst case for anything that reads it)."""
    pid = os.fork()
    if pid == 0:
        _run_child(lambda: _task_child(spec, argv, out, tasknum, envp or {}))
    return pid


def _task_child(spec: TaskSpec, argv: list, out: str, tasknum: int, envp: dict) -> int:
    os.setsid()                                   # set_job()
    os.umask(0o077)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # the demux to the MS
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 2:
            with suppress(OSError):
                os.close(int(name))
    steps: list = [(os.chroot, spec.rootdir, "PBS: chroot to {} failed: {}")] \
        if spec.rootdir is not None else []
    steps += [(lambda _: _become(spec), str(spec.uid), "PBS: setuid to {} failed: {}"),
              (os.chdir, spec.initdir, "PBS: chdir to {} failed: {}")]
    for call, arg, message in steps:
        try:
            call(arg)
        except OSError as err:
            _write(2, message.format(arg[:256], err.strerror) + "\n")
            return 254                            # JOB_EXEC_FAIL2, task not started
    env = dict(spec.env, PBS_TASKNUM=str(tasknum), **envp)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    args = [spec.job_starter] + argv if spec.job_starter else argv
    with suppress(OSError):
        os.execvpe(args[0], args, env)
    _write(2, f"PBS: {args[0][:256]}: exec failed\n")
    return 254


def _become(spec: TaskSpec) -> None:
    os.setgroups(list(spec.groups))
    os.setgid(spec.gid)
    os.setuid(spec.uid)


def _wait_pids(pids: list, timeout: float) -> dict:
    """Reap ``pids`` (children of this process); exit codes, -9 for those killed at timeout."""
    codes: dict = {}
    deadline = time.monotonic() + timeout
    while len(codes) < len(pids):
        for pid in pids:
            if pid in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
        if len(codes) < len(pids):
            if time.monotonic() > deadline:
                for pid in set(pids) - set(codes):
                    _kill_session(pid)
                    codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            time.sleep(POLL)
    return codes


# ---- a sister pbs_mom: a daemon process in its own mount namespace ----

class SisterMom:
    """A sister node: ``name``, its PBS_HOME, and the binds that make its own directories
    appear at the mother superior's paths inside its mount namespace (so that the same
    PBS_O_ROOTDIR names this node's own image, as on a real cluster)."""

    def __init__(self, name: str, pbs_home: Path, *, server: str = "vm",
                 binds: tuple = (), prologue_alarm: float = 60.0,
                 hook_env: Optional[dict] = None) -> None:
        self.name, self.server = name, server
        self.pbs_home = Path(pbs_home)
        self.hook_env = dict(hook_env or {})
        self.alarm = prologue_alarm
        for path in (self.pbs_home, self.pbs_home / "mom_priv", self.pbs_home / "mom_priv/jobs",
                     self.pbs_home / "spool", self.pbs_home / "aux"):
            path.mkdir(mode=0o755, exist_ok=True)
        os.chmod(self.pbs_home / "spool", 0o1777)
        self._sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = os.fork()
        if self.pid == 0:
            self._sock.close()
            _run_child(lambda: _SisterDaemon(self, child, binds).serve())
        child.close()
        self.call("ping")  # the namespace is set up

    def call(self, op: str, timeout: float = 120, **args: object) -> dict:
        """Send one request; the reply (raises RuntimeError on a daemon error)."""
        self._sock.settimeout(timeout)
        self._sock.send(json.dumps(dict(args, op=op)).encode())
        reply = json.loads(self._sock.recv(1 << 20).decode())
        if "error" in reply:
            raise RuntimeError(f"sister {self.name}: {op}: {reply['error']}")
        return reply

    def mount_points(self) -> list:
        """The sister namespace's mount points."""
        return self.call("mounts")["mounts"]

    def close(self) -> None:
        """End the daemon (its namespace goes with it), whatever state it is in."""
        with suppress(OSError, ValueError, RuntimeError, socket.timeout):
            self.call("quit", timeout=10)
        with suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self._sock.close()


class _SisterDaemon:
    """The sister's side, in the forked process."""

    def __init__(self, mom: SisterMom, sock: socket.socket, binds: tuple) -> None:
        self.mom, self.sock, self.binds = mom, sock, binds
        self.jobs: dict = {}     # job id -> {"job", "spec", "tasks": [pid], "usage"}
        self.log: list = []

    def serve(self) -> int:
        from pbs_chroot import _sys
        _sys.unshare(_sys.CLONE_NEWNS)
        _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_PRIVATE)
        _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_SHARED)  # a systemd node
        for src, dst in self.binds:
            _sys.mount(str(src), str(dst), None, _sys.MS_BIND)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.chdir(self.mom.pbs_home / "mom_priv")
        while True:
            request = json.loads(self.sock.recv(1 << 20).decode())
            self.log.append(request.get("op"))
            try:
                reply = getattr(self, "op_" + request.pop("op"))(**request)
            except Exception as e:  # noqa: B902 - reported to the test, which fails
                reply = {"error": f"{type(e).__name__}: {e}"}
            self.sock.send(json.dumps(reply).encode())
            if reply.get("quit"):
                return 0

    def op_ping(self) -> dict:
        return {"pid": os.getpid()}

    def op_quit(self) -> dict:
        for job_id in list(self.jobs):
            self._kill_tasks(job_id)
        return {"quit": True}

    def op_mounts(self) -> dict:
        with open("/proc/self/mountinfo") as f:
            return {"mounts": [line.split()[4] for line in f]}

    def op_run(self, argv: list, timeout: float = 120) -> dict:
        """Run an admin command on this node (in its mount namespace)."""
        import subprocess
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return {"rc": res.returncode, "out": res.stdout + res.stderr}

    def op_join(self, job: dict, nodeid: int, cookie: str) -> dict:
        """IM_JOIN_JOB: the job's files, then prologue.parallel, synchronously."""
        emujob = EmuJob(**{k: (v if k != "variables" else [tuple(p) for p in v])
                           for k, v in job.items()})
        mom, ident = self.mom, fakes.identity_of(emujob.user)
        jb = mom.pbs_home / "mom_priv" / "jobs" / f"{emujob.job_id}.JB"
        fakes.install_file(jb, fakes.mom_jobfile_xml(emujob, ident, server=mom.server,
                                                     cookie=cookie, substate=41), 0o600)
        spec = TaskSpec(emujob, str(mom.pbs_home), mom.server, nodeid, cookie)
        varlist = fakes.server_variable_list(emujob, ident, mom.server)
        env = fakes.hook_environment(emujob, varlist, str(mom.pbs_home), mom.server)
        env.update(PBS_NODENUM=str(nodeid), **mom.hook_env)
        self.jobs[emujob.job_id] = {"job": emujob, "spec": spec, "tasks": [], "env": env,
                                    "ident": ident, "codes": {}}
        path = str(mom.pbs_home / "mom_priv" / "prologue.parallel")
        refusal = fakes.check_pelog(path)
        if refusal is not None:
            rc = mom_rc = refusal
        else:
            argv = [path, emujob.job_id, emujob.user, ident.group, emujob.name,
                    emujob.resource_list, emujob.queue, emujob.account]
            rc, mom_rc = self._run_hook(argv, env, ())
        if mom_rc != 0:  # PBSE_SYSTEM to the MS; mom_job_purge()
            self._purge(emujob.job_id)
        return {"rc": rc, "mom_rc": mom_rc}

    def _run_hook(self, argv: list, env: dict, out: tuple) -> tuple:
        hook = _HookRun(_spawn_hook(argv, env, out, cwd=str(self.mom.pbs_home / "mom_priv"),
                                    umask=0o022 if out else None), self.mom.alarm)
        mom_rc = hook.poll()
        while mom_rc is None:
            time.sleep(POLL)
            mom_rc = hook.poll()
        return hook.rc, mom_rc

    def op_spawn(self, job_id: str, argv: list, out: str, tasknum: int,
                 envp: Optional[dict] = None) -> dict:
        """IM_SPAWN_TASK -> start_process."""
        if job_id not in self.jobs:
            raise KeyError(f"job {job_id} is not on this node (requests: {self.log})")
        info = self.jobs[job_id]
        pid = start_process(info["spec"], argv, out, tasknum, envp)
        info["tasks"].append(pid)
        return {"pid": pid}

    def op_wait(self, job_id: str, limit: float) -> dict:
        """Reap the job's tasks that are running (an obit per task)."""
        info = self.jobs[job_id]
        running = [p for p in info["tasks"] if p not in info["codes"]]
        info["codes"].update(_wait_pids(running, limit))
        return {"codes": {str(p): c for p, c in info["codes"].items()}}

    def op_kill(self, job_id: str, exit_status: int) -> dict:
        """IM_KILL_JOB: kill the tasks, run epilogue.parallel, report, purge."""
        info = self.jobs[job_id]
        self._kill_tasks(job_id)
        job, ident = info["job"], info["ident"]
        path = str(self.mom.pbs_home / "mom_priv" / "epilogue.parallel")
        refusal = fakes.check_pelog(path)
        rc: Optional[int] = refusal or None
        if refusal is None:
            spool = self.mom.pbs_home / "spool"
            out = (str(spool / f"{job_id}.OU"), str(spool / f"{job_id}.ER"))
            for p in out:
                Path(p).touch(0o600)
            argv = [path, job_id, job.user, ident.group, job.name, "0", job.resource_list,
                    "cput=00:00:00,mem=0kb,vmem=0kb", job.queue, job.account,
                    str(exit_status)]
            rc = self._run_hook(argv, info["env"], out)[0]
        self._purge(job_id)
        return {"epilogue_rc": rc}

    def op_abort(self, job_id: str) -> dict:
        """IM_ABORT_JOB after a failed start: kill and purge, no epilogue.parallel."""
        self._kill_tasks(job_id)
        self._purge(job_id)
        return {}

    def _kill_tasks(self, job_id: str) -> None:
        info = self.jobs.get(job_id)
        if info is None:
            return
        running = [p for p in info["tasks"] if p not in info["codes"]]
        for pid in running:
            _kill_session(pid)
        info["codes"].update(_wait_pids(running, 10))

    def _purge(self, job_id: str) -> None:
        """mom_job_purge(): the job's files go."""
        home = self.mom.pbs_home
        for path in (home / "mom_priv" / "jobs" / f"{job_id}.JB",
                     home / "spool" / f"{job_id}.OU", home / "spool" / f"{job_id}.ER"):
            with suppress(FileNotFoundError):
                path.unlink()
        self.jobs.pop(job_id, None)


# ---- the mother superior's side of a job on several nodes ----

class MultiNodeJob:
    """One job on ``ms`` (the emulator, this process as its pbs_mom) and ``sisters``."""

    def __init__(self, ms: MomEmulator, sisters: list, job: EmuJob, out_dir: Path) -> None:
        self.ms, self.sisters, self.job = ms, sisters, job
        self.out_dir = out_dir
        self.cookie = "C00K1E" + job.job_id.split(".")[0]
        self.running: Optional[RunningJob] = None
        self.joined: list = []
        self.join_results: list = []
        self.sister_epilogues: dict = {}
        self.ms_tasks: list = []
        self.ms_codes: dict = {}
        self.requeued = False
        self.ms_epilogue_rc: Optional[int] = None
        self._spawned = 0

    def start(self) -> bool:
        """start_exec: JOIN_JOB to each sister; then, if all joined, the job on the MS."""
        job = dict(self.job.__dict__)
        self.ms.write_qstat_xml(self.job, fakes.identity_of(self.job.user))  # the server's
        for nodeid, sister in enumerate(self.sisters, 1):
            res = sister.call("join", job=job, nodeid=nodeid, cookie=self.cookie)
            self.join_results.append(res)
            if res["mom_rc"] != 0:
                self._start_error()
                return False
            self.joined.append(sister)
        self.running = self.ms.start(self.job)
        self.running.before_epilogue = self._kill_sisters
        return True

    def _start_error(self) -> None:
        """job_start_error -> exec_bail(JOB_EXEC_RETRY): abort the sisters that joined,
        run the mother superior's epilogue (its prologue never ran), requeue."""
        for sister in self.joined:
            sister.call("abort", job_id=self.job.job_id)
        self.requeued = True
        job, ident = self.job, fakes.identity_of(self.job.user)
        path = str(self.ms.epilogue_path)
        if fakes.check_pelog(path) is not None:
            return
        varlist = fakes.server_variable_list(job, ident, self.ms.server)
        env = fakes.hook_environment(job, varlist, str(self.ms.pbs_home), self.ms.server)
        env.update(self.ms.hook_env)
        argv = [path, job.job_id, job.user, ident.group, job.name, "0", job.resource_list, "",
                job.queue, job.account, str(JOB_EXEC_RETRY)]
        hook = _HookRun(_spawn_hook(argv, env, (), cwd=str(self.ms.mom_priv), umask=0o022),
                        self.ms.prologue_alarm)
        while hook.poll() is None:
            time.sleep(POLL)
        self.ms_epilogue_rc = hook.rc

    def wait_running(self, timeout: float = 60) -> None:
        """Until the job shell runs (a TM task comes from a running job)."""
        assert self.running is not None, "the job was not started"
        running = self.running
        wait_until(lambda: running.poll() is not None or running._start is not None,
                   timeout, f"job {self.job.job_id} to start")
        assert running._start == 0, f"job {self.job.job_id} did not start: {running.poll()}"

    def pbsdsh(self, argv: list, timeout: float = 60, envp: Optional[dict] = None) -> dict:
        """`pbsdsh -u argv`: one task on every node; {node: (exit code, output)}.
        envp: variables the spawner sends with each task (tm_spawn's envp)."""
        self.wait_running()
        self._spawned += 1
        outs: dict = {}
        spec = TaskSpec(self.job, str(self.ms.pbs_home), self.ms.server, 0, self.cookie)
        name = f"{self.job.job_id}.task{self._spawned}"
        out = str(self.out_dir / f"{name}.{self.ms.server}")
        pid = start_process(spec, argv, out, self._spawned, envp)
        self.ms_tasks.append(pid)
        outs[self.ms.server] = (pid, out)
        for sister in self.joined:
            out = str(self.out_dir / f"{name}.{sister.name}")
            outs[sister.name] = (sister.call("spawn", job_id=self.job.job_id, argv=argv,
                                             out=out, tasknum=self._spawned,
                                             envp=envp)["pid"], out)
        self.ms_codes.update(_wait_pids([pid], timeout))
        result = {self.ms.server: (self.ms_codes[pid], _read(outs[self.ms.server][1]))}
        for sister in self.joined:
            codes = sister.call("wait", job_id=self.job.job_id, limit=timeout,
                                timeout=timeout + 20)["codes"]
            spid, sout = outs[sister.name]
            result[sister.name] = (codes[str(spid)], _read(sout))
        return result

    def _kill_sisters(self, running: RunningJob) -> None:
        """The job shell exited: kill_job here, then KILL_JOB to the sisters (their
        epilogue.parallel runs and their obits come back) before the MS epilogue."""
        live = [p for p in self.ms_tasks if p not in self.ms_codes]
        for pid in live:
            _kill_session(pid)
        self.ms_codes.update(_wait_pids(live, 10))
        for sister in self.joined:
            self.sister_epilogues[sister.name] = sister.call(
                "kill", job_id=self.job.job_id, exit_status=0)["epilogue_rc"]

    def wait(self, timeout: float = 60) -> object:
        """The mother superior's EmuResult (after every sister's epilogue.parallel)."""
        assert self.running is not None
        return self.running.wait(timeout)

    def kill(self) -> None:
        """Test cleanup: end whatever still runs, on every node."""
        for pid in self.ms_tasks:
            if pid not in self.ms_codes:
                _kill_session(pid)
                with suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                self.ms_codes[pid] = -9
        if self.running is not None:
            self.running.kill()


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until true; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
