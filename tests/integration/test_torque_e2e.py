"""End to end on Torque: the installed hooks, run by the pbs_mom emulator, on real mounts."""
import os
import random
import time

import pytest

from pbs_chroot.lifecycle import FAULT_POINTS
from tests import fakes
from tests.conftest import Node, Site, Syslog, home_of, mount_points, USER
from tests.momemu import EmuJob, EmuResult

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real mounts")]


def ran_in_image(res: EmuResult, job: EmuJob) -> None:
    assert res.action == "ran" and res.prologue_rc == 0, res.stderr
    assert res.job_rc == 0, res.stdout + res.stderr
    out = res.stdout
    assert 'PRETTY_NAME="pbs_chroot demo image' in out  # the image's, not the host's
    for word in ("proc-ok", "devnull-ok", f"{home_of(USER)}\nhome-ok", "script-ok",
                 f"user={USER}"):
        assert word in out, out
    assert (home_of(USER) / f"by-{job.job_id}").exists()
    assert res.epilogue_rc == 0


def test_v_job_and_D_job_run_in_the_image(node: Node) -> None:
    before = mount_points()
    v_job = node.job(node.rootdir() + [("MYVAR", "a,b=")])
    ran_in_image(node.emu.run(v_job), v_job)
    d_job = node.job(node.rootdir())  # qsub -D puts exactly this entry in Variable_List
    res = node.emu.run(d_job)
    ran_in_image(res, d_job)
    assert f"script-ok {node.site.pbs_home}/mom_priv/jobs/{d_job.job_id}.SC" in res.stdout
    assert mount_points() == before
    node.assert_clean()
    assert node.offline_calls() == []
    assert any(f"job {d_job.job_id}" in line and "runs in image" in line
               for line in node.syslog.lines())


def test_job_without_image_is_untouched(node: Node) -> None:
    before = mount_points()
    job = node.job([("MYVAR", "x")], "#!/bin/sh\nhead -n 1 /etc/os-release\n")
    res = node.emu.run(job)
    assert res.action == "ran" and res.job_rc == 0
    assert "pbs_chroot demo image" not in res.stdout and "PRETTY_NAME" in res.stdout
    assert res.stderr == "" and mount_points() == before
    assert os.listdir(node.site.state / "jobs") == []


@pytest.mark.parametrize("variables, shown", [
    ([("PBS_O_ROOTDIR", "/tmp/x")], "PBS_O_ROOTDIR=/tmp/x"),
    ([("PBS_O_ROOTDIR", "{P}/")], "PBS_O_ROOTDIR={P}/"),
    ([("PBS_O_ROOTDIR", "{P}/..")], "PBS_O_ROOTDIR={P}/.."),
    ([("PBS_O_ROOTDIR", "{P}/../sl5")], "PBS_O_ROOTDIR={P}/../sl5"),
    ([("PBS_O_ROOTDIR", "sl5")], "PBS_O_ROOTDIR=sl5"),
    ([("PBS_O_ROOTDIRX", "/tmp/x")], "PBS_O_ROOTDIRX"),
    ([("PBS_O_ROOTDIR", "{P}"), ("PBS_O_ROOTDIR", "/tmp/x")], "different values"),
    ([("PBS_O_ROOTDIR", "{P}\n")], "PBS_O_ROOTDIR={P}\\n"),
    ([("FOO", "x,PBS_O_ROOTDIR=/tmp/x")], "inside the value of another variable"),
])
def test_refused_requests_abort_the_job(node: Node, variables: list, shown: str) -> None:
    p = str(node.site.image)
    variables = [(n, v.replace("{P}", p)) for n, v in variables]
    shown = shown.replace("{P}", p)
    before = mount_points()
    job = node.job(variables)
    res = node.emu.run(job)
    assert res.prologue_rc == 1 and res.action == "aborted" and res.job_rc is None
    lines = [line for line in res.stderr.splitlines() if line.startswith("pbs-chroot:")]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"pbs-chroot: job {job.job_id}: can't use image") \
        and shown in lines[0], lines[0]
    assert lines[0].endswith(f"; allowed: {p}")
    assert mount_points() == before
    assert any(f"job {job.job_id} refused" in line for line in node.syslog.lines())
    assert node.offline_calls() == []
    node.assert_clean()


# A job that keeps checking its stage's mounts until told to end; exit 1 if one went.
WATCH_MOUNTS = """#!/bin/sh
touch "$HOME/started.$PBS_JOBID"
bad=0
until [ -e "$HOME/end.$PBS_JOBID" ]; do
  for m in / /proc /sys /dev /dev/pts /dev/shm /home /etc/passwd; do
    grep -q " $m " /proc/self/mountinfo || { echo "lost $m"; bad=1; }
  done
  test -c /dev/null && test -r "$0" && test -d "$HOME" || { echo "lost a path"; bad=1; }
  sleep PAUSE
done
exit $bad
"""


@pytest.mark.parametrize("count, pause", [(10, "0.05"), (64, "0.5")])
def test_jobs_share_the_stage_and_end_in_random_order(node: Node, count: int,
                                                      pause: str) -> None:
    warm = node.job(node.rootdir())  # a first job creates the state directory's files
    assert node.emu.run(warm).job_rc == 0
    before, state_before = mount_points(), node.site.state_files()
    home = home_of(USER)
    script = WATCH_MOUNTS.replace("PAUSE", pause)
    jobs = [node.job(node.rootdir(), script) for _ in range(count)]
    running = [node.emu.start(j) for j in jobs]
    deadline = time.monotonic() + 120
    while not all((home / f"started.{j.job_id}").exists() for j in jobs):
        assert time.monotonic() < deadline, "jobs did not all start"
        for r in running:
            r.poll()
        time.sleep(0.05)
    order = list(range(count))
    random.shuffle(order)
    results: dict = {}
    for i in order:
        (home / f"end.{jobs[i].job_id}").touch()
        results[i] = running[i].wait(60)  # its epilogue ran; the others still check their mounts
        time.sleep(random.uniform(0, 0.1 if count <= 10 else 0.01))
    for i, res in results.items():
        assert res.action == "ran" and res.job_rc == 0, (i, res.stdout, res.stderr)
        assert res.epilogue_rc == 0
    assert mount_points() == before
    assert node.site.state_files() == state_before
    from tests.conftest import SUMMARY
    SUMMARY[f"concurrent jobs on one stage, ended in random order ({count})"] = \
        "all ran, no mount lost, mountinfo and state as before"


def test_64_jobs_on_two_versions_while_the_symlink_is_switched(node: Node) -> None:
    """pbs_mom chroots by the allowlisted path after the prologue resolved it (and
    for every later task): a switch in between must not leave a job unstaged."""
    import subprocess
    import sys
    site, count = node.site, 64
    v2 = site.versions / "v2"
    subprocess.run(["cp", "-a", str(site.version), str(v2)], check=True)
    for v in (site.version, v2):
        (v / "etc" / "img-version").write_text(v.name + "\n")
    assert node.emu.run(node.job(node.rootdir())).job_rc == 0  # the state dir's files
    before, state_before = mount_points(), site.state_files()
    home = home_of(USER)
    script = WATCH_MOUNTS.replace("PAUSE", "0.3").replace(
        "#!/bin/sh\n", '#!/bin/sh\necho "version=$(cat /etc/img-version)"\n', 1)
    # The switcher is a process of its own (the emulator forks: no threads here).
    stop, log = site.base / "stop-switching", site.base / "switcher.log"
    with open(log, "w") as err:
        switcher = subprocess.Popen([sys.executable, "-c", SWITCHER, str(site.config),
                                     str(site.image), str(v2), str(site.version), str(stop)],
                                    stdout=subprocess.PIPE, stderr=err, text=True)
    running: dict = {}
    results: dict = {}
    try:
        jobs = [node.job(node.rootdir(), script) for _ in range(count)]
        waves = [jobs[:count // 2], jobs[count // 2:]]
        for wave in waves:  # the second wave starts while the first ends: overlap
            for j in wave:
                running[j.job_id] = node.emu.start(j)
                time.sleep(random.uniform(0, 0.02))
            deadline = time.monotonic() + 120
            while not all((home / f"started.{j.job_id}").exists() for j in wave):
                assert time.monotonic() < deadline, "jobs did not all start"
                for r in running.values():
                    r.poll()
                time.sleep(0.05)
            ending = [j for j in jobs if j.job_id in running and j.job_id not in results]
            random.shuffle(ending)
            for j in ending[:len(ending) // 2 if wave is waves[0] else None]:
                (home / f"end.{j.job_id}").touch()
                results[j.job_id] = running[j.job_id].wait(60)
    finally:
        stop.touch()
        out = switcher.communicate(timeout=60)[0]
        assert switcher.returncode == 0, log.read_text()[-2000:]
        switches = int(out)
        for job_id, r in running.items():
            if job_id not in results:
                (home / f"end.{job_id}").touch()
                results[job_id] = r.wait(60)
    seen = {}
    for job_id, res in results.items():
        assert res.action == "ran" and res.job_rc == 0, (job_id, res.stdout, res.stderr)
        assert res.epilogue_rc == 0
        seen[job_id] = res.stdout.split("version=")[1].split()[0]
    assert set(seen.values()) == {"v1", "v2"}, seen  # both versions really ran jobs
    assert switches >= 10
    assert mount_points() == before
    # Plus the audit mark of v2's first set-up, and the shell its jobs' prologues found
    # there (shells.ShellCache: one per version).
    after = site.state_files()
    assert [f for f in after if not f.startswith(("audit/", "shells/"))] == \
        [f for f in state_before if not f.startswith(("audit/", "shells/"))]
    assert set(state_before) <= set(after)
    for sub in ("audit/", "shells/"):
        assert len([f for f in after if f.startswith(sub)]) == \
            len([f for f in state_before if f.startswith(sub)]) + 1, (sub, after)
    assert node.offline_calls() == []
    acct = {a["job_id"]: a for a in site.accounting_lines()}
    both = [a for a in acct.values() if len(a.get("versions", ())) == 2]
    assert both, "no running job was staged in the second version by a switch"
    from tests.conftest import SUMMARY
    SUMMARY["concurrent jobs on two versions, symlink switched meanwhile"] = (
        f"{count} jobs, {switches} switches, {sum(v == 'v2' for v in seen.values())} ran "
        f"in v2, all ran, no mount lost, mountinfo and state as before")


SWITCHER = """
import os, random, sys, time
from pbs_chroot import config, images
cfg_path, image, a, b, stop = sys.argv[1:]
cfg, n = config.load(cfg_path), 0
while not os.path.exists(stop):
    images.switch(cfg, image, a if n % 2 == 0 else b)
    n += 1
    time.sleep(random.uniform(0, 0.05))
print(n)
"""


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_prologue_killed_then_epilogue_leaves_nothing(site: Site, syslog: Syslog,
                                                      point: str) -> None:
    """SIGKILL at each fault point; Torque then runs the job anyway, and the epilogue."""
    n = Node(site, syslog, hook_env={"PBS_CHROOT_TEST_KILL_AT": point})
    try:
        before = mount_points()
        job = n.job(n.rootdir())
        res = n.emu.run(job)
        assert res.prologue_rc == -9  # it really died there
        # pbs_mom reads only WEXITSTATUS: a killed prologue counts as success.
        assert res.action == "ran" and res.epilogue_rc == 0, res.stderr
        if FAULT_POINTS.index(point) >= FAULT_POINTS.index("stage_joined"):
            # the stage was up: the job really ran in it
            assert "proc-ok" in res.stdout
        assert mount_points() == before
        n.assert_clean()
    finally:
        n.emu.cleanup()


def _site_fault(node: Node, job: EmuJob, detail: str) -> None:
    before = mount_points()
    res = node.emu.run(job)
    assert res.prologue_rc == 2 and res.action == "requeued" and res.job_rc is None
    lines = [line for line in res.stderr.splitlines() if line.startswith("pbs-chroot:")]
    assert len(lines) == 1 and lines[0].startswith(f"pbs-chroot: job {job.job_id}: "
                                                   "can't start the job: ")
    calls = node.offline_calls()
    assert calls and calls[0][:3] == ["-o", "-N", f"pbs-chroot: prologue of job {job.job_id} "
                                      "failed, see syslog"]
    assert calls[0][3] == os.uname().nodename.split(".")[0]
    assert mount_points() == before
    assert any(detail in line for line in node.syslog.lines()) or detail in res.stderr


def test_config_writable_by_others_is_a_site_fault(node: Node) -> None:
    os.chmod(node.site.config, 0o646)
    _site_fault(node, node.job(node.rootdir()), "refusing config")
    # In the syslog fixed at install (not the machine's /dev/log): the admin reads it there.
    assert any("refusing config" in line for line in node.syslog.lines())


def test_image_writable_by_others_is_a_site_fault(node: Node) -> None:
    os.chmod(node.site.version, 0o757)
    _site_fault(node, node.job(node.rootdir()), "writable by group or others")
    node.assert_clean()


def test_qstat_failure_fails_closed(node: Node) -> None:
    job = node.job(node.rootdir())
    fakes.set_qstat_fault(node.emu.qstat_jobs_dir, job.job_id, exit_code=1)
    _site_fault(node, job, "qstat")
    node.assert_clean()


def test_id_in_a_torque_job_names_the_user_and_every_group(node: Node) -> None:
    """Acceptance (issue 7): through pbs_mom's own chroot, with the hooks' generated passwd
    and group: `id` names the user and each supplementary group; `cd ~` lands where it
    does on the host."""
    from tests.conftest import EXTRA_GID, EXTRA_GROUP, GID, UID
    job = node.job(node.rootdir(), script="#!/bin/sh\nid\ncd ~ && pwd\n")
    res = node.emu.run(job)
    assert res.action == "ran" and res.job_rc == 0, res.stdout + res.stderr
    assert res.stdout.splitlines()[-2:] == [
        f"uid={UID}({USER}) gid={GID}({USER}) groups={GID}({USER}),{EXTRA_GID}({EXTRA_GROUP})",
        str(home_of(USER))]
    node.assert_clean()
