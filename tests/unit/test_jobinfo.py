"""Unit tests for pbs_chroot.jobinfo: Variable_List parsing, qstat and pbs_python sources."""
import os
import signal
import sys
import time
import types
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from tests.captures import SAMPLES

from pbs_chroot.errors import JobInfoError, SiteError
from pbs_chroot.jobinfo import (
    JobVariables, lossy_names, parse_qstat_xml, parse_variable_list, read_variables,
)

HEAD = [
    ("PBS_O_QUEUE", "batch"), ("PBS_O_HOME", "/home/tquser"), ("PBS_O_LOGNAME", "tquser"),
    ("PBS_O_PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
    ("PBS_O_MAIL", "/var/mail/tquser"), ("PBS_O_SHELL", "/bin/bash"), ("PBS_O_LANG", "C.UTF-8"),
]
TAIL = [("PBS_O_WORKDIR", "/home/tquser"), ("PBS_O_HOST", "vm"), ("PBS_O_SERVER", "vm")]
ROOTDIR = ("PBS_O_ROOTDIR", "/chroot/sl5")

# Expected Variable_List of each qstat -f -x capture, unescaped.
EXPECTED = {
    "20.vm": HEAD + [ROOTDIR, ("MYVAR", "a,b=")] + TAIL,           # qstat: MYVAR=a\,b=
    "21.vm": HEAD + [ROOTDIR, ("MYVAR", "a"), ("b", "")] + TAIL,   # unquoted: two variables
    "22.vm": HEAD + [ROOTDIR] + TAIL,                              # qsub -D
    "23.vm": HEAD + [("MYVAR", "a,b=")] + TAIL,
    "24.vm": HEAD + [("PBS_O_ROOTDIRX", "/tmp/evil")] + TAIL,
    "30.vm": HEAD + [("XMLVAR", "<t>&amp;x&y\"q'z"), ("SPACEVAR", "a b=c")] + TAIL,
}

QSTAT_ENV = {"PATH": "/bin:/usr/bin", "LC_ALL": "C"}


def fixture_dir(source: Path) -> Path:
    """The Torque 6.1 captures or the project's samples of them (tests/captures.py)."""
    return source


def fixture_xml(source: Path, job_id: str) -> Path:
    (match,) = source.glob(f"qstat_f_x.*.{job_id}.*.xml")
    return match


def fixture_raw(source: Path, job_id: str) -> str:
    """The Variable_List text of a capture, read without the module under test."""
    root = ET.parse(str(fixture_xml(source, job_id))).getroot()
    text = root.find("Job/Variable_List").text  # type: ignore[union-attr]
    assert text
    return text


def xml_doc(job_id: str, body: str) -> bytes:
    return (f'<?xml version="1.0"?>\n<Data><Job><Job_Id>{job_id}</Job_Id>{body}'
            "</Job></Data>").encode()


# --- parse_variable_list / lossy_names ----------------------------------------

@pytest.mark.parametrize("job_id", sorted(EXPECTED))
def test_parse_every_fixture(job_id: str, torque_source: Path) -> None:
    result = parse_qstat_xml(fixture_xml(torque_source, job_id).read_bytes(), job_id)
    assert isinstance(result, JobVariables)
    assert list(result.entries) == EXPECTED[job_id]
    assert result.raw == fixture_raw(torque_source, job_id)


def test_all_fixtures_are_covered(torque_source: Path) -> None:
    found = {p.name.split(".")[2] + ".vm"
             for p in fixture_dir(torque_source).glob("qstat_f_x.*.xml")}
    assert found == set(EXPECTED)


def test_rootdir_same_position_for_v_and_D(torque_source: Path) -> None:
    v = parse_qstat_xml(fixture_xml(torque_source, "20.vm").read_bytes(), "20.vm").entries
    d = parse_qstat_xml(fixture_xml(torque_source, "22.vm").read_bytes(), "22.vm").entries
    assert v.index(ROOTDIR) == d.index(ROOTDIR) == len(HEAD)


def test_raw_keeps_escapes(torque_source: Path) -> None:
    raw = parse_qstat_xml(fixture_xml(torque_source, "30.vm").read_bytes(), "30.vm").raw
    assert "XMLVAR=<t>&amp;x&y\\\"q\\'z,SPACEVAR=a b=c" in raw


def test_lossy_names_job20(torque_source: Path) -> None:
    raw = fixture_raw(torque_source, "20.vm")
    parsed = [name for name, _ in parse_variable_list(raw)]
    lossy = lossy_names(raw)
    assert "b" in lossy and "b" not in parsed
    assert set(lossy) - set(parsed) == {"b"}
    # job 21's text, typed unquoted, is what mom's .JB shows for job 20: same lossy view.
    assert lossy == lossy_names(fixture_raw(torque_source, "21.vm"))


def test_lossy_names_hidden_rootdir() -> None:
    raw = "FOO=x\\,PBS_O_ROOTDIR=/tmp/x"
    assert parse_variable_list(raw) == (("FOO", "x,PBS_O_ROOTDIR=/tmp/x"),)
    assert lossy_names(raw) == ("FOO", "PBS_O_ROOTDIR")


def test_lossy_names_unescapes_like_the_jb() -> None:
    assert lossy_names('A=1,,B\\"=2,C') == ("A", 'B"', "C")


@pytest.mark.parametrize("text, expected", [
    ("", ()),
    ("A=1,,B=2,", (("A", "1"), ("B", "2"))),
    ("A", (("A", ""),)),
    ("A=", (("A", ""),)),
    ("A=x=y", (("A", "x=y"),)),
    ("A=1,A=2", (("A", "1"), ("A", "2"))),
    ("A=a\\,b", (("A", "a,b"),)),
    ("A=\\\"q\\'", (("A", "\"q'"),)),
    ("A=c:\\\\,B=2", (("A", "c:\\"), ("B", "2"))),
    ("A=x\\\\\\,y", (("A", "x\\,y"),)),
    ("A=end\\", (("A", "end\\"),)),
    ("PBS_O_ROOTDI\\R=/x", (("PBS_O_ROOTDIR", "/x"),)),
    ("=v", (("", "v"),)),
])
def test_parse_variable_list_rules(text: str, expected: Any) -> None:
    assert parse_variable_list(text) == expected


# --- parse_qstat_xml failures and hostile input --------------------------------

@pytest.mark.parametrize("data", [
    b"",
    b"not xml",
    b"<Data><Job><Job_Id>20.vm</Job_Id><Variable_List>A=1",
    b'<?xml version="1.0"?>\n<Data><Job><Job_Id>20.vm</Job_Id><Variable_List>A=1</Variable_Li',
])
def test_malformed_or_truncated_xml(data: bytes) -> None:
    with pytest.raises(JobInfoError, match="malformed or truncated"):
        parse_qstat_xml(data, "20.vm")


def test_truncated_fixture(torque_source: Path) -> None:
    data = fixture_xml(torque_source, "20.vm").read_bytes()
    with pytest.raises(JobInfoError):
        parse_qstat_xml(data[: len(data) // 2], "20.vm")


def test_wrong_job_id(torque_source: Path) -> None:
    data = fixture_xml(torque_source, "20.vm").read_bytes()
    with pytest.raises(JobInfoError, match=r"found 0 .*20\.vm") as info:
        parse_qstat_xml(data, "2.vm")
    assert isinstance(info.value, SiteError)
    assert info.value.job_id == "2.vm"
    assert "/chroot" not in info.value.user_msg


def test_duplicate_job_refused() -> None:
    job = "<Job><Job_Id>7.vm</Job_Id><Variable_List>A=1</Variable_List></Job>"
    with pytest.raises(JobInfoError, match="found 2"):
        parse_qstat_xml(f"<Data>{job}{job}</Data>".encode(), "7.vm")


def test_other_jobs_ignored() -> None:
    other = "<Job><Job_Id>8.vm</Job_Id><Variable_List>B=2</Variable_List></Job>"
    mine = "<Job><Job_Id>7.vm</Job_Id><Variable_List>A=1</Variable_List></Job>"
    assert parse_qstat_xml(f"<Data>{other}{mine}</Data>".encode(), "7.vm").entries == \
        (("A", "1"),)


@pytest.mark.parametrize("body, match", [
    ("<euser>tquser</euser>", "found 0"),
    ("<Variable_List>A=1</Variable_List><Variable_List>B=2</Variable_List>", "found 2"),
    ("<Variable_List>A=1<x/></Variable_List>", "child elements"),
])
def test_variable_list_shape(body: str, match: str) -> None:
    with pytest.raises(JobInfoError, match=match):
        parse_qstat_xml(xml_doc("7.vm", body), "7.vm")


def test_empty_variable_list_is_fine() -> None:
    result = parse_qstat_xml(xml_doc("7.vm", "<Variable_List></Variable_List>"), "7.vm")
    assert result == JobVariables(entries=(), raw="")


def test_wrong_root_refused() -> None:
    with pytest.raises(JobInfoError, match="<Jobs>"):
        parse_qstat_xml(b"<Jobs><Job><Job_Id>7.vm</Job_Id></Job></Jobs>", "7.vm")


def test_doctype_refused() -> None:
    data = (b'<?xml version="1.0"?><!DOCTYPE Data [<!ENTITY e "PBS_O_ROOTDIR=/x">]>'
            b"<Data><Job><Job_Id>7.vm</Job_Id><Variable_List>&e;</Variable_List></Job></Data>")
    with pytest.raises(JobInfoError, match="DOCTYPE"):
        parse_qstat_xml(data, "7.vm")


def test_control_chars_and_non_utf8_do_not_fail() -> None:
    # A user can put any byte in a -v value; that must not make the XML unreadable.
    body = "<Variable_List>A=x\x01y,B=\xff,PBS_O_ROOTDIR=/chroot/sl5</Variable_List>"
    data = xml_doc("7.vm", "").replace(b"</Job>", body.encode("latin-1") + b"</Job>")
    result = parse_qstat_xml(data, "7.vm")
    assert result.entries == (("A", "x\ufffdy"), ("B", "\xff"), ROOTDIR)


# --- read_variables: qstat source ------------------------------------------------

def write_script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def fake_qstat_cat(tmp_path: Path, job_id: str) -> str:
    """A qstat that checks its argv and environment, then prints a capture."""
    env_check = " && ".join(f'[ "${k}" = "{v}" ]' for k, v in QSTAT_ENV.items())
    return write_script(tmp_path, "qstat", (
        f'[ "$#" = 3 ] && [ "$1" = -f ] && [ "$2" = -x ] && [ "$3" = "{job_id}" ] || exit 3\n'
        f"{env_check} || exit 4\n"
        f"[ -z \"$HOME\" ] || exit 5\n"
        f"exec cat '{fixture_xml(SAMPLES, job_id)}'\n"))  # (qstat mechanics: one source)


def test_qstat_success(tmp_path: Path) -> None:
    qstat = fake_qstat_cat(tmp_path, "20.vm")
    result = read_variables("20.vm", source="qstat", qstat=qstat, timeout=5)
    assert list(result.entries) == EXPECTED["20.vm"]


def test_qstat_nonzero_exit(tmp_path: Path) -> None:
    qstat = write_script(tmp_path, "qstat",
                         "echo 'qstat: Unknown Job Id Error 20.vm' >&2\necho more >&2\nexit 1\n")
    with pytest.raises(JobInfoError) as info:
        read_variables("20.vm", source="qstat", qstat=qstat, timeout=5)
    detail = info.value.detail
    assert "exited with status 1" in detail and "Unknown Job Id Error 20.vm" in detail
    assert qstat in detail and "more" not in detail


def test_qstat_garbage_output(tmp_path: Path) -> None:
    qstat = write_script(tmp_path, "qstat", "echo 'Job Id: 20.vm'\n")
    with pytest.raises(JobInfoError, match="malformed"):
        read_variables("20.vm", source="qstat", qstat=qstat, timeout=5)


def test_qstat_answers_for_another_job(tmp_path: Path, torque_source: Path) -> None:
    qstat = write_script(tmp_path, "qstat", f"cat '{fixture_xml(torque_source, '22.vm')}'\n")
    with pytest.raises(JobInfoError, match="found 0"):
        read_variables("20.vm", source="qstat", qstat=qstat, timeout=5)


def proc_is_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_qstat_timeout_kills_it(tmp_path: Path) -> None:
    pidfile = tmp_path / "sleep.pid"
    qstat = write_script(tmp_path, "qstat", f"sleep 10 &\necho $! > '{pidfile}'\nwait\n")
    start = time.monotonic()
    with pytest.raises(JobInfoError, match=r"timed out after 0\.5 s"):
        read_variables("20.vm", source="qstat", qstat=qstat, timeout=0.5)
    assert time.monotonic() - start < 2.0
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 2
    while not proc_is_gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc_is_gone(grandchild)


def test_qstat_missing_binary(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-qstat")
    with pytest.raises(JobInfoError, match="can't run .*no-such-qstat.*errno 2"):
        read_variables("20.vm", source="qstat", qstat=missing, timeout=5)


def test_qstat_not_executable(tmp_path: Path) -> None:
    path = tmp_path / "qstat"
    path.write_text("#!/bin/sh\n")
    path.chmod(0o644)
    with pytest.raises(JobInfoError, match="can't run"):
        read_variables("20.vm", source="qstat", qstat=str(path), timeout=5)


@pytest.mark.parametrize("rel", ["qstat", "./qstat", "bin/qstat"])
def test_qstat_relative_path_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     rel: str) -> None:
    marker = tmp_path / "ran"
    write_script(tmp_path, "qstat", f"touch '{marker}'\n")
    (tmp_path / "bin").mkdir()
    write_script(tmp_path / "bin", "qstat", f"touch '{marker}'\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(JobInfoError, match="not absolute"):
        read_variables("20.vm", source="qstat", qstat=rel, timeout=5)
    assert not marker.exists()


@pytest.mark.parametrize("job_id", ["", "-f", "20.vm\n", "a b", "20.vm\0"])
def test_bad_job_id_refused(tmp_path: Path, job_id: str) -> None:
    qstat = write_script(tmp_path, "qstat", "exit 0\n")
    with pytest.raises(JobInfoError, match="refusing job id"):
        read_variables(job_id, source="qstat", qstat=qstat, timeout=5)


@pytest.mark.parametrize("timeout", [0, -1, float("nan")])
def test_bad_timeout_refused(tmp_path: Path, timeout: float) -> None:
    qstat = fake_qstat_cat(tmp_path, "20.vm")
    with pytest.raises(JobInfoError, match="timeout"):
        read_variables("20.vm", source="qstat", qstat=qstat, timeout=timeout)


def test_unknown_source_refused(tmp_path: Path) -> None:
    qstat = fake_qstat_cat(tmp_path, "20.vm")
    with pytest.raises(JobInfoError, match="unknown job info source 'pbs'"):
        read_variables("20.vm", source="pbs", qstat=qstat, timeout=5)


# --- read_variables: pbs_python source ---------------------------------------------

class FakeAttrl:
    """pbs_python's attrl: name, resource, value."""

    def __init__(self, name: Optional[str] = None, value: Optional[str] = None) -> None:
        self.name = name
        self.resource: Optional[str] = None
        self.value = value


class FakeBatchStatus:
    """pbs_python's batch_status: the job id and its attributes."""

    def __init__(self, name: str, attribs: list[FakeAttrl]) -> None:
        self.name = name
        self.attribs = attribs
        self.text: Optional[str] = None


StatJob = Callable[[int, str, Any, Any], Any]


def make_fake_pbs(raw: str, *, connect_rc: int = 3,
                  statjob: Optional[StatJob] = None) -> types.ModuleType:
    """A `pbs` module with the real API surface, serving one job's Variable_List."""
    mod = types.ModuleType("pbs")
    mod.ATTR_v = "Variable_List"  # type: ignore[attr-defined]

    def real_statjob(conn: int, job_id: str, attrl: Any, extend: Any) -> Any:
        # As the server does: only the attributes asked for (the Variable_List first).
        names = [a.name for a in attrl]
        if conn != connect_rc or names[:1] != ["Variable_List"]:
            return []
        known = {"Variable_List": raw, "Error_Path": "vm:/home/tquser/job.e20",
                 "Shell_Path_List": "/bin/sh"}
        return [FakeBatchStatus(job_id, [FakeAttrl("euser", "tquser")]
                                + [FakeAttrl(n, known[n]) for n in names if n in known])]

    mod.pbs_default = lambda: "vm"  # type: ignore[attr-defined]
    mod.pbs_connect = lambda server: connect_rc if server == "vm" else -1  # type: ignore
    mod.error = lambda: (15001, "Unknown Job Id")  # type: ignore[attr-defined]
    mod.new_attrl = lambda n: [FakeAttrl() for _ in range(n)]  # type: ignore[attr-defined]
    mod.pbs_statjob = statjob or real_statjob  # type: ignore[attr-defined]
    mod.pbs_disconnect = lambda conn: 0  # type: ignore[attr-defined]
    return mod


@pytest.fixture
def install_pbs(monkeypatch: pytest.MonkeyPatch) -> Callable[..., types.ModuleType]:
    def install(raw: str, **kwargs: Any) -> types.ModuleType:
        mod = make_fake_pbs(raw, **kwargs)
        monkeypatch.setitem(sys.modules, "pbs", mod)
        return mod
    return install


def assert_no_child_left() -> None:
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def test_pbs_python_success(install_pbs: Callable[..., Any], torque_source: Path) -> None:
    raw = fixture_raw(torque_source, "20.vm")
    install_pbs(raw)
    result = read_variables("20.vm", source="pbs_python", qstat="/nonexistent", timeout=5)
    assert result.raw == raw
    assert list(result.entries) == EXPECTED["20.vm"]
    # The attributes the prologue speaks to the user with, as the server gave them.
    assert (result.error_path, result.shell, result.output_path, result.join) == \
        ("vm:/home/tquser/job.e20", "/bin/sh", "", "")
    assert_no_child_left()


def test_pbs_python_connect_fails(install_pbs: Callable[..., Any], torque_source: Path) -> None:
    install_pbs(fixture_raw(torque_source, "20.vm"), connect_rc=-1)
    with pytest.raises(JobInfoError, match=r"pbs_connect\('vm'\) failed: errno 15001"):
        read_variables("20.vm", source="pbs_python", qstat="/nonexistent", timeout=5)
    assert_no_child_left()


def test_pbs_python_statjob_empty(install_pbs: Callable[..., Any]) -> None:
    install_pbs("", statjob=lambda conn, job_id, attrl, extend: [])
    with pytest.raises(JobInfoError, match="returned 0 matching jobs.*Unknown Job Id"):
        read_variables("20.vm", source="pbs_python", qstat="/nonexistent", timeout=5)


def test_pbs_python_statjob_without_variable_list(install_pbs: Callable[..., Any]) -> None:
    install_pbs("", statjob=lambda conn, job_id, attrl, extend:
                [FakeBatchStatus(job_id, [FakeAttrl("euser", "tquser")])])
    with pytest.raises(JobInfoError, match="expected one Variable_List attribute, got 0"):
        read_variables("20.vm", source="pbs_python", qstat="/nonexistent", timeout=5)


def test_pbs_python_statjob_hangs(install_pbs: Callable[..., Any]) -> None:
    install_pbs("", statjob=lambda conn, job_id, attrl, extend: time.sleep(30))
    start = time.monotonic()
    with pytest.raises(JobInfoError, match="timed out"):
        read_variables("20.vm", source="pbs_python", qstat="/nonexistent", timeout=0.5)
    assert time.monotonic() - start < 1.5
    assert_no_child_left()


def test_pbs_python_statjob_raises(install_pbs: Callable[..., Any]) -> None:
    def boom(conn: int, job_id: str, attrl: Any, extend: Any) -> Any:
        raise RuntimeError("libtorque exploded")
    install_pbs("", statjob=boom)
    with pytest.raises(JobInfoError, match="RuntimeError: libtorque exploded"):
        read_variables("20.vm", source="pbs_python", qstat="/nonexistent", timeout=5)


def test_pbs_python_child_crashes(install_pbs: Callable[..., Any]) -> None:
    install_pbs("", statjob=lambda conn, job_id, attrl, extend:
                os.kill(os.getpid(), signal.SIGKILL))
    with pytest.raises(JobInfoError, match="killed by signal 9"):
        read_variables("20.vm", source="pbs_python", qstat="/nonexistent", timeout=5)


def test_pbs_python_not_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pbs", None)
    with pytest.raises(JobInfoError, match="can't import pbs"):
        read_variables("20.vm", source="pbs_python", qstat="/nonexistent", timeout=5)


def test_auto_prefers_pbs_python(install_pbs: Callable[..., Any]) -> None:
    install_pbs("FROM_PBS=1")
    result = read_variables("20.vm", source="auto", qstat="/nonexistent/qstat", timeout=5)
    assert result.entries == (("FROM_PBS", "1"),)


def test_auto_falls_back_to_qstat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pbs", None)
    qstat = fake_qstat_cat(tmp_path, "24.vm")
    result = read_variables("24.vm", source="auto", qstat=qstat, timeout=5)
    assert list(result.entries) == EXPECTED["24.vm"]


# --- the expat reader sees what xml.etree saw (jobinfo no longer imports it) ------------------

def etree_view(data: bytes, job_id: str) -> Any:
    """parse_qstat_xml as it was, on xml.etree.ElementTree: (raw) or the error's kind."""
    from pbs_chroot import jobinfo
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        return "refused"
    try:
        root = ET.fromstring(jobinfo._decode_xml(data))
    except ET.ParseError:
        return "malformed"
    if root.tag != "Data":
        return f"root {root.tag}"
    mine = [j for j in root.findall("Job") if j.findtext("Job_Id") == job_id]
    if len(mine) != 1:
        return f"found {len(mine)}"
    varlists = mine[0].findall("Variable_List")
    if len(varlists) != 1:
        return f"lists {len(varlists)}"
    if len(varlists[0]):
        return "children"
    return varlists[0].text or ""


def expat_view(data: bytes, job_id: str) -> Any:
    """parse_qstat_xml now, in etree_view's terms."""
    import re
    try:
        return parse_qstat_xml(data, job_id).raw
    except JobInfoError as e:
        for pattern, kind in ((r"DOCTYPE", "refused"), (r"malformed", "malformed"),
                              (r"root element is <([^>]*)>", "root {}"),
                              (r"with that Job_Id, found (\d+)", "found {}"),
                              (r"<Variable_List>, found (\d+)", "lists {}"),
                              (r"has child elements", "children")):
            m = re.search(pattern, e.detail)
            if m:
                return kind.format(*m.groups())
        raise


@pytest.mark.parametrize("doc", [
    "<Data><Job><Job_Id>7.vm</Job_Id><Variable_List>A=1<!-- c -->,B=2</Variable_List>"
    "</Job></Data>",
    "<Data><Job><Job_Id>7.vm</Job_Id><Variable_List><![CDATA[A=<x>&]]>,B</Variable_List>"
    "</Job></Data>",
    "<Data><Job><Job_Id>7.vm</Job_Id><Variable_List>A=&amp;&#x41;&#66;&lt;&gt;&quot;&apos;"
    "</Variable_List></Job></Data>",
    "<Data><Job><Job_Id>7.vm</Job_Id><Variable_List>A=&bogus;</Variable_List></Job></Data>",
    "<Data xmlns='urn:x'><Job><Job_Id>7.vm</Job_Id><Variable_List>A</Variable_List></Job></Data>",
    "<d:Data xmlns:d='urn:x'><Job><Job_Id>7.vm</Job_Id></Job></d:Data>",
    "<x:Data><Job/></x:Data>",
    "<Data>\n <Job>\n  <Job_Id>7.vm</Job_Id>\n  <Variable_List>A=1</Variable_List>\n </Job>\n"
    "</Data>\n",
    "<Data><Job><Job_Id>7.<b/>vm</Job_Id><Variable_List>A</Variable_List></Job></Data>",
    "<Data><Job><Job_Id>7<?pi x?>.vm</Job_Id><Variable_List>A<?pi?>B</Variable_List>"
    "</Job></Data>",
    "<Data><Job><Job_Id>7.vm</Job_Id><Variable_List/></Job></Data>",
    "<Data><Job><Job_Id>7.vm</Job_Id><Variable_List>A<x/>tail</Variable_List></Job></Data>",
    "<Data><Job><Job_Id>7.vm</Job_Id><Variable_List a='1'>A</Variable_List></Job></Data>x",
    "<Data><Job><Job_Id>7.vm</Job_Id><Job_Id>8.vm</Job_Id><Variable_List>A</Variable_List>"
    "</Job></Data>",
    "<Data><Job><Job_Id></Job_Id></Job><Job><Job_Id>7.vm</Job_Id><Variable_List>V</Variable_List>"
    "</Job></Data>",
    '<?xml version="1.0" encoding="ISO-8859-1"?><Data><Job><Job_Id>7.vm</Job_Id>'
    "<Variable_List>A=\u00e9</Variable_List></Job></Data>",
    "<Data><Job><Job_Id>7.vm</Job_Id><Variable_List>A=\x01\udcff</Variable_List></Job></Data>",
    "<Data></Data><Data/>", "<Data>", "", "  ", "<Jobs/>",
])
def test_expat_reader_agrees_with_etree(doc: str) -> None:
    data = doc.encode("utf-8", "surrogateescape")
    assert expat_view(data, "7.vm") == etree_view(data, "7.vm")
