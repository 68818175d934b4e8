"""Torque 6.1 as data for the tests: a submitted job, its qstat XML and mom job file, the
environments pbs_mom gives the hooks and the job, and fake qstat/pbsnodes programs.

Run by the test process (as root or not). The fake programs written here are executed as root
by the prologue under test, with PATH=/bin:/usr/bin and nothing else in the environment, so
they read no environment variable and call other programs by absolute path. Trusts its
callers (test code); EmuJob.validate() rejects jobs that cannot exist in Torque.

Escaping is Torque 6.1's: Variable_List is encoded by encode_arst() (Libattr/attr_fn_arst.c),
which backslash-escapes `"`, `'`, `,`, backslash and newline inside entries and joins them
with `,`; `qstat -x` then replaces & < > " ' by entities (fixture job 30). Other control
characters are written raw (assumed: the captures hold none), so a value with one makes the
XML ill-formed, which a prologue reading qstat must treat as a failure. A NUL cannot exist
in a Torque string: validate() raises ValueError. Non-UTF-8 bytes travel as surrogates.
"""

import grp
import json
import os
import pwd
import shlex
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

__all__ = [
    "EmuJob", "Identity", "identity_of", "server_variable_list", "get_job_envvar",
    "node_counts", "hms", "walltime_seconds", "torque_escape", "xml_escape", "qstat_xml",
    "mom_jobfile_xml", "hook_environment", "nodefile_text", "job_environment", "check_pelog",
    "install_file", "install_hook", "write_fake_qstat", "read_qstat_calls", "set_qstat_fault",
    "write_fake_pbsnodes", "read_pbsnodes_calls",
]

SUBMIT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class EmuJob:
    """A job as qsub sent it. `shell` is qsub -S (Shell_Path_List): used instead of pw_shell."""

    job_id: str
    user: str
    script: str
    variables: list[tuple[str, str]] = field(default_factory=list)
    name: str = "emujob"
    queue: str = "batch"
    account: str = ""
    resource_list: str = "nodes=1:ppn=1,walltime=00:10:00,neednodes=1:ppn=1"
    shell: Optional[str] = None

    def resources(self) -> list[tuple[str, str]]:
        """Resource_List entries in order, e.g. [("nodes", "1:ppn=1"), ...]."""
        pairs = (item.partition("=") for item in self.resource_list.split(",") if item)
        return [(name, value) for name, _, value in pairs]

    def resource(self, name: str) -> Optional[str]:
        """The value of one Resource_List entry, or None."""
        return dict(self.resources()).get(name)

    def validate(self) -> None:
        """Raise ValueError for a job Torque could not hold."""
        if not self.job_id or "/" in self.job_id or self.job_id.startswith("."):
            raise ValueError(f"bad job id {self.job_id!r}")
        texts = [self.job_id, self.user, self.name, self.queue, self.account]
        for name, value in self.variables:
            if not name or "=" in name:
                raise ValueError(f"bad variable name {name!r}")
            texts += [name, value]
        if any("\0" in text for text in texts):
            raise ValueError("a NUL cannot exist in a Torque job (C strings)")


@dataclass(frozen=True)
class Identity:
    """The job owner as the mom's passwd/group databases see it."""

    user: str
    uid: int
    gid: int
    group: str
    home: str
    login_shell: str


def identity_of(user: str) -> Identity:
    """Look the user up (pwd/grp); egroup is the login group's name, or its number."""
    pw = pwd.getpwnam(user)
    try:
        group = grp.getgrgid(pw.pw_gid).gr_name
    except KeyError:
        group = str(pw.pw_gid)
    return Identity(user, pw.pw_uid, pw.pw_gid, group, pw.pw_dir, pw.pw_shell)


def server_variable_list(job: EmuJob, ident: Identity, server: str) -> list[tuple[str, str]]:
    """Variable_List as pbs_server holds it: qsub's PBS_O_* around the -v list (fixtures)."""
    head = [("PBS_O_QUEUE", job.queue), ("PBS_O_HOME", ident.home),
            ("PBS_O_LOGNAME", ident.user), ("PBS_O_PATH", SUBMIT_PATH),
            ("PBS_O_MAIL", f"/var/mail/{ident.user}"), ("PBS_O_SHELL", ident.login_shell),
            ("PBS_O_LANG", "C.UTF-8")]
    tail = [("PBS_O_WORKDIR", ident.home), ("PBS_O_HOST", server), ("PBS_O_SERVER", server)]
    return head + list(job.variables) + tail


def get_job_envvar(varlist: list[tuple[str, str]], prefix: str) -> Optional[str]:
    """Torque's get_job_envvar(): the value of the FIRST entry whose name starts with prefix."""
    for name, value in varlist:
        if name.startswith(prefix):
            return value
    return None


def torque_escape(text: str) -> str:
    """encode_arst(): backslash before `"`, `'`, `,`, backslash and newline."""
    return "".join("\\" + c if c in "\"',\\\n" else c for c in text)


def xml_escape(text: str) -> str:
    """Entities for & < > " ' only; other characters (control ones too) are written raw."""
    table = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&apos;"}
    return "".join(table.get(c, c) for c in text)


def _el(tag: str, text: str) -> str:
    return f"<{tag}>{xml_escape(text)}</{tag}>"


def _strtol(text: str) -> int:
    digits = ""
    for char in text:
        if not char.isdigit():
            break
        digits += char
    return int(digits) if digits else 0


def node_counts(nodes: str) -> tuple[int, int, int]:
    """(PBS_NUM_NODES, PBS_NUM_PPN, PBS_NP) for a nodes= spec, computed as Torque 6.1 does
    (strtol: a host name counts 0 nodes; PBS_NP is the number of vnodes: count x ppn)."""
    num_nodes, num_ppn = _strtol(nodes), 1
    if num_nodes:
        if "ppn=" in nodes:
            num_ppn = _strtol(nodes.split("ppn=", 1)[1])
        num_nodes += sum(_strtol(part) for part in nodes.split("+")[1:])
    vnodes = 0
    for part in nodes.split("+"):
        ppn = _strtol(part.split("ppn=", 1)[1]) if "ppn=" in part else 1
        vnodes += (_strtol(part) or 1) * max(ppn, 1)
    return num_nodes, num_ppn, vnodes


def _resource_xml(job: EmuJob) -> str:
    items = job.resources()
    nodes = job.resource("nodes")
    if nodes is not None:
        nodect = sum(_strtol(part) or 1 for part in nodes.split("+"))
        names = [name for name, _ in items]
        at = names.index("neednodes") if "neednodes" in names else len(items)
        items.insert(at, ("nodect", str(nodect)))
    return "<Resource_List>" + "".join(_el(n, v) for n, v in items) + "</Resource_List>"


def _submit_args(job: EmuJob) -> str:
    res = ",".join(f"{n}={v}" for n, v in job.resources() if n != "neednodes")
    parts = []
    if job.variables:
        parts.append("-v " + ",".join(f"{n}={v}".replace(",", "\\,") for n, v in job.variables))
    parts += [f"-l {res}", f"-N {job.name}"]
    if job.shell:
        parts.append(f"-S {job.shell}")
    return " ".join(parts + ["job.sh"])


def qstat_xml(job: EmuJob, *, server: str = "vm", session_id: Optional[int] = None,
              ident: Optional[Identity] = None) -> bytes:
    """`qstat -f -x ID` output: the at_prologue shape (substate 40, no session_id) unless
    session_id is given (running shape, substate 42). Non-UTF-8 bytes pass via surrogates."""
    job.validate()
    ident = ident or identity_of(job.user)
    now, number = str(int(time.time())), job.job_id.split(".")[0]
    walltime = job.resource("walltime")
    variables = ",".join(torque_escape(f"{n}={v}")
                         for n, v in server_variable_list(job, ident, server))
    body = [_el("Job_Id", job.job_id), _el("Job_Name", job.name),
            _el("Job_Owner", f"{job.user}@{server}"), _el("job_state", "R"),
            _el("queue", job.queue), _el("server", server)]
    body += [_el("Account_Name", job.account)] if job.account else []
    body += [_el("Checkpoint", "u"), _el("ctime", now),
             _el("Error_Path", f"{server}:{ident.home}/{job.name}.e{number}"),
             _el("exec_host", _exec_host(job, server)), _el("Hold_Types", "n"),
             _el("Join_Path", "n"), _el("Keep_Files", "n"), _el("Mail_Points", "a"),
             _el("mtime", now), _el("Output_Path", f"{server}:{ident.home}/{job.name}.o{number}"),
             _el("Priority", "0"), _el("qtime", now), _el("Rerunable", "True"),
             _resource_xml(job)]
    body += [_el("session_id", str(session_id))] if session_id is not None else []
    body += [_el("Shell_Path_List", job.shell)] if job.shell else []
    body += [_el("substate", "40" if session_id is None else "42"),
             f"<Variable_List>{xml_escape(variables)}</Variable_List>",
             _el("euser", job.user), _el("egroup", ident.group), _el("hashname", job.job_id),
             _el("queue_rank", number), _el("queue_type", "E"),
             _el("comment", "Job started by the pbs_mom emulator"), _el("etime", now),
             _el("submit_args", _submit_args(job)), _el("start_time", now)]
    if walltime:
        body.append(f"<Walltime><Remaining>{walltime_seconds(walltime)}</Remaining></Walltime>")
    body += [_el("start_count", "1"), _el("fault_tolerant", "False"), _el("job_radix", "0"),
             _el("submit_host", server), _el("init_work_dir", ident.home),
             _el("request_version", "1")]
    text = '<?xml version="1.0"?>\n<Data><Job>' + "".join(body) + "</Job></Data>\n"
    return text.encode("utf-8", "surrogateescape")


def _exec_host(job: EmuJob, server: str) -> str:
    vnodes = node_counts(job.resource("nodes") or "1")[2]
    return f"{server}/0" if vnodes <= 1 else f"{server}/0-{vnodes - 1}"


def hms(seconds: float) -> str:
    """HH:MM:SS, as Torque prints times in resources_used."""
    seconds = int(seconds)
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def walltime_seconds(walltime: str) -> int:
    """Seconds of a [[HH:]MM:]SS walltime, as Torque stores it."""
    total = 0
    for part in walltime.split(":"):
        total = total * 60 + int(part or 0)
    return total


def _jb_el(tag: str, text: str) -> str:
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return f"<{tag}>{text}</{tag}>"


def mom_jobfile_xml(job: EmuJob, ident: Identity, *, server: str, cookie: str, substate: int,
                    exit_status: int = 0, session_id: Optional[int] = None,
                    resources_used: str = "") -> bytes:
    """A minimal mom_priv/jobs/ID.JB like pbs_mom 6.1 writes after the prologue: its
    Variable_List commas are NOT escaped (lossy, fixture finding), only & < > are entities."""
    el = _jb_el
    varlist = ",".join(f"{n}={v}" for n, v in server_variable_list(job, ident, server))
    used = "".join(el(n, v) for n, v in (i.split("=", 1) for i in resources_used.split(",") if i))
    attrs = [el("Job_Name", job.name), el("Job_Owner", f"{job.user}@{server}"),
             el("queue", job.queue), el("server", server), el("exec_host", _exec_host(job, server)),
             "<Resource_List>" + "".join(el(n, v) for n, v in job.resources()) + "</Resource_List>"]
    attrs += [el("session_id", str(session_id))] if session_id is not None else []
    attrs += [f"<resources_used>{used}</resources_used>"] if used else []
    attrs += [el("Variable_List", varlist), el("euser", job.user), el("egroup", ident.group),
              el("hashname", job.job_id), el("cookie", cookie)]
    head = [el("state", "4"), el("substate", str(substate)), el("jobid", job.job_id),
            el("fileprefix", job.job_id), el("exit_status", str(exit_status)),
            el("execution_uid", str(ident.uid)), el("execution_gid", str(ident.gid))]
    text = ('<?xml version="1.0"?>\n<job>' + "".join(head) + "<attributes>" + "".join(attrs)
            + "</attributes></job>\n")
    return text.encode("utf-8", "surrogateescape")


PBS_VERSION = "TORQUE-6.1-dev"
MOM_PORT = "15003"
MOM_ENV = (("PATH", "/bin:/usr/bin"), ("LANG", "C.UTF-8"))   # pbs_environment
MOAB_VARS = ("MOAB_NODELIST", "MOAB_JOBID", "MOAB_JOBNAME", "MOAB_USER", "MOAB_GROUP",
             "MOAB_CLASS", "MOAB_TASKMAP", "MOAB_QOS", "MOAB_PARTITION", "MOAB_PROCCOUNT",
             "MOAB_NODECOUNT", "MOAB_MACHINE", "MOAB_JOBARRAYINDEX", "MOAB_JOBARRAYRANGE")


def hook_environment(job: EmuJob, varlist: list, pbs_home: str, server: str) -> dict:
    """The prologue/epilogue environment, in order (prolog.c setup_pelog_environment)."""
    env = dict(MOM_ENV)
    nodes = job.resource("nodes")
    if nodes is not None:
        num_nodes, num_ppn, vnodes = node_counts(nodes)
        env.update(PBS_RESOURCE_NODES=nodes, PBS_NUM_NODES=str(num_nodes),
                   PBS_NUM_PPN=str(num_ppn), PBS_NP=str(vnodes))
    _set_from(env, "PBS_RESOURCE_GRES", job.resource("gres"))
    for name in ("PBS_CPUCLOCK", "PBS_SCHED_HINT"):
        _set_from(env, name, get_job_envvar(varlist, name))
    env.update(PBS_NODENUM="0", PBS_MSHOST=server, PBS_NODEFILE=f"{pbs_home}/aux//{job.job_id}")
    _set_from(env, "PBS_O_WORKDIR", get_job_envvar(varlist, "PBS_O_WORKDIR"))
    _set_from(env, "BEOWULF_JOB_MAP", beowulf_map(varlist))
    for name in MOAB_VARS:
        _set_from(env, name, get_job_envvar(varlist, name))
    return env


def _set_from(env: dict, name: str, value: Optional[str]) -> None:
    if value is not None:
        env[name] = value


def beowulf_map(varlist: list) -> Optional[str]:
    """The BEOWULF_JOB_MAP entry (exact name), which pbs_mom copies to the hooks' env."""
    return next((value for name, value in varlist if name == "BEOWULF_JOB_MAP"), None)


def nodefile_text(job: EmuJob, varlist: list, server: str) -> str:
    """PBS_NODEFILE's contents (write_nodes_to_file): the BEOWULF_JOB_MAP* hosts, else the
    node's name once per vnode."""
    beowulf = get_job_envvar(varlist, "BEOWULF_JOB_MAP")
    if beowulf is not None:
        return "".join(f"{host}\n" for host in beowulf.split(":") if host)
    return f"{server}\n" * node_counts(job.resource("nodes") or "1")[2]


def job_environment(job: EmuJob, varlist: list, ident: Identity, pbs_home: str,
                    server: str, shell: str, cookie: str) -> dict:
    """The job shell's environment, in order (start_exec.c InitUserEnv + TMomFinalizeChild):
    a name seen again keeps its first place and takes the new value, so the last -v entry
    wins and the real PBS_JOBID overrides a user's (fixtures 25 and 29)."""
    env = dict(MOM_ENV)
    env.update(varlist)
    nodefile = f"{pbs_home}/aux//{job.job_id}"
    env.update(HOME=ident.home, LOGNAME=ident.user, PBS_JOBNAME=job.name,
               PBS_JOBID=job.job_id, PBS_QUEUE=job.queue, SHELL=shell, USER=ident.user,
               PBS_JOBCOOKIE=cookie, PBS_NODENUM="0", PBS_TASKNUM="1", PBS_MOMPORT=MOM_PORT,
               PBS_NODEFILE=nodefile, PBS_GPUFILE=nodefile + "gpu",
               PBS_MICFILE=nodefile + "mic", HOSTNAME=server)
    walltime = job.resource("walltime")
    if walltime:
        env["PBS_WALLTIME"] = str(walltime_seconds(walltime))
    nodes = job.resource("nodes")
    num_nodes, num_ppn, vnodes = node_counts(nodes) if nodes is not None else (1, 1, 1)
    env.update(PBS_NUM_NODES=str(num_nodes), PBS_NUM_PPN=str(num_ppn),
               PBS_VERSION=PBS_VERSION, PBS_VNODENUM="0", PBS_NP=str(vnodes),
               PBS_ENVIRONMENT="PBS_BATCH", ENVIRONMENT="BATCH")
    return env


def check_pelog(path: str) -> Optional[int]:
    """None if pbs_mom would run this hook, else run_pelog()'s value without running it:
    0 if absent, -1 unless root-owned regular u+rx not group/other-writable, errno on error."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0
    except OSError as err:
        return err.errno
    mode = st.st_mode
    if st.st_uid != 0 or not stat.S_ISREG(mode) or mode & 0o500 != 0o500 or mode & 0o022:
        return -1   # PELOG_REFUSED
    return None


def install_hook(path: Path, text: str, mode: int = 0o500) -> Path:
    """Write a hook script root:root (when we are root) with mode, as site admins do."""
    return install_file(path, text, mode)


_QSTAT = r"""#!/bin/sh
# Fake `qstat -f -x ID` written by tests/fakes.py: prints JOBS/ID.xml. No environment used.
jobs=@JOBS@
printf '%s\n' "$*" >> "$jobs/qstat.calls"
full=0 xml=0 id=
for a in "$@"; do
  case $a in
    -*) opts=${a#-}
        while [ -n "$opts" ]; do
          c=${opts%"${opts#?}"}; opts=${opts#?}
          case $c in f) full=1 ;; x) xml=1 ;; 1) ;;
            *) echo "qstat: invalid option -- '$c'" >&2; exit 2 ;; esac
        done ;;
    *) id=$a ;;
  esac
done
if [ "$full$xml" != 11 ] || [ -z "$id" ]; then
  echo "usage: qstat -f -x JOBID (fake qstat)" >&2; exit 2
fi
case $id in */*|.*) echo "qstat: Unknown Job Id $id" >&2; exit 153 ;; esac
if [ -f "$jobs/$id.delay" ]; then /bin/sleep "$(/bin/cat "$jobs/$id.delay")"; fi
if [ -f "$jobs/$id.exit" ]; then
  echo "qstat: simulated failure for $id" >&2; exit "$(/bin/cat "$jobs/$id.exit")"
fi
if [ -f "$jobs/$id.xml" ]; then exec /bin/cat "$jobs/$id.xml"; fi
echo "qstat: Unknown Job Id $id" >&2
exit 153
"""

_PBSNODES = """#!@PYTHON@ -IS
# Fake pbsnodes written by tests/fakes.py: appends its argv (a JSON list) to LOG; exits 0.
import json, sys
with open(@LOG@, "a", encoding="utf-8", errors="surrogateescape") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def install_file(path: Path, data: Union[str, bytes], mode: int = 0o755) -> Path:
    """Atomically write path with mode, root:root when we are root; returns path."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data)
    if os.geteuid() == 0:
        os.chown(tmp, 0, 0)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return path


def write_fake_qstat(bindir: Path, jobs_dir: Path) -> Path:
    """Write bindir/qstat answering `qstat -f -x ID` from jobs_dir/ID.xml (exit 153 if absent);
    every call's argv is appended, space-joined, to jobs_dir/qstat.calls."""
    bindir.mkdir(mode=0o755, parents=True, exist_ok=True)
    jobs_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    return install_file(bindir / "qstat", _QSTAT.replace("@JOBS@", shlex.quote(str(jobs_dir))))


def read_qstat_calls(jobs_dir: Path) -> list[list[str]]:
    """The argv of every fake qstat call so far (split on spaces)."""
    path = jobs_dir / "qstat.calls"
    return [line.split(" ") for line in path.read_text().splitlines()] if path.exists() else []


def set_qstat_fault(jobs_dir: Path, job_id: str, *, delay: Optional[float] = None,
                    exit_code: Optional[int] = None) -> None:
    """Make the fake qstat sleep `delay` s and/or fail with `exit_code` for this job."""
    if delay is not None:
        install_file(jobs_dir / f"{job_id}.delay", f"{delay}\n", 0o644)
    if exit_code is not None:
        install_file(jobs_dir / f"{job_id}.exit", f"{exit_code}\n", 0o644)


def write_fake_pbsnodes(bindir: Path, log: Path) -> Path:
    """Write bindir/pbsnodes appending its argv as one JSON list per line to log, exit 0."""
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    bindir.mkdir(mode=0o755, parents=True, exist_ok=True)
    text = _PBSNODES.replace("@PYTHON@", python).replace("@LOG@", json.dumps(str(log)))
    return install_file(bindir / "pbsnodes", text)


def read_pbsnodes_calls(log: Path) -> list[list[str]]:
    """The argv lists the fake pbsnodes logged, oldest first."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text(errors="surrogateescape").splitlines()]
