"""Escape suite in the unprivileged mode: as pbsct, inside a stage built in a user namespace.

The root mode's probes (test_escapes.PROBES) plus what a user namespace makes
worth trying: processes outside (by /proc/PID/root, a signal, ptrace) of the
SAME user, a setuid-root file in the tree, devices, mount after exec. Every
probe that can succeed somewhere is first shown to succeed on the host as
the same user (the control), so a "0 escaped" means something.
"""
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import GID, SUMMARY, UID, USER, Site, home_of, mount_points, tmpfs_root
from tests.integration.test_escapes import PROBES
from tests.integration.test_setuid import showids  # noqa: F401  (a fixture)
from tests.integration.test_userns import published, run_in, user_python  # noqa: F401

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: to make a user, "
                                 "publish an image and drop to that user")]

PTRACE = r"""
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
int main(int argc, char **argv) {
    int pid = argc > 1 ? atoi(argv[1]) : 0;
    if (ptrace(PTRACE_SEIZE, pid, 0, 0) == 0) { printf("attached %d\n", pid); return 0; }
    printf("refused %d: %s\n", pid, strerror(errno));
    return 1;
}
"""

# Not escapes in this mode: /tmp is a tmpfs of the run's own (checked below instead).
SKIPPED = {"write to the image's /tmp"}
MARKER = "outside-marker"  # a file on the host, not in the image


@pytest.fixture
def probes_dir(showids: Path, tmp_path: Path) -> Iterator[Path]:  # noqa: F811
    """The static probes, in pbsct's home (bound into the stage), and a same-user process
    outside the stage."""
    d = home_of(USER) / "probes"
    d.mkdir()
    res = subprocess.run(["gcc", "-static", "-O", "-o", str(d / "ptrace_probe"), "-x", "c", "-"],
                         input=PTRACE, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    shutil.copy(showids, d / "showids")
    for f in d.iterdir():
        os.chmod(f, 0o755)
    os.chown(d, UID, GID)
    (tmpfs_root() / MARKER).write_text("host file\n")
    os.chmod(tmpfs_root() / MARKER, 0o644)
    try:
        yield d
    finally:
        shutil.rmtree(d)
        (tmpfs_root() / MARKER).unlink()


def _outside_process() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"], user=UID, group=GID)


def _host_as_user(script: str) -> str:
    res = subprocess.run(["/bin/sh", "-c", script], user=UID, group=GID, capture_output=True,
                         text=True, timeout=60)
    return res.stdout


def _userns_probes(outside: int, probes: Path) -> list[tuple[str, str]]:
    marker = f"{tmpfs_root()}/{MARKER}"
    return [(c.replace("$OTHER_PID", str(outside)), w) for c, w in PROBES if w not in SKIPPED] + [
        (f"cat /proc/{outside}/root{marker}", "a same-user process outside, by /proc/PID/root"),
        (f"for p in /proc/[0-9]*; do cat $p/root{marker} && exit 0; done; exit 1",
         "any process's /proc/PID/root"),
        (f"ls /proc/{outside}/", "see a process outside"),
        (f"{probes}/ptrace_probe {outside}", "ptrace a same-user process outside"),
        (f"{probes}/ptrace_probe 1", "ptrace the namespace's init"),
        ("cat /proc/1/environ", "read init's environment"),
        (f"{probes}/showids | grep -v 'ids {UID} {UID} {UID}'", "setuid root in the home"),
        ("dd if=/dev/mem of=/dev/null bs=1 count=1", "read /dev/mem"),
        ("mknod /tmp/null c 1 3", "mknod in the private /tmp"),
        ("mount --bind /tmp /mnt", "bind mount after exec"),
        ("mount -o remount,rw /", "make the image writable"),
        ("touch /etc/escaped /usr/escaped", "write into the image"),
        ("echo 0 > /proc/sys/user/max_user_namespaces", "change the namespace's limits"),
    ]


def test_no_way_out_in_the_user_namespace(user_python: tuple, published: Site,  # noqa: F811
                                          probes_dir: Path) -> None:
    outside = _outside_process()
    try:
        marker = f"{tmpfs_root()}/{MARKER}"
        # Controls: on the host, as the same user, these do reach the process outside.
        control = _host_as_user(f"cat /proc/{outside.pid}/root{marker}; kill -0 {outside.pid} "
                                f"&& echo signalled; {probes_dir}/ptrace_probe {outside.pid}")
        assert control == f"host file\nsignalled\nattached {outside.pid}\n"
        probes = _userns_probes(outside.pid, probes_dir)
        script = "\n".join(f'( {c} ) >/dev/null 2>&1 && echo "ESCAPED {w}"' for c, w in probes)
        script += ('\n( touch "$HOME/control" ) >/dev/null 2>&1 && echo "CONTROL ok"'
                   '\ntouch /tmp/private-tmp && echo tmp-ok; echo probes-done\n')
        before = mount_points()
        res = run_in(user_python, published, script)
        assert mount_points() == before
    finally:
        outside.kill()
        outside.wait()
    assert res.returncode == 0 and "probes-done" in res.stdout, res.stderr
    assert [x for x in res.stdout.splitlines() if x.startswith("ESCAPED")] == []
    assert "CONTROL ok" in res.stdout and (home_of(USER) / "control").exists()
    assert "tmp-ok" in res.stdout and not Path("/tmp/private-tmp").exists()
    assert not (published.version / "bin" / "escaped").exists()
    SUMMARY["escapes tried in the user-namespace mode"] = f"{len(probes) + 1}, 0 escaped"


def test_setuid_root_in_an_own_tree_gives_nothing(
        user_python: tuple, published: Site, showids: Path) -> None:  # noqa: F811
    """A setuid-root file root left in the user's tree: on the host it escalates (control);
    in the stage (nosuid, no_new_privs, root unmapped) it does not."""
    tree = home_of(USER) / "tree"
    subprocess.run(["cp", "-a", str(published.version), str(tree)], check=True)
    subprocess.run(["chown", "-R", "-h", f"{UID}:{GID}", str(tree)], check=True)
    try:
        shutil.copy(showids, tree / "showids")
        os.chown(tree / "showids", 0, 0)
        os.chmod(tree / "showids", 0o4755)
        assert _host_as_user(f"{tree}/showids") == f"ids {UID} 0 0\n"  # the control
        res = run_in(user_python, published, "/showids", "--dir", str(tree))
        assert res.returncode == 0, res.stderr
        assert res.stdout == f"ids {UID} {UID} {UID}\n"
    finally:
        shutil.rmtree(tree)
