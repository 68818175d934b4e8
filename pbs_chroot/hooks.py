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

    from .config import Config

__all__ = ["prologue_main", "epilogue_main", "run_main", "offline_node"]

logger = log.get_logger("pbs_chroot.hooks")

_PROLOGUE_ARGS = 7   # ID USER GROUP JOBNAME RESOURCE_LIST QUEUE ACCOUNT [SCRIPT]
_EPILOGUE_ARGS = 10  # ID USER GROUP JOBNAME SESSION RESOURCE_LIST USED QUEUE ACCOUNT EXIT [SCRIPT]
_OFFLINE_TIMEOUT = 10.0


def prologue_main(argv: Sequence[str], config_path: str = config_mod.DEFAULT_PATH,
                  pbsnodes: str = "/usr/bin/pbsnodes") -> int:
    """Entry point of mom_priv/prologue and prologue.parallel."""
    return run_main("prologue", argv, _prologue, config_path, pbsnodes)


def epilogue_main(argv: Sequence[str], config_path: str = config_mod.DEFAULT_PATH,
                  pbsnodes: str = "/usr/bin/pbsnodes") -> int:
    """Entry point of mom_priv/epilogue and epilogue.parallel."""
    return run_main("epilogue", argv, _epilogue, config_path, pbsnodes)


def _prologue(cfg: Config, argv: Sequence[str]) -> None:
    _shun_oom_killer()  # first thing once syslog is set up
    if len(argv) < _PROLOGUE_ARGS + 1:
        raise SiteError(f"prologue called with {len(argv) - 1} arguments, pbs_mom passes "
                        f"at least {_PROLOGUE_ARGS}")
    job = lifecycle.Job(check_job_id(argv[1]), argv[2], argv[3], argv[6], argv[5])
    pid = _future_job_process(argv[0])
    if cfg.cgroups and cfg.early_attach and pid is not None:
        # The server query overlaps the move into the cgroup (early.py); a refusal
        # undoes the job's start, moving the process back out first.
        ensure_layout(cfg.state_dir)
        chosen: list[Optional[str]] = []
        version = lifecycle.start_job(cfg, job, None, pid,
                                      lambda: _checked(cfg, job, chosen))
        image = chosen[0] if chosen else None
    else:
        image = _checked(cfg, job, [])
        if image is None and not cfg.cgroups:
            return
        ensure_layout(cfg.state_dir)
        version = lifecycle.start_job(cfg, job, image, pid)
    if image is not None:
        logger.info("job %s (user %s, queue %s) runs in image %s (version %s)",
                    job.job_id, job.user, job.queue, image, version)


def _checked(cfg: Config, job: lifecycle.Job, chosen: list[Optional[str]]) -> Optional[str]:
    """The allowlisted path the job asks for (None: no image), read from the server and
    checked; UserError if refused. Also appended to ``chosen``."""
    from . import jobinfo  # the prologue's only: the epilogue need not load it
    variables = jobinfo.read_variables(job.job_id, source=cfg.job_info, qstat=cfg.qstat,
                                       timeout=cfg.job_info_timeout)
    image = gate.check_request(variables.entries, jobinfo.lossy_names(variables.raw), cfg,
                               job.user, job.queue)
    chosen.append(image.path if image is not None else None)
    return chosen[-1]


def _shun_oom_killer() -> None:
    """Never be the OOM killer's pick: pbs_mom takes a prologue killed by a signal
    for a success (run_pelog reads WEXITSTATUS only) and starts the job, even
    one whose request the gate had not yet checked."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError as e:
        logger.warning("can't protect the prologue from the OOM killer: %s", e.strerror)


def _future_job_process(argv0: str) -> Optional[int]:
    """The prologue's parent: pbs_mom's child that becomes the job (DESIGN.md).

    Never pbs_mom itself: on sister nodes prologue.parallel may be run by the
    daemon, which must not land in (and be killed with) a job's cgroup.
    """
    ppid = os.getppid()
    if argv0.endswith(".parallel") or ppid == 1:
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


def _epilogue(cfg: Config, argv: Sequence[str]) -> None:
    if len(argv) < _EPILOGUE_ARGS + 1:
        raise SiteError(f"epilogue called with {len(argv) - 1} arguments, pbs_mom passes "
                        f"at least {_EPILOGUE_ARGS}")
    job_id = check_job_id(argv[1])
    acct = lifecycle.end_job(cfg, job_id, argv[10], defer=cfg.defer_teardown)
    if acct and acct.get("oom_kills"):
        _tell_user(job_id, oom_message(acct))


def oom_message(acct: dict) -> str:  # type: ignore[type-arg]
    """The line a user reads in the error file when the job hit its memory limit."""
    limit, peak = acct.get("mem_limit_bytes"), acct.get("mem_peak_bytes")
    what = f"the job's memory limit of {_mib(limit)}" if limit else "the node's memory"
    return (f"a process was killed for exceeding {what}"
            + (f" (peak {_mib(peak)})" if peak else ""))


def _mib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 10 * 2**30 else f"{round(n / 2**20)} MiB"


def run_main(hook: str, argv: Sequence[str], body: Callable[[Config, Sequence[str]], None],
             config_path: str, pbsnodes: str) -> int:
    """Run a hook body; turn its outcome into the exit code pbs_mom understands."""
    log.setup(f"pbs-chroot-{hook}")
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


def _tell_user(job_id: str, msg: str) -> None:
    try:
        sys.stderr.write(f"pbs-chroot: job {job_id}: {msg}\n")
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
