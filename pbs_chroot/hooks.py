"""Torque's prologue and epilogue: argv in, exit code out.

Run by pbs_mom as root, with umask 0077 (prologue) or 0022 (epilogue),
stdin /dev/null, stdout/stderr on the job's output files, cwd mom_priv, and
a nearly empty environment (no job variables: they come from the server).
Exit codes of the prologue: 0 run the job, 1 abort it (the user's fault),
2 requeue it (a site fault: the node is taken offline first, so the job
does not bounce straight back here). The epilogue exits 2 only to flag a
site fault; pbs_mom just logs it.
"""
from __future__ import annotations

import os
import sys

from . import config as config_mod
from . import gate, lifecycle, log
from .errors import PbsChrootError, SiteError, UserError
from .state import check_job_id, ensure_layout

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Optional, Sequence

    from . import shells
    from .config import Config
    from .jobinfo import JobVariables, PendingRead

__all__ = ["prologue_main", "epilogue_main", "run_main", "offline_node", "is_parallel", "LOST"]

logger = log.get_logger("pbs_chroot.hooks")

_PROLOGUE_ARGS = 7   # ID USER GROUP JOBNAME RESOURCE_LIST QUEUE ACCOUNT [SCRIPT]
_EPILOGUE_ARGS = 10  # ID USER GROUP JOBNAME SESSION RESOURCE_LIST USED QUEUE ACCOUNT EXIT [SCRIPT]
_OFFLINE_TIMEOUT = 10.0
LOST = "--hookd-lost"  # argv[1] from the C client: its server's worker died (hookd.py)


def prologue_main(argv: Sequence[str], config_path: str = config_mod.DEFAULT_PATH,
                  pbsnodes: str = "/usr/bin/pbsnodes", syslog: str = "/dev/log",
                  parent: Optional[int] = None) -> int:
    """Entry point of mom_priv/prologue and prologue.parallel.

    parent: the parent of the process pbs_mom started, when that process is not this
    one (the hook server's worker runs this for its client: hookd.py); default ours.
    ``NAME.py --hookd-lost ARGS``: the C client's hook server worker for this job died
    before it answered (starter/hook_client.c): a site fault, whatever the worker had
    done (its steps are journaled: the epilogue or the reconciler finishes them).
    """
    if list(argv[1:2]) == [LOST]:  # never a job id (check_job_id)
        return run_main("prologue", [argv[0], *argv[2:]], _lost, config_path, pbsnodes,
                        syslog)
    return run_main("prologue", argv, lambda cfg, args: _prologue(cfg, args, parent),
                    config_path, pbsnodes, syslog)


def epilogue_main(argv: Sequence[str], config_path: str = config_mod.DEFAULT_PATH,
                  pbsnodes: str = "/usr/bin/pbsnodes", syslog: str = "/dev/log",
                  answer: Optional[Callable[[], None]] = None) -> int:
    """Entry point of mom_priv/epilogue and epilogue.parallel.

    answer: called once the job's processes are dead, its accounting written and the
    user told of OOM kills (the hook server's worker answers pbs_mom there and does the
    rest, stage and cgroup, after it: hookd.py); then defer_teardown does not fork.
    """
    return run_main("epilogue", argv, lambda cfg, args: _epilogue(cfg, args, answer),
                    config_path, pbsnodes, syslog)


def _lost(cfg: Config, argv: Sequence[str]) -> None:
    raise SiteError("the hook server's worker for this job died before it answered "
                    "(killed, or out of memory?): see pbs-chroot-hookd in syslog")


def is_parallel(argv0: str) -> bool:
    """Whether the hook is prologue.parallel or epilogue.parallel (a sister node's): the
    name pbs_mom ran, or the Python hook beside the C client (NAME.py)."""
    name = argv0[:-3] if argv0.endswith(".py") else argv0
    return name.endswith(".parallel")


def _prologue(cfg: Config, argv: Sequence[str], parent: Optional[int]) -> None:
    _shun_oom_killer()  # first thing once syslog is set up
    if len(argv) < _PROLOGUE_ARGS + 1:
        raise SiteError(f"prologue called with {len(argv) - 1} arguments, pbs_mom passes "
                        f"at least {_PROLOGUE_ARGS}")
    job = lifecycle.Job(check_job_id(argv[1]), argv[2], argv[3], argv[6], argv[5])
    ppid = parent if parent is not None else os.getppid()
    pid = _future_job_process(argv[0], ppid)
    spawner = _task_spawner(argv[0], pid, ppid)
    from . import jobinfo  # the prologue's only: the epilogue need not load it
    # The server query runs from now on, beside the record and the cgroup's set-up.
    pending = jobinfo.PendingRead(job.job_id, cfg.job_info, cfg.qstat, cfg.job_info_timeout)
    try:
        _start(cfg, job, argv[0], pid, spawner, pending)
    finally:
        pending.cancel()  # (a qstat not waited for: the set-up failed first)


def _start(cfg: Config, job: lifecycle.Job, argv0: str, pid: Optional[int],
           spawner: Optional[int], pending: PendingRead) -> None:
    """Check the request and start the job: its record, cgroup, stage, attach."""
    chosen: list[Optional[str]] = []
    # The job's shell is looked up in its stage, once the job has joined it.
    joined = None if is_parallel(argv0) else (
        lambda version: _check_shell(cfg, job, chosen[-1] or version, version,
                                     pending.result()))
    if cfg.cgroups and cfg.early_attach and pid is not None:
        # The server query overlaps the move into the cgroup (early.py); a refusal
        # undoes the job's start, moving the process back out first.
        ensure_layout(cfg.state_dir)
        version = lifecycle.start_job(cfg, job, None, pid, spawner,
                                      lambda: _checked(cfg, job, argv0, chosen, pending),
                                      joined)
        image = chosen[0] if chosen else None
    else:
        try:
            image = _checked(cfg, job, argv0, chosen, pending)
        except UserError as e:
            if not is_parallel(argv0):
                raise
            # Torque turns any failure of prologue.parallel into a requeue (job_start_error):
            # a refusal here would loop through the queue. Mother superior's prologue runs
            # next, after every sister, with the same gate: it aborts the job and tells the
            # user. Nothing is set up here, so no task of the job can run in a stage.
            logger.warning("job %s refused on this sister: %s; nothing set up here, the "
                           "mother superior's prologue decides", job.job_id, e.detail)
            return
        if image is None and not cfg.cgroups:
            return
        ensure_layout(cfg.state_dir)
        version = lifecycle.start_job(cfg, job, image, pid, spawner, joined=joined)
    if image is not None:
        logger.info("job %s (user %s, queue %s) runs in image %s (version %s)",
                    job.job_id, job.user, job.queue, image, version)


def _checked(cfg: Config, job: lifecycle.Job, argv0: str, chosen: list[Optional[str]],
             pending: PendingRead) -> Optional[str]:
    """The allowlisted path the job asks for (None: no image), read from the server and
    checked (its shell is checked later, in its stage: _check_shell); UserError if
    refused, after telling the user in the job's error file. Also appended to ``chosen``."""
    from . import jobinfo
    variables = pending.result()
    try:
        image = gate.check_request(variables.entries, jobinfo.lossy_names(variables.raw), cfg,
                                   job.user, job.queue)
    except UserError as e:
        if not is_parallel(argv0):  # once, from the mother superior
            _tell_user_file(job.job_id, job.user, variables, e.user_msg)
        raise
    chosen.append(image.path if image is not None else None)
    return chosen[-1]


def _check_shell(cfg: Config, job: lifecycle.Job, image: str, version: str,
                 variables: JobVariables) -> None:
    """Refuse a job whose shell pbs_mom could not exec in its stage (UserError, after
    telling the user in the job's error file). The mother superior's only: the job's
    shell runs there, and a sister's prologue.parallel holds up pbs_mom's main loop."""
    import pwd

    from . import shells
    node = cfg.node_name or os.uname().nodename
    try:
        pw = pwd.getpwnam(job.user)
    except KeyError:
        raise SiteError(f"job owner {job.user!r} is not known on this node") from None
    shell = shells.pick_shell(variables.shell, node) or pw.pw_shell or "/bin/sh"  # as pbs_mom
    binds = [b.target for b in cfg.binds] + ([cfg.tmpdir] if cfg.tmpdir else [])
    ids = (pw.pw_uid, pw.pw_gid, os.getgrouplist(job.user, pw.pw_gid))
    cache = _shell_cache(cfg, version) if cfg.shell_cache else None
    problem = shells.shell_problem_as_user(version, shell, *ids, skip=binds, cache=cache)
    if problem:
        hint = not shells.shell_problem_as_user(version, shells.SHELL_HINT, *ids, cache=cache)
        e = UserError(shells.refusal(image, shell, problem, hint))
        _tell_user_file(job.job_id, job.user, variables, e.user_msg)
        raise e


def _shell_cache(cfg: Config, version: str) -> Optional[shells.ShellCache]:
    """The remembered shells of ``version``'s stage, keyed on what it mounts (None: its
    info.json names no mount points, e.g. a stage kept from an older config)."""
    from . import shells
    from .stage import stage_dir
    from .state import read_json
    info = read_json(os.path.join(stage_dir(cfg, version), "info.json"))
    targets = info.get("targets") if isinstance(info, dict) else None
    if not isinstance(targets, list):
        return None
    return shells.ShellCache(os.path.join(cfg.state_dir, "shells"), version,
                             "\0".join(str(t) for t in targets))


def _tell_user_file(job_id: str, user: str, variables: JobVariables, msg: str) -> None:
    """Append the refusal line to the job's error file, as the user (userfile.py)."""
    from . import userfile
    path = userfile.target_path(variables.error_path, variables.output_path, variables.join)
    if path:
        userfile.append_as_user(user, path, _user_line(job_id, msg))


def _shun_oom_killer() -> None:
    """Never be the OOM killer's pick: pbs_mom takes a prologue killed by a signal
    for a success (run_pelog reads WEXITSTATUS only) and starts the job, even
    one whose request the gate had not yet checked."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError as e:
        logger.warning("can't protect the prologue from the OOM killer: %s", e.strerror)


def _future_job_process(argv0: str, ppid: int) -> Optional[int]:
    """The prologue's parent ``ppid``: pbs_mom's child that becomes the job (DESIGN.md).

    Never pbs_mom itself: on sister nodes prologue.parallel may be run by the
    daemon, which must not land in (and be killed with) a job's cgroup.
    """
    if is_parallel(argv0) or ppid == 1:
        return None
    try:
        with open(f"/proc/{ppid}/stat") as f:
            grandparent = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
    if grandparent == 1:  # the parent is a daemon (pbs_mom's main process)
        logger.warning("prologue's parent %d is a daemon: not moving it into a job cgroup", ppid)
        return None
    return ppid


def _task_spawner(argv0: str, job_process: Optional[int], ppid: int) -> Optional[int]:
    """pbs_mom's pid, if this node may run TM tasks of the job (a job on several nodes, or
    on several cores of one: pbsdsh and mpiexec spawn there too); else None.

    A sister runs prologue.parallel from the pbs_mom daemon itself
    (im_join_job_as_sister -> run_prologue_scripts); on the mother superior
    the prologue's parent is the job child, whose parent is pbs_mom. Either
    way pbs_mom forks the tasks (start_process), outside the job's process
    tree (docs/torque-multinode.md).
    """
    if is_parallel(argv0):
        return ppid if ppid != 1 else None
    if job_process is None or not (_count_env("PBS_NUM_NODES") > 1 or _count_env("PBS_NP") > 1):
        return None  # one core on one node: no TM task to adopt but the job's own
    mom = _parent_of(job_process)
    return mom if mom not in (None, 1) else None


def _count_env(name: str) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isascii() and value.isdigit() and len(value) < 7 else 0


def _parent_of(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _epilogue(cfg: Config, argv: Sequence[str], answer: Optional[Callable[[], None]]) -> None:
    if len(argv) < _EPILOGUE_ARGS + 1:
        raise SiteError(f"epilogue called with {len(argv) - 1} arguments, pbs_mom passes "
                        f"at least {_EPILOGUE_ARGS}")
    job_id = check_job_id(argv[1])
    told: list[bool] = []

    def accounted(acct: Optional[dict]) -> None:  # type: ignore[type-arg]
        if acct and acct.get("oom_kills"):
            _tell_user(job_id, oom_message(acct))
        told.append(True)
        if answer is not None:
            answer()
    acct = lifecycle.end_job(cfg, job_id, argv[10], extra=_job_nodes(argv),
                             defer=cfg.defer_teardown and answer is None, accounted=accounted)
    if not told and acct and acct.get("oom_kills"):
        _tell_user(job_id, oom_message(acct))


def _job_nodes(argv: Sequence[str]) -> dict[str, object]:
    """What the accounting line says of the job's other nodes.

    A sister's line says it is one (its own usage, its own node). The mother
    superior's epilogue runs after every sister's epilogue.parallel has sent
    its obit (catch_child.c exit_mom_job -> send_job_obit_to_ms), so its
    RESOURCES_USED is Torque's sum over all nodes; its line names the nodes
    from $PBS_NODEFILE and keeps that sum.
    """
    if is_parallel(argv[0]):
        return {"sister": True}
    hosts: list[str] = []
    try:
        with open(os.environ.get("PBS_NODEFILE", "") or "/nonexistent") as f:
            for line in f:
                host = line.strip()
                if host and host not in hosts:
                    hosts.append(host)
    except OSError:
        return {}
    if len(hosts) < 2:
        return {}
    return {"nodes": hosts, "torque_resources_used": argv[7][:1000]}


def oom_message(acct: dict) -> str:  # type: ignore[type-arg]
    """The line a user reads in the error file when the job hit its memory limit."""
    limit, peak = acct.get("mem_limit_bytes"), acct.get("mem_peak_bytes")
    what = f"the job's memory limit of {_mib(limit)}" if limit else "the node's memory"
    return (f"a process was killed for exceeding {what}"
            + (f" (peak {_mib(peak)})" if peak else ""))


def _mib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 10 * 2**30 else f"{round(n / 2**20)} MiB"


def run_main(hook: str, argv: Sequence[str], body: Callable[[Config, Sequence[str]], None],
             config_path: str, pbsnodes: str, syslog: str = "/dev/log") -> int:
    """Run a hook body; turn its outcome into the exit code pbs_mom understands.

    ``syslog``: the socket fixed at install time, used until the config names its own
    (and, like ``pbsnodes``, the only one when the config is refused).
    """
    log.setup(f"pbs-chroot-{hook}", syslog)
    job_id = gate.show(argv[1]) if len(argv) > 1 else "?"
    cfg: Optional[Config] = None
    try:
        cfg = config_mod.load(config_path)
        log.use_socket(cfg.syslog_socket)
        body(cfg, argv)
        return 0
    except UserError as e:
        logger.warning("job %s refused: %s", job_id, e.detail)
        _tell_user(job_id, e.user_msg)
        return 1 if hook == "prologue" else 0
    except PbsChrootError as e:
        logger.error("job %s: %s failed: %s", job_id, hook, e.detail)
        user_msg = e.user_msg
    except Exception as e:  # a bug: still a site fault, never a silent pass
        logger.exception("job %s: %s failed with an internal error: %r", job_id, hook, e)
        user_msg = SiteError("").user_msg
    if hook == "prologue":  # after the job, a site fault is the admin's business only
        _tell_user(job_id, user_msg)
    offline_node(cfg, pbsnodes, f"{hook} of job {job_id} failed, see syslog")
    return 2


def _user_line(job_id: str, msg: str) -> str:
    return f"pbs-chroot: job {job_id}: {msg}\n"


def _tell_user(job_id: str, msg: str) -> None:
    try:
        sys.stderr.write(_user_line(job_id, msg))
        sys.stderr.flush()
    except OSError:
        pass


def offline_node(cfg: Optional[Config], pbsnodes: str, reason: str) -> None:
    """Take this node offline with a note, unless the config says not to. Never raises.

    With no trusted config (it was refused), the policy is the safe default:
    offline, through the pbsnodes path fixed at install time, never one read
    from an untrusted file.
    """
    if cfg is not None and not cfg.offline_node:
        return
    import subprocess
    node = (cfg.node_name if cfg is not None else "") or os.uname().nodename.split(".")[0]
    cmd = [pbsnodes, "-o", "-N", f"pbs-chroot: {reason}"[:250], node]
    try:
        res = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, timeout=_OFFLINE_TIMEOUT,
                             env={"PATH": "/bin:/usr/bin", "LC_ALL": "C"})
    except (OSError, subprocess.TimeoutExpired) as e:
        logger.error("can't take node %s offline with %s: %s", node, pbsnodes, e)
        return
    if res.returncode != 0:
        logger.error("can't take node %s offline: %s exited %d: %s", node, pbsnodes,
                     res.returncode, res.stderr.decode(errors="replace").strip()[:200])
    else:
        logger.warning("node %s taken offline: %s", node, reason)
