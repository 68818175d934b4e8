"""The admin CLI, ``pbs-chroot``: install, check, run, cleanup, selftest, image, report.

Run as root by a site admin. Trusts its arguments; refuses a config or an
image that is not root-owned and protected. Exit codes: 0 success, 2 bad
arguments or a refused request, 1 a site fault.
"""
import argparse
import logging
import os
import signal
import sys
from typing import Optional, Sequence, Union

from . import config as config_mod
from . import gate, lifecycle, log, report
from .errors import ConfigError, PbsChrootError, UserError
from .filterinstall import read_head
from .paths import check_version_private, resolve_admin_path
from .state import ensure_layout

__all__ = ["main", "render_hook", "install", "check_library"]

logger = logging.getLogger("pbs_chroot.admin")

HOOKS = {"prologue": "prologue_main", "epilogue": "epilogue_main",
         "prologue.parallel": "prologue_main", "epilogue.parallel": "epilogue_main"}
_MARKER = "from pbs_chroot.hooks import"
_TEMPLATE = '''#!{python} -IS
"""pbs_mom {kind} (also installed as {kind}.parallel): {what}.

pbs_mom runs this as root {when} the job. `pbs-chroot install` writes it into
mom_priv as root:root 0500 with the site's paths below. -IS: no site module
(it costs every job ~15 ms); the sys.path entry is where install found the package,
checked root-only. All logic lives in pbs_chroot.hooks.
"""
import os
import sys

CONFIG = "{config}"
PBSNODES = "{pbsnodes}"
SYSLOG = "{syslog}"  # until the config names its own (a refused config can't)
sys.path.append("{libdir}")

{marker} {func}  # noqa: E402

rc = {func}(sys.argv, CONFIG, PBSNODES, SYSLOG)
try:  # os._exit: no interpreter teardown (~2 ms a job), so flush first
    sys.stdout.flush()
    sys.stderr.flush()
finally:
    os._exit(rc)
'''
MOM_CONFIG_ADVICE = """\
{starter}
# Add to {mom_priv}/config, then restart pbs_mom:
#
# The prologue asks the server for the job's variables (pbs_python or qstat)
# and sets up the image: give it time, but less than Torque's default 300 s.
$prologalarm 120
#
# Never set `$job_starter_run_privileged true`: pbs_mom would then start
# the job as root inside the image (install refuses a config that does).
"""


def render_hook(name: str, python: str = "/usr/bin/python3",
                config: str = config_mod.DEFAULT_PATH, pbsnodes: str = "/usr/bin/pbsnodes",
                libdir: str = "/usr/lib/python3/dist-packages", syslog: str = "/dev/log") -> str:
    """The text of an installed entry script (prologue/prologue is this, with the defaults)."""
    kind = name.split(".")[0]
    what = "the pbs_chroot gate" if kind == "prologue" else "pbs_chroot teardown"
    for value in (python, config, pbsnodes, libdir, syslog):
        if not value.startswith("/") or not value.isprintable() or '"' in value or "\\" in value:
            raise UserError(f"can't install: {value!r} must be an absolute, plain path")
    return _TEMPLATE.format(python=python, kind=kind, what=what,
                            when="before" if kind == "prologue" else "after", config=config,
                            pbsnodes=pbsnodes, libdir=libdir, marker=_MARKER, func=HOOKS[name],
                            syslog=syslog)


def install(pbs_home: str, config: str, pbsnodes: str, python: str, force: bool,
            starters: Optional[str] = None, syslog: str = "/dev/log") -> str:
    """Write the four hooks into PBS_HOME/mom_priv, the job starters and the $job_starter
    line; return the mom config advice.

    starters: a directory of prebuilt job_starter and job_starter-nnp (else
    they are compiled here).
    """
    from . import starter
    mom_priv = os.path.join(pbs_home, "mom_priv")
    if not os.path.isdir(mom_priv):
        raise UserError(f"can't install: {mom_priv} is not a directory (is {pbs_home} "
                        "pbs_mom's PBS_HOME?)")
    libdir = _check_importable(python)
    from . import hookinstall
    for name in HOOKS:
        path = os.path.join(mom_priv, name)
        if os.path.lexists(path) and not force and _MARKER not in read_head(path) \
                and not hookinstall.is_client(path):
            raise UserError(f"can't install: {path} exists and is not ours; "
                            "move it away or use --force")
    cfg, changed = None, False
    try:
        cfg = config_mod.load(config)
    except ConfigError as e:
        logger.warning("hooks installed, but the config is not usable yet: %s", e.detail)
    job_starter = cfg.job_starter if cfg is not None else config_mod.DEFAULT_JOB_STARTER
    if job_starter:
        # Before the hooks: a mom config that starts jobs privileged is refused first.
        settings = starter.read_mom_config(pbs_home) or []
        login = not any(line.split()[:2] == ["$source_login_batch", "false"]
                        for line in settings)
        starter.install(job_starter, starters, login, cfg is None or cfg.cgroups)
        changed = starter.set_mom_config(pbs_home, job_starter, force)
    server = cfg.hook_server if cfg is not None else ""
    _write_hooks(mom_priv, server, cfg is not None and cfg.cgroups,
                 [render_hook(name, python, config, pbsnodes, libdir, syslog) for name in HOOKS],
                 syslog, starters)
    if cfg is not None:
        ensure_layout(cfg.state_dir)
    note = (f"# Job starters installed: {job_starter} (pass-through, on the host) and "
            f"{starter.nnp_path(job_starter)}\n# (bound over it in every stage: no_new_privs)."
            f"\n# {mom_priv}/config {'now has' if changed else 'already had'} "
            f"`$job_starter {job_starter}`"
            + (" (the old file is config.orig)" if changed else "") + "." if job_starter
            else "# job_starter = none in the config: no job starter installed (not a "
            "Torque node?).")
    if server:
        note += (f"\n# Hook server clients installed (hook_server = {server}), the Python hooks "
                 "beside them as NAME.py;\n# start the server before pbs_mom: systemctl "
                 "enable --now pbs-chroot-hookd (examples/).")
    return MOM_CONFIG_ADVICE.format(mom_priv=mom_priv, starter=note)


def _write_hooks(mom_priv: str, server: str, cgroups: bool, texts: list[str],
                 syslog: str, starters: Optional[str]) -> None:
    """The Python hooks as the hooks; or, with a hook server, its C clients as the hooks
    and the Python hooks beside them as NAME.py (which the clients fall back to)."""
    from . import hookinstall
    client = None
    if server:
        client = hookinstall.prebuilt(starters, server, syslog) or hookinstall.build(
            server, mom_priv, syslog, hookinstall.kick_target() if cgroups else None)
    for name, text in zip(HOOKS, texts):
        path = os.path.join(mom_priv, name)
        beside = hookinstall.python_path(path)
        if client is not None:  # the Python hook first: the client runs it if need be
            _write_root_file(beside, text)
            _write_root_file(path, client)
        else:
            _write_root_file(path, text)
            if os.path.lexists(beside) and _MARKER in read_head(beside):
                os.unlink(beside)  # hook_server was on before


def _write_root_file(path: str, content: Union[str, bytes], mode: int = 0o500) -> None:
    # pbs_mom runs only a root-owned regular file that is not group/other
    # writable: write it that way, then rename over the old one.
    tmp = f"{path}.new.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o500)
    with os.fdopen(fd, "wb") as f:
        os.fchown(f.fileno(), 0, 0)
        os.fchmod(f.fileno(), mode)
        f.write(content.encode() if isinstance(content, str) else content)
    os.replace(tmp, path)


def _check_importable(python: str) -> str:
    """Where ``python`` finds our package; checked root-only, and importable with -IS from there.

    The hooks run as root and import it: a module others can write is root for them.
    """
    probe = "import os, pbs_chroot; print(os.path.dirname(pbs_chroot.__file__))"
    libdir = check_library(_probe(python, "-I", probe, "cannot import pbs_chroot"))
    _probe(python, "-IS", f"import sys; sys.path.append({libdir!r}); import pbs_chroot.hooks",
           f"cannot import pbs_chroot.hooks from {libdir} without the site module")
    return libdir


def check_library(pkg: str) -> str:
    """The directory holding package ``pkg``, if only root can change what the hooks import.

    Ancestors may be sticky (a checkout under /tmp); the library directory may
    not: anyone could add e.g. pbs.py there, which a hook imports as root.
    """
    libdir = os.path.dirname(pkg)
    resolve_admin_path(libdir, sticky_ok=True)  # the last component strictly
    resolve_admin_path(pkg, sticky_ok=True)
    for name in os.listdir(pkg):
        st = os.lstat(os.path.join(pkg, name))
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise UserError(f"can't install: {pkg}/{name} must be root-owned and not "
                            "writable by group or others: the hooks import it as root")
    return libdir


def _probe(python: str, flags: str, code: str, what: str) -> str:
    import subprocess
    try:
        res = subprocess.run([python, flags, "-c", code], capture_output=True, text=True,
                             env={"PATH": "/bin:/usr/bin"}, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"can't install: can't run {python}: {e}") from e
    if res.returncode != 0:
        raise UserError(f"can't install: {python} {flags} {what} "
                        f"({res.stderr.strip().splitlines()[-1:]}); install the package "
                        "into that interpreter first")
    return res.stdout.strip()


def run(cfg_path: str, image: str, user: Optional[str], cmd: Sequence[str]) -> int:
    """Run ``cmd`` in ``image`` as ``user`` the way a job would run; return its status."""
    from . import shim
    cfg = config_mod.load(cfg_path)
    log.use_socket(cfg.syslog_socket)
    user = user or _default_user()
    _check_run_user(user)  # before any stage, cgroup or accounting line
    allowed = gate.check_value(image, cfg, user, "local")
    # A random part: nobody can foresee the id, so nobody can plant its names
    # (its TMPDIR, say) beforehand. The pid stays second: the reconciler reads it.
    job = lifecycle.Job(f"run-{os.getpid()}-{os.urandom(6).hex()}."
                        f"{os.uname().nodename.split('.')[0]}", user, _primary_group(user),
                        "local", "")
    ensure_layout(cfg.state_dir)
    # As pbs_mom does with its $tmpdir: a directory of the job's own, its $TMPDIR.
    scratch = _make_job_tmpdir(cfg.tmpdir, job.job_id, user) if cfg.tmpdir else None
    env = [f"PBS_JOBID={job.job_id}"] + ([f"TMPDIR={scratch}"] if scratch else [])
    # The child waits until it is in the job's cgroup and is told the version
    # whose stage the job joined, then becomes the shim and chroots into it.
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(go_w)
        try:
            root = os.read(go_r, 65536).decode()
            if root:
                shim.enter_and_exec(shim.ShimArgs(
                    ["--root", root, "--user", user]
                    + [a for kv in env for a in ("--setenv", kv)] + ["--", *cmd]))
        except shim.ShimError as e:
            shim._die(shim.SETUP_FAILED, str(e))
        finally:
            os._exit(shim.SETUP_FAILED)
    os.close(go_r)
    status = 125
    try:
        try:
            version = lifecycle.start_job(cfg, job, allowed.path, pid)
        except BaseException:
            os.close(go_w)
            os.waitpid(pid, 0)
            raise
        assert version is not None
        os.write(go_w, version.encode())
        os.close(go_w)
        status = _wait_forwarding(pid)
    finally:
        acct = lifecycle.end_job(cfg, job.job_id, str(status))
        _remove_empty_cgroup_parent(cfg)
        if scratch:  # its processes are gone: end_job killed what was left
            import shutil
            shutil.rmtree(scratch, ignore_errors=True)  # fd-based: follows no link
    if acct and acct.get("oom_kills"):
        from .hooks import oom_message
        print(f"pbs-chroot: job {job.job_id}: {oom_message(acct)}", file=sys.stderr)
    print(f"pbs-chroot: job {job.job_id} in {image} as {user} exited with status {status}",
          file=sys.stderr)
    return status


def _make_job_tmpdir(base: str, job_id: str, user: str) -> str:
    """BASE/JOB_ID, the user's, mode 0700, made below an fd of ``base`` (no link followed).

    The base is world-writable like /tmp: a name someone made there first
    (however they guessed it) is left alone, and a fresh random one used.
    """
    import pwd
    import stat
    pw = pwd.getpwnam(user)
    bfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        mode = os.fstat(bfd).st_mode
        if mode & 0o002 and not mode & stat.S_ISVTX:
            raise ConfigError(f"tmpdir {base} is writable by others but not sticky: anyone "
                              "could swap a job's directory there (chmod +t it)")
        name = job_id
        for _ in range(8):
            try:
                os.mkdir(name, 0o700, dir_fd=bfd)
                break
            except FileExistsError:
                name = f"{job_id}.{os.urandom(4).hex()}"
        else:
            raise FileExistsError(17, "every name tried exists", base)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=bfd)
        try:
            st = os.fstat(fd)  # the directory made just now, and not one put in its place
            if st.st_uid != 0 or st.st_nlink != 2 or os.listdir(fd):
                raise FileExistsError(17, "replaced after it was made", f"{base}/{name}")
            os.fchown(fd, pw.pw_uid, pw.pw_gid)
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
    except OSError as e:
        raise UserError(f"can't make the job's TMPDIR in {base}: {e.strerror}") from e
    finally:
        os.close(bfd)
    return os.path.join(base, name)


def _primary_group(user: str) -> str:
    import grp
    import pwd
    try:
        return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
    except KeyError:
        return ""


def _remove_empty_cgroup_parent(cfg: config_mod.Config) -> None:
    """The job's cgroup is gone: our parent too, unless other jobs have theirs in it."""
    if not cfg.cgroups:
        return
    from . import cgroups
    try:
        cgroups.remove_parent_if_empty(cgroups.detect(), cfg.cgroup_parent)
    except PbsChrootError as e:
        logger.warning("cgroup parent %s left: %s", cfg.cgroup_parent, e.detail)


def _check_run_user(user: str) -> None:
    """A job user must exist on this node and not be root (UserError: exit 2)."""
    import pwd
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise UserError(f"run: no user {user!r} on this node") from None
    if pw.pw_uid == 0:
        raise UserError(f"run: refusing to run a job as {user!r} (uid 0): jobs never run "
                        "as root")


def _default_user() -> str:
    sudo = os.environ.get("SUDO_USER", "")
    return sudo if sudo and sudo != "root" else "nobody"


def _wait_forwarding(pid: int) -> int:
    """Wait for the job, passing SIGINT/SIGTERM/SIGHUP on to its process group.

    The shim makes the job a session (and group) leader of its own: a Ctrl-C on the
    admin's terminal reaches only this process, so it is sent on to the whole group.
    """
    def forward(signum: int, _frame: object) -> None:
        try:
            os.killpg(pid, signum)
        except (ProcessLookupError, PermissionError):
            try:  # not yet a group leader (before the shim's setsid)
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        _, wstatus = os.waitpid(pid, 0)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    code = os.waitstatus_to_exitcode(wstatus)
    return code if code >= 0 else 128 - code


def check(cfg_path: str) -> int:
    """Validate the config and every image path; print one line per image."""
    cfg = config_mod.load(cfg_path)
    print(f"config {cfg.path}: OK ({len(cfg.images)} image(s), {len(cfg.binds)} bind(s))")
    if not cfg.images:
        print(f"WARNING: {cfg.path} allowlists no image ([image PATH] sections): every job "
              "that asks for one will be refused")
    bad = 0
    for img in cfg.images:
        try:
            version = resolve_admin_path(img.path)
            check_version_private(version)
            print(f"image {img.path} -> {version}: OK")
        except PbsChrootError as e:
            bad += 1
            print(f"image {img.path}: REFUSED: {e.detail}")
    from .starter import node_problem
    problem = node_problem(cfg)
    if problem:
        bad += 1
        print(f"job starter: REFUSED: {problem}")
    elif not os.path.isdir(os.path.join(cfg.pbs_home, "mom_priv")):
        print(f"job starter: not checked: no pbs_mom at {cfg.pbs_home} (pbs_home in the "
              "config); jobs of pbs-chroot run get no_new_privs from the shim")
    elif cfg.job_starter:
        print(f"job starter {cfg.job_starter} (-nnp in stages), in {cfg.pbs_home}"
              "/mom_priv/config: OK")
    from .hookproto import check_config
    try:
        line = check_config(cfg)
        print(f"{line}: OK" if line else "hook server: no (hook_server = no: the Python hooks)")
    except PbsChrootError as e:
        print(f"WARNING: {e.detail}")
    return 1 if bad else 0


def cleanup(cfg_path: str, dry_run: bool) -> int:
    """Run the reconciler once; print one line per thing done; 1 if anything failed."""
    from . import reconcile
    cfg = config_mod.load(cfg_path)
    log.use_socket(cfg.syslog_socket)
    ensure_layout(cfg.state_dir)
    out = reconcile.cleanup(cfg, dry_run)
    verb = "would finish" if dry_run else "finished"
    for job_id in out.finished:
        print(f"{verb} job {job_id}")
    for member in out.members:
        print(f"{'would remove' if dry_run else 'removed'} stale stage member {member}")
    for job_id in out.cgroups:
        print(f"{'would remove' if dry_run else 'removed'} cgroup without a record: {job_id}")
    for failure in out.failed:
        print(f"FAILED {failure}", file=sys.stderr)
    if not (out.finished or out.members or out.cgroups or out.failed):
        print("nothing to clean up")
    return 1 if out.failed else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pbs-chroot", description="Run batch jobs in allowlisted OS images: the admin "
        "commands (and the qsub submit filter).", epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.environ.get("PBS_CHROOT_CONFIG",
                                                      config_mod.DEFAULT_PATH),
                   help="config file (default: $PBS_CHROOT_CONFIG or %(default)s)")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("install", help="install the hooks into PBS_HOME/mom_priv")
    i.add_argument("--pbs-home", help="pbs_mom's PBS_HOME (required for the hooks; with "
                   "--submit-filter, where torque.cfg is)")
    i.add_argument("--submit-filter", metavar="PATH", nargs="?", const=_filter_default(),
                   help="on a submit host: write the qsub submit filter at PATH (default "
                   "%(const)s) and set SUBMITFILTER in PBS_HOME/torque.cfg (or print the line)")
    i.add_argument("--pbsnodes", default="/usr/bin/pbsnodes",
                   help="pbsnodes used to offline the node on a site fault")
    i.add_argument("--python", default=sys.executable,
                   help="interpreter the hooks run with (default: this one)")
    i.add_argument("--force", action="store_true",
                   help="replace foreign hook scripts and another $job_starter")
    i.add_argument("--starters", metavar="DIR",
                   help="prebuilt job_starter and job_starter-nnp (default: compile them)")
    i.add_argument("--syslog-socket", default="/dev/log",
                   help="where the hooks log before the config is read, and when it is "
                   "refused (default %(default)s; then the config's syslog_socket)")
    i.add_argument("--openpbs", metavar="DIR", nargs="?", const="/usr/libexec/pbs_chroot",
                   help="OpenPBS: write the hook script and the shim into DIR (default "
                   "%(const)s) and print the qmgr commands")
    i.add_argument("--apply", action="store_true",
                   help="with --openpbs, on the server host: run the qmgr commands")
    i.add_argument("--qmgr", default="/opt/pbs/bin/qmgr", help="with --openpbs: qmgr's path")
    r = sub.add_parser("run", help="run a command in an image as a job would run (without "
                       "root: through a user namespace)")
    where = r.add_mutually_exclusive_group(required=True)
    where.add_argument("--image", help="the allowlisted path, as users write it")
    where.add_argument("--dir", help="without root only: a directory tree of your own")
    r.add_argument("--user", help="job user (default: $SUDO_USER, else nobody; without "
                   "root: yourself)")
    r.add_argument("cmd", nargs="+", help="the command (after --)")
    sub.add_parser("check", help="validate the config and the images")
    h = sub.add_parser("hookd", help="the hook server (hook_server in the config): a root "
                       "daemon started before pbs_mom; the C hooks ask it to run the hooks")
    h.add_argument("--pbsnodes", default="/usr/bin/pbsnodes",
                   help="pbsnodes used to offline the node on a site fault (as install's)")
    h.add_argument("--syslog-socket", default="/dev/log",
                   help="where the hooks log when the config is refused (as install's)")
    sub.add_parser("submit-filter", help="the qsub submit filter, by hand: "
                   "pbs-chroot submit-filter QSUB_ARGS... < SCRIPT (see install --submit-filter)")
    c = sub.add_parser("cleanup", help="finish or undo what jobs no longer on this node left "
                       "(records, stage members, cgroups); at mom start and from a timer")
    c.add_argument("--dry-run", action="store_true", help="only say what would be done")
    t = sub.add_parser("selftest", help="check this node against its config and images "
                       "(gate, stages, escapes, cgroups), without touching running jobs")
    t.add_argument("--user", default="nobody", help="unprivileged user for the escape probes")
    from . import images
    images.add_arguments(sub.add_parser(
        "image", help="image versions: build, audit, deploy, rollback, list, gc, rpm"))
    report.add_arguments(sub.add_parser(
        "report", help="jobs, CPU hours, peak memory and OOM kills per user and per image"))
    return p


EXIT_CODES = """exit codes:
  0  success
  1  a site fault or a failed check (a bad config or image, a failed step); also
     the submit filter's rejection, and `run`'s job status when the job itself fails
  2  bad arguments or a refused request (argparse's convention; not root)
  run: the job's own exit status (128+N if killed by signal N; 125 the shim's set-up)"""
_GLOBAL_OPTIONS = ("-h", "--help", "--config")


def _filter_default() -> str:
    from .filterinstall import DEFAULT_FILTER_PATH
    return DEFAULT_FILTER_PATH


def _install_filter(args: argparse.Namespace) -> int:
    from .filterinstall import install_filter
    libdir = _check_importable(args.python)
    print(install_filter(os.path.abspath(args.submit_filter), args.python,
                         os.path.abspath(args.config), libdir, args.force, args.pbs_home),
          end="")
    return 0


def _submit_filter(words: Sequence[str]) -> Optional[int]:
    """``pbs-chroot [--config F] submit-filter QSUB_ARGS... < SCRIPT``: the filter by hand,
    as any user (None: not this command). Before argparse: the rest is qsub's arguments."""
    cfg = os.environ.get("PBS_CHROOT_CONFIG", config_mod.DEFAULT_PATH)
    if words[:1] == ["--config"] and len(words) > 2:
        cfg, words = words[1], words[2:]
    if words[:1] != ["submit-filter"]:
        return None
    from .submitfilter import main as filter_main
    return filter_main(["pbs-chroot submit-filter"] + list(words[1:]), cfg)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point ``pbs-chroot``."""
    words = list(sys.argv[1:] if argv is None else argv)
    rc = _submit_filter(words)
    if rc is not None:
        return rc
    parser = _parser()
    if words and words[0].startswith("-") and words[0].split("=")[0] not in _GLOBAL_OPTIONS:
        parser.error(f"unknown option {words[0]!r} (before the command, only --config)")
    args = parser.parse_args(argv)
    log.setup("pbs-chroot")
    try:
        if os.geteuid() != 0 and args.command == "run":  # unprivileged mode (userns.py)
            from . import userns
            return userns.run(args.config, args.image, args.dir, args.user, args.cmd)
        if os.geteuid() != 0:
            raise UserError("must be run as root")
        if args.command == "run" and args.dir is not None:
            raise UserError("run --dir is for users without root (a user namespace); as "
                            "root, use an allowlisted --image")
        if args.command == "install" and args.submit_filter:
            return _install_filter(args)
        if args.command == "install" and args.openpbs:
            from . import openpbsinstall
            cfg = config_mod.load(args.config)
            print(openpbsinstall.install(os.path.abspath(args.openpbs),
                                         os.path.abspath(args.config), args.python,
                                         args.syslog_socket, cfg.image_resource, args.apply,
                                         args.qmgr), end="")
            return 0
        if args.command == "install":
            if not args.pbs_home:
                raise UserError("install: --pbs-home is required (or --submit-filter)")
            print(install(args.pbs_home, os.path.abspath(args.config), args.pbsnodes,
                          args.python, args.force, args.starters, args.syslog_socket),
                  end="")
            return 0
        if args.command == "run":
            return run(args.config, args.image, args.user, args.cmd)
        if args.command == "selftest":
            from .selftest import run_selftest
            cfg = config_mod.load(args.config)
            failed = run_selftest(cfg, args.user, print)
            print(f"{'all checks passed' if not failed else f'{failed} check(s) FAILED'}")
            return 1 if failed else 0
        if args.command == "cleanup":
            return cleanup(args.config, args.dry_run)
        if args.command == "hookd":
            from .hookd import serve
            return serve(os.path.abspath(args.config), args.pbsnodes, args.syslog_socket)
        if args.command == "report":
            return report.main_report(args)
        if args.command == "image":
            from .images import main_image
            cfg = config_mod.load(args.config)
            log.use_socket(cfg.syslog_socket)
            return main_image(cfg, args)
        return check(args.config)
    except UserError as e:
        print(f"pbs-chroot: {e.detail}", file=sys.stderr)
        return 2
    except PbsChrootError as e:
        log.syslog_only(log.ERROR, e.detail)  # printed just below: not twice without syslog
        print(f"pbs-chroot: {e.detail}", file=sys.stderr)
        return 1
