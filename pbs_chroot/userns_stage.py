"""A private stage in a user namespace: the mounts of the unprivileged mode, then pivot_root.

Run as the job user (never root) by userns.py, in the first process of a new
user, mount and PID namespace, holding the capabilities of that namespace
only: they reach nothing the user could not reach before (user_namespaces(7):
mounts copied from the host's namespace are locked together, their
read-only/nosuid/nodev/noexec/atime flags cannot be cleared, and device
nodes and host-owned files keep their permissions). Trusts the root-owned
config for the bind set; mount points inside the tree are opened without
following symlinks (paths.open_in_root), and the tree itself was opened by
its caller as an fd.
"""
from __future__ import annotations

import os
import stat

from . import _sys, mounts
from .config import BindSpec
from .errors import MountError, UnsafePathError
from .paths import open_in_root
from .record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

    from .config import Config

__all__ = ["StagePlan", "binds_for", "identity_files", "build", "locked_flags"]

# statvfs(3) flags -> mount(2) flags a remount must repeat in a user namespace
# (the kernel refuses to clear them: MNT_LOCK_* in fs/namespace.c).
_LOCKED = ((os.ST_RDONLY, _sys.MS_RDONLY), (os.ST_NOSUID, _sys.MS_NOSUID),
           (os.ST_NODEV, _sys.MS_NODEV), (os.ST_NOEXEC, _sys.MS_NOEXEC),
           (os.ST_NOATIME, _sys.MS_NOATIME), (os.ST_NODIRATIME, _sys.MS_NODIRATIME))


class StagePlan(Record):
    """What to build: the tree (its path and an O_PATH fd taken when it was checked), the
    config and identity mode for its binds, the user, and whether the tree is the user's
    own (--dir: stays writable, may get missing mount points)."""

    __slots__ = ("root", "root_fd", "cfg", "mode", "user", "own_tree", "prepared")

    def __init__(self, root: str, root_fd: int, cfg: Config, mode: str, user: str,
                 own_tree: bool, prepared: bool = False) -> None:
        self.root = root
        self.root_fd = root_fd
        self.cfg = cfg
        self.mode = mode
        self.user = user
        self.own_tree = own_tree
        self.prepared = prepared  # a stage root set up (entry.py): only a fresh /proc


def binds_for(cfg: Config, mode: str, id_fds: Optional[dict[str, int]]) -> tuple[BindSpec, ...]:
    """The stage's bind set (stage.bind_set) for this mode, as the user may have it.

    Sources the user cannot reach are left out (they would give nothing), the
    generated passwd/group come from ``id_fds`` (files of our own, by fd), and
    /tmp is a tmpfs of this run's own unless the config binds one.
    """
    from . import stage  # (not for a root-prepared stage: the shim's path stays lean)
    binds = stage.bind_set(cfg, "/nonexistent", mode if id_fds is not None or mode != "generated"
                           else "host")
    # pbs_mom's $job_starter (and pbs_demux) binds: nothing here execs them, and the
    # namespace's init sets no_new_privs itself.
    starter = cfg.nnp_starter() if cfg.job_starter else ""
    out = []
    for spec in binds:
        if starter and spec.source == starter:
            continue
        if id_fds is not None and spec.target in id_fds:
            spec = spec._replace(source=f"/proc/self/fd/{id_fds[spec.target]}")
        elif spec.source.startswith("/") and not _reachable(spec.source):
            continue
        out.append(spec)
    if not any(b.target == "/tmp" for b in out):
        out.append(BindSpec(target="/tmp", source="tmpfs", optional=True))
    return tuple(out)


def _reachable(path: str) -> bool:
    try:
        os.stat(path)
    except PermissionError:
        return False
    except OSError:
        return True  # missing: mounts.plan decides (optional or an error)
    return True


def identity_files(root_fd: int, plan: StagePlan) -> dict[str, int]:
    """Generated passwd and group for the user in the tree (identity.py), on a scratch
    tmpfs at the tree's /tmp (covered later by the job's own /tmp); O_PATH fds of them."""
    try:
        tfd = open_in_root(root_fd, "tmp", "dir" if plan.own_tree else None)
    except (OSError, UnsafePathError) as e:
        raise MountError(f"the image has no usable /tmp for the generated passwd: {e}") from e
    try:
        _call(_sys.mount, "/tmp", "tmpfs", f"/proc/self/fd/{tfd}", "tmpfs",
              _sys.MS_NOSUID | _sys.MS_NODEV | _sys.MS_NOEXEC, "mode=0700,size=16m")
    finally:
        os.close(tfd)
    sdir = os.path.join(plan.root, "tmp", ".pbs_chroot-id")
    from . import identity
    identity.prepare(sdir)
    identity.snapshot_image(plan.root, sdir)
    with open(os.path.join(sdir, "members", "local"), "w", encoding="utf-8") as f:
        f.write(plan.user)
    identity.refresh(sdir)
    return {f"/etc/{n}": os.open(os.path.join(sdir, n), os.O_PATH | os.O_CLOEXEC)
            for n in identity.FILES}


def build(plan: StagePlan) -> None:
    """Mount the tree at its own path with the binds, make it the root; the old root is gone.

    Must run in a fresh mount namespace of a fresh user namespace, as PID 1 of
    a fresh PID namespace (for /proc).
    """
    # Nothing may travel back to the host's namespace (new namespaces of a less
    # privileged user get slave copies anyway: mount_namespaces(7)).
    _call(_sys.mount, "/", None, "/", None, _sys.MS_REC | _sys.MS_SLAVE)
    # The tree, bound onto its own path (rec: mounts below it are locked to it),
    # so that it is a mount of this namespace, which pivot_root(2) wants.
    # By path: an fd taken before unshare(2) names a mount of the old namespace,
    # which mount(2) refuses (EINVAL); so the result is checked against that fd.
    _call(_sys.mount, plan.root, plan.root, plan.root, None, _sys.MS_BIND | _sys.MS_REC)
    root_fd = os.open(plan.root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        was, now = os.fstat(plan.root_fd), os.fstat(root_fd)
        if (was.st_dev, was.st_ino) != (now.st_dev, now.st_ino):
            raise MountError(f"{plan.root} changed while it was being staged")
        id_fds = None
        if plan.prepared:  # root made it (its flags are locked): our PID namespace's /proc
            binds: tuple[BindSpec, ...] = (BindSpec(target="/proc", source="proc"),)
        else:
            id_fds = identity_files(root_fd, plan) if plan.mode == "generated" else None
            binds = binds_for(plan.cfg, plan.mode, id_fds)
        for step in mounts.plan(plan.root, binds):
            _mount_step(root_fd, plan, step)
    finally:
        os.close(root_fd)
    if not plan.prepared:
        _remount(plan.root, _sys.MS_NOSUID | _sys.MS_NODEV
                 | (0 if plan.own_tree else _sys.MS_RDONLY))
    # pivot_root(".", "."): the old root ends up stacked on the new one, and the
    # detach takes it, and every host mount below it, out of reach (pivot_root(2)).
    os.chdir(plan.root)
    _call(_sys.pivot_root, plan.root, ".", ".")
    _call(_sys.umount2, "the old root", ".", _sys.MNT_DETACH)
    os.chdir("/")
    _check_root(plan.own_tree)
    for fd in (id_fds or {}).values():
        os.close(fd)


def _mount_step(root_fd: int, plan: StagePlan, step: mounts.MountStep) -> None:
    spec = step.spec
    try:
        # A user's own tree may get its missing mount points (as the user);
        # an image is root's and read-only: it must carry them.
        tfd = open_in_root(root_fd, spec.target,
                           ("file" if step.is_file else "dir") if plan.own_tree else None)
    except FileNotFoundError:
        if spec.optional:
            return
        raise MountError(f"the image has no mount point {spec.target} (`pbs-chroot image "
                         "build` adds them; or mark the bind optional)") from None
    except UnsafePathError as e:
        raise MountError(e.detail) from e
    except OSError as e:
        raise MountError(f"can't open mount point {spec.target}: {e.strerror}") from e
    try:
        where = f"/proc/self/fd/{tfd}"
        if spec.source == "proc":
            # A fresh procfs of our PID namespace: it shows our processes only.
            _call(_sys.mount, step.target, "proc", where, "proc",
                  _sys.MS_NOSUID | _sys.MS_NODEV | _sys.MS_NOEXEC)
            return
        if spec.source == "tmpfs":
            _call(_sys.mount, step.target, "tmpfs", where, "tmpfs",
                  _sys.MS_NOSUID | _sys.MS_NODEV | (_sys.MS_NOEXEC if spec.noexec else 0),
                  "mode=1777")
            return
        # Always rec: a plain bind of a mount with locked submounts would
        # uncover what they hide, and the kernel refuses it (EINVAL).
        _call(_sys.mount, step.target, spec.source, where, None, _sys.MS_BIND | _sys.MS_REC)
    finally:
        os.close(tfd)
    flags = _sys.MS_NOSUID | (0 if spec.dev else _sys.MS_NODEV) \
        | (_sys.MS_RDONLY if spec.readonly else 0) | (_sys.MS_NOEXEC if spec.noexec else 0)
    for m in mounts.mounts_below(step.target, mounts.read_mountinfo()):
        _remount(m.mount_point, flags)


def locked_flags(path: str) -> int:
    """The mount(2) flags of the mount at ``path`` that a remount has to keep."""
    f = os.statvfs(path).f_flag
    flags = 0
    for st_flag, ms_flag in _LOCKED:
        if f & st_flag:
            flags |= ms_flag
    if not f & (os.ST_NOATIME | os.ST_RELATIME):
        flags |= _sys.MS_STRICTATIME
    return flags


def _remount(target: str, flags: int) -> None:
    # Re-open: an fd taken before the bind names the covered directory.
    fd = os.open(target, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        where = f"/proc/self/fd/{fd}"
        _call(_sys.mount, target, None, where, None,
              _sys.MS_REMOUNT | _sys.MS_BIND | flags | locked_flags(where))
    finally:
        os.close(fd)


def _check_root(own_tree: bool) -> None:
    """After the pivot: / is our tree, nosuid, nodev (and read-only for an image)."""
    st = os.statvfs("/")
    want = os.ST_NOSUID | os.ST_NODEV | (0 if own_tree else os.ST_RDONLY)
    if st.f_flag & want != want:
        raise MountError(f"the new root is not mounted as planned (flags {st.f_flag:#x})")
    if not stat.S_ISDIR(os.stat("/proc/self").st_mode):
        raise MountError("the new root has no /proc")


def _call(fn: object, what: str, *args: object) -> None:
    try:
        fn(*args)  # type: ignore[operator]
    except OSError as e:
        raise MountError(f"can't mount {what}: {e.strerror} (errno {e.errno})") from e
