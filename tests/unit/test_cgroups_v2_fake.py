"""cgroups.v2.CgroupV2 against a fake cgroup2 tree, and cgroups.detect() against mountinfo tables.

No root, no kernel: the fake tree is plain files under tmp_path standing in for
/sys/fs/cgroup. What it can show: which files CgroupV2 reads and writes, with
what text, and how it parses what it reads. What it cannot: a regular file
keeps what was written (the kernel turns "+memory" into an enabled set, "max"
into a number ...), rmdir of a directory with files in it fails (the kernel's
interface files do not count), and nothing leaves cgroup.procs unless the test
says so. Kernel behaviour is tested for real in
tests/integration/test_cgroups_v2_real.py.
"""
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

from pbs_chroot import cgroups
from pbs_chroot.cgroups import Layout, Limits, v2
from pbs_chroot.cgroups.v2 import CgroupV2
from pbs_chroot.errors import CgroupError
from pbs_chroot.mounts import MountInfo, read_mountinfo

MiB = 1 << 20
PARENT, JOB = "pbs_chroot", "20.vm"

# What the kernel puts into every new (non-root) cgroup. Files CgroupV2 only
# writes start empty: after one write, the fake file holds exactly that write.
_KERNEL_FILES = {
    "cgroup.procs": "", "cgroup.subtree_control": "", "cgroup.events": "populated 0\nfrozen 0\n",
    "cgroup.freeze": "", "cgroup.kill": "",
    "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n", "cpu.weight": "",
    "memory.max": "", "memory.low": "", "memory.peak": "0\n", "memory.stat": "anon 0\nfile 0\n",
    "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n", "memory.swap.max": "",
    "memory.swap.peak": "0\n", "pids.max": "",
}


def kernel_mkdir(path: Path, controllers: Optional[str] = None) -> None:
    """Make a fake cgroup: the directory and its interface files, as mkdir(2) in cgroupfs does.

    Its cgroup.controllers is the parent's cgroup.subtree_control, unless given.
    """
    path.mkdir(exist_ok=True)
    if controllers is None:
        controllers = (path.parent / "cgroup.subtree_control").read_text()
    (path / "cgroup.controllers").write_text(controllers)
    for name, text in _KERNEL_FILES.items():
        (path / name).write_text(text)


def kernel_rmdir(path: Path) -> None:
    """rmdir(2) of a cgroup: the kernel drops the interface files with the directory."""
    for f in path.iterdir():
        f.unlink()
    path.rmdir()


@pytest.fixture
def mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake /sys/fs/cgroup whose root delegates cpu, memory and pids; mkdir makes files."""
    root = tmp_path / "cgroup"
    kernel_mkdir(root, "cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("cpu memory pids\n")
    real_mkdir = v2.make_dir  # cgroups.make_dir, as v2 calls it

    def mkdir_with_files(path: str) -> None:
        fresh = not os.path.isdir(path)
        real_mkdir(path)
        if fresh:
            kernel_mkdir(Path(path))
    monkeypatch.setattr(v2, "make_dir", mkdir_with_files)
    return root


@pytest.fixture
def cg(mount: Path) -> CgroupV2:
    """A created job cgroup PARENT/JOB in the fake tree."""
    c = CgroupV2(f"{PARENT}/{JOB}", str(mount))
    c.create()
    return c


def text(path: Path) -> str:
    return path.read_text()


# -- create ---------------------------------------------------------------------------------

def test_create_makes_parent_and_job_and_enables_controllers(mount: Path) -> None:
    c = CgroupV2(f"{PARENT}/{JOB}", str(mount))
    assert not c.exists()
    c.create()
    assert c.exists() and c.path == str(mount / PARENT / JOB)
    assert text(mount / PARENT / "cgroup.subtree_control") == "+memory +cpu +pids"
    assert text(mount / "cgroup.subtree_control") == "cpu memory pids\n"  # never touched


@pytest.mark.parametrize("enabled, written", [
    ("", "+memory +cpu +pids"),
    ("cpu\n", "+memory +pids"),
    ("memory cpu\n", "+pids"),
])
def test_create_enables_only_what_is_missing(mount: Path, enabled: str, written: str) -> None:
    kernel_mkdir(mount / PARENT)
    (mount / PARENT / "cgroup.subtree_control").write_text(enabled)
    CgroupV2(f"{PARENT}/{JOB}", str(mount)).create()
    # One write at offset 0 of a regular file: the written text, then any longer old tail.
    assert text(mount / PARENT / "cgroup.subtree_control") == written + enabled[len(written):]


def test_create_writes_nothing_when_all_are_enabled(mount: Path) -> None:
    kernel_mkdir(mount / PARENT)
    (mount / PARENT / "cgroup.subtree_control").write_text("cpu memory pids\n")
    before = os.stat(mount / PARENT / "cgroup.subtree_control").st_mtime_ns
    c = CgroupV2(f"{PARENT}/{JOB}", str(mount))
    c.create()
    c.create()  # idempotent
    assert os.stat(mount / PARENT / "cgroup.subtree_control").st_mtime_ns == before
    assert c.exists()


def test_create_skips_pids_when_the_node_lacks_it(mount: Path) -> None:
    (mount / "cgroup.subtree_control").write_text("cpu memory\n")
    CgroupV2(f"{PARENT}/{JOB}", str(mount)).create()
    assert text(mount / PARENT / "cgroup.subtree_control") == "+memory +cpu"


@pytest.mark.parametrize("delegated, missing", [
    ("cpu pids\n", "['memory']"),
    ("memory\n", "['cpu']"),
    ("", "['memory', 'cpu']"),
])
def test_create_refuses_a_parent_without_memory_or_cpu(mount: Path, delegated: str,
                                                       missing: str) -> None:
    (mount / "cgroup.subtree_control").write_text(delegated)
    c = CgroupV2(f"{PARENT}/{JOB}", str(mount))
    with pytest.raises(CgroupError, match=r"controllers \[.*\] are not enabled") as e:
        c.create()
    assert missing in str(e.value) and "subtree_control" in str(e.value)
    assert not c.exists()


def test_create_fails_as_cgroup_error_when_the_mount_is_gone(tmp_path: Path) -> None:
    c = CgroupV2(f"{PARENT}/{JOB}", str(tmp_path / "nothing"))
    with pytest.raises(CgroupError, match="can't create cgroup"):
        c.create()


# -- set_limits -----------------------------------------------------------------------------

def job_file(cg: CgroupV2, name: str) -> str:
    return text(Path(cg.path) / name)


def test_hard_limit_is_memory_max(cg: CgroupV2) -> None:
    cg.set_limits(Limits(mem_request=100 * MiB, policy="hard"))
    assert job_file(cg, "memory.max") == str(100 * MiB)
    assert job_file(cg, "memory.low") == ""
    assert job_file(cg, "memory.swap.max") == ""  # no memsw asked for: swap left alone


def test_soft_limit_is_memory_low_and_cap_is_memory_max(cg: CgroupV2) -> None:
    cg.set_limits(Limits(mem_request=100 * MiB, policy="soft", mem_cap=300 * MiB))
    assert job_file(cg, "memory.low") == str(100 * MiB)
    assert job_file(cg, "memory.max") == str(300 * MiB)


def test_soft_limit_without_cap_leaves_memory_max(cg: CgroupV2) -> None:
    cg.set_limits(Limits(mem_request=100 * MiB, policy="soft"))
    assert job_file(cg, "memory.low") == str(100 * MiB)
    assert job_file(cg, "memory.max") == ""


def test_policy_none_writes_no_memory_limit(cg: CgroupV2) -> None:
    cg.set_limits(Limits(mem_request=100 * MiB, policy="none", memsw=200 * MiB))
    for name in ("memory.max", "memory.low", "memory.swap.max"):
        assert job_file(cg, name) == "", name


def test_no_memory_request_writes_no_memory_limit(cg: CgroupV2) -> None:
    cg.set_limits(Limits(policy="hard"))
    assert job_file(cg, "memory.max") == "" and job_file(cg, "memory.low") == ""


def test_memsw_becomes_swap_max_of_the_difference(cg: CgroupV2) -> None:
    cg.set_limits(Limits(mem_request=100 * MiB, memsw=150 * MiB))
    assert job_file(cg, "memory.swap.max") == str(50 * MiB)


def test_memsw_below_mem_means_no_swap(cg: CgroupV2) -> None:
    cg.set_limits(Limits(mem_request=100 * MiB, memsw=80 * MiB))
    assert job_file(cg, "memory.swap.max") == "0"


def test_memsw_is_skipped_without_swap_accounting(cg: CgroupV2) -> None:
    (Path(cg.path) / "memory.swap.max").unlink()  # CONFIG_MEMCG_SWAP off, or swapaccount=0
    cg.set_limits(Limits(mem_request=100 * MiB, memsw=150 * MiB))
    assert not (Path(cg.path) / "memory.swap.max").exists()
    assert job_file(cg, "memory.max") == str(100 * MiB)


def test_pids_max(cg: CgroupV2) -> None:
    cg.set_limits(Limits(pids_max=30))
    assert job_file(cg, "pids.max") == "30"


def test_pids_max_is_skipped_without_the_pids_controller(cg: CgroupV2) -> None:
    (Path(cg.path) / "pids.max").unlink()
    cg.set_limits(Limits(pids_max=30))
    assert not (Path(cg.path) / "pids.max").exists()


@pytest.mark.parametrize("cpus, weight", [(0, "100"), (1, "100"), (4, "400"), (100, "10000"),
                                          (1000, "10000")])
def test_cpu_weight_is_100_per_core_capped(cg: CgroupV2, cpus: int, weight: str) -> None:
    cg.set_limits(Limits(cpus=cpus))
    assert job_file(cg, "cpu.weight") == weight


def test_set_limits_on_a_missing_cgroup_is_a_cgroup_error(mount: Path) -> None:
    with pytest.raises(CgroupError, match="can't open .*cpu.weight"):
        CgroupV2(f"{PARENT}/gone", str(mount)).set_limits(Limits())


# -- attach, procs --------------------------------------------------------------------------

def test_attach_writes_the_pid_to_cgroup_procs(cg: CgroupV2) -> None:
    cg.attach(4242)
    assert job_file(cg, "cgroup.procs") == "4242"


def test_procs_parses_cgroup_procs(cg: CgroupV2) -> None:
    (Path(cg.path) / "cgroup.procs").write_text("301\n17\n4242\n")
    assert cg.procs() == [17, 301, 4242]
    (Path(cg.path) / "cgroup.procs").write_text("")
    assert cg.procs() == []


def test_procs_of_a_missing_cgroup_is_empty(mount: Path) -> None:
    assert CgroupV2(f"{PARENT}/gone", str(mount)).procs() == []


def test_procs_unreadable_is_a_cgroup_error(cg: CgroupV2) -> None:
    (Path(cg.path) / "cgroup.procs").unlink()
    (Path(cg.path) / "cgroup.procs").mkdir()  # EISDIR: any error other than ENOENT
    with pytest.raises(CgroupError, match="can't read .*cgroup.procs"):
        cg.procs()


# -- usage ----------------------------------------------------------------------------------

def write_files(cg: CgroupV2, files: dict[str, str]) -> None:
    for name, value in files.items():
        (Path(cg.path) / name).write_text(value)


def test_usage_reads_every_accounting_file(cg: CgroupV2) -> None:
    write_files(cg, {
        "cpu.stat": "usage_usec 3500123\nuser_usec 2000100\nsystem_usec 1500023\n"
                    "nr_periods 0\nnr_throttled 0\nthrottled_usec 0\n",
        "memory.peak": "104853504\n",
        "memory.stat": "anon 52428800\nfile 4096\nkernel 98304\nanon_thp 0\nfile_mapped 0\n",
        "memory.swap.peak": "8192\n",
        "memory.events": "low 0\nhigh 0\nmax 731\noom 3\noom_kill 2\noom_group_kill 0\n",
        "memory.max": "104857600\n"})
    assert cg.usage() == cgroups.Usage(
        cpu_user_usec=2000100, cpu_system_usec=1500023, mem_peak_bytes=104853504,
        mem_anon_bytes=52428800, mem_file_bytes=4096, swap_peak_bytes=8192, oom_kills=2,
        mem_limit_bytes=104857600)


def test_usage_memory_max_unlimited_is_none(cg: CgroupV2) -> None:
    write_files(cg, {"memory.max": "max\n"})
    assert cg.usage().mem_limit_bytes is None


def test_usage_on_an_older_kernel(cg: CgroupV2) -> None:
    """Linux < 5.19 has no memory.peak; < 6.5 no memory.swap.peak; no swap, no swap files."""
    for name in ("memory.peak", "memory.swap.peak", "memory.swap.max"):
        (Path(cg.path) / name).unlink()
    write_files(cg, {"memory.events": "low 0\nhigh 0\nmax 0\noom 0\n",  # oom_kill: >= 4.13
                     "cpu.stat": "usage_usec 10\nuser_usec 7\nsystem_usec 3\n",
                     "memory.stat": "anon 4096\n", "memory.max": "max\n"})
    u = cg.usage()
    assert (u.mem_peak_bytes, u.swap_peak_bytes, u.oom_kills) == (None, None, 0)
    assert (u.cpu_user_usec, u.cpu_system_usec) == (7, 3)
    assert (u.mem_anon_bytes, u.mem_file_bytes, u.mem_limit_bytes) == (4096, None, None)


@pytest.mark.parametrize("name", ["cpu.stat", "memory.stat", "memory.events"])
def test_usage_without_a_required_file_is_a_cgroup_error(cg: CgroupV2, name: str) -> None:
    (Path(cg.path) / name).unlink()
    with pytest.raises(CgroupError, match=f"can't read .*{name}"):
        cg.usage()


# -- remove ---------------------------------------------------------------------------------

def test_remove_is_rmdir_and_idempotent(mount: Path, cg: CgroupV2) -> None:
    # The fake's files would make rmdir fail (ENOTEMPTY); the kernel's do not count.
    for f in Path(cg.path).iterdir():
        f.unlink()
    cg.remove()
    assert not cg.exists() and (mount / PARENT).is_dir()  # the shared parent stays
    cg.remove()


def test_remove_failure_is_a_cgroup_error(cg: CgroupV2) -> None:
    # ENOTEMPTY here stands in for the kernel's EBUSY (processes or child cgroups left).
    with pytest.raises(CgroupError, match="can't remove cgroup"):
        cg.remove()
    assert cg.exists()
    kernel_rmdir(Path(cg.path))
    assert not cg.exists()


# -- kill -----------------------------------------------------------------------------------

class WriteRecorder:
    """A FIFO standing in for a write-only cgroup file: records each open-write-close.

    ``on_write`` plays the kernel's part (freeze, kill ...) in the serving thread;
    its failures are kept and raised by close(), and serving goes on, so the code
    under test never blocks on a FIFO nobody reads.
    """

    _STOP = "\0stop"

    def __init__(self, path: Path, on_write: Callable[[str], None] = lambda value: None) -> None:
        if path.exists():
            path.unlink()
        os.mkfifo(path)
        self.path, self.on_write = path, on_write
        self.writes: list[str] = []
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            with open(self.path) as f:  # blocks until a writer opens
                value = f.read()
            stop = value.endswith(self._STOP)
            value = value[:-len(self._STOP)] if stop else value
            if value:
                self.writes.append(value)
                try:
                    self.on_write(value)
                except BaseException as e:  # raised again by close()
                    self.error = e
            if stop:
                return

    def close(self) -> None:
        deadline = time.monotonic() + 5
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: the server is between two opens
                time.sleep(0.01)
                continue
            os.write(fd, self._STOP.encode())
            os.close(fd)
            self._thread.join(5)
        assert not self._thread.is_alive(), "fake kernel thread hangs"
        if self.error is not None:
            raise self.error


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    """A real child process whose pid goes into the fake cgroup.procs; always reaped."""
    p = subprocess.Popen(["sleep", "60"])
    yield p
    if p.poll() is None:
        p.kill()
    p.wait(5)
    assert not Path(f"/proc/{p.pid}").exists()


def test_kill_of_an_empty_cgroup_writes_cgroup_kill(cg: CgroupV2) -> None:
    rec = WriteRecorder(Path(cg.path) / "cgroup.kill")
    try:
        assert cg.kill(timeout=1) == 0
    finally:
        rec.close()
    assert rec.writes == ["1"]


def test_kill_with_cgroup_kill_waits_until_empty(cg: CgroupV2, sleeper: subprocess.Popen) -> None:
    procs = Path(cg.path) / "cgroup.procs"
    procs.write_text(f"{sleeper.pid}\n")

    def kernel_kill(value: str) -> None:  # cgroup.kill: SIGKILL all, the exits leave procs
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait(5)
        procs.write_text("")
    rec = WriteRecorder(Path(cg.path) / "cgroup.kill", kernel_kill)
    try:
        cg.kill(timeout=5)
    finally:
        rec.close()
    assert rec.writes == ["1"] and cg.procs() == []
    assert sleeper.returncode == -signal.SIGKILL


def test_kill_without_cgroup_kill_freezes_signals_and_thaws(
        cg: CgroupV2, sleeper: subprocess.Popen) -> None:
    """Linux 5.2-5.13: no cgroup.kill; freeze, SIGKILL each listed pid, thaw."""
    (Path(cg.path) / "cgroup.kill").unlink()
    procs = Path(cg.path) / "cgroup.procs"
    procs.write_text(f"{sleeper.pid}\n")
    events = Path(cg.path) / "cgroup.events"

    def kernel_freeze(value: str) -> None:
        if value == "0":  # thawed: the pending SIGKILL lands, the process leaves
            sleeper.wait(5)
            procs.write_text("")
        events.write_text(f"populated 1\nfrozen {value}\n")
    rec = WriteRecorder(Path(cg.path) / "cgroup.freeze", kernel_freeze)
    try:
        assert cg.kill(timeout=5) == 1
    finally:
        rec.close()
    assert rec.writes == ["1", "0"]
    assert sleeper.returncode == -signal.SIGKILL


def test_kill_of_a_cgroup_that_never_empties_is_a_cgroup_error(cg: CgroupV2,
                                                               sleeper: subprocess.Popen) -> None:
    # The fake cgroup.procs keeps listing the pid after it died, like a process in D state.
    (Path(cg.path) / "cgroup.procs").write_text(f"{sleeper.pid}\n")
    with pytest.raises(CgroupError, match=rf"1 process\(es\) survive SIGKILL .*{sleeper.pid}"):
        cg.kill(timeout=0.2)
    assert sleeper.wait(5) == -signal.SIGKILL  # it was signalled all the same


# -- detect ---------------------------------------------------------------------------------

def cgroup_v1(mount_id: int, where: str, *controllers: str) -> MountInfo:
    return MountInfo(mount_id, 31, f"/sys/fs/cgroup/{where}", frozenset({"rw", "relatime"}),
                     "cgroup", None, frozenset({"rw", *controllers}))


TMPFS = MountInfo(31, 23, "/sys/fs/cgroup", frozenset({"rw"}), "tmpfs", None,
                  frozenset({"rw", "mode=755"}))
V1 = [TMPFS, cgroup_v1(32, "cpu,cpuacct", "cpu", "cpuacct"), cgroup_v1(34, "memory", "memory"),
      cgroup_v1(35, "freezer", "freezer"), cgroup_v1(36, "pids", "pids"),
      cgroup_v1(37, "systemd", "xattr", "name=systemd")]
V1_MOUNTS = {"cpu": "/sys/fs/cgroup/cpu,cpuacct", "cpuacct": "/sys/fs/cgroup/cpu,cpuacct",
             "memory": "/sys/fs/cgroup/memory", "freezer": "/sys/fs/cgroup/freezer",
             "pids": "/sys/fs/cgroup/pids"}


def cgroup_v2(mount_point: str) -> MountInfo:
    return MountInfo(40, 23, mount_point, frozenset({"rw", "nosuid"}), "cgroup2", 9,
                     frozenset({"rw", "nsdelegate", "memory_recursiveprot"}))


def test_detect_pure_v1() -> None:
    assert cgroups.detect(V1) == Layout(1, V1_MOUNTS, None)


def test_detect_pure_v2() -> None:
    assert cgroups.detect([cgroup_v2("/sys/fs/cgroup")]) == Layout(2, {}, "/sys/fs/cgroup")


def test_detect_hybrid_is_v1() -> None:
    """systemd's hybrid mode: controllers on v1, an empty cgroup2 for its own tracking."""
    layout = cgroups.detect(V1 + [cgroup_v2("/sys/fs/cgroup/unified")])
    assert layout == Layout(1, V1_MOUNTS, "/sys/fs/cgroup/unified")


def test_detect_v1_without_memory_is_v2() -> None:
    table = [cgroup_v1(32, "cpu,cpuacct", "cpu", "cpuacct"), cgroup_v2("/sys/fs/cgroup/unified")]
    assert cgroups.detect(table) == Layout(2, {}, "/sys/fs/cgroup/unified")


def test_detect_first_mount_of_a_controller_wins() -> None:
    again = cgroup_v1(50, "memory", "memory")._replace(mount_point="/mnt/memory")
    assert cgroups.detect(V1 + [again]).v1["memory"] == "/sys/fs/cgroup/memory"


def test_detect_nothing_is_a_cgroup_error() -> None:
    with pytest.raises(CgroupError, match="no cgroup memory controller"):
        cgroups.detect([TMPFS])
    with pytest.raises(CgroupError, match="no cgroup memory controller"):
        cgroups.detect([])


def test_detect_v1_without_cpuacct_is_a_cgroup_error() -> None:
    table = [TMPFS, cgroup_v1(32, "cpu", "cpu"), cgroup_v1(34, "memory", "memory"),
             cgroup_v2("/sys/fs/cgroup/unified")]
    with pytest.raises(CgroupError, match="without the cpuacct controller"):
        cgroups.detect(table)


def test_detect_from_a_real_mountinfo_text(tmp_path: Path) -> None:
    """This development machine's lines, through mounts.read_mountinfo."""
    (tmp_path / "mountinfo").write_text(
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
        "33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n"
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer\n"
        "39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n"
        "40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
        "42 23 0:39 / /sys/fs/cgroup2 rw shared:7 - cgroup2 cgroup2 rw,nsdelegate\n")
    layout = cgroups.detect(read_mountinfo(str(tmp_path / "mountinfo")))
    assert layout == Layout(1, {c: f"/sys/fs/cgroup/{c}" for c in cgroups.CONTROLLERS_V1},
                            "/sys/fs/cgroup/unified")
