"""Test set-up shared by unit and integration tests.

As root, the whole pytest process first enters a private mount namespace
(so a failing test cannot leave a mount on the host) and then makes / shared
again, as systemd does on a real node, so that the stage's propagation
handling is tested against the hard case. Inside that namespace it mounts a
tmpfs (mode 0755) on the first of /srv, /media, /mnt that holds neither this
checkout nor the interpreter (TEST_ROOT), because images must live on a path
that is root-owned and not group/other-writable all the way up, which /tmp
(1777) is not. pytest's temporary directories and the test users' homes are
made there, and copies of /etc/passwd and /etc/group with the test users are
bound over the real ones. All of it vanishes with the process.
"""
import errno
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

import pytest

from pbs_chroot import config
from tests import fakes
from tests.captures import SOURCES
from tests.momemu import EmuJob, MomEmulator

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "torque-6.1"
IS_ROOT = os.geteuid() == 0

# Test users (uids chosen far from any distribution's range).
USER, UID, GID = "pbsct", 64123, 64123
OTHER, OTHER_UID = "pbsct2", 64125
EXTRA_GROUP, EXTRA_GID = "pbsctx", 64124


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("CI") == "true" and not FIXTURES.is_dir():
        # The captures are the authority in CI; elsewhere the samples stand in (captures.py).
        raise pytest.UsageError(f"Torque fixtures missing: {FIXTURES} (shared/ beside the repo)")
    if IS_ROOT and not os.environ.get("PBS_CHROOT_TEST_ROOT"):
        _enter_test_namespace(_pick_test_root())


def _pick_test_root() -> Path:
    keep = {REPO, Path(sys.prefix), Path(sys.base_prefix), Path(os.getcwd()),
            Path(os.path.realpath(sys.executable)).parent}
    for cand in (Path("/srv"), Path("/media"), Path("/mnt")):
        if cand.is_dir() and not cand.is_symlink() and cand.stat().st_uid == 0 \
                and not any(k == cand or cand in k.parents for k in keep):
            return cand
    raise pytest.UsageError("no free directory (/srv, /media, /mnt) to mount the test tmpfs on")


def _enter_test_namespace(root: Path) -> None:
    from pbs_chroot import _sys
    _sys.unshare(_sys.CLONE_NEWNS)
    _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_PRIVATE)
    _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_SHARED)  # like systemd
    # suid and dev allowed: the stage's own nosuid/nodev are what the tests test.
    _sys.mount("tmpfs", str(root), "tmpfs", 0, "mode=0755")
    os.environ["PBS_CHROOT_TEST_ROOT"] = str(root)
    for sub in ("tmp", "home", "etc"):
        (root / sub).mkdir(mode=0o755)
    os.environ["PYTEST_DEBUG_TEMPROOT"] = str(root / "tmp")
    passwd = Path("/etc/passwd").read_text()
    group = Path("/etc/group").read_text()
    (root / "etc" / "passwd").write_text(
        passwd + f"{USER}:x:{UID}:{GID}:pbs_chroot test:{root}/home/{USER}:/bin/sh\n"
        f"{OTHER}:x:{OTHER_UID}:{OTHER_UID}:pbs_chroot test 2:{root}/home/{OTHER}:/bin/sh\n")
    (root / "etc" / "group").write_text(
        group + f"{USER}:x:{GID}:\n{EXTRA_GROUP}:x:{EXTRA_GID}:{USER}\n"
        f"{OTHER}:x:{OTHER_UID}:\n")
    for name in ("passwd", "group"):
        os.chmod(root / "etc" / name, 0o644)
        _sys.mount(str(root / "etc" / name), f"/etc/{name}", None, _sys.MS_BIND)
    for user, uid, gid in ((USER, UID, GID), (OTHER, OTHER_UID, OTHER_UID)):
        home = root / "home" / user
        home.mkdir(mode=0o700)
        os.chown(home, uid, gid)


def tmpfs_root() -> Path:
    """Where the test tmpfs is mounted (homes live in its home/)."""
    return Path(os.environ["PBS_CHROOT_TEST_ROOT"])


def home_of(user: str) -> Path:
    return tmpfs_root() / "home" / user


def open_to_users(path: Path) -> None:
    """Make ``path`` and its parents up to the test tmpfs 0755: pytest makes them 0700, and
    jobs and users on the host need to enter them."""
    for d in (path, *path.parents):
        if d == tmpfs_root():
            break
        os.chmod(d, 0o755)


def starter_dir() -> Path:
    """The job starters (pbs_chroot/starter/job_starter.c), built once per test run in a
    root-only directory of the test tmpfs, as `pbs-chroot install` builds them."""
    from pbs_chroot import starter
    d = tmpfs_root() / "libexec"
    if not (d / "job_starter-nnp").exists():
        d.mkdir(mode=0o755, exist_ok=True)
        starter.build(str(d))
    return d


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    skip = pytest.mark.skip(reason="needs root: real mounts, chroot and privilege drop")
    for item in items:
        if "root" in item.keywords and not IS_ROOT:
            item.add_marker(skip)


# Cgroups the tests make live below this parent only (one per pytest process).
CG_PARENT = f"pbs_chroot_test.{os.getpid()}"


def cgroup_children() -> list[str]:
    """Every cgroup below the tests' parent, in every hierarchy."""
    from pbs_chroot import cgroups
    layout = cgroups.detect()
    tops = list(layout.v1.values()) if layout.version == 1 else [str(layout.v2)]
    found = []
    for top in tops:
        base = Path(top) / CG_PARENT
        if base.is_dir():
            found += [str(p) for p in base.rglob("*") if p.is_dir()]
    return sorted(found)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not IS_ROOT or os.environ.get("PBS_CHROOT_TEST_ROOT") is None:
        return
    from pbs_chroot import cgroups
    layout = cgroups.detect()
    for top in (layout.v1.values() if layout.version == 1 else [str(layout.v2)]):
        base = Path(top) / CG_PARENT
        for d in sorted(base.rglob("*"), reverse=True) if base.is_dir() else []:
            if d.is_dir():
                d.rmdir()  # a leak: the per-test check has already failed that test
        if base.is_dir():
            base.rmdir()


# Counts that tests report at the end of the run (fault points, hostile cases...).
SUMMARY: dict[str, str] = {}


def pytest_terminal_summary(terminalreporter: object) -> None:
    for key, value in SUMMARY.items():
        terminalreporter.write_line(f"pbs_chroot: {key}: {value}")  # type: ignore[attr-defined]


def mount_points() -> list[str]:
    """This process's mount points, in order: the leak check compares these."""
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every root test must leave mountinfo and the cgroup tree as it found them."""
    if "root" not in request.keywords:
        yield
        return
    before = mount_points()
    yield
    after = mount_points()
    assert after == before, f"mounts leaked: {sorted(set(after) - set(before))}"
    assert cgroup_children() == [], "cgroups leaked"


@pytest.fixture(params=[path for _, path in SOURCES], ids=[name for name, _ in SOURCES])
def torque_source(request: pytest.FixtureRequest) -> Path:
    """The Torque 6.1 captures (when beside the repo) and the project's samples (always)."""
    return Path(request.param)


@pytest.fixture(scope="session")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding one real BusyBox image version, built once per session."""
    if not IS_ROOT:
        pytest.skip("needs root to build an image")
    if not os.path.exists("/bin/busybox"):
        pytest.fail("/bin/busybox missing: scripts/setup installs busybox-static")
    base = tmp_path_factory.mktemp("images")
    os.chmod(base, 0o755)
    subprocess.run([str(REPO / "examples" / "build-busybox-image"), str(base / "v1")],
                   check=True, stdout=subprocess.DEVNULL)
    return base / "v1"


class Syslog:
    """A unix datagram socket standing in for /dev/log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # Room for every line of a test: senders never block (they drop).
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.seen: list[str] = []

    def lines(self) -> list[str]:
        while True:
            try:
                self.seen.append(self.sock.recv(65536).decode("utf-8", "replace"))
            except BlockingIOError:
                return self.seen


@pytest.fixture
def syslog(tmp_path: Path) -> Iterator[Syslog]:
    s = Syslog(tmp_path / "log.sock")
    yield s
    s.sock.close()


@pytest.fixture
def site(tmp_path: Path, image_root: Path) -> "Site":
    """A node's site set-up: an image copy with a stable symlink, config, state dir."""
    return Site(tmp_path, image_root)


class Site:
    """Image versions, the allowlisted symlink and a config file under one tmp dir."""

    def __init__(self, base: Path, image_src: Path) -> None:
        open_to_users(base)
        self.base = base
        self.versions = base / "images" / "sl5"
        self.versions.mkdir(parents=True, mode=0o700)
        os.chmod(base / "images", 0o755)
        os.chmod(self.versions, 0o700)  # raw versions are root's only
        self.version = self.versions / "v1"
        # cp -a, not copytree: images hold device nodes (debootstrap's /dev/console).
        subprocess.run(["cp", "-a", str(image_src), str(self.version)], check=True)
        # The image carries its mount points, as `pbs-chroot image build` makes them:
        # this site binds the test users' homes too.
        home = self.version / str(tmpfs_root() / "home").lstrip("/")
        home.mkdir(parents=True, exist_ok=True)
        # ... and the job starter's, at the path of this site's $job_starter.
        starter = self.version / str(starter_dir() / "job_starter").lstrip("/")
        starter.parent.mkdir(parents=True, exist_ok=True)
        starter.touch()
        (base / "chroot").mkdir(mode=0o755)
        self.image = base / "chroot" / "sl5"       # what users write in PBS_O_ROOTDIR
        self.image.symlink_to(self.version)
        self.state = base / "state"
        self.pbs_home = base / "torque"
        self.config = base / "pbs_chroot.conf"
        self.accounting = base / "accounting.jsonl"

    def accounting_lines(self) -> list[dict]:
        import json
        if not self.accounting.exists():
            return []
        return [json.loads(line) for line in self.accounting.read_text().splitlines()]

    def write_config(self, extra: str = "", images: str = "", main: str = "") -> Path:
        """A config with the default bind set plus the test users' homes (unless ``extra``
        has a [binds] section of its own)."""
        binds = "" if "[binds]" in extra else "[binds]\n" + "".join(
            f"{t} = {v}\n" for t, v in config.DEFAULT_BINDS + (
                (str(tmpfs_root() / "home"), f"{tmpfs_root() / 'home'} rec"),))
        text = (f"[pbs_chroot]\nstate_dir = {self.state}\npbs_home = {self.pbs_home}\n"
                f"syslog_socket = {self.base / 'log.sock'}\ncgroup_parent = {CG_PARENT}\n"
                f"accounting_log = {self.accounting}\n"
                + ("" if "job_starter =" in main
                   else f"job_starter = {starter_dir() / 'job_starter'}\n")
                + f"{main}\n"
                f"[image {self.image}]\n{images}\n{binds}{extra}")
        self.config.write_text(text)
        os.chmod(self.config, 0o644)
        self.add_mount_points(self.version)
        return self.config

    def add_mount_points(self, version: Path) -> None:
        """As an admin does after changing the bind set (`pbs-chroot image audit VERSION
        --add-mount-points`; build and deploy do it for new versions): a stage never
        makes them at job time."""
        from pbs_chroot import images
        from pbs_chroot.errors import ConfigError
        try:
            images.add_mount_points(config.load(str(self.config)), str(version))
        except ConfigError:
            pass  # a test of a refused config
        except OSError as e:
            if e.errno != errno.EROFS:
                raise
            # Staged (read-only): as for an admin, the new mount points come with the next
            # version; a test that changes binds under a stage makes them beforehand.

    def run(self, user: str, script: str, image: Optional[Path] = None
            ) -> subprocess.CompletedProcess:
        """`pbs-chroot run` of ``/bin/sh -c script`` as ``user`` in ``image`` (default: sl5)."""
        return pbs_chroot_cli("--config", str(self.config), "run", "--image",
                              str(image or self.image), "--user", user, "--", "/bin/sh", "-c",
                              script, check=False)

    def state_files(self) -> list[str]:
        """Everything in the state directory, relative to it."""
        if not self.state.exists():
            return []
        return sorted(str(p.relative_to(self.state)) for p in self.state.rglob("*"))


def pbs_chroot_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the admin CLI of the interpreter under test."""
    return subprocess.run([sys.executable, "-m", "pbs_chroot", *args], capture_output=True,
                          text=True, check=check, timeout=120)


PROBE = """#!/bin/sh
head -n 1 /etc/os-release
test -r /proc/self/stat && echo proc-ok
test -c /dev/null && echo devnull-ok
cd && pwd && touch "$HOME/by-$PBS_JOBID" && echo home-ok
test -r "$0" && echo "script-ok $0"
echo "user=$(id -un) uid=$(id -u)"
"""


class Node:
    """One emulated pbs_mom with our hooks installed and a site config."""

    def __init__(self, site: Site, syslog: Syslog, hook_env: Optional[dict] = None) -> None:
        self.site, self.syslog = site, syslog
        self.emu = MomEmulator(site.pbs_home, prologue_alarm=60, hook_env=hook_env)
        site.write_config(main=f"qstat = {self.emu.qstat_path}\njob_info = qstat\n")
        # The test's syslog socket from the start: a refused config's line must not go to
        # this machine's /dev/log (rsyslog running or not).
        res = pbs_chroot_cli("--config", str(site.config), "install", "--pbs-home",
                             str(site.pbs_home), "--pbsnodes", str(self.emu.pbsnodes_path),
                             "--starters", str(starter_dir()),
                             "--syslog-socket", str(site.base / "log.sock"))
        assert res.returncode == 0, res.stderr
        self.seq = 100

    def job(self, variables: list, script: str = PROBE) -> EmuJob:
        self.seq += 1
        return EmuJob(f"{self.seq}.vm", USER, script, variables)

    def rootdir(self, value: Optional[str] = None) -> list:
        return [("PBS_O_ROOTDIR", str(self.site.image) if value is None else value)]

    def offline_calls(self) -> list:
        return fakes.read_pbsnodes_calls(self.emu.pbsnodes_log)

    def configure(self, main: str) -> None:
        """Rewrite the site config with extra [pbs_chroot] settings, keeping the fakes."""
        self.site.write_config(main=f"qstat = {self.emu.qstat_path}\njob_info = qstat\n{main}")

    def assert_clean(self) -> None:
        assert not any(str(self.site.version) in m for m in mount_points())
        assert os.listdir(self.site.state / "jobs") == []
        assert os.listdir(self.site.state / "stages") == []


@pytest.fixture
def node(site: Site, syslog: Syslog) -> Iterator[Node]:
    n = Node(site, syslog)
    yield n
    n.emu.cleanup()
