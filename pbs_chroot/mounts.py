"""Build, apply and tear down the mounts of a stage (an image version made runnable).

Run as root by the hooks and the runner, always under the stage lock
(stage.py). Trusts the config's bind set and an image version that
paths.resolve_admin_path() has checked; mount points inside the image are
opened and created without following symlinks. Teardown trusts only
/proc/self/mountinfo, never memory.
"""
from __future__ import annotations

import os
import stat
import time

from . import faults
from .errors import MountError, UnsafePathError
from .log import get_logger
from .paths import open_in_root
from .record import Record
from .undo import Undo

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, Sequence

    from .config import BindSpec

__all__ = ["MountInfo", "MountStep", "read_mountinfo", "mounts_below", "check_base", "plan",
           "apply", "mount_step", "teardown", "verify", "with_mount_points", "ADD_MOUNT_POINTS"]

log = get_logger(__name__)

# _sys (ctypes) is imported by the functions that mount: a job joining a
# stage that is already up never pays for it.

_UMOUNT_TRIES = 5
_UMOUNT_PAUSE = 0.05


class MountInfo(Record):
    """One line of /proc/self/mountinfo (proc(5))."""

    __slots__ = ("mount_id", "parent_id", "mount_point", "options", "fstype", "shared",
                 "super_options")

    def __init__(self, mount_id: int, parent_id: int, mount_point: str,
                 options: frozenset[str], fstype: str, shared: Optional[int] = None,
                 super_options: frozenset[str] = frozenset()) -> None:
        self.mount_id = mount_id
        self.parent_id = parent_id
        self.mount_point = mount_point
        self.options = options
        self.fstype = fstype
        self.shared = shared                # peer group, from the optional field shared:N
        self.super_options = super_options  # e.g. a v1 cgroup's controllers


class MountStep(Record):
    """One planned mount: ``spec`` applied at ``target`` (a host path inside the stage)."""

    __slots__ = ("spec", "target", "is_file")

    def __init__(self, spec: BindSpec, target: str, is_file: bool) -> None:
        self.spec = spec
        self.target = target
        self.is_file = is_file

    def describe(self) -> str:
        return f"{self.target}: {self.spec.describe()}"


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    if "\\" not in field:
        return field
    out, i = bytearray(), 0
    raw = os.fsencode(field)
    while i < len(raw):
        if raw[i:i + 1] == b"\\" and raw[i + 1:i + 4].isdigit():
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[MountInfo]:
    """Parse mountinfo once, in mount order."""
    with open(path, "rb") as f:
        data = os.fsdecode(f.read())
    result = []
    for line in data.splitlines():
        fields = line.split(" ")
        sep = fields.index("-")
        peer = [int(f[7:]) for f in fields[6:sep] if f.startswith("shared:")]
        result.append(MountInfo(int(fields[0]), int(fields[1]), _unescape(fields[4]),
                                frozenset(fields[5].split(",")), fields[sep + 1],
                                peer[0] if peer else None,
                                frozenset(fields[sep + 3].split(",")) if len(fields) > sep + 3
                                else frozenset()))
    return result


def mounts_below(root: str, table: Sequence[MountInfo],
                 keep: frozenset[int] = frozenset()) -> list[MountInfo]:
    """Mounts at ``root`` or below it, in mount order, except the ids in ``keep``."""
    prefix = root.rstrip("/") + "/"
    return [m for m in table if m.mount_id not in keep
            and (m.mount_point == root or m.mount_point.startswith(prefix))]


def check_base(version: str, table: Sequence[MountInfo]) -> None:
    """Refuse a version that is a bind mount in its parent's own peer group.

    Binding such a mount onto itself propagates a copy to the parent, tucked
    under it, and unmounting the stage would then take the admin's mount with
    it (mount_namespaces(7), "tucked" mounts). A version on its own file
    system, or a private or slave bind, is fine.
    """
    ids = {m.mount_id: m for m in table}
    at = [m for m in table if m.mount_point == version]
    if at and at[-1].shared is not None:
        parent = ids.get(at[-1].parent_id)
        if parent is not None and parent.shared == at[-1].shared:
            raise MountError(f"image version {version} is a bind mount in the same peer group "
                             f"(shared:{parent.shared}) as {parent.mount_point}; make it a slave "
                             f"(mount --make-slave {version}) or unmount it")


def plan(version: str, binds: Sequence[BindSpec]) -> list[MountStep]:
    """The mounts that make ``version`` a stage; checks sources, does no mounting."""
    steps = []
    for spec in binds:
        is_file = False
        if spec.source.startswith("/"):  # not a fresh proc or tmpfs
            try:
                st = os.stat(spec.source)
            except OSError as e:
                if spec.optional:
                    continue
                raise MountError(f"bind source {spec.source} for {spec.target}: "
                                 f"{e.strerror}") from e
            if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                raise MountError(f"bind source {spec.source} is neither a file nor a directory")
            is_file = stat.S_ISREG(st.st_mode)
        steps.append(MountStep(spec, version + spec.target, is_file))
    return steps


ADD_MOUNT_POINTS = "pbs-chroot image audit {version} --add-mount-points"


def with_mount_points(version: str, steps: Sequence[MountStep],
                      required: str = "") -> list[MountStep]:
    """The steps whose mount point the image version has: a version is never written at
    job time (its mount points come from `image build`/`deploy`, or the command below).

    A missing one is a site fault naming that command; an optional bind's is skipped
    with a warning, except ``required`` (pbs_mom's job directory: every job needs it).
    """
    fd = os.open(version, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    kept = []
    try:
        for step in steps:
            try:
                os.close(open_in_root(fd, step.spec.target))
            except UnsafePathError as e:
                raise MountError(f"stage {version}: {e.detail}") from e
            except (FileNotFoundError, NotADirectoryError):
                fix = ADD_MOUNT_POINTS.format(version=version)
                if step.spec.optional and step.spec.target != required:
                    log.warning("stage %s: optional bind %s skipped: its mount point is missing "
                                "in the image (add it: %s)", version, step.spec.target, fix)
                    continue
                raise MountError(f"stage {version}: mount point {step.spec.target} is missing "
                                 f"in the image; add it with `{fix}` (image build and "
                                 "deploy add them to new versions)") from None
            kept.append(step)
    finally:
        os.close(fd)
    return kept


def apply(version: str, steps: Sequence[MountStep], keep: frozenset[int] = frozenset()) -> None:
    """Mount the stage: all of it, or (on error) none of it.

    ``keep``: ids of mounts that were at or below ``version`` before (the
    admin's, e.g. the file system the image lives on): never unmounted.
    """
    from . import _sys
    with Undo() as undo:
        _self_bind(version)
        undo.callback(_best_effort_teardown, version, keep)
        root_fd = os.open(version, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        undo.callback(os.close, root_fd)
        faults.point("mount:self_bind")
        for step in steps:
            _mount_step(root_fd, version, step)
            faults.point(f"mount:{step.spec.target}")
        _remount(version, _sys.MS_RDONLY | _sys.MS_NOSUID | _sys.MS_NODEV)
        verify(version, steps, keep)
        undo.pop_all()
    os.close(root_fd)


def mount_step(version: str, step: MountStep) -> None:
    """Add one mount to a stage that is up (homes.py: its mount point made there first)."""
    root_fd = os.open(version, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _mount_step(root_fd, version, step, create=True)
    finally:
        os.close(root_fd)


def _self_bind(version: str) -> None:
    from . import _sys
    fd = os.open(version, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _call(_sys.mount, version, f"/proc/self/fd/{fd}", f"/proc/self/fd/{fd}", None,
              _sys.MS_BIND)
    finally:
        os.close(fd)
    # On a systemd host / is shared: cut propagation from the stage back to
    # the host before anything is mounted below it (mount_namespaces(7)).
    _call(_sys.mount, version, None, version, None, _sys.MS_SLAVE | _sys.MS_REC)


def _mount_step(root_fd: int, version: str, step: MountStep, create: bool = False) -> None:
    from . import _sys
    spec = step.spec
    try:
        tfd = open_in_root(root_fd, spec.target,
                           ("file" if step.is_file else "dir") if create else None)
    except UnsafePathError as e:
        raise MountError(f"stage {version}: {e.detail}") from e
    except OSError as e:
        raise MountError(f"stage {version}: can't open mount point {spec.target}: "
                         f"{e.strerror}; add it with "
                         f"`{ADD_MOUNT_POINTS.format(version=version)}`") from e
    try:
        where = f"/proc/self/fd/{tfd}"
        if spec.source == "proc":
            _call(_sys.mount, step.target, "proc", where, "proc",
                  _sys.MS_NOSUID | _sys.MS_NODEV | _sys.MS_NOEXEC)
        elif spec.source == "tmpfs":
            # A fresh tmpfs (tmpfs(5)): shared by the stage's jobs like a node's
            # /tmp, sticky so they cannot remove each other's files; gone with
            # the stage.
            _call(_sys.mount, step.target, "tmpfs", where, "tmpfs",
                  _sys.MS_NOSUID | _sys.MS_NODEV
                  | (_sys.MS_NOEXEC if spec.noexec else 0), "mode=1777")
        else:
            _call(_sys.mount, step.target, spec.source, where, None,
                  _sys.MS_BIND | (_sys.MS_REC if spec.rec else 0))
    finally:
        os.close(tfd)
    if not spec.source.startswith("/"):
        return
    # A bind of a shared mount joins its peer group: receive from the host,
    # never send back.
    _call(_sys.mount, step.target, None, step.target, None, _sys.MS_SLAVE | _sys.MS_REC)
    flags = _sys.MS_NOSUID | (0 if spec.dev else _sys.MS_NODEV) \
        | (_sys.MS_RDONLY if spec.readonly else 0) | (_sys.MS_NOEXEC if spec.noexec else 0)
    _remount(step.target, flags)
    if spec.rec:
        # The remount above changes the top mount only: give every submount
        # the same protection, keeping its own ro/noexec. (Mounts that arrive
        # later by propagation keep the host's flags.)
        top = mounts_below(step.target, read_mountinfo())
        for m in top:
            if m.mount_point != step.target:
                _remount(m.mount_point, flags | (_sys.MS_RDONLY if "ro" in m.options else 0)
                         | (_sys.MS_NOEXEC if "noexec" in m.options else 0))


def _remount(target: str, flags: int) -> None:
    from . import _sys
    # Re-open: an fd taken before the bind still names the covered directory.
    fd = os.open(target, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _call(_sys.mount, target, None, f"/proc/self/fd/{fd}", None,
              _sys.MS_REMOUNT | _sys.MS_BIND | flags)
    finally:
        os.close(fd)


def _call(fn: "object", what: str, *args: object) -> None:
    try:
        fn(*args)  # type: ignore[operator]
    except OSError as e:
        raise MountError(f"mount at {what} failed: {e.strerror} (errno {e.errno})") from e


def verify(version: str, steps: Sequence[MountStep], keep: frozenset[int] = frozenset(),
           table: Optional[Sequence[MountInfo]] = None) -> None:
    """Check mountinfo: the stage root is read-only and every step is mounted as planned."""
    # Later mounts on the same point win: the dict keeps the topmost one.
    mounted = {m.mount_point: m for m in mounts_below(version, table or read_mountinfo(), keep)}
    root = mounted.get(version)
    if root is None or "ro" not in root.options or "nosuid" not in root.options:
        raise MountError(f"stage {version}: root is not mounted read-only, nosuid")
    for step in steps:
        m = mounted.get(step.target)
        if m is None:
            raise MountError(f"stage {version}: {step.target} is not mounted")
        want = {"nosuid"} | ({"ro"} if step.spec.readonly else set()) \
            | (set() if step.spec.dev else {"nodev"})
        subs = [s for p, s in mounted.items() if step.spec.rec and p.startswith(step.target + "/")]
        for sub in [m] + subs:
            if not want <= sub.options:
                raise MountError(f"stage {version}: {sub.mount_point} has options "
                                 f"{','.join(sorted(sub.options))}, want "
                                 f"{','.join(sorted(want))}")


def teardown(version: str, keep: frozenset[int] = frozenset()) -> int:
    """Unmount everything at or below ``version`` but ``keep``, deepest first; return how many.

    Retries a busy unmount; MNT_DETACH only as a logged last resort.
    """
    count = 0
    for attempt in range(_UMOUNT_TRIES + 1):
        left = mounts_below(version, read_mountinfo(), keep)
        if not left:
            return count
        # Children before parents; of two mounts on one point, the later first.
        left.sort(key=lambda m: (m.mount_point.count("/"), m.mount_id), reverse=True)
        for m in left:
            count += _umount(m.mount_point, detach=attempt == _UMOUNT_TRIES)
            faults.point(f"umount:{m.mount_point[len(version):] or '/'}")
        if attempt < _UMOUNT_TRIES and mounts_below(version, read_mountinfo(), keep):
            time.sleep(_UMOUNT_PAUSE)
    left = mounts_below(version, read_mountinfo(), keep)
    if left:
        raise MountError(f"stage {version}: still mounted after teardown: "
                         f"{', '.join(m.mount_point for m in left)}")
    return count


def _umount(target: str, detach: bool) -> int:
    from . import _sys
    try:
        _sys.umount2(target, _sys.UMOUNT_NOFOLLOW | (_sys.MNT_DETACH if detach else 0))
    except OSError as e:
        log.warning("umount %s failed: %s%s", target, e.strerror,
                    " (even lazily)" if detach else "; will retry")
        return 0
    if detach:
        log.warning("umount %s: busy, detached lazily (MNT_DETACH)", target)
    return 1


def _best_effort_teardown(version: str, keep: frozenset[int]) -> None:
    try:
        teardown(version, keep)
    except MountError as e:
        log.error("undo of a failed stage setup left mounts: %s", e.detail)
