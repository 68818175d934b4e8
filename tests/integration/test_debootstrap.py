"""Opt-in: the image lifecycle on a real Debian 11 minbase image (debootstrap, ~30 s).

Build it with `pbs-chroot image build`, deploy it, run jobs in it through the
runner, deploy a second version under a running job, roll back, collect.
Set PBS_CHROOT_TEST_DEBOOTSTRAP=1 (and optionally PBS_CHROOT_TEST_MIRROR).
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import UID, USER, Site, home_of, mount_points, pbs_chroot_cli

pytestmark = [
    pytest.mark.root, pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: debootstrap, mounts"),
    pytest.mark.skipif(os.environ.get("PBS_CHROOT_TEST_DEBOOTSTRAP") != "1",
                       reason="opt-in: set PBS_CHROOT_TEST_DEBOOTSTRAP=1"),
]

PROBE = ("cat /etc/debian_version; cat /etc/pbs-test-marker 2>/dev/null || echo built; "
         "id -u; getent passwd $USER; cd ~ && pwd; ls /proc/self/fd >/dev/null && echo proc-ok")


def test_debian11_build_deploy_switch_rollback_gc(tmp_path: Path, image_root: Path) -> None:
    if not shutil.which("debootstrap"):
        pytest.fail("debootstrap missing: scripts/setup installs it when this test is enabled")
    site = Site(tmp_path, image_root)
    deb11, vdir = tmp_path / "chroot" / "deb11", tmp_path / "images" / "deb11"
    site.write_config(extra=f"[image {deb11}]\nversions = {vdir}\n")
    before = mount_points()

    def cli(*args: str) -> str:
        res = pbs_chroot_cli("--config", str(site.config), *args, check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout

    def job(wait_for: str = "") -> "subprocess.Popen[str]":
        script = PROBE + (f"; while [ ! -e ~/{wait_for} ]; do sleep 0.1; done" if wait_for
                          else "")
        return subprocess.Popen([sys.executable, "-m", "pbs_chroot", "--config", str(site.config),
                                 "run", "--image", str(deb11), "--user", USER, "--",
                                 "/bin/bash", "-c", script],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def ran(p: "subprocess.Popen[str]") -> list[str]:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        return out.splitlines()

    mirror = os.environ.get("PBS_CHROOT_TEST_MIRROR", "http://deb.debian.org/debian")
    out = cli("image", "build", "deb11", "--debootstrap", "bullseye", "--mirror", mirror)
    first = out.strip().splitlines()[-1].split()[1].rstrip(";")
    assert os.path.dirname(first) == str(vdir) and not os.path.lexists(deb11)
    cli("image", "deploy", "deb11", first)  # a built version: audited and switched, no copy
    assert os.readlink(deb11) == first
    lines = ran(job())
    assert lines[0].startswith("11.") and lines[1] == "built"
    assert lines[2] == str(UID) and lines[3].startswith(f"{USER}:x:{UID}:")
    assert lines[4] == str(home_of(USER)) and lines[5] == "proc-ok"

    master = tmp_path / "master"  # the master copy the nodes rsync from
    subprocess.run(["cp", "-a", first, str(master)], check=True)  # (no stage up now)
    (master / "etc" / "pbs-test-marker").write_text("second\n")
    long_job = job(f"go-{tmp_path.name}")  # (homes outlive a test: a name of its own)
    try:
        deadline = time.monotonic() + 30
        while "jobs: run-" not in cli("image", "list", "deb11"):
            assert time.monotonic() < deadline and long_job.poll() is None
            time.sleep(0.1)
        cli("image", "deploy", "deb11", str(master))
        second = os.readlink(deb11)
        assert second != first
        assert ran(job())[1] == "second"  # new jobs: the new version
        cli("image", "rollback", "deb11")
        assert os.readlink(deb11) == first and ran(job())[1] == "built"
        cli("image", "rollback", "deb11", os.path.basename(second))
        out = cli("image", "gc", "deb11", "--keep", "1")
        assert f"kept {first} (in use by run-" in out and os.path.isdir(first)
        (home_of(USER) / f"go-{tmp_path.name}").touch()
        assert ran(long_job)[1] == "built"  # it kept its version to the end
    finally:
        if long_job.poll() is None:
            long_job.terminate()
            long_job.wait(30)
    out = cli("image", "gc", "deb11", "--keep", "1")
    assert f"removed {first}" in out and not os.path.exists(first) and os.path.isdir(second)
    assert mount_points() == before
    from tests.conftest import SUMMARY
    SUMMARY["Debian 11 image lifecycle"] = ("built with debootstrap, deployed, switched "
                                            "under a running job, rolled back, collected")
