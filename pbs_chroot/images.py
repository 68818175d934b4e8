"""Image versions: build, audit, deploy, switch, roll back, list and collect.

Run as root by the admin (`pbs-chroot image ...`), never by the hooks. An
allowlisted path is a symlink to one of the immutable version directories
beside each other in the image's versions directory (root's only, 0700).
A new version is written under a hidden name and renamed into place only
when complete; switching is an atomic rename of a new symlink over the old
one, under the node lock the prologues take to resolve it, so no job is
ever left in an unstaged version (see switch()). No version that a running
job may use, and never the current one, is removed.
"""
import logging
import os
import stat
import subprocess
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

from . import mounts, stage
from .config import Config, Image
from .errors import PbsChrootError, SiteError, UserError
from .mountpoints import add_mount_points, missing_mount_points
from .paths import (check_version_private, check_versions_dir, resolve_admin_path,
                    resolve_in_tree)
from .state import list_records, load_record, node_lock

__all__ = ["find", "versions_dir", "current", "versions", "in_use", "switch", "audit",
           "Audit", "add_mount_points", "build", "deploy", "rollback", "gc",
           "add_arguments", "main_image"]

log = logging.getLogger(__name__)

_INCOMING = ".incoming-"
_TRASH = ".trash-"
_HISTORY = ".history"
# Groups up to here are the distribution's (login.defs SYS_GID_MAX): group-
# writable files of theirs (/run/utmp, /var/mail) are normal in an image and
# read-only in the stage; a group of users' is a problem.
_SYS_GID_MAX = 999
_BUILD_TIMEOUT = 3600
_FORCE_HELP = ("accept known doors (an empty or well-known root password, NOPASSWD sudoers, "
               "user mounts in fstab): listed as notes, not refused")


def find(cfg: Config, name: str) -> Image:
    """The allowlisted image named by its path or, if unique, its last component."""
    img = cfg.image(name)
    if img is not None:
        return img
    hits = [i for i in cfg.images if os.path.basename(i.path) == name]
    if len(hits) != 1:
        known = ", ".join(i.path for i in cfg.images) or "none"
        raise UserError(f"no {'single ' if hits else ''}allowlisted image called {name!r} "
                        f"in {cfg.path} (images: {known})")
    return hits[0]


def current(image: str) -> Optional[str]:
    """The version ``image`` points to now (audited path), or None if it is not a symlink."""
    if not os.path.islink(image):
        return None
    return resolve_admin_path(image)


def versions_dir(img: Image) -> str:
    """Where the versions of ``img`` live: configured, beside the current one, or a default."""
    if img.versions:  # one spelling for every comparison: resolved, once it exists
        return resolve_admin_path(img.versions) if os.path.isdir(img.versions) \
            else img.versions
    now = current(img.path) if os.path.lexists(img.path) else None
    if now is not None:
        return os.path.dirname(now)
    parent, name = os.path.split(img.path)
    return os.path.join(parent, ".versions", name)


def versions(img: Image) -> list[str]:
    """Complete versions of ``img``, oldest first: by when each was last built or made
    current (the versions directory's .history), versions it does not know first."""
    vdir = versions_dir(img)
    try:
        names = os.listdir(vdir)
    except FileNotFoundError:
        return []
    found = [os.path.join(vdir, n) for n in sorted(names) if not n.startswith(".")
             and os.path.isdir(os.path.join(vdir, n))
             and not os.path.islink(os.path.join(vdir, n))]
    order = {path: i for i, path in enumerate(_history(vdir))}
    return sorted(found, key=lambda v: order.get(v, -1))


def _history(vdir: str) -> list[str]:
    try:
        with open(os.path.join(vdir, _HISTORY), encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n").split(" ", 1)[-1] for line in f]
    except FileNotFoundError:
        return []


def _remember(vdir: str, version: str) -> None:
    """Append ``version`` to the history (one line: UTC time, path)."""
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {version}\n"
    fd = os.open(os.path.join(vdir, _HISTORY),
                 os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def in_use(cfg: Config) -> dict[str, list[str]]:
    """Version path -> jobs on this node that use or may use it (records and stages)."""
    used: dict[str, set[str]] = {}
    for job_id in list_records(cfg.state_dir):
        record = load_record(cfg.state_dir, job_id) or {}
        if isinstance(record.get("version"), str):
            used.setdefault(record["version"], set()).add(job_id)
        for version in stage.memberships(cfg, job_id):
            used.setdefault(version, set()).add(job_id)
    base = os.path.join(cfg.state_dir, "stages")
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        sdir = os.path.join(base, name)
        version = stage.version_of(sdir)
        for job_id in stage.members(sdir):
            used.setdefault(version, set()).add(job_id)
    return {v: sorted(jobs) for v, jobs in used.items() if v}


def switch(cfg: Config, image: str, version: str) -> list[str]:
    """Point the allowlisted ``image`` at ``version``; return the jobs also staged there.

    pbs_mom chroots by the allowlisted path after the prologue has resolved
    it and joined that version's stage, and again for every task it spawns
    later; so a job of this image may land in whichever version is current
    at any moment of its life. Under the node lock (no prologue is
    resolving), every job with a record for this image joins the new
    version's stage *before* the symlink moves: a job is a member of every
    version its image pointed to while it ran, and leaves them all at its end.
    """
    if cfg.image(image) is None:
        raise UserError(f"{image} is not an allowlisted image in the config")
    if os.path.lexists(image) and not os.path.islink(image):
        raise UserError(f"{image} is not a symlink: make it a symlink to a version "
                        "directory to deploy and roll back")
    target = resolve_admin_path(version)
    check_version_private(target)
    with node_lock(cfg.state_dir, cfg.lock_timeout):
        # Again under the lock: gc (which takes it too) may have removed it meanwhile.
        if os.path.basename(target).startswith(".") or resolve_admin_path(version) != target:
            raise UserError(f"{version} is not a complete version (any more)")
        old = resolve_admin_path(image) if os.path.lexists(image) else None
        if old is not None and os.path.dirname(target) != os.path.dirname(old):
            raise UserError(f"{version} is not beside the current version {old}: versions "
                            f"of one image live in one directory")
        records = {job_id: load_record(cfg.state_dir, job_id)
                   for job_id in list_records(cfg.state_dir)}
        joined = [job_id for job_id, r in records.items() if _of_image(r, image)]
        if joined:  # (users: for the stage's generated passwd and group)
            users = [str((records[j] or {}).get("user") or "") for j in joined]
            stage.join_locked(cfg, joined, target, users, image)
        _replace_symlink(image, target)
        _remember(os.path.dirname(target), target)
    log.warning("image %s switched from %s to %s (%d running job(s) staged in both)",
                image, old, target, len(joined))
    return joined


def _of_image(record: Optional[dict[str, Any]], image: str) -> bool:
    return bool(record and record.get("image") == image
                and record.get("stage") in ("joining", "joined"))


def _replace_symlink(link: str, target: str) -> None:
    tmp = os.path.join(os.path.dirname(link), f".{os.path.basename(link)}.new.{os.getpid()}")
    try:
        os.unlink(tmp)  # left by a killed switch
    except FileNotFoundError:
        pass
    os.symlink(target, tmp)
    os.rename(tmp, link)
    _fsync_dir(os.path.dirname(link))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- audit -----------------------------------------------------------------

class Audit(NamedTuple):
    """What `image audit` found: problems fail it; setuid files and notes are listed."""

    problems: list[str]
    setuid: list[str]        # paths inside the image, with their mode
    stripped: list[str]      # setuid/setgid bits removed (--strip-setuid)
    notes: list[str]         # tolerated: group-writable by a system group (utmp, mail)

    @property
    def ok(self) -> bool:
        return not self.problems


def audit(cfg: Config, root: str, strip_setuid: bool = False, force: bool = False) -> Audit:
    """Check what the stage relies on: root-owned, nothing writable by group or others
    (sticky directories, device nodes and system groups aside), the mount points and
    /bin/sh present; and no known door (doors.py: a weak root password, NOPASSWD
    sudoers, user mounts), which ``force`` lists as a note instead.

    Walks the tree without following symlinks, staying on its file system and
    out of mounts (a staged version's binds).
    """
    out = Audit([], [], [], [])
    try:
        top = os.lstat(root)
    except OSError as e:
        return Audit([f"{root}: {e.strerror}"], [], [], [])
    if not stat.S_ISDIR(top.st_mode):
        return Audit([f"{root}: not a directory"], [], [], [])
    # A staged version has the host's trees mounted in it: not the image's.
    skip = {m.mount_point for m in mounts.mounts_below(root, mounts.read_mountinfo())} - {root}
    for path, st in _walk(root, top.st_dev, out.problems, skip):
        rel = path[len(root):] or "/"
        mode = st.st_mode
        if st.st_uid != 0:
            out.problems.append(f"{rel}: owned by uid {st.st_uid}, not root")
        if stat.S_ISLNK(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            continue  # devices: the stage is nodev, and /dev is the host's
        if stat.S_ISDIR(mode) and mode & stat.S_ISVTX:
            continue  # tmp directories
        if mode & 0o002:
            out.problems.append(f"{rel}: writable by others (mode {stat.S_IMODE(mode):04o})")
        elif mode & 0o020 and st.st_gid > _SYS_GID_MAX:
            out.problems.append(f"{rel}: writable by group {st.st_gid}, not a system group "
                                f"(mode {stat.S_IMODE(mode):04o})")
        elif mode & 0o020:
            out.notes.append(f"{rel}: writable by system group {st.st_gid} "
                             f"(mode {stat.S_IMODE(mode):04o})")
        if stat.S_ISREG(mode) and mode & (stat.S_ISUID | stat.S_ISGID):
            out.setuid.append(f"{rel} ({stat.S_IMODE(mode):04o})")
            if strip_setuid:
                os.chmod(path, stat.S_IMODE(mode) & ~(stat.S_ISUID | stat.S_ISGID))
                out.stripped.append(rel)
    for missing in missing_mount_points(cfg, root):
        out.problems.append(f"{missing}: mount point missing or unusable (`pbs-chroot image build` "
                            "adds them; for a published tree, add them at the source)")
    if not _exists_in(root, "/bin/sh"):
        out.problems.append("/bin/sh: missing (pbs_mom starts the job's shell)")
    from . import doors
    found, notes = doors.inspect(root)
    if force:
        out.notes.extend(f"forced: {d}" for d in found)
    else:
        out.problems.extend(f"{d} (--force accepts it)" for d in found)
    out.notes.extend(notes)
    return out


def _walk(root: str, dev: int, problems: list[str], skip: set[str]) -> "Any":
    stack = [root]
    while stack:
        path = stack.pop()
        if path in skip:
            continue
        try:
            st = os.lstat(path)
        except OSError as e:
            problems.append(f"{path[len(root):] or '/'}: {e.strerror}")
            continue
        yield path, st
        if stat.S_ISDIR(st.st_mode) and st.st_dev == dev:
            try:
                names = os.listdir(path)
            except OSError as e:
                problems.append(f"{path[len(root):] or '/'}: {e.strerror}")
                continue
            stack.extend(os.path.join(path, n) for n in sorted(names, reverse=True))


def _exists_in(root: str, path: str) -> bool:
    """Whether ``path`` exists in the tree at ``root``, symlinks resolved inside it."""
    return resolve_in_tree(root, path) is not None


# --- build, deploy, rollback, gc ---------------------------------------------

def _prepare(img: Image) -> str:
    """The versions directory, made root-only if new; checked either way."""
    vdir = versions_dir(img)
    if not os.path.isdir(vdir):
        parent = os.path.dirname(vdir)
        os.makedirs(parent, 0o755, exist_ok=True)
        os.mkdir(vdir, 0o700)
        os.chmod(vdir, 0o700)
    vdir = resolve_admin_path(vdir)  # the spelling current(), records and mountinfo use
    check_versions_dir(vdir)
    return vdir


def _new_name(vdir: str) -> str:
    base = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name, n = base, 1
    while any(os.path.lexists(os.path.join(vdir, p + name)) for p in ("", _INCOMING)):
        n += 1
        name = f"{base}.{n}"
    return name


def _incoming(vdir: str, name: str) -> str:
    path = os.path.join(vdir, _INCOMING + name)
    os.mkdir(path, 0o755)
    os.chmod(path, 0o755)
    return path


def _finish(cfg: Config, tmp: str, vdir: str, name: str, strip_setuid: bool,
            say: Callable[[str], None], force: bool = False) -> tuple[str, Audit]:
    """Mount points, audit, then rename into place (a failed audit removes the copy)."""
    made = add_mount_points(cfg, tmp)
    if made:
        say(f"added mount points: {' '.join(made)}")
    result = audit(cfg, tmp, strip_setuid, force)
    if not result.ok:
        _remove_tree(tmp)
        raise UserError(f"image refused by the audit, nothing deployed: "
                        f"{'; '.join(result.problems[:10])}"
                        + (f" (and {len(result.problems) - 10} more)"
                           if len(result.problems) > 10 else ""))
    version = os.path.join(vdir, name)
    os.sync()  # the tree's data on disk before its name: a crash never leaves a valid-looking
    os.rename(tmp, version)  # version with empty files
    _remember(vdir, version)
    _fsync_dir(vdir)
    return version, result


def build(cfg: Config, img: Image, method: str, args: dict[str, Any],
          say: Callable[[str], None] = print) -> tuple[str, Audit]:
    """Build a new version of ``img`` (debootstrap or an RPM installroot); not switched."""
    vdir = _prepare(img)
    name = _new_name(vdir)
    tmp = _incoming(vdir, name)
    try:
        if method == "debootstrap":
            cmd = ["debootstrap", "--variant=minbase", args["suite"], tmp]
            if args.get("mirror"):
                cmd.append(args["mirror"])
            _run(cmd, "debootstrap")
        else:
            from . import rpm
            for warning in rpm.installroot(tmp, args["repo"], args["packages"],
                                           args["releasever"]):
                say(f"warning: {warning}")
        return _finish(cfg, tmp, vdir, name, args.get("strip_setuid", False), say,
                       args.get("force", False))
    except BaseException:
        if os.path.isdir(tmp):
            _remove_tree(tmp)
        raise


def deploy(cfg: Config, img: Image, source: str, strip_setuid: bool = False,
           say: Callable[[str], None] = print, force: bool = False) -> str:
    """Copy ``source`` (a directory, a version beside the others, or an rsync source)
    into a new version, audit it, and switch the image to it."""
    vdir = _prepare(img)
    existing = os.path.realpath(source) if os.path.isdir(source) else ""
    if existing and os.path.dirname(existing) == os.path.realpath(vdir):
        if os.path.basename(existing).startswith("."):
            raise UserError(f"{existing} is not a complete version (a build or a removal "
                            "that did not finish)")
        version = existing  # already a version of this image: audit and switch
        result = audit(cfg, version, strip_setuid, force)
        if not result.ok:
            raise UserError(f"{version} refused by the audit: {'; '.join(result.problems[:10])}")
    else:
        name = _new_name(vdir)
        tmp = _incoming(vdir, name)
        try:
            rsync = ["rsync", "-aHAX", "--numeric-ids", "--info=progress2"]
            if os.path.isdir(source):
                # A staged directory has the host's trees mounted in it: copy the
                # directory's own files, seen through a plain bind of it in a
                # mount namespace of rsync's own (gone when rsync exits).
                src = os.path.abspath(source)
                cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       'src=$1; shift; mount --bind "$src" "$src" && exec "$@"', "sh", src,
                       *rsync, src + "/", tmp + "/"]
            else:
                cmd = [*rsync, source, tmp + "/"]
            _run(cmd, "rsync", show=True)
            version, result = _finish(cfg, tmp, vdir, name, strip_setuid, say, force)
        except BaseException:
            if os.path.isdir(tmp):
                _remove_tree(tmp)
            raise
    _say_setuid(result, say)
    joined = switch(cfg, img.path, version)
    say(_switched(img.path, version, joined))
    return version


def rollback(cfg: Config, img: Image, version: Optional[str] = None,
             say: Callable[[str], None] = print, force: bool = False) -> str:
    """Switch ``img`` to ``version`` (a name or path), by default the one before the current."""
    all_versions = versions(img)
    now = current(img.path) if os.path.lexists(img.path) else None
    if version is None:
        older = [v for v in all_versions if v != now]
        if not older:
            raise UserError(f"{img.path}: no version besides {now} to roll back to")
        target = older[-1]  # the one most recently made current (or built)
    else:
        target = version if version.startswith("/") else os.path.join(versions_dir(img), version)
        if target not in all_versions:
            raise UserError(f"{img.path}: no version {version} (have: "
                            f"{', '.join(os.path.basename(v) for v in all_versions) or 'none'})")
    result = audit(cfg, target, force=force)
    if not result.ok:
        raise UserError(f"{target} refused by the audit: {'; '.join(result.problems[:10])}")
    joined = switch(cfg, img.path, target)
    say(_switched(img.path, target, joined))
    return target


def gc(cfg: Config, img: Image, keep: int, dry_run: bool = False,
       say: Callable[[str], None] = print) -> list[str]:
    """Remove versions beyond the ``keep`` most recently current (or built) ones that are
    neither current nor in use."""
    if keep < 1:
        raise UserError("--keep must be at least 1")
    vdir = versions_dir(img)
    removed = []
    with node_lock(cfg.state_dir, cfg.lock_timeout):
        now = current(img.path) if os.path.lexists(img.path) else None
        used = in_use(cfg)
        mounted = {m.mount_point for m in mounts.read_mountinfo()}
        for version in versions(img)[:-keep]:
            why = ("current" if version == now else
                   f"in use by {', '.join(used[version])}" if version in used else
                   "mounted" if any(p == version or p.startswith(version + "/")
                                    for p in mounted) else "")
            if why:
                say(f"kept {version} ({why})")
                continue
            removed.append(version)
            if not dry_run:  # out of reach of resolution before the slow delete
                os.rename(version, os.path.join(vdir, _TRASH + os.path.basename(version)))
    for version in removed:
        say(f"{'would remove' if dry_run else 'removed'} {version}")
        if not dry_run:
            _remove_tree(os.path.join(vdir, _TRASH + os.path.basename(version)))
    if not dry_run:  # what an interrupted gc left (out of reach of any switch already)
        for name in os.listdir(vdir) if os.path.isdir(vdir) else []:
            if name.startswith(_TRASH):
                _remove_tree(os.path.join(vdir, name))
                say(f"removed the rest of an interrupted gc: {name}")
    return removed


def _switched(image: str, version: str, joined: list[str]) -> str:
    also = f" ({len(joined)} running job(s) staged in it too)" if joined else ""
    return f"{image} -> {version}{also}"


def _say_setuid(result: Audit, say: Callable[[str], None]) -> None:
    if result.stripped:
        say(f"stripped setuid/setgid bits from {len(result.stripped)} file(s)")
    elif result.setuid:
        say(f"{len(result.setuid)} setuid/setgid file(s), neutralised by the nosuid stage "
            "(--strip-setuid removes the bits): " + ", ".join(result.setuid[:10]))


def _remove_tree(path: str) -> None:
    import shutil
    shutil.rmtree(path)  # fd-based on Linux: never follows a symlink out of the tree


def _run(cmd: Sequence[str], what: str, show: bool = False) -> None:
    """Run a build tool; its output is shown (show) or kept for the error message."""
    try:
        res = subprocess.run(cmd, stdin=subprocess.DEVNULL, timeout=_BUILD_TIMEOUT,
                             stdout=None if show else subprocess.PIPE,
                             stderr=None if show else subprocess.STDOUT,
                             env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
    except FileNotFoundError as e:
        raise SiteError(f"{what} is not installed (apt-get install {what})") from e
    except subprocess.TimeoutExpired as e:
        raise SiteError(f"{what} did not finish within {_BUILD_TIMEOUT} s") from e
    if res.returncode != 0:
        tail = (res.stdout or b"").decode(errors="replace").strip().splitlines()[-5:]
        raise SiteError(f"{what} failed (exit {res.returncode})"
                        + (": " + " | ".join(tail) if tail else ""))


# --- the CLI -------------------------------------------------------------------

def add_arguments(p: "Any") -> None:
    """The `pbs-chroot image ...` subcommands."""
    sub = p.add_subparsers(dest="image_command", required=True)
    b = sub.add_parser("build", help="build a new version (not switched to)")
    b.add_argument("name", help="allowlisted path, or its last component")
    how = b.add_mutually_exclusive_group(required=True)
    how.add_argument("--debootstrap", metavar="SUITE", help="Debian/Ubuntu suite, e.g. bullseye")
    how.add_argument("--installroot", action="store_true",
                     help="RPM distribution through dnf/yum --installroot")
    b.add_argument("--mirror", help="debootstrap mirror URL")
    b.add_argument("--repo", help="repo file for --installroot (only its repos are used)")
    b.add_argument("--package", action="append", default=[],
                   help="package for --installroot (repeat; default: bash coreutils)")
    b.add_argument("--releasever", default="7", help="$releasever for --installroot")
    b.add_argument("--strip-setuid", action="store_true",
                   help="remove setuid/setgid bits")
    b.add_argument("--force", action="store_true", help=_FORCE_HELP)
    a = sub.add_parser("audit", help="check a version (or any tree) is safe to offer")
    a.add_argument("path", help="a version directory (or any tree)")
    a.add_argument("--strip-setuid", action="store_true", help="remove setuid/setgid bits")
    a.add_argument("--force", action="store_true", help=_FORCE_HELP)
    a.add_argument("--add-mount-points", action="store_true",
                   help="first make the mount points this node's bind set needs (what a stage "
                   "refuses to do at job time)")
    d = sub.add_parser("deploy", help="copy SOURCE into a new version, audit, switch to it")
    d.add_argument("name", help="allowlisted path, or its last component")
    d.add_argument("source", help="directory, a version of this image, or an rsync source")
    d.add_argument("--strip-setuid", action="store_true",
                   help="remove setuid/setgid bits")
    d.add_argument("--force", action="store_true", help=_FORCE_HELP)
    r = sub.add_parser("rollback", help="switch back to VERSION (default: the previous one)")
    r.add_argument("name", help="allowlisted path, or its last component")
    r.add_argument("version", nargs="?", help="a version directory name (default: the "
                   "previous current one)")
    r.add_argument("--force", action="store_true", help=_FORCE_HELP)
    ls = sub.add_parser("list", help="versions, the current one, and the jobs using each")
    ls.add_argument("name", nargs="?",
                    help="allowlisted path, or its last component (default: all)")
    m = sub.add_parser("rpm", help="write (and build, where rpmbuild exists) an RPM that "
                       "installs VERSION and switches the image to it")
    m.add_argument("name", help="allowlisted path, or its last component")
    m.add_argument("version", help="a version directory name of this image")
    m.add_argument("--out", default=".", help="where the spec and rpmbuild's tree go")
    m.add_argument("--no-build", action="store_true", help="write the spec only")
    g = sub.add_parser("gc", help="remove old versions no running job uses")
    g.add_argument("name", help="allowlisted path, or its last component")
    g.add_argument("--keep", type=int, required=True, help="newest versions to keep")
    g.add_argument("--dry-run", action="store_true", help="only say what would be removed")


def main_image(cfg: Config, args: "Any") -> int:
    """Run one `pbs-chroot image` subcommand; its exit code."""
    from .state import ensure_layout
    ensure_layout(cfg.state_dir)
    cmd = args.image_command
    if cmd == "audit":
        if args.add_mount_points:
            try:
                for made in add_mount_points(cfg, os.path.abspath(args.path)):
                    print(f"made mount point {made}")
            except OSError as e:
                raise UserError(f"can't add mount points to {args.path}: {e.strerror} (a "
                                "staged version is read-only: deploy a new version, or wait "
                                "until its jobs have left)") from e
        result = audit(cfg, os.path.abspath(args.path), args.strip_setuid, args.force)
        for problem in result.problems:
            print(f"FAIL {problem}")
        for f in result.setuid:
            print(f"{'stripped' if args.strip_setuid else 'setuid'} {f}")
        for note in result.notes:
            print(f"note {note}")
        print(f"{args.path}: {'OK' if result.ok else 'REFUSED'} ({len(result.problems)} "
              f"problem(s), {len(result.setuid)} setuid/setgid file(s))")
        return 0 if result.ok else 1
    if cmd == "list":
        return _list(cfg, [find(cfg, args.name)] if args.name else list(cfg.images))
    img = find(cfg, args.name)
    if cmd == "build":
        method = "debootstrap" if args.debootstrap else "installroot"
        if method == "installroot" and not args.repo:
            raise UserError("--installroot needs --repo FILE")
        version, result = build(cfg, img, method, {
            "suite": args.debootstrap, "mirror": args.mirror, "repo": args.repo,
            "packages": args.package or ["bash", "coreutils"],
            "releasever": args.releasever, "strip_setuid": args.strip_setuid,
            "force": args.force})
        _say_setuid(result, print)
        print(f"built {version}; switch to it: pbs-chroot image deploy {img.path} {version}")
        return 0
    if cmd == "rpm":
        return _rpm(cfg, img, args.version, os.path.abspath(args.out), not args.no_build)
    if cmd == "deploy":
        deploy(cfg, img, args.source, args.strip_setuid, force=args.force)
    elif cmd == "rollback":
        rollback(cfg, img, args.version, force=args.force)
    else:
        gc(cfg, img, args.keep, args.dry_run)
    return 0


def _rpm(cfg: Config, img: Image, version: str, out: str, build_it: bool) -> int:
    import shutil
    from . import rpm
    name = os.path.basename(img.path)
    os.makedirs(out, 0o755, exist_ok=True)
    spec = rpm.write_image_spec(name, version, img.path, versions_dir(img), out,
                                config=cfg.path)
    print(f"wrote {spec}")
    if build_it and shutil.which("rpmbuild"):
        print(f"built {rpm.build_rpm(spec, os.path.join(out, 'rpmbuild'))}")
    elif build_it:
        print("rpmbuild not found: build it with `rpmbuild -bb` on a machine that has it")
    return 0


def _list(cfg: Config, imgs: Sequence[Image]) -> int:
    used = in_use(cfg)
    for img in imgs:
        try:
            now = current(img.path) if os.path.lexists(img.path) else None
        except PbsChrootError as e:
            now = None
            print(f"{img.path}: {e.detail}")
        print(f"{img.path} (versions in {versions_dir(img)})")
        for version in versions(img):
            jobs = used.get(version, [])
            print(f"  {'*' if version == now else ' '} {os.path.basename(version)}"
                  + (f"  jobs: {' '.join(jobs)}" if jobs else ""))
    return 0
