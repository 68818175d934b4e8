"""OpenPBS (issue 14): the hooks `install --openpbs` writes, run by an emulated OpenPBS.

tests/openpbsemu.py runs each event the way OpenPBS runs it (in the process the captures
and start_exec.c show), with the `pbs` module the captures show; the stage, the cgroup,
the user namespace of the shim and the privilege drop are the real kernel's. The job is a
real user's (pbsct), started by the emulated mom as root, that becomes pbsct after the
launch hook and execs what the hook put first: the shim.
"""
import os
from pathlib import Path
from typing import Iterator

import pytest

from pbs_chroot import openpbsinstall
from tests.conftest import (CG_PARENT, OTHER_UID, UID, USER, Site, Syslog, cgroup_children,
                            mount_points, open_to_users)
from tests.integration.test_userns import user_python  # noqa: F401
from tests.integration.test_userns_entry import v2_delegated  # noqa: F401
from tests.openpbsemu import Host, JobResult, NsHost, OpenPbs, PbsJob, mom_job, qsub

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: stages, cgroups, "
                                 "users")]

PROBE = """head -n 1 /etc/os-release
id -u
grep NoNewPrivs /proc/self/status
grep -c "{parent}/{job}" /proc/self/cgroup
echo "login=$(tr '\\0' ' ' < /proc/$PPID/cmdline)tmpdir=$TMPDIR script=$0"
touch "$TMPDIR/x" && echo tmpdir-ok
"""


class PbsSite:
    """One OpenPBS execution host with the hooks installed, over a test Site."""

    def __init__(self, name: str, site: Site, user_python: tuple, syslog_path: Path,  # noqa: F811
                 cg_parent: str = CG_PARENT, binds: tuple = ()) -> None:
        self.name, self.site, self.cg_parent = name, site, cg_parent
        python, pkg = user_python
        self.pbs_home = site.base / "pbs"
        self.tmpdir = site.base / "tmpdir"   # pbs_mom's $tmpdir (/var/tmp on a real node)
        self.tmpdir.mkdir(mode=0o755)
        os.chmod(self.tmpdir, 0o1777)
        self.entry = site.base / "entry"
        (self.pbs_home / "mom_priv" / "jobs").mkdir(parents=True)  # before its mount point
        self.configure()
        self.libexec = site.base / "libexec"
        self.install_text = openpbsinstall.install(
            str(self.libexec), str(site.config), python, str(syslog_path), "image",
            apply=False, qmgr="/opt/pbs/bin/qmgr", libdir=str(pkg))
        open_to_users(self.libexec)
        hook = self.libexec / "openpbs_hook.py"
        self.host = NsHost(name, self.pbs_home, hook, binds) if binds \
            else Host(name, self.pbs_home, hook)

    def configure(self, main: str = "", images: str = "") -> None:
        self.site.pbs_home = self.pbs_home
        self.site.write_config(main=f"entry_dir = {self.entry}\n"
                               f"tmpdir = {self.tmpdir}\njob_starter = none\n"
                               f"node_name = {self.name}\n{main}", images=images)
        text = self.site.config.read_text()
        text = text.replace(f"cgroup_parent = {CG_PARENT}\n", f"cgroup_parent = {self.cg_parent}\n")
        self.site.config.write_text(text)
        self.site.add_mount_points(self.site.version)

    def assert_clean(self) -> None:
        assert not any(str(self.site.version) in m for m in mount_points())
        for d in (self.site.state / "jobs", self.site.state / "stages", self.entry / "jobs",
                  self.entry / "stages", self.pbs_home / "mom_priv" / "hooks" / "tmp",
                  self.pbs_home / "spool"):
            assert not d.exists() or os.listdir(d) == [], d


@pytest.fixture
def pbs(site: Site, syslog: Syslog, user_python: tuple,  # noqa: F811
        v2_delegated: None) -> Iterator[PbsSite]:  # noqa: F811
    yield PbsSite("vm", site, user_python, syslog.path)


def job(p: PbsSite, seq: int, script: str, image: object = None, **kw: object) -> PbsJob:
    res = {"ncpus": "1", "place": "free"}
    if image is not None:
        res["image"] = str(image)
    jid = f"{seq}.vm"
    return PbsJob(jid, USER, script.format(parent=p.cg_parent, job=jid), ["vm"], res, **kw)


def test_install_prints_the_qmgr_commands_and_writes_root_files(pbs: PbsSite) -> None:
    text = pbs.install_text
    assert "qmgr -c 'create resource image type=string,flag=m'" in text
    for name in openpbsinstall.HOOKS:
        assert f"import hook {name} application/x-python default {pbs.libexec}/openpbs_hook.py" \
            in text
    assert "set hook pbs_chroot_begin fail_action = offline_vnodes" in text
    assert "set hook pbs_chroot_launch freq = 300" in text
    hook, shim = pbs.libexec / "openpbs_hook.py", pbs.libexec / "pbs-chroot-shim"
    for path, mode in ((hook, 0o644), (shim, 0o755)):
        st = path.lstat()
        assert (st.st_uid, st.st_mode & 0o7777) == (0, mode)
    assert f'CONFIG = "{pbs.site.config}"' in hook.read_text()


def test_job_in_the_image_runs_as_the_user_with_no_new_privs(pbs: PbsSite,
                                                             syslog: Syslog) -> None:
    """The acceptance run: qsub -l image=... -l select=1:ncpus=1:mem=100mb."""
    assert qsub(pbs.site.base, pbs.host.hook_file, USER, {"image": str(pbs.site.image)}) \
        == (0, "")
    before = mount_points()
    j = job(pbs, 1, PROBE, pbs.site.image, mem="102400kb")
    j.resources["mem"] = "100mb"
    res = OpenPbs([pbs.host], pbs.tmpdir).run(j)
    assert (res.action, res.exit_status) == ("ran", 0), (res.stderr, syslog.lines())
    lines = res.stdout.splitlines()
    assert "pbs_chroot demo image" in lines[0], res.stdout
    assert lines[1] == str(UID)
    assert lines[2] == "NoNewPrivs:\t1"
    assert int(lines[3]) >= 1  # in its job's cgroup, made by execjob_begin
    # A login shell, as mom's, reading the script's path on stdin (SHELL_INVOKE).
    assert lines[4] == (f"login=-sh tmpdir={pbs.tmpdir}/pbs.1.vm "
                        f"script={pbs.pbs_home}/mom_priv/jobs/1.vm.SC")
    assert lines[5] == "tmpdir-ok"
    acct = pbs.site.accounting_lines()
    assert len(acct) == 1
    a = acct[0]
    assert (a["job_id"], a["user"], a["image"], a["exit"], a["node"]) == \
        ("1.vm", USER, str(pbs.site.image), 0, "vm")
    assert a["mem_limit_bytes"] == 102400 * 1024  # from exec_vnode's mem for this host
    assert mount_points() == before
    pbs.assert_clean()
    assert pbs.host.offline is None
    assert any("runs in image" in line for line in syslog.lines())


def test_qsub_refuses_a_near_miss_with_the_allowed_list(pbs: PbsSite, syslog: Syslog) -> None:
    rc, err = qsub(pbs.site.base, pbs.host.hook_file, USER, {"image": f"{pbs.site.image}/"})
    assert rc == 1
    assert err == (f"qsub: pbs-chroot: can't use image -l image={pbs.site.image}/: not an "
                   f"image of this site; allowed: {pbs.site.image}\n")
    assert any("queuejob refused" in line for line in syslog.lines())
    assert qsub(pbs.site.base, pbs.host.hook_file, USER, {"ncpus": "2"}) == (0, "")


def test_qsub_passes_a_job_without_an_image_even_with_a_broken_config(pbs: PbsSite) -> None:
    os.chmod(pbs.site.config, 0o666)
    assert qsub(pbs.site.base, pbs.host.hook_file, USER, {"ncpus": "1"}) == (0, "")
    # With an image: the server can't check; the execution host will (and refuses there).
    assert qsub(pbs.site.base, pbs.host.hook_file, USER, {"image": str(pbs.site.image)}) \
        == (0, "")


def test_job_without_an_image_gets_a_cgroup_and_accounting_on_the_host(pbs: PbsSite) -> None:
    res = OpenPbs([pbs.host], pbs.tmpdir).run(
        job(pbs, 2, "id -u; grep -c '{parent}/{job}' /proc/self/cgroup; "
            "test -e /etc/os-release && head -n 1 /etc/os-release"))
    assert (res.action, res.exit_status) == ("ran", 0), res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == str(UID) and int(lines[1]) >= 1
    assert "pbs_chroot demo image" not in res.stdout
    [a] = pbs.site.accounting_lines()
    assert a["image"] is None and a["job_id"] == "2.vm"
    pbs.assert_clean()


def test_a_users_fault_on_the_node_deletes_the_job_with_the_reason(pbs: PbsSite) -> None:
    """Accepted at qsub, refused on the node (the image's users changed): deleted, with the
    line in the job's comment; never rerun."""
    pbs.configure(images=f"users = {USER}2\n")
    res = OpenPbs([pbs.host], pbs.tmpdir).run(job(pbs, 3, "echo ran", pbs.site.image))
    assert res.action == "deleted"
    assert res.comment.startswith(f"pbs-chroot: can't use image {pbs.site.image}: ")
    assert "allowed: none" in res.comment or "allowed:" in res.comment
    assert pbs.host.offline is None
    assert pbs.site.accounting_lines() == []
    pbs.assert_clean()


def test_a_broken_config_offlines_the_node_and_requeues_the_job(pbs: PbsSite,
                                                                syslog: Syslog) -> None:
    os.chmod(pbs.site.config, 0o666)
    res = OpenPbs([pbs.host], pbs.tmpdir).run(job(pbs, 4, "echo ran", pbs.site.image))
    assert res.action == "requeued"  # back in the queue, run once: not lost, no storm
    assert pbs.host.offline == "pbs-chroot: execjob_begin of job 4.vm failed, see syslog"
    assert any("writable by" in line or "config" in line for line in syslog.lines())


def test_a_site_fault_at_launch_requeues_and_offlines(pbs: PbsSite) -> None:
    """The job's record gone between begin and launch (a node fault): the launch hook does
    not start it outside its image; it offlines the node and the job is requeued."""
    j = job(pbs, 5, "echo ran", pbs.site.image)
    emu = OpenPbs([pbs.host], pbs.tmpdir)
    begin = pbs.host.hook("execjob_begin", {"job": mom_job(j, pbs.host, "execjob_begin")})
    assert begin["accepted"], begin
    os.rename(pbs.site.state / "jobs" / "5.vm.json", pbs.site.base / "hidden.json")
    try:
        status = emu._run_job(j, pbs.host, JobResult("ran", None), 30)
    finally:
        os.rename(pbs.site.base / "hidden.json", pbs.site.state / "jobs" / "5.vm.json")
        for event in ("execjob_epilogue", "execjob_end"):
            pbs.host.hook(event, {"job": mom_job(j, pbs.host, event)})
    assert status == -16  # JOB_EXEC_FAILHOOK_RERUN: requeued
    assert pbs.host.offline == "pbs-chroot: execjob_launch of job 5.vm failed, see syslog"
    pbs.assert_clean()


def test_two_hosts_tm_tasks_run_in_the_image_in_each_hosts_job_cgroup(
        pbs: PbsSite, syslog: Syslog, tmp_path: Path, image_root: Path,
        user_python: tuple) -> None:  # noqa: F811
    """A job on vm and vm2: execjob_begin on both, a TM task on each (start_process: the
    launch hook puts the shim first there too), accounting on both, nothing left."""
    from pbs_chroot import cgroups
    base2 = tmp_path / "vm2"
    base2.mkdir(mode=0o755)
    site2 = Site(base2, image_root)
    parent2 = f"{CG_PARENT}/node-vm2"
    layout = cgroups.detect()
    tops = [Path(t) for t in sorted(set(layout.v1.values()) if layout.version == 1
                                    else [str(layout.v2)])]
    for top in tops:
        (top / parent2).mkdir(parents=True, exist_ok=True)
    try:
        # The path users write is the same on every host; in vm2's mount namespace it names
        # vm2's own copy of the image.
        site2.image = pbs.site.image
        vm2 = PbsSite("vm2", site2, user_python, syslog.path, cg_parent=parent2,
                      binds=((base2 / "chroot", pbs.site.base / "chroot"),))
        task = ["/bin/sh", "-c", "head -n 1 /etc/os-release; grep NoNewPrivs /proc/self/status;"
                " grep -c {parent}/{job} /proc/self/cgroup; echo task=$PBS_TASKNUM"]
        j = job(pbs, 6, "echo top", pbs.site.image)
        j.hosts = ["vm", "vm2"]
        j.tasks = [("vm", [a.format(parent=pbs.cg_parent, job="6.vm") for a in task]),
                   ("vm2", [a.format(parent=parent2, job="6.vm") for a in task])]
        res = OpenPbs([pbs.host, vm2.host], pbs.tmpdir).run(j)
        assert (res.action, res.exit_status) == ("ran", 0), (res.stderr, res.hooks)
        assert [(h, code) for h, code, _ in res.tasks] == [("vm", 0), ("vm2", 0)], res.tasks
        for _, _, out in res.tasks:
            lines = out.splitlines()
            assert "pbs_chroot demo image" in lines[0], out
            assert lines[1] == "NoNewPrivs:\t1" and int(lines[2]) >= 1
        [ms] = pbs.site.accounting_lines()
        [sister] = site2.accounting_lines()
        assert ms["nodes"] == ["vm", "vm2"] and ms["node"] == "vm"
        assert sister["sister"] is True and sister["node"] == "vm2"
        pbs.assert_clean()
        vm2.assert_clean()
        assert not any(str(site2.version) in m for m in vm2.host.mount_points())
    finally:
        if "vm2" in locals():
            vm2.host.close()
        for top in tops:
            d = top / parent2
            if d.is_dir() and not any(p.is_dir() for p in d.iterdir()):
                d.rmdir()
    assert cgroup_children() == []


def test_the_periodic_hook_finishes_a_job_the_node_lost(pbs: PbsSite) -> None:
    """A job whose execjob_end never came (pbs_mom died): exechost_periodic's reconciler
    kills, accounts and undoes it once the job is no longer in mom_priv/jobs."""
    j = job(pbs, 7, "", pbs.site.image)
    out = pbs.host.hook("execjob_begin", {"job": mom_job(j, pbs.host, "execjob_begin")})
    assert out["accepted"], out
    assert os.listdir(pbs.site.state / "jobs") == ["7.vm.json"]
    # Still held by the mom (job_list), though no file of it is in mom_priv/jobs: left alone.
    out = pbs.host.periodic(job_list=("7.vm",))
    assert out["accepted"] and not out["error"], out
    assert os.listdir(pbs.site.state / "jobs") == ["7.vm.json"]
    assert pbs.site.accounting_lines() == []
    out = pbs.host.periodic()
    assert out["accepted"] and not out["error"], out
    [a] = pbs.site.accounting_lines()
    assert a["job_id"] == "7.vm" and a.get("recovered") is True
    pbs.assert_clean()


def test_pbs_attach_moves_only_the_owners_process_into_the_job_cgroup(pbs: PbsSite) -> None:
    """execjob_attach: pbs_attach's process joins the job's cgroup (its limits, accounting and
    final kill); another user's process is refused."""
    import subprocess
    j = job(pbs, 8, "", pbs.site.image)
    assert pbs.host.hook("execjob_begin", {"job": mom_job(j, pbs.host, "execjob_begin")}
                         )["accepted"]
    mine = subprocess.Popen(["sleep", "60"], user=UID, group=UID)
    other = subprocess.Popen(["sleep", "60"], user=OTHER_UID, group=OTHER_UID)
    try:
        ok = pbs.host.hook("execjob_attach", {"job": mom_job(j, pbs.host, "execjob_attach"),
                                              "pid": mine.pid})
        no = pbs.host.hook("execjob_attach", {"job": mom_job(j, pbs.host, "execjob_attach"),
                                              "pid": other.pid})
        assert ok["accepted"] and not ok["error"], ok
        assert f"/{CG_PARENT}/8.vm" in Path(f"/proc/{mine.pid}/cgroup").read_text()
        assert not no["accepted"] and "is not the job owner's" in no["reject_msg"]
        assert f"/{CG_PARENT}/8.vm" not in Path(f"/proc/{other.pid}/cgroup").read_text()
        assert not no["job"].get("_delete")  # the job itself goes on
        other.kill()
        other.wait()
        out = pbs.host.hook("execjob_end", {"job": mom_job(j, pbs.host, "execjob_end")})
        assert out["accepted"], out
        assert mine.wait(10) == -9  # killed with the job
    finally:
        for p in (mine, other):
            if p.poll() is None:
                p.kill()
                p.wait()
    pbs.assert_clean()


def test_the_hooks_load_no_heavy_module(pbs: PbsSite) -> None:
    from tests.conftest import SUMMARY
    from tests.unit.test_hook_path import FORBIDDEN
    # A second job of the image, while a first holds its stage: the warm path.
    holder = pbs.host.hook("execjob_begin", {"job": mom_job(job(pbs, 90, "", pbs.site.image),
                                                            pbs.host, "execjob_begin")})
    assert holder["accepted"], holder
    res = OpenPbs([pbs.host], pbs.tmpdir).run(job(pbs, 9, "true", pbs.site.image))
    pbs.host.hook("execjob_end", {"job": mom_job(job(pbs, 90, "", pbs.site.image), pbs.host,
                                                 "execjob_end")})
    assert res.action == "ran", res.stderr
    loaded = {event: set(out["modules"]) for _, event, out in res.hooks}
    for event, modules in loaded.items():
        assert not modules & FORBIDDEN, (event, sorted(modules & FORBIDDEN))
    assert "pbs_chroot.jobinfo" not in set().union(*loaded.values())  # no server query
    SUMMARY["OpenPBS hooks' imports, warm (the hook text's own time)"] = ", ".join(
        f"{e} {len([m for m in ms if m.startswith('pbs_chroot')])} of ours "
        f"({out['seconds'] * 1000:.0f} ms)"
        for (_, e, out), ms in zip(res.hooks, loaded.values()))
    pbs.assert_clean()


def test_the_emulator_gives_what_the_captures_show() -> None:
    """The attribute names and the launch environment the emulated mom gives a hook are the
    real mom's (fixtures/openpbs: execjob_*-4.pbsvm.json, OpenPBS 23.06.06)."""
    import json
    from tests.conftest import FIXTURES
    from tests.openpbsemu import job_env
    captures = FIXTURES.parent / "openpbs" / "capture"
    if not captures.is_dir():
        pytest.skip(f"OpenPBS captures missing: {captures}")
    j = PbsJob("4.pbsvm", USER, "", ["pbsvm"], {"mem": "100mb", "ncpus": "1"},
               mem="102400kb")
    for event in ("execjob_begin", "execjob_launch", "execjob_end"):
        real = json.loads((captures / f"{event}-4.pbsvm.json").read_text())
        attrs = real["job"]["all_attrs"]
        host = type("H", (), {"name": "pbsvm", "pbs_home": Path("/var/spool/pbs")})()
        ours = mom_job(j, host, event)  # type: ignore[arg-type]
        known = set(attrs) | {"id", "queue", "euser", "egroup", "exec_host"}  # (None there)
        assert set(ours) - {"Resource_List", "Variable_List"} <= known
        for key in ("exec_vnode", "Exit_status"):
            assert ours.get(key) == attrs.get(key, {}).get("str"), (event, key)
        assert ours["exec_host"] is None and real["job"]["Resource_List_str"] == \
            "mem=100mb,ncpus=1,place=free"
    real_env = json.loads((captures / "execjob_launch-4.pbsvm.json").read_text())["launch"]
    assert real_env["argv"] == [] and real_env["progname"] == "/bin/bash"
    ours_env = job_env(j, type("H", (), {"pbs_home": Path("/var/spool/pbs")})(),  # type: ignore
                       Path("/var/tmp"))
    assert set(ours_env) <= set(real_env["env"])
    assert {k for k in real_env["env"] if not k.startswith("PBS_O_")} - set(ours_env) == set()


def test_pbs_attach_of_a_gone_process_is_refused_and_the_node_stays(pbs: PbsSite) -> None:
    """pbs_attach -p PID is the user's choice: a pid that is gone is the user's problem,
    never a site fault that would offline the node (the outside review's finding 1)."""
    import subprocess
    j = job(pbs, 10, "", pbs.site.image)
    assert pbs.host.hook("execjob_begin", {"job": mom_job(j, pbs.host, "execjob_begin")}
                         )["accepted"]
    gone = subprocess.Popen(["true"], user=UID, group=UID)
    gone.wait()
    try:
        out = pbs.host.hook("execjob_attach", {"job": mom_job(j, pbs.host, "execjob_attach"),
                                               "pid": gone.pid})
        assert not out["accepted"] and "does not exist" in out["reject_msg"], out
        assert pbs.host.offline is None and not out["vnodes"]
    finally:
        pbs.host.hook("execjob_end", {"job": mom_job(j, pbs.host, "execjob_end")})
    pbs.assert_clean()


def test_a_host_without_the_launch_hook_or_a_usable_shim_never_begins_an_image_job(
        pbs: PbsSite) -> None:
    """Begun without a launch hook, the job would run on the host; with a shim users can't
    run, it would fail as the user on a node left online: both are site faults at begin."""
    launch = pbs.pbs_home / "mom_priv" / "hooks" / "pbs_chroot_launch.PY"
    launch.rename(launch.with_suffix(".away"))
    res = OpenPbs([pbs.host], pbs.tmpdir).run(job(pbs, 11, "echo ran", pbs.site.image))
    assert res.action == "requeued" and pbs.host.offline is not None
    launch.with_suffix(".away").rename(launch)
    pbs.host.offline = None
    shim = pbs.libexec / "pbs-chroot-shim"
    os.chmod(shim, 0o700)
    res = OpenPbs([pbs.host], pbs.tmpdir).run(job(pbs, 12, "echo ran", pbs.site.image))
    assert res.action == "requeued" and pbs.host.offline is not None
    os.chmod(shim, 0o755)
    # A job without an image needs neither.
    pbs.host.offline = None
    os.chmod(shim, 0o700)
    res = OpenPbs([pbs.host], pbs.tmpdir).run(job(pbs, 13, "echo ran"))
    assert (res.action, res.exit_status, res.stdout) == ("ran", 0, "ran\n")
    pbs.assert_clean()


def test_a_package_that_cant_be_imported_fails_closed_on_hosts_open_at_the_server(
        pbs: PbsSite, user_python: tuple) -> None:  # noqa: F811
    broken = pbs.site.base / "broken_hook.py"
    broken.write_text(openpbsinstall.render_hook(str(pbs.site.config),
                                                 str(pbs.libexec / "pbs-chroot-shim"),
                                                 str(pbs.site.base / "no-such-lib")))
    assert qsub(pbs.site.base, broken, USER, {"image": str(pbs.site.image)}) == (0, "")
    host = Host("vm", pbs.pbs_home, broken)
    j = job(pbs, 14, "echo ran", pbs.site.image)
    res = OpenPbs([host], pbs.tmpdir).run(j)
    assert res.action == "requeued" and host.offline and "import" in host.offline
    launch = host.hook("execjob_launch", {"job": mom_job(j, host, "execjob_launch"),
                                          "progname": "/bin/sh", "argv": [], "env": {}})
    assert not launch["accepted"] and launch["job"].get("_rerun") is True
    pbs.assert_clean()


def test_the_server_looks_up_no_group_and_leaves_routing_queues_to_the_node(
        pbs: PbsSite) -> None:
    pbs.configure(images="groups = nosuchgroup\nqueues = workq\n")
    hook = pbs.host.hook_file
    # Not in the image's users by name, groups unknown at the server: the host decides.
    assert qsub(pbs.site.base, hook, USER, {"image": str(pbs.site.image)}) == (0, "")
    res = OpenPbs([pbs.host], pbs.tmpdir).run(job(pbs, 15, "echo ran", pbs.site.image))
    assert res.action == "deleted" and f"not allowed for user {USER}" in res.comment
    # A routing queue: the execution queue is chosen later, so its rule waits for the host.
    assert qsub(pbs.site.base, hook, USER, {"image": str(pbs.site.image)}, queue="route",
                queue_types={"route": "Route"}) == (0, "")
    rc, err = qsub(pbs.site.base, hook, USER, {"image": str(pbs.site.image)}, queue="other")
    assert rc == 1 and "not allowed in queue other" in err
    pbs.assert_clean()


def test_a_wrong_pbs_home_makes_the_reconciler_finish_nothing(pbs: PbsSite) -> None:
    j = job(pbs, 16, "", pbs.site.image)
    assert pbs.host.hook("execjob_begin", {"job": mom_job(j, pbs.host, "execjob_begin")}
                         )["accepted"]
    jobs = pbs.pbs_home / "mom_priv" / "jobs"
    jobs.rename(jobs.with_name("jobs.away"))
    try:
        out = pbs.host.periodic()
        assert out["accepted"], out
        assert os.listdir(pbs.site.state / "jobs") == ["16.vm.json"]  # unsure: left alone
    finally:
        jobs.with_name("jobs.away").rename(jobs)
        pbs.host.hook("execjob_end", {"job": mom_job(j, pbs.host, "execjob_end")})
    pbs.assert_clean()
