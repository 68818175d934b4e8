"""Unit tests of the test infrastructure (tests/fakes.py, tests/momemu.py) against the
Torque 6.1 captures in shared/fixtures/torque-6.1. Run by pytest as any user."""
import json
import os
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests import fakes
from tests.captures import torque_file

TQUSER = fakes.Identity("tquser", 1002, 1002, "tquser", "/home/tquser", "/bin/bash")
RES_L = "nodes=1:ppn=2,mem=512mb,vmem=1gb,walltime=00:10:00,neednodes=1:ppn=2"
RES_SHORT = "nodes=1:ppn=2,walltime=00:05:00,neednodes=1:ppn=2"
HOME = "/var/spool/torque"
ENV = {"PATH": "/bin:/usr/bin"}

# The fixture jobs, as EmuJobs: (fixture file, job, cookie recorded in the capture).
JOB20 = fakes.EmuJob("20.vm", "tquser", "", [("PBS_O_ROOTDIR", "/chroot/sl5"),
                                             ("MYVAR", "a,b=")], "fixturejob",
                     resource_list=RES_L)
JOB23 = fakes.EmuJob("23.vm", "tquser", "", [("MYVAR", "a,b=")], "fixturejob_noroot",
                     resource_list=RES_L)
JOB25 = fakes.EmuJob("25.vm", "tquser", "", [("PBS_JOBID", "999.vm")], "override_jobid",
                     resource_list=RES_SHORT)
JOB29 = fakes.EmuJob("29.vm", "tquser", "", [("PBS_O_ROOTDIR", "/chroot/sl5"),
                                             ("PBS_O_ROOTDIR", "/b")], "dup_rootdir2",
                     resource_list=RES_SHORT)
JOB30 = fakes.EmuJob("30.vm", "tquser", "", [("XMLVAR", "<t>&amp;x&y\"q'z"),
                                             ("SPACEVAR", "a b=c")], "xmlchars",
                     resource_list=RES_SHORT)


def fixture(source: Path, name: str) -> Path:
    """A Torque 6.1 capture, or the project's sample of it (tests/captures.py)."""
    return torque_file(source, name)


def fixture_env(source: Path, name: str) -> list:
    return json.loads(fixture(source, name).read_text())["env_raw_order"]


def parse_variable_list(text: str) -> list:
    """A reader independent of fakes: backslash takes the next char, `,` ends an entry."""
    entries, current, chars = [], "", iter(text)
    for char in chars:
        if char == "\\":
            current += next(chars)
        elif char == ",":
            entries.append(current)
            current = ""
        else:
            current += char
    entries.append(current)
    return [tuple(entry.split("=", 1)) for entry in entries]


def variable_list_of(xml: bytes) -> str:
    return ET.fromstring(xml).find("Job/Variable_List").text


def test_variable_list_round_trips_through_escaped_comma_parse() -> None:
    nasty = [("PBS_O_ROOTDIR", "/chroot/sl5"), ("A", "x,y"), ("B", 'say "hi", it\'s'),
             ("C", "back\\slash\\,"), ("D", "two\nlines\ttab"), ("E", "<&>;=="),
             ("F", "ünï ✓"), ("EMPTY", ""), ("G,H", "name,comma")]
    job = fakes.EmuJob("101.vm", "tquser", "true", nasty)
    expected = fakes.server_variable_list(job, TQUSER, "vm")
    xml = fakes.qstat_xml(job, server="vm", ident=TQUSER)
    assert parse_variable_list(variable_list_of(xml)) == expected
    assert nasty == expected[7:7 + len(nasty)]


def test_variable_list_escaping_is_the_fixtures(torque_source: Path) -> None:
    for job, name in ((JOB20, "qstat_f_x.rootdir_v.20.vm.running.xml"),
                      (JOB30, "qstat_f_x.xml_special_chars.30.vm.running.xml")):
        ours = fakes.qstat_xml(job, server="vm", ident=TQUSER, session_id=1)
        raw = fixture(torque_source, name).read_bytes()
        start = raw.index(b"<Variable_List>")
        assert raw[start:raw.index(b"</Variable_List>") + 16] in ours


def test_qstat_xml_has_the_fixture_elements_in_order(torque_source: Path) -> None:
    ours = ET.fromstring(fakes.qstat_xml(JOB20, server="vm", ident=TQUSER, session_id=22984))
    theirs = ET.fromstring(
        fixture(torque_source, "qstat_f_x.rootdir_v.20.vm.running.xml").read_bytes())
    assert [e.tag for e in ours.find("Job")] == [e.tag for e in theirs.find("Job")]
    for tag in ("Job_Id", "Job_Name", "job_state", "euser", "egroup", "exec_host",
                "init_work_dir", "session_id", "substate"):
        assert ours.find(f"Job/{tag}").text == theirs.find(f"Job/{tag}").text, tag
    res = [(e.tag, e.text) for e in ours.find("Job/Resource_List")]
    assert res == [(e.tag, e.text) for e in theirs.find("Job/Resource_List")]


def test_qstat_xml_at_prologue_has_no_session_id(torque_source: Path) -> None:
    ours = ET.fromstring(fakes.qstat_xml(JOB20, ident=TQUSER))
    theirs = ET.fromstring(
        fixture(torque_source, "qstat_f_x.rootdirx_prefix.24.vm.at_prologue.xml").read_bytes())
    assert ours.find("Job/session_id") is None and theirs.find("Job/session_id") is None
    assert ours.find("Job/substate").text == theirs.find("Job/substate").text == "40"


def test_mom_jobfile_variable_list_is_the_fixtures(torque_source: Path) -> None:
    ours = fakes.mom_jobfile_xml(JOB30, TQUSER, server="vm", cookie="C0", substate=42)
    raw = fixture(torque_source, "mom_jobfile.xml_special_chars.30.vm.JB").read_bytes()
    theirs = raw.split(b'<Variable_List flags="1">')[1].split(b"</Variable_List>")[0]
    assert b"<Variable_List>" + theirs + b"</Variable_List>" in ours     # commas not escaped
    assert ET.fromstring(ours).find("substate").text == "42"


def test_values_torque_cannot_hold_or_xml_cannot_carry() -> None:
    with pytest.raises(ValueError, match="NUL"):
        fakes.qstat_xml(fakes.EmuJob("1.vm", "tquser", "", [("V", "a\0b")]), ident=TQUSER)
    with pytest.raises(ValueError):
        fakes.qstat_xml(fakes.EmuJob("1.vm", "tquser", "", [("A=B", "x")]), ident=TQUSER)
    raw = fakes.qstat_xml(fakes.EmuJob("1.vm", "tquser", "", [("V", "a\x01b")]), ident=TQUSER)
    assert b"V=a\x01b" in raw          # written raw, as Torque's escaper does
    with pytest.raises(ET.ParseError):
        ET.fromstring(raw)


def test_hook_environment_is_the_fixtures(torque_source: Path) -> None:
    varlist = fakes.server_variable_list(JOB23, TQUSER, "vm")
    env = fakes.hook_environment(JOB23, varlist, HOME, "vm")
    expected = fixture_env(torque_source, "env.prologue.23.vm.json")
    assert [f"{k}={v}" for k, v in env.items()] == expected
    assert expected == fixture_env(torque_source, "env.epilogue.23.vm.json")


def test_hook_environment_takes_some_user_variables() -> None:
    job = fakes.EmuJob("5.vm", "tquser", "", [("PBS_O_WORKDIRX", "/evil"),
                                              ("MOAB_JOBIDZ", "m"), ("PBS_SCHED_HINT", "h")])
    env = fakes.hook_environment(job, fakes.server_variable_list(job, TQUSER, "vm"), HOME, "vm")
    assert env["PBS_O_WORKDIR"] == "/evil"     # first PBS_O_WORKDIR* entry, as Torque
    assert env["MOAB_JOBID"] == "m" and env["PBS_SCHED_HINT"] == "h"


@pytest.mark.parametrize("job, name, cookie", [
    (JOB23, "env.job_starter.23.vm.json", "626C6D121E5881B384263FFA0A94FFA0"),
    (JOB20, "env.job_starter.chroot_rootdir_v.20.vm.json", "B28104AB976837BBB5850A02844C6384"),
    (JOB25, "env.job_starter.override_pbs_jobid.25.vm.json", "FF7B1FC1EB5F59871B59B727C070D642"),
    (JOB29, "env.job_starter.dup_rootdir_image_b.29.vm.json", "BC9EB3A0D64E1D9CEF80678D5D571966"),
])
def test_job_environment_is_the_fixtures(job: fakes.EmuJob, name: str, cookie: str,
                                         torque_source: Path) -> None:
    varlist = fakes.server_variable_list(job, TQUSER, "vm")
    env = fakes.job_environment(job, varlist, TQUSER, HOME, "vm", "/bin/bash", cookie)
    assert [f"{k}={v}" for k, v in env.items()] == fixture_env(torque_source, name)


def test_chroot_target_is_the_first_prefix_match() -> None:
    varlist = [("PBS_O_ROOTDIRX", "/tmp/evil"), ("PBS_O_ROOTDIR", "/chroot/sl5")]
    assert fakes.get_job_envvar(varlist, "PBS_O_ROOTDIR") == "/tmp/evil"
    assert fakes.get_job_envvar(fakes.server_variable_list(JOB29, TQUSER, "vm"),
                                "PBS_O_ROOTDIR") == "/chroot/sl5"
    assert fakes.get_job_envvar([("PBS_O_ROOT", "/x")], "PBS_O_ROOTDIR") is None


@pytest.mark.parametrize("nodes, counts", [
    ("1:ppn=2", (1, 2, 2)), ("1", (1, 1, 1)), ("2:ppn=4+3", (5, 4, 11)), ("node7", (0, 1, 1)),
])
def test_node_counts(nodes: str, counts: tuple) -> None:
    assert fakes.node_counts(nodes) == counts


def test_check_pelog(tmp_path: Path) -> None:
    hook = tmp_path / "prologue"
    assert fakes.check_pelog(str(hook)) == 0            # absent: pbs_mom runs the job
    fakes.install_hook(hook, "#!/bin/sh\n", 0o500)
    assert fakes.check_pelog(str(hook)) == (None if os.geteuid() == 0 else -1)
    for mode in (0o520, 0o502, 0o400, 0o100):
        os.chmod(hook, mode)
        assert fakes.check_pelog(str(hook)) == -1, oct(mode)
    assert fakes.check_pelog(str(tmp_path)) == -1         # not a regular file


@pytest.fixture
def fake_qstat(tmp_path: Path) -> tuple:
    jobs = tmp_path / "jobs"
    qstat = fakes.write_fake_qstat(tmp_path / "bin", jobs)
    (jobs / "7.vm.xml").write_bytes(fakes.qstat_xml(JOB20, ident=TQUSER))
    return qstat, jobs


def test_fake_qstat_prints_known_job(fake_qstat: tuple) -> None:
    qstat, jobs = fake_qstat
    assert os.stat(qstat).st_mode & 0o777 == 0o755
    res = subprocess.run([str(qstat), "-f", "-x", "7.vm"], env=ENV, capture_output=True)
    assert res.returncode == 0 and res.stderr == b""
    assert res.stdout == (jobs / "7.vm.xml").read_bytes()
    res = subprocess.run([str(qstat), "-fx", "7.vm"], env={}, capture_output=True)
    assert res.returncode == 0 and res.stdout.startswith(b'<?xml version="1.0"?>')
    assert fakes.read_qstat_calls(jobs) == [["-f", "-x", "7.vm"], ["-fx", "7.vm"]]


@pytest.mark.parametrize("job_id", ["8.vm", "../jobs/7.vm", ".hidden"])
def test_fake_qstat_unknown_job(fake_qstat: tuple, job_id: str) -> None:
    res = subprocess.run([str(fake_qstat[0]), "-f", "-x", job_id], env=ENV, capture_output=True)
    assert res.returncode == 153
    assert res.stdout == b"" and res.stderr == f"qstat: Unknown Job Id {job_id}\n".encode()


def test_fake_qstat_rejects_other_usage(fake_qstat: tuple) -> None:
    res = subprocess.run([str(fake_qstat[0]), "7.vm"], env=ENV, capture_output=True)
    assert res.returncode == 2 and res.stdout == b""


def test_fake_qstat_faults(fake_qstat: tuple) -> None:
    qstat, jobs = fake_qstat
    fakes.set_qstat_fault(jobs, "7.vm", delay=0.3)
    t0 = time.monotonic()
    res = subprocess.run([str(qstat), "-f", "-x", "7.vm"], env=ENV, capture_output=True)
    assert res.returncode == 0 and time.monotonic() - t0 >= 0.3
    fakes.set_qstat_fault(jobs, "7.vm", exit_code=170)
    res = subprocess.run([str(qstat), "-f", "-x", "7.vm"], env=ENV, capture_output=True)
    assert res.returncode == 170 and res.stdout == b""


def test_fake_pbsnodes_logs_argv(tmp_path: Path) -> None:
    log = tmp_path / "pbsnodes.log"
    pbsnodes = fakes.write_fake_pbsnodes(tmp_path / "bin", log)
    assert fakes.read_pbsnodes_calls(log) == []
    calls = [["-o", "node1", "-N", 'pbs-chroot: can\'t mount "x",\nbad\\'], ["-c", "node1"]]
    for argv in calls:
        res = subprocess.run([str(pbsnodes), *argv], env={}, capture_output=True)
        assert res.returncode == 0 and res.stdout == b"" and res.stderr == b""
    assert fakes.read_pbsnodes_calls(log) == calls
