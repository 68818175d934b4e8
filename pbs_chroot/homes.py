"""Homes that are symlinks on the host (/home/u -> /net/fs1/u) resolve the same way in a stage.

Run as root by the hooks and the runner, under the node lock, when a job
joins a stage (stage.py). Trusts only root's symlinks: a link on the way to
a home is followed when root owns it and the directory holding it is root's
and not group/other-writable; a link a user could have made or swapped is
never followed, and the home is then left as the bind set makes it. Paths
inside the stage are opened without following any symlink.

When the home does not lead to the same directory inside the stage, its real
directory is bound (rec, nosuid, nodev, receiving later mounts) at the same
path, and links of the chain that the stage lacks are made in the image, as
the host has them. The stage's root is read-only: those mount points and
links are made through a short-lived read-write bind of the version, taken
in the state directory and unmounted at once.
"""
from __future__ import annotations

import os
import stat

from .errors import MountError, UnsafePathError
from .log import get_logger
from .paths import open_in_root

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

__all__ = ["resolve", "ensure_home"]

log = get_logger(__name__)

_MAX_LINKS = 40
_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def resolve(root: str, path: str) -> tuple[str, list[tuple[str, str]]]:
    """The real path of ``path`` below ``root`` ("/" for the host) and the links passed.

    Follows root's links only (see the module doc); UnsafePathError for
    any other link, FileNotFoundError if the path does not exist there.
    """
    todo = [c for c in path.split("/") if c not in ("", ".")]
    done: list[str] = []
    hops: list[tuple[str, str]] = []
    while todo:
        name = todo.pop(0)
        if name == "..":
            done = done[:-1]
            continue
        here = root.rstrip("/") + "/" + "/".join(done + [name])
        st = os.lstat(here)
        if stat.S_ISLNK(st.st_mode):
            holder = os.lstat(os.path.dirname(here))
            if st.st_uid != 0 or holder.st_uid != 0 or holder.st_mode & 0o022:
                raise UnsafePathError(f"{'/' + '/'.join(done + [name])} is a symlink not "
                                      "made by root: not followed")
            if len(hops) >= _MAX_LINKS:
                raise UnsafePathError(f"too many symlinks resolving {path}")
            target = os.readlink(here)
            hops.append(("/" + "/".join(done + [name]), target))
            if target.startswith("/"):
                done = []
            todo = [c for c in target.split("/") if c not in ("", ".")] + todo
            continue
        if todo and not stat.S_ISDIR(st.st_mode):
            raise FileNotFoundError(f"{here} is not a directory")
        done.append(name)
    return "/" + "/".join(done), hops


def ensure_home(version: str, sdir: str, home: str) -> Optional[str]:
    """Make ``home`` lead inside the stage where it leads on the host; return what was bound."""
    try:
        real, hops = resolve("/", home)
        want = os.stat(real)
    except FileNotFoundError:
        return None  # (e.g. a work directory this user has not got)
    except (OSError, UnsafePathError) as e:
        log.warning("home %s: left as the bind set makes it: %s", home, e)
        return None
    if not hops or _same(version, home, want):
        return None
    # The source is bound through a descriptor opened with no symlink on the
    # way (mount(2) follows a source path's links): if a directory on the way
    # changed since it was resolved, nothing is bound.
    top = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        src = open_in_root(top, real)
    except (OSError, UnsafePathError) as e:
        log.warning("home %s: %s changed while it was resolved: %s", home, real, e)
        return None
    finally:
        os.close(top)
    try:
        st = os.fstat(src)
        if (st.st_dev, st.st_ino) != (want.st_dev, want.st_ino) or not stat.S_ISDIR(st.st_mode):
            log.warning("home %s: %s changed while it was resolved", home, real)
            return None
        try:
            _make_in_image(version, sdir, real,
                           [h for h in hops if not _in_stage(version, h[0])])
        except MountError as e:
            # E.g. an image on a read-only tree (CVMFS) without the links: the job
            # still runs, its home as the bind set makes it; not a node fault.
            log.warning("home %s: left as the bind set makes it: %s", home, e.detail)
            return None
        from . import mounts
        from .config import BindSpec
        spec = BindSpec(target=real, source=f"/proc/self/fd/{src}", rec=True)
        mounts.mount_step(version, mounts.MountStep(spec, version + real, False))
    finally:
        os.close(src)
    if not _same(version, home, want):
        raise MountError(f"stage {version}: home {home} still does not lead to {real}")
    log.info("stage %s: bound home %s (via %s)", version, real,
             " -> ".join(f"{link} -> {target}" for link, target in hops))
    return real


def _same(version: str, home: str, want: os.stat_result) -> bool:
    try:
        inner, _ = resolve(version, home)
        st = os.stat(version + inner)
    except (OSError, UnsafePathError):
        return False
    return (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino)


def _in_stage(version: str, path: str) -> bool:
    return os.path.lexists(version + path)


def _make_in_image(version: str, sdir: str, real: str, links: list[tuple[str, str]]) -> None:
    """Make the mount point ``real`` and the missing ``links`` in the image, root's, 0755."""
    from . import _sys
    view = os.path.join(sdir, "view")
    try:
        os.mkdir(view, 0o700)
    except FileExistsError:
        pass
    fd = os.open(version, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        # Not rec: the view shows the image's own directories, none of the stage's mounts.
        _sys.mount(f"/proc/self/fd/{fd}", view, None, _sys.MS_BIND)
    except OSError as e:
        raise MountError(f"stage {version}: can't make a writable view: {e.strerror}") from e
    finally:
        os.close(fd)
    try:
        _sys.mount(None, view, None, _sys.MS_REMOUNT | _sys.MS_BIND | _sys.MS_NOSUID
                   | _sys.MS_NODEV | _sys.MS_NOEXEC)
        root_fd = os.open(view, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for link, target in links:
                parent = open_in_root(root_fd, os.path.dirname(link), "dir")
                try:
                    dfd = os.open(f"/proc/self/fd/{parent}",
                                  os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                finally:
                    os.close(parent)
                try:
                    os.symlink(target, os.path.basename(link), dir_fd=dfd)
                finally:
                    os.close(dfd)
            os.close(open_in_root(root_fd, real, "dir"))
        finally:
            os.close(root_fd)
    except (OSError, UnsafePathError) as e:
        raise MountError(f"stage {version}: can't make the way to home {real}: {e}") from e
    finally:
        _sys.umount2(view, _sys.UMOUNT_NOFOLLOW)
        os.rmdir(view)
