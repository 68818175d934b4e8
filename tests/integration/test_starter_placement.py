"""The job starter holds a TM task of a job on several cores or nodes until the task is in
a cgroup of its job (starter/job_starter.c): the real starter binary, real cgroups below
the tests' parent, moves done by this test as the task adopter does them. The adopter's
side, with pbs_mom's real race, is in test_multinode.py."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from pbs_chroot import cgroups, starter
from tests.conftest import CG_PARENT, starter_dir
from tests.integration.test_userns_entry import v2_delegated  # noqa: F401

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: cgroups")]

AWAIT_MS = 1500
TASK = "cat /proc/self/cgroup > {out}.tmp && mv {out}.tmp {out}"


@pytest.fixture(autouse=True)
def _delegated(v2_delegated: None) -> None:  # noqa: F811
    """On a cgroup v2: the controllers delegated to the tests' parent, as systemd does."""


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Starters that wait 1.5 s (pbs-chroot install builds them with 10 s)."""
    d = tmp_path_factory.mktemp("starters")
    starter.build(str(d), await_placement_ms=AWAIT_MS)
    return d


@pytest.fixture
def job_id() -> Iterator[str]:
    yield f"{os.getpid()}.placement"


def _cgroup(parent: str, job_id: str) -> cgroups.JobCgroup:
    cg = cgroups.job_cgroup(cgroups.detect(), parent, job_id)
    cg.create()
    return cg


def _task(path: Path, out: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([str(path), "/bin/sh", "-c", TASK.format(out=out)],
                            env={"PATH": "/usr/bin:/bin", **env}, stderr=subprocess.PIPE,
                            text=True)


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)  # the test's own process, by pid
    proc.wait()


@pytest.mark.parametrize("nnp", [False, True], ids=["host", "nnp"])
@pytest.mark.parametrize("torque_layout", [False, True], ids=["ours", "torque"])
def test_a_task_runs_only_once_it_is_in_its_jobs_cgroup(
        quick: Path, tmp_path: Path, job_id: str, nnp: bool, torque_layout: bool) -> None:
    """PBS_NP 2: nothing of the task runs until it is moved (ours: PARENT/JOBID; Torque's
    own cgroups: .../JOBID/R0.T1); then it runs at once, in that cgroup."""
    path = quick / ("job_starter-nnp" if nnp else "job_starter")
    outer = _cgroup(CG_PARENT, job_id)
    cg = _cgroup(f"{CG_PARENT}/{job_id}", "R0.T1") if torque_layout else outer
    out = tmp_path / "cgroup"
    proc = _task(path, out, PBS_JOBID=job_id, PBS_NP="2", PBS_NUM_NODES="1")
    try:
        time.sleep(0.5)
        assert proc.poll() is None and not out.exists()  # held
        cg.attach(proc.pid)
        assert proc.wait(5) == 0, proc.stderr.read() if proc.stderr else ""
        lines = out.read_text().splitlines()
        assert any(line.endswith(f"/{cg.name}") for line in lines), lines
    finally:
        _end(proc)
        for c in {id(cg): cg, id(outer): outer}.values():
            c.remove()


def test_a_task_never_placed_is_refused(quick: Path, tmp_path: Path, job_id: str) -> None:
    """No adopter on the node (it died): after the wait, exit 125 and one line, and the
    user's program never ran. A cgroup of another job does not count."""
    other = _cgroup(CG_PARENT, f"{job_id}x")
    out = tmp_path / "cgroup"
    proc = _task(quick / "job_starter-nnp", out, PBS_JOBID=job_id, PBS_NUM_NODES="2")
    try:
        other.attach(proc.pid)
        start = time.monotonic()
        assert proc.wait(10) == 125
        assert time.monotonic() - start >= AWAIT_MS / 1000 - 0.3
        err = proc.stderr.read() if proc.stderr else ""
        assert err == (f"pbs-chroot job starter: job {job_id}: not run: this process was not "
                       "put in the job's cgroup in time (pbs_chroot's prologue or task "
                       "adopter did not place it); tell your admin\n")
        assert not out.exists()
    finally:
        _end(proc)
        other.remove()


@pytest.mark.parametrize("env", [
    {"PBS_NP": "1", "PBS_NUM_NODES": "1"},   # one core on one node: no adopter runs
    {},                                      # not a job of pbs_mom's
], ids=["one-core", "no-job"])
def test_a_task_the_adopter_does_not_watch_runs_at_once(
        quick: Path, tmp_path: Path, job_id: str, env: dict) -> None:
    out = tmp_path / "cgroup"
    if env:
        env = dict(env, PBS_JOBID=job_id)
    proc = _task(quick / "job_starter-nnp", out, **env)
    try:
        assert proc.wait(1.0) == 0 and out.exists()
    finally:
        _end(proc)


def test_a_starter_built_for_cgroups_no_never_waits(tmp_path: Path, job_id: str) -> None:
    d = tmp_path / "nowait"
    d.mkdir()
    starter.build(str(d), await_placement_ms=0)
    assert starter.built_await(str(d / "job_starter-nnp")) == 0
    assert starter.built_await(str(starter_dir() / "job_starter-nnp")) == \
        starter.AWAIT_PLACEMENT_MS
    out = tmp_path / "cgroup"
    proc = _task(d / "job_starter-nnp", out, PBS_JOBID=job_id, PBS_NP="4")
    try:
        assert proc.wait(1.0) == 0 and out.exists()
    finally:
        _end(proc)


# Runs PROGRAM with exactly the environment entries given, duplicates kept (a user may add
# copies of a variable to what pbs_mom sets; os.execve would merge them).
_RAW_EXEC = """
import ctypes, sys
argv, env = sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]
def arr(items):
    a = (ctypes.c_char_p * (len(items) + 1))(*[i.encode() for i in items])
    a[len(items)] = None
    return a
ctypes.CDLL(None).execve(argv[0].encode(), arr(argv), arr(env))
sys.exit(127)
"""


def _raw_task(path: Path, out: Path, env: list) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _RAW_EXEC, str(path), "/bin/sh", "-c",
                             TASK.format(out=out), "--", "PATH=/usr/bin:/bin", *env],
                            stderr=subprocess.PIPE, text=True)


def test_copies_of_the_variables_a_user_adds_do_not_skip_the_wait(
        quick: Path, tmp_path: Path, job_id: str) -> None:
    """Any copy of PBS_NP or PBS_NUM_NODES above 1, or not a count, holds the process; two
    different PBS_JOBIDs (or one with a '/') are refused at once."""
    nnp = quick / "job_starter-nnp"
    for env in ([f"PBS_JOBID={job_id}", "PBS_NP=1", "PBS_NP=2"],
                [f"PBS_JOBID={job_id}", "PBS_NUM_NODES=1", "PBS_NUM_NODES=2x"]):
        out = tmp_path / "held"
        proc = _raw_task(nnp, out, env)
        try:
            assert proc.wait(10) == 125 and not out.exists(), env
        finally:
            _end(proc)
    for env in ([f"PBS_JOBID={job_id}", f"PBS_JOBID={job_id}x", "PBS_NP=2"],
                ["PBS_JOBID=../1.vm", "PBS_NP=2"], ["PBS_NP=2"]):
        out = tmp_path / "refused"
        proc = _raw_task(nnp, out, env)
        try:
            assert proc.wait(10) == 125 and not out.exists(), env
            # refused at once (the line of a wait that ran out is another one)
            assert "no single PBS_JOBID" in (proc.stderr.read() if proc.stderr else "")
        finally:
            _end(proc)


def test_a_cgroup_of_the_job_in_one_hierarchy_only_is_not_enough(
        quick: Path, tmp_path: Path, job_id: str) -> None:
    """On cgroup v1 the memory and the cpuacct lines must both name the job (a user may own
    a cgroup of that name in one hierarchy; pbs_chroot moves a process into memory last):
    memory alone, or cpuacct alone, keeps the process waiting."""
    layout = cgroups.detect()
    if layout.version != 1 or not {"memory", "cpuacct"} <= set(layout.v1):
        pytest.skip("cgroup v1 with memory and cpuacct only")
    cg = _cgroup(CG_PARENT, job_id)
    assert isinstance(cg, cgroups.v1.CgroupV1)
    out = tmp_path / "cgroup"
    proc = _task(quick / "job_starter-nnp", out, PBS_JOBID=job_id, PBS_NP="2")
    try:
        for ctrl in ("cpuacct", "memory"):
            Path(cg.dirs[ctrl], "cgroup.procs").write_text(str(proc.pid))
            time.sleep(0.3)
            if ctrl == "cpuacct":
                assert proc.poll() is None and not out.exists()  # one of the two: held
        assert proc.wait(5) == 0
    finally:
        _end(proc)
        cg.remove()


def test_a_named_hierarchy_does_not_count(quick: Path, tmp_path: Path, job_id: str) -> None:
    """name=systemd (which systemd may delegate to a user) holding a cgroup named after the
    job: still held. Made below the tests' own parent in that hierarchy."""
    top = Path("/sys/fs/cgroup/systemd")
    if not (top / "cgroup.procs").exists():
        pytest.skip("no name=systemd hierarchy mounted here")
    named = top / CG_PARENT / job_id
    named.mkdir(parents=True)
    out = tmp_path / "cgroup"
    proc = _task(quick / "job_starter-nnp", out, PBS_JOBID=job_id, PBS_NP="2")
    try:
        (named / "cgroup.procs").write_text(str(proc.pid))
        assert proc.wait(10) == 125 and not out.exists()
    finally:
        _end(proc)
        named.rmdir()
        named.parent.rmdir()
