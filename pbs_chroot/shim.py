"""The exec shim: chroot into a stage, drop to the job user for good, exec the job.

Started as root (never setuid) by the local runner, and later by batch
systems that do not chroot natively. Trusts its arguments, which come from
root; trusts nothing in the image. Imports only _sys and errors, so that it
starts fast; everything is imported before the chroot (the image has no
Python). Exit codes: 125 its own setup failed, 126 the command is not
executable, 127 it was not found; otherwise it execs and never returns.

    python3 -I -m pbs_chroot.shim --root DIR --user NAME [--setenv K=V]... -- CMD [ARG...]

Started without root (real, effective and saved uid all the user's), it is
the shim of batch systems that start jobs as the user: userns_shim.py.
"""
import errno
import os
import pwd
import signal
import sys
from typing import NoReturn, Optional, Sequence

from . import _sys

__all__ = ["main", "enter_and_exec", "ShimArgs"]

SETUP_FAILED, NOT_EXECUTABLE, NOT_FOUND = 125, 126, 127
PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


class ShimError(Exception):
    """A setup step failed: exit 125 with this message."""


class ShimArgs:
    """Parsed command line (argparse costs start-up time the shim does not need)."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.root: Optional[str] = None
        self.user: Optional[str] = None
        self.env: dict[str, str] = {}
        args = list(argv)
        while args and args[0] != "--":
            opt = args.pop(0)
            if opt not in ("--root", "--user", "--setenv") or not args:
                raise ShimError(f"bad argument {opt!r}; usage: --root DIR --user NAME "
                                "[--setenv K=V]... -- CMD [ARG...]")
            val = args.pop(0)
            if opt == "--setenv":
                key, sep, value = val.partition("=")
                if not sep or not key:
                    raise ShimError(f"bad --setenv {val!r}: want KEY=VALUE")
                self.env[key] = value
            else:
                setattr(self, opt[2:], val)
        self.cmd = args[1:]
        if not (self.root and self.user and self.cmd):
            raise ShimError("--root, --user and a command after -- are required")


def enter_and_exec(args: ShimArgs) -> NoReturn:
    """Steps 1-8 of STYLE.md §5 (plus a new session), in order; each failure is a ShimError."""
    assert args.root is not None and args.user is not None
    if os.geteuid() != 0 or os.getuid() != 0:
        raise ShimError("must be started by root (and is never installed setuid)")
    # 1. Resolve the user on the host: the image's passwd may not know them.
    try:
        pw = pwd.getpwnam(args.user)
    except KeyError:
        raise ShimError(f"can't find user {args.user!r}") from None
    if pw.pw_uid == 0:
        raise ShimError("refusing to run a job as root")
    groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
    # 2. (the job's cgroup is joined here once cgroups exist)
    # 3. A session of its own, so the job has no controlling terminal: with the
    #    admin's tty it could push input into the admin's root shell
    #    (TIOCSTI, tty_ioctl(4); bubblewrap's CVE-2017-5226).
    _new_session()
    fds = _open_fds()
    # Enter the stage. chdir first: chroot(2) does not change the cwd.
    try:
        os.chdir(args.root)
        os.chroot(".")
        os.chdir("/")
    except OSError as e:
        raise ShimError(f"can't chroot: {args.root}: {e.strerror}") from e
    # 4. Groups first, then gid, then uid: after setresuid we could not.
    try:
        os.setgroups(groups)
        os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
        os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
    except OSError as e:
        raise ShimError(f"can't drop privileges to {pw.pw_name}: {e.strerror}") from e
    # 5. Check the drop, including that it cannot be undone.
    _check_dropped(pw.pw_uid, pw.pw_gid, groups)
    # 6. No exec may raise privileges again (setuid files, file capabilities).
    try:
        _sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
    except OSError as e:
        raise ShimError(f"can't set no_new_privs: {e.strerror}") from e
    # 7. A clean environment, a home if the image has it, no inherited fds,
    #    default signal dispositions (Python ignores SIGPIPE and SIGXFSZ), and
    #    Torque's job umask.
    env = {"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name, "PATH": PATH,
           "SHELL": pw.pw_shell}
    env.update(args.env)
    try:
        os.chdir(pw.pw_dir)
    except OSError:
        os.chdir("/")
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _default_signals()
    os.umask(0o077)
    # 8. exec, as execvp(3) would search PATH, but in the clean environment.
    _exec(args.cmd, env)


def _check_dropped(uid: int, gid: int, groups: list[int]) -> None:
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise ShimError(f"privilege drop incomplete: uids {os.getresuid()}, "
                        f"gids {os.getresgid()}")
    if sorted(set(os.getgroups())) != sorted(set(groups)):
        raise ShimError(f"supplementary groups are {os.getgroups()}, want {groups}")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise ShimError("setuid(0) still works after the privilege drop")


def _new_session() -> None:
    """setsid(2); a process-group leader cannot, so it forks and waits, as setsid -w."""
    try:
        os.setsid()
        return
    except PermissionError:
        pass
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    os.setsid()


def _open_fds() -> list[int]:
    """Descriptors above 2, listed while /proc is still the host's."""
    return sorted(int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) > 2)


def _default_signals() -> None:
    for sig in range(1, signal.NSIG):
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            continue  # signals Python will not touch (e.g. 32, 33 used by glibc)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _exec(cmd: Sequence[str], env: dict[str, str]) -> NoReturn:
    try:
        os.execvpe(cmd[0], list(cmd), env)
    except OSError as e:
        code = NOT_FOUND if e.errno in (errno.ENOENT, errno.ENOTDIR) else NOT_EXECUTABLE
        _die(code, f"can't run: {cmd[0]}: {e.strerror}")


def _die(code: int, msg: str) -> NoReturn:
    try:
        os.write(2, f"pbs-chroot-shim: {msg}\n".encode("utf-8", "backslashreplace"))
    finally:
        os._exit(code)


def main(argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Console entry point ``pbs-chroot-shim``."""
    args = sys.argv[1:] if argv is None else argv
    if 0 not in os.getresuid():  # started as the user (a launch hook): user namespace
        from . import userns_shim
        userns_shim.main(args)
    try:
        enter_and_exec(ShimArgs(args))
    except ShimError as e:
        _die(SETUP_FAILED, str(e))


if __name__ == "__main__":
    main()
