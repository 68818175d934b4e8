"""Issue 16's levers, on real mounts, cgroups and processes: the job process moved into its
cgroup while the request is checked (and back out when it is refused), and an idle
stage kept for a grace period, torn down by a detached worker or, when the worker is
killed, by the reconciler."""
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

from pbs_chroot import cgroups, config, lifecycle, stage
from pbs_chroot.errors import UserError
from pbs_chroot.state import ensure_layout, load_record
from tests.conftest import (CG_PARENT, USER, Node, Site, Syslog, home_of, mount_points,
                            pbs_chroot_cli)

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts, cgroups")]


def cgroup_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def worker_pids(node: Node) -> list:
    """The teardown workers the hooks said they started (syslog)."""
    return [int(line.split("teardown worker ")[1].split(",")[0])
            for line in node.syslog.lines() if "teardown worker " in line]


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def stage_mounted(node: Node) -> bool:
    return any(m == str(node.site.version) for m in mount_points())


# --- the cgroup move, overlapped with the check ------------------------------------------------

@pytest.fixture
def cfg(node: Node) -> config.Config:
    (node.site.pbs_home / "mom_priv" / "jobs").mkdir(parents=True, exist_ok=True)
    c = config.load(str(node.site.config))
    ensure_layout(c.state_dir)
    return c


def start(cfg: config.Config, job_id: str, pid: int,
          check: Callable[[], Optional[str]]) -> Optional[str]:
    job = lifecycle.Job(job_id, USER, USER, "batch", "mem=100mb")
    return lifecycle.start_job(cfg, job, None, pid, check=check)


def test_refused_job_is_moved_back_out_and_its_cgroup_removed(node: Node,
                                                              cfg: config.Config) -> None:
    p = subprocess.Popen(["sleep", "1000"])
    try:
        before = cgroup_of(p.pid)
        seen: list = []

        def refuse() -> Optional[str]:
            seen.append(cgroup_of(p.pid))  # while the check runs, the move is under way
            time.sleep(0.2)
            seen.append(cgroup_of(p.pid))
            raise UserError("can't use image: not allowed")
        with pytest.raises(UserError):
            start(cfg, "31.vm", p.pid, refuse)
        assert f"/{CG_PARENT}/31.vm" in seen[-1]  # it was attached before the refusal ...
        assert cgroup_of(p.pid) == before          # ... and is back where it came from
        layout = cgroups.detect()
        assert not cgroups.job_cgroup(layout, CG_PARENT, "31.vm").exists()
        assert load_record(cfg.state_dir, "31.vm") is None
    finally:
        p.kill()
        p.wait()


def test_checked_job_is_in_its_cgroup_and_its_stage(node: Node, cfg: config.Config) -> None:
    p = subprocess.Popen(["sleep", "1000"])
    try:
        version = start(cfg, "32.vm", p.pid, lambda: str(node.site.image))
        assert version == str(node.site.version)
        assert f"/{CG_PARENT}/32.vm" in cgroup_of(p.pid)
        rec = load_record(cfg.state_dir, "32.vm")
        assert rec is not None and rec["started"] and rec["image"] == str(node.site.image)
        assert rec["cgroup"]["attached"] == p.pid and rec["cgroup"]["origin"]
        assert stage.members(stage.stage_dir(cfg, version)) == ["32.vm"]
        lifecycle.end_job(cfg, "32.vm", "0")
        assert p.wait(5) == -signal.SIGKILL
        node.assert_clean()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_refused_torque_job_leaves_no_cgroup(node: Node) -> None:
    res = node.emu.run(node.job(node.rootdir("/chroot/not-allowed")))
    assert res.prologue_rc == 1 and res.action == "aborted", res.stderr
    assert res.epilogue_rc == 0
    node.assert_clean()  # (and the no_leaks fixture: no cgroup left)


@pytest.mark.parametrize("early", ["yes", "no"])
def test_jobs_run_in_the_image_either_way(node: Node, early: str) -> None:
    node.configure(f"early_attach = {early}\n")
    before = mount_points()
    res = node.emu.run(node.job(node.rootdir()))
    assert res.action == "ran" and res.prologue_rc == 0 and res.job_rc == 0, res.stderr
    assert "proc-ok" in res.stdout and res.epilogue_rc == 0
    assert mount_points() == before
    node.assert_clean()


# --- an idle stage's grace period ----------------------------------------------------------------

def test_idle_stage_is_kept_for_its_grace_then_the_worker_tears_it_down(node: Node) -> None:
    node.configure("stage_grace = 1.5\n")
    before = mount_points()
    first = node.emu.run(node.job(node.rootdir()))
    assert first.action == "ran" and first.epilogue_rc == 0, first.stderr
    assert stage_mounted(node)  # the epilogue returned; the stage is still up
    second = node.emu.run(node.job(node.rootdir()))  # joins it: no set-up
    assert second.action == "ran" and "proc-ok" in second.stdout, second.stderr
    setups = [line for line in node.syslog.lines() if "setting up stage" in line]
    assert len(setups) == 1
    workers = worker_pids(node)
    assert workers  # one worker; the second job's epilogue found it alive, or started one
    until(lambda: not stage_mounted(node), 30, "the idle stage was not torn down")
    until(lambda: not any(is_alive(p) for p in workers), 10, "a teardown worker lives on")
    assert mount_points() == before
    node.assert_clean()
    assert any("idle for its grace period: torn down" in line for line in node.syslog.lines())


def test_killed_worker_leaves_the_teardown_to_the_reconciler(node: Node) -> None:
    node.configure("stage_grace = 2\n")
    before = mount_points()
    res = node.emu.run(node.job(node.rootdir()))
    assert res.action == "ran" and res.epilogue_rc == 0, res.stderr
    (worker,) = worker_pids(node)
    os.kill(worker, signal.SIGKILL)  # as a reboot or pbs_mom's unit stopping would
    until(lambda: not is_alive(worker), 10, "the worker did not die")
    assert stage_mounted(node)
    cleanup = ["--config", str(node.site.config), "cleanup"]
    assert pbs_chroot_cli(*cleanup).returncode == 0
    assert stage_mounted(node)  # within the grace period: kept
    sdir = stage.stage_dir(config.load(str(node.site.config)), str(node.site.version))
    deadline = stage.idle_deadline(sdir)
    assert deadline is not None
    time.sleep(max(0.0, deadline - time.time()) + 0.1)
    assert stage_mounted(node)  # nobody else tears it down
    res2 = pbs_chroot_cli(*cleanup)
    assert res2.returncode == 0, res2.stderr
    assert not stage_mounted(node) and mount_points() == before
    node.assert_clean()


def test_a_job_joining_an_idle_stage_keeps_it(node: Node) -> None:
    node.configure("stage_grace = 0.5\n")
    holder_script = ("#!/bin/sh\ntouch \"$HOME/started.$PBS_JOBID\"\n"
                     "until [ -e \"$HOME/end.$PBS_JOBID\" ]; do sleep 0.05; done\n")
    first = node.emu.run(node.job(node.rootdir()))
    assert first.epilogue_rc == 0, first.stderr
    holder = node.job(node.rootdir(), holder_script)
    running = node.emu.start(holder)
    started = home_of(USER) / f"started.{holder.job_id}"
    until(lambda: running.poll() is not None or started.exists(), 30, "holder did not start")
    time.sleep(1.5)  # past the first grace period: the worker must leave a used stage alone
    assert stage_mounted(node)
    (home_of(USER) / f"end.{holder.job_id}").touch()
    assert running.wait(60).epilogue_rc == 0
    until(lambda: not stage_mounted(node), 30, "the stage was not torn down after its grace")
    until(lambda: not any(is_alive(p) for p in worker_pids(node)), 10, "a worker lives on")
    node.assert_clean()


# --- the epilogue's teardown, deferred -----------------------------------------------------------

def test_deferred_teardown_is_finished_by_the_worker(node: Node) -> None:
    node.configure("defer_teardown = yes\n")
    before = mount_points()
    job = node.job(node.rootdir())
    res = node.emu.run(job)
    assert res.action == "ran" and res.epilogue_rc == 0 and "proc-ok" in res.stdout, res.stderr
    workers = worker_pids(node)
    assert workers
    until(lambda: not any(is_alive(p) for p in workers), 30, "the worker did not finish")
    assert mount_points() == before
    node.assert_clean()
    assert [a["job_id"] for a in node.site.accounting_lines()] == [job.job_id]


def test_killed_deferred_worker_leaves_the_job_to_the_reconciler(site: Site,
                                                                 syslog: Syslog) -> None:
    n = Node(site, syslog, hook_env={"PBS_CHROOT_TEST_KILL_AT": "deferred:start"})
    try:
        n.configure("defer_teardown = yes\n")
        before = mount_points()
        job = n.job(n.rootdir())
        res = n.emu.run(job)
        assert res.action == "ran" and res.epilogue_rc == 0, res.stderr
        (worker,) = worker_pids(n)
        until(lambda: not is_alive(worker), 10, "the worker did not die at its fault point")
        # What the epilogue left: the job's processes dead, its accounting written ...
        assert [a["job_id"] for a in n.site.accounting_lines()] == [job.job_id]
        cfg = config.load(str(n.site.config))
        rec = load_record(cfg.state_dir, job.job_id)
        assert rec is not None and rec["accounted"]
        assert stage_mounted(n)  # ... the stage and the record the worker never got to
        res2 = pbs_chroot_cli("--config", str(n.site.config), "cleanup")
        assert res2.returncode == 0 and f"finished job {job.job_id}" in res2.stdout, res2.stderr
        assert mount_points() == before
        n.assert_clean()
        assert len(n.site.accounting_lines()) == 1  # not accounted twice
    finally:
        n.emu.cleanup()


# --- a stage's passwd and group, cached per set of users ----------------------------------------

def test_identity_files_are_made_again_only_when_the_users_change(tmp_path: Path) -> None:
    from pbs_chroot import identity
    from tests.conftest import OTHER
    sdir = tmp_path / "stage"
    identity.prepare(str(sdir))
    (sdir / "image-passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (sdir / "image-group").write_text("root:x:0:\n")
    (sdir / "members" / "1.vm").write_text(USER)
    passwd = sdir / "passwd"

    def made() -> None:
        passwd.write_text("stale\n")  # a mark: a refresh that writes replaces it
    assert identity.refresh(str(sdir), 60) and USER in passwd.read_text()
    made()
    (sdir / "members" / "2.vm").write_text(USER)  # another job of the same user
    assert identity.refresh(str(sdir), 60) and passwd.read_text() == "stale\n"
    (sdir / "members" / "3.vm").write_text(OTHER)  # a new user: made again
    assert identity.refresh(str(sdir), 60) and OTHER in passwd.read_text()
    made()
    (sdir / "members" / "3.vm").unlink()
    assert identity.refresh(str(sdir), 60) and OTHER not in passwd.read_text()
    made()
    assert identity.refresh(str(sdir), 0) and USER in passwd.read_text()  # no cache
    made()
    old = time.time() - 120
    os.utime(sdir / "identity.users", (old, old))  # too old: NSS is asked again
    assert identity.refresh(str(sdir), 60) and USER in passwd.read_text()
