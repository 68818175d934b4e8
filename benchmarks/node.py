"""The benchmark's node: a private mount namespace, a tmpfs, a job user, an image, the hooks.

Run as root by the harness's measuring child. Like tests/conftest.py, it enters a private
mount namespace and makes / shared again (as systemd does on a real node), mounts a tmpfs
(mode 0755) on the first of /srv, /media, /mnt that holds neither the checkout nor the
interpreter, and binds copies of /etc/passwd and /etc/group with the job user over the real
ones. The user's home is /home/USER on a tmpfs mounted over /home, so that the *default*
bind set (which binds /home) reaches it; if the checkout or the interpreter lives under
/home, the home goes on the tmpfs instead and the bind set is the default plus that
directory (said in the results). Everything vanishes with the namespace; only the cgroups
(not namespaced) are global: they live below a parent of the benchmark's own
(``pbs_chroot_bench.PID``), removed by ``remove_cgroup_parent``.
"""
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from pbs_chroot import _sys, cgroups, config

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

USER, UID, GID = "pbsbench", 64150, 64150
SERVER = "bench"


def _keep_paths() -> set:
    return {REPO, Path(sys.prefix), Path(sys.base_prefix), Path(os.getcwd()),
            Path(os.path.realpath(sys.executable)).parent}


def _covers(cand: Path) -> bool:
    return any(k == cand or cand in k.parents for k in _keep_paths())


def pick_root() -> Path:
    """Where the benchmark's tmpfs goes (conftest's rule)."""
    for cand in (Path("/srv"), Path("/media"), Path("/mnt")):
        if cand.is_dir() and not cand.is_symlink() and cand.stat().st_uid == 0 \
                and not _covers(cand):
            return cand
    raise RuntimeError("no free directory (/srv, /media, /mnt) to mount the benchmark tmpfs on")


def enter_namespace() -> None:
    """A private mount namespace whose / is shared again (the systemd case)."""
    _sys.unshare(_sys.CLONE_NEWNS)
    _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_PRIVATE)
    _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_SHARED)


def mount_points() -> list:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


def mount_lines() -> int:
    with open("/proc/self/mountinfo", "rb") as f:
        return f.read().count(b"\n")


class Syslog:
    """A datagram socket standing in for /dev/log, drained by a forked process of its own.

    A unix datagram socket queues only net.unix.max_dgram_qlen (10) messages: undrained, the
    hooks' syslog sends fail and their warnings go to the job's error file instead. The
    drainer counts lines and keeps the warnings and errors; ``stop`` returns them.
    """

    STOP = b"<bench-stop>"

    def __init__(self, path: Path) -> None:
        self.path = path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                os.close(r)
                _drain(sock, w)
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        sock.close()
        self._r = r

    def stop(self) -> dict:
        """Stop the drainer; {"lines": N, "problems": [...]}."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(self.STOP, str(self.path))
        data = b""
        while True:
            chunk = os.read(self._r, 65536)
            if not chunk:
                break
            data += chunk
        os.close(self._r)
        os.waitpid(self.pid, 0)
        return json.loads(data.decode()) if data else {"lines": -1, "problems": []}


def _drain(sock: socket.socket, w: int) -> None:
    lines, problems = 0, []
    while True:
        msg = sock.recv(65536)
        if msg == Syslog.STOP:
            break
        lines += 1
        text = msg.decode("utf-8", "replace")
        prio = text[1:text.index(">")] if text.startswith("<") and ">" in text else "6"
        if prio.isdigit() and int(prio) & 7 <= 4:
            problems.append(text[text.index(">") + 1:][:300])
    summary = {"lines": lines, "problems": problems[:20], "problem_count": len(problems),
               "distinct_problems": sorted({_shape(p) for p in problems})[:20]}
    data = json.dumps(summary).encode()
    while data:
        data = data[os.write(w, data):]


def _shape(msg: str) -> str:
    """A message without its pid and job id, to count kinds of warnings."""
    import re
    return re.sub(r"\[\d+\]|\b\d+\.bench\b|\d+", "N", msg)


class Node:
    """The site: tmpfs root, user, image, config, stub qstat, installed hooks."""

    def __init__(self, root: Path, cg_parent: str, settings: str = "") -> None:
        self.root = root
        self.settings = settings  # extra [pbs_chroot] lines (benchmarks/run --set)
        self.cg_parent = cg_parent
        self.home_on_home = not _covers(Path("/home"))
        self.home = (Path("/home") if self.home_on_home else root / "home") / USER
        self.tmp = root / "tmp"
        self.bin = root / "bin"
        self.job_starter = root / "libexec" / "job_starter"  # `install` builds it there
        self.images = root / "images" / "bench"
        self.version = self.images / "v1"
        self.image = root / "chroot" / "bench"       # what users write in PBS_O_ROOTDIR
        self.state = root / "state"
        self.pbs_home = root / "torque"
        self.mom_priv = self.pbs_home / "mom_priv"
        self.spool = self.pbs_home / "spool"
        self.jobs_xml = root / "qstat-jobs"
        self.config = root / "pbs_chroot.conf"
        self.accounting = root / "accounting.jsonl"
        self.pbsnodes_log = root / "pbsnodes.log"
        self.qstat = self.bin / "qstat"
        self.timeit = self.home / ".bench" / "timeit"
        self.syslog: Optional[Syslog] = None
        # The hook server (issue 16): its socket, the C clients (built with mom_priv's
        # Python hooks as their fallback, which are not there as NAME.py: a job the
        # server does not serve fails the run), the daemon.
        self.hookd_sock = root / "hookd" / "sock"
        self.served = root / "served"
        self.hookd: Optional[subprocess.Popen] = None
        self.hookd_on = False  # in the config after `install` (which would put the clients in
        #                        mom_priv): the Python hooks stay there for the other cases
        self.binds_note = "default" if self.home_on_home else f"default + {root / 'home'}"

    # -- set-up ---------------------------------------------------------------------------
    def setup(self) -> None:
        _sys.mount("tmpfs", str(self.root), "tmpfs", 0, "mode=0755")
        if self.home_on_home:
            _sys.mount("tmpfs", "/home", "tmpfs", 0, "mode=0755")
        os.umask(0o022)
        for d in (self.tmp, self.bin, self.root / "etc", self.home.parent, self.jobs_xml,
                  self.root / "chroot", self.images.parent):
            d.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._users()
        self._image()
        self._torque_dirs()
        self._compile()
        self.syslog = Syslog(self.root / "log.sock")
        self.write_config()
        self._install()
        self._start_hookd()

    def _users(self) -> None:
        etc = self.root / "etc"
        (etc / "passwd").write_text(Path("/etc/passwd").read_text()
                                    + f"{USER}:x:{UID}:{GID}:pbs_chroot bench:{self.home}:"
                                    "/bin/sh\n")
        (etc / "group").write_text(Path("/etc/group").read_text() + f"{USER}:x:{GID}:\n")
        for name in ("passwd", "group"):
            os.chmod(etc / name, 0o644)
            _sys.mount(str(etc / name), f"/etc/{name}", None, _sys.MS_BIND)
        self.home.mkdir(mode=0o700)
        os.chown(self.home, UID, GID)
        (self.home / "tmp").mkdir(mode=0o700)
        os.chown(self.home / "tmp", UID, GID)

    def _image(self) -> None:
        self.images.mkdir(mode=0o700)
        os.chmod(self.images, 0o700)  # raw versions are root's only
        subprocess.run([str(REPO / "examples" / "build-busybox-image"), str(self.version)],
                       check=True, stdout=subprocess.DEVNULL)
        # The job starter's mount point, as `pbs-chroot image build` makes it.
        point = self.version / str(self.job_starter).lstrip("/")
        point.parent.mkdir(parents=True, exist_ok=True)
        point.touch()
        self.image.symlink_to(self.version)

    def _torque_dirs(self) -> None:
        for path, mode in ((self.pbs_home, 0o755), (self.mom_priv, 0o751),
                           (self.mom_priv / "jobs", 0o751), (self.spool, 0o1777),
                           (self.pbs_home / "aux", 0o755)):
            path.mkdir(mode=mode, exist_ok=True)
            os.chmod(path, mode)

    def _compile(self) -> None:
        cc = shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            raise RuntimeError("gcc missing: scripts/setup installs it")
        jobs = str(self.jobs_xml).replace("\\", "\\\\").replace('"', '\\"')
        subprocess.run([cc, "-O2", "-static", f'-DJOBS_DIR="{jobs}"', "-o", str(self.qstat),
                        str(HERE / "stubs" / "qstat.c")], check=True)
        self.timeit.parent.mkdir(mode=0o755)
        subprocess.run([cc, "-O2", "-static", "-o", str(self.timeit),
                        str(HERE / "stubs" / "timeit.c")], check=True)
        pbsnodes = self.bin / "pbsnodes"
        pbsnodes.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {self.pbsnodes_log}\n')
        os.chmod(pbsnodes, 0o755)

    def write_config(self, main: str = "") -> None:
        binds = ""
        if not self.home_on_home:
            home = self.root / "home"
            binds = "[binds]\n" + "".join(f"{t} = {v}\n" for t, v in config.DEFAULT_BINDS) \
                + f"{home} = {home} rec\n"
        self.config.write_text(
            f"[pbs_chroot]\nstate_dir = {self.state}\npbs_home = {self.pbs_home}\n"
            f"job_info = qstat\nqstat = {self.qstat}\nsyslog_socket = {self.root}/log.sock\n"
            f"cgroup_parent = {self.cg_parent}\naccounting_log = {self.accounting}\n"
            f"job_starter = {self.job_starter}\n"
            + (f"hook_server = {self.hookd_sock}\n" if self.hookd_on else "")
            + f"{_merged(self.settings, main)}\n"
            f"[image {self.image}]\n\n{binds}")
        os.chmod(self.config, 0o644)
        # The image's mount points for this bind set, as `pbs-chroot image build` makes
        # them: a stage never makes them at job time.
        from pbs_chroot import images
        try:
            images.add_mount_points(config.load(str(self.config)), str(self.version))
        except OSError as e:
            if e.errno != errno.EROFS:  # staged: its mount points are there already
                raise

    def _install(self) -> None:
        res = subprocess.run([sys.executable, "-m", "pbs_chroot", "--config", str(self.config),
                              "install", "--pbs-home", str(self.pbs_home), "--pbsnodes",
                              str(self.bin / "pbsnodes")], capture_output=True, text=True,
                             cwd=str(REPO))
        if res.returncode != 0:
            raise RuntimeError(f"pbs-chroot install failed: {res.stderr.strip()}")

    def _start_hookd(self) -> None:
        """The C clients as served/prologue and served/epilogue; `pbs-chroot hookd` running."""
        from pbs_chroot import hookinstall, hookproto as hookd
        self.hookd_on = True
        self.write_config()
        client = hookinstall.build(str(self.hookd_sock), str(self.mom_priv),
                                   str(self.root / "log.sock"), hookinstall.kick_target())
        self.served.mkdir(mode=0o755)
        for name in ("prologue", "epilogue"):
            fd = os.open(self.served / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o500)
            with os.fdopen(fd, "wb") as f:
                f.write(client)
        self.hookd = subprocess.Popen(
            [sys.executable, "-m", "pbs_chroot", "--config", str(self.config), "hookd",
             "--pbsnodes", str(self.bin / "pbsnodes"), "--syslog-socket",
             str(self.root / "log.sock")], cwd=str(REPO), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, start_new_session=True)
        for _ in range(600):
            if not hookd.ping(str(self.hookd_sock), 2.0):
                return
            if self.hookd.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"pbs-chroot hookd did not answer on {self.hookd_sock}")

    def stop_hookd(self) -> None:
        """SIGTERM the daemon (by pid) and reap it; its workers end with their requests."""
        if self.hookd is None:
            return
        self.hookd.terminate()
        try:
            self.hookd.wait(10)
        except subprocess.TimeoutExpired:
            self.hookd.kill()
            self.hookd.wait(10)
        self.hookd = None

    @property
    def served_prologue(self) -> str:
        return str(self.served / "prologue")

    @property
    def served_epilogue(self) -> str:
        return str(self.served / "epilogue")

    @property
    def prologue(self) -> Path:
        return self.mom_priv / "prologue"

    @property
    def epilogue(self) -> Path:
        return self.mom_priv / "epilogue"

    def offline_calls(self) -> list:
        if not self.pbsnodes_log.exists():
            return []
        return self.pbsnodes_log.read_text().splitlines()

    def state_files(self) -> list:
        """Job records and stages left in the state directory (none after a clean run)."""
        out = []
        for sub in ("jobs", "stages"):
            d = self.state / sub
            out += [f"{sub}/{n}" for n in (os.listdir(d) if d.is_dir() else [])]
        return sorted(out)


def _merged(settings: str, main: str) -> str:
    """``settings`` then ``main`` as [pbs_chroot] lines, a key in ``main`` replacing the same
    key in ``settings`` (the config refuses a key set twice)."""
    keys = {line.split("=", 1)[0].strip() for line in main.splitlines() if "=" in line}
    kept = [line for line in settings.splitlines()
            if "=" not in line or line.split("=", 1)[0].strip() not in keys]
    return "".join(line + "\n" for line in kept) + main


# -- cgroups (global: checked from the host) -----------------------------------------------

def cgroup_tops() -> list:
    """Every cgroup hierarchy's mount point (v1 and v2), from the host's mountinfo."""
    tops = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype in ("cgroup", "cgroup2"):
                tops.append(fields[4])
    return sorted(set(tops))


def cgroup_tree() -> list:
    """Every cgroup directory of every hierarchy, as relative paths."""
    found = []
    for top in cgroup_tops():
        for dirpath, dirnames, _ in os.walk(top):
            found += [os.path.join(dirpath, d) for d in dirnames]
    return sorted(found)


def remove_cgroup_parent(parent: str) -> list:
    """rmdir the benchmark's cgroup parent (and any empty job cgroup left below it) in every
    hierarchy; returns what could not be removed."""
    layout = cgroups.detect()
    tops = list(layout.v1.values()) if layout.version == 1 else [str(layout.v2)]
    left = []
    for top in sorted(set(tops)):
        base = Path(top) / parent
        if not base.is_dir():
            continue
        for d in sorted((p for p in base.rglob("*") if p.is_dir()), reverse=True) + [base]:
            try:
                d.rmdir()
            except OSError as e:
                left.append(f"{d}: {e.strerror}")
    return left
