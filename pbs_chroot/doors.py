"""Known doors in an image: ways a setuid program in reach of a job would let it in.

Run as root by the admin (`pbs-chroot image audit`, `build`, `deploy`), never
by the hooks. A job's own process keeps the image as its root, so a setuid
program it reaches — the image's own, or the host's through /proc/PID/root
of one of its processes outside the chroot — loads the image's ld.so and libc
and reads the image's shadow, PAM config, sudoers and fstab. no_new_privs
(the job starter, the shim) and the stage's locked shadow stop that; these
checks refuse the images that would open the door by themselves:

- a uid-0 account with an empty or well-known password (shadow, or passwd's
  own password field);
- ``NOPASSWD`` or ``!authenticate`` in sudoers or sudoers.d;
- ``user``, ``users``, ``owner`` or ``group`` among an fstab entry's options.

It also names the image's ld.so and libc, and warns on glibc versions with
known setuid-loader flaws (defence in depth: no_new_privs is the defence).
Trusts nothing in the image: symlinks are resolved inside it, never on the host.
"""
from __future__ import annotations

import os
import re
import stat

from .paths import resolve_in_tree

__all__ = ["WELL_KNOWN", "inspect", "glibc_version", "loader_flaws"]

# Passwords an image built by hand or from a vendor template tends to carry.
WELL_KNOWN = ("root", "toor", "password", "passw0rd", "changeme", "admin", "123456",
              "12345678", "letmein", "centos", "redhat", "fedora", "debian", "ubuntu", "linux",
              "vagrant", "live", "test", "pbs", "torque")
_SUDO_DOORS = ("NOPASSWD", "!authenticate")
_FSTAB_DOORS = ("user", "users", "owner", "group")
_MAX_BYTES = 4 << 20
_LOADERS = ("lib64/ld-linux-x86-64.so.2", "lib/ld-linux-x86-64.so.2", "lib/ld-linux.so.2",
            "lib/ld-linux-aarch64.so.1", "lib64/ld64.so.2", "lib/ld-musl-x86_64.so.1",
            "lib/ld-musl-aarch64.so.1")
_LIBCS = ("lib/x86_64-linux-gnu/libc.so.6", "usr/lib/x86_64-linux-gnu/libc.so.6",
          "lib64/libc.so.6", "usr/lib64/libc.so.6", "lib/aarch64-linux-gnu/libc.so.6",
          "usr/lib/aarch64-linux-gnu/libc.so.6", "lib/i386-linux-gnu/libc.so.6",
          "lib/libc.so.6")
# (first fixed version, what): glibc's setuid-loader flaws that a job could use
# through a setuid program, by the upstream release that fixed them.
_FLAWS = (
    ((2, 13), (0, 0), "CVE-2010-3847 ($ORIGIN in LD_AUDIT) and CVE-2010-3856 (LD_AUDIT)"),
    ((2, 26), (0, 0), "CVE-2017-1000366 (LD_LIBRARY_PATH stack clash)"),
    ((2, 39), (2, 34), "CVE-2023-4911 (GLIBC_TUNABLES, 'Looney Tunables')"),
)


def inspect(root: str) -> tuple[list[str], list[str]]:
    """(doors, notes) of the image at ``root``: doors refuse it, notes are listed."""
    doors = _passwords(root) + _sudoers(root) + _fstab(root)
    return doors, _loader_notes(root)


def _read(root: str, rel: str) -> str:
    """A regular file of the image, symlinks resolved inside it ('' if there is none)."""
    path = resolve_in_tree(root, rel)
    if path is None:
        return ""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        return f.read(_MAX_BYTES).decode("utf-8", "replace")


def _passwords(root: str) -> list[str]:
    passwd = [line.split(":") for line in _read(root, "etc/passwd").splitlines()]
    admins = {f[0] for f in passwd if len(f) > 3 and f[2] == "0"} | {"root"}
    found = []
    shadow = [line.split(":") for line in _read(root, "etc/shadow").splitlines()]
    for where, entries in (("/etc/shadow", shadow), ("/etc/passwd", passwd)):
        for fields in entries:
            if len(fields) < 2 or fields[0] not in admins:
                continue
            why = _weak(fields[1], where == "/etc/passwd")
            if why:
                found.append(f"{where}: {fields[0]} (uid 0) has {why}: a setuid su or login "
                             "in reach of a job would give root; lock it (passwd -l)")
    return found


def _weak(field: str, in_passwd: bool) -> str:
    """Why a stored password field lets anyone in ('' if it does not)."""
    if field == "":
        return "an empty password"
    if (in_passwd and field == "x") or field[0] in "!*":
        return ""  # shadowed, or locked
    from . import _sys
    for word in WELL_KNOWN:
        if _sys.crypt(word, field) == field:
            return f"the well-known password {word!r}"
    return ""


def _sudoers(root: str) -> list[str]:
    files = ["etc/sudoers"]
    d = resolve_in_tree(root, "etc/sudoers.d")
    if d is not None and os.path.isdir(d) and not os.path.islink(d):
        files += [f"etc/sudoers.d/{n}" for n in sorted(os.listdir(d))]
    found = []
    for rel in files:
        for n, line in enumerate(_read(root, rel).splitlines(), 1):
            text = line.split("#", 1)[0]
            doors = [d for d in _SUDO_DOORS if d in text]
            if doors:
                found.append(f"/{rel}:{n}: {', '.join(doors)}: a job that reaches a setuid "
                             "sudo gets root without a password")
    return found


def _fstab(root: str) -> list[str]:
    found = []
    for n, line in enumerate(_read(root, "etc/fstab").splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        opts = fields[3].split(",") if len(fields) > 3 else []
        doors = [o for o in opts if o in _FSTAB_DOORS]
        if doors:
            found.append(f"/etc/fstab:{n}: option {', '.join(doors)} lets users mount "
                         f"{fields[0]} on {fields[1]} through a setuid mount")
    return found


def glibc_version(root: str) -> tuple[str, tuple[int, int]]:
    """The image's libc path and its glibc version ((0, 0) if unknown or not glibc)."""
    for rel in _LIBCS:
        path = resolve_in_tree(root, rel)
        if path is None:
            continue
        m = re.search(r"libc-(\d+)\.(\d+)", os.path.basename(path))
        if m is None:
            m = re.search(r"GNU C Library[^\n]*? version (\d+)\.(\d+)", _read(root, rel))
        return "/" + rel, (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return "", (0, 0)


def loader_flaws(version: tuple[int, int]) -> list[str]:
    """Known setuid-loader flaws of a glibc version, by upstream fix."""
    if version == (0, 0):
        return []
    return [what for fixed, since, what in _FLAWS if since <= version < fixed]


def _loader_notes(root: str) -> list[str]:
    loaders = []
    for rel in _LOADERS:
        path = resolve_in_tree(root, rel)
        if path is not None:
            real = "/" + os.path.relpath(path, root)
            loaders.append(f"/{rel}" + (f" -> {real}" if real != f"/{rel}" else ""))
    libc, version = glibc_version(root)
    notes = [f"ld.so: {', '.join(loaders) or 'none (static binaries only?)'}; libc: "
             + (f"{libc}, glibc {version[0]}.{version[1]}" if version != (0, 0)
                else libc or "none found")]
    flaws = loader_flaws(version)
    if flaws:
        notes.append(f"warning: glibc {version[0]}.{version[1]} has known setuid-loader flaws "
                     f"({'; '.join(flaws)}) unless the distribution patched them: no_new_privs "
                     "and the nosuid stage keep them out of reach, rebuild when you can")
    return notes
