"""A job's life on a node: start (record, cgroup, stage, attach) and end (kill, account, undo).

Run as root by the hooks and the runner. The job record is written before
each step, so that end_job() — in the epilogue, a second epilogue or the
reconciler — can finish or undo a job whose start died at any point.
"""
from __future__ import annotations

import os
import time

from . import cgroups, faults
from .errors import PbsChrootError
from .log import get_logger
from .record import Record
from .state import delete_record, load_record, save_record
from .undo import Undo

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Optional

    from . import early
    from .config import Config

__all__ = ["FAULT_POINTS", "Job", "start_job", "attach", "end_job", "job_cgroup_of"]

log = get_logger(__name__)

# The fault points of start_job, in order (the tests enumerate every point,
# these and those inside stage and mounts, by tracing a real job).
FAULT_POINTS = ("recorded", "cgroup_created", "stage_joined", "attached", "started")


class Job(Record):
    """What a hook knows of a job from its argv."""

    __slots__ = ("job_id", "user", "group", "queue", "resource_list")

    def __init__(self, job_id: str, user: str, group: str = "", queue: str = "",
                 resource_list: str = "") -> None:
        self.job_id = job_id
        self.user = user
        self.group = group
        self.queue = queue
        self.resource_list = resource_list


def start_job(cfg: Config, job: Job, image: Optional[str], attach_pid: Optional[int],
              tasks_of: Optional[int] = None,
              check: Optional[Callable[[], Optional[str]]] = None,
              joined: Optional[Callable[[str], None]] = None) -> Optional[str]:
    """Record the job, make its cgroup, join its stage, attach its process; undo on failure.

    ``tasks_of``: pbs_mom's pid, for a job on several nodes: its TM tasks on
    this node are adopted into the job's cgroup (adopt.py).
    check: when given, it decides the image (None: no image) and raises if the
    request is refused; it runs after the cgroup is made, while ``attach_pid``
    is being moved into it (early.py), and a refusal undoes everything,
    moving the process back out first. Returns the image version the job's
    stage is of (resolved under the node lock).
    joined: called with that version once the job is in its stage (the prologue checks
    the job's shell there, as pbs_mom will see it); a refusal undoes everything too.
    """
    version = None
    record: dict[str, Any] = {"job_id": job.job_id, "user": job.user, "group": job.group,
                              "queue": job.queue, "image": image, "version": None,
                              "start": time.time(), "stage": None, "cgroup": None}
    with Undo() as undo:
        save_record(cfg.state_dir, record)
        undo.callback(_best_effort, delete_record, cfg.state_dir, job.job_id)
        faults.point("recorded")
        cg = _make_cgroup(cfg, job, record, undo) if cfg.cgroups else None
        faults.point("cgroup_created")
        late = cg is not None and attach_pid is not None and record["cgroup"]["owned"]
        early = None
        if check is not None:
            if late and cg is not None and attach_pid is not None:
                early = _attach_early(cfg, cg, attach_pid, record, undo)
            late = late and early is None
            image = record["image"] = check()
        if image is not None:
            version = _join_stage(cfg, job, image, record, undo)
            if joined is not None:
                joined(version)
        if early is not None:
            early.wait(cfg.lock_timeout)
            faults.point("attached")
        elif late:
            assert cg is not None and attach_pid is not None
            record["cgroup"]["attached"] = attach_pid
            save_record(cfg.state_dir, record)
            cg.attach(attach_pid)
            faults.point("attached")
        if cg is not None and tasks_of is not None and record["cgroup"]["owned"]:
            _start_adopter(cfg, job.job_id, tasks_of, cg, record, undo)
        record["started"] = True
        save_record(cfg.state_dir, record)
        undo.pop_all()
    faults.point("started")
    return version


def _join_stage(cfg: Config, job: Job, image: str, record: dict[str, Any], undo: Undo) -> str:
    from . import stage  # (only for jobs in an image: mounts, identity, homes ...)
    record["stage"] = "joining"
    save_record(cfg.state_dir, record)
    undo.callback(_best_effort, stage.leave_all, cfg, job.job_id)
    version = stage.join_image(cfg, job.job_id, image, job.user)
    faults.point("stage_joined")
    record["stage"], record["version"] = "joined", version
    return version


def _attach_early(cfg: Config, cg: cgroups.JobCgroup, pid: int, record: dict[str, Any],
                  undo: Undo) -> Optional[early.EarlyAttach]:
    """Start moving ``pid`` into ``cg`` in a thread (None: where it is now is unknown, so
    it is moved later, the usual way); the undo moves it back where it was."""
    from . import early
    origin = early.origin_dirs(cg, cgroups.Layout(*record["cgroup"]["layout"]), pid)
    if origin is None:
        return None
    record["cgroup"]["attached"] = pid
    record["cgroup"]["origin"] = origin
    save_record(cfg.state_dir, record)
    attaching = early.EarlyAttach(cg, pid, origin)
    # Runs before the cgroup's own removal (undo is last in, first out).
    undo.callback(_best_effort, attaching.detach, cfg.lock_timeout)
    return attaching


def _make_cgroup(cfg: Config, job: Job, record: dict[str, Any],
                 undo: Undo) -> cgroups.JobCgroup:
    from .resources import limits_for
    layout = cgroups.detect()
    torque = cgroups.job_cgroup(layout, cfg.torque_cgroup_parent, job.job_id)
    if torque.exists():  # Torque built with cgroups made its own: use it, don't fight it
        record["cgroup"] = {"layout": list(layout), "name": torque.name, "owned": False}
        save_record(cfg.state_dir, record)
        return torque
    cg = cgroups.job_cgroup(layout, cfg.cgroup_parent, job.job_id)
    record["cgroup"] = {"layout": list(layout), "name": cg.name, "owned": True}
    save_record(cfg.state_dir, record)
    undo.callback(_best_effort, cg.remove)
    cg.create()
    cg.set_limits(limits_for(job.resource_list, cfg.memory_policy, cfg.memory_cap,
                             cfg.limit_swap, cfg.pids_max))
    return cg


def _start_adopter(cfg: Config, job_id: str, mom_pid: int, cg: cgroups.JobCgroup,
                   record: dict[str, Any], undo: Undo) -> None:
    from . import adopt
    from .state import record_path
    path = record_path(cfg.state_dir, job_id)
    pid, starttime = adopt.start(job_id, mom_pid, cg, lambda: os.path.exists(path),
                                 lambda other: _owned_cgroup(cfg, other),
                                 lambda other: _owner_uid(cfg, other))
    undo.callback(adopt.stop, pid, starttime)
    record["adopter"] = {"pid": pid, "start": starttime, "mom": mom_pid}
    save_record(cfg.state_dir, record)
    faults.point("adopter_started")


def _owner_uid(cfg: Config, job_id: str) -> Optional[int]:
    """The uid of the user of ``job_id`` on this node, from its record (None: unknown)."""
    import pwd
    from .state import is_job_id
    try:
        record = load_record(cfg.state_dir, job_id) if is_job_id(job_id) else None
        return pwd.getpwnam(record["user"]).pw_uid if record else None
    except (PbsChrootError, KeyError, TypeError):
        return None


def _owned_cgroup(cfg: Config, job_id: str) -> Optional[cgroups.JobCgroup]:
    """The cgroup pbs_chroot made for ``job_id`` on this node, if the job has one."""
    from .state import is_job_id
    if not is_job_id(job_id):
        return None
    try:
        record = load_record(cfg.state_dir, job_id)
    except PbsChrootError:
        return None
    if record is None or not isinstance(record.get("cgroup"), dict) \
            or not record["cgroup"].get("owned"):
        return None
    return job_cgroup_of(record)


def _stop_adopter(record: dict[str, Any]) -> None:
    info = record.get("adopter")
    if isinstance(info, dict) and isinstance(info.get("pid"), int):
        from . import adopt
        adopt.stop(info["pid"], info.get("start") or 0)


def attach(cfg: Config, job_id: str, pid: int) -> Optional[dict[str, Any]]:
    """Move ``pid``, a process of the job started after start_job (OpenPBS's launch: the job
    or a TM task), into the job's cgroup, if pbs_chroot made it. The job's record (None: it
    has none on this node, and nothing is done)."""
    record = load_record(cfg.state_dir, job_id)
    if record is None:
        return None
    cg = job_cgroup_of(record)
    if cg is not None and record["cgroup"].get("owned"):
        cg.attach(pid)
        faults.point("launch:attached")
    return record


def job_cgroup_of(record: dict[str, Any]) -> Optional[cgroups.JobCgroup]:
    """The cgroup a job record names, or None."""
    info = record.get("cgroup")
    if not isinstance(info, dict):
        return None
    layout = cgroups.Layout(*info["layout"])
    parent, _, job_id = info["name"].rpartition("/")
    return cgroups.job_cgroup(layout, parent, job_id)


def end_job(cfg: Config, job_id: str, exit_status: str = "",
            recovered: bool = False, extra: Optional[dict[str, Any]] = None,
            defer: bool = False,
            accounted: Optional[Callable[[Optional[dict[str, Any]]], None]] = None
            ) -> Optional[dict[str, Any]]:
    """Undo whatever start_job() got done for ``job_id``; idempotent.

    defer: return once the job's processes are dead and its accounting is
    written, leaving the rest (stage, cgroup, record) to a detached worker
    (deferred.py); if that never finishes, the reconciler does, from the record.
    accounted: called with the accounting record at that same point (the hook server's
    worker answers pbs_mom there, then goes on with the rest itself: hookd.py).
    Returns the accounting record written (None if the job had no record).
    A process that survives SIGKILL raises CgroupError and leaves the record
    for the reconciler: the stage stays too, since that process may hold it.
    """
    record = load_record(cfg.state_dir, job_id)
    if record is None:
        return None
    cg = job_cgroup_of(record)
    acct = None
    _stop_adopter(record)  # nothing is moved into the cgroup while it is killed
    if record.get("stage"):  # where the job may have run: all it joined
        from . import stage  # (only for jobs in an image)
        record["versions"] = stage.memberships(cfg, job_id)
    if cg is not None and cg.exists():
        n = cg.kill(cfg.kill_timeout)
        if n:
            log.info("job %s: killed %d process(es) left in its cgroup", job_id, n)
        faults.point("end:killed")
        if not record.get("accounted"):
            acct = _account(cfg, record, cg.usage(), cg.version, exit_status, recovered,
                            extra or {})
            faults.point("end:accounted")
            record["accounted"] = True
            save_record(cfg.state_dir, record)
    if record.get("stage") and record["stage"] != "leaving":
        record["stage"] = "leaving"  # from now on, image switches pass it by
        save_record(cfg.state_dir, record)
    if accounted is not None:
        accounted(acct)
    if defer and record.get("stage"):  # (a cgroup's rmdir alone is not worth a fork)
        from .deferred import spawn_worker
        if spawn_worker(cfg, [], [job_id]):
            return acct
    if record.get("stage"):
        stage.leave_all(cfg, job_id)
        faults.point("end:stage_left")
        pending = stage.pending_teardowns()
        if pending:  # an idle stage's teardown after its grace period (the lock is free)
            from .deferred import after_leave
            after_leave(cfg, pending)
    if cg is not None and record["cgroup"].get("owned"):
        cg.remove()
        faults.point("end:cgroup_removed")
    delete_record(cfg.state_dir, job_id)
    return acct


def _account(cfg: Config, record: dict[str, Any], usage: cgroups.Usage, version: int,
             exit_status: str, recovered: bool = False,
             extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    from . import accounting
    acct = {"job_id": record["job_id"], "user": record.get("user"),
            "group": record.get("group"), "queue": record.get("queue"),
            "node": cfg.node_name or os.uname().nodename.split(".")[0],
            "image": record.get("image"), "version": record.get("version"),
            **_switched(record),
            "start": record.get("start"), "end": time.time(),
            "exit": _exit_code(exit_status),
            "cgroup_version": version, **usage._asdict(), **(extra or {})}
    if recovered:  # finished by the reconciler, not by the job's epilogue
        acct["recovered"] = True
    accounting.append(cfg.accounting_log, acct)
    log.info("job %s accounting: user %s cpu %.1f s user + %.1f s system, peak memory %s, "
             "oom kills %d, image %s", acct["job_id"], acct["user"],
             usage.cpu_user_usec / 1e6, usage.cpu_system_usec / 1e6, usage.mem_peak_bytes,
             usage.oom_kills, acct["image"])
    return acct


def _switched(record: dict[str, Any]) -> dict[str, Any]:
    """The versions the job was staged in besides its own, if its image was switched."""
    versions = record.get("versions") or []
    return {"versions": versions} if set(versions) - {record.get("version")} else {}


def _exit_code(text: str) -> Optional[int]:
    digits = text[1:] if text.startswith("-") else text
    return int(text) if digits.isascii() and digits.isdigit() and len(digits) < 10 else None


def _best_effort(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except PbsChrootError as e:
        log.error("undo step %s failed: %s", getattr(fn, "__name__", fn), e.detail)
