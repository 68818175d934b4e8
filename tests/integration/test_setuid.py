"""Setuid programs in an image give no root: not in the stage, not through the raw version.

A static C program that prints getresuid(), compiled here (BusyBox drops its
own setuid privileges, so it cannot show whether the kernel honoured the bit).
"""
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import UID, USER, Node, Site, Syslog, pbs_chroot_cli, tmpfs_root

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: setuid files")]

SHOWIDS = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <unistd.h>
int main(void) {
    uid_t r, e, s;
    getresuid(&r, &e, &s);
    printf("ids %d %d %d\n", (int)r, (int)e, (int)s);
    return 0;
}
"""


@pytest.fixture(scope="module")
def showids(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("showids")
    (d / "showids.c").write_text(SHOWIDS)
    res = subprocess.run(["gcc", "-static", "-O", "-o", str(d / "showids"), str(d / "showids.c")],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"can't build the setuid probe (scripts/setup installs gcc, libc6-dev): "
                    f"{res.stderr}")
    return d / "showids"


def plant(site: Site, showids: Path) -> None:
    (site.version / "suid").mkdir()
    target = site.version / "suid" / "showids"
    target.write_bytes(showids.read_bytes())
    os.chown(target, 0, 0)
    os.chmod(target, 0o4755)


def as_user(path: str) -> str:
    """Run ``path`` as the test user's shell would, on the host (a user logged in on the node).

    Through sh: setpriv exec'ing it directly resolves the path before it drops root.
    """
    res = subprocess.run(["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups",
                          "/bin/sh", "-c", 'exec "$0"', path], capture_output=True, text=True)
    return res.stdout + res.stderr


def test_probe_really_escalates_where_setuid_is_honoured(showids: Path) -> None:
    d = tmpfs_root() / "tmp" / "suid-probe"  # the test tmpfs honours setuid
    d.mkdir(mode=0o755)
    try:
        (d / "showids").write_bytes(showids.read_bytes())
        os.chmod(d / "showids", 0o4755)
        assert as_user(str(d / "showids")) == f"ids {UID} 0 0\n"
    finally:
        (d / "showids").unlink()
        d.rmdir()


def test_setuid_in_the_stage_gives_no_root_on_torque(site: Site, syslog: Syslog,
                                                     showids: Path) -> None:
    """Two layers, each enough alone: the stage's nosuid, and the job starter's no_new_privs
    (test_proc_root.py shows that one alone, where nosuid does not apply)."""
    node = Node(site, syslog)
    try:
        plant(site, showids)
        res = node.emu.run(node.job(node.rootdir(), "#!/bin/sh\n/suid/showids\n"))
        assert res.job_rc == 0, res.stderr
        assert res.stdout == f"ids {UID} {UID} {UID}\n"
        config = site.pbs_home / "mom_priv" / "config"
        config.write_text("")  # the mom without the starter: nosuid alone
        res = node.emu.run(node.job(node.rootdir(), "#!/bin/sh\n/suid/showids\n"))
        assert res.job_rc == 0, res.stderr
        assert res.stdout == f"ids {UID} {UID} {UID}\n"
        assert any("setuid/setgid file(s)" in line and "/suid/showids" in line
                   for line in syslog.lines())
    finally:
        node.emu.cleanup()


def test_setuid_through_the_runner_gives_no_root(site: Site, showids: Path) -> None:
    site.write_config()
    plant(site, showids)
    res = pbs_chroot_cli("--config", str(site.config), "run", "--image", str(site.image),
                         "--user", USER, "--", "/suid/showids", check=False)
    assert res.returncode == 0 and res.stdout == f"ids {UID} {UID} {UID}\n", res.stderr


def test_raw_versions_reachable_by_users_are_refused(site: Site, syslog: Syslog,
                                                     showids: Path) -> None:
    """Outside the stage the image's setuid bit would work: users must not reach it."""
    plant(site, showids)
    assert as_user(f"{site.image}/suid/showids").endswith("Permission denied\n")
    os.chmod(site.versions, 0o755)
    assert as_user(f"{site.image}/suid/showids") == f"ids {UID} 0 0\n"  # what we prevent
    node = Node(site, syslog)
    try:
        res = node.emu.run(node.job(node.rootdir()))
        assert res.prologue_rc == 2 and node.offline_calls()
        assert any("reachable by users" in line for line in syslog.lines())
        res = pbs_chroot_cli("--config", str(site.config), "check", check=False)
        assert res.returncode == 1 and "reachable by users" in res.stdout
    finally:
        node.emu.cleanup()
