"""Emulates OpenPBS 23.06 running a job on one or more execution hosts, through its hooks.

Test infrastructure, not product. Run by the test process as root. Each hook event runs
``tests/openpbs_hookrun.py`` (pbs_python's stand-in) on the installed hook text, in the
process OpenPBS runs it in (docs/openpbs.md, ../shared/fixtures/openpbs, OpenPBS's
src/resmom/start_exec.c and mom_hook_func.c):

- queuejob: "in the server" (cwd server_priv/hooks/tmp, PATH only); a reject is qsub's
  "qsub: MSG" and exit 1.
- execjob_begin, then on every host: a child of pbs_mom (here: of the test process). A reject
  ends the start: with a vnode set offline, the job goes back to the queue (run once, fact 7);
  with job.delete(), it is deleted with its comment; else the server reruns it at once (fact 5:
  21 runs, then held). No execjob_end follows a rejected begin (the captures have none).
- The job: pbs_mom forks the job child (finish_exec): setsid, stdout/stderr to the spool
  files, then execjob_launch as the CHILD of that process, still root; a reject ends the job
  with Exit_status -17 (or -16, requeued, if the hook called job.rerun()); else the hook's
  progname is exec'd with set_credential's argv: "-" + basename(progname), then the hook's
  argv[1:] (its argv[0] is dropped); the process becomes the user (initgroups, setgid, setuid),
  chdirs home, and reads the script's PATH as one line on stdin (SHELL_INVOKE).
- TM tasks (start_process): a child of pbs_mom on the task's host, execjob_launch as its
  child; the hook's argv is passed as it is, progname execvp'd; stdin /dev/null.
- After the job: execjob_epilogue on every host (sisters when the mother superior tells them
  the job is over, mom_comm.c), then execjob_end on every host.
"""

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

RUNNER = Path(__file__).with_name("openpbs_hookrun.py")
ND_OFFLINE = 2
JOB_EXEC_FAILHOOK_RERUN = -16   # src/include/job.h
JOB_EXEC_FAILHOOK_DELETE = -17
_CHILD_CODES = {116: JOB_EXEC_FAILHOOK_RERUN, 117: JOB_EXEC_FAILHOOK_DELETE}


@dataclass
class PbsJob:
    """A job as the server sends it to its hosts (the attributes the captures show)."""

    job_id: str
    user: str
    script: str
    hosts: list                              # execution hosts; the first is the mother superior
    resources: dict = field(default_factory=dict)   # Resource_List as the mom has it
    queue: str = "workq"
    ncpus: int = 1
    mem: str = ""                            # per host, as in exec_vnode ("102400kb")
    tasks: list = field(default_factory=list)   # (host, argv): TM tasks the job starts
    exit_status: Optional[int] = None


@dataclass
class JobResult:
    action: str            # "ran", "deleted", "requeued", "rerun", "failed"
    exit_status: Optional[int]
    stdout: str = ""
    stderr: str = ""
    comment: str = ""
    tasks: list = field(default_factory=list)   # (host, exit code, output)
    hooks: list = field(default_factory=list)   # (host, event, outcome)


class Host:
    """One execution host: its name (vnode), PBS_HOME, and the installed hook text."""

    def __init__(self, name: str, pbs_home: Path, hook_file: Path, alarm: float = 120) -> None:
        self.name = name
        self.pbs_home = pbs_home
        self.hook_file = hook_file
        self.alarm = alarm
        self.offline: Optional[str] = None
        for sub in ("mom_priv/hooks/tmp", "mom_priv/jobs", "spool", "aux"):
            (pbs_home / sub).mkdir(parents=True, exist_ok=True)
        # What the server pushes to every mom: each hook's text as mom_priv/hooks/NAME.PY.
        from pbs_chroot.openpbsinstall import HOOKS
        for name in HOOKS:
            copy = pbs_home / "mom_priv" / "hooks" / f"{name}.PY"
            copy.write_text(hook_file.read_text())
            os.chmod(copy, 0o600)
        os.chmod(pbs_home / "mom_priv", 0o751)
        os.chmod(pbs_home / "mom_priv" / "jobs", 0o751)

    def hook(self, event: str, spec: dict) -> dict:
        """Run the hook for ``event`` (a child of the calling process); its outcome."""
        tmp = self.pbs_home / "mom_priv" / "hooks" / "tmp"
        stem = tmp / f"hook_{event}_pbs_chroot_{os.getpid()}"
        src, dst = Path(f"{stem}.in"), Path(f"{stem}.out")
        src.write_text(json.dumps(dict(spec, event=event, local_nodename=self.name)))
        with suppress(FileNotFoundError):
            dst.unlink()
        try:
            res = subprocess.run([sys.executable, "-I", "-S", str(RUNNER), str(src), str(dst),
                                  str(self.hook_file)], cwd=tmp, capture_output=True,
                                 text=True, timeout=self.alarm, stdin=subprocess.DEVNULL,
                                 env={"PATH": "/bin:/usr/bin", "PBS_CONF_FILE": "/etc/pbs.conf"})
            out = json.loads(dst.read_text()) if dst.exists() else {
                "accepted": False, "error": f"no output: {res.stderr[-2000:]}"}
        except subprocess.TimeoutExpired:
            out = {"accepted": False, "error": "alarm"}
        finally:
            for p in (src, dst):
                with suppress(FileNotFoundError):
                    p.unlink()
        if out.get("error"):  # a hook error is a reject (JOB_EXEC_HOOKERROR)
            out["accepted"] = False
        for vnode, changes in (out.get("vnodes") or {}).items():
            if vnode == self.name and changes.get("state") == ND_OFFLINE:
                self.offline = changes.get("comment") or "offline"
        return out

    def periodic(self, event: str = "exechost_periodic", job_list: tuple = ()) -> dict:
        """exechost_periodic (job_list: the jobs this mom holds) or exechost_startup."""
        return self.hook(event, {"job_list": list(job_list)})

    def start_task(self, spec: dict, user: str, out: str) -> int:
        """start_process: fork the task (a child of this "pbs_mom"); its pid."""
        import pwd
        pw = pwd.getpwnam(user)
        pid = os.fork()
        if pid == 0:
            _child(lambda: _task_child(self, spec, pw, Path(out)))
        return pid

    def wait_task(self, pid: int, timeout: float) -> int:
        return _wait(pid, timeout)

    def close(self) -> None:
        pass


class NsHost(Host):
    """A host whose pbs_mom lives in a mount namespace of its own (a daemon process here),
    where ``binds`` make its own directories appear at the paths the first host uses: so
    the same image path names this host's own copy, as on a real cluster. Its hooks and
    tasks are that daemon's children."""

    def __init__(self, name: str, pbs_home: Path, hook_file: Path, binds: tuple = (),
                 alarm: float = 120) -> None:
        import socket
        super().__init__(name, pbs_home, hook_file, alarm)
        self._sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = os.fork()
        if self.pid == 0:
            self._sock.close()
            _child(lambda: self._serve(child, binds))
        child.close()
        self._call("ping")

    def _call(self, op: str, **args: object) -> object:
        self._sock.settimeout(self.alarm + 60)
        self._sock.send(json.dumps(dict(args, op=op)).encode())
        reply = json.loads(self._sock.recv(1 << 20).decode())
        if "error" in reply:
            raise RuntimeError(f"host {self.name}: {op}: {reply['error']}")
        return reply["value"]

    def _serve(self, sock, binds: tuple) -> int:
        from pbs_chroot import _sys
        _sys.unshare(_sys.CLONE_NEWNS)
        _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_PRIVATE)
        _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_SHARED)  # a systemd node
        for src, dst in binds:
            _sys.mount(str(src), str(dst), None, _sys.MS_BIND)
        while True:
            request = json.loads(sock.recv(1 << 20).decode())
            op = request.pop("op")
            try:
                if op == "quit":
                    sock.send(json.dumps({"value": None}).encode())
                    return 0
                value = {"ping": lambda: os.getpid(),
                         "hook": lambda: Host.hook(self, **request),
                         "start_task": lambda: Host.start_task(self, **request),
                         "wait_task": lambda: Host.wait_task(self, **request),
                         "mounts": lambda: open("/proc/self/mountinfo").read()}[op]()
                reply = {"value": value}
            except Exception as e:  # noqa: B902 - reported to the test, which fails
                reply = {"error": f"{type(e).__name__}: {e}"}
            sock.send(json.dumps(reply).encode())

    def hook(self, event: str, spec: dict) -> dict:
        out = self._call("hook", event=event, spec=spec)
        for vnode, changes in (out.get("vnodes") or {}).items():
            if vnode == self.name and changes.get("state") == ND_OFFLINE:
                self.offline = changes.get("comment") or "offline"
        return out

    def start_task(self, spec: dict, user: str, out: str) -> int:
        return self._call("start_task", spec=spec, user=user, out=out)

    def wait_task(self, pid: int, timeout: float) -> int:
        return self._call("wait_task", pid=pid, timeout=timeout)

    def mount_points(self) -> list:
        return [line.split()[4] for line in self._call("mounts").splitlines()]

    def close(self) -> None:
        with suppress(OSError, ValueError, RuntimeError):
            self._call("quit")
        with suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self._sock.close()


def qsub(server_home: Path, hook_file: Path, user: str, resources: dict,
         queue: str = "", queue_types: Optional[dict] = None) -> tuple:
    """queuejob as the server runs it; (exit code, qsub's stderr)."""
    tmp = server_home / "server_priv" / "hooks" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    src, dst = tmp / "queuejob.in", tmp / "queuejob.out"
    src.write_text(json.dumps({
        "event": "queuejob", "requestor": user, "requestor_host": "vm",
        "local_nodename": "vm", "queue_types": queue_types or {},
        "job": {"id": "", "queue": queue, "euser": None, "egroup": None,
                "Resource_List": resources, "Job_Name": "job.sh"}}))
    res = subprocess.run([sys.executable, "-I", "-S", str(RUNNER), str(src), str(dst),
                          str(hook_file)], cwd=tmp, env={"PATH": "/bin:/usr/bin"},
                         capture_output=True, text=True, timeout=60)
    out = json.loads(dst.read_text())
    src.unlink()
    dst.unlink()
    assert not out["error"], out["error"] + res.stderr
    return (0, "") if out["accepted"] else (1, f"qsub: {out['reject_msg']}\n")


def mom_job(job: PbsJob, host: Host, event: str) -> dict:
    """The job's attributes at ``host`` for ``event`` (fixtures: execjob_*-4.pbsvm.json)."""
    import pwd
    pw = pwd.getpwnam(job.user)
    chunks = "+".join(f"({h}:ncpus={job.ncpus}" + (f":mem={job.mem}" if job.mem else "") + ")"
                      for h in job.hosts)
    attrs = {"id": job.job_id, "Job_Name": "job.sh", "Job_Owner": f"{job.user}@vm",
             "euser": job.user, "egroup": _group(pw.pw_gid), "queue": job.queue,
             "Resource_List": dict(job.resources), "exec_vnode": chunks, "exec_host": None,
             "exec_host2": "+".join(f"{h}:15002/0" for h in job.hosts),
             "Variable_List": {"PBS_O_HOME": pw.pw_dir, "PBS_O_LOGNAME": job.user,
                               "PBS_O_QUEUE": job.queue, "PBS_O_SHELL": pw.pw_shell,
                               "PBS_O_WORKDIR": pw.pw_dir}}
    if event in ("execjob_epilogue", "execjob_end"):
        attrs["Exit_status"] = str(job.exit_status if job.exit_status is not None else 0)
    return attrs


def _group(gid: int) -> str:
    import grp
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def job_env(job: PbsJob, host: Host, tmpdir_base: Optional[Path]) -> dict:
    """What finish_exec puts in the job's environment (fixture execjob_launch-4.pbsvm.json)."""
    import pwd
    pw = pwd.getpwnam(job.user)
    env = {"HOME": pw.pw_dir, "LOGNAME": job.user, "USER": job.user, "SHELL": pw.pw_shell,
           "PATH": "/bin:/usr/bin", "ENVIRONMENT": "BATCH", "PBS_ENVIRONMENT": "PBS_BATCH",
           "NCPUS": str(job.ncpus), "OMP_NUM_THREADS": str(job.ncpus),
           "PBS_JOBID": job.job_id, "PBS_JOBNAME": "job.sh", "PBS_QUEUE": job.queue,
           "PBS_JOBCOOKIE": "4775A0EB1D9269C66023420C0AC6A4BB", "PBS_JOBDIR": pw.pw_dir,
           "PBS_NODEFILE": str(host.pbs_home / "aux" / job.job_id), "PBS_NODENUM": "0",
           "PBS_MOMPORT": "15003", "PBS_TASKNUM": "1", "PBS_O_WORKDIR": pw.pw_dir}
    if tmpdir_base is not None:
        env["TMPDIR"] = str(tmpdir_base / f"pbs.{job.job_id}")
    return env


class OpenPbs:
    """The server and its execution hosts, running jobs one at a time."""

    def __init__(self, hosts: list, tmpdir_base: Optional[Path] = None) -> None:
        self.hosts = {h.name: h for h in hosts}
        self.tmpdir_base = tmpdir_base

    def run(self, job: PbsJob, timeout: float = 60) -> JobResult:
        result = JobResult("ran", None)
        begun: list = []
        for name in job.hosts:   # the mother superior first, then IM_JOIN_JOB to sisters
            host = self.hosts[name]
            out = host.hook("execjob_begin", {"job": mom_job(job, host, "execjob_begin")})
            result.hooks.append((name, "execjob_begin", out))
            if not out["accepted"]:
                result.comment = out.get("job", {}).get("comment", "")
                if out.get("job", {}).get("_delete"):
                    result.action = "deleted"
                elif any(self.hosts[n].offline for n in job.hosts):
                    result.action = "requeued"
                else:
                    result.action = "rerun"
                for other in begun:  # the job is taken off the hosts that had it
                    self._end(job, self.hosts[other], result, "execjob_end")
                return result
            begun.append(name)
        ms = self.hosts[job.hosts[0]]
        tmpdir = self._make_tmpdir(job)
        try:
            status = self._run_job(job, ms, result, timeout)
        finally:
            if tmpdir is not None:
                subprocess.run(["rm", "-rf", "--one-file-system", str(tmpdir)], check=False)
        result.exit_status = job.exit_status = status
        if status == JOB_EXEC_FAILHOOK_RERUN:
            result.action = "requeued"
        elif status == JOB_EXEC_FAILHOOK_DELETE:
            result.action = "failed"
        for name in reversed(job.hosts):  # sisters on IM_DELETE_JOB; the mother superior's
            self._end(job, self.hosts[name], result, "execjob_epilogue")  # before its obit
        for name in reversed(job.hosts):
            self._end(job, self.hosts[name], result, "execjob_end")
        return result

    @staticmethod
    def _launched(host: Host, path: Path, result: JobResult) -> None:
        """What a launch hook changed (its outcome file), applied as pbs_mom does."""
        if not path.exists():
            return
        out = json.loads(path.read_text())
        path.unlink()
        result.hooks.append((host.name, "execjob_launch", out))
        if out.get("job", {}).get("comment"):
            result.comment = out["job"]["comment"]
        for vnode, changes in (out.get("vnodes") or {}).items():
            if vnode == host.name and changes.get("state") == ND_OFFLINE:
                host.offline = changes.get("comment") or "offline"

    def _end(self, job: PbsJob, host: Host, result: JobResult, event: str) -> None:
        out = host.hook(event, {"job": mom_job(job, host, event)})
        result.hooks.append((host.name, event, out))

    def _make_tmpdir(self, job: PbsJob) -> Optional[Path]:
        if self.tmpdir_base is None:
            return None
        import pwd
        pw = pwd.getpwnam(job.user)
        path = self.tmpdir_base / f"pbs.{job.job_id}"
        path.mkdir(mode=0o700)
        os.chown(path, pw.pw_uid, pw.pw_gid)
        return path

    def _run_job(self, job: PbsJob, ms: Host, result: JobResult, timeout: float) -> int:
        import pwd
        pw = pwd.getpwnam(job.user)
        jobs = ms.pbs_home / "mom_priv" / "jobs"
        script = jobs / f"{job.job_id}.SC"
        script.write_text(job.script)
        os.chown(script, pw.pw_uid, pw.pw_gid)
        os.chmod(script, 0o700)
        out, err = ms.pbs_home / "spool" / f"{job.job_id}.OU", \
            ms.pbs_home / "spool" / f"{job.job_id}.ER"
        env = job_env(job, ms, self.tmpdir_base)
        launch = {"job": mom_job(job, ms, "execjob_launch"), "progname": pw.pw_shell,
                  "argv": [], "env": env,
                  "outcome_file": str(ms.pbs_home / "spool" / f"{job.job_id}.launch")}
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            _child(lambda: _job_child(ms, launch, pw, r, out, err, shell=True))
        os.close(r)
        os.write(w, f"{script}\n".encode())
        os.close(w)
        tasks = []
        for name, argv in job.tasks:
            host = self.hosts[name]
            tenv = dict(job_env(job, host, self.tmpdir_base), PBS_TASKNUM=str(len(tasks) + 2))
            tout = host.pbs_home / "spool" / f"{job.job_id}.task{len(tasks)}"
            spec = {"job": mom_job(job, host, "execjob_launch"), "progname": argv[0],
                    "argv": list(argv), "env": tenv, "outcome_file": f"{tout}.launch"}
            tasks.append((name, host.start_task(spec, job.user, str(tout)), tout))
        for name, tpid, tout in tasks:
            code = self.hosts[name].wait_task(tpid, timeout)
            result.tasks.append((name, code, tout.read_text() if tout.exists() else ""))
            self._launched(self.hosts[name], Path(f"{tout}.launch"), result)
        code = _wait(pid, timeout)
        self._launched(ms, Path(launch["outcome_file"]), result)
        result.stdout = out.read_text() if out.exists() else ""
        result.stderr = err.read_text() if err.exists() else ""
        for p in (out, err, script, *[t for _, _, t in tasks]):
            with suppress(FileNotFoundError):
                p.unlink()
        return _CHILD_CODES.get(code, code)


# ---- in forked children: never return into the test ----

def _child(body) -> None:
    code = 255
    try:
        code = body()
    except BaseException:  # noqa: B902
        with suppress(OSError):
            os.write(2, traceback.format_exc().encode())
    finally:
        os._exit(code)


def _job_child(host: Host, launch: dict, pw, stdin_fd: int, out: Path, err: Path,
               shell: bool) -> int:
    """finish_exec's child: session, output files, launch hook, set_credential, exec."""
    os.setsid()
    os.dup2(stdin_fd, 0)
    os.close(stdin_fd)
    for path, fd in ((out, 1), (err, 2)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchown(f, pw.pw_uid, pw.pw_gid)
        os.dup2(f, fd)
        os.close(f)
    return _launch_and_exec(host, launch, pw, shell)


def _task_child(host: Host, spec: dict, pw, out: Path) -> int:
    """start_process's child: session, stdin /dev/null, output, launch hook, exec as is."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    f = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchown(f, pw.pw_uid, pw.pw_gid)
    os.dup2(f, 1)
    os.dup2(f, 2)
    return _launch_and_exec(host, spec, pw, shell=False)


def _launch_and_exec(host: Host, spec: dict, pw, shell: bool) -> int:
    outcome = Host.hook(host, "execjob_launch", spec)  # (in this process, on any host)
    # pbs_mom reads the launch hook's outcome back from its file (record_finish_exec):
    # job and vnode changes apply whether the hook accepted or not.
    with open(spec["outcome_file"], "w") as f:
        json.dump(outcome, f)
    if not outcome["accepted"]:
        with suppress(OSError):
            os.write(2, f"launch rejected: {outcome.get('reject_msg')} "
                        f"{outcome.get('error', '')}\n".encode())
        return 116 if outcome.get("job", {}).get("_rerun") else 117
    progname, argv, env = outcome["progname"], outcome["argv"], outcome["env"]
    if shell:  # set_credential(pjob, &progname, &argv)
        argv = ["-" + os.path.basename(progname)] + (argv[1:] if len(argv) >= 2 else [])
    os.initgroups(pw.pw_name, pw.pw_gid)
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    os.chdir(pw.pw_dir)
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 2:
            with suppress(OSError):
                os.close(int(name))
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    if shell:
        os.execve(progname, argv, env)
    os.execvpe(progname, argv, env)
    return 127


def _wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            with suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        time.sleep(0.01)
