"""The submit filter: what qsub asks for (argv + #PBS lines), the gate's verdict, the
script passed through byte for byte. Checked against the real qsub captures (and the
project's samples of them)."""
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pbs_chroot import config, qsubopts, submitfilter
from pbs_chroot.jobinfo import parse_qstat_xml
from tests.captures import torque_file
from tests.conftest import REPO

CONF = """[pbs_chroot]
state_dir = /nonexistent/state
[image /chroot/sl5]
[image /chroot/el7]
users = alice
[image /chroot/q]
queues = long
"""


def call(source: Path, n: int) -> dict:
    return json.loads(torque_file(source, f"submitfilter/call{n}.json").read_text())


@pytest.fixture
def cfg_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A config path the filter reads with config.parse (no ownership check: any user)."""
    path = tmp_path / "pbs_chroot.conf"
    path.write_text(CONF)
    monkeypatch.setattr(config, "load", lambda p: config.parse(Path(p).read_text(), p))
    return str(path)


def test_call1_predicts_the_servers_rootdir_entries(torque_source: Path) -> None:
    """-D and -v on the command line, #PBS -v in the script: the command line's -v
    replaces the script's; the server then held exactly these PBS_O_ROOTDIR entries."""
    c = call(torque_source, 1)
    req = qsubopts.parse(c["argv"][1:], c["stdin"].encode(), c["env"])
    ours = [e for e in qsubopts.variable_list(req, c["env"]) if e[0].startswith("PBS_O_ROOTDIR")]
    xml = torque_file(torque_source, "submitfilter/qstat-f-x.1565.vm.xml").read_bytes()
    theirs = [e for e in parse_qstat_xml(xml, "1565.vm").entries
              if e[0].startswith("PBS_O_ROOTDIR")]
    assert ours == theirs == [("PBS_O_ROOTDIR", "/chroot/sl5"), ("PBS_O_ROOTDIR", "/x")]


def test_call1_is_refused_as_the_prologue_refused_it(torque_source: Path, cfg_path: str) -> None:
    c = call(torque_source, 1)
    msg = submitfilter.check(c["argv"][1:], c["stdin"].encode(), c["env"], cfg_path)
    assert msg.startswith("pbs-chroot: can't use image: PBS_O_ROOTDIR is given 2 times")
    assert "/chroot/sl5, /x" in msg and msg.endswith("; allowed: /chroot/sl5")
    assert "\n" not in msg


def test_call2_allowed_image_passes(torque_source: Path, cfg_path: str) -> None:
    c = call(torque_source, 2)
    assert submitfilter.check(c["argv"][1:], c["stdin"].encode(), c["env"], cfg_path) == ""


def test_call3_no_image_passes_without_reading_the_config(torque_source: Path) -> None:
    c = call(torque_source, 3)
    assert submitfilter.check(c["argv"][1:], c["stdin"].encode(), c["env"],
                              "/nonexistent/pbs_chroot.conf") == ""


@pytest.mark.parametrize("argv, script, env, verdict", [
    (["-D", "/chroot/sl5/", "job.sh"], "true\n", {}, "not an image of this site"),
    (["-D/chroot/sl5", "job.sh"], "true\n", {}, ""),                       # attached argument
    (["-Vl", "nodes=1"], "true\n", {"PBS_O_ROOTDIR": "/chroot/sl5"}, ""),  # -V with -l
    (["-V"], "true\n", {"PBS_O_ROOTDIRX": "/tmp/x"}, "variable PBS_O_ROOTDIRX is not allowed"),
    (["job.sh"], "#!/bin/sh\n#PBS -D /tmp/evil\necho\n", {}, "PBS_O_ROOTDIR=/tmp/evil"),
    (["job.sh"], "#!/bin/sh\necho\n#PBS -D /tmp/evil\n", {}, ""),   # after the first command
    (["job.sh"], "#!/bin/sh\n\n# note\n  #PBS -D /tmp/evil\n#PBS -N x\n", {}, ""),  # indented
    (["-C", "#X", "job.sh"], "#X -D /tmp/evil\n", {}, "PBS_O_ROOTDIR=/tmp/evil"),
    (["job.sh"], "#X -D /tmp/evil\n", {"PBS_DPREFIX": "#X"}, "PBS_O_ROOTDIR=/tmp/evil"),
    (["-D", "/chroot/sl5"], "#PBS -D /tmp/evil\n", {}, ""),          # the command line wins
    (["-v", "A=1"], "#PBS -v PBS_O_ROOTDIR=/tmp/evil\n", {}, ""),    # -v replaces -v
    (["-v", 'A="x,PBS_O_ROOTDIR=/tmp/e"'], "true\n", {}, "inside the value of another"),
    (["-v", "PBS_O_ROOTDIR"], "true\n", {"PBS_O_ROOTDIR": "/tmp/e"}, "PBS_O_ROOTDIR=/tmp/e"),
    (["-v", "PBS_O_ROOTDIR"], "true\n", {}, ""),  # unset: qsub passes nothing
    (["-D", "/chroot/el7"], "true\n", {}, "not allowed for user"),
    (["-D", "/chroot/q", "-q", "short@server"], "true\n", {}, "not allowed in queue short"),
    (["-D", "/chroot/q"], "true\n", {}, ""),  # no -q: the default queue is the prologue's
    (["-D", "/chroot/sl5", "-D", "/chroot/el7"], "true\n", {}, "not allowed for user"),  # last
    (["-D", "/chroot/el7", "-D", "/chroot/sl5"], "true\n", {}, ""),
    (["-N", "-D", "-D", "/chroot/sl5"], "true\n", {}, ""),  # "-D" as -N's argument
    (["--", "-D", "/tmp/x"], "true\n", {}, ""),             # operands after --
])
def test_what_qsub_asks_for(argv: list, script: str, env: dict, verdict: str,
                            cfg_path: str) -> None:
    msg = submitfilter.check(argv, script.encode(), env, cfg_path)
    if verdict:
        assert msg.startswith("pbs-chroot: can't use image") and verdict in msg, msg
    else:
        assert msg == ""


def test_directive_words_split_like_a_shell() -> None:
    assert qsubopts.split_directive(' -N "a b" -v X=\'1 2\' # -D /x') == \
        ["-N", "a b", "-v", "X=1 2"]
    assert qsubopts.split_directive(" -l nodes=1:ppn=2#3") == ["-l", "nodes=1:ppn=2#3"]


def run_filter(*args: str, stdin: bytes, env: Any = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pbs_chroot", *args], input=stdin,
                          capture_output=True, cwd=REPO, timeout=60,
                          env=env or {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("script", [
    b"#!/bin/sh\necho hi\n", b"", b"no newline at the end", b"\r\n#PBS -N x\r\necho\r\n",
    bytes(range(256)) * 3, b"\xff\xfe#PBS -l mem=1gb\n\x00\x00echo\n",
])
def test_every_job_without_an_image_passes_byte_for_byte(script: bytes) -> None:
    """Even with no config at all: a job that asks for no image is never rejected."""
    res = run_filter("--config", "/nonexistent.conf", "submit-filter", "-l", "nodes=1",
                     "job.sh", stdin=script)
    assert (res.returncode, res.stdout, res.stderr) == (0, script, b"")


def test_a_filter_that_cannot_decide_passes_the_job_and_says_why() -> None:
    script = b"#!/bin/sh\ntrue\n"
    res = run_filter("--config", "/nonexistent.conf", "submit-filter", "-D", "/chroot/x",
                     stdin=script)
    assert res.returncode == 0 and res.stdout == script
    assert b"could not check this job" in res.stderr and b"when the job starts" in res.stderr


def test_main_rejects_with_one_line_and_no_script(cfg_path: str,
                                                  capsysbinary: pytest.CaptureFixture) -> None:
    import io
    sys_stdin = sys.stdin
    try:
        sys.stdin = io.TextIOWrapper(io.BytesIO(b"#!/bin/sh\ntrue\n"))
        rc = submitfilter.main(["filter", "-D", "/chroot/nope"], cfg_path)
    finally:
        sys.stdin = sys_stdin
    out, err = capsysbinary.readouterr()
    assert rc == 1 and out == b""
    assert err.count(b"\n") == 1 and err.startswith(
        b"pbs-chroot: can't use image PBS_O_ROOTDIR=/chroot/nope: not an image of this site")


def test_pick_shell_as_pbs_mom_does() -> None:
    from pbs_chroot.shells import pick_shell
    assert pick_shell("", "n1") == ""
    assert pick_shell("/bin/sh", "n1") == "/bin/sh"
    assert pick_shell("/bin/csh@n2,/bin/sh", "n1") == "/bin/sh"
    assert pick_shell("/bin/sh,/bin/csh@n1.example.org", "n1") == "/bin/csh"
    assert pick_shell("/bin/csh@n2", "n1") == ""


def test_installed_filter_text_is_plain() -> None:
    from pbs_chroot.errors import UserError
    from pbs_chroot.filterinstall import MARKER, render_filter
    text = render_filter("/usr/local/sbin/f", "/usr/bin/python3", "/etc/p.conf", "/usr/lib/x")
    assert text.startswith("#!/usr/bin/python3 -IS\n") and MARKER in text
    compile(text, "filter", "exec")
    with pytest.raises(UserError):
        render_filter("/usr/local/sbin/f", "/usr/bin/python3", '/etc/p".conf', "/usr/lib/x")


def test_per_host_shells_are_not_judged_at_qsub(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """-S path@host: the execution host is not known at qsub; a plain entry is judged."""
    image = tmp_path / "img"
    (image / "bin").mkdir(parents=True)
    (image / "bin" / "sh").write_text("")
    (image / "bin" / "sh").chmod(0o755)
    conf = tmp_path / "c.conf"
    conf.write_text(f"[pbs_chroot]\nstate_dir = /nonexistent\n[image {image}]\n")
    monkeypatch.setattr(config, "load", lambda p: config.parse(Path(p).read_text(), p))
    ok = submitfilter.check(["-D", str(image), "-S", "/bin/bash@n1"], b"", {}, str(conf))
    assert ok == ""
    bad = submitfilter.check(["-D", str(image), "-S", "/bin/bash@n1,/bin/bash"], b"", {},
                             str(conf))
    assert "the job's shell /bin/bash is not in the image" in bad
    assert submitfilter.check(["-D", str(image), "-S", "/bin/sh"], b"", {}, str(conf)) == ""
