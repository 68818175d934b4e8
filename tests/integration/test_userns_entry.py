"""Root-prepared stages entered without root (issue 13): the shim of batch systems that start
jobs as the user, and `pbs-chroot run` by a user whose job holds the image's stage.

Root does what an execjob_begin hook (or a prologue) does: lifecycle.start_job, which
makes the job's cgroup, joins the stage, publishes its entry and attaches the
process that then becomes the job: here a process already dropped to pbsct,
which execs the shim, as a mom's job child would.
"""
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from pbs_chroot import config, lifecycle
from pbs_chroot.state import ensure_layout
from tests.conftest import (CG_PARENT, EXTRA_GID, GID, OTHER_UID, UID, USER, Site,
                            mount_points)
from tests.integration.test_userns import as_user, user_python  # noqa: F401

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: stages, cgroups, "
                                 "users")]

JOB = "777.vm"


@pytest.fixture(scope="module")
def v2_delegated() -> Iterator[None]:
    """On a cgroup v2 (run-in-cgroup-v2.sh), the root's controllers enabled for our parent as
    systemd's Delegate= would (as test_cgroups_v2_real does), and disabled again after."""
    top = Path("/sys/fs/cgroup/cgroup.subtree_control")
    enabled = []
    if top.exists():
        enabled = [c for c in ("memory", "cpu", "pids") if c not in top.read_text().split()]
        if enabled:
            top.write_text(" ".join("+" + c for c in enabled))
    yield
    if enabled:
        try:
            os.rmdir(top.parent / CG_PARENT)  # empty by now (the per-test leak check)
            top.write_text(" ".join("-" + c for c in enabled))
        except OSError:
            pass  # still used by a cgroup made elsewhere: left enabled (a throw-away guest)


@pytest.fixture
def entry_site(site: Site, v2_delegated: None) -> Iterator[Site]:
    site.write_config(main=f"entry_dir = {site.base / 'entry'}\n")
    yield site


class Shim:
    """The shim as ``uid``, attached by root to the job's cgroup before it drops and execs
    (forked by hand: subprocess waits for the exec, which waits for the attach)."""

    def __init__(self, user_python: tuple, site: Site, script: str,  # noqa: F811
                 uid: int = UID, job: str = JOB) -> None:
        python, pkg = user_python
        self.cfg = config.load(str(site.config))
        ensure_layout(self.cfg.state_dir)
        self.out, self.err = site.base / "shim.out", site.base / "shim.err"
        argv = [python, "-I", "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); "
                "from pbs_chroot.shim import main; main()", str(pkg), "--config",
                str(site.config), "--", "/bin/sh", "-c", script]
        gid, groups = (GID, [EXTRA_GID]) if uid == UID else (uid, [])
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(w)
                os.read(r, 1)  # root has attached us to the job's cgroup
                for fd, path in ((1, self.out), (2, self.err)):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
                os.closerange(3, 1 << 16)
                os.setgroups(groups)
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
                os.chdir("/")
                os.execve(python, argv, {"PATH": "/usr/bin:/bin", "PBS_JOBID": job})
            finally:
                os._exit(127)
        os.close(r)
        try:
            lifecycle.start_job(self.cfg, lifecycle.Job(job, USER, USER, "batch", ""),
                                str(site.image), self.pid)
        finally:
            os.write(w, b"x")
            os.close(w)

    def wait(self, timeout: float = 60) -> tuple[int, str, str]:
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
            time.sleep(0.05)
        return (os.waitstatus_to_exitcode(status), self.out.read_text(),
                self.err.read_text())

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGTERM)
        self.wait()


def test_shim_enters_the_stage_of_its_job(user_python: tuple,  # noqa: F811
                                          entry_site: Site) -> None:
    before = mount_points()
    script = ("cat /etc/os-release; id -un; id -u; grep -c 777.vm /proc/self/cgroup; "
              "echo $PBS_JOBID; grep -E '^Cap(Eff|Bnd)' /proc/self/status; touch /tmp/x "
              "|| echo tmp-ro; ls /proc | grep -c '^[0-9]'")
    shim = Shim(user_python, entry_site, script)
    try:
        code, out, err = shim.wait()
        entry = entry_site.base / "entry"
        # While the job holds it: pbsct may enter the stage's entry, pbsct2 may not.
        key = os.listdir(entry / "stages")[0]
        assert (entry / "jobs" / JOB).read_text().split("\n")[1] == USER
        ls = [subprocess.run(["ls", str(entry / "stages" / key / "root" / "bin" / "sh")],
                             user=u, group=u, capture_output=True, text=True)
              for u in (UID, OTHER_UID)]
    finally:
        lifecycle.end_job(shim.cfg, JOB, "0")
    assert code == 0, err
    lines = out.splitlines()
    assert "pbs_chroot demo image" in out
    assert lines[4:6] == [USER, str(UID)]  # the stage's passwd knows pbsct
    assert int(lines[6]) >= 1  # in its job's cgroup (one line per v1 hierarchy)
    assert lines[7] == JOB  # the environment the batch system gave the job is kept
    assert "CapEff:\t0000000000000000" in out and "CapBnd:\t0000000000000000" in out
    assert "tmp-ro" in out  # the root-prepared stage, as a Torque job sees it (ro /tmp)
    assert int(lines[-1]) < 10  # a /proc of its own PID namespace
    assert ls[0].returncode == 0 and "Permission denied" in ls[1].stderr
    assert mount_points() == before
    assert os.listdir(entry / "stages") == [] and os.listdir(entry / "jobs") == []


def test_shim_refuses_another_users_job_and_no_job(user_python: tuple,  # noqa: F811
                                                   entry_site: Site) -> None:
    """The record names pbsct: pbsct2, even in that job's cgroup, is not let in."""
    shim = Shim(user_python, entry_site, "echo inside", uid=OTHER_UID)
    try:
        code, out, err = shim.wait()
    finally:
        lifecycle.end_job(shim.cfg, JOB, "0")
    assert code == 125 and "inside" not in out
    assert "has none of yours" in err
    res = as_user(user_python, "--config", str(entry_site.config), "run", "--image",
                  str(entry_site.image), "--", "/bin/true")
    assert res.returncode == 2 and "no job of yours here has it staged" in res.stderr
    python, pkg = user_python
    res = subprocess.run([python, "-I", "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); "
                          "from pbs_chroot.shim import main; main()", str(pkg), "--config",
                          str(entry_site.config), "--", "/bin/true"], user=UID, group=GID,
                         capture_output=True, text=True)
    assert res.returncode == 125 and "can't tell which job" in res.stderr


def test_run_enters_the_stage_of_a_job_of_the_user(user_python: tuple,  # noqa: F811
                                                   entry_site: Site) -> None:
    """Versions are root's only (0700): `run --image` as pbsct goes through its job's stage."""
    shim = Shim(user_python, entry_site, "sleep 30")
    try:
        # A second job of the user in the same stage, gone again: the first one's record stays.
        lifecycle.start_job(shim.cfg, lifecycle.Job("778.vm", USER, USER, "batch", ""),
                            str(entry_site.image), None)
        lifecycle.end_job(shim.cfg, "778.vm", "0")
        assert os.listdir(entry_site.base / "entry" / "jobs") == [JOB]
        res = as_user(user_python, "--config", str(entry_site.config), "run", "--image",
                      str(entry_site.image), "--", "/bin/sh", "-c",
                      "head -1 /etc/os-release; id -un; touch /tmp/x || echo tmp-ro")
    finally:
        shim.kill()
        lifecycle.end_job(shim.cfg, JOB, "0")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[1:] == [USER, "tmp-ro"]
    assert "pbs_chroot demo image" in res.stdout


def test_job_of_reads_the_cgroup_not_the_environment(tmp_path: Path) -> None:
    from pbs_chroot.userns_shim import job_of
    cfg = config.parse("[pbs_chroot]\ncgroup_parent = pbs_chroot\n")
    v1 = "12:memory:/pbs_chroot/5.srv\n11:cpuacct,cpu:/pbs_chroot/5.srv/task\n1:name=x:/\n"
    assert job_of(cfg, v1) == "5.srv"
    assert job_of(cfg, "0::/torque/6.srv\n") == "6.srv"
    for bad in ("0::/user.slice\n", "1:memory:/pbs_chroot/5.srv\n2:cpu:/pbs_chroot/6.srv\n",
                "0::/pbs_chroot/..\n"):
        with pytest.raises(Exception, match="can't tell which job"):
            job_of(cfg, bad)
