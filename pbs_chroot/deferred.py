"""An idle stage's teardown, deferred: a detached worker tears it down after the grace period.

Run as root by the epilogue (and the runner), after the node lock is released. With
``stage_grace`` seconds configured, the last job to leave a stage does not tear it
down: stage.py marks it idle (STATE_DIR/stages/KEY/idle holds the deadline) and this
module forks a worker, detached from the hook (a session of its own, stdio on
/dev/null, reparented to init), that sleeps until the deadline and then calls
stage.sweep_idle under the node lock. A job that joins meanwhile removes the mark,
and the worker then leaves the stage alone. The epilogue returns as soon as the
job's processes are dead and its accounting is written.

Crash-safe: the mark is on disk before the worker exists, so if the worker never
runs or dies (a reboot, pbs_mom's unit killing its control group, SIGKILL),
`pbs-chroot cleanup` (reconcile.py, at mom start and from a timer) finishes the
teardown once the deadline has passed. Trusts only the state directory.
"""
from __future__ import annotations

import os
import time

from . import log as log_mod
from . import stage
from .log import get_logger

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Sequence

    from .config import Config

__all__ = ["spawn_worker", "after_leave", "worker_done", "set_worker", "worker_alive"]

_WORKER = "worker"  # in a stage's directory: "PID START" of its deferred-teardown worker

log = get_logger(__name__)

_in_worker = False
_queue: list[tuple[str, float]] = []  # in the worker: idle stages it is to wait for


def after_leave(cfg: Config, pending: list[tuple[str, float]]) -> int:
    """Have the stages just marked idle torn down after their grace period: by a new
    worker, or by this one if this process is a worker already."""
    if _in_worker:
        for version, _ in pending:
            set_worker(cfg, version, os.getpid())
        _queue.extend(pending)
        return os.getpid()
    return spawn_worker(cfg, pending)


def spawn_worker(cfg: Config, pending: list[tuple[str, float]],
                 jobs: Sequence[str] = ()) -> int:
    """Fork the detached worker: it finishes ``jobs`` (lifecycle.end_job, whose processes
    are dead and accounting written), then waits for the idle stages ``pending``
    (version, deadline) and tears them down. Returns its pid (0: none was started).

    The caller must not hold the node lock: a forked child would keep its flock.
    """
    if not pending and not jobs:
        return 0
    r, w = os.pipe()
    try:
        pid = os.fork()
    except OSError as e:  # the stage stays idle: the reconciler tears it down later
        os.close(r)
        os.close(w)
        log.error("can't start the teardown worker for %s: %s (pbs-chroot cleanup will)",
                  ", ".join([v for v, _ in pending] + list(jobs)), e.strerror)
        return 0
    if pid == 0:  # the intermediate child: never returns
        code = 1
        try:
            os.close(r)
            os.setsid()
            worker = os.fork()
            if worker == 0:
                os.close(w)
                log_mod.setup("pbs-chroot-teardown", cfg.syslog_socket)  # closes the hook's
                _detach_stdio()
                _finish_jobs(cfg, jobs)
                _run(cfg, pending + _queue)
                code = 0
            else:
                os.write(w, f"{worker}\n".encode())
                code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        with open(r, "rb", closefd=True) as f:
            text = f.read().decode("ascii", "replace").strip()
        os.waitpid(pid, 0)  # the intermediate child exits at once: no zombie left
    except OSError as e:
        log.error("teardown worker: %s", e.strerror)
        return 0
    worker = int(text) if text.isdigit() else 0
    if worker and pending:
        for version, deadline in pending:
            set_worker(cfg, version, worker)
        log.info("stage(s) %s idle: teardown worker %d, in %g s", ", ".join(
            v for v, _ in pending), worker, cfg.stage_grace)
    if worker and jobs:
        log.info("job(s) %s: teardown worker %d, now", ", ".join(jobs), worker)
    return worker


def worker_done(cfg: Config, version: str, pid: int) -> bool:
    """For the worker: whether its stage needs it no more (not idle, or gone); if so, its
    mark is removed, under the node lock, so a job leaving later starts a new worker."""
    from .state import node_lock
    sdir = stage.stage_dir(cfg, version)
    with node_lock(cfg.state_dir, cfg.lock_timeout):
        if stage.idle_deadline(sdir) is not None and not stage.members(sdir):
            return False
        stage.unlink_quietly(stage.idle_mark(sdir))  # (a mark beside members is stale)
        if _worker_of(sdir)[0] == pid:
            stage.unlink_quietly(os.path.join(sdir, _WORKER))
    return True


def set_worker(cfg: Config, version: str, pid: int) -> None:
    """Note the deferred-teardown worker of the stage of ``version``."""
    sdir = stage.stage_dir(cfg, version)
    if os.path.isdir(sdir):
        path = os.path.join(sdir, _WORKER)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, f"{pid} {_start_time(pid)}\n".encode("ascii"))
            finally:
                os.close(fd)
        except OSError as e:  # a second worker may start: harmless
            log.warning("can't note teardown worker %d in %s: %s", pid, sdir, e.strerror)


def worker_alive(sdir: str) -> bool:
    """Whether the stage's noted worker still runs (the same process: pid and start time)."""
    pid, start = _worker_of(sdir)
    return pid > 0 and start != "" and _start_time(pid) == start


def _worker_of(sdir: str) -> tuple[int, str]:
    try:
        with open(os.path.join(sdir, _WORKER), "rb") as f:
            words = f.read(64).decode("ascii", "replace").split()
    except OSError:
        return 0, ""
    ok = len(words) == 2 and words[0].isdigit()
    return (int(words[0]), words[1]) if ok else (0, "")


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _detach_stdio() -> None:
    """stdin/stdout/stderr on /dev/null (the hook's are the job's output files); no other fd
    (none of what pbs_mom gave the hook is held open for the grace period)."""
    fd = os.open("/dev/null", os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(fd, target)
    os.closerange(3, 1 << 16)
    os.chdir("/")  # pins no directory of the hook's (mom_priv, a runner's cwd)


def _finish_jobs(cfg: Config, jobs: Sequence[str]) -> None:
    global _in_worker
    from . import faults, lifecycle
    from .errors import PbsChrootError
    _in_worker = True
    faults.point("deferred:start")
    for job_id in jobs:
        try:
            lifecycle.end_job(cfg, job_id)
        except PbsChrootError as e:
            log.error("deferred end of job %s failed: %s (pbs-chroot cleanup will retry)",
                      job_id, e.detail)
        except Exception as e:  # a bug: logged; the reconciler still finishes the job
            log.exception("deferred end of job %s failed: %r", job_id, e)


def _run(cfg: Config, pending: list[tuple[str, float]]) -> None:
    from .errors import PbsChrootError
    me = os.getpid()
    for version, _ in sorted(pending, key=lambda p: p[1]):
        try:
            # A job may join and leave again meanwhile: the mark's deadline moves on,
            # and this worker waits on for it rather than another one starting.
            while not worker_done(cfg, version, me):
                deadline = stage.idle_deadline(stage.stage_dir(cfg, version)) or 0.0
                if deadline > time.time():
                    time.sleep(min(deadline - time.time(), cfg.stage_grace) + 0.01)
                elif stage.sweep_idle(cfg, version) or cfg.keep_stage:
                    break  # torn down; or kept for good (the mark is left to cleanup)
                else:  # marked again or joined meanwhile: look again, unhurried
                    time.sleep(0.1)
        except PbsChrootError as e:
            log.error("deferred teardown of stage %s failed: %s (pbs-chroot cleanup will "
                      "retry)", version, e.detail)
        except Exception as e:  # a bug: logged; the reconciler still finishes the job
            log.exception("deferred teardown of stage %s failed: %r", version, e)
