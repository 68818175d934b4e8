"""Leave a refused job's owner its refusal line in the error file Torque would have delivered.

Run by the prologue (root) when it refuses a job. Torque deletes the output
files of a job its prologue aborted, so the line the prologue writes on its
stderr never reaches the user; the job's Error_Path (Output_Path when the
job joins stderr into stdout) is where the user looks. That path and every
directory on it are the user's: root never opens them. A child process drops
to the user's uid, gid and groups, checks the drop, and only then walks the
path from / one component at a time with O_NOFOLLOW (no symlink followed,
not even the last) and appends to the file (created 0600 if missing, never
truncated). Anything that is not a regular file is left alone. The parent
waits with a deadline (an NFS home may hang) and never raises.
"""
from __future__ import annotations

import errno
import os
import stat
import time

from .log import get_logger

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn, Optional

__all__ = ["target_path", "append_as_user"]

log = get_logger(__name__)

_DEADLINE = 5.0  # seconds; well inside $prologalarm
_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NOCTTY
         | os.O_NONBLOCK | os.O_CLOEXEC)
# Exit codes of the child: what went wrong, for the admin's syslog line.
_WHY = {2: "no such directory on this node", 3: "not a regular file", 4: "permission denied",
        5: "a symlink on the way (not followed)", 6: "can't drop privileges", 7: "write failed"}


def target_path(error_path: str, output_path: str, join: str) -> str:
    """The file the user would have got the job's stderr in ('' if none): host part removed.

    Join_Path ``oe`` sends stderr to the output file; ``eo`` and ``n`` keep the error file.
    """
    path = output_path if join.startswith("o") and join != "n" else error_path
    _, colon, local = path.partition(":")
    local = local if colon else path
    return local if local.startswith("/") and "\0" not in local else ""


def append_as_user(user: str, path: str, line: str) -> bool:
    """Append ``line`` to ``path`` as ``user`` (a child with the user's ids); True if written."""
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        log.warning("can't tell user %s in %s: no such user on this node", user, path)
        return False
    if pw.pw_uid == 0:
        log.warning("not writing the refusal line of root's job to %s", path)
        return False
    groups = os.getgrouplist(user, pw.pw_gid)
    pid = os.fork()
    if pid == 0:
        _child(pw.pw_uid, pw.pw_gid, groups, path, line.encode("utf-8", "backslashreplace"))
    status = _wait(pid)
    if status == 0:
        return True
    why = ("the writer did not finish in time" if status is None
           else _WHY.get(status, f"status {status}"))
    log.warning("can't leave user %s the refusal in %s: %s", user, path, why)
    return False


def _child(uid: int, gid: int, groups: list[int], path: str, data: bytes) -> NoReturn:
    """Forked child: become the user for good, then append. Always os._exit."""
    code = 7
    try:
        try:
            os.setgroups(groups)
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            if (os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid)
                    or set(os.getgroups()) != set(groups)):
                os._exit(6)
        except OSError:
            os._exit(6)
        try:
            os.setuid(0)
            os._exit(6)  # the drop did not stick
        except PermissionError:
            pass
        code = _append(path, data)
    finally:
        os._exit(code)


def _append(path: str, data: bytes) -> int:
    parts = [p for p in path.split("/") if p]
    if not parts or ".." in parts:
        return 2
    dfd = os.open("/", _DIR)
    try:
        for name in parts[:-1]:
            try:
                nfd = os.open(name, _DIR, dir_fd=dfd)
            except FileNotFoundError:
                return 2
            except PermissionError:
                return 4
            except (NotADirectoryError, OSError):
                return 5  # ELOOP/ENOTDIR: a symlink or a file on the way
            os.close(dfd)
            dfd = nfd
        try:
            fd = os.open(parts[-1], _FILE, 0o600, dir_fd=dfd)
        except PermissionError:
            return 4
        except OSError as e:
            return 5 if e.errno == errno.ELOOP else 3  # ELOOP: O_NOFOLLOW met a symlink
    finally:
        os.close(dfd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return 3
        while data:
            data = data[os.write(fd, data):]
        return 0
    except OSError:
        return 7
    finally:
        os.close(fd)


def _wait(pid: int) -> Optional[int]:
    """The child's exit code, or None if it had to be killed at the deadline."""
    deadline = time.monotonic() + _DEADLINE
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        if time.monotonic() >= deadline:
            import _signal  # type: ignore[import-not-found]  # the signal module imports enum
            os.kill(pid, _signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.002)
