"""The task adopter as a process (adopt.start): what it keeps of the hook that forked it.
Its event handling is in tests/unit/test_adopt.py, its race with pbs_mom in
test_multinode.py."""
import fcntl
import os
import time
from pathlib import Path

import pytest

from pbs_chroot import adopt, cgroups
from tests.conftest import CG_PARENT
from tests.integration.test_userns_entry import v2_delegated  # noqa: F401

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: cgroups, netlink")]


@pytest.fixture(autouse=True)
def _delegated(v2_delegated: None) -> None:  # noqa: F811
    """On a cgroup v2: the controllers delegated to the tests' parent, as systemd does."""


def _fds(pid: int) -> list:
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue  # closed meanwhile
    return targets


def test_the_adopter_keeps_nothing_of_its_hook(tmp_path: Path) -> None:
    """A lock the hook holds (the node lock would stay taken for the job's lifetime) and
    a pipe (pbs_mom's, waiting for the hook's end) are not the adopter's: every
    inherited number is /dev/null in it; and it ends when the job's cgroup goes."""
    job_id = f"{os.getpid()}.adopter"
    cg = cgroups.job_cgroup(cgroups.detect(), CG_PARENT, job_id)
    cg.create()
    lock = open(tmp_path / "node.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    r, w = os.pipe()
    pid = start = 0
    try:
        pid, start = adopt.start(job_id, os.getpid(), cg, lambda: True, lambda job: None)
        mine = {os.readlink(f"/proc/self/fd/{fd}") for fd in (lock.fileno(), r, w)}
        deadline = time.monotonic() + 5
        while True:  # until it runs its loop (its wake-up pipe made)
            theirs = _fds(pid)
            # (a /proc file it has open for a moment is its own: its scans read them)
            kept = sorted(t.split(":")[0] for t in theirs
                          if t != "/dev/null" and not t.startswith("/proc/"))
            if kept.count("pipe") >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert not mine & set(theirs), theirs
        assert kept in (["pipe", "pipe", "socket"], ["pipe", "pipe", "socket", "socket"]), \
            theirs  # its proc connector, its wake-up pipe, perhaps its own syslog socket
        lock.close()  # the hook's end: the lock is free for the next hook
        with open(tmp_path / "node.lock") as again:
            fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)
        cg.remove()
        deadline = time.monotonic() + 5
        while adopt.proc_starttime(pid) == start and time.monotonic() < deadline:
            time.sleep(0.05)
        assert adopt.proc_starttime(pid) != start  # gone with its job's cgroup
    finally:
        if pid:
            adopt.stop(pid, start)  # by pid, if it is still the one started
        if not lock.closed:
            lock.close()
        os.close(r)
        os.close(w)
        cg.remove()
