"""Image versions: switch the allowlisted symlink, safely next to running jobs.

Run as root by the admin (`pbs-chroot image ...`). An allowlisted path is a
symlink to one of the immutable version directories beside it. Switching it
is an atomic rename of a new symlink over the old one, under the node lock
the prologues take to resolve it, so no job is ever left in an unstaged
version: see switch().
"""
import logging
import os
from typing import Any, Optional

from . import stage
from .config import Config
from .errors import UserError
from .paths import check_version_private, resolve_admin_path
from .state import list_records, load_record, node_lock

__all__ = ["current", "switch"]

log = logging.getLogger(__name__)


def current(image: str) -> Optional[str]:
    """The version ``image`` points to now (audited), or None if it is not a symlink."""
    if not os.path.islink(image):
        return None
    return resolve_admin_path(image)


def switch(cfg: Config, image: str, version: str) -> list[str]:
    """Point the allowlisted ``image`` at ``version``; return the jobs also staged there.

    pbs_mom chroots by the allowlisted path after the prologue has resolved
    it and joined that version's stage, and again for every task it spawns
    later; so a job of this image may land in whichever version is current
    at any moment of its life. Under the node lock (no prologue is
    resolving), every job with a record for this image joins the new
    version's stage *before* the symlink moves: a job is a member of every
    version its image pointed to while it ran, and leaves them all at its end.
    """
    if cfg.image(image) is None:
        raise UserError(f"{image} is not an allowlisted image in the config")
    if not os.path.islink(image):
        raise UserError(f"{image} is not a symlink: make it a symlink to a version "
                        "directory to deploy and roll back")
    target = resolve_admin_path(version)
    check_version_private(target)
    with node_lock(cfg.state_dir, cfg.lock_timeout):
        old = resolve_admin_path(image)
        if os.path.dirname(target) != os.path.dirname(old):
            raise UserError(f"{version} is not beside the current version {old}: versions "
                            f"of one image live in one directory")
        joined = [job_id for job_id in list_records(cfg.state_dir)
                  if _of_image(load_record(cfg.state_dir, job_id), image)]
        if joined:
            stage.join_locked(cfg, joined, target)
        _replace_symlink(image, target)
    log.warning("image %s switched from %s to %s (%d running job(s) staged in both)",
                image, old, target, len(joined))
    return joined


def _of_image(record: Optional[dict[str, Any]], image: str) -> bool:
    return bool(record and record.get("image") == image
                and record.get("stage") in ("joining", "joined"))


def _replace_symlink(link: str, target: str) -> None:
    tmp = os.path.join(os.path.dirname(link), f".{os.path.basename(link)}.new.{os.getpid()}")
    try:
        os.unlink(tmp)  # left by a killed switch
    except FileNotFoundError:
        pass
    os.symlink(target, tmp)
    os.rename(tmp, link)
    fd = os.open(os.path.dirname(link), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
