"""Shared stages: jobs of one image version on a node share one set of mounts.

Run as root by the hooks and the runner. Membership is the set of job ids on
disk (STATE_DIR/stages/KEY/members/JOBID), changed only under the node lock:
the first job in sets the stage up, the last one out tears it down. A crash
cannot skew a set the way it skews a counter, and a half-built stage is
recognised (its info.json never reached "ready") and rebuilt or removed.
"""
from __future__ import annotations

import os
import stat
import time

from . import entry, faults, gate, homes, identity, mounts
from .config import BindSpec
from .errors import StateError
from .log import get_logger
from .paths import check_version_private, resolve_admin_path, resolve_in_tree
from .state import check_job_id, node_lock, read_json, write_json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Optional, Sequence

    from .config import Config

__all__ = ["stage_dir", "bind_set", "all_binds", "jobs_dir", "join", "join_image",
           "join_locked", "leave", "leave_all", "sweep", "sweep_idle", "pending_teardowns",
           "idle_deadline", "idle_mark", "unlink_quietly", "members", "memberships",
           "version_of"]

log = get_logger(__name__)

_AUDIT_SECONDS = 10
_ID_FILES = ("/etc/passwd", "/etc/group")
_SHADOW_FILES = ("/etc/shadow", "/etc/gshadow")
# Where Torque installs pbs_demux (its DEMUX path: --sbindir of a package or of
# a build from source).
DEMUX_PATHS = ("/usr/sbin/pbs_demux", "/usr/local/sbin/pbs_demux", "/sbin/pbs_demux",
               "/opt/torque/sbin/pbs_demux")
_NSCD = "/var/run/nscd"
_IDLE = "idle"  # in a stage's directory: its last job left; holds the teardown deadline
# Stages this process marked idle: (version, deadline), for deferred.spawn_worker.
_pending: list[tuple[str, float]] = []


def stage_dir(cfg: Config, version: str) -> str:
    """The state directory of the stage of ``version``: its path, escaped, so one per path."""
    # (No hashlib: loading OpenSSL costs every job ~3 ms.)
    name = version.replace("%", "%25").replace("/", "%2F")
    if len(os.fsencode(name)) > 250:
        raise StateError(f"image version path too long for a stage name: {version}")
    return os.path.join(cfg.state_dir, "stages", name)


def jobs_dir(cfg: Config) -> str:
    """pbs_mom's job directory (the job script is there): in every stage."""
    return os.path.join(cfg.pbs_home, "mom_priv", "jobs")


def all_binds(cfg: Config) -> tuple[BindSpec, ...]:
    """Every bind a stage of this node may have, whatever an image's identity mode:
    what `image build`/`deploy` make mount points for."""
    seen: dict[str, BindSpec] = {}
    for mode in ("host", "generated", "nscd"):
        for spec in bind_set(cfg, GENERATED_SDIR, mode):
            seen.setdefault(spec.target, spec)
    return tuple(seen.values())


# Stands for a stage's own directory in all_binds(): the files there are the stage's.
GENERATED_SDIR = "/nonexistent/pbs_chroot-stage"


def bind_set(cfg: Config, sdir: str = "", mode: str = "host",
             version: str = "") -> tuple[BindSpec, ...]:
    """The config's binds plus Torque's job directory, read-only (the job script is there).

    Not noexec: the job's shell reads the script's path on stdin and executes it.
    mode (identity.MODES) "generated": /etc/passwd and /etc/group come from the
    stage's own files in ``sdir``, and so do /etc/shadow and /etc/gshadow where
    the image at ``version`` has them; "nscd": the image keeps its own files and
    gets the host's nscd socket directory; "host": the config's binds as they are.
    """
    jobs = jobs_dir(cfg)
    binds = cfg.binds
    if mode != "host":
        binds = tuple(b for b in binds if b.target not in _ID_FILES)
    if mode == "generated":
        binds += tuple(BindSpec(target=t, source=os.path.join(sdir, os.path.basename(t)),
                                readonly=True, noexec=True) for t in _ID_FILES)
        # Every password locked: nothing in the image can authenticate as anyone.
        # Only over the files the image has (``version``): a missing one holds
        # no password to cover, and the version is never written to for it.
        binds = tuple(b for b in binds if b.target not in _SHADOW_FILES)
        binds += tuple(BindSpec(target=t, source=os.path.join(sdir, os.path.basename(t)),
                                readonly=True, noexec=True, optional=True)
                       for t in _SHADOW_FILES if version and os.path.lexists(version + t))
    elif mode == "nscd" and not any(b.target == _NSCD for b in binds):
        binds += (BindSpec(target=_NSCD, source=_NSCD, readonly=True, optional=True),)
    if cfg.tmpdir and not any(b.target == cfg.tmpdir for b in binds):
        # Each job's $TMPDIR is a directory pbs_mom makes below this base:
        # bound whole (rec), so jobs that start later find theirs without a
        # mount of their own, at the same path as on the host.
        binds += (BindSpec(target=cfg.tmpdir, source=cfg.tmpdir, rec=True),)
    if cfg.job_starter:
        # pbs_mom execs $job_starter inside the chroot: here it is the one that
        # sets no_new_privs (starter/job_starter.c).
        binds += (BindSpec(target=cfg.job_starter, source=cfg.nnp_starter(), readonly=True),)
        # For a job on several nodes pbs_mom also execs its pbs_demux in the
        # image, as the user, and not through the starter: a pbs_demux of the
        # image's would run without no_new_privs. The starter covers it; run
        # with no arguments it execs nothing.
        binds += tuple(BindSpec(target=d, source=cfg.nnp_starter(), readonly=True)
                       for d in _demux_in(version))
    return binds + (BindSpec(target=jobs, source=jobs, readonly=True, optional=True),)


def _demux_in(version: str) -> list[str]:
    """The pbs_demux files of the image at ``version``, as paths inside it, links resolved."""
    found = []
    for path in DEMUX_PATHS if version else ():
        real = resolve_in_tree(version, path)
        if real is not None and os.path.isfile(real):
            found.append(real[len(version.rstrip("/")):])
    return sorted(set(found))


def members(sdir: str) -> list[str]:
    """Job ids in a stage."""
    try:
        return sorted(os.listdir(os.path.join(sdir, "members")))
    except FileNotFoundError:
        return []


def join(cfg: Config, job_id: str, version: str, user: str = "", image: str = "") -> None:
    """Add ``job_id`` (of ``user``) to the stage of ``version``, setting the stage up if needed.

    image: the allowlisted path ``version`` is of ('' = the config's defaults).
    """
    check_job_id(job_id)
    with node_lock(cfg.state_dir, cfg.lock_timeout):
        join_locked(cfg, [job_id], version, [user], image)


def join_image(cfg: Config, job_id: str, image: str, user: str = "") -> str:
    """Join the stage of the version ``image`` points to now; return that version.

    The symlink is resolved (and the version audited) under the node lock,
    which image switches take too: a switch either comes before, and this
    job gets the new version, or after, and the switch makes this job (its
    record exists by now) a member of the new version as well, since
    pbs_mom resolves the allowlisted path again when it chroots.
    """
    check_job_id(job_id)
    with node_lock(cfg.state_dir, cfg.lock_timeout):
        version = resolve_admin_path(image)
        check_version_private(version)
        join_locked(cfg, [job_id], version, [user], image)
    return version


def join_locked(cfg: Config, job_ids: Sequence[str], version: str,
                users: Sequence[str] = (), image: str = "") -> None:
    """join() for several jobs (``users``: their owners, in order), for a caller that holds
    the node lock."""
    sdir = stage_dir(cfg, version)
    mode = cfg.identity_of(image)
    if mode == "generated":
        identity.prepare(sdir)
    steps = mounts.with_mount_points(
        version, mounts.plan(version, bind_set(cfg, sdir, mode, version)), jobs_dir(cfg))
    info = read_json(os.path.join(sdir, "info.json"))
    problem = _problem(info, version, steps)
    if problem and _in_use(sdir, info, version):
        # Never pull mounts from under running jobs: the stage stays as it
        # is (e.g. made before a config change) until its last job leaves.
        log.warning("stage %s differs from its plan (%s); %d job(s) use it, so it is "
                    "kept as it is until they have left", version, problem,
                    len(members(sdir)))
        # ... but a new job never starts without no_new_privs: the starter's
        # binds are added to it (a stage made before the job starter was).
        _add_starter_binds(cfg, version, steps, info)
        if isinstance(info, dict) and info.pop("targets", None) is not None:
            write_json(os.path.join(sdir, "info.json"), info)  # no shell remembered here
    elif problem:
        _build(cfg, sdir, version, steps, info, mode)
    faults.point("stage:ready")
    unlink_quietly(os.path.join(sdir, _IDLE))  # in use again: no deferred teardown may take it
    for job_id, user in zip(job_ids, list(users) + [""] * (len(job_ids) - len(users))):
        _touch(os.path.join(sdir, "members", job_id), user)
        log.info("job %s joined stage %s", job_id, version)
    identity.refresh(sdir, cfg.identity_cache)
    entry.refresh(cfg, sdir, image, job_ids)  # its users may enter it without root
    for user in sorted(set(users) - {""}):
        # Homes and work directories that are links on the host (homes.py).
        for path in [_home_of(user)] + [d.replace("%u", user) for d in cfg.user_dirs]:
            if path and "/" not in user:
                homes.ensure_home(version, sdir, path)


def _add_starter_binds(cfg: Config, version: str, steps: list[mounts.MountStep],
                       info: Optional[Any]) -> None:
    if not cfg.job_starter:
        return
    mounted = {m.mount_point for m in mounts.mounts_below(version, mounts.read_mountinfo(),
                                                          _keep(info))}
    for step in steps:
        if step.spec.source == cfg.nnp_starter() and step.target not in mounted:
            resolve_admin_path(cfg.nnp_starter())
            mounts.mount_step(version, step)
            log.warning("stage %s was up without the job starter at %s: bound it there",
                        version, step.spec.target)


def leave(cfg: Config, job_id: str, version: str) -> bool:
    """Remove ``job_id`` from the stage; tear it down if it was the last. True if torn down."""
    check_job_id(job_id)
    with node_lock(cfg.state_dir, cfg.lock_timeout):
        return _leave_locked(cfg, job_id, stage_dir(cfg, version))


def leave_all(cfg: Config, job_id: str) -> list[str]:
    """Remove ``job_id`` from every stage it is in (more than one after an image switch).

    Returns the versions left.
    """
    check_job_id(job_id)
    base = os.path.join(cfg.state_dir, "stages")
    with node_lock(cfg.state_dir, cfg.lock_timeout):
        left = []
        for name in _listdir(base):
            sdir = os.path.join(base, name)
            if os.path.lexists(os.path.join(sdir, "members", job_id)):
                left.append(version_of(sdir))
                _leave_locked(cfg, job_id, sdir)
    return sorted(v for v in left if v)


def memberships(cfg: Config, job_id: str) -> list[str]:
    """The versions whose stages have ``job_id`` as a member."""
    base = os.path.join(cfg.state_dir, "stages")
    found = (version_of(os.path.join(base, n)) for n in _listdir(base)
             if os.path.lexists(os.path.join(base, n, "members", job_id)))
    return sorted(v for v in found if v)


def version_of(sdir: str) -> str:
    """The version a stage state directory is of ('' if unknown)."""
    return _version_in(read_json(os.path.join(sdir, "info.json")))


def _version_in(info: Optional[Any]) -> str:
    ok = isinstance(info, dict) and isinstance(info.get("version"), str)
    return info["version"] if ok else ""  # type: ignore[index]


def _leave_locked(cfg: Config, job_id: str, sdir: str) -> bool:
    try:
        os.unlink(os.path.join(sdir, "members", job_id))
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StateError(f"can't remove member {job_id} of {sdir}: {e.strerror}") from e
    entry.forget(cfg, job_id, sdir)
    faults.point("stage:member_removed")
    left = members(sdir)
    info = read_json(os.path.join(sdir, "info.json"))
    version = _version_in(info) or sdir
    if left or (cfg.keep_stage and _is_ready(info)):
        identity.refresh(sdir, cfg.identity_cache)
        entry.refresh(cfg, sdir)
        log.info("job %s left stage %s (%d job(s) remain)", job_id, version, len(left))
        return False
    if cfg.stage_grace > 0 and _is_ready(info):
        deadline = time.time() + cfg.stage_grace
        _touch(os.path.join(sdir, _IDLE), f"{deadline:.6f}\n")  # on disk before any worker
        faults.point("stage:idle_marked")
        identity.refresh(sdir, cfg.identity_cache)
        from .deferred import worker_alive
        if not worker_alive(sdir):  # one worker per stage: a live one waits on
            _pending.append((version, deadline))
        log.info("job %s left stage %s, the last one: kept %g s more", job_id, version,
                 cfg.stage_grace)
        return False
    _destroy(sdir, version)
    log.info("job %s left stage %s, the last one: torn down", job_id, version)
    return True


def sweep(cfg: Config, version: str) -> bool:
    """Tear down the stage of ``version`` if it has no members (and policy allows): not
    before the deadline of an idle stage's grace period."""
    sdir = stage_dir(cfg, version)
    with node_lock(cfg.state_dir, cfg.lock_timeout):
        if not os.path.isdir(sdir) or members(sdir) or cfg.keep_stage:
            return False
        deadline = idle_deadline(sdir)
        if deadline is not None and deadline > time.time():
            return False
        _destroy(sdir, version)
    log.info("stage %s had no jobs left: torn down", version)
    return True


def sweep_idle(cfg: Config, version: str) -> bool:
    """The deferred teardown (deferred.py): tear down the stage of ``version`` if it is
    still idle (no job joined since it was marked) and its deadline has passed."""
    sdir = stage_dir(cfg, version)
    with node_lock(cfg.state_dir, cfg.lock_timeout):
        deadline = idle_deadline(sdir)
        if deadline is None or deadline > time.time() or members(sdir) or cfg.keep_stage:
            return False
        _destroy(sdir, version)
    log.info("stage %s idle for its grace period: torn down", version)
    return True


def idle_deadline(sdir: str) -> Optional[float]:
    """When an idle stage is to be torn down (None: not idle); unreadable: now."""
    try:
        with open(os.path.join(sdir, _IDLE), "rb") as f:
            text = f.read(64).decode("ascii", "replace").strip()
    except FileNotFoundError:
        return None
    except OSError:
        return 0.0
    try:
        return float(text)
    except ValueError:
        return 0.0


def idle_mark(sdir: str) -> str:
    """The file that marks a stage idle (its content: the teardown deadline)."""
    return os.path.join(sdir, _IDLE)


def pending_teardowns() -> list[tuple[str, float]]:
    """The stages this process marked idle since the last call: (version, deadline)."""
    out = list(_pending)
    del _pending[:]
    return out


def unlink_quietly(path: str) -> None:
    """Remove a file of the state directory; fine if it is gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StateError(f"can't remove {path}: {e.strerror}") from e


def _is_ready(info: Optional[Any]) -> bool:
    return isinstance(info, dict) and info.get("state") == "ready"


def _keep(info: Optional[Any]) -> frozenset[int]:
    return frozenset(info.get("pre", ())) if isinstance(info, dict) else frozenset()


def _problem(info: Optional[Any], version: str, steps: list[mounts.MountStep]) -> str:
    """Why the stage is not as planned ('' if it is)."""
    if not _is_ready(info):
        return "not set up"
    try:
        mounts.verify(version, steps, _keep(info))
    except mounts.MountError as e:
        return e.detail
    return ""


def _in_use(sdir: str, info: Optional[Any], version: str) -> bool:
    """Jobs are in the stage and its root is still mounted (there is something to keep)."""
    if not _is_ready(info) or not members(sdir):
        return False
    table = mounts.mounts_below(version, mounts.read_mountinfo(), _keep(info))
    return any(m.mount_point == version for m in table)


def _build(cfg: Config, sdir: str, version: str, steps: list[mounts.MountStep],
           info: Optional[Any], mode: str = "host") -> None:
    if info is not None:
        if isinstance(info, dict) and isinstance(info.get("entry"), str):
            entry.withdraw(info["entry"])
        mounts.teardown(version, _keep(info))  # a half-built or damaged stage
    table = mounts.read_mountinfo()
    mounts.check_base(version, table)
    keep = frozenset(m.mount_id for m in mounts.mounts_below(version, table))
    for sub in ("", "members"):
        try:
            os.mkdir(os.path.join(sdir, sub), 0o700)
        except FileExistsError:
            pass
    info = {"version": version, "state": "setting-up", "pre": sorted(keep),
            "entry": entry.path_of(cfg, sdir),
            # What it mounts where: the shells remembered in it are keyed on it (shells.py).
            "targets": sorted(s.spec.target for s in steps)}
    write_json(os.path.join(sdir, "info.json"), info)  # before the first mount
    faults.point("stage:info_written")
    _report_setuid(cfg, version)
    if cfg.job_starter:  # every job in the stage will exec it, as the user
        resolve_admin_path(cfg.nnp_starter())
    if mode == "generated":  # the image's own files, before the stage covers them
        identity.snapshot_image(version, sdir)
    log.info("setting up stage %s: %s", version, "; ".join(s.describe() for s in steps))
    mounts.apply(version, steps, keep)
    entry.publish(cfg, sdir, version)
    # Marked after the mounts: making mount points changes the version's ctime.
    _touch(_audit_mark(cfg, version))
    info["state"] = "ready"
    write_json(os.path.join(sdir, "info.json"), info)


def _destroy(sdir: str, version: str) -> None:
    info = read_json(os.path.join(sdir, "info.json"))
    # info.json is written before the first mount: without it we mounted
    # nothing here, and whatever is mounted there is not ours to remove.
    if isinstance(info, dict) and isinstance(info.get("entry"), str):
        entry.withdraw(info["entry"])  # before the stage: it is a copy of its mounts
    n = mounts.teardown(version, _keep(info)) if info is not None else 0
    faults.point("stage:unmounted")
    # Whatever a killed writer left (info.json.tmp.PID) goes too.
    leftovers = [os.path.join(sdir, n) for n in _listdir(sdir) if n != "members"]
    for path in leftovers + [os.path.join(sdir, "members"), sdir]:
        try:
            (os.rmdir if os.path.isdir(path) else os.unlink)(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StateError(f"can't remove stage state {path}: {e.strerror}") from e
    log.info("stage %s torn down (%d mounts)", version, n)


def _home_of(user: str) -> str:
    import pwd
    try:
        return pwd.getpwnam(user).pw_dir
    except KeyError:
        return ""


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _touch(path: str, content: str = "") -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if content:
                os.ftruncate(fd, 0)
                os.write(fd, content.encode("utf-8"))
        finally:
            os.close(fd)
    except OSError as e:
        raise StateError(f"can't add member {path}: {e.strerror}") from e


def _audit_mark(cfg: Config, version: str) -> str:
    st = os.stat(version)
    return os.path.join(cfg.state_dir, "audit", f"{st.st_dev}-{st.st_ino}-{st.st_ctime_ns}")


def _report_setuid(cfg: Config, version: str) -> None:
    """Log setuid/setgid files of a version once (the stage is nosuid: for the admin).

    Runs under the node lock, so it stays on the version's file system and
    stops after _AUDIT_SECONDS, saying so.
    """
    if os.path.exists(_audit_mark(cfg, version)) or os.statvfs(version).f_flag & os.ST_NOSUID:
        return  # seen, or on a nosuid file system (CVMFS): nothing to neutralise
    dev, deadline = os.stat(version).st_dev, time.monotonic() + _AUDIT_SECONDS
    found: list[str] = []
    for top, dirs, files in os.walk(version):
        if time.monotonic() > deadline:
            log.warning("image %s: setuid audit stopped after %d s (run `pbs-chroot check`)",
                        version, _AUDIT_SECONDS)
            break
        dirs[:] = [d for d in dirs if _same_dev(os.path.join(top, d), dev)]
        for name in files:
            try:
                mode = os.lstat(os.path.join(top, name)).st_mode
            except OSError:
                continue
            if stat.S_ISREG(mode) and mode & (stat.S_ISUID | stat.S_ISGID):
                found.append(os.path.join(top, name)[len(version):])
    if found:
        log.warning("image %s has %d setuid/setgid file(s), neutralised by nosuid: %s",
                    version, len(found), gate.show(", ".join(found[:20])))


def _same_dev(path: str, dev: int) -> bool:
    try:
        return os.lstat(path).st_dev == dev
    except OSError:
        return False
