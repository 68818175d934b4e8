"""The shared stage on real mounts, on a / made shared as systemd does."""
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from pbs_chroot import _sys, config, images, log, mounts, stage
from pbs_chroot.errors import MountError
from pbs_chroot.state import ensure_layout
from tests.conftest import Site, Syslog, pbs_chroot_cli, starter_dir, tmpfs_root

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real mounts")]

DEFAULT_TARGETS = ["", "/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/home", "/etc/passwd",
                   "/etc/group", "/etc/resolv.conf", "/etc/hosts"]


def stage_targets() -> list[str]:
    """The default bind set plus the test homes and the job starter that Site.write_config
    adds."""
    return DEFAULT_TARGETS + [str(tmpfs_root() / "home"), str(starter_dir() / "job_starter")]


def load(site: Site) -> config.Config:
    site.write_config()
    cfg = config.load(str(site.config))
    ensure_layout(cfg.state_dir)
    return cfg


def below(path: Path, pid: str = "self") -> list[str]:
    return [m.mount_point for m in
            mounts.mounts_below(str(path), mounts.read_mountinfo(f"/proc/{pid}/mountinfo"))]


@pytest.fixture
def peer() -> Iterator[str]:
    """Another mount namespace, a peer of ours (like a systemd service's)."""
    p = subprocess.Popen(["unshare", "--mount", "--propagation", "unchanged", "sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{p.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            assert time.monotonic() < deadline, "unshare did not switch namespaces"
            time.sleep(0.01)
        yield str(p.pid)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()


def test_stage_mounts_and_teardown(site: Site, peer: str) -> None:
    cfg = load(site)
    v = site.version
    peer_before = Path(f"/proc/{peer}/mountinfo").read_text().count("\n")
    stage.join(cfg, "1.vm", str(v))
    mounted = below(v)
    for t in stage_targets():
        assert str(v) + t in mounted, t
    info = {m.mount_point: m for m in mounts.read_mountinfo()}
    assert {"ro", "nosuid", "nodev"} <= info[str(v)].options
    assert {"ro", "nosuid", "nodev"} <= info[f"{v}/sys"].options
    assert "nodev" not in info[f"{v}/dev"].options and "nosuid" in info[f"{v}/dev"].options
    assert {"ro"} <= info[f"{v}/etc/passwd"].options
    assert "ro" not in info[f"{v}/home"].options
    # The stage root reaches a peer namespace (it is mounted on the shared /),
    # but nothing mounted inside the stage propagates back out.
    assert below(v, peer) == [str(v)]
    # The job directory of Torque is part of the bind set when it exists.
    assert (v / "proc" / "self" / "stat").exists() and (v / "dev" / "null").exists()
    assert stage.leave(cfg, "1.vm", str(v)) is True
    assert below(v) == [] and below(v, peer) == []
    assert Path(f"/proc/{peer}/mountinfo").read_text().count("\n") == peer_before
    assert os.listdir(site.state / "stages") == []


def test_members_share_one_stage(site: Site) -> None:
    cfg = load(site)
    v = str(site.version)
    stage.join(cfg, "1.vm", v)
    first = below(site.version)
    stage.join(cfg, "2.vm", v)
    assert below(site.version) == first  # no second set of mounts
    assert stage.members(stage.stage_dir(cfg, v)) == ["1.vm", "2.vm"]
    assert stage.leave(cfg, "1.vm", v) is False
    assert below(site.version) == first
    assert stage.leave(cfg, "1.vm", v) is False  # leaving twice changes nothing
    assert stage.leave(cfg, "2.vm", v) is True
    assert below(site.version) == []


def test_stage_in_use_is_never_rebuilt(site: Site) -> None:
    """A damaged stage, or one made before a config change, stays until its jobs leave."""
    cfg = load(site)
    v = str(site.version)
    (site.version / "data").mkdir()  # the mount point of the bind added below, made by the
    # admin before (`image audit --add-mount-points`): a stage never writes the version
    stage.join(cfg, "1.vm", v)
    _sys.umount2(v + "/proc")  # damage it while job 1 runs
    first = below(site.version)
    # The config changes: a new bind, whose source appears.
    extra = site.base / "data"
    extra.mkdir()
    site.write_config(extra=f"[binds]\n/proc = proc\n/home = /home rec\n/data = {extra} ro\n")
    cfg = config.load(str(site.config))
    stage.join(cfg, "2.vm", v)
    assert below(site.version) == first  # nothing torn down under job 1
    stage.leave(cfg, "1.vm", v)
    stage.leave(cfg, "2.vm", v)
    assert below(site.version) == []
    stage.join(cfg, "3.vm", v)  # the next stage follows the new plan
    assert below(site.version) == [v, v + "/proc", v + "/home", v + "/data", v + "/etc/passwd",
                                   v + "/etc/group",  # the generated ones (identity.py)
                                   v + str(starter_dir() / "job_starter")]
    stage.leave(cfg, "3.vm", v)


def test_stage_whose_root_is_gone_is_rebuilt_even_with_members(site: Site) -> None:
    cfg = load(site)
    v = str(site.version)
    stage.join(cfg, "1.vm", v)
    mounts.teardown(v)  # e.g. an admin's umount -R: job 1 has lost everything anyway
    stage.join(cfg, "2.vm", v)
    assert v + "/proc" in below(site.version)
    stage.leave(cfg, "1.vm", v)
    stage.leave(cfg, "2.vm", v)
    assert below(site.version) == []


def test_symlinked_mount_point_in_image_is_refused(site: Site) -> None:
    cfg = load(site)
    (site.version / "home").rmdir()
    (site.version / "home").symlink_to("/etc")
    with pytest.raises(MountError, match="symlink"):
        stage.join(cfg, "1.vm", str(site.version))
    assert below(site.version) == []
    assert stage.leave(cfg, "1.vm", str(site.version)) is True  # cleans the half-made state
    assert os.listdir(site.state / "stages") == []


def test_missing_mount_point_is_a_site_fault_that_names_the_fix(site: Site) -> None:
    """A version is never written at job time: no mount point is made by a stage."""
    cfg = load(site)
    (site.version / "proc").rmdir()
    before = os.stat(site.version)
    with pytest.raises(MountError, match=r"mount point /proc is missing in the image; add it "
                       rf"with `pbs-chroot image audit {site.version} --add-mount-points`"):
        stage.join(cfg, "1.vm", str(site.version))
    stage.leave(cfg, "1.vm", str(site.version))
    assert not (site.version / "proc").exists()
    after = os.stat(site.version)
    assert (after.st_mtime_ns, after.st_ctime_ns) == (before.st_mtime_ns, before.st_ctime_ns)
    assert below(site.version) == []
    # The command the message names makes it (and every other), root-owned, 0755, whatever
    # the umask.
    os.umask(0o077)
    try:
        res = pbs_chroot_cli("--config", str(site.config), "image", "audit",
                             str(site.version), "--add-mount-points", check=False)
    finally:
        os.umask(0o022)
    assert "made mount point /proc" in res.stdout, res.stdout + res.stderr
    st = os.stat(site.version / "proc")
    assert st.st_uid == 0 and st.st_mode & 0o777 == 0o755
    stage.join(cfg, "1.vm", str(site.version))
    stage.leave(cfg, "1.vm", str(site.version))


def test_optional_bind_without_its_mount_point_is_skipped_but_not_the_job_dir(
        site: Site, syslog: Syslog) -> None:
    extra = site.base / "data"
    extra.mkdir()
    site.write_config(extra=f"[binds]\n/proc = proc\n/data = {extra} optional\n")
    assert syslog.path == site.base / "log.sock"  # the config's syslog_socket
    cfg = config.load(str(site.config))
    ensure_layout(cfg.state_dir)
    (site.version / "data").rmdir()  # made by write_config, as by `image build`
    log.setup("test", str(syslog.path))
    stage.join(cfg, "1.vm", str(site.version))
    assert str(site.version / "data") not in below(site.version)
    stage.leave(cfg, "1.vm", str(site.version))
    assert any("optional bind /data skipped: its mount point is missing" in line
               for line in syslog.lines())
    # pbs_mom's job directory is optional (a host without Torque), but every job needs it.
    jobs = site.pbs_home / "mom_priv" / "jobs"
    jobs.mkdir(parents=True)
    with pytest.raises(MountError, match=f"mount point {jobs} is missing"):
        stage.join(cfg, "2.vm", str(site.version))
    stage.leave(cfg, "2.vm", str(site.version))
    assert below(site.version) == []


def test_admin_mount_under_the_version_survives(site: Site) -> None:
    """An image on its own file system: teardown never unmounts the admin's mount."""
    cfg = load(site)
    v = str(site.version)
    _sys.mount("tmpfs", v, "tmpfs", 0, "mode=0755")  # the admin's file system for the version
    try:
        images.add_mount_points(cfg, v)  # an image on a file system of its own
        stage.join(cfg, "1.vm", v)
        assert len(below(site.version)) == 1 + len(stage_targets())
        stage.leave(cfg, "1.vm", v)
        assert below(site.version) == [v]
    finally:
        _sys.umount2(v)


def test_bind_in_parents_peer_group_is_refused(site: Site) -> None:
    cfg = load(site)
    v = str(site.version)
    _sys.mount(v, v, None, _sys.MS_BIND)  # joins the peer group of the shared /tmp
    try:
        with pytest.raises(MountError, match="make-slave"):
            stage.join(cfg, "1.vm", v)
        stage.leave(cfg, "1.vm", v)
        assert below(site.version) == [v]
    finally:
        _sys.umount2(v)


def test_unknown_bind_source_is_a_site_fault(site: Site) -> None:
    site.write_config(extra="[binds]\n/proc = proc\n/data = /nonexistent-pbs-chroot-src\n")
    cfg = config.load(str(site.config))
    ensure_layout(cfg.state_dir)
    with pytest.raises(MountError, match="nonexistent"):
        stage.join(cfg, "1.vm", str(site.version))
    assert below(site.version) == []


def test_leftover_temp_file_does_not_block_teardown(site: Site) -> None:
    """A writer killed inside write_json leaves info.json.tmp.PID behind."""
    cfg = load(site)
    v = str(site.version)
    stage.join(cfg, "1.vm", v)
    sdir = Path(stage.stage_dir(cfg, v))
    (sdir / "info.json.tmp.99999").write_text("{")
    assert stage.leave(cfg, "1.vm", v) is True
    assert not sdir.exists() and below(site.version) == []


def test_submounts_of_a_recursive_bind_get_nosuid_nodev(site: Site) -> None:
    """A suid-capable mount below a home directory must not be suid in the stage."""
    cfg = load(site)
    v = str(site.version)
    sub = tmpfs_root() / "home" / "pbsct" / "sub"
    sub.mkdir()
    _sys.mount("tmpfs", str(sub), "tmpfs", _sys.MS_NOEXEC)  # suid, dev allowed on the host
    try:
        stage.join(cfg, "1.vm", v)
        try:
            inside = {m.mount_point: m for m in mounts.read_mountinfo()}[v + str(sub)]
            assert {"nosuid", "nodev", "noexec"} <= inside.options
        finally:
            stage.leave(cfg, "1.vm", v)
    finally:
        _sys.umount2(str(sub))
        sub.rmdir()
