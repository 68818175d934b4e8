"""Escape suite: as the job user inside a stage (Torque path), every way out must fail.

Each probe prints "ESCAPED <what>" if it succeeded; the test counts those
(must be 0) and the probes tried. The setuid probe is in test_setuid.py.
"""
import os
import time

import pytest

from tests.conftest import (OTHER, SUMMARY, USER, Node, Site, Syslog, home_of,
                            tmpfs_root)
from pbs_chroot.selftest import ESCAPE_PROBES
from tests.fakes import EmuJob

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts, chroot")]

# Every line: a command that must FAIL for the job user, and its name:
# the probes of `pbs-chroot selftest`, and more.
PROBES = list(ESCAPE_PROBES) + [
    ("mkdir /tmp/x", "write to the image's /tmp"),
    ("mount -t proc proc /tmp", "mount proc"),
    ("umount -l /home", "lazy umount /home"),
    ("echo 1 > /proc/sysrq-trigger", "write /proc/sysrq-trigger"),
    ("echo x > /sys/kernel/uevent_helper", "write /sys"),
    ("ls /proc/1/cwd/", "reach init's cwd"),
    ("nsenter -t 1 -m true", "enter init's mount namespace"),
    ("unshare -m true", "unshare a mount namespace"),
    ("kill -0 $OTHER_PID", "signal another job's process"),
    ("test -e /proc/self/root/../../etc/shadow && cat /proc/self/root/../../etc/shadow",
     "climb out through /proc/self/root"),
    ("ls /dev/sda /dev/vda 2>/dev/null && dd if=/dev/vda of=/dev/null bs=1 count=1",
     "read a host block device"),
]


def _probe_script() -> str:
    lines = ["#!/bin/sh"]
    for cmd, what in PROBES:
        lines.append(f'( {cmd} ) >/dev/null 2>&1 && echo "ESCAPED {what}"')
    # A control: the harness must see a probe that does succeed.
    lines.append('( touch "$HOME/control" ) >/dev/null 2>&1 && echo "CONTROL ok"')
    lines.append("echo probes-done")
    return "\n".join(lines) + "\n"


def test_no_way_out_of_the_stage(site: Site, syslog: Syslog) -> None:
    node = Node(site, syslog)
    try:
        # A job of another user, running in the same stage, to be signalled.
        other = EmuJob("900.vm", OTHER, "#!/bin/sh\necho $$ > \"$HOME/pid\"\n"
                       "while [ ! -e \"$HOME/stop\" ]; do sleep 0.05; done\n",
                       node.rootdir())
        running = node.emu.start(other)
        pid_file = home_of(OTHER) / "pid"
        deadline = time.monotonic() + 30
        while not pid_file.exists():
            assert time.monotonic() < deadline, "the other job did not start"
            running.poll()
            time.sleep(0.05)
        script = _probe_script().replace("$OTHER_PID", pid_file.read_text().strip())
        res = node.emu.run(node.job(node.rootdir(), script))
        (home_of(OTHER) / "stop").touch()
        assert running.wait(30).job_rc == 0
        assert res.job_rc == 0 and "probes-done" in res.stdout, res.stderr
        escaped = [line for line in res.stdout.splitlines() if line.startswith("ESCAPED")]
        assert escaped == []
        assert "CONTROL ok" in res.stdout and (home_of(USER) / "control").exists()
        assert not (site.version / "bin" / "escaped").exists()
        SUMMARY["escapes tried from inside a stage"] = f"{len(PROBES) + 1}, 0 escaped " \
            "(+ the setuid probe in test_setuid.py)"
    finally:
        node.emu.cleanup()
    assert USER != OTHER and not (tmpfs_root() / "escaped").exists()
