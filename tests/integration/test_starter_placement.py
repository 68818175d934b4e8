"""The job starter holds a TM task of a job on several cores or nodes until the task is in
a cgroup of its job (starter/job_starter.c): the real starter binary, real cgroups below
the tests' parent, moves done by this test as the task adopter does them. The adopter's
side, with pbs_mom's real race, is in test_multinode.py."""
import os
import signal
import subprocess
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
        assert err == (f"pbs-chroot job starter: this task of job {job_id} was not put in "
                       "the job's cgroup in time (the node's task adopter is not running): "
                       "not run; tell your admin\n")
        assert not out.exists()
    finally:
        _end(proc)
        other.remove()


@pytest.mark.parametrize("env", [
    {"PBS_NP": "1", "PBS_NUM_NODES": "1"},   # one core on one node: no adopter runs
    {"PBS_NP": "2x"},                        # not a count
    {},                                      # no PBS_JOBID: not a job of pbs_mom's
], ids=["one-core", "garbage", "no-job"])
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
