"""A deliberately lax image, as an outside review built one: the doors a job could open with
a setuid program it reaches.

The BusyBox image plus, at the host's paths, what the host's own setuid ``su``
needs when a job runs it through /proc/PID/root of one of its processes
outside the chroot: it then loads the IMAGE's ld.so, libc and PAM, and reads
the image's shadow and PAM config. So the image has:

- the host's ld.so, libc and the libraries of su, bash and the PAM modules;
- an empty root password in /etc/shadow and ``nullok`` in /etc/pam.d/su;
- ``NOPASSWD: ALL`` in /etc/sudoers, and a ``user`` mount in /etc/fstab.

Without no_new_privs and the locked shadow, ``su root -c 'id -u'`` from such
a job prints 0 (the tests show it, as their control).
"""
import os
import shutil
import subprocess
from pathlib import Path

SU = "/usr/bin/su"
PAM_DIR = "/lib/x86_64-linux-gnu/security"
PAM_MODULES = ("pam_rootok.so", "pam_unix.so", "pam_permit.so", "pam_deny.so")
PAM_SU = """\
auth       sufficient pam_rootok.so
auth       sufficient pam_unix.so nullok
auth       required   pam_deny.so
account    sufficient pam_permit.so
session    sufficient pam_permit.so
"""


def _libraries(binary: str) -> set:
    """The shared objects ``binary`` loads (ldd), and its ELF interpreter."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        words = line.split()
        path = words[2] if "=>" in words and len(words) > 2 else words[0]
        if path.startswith("/"):
            found.add(path)
    return found


def _copy(src: str, image: Path) -> None:
    dest = image / src.lstrip("/")
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)  # the content, at the host's path (not its symlink)
    shutil.copymode(src, dest)
    os.chmod(dest, os.stat(dest).st_mode & ~0o6000)  # none of them setuid in the image


def build_lax_image(busybox_version: Path, dest: Path) -> Path:
    """Copy the BusyBox image to ``dest`` and open the doors described above."""
    if not os.access(SU, os.X_OK) or not os.stat(SU).st_mode & 0o4000:
        raise RuntimeError(f"{SU} is not a setuid program here (util-linux): the probe needs it")
    subprocess.run(["cp", "-a", str(busybox_version), str(dest)], check=True)
    needed = _libraries(SU) | _libraries("/bin/bash")
    for module in PAM_MODULES:
        needed |= _libraries(f"{PAM_DIR}/{module}") | {f"{PAM_DIR}/{module}"}
    for path in sorted(needed):
        _copy(path, dest)
    if (dest / "bin" / "bash").is_symlink():
        (dest / "bin" / "bash").unlink()  # a BusyBox applet link, if it has one
    _copy("/bin/bash", dest)  # root's login shell in the host's passwd
    etc = dest / "etc"
    (etc / "pam.d").mkdir(exist_ok=True)
    (etc / "pam.d" / "su").write_text(PAM_SU)
    (etc / "pam.d" / "other").write_text("auth required pam_deny.so\n")
    (etc / "shadow").write_text("root::19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n")
    os.chmod(etc / "shadow", 0o640)
    (etc / "sudoers").write_text("root ALL=(ALL) ALL\nALL ALL=(ALL) NOPASSWD: ALL\n")
    os.chmod(etc / "sudoers", 0o440)
    (etc / "fstab").write_text("/dev/sdb1 /mnt/usb vfat noauto,user 0 0\n")
    for path in [dest, *dest.rglob("*")]:
        os.lchown(path, 0, 0)
    return dest
