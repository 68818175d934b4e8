"""Unprivileged mode: `pbs-chroot run` by a user, into an image through a user namespace.

Run as the job user, never as root and never setuid. Trusts the root-owned
config (config.load refuses any other) and admin paths that
paths.resolve_admin_path has checked; the image is chosen through the same
gate, with the same per-image rules, as in root mode. A user namespace gives
this process the capabilities it needs to mount and pivot_root, over its own
namespaces only (user_namespaces(7)); the command it runs keeps none of them.

Process tree: this process (outside, waits and passes signals on) -> PID 1 of
a new PID namespace (builds the stage, drops every capability, waits) -> the
command. When PID 1 ends, the kernel kills whatever is left in its namespace,
and the mount namespace, with every mount of the stage, goes with it.
"""
from __future__ import annotations

import os
import signal
import sys

from . import _sys
from .errors import PbsChrootError, PrivilegeError, SiteError, UserError
from .usernscheck import SYSCTLS, userns_problem

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn, Optional, Sequence

    from .config import Config
    from .userns_stage import StagePlan

__all__ = ["SYSCTLS", "userns_problem", "run", "enter", "drop_capabilities"]

SETUP_FAILED = 125
PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
_CAPS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def run(cfg_path: str, image: Optional[str], tree: Optional[str], user: Optional[str],
        cmd: Sequence[str]) -> int:
    """`pbs-chroot run` as a user: ``cmd`` in ``image`` (allowlisted) or in ``tree`` (own)."""
    problem = userns_problem()  # before anything is read or set up
    if problem:  # one line, for the user (the admin knows the node's settings)
        print(f"pbs-chroot: {problem}", file=sys.stderr)
        return 1
    import pwd
    pw = pwd.getpwuid(os.getuid())
    if user and user != pw.pw_name:
        raise UserError(f"can't run as {user}: without root, only as yourself ({pw.pw_name})")
    plan = _plan(cfg_path, image, tree, pw.pw_name)
    env = {"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name, "PATH": PATH,
           "SHELL": pw.pw_shell}
    if not plan.prepared:
        env["TMPDIR"] = "/tmp"  # a tmpfs of this run's own
    status = enter(plan, env, [pw.pw_dir], cmd)
    where = image if image is not None else tree
    print(f"pbs-chroot: {where} as {pw.pw_name} (user namespace) exited with status {status}",
          file=sys.stderr)
    return status


def _plan(cfg_path: str, image: Optional[str], tree: Optional[str], user: str) -> StagePlan:
    from . import config as config_mod
    from .userns_stage import StagePlan
    cfg = config_mod.load(cfg_path)
    if tree is not None:
        root, prepared = _own_tree(tree), False
        mode = cfg.identity
    else:
        assert image is not None
        root, prepared = _image_root(cfg, image, user)
        mode = cfg.identity_of(image)
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    return StagePlan(root, fd, cfg, mode, user, tree is not None, prepared)


def _image_root(cfg: Config, image: str, user: str) -> tuple[str, bool]:
    """Where to enter ``image``, through the gate: the stage a root hook prepared for a job
    of ours (True), else its version, checked as root mode checks it (False)."""
    from . import entry, gate
    from .errors import UnsafePathError
    from .paths import check_version_private, resolve_admin_path
    allowed = gate.check_value(image, cfg, user, "local")
    found = entry.find_for_image(cfg.entry_dir, allowed.path, user) if cfg.entry_dir else None
    if found is not None:
        return found.root, True
    try:
        version = resolve_admin_path(allowed.path)
    except UnsafePathError as e:
        if isinstance(e.__cause__, PermissionError):
            raise UserError(f"can't use image {image}: its versions are root's only on this "
                            "node and no job of yours here has it staged; the site can "
                            "publish it read-only and nosuid (as CVMFS does) for use without "
                            "root, or run it through the batch system") from None
        raise
    check_version_private(version)  # reachable by users: only if read-only and nosuid
    return version, False


def _own_tree(tree: str) -> str:
    """A directory the user owns: no allowlist (it gives the user nothing new)."""
    path = os.path.realpath(tree)
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserError(f"can't use directory {tree}: {e.strerror}") from e
    if not os.path.isdir(path) or st.st_uid != os.getuid():
        raise UserError(f"can't use directory {tree}: not a directory of yours")
    if path == "/":
        raise UserError("can't use directory /: give the root of an unpacked tree")
    return path


def enter(plan: StagePlan, env: dict[str, str], cwds: Sequence[str],
          cmd: Sequence[str], argv0: Optional[str] = None) -> int:
    """Build ``plan`` in new namespaces and run ``cmd`` there (in the first of ``cwds`` that
    exists, else /; with ``argv0`` as its argv[0] if given); return its exit status
    (128+N: killed by signal N)."""
    uid, gid = os.getuid(), os.getgid()
    try:
        _sys.unshare(_sys.CLONE_NEWUSER | _sys.CLONE_NEWNS | _sys.CLONE_NEWPID)
    except OSError as e:
        raise SiteError(f"can't run unprivileged: can't create a user namespace: "
                        f"{e.strerror}{_hint(e.errno)}") from e
    # Our own uid and gid, mapped to themselves: the only mapping an unprivileged
    # process may write, and only after giving up setgroups(2) (user_namespaces(7)).
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1\n"),
                           ("gid_map", f"{gid} {gid} 1\n")):
            with open(f"/proc/self/{name}", "w", encoding="ascii") as f:
                f.write(text)
    except OSError as e:
        raise PrivilegeError(f"can't map your ids into the user namespace: {e}") from e
    pid = os.fork()
    if pid == 0:
        _child(plan, env, cwds, cmd, argv0)
    os.close(plan.root_fd)
    return _wait_forwarding(pid)


def _hint(err: Optional[int]) -> str:
    import errno
    if err == errno.ENOSPC:
        return " (the limit sysctl user.max_user_namespaces is reached, or 0)"
    if err in (errno.EPERM, errno.EACCES):
        return " (forbidden by a security policy: seccomp, a container runtime, or an LSM)"
    return ""


def _child(plan: StagePlan, env: dict[str, str], cwds: Sequence[str],
           cmd: Sequence[str], argv0: Optional[str] = None) -> NoReturn:
    """PID 1 of the new PID namespace: build the stage, drop everything, run the command."""
    try:
        os.setsid()  # no controlling terminal for the job: no TIOCSTI into the caller's shell
        from . import userns_stage
        userns_stage.build(plan)
        drop_capabilities()
        # Not dumpable: the job (same uid) can't ptrace its init or read /proc/1/root, cwd.
        _sys.prctl(_sys.PR_SET_DUMPABLE, 0)
        _close_fds()
        job = os.fork()
        if job == 0:
            _exec_job(env, cwds, cmd, argv0)
    except PbsChrootError as e:
        _die(e.detail)
    except OSError as e:
        _die(f"can't set up the namespace: {e}")
    except BaseException as e:  # a forked child must never return into the caller's code
        _die(f"can't set up the namespace: {type(e).__name__}: {e}")
    os._exit(_wait_forwarding(job, reap_all=True))


def drop_capabilities() -> None:
    """no_new_privs, an empty bounding and ambient set, no capability left; checked."""
    _sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
    with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _sys.prctl(_sys.PR_CAPBSET_DROP, cap)
    _sys.prctl(_sys.PR_CAP_AMBIENT, _sys.PR_CAP_AMBIENT_CLEAR_ALL)
    _sys.capset_clear()
    with open("/proc/self/status", encoding="ascii") as f:
        left = [line.split()[0] for line in f
                if line.startswith(_CAPS) and int(line.split()[1], 16) != 0]
    if left or _sys.prctl(_sys.PR_GET_NO_NEW_PRIVS) != 1:
        raise PrivilegeError(f"capabilities left after the drop: {', '.join(left) or 'nnp'}")


def _close_fds() -> None:
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 2:
            try:
                os.close(int(name))
            except OSError:
                continue  # the listing's own descriptor


def _exec_job(env: dict[str, str], cwds: Sequence[str], argv: Sequence[str],
              argv0: Optional[str] = None) -> NoReturn:
    import errno
    for cwd in list(cwds) + ["/"]:
        try:
            os.chdir(cwd)
            break
        except OSError:
            continue
    for sig in range(1, signal.NSIG):
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                continue  # signals Python will not touch
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    os.umask(0o077)
    cmd = list(argv)
    try:
        os.execvpe(cmd[0], [argv0, *cmd[1:]] if argv0 else cmd, env)
    except OSError as e:
        code = 127 if e.errno in (errno.ENOENT, errno.ENOTDIR) else 126
        _die(f"can't run: {cmd[0]}: {e.strerror}", code)


def _die(msg: str, code: int = SETUP_FAILED) -> NoReturn:
    try:
        os.write(2, f"pbs-chroot: {msg}\n".encode("utf-8", "backslashreplace"))
    finally:
        os._exit(code)


def _wait_forwarding(pid: int, reap_all: bool = False) -> int:
    """Wait for ``pid``, passing SIGINT/SIGTERM/SIGHUP on; PID 1 also reaps orphans."""
    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, forward)
    while True:
        done, wstatus = os.waitpid(-1 if reap_all else pid, 0)
        if done == pid:
            code = os.waitstatus_to_exitcode(wstatus)
            return code if code >= 0 else 128 - code
