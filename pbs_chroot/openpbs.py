"""OpenPBS's hook: one hook script for every event, a thin adapter over the Torque hooks' lifecycle.

Facts it rests on (docs/openpbs.md, ../shared/fixtures/openpbs, OpenPBS's
src/resmom/start_exec.c): qsub drops every ``PBS_O_*`` variable a user passes,
so a job asks for its image with a job-wide string resource, ``qsub -l
image=/chroot/sl5`` (``image_resource`` in the config). queuejob and modifyjob
run inside the server (no fork, no exit, no process state changed here);
every execjob_* and exechost_* event runs in a pbs_python process of its own,
as root, with PATH=/bin:/usr/bin. execjob_begin and execjob_end are children
of pbs_mom; execjob_launch is a child of the process that becomes the job
(finish_exec) or a TM task (start_process), still root, which becomes the
user after the hook and execs ``e.progname``.

    queuejob, modifyjob   the gate, at qsub/qalter: e.reject() prints the line
    execjob_begin         the gate again (never trust the server), stage, cgroup
    execjob_launch        the hook's parent into the cgroup; the shim put first
    execjob_attach        pbs_attach's process into the cgroup (not the image: it runs)
    execjob_epilogue/end  kill what is left, accounting, leave the stage
    exechost_startup/periodic   the reconciler

A user's fault found on a node deletes the job, with the line in its comment;
a site fault takes the node offline with a comment and requeues the job.
"""
from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Optional

    from .config import Config

__all__ = ["EVENTS", "hook", "local_resources", "launch_argv"]

EVENTS = ("queuejob", "modifyjob", "execjob_begin", "execjob_launch", "execjob_attach",
          "execjob_epilogue", "execjob_end", "exechost_startup", "exechost_periodic")
_SERVER_EVENTS = ("queuejob", "modifyjob")
_PREFIX = "pbs-chroot: "


class _Rejected(Exception):
    """Raised by a handler: the event is to be rejected with this message (after the rest)."""


def hook(pbs: Any, config_path: str, shim: str, syslog: str = "/dev/log") -> None:
    """Run the handler of the current event. Returns to accept; e.reject() raises SystemExit."""
    e = pbs.event()
    name = next((n for n in EVENTS if getattr(pbs, n.upper(), None) == e.type), "")
    if not name:
        return
    from . import log
    # The server's interpreter is the server's: no handler of the logging package there.
    log.setup(f"pbs-chroot-{name}", syslog, route_logging=name not in _SERVER_EVENTS)
    if name in _SERVER_EVENTS:
        msg = _at_submission(pbs, e, name, config_path)
    else:
        msg = _on_node(pbs, e, name, config_path, shim)
    if msg:
        e.reject(msg)


# -- at the server ---------------------------------------------------------------------

def _at_submission(pbs: Any, e: Any, name: str, config_path: str) -> str:
    """queuejob/modifyjob: the refusal line ('' to accept). Never blocks a job for a fault of
    its own: the execution hosts check again, and a job without an image is passed before the
    config is read."""
    from .errors import PbsChrootError, UserError
    from .log import get_logger
    logger = get_logger("pbs_chroot.openpbs")
    job = e.job
    try:
        # qalter: e.job holds what changes, e.job_o the job as it is.
        owner_job = e.job_o if name == "modifyjob" else job
    except AttributeError:
        owner_job = job
    cfg = None
    try:
        from . import config as config_mod
        cfg = config_mod.load(config_path)
        value = resource_value(job, cfg.image_resource)
        if value is None:
            return ""
        user = (_text(owner_job.euser) if name == "modifyjob"
                else _text(e.requestor)).partition("@")[0]
        queue = _queue_at_server(pbs, _text(owner_job.queue) or _default_queue(pbs))
        from . import gate
        # No NSS lookup in the server's thread (a slow LDAP would hold every qsub): images
        # limited to groups are left to execjob_begin, which looks the user up.
        gate.check_value(value, cfg, user, queue, f"-l {cfg.image_resource}", nss=False)
        return ""
    except UserError as err:
        logger.warning("%s refused for user %s: %s", name, _text(e.requestor), err.detail)
        return _PREFIX + err.user_msg
    except PbsChrootError as err:
        logger.error("%s: can't check the image request, the execution host will: %s",
                     name, err.detail)
    except Exception as err:  # a bug must never stop the server's job submissions
        logger.exception("%s: internal error, passing the job to the execution host's "
                         "check: %r", name, err)
    return ""


def _default_queue(pbs: Any) -> str:
    try:
        return _text(pbs.server().default_queue)
    except Exception:
        return ""


def _queue_at_server(pbs: Any, name: str) -> Optional[str]:
    """The queue the job will run from, if known at submission: not for a routing queue (the
    execution queue is chosen later; execjob_begin checks it), nor when unsure."""
    if not name:
        return None
    try:
        kind = _text(pbs.server().queue(name).queue_type)
    except Exception:
        return None
    return name if kind.lower().startswith("e") else None


# -- on the execution host --------------------------------------------------------------

def _on_node(pbs: Any, e: Any, name: str, config_path: str, shim: str) -> str:
    """An execjob_*/exechost_* event: the reject message ('' to accept)."""
    from . import config as config_mod
    from .errors import PbsChrootError, UserError
    from .log import get_logger
    logger = get_logger("pbs_chroot.openpbs")
    job = getattr(e, "job", None) if name.startswith("execjob_") else None
    offline_ok = name != "execjob_attach"  # pbs_attach is the user's request: never offline
    job_id = _text(job.id) if job is not None else ""
    cfg: Optional[Config] = None
    try:
        cfg = config_mod.load(config_path)
        log_socket(cfg)
        _HANDLERS[name](pbs, e, cfg, shim)
        return ""
    except UserError as err:
        logger.warning("job %s refused: %s", job_id, err.detail)
        if job is not None and name in ("execjob_begin", "execjob_launch"):
            return _user_fault(pbs, e, job, _PREFIX + err.user_msg)
        return _PREFIX + err.user_msg if name == "execjob_attach" else ""
    except PbsChrootError as err:
        logger.error("job %s: %s failed: %s", job_id or "-", name, err.detail)
    except Exception as err:  # a bug: still a site fault, never a silent pass
        logger.exception("job %s: %s failed with an internal error: %r", job_id or "-",
                         name, err)
    if not offline_ok:  # pbs_attach: refused, the node stays
        return _PREFIX + "can't attach the process (the admin is told)"
    return _site_fault(pbs, e, job, cfg, name, job_id)


def log_socket(cfg: Config) -> None:
    from . import log
    log.use_socket(cfg.syslog_socket)


def _user_fault(pbs: Any, e: Any, job: Any, line: str) -> str:
    """The job is deleted, with the line in its comment; never requeued to fail again."""
    try:
        job.comment = line[:250]
    except Exception:
        pass
    try:
        job.delete()
    except Exception as err:
        from .log import get_logger
        get_logger("pbs_chroot.openpbs").error("job %s: can't delete it: %r", _text(job.id), err)
    return line


def _site_fault(pbs: Any, e: Any, job: Any, cfg: Optional[Config], name: str,
                job_id: str) -> str:
    """Take this node offline with a comment; a job not yet running is requeued."""
    reason = (f"{name} of job {job_id} failed, see syslog" if job_id
              else f"{name} failed, see syslog")
    if cfg is None or cfg.offline_node:
        offline(pbs, e, reason)
    if job is None or name not in ("execjob_begin", "execjob_launch"):
        return ""  # after the job, or no job: the admin's business only
    if name == "execjob_launch":  # a plain reject there deletes the job (finish_exec)
        try:
            job.rerun()
        except Exception:
            pass
    # execjob_begin: the reject with this node offline puts the job back in the queue,
    # run once (fixtures/openpbs fact 7): no retry storm on this node.
    return _PREFIX + "a fault of this node (the admin is told); the job is requeued"


def offline(pbs: Any, e: Any, reason: str) -> None:
    """This host's vnode offline, with ``reason`` as its comment. Never raises."""
    from .log import get_logger
    logger = get_logger("pbs_chroot.openpbs")
    try:
        node = pbs.get_local_nodename()
        vnode = e.vnode_list[node]
        vnode.state = pbs.ND_OFFLINE
        vnode.comment = (_PREFIX + reason)[:250]
        logger.warning("node %s taken offline: %s", node, reason)
    except Exception as err:
        logger.error("can't take this node offline: %r", err)


def _begin(pbs: Any, e: Any, cfg: Config, shim: str) -> None:
    from . import gate, lifecycle
    from .errors import SiteError
    from .state import check_job_id, ensure_layout
    job = e.job
    job_id = check_job_id(_text(job.id))
    user, queue = _text(job.euser), _text(job.queue)
    value = resource_value(job, cfg.image_resource)
    image = None
    if value is not None:
        image = gate.check_value(value, cfg, user, queue, f"-l {cfg.image_resource}").path
        problem = node_problem(cfg, shim)
        if problem:
            raise SiteError(f"can't run jobs in an image here: {problem}")
    if image is None and not cfg.cgroups:
        return
    _check_cgroup_owner(cfg, job_id)
    ensure_layout(cfg.state_dir)
    res = local_resources(_text(job.exec_vnode), _local_node(pbs),
                          _text(job.Resource_List))
    version = lifecycle.start_job(cfg, lifecycle.Job(job_id, user, _text(job.egroup), queue, res),
                                  image, None)
    if image is not None:
        from .log import get_logger
        get_logger("pbs_chroot.openpbs").info(
            "job %s (user %s, queue %s) runs in image %s (version %s)", job_id, user, queue,
            image, version)


OPENPBS_CGROUP_PARENT = "pbs_jobs.service/jobid"  # pbs_cgroups.PY's, on cgroup v1
LAUNCH_HOOK = "pbs_chroot_launch"  # openpbsinstall.HOOKS


def node_problem(cfg: Config, shim: str) -> str:
    """Why this host can't start a job in an image ('' if nothing says so): checked as root
    at execjob_begin and exechost_startup, so that a job is not staged for a shim that would
    fail as the user (a site fault, the node offline), nor started with no launch hook."""
    from .usernscheck import userns_problem
    if not (cfg.cgroups and cfg.entry_dir):
        return ("jobs in an image need cgroups = yes and entry_dir set on OpenPBS (the shim "
                "finds its job by its cgroup, its stage in entry_dir)")
    problem = userns_problem()
    if problem:
        return problem.replace("can't run unprivileged: ", "")
    for path in (shim, _interpreter(shim)):
        try:
            st = os.stat(path)
        except OSError as err:
            return f"{path}: {err.strerror}"
        if st.st_mode & 0o005 != 0o005:
            return f"{path} is not readable and executable by the job users"
    hook = os.path.join(cfg.pbs_home, "mom_priv", "hooks", f"{LAUNCH_HOOK}.PY")
    if not os.path.isfile(hook):
        return (f"no {LAUNCH_HOOK} hook on this node ({hook} is missing): the job would run "
                "outside its image")
    return ""


def _interpreter(script: str) -> str:
    """The interpreter of a #! script ('' if it has none)."""
    try:
        with open(script, "rb") as f:
            head = f.readline(256)
    except OSError:
        return script
    return head[2:].split()[0].decode("utf-8", "replace") if head.startswith(b"#!") else script


def _check_cgroup_owner(cfg: Config, job_id: str) -> None:
    """OpenPBS's cgroups hook made this job's cgroup, but the config does not name its parent:
    ours would take the job out of its cpuset and limits (a site fault, said so)."""
    if cfg.torque_cgroup_parent == OPENPBS_CGROUP_PARENT or not cfg.cgroups:
        return
    from . import cgroups
    from .errors import SiteError
    if cgroups.job_cgroup(cgroups.detect(), OPENPBS_CGROUP_PARENT, job_id).exists():
        raise SiteError(f"OpenPBS's cgroups hook manages job {job_id}: set "
                        f"torque_cgroup_parent = {OPENPBS_CGROUP_PARENT} in the config")


def _launch(pbs: Any, e: Any, cfg: Config, shim: str) -> None:
    from . import lifecycle
    from .errors import SiteError
    from .state import check_job_id
    job = e.job
    job_id = check_job_id(_text(job.id))
    pid = _job_process(cfg)
    record = lifecycle.attach(cfg, job_id, pid)
    if record is None:
        if resource_value(job, cfg.image_resource) is not None or cfg.cgroups:
            raise SiteError(f"job {job_id} has no record on this node at launch "
                            "(execjob_begin did not run, or failed)")
        return
    if record.get("image"):
        argv = launch_argv(shim, cfg.path, _text(e.progname),
                           [_text(a) for a in (e.argv or [])])
        e.progname = shim
        e.argv = []
        for arg in argv:
            e.argv.append(arg)


def _attach(pbs: Any, e: Any, cfg: Config, shim: str) -> None:
    """pbs_attach: a running process of the job's owner joins the job. Into the job's
    cgroup (limits, accounting, the final kill); it stays where it runs (no image)."""
    import pwd

    from . import lifecycle
    from .errors import SiteError
    from .state import check_job_id
    from .errors import PbsChrootError, UserError
    job = e.job
    job_id = check_job_id(_text(job.id))
    pid = int(e.pid)  # the user's choice (pbs_attach -p): checked, pinned, checked again
    try:
        owner = pwd.getpwnam(_text(job.euser)).pw_uid
    except KeyError:
        raise SiteError(f"job {job_id}: its owner is not known on this node") from None
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        raise UserError(f"process {pid} does not exist: not attached") from None
    try:
        if _uids(pid) != {owner} or _ended(pidfd):
            raise UserError(f"process {pid} is not the job owner's: not attached")
        try:
            lifecycle.attach(cfg, job_id, pid)
        except PbsChrootError:
            if _ended(pidfd):
                raise UserError(f"process {pid} ended while being attached") from None
            raise
        if _ended(pidfd):  # its pid may now be another process's: say so
            from .log import get_logger
            get_logger("pbs_chroot.openpbs").warning(
                "job %s: process %d ended while being attached", job_id, pid)
    finally:
        os.close(pidfd)


def _uids(pid: int) -> set[int]:
    """Real, effective, saved and file-system uids of ``pid`` (empty if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next((line for line in f if line.startswith("Uid:")), "")
    except OSError:
        return set()
    return {int(u) for u in line.split()[1:] if u.isdigit()}


def _ended(pidfd: int) -> bool:
    import select
    return bool(select.select([pidfd], [], [], 0)[0])


def _job_process(cfg: Config) -> int:
    """The hook's parent: pbs_mom's child that becomes the job or the TM task. Never pbs_mom
    itself (its pid is in mom_priv/mom.lock), which must not land in a job's cgroup."""
    from .errors import SiteError
    ppid = os.getppid()
    mom = _mom_pid(cfg)
    if mom is None:  # no lock file to go by: pbs_mom is a daemon, a child of init
        try:
            with open(f"/proc/{ppid}/stat") as f:
                mom = ppid if int(f.read().rsplit(")", 1)[1].split()[1]) in (0, 1) else None
        except (OSError, ValueError, IndexError) as err:
            raise SiteError(f"can't read the launch hook's parent {ppid}: {err}") from None
    if ppid in (1, mom):
        raise SiteError(f"the launch hook's parent {ppid} is pbs_mom, not a job's process")
    return ppid


def _mom_pid(cfg: Config) -> Optional[int]:
    try:
        with open(os.path.join(cfg.pbs_home, "mom_priv", "mom.lock"), "rb") as f:
            text = f.read(32).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def launch_argv(shim: str, config_path: str, progname: str, argv: list[str]) -> list[str]:
    """execjob_launch's new argv: the shim, then what pbs_mom would have run.

    The job's own shell comes with an empty argv: pbs_mom makes it a login shell
    ("-bash") and replaces argv[0] with "-" + basename(progname) anyway, keeping the rest
    (set_credential); so the shim is told to do the same inside. A TM task's argv is
    passed as it is (start_process).
    """
    head = [shim, "--config", config_path]
    if not argv:
        return [*head, "--login", "--", progname]
    return [*head, "--", progname, *argv[1:]]


def _end(pbs: Any, e: Any, cfg: Config, shim: str) -> None:
    from . import lifecycle
    from .state import check_job_id
    job = e.job
    job_id = check_job_id(_text(job.id))
    status = getattr(job, "Exit_status", None)
    lifecycle.end_job(cfg, job_id, "" if status is None else _text(status),
                      extra=_job_nodes(pbs, job), defer=cfg.defer_teardown)


def _job_nodes(pbs: Any, job: Any) -> dict[str, object]:
    """What the accounting line says of the job's other hosts (exec_host2 at the mom:
    "host:port/n+host2:port/n"; the first is the mother superior)."""
    hosts: list[str] = []
    for part in _text(getattr(job, "exec_host2", None)).split("+"):
        host = part.partition(":")[0].partition("/")[0]
        if host and host not in hosts:
            hosts.append(host)
    if len(hosts) < 2:
        return {}
    local = _local_node(pbs).partition("[")[0]
    return {"nodes": hosts} if local == hosts[0] else {"sister": True}


def _reconcile(pbs: Any, e: Any, cfg: Config, shim: str) -> None:
    from . import reconcile
    from .log import get_logger
    # exechost_periodic runs beside execjob_begin: a job the mom holds (job_list) is on
    # the node even before its files are in mom_priv/jobs.
    try:
        running = [str(j) for j in (getattr(e, "job_list", None) or {})]
    except Exception:
        running = []
    out = reconcile.cleanup(cfg, running=running)
    if out.finished or out.members or out.cgroups:
        get_logger("pbs_chroot.openpbs").warning(
            "reconciler: finished %s; stale memberships %s; cgroups removed %s",
            out.finished, out.members, out.cgroups)
    from .errors import SiteError
    if out.failed:
        raise SiteError(f"reconciler could not clean: {'; '.join(out.failed)[:400]}")
    if e.type == getattr(pbs, "EXECHOST_STARTUP", None) and cfg.images:
        problem = node_problem(cfg, shim)  # said at start, before any job is sent here
        if problem:
            raise SiteError(f"can't run jobs in an image here: {problem}")


_HANDLERS: dict[str, Callable[[Any, Any, Config, str], None]] = {
    "execjob_begin": _begin, "execjob_launch": _launch, "execjob_attach": _attach,
    "execjob_epilogue": _end,
    "execjob_end": _end, "exechost_startup": _reconcile, "exechost_periodic": _reconcile,
}


# -- reading the job ---------------------------------------------------------------------

def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _local_node(pbs: Any) -> str:
    try:
        return _text(pbs.get_local_nodename())
    except Exception:
        return os.uname().nodename.split(".")[0]


def resource_value(job: Any, name: str) -> Optional[str]:
    """The job's ``-l NAME=`` value as text, None if it asked for none."""
    try:
        value = job.Resource_List[name]
    except (KeyError, AttributeError, TypeError):
        return None
    return None if value is None else str(value)


def local_resources(exec_vnode: str, node: str, fallback: str) -> str:
    """This host's share of the job as a Resource_List: mem and ncpus summed over its
    vnodes in exec_vnode ("(node:ncpus=1:mem=102400kb)+(node2:...)"; a host's vnodes are
    NODE or NODE[i]). The job-wide list (``fallback``) when exec_vnode names none of them."""
    from .resources import parse_size
    mem = ncpus = 0
    found = False
    for spec in exec_vnode.split("+"):
        vnode, _, rest = spec.strip().strip("()").partition(":")
        if not node or not (vnode == node or vnode.startswith(node + "[")):
            continue
        found = True
        for item in rest.split(":"):
            key, _, value = item.partition("=")
            if key == "mem":
                mem += parse_size(value) or 0
            elif key == "ncpus" and value.isascii() and value.isdigit() and len(value) < 7:
                ncpus += int(value)
    if not found:
        return fallback
    return ",".join(([f"mem={mem}b"] if mem else []) + [f"ncpus={max(ncpus, 1)}"])
