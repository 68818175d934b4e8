"""`pbs-chroot cleanup`: the reconciler, on real mounts, processes and cgroups."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pbs_chroot import cgroups, config, lifecycle, stage
from pbs_chroot.state import ensure_layout
from tests.conftest import CG_PARENT, USER, Site, mount_points, pbs_chroot_cli

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts, cgroups")]


def setup_site(site: Site) -> config.Config:
    (site.pbs_home / "mom_priv" / "jobs").mkdir(parents=True)
    site.write_config()  # (and the mount points, the job directory's with them)
    cfg = config.load(str(site.config))
    ensure_layout(cfg.state_dir)
    return cfg


def orphan(cfg: config.Config, site: Site, job_id: str) -> subprocess.Popen:
    """A job whose epilogue never ran: record, stage, cgroup, and a live process in it."""
    p = subprocess.Popen(["sleep", "1000"])
    lifecycle.start_job(cfg, lifecycle.Job(job_id, USER, USER, "batch", "mem=100mb"),
                        str(site.image), p.pid)
    return p


def cleanup(site: Site, *extra: str) -> subprocess.CompletedProcess:
    return pbs_chroot_cli("--config", str(site.config), "cleanup", *extra, check=False)


def test_dead_jobs_are_finished_and_running_ones_left_alone(site: Site) -> None:
    cfg = setup_site(site)
    before = mount_points()
    dead = orphan(cfg, site, "7.vm")
    alive = orphan(cfg, site, "8.vm")
    (site.pbs_home / "mom_priv" / "jobs" / "8.vm.SC").write_text("")  # pbs_mom still has it
    try:
        res = cleanup(site, "--dry-run")
        assert res.returncode == 0 and res.stdout == "would finish job 7.vm\n"
        assert dead.poll() is None  # a dry run does nothing
        res = cleanup(site)
        assert res.returncode == 0 and res.stdout == "finished job 7.vm\n", res.stderr
        assert dead.wait(5) == -signal.SIGKILL and alive.poll() is None
        acct = json.loads(site.accounting.read_text().splitlines()[-1])
        assert acct["job_id"] == "7.vm" and acct["recovered"] is True
        assert stage.members(stage.stage_dir(cfg, str(site.version))) == ["8.vm"]
        assert cleanup(site).stdout == "nothing to clean up\n"  # idempotent
        # pbs_mom purges job 8; its epilogue never ran: the next pass finishes it.
        (site.pbs_home / "mom_priv" / "jobs" / "8.vm.SC").unlink()
        assert cleanup(site).stdout == "finished job 8.vm\n"
        assert alive.wait(5) == -signal.SIGKILL
    finally:
        for p in (dead, alive):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert mount_points() == before
    assert os.listdir(site.state / "jobs") == [] and os.listdir(site.state / "stages") == []


def test_cgroup_without_record_and_stale_member_are_removed(site: Site) -> None:
    cfg = setup_site(site)
    layout = cgroups.detect()
    cg = cgroups.job_cgroup(layout, CG_PARENT, "9.vm")
    cg.create()
    p = subprocess.Popen(["sleep", "1000"])
    cg.attach(p.pid)
    stage.join(cfg, "10.vm", str(site.version))  # a member whose record is gone
    try:
        res = cleanup(site)
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == [
            f"removed stale stage member {site.version}: 10.vm",
            "removed cgroup without a record: 9.vm"]
        assert p.wait(5) == -signal.SIGKILL and not cg.exists()
        assert not any(str(site.version) in m for m in mount_points())
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        cg.remove()


def test_runner_jobs_are_running_while_the_runner_lives(site: Site) -> None:
    cfg = setup_site(site)
    from pbs_chroot.reconcile import is_running
    assert is_running(cfg, f"run-{os.getpid()}-1.vm")
    p = subprocess.Popen(["true"])
    p.wait()
    assert not is_running(cfg, f"run-{p.pid}-1.vm")
    assert is_running(cfg, "12.server.example.org", ["12.server.SC"])  # cut prefixes count
    assert not is_running(cfg, "12.vm", ["123.vm.SC"])


def test_cleanup_after_kill_9_of_prologue_job_and_epilogue(site: Site) -> None:
    """The issue's own check: kill -9 a prologue, a job and an epilogue mid-work."""
    from tests.conftest import Node, Syslog
    syslog = Syslog(site.base / "log.sock")
    node = Node(site, syslog, hook_env={"PBS_CHROOT_TEST_KILL_AT": "attached"})
    try:
        before = mount_points()
        job = node.job(node.rootdir(), "#!/bin/sh\nsleep 1000\n")
        running = node.emu.start(job)
        deadline = time.monotonic() + 30
        layout = cgroups.detect()
        procs = Path(layout.v1["memory"] if layout.version == 1 else str(layout.v2)) \
            / CG_PARENT / job.job_id / "cgroup.procs"
        while not (procs.exists() and procs.read_text().strip()):
            assert time.monotonic() < deadline, "the job did not start"
            running.poll()
            time.sleep(0.05)
        running.kill()  # kill -9 the job (and, as pbs_mom is gone, no epilogue)
        res = cleanup(site)
        assert res.returncode == 0 and f"finished job {job.job_id}" in res.stdout, res.stderr
        assert mount_points() == before
        assert os.listdir(site.state / "jobs") == [] and os.listdir(site.state / "stages") == []
        assert not procs.parent.exists()
    finally:
        node.emu.cleanup()
        syslog.sock.close()
