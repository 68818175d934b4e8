"""Is the job's shell an executable file in the image? (pbs_mom execs it after the chroot.)

Run as root by the prologue, and as the submitting user by the submit filter.
Trusts the image tree (the admin's: root-owned, checked by paths.py) no more
than a chroot would: the shell's path is resolved *inside* the image, every
component opened with O_NOFOLLOW relative to the one before, and a symlink
is followed by hand as the kernel would after chroot(2) (an absolute target
restarts at the image's root, ``..`` never climbs above it). Nothing outside
the image is opened. The shell's path is the user's (qsub -S) or the login
shell from NSS: it is only ever looked up, never created or written.
"""
from __future__ import annotations

import os
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable, Optional

__all__ = ["shell_problem", "pick_shell", "refusal", "SHELL_HINT"]

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


def shell_problem(root: str, shell: str, skip: Iterable[str] = ()) -> str:
    """Why ``shell`` would not run in the image at ``root`` ('' if it would, or can't be told).

    ``skip``: mount points of the stage (binds): a shell below one of them
    is not in the image but on the host, and is not judged here.
    Raises OSError when ``root`` itself can't be opened (the caller decides).
    """
    if not shell.startswith("/"):
        return "is not an absolute path"
    for target in skip:
        if shell == target or shell.startswith(target.rstrip("/") + "/"):
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


def refusal(image: str, shell: str, problem: str, has_hint: bool) -> str:
    """The one line a user reads when the job's shell is not usable in the image."""
    fix = (f"; submit with a shell the image has, e.g. qsub -S {SHELL_HINT}" if has_hint
           else "; submit with a shell the image has (qsub -S PATH)")
    return f"can't use image {image}: the job's shell {shell} {problem}{fix}"
