"""Job ids as file names, atomic records, and mountinfo parsing."""
from pathlib import Path

import pytest

from pbs_chroot import mounts, state
from pbs_chroot.errors import StateError


@pytest.mark.parametrize("job_id", ["20.vm", "123[4].server.example.org", "run-1-2.vm"])
def test_good_job_ids(job_id: str) -> None:
    assert state.check_job_id(job_id) == job_id


@pytest.mark.parametrize("job_id", ["", "../x", "a/b", ".hidden", "20..vm", "a\nb", "x" * 201,
                                    "-rf"])
def test_bad_job_ids(job_id: str) -> None:
    with pytest.raises(StateError):
        state.check_job_id(job_id)


def test_record_round_trip(tmp_path: Path) -> None:
    state.ensure_layout(str(tmp_path / "s"))
    rec = {"job_id": "1.vm", "version": "/img/v1"}
    state.save_record(str(tmp_path / "s"), rec)
    assert state.load_record(str(tmp_path / "s"), "1.vm") == rec
    assert state.list_records(str(tmp_path / "s")) == ["1.vm"]
    state.delete_record(str(tmp_path / "s"), "1.vm")
    state.delete_record(str(tmp_path / "s"), "1.vm")  # idempotent
    assert state.load_record(str(tmp_path / "s"), "1.vm") is None


def test_foreign_or_corrupt_record_is_refused(tmp_path: Path) -> None:
    state.ensure_layout(str(tmp_path))
    (tmp_path / "jobs" / "2.vm.json").write_text('{"job_id": "3.vm"}')
    with pytest.raises(StateError, match="does not belong"):
        state.load_record(str(tmp_path), "2.vm")
    (tmp_path / "jobs" / "2.vm.json").write_text('{"job_id": ')
    with pytest.raises(StateError, match="corrupt"):
        state.load_record(str(tmp_path), "2.vm")


def test_lock_times_out(tmp_path: Path) -> None:
    import fcntl
    import os
    import time
    state.ensure_layout(str(tmp_path))
    fd = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held through another open file description
    t = time.monotonic()
    with pytest.raises(StateError, match="timed out"):
        with state.node_lock(str(tmp_path), 0.2):
            pass
    assert 0.2 <= time.monotonic() - t < 2
    os.close(fd)
    with state.node_lock(str(tmp_path), 0.2):
        pass


MOUNTINFO = (
    "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "50 27 254:0 /img/v1 /img/v1 ro,nosuid,nodev,relatime master:1 - ext4 /dev/vda rw\n"
    "51 50 0:21 / /img/v1/proc rw,nosuid,nodev,noexec - proc proc rw\n"
    "52 50 254:0 /home /img/v1/home\\040dir rw,nosuid,nodev - ext4 /dev/vda rw\n"
    "53 27 254:0 / /img/v10 rw - ext4 /dev/vda rw\n"
)


def test_mountinfo_parse_and_below(tmp_path: Path) -> None:
    (tmp_path / "mi").write_text(MOUNTINFO)
    table = mounts.read_mountinfo(str(tmp_path / "mi"))
    assert [m.mount_point for m in table][3] == "/img/v1/home dir"
    assert table[1].options >= {"ro", "nosuid", "nodev"} and table[2].fstype == "proc"
    below = [m.mount_id for m in mounts.mounts_below("/img/v1", table)]
    assert below == [50, 51, 52]  # not /img/v10
    assert [m.mount_id for m in mounts.mounts_below("/img/v1", table, frozenset({50}))] == [51, 52]
