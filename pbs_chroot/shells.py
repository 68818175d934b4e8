"""Is the job's shell an executable file in the image? (pbs_mom execs it after the chroot.)

The shell's path is the user's (qsub -S) or the login shell from NSS: it is
only ever looked up, never created or written.

- The prologue (root) uses shell_problem_as_user(): a child chroots into the
  job's stage as pbs_mom will, drops to the user for good, and looks the path up
  there, so root follows no link the user made (a staged image shows the
  host's homes) and learns nothing the user could not. A shell found that way
  without crossing a mount (openat2 RESOLVE_NO_XDEV: only the version's own tree,
  which never changes once deployed, was looked at) is remembered in the state
  directory, keyed on the version (path, device, inode, ctime), the stage's mount
  points, the user's uid, gid and groups and the path: the next job with the same
  key skips the child (ShellCache).
- The submit filter (the user) uses shell_problem(): the path is resolved
  *inside* the image tree, every component opened with O_NOFOLLOW relative to
  the one before, a symlink followed by hand as the kernel would after
  chroot(2) (an absolute target restarts at the image's root, ``..`` never
  climbs above it). Nothing outside the image is opened.
"""
from __future__ import annotations

import os
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable, Optional

__all__ = ["shell_problem", "shell_problem_as_user", "pick_shell", "refusal", "SHELL_HINT",
           "kill_and_leave", "ShellCache", "CACHE_VERSION"]

_MAX_LINKS = 40  # the kernel's limit on symlinks in one lookup (path_resolution(7))
_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
SHELL_HINT = "/bin/sh"


def pick_shell(shell_path_list: str, node: str) -> str:
    """The shell pbs_mom picks from a Shell_Path_List (``path[@host],...``): '' if none.

    An entry for this host wins over one without a host (Torque's
    set_shell); entries for other hosts are ignored.
    """
    plain = ""
    for entry in shell_path_list.split(","):
        path, at, host = entry.strip().partition("@")
        if not path:
            continue
        if at and host and (host == node or host.split(".")[0] == node.split(".")[0]):
            return path
        if not at and not plain:
            plain = path
    return plain


def _plain(path: str) -> str:
    """``path`` with "//" and "." collapsed, as a lookup sees it; '' if it has ".." (not
    judged: "/home/../bin/sh" must not pass for a path below /home, nor the reverse)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return "" if ".." in parts else "/" + "/".join(parts)


def _below(path: str, targets: Iterable[str]) -> bool:
    """Whether ``path`` is at or below one of the stage's mount points (the host's there)."""
    for target in targets:
        t = _plain(target).rstrip("/")
        if path == t or path.startswith(t + "/"):
            return True
    return False


def shell_problem(root: str, shell: str, skip: Iterable[str] = ()) -> str:
    """Why ``shell`` would not run in the image at ``root`` ('' if it would, or can't be told).

    ``skip``: mount points of the stage (binds): a shell below one of them
    is not in the image but on the host, and is not judged here.
    Raises OSError when ``root`` itself can't be opened (the caller decides).
    """
    if not shell.startswith("/"):
        return "is not an absolute path"
    shell = _plain(shell)
    if not shell or _below(shell, skip):
        return ""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _resolve(root_fd, shell)
        if fd is None:
            return "is not in the image"
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
    finally:
        os.close(root_fd)
    if not stat.S_ISREG(st.st_mode):
        return "is not a file in the image"
    if not st.st_mode & 0o111:
        return "is not executable in the image"
    return ""


def _resolve(root_fd: int, path: str) -> Optional[int]:
    """An O_PATH fd of ``path`` looked up inside root_fd, or None if it is not there."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    stack = [os.dup(root_fd)]  # the directories walked, for ".."
    links = 0
    try:
        while parts:
            name = parts.pop(0)
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            try:
                fd = os.open(name, _O_PATH, dir_fd=stack[-1])
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                return None
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                try:
                    target = os.readlink("", dir_fd=fd)
                finally:
                    os.close(fd)
                if links > _MAX_LINKS or not target:
                    return None
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                parts = [p for p in target.split("/") if p not in ("", ".")] + parts
                continue
            if parts and not stat.S_ISDIR(st.st_mode):
                os.close(fd)
                return None
            stack.append(fd)
        return os.dup(stack[-1])
    finally:
        for fd in stack:
            os.close(fd)


# Exit codes of shell_problem_as_user's child, and what they mean.
_CHILD = {1: "is not in the image", 2: "is not a file in the image",
          3: "is not executable in the image", 4: "",  # 4: can't tell (set-up failed)
          5: ""}  # 5: runs, and was found without crossing a mount (can be remembered)
_CONFINED = 5
_DEADLINE = 5.0
CACHE_VERSION = "shells-v1"  # the first line of a ShellCache entry


class ShellCache:
    """Shells found runnable in a stage, one file per key in ``cache_dir`` (root's, in
    the state directory): its name a digest of the key, its content the key itself, which
    must match exactly (a torn or foreign file is a miss). ``stage``: what the stage mounts
    (its mount points, from its info.json): a stage of the same version with other mounts
    may hide a path the lookup went through, so it has other keys."""

    __slots__ = ("cache_dir", "version", "stage")

    def __init__(self, cache_dir: str, version: str, stage: str) -> None:
        self.cache_dir = cache_dir
        self.version = version
        self.stage = stage

    def key(self, shell: str, uid: int, gid: int, groups: list[int]) -> str:
        st = os.stat(self.version)
        return "\n".join([CACHE_VERSION, self.version,
                          f"{st.st_dev}:{st.st_ino}:{st.st_ctime_ns}", self.stage,
                          f"{uid}:{gid}:{','.join(str(g) for g in sorted(set(groups)))}",
                          shell])

    def _path(self, key: str) -> str:
        from _blake2 import blake2b  # (not hashlib: loading OpenSSL costs ~3 ms)
        return os.path.join(self.cache_dir, blake2b(key.encode(), digest_size=16).hexdigest())

    def has(self, key: str) -> bool:
        """Whether ``key`` is remembered (an unreadable entry is not)."""
        from .errors import StateError
        from .state import read_json
        try:
            return read_json(self._path(key)) == key
        except (StateError, OSError, ImportError):  # a miss: the lookup runs
            return False

    def remember(self, key: str) -> None:
        """Remember ``key`` (atomically; a failure only costs the next job the lookup)."""
        from .errors import StateError
        from .state import write_json
        try:
            write_json(self._path(key), key)
        except (StateError, OSError, ImportError):
            pass


def shell_problem_as_user(root: str, shell: str, uid: int, gid: int, groups: list[int],
                          skip: Iterable[str] = (), cache: Optional[ShellCache] = None) -> str:
    """shell_problem() as pbs_mom meets it: in a child that chroots into ``root`` (as
    root, like pbs_mom), then drops to the user for good and looks the shell up there.
    Root follows no link of the user's and learns nothing the user could not see.
    Returns '' when the shell would run, or when the check itself could not be made.
    ``cache``: ``root`` is that stage's version; a shell it remembers for these ids is
    not looked up again, and one found without crossing a mount is remembered."""
    if not shell.startswith("/"):
        return "is not an absolute path"
    shell = _plain(shell)
    if not shell or _below(shell, skip):
        return ""
    key = cache.key(shell, uid, gid, groups) if cache is not None else ""
    if cache is not None:
        if cache.has(key):
            return ""
        from . import _sys  # noqa: F401 - the child's openat2, loaded before the chroot
    pid = os.fork()
    if pid == 0:
        code = 4
        try:
            code = _child_lookup(root, shell, uid, gid, groups, cache is not None)
        finally:
            os._exit(code)
    code = _wait(pid)
    if code == _CONFINED and cache is not None:
        cache.remember(key)
    return _CHILD.get(code, "")


def _child_lookup(root: str, shell: str, uid: int, gid: int, groups: list[int],
                  confined: bool = False) -> int:
    try:
        os.chroot(root)
        os.chdir("/")
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError:
        return 4
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        return 4
    try:
        st = os.stat(shell)
    except OSError:
        return 1
    if not stat.S_ISREG(st.st_mode):
        return 2
    if not os.access(shell, os.X_OK):
        return 3
    return _CONFINED if confined and _in_own_tree(shell) else 0


def _in_own_tree(path: str) -> bool:
    """Whether ``path`` resolves (links followed) without crossing a mount: then only the
    version's own files were looked at, which a deploy never changes."""
    from . import _sys
    try:
        fd = _sys.openat2(path, os.O_PATH | os.O_CLOEXEC, _sys.RESOLVE_NO_XDEV)
    except OSError:
        return False
    os.close(fd)
    return True


def _wait(pid: int) -> int:
    """The child's exit code (4, "can't tell", if it had to be killed at the deadline)."""
    import time

    from .command import wait_child
    status = wait_child(pid, time.monotonic() + _DEADLINE)
    if status is not None:
        return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 4
    kill_and_leave(pid)
    return 4


def kill_and_leave(pid: int, grace: float = 0.5) -> None:
    """SIGKILL a child and reap it if it dies within ``grace``; else leave it (never block).

    A child stuck in the kernel (a FUSE file system that never answers, a hung
    NFS server) does not die of SIGKILL: waiting for it would hold the hook
    until $prologalarm, and on a sister pbs_mom's whole main loop with it.
    Left, it is reparented to init when the hook exits.
    """
    import time

    import _signal  # type: ignore[import-not-found]  # the signal module imports enum
    try:
        os.kill(pid, _signal.SIGKILL)
    except ProcessLookupError:
        pass
    end = time.monotonic() + grace
    while time.monotonic() < end:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return
        time.sleep(0.005)


def refusal(image: str, shell: str, problem: str, has_hint: bool) -> str:
    """The one line a user reads when the job's shell is not usable in the image."""
    fix = (f"; submit with a shell the image has, e.g. qsub -S {SHELL_HINT}" if has_hint
           else "; submit with a shell the image has (qsub -S PATH)")
    return f"can't use image {image}: the job's shell {shell} {problem}{fix}"
