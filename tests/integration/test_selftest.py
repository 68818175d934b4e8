"""`pbs-chroot selftest`: the pass/fail table, and that it leaves the node as it was."""
import os

import pytest

from tests.conftest import USER, Site, cgroup_children, mount_points, pbs_chroot_cli

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts, cgroups")]


def test_selftest_passes_and_leaves_nothing(site: Site) -> None:
    site.write_config()
    before = mount_points()
    res = pbs_chroot_cli("--config", str(site.config), "selftest", "--user", USER, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[-1] == "all checks passed"
    assert [x.split(":")[0] for x in lines[:-1]] == [
        "PASS  config", "PASS  job starter (no_new_privs for Torque jobs)",
        "PASS  gate refuses look-alike values", f"PASS  image {site.image}",
        f"PASS  stage and escapes {site.image}", "PASS  cgroup create/limit/kill/remove"]
    assert "13 escapes tried as pbsct through the job starter, 0 worked" in res.stdout
    assert mount_points() == before and cgroup_children() == []
    assert not site.state.exists() or os.listdir(site.state / "stages") == []


def test_selftest_fails_on_a_reachable_image(site: Site) -> None:
    site.write_config()
    os.chmod(site.versions, 0o755)
    res = pbs_chroot_cli("--config", str(site.config), "selftest", "--user", USER, check=False)
    assert res.returncode == 1
    assert f"FAIL  image {site.image}: image versions in" in res.stdout
    assert res.stdout.splitlines()[-1] == "1 check(s) FAILED"
