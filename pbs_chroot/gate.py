"""The gate: decide whether a job's PBS_O_ROOTDIR request is allowed.

Run as root by the prologue and the runner. Trusts the config (already
checked by config.load); trusts nothing in the job's variables. pbs_mom
chroots into the FIRST variable whose name merely starts with PBS_O_ROOTDIR,
so every such variable is checked, and all of them must name the same
allowlisted image, compared as text. No user-supplied path is ever resolved.
"""
from __future__ import annotations

import os

from .errors import SiteError, UserError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable, Optional

    from .config import Config, Image

__all__ = ["ROOTDIR", "check_request", "check_value", "may_use", "show"]

ROOTDIR = "PBS_O_ROOTDIR"
_SHOW_MAX = 120


def show(value: str) -> str:
    """A user value made safe for a one-line message: escaped and truncated."""
    text = value
    if not (value.isascii() and value.isprintable() and "\\" not in value):
        # (Plain printable ASCII is its own escape: the codec costs a job ~0.1 ms to load.)
        text = value.encode("unicode_escape", "backslashreplace").decode("ascii")
    return text if len(text) <= _SHOW_MAX else text[:_SHOW_MAX] + "..."


def check_request(entries: Iterable[tuple[str, str]], lossy: Iterable[str], cfg: Config,
                  user: str, queue: str) -> Optional[Image]:
    """The image a job asked for, if allowed; None if it asked for none; else UserError.

    ``entries`` are the job's (name, value) variables; ``lossy`` the names seen
    when Variable_List is split on every comma, as pbs_mom's own job file is.
    Every refusal names what the job may use instead.
    """
    try:
        return _check_request(list(entries), list(lossy), cfg, user, queue)
    except UserError as e:
        raise UserError(f"{e.user_msg}; allowed: {_allowed(cfg, user, queue)}") from None


def _check_request(entries: list[tuple[str, str]], lossy: list[str], cfg: Config, user: str,
                   queue: str) -> Optional[Image]:
    found = [(n, v) for n, v in entries if n.startswith(ROOTDIR)]
    hidden = [n for n in lossy if n.startswith(ROOTDIR)]
    if len(hidden) != len(found):
        # A PBS_O_ROOTDIR hidden inside another variable's value: harmless to
        # the server's parser, but not to one that splits on every comma.
        raise UserError(f"can't use image: {ROOTDIR} appears inside the value of another "
                        "variable; pass it as a variable of its own")
    if not found:
        return None
    for name, _ in found:
        if name != ROOTDIR:
            raise UserError(f"can't use image: variable {show(name)} is not allowed "
                            f"(the image is chosen with {ROOTDIR} or qsub -D only)")
    values = {v for _, v in found}
    if len(values) > 1:
        shown = ", ".join(sorted(show(v) for v in values))
        raise UserError(f"can't use image: {ROOTDIR} is given {len(found)} times with "
                        f"different values ({shown}); give it once")
    return _check_value(found[0][1], cfg, user, queue)


def check_value(value: str, cfg: Config, user: str, queue: Optional[str], name: str = ROOTDIR,
                nss: bool = True) -> Image:
    """The allowlisted Image equal to ``value`` as text and usable by this user and queue.

    ``name``: how the user asked for it, for the message (OpenPBS: ``-l image``).
    ``queue`` None: not known yet (a routing queue): its rule is left to the node.
    ``nss`` False: no user or group lookup (inside a batch server): an image limited to
    groups the user is not listed by name in is left to the node, which looks them up.
    """
    try:
        return _check_value(value, cfg, user, queue, name, nss)
    except UserError as e:
        raise UserError(f"{e.user_msg}; allowed: {_allowed(cfg, user, queue, nss)}") from None


def _check_value(value: str, cfg: Config, user: str, queue: Optional[str],
                 name: str = ROOTDIR, nss: bool = True) -> Image:
    problem = _shape_problem(value)
    if problem:
        raise UserError(f"can't use image {name}={show(value)}: {problem}")
    image = cfg.image(value)
    if image is None:
        raise UserError(f"can't use image {name}={show(value)}: not an image of this site")
    reason = may_use(image, user, queue, nss)
    if reason:
        raise UserError(f"can't use image {value}: {reason}")
    return image


def _shape_problem(value: str) -> str:
    if not value:
        return "the value is empty"
    if not value.isprintable():
        return "the value contains a control character"
    if not value.startswith("/"):
        return "not an absolute path"
    if ".." in value.split("/"):
        return "'..' is not allowed"
    return ""


def may_use(image: Image, user: str, queue: Optional[str], nss: bool = True) -> str:
    """Why ``user`` in ``queue`` may not use ``image`` ('' if they may, or if ``queue`` is
    None or ``nss`` False and only the unknown part could say no: see check_value)."""
    if image.queues and queue is not None and queue not in image.queues:
        return f"not allowed in queue {show(queue)}"
    if not image.users and not image.groups:
        return ""
    if user in image.users:
        return ""
    if image.groups and (not nss or image.groups & _group_names(user)):
        return ""
    return f"not allowed for user {show(user)}"


def _group_names(user: str) -> set[str]:
    import grp  # only for images limited to groups
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise SiteError(f"job owner {user!r} is not known on this node") from None
    names = set()
    for gid in os.getgrouplist(user, pw.pw_gid):
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue
    return names


def _allowed(cfg: Config, user: str, queue: Optional[str], nss: bool = True) -> str:
    usable = [i.path for i in cfg.images if not _safe_may_use(i, user, queue, nss)]
    return ", ".join(usable) if usable else "none for this job"


def _safe_may_use(image: Image, user: str, queue: Optional[str], nss: bool = True) -> str:
    try:
        return may_use(image, user, queue, nss)
    except SiteError as e:
        return e.detail
