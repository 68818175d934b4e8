"""A file system that never answers: the prologue's user-side children are given up on.

The refusal line is written, and the job's shell looked up, by children that
run as the user (userfile.py, shells.py); a user can point them into a FUSE
mount of their own whose daemon reads a request and never answers. Such a
child sleeps in the kernel and SIGKILL does not end it: the hook must not wait
for it, or it holds pbs_mom (on a sister, its whole main loop) until
$prologalarm. Here the file system is a real FUSE mount served by this test,
which reads every request after INIT and answers none.
"""
import os
import struct
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from pbs_chroot import _sys, shells, userfile
from tests.conftest import USER, open_to_users

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a FUSE mount"),
              pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
              # The file system's server is a thread of this process; the children
              # forked beside it only look up a path and exit (Python >= 3.12 warns).
              pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")]

_IN_HEADER = struct.Struct("=IIQQIIII")   # len, opcode, unique, nodeid, uid, gid, pid, pad
_OUT_HEADER = struct.Struct("=IiQ")       # len, error, unique
_FUSE_INIT = 26


class SilentFuse:
    """A FUSE file system that answers INIT, then reads each request and never replies."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        _sys.mount("silent", str(where), "fuse", _sys.MS_NOSUID | _sys.MS_NODEV,
                   f"fd={self.fd},rootmode=40000,user_id=0,group_id=0,allow_other")
        self.requests = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1 << 20)
            except OSError:
                return  # the connection is gone (unmounted, or closed)
            _, opcode, unique = _IN_HEADER.unpack_from(data)[:3]
            if opcode == _FUSE_INIT:  # protocol 7.12: a 24-byte init_out
                body = struct.pack("=IIIIHHI", 7, 12, 0, 0, 0, 0, 4096)
                os.write(self.fd, _OUT_HEADER.pack(_OUT_HEADER.size + len(body), 0, unique)
                         + body)
            else:
                self.requests += 1  # read, and never answered

    def close(self) -> None:
        """Abort the connection (fusectl: every waiting request fails), then unmount.

        Never stat the mount: that is a request too, and nobody would answer it.
        """
        if self.fd < 0:
            return
        conn = next(line.split()[2] for line in open("/proc/self/mountinfo")
                    if line.split()[4] == str(self.where))
        ctl = Path("/sys/fs/fuse/connections")
        mounted = any(line.split()[4] == str(ctl) for line in open("/proc/self/mountinfo"))
        if not mounted:  # (in the tests' own mount namespace)
            _sys.mount("fusectl", str(ctl), "fusectl", 0)
        try:
            (ctl / str(int(conn.split(":")[1])) / "abort").write_text("1")
        finally:
            if not mounted:
                _sys.umount2(str(ctl))
        self.thread.join(5)
        _sys.umount2(str(self.where), _sys.MNT_DETACH)
        os.close(self.fd)
        self.fd = -1


@pytest.fixture
def silent(tmp_path: Path) -> Iterator[SilentFuse]:
    where = tmp_path / "fuse"
    where.mkdir()
    open_to_users(tmp_path)
    fs = SilentFuse(where)
    try:
        yield fs
    finally:
        fs.close()


def test_a_child_stuck_on_the_file_system_is_left_not_waited_for(silent: SilentFuse) -> None:
    pid = os.fork()
    if pid == 0:
        try:
            os.stat(silent.where / "x")
        finally:
            os._exit(0)
    deadline = time.monotonic() + 5
    while silent.requests == 0:  # the child is in the file system now
        assert time.monotonic() < deadline
        time.sleep(0.01)
    start = time.monotonic()
    shells.kill_and_leave(pid)
    assert time.monotonic() - start < 2
    assert os.waitpid(pid, os.WNOHANG) == (0, 0)  # SIGKILL has not ended it: the control
    silent.close()  # the request fails: now it dies
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == -9


def test_the_refusal_line_into_a_silent_file_system_gives_up_in_time(
        silent: SilentFuse) -> None:
    start = time.monotonic()
    assert userfile.append_as_user(USER, str(silent.where / "job.e1"), "refused\n") is False
    assert time.monotonic() - start < 8  # its 5 s deadline, then at most the kill's grace
    assert silent.requests >= 1  # it did reach the file system
    silent.close()  # the writer, left behind, can end now: reap it (this test's only child)
    pid, status = os.waitpid(-1, 0)
    assert os.waitstatus_to_exitcode(status) == -9
