"""Path safety: resolve admin paths with ownership checks, open paths inside a root.

Run as root by the hooks, the runner and the admin CLI. Trusts nothing it
reads from the file system: every component is opened with O_NOFOLLOW and
checked before it is used. Symlinks are followed only when root owns them and
the directory that holds them (an admin's symlink, such as an image's stable
path); paths inside an image stage never follow symlinks at all.
"""
from __future__ import annotations

import os
import stat

from .errors import UnsafePathError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

__all__ = ["check_admin_stat", "resolve_admin_path", "check_version_private",
           "check_versions_dir", "open_in_root", "resolve_in_tree"]

_MAX_LINKS = 40
_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def check_admin_stat(st: os.stat_result, what: str, sticky_ok: bool = False) -> None:
    """Refuse anything not owned by root or writable by group or others.

    sticky_ok: accept a root-owned sticky directory such as /tmp (others
    cannot rename or remove root's entries in it).
    """
    if st.st_uid != 0:
        raise UnsafePathError(f"{what} is owned by uid {st.st_uid}, not root")
    if sticky_ok and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
        return
    if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePathError(f"{what} is writable by group or others "
                              f"(mode {stat.S_IMODE(st.st_mode):04o})")


def resolve_admin_path(path: str, sticky_ok: bool = False) -> str:
    """Resolve an admin path (e.g. an image's stable path) to its real path.

    Every directory on the way, every symlink and the final directory must be
    root-owned and not group/other-writable, as Torque demands of its own
    scripts; otherwise UnsafePathError. The result is the real path, free of
    symlinks, so that a later chroot or mount of it lands where it was checked.
    """
    if not path.startswith("/"):
        raise UnsafePathError(f"{path!r} is not an absolute path")
    todo = [c for c in path.split("/") if c not in ("", ".")]
    done: list[str] = []
    links = 0
    fd = os.open("/", _O_PATH | os.O_DIRECTORY)
    try:
        check_admin_stat(os.fstat(fd), "/", sticky_ok)
        while todo:
            name = todo.pop(0)
            where = "/" + "/".join(done + [name])
            if name == "..":
                done = done[:-1]
                fd = _reopen(fd, done)
                continue
            try:
                nfd = os.open(name, _O_PATH, dir_fd=fd)
            except OSError as e:
                raise UnsafePathError(f"can't open {where}: {e.strerror}") from e
            st = os.fstat(nfd)
            check_admin_stat(st, where, sticky_ok and bool(todo))
            if stat.S_ISLNK(st.st_mode):
                os.close(nfd)
                links += 1
                if links > _MAX_LINKS:
                    raise UnsafePathError(f"too many symlinks resolving {path}")
                target = os.readlink(name, dir_fd=fd)
                todo = [c for c in target.split("/") if c not in ("", ".")] + todo
                if target.startswith("/"):
                    done = []
                    fd = _reopen(fd, done)
                continue
            if todo and not stat.S_ISDIR(st.st_mode):
                os.close(nfd)
                raise UnsafePathError(f"{where} is not a directory")
            os.close(fd)
            fd = nfd
            done.append(name)
        return "/" + "/".join(done)
    finally:
        os.close(fd)


def check_version_private(version: str) -> None:
    """Refuse an image version that host users can reach outside its stage.

    Only the stage is nosuid: through the raw directory, a user on the node
    could run the image's setuid programs (an old sudo or pkexec) as root,
    or plant files in its world-writable directories. The directory holding
    the versions must give group and others no access; pbs_mom and the shim
    chroot as root and do not need it. A version on a file system mounted
    read-only and nosuid (CVMFS) is safe to reach.
    """
    st = os.statvfs(version)
    if st.f_flag & os.ST_RDONLY and st.f_flag & os.ST_NOSUID:
        return
    check_versions_dir(os.path.dirname(version))


def check_versions_dir(parent: str) -> None:
    """The directory of an image's versions must be root's only (see check_version_private)."""
    mode = stat.S_IMODE(os.stat(parent).st_mode)
    if mode & 0o077:
        raise UnsafePathError(f"image versions in {parent} are reachable by users (mode "
                              f"{mode:04o}): make it 0700, or users can run the image's "
                              "setuid programs outside the nosuid stage")


def _reopen(fd: int, components: list[str]) -> int:
    os.close(fd)
    return os.open("/" + "/".join(components), _O_PATH | os.O_DIRECTORY)


def open_in_root(root_fd: int, rel: str, create: Optional[str] = None) -> int:
    """Open ``rel`` below ``root_fd`` as an O_PATH fd, never following a symlink.

    create: None (must exist), "dir" or "file": make the missing last
    component (and missing parent directories) root-owned, mode 0755/0644,
    whatever the umask. A symlink anywhere on the way is refused.
    """
    parts = [c for c in rel.split("/") if c not in ("", ".")]
    if ".." in parts:
        raise UnsafePathError(f"'..' in stage path {rel!r}")
    fd = os.dup(root_fd)
    try:
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            kind = (create if last else "dir") if create else None
            nfd = _open_component(fd, name, kind, "/" + "/".join(parts[:i + 1]))
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_component(dfd: int, name: str, create: Optional[str], where: str) -> int:
    try:
        fd = os.open(name, _O_PATH, dir_fd=dfd)
    except FileNotFoundError:
        if create is None:
            raise
        _make(dfd, name, create)
        fd = os.open(name, _O_PATH, dir_fd=dfd)
    if stat.S_ISLNK(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePathError(f"{where} is a symlink in the image; a mount point must not be")
    return fd


def _make(dfd: int, name: str, kind: str) -> None:
    # The prologue runs with umask 0077: set modes explicitly so the job user
    # can traverse the mount points.
    if kind == "dir":
        os.mkdir(name, 0o755, dir_fd=dfd)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
        mode = 0o755
    else:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                     dir_fd=dfd)
        mode = 0o644
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def resolve_in_tree(root: str, path: str, hops: int = 40) -> Optional[str]:
    """Where ``path`` of the tree at ``root`` is on the host, its symlinks resolved inside
    the tree (an absolute link is taken from ``root``, ``..`` stops at it); None if it does
    not exist. For the admin's audit of an image, not for anything a user controls."""
    parts = [p for p in path.split("/") if p]
    done: list[str] = []
    while parts:
        name = parts.pop(0)
        if name in (".", ".."):
            done = done[:-1] if name == ".." else done
            continue
        here = os.path.join(root, *done, name)
        if os.path.islink(here):
            hops -= 1
            if hops <= 0:
                return None
            link = os.readlink(here)
            done = [] if link.startswith("/") else done
            parts = [p for p in link.split("/") if p] + parts
            continue
        if not os.path.lexists(here):
            return None
        done.append(name)
    return os.path.join(root, *done)
