"""Opt-in: a real Debian 11 minbase image (debootstrap, ~30 s), a job through the runner.

Set PBS_CHROOT_TEST_DEBOOTSTRAP=1 (and optionally PBS_CHROOT_TEST_MIRROR).
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import UID, USER, Site, home_of, mount_points, pbs_chroot_cli

pytestmark = [
    pytest.mark.root, pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: debootstrap, mounts"),
    pytest.mark.skipif(os.environ.get("PBS_CHROOT_TEST_DEBOOTSTRAP") != "1",
                       reason="opt-in: set PBS_CHROOT_TEST_DEBOOTSTRAP=1"),
]


@pytest.fixture(scope="module")
def debian11(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not shutil.which("debootstrap"):
        pytest.fail("debootstrap missing: scripts/setup installs it when this test is enabled")
    root = tmp_path_factory.mktemp("debian11") / "v1"
    mirror = os.environ.get("PBS_CHROOT_TEST_MIRROR", "http://deb.debian.org/debian")
    res = subprocess.run(["debootstrap", "--variant=minbase", "bullseye", str(root), mirror],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return root


def test_job_in_debian11(tmp_path: Path, debian11: Path) -> None:
    site = Site(tmp_path, debian11)
    site.write_config()
    before = mount_points()
    res = pbs_chroot_cli("--config", str(site.config), "run", "--image", str(site.image),
                         "--user", USER, "--", "/bin/bash", "-c",
                         "cat /etc/debian_version; id -u; getent passwd $USER; "
                         "cd ~ && pwd; ls /proc/self/fd >/dev/null && echo proc-ok", check=False)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("11.")
    assert lines[1] == str(UID) and lines[2].startswith(f"{USER}:x:{UID}:")
    assert lines[3] == str(home_of(USER)) and lines[4] == "proc-ok"
    assert mount_points() == before
