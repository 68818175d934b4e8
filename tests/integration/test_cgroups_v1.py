"""Per-job cgroups on this machine's real cgroup v1: limits, kill, accounting, OOM."""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from pbs_chroot import cgroups
from tests import fakes
from tests.conftest import CG_PARENT, USER, Node, Site, home_of, pbs_chroot_cli

ACCT_FIELDS = {"schema", "job_id", "user", "group", "queue", "node", "image", "version", "start",
               "end", "exit", "cgroup_version", "cpu_user_usec", "cpu_system_usec",
               "mem_peak_bytes", "mem_anon_bytes", "mem_file_bytes", "swap_peak_bytes",
               "oom_kills", "mem_limit_bytes"}


def _layout() -> cgroups.Layout:
    try:
        return cgroups.detect()
    except Exception as e:  # noqa: BLE001 - any reason is a reason to skip
        pytest.skip(f"no usable cgroup hierarchy: {e}")


pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real cgroups"),
              pytest.mark.skipif(not os.path.isdir("/sys/fs/cgroup/memory"),
                                 reason="needs the cgroup v1 memory controller")]


def acct_line(site: Site, job_id: str) -> dict:
    lines = [a for a in site.accounting_lines() if a["job_id"] == job_id]
    assert len(lines) == 1, site.accounting_lines()
    assert set(lines[0]) == ACCT_FIELDS and lines[0]["cgroup_version"] == 1
    return lines[0]


def test_cpu_time_is_accounted_within_5_percent(site: Site) -> None:
    """The job's CPU time as the cgroup counts it: the burner's own, within 5 %, on top of
    what the same job without the burner costs (the runner's shim starts in the cgroup:
    its Python start-up is the job's too, and it grows on a loaded machine)."""
    site.write_config()

    def job(loops: int) -> tuple:
        script = (f"i=0; while [ $i -lt {loops} ]; do i=$((i+1)); done; "
                  "cat /proc/$$/stat")  # utime and stime of the burner itself, in ticks
        res = pbs_chroot_cli("--config", str(site.config), "run", "--image", str(site.image),
                             "--user", USER, "--", "/bin/sh", "-c", script, check=False)
        assert res.returncode == 0, res.stderr
        fields = res.stdout.rsplit(")", 1)[1].split()
        burned = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        acct = site.accounting_lines()[-1]
        return burned, (acct["cpu_user_usec"] + acct["cpu_system_usec"]) / 1e6, acct
    _, overhead, _ = job(0)
    burned, reported, acct = job(400000)
    assert burned > 0.3, "the burner ran too briefly to measure"
    assert reported >= burned - 0.02, (reported, burned)  # never less than the burner's
    assert abs(reported - overhead - burned) <= 0.05 * burned + 0.02, \
        (reported, overhead, burned)
    assert acct["image"] == str(site.image) and acct["version"] == str(site.version)


def test_oom_kill_is_counted_and_told_to_the_user(node: Node) -> None:
    job = node.job(node.rootdir(), "#!/bin/sh\ndd if=/dev/zero of=/dev/null bs=200M count=1\n")
    job.resource_list = "nodes=1:ppn=1,mem=100mb,walltime=00:05:00"
    res = node.emu.run(job)
    assert res.action == "ran" and res.job_rc != 0  # dd was killed
    acct = acct_line(node.site, job.job_id)
    assert acct["oom_kills"] >= 1 and acct["mem_limit_bytes"] == 100 << 20
    assert acct["mem_peak_bytes"] <= 100 << 20
    line = [x for x in res.stderr.splitlines() if x.startswith("pbs-chroot:")]
    assert line == [f"pbs-chroot: job {job.job_id}: a process was killed for exceeding the "
                    f"job's memory limit of 100 MiB (peak {round(acct['mem_peak_bytes'] / 2**20)} "
                    "MiB)"]


def test_soft_policy_lets_a_job_exceed_its_request(node: Node) -> None:
    node.configure("memory_policy = soft\n")
    job = node.job(node.rootdir(), "#!/bin/sh\ndd if=/dev/zero of=/dev/null bs=200M count=1\n")
    job.resource_list = "nodes=1:ppn=1,mem=100mb,walltime=00:05:00"
    res = node.emu.run(job)
    assert res.job_rc == 0, res.stderr
    acct = acct_line(node.site, job.job_id)
    assert acct["oom_kills"] == 0 and acct["mem_peak_bytes"] > 150 << 20
    assert acct["mem_limit_bytes"] is None


def test_double_forked_daemon_is_killed(node: Node) -> None:
    script = ("#!/bin/sh\n(setsid sh -c 'echo $$ > \"$HOME/daemon.$PBS_JOBID\"; "
              "exec sleep 1000' >/dev/null 2>&1 &)\nsleep 0.3\n")
    job = node.job(node.rootdir(), script)
    res = node.emu.run(job)
    assert res.job_rc == 0 and res.epilogue_rc == 0, res.stderr
    pid = int((home_of(USER) / f"daemon.{job.job_id}").read_text())
    deadline = time.monotonic() + 2
    while Path(f"/proc/{pid}").exists():  # killed by the epilogue; reaped by init
        assert time.monotonic() < deadline, f"daemon {pid} survived the job"
        time.sleep(0.02)
    assert "killed 1 process" in " ".join(node.syslog.lines())
    acct_line(node.site, job.job_id)


def test_fork_bomb_is_held_by_the_pids_limit_and_killed(node: Node) -> None:
    node.configure("pids_max = 40\n")
    # setsid: out of the job's session, which pbs_mom kills at the job's end anyway.
    # A persistent bomb: every process keeps forking, so it sits at the limit.
    script = ("#!/bin/sh\nsetsid sh -c 'b() { while :; do (b &) 2>/dev/null; sleep 0.2; "
              "done; }; b' >/dev/null 2>&1 &\nsleep 2\n")
    job = node.job(node.rootdir(), script)
    pids = Path(cgroups.detect().v1["pids"]) / CG_PARENT / job.job_id
    running = node.emu.start(job)
    deadline, peak, hit = time.monotonic() + 30, 0, 0
    while time.monotonic() < deadline and running.poll() is None and not hit:
        try:  # watched from outside while the bomb runs
            peak = max(peak, int((pids / "pids.current").read_text()))
            hit = int((pids / "pids.events").read_text().split()[1])
        except (FileNotFoundError, ValueError, IndexError):
            pass
        time.sleep(0.02)
    res = running.wait(60)
    assert hit > 0 and 0 < peak <= 40, (hit, peak)  # forks were refused at the limit
    assert res.epilogue_rc == 0, res.stderr
    assert not pids.exists()  # rmdir succeeds only once no process is left
    assert "killed" in " ".join(node.syslog.lines())
    acct_line(node.site, job.job_id)


def test_unkillable_process_takes_the_node_offline(node: Node) -> None:
    """A job process frozen by a foreign freezer cgroup cannot die: site fault."""
    node.configure("kill_timeout = 1\n")
    layout = cgroups.detect()
    if "freezer" not in layout.v1:
        pytest.skip("needs the cgroup v1 freezer controller")
    foreign = Path(layout.v1["freezer"]) / CG_PARENT / "foreign"
    foreign.mkdir(parents=True)
    script = ("#!/bin/sh\nsetsid sleep 1000 >/dev/null 2>&1 &\necho $! > \"$HOME/d.$PBS_JOBID\"\n"
              "while [ ! -e \"$HOME/go.$PBS_JOBID\" ]; do sleep 0.05; done\n")
    job = node.job(node.rootdir(), script)
    home = home_of(USER)
    running = node.emu.start(job)
    try:
        deadline = time.monotonic() + 30
        while not (home / f"d.{job.job_id}").exists():
            assert time.monotonic() < deadline
            running.poll()
            time.sleep(0.05)
        daemon = int((home / f"d.{job.job_id}").read_text())
        (foreign / "cgroup.procs").write_text(str(daemon))
        (foreign / "freezer.state").write_text("FROZEN")
        (home / f"go.{job.job_id}").touch()
        res = running.wait(60)
        assert res.epilogue_rc == 2
        calls = node.offline_calls()
        assert calls and calls[-1][:2] == ["-o", "-N"] and "epilogue" in calls[-1][2]
        assert any("survive SIGKILL" in line for line in node.syslog.lines())
        assert (node.site.state / "jobs" / f"{job.job_id}.json").exists()  # for the reconciler
    finally:
        (foreign / "freezer.state").write_text("THAWED")  # the pending SIGKILL lands
        time.sleep(0.2)
    # A second epilogue (as the reconciler would) now finishes the job.
    epi = subprocess.run([str(node.emu.epilogue_path), job.job_id, USER, USER, "n", "0", "",
                          "", "batch", "", "0"], env={}, capture_output=True, text=True)
    assert epi.returncode == 0, epi.stderr
    foreign.rmdir()
    node.assert_clean()
    assert json.loads(node.site.accounting.read_text().splitlines()[-1])["job_id"] == job.job_id


def test_every_job_gets_a_cgroup_with_its_limits(node: Node) -> None:
    layout = cgroups.detect()
    script = "#!/bin/sh\ncat /proc/self/cgroup\n"
    job = node.job([], script)  # no image: still a cgroup
    job.resource_list = "nodes=1:ppn=2,mem=300mb,walltime=00:05:00"
    node.configure("pids_max = 500\n")
    res = node.emu.run(job)
    assert res.job_rc == 0
    assert f"memory:/{CG_PARENT}/{job.job_id}" in res.stdout
    assert f"pids:/{CG_PARENT}/{job.job_id}" in res.stdout
    acct = acct_line(node.site, job.job_id)
    assert acct["image"] is None and acct["mem_limit_bytes"] == 300 << 20
    assert not (Path(layout.v1["memory"]) / CG_PARENT / job.job_id).exists()
    assert fakes.read_pbsnodes_calls(node.emu.pbsnodes_log) == []


@pytest.mark.parametrize("limits, mem, memsw", [
    (cgroups.Limits(memsw=1 << 30), 1 << 30, 1 << 30),                     # vmem only
    (cgroups.Limits(mem_request=256 << 20, policy="soft", memsw=1 << 30), 1 << 30, 1 << 30),
    (cgroups.Limits(mem_request=256 << 20, memsw=1 << 30), 256 << 20, 1 << 30),
    (cgroups.Limits(mem_request=2 << 30, policy="soft", mem_cap=4 << 30, memsw=1 << 30),
     4 << 30, 4 << 30),
])
def test_swap_limits_are_consistent(limits: cgroups.Limits, mem: int, memsw: int) -> None:
    """memsw never below the memory limit (EINVAL), and never 'no memory limit'."""
    layout = _layout()
    cg = cgroups.job_cgroup(layout, CG_PARENT, "swap.1")
    cg.create()
    try:
        cg.set_limits(limits)
        base = Path(layout.v1["memory"]) / CG_PARENT / "swap.1"
        assert int((base / "memory.limit_in_bytes").read_text()) == mem
        sw = base / "memory.memsw.limit_in_bytes"
        if sw.exists():
            assert int(sw.read_text()) == memsw
    finally:
        cg.remove()


def test_torques_own_job_cgroup_is_used_not_fought(node: Node) -> None:
    """Torque built with cgroups made PARENT/JOBID already: kill and account through it,
    create nothing of ours, remove nothing of Torque's."""
    layout = _layout()
    torque_parent = f"{CG_PARENT}/torque"
    node.configure(f"torque_cgroup_parent = {torque_parent}\n")
    job = node.job(node.rootdir(), "#!/bin/sh\ncat /proc/self/cgroup\n")
    torque_cg = cgroups.job_cgroup(layout, torque_parent, job.job_id)
    torque_cg.create()  # as pbs_mom would, before the prologue
    try:
        res = node.emu.run(job)
        assert res.job_rc == 0 and res.epilogue_rc == 0, res.stderr
        # Not moved by us (pbs_mom itself would have put it there):
        assert f"memory:/{CG_PARENT}/{job.job_id}" not in res.stdout
        assert torque_cg.exists()  # Torque's to remove, not ours
        assert not (Path(layout.v1["memory"]) / CG_PARENT / job.job_id).exists()
        acct_line(node.site, job.job_id)
    finally:
        torque_cg.remove()
        for top in set(layout.v1.values()):
            os.rmdir(os.path.join(top, torque_parent))


def test_kill_refuses_the_cgroup_it_runs_in() -> None:
    """A hook forked from a process inside the job's cgroup must not freeze itself."""
    cg = cgroups.job_cgroup(_layout(), CG_PARENT, "self.1")
    cg.create()
    try:
        pid = os.fork()
        if pid == 0:
            try:
                cg.attach(os.getpid())
                cg.kill(1)
            except cgroups.CgroupError as e:
                os._exit(3 if "refusing to kill" in e.detail else 4)
            finally:
                os._exit(5)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 3
    finally:
        cg.remove()
