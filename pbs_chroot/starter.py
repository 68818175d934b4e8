"""Torque's ``$job_starter``: build and install pbs_chroot's two starters, check the mom config.

Run as root by the admin (``pbs-chroot install``, ``check``, ``selftest``),
never by the hooks. pbs_mom execs ``$job_starter`` inside the chroot, as the
user, for every job (DESIGN.md): the host holds a pass-through starter at that
path, and every stage binds the no_new_privs one over it (stage.bind_set), so
jobs in an image can never gain privileges by an exec, while jobs on the host
keep their setuid helpers. Both hold a TM task of a job on several cores or
nodes until the task adopter has put it in the job's cgroup (built with
AWAIT_PLACEMENT_MS = 0 where the config has ``cgroups = no``: no cgroup comes).
The C source is starter/job_starter.c.
"""
from __future__ import annotations

import os
import subprocess
import tempfile

from .config import NNP_SUFFIX
from .errors import ConfigError, PbsChrootError, UserError
from .paths import resolve_admin_path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

    from .config import Config

__all__ = ["SOURCE", "AWAIT_PLACEMENT_MS", "nnp_path", "build", "install", "built_await",
           "mom_config_problem", "set_mom_config", "read_mom_config", "node_problem"]

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "starter", "job_starter.c")
_CC = ("cc", "gcc")
# Both execute-only: a process that execs a file its user cannot read is not
# dumpable, so the user cannot ptrace it before it has set no_new_privs, nor while
# it waits for its job's cgroup (job_starter.c).
_MODES = (0o711, 0o711)
# How long a TM task waits for its cgroup before it is refused (job_starter.c's default,
# which the RPM's prebuilt starters have).
AWAIT_PLACEMENT_MS = 10000
_MARKER = b"pbs-chroot-job-starter await_placement_ms="


def nnp_path(job_starter: str) -> str:
    """Where the no_new_privs starter lives beside the pass-through one."""
    return job_starter + NNP_SUFFIX


def build(dest: str, login_shell: bool = True,
          await_placement_ms: int = AWAIT_PLACEMENT_MS) -> tuple[str, str]:
    """Compile both starters, static, into directory ``dest``; return their paths.

    await_placement_ms: how long a TM task waits for its job's cgroup (0: never,
    for ``cgroups = no``).
    """
    out = (os.path.join(dest, "job_starter"), os.path.join(dest, "job_starter" + NNP_SUFFIX))
    for path, nnp, mode in zip(out, (False, True), _MODES):
        flags = [f"-DNO_NEW_PRIVS={int(nnp)}", f"-DLOGIN_SHELL={int(login_shell)}",
                 f"-DAWAIT_PLACEMENT_MS={int(await_placement_ms)}"]
        err = "no C compiler found"
        for cc in _CC:
            try:
                res = subprocess.run([cc, "-static", "-Os", "-s", "-Wall", *flags, "-o", path,
                                      SOURCE], capture_output=True, text=True, timeout=120,
                                     env={"PATH": "/usr/local/bin:/usr/bin:/bin"})
            except FileNotFoundError:
                continue
            except (OSError, subprocess.TimeoutExpired) as e:
                err = str(e)
                break
            if res.returncode == 0:
                break
            err = res.stderr.strip().splitlines()[-1:][0] if res.stderr.strip() else cc
        else:
            raise UserError(f"can't build the job starter ({err}): it needs a C compiler and "
                            "a static libc (Debian: gcc libc6-dev; EL: gcc glibc-static), or "
                            "prebuilt starters (--starters DIR, as the RPM installs them)")
        if not os.path.exists(path):
            raise UserError(f"can't build the job starter: {err}")
        os.chmod(path, mode)
    return out


def install(job_starter: str, prebuilt: Optional[str] = None, login_shell: bool = True,
            cgroups: bool = True) -> None:
    """Put both starters at ``job_starter`` and its -nnp sibling, root:root 0711,
    atomically.

    prebuilt: a directory holding job_starter and job_starter-nnp already built
    (e.g. by the RPM); else they are compiled from the package's C source.
    cgroups: the config's; without cgroups a TM task must not wait for one, and
    prebuilt starters that would are compiled anew instead.
    """
    dest = os.path.dirname(job_starter)
    os.makedirs(dest, mode=0o755, exist_ok=True)
    resolve_admin_path(dest)  # root's all the way up: pbs_mom runs what is there
    with tempfile.TemporaryDirectory(prefix="pbs_chroot-starter.") as tmp:
        built: tuple[str, ...] = ()
        if prebuilt:
            built = (os.path.join(prebuilt, "job_starter"),
                     os.path.join(prebuilt, "job_starter" + NNP_SUFFIX))
            for path in built:
                resolve_admin_path(path)
            if any((built_await(path) != 0) != cgroups for path in built):
                built = ()  # built for the other cgroups setting
        if not built:
            built = build(tmp, login_shell, AWAIT_PLACEMENT_MS if cgroups else 0)
        for src, dst, mode in zip(built, (job_starter, nnp_path(job_starter)), _MODES):
            if os.path.realpath(src) == os.path.realpath(dst):
                os.chmod(dst, mode)  # already in place (an RPM installed them there)
                continue
            with open(src, "rb") as f:
                _write(dst, f.read(), mode)


def built_await(path: str) -> Optional[int]:
    """The AWAIT_PLACEMENT_MS a starter binary was built with (None: not known, an older
    build). Reads the file, root's (resolve_admin_path) as the caller has checked."""
    try:
        with open(path, "rb") as f:
            data = f.read(4 << 20)
    except OSError:
        return None
    at = data.find(_MARKER)
    if at < 0:
        return None
    digits = data[at + len(_MARKER):at + len(_MARKER) + 8].split(b"\0", 1)[0]
    return int(digits) if digits.isdigit() else None


def read_mom_config(pbs_home: str) -> Optional[list[str]]:
    """The lines of PBS_HOME/mom_priv/config (None if there is none)."""
    try:
        with open(os.path.join(pbs_home, "mom_priv", "config"), encoding="utf-8",
                  errors="replace") as f:
            return f.read(1 << 20).splitlines()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"can't read {pbs_home}/mom_priv/config: {e.strerror}") from e


def _settings(lines: list[str]) -> dict[str, str]:
    """pbs_mom's ``$name value`` lines (the last one of a name wins, as in read_config)."""
    found = {}
    for line in lines:
        words = line.split(None, 1)
        if words and words[0].startswith("$"):
            found[words[0][1:].lower()] = words[1].strip() if len(words) > 1 else ""
    return found


def _is_true(value: str) -> bool:
    # Torque's setbool(): "t", "true", "on", "1" (any case) enable.
    return value[:1].lower() == "t" or value.lower() == "on" or value[:1] == "1"


def mom_config_problem(pbs_home: str, job_starter: str) -> str:
    """Why pbs_mom's config does not start jobs through our starter ('' if it does)."""
    lines = read_mom_config(pbs_home)
    if lines is None:
        return f"{pbs_home}/mom_priv/config missing: it needs `$job_starter {job_starter}`"
    settings = _settings(lines)
    if _is_true(settings.get("job_starter_run_privileged", "")):
        return (f"{pbs_home}/mom_priv/config sets $job_starter_run_privileged true: jobs "
                "would start as root inside their image; remove that line")
    if settings.get("job_starter") != job_starter:
        have = settings.get("job_starter")
        what = f"`$job_starter {have}`" if have else "no $job_starter line"
        return (f"{pbs_home}/mom_priv/config has {what}: jobs in an image would run "
                "without no_new_privs; want "
                f"`$job_starter {job_starter}` (pbs-chroot install writes it), then restart "
                "pbs_mom")
    return ""


def set_mom_config(pbs_home: str, job_starter: str, force: bool = False) -> bool:
    """Write ``$job_starter`` into mom_priv/config (the old file kept as config.orig);
    True if it changed. Refuses $job_starter_run_privileged true, and another
    site's starter unless ``force``."""
    path = os.path.join(pbs_home, "mom_priv", "config")
    lines = read_mom_config(pbs_home) or []
    settings = _settings(lines)
    if _is_true(settings.get("job_starter_run_privileged", "")):
        raise UserError(f"can't install: {path} sets $job_starter_run_privileged true, which "
                        "starts jobs as root inside their image; remove it first")
    have = settings.get("job_starter")
    if have == job_starter:
        return False
    if have and not force:
        raise UserError(f"can't install: {path} already starts jobs through `$job_starter "
                        f"{have}`; pbs_chroot needs its own there (use --force to replace it)")
    kept = [line for line in lines if line.split(None, 1)[:1] != ["$job_starter"]]
    text = "\n".join(kept + [f"$job_starter {job_starter}"]) + "\n"
    if os.path.exists(path):
        with open(path, "rb") as f:
            old = f.read()
        _write(path + ".orig", old, os.stat(path).st_mode & 0o777)
    _write(path, text.encode("utf-8"), 0o644)
    return True


def _write(path: str, data: bytes, mode: int) -> None:
    """``data`` into ``path``, root's with ``mode``, on disk before it takes the name."""
    tmp = f"{path}.new.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchown(fd, 0, 0)
        os.fchmod(fd, mode)
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def node_problem(cfg: Config) -> str:
    """Why Torque jobs in an image would not get no_new_privs on this node ('' if they do)."""
    if not os.path.isdir(os.path.join(cfg.pbs_home, "mom_priv")):
        return ""  # not a Torque mom (run, or another batch system): the shim sets it
    if not cfg.job_starter:
        return (f"job_starter = none, but {cfg.pbs_home} is a pbs_mom's: jobs in an image "
                "would run without no_new_privs (set job_starter, run pbs-chroot install)")
    for path in (cfg.job_starter, cfg.nnp_starter()):
        try:
            resolve_admin_path(path)
        except PbsChrootError as e:
            return f"{e.detail} (pbs-chroot install puts the starters there)"
        if not os.access(path, os.X_OK):
            return f"{path} is not executable (pbs-chroot install puts the starters there)"
        waits = built_await(path)
        if waits is None or (waits != 0) != cfg.cgroups:
            how = ("an older build that does not wait for the job's cgroup" if waits is None
                   else "built to wait for the job's cgroup" if waits else
                   "built not to wait for the job's cgroup")
            return (f"{path} is {how}, but the config has cgroups = "
                    f"{'yes' if cfg.cgroups else 'no'}: TM tasks would "
                    f"{'run outside their cgroup' if cfg.cgroups else 'be refused'}; "
                    "run pbs-chroot install again")
    return mom_config_problem(cfg.pbs_home, cfg.job_starter)
