"""Scratch space inside a stage: Torque's per-job $TMPDIR, the stage's /tmp, /dev/shm."""
import os
import subprocess

import pytest

from pbs_chroot import config, mounts, stage
from pbs_chroot.state import ensure_layout
from tests.conftest import GID, UID, USER, Site

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real mounts")]


def run_in_image(site: Site, script: str) -> subprocess.CompletedProcess:
    return site.run(USER, script)


def test_job_tmpdir_made_after_the_stage_is_there_at_the_same_path(site: Site) -> None:
    base = site.base / "torque-tmp"  # pbs_mom's $tmpdir
    base.mkdir(mode=0o755)
    site.write_config(main=f"tmpdir = {base}\n")
    cfg = config.load(str(site.config))
    ensure_layout(cfg.state_dir)
    v = str(site.version)
    stage.join(cfg, "1.vm", v, USER)  # the stage is up before job 2's $TMPDIR exists
    try:
        job_tmp = base / "2.vm"
        job_tmp.mkdir(mode=0o700)
        os.chown(job_tmp, UID, GID)
        res = run_in_image(site, f"cd {job_tmp} && echo hi > f && ls {job_tmp} && pwd")
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == ["f", str(job_tmp)]
        assert (job_tmp / "f").read_text() == "hi\n"  # the host's directory, not a copy
        m = {m.mount_point: m for m in mounts.read_mountinfo()}[v + str(base)]
        assert {"nosuid", "nodev"} <= m.options and "ro" not in m.options
    finally:
        stage.leave(cfg, "1.vm", v)


def test_stage_tmp_is_a_sticky_tmpfs_and_dev_shm_is_usable(site: Site) -> None:
    site.write_config()  # then opt in to a writable /tmp
    site.config.write_text(site.config.read_text().replace("[binds]\n", "[binds]\n/tmp = tmpfs\n"))
    res = run_in_image(site, "echo a > /tmp/a && echo b > /dev/shm/pbsct-b && cat /tmp/a "
                       "/dev/shm/pbsct-b && rm /dev/shm/pbsct-b && stat -c %a /tmp && "
                       "grep ' /tmp ' /proc/self/mounts")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[:3] == ["a", "b", "1777"]
    assert lines[3].split()[2] == "tmpfs" and {"nosuid", "nodev"} <= set(
        lines[3].split()[3].split(","))
    assert not (site.version / "tmp" / "a").exists()  # gone with the stage, never in the image


def test_tmpfs_and_tmpdir_in_the_config() -> None:
    cfg = config.parse("[pbs_chroot]\ntmpdir = /scratch/pbs\n[binds]\n/tmp = tmpfs noexec\n")
    assert cfg.tmpdir == "/scratch/pbs" and cfg.binds[0].source == "tmpfs"
    targets = {b.target: b for b in stage.bind_set(cfg)}
    assert targets["/scratch/pbs"].rec and not targets["/scratch/pbs"].readonly
    assert "/tmp" not in dict(config.DEFAULT_BINDS)  # the image's, read-only, by default
    with pytest.raises(config.ConfigError):
        config.parse("[pbs_chroot]\ntmpdir = scratch\n")


def test_the_runner_gives_each_job_a_tmpdir_of_its_own(site: Site) -> None:
    """`pbs-chroot run` does what pbs_mom does with $tmpdir: BASE/JOBID, the user's, as
    $TMPDIR, reachable at the same path inside the image, removed after the job."""
    base = site.base / "torque-tmp"
    base.mkdir(mode=0o755)
    site.write_config(main=f"tmpdir = {base}\n")
    res = run_in_image(site, 'echo "$TMPDIR"; echo hi > "$TMPDIR/f" && ls "$TMPDIR" && '
                       'stat -c "%u %a" "$TMPDIR"')
    assert res.returncode == 0, res.stderr
    tmpdir, listing, owner = res.stdout.splitlines()
    assert tmpdir.startswith(f"{base}/run-") and listing == "f" and owner == f"{UID} 700"
    assert os.listdir(base) == []  # gone with the job


def test_run_job_ids_cannot_be_foreseen(site: Site) -> None:
    site.write_config()
    ids = []
    for _ in range(2):
        res = run_in_image(site, 'echo "$PBS_JOBID"')
        assert res.returncode == 0, res.stderr
        ids.append(res.stdout.strip())
    pid_part = [i.split("-")[1] for i in ids]
    rand_part = [i.split("-")[2].split(".")[0] for i in ids]
    assert all(p.isdigit() for p in pid_part)  # the reconciler reads it
    assert all(len(r) == 12 for r in rand_part) and rand_part[0] != rand_part[1]


@pytest.mark.parametrize("planted", ["directory", "symlink"])
def test_a_name_planted_in_the_tmpdir_base_blocks_no_run(site: Site, planted: str) -> None:
    """Another user may make any name in a world-writable base first: a directory of
    theirs, or a symlink to somewhere of theirs. The job gets a fresh directory."""
    from pbs_chroot.admin import _make_job_tmpdir
    from tests.conftest import OTHER_UID
    base = site.base / "scratch"
    base.mkdir()
    os.chmod(base, 0o1777)
    job_id = "run-1-0123456789ab.node"
    theirs, target = base / job_id, site.base / "elsewhere"
    target.mkdir()
    os.chown(target, OTHER_UID, OTHER_UID)
    if planted == "directory":
        theirs.mkdir()
        os.chown(theirs, OTHER_UID, OTHER_UID)
    else:
        theirs.symlink_to(target)
        os.lchown(theirs, OTHER_UID, OTHER_UID)
    made = _make_job_tmpdir(str(base), job_id, USER)
    st = os.lstat(made)
    assert made.startswith(f"{theirs}.") and len(made) == len(str(theirs)) + 9
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (UID, GID, 0o700)
    assert os.lstat(theirs).st_uid == OTHER_UID and os.listdir(target) == []
    assert os.stat(target).st_uid == OTHER_UID  # nothing chowned through the link
    os.rmdir(made)


def test_a_tmpdir_base_that_others_may_write_but_is_not_sticky_is_refused(site: Site) -> None:
    from pbs_chroot.admin import _make_job_tmpdir
    from pbs_chroot.errors import ConfigError
    base = site.base / "scratch"
    base.mkdir()
    os.chmod(base, 0o777)
    with pytest.raises(ConfigError, match="not sticky"):
        _make_job_tmpdir(str(base), "run-1-0123456789ab.node", USER)
    assert os.listdir(base) == []
