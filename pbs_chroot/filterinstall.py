"""``pbs-chroot install --submit-filter PATH``: the submit filter's script and torque.cfg line.

Run by the admin, as root, on a submit host. Writes PATH (root:root 0755:
qsub runs it as each submitting user) with the interpreter, config path and
package directory baked in, as the hooks are; then sets ``SUBMITFILTER PATH``
in PBS_HOME/torque.cfg when --pbs-home is given, or prints the line to add.
"""
from __future__ import annotations

import os

from .errors import UserError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

__all__ = ["render_filter", "install_filter", "read_head", "DEFAULT_FILTER_PATH", "MARKER"]

DEFAULT_FILTER_PATH = "/usr/local/sbin/pbs-chroot-submit-filter"
MARKER = "from pbs_chroot.submitfilter import main"
_TEMPLATE = '''#!{python} -IS
"""Torque submit filter (torque.cfg: SUBMITFILTER {path}): pbs_chroot's gate at qsub time.

qsub runs this as the submitting user with its own arguments and the job
script on stdin. `pbs-chroot install --submit-filter` wrote it. All logic
lives in pbs_chroot.submitfilter.
"""
import os
import sys

CONFIG = "{config}"
sys.path.append("{libdir}")

{marker}  # noqa: E402

rc = main(sys.argv, CONFIG)
try:  # os._exit: no interpreter teardown, so flush first
    sys.stdout.flush()
    sys.stderr.flush()
finally:
    os._exit(rc)
'''


def render_filter(path: str, python: str, config: str, libdir: str) -> str:
    """The text of the installed submit filter."""
    for value in (path, python, config, libdir):
        if not value.startswith("/") or not value.isprintable() or '"' in value \
                or "\\" in value or " " in value:
            raise UserError(f"can't install: {value!r} must be an absolute, plain path")
    return _TEMPLATE.format(python=python, path=path, config=config, libdir=libdir,
                            marker=MARKER)


def install_filter(path: str, python: str, config: str, libdir: str, force: bool,
                   pbs_home: Optional[str]) -> str:
    """Write the filter at ``path``; set it in torque.cfg (or say how). Returns what to tell."""
    text = render_filter(path, python, config, libdir)
    if os.path.lexists(path) and not force and MARKER not in read_head(path):
        raise UserError(f"can't install: {path} exists and is not ours; move it away or "
                        "use --force")
    tmp = f"{path}.new.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o755)
    with os.fdopen(fd, "w") as f:
        os.fchown(f.fileno(), 0, 0)
        os.fchmod(f.fileno(), 0o755)  # qsub runs it as every submitting user
        f.write(text)
    os.replace(tmp, path)
    line = f"SUBMITFILTER {path}"
    if not pbs_home:
        return (f"wrote {path}; add this line to PBS_HOME/torque.cfg on each submit host "
                f"(or rerun with --pbs-home):\n{line}\n")
    cfg = os.path.join(pbs_home, "torque.cfg")
    _set_line(cfg, "SUBMITFILTER", line)
    return f"wrote {path}; {cfg}: {line}\n"


def read_head(path: str) -> str:
    """The start of a file we may be about to replace ('' if unreadable): is it ours?"""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(4096)
    except OSError:
        return ""


def _set_line(cfg: str, key: str, line: str) -> None:
    """Replace the ``key`` line of a torque.cfg (or add one), atomically."""
    try:
        with open(cfg, encoding="utf-8") as f:
            lines = f.read().splitlines()
        st = os.stat(cfg)
        mode = st.st_mode & 0o7777
    except FileNotFoundError:
        lines, mode = [], 0o644
    kept = [x for x in lines if x.split()[:1] != [key]]
    tmp = f"{cfg}.new.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), mode)
        f.write("\n".join(kept + [line]) + "\n")
    os.replace(tmp, cfg)
