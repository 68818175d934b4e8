"""A new admin's first hour (issue 12): the CLI's refusals come first, once, and say what
to do; `run` forwards Ctrl-C to the whole job."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import USER, Site, home_of, mount_points, pbs_chroot_cli

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real mounts")]


@pytest.mark.parametrize("user, why", [
    ("nosuchuser", "no user 'nosuchuser' on this node"),
    ("root", "refusing to run a job as 'root' (uid 0): jobs never run as root")])
def test_run_refuses_a_bad_user_before_doing_anything(site: Site, user: str, why: str) -> None:
    site.write_config()
    before = mount_points()
    res = site.run(user, "true")
    assert res.returncode == 2 and res.stderr == f"pbs-chroot: run: {why}\n"
    assert mount_points() == before
    assert site.accounting_lines() == []
    assert not site.state.exists() or site.state_files() in ([], ["jobs", "stages"])


def test_ctrl_c_on_run_reaches_every_process_of_the_job(site: Site) -> None:
    site.write_config()
    mark = home_of(USER) / "got-term"
    if mark.exists():
        mark.unlink()
    # A background child of the job's shell, as in any real job: it must hear it too (the
    # shell waits for it, so the job ends only once the child has had its say).
    script = (f"trap 'wait; exit 0' TERM; "
              f"(trap 'echo term > {mark}; exit 0' TERM; while :; do sleep 0.05; done) & "
              "echo started; wait")
    proc = subprocess.Popen([sys.executable, "-m", "pbs_chroot", "--config", str(site.config),
                             "run", "--image", str(site.image), "--user", USER, "--",
                             "/bin/sh", "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "started\n"
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        # Only the top process heard it (the bug this test is for): end the whole job
        # ourselves, so that a failure leaves no process, stage or cgroup behind.
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        for child in children:
            os.killpg(int(child), signal.SIGTERM)
        proc.wait(timeout=60)
        pytest.fail("SIGTERM to `pbs-chroot run` did not reach the job's other processes")
    assert mark.read_text() == "term\n"
    mark.unlink()


def test_config_mistakes_are_named(site: Site, tmp_path: Path) -> None:
    site.write_config()
    fifo = tmp_path / "fifo.conf"
    os.mkfifo(fifo)
    link = tmp_path / "link.conf"
    link.symlink_to(site.config)
    for path, what in ((tmp_path, "is not a regular file"), (fifo, "is not a regular file"),
                       (link, "it is a symlink (symlinks are refused")):
        res = pbs_chroot_cli("--config", str(path), "check", check=False)
        assert res.returncode == 1 and "Traceback" not in res.stderr
        # Once, whether or not this machine has a syslog socket.
        assert res.stderr.count(what) == 1, res.stderr
    empty = tmp_path / "empty.conf"
    empty.write_text("[pbs_chroot]\n")
    res = pbs_chroot_cli("--config", str(empty), "check", check=False)
    assert res.returncode == 0 and "WARNING" in res.stdout and "allowlists no image" in res.stdout


def test_an_unknown_option_is_named() -> None:
    res = pbs_chroot_cli("--bogus", check=False)
    assert res.returncode == 2 and "unknown option '--bogus'" in res.stderr
    assert "required" not in res.stderr
    res = pbs_chroot_cli("--help")
    assert "exit codes:" in res.stdout and "``" not in res.stdout


def test_run_and_selftest_leave_no_empty_cgroup_parent(site: Site) -> None:
    from pbs_chroot import cgroups
    from tests.conftest import CG_PARENT
    site.write_config()
    layout = cgroups.detect()
    tops = sorted(set(layout.v1.values())) if layout.version == 1 else [str(layout.v2)]
    assert site.run(USER, "true").returncode == 0
    assert [t for t in tops if os.path.isdir(os.path.join(t, CG_PARENT))] == []
    res = pbs_chroot_cli("--config", str(site.config), "selftest", "--user", USER, check=False)
    assert "cgroup" in res.stdout
    assert [t for t in tops if os.path.isdir(os.path.join(t, CG_PARENT))] == []


def test_a_job_cgroup_is_made_even_if_the_parent_goes_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """remove_parent_if_empty may run between a prologue's two mkdirs: create() retries."""
    from pbs_chroot.cgroups import v1
    mounts = {c: str(tmp_path / c) for c in ("memory", "cpu")}
    for d in mounts.values():
        os.mkdir(d)
    real = v1.make_dir
    removed = []

    def racing(path: str) -> None:
        real(path)
        if path.endswith("/parent") and not removed:
            os.rmdir(path)  # the other command's rmdir, right after ours
            removed.append(path)
    monkeypatch.setattr(v1, "make_dir", racing)
    cg = v1.CgroupV1("parent/1.vm", mounts)
    cg.create()
    assert removed and all(os.path.isdir(os.path.join(d, "parent", "1.vm"))
                           for d in mounts.values())
