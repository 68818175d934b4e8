"""Known doors in an image: ways a setuid program in reach of a job would let it in.

Run as root by the admin (`pbs-chroot image audit`, `build`, `deploy`), never
by the hooks. A job's own process keeps the image as its root, so a setuid
program it reaches — the image's own, or the host's through /proc/PID/root
of one of its processes outside the chroot — loads the image's ld.so and libc
and reads the image's shadow, PAM config, sudoers and fstab. no_new_privs
(the job starter, the shim) and the stage's locked shadow stop that; these
checks refuse the images that would open the door by themselves:

- an account with an empty password, or a uid-0 one with a well-known
  password (shadow, or passwd's own password field): with a host user of the
  same uid, su to an image account is su to that user;
- ``NOPASSWD`` or ``!authenticate`` in sudoers, the files it includes, or
  sudoers.d;
- PAM letting anyone through: ``pam_permit`` (or ``pam_wheel`` with
  ``trust``) as a ``sufficient`` auth line, or as a file's only one;
- ``user``, ``users``, ``owner`` or ``group`` among an fstab entry's options;
- a pbs_demux, which pbs_mom runs in the image without the job starter (the
  stage covers it; the audit says so).

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
_SUDO_INCLUDES = ("#include", "@include", "#includedir", "@includedir")
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
    doors = _passwords(root) + _sudoers(root) + _pam(root) + _fstab(root) + _demux(root)
    return doors, _loader_notes(root)


def _read(root: str, rel: str) -> str:
    """A regular file of the image, symlinks resolved inside it ('' if there is none).

    Looked at (O_PATH) before it is opened: a device node is never opened.
    """
    path = resolve_in_tree(root, rel)
    if path is None:
        return ""
    try:
        pfd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(pfd).st_mode):
            return ""
        fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return ""
    finally:
        os.close(pfd)
    with os.fdopen(fd, "rb") as f:
        return f.read(_MAX_BYTES).decode("utf-8", "replace")


def _listdir(root: str, rel: str) -> list[str]:
    path = resolve_in_tree(root, rel)
    if path is None or os.path.islink(path) or not os.path.isdir(path):
        return []
    return sorted(os.listdir(path))


def _passwords(root: str) -> list[str]:
    passwd = [line.split(":") for line in _read(root, "etc/passwd").splitlines()]
    admins = {f[0] for f in passwd if len(f) > 3 and f[2] == "0"} | {"root"}
    found = []
    shadow = [line.split(":") for line in _read(root, "etc/shadow").splitlines()]
    for where, entries in (("/etc/shadow", shadow), ("/etc/passwd", passwd)):
        for fields in entries:
            if len(fields) < 2 or not fields[0] or fields[0].startswith(("#", "+", "-")):
                continue
            admin = fields[0] in admins
            why = _weak(fields[1], where == "/etc/passwd", admin)
            if why:
                who = f"{fields[0]} (uid 0)" if admin else fields[0]
                found.append(f"{where}: {who} has {why}: a setuid su or login in reach of "
                             f"a job would make it {'root' if admin else 'that account'}; "
                             "lock it (passwd -l)")
    return found


def _weak(field: str, in_passwd: bool, admin: bool) -> str:
    """Why a stored password field lets anyone in ('' if it does not). The well-known
    passwords are tried on uid-0 accounts only (each try is a full crypt(3))."""
    if field == "":
        return "an empty password"
    if (in_passwd and field == "x") or field[0] in "!*" or not admin:
        return ""  # shadowed, or locked
    from . import _sys
    for word in WELL_KNOWN:
        if _sys.crypt(word, field) == field:
            return f"the well-known password {word!r}"
    return ""


def _sudoers(root: str) -> list[str]:
    """sudoers and what it includes (sudoers(5): #include/@include FILE,
    #includedir/@includedir DIR), the default sudoers.d too."""
    todo, found = ["etc/sudoers", "etc/sudoers.d/"], []
    seen: set[str] = set()
    while todo and len(seen) < 200:
        rel = todo.pop(0)
        if rel in seen:
            continue
        seen.add(rel)
        if rel.endswith("/"):
            todo += [rel + n for n in _listdir(root, rel) if "." not in n and
                     not n.endswith("~")]
            continue
        for n, line in enumerate(_read(root, rel).splitlines(), 1):
            words = line.split()
            if len(words) == 2 and words[0] in _SUDO_INCLUDES:
                target = words[1] if words[1].startswith("/") else \
                    os.path.join("/" + os.path.dirname(rel), words[1])
                todo.append(target.lstrip("/") + ("/" if "dir" in words[0] else ""))
                continue
            doors = [d for d in _SUDO_DOORS if d in line.split("#", 1)[0]]
            if doors:
                found.append(f"/{rel}:{n}: {', '.join(doors)}: a job that reaches a setuid "
                             "sudo gets root without a password")
    return found


def _pam(root: str) -> list[str]:
    """auth stacks a success of pam_permit (or pam_wheel's trust) ends: ``sufficient``, or
    the file's only auth line. (Debian's common-auth ends in ``required pam_permit`` after
    a ``requisite pam_deny`` that pam_unix must jump over: that is no door.)"""
    found = []
    for name in _listdir(root, "etc/pam.d"):
        lines = [(n, line.split("#", 1)[0].split())
                 for n, line in enumerate(_read(root, f"etc/pam.d/{name}").splitlines(), 1)]
        auth = [(n, w) for n, w in lines if len(w) >= 3 and w[0].lstrip("-") == "auth"]
        for n, words in auth:
            if words[1].startswith("["):
                continue  # [value=action ...]: jumps, not judged here
            module = os.path.basename(words[2])
            lets_in = module == "pam_permit.so" or (module == "pam_wheel.so"
                                                    and "trust" in words)
            if lets_in and (words[1] == "sufficient" or len(auth) == 1):
                found.append(f"/etc/pam.d/{name}:{n}: auth {words[1]} {module} lets a setuid "
                             f"{name} through without a password")
    return found


def _demux(root: str) -> list[str]:
    from .stage import DEMUX_PATHS
    return [f"{path}: pbs_mom runs it inside the image for a job on several nodes, without "
            "the job starter (the stage covers it with one that runs nothing; remove it)"
            for path in DEMUX_PATHS if resolve_in_tree(root, path) is not None]


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
