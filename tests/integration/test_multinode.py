"""Jobs on two (or three) Torque nodes: the installed hooks on every node, real mounts,
cgroups and TM tasks (issue 15). Each sister is a pbs_mom daemon in a mount namespace of
its own, with its own PBS_HOME, state directory, cgroup parent, image copy and pbsnodes
recorder (tests/multinode.py); the same PBS_O_ROOTDIR names each node's own image."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

import pytest

from pbs_chroot import config
from tests import fakes
from tests.conftest import (CG_PARENT, SUMMARY, USER, Node, Site, Syslog, cgroup_children,
                            mount_points, pbs_chroot_cli, starter_dir, tmpfs_root)
from tests.momemu import EmuJob
from tests.integration.test_userns_entry import v2_delegated  # noqa: F401
from tests.multinode import MultiNodeJob, SisterMom

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts, cgroups")]

PROBE_TASK = ["sh", "-c", "cat /etc/debian_version; cat /proc/self/cgroup; "
              "test -r /proc/self/stat && echo proc-ok; grep NoNewPrivs /proc/self/status; "
              "echo sh=$$; id -un"]
JOB_SCRIPT = '#!/bin/sh\nuntil [ -e "$HOME/end.$PBS_JOBID" ]; do sleep 0.05; done\n'


class Sister:
    """A sister node: its site (own image copy, state, config) and its pbs_mom."""

    def __init__(self, name: str, base: Path, image_src: Path, ms_site: Site,
                 hook_env: Optional[dict] = None) -> None:
        base.mkdir(mode=0o755)
        self.name, self.site = name, Site(base, image_src)
        self.cg_parent = f"{CG_PARENT}/node-{name}"
        self.syslog = Syslog(base / "log.sock")
        bindir = base / "fake_bin"
        self.pbsnodes_log = base / "pbsnodes.log"
        pbsnodes = fakes.write_fake_pbsnodes(bindir, self.pbsnodes_log)
        self.ms_image = ms_site.image  # the path users write: the same on every node
        self.qstat = ""
        for top in _cgroup_tops():  # this node's parent, as the site's admin makes it
            (top / CG_PARENT).mkdir(exist_ok=True)
            control = top / CG_PARENT / "cgroup.subtree_control"
            if control.exists():  # v2: delegate the controllers to the node's parent
                wanted = set((top / CG_PARENT / "cgroup.controllers").read_text().split())
                control.write_text(" ".join(f"+{c}" for c in ("memory", "cpu", "pids")
                                            if c in wanted))
            (top / self.cg_parent).mkdir(exist_ok=True)
        self.mom = SisterMom(name, self.site.pbs_home, hook_env=hook_env,
                             binds=((base / "chroot", ms_site.base / "chroot"),))
        self._pbsnodes = pbsnodes

    def configure(self, qstat: Path) -> None:
        binds = "[binds]\n" + "".join(f"{t} = {v}\n" for t, v in config.DEFAULT_BINDS + (
            (str(tmpfs_root() / "home"), f"{tmpfs_root() / 'home'} rec"),))
        s = self.site
        s.config.write_text(
            f"[pbs_chroot]\nstate_dir = {s.state}\npbs_home = {s.pbs_home}\n"
            f"syslog_socket = {s.base / 'log.sock'}\ncgroup_parent = {self.cg_parent}\n"
            f"accounting_log = {s.accounting}\nnode_name = {self.name}\n"
            f"qstat = {qstat}\njob_info = qstat\njob_starter = {starter_dir() / 'job_starter'}"
            f"\n\n[image {self.ms_image}]\n\n{binds}")
        os.chmod(s.config, 0o644)
        s.add_mount_points(s.version)  # as the node's admin does (a stage never makes them)
        res = pbs_chroot_cli("--config", str(s.config), "install", "--pbs-home",
                             str(s.pbs_home), "--pbsnodes", str(self._pbsnodes),
                             "--starters", str(starter_dir()))
        assert res.returncode == 0, res.stderr

    def run(self, *argv: str) -> dict:
        """An admin command on this node."""
        return self.mom.call("run", argv=[sys.executable, "-m", "pbs_chroot", "--config",
                                          str(self.site.config), *argv])

    def offline_calls(self) -> list:
        return fakes.read_pbsnodes_calls(self.pbsnodes_log)

    def state_left(self) -> list:
        return [str(p.relative_to(self.site.state)) for p in self.site.state.rglob("*")
                if p.parent.name in ("jobs", "stages")] if self.site.state.exists() else []

    def close(self) -> None:
        self.mom.close()
        self.syslog.sock.close()
        for top in _cgroup_tops():
            parent = top / self.cg_parent
            if parent.is_dir() and not any(p.is_dir() for p in parent.iterdir()):
                parent.rmdir()


def _cgroup_tops() -> list:
    from pbs_chroot import cgroups
    layout = cgroups.detect()
    return [Path(t) for t in sorted(set(layout.v1.values() if layout.version == 1
                                        else [str(layout.v2)]))]


def job_cgroups() -> list:
    """The cgroups below the tests' parent, but the sisters' own parents."""
    return [c for c in cgroup_children() if not c.split("/")[-1].startswith("node-")]


class Cluster:
    """A mother superior (the emulator in this process) and its sisters."""

    def __init__(self, site: Site, syslog: Syslog, image_src: Path, names: tuple,
                 sister_env: Optional[dict] = None) -> None:
        self.ms = Node(site, syslog)
        for v in (site.version,):
            (v / "etc" / "debian_version").write_text("sl5-image\n")
        self.sisters: list = []
        for name in names:
            sis = Sister(name, site.base / name, image_src, site, sister_env)
            (sis.site.version / "etc" / "debian_version").write_text("sl5-image\n")
            sis.configure(self.ms.emu.qstat_path)
            self.sisters.append(sis)
        self.jobs: list = []
        self.seq = 500

    def job(self, variables: Optional[list] = None, script: str = JOB_SCRIPT,
            ppn: int = 1) -> MultiNodeJob:
        self.seq += 1
        hosts = ":".join([self.ms.emu.server] + [s.name for s in self.sisters])
        n = len(self.sisters) + 1
        job = EmuJob(f"{self.seq}.vm", USER, script,
                     (self.ms.rootdir() if variables is None else variables)
                     + [("BEOWULF_JOB_MAP", hosts)],
                     resource_list=f"nodes={n}:ppn={ppn},walltime=00:10:00,"
                     f"neednodes={n}:ppn={ppn}")
        mjob = MultiNodeJob(self.ms.emu, [s.mom for s in self.sisters], job, self.ms.site.base)
        self.jobs.append(mjob)
        return mjob

    def end(self, mjob: MultiNodeJob) -> object:
        flag = tmpfs_root() / "home" / USER / f"end.{mjob.job.job_id}"
        flag.touch()
        try:
            return mjob.wait(60)
        finally:
            flag.unlink()

    def close(self) -> None:
        for mjob in self.jobs:  # end them as Torque would (epilogues on every node)
            if mjob.running is not None and mjob.running.poll() is None:
                try:
                    self.end(mjob)
                except (TimeoutError, RuntimeError, OSError):
                    pass
            mjob.kill()
        for sis in self.sisters:
            sis.close()
        self.ms.emu.cleanup()


@pytest.fixture(autouse=True)
def _delegated(v2_delegated: None) -> None:  # noqa: F811
    """On a cgroup v2 (run-in-cgroup-v2.sh): the root's controllers enabled for the tests'
    parent, as systemd's Delegate= does, so the nodes' parents below it can have them."""


@pytest.fixture
def cluster(site: Site, syslog: Syslog, image_root: Path) -> Iterator[Cluster]:
    c = Cluster(site, syslog, image_root, ("sis1",))
    yield c
    c.close()


def _adopters_left(c: Cluster) -> list:
    """Processes of these nodes still running a prologue script (an adopter outliving its
    job). Only this test's mount namespaces count: other tests may run on the machine."""
    spaces = {os.readlink("/proc/self/ns/mnt")}
    spaces |= {os.readlink(f"/proc/{s.mom.pid}/ns/mnt") for s in c.sisters}
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            space = os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:
            continue
        if space in spaces and any(part.endswith((b"/prologue", b"/prologue.parallel"))
                                   for part in cmd):
            left.append((int(pid), cmd))
    return left


def _job_cgroup(c: Cluster, mjob: MultiNodeJob, node: str) -> str:
    sis = {s.name: s for s in c.sisters}
    parent = CG_PARENT if node == "vm" else sis[node].cg_parent
    return f"/{parent}/{mjob.job.job_id}"


def _contained(c: Cluster, mjob: MultiNodeJob, node: str, text: str) -> None:
    """A task's /proc/self/cgroup lines all name its job's cgroup on ``node``: the job
    starter runs nothing of a task's until the adopter has placed it (job_starter.c)."""
    lines = _cgroup_lines(text)
    want = _job_cgroup(c, mjob, node)
    assert lines and all(line.endswith(want) for line in lines), (node, want, text)


def _cgroup_lines(text: str) -> list:
    """The lines of /proc/self/cgroup dumps that name the job's cgroup: the memory
    hierarchy's on cgroup v1, the unified one's ("0::/...") on v2."""
    memory = [line for line in text.splitlines() if ":memory:" in line]
    return memory or [line for line in text.splitlines() if line.startswith("0::")]


def test_pbsdsh_runs_in_the_image_and_the_job_cgroup_on_both_nodes(cluster: Cluster) -> None:
    """Acceptance: pbsdsh -u sh -c 'cat /etc/debian_version; cat /proc/self/cgroup' prints
    the image's version and the job's cgroup on both nodes; accounting covers both; after
    the job neither node keeps a mount, cgroup or record."""
    sis = cluster.sisters[0]
    before_ms, before_sis = mount_points(), sis.mom.mount_points()
    mjob = cluster.job()
    assert mjob.start(), (mjob.join_results, sis.syslog.lines()[-3:])
    job_id = mjob.job.job_id
    for _ in range(3):  # three rounds of tasks: every one must land in its cgroup
        out = mjob.pbsdsh(PROBE_TASK)
        for node, (rc, text) in out.items():
            assert rc == 0, (node, text)
            lines = text.splitlines()
            assert lines[0] == "sl5-image", (node, text)  # the image's, not the host's
            assert "proc-ok" in lines and lines[-1] == USER, (node, text)
            # TM tasks go through $job_starter too (issue 11): the stage's sets it.
            assert "NoNewPrivs:\t1" in lines, (node, text)
            _contained(cluster, mjob, node, text)
    assert Path("/etc/debian_version").read_text() != "sl5-image\n"
    res = cluster.end(mjob)
    assert res.action == "ran" and res.job_rc == 0 and res.epilogue_rc == 0, res.stderr
    assert mjob.sister_epilogues == {"sis1": 0}
    # accounting: one line per node; the mother superior's names every node
    ms_acct = [a for a in cluster.ms.site.accounting_lines() if a["job_id"] == job_id]
    sis_acct = [a for a in sis.site.accounting_lines() if a["job_id"] == job_id]
    assert len(ms_acct) == 1 and len(sis_acct) == 1, (ms_acct, sis_acct)
    assert ms_acct[0]["nodes"] == ["vm", "sis1"] and "torque_resources_used" in ms_acct[0]
    assert sis_acct[0]["node"] == "sis1" and sis_acct[0]["sister"] is True
    assert sis_acct[0]["image"] == str(cluster.ms.site.image)
    assert sis_acct[0]["mem_peak_bytes"] > 0  # the tasks' usage, read from its cgroup
    # nothing left on either node
    assert mount_points() == before_ms and sis.mom.mount_points() == before_sis
    cluster.ms.assert_clean()
    assert sis.state_left() == [] and job_cgroups() == []
    assert _adopters_left(cluster) == []
    assert cluster.ms.offline_calls() == [] and sis.offline_calls() == []
    SUMMARY["two-node job, pbsdsh on both nodes"] = \
        "3 rounds in the image; 6 of 6 tasks in the job cgroup"


def test_tm_tasks_of_a_job_on_several_cores_of_one_node_are_contained(
        site: Site, syslog: Syslog, image_root: Path) -> None:
    """nodes=1:ppn=2: pbsdsh's tasks are pbs_mom's children here too, outside the job's
    process tree; the adopter runs for them (PBS_NP > 1) and puts them in the job cgroup."""
    c = Cluster(site, syslog, image_root, ())
    try:
        before = mount_points()
        mjob = c.job(ppn=2)
        assert mjob.start()
        for _ in range(2):
            rc, text = mjob.pbsdsh(PROBE_TASK)["vm"]
            assert rc == 0 and text.splitlines()[0] == "sl5-image", text
            assert "NoNewPrivs:\t1" in text
            _contained(c, mjob, "vm", text)
        res = c.end(mjob)
        assert res.action == "ran" and res.job_rc == 0 and res.epilogue_rc == 0, res.stderr
        assert any(f"job {mjob.job.job_id}: adopting the TM tasks" in line
                   for line in syslog.lines())
        assert mount_points() == before and job_cgroups() == []
        assert _adopters_left(c) == []
        c.ms.assert_clean()
    finally:
        c.close()


def test_tasks_forking_fast_are_contained(cluster: Cluster) -> None:
    """A task whose children start at once: every one of them is in the job's cgroup."""
    mjob = cluster.job()
    assert mjob.start(), (mjob.join_results, [s.syslog.lines() for s in cluster.sisters])
    task = ["sh", "-c", "echo sh=$$; for i in 1 2 3 4 5 6 7 8; do cat /proc/self/cgroup & done;"
            " wait"]
    out = mjob.pbsdsh(task)
    for node, (rc, text) in out.items():
        assert rc == 0 and len(_cgroup_lines(text)) == 8, (node, text)
        _contained(cluster, mjob, node, text)
    res = cluster.end(mjob)
    assert res.action == "ran" and res.epilogue_rc == 0


def test_a_task_the_adopter_is_late_for_runs_nothing_outside_the_job_cgroup(
        cluster: Cluster) -> None:
    """The adopter's race lost on purpose: both nodes' adopters are stopped (SIGSTOP) while
    pbsdsh starts a task that double-forks a sleeper away at once. The job starter holds
    the task until the adopter, let go a second later, has placed it: the sleeper is in
    the job's cgroup and dies with the job. Control: the same task spawned with PBS_NP
    and PBS_NUM_NODES of 1 in its tm_spawn environment skips the starter's wait, and its
    sleeper escapes the job's cgroup (and would outlive the job)."""
    mjob = cluster.job()
    assert mjob.start(), (mjob.join_results, [s.syslog.lines() for s in cluster.sisters])
    job_id = mjob.job.job_id
    mjob.wait_running()  # the mother superior's prologue has started its adopter
    adopters = [json.loads((site.state / "jobs" / f"{job_id}.json").read_text())["adopter"]
                for site in [cluster.ms.site] + [s.site for s in cluster.sisters]]
    task = ["sh", "-c", "(sleep 600 </dev/null >/dev/null 2>&1 & echo runaway=$!); "
            "cat /proc/self/cgroup"]
    runaways: dict = {}

    def spawn_while_adopters_stop(envp: Optional[dict]) -> dict:
        for a in adopters:
            os.kill(a["pid"], signal.SIGSTOP)
        # A process, not a thread: pbsdsh forks, and a fork of a threaded process may hang.
        resume = subprocess.Popen(["sh", "-c", "sleep 1; exec kill -CONT " +
                                   " ".join(str(a["pid"]) for a in adopters)])
        try:
            out = mjob.pbsdsh(task, envp=envp)
        finally:
            resume.wait()
        for node, (rc, text) in out.items():
            assert rc == 0, (node, text)
            pid = int(next(w[8:] for w in text.split() if w.startswith("runaway=")))
            runaways.setdefault(node, []).append(pid)
        return out

    def cgroup_of(pid: int) -> str:
        return "\n".join(_cgroup_lines(Path(f"/proc/{pid}/cgroup").read_text()))

    try:
        held = spawn_while_adopters_stop(None)
        for node, (_, text) in held.items():
            _contained(cluster, mjob, node, text)
            want = _job_cgroup(cluster, mjob, node)
            assert cgroup_of(runaways[node][0]).endswith(want), node
        control = spawn_while_adopters_stop({"PBS_NP": "1", "PBS_NUM_NODES": "1"})
        for node in control:
            assert _job_cgroup(cluster, mjob, node) not in cgroup_of(runaways[node][1]), node
        res = cluster.end(mjob)
        assert res.action == "ran" and res.epilogue_rc == 0, res.stderr
        for node, (held_pid, control_pid) in runaways.items():
            assert not _alive(held_pid), node  # killed with the job
            assert _alive(control_pid), node   # escaped: outlived it
    finally:
        for pids in runaways.values():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)  # the test's own sleepers, by pid
                except ProcessLookupError:
                    pass


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper, this test's process when
    pbs_mom's emulator is a subreaper, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_two_jobs_on_the_same_nodes_keep_their_tasks_apart(cluster: Cluster) -> None:
    """Two multi-node jobs share both nodes: two adopters watch the same pbs_mom on each,
    and whichever seizes a task places it by its own PBS_JOBID: each task in its job's
    cgroup, never the other's."""
    sis = cluster.sisters[0]
    a, b = cluster.job(), cluster.job()
    assert a.start() and b.start(), (a.join_results, b.join_results)
    for _ in range(3):
        for mjob in (a, b, a):
            for node, (rc, text) in mjob.pbsdsh(PROBE_TASK).items():
                assert rc == 0, (mjob.job.job_id, node, text)
                _contained(cluster, mjob, node, text)  # so never the other job's
    for mjob in (b, a):
        res = cluster.end(mjob)
        assert res.action == "ran" and res.epilogue_rc == 0
    assert sis.state_left() == [] and job_cgroups() == []
    assert _adopters_left(cluster) == []


def test_sister_without_its_image_offlines_itself_and_the_job_is_requeued(
        cluster: Cluster) -> None:
    """Acceptance: a sister whose image is missing takes itself offline (a site fault), the
    job is requeued (not lost), and neither node keeps anything."""
    sis = cluster.sisters[0]
    shutil.rmtree(sis.site.version)  # the image's version is gone on this node only
    before_ms, before_sis = mount_points(), sis.mom.mount_points()
    mjob = cluster.job()
    assert not mjob.start()
    assert mjob.join_results[-1]["mom_rc"] == 2 and mjob.requeued
    calls = sis.offline_calls()
    assert calls and calls[0][:2] == ["-o", "-N"] and calls[0][3] == "sis1", calls
    assert "prologue of job" in calls[0][2]
    assert cluster.ms.offline_calls() == []  # the mother superior's node is fine
    assert mjob.ms_epilogue_rc == 0          # its epilogue ran (its prologue never did)
    assert any("failed" in line for line in sis.syslog.lines())
    assert mount_points() == before_ms and sis.mom.mount_points() == before_sis
    assert sis.state_left() == [] and job_cgroups() == []
    assert _adopters_left(cluster) == []


def test_sister_refuses_a_request_itself(cluster: Cluster) -> None:
    """Every sister runs the gate on the request it gets, trusting no other node. A request
    it refuses sets nothing up there; since Torque turns any prologue.parallel failure into
    a requeue (a loop, for a request every node refuses), the sister passes the decision to
    mother superior's prologue, which runs next with the same gate: the job is aborted, the
    user told in its error file, no node offlined, nothing requeued."""
    sis = cluster.sisters[0]
    mjob = cluster.job([("PBS_O_ROOTDIRX", "/tmp/x")])
    assert mjob.start()
    assert mjob.join_results[-1] == {"rc": 0, "mom_rc": 0}
    res = mjob.wait(60)
    assert res.action == "aborted" and res.prologue_rc == 1, res
    assert "PBS_O_ROOTDIRX is not allowed" in res.stderr
    assert not mjob.requeued
    assert sis.offline_calls() == [] and cluster.ms.offline_calls() == []
    assert any(f"job {mjob.job.job_id} refused on this sister" in line
               for line in sis.syslog.lines())
    assert sis.state_left() == [] and job_cgroups() == []


@pytest.fixture
def cluster3(site: Site, syslog: Syslog, image_root: Path) -> Iterator[Cluster]:
    c = Cluster(site, syslog, image_root, ("sis1", "sis2"))
    yield c
    c.close()


def test_aborted_sister_is_cleaned_by_the_reconciler(cluster3: Cluster) -> None:
    """sis1 joins, sis2 fails: the MS aborts the job on sis1, which purges it without
    epilogue.parallel. The reconciler on sis1 then finds a record of a job no longer on
    the node and undoes it (stage, cgroup, record, adopter)."""
    sis1, sis2 = cluster3.sisters
    shutil.rmtree(sis2.site.version)
    before = sis1.mom.mount_points()
    mjob = cluster3.job()
    assert not mjob.start()
    assert [r["mom_rc"] for r in mjob.join_results] == [0, 2]
    job_id = mjob.job.job_id
    assert f"jobs/{job_id}.json" in sis1.state_left()  # left behind by the abort
    assert sis1.mom.mount_points() != before            # its stage is still up
    out = sis1.run("cleanup")
    assert out["rc"] == 0, out["out"]
    assert sis1.mom.mount_points() == before
    assert sis1.state_left() == [] and job_cgroups() == []
    assert sis2.offline_calls() and sis1.offline_calls() == []
    assert _adopters_left(cluster3) == []
    acct = [a for a in sis1.site.accounting_lines() if a["job_id"] == job_id]
    assert len(acct) == 1 and acct[0].get("recovered") is True


def test_image_switched_on_a_sister_while_the_job_runs(cluster: Cluster) -> None:
    """The symlink of the image is switched on the sister between two pbsdsh rounds:
    pbs_mom chroots every new task by the path, so the second round runs in the new
    version, staged for the job; after the job the sister is clean."""
    import subprocess
    sis = cluster.sisters[0]
    v2 = sis.site.versions / "v2"
    subprocess.run(["cp", "-a", str(sis.site.version), str(v2)], check=True)
    (v2 / "etc" / "debian_version").write_text("sl5-image-v2\n")
    before_sis = sis.mom.mount_points()
    mjob = cluster.job()
    assert mjob.start(), (mjob.join_results, [s.syslog.lines() for s in cluster.sisters])
    first = mjob.pbsdsh(PROBE_TASK)
    assert first["sis1"][1].startswith("sl5-image\n")
    switch = ("import sys\nfrom pbs_chroot import config, images\n"
              "images.switch(config.load(sys.argv[1]), sys.argv[2], sys.argv[3])\n")
    out = sis.mom.call("run", argv=[sys.executable, "-c", switch, str(sis.site.config),
                                    str(cluster.ms.site.image), str(v2)])
    assert out["rc"] == 0, out["out"]
    second = mjob.pbsdsh(PROBE_TASK)
    rc, text = second["sis1"]
    assert rc == 0 and text.startswith("sl5-image-v2\n") and "proc-ok" in text, text
    assert second["vm"][1].startswith("sl5-image\n")  # the other node did not switch
    res = cluster.end(mjob)
    assert res.action == "ran" and mjob.sister_epilogues == {"sis1": 0}
    acct = [a for a in sis.site.accounting_lines() if a["job_id"] == mjob.job.job_id]
    assert len(acct) == 1 and len(acct[0].get("versions", ())) == 2, acct
    assert sis.mom.mount_points() == before_sis and sis.state_left() == []
    assert _adopters_left(cluster) == []


def _restart_sister(sis: Sister, ms_site: Site, kill_at: str) -> None:
    """A new pbs_mom on the sister node, whose hooks die at ``kill_at``."""
    sis.mom.close()
    sis.mom = SisterMom(sis.name, sis.site.pbs_home, hook_env={"PBS_CHROOT_TEST_KILL_AT": kill_at},
                        binds=((sis.site.base / "chroot", ms_site.base / "chroot"),))


@pytest.mark.slow
def test_kill_sister_hooks_at_every_step(site: Site, syslog: Syslog, image_root: Path) -> None:
    """SIGKILL prologue.parallel, then epilogue.parallel, at each step they pass (traced
    from the code). pbs_mom reads only WEXITSTATUS, so a killed prologue.parallel counts
    as joined and the job runs; what epilogue.parallel and then the reconciler (the job
    is no longer on the node) leave must be the sister as it was, every time."""
    trace = site.base / "trace"
    c = Cluster(site, syslog, image_root, ("sis1",),
                sister_env={"PBS_CHROOT_TEST_TRACE": str(trace)})
    try:
        sis = c.sisters[0]
        before = sis.mom.mount_points()
        mjob = c.job()
        assert mjob.start()
        assert mjob.pbsdsh(PROBE_TASK)["sis1"][0] == 0
        c.end(mjob)
        points = [p for p in dict.fromkeys(trace.read_text().split("\n")) if p]
        assert {"recorded", "stage_joined", "adopter_started", "end:killed"} <= set(points)
        split = points.index("started") + 1
        pro, epi = points[:split], [p for p in points[split:] if p not in points[:split]]
        for point in pro + epi:
            _restart_sister(sis, site, point)
            mjob = c.job()
            assert mjob.start(), (point, mjob.join_results)
            died = mjob.join_results[0]["rc"] == -9
            mjob.pbsdsh(["true"])  # with no stage (killed before it), the task fails: fine
            res = c.end(mjob)
            died = died or mjob.sister_epilogues["sis1"] == -9
            assert died and res.action == "ran", point  # it really died there
            out = sis.run("cleanup")
            assert out["rc"] == 0, (point, out["out"])
            assert sis.mom.mount_points() == before, point
            assert sis.state_left() == [] and job_cgroups() == [], point
            assert _adopters_left(c) == [], point
        SUMMARY["sister hooks killed at each step, then reconciled"] = \
            f"{len(pro)} prologue.parallel + {len(epi)} epilogue.parallel points"
    finally:
        c.close()
