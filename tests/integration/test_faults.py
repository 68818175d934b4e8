"""Fault injection at every step, enumerated from the code: kill, recover, check, run again.

A traced job lists every step the prologue and the epilogue pass through
(faults.point); the hooks are then SIGKILLed at each step in turn. After
each kill, what Torque does next happens (a signal-killed prologue counts
as a success: the job runs, then the epilogue), then `pbs-chroot cleanup`.
Nothing may be left, and a later job on the same image must work.
"""
import os
from pathlib import Path

import pytest

from tests.conftest import (SUMMARY, Node, Site, Syslog, cgroup_children, mount_points,
                            pbs_chroot_cli)

pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts, cgroups")]


def _traced_points(node: Node, trace: Path) -> list:
    node.emu.hook_env = {"PBS_CHROOT_TEST_TRACE": str(trace)}
    res = node.emu.run(node.job(node.rootdir()))
    assert res.job_rc == 0 and res.epilogue_rc == 0, res.stderr
    return list(dict.fromkeys(trace.read_text().split("\n")[:-1]))  # in order, once each


def _assert_clean(node: Node, before: list) -> None:
    assert mount_points() == before
    assert cgroup_children() == []
    assert os.listdir(node.site.state / "jobs") == []
    assert os.listdir(node.site.state / "stages") == []


def test_kill_at_every_step_then_recover(site: Site, syslog: Syslog) -> None:
    node = Node(site, syslog)
    try:
        before = mount_points()
        points = _traced_points(node, site.base / "trace")
        assert {"recorded", "stage:ready", "mount:/proc", "end:killed", "umount:/proc",
                "end:cgroup_removed"} <= set(points), points
        recovered = 0
        for point in points:
            node.emu.hook_env = {"PBS_CHROOT_TEST_KILL_AT": point}
            res = node.emu.run(node.job(node.rootdir()))
            died = res.prologue_rc == -9 or res.epilogue_rc == -9
            assert died, f"{point}: nothing died there"
            out = pbs_chroot_cli("--config", str(site.config), "cleanup", check=False)
            assert out.returncode == 0, f"{point}: {out.stdout}{out.stderr}"
            _assert_clean(node, before)
            node.emu.hook_env = {}
            again = node.emu.run(node.job(node.rootdir()))
            assert again.job_rc == 0 and "proc-ok" in again.stdout, f"after {point}: {again}"
            _assert_clean(node, before)
            recovered += 1
        SUMMARY["fault points killed and recovered"] = f"{recovered} of {len(points)}"
    finally:
        node.emu.cleanup()
