"""The hook server's clients: build starter/hook_client.c, install it under the hooks' names.

Run as root by the admin (``pbs-chroot install`` when the config sets hook_server), never
by the hooks. The client is compiled static with the site's paths baked in (the socket,
mom_priv, the syslog socket), as the Python hooks get theirs rendered in, and installed
root:root 0500 as mom_priv/prologue, epilogue and *.parallel; the Python hooks go beside
it as NAME.py: the client runs them when the server is down (hookd.py).
"""
from __future__ import annotations

import os
import subprocess
import tempfile

from .errors import UserError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

__all__ = ["SOURCE", "MARKER", "build", "kick_target", "prebuilt", "is_client", "python_path"]

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "starter", "hook_client.c")
MARKER = b"pbs_chroot hook client 1"
_CC = ("cc", "gcc")


def python_path(hook: str) -> str:
    """Where the Python hook goes beside the client ``hook`` (a path in mom_priv)."""
    return hook + ".py"


def build(socket_path: str, hook_dir: str, syslog: str,
          kick: Optional[tuple[str, str]] = None) -> bytes:
    """The client, compiled static with these paths; its bytes (UserError without a
    compiler and a static libc). kick: (mount point, controller) of the cgroup hierarchy
    the prologue's client starts the attach's RCU grace period in (kick_target)."""
    for value in (socket_path, hook_dir, syslog) + (kick[:1] if kick else ()):
        if not value.startswith("/") or not value.isprintable() or '"' in value \
                or "\\" in value:
            raise UserError(f"can't build the hook client: {value!r} must be an absolute, "
                            "plain path")
    flags = [f'-DSOCKET_PATH="{socket_path}"', f'-DHOOK_DIR="{hook_dir}"',
             f'-DSYSLOG_PATH="{syslog}"']
    if kick and (kick[1] == "" or kick[1].replace("_", "").isalnum()):
        flags += [f'-DKICK_MOUNT="{kick[0]}"', f'-DKICK_CTRL="{kick[1]}"']
    err = "no C compiler found"
    with tempfile.TemporaryDirectory(prefix="pbs_chroot-hookclient.") as tmp:
        out = os.path.join(tmp, "hook_client")
        for cc in _CC:
            try:
                res = subprocess.run([cc, "-static", "-Os", "-s", "-Wall", *flags, "-o", out,
                                      SOURCE], capture_output=True, text=True, timeout=120,
                                     env={"PATH": "/usr/local/bin:/usr/bin:/bin"})
            except FileNotFoundError:
                continue
            except (OSError, subprocess.TimeoutExpired) as e:
                err = str(e)
                break
            if res.returncode == 0 and os.path.exists(out):
                with open(out, "rb") as f:
                    return f.read()
            err = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else cc
        raise UserError(f"can't build the hook client ({err}): hook_server needs a C compiler "
                        "and a static libc (Debian: gcc libc6-dev; EL: gcc glibc-static), or "
                        "set hook_server = no")


def kick_target() -> Optional[tuple[str, str]]:
    """(mount point, controller; '' for v2) of a cgroup hierarchy of this node's: where the
    prologue's client writes itself into its own cgroup (hook_client.c, kick)."""
    from . import cgroups
    from .errors import CgroupError
    try:
        layout = cgroups.detect()
    except CgroupError:
        return None
    if layout.version == 2:
        return (layout.v2, "") if layout.v2 else None
    for ctrl in ("pids", *sorted(layout.v1)):
        if ctrl in layout.v1:
            return layout.v1[ctrl], ctrl
    return None


def prebuilt(starters: Optional[str], socket_path: str, syslog: str) -> Optional[bytes]:
    """The client in ``starters`` (the RPM's, built with the defaults), if it serves these
    paths: the default socket and /dev/log; else None (install compiles one)."""
    from .config import DEFAULT_HOOK_SERVER
    from .paths import resolve_admin_path
    path = os.path.join(starters or "", "hook_client")
    if not starters or not os.path.exists(path) or socket_path != DEFAULT_HOOK_SERVER \
            or syslog != "/dev/log":
        return None
    resolve_admin_path(path)  # root's all the way up: it runs as root for every job
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(b"\x7fELF") or MARKER not in data:
        raise UserError(f"can't install: {path} is not pbs_chroot's hook client")
    return data


def is_client(path: str) -> bool:
    """Whether ``path`` is a hook client we installed (install may replace it)."""
    try:
        with open(path, "rb") as f:
            data = f.read(4 << 20)
    except OSError:
        return False
    return data.startswith(b"\x7fELF") and MARKER in data
