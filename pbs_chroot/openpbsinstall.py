"""`pbs-chroot install --openpbs`: the OpenPBS hook script, the shim and the qmgr commands.

Run as root by a site admin, on the server host and on every execution host
(the server ships the hook's text to the moms; the package, the config and
the shim must be at the same paths on every host). Writes two files:

    DIR/openpbs_hook.py    root 0644: what `qmgr import hook` reads (four hooks, one text)
    DIR/pbs-chroot-shim    root 0755: what execjob_launch puts first; runs as the user

and prints the qmgr commands (or runs them with --apply, on the server host).
"""
from __future__ import annotations

import os

from .errors import UserError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

__all__ = ["HOOKS", "render_hook", "render_shim", "qmgr_commands", "install"]

_MARKER = "from pbs_chroot.openpbs import hook"
# name: (events, order, fail_action). Ours run after OpenPBS's cgroups hook (order 100)
# where they use its cgroup (begin, launch), and before it deletes that cgroup
# (epilogue, end) so the accounting can still read it. fail_action offline_vnodes
# applies to execjob_begin and exechost_startup only (OpenPBS's hook guide), hence four.
HOOKS = {
    "pbs_chroot_submit": ("queuejob,modifyjob", 1, "none"),
    "pbs_chroot_begin": ("execjob_begin,exechost_startup", 200, "offline_vnodes"),
    "pbs_chroot_launch": ("execjob_launch,execjob_attach,exechost_periodic", 200, "none"),
    "pbs_chroot_end": ("execjob_epilogue,execjob_end", 50, "none"),
}
ALARM = 120  # seconds: a cold stage and a slow NSS fit (OpenPBS's default: 30)
SERVER_ALARM = 10  # queuejob/modifyjob hold up the server: a text check and a config read
FREQ = 300   # exechost_periodic: the reconciler every five minutes

_HOOK = '''"""pbs_chroot's OpenPBS hooks (imported as pbs_chroot_submit, _begin, _launch, _end).

Runs in pbs_python: queuejob/modifyjob inside the server, execjob_*/exechost_*
as root children of pbs_mom. `pbs-chroot install --openpbs` wrote the paths
below; the package directory was checked root-only then. All logic lives in
pbs_chroot.openpbs. If the package can't be imported here, the server lets
jobs through (the hosts check) and a host fails closed: offline, the job
requeued, never started unchecked.
"""
import sys

import pbs

CONFIG = "{config}"
SHIM = "{shim}"
SYSLOG = "{syslog}"  # until the config names its own (a refused config can't)
LIBDIR = "{libdir}"
if LIBDIR not in sys.path:
    sys.path.append(LIBDIR)

try:
    {marker}
except Exception as err:  # the package missing or broken on this host
    hook = None
    e = pbs.event()
    pbs.logmsg(pbs.LOG_ERROR, "pbs_chroot: can't import from %s: %r" % (LIBDIR, err))
    if e.type in (pbs.QUEUEJOB, pbs.MODIFYJOB):
        e.accept()
    try:
        vnode = e.vnode_list[pbs.get_local_nodename()]
        vnode.state = pbs.ND_OFFLINE
        vnode.comment = "pbs-chroot: can't import its package here, see the mom log"
    except Exception:
        pass
    if e.type in (pbs.EXECJOB_BEGIN, pbs.EXECJOB_LAUNCH):
        e.job.rerun()
        e.reject("pbs-chroot: a fault of this node (the admin is told); the job is requeued")

if hook is not None:
    hook(pbs, CONFIG, SHIM, SYSLOG)
'''

_SHIM = '''#!{python} -IS
"""pbs_chroot's shim for OpenPBS: execjob_launch puts it before the job's command.

Runs as the job user (never setuid): enters the job's stage in a user namespace
(pbs_chroot.userns_shim). Written by `pbs-chroot install --openpbs`.
"""
import sys

sys.path.append("{libdir}")

from pbs_chroot.shim import main  # noqa: E402

main(sys.argv[1:])
'''


def _plain(*values: str) -> None:
    for value in values:
        if not value.startswith("/") or not value.isprintable() or '"' in value \
                or "\\" in value:
            raise UserError(f"can't install: {value!r} must be an absolute, plain path")


def render_hook(config: str, shim: str, libdir: str, syslog: str = "/dev/log") -> str:
    """The text `qmgr import hook` reads (the same for the three hooks)."""
    _plain(config, shim, libdir, syslog)
    return _HOOK.format(config=config, shim=shim, syslog=syslog, libdir=libdir, marker=_MARKER)


def render_shim(python: str, libdir: str) -> str:
    _plain(python, libdir)
    return _SHIM.format(python=python, libdir=libdir)


# Enabled last to first: a job is never begun (staged, then run on the host) by a
# pbs_chroot_begin whose pbs_chroot_launch is not there yet.
ENABLE_ORDER = ("pbs_chroot_end", "pbs_chroot_launch", "pbs_chroot_submit", "pbs_chroot_begin")


def qmgr_commands(hook_file: str, resource: str) -> list[str]:
    """The qmgr -c arguments, in order. The resource has flag m: without it, OpenPBS does
    not send a custom resource to the moms (PP-848), and execjob_begin would see none.
    Every hook is made disabled and enabled only once all four are in place."""
    cmds = [f"create resource {resource} type=string,flag=m"]
    for name, (events, order, fail_action) in HOOKS.items():
        alarm = SERVER_ALARM if "queuejob" in events else ALARM
        cmds += [f"create hook {name}",
                 f"set hook {name} enabled = false",
                 f"set hook {name} event = \"{events}\"",
                 f"set hook {name} order = {order}",
                 f"set hook {name} alarm = {alarm}",
                 f"set hook {name} fail_action = {fail_action}"]
        if "exechost_periodic" in events:
            cmds.append(f"set hook {name} freq = {FREQ}")
        cmds.append(f"import hook {name} application/x-python default {hook_file}")
    cmds += [f"set hook {name} enabled = true" for name in ENABLE_ORDER]
    return cmds


def install(dest: str, config: str, python: str, syslog: str, resource: str,
            apply: bool, qmgr: str, libdir: Optional[str] = None) -> str:
    """Write the hook script and the shim into ``dest``; return the qmgr commands (run with
    ``apply``, through ``qmgr``) as the text to print."""
    from .admin import _check_importable, _write_root_file
    libdir = libdir or _check_importable(python)
    os.makedirs(dest, mode=0o755, exist_ok=True)
    from .paths import resolve_admin_path
    resolve_admin_path(dest)  # root's, all the way up: moms run what is here
    hook_file = os.path.join(dest, "openpbs_hook.py")
    shim = os.path.join(dest, "pbs-chroot-shim")
    _write_root_file(hook_file, render_hook(config, shim, libdir, syslog), 0o644)
    _write_root_file(shim, render_shim(python, libdir), 0o755)
    cmds = qmgr_commands(hook_file, resource)
    lines = [f"# Written: {hook_file} (the hooks' text) and {shim} (the job's shim, run "
             "as the user).",
             "# Every execution host needs the package, the config and these two files at "
             "the same paths.",
             f"# On the server host{' (done: --apply)' if apply else ''}:"]
    lines += [f"{qmgr} -c '{c}'" for c in cmds]
    lines.append(f"# Then check the resource: `{qmgr} -c 'list resource {resource}'` must say "
                 "type = string and flag = m (an older one without flag m never reaches the "
                 "moms).")
    if apply:
        _run_qmgr(qmgr, cmds)
        _check_resource(qmgr, resource)
    return "\n".join(lines) + "\n"


def _check_resource(qmgr: str, resource: str) -> None:
    """A resource of that name made before (by the site, or without flag m) is refused."""
    out = _qmgr(qmgr, f"list resource {resource}")
    settings = {k.strip(): v.strip() for k, _, v in
                (line.partition("=") for line in out.splitlines() if "=" in line)}
    if settings.get("type") != "string" or "m" not in settings.get("flag", ""):
        raise UserError(f"resource {resource} exists with type = {settings.get('type')!r}, "
                        f"flag = {settings.get('flag')!r}: it must be type = string with flag "
                        f"m (else the moms never see it); fix it with qmgr, or set "
                        f"image_resource to another name")


def _run_qmgr(qmgr: str, cmds: list[str]) -> None:
    for cmd in cmds:
        try:
            _qmgr(qmgr, cmd)
        except UserError as e:
            exists = "already exists" in e.detail or "Duplicate" in e.detail
            if not (cmd.startswith("create ") and exists):
                raise


def _qmgr(qmgr: str, cmd: str) -> str:
    import subprocess
    try:
        res = subprocess.run([qmgr, "-c", cmd], stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=60,
                             env={"PATH": "/bin:/usr/bin", "LC_ALL": "C"})
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"can't run {qmgr}: {e}") from e
    if res.returncode != 0:
        out = (res.stderr or res.stdout).strip()
        raise UserError(f"qmgr -c '{cmd}' failed ({res.returncode}): {out[:300]}")
    return res.stdout
