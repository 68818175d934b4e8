"""A job's life on a node: start (record, then stage) and end (stage, then record).

Run as root by the hooks and the runner. The job record is written before
each step, so that end_job() — in the epilogue, a second epilogue or the
reconciler — can finish or undo a job whose start died at any point.
"""
import logging
import os
import signal
import time
from contextlib import ExitStack
from typing import Any, Callable

from . import stage
from .config import Config
from .errors import PbsChrootError
from .state import delete_record, load_record, save_record

__all__ = ["FAULT_POINTS", "start_job", "end_job", "fault_point"]

log = logging.getLogger(__name__)

# Test-only fault injection: PBS_CHROOT_TEST_KILL_AT=POINT makes the process
# SIGKILL itself there. pbs_mom gives hooks a fixed environment, so a job
# owner cannot set it.
FAULT_POINTS = ("recorded", "stage_joined", "started")
_KILL_AT = os.environ.get("PBS_CHROOT_TEST_KILL_AT", "")


def fault_point(name: str) -> None:
    """Die here, as $prologalarm or the OOM killer would, if the tests asked for it."""
    if _KILL_AT == name:
        os.kill(os.getpid(), signal.SIGKILL)


def start_job(cfg: Config, job_id: str, user: str, image: str, version: str) -> None:
    """Record the job, then join the stage of ``version``; on failure, undo both."""
    record: dict[str, Any] = {"job_id": job_id, "user": user, "image": image,
                              "version": version, "stage": "joining", "start": time.time()}
    with ExitStack() as undo:
        save_record(cfg.state_dir, record)
        undo.callback(_best_effort, delete_record, cfg.state_dir, job_id)
        fault_point("recorded")
        undo.callback(_best_effort, stage.leave, cfg, job_id, version)
        stage.join(cfg, job_id, version)
        fault_point("stage_joined")
        record["stage"] = "joined"
        save_record(cfg.state_dir, record)
        undo.pop_all()
    fault_point("started")


def end_job(cfg: Config, job_id: str) -> bool:
    """Undo whatever start_job() got done for ``job_id``. Idempotent. True if it had a record."""
    record = load_record(cfg.state_dir, job_id)
    if record is None:
        return False
    version = record.get("version")
    if isinstance(version, str):
        stage.leave(cfg, job_id, version)
    delete_record(cfg.state_dir, job_id)
    return True


def _best_effort(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except PbsChrootError as e:
        log.error("undo step %s failed: %s", fn.__name__, e.detail)
