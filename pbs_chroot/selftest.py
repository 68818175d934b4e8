"""`pbs-chroot selftest`: check a node against its own config and images, harmlessly.

Run as root by the admin, on a node with or without running jobs. It never
touches what jobs use: stages are built in a private mount namespace (a
forked child; the host's mounts are not changed), with a private state
directory, and cgroups are made under our parent with a selftest- name.
Prints one line per check; exit 0 when all pass.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Optional

from . import cgroups, gate
from .config import Config
from .errors import PbsChrootError, UserError
from .paths import check_version_private, resolve_admin_path

__all__ = ["hostile_values", "ESCAPE_PROBES", "run_selftest"]

# Commands that must FAIL for a job user inside a stage.
ESCAPE_PROBES = (
    ("touch /escaped", "write to the stage root"), ("touch /bin/escaped", "write to the image"),
    ("touch /etc/passwd", "write to the bound passwd"), ("mknod /dev/shm/n c 1 3", "mknod"),
    ("mount -t tmpfs tmpfs /mnt", "mount"), ("umount /proc", "umount"),
    ("chroot / /bin/true", "chroot"), ("echo 1 > /proc/sys/kernel/sysrq", "write /proc/sys"),
    ("cat /proc/1/root/etc/hostname", "host root through /proc/1/root"),
    ("cat /etc/shadow", "the host's shadow"),
)


def hostile_values(paths: tuple) -> list:
    """Values that look like the allowlisted ``paths`` but are not them, as text."""
    out = ["", "/", "//", ".", "..", "/tmp/x", "relname", "/" + "x" * 65536]
    for p in paths:
        comps = p.split("/")[1:]
        for i in range(len(comps) + 1):
            for insert in ("..", ".", ""):
                out.append("/" + "/".join(comps[:i] + [insert] + comps[i:]))
        out += [p + c for c in "/ \t\n\x00\r\\,'\";&|<>*?$`"] + [p[1:], "./" + p[1:], p.upper()]
    return sorted(set(out) - set(paths))


def run_selftest(cfg: Config, user: str, write: Callable[[str], None]) -> int:
    """All checks; returns the number that failed."""
    failed = 0

    def report(name: str, ok: bool, detail: str) -> None:
        nonlocal failed
        failed += not ok
        write(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    report("config", True, f"{cfg.path}: {len(cfg.images)} image(s)")
    from .starter import node_problem
    problem = node_problem(cfg)
    report("job starter (no_new_privs for Torque jobs)", not problem,
           problem or (f"{cfg.job_starter} in {cfg.pbs_home}/mom_priv/config"
                       if cfg.job_starter else "not a Torque mom: the shim sets it"))
    if cfg.hook_server:  # down: the C hooks run the Python ones (safe, at the old cost)
        from .hookproto import ping
        problem = ping(cfg.hook_server)
        report("hook server", not problem, problem or f"{cfg.hook_server} answers")
    _check_gate(cfg, user, report)
    for image in cfg.images:
        try:
            version = resolve_admin_path(image.path)
            check_version_private(version)
        except PbsChrootError as e:
            report(f"image {image.path}", False, e.detail)
            continue
        report(f"image {image.path}", True, f"-> {version}")
        ok, detail = _in_private_namespace(lambda: _stage_probe(cfg, image.path, version, user))
        report(f"stage and escapes {image.path}", ok, detail)
    if cfg.cgroups:
        ok, detail = _cgroup_probe(cfg)
        report("cgroup create/limit/kill/remove", ok, detail)
    return failed


def _check_gate(cfg: Config, user: str, report: Callable[[str, bool, str], None]) -> None:
    paths = tuple(i.path for i in cfg.images)
    wrong = []
    values = hostile_values(paths)
    for value in values:
        try:
            gate.check_value(value, cfg, user, "selftest")
            wrong.append(value)
        except UserError:
            pass
    report("gate refuses look-alike values", not wrong,
           f"{len(values) - len(wrong)} of {len(values)} refused"
           + (f"; ALLOWED: {', '.join(gate.show(w) for w in wrong[:5])}" if wrong else ""))


def _in_private_namespace(fn: Callable[[], str]) -> tuple:
    """Run fn in a forked child in a private mount namespace; (ok, detail)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code, detail = 1, "crashed"
        try:
            from . import _sys
            _sys.unshare(_sys.CLONE_NEWNS)
            _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_SLAVE)  # nothing goes back out
            detail, code = fn(), 0
        except PbsChrootError as e:
            detail = e.detail
        except Exception as e:  # a report line, not a traceback: the admin reads a table
            detail = f"{type(e).__name__}: {e}"
        finally:
            os.write(w, detail.encode("utf-8", "backslashreplace")[:4000])
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        detail = f.read().decode("utf-8", "replace")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0, detail


def _stage_probe(cfg: Config, image: str, version: str, user: str) -> str:
    from . import stage
    from .state import ensure_layout
    tmp = tempfile.mkdtemp(prefix="pbs_chroot-selftest.")
    outside = _outside_process(user)  # e.g. the user's ssh login on this node
    try:
        own = cfg._replace(state_dir=tmp, cgroups=False)
        ensure_layout(tmp)
        job = f"selftest-{os.getpid()}"
        stage.join(own, job, version, user, image)
        try:
            probes = ESCAPE_PROBES + _outside_probes(outside)
            script = "; ".join(f'( {c} ) >/dev/null 2>&1 && echo "ESCAPED {w}"'
                               for c, w in probes) + "; echo done"
            if cfg.job_starter:  # as pbs_mom starts a job: its $job_starter, in the image
                res = _as_torque(version, user, [cfg.job_starter, "/bin/sh", "-c", script])
            else:
                res = subprocess.run([sys.executable, "-I", "-m", "pbs_chroot.shim", "--root",
                                      version, "--user", user, "--", "/bin/sh", "-c", script],
                                     capture_output=True, text=True, timeout=60)
        finally:
            stage.leave(own, job, version)
    finally:
        os.kill(outside, 9)
        os.waitpid(outside, 0)
        shutil.rmtree(tmp, ignore_errors=True)
    escaped = [x[8:] for x in res.stdout.splitlines() if x.startswith("ESCAPED")]
    if res.returncode != 0 or "done" not in res.stdout:
        raise PbsChrootError(f"the probe job failed ({res.returncode}): "
                             f"{gate.show(res.stderr.strip())}")
    if escaped:
        raise PbsChrootError(f"{len(escaped)} escape(s): {', '.join(escaped)}")
    how = "through the job starter" if cfg.job_starter else "through the shim"
    return (f"stage built and torn down; {len(probes)} escapes tried as {user} {how}, "
            "0 worked")


def _outside_probes(pid: int) -> tuple:
    """Through /proc/PID/root of a process of the job's user outside the chroot: the host's
    setuid programs (loading the image's ld.so, libc and PAM) and the host's files."""
    root = f"/proc/{pid}/root"
    return (
        ("! grep -q '^NoNewPrivs:[[:space:]]*1' /proc/self/status", "no no_new_privs"),
        (f"test \"$({root}/usr/bin/su root -c 'id -u' </dev/null 2>/dev/null)\" = 0",
         "the host's su through /proc/PID/root"),
        (f"touch {root}/etc/pbs-chroot-selftest", "write the host's /etc through /proc/PID/root"),
    )


def _outside_process(user: str) -> int:
    """A process of ``user`` on the host, outside any chroot (a sleep); its pid."""
    import pwd
    pw = pwd.getpwnam(user)
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            os.execv("/bin/sleep", ["sleep", "120"])
        finally:
            os._exit(127)
    return pid


def _as_torque(version: str, user: str, argv: list) -> "subprocess.CompletedProcess[str]":
    """What pbs_mom does for a job: chroot, drop to the user (no no_new_privs of its own),
    exec $job_starter with the shell; the starter in the stage must set it."""
    import pwd
    pw = pwd.getpwnam(user)

    def enter() -> None:
        os.chroot(version)
        os.chdir("/")
        os.setgroups(os.getgrouplist(pw.pw_name, pw.pw_gid))
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
    return subprocess.run(argv, preexec_fn=enter, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/bin:/usr/bin", "HOME": "/"})


def _cgroup_probe(cfg: Config) -> tuple:
    cg: Optional[cgroups.JobCgroup] = None
    p = None
    try:
        cg = cgroups.job_cgroup(cgroups.detect(), cfg.cgroup_parent, f"selftest-{os.getpid()}")
        cg.create()
        cg.set_limits(cgroups.Limits(mem_request=64 << 20, pids_max=16))
        p = subprocess.Popen(["sleep", "60"])
        cg.attach(p.pid)
        n = cg.kill(10)
        p.wait(10)
        cg.remove()
        return n == 1, f"cgroup v{cg.version}, {n} process killed, removed"
    except (PbsChrootError, OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        if cg is not None and cg.exists():
            try:
                cg.remove()
            except PbsChrootError:
                pass
        if cg is not None:
            cgroups.remove_parent_if_empty(cgroups.detect(), cfg.cgroup_parent)
