"""Entries: a root-prepared stage, made reachable to the users whose jobs are in it.

Written as root by stage.py, under the node lock, when a stage is set up,
joined, left and torn down; read by the job user (userns.py: `pbs-chroot run`
without root, and the shim of batch systems that start jobs as the user).
An image's versions sit in a directory only root can enter, so a user can't
reach a stage by its path; with ``entry_dir`` set, each stage is also bound
(rec: the stage with its binds, as the job sees it: read-only, nosuid,
nodev) at ENTRY/stages/KEY/root, where KEY/ is root's, mode 0700, with a
POSIX ACL entry ``u:UID:--x`` for each user who has a job in the stage and
for no one else. A job's record, ENTRY/jobs/JOBID (root's, 0644: its stage,
user and image, what qstat shows), names its stage. Trusts nothing the user
writes: nothing here is the user's.

    ENTRY/                  root 0711
    ENTRY/jobs/JOBID        root 0644  "KEY\\nUSER\\nIMAGE\\n"
    ENTRY/stages/KEY/       root 0700 + ACL   KEY/root: the stage, bound
"""
from __future__ import annotations

import os
import stat

from .errors import MountError, StateError
from .log import get_logger

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, Sequence

    from .config import Config

__all__ = ["JobEntry", "path_of", "publish", "refresh", "forget", "withdraw", "lookup",
           "find_for_image"]

log = get_logger(__name__)

_ACL = "system.posix_acl_access"
# <linux/posix_acl_xattr.h>: version 2; entries (tag, perm, id), sorted by tag then id.
_USER_OBJ, _USER, _GROUP_OBJ, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_NO_ID = 0xFFFFFFFF


class JobEntry:
    """A job's public record: the entry path of its stage, its user and image."""

    __slots__ = ("root", "user", "image")

    def __init__(self, root: str, user: str, image: str) -> None:
        self.root = root
        self.user = user
        self.image = image


def path_of(cfg: Config, sdir: str) -> str:
    """ENTRY/stages/KEY of the stage whose state directory is ``sdir`` ('' when off)."""
    if not cfg.entry_dir:
        return ""
    return os.path.join(cfg.entry_dir, "stages", os.path.basename(sdir))


def publish(cfg: Config, sdir: str, version: str) -> None:
    """Bind the stage of ``version`` at its entry (root-only until refresh() adds users)."""
    from . import _sys, mounts
    edir = path_of(cfg, sdir)
    if not edir:
        return
    for d, mode in ((cfg.entry_dir, 0o711), (os.path.dirname(edir), 0o711), (edir, 0o700),
                    (os.path.join(cfg.entry_dir, "jobs"), 0o755)):
        _make_dir(d, mode)
    root = os.path.join(edir, "root")
    _make_dir(root, 0o755)
    try:
        _sys.mount(version, root, None, _sys.MS_BIND | _sys.MS_REC)
        # Receive from the host (automounts), never send back (as the stage itself).
        _sys.mount(None, root, None, _sys.MS_SLAVE | _sys.MS_REC)
    except OSError as e:
        mounts.teardown(root)
        raise MountError(f"can't bind stage {version} at its entry {root}: {e.strerror}") from e
    log.info("stage %s published at %s", version, root)


def refresh(cfg: Config, sdir: str, image: str = "", new_jobs: Sequence[str] = ()) -> None:
    """Records for ``new_jobs`` (just joined, of ``image``), and the ACL letting exactly the
    users of the stage's jobs in."""
    edir = path_of(cfg, sdir)
    if not edir or not os.path.isdir(edir):
        return
    import pwd
    uids = set()
    mdir = os.path.join(sdir, "members")
    for job_id in sorted(os.listdir(mdir)) if os.path.isdir(mdir) else []:
        with open(os.path.join(mdir, job_id), encoding="utf-8") as f:
            user = f.read().strip()
        try:
            uids.add(pwd.getpwnam(user).pw_uid)
        except KeyError:
            continue  # unknown here (or no user recorded): no way in
        if job_id in new_jobs:
            _write_record(cfg, job_id, f"{os.path.basename(sdir)}\n{user}\n{image}\n")
    _set_acl(edir, sorted(uids - {0}))


def forget(cfg: Config, job_id: str, sdir: str) -> None:
    """Remove a job's record if it names this stage (the job left it)."""
    if not cfg.entry_dir:
        return
    path = os.path.join(cfg.entry_dir, "jobs", job_id)
    rec = lookup(cfg.entry_dir, job_id)
    if rec is not None and os.path.dirname(rec.root) == path_of(cfg, sdir):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def withdraw(edir: str) -> None:
    """Unmount a stage's entry and remove it; idempotent ('' does nothing)."""
    if not edir:
        return
    from . import mounts
    root = os.path.join(edir, "root")
    mounts.teardown(root)
    for path in (root, edir):
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass


def lookup(entry_dir: str, job_id: str) -> Optional[JobEntry]:
    """A job's record, if it is root's (as the user: never one the user could have made)."""
    path = os.path.join(entry_dir, "jobs", job_id)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, encoding="utf-8") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != 0 or st.st_mode & 0o022 or not stat.S_ISREG(st.st_mode):
            return None
        fields = f.read(8192).split("\n")
    if len(fields) < 3 or not fields[0] or "/" in fields[0] or fields[0] in (".", ".."):
        return None
    return JobEntry(os.path.join(entry_dir, "stages", fields[0], "root"), fields[1], fields[2])


def find_for_image(entry_dir: str, image: str, user: str) -> Optional[JobEntry]:
    """The entry of a stage of ``image`` holding a job of ``user`` that ``user`` can enter."""
    try:
        names = sorted(os.listdir(os.path.join(entry_dir, "jobs")))
    except OSError:
        return None
    for job_id in names:
        rec = lookup(entry_dir, job_id)
        if rec is not None and rec.user == user and rec.image == image \
                and os.access(rec.root, os.X_OK):
            return rec
    return None


def _make_dir(path: str, mode: int) -> None:
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    except OSError as e:
        raise StateError(f"can't make entry directory {path}: {e.strerror}") from e
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        raise StateError(f"entry directory {path} is not root's own directory")
    os.chmod(path, mode)


def _write_record(cfg: Config, job_id: str, text: str) -> None:
    path = os.path.join(cfg.entry_dir, "jobs", job_id)
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.fchmod(fd, 0o644)  # the prologue's umask is 0077
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _set_acl(path: str, uids: list[int]) -> None:
    """Owner rwx, ``uids`` search only, nobody else (acl(5), as setfacl -m u:UID:x)."""
    import struct

    def entry(tag: int, perm: int, ident: int = _NO_ID) -> bytes:
        return struct.pack("<HHI", tag, perm, ident)
    acl = struct.pack("<I", 2) + entry(_USER_OBJ, 7) \
        + b"".join(entry(_USER, 1, uid) for uid in uids) + entry(_GROUP_OBJ, 0) \
        + (entry(_MASK, 1) if uids else b"") + entry(_OTHER, 0)
    try:
        os.setxattr(path, _ACL, acl)
    except OSError as e:
        # Fail closed: without ACLs the entry stays root's only.
        log.warning("can't let the stage's users into %s (POSIX ACLs: %s): jobs started as "
                    "the user can't enter it", path, e.strerror)
