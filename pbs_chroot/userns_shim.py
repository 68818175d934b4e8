"""The shim of batch systems that start jobs as the user: enter the job's root-prepared stage.

Run as the job user (pbs-chroot-shim started without root; never setuid),
by a batch system's launch hook that prepends it to the job's argv (OpenPBS:
execjob_launch sets ``argv = ["pbs-chroot-shim", "--", *argv]`` and
``progname`` to the shim; the mom then becomes the user and execs it).
Which job it belongs to comes from its cgroup, which root chose (the user
cannot move a process into a root-owned cgroup), never from the
environment; the stage comes from that job's record in the entry directory,
which only root writes, and must name this user; the stage's entry lets in
only users with a job in it (entry.py). It gains nothing the user did not
have: a user namespace of its own, no capability after exec.

    pbs-chroot-shim [--config PATH] [--login] -- CMD [ARG...]

``--login``: run CMD as pbs_mom runs a job's shell, with argv[0] "-" + its base
name (OpenPBS replaces the shim's own argv[0] that way, and keeps the rest).

Exit codes as the root shim's: 125 its own setup failed, 126/127 the command
could not be run; otherwise the command's status (128+N: killed by signal N).
"""
from __future__ import annotations

import os
import sys

from .errors import PbsChrootError, UserError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn, Sequence

    from .config import Config

__all__ = ["main", "job_of"]

SETUP_FAILED = 125


def main(argv: Sequence[str]) -> NoReturn:
    """Entry point of ``pbs-chroot-shim`` when started without root."""
    try:
        code = _run(list(argv))
    except PbsChrootError as e:
        _die(e.detail)
    except OSError as e:
        _die(f"can't enter the job's stage: {e}")
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _run(args: list[str]) -> int:
    from . import config as config_mod
    from . import entry, userns
    from .userns_stage import StagePlan
    path = os.environ.get("PBS_CHROOT_CONFIG", config_mod.DEFAULT_PATH)
    if args[:1] == ["--config"] and len(args) > 1:
        path, args = args[1], args[2:]
    login = args[:1] == ["--login"]  # CMD as a login shell: argv[0] "-" + its base name
    if login:
        args = args[1:]
    if args[:1] != ["--"] or len(args) < 2:
        raise UserError("usage: pbs-chroot-shim [--config PATH] [--login] -- CMD [ARG...]")
    problem = userns.userns_problem()  # before anything is set up
    if problem:
        raise UserError(problem)
    cfg = config_mod.load(path)
    if not cfg.entry_dir:
        raise UserError("can't enter the job's stage: entry_dir is not set in the config")
    import pwd
    pw = pwd.getpwuid(os.getuid())
    with open("/proc/self/cgroup", encoding="utf-8") as f:
        job_id = job_of(cfg, f.read())
    rec = entry.lookup(cfg.entry_dir, job_id)
    if rec is None or rec.user != pw.pw_name:
        raise UserError(f"can't enter the stage of job {job_id}: it has none of yours on this "
                        "node (not in an image, or not started yet)")
    fd = os.open(rec.root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    plan = StagePlan(rec.root, fd, cfg, cfg.identity_of(rec.image), pw.pw_name, False, True)
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = pw.pw_dir
    # The job's own environment, as the batch system made it: no privilege boundary is
    # crossed here (the shim is the user's, not setuid), so nothing to clean.
    argv0 = "-" + os.path.basename(args[1]) if login else None
    return userns.enter(plan, dict(os.environ), [cwd, pw.pw_dir], args[1:], argv0)


def job_of(cfg: Config, proc_cgroup: str) -> str:
    """The job id of the process whose /proc/PID/cgroup is ``proc_cgroup``: the name below
    our cgroup parent (or Torque's own) in every hierarchy that has one, all the same."""
    from .state import is_job_id
    found = set()
    for line in proc_cgroup.splitlines():
        path = line.split(":", 2)[-1]
        for parent in (cfg.cgroup_parent, cfg.torque_cgroup_parent):
            prefix = f"/{parent}/"
            if path.startswith(prefix):
                name = path[len(prefix):].split("/")[0]
                if is_job_id(name):
                    found.add(name)
    if len(found) != 1:
        raise UserError("can't tell which job this is: the process is in "
                        f"{'no' if not found else 'more than one'} job cgroup")
    return found.pop()


def _die(msg: str) -> NoReturn:
    try:
        os.write(2, f"pbs-chroot-shim: {msg}\n".encode("utf-8", "backslashreplace"))
    finally:
        os._exit(SETUP_FAILED)
