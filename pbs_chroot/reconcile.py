"""The reconciler (`pbs-chroot cleanup`): finish or undo what dead jobs left on this node.

Run as root by the admin, at pbs_mom start and from a timer. Safe at any
time, next to running prologues and epilogues: it touches only jobs that are
no longer on the node, and changes stages under the same node lock. Running
it twice changes nothing the second time.

A job is still on the node while pbs_mom holds a file of it in
mom_priv/jobs (the .SC exists from before the prologue until the job is
purged, after its epilogue), or, for a `pbs-chroot run` job, while the
runner's process lives.
"""
import logging
import os
from typing import Any, Callable, NamedTuple, Optional, Sequence

from . import cgroups, lifecycle, stage
from .config import Config
from .errors import PbsChrootError
from .state import is_job_id, list_records, node_lock, read_json

__all__ = ["Outcome", "is_running", "cleanup", "prune_shells"]

log = logging.getLogger(__name__)


class Outcome(NamedTuple):
    """What one cleanup pass did."""

    finished: list[str]        # job records finished (killed, accounted, undone)
    members: list[str]         # stale stage memberships removed ("stage: job")
    cgroups: list[str]         # cgroups under our parent without a record, removed
    failed: list[str]          # what could not be cleaned, with the reason


def is_running(cfg: Config, job_id: str, mom_files: Optional[list[str]] = None) -> bool:
    """Whether ``job_id`` is still on this node (when unsure: yes, leave it alone)."""
    if job_id.startswith("run-"):
        pid = job_id.split("-")[1]
        return pid.isascii() and pid.isdigit() and os.path.exists(f"/proc/{pid}")
    files = mom_files if mom_files is not None else _mom_files(cfg)
    if files is None:  # no mom_priv/jobs here (pbs_home wrong?): unsure, so yes
        return True
    # pbs_mom names job files by a prefix of the id (long ids are cut):
    # any file of the same sequence number counts.
    seq = job_id.split(".")[0] + "."
    return any(f.startswith(seq) for f in files)


def _mom_files(cfg: Config) -> Optional[list[str]]:
    """The names in pbs_mom's mom_priv/jobs; None if there is no such directory (a wrong
    pbs_home must not make every running job look finished)."""
    try:
        return os.listdir(os.path.join(cfg.pbs_home, "mom_priv", "jobs"))
    except FileNotFoundError:
        log.warning("%s/mom_priv/jobs is missing (is pbs_home right?): no job is taken for "
                    "finished", cfg.pbs_home)
        return None


def cleanup(cfg: Config, dry_run: bool = False, running: Sequence[str] = ()) -> Outcome:
    """One pass over records, stage memberships and our cgroups.

    ``running``: job ids the batch system says are on this node besides those with a
    file in mom_priv/jobs (OpenPBS's exechost_periodic job_list).
    """
    out = Outcome([], [], [], [])
    found = _mom_files(cfg)
    unsure = found is None  # then only `pbs-chroot run` jobs (by pid) are judged
    files = (found or []) + [f"{job_id}.running" for job_id in running]
    for job_id in list_records(cfg.state_dir):
        if (unsure and not job_id.startswith("run-")) or is_running(cfg, job_id, files):
            continue
        out.finished.append(job_id)
        if not dry_run:
            _try(out, job_id, lifecycle.end_job, cfg, job_id, "", True)  # recovered
    records = set(list_records(cfg.state_dir))  # what is left (all of it, in a dry run)
    if unsure:
        return out
    _prune_members(cfg, files, records, out, dry_run)
    _prune_cgroups(cfg, files, records, out, dry_run)
    if not dry_run:
        prune_shells(cfg)
    return out


def prune_shells(cfg: Config) -> int:
    """Forget remembered shells (shells.ShellCache) of versions that are gone or were
    replaced (another device, inode or ctime); the number removed."""
    from .shells import CACHE_VERSION
    base = os.path.join(cfg.state_dir, "shells")
    removed = 0
    for name in _files(base):
        path = os.path.join(base, name)
        key = _safe(read_json, path)
        lines = key.split("\n") if isinstance(key, str) else []
        if len(lines) > 2 and lines[0] == CACHE_VERSION and _same_version(lines[1], lines[2]):
            continue
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error("cleanup: can't remove %s: %s", path, e.strerror)
    return removed


def _same_version(version: str, ident: str) -> bool:
    try:
        st = os.stat(version)
    except OSError:
        return False
    return ident == f"{st.st_dev}:{st.st_ino}:{st.st_ctime_ns}"


def _files(path: str) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if not e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _prune_members(cfg: Config, files: list[str], records: set[str], out: Outcome,
                   dry_run: bool) -> None:
    """Members with neither a record nor a job on the node leave; empty stages go."""
    base = os.path.join(cfg.state_dir, "stages")
    for name in _listdir(base):
        info = _safe(read_json, os.path.join(base, name, "info.json"))
        version = info.get("version") if isinstance(info, dict) else None
        if not isinstance(version, str):
            continue
        for job_id in stage.members(os.path.join(base, name)):
            if job_id in records or is_running(cfg, job_id, files):
                continue
            out.members.append(f"{version}: {job_id}")
            if not dry_run:
                _try(out, job_id, stage.leave, cfg, job_id, version)
        if not dry_run:  # no members left, e.g. a crash between leaving and teardown
            _try(out, version, stage.sweep, cfg, version)


def _prune_cgroups(cfg: Config, files: list[str], records: set[str], out: Outcome,
                   dry_run: bool) -> None:
    """Job cgroups under our parent with neither a record nor a job: kill and remove."""
    if not cfg.cgroups:
        return
    layout = _safe(cgroups.detect)
    if layout is None:
        return
    tops = set(layout.v1.values()) if layout.version == 1 else {str(layout.v2)}
    names = sorted({n for top in tops for n in _listdir(os.path.join(top, cfg.cgroup_parent))})
    for job_id in names:
        if not is_job_id(job_id) or job_id in records or is_running(cfg, job_id, files):
            continue
        out.cgroups.append(job_id)
        if not dry_run:
            cg = cgroups.job_cgroup(layout, cfg.cgroup_parent, job_id)
            _try(out, job_id, _kill_and_remove, cfg, cg)


def _kill_and_remove(cfg: Config, cg: cgroups.JobCgroup) -> None:
    with node_lock(cfg.state_dir, cfg.lock_timeout):
        cg.kill(cfg.kill_timeout)
        cg.remove()


def _listdir(path: str) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _safe(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except PbsChrootError as e:
        log.error("cleanup: %s", e.detail)
        return None


def _try(out: Outcome, what: str, fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except PbsChrootError as e:
        out.failed.append(f"{what}: {e.detail}")
        log.error("cleanup of %s failed: %s", what, e.detail)
