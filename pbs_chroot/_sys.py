"""Raw Linux system calls that the os module lacks: mount, umount2, prctl, unshare, ptrace,
pivot_root, capset, openat2.

The only module that imports ctypes. Every wrapper raises
OSError(errno, strerror, path) on failure. Run as root by the hooks, the
runner and the shim, and as the job user by the unprivileged mode (userns.py);
trusts its callers to pass validated paths.
"""
from __future__ import annotations

import ctypes
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

__all__ = [
    "MS_RDONLY", "MS_NOSUID", "MS_NODEV", "MS_NOEXEC", "MS_REMOUNT", "MS_BIND",
    "MS_REC", "MS_PRIVATE", "MS_SLAVE", "MS_SHARED", "MNT_DETACH", "UMOUNT_NOFOLLOW",
    "CLONE_NEWNS", "CLONE_NEWUSER", "CLONE_NEWPID", "PR_SET_NO_NEW_PRIVS",
    "PR_GET_NO_NEW_PRIVS", "PR_CAPBSET_DROP", "PR_SET_DUMPABLE", "PR_CAP_AMBIENT",
    "PR_CAP_AMBIENT_CLEAR_ALL",
    "MS_NOATIME", "MS_NODIRATIME", "MS_RELATIME", "MS_STRICTATIME",
    "PTRACE_SEIZE", "PTRACE_DETACH", "PTRACE_INTERRUPT", "PTRACE_O_TRACEEXEC",
    "PTRACE_EVENT_EXEC", "PTRACE_EVENT_STOP", "WALL",
    "RESOLVE_NO_XDEV",
    "mount", "umount2", "prctl", "unshare", "ptrace", "crypt", "pivot_root", "capset_clear",
    "openat2",
]

# <sys/mount.h>
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8
# <sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
# <linux/prctl.h>
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAPBSET_DROP = 24
PR_SET_DUMPABLE = 4
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# pivot_root(2) has no glibc wrapper: syscall(2) numbers per architecture.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217,
                   "riscv64": 41}
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# openat2(2) (Linux >= 5.6): the same number on every architecture above.
_SYS_OPENAT2 = 437
_AT_FDCWD = -100
RESOLVE_NO_XDEV = 0x01
# <sys/ptrace.h>, <sys/wait.h>
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_O_TRACEEXEC = 0x10
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_STOP = 128
WALL = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                        ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong, ctypes.c_ulong]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_libcrypt: Optional[ctypes.CDLL] = None
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long


def _fail(path: Optional[str]) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, os.strerror(err), path)


def _b(s: Optional[str]) -> Optional[bytes]:
    return None if s is None else os.fsencode(s)


def mount(source: Optional[str], target: str, fstype: Optional[str], flags: int,
          data: Optional[str] = None) -> None:
    """mount(2). ``target`` may be /proc/self/fd/N of an O_PATH descriptor."""
    if _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        raise _fail(target)


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2): unmount the topmost mount at ``target``."""
    if _libc.umount2(_b(target), flags) != 0:
        raise _fail(target)


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    """prctl(2) with up to two arguments (PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT ...)."""
    ret = int(_libc.prctl(option, arg2, arg3, 0, 0))
    if ret < 0:
        raise _fail(None)
    return ret


def unshare(flags: int) -> None:
    """unshare(2): a private mount namespace (tests, selftest), or a user namespace."""
    if _libc.unshare(flags) != 0:
        raise _fail(None)


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2); ``pivot_root(".", ".")`` stacks the old root on the new one."""
    nr = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise OSError(38, os.strerror(38), "pivot_root")  # ENOSYS: unknown architecture
    if _libc.syscall(nr, _b(new_root), _b(put_old)) != 0:
        raise _fail(new_root)


def openat2(path: str, flags: int, resolve: int) -> int:
    """openat2(2) relative to the working directory: a new fd, or OSError (ENOSYS on a
    kernel without it; EXDEV when RESOLVE_NO_XDEV met a mount on the way)."""
    how = (ctypes.c_uint64 * 3)(flags, 0, resolve)  # struct open_how: flags, mode, resolve
    fd = int(_libc.syscall(_SYS_OPENAT2, _AT_FDCWD, _b(path), ctypes.byref(how),
                           ctypes.c_size_t(ctypes.sizeof(how))))
    if fd < 0:
        raise _fail(path)
    return fd


def capset_clear() -> None:
    """capset(2): empty this thread's effective, permitted and inheritable sets."""
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two __user_cap_data_struct, all zero
    if _libc.capset(ctypes.byref(header), ctypes.byref(data)) != 0:
        raise _fail(None)


def crypt(key: str, setting: str) -> Optional[str]:
    """crypt(3) of libcrypt (libxcrypt): ``key`` hashed with the method and salt of
    ``setting`` (a whole stored hash will do); None where libcrypt is missing or the
    method unknown. Used by the image audit only: it loads libcrypt on first use."""
    import ctypes.util
    global _libcrypt
    if _libcrypt is None:
        name = ctypes.util.find_library("crypt")
        if name is None:
            return None
        _libcrypt = ctypes.CDLL(name, use_errno=True)
        _libcrypt.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        _libcrypt.crypt.restype = ctypes.c_char_p
    out = _libcrypt.crypt(key.encode(), setting.encode())
    if not out or out.startswith(b"*"):  # libxcrypt's failure token: "*0" / "*1"
        return None
    return os.fsdecode(out)


def ptrace(request: int, pid: int, data: int = 0) -> None:
    """ptrace(2) for the requests that return 0 on success (SEIZE, INTERRUPT, DETACH)."""
    if _libc.ptrace(request, pid, None, ctypes.c_void_p(data)) == -1:
        raise _fail(None)
