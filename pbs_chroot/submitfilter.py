"""Torque's submit filter (torque.cfg ``SUBMITFILTER``): refuse at qsub what the prologue would.

qsub runs it as the submitting user, in qsub's directory, with qsub's own
arguments as argv[1:] and the job script on stdin; the script must come back
on stdout, byte for byte; a non-zero exit with a message on stderr rejects
the submission, and the user sees the message (fixtures/torque-6.1/submitfilter).

A convenience, not the boundary: the prologue keeps every check. So it only
rejects what the prologue would refuse, with the same gate code and the
same line; a job that asks for no image is passed through before the config
is even read (a broken config never blocks it); and when the filter can't
decide (the config unreadable here, an unexpected error), it passes the
job and says why on stderr. The job's shell is looked for in the image where
the image is visible from this host (e.g. CVMFS); elsewhere only the text checks run.
Trusts nothing it reads; runs with the user's rights only.
"""
from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Mapping, Sequence

    from .config import Config, Image
    from .qsubopts import Request

__all__ = ["main", "check"]


def check(argv: Sequence[str], script: bytes, environ: Mapping[str, str],
          config_path: str) -> str:
    """The refusal line for this submission ('' to let it through)."""
    from . import qsubopts

    req = qsubopts.parse(argv, script, environ)
    variables = qsubopts.variable_list(req, environ)
    if not any(qsubopts.ROOTDIR in n for n, _ in variables) and \
            not any(qsubopts.ROOTDIR in v for _, v in variables):
        return ""  # asks for no image: never rejected, the config never read
    from . import config as config_mod
    from . import gate, jobinfo
    from .errors import PbsChrootError, UserError

    cfg = config_mod.load(config_path)
    user = _user()
    raw = ",".join(f"{n}={v}".replace("\\", "\\\\").replace(",", "\\,") for n, v in variables)
    queue = (req.last("q") or "").partition("@")[0]
    try:
        image = gate.check_request(variables, jobinfo.lossy_names(raw), cfg, user,
                                   queue or _assumed_queue(cfg, variables))
        if image is not None:
            _check_shell(cfg, image, req, user)
    except UserError as e:
        return f"pbs-chroot: {e.user_msg}"
    except PbsChrootError:
        raise
    return ""


def _assumed_queue(cfg: Config, variables: list[tuple[str, str]]) -> str:
    """No -q: the server's default queue is not known here; the prologue checks queues."""
    for _, value in variables:
        img = cfg.image(value)
        if img is not None and img.queues:
            return sorted(img.queues)[0]
    return ""


def _user() -> str:
    import pwd
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _check_shell(cfg: Config, image: Image, req: Request, user: str) -> None:
    import pwd

    from . import shells
    from .errors import UserError
    given = req.last("S") or ""
    # The execution host is not known yet: only an entry without @host is sure to apply.
    shell = shells.pick_shell(",".join(e for e in given.split(",") if "@" not in e), "")
    if given and not shell:
        return  # only per-host shells: pbs_mom picks by a host we don't know
    if not shell:
        try:
            shell = pwd.getpwuid(os.getuid()).pw_shell or "/bin/sh"
        except KeyError:
            return
    binds = [b.target for b in cfg.binds] + ([cfg.tmpdir] if cfg.tmpdir else [])
    try:
        problem = shells.shell_problem(image.path, shell, binds)
        hint = not shells.shell_problem(image.path, shells.SHELL_HINT)
    except OSError:
        return  # the image is not visible from here (or not to this user): text checks only
    if problem and not (problem == "is not in the image" and not _sees_image(image.path)):
        raise UserError(shells.refusal(image.path, shell, problem, hint))


def _sees_image(root: str) -> bool:
    """Whether this user sees the image's tree (its /bin/sh, which every image has)."""
    from . import shells
    try:
        return not shells.shell_problem(root, shells.SHELL_HINT)
    except OSError:
        return False


def main(argv: Sequence[str], config_path: str = "") -> int:
    """Entry point: argv as qsub gives it (argv[0] the filter); the script on stdin."""
    from . import config as config_mod
    script = sys.stdin.buffer.read()
    msg = ""
    try:
        msg = check(argv[1:], script, os.environ, config_path or config_mod.DEFAULT_PATH)
    except Exception as e:  # never block a submission on the filter's own fault
        _note(f"pbs-chroot: submit filter could not check this job ({_what(e)}); "
              "the node will check it when the job starts")
    if msg:
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()
        return 1
    out = sys.stdout.buffer
    out.write(script)
    out.flush()
    return 0


def _what(e: BaseException) -> str:
    from .errors import PbsChrootError
    return e.detail if isinstance(e, PbsChrootError) else f"{type(e).__name__}: {e}"


def _note(text: str) -> None:
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except OSError:
        pass
