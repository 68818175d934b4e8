"""Who is who inside a stage: generated /etc/passwd and /etc/group for the image.

Run as root by the hooks and the runner, under the node lock (stage.py). An
old glibc inside an image cannot talk to the host's LDAP/SSSD, and the host's
own files lack those users and hold the host's system accounts, not the
image's. So each stage gets files of its own, in STATE_DIR/stages/KEY/:
the image's system entries (ids below the image's UID_MIN/GID_MIN from its
login.defs, plus nobody/nogroup and up), snapshotted from the image before
the stage is mounted, merged with the host's NSS entries (getpwnam,
getgrouplist, getgrgid: LDAP/SSSD users too) of the users with jobs in the
stage and every named group they are in. The stage binds these files
read-only over the image's; a bind pins an inode, so they are rewritten in
place (write, then truncate) as jobs join and leave. With them come a shadow
and a gshadow whose every password is locked, and every password field of
passwd and group is "x": nothing in the image can authenticate as anyone,
whatever its own shadow, PAM or sudoers say (a setuid program reached by a
job could otherwise take a password it does not check).

Nothing from NSS can add a line: an entry with a colon, a newline or any
other control character in a field is left out, with a syslog line.

Trusts the host's NSS (root's own view) and reads the image's files without
following a symlink (paths.open_in_root).
"""
from __future__ import annotations

import os
import stat
import time

from .errors import StateError
from .log import get_logger
from .paths import open_in_root

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable

__all__ = ["MODES", "FILES", "prepare", "snapshot_image", "refresh", "merge_passwd",
           "merge_group", "system_lines", "locked_shadow"]

log = get_logger(__name__)

MODES = ("generated", "host", "nscd")
FILES = ("passwd", "group", "shadow", "gshadow")
_IMAGE = "image-"           # prefix of the snapshots of the image's system entries
_MAX_BYTES = 4 << 20        # an image's passwd/group larger than this is refused
_CACHE = "identity.users"   # the users the stage's files were last made for
_HIGH_ID = 65534            # nobody/nogroup (and nfsnobody above): system entries too


def prepare(sdir: str) -> None:
    """Make the stage's passwd, group, shadow and gshadow exist (the bind plan stats them)."""
    for sub in ("", "members"):
        try:
            os.mkdir(os.path.join(sdir, sub), 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise StateError(f"can't make {sdir}/{sub}: {e.strerror}") from e
    for name in FILES:
        path = os.path.join(sdir, name)
        if not os.path.lexists(path):
            _write_in_place(path, "", 0o640 if "shadow" in name else 0o644)


def snapshot_image(version: str, sdir: str) -> None:
    """Keep the image's own system entries (read before the stage covers them)."""
    try:  # the files will be made anew from this snapshot
        os.unlink(os.path.join(sdir, _CACHE))
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StateError(f"can't remove {sdir}/{_CACHE}: {e.strerror}") from e
    fd = os.open(version, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        defs = _read_in_image(fd, "etc/login.defs", missing_ok=True)
        for name, key in (("passwd", "UID_MIN"), ("group", "GID_MIN")):
            text = _read_in_image(fd, f"etc/{name}", missing_ok=True)
            lines = system_lines(text, _login_def(defs, key, 1000))
            _write_in_place(os.path.join(sdir, _IMAGE + name), "".join(lines))
    finally:
        os.close(fd)


def refresh(sdir: str, cache_seconds: float = 0.0) -> bool:
    """Rewrite the stage's passwd and group for its members now; False if not generated.

    cache_seconds: files made less than this long ago for the same set of users
    are kept as they are (a job joining or leaving beside another of its owner's
    changes nothing in them; the host's NSS is asked again once they are older).
    """
    snap = os.path.join(sdir, _IMAGE + "passwd")
    if not os.path.exists(snap):
        return False
    users = _member_users(os.path.join(sdir, "members"))
    key = "".join(u + "\n" for u in sorted(set(users)))
    cache = os.path.join(sdir, _CACHE)
    if cache_seconds > 0 and _is_fresh(cache, key, cache_seconds):
        return True
    image_pw = _read_file(snap)
    image_gr = _read_file(os.path.join(sdir, _IMAGE + "group"))
    entries = _host_entries(users)
    passwd = merge_passwd(image_pw, entries[0])
    group = merge_group(image_gr, entries[1])
    _write_in_place(os.path.join(sdir, "passwd"), passwd)
    _write_in_place(os.path.join(sdir, "group"), group)
    _write_in_place(os.path.join(sdir, "shadow"), locked_shadow(passwd, "*:1:0:99999:7:::"),
                    0o640)
    _write_in_place(os.path.join(sdir, "gshadow"), locked_shadow(group, "!::"), 0o640)
    _write_in_place(cache, key, 0o600)  # after the files: a crash before it means no cache
    return True


def _is_fresh(cache: str, key: str, seconds: float) -> bool:
    """Whether the stage's files were made for the users ``key`` less than ``seconds`` ago."""
    try:
        st = os.stat(cache)
        if not 0 <= time.time() - st.st_mtime < seconds:
            return False
        return _read_file(cache) == key
    except (OSError, StateError):
        return False


def locked_shadow(text: str, rest: str) -> str:
    """A shadow (or gshadow) for the names of a passwd (group) text, every password locked.

    rest: what follows the name; its first field is the password ("*", "!"),
    which no crypt(3) hash can match.
    """
    names = (line.split(":", 1)[0] for line in text.splitlines())
    return "".join(f"{name}:{rest}\n" for name in names if name)


def system_lines(text: str, first_user_id: int) -> list[str]:
    """The entries of a passwd/group text whose id is a system one."""
    out = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 3 or not fields[2].isdigit() or line.startswith(("#", "+", "-")):
            continue
        uid = int(fields[2])
        if uid < first_user_id or uid >= _HIGH_ID:
            out.append(line + "\n")
    return out


def merge_passwd(image: str, users: list[tuple[str, int, int, str, str, str]]) -> str:
    """The image's system entries, then each user's (a user's name or uid wins over the image's).

    Every password field is "x" (the locked shadow): an image's ``root::0:0``
    gives no password-less root.
    """
    names = {u[0] for u in users}
    ids = {u[1] for u in users}
    kept = [_no_password(line) + "\n" for line in image.splitlines()
            if line.split(":")[0] not in names and _id(line) not in ids]
    return "".join(kept) + "".join(f"{n}:x:{uid}:{gid}:{gecos}:{home}:{shell}\n"
                                   for n, uid, gid, gecos, home, shell in users)


def merge_group(image: str, groups: dict[int, tuple[str, list[str]]]) -> str:
    """The image's system groups (with the users added where the host has them in that gid),
    then the users' other groups, named as on the host."""
    out = []
    for line in image.splitlines():
        fields = _no_password(line).split(":")
        gid = _id(line)
        if gid in groups and len(fields) >= 4:
            old = [m for m in fields[3].split(",") if m]
            fields[3] = ",".join(old + [m for m in groups.pop(gid)[1] if m not in old])
        out.append(":".join(fields) + "\n")
    taken = {line.split(":")[0] for line in out}
    for gid, (name, mem) in sorted(groups.items()):
        if name not in taken:
            out.append(f"{name}:x:{gid}:{','.join(mem)}\n")
    return "".join(out)


def _no_password(line: str) -> str:
    fields = line.split(":")
    if len(fields) > 1:
        fields[1] = "x"
    return ":".join(fields)


def _id(line: str) -> int:
    fields = line.split(":")
    return int(fields[2]) if len(fields) > 2 and fields[2].isdigit() else -1


def _host_entries(users: Iterable[str]) -> tuple[list[tuple[str, int, int, str, str, str]],
                                                 dict[int, tuple[str, list[str]]]]:
    """The users' passwd entries and their groups (gid -> name, members) from the host's NSS."""
    import grp
    import pwd
    people: list[tuple[str, int, int, str, str, str]] = []
    groups: dict[int, tuple[str, list[str]]] = {}
    for user in sorted(set(users)):
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            log.warning("user %s of a staged job is unknown to the host's NSS: left out of "
                        "the stage's passwd", user)
            continue
        bad = _unsafe(pw.pw_name, pw.pw_gecos, pw.pw_dir, pw.pw_shell)
        if bad:
            log.warning("passwd entry of user %s from the host's NSS has %s in a field: left "
                        "out of the stage's passwd (fix it in the directory)",
                        _show(pw.pw_name), bad)
            continue
        people.append((pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_gecos, pw.pw_dir,
                       pw.pw_shell))
        for gid in os.getgrouplist(pw.pw_name, pw.pw_gid):
            try:
                name = grp.getgrgid(gid).gr_name
            except KeyError:
                continue  # a gid without a name: left numeric, never called nogroup
            bad = _unsafe(name)
            if bad:
                log.warning("group %d from the host's NSS has %s in its name: left out of the "
                            "stage's group", gid, bad)
                continue
            members = groups.setdefault(gid, (name, []))[1]
            if gid != pw.pw_gid and pw.pw_name not in members:
                members.append(pw.pw_name)
    return people, groups


def _unsafe(*fields: str) -> str:
    """What in these passwd/group fields could split or add a line, or not be written as
    UTF-8 ('' if nothing)."""
    for field in fields:
        for c in field:
            if c == ":":
                return "a colon"
            if c < " " or "\x7f" <= c <= "\x9f":  # C0, DEL and C1 controls
                return "a newline" if c == "\n" else f"a control character ({ord(c):#04x})"
            if "\ud800" <= c <= "\udfff":  # bytes that are not UTF-8 (surrogateescape)
                return "bytes that are not UTF-8"
    return ""


def _show(text: str) -> str:
    return text.encode("unicode_escape", "backslashreplace").decode("ascii")[:64]


def _member_users(members_dir: str) -> list[str]:
    users = []
    for job_id in sorted(os.listdir(members_dir)) if os.path.isdir(members_dir) else []:
        name = _read_file(os.path.join(members_dir, job_id)).strip()
        if name and ":" not in name and "\n" not in name:
            users.append(name)
    return users


def _login_def(text: str, key: str, default: int) -> int:
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == key and words[1].isdigit():
            return int(words[1])
    return default


def _read_in_image(root_fd: int, rel: str, missing_ok: bool = False) -> str:
    """A small regular file of the image, opened without following any symlink."""
    from .errors import UnsafePathError
    try:
        pfd = open_in_root(root_fd, rel)
    except FileNotFoundError:
        if missing_ok:
            return ""
        raise StateError(f"image has no /{rel}") from None
    except (OSError, UnsafePathError) as e:
        raise StateError(f"can't read /{rel} of the image: {e}") from e
    try:
        if not stat.S_ISREG(os.fstat(pfd).st_mode):
            raise StateError(f"/{rel} of the image is not a regular file")
        return _read_file(f"/proc/self/fd/{pfd}")
    finally:
        os.close(pfd)


def _read_file(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return ""
    except OSError as e:
        raise StateError(f"can't read {path}: {e.strerror}") from e
    with open(fd, "rb") as f:
        data = f.read(_MAX_BYTES + 1)
    if len(data) > _MAX_BYTES:
        raise StateError(f"{path} is larger than {_MAX_BYTES} bytes")
    return data.decode("utf-8", "replace")


def _write_in_place(path: str, text: str, mode: int = 0o644) -> None:
    """Replace the content of ``path`` keeping its inode (a bind mount pins it), mode ``mode``.

    A job may read the file meanwhile: shorter new content is first padded
    with newlines (empty lines, which NSS's file parser skips) to the old
    length, so no reader ever sees a tail of old entries, then truncated.
    """
    data = text.encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)  # the prologue's umask is 0077
            padded = data + b"\n" * max(0, os.fstat(fd).st_size - len(data))
            done = 0
            while done < len(padded):
                done += os.pwrite(fd, padded[done:], done)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)
    except OSError as e:
        raise StateError(f"can't write {path}: {e.strerror}") from e
