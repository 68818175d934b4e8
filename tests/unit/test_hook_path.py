"""The hooks' start-up: what importing them loads, and the small stand-ins for the stdlib
modules they no longer import (logging, contextlib.ExitStack, subprocess, re, NamedTuple)."""
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbs_chroot import command, gate, log, resources, state
from pbs_chroot.cgroups import Layout, Usage
from pbs_chroot.mounts import MountInfo
from pbs_chroot.undo import Undo
from tests.conftest import REPO

# Not one of these may be loaded by a hook that does its usual work (tests/integration/
# test_hook_imports.py checks a real warm prologue and epilogue).
FORBIDDEN = {"typing", "re", "json", "logging", "subprocess", "socket", "configparser", "enum",
             "collections", "contextlib", "traceback", "tokenize", "inspect", "dataclasses",
             "signal", "selectors", "threading", "functools", "weakref", "warnings",
             "xml.etree.ElementTree", "ctypes", "psutil"}


def modules_of(code: str) -> set:
    """The modules loaded after a `python -IS` run of ``code``."""
    show = "; import sys; print(' '.join(sorted(sys.modules)))"
    return set(subprocess.run([sys.executable, "-IS", "-c", code + show], capture_output=True,
                              text=True, check=True).stdout.split())


def imported_by(code: str) -> set:
    """Modules a `python -IS` run of ``code`` loads beyond `python -IS -c pass`."""
    return modules_of(code) - modules_of("pass")


@pytest.mark.parametrize("name", ["prologue_main", "epilogue_main"])
def test_importing_the_hooks_loads_no_heavy_module(name: str) -> None:
    extra = imported_by(f"import sys; sys.path.append({str(REPO)!r}); "
                        f"from pbs_chroot.hooks import {name}")
    assert not extra & FORBIDDEN
    stdlib = {m for m in extra if not m.startswith("pbs_chroot")}
    assert stdlib <= {"__future__", "_collections_abc", "_json", "_socket", "_stat", "errno",
                      "fcntl", "genericpath", "os", "os.path", "posixpath", "stat"}


# --- records -----------------------------------------------------------------------------------

def test_records_behave_like_the_named_tuples_they_were() -> None:
    a = MountInfo(1, 0, "/", frozenset({"rw"}), "ext4")
    assert a == MountInfo(1, 0, "/", frozenset({"rw"}), "ext4", None, frozenset())
    assert a != a._replace(mount_point="/x") and a._replace(mount_point="/x").mount_point == "/x"
    assert hash(a) == hash(MountInfo(1, 0, "/", frozenset({"rw"}), "ext4"))
    assert repr(a).startswith("MountInfo(mount_id=1, parent_id=0, mount_point='/'")
    layout = Layout(1, {"memory": "/m"}, None)
    assert list(layout) == [1, {"memory": "/m"}, None] and Layout(*list(layout)) == layout
    usage = Usage(1, 2, None, None, None, None, 0, None)
    assert list(usage._asdict()) == ["cpu_user_usec", "cpu_system_usec", "mem_peak_bytes",
                                     "mem_anon_bytes", "mem_file_bytes", "swap_peak_bytes",
                                     "oom_kills", "mem_limit_bytes"]
    assert a != (1, 0, "/", frozenset({"rw"}), "ext4", None, frozenset())


# --- Undo is ExitStack's callback/pop_all ------------------------------------------------------

def _run_stack(factory: Callable[[], Any], fail_body: bool, failing: set) -> tuple:
    ran: list = []

    def step(n: int) -> None:
        ran.append(n)
        if n in failing:
            raise KeyError(n)
    try:
        with factory() as undo:
            for n in range(4):
                undo.callback(step, n)
            if fail_body:
                raise ValueError("body")
            undo.pop_all()
    except BaseException as e:
        chain = []
        x: Any = e
        while x is not None:
            chain.append(repr(x))
            x = x.__context__
        return ran, chain
    return ran, []


@pytest.mark.parametrize("fail_body", [False, True])
@pytest.mark.parametrize("failing", [set(), {2}, {0, 3}, {0, 1, 2, 3}])
def test_undo_runs_and_chains_as_exitstack(fail_body: bool, failing: set) -> None:
    assert _run_stack(Undo, fail_body, failing) == \
        _run_stack(contextlib.ExitStack, fail_body, failing)


# --- plain string code where re was ------------------------------------------------------------

_SIZE = re.compile(r"([0-9]{1,15})(b|kb|mb|gb|tb|pb|w|kw|mw|gw|tw)?\Z", re.IGNORECASE)
_SHIFT = {"b": 0, "kb": 10, "mb": 20, "gb": 30, "tb": 40, "pb": 50}
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\[\]-]{0,199}\Z")


def size_by_re(text: str) -> Any:
    m = _SIZE.match(text.strip())
    if not m:
        return None
    unit = (m.group(2) or "b").lower()
    words = unit.endswith("w")
    shift = _SHIFT["b" if unit == "w" else unit[0] + "b"] if words else _SHIFT[unit]
    return (int(m.group(1)) << shift) * (8 if words else 1)


TEXT = st.text("0123456789kKmMgGbBwWtTpP \t\n.-_[]a\u212a\u00b2/", max_size=20) | st.text()


@settings(max_examples=3000, deadline=None)
@given(TEXT)
def test_sizes_job_ids_and_shown_values_as_before(text: str) -> None:
    assert resources.parse_size(text) == size_by_re(text)
    assert state.is_job_id(text) == (bool(_JOB_ID.match(text)) and ".." not in text)
    escaped = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    assert gate.show(text) == (escaped if len(escaped) <= 120 else escaped[:120] + "...")


@pytest.mark.parametrize("n", [1, 6, 7, 15, 16, 199, 200, 201])
def test_lengths_at_the_limits(n: int) -> None:
    assert resources.parse_size("9" * n) == size_by_re("9" * n)
    assert state.is_job_id("a" * n) == bool(_JOB_ID.match("a" * n))


# --- log: syslog datagrams, stderr fallback, the logging package's records ------------------------

@pytest.fixture
def syslog_sock(tmp_path: Path) -> Any:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "log.sock"))
    sock.settimeout(5)
    yield sock
    sock.close()
    log._sink = None  # as before any setup()


def test_log_lines_reach_syslog_with_ident_pid_and_priority(
        tmp_path: Path, syslog_sock: Any, capfd: Any) -> None:
    log.setup("pbs-chroot-test", str(tmp_path / "log.sock"))
    logger = log.get_logger("pbs_chroot.test")
    logger.info("job %s joined %s", "1.vm", "/v1")
    logger.warning("100%% sure, %s", "as logging")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("failed: %r", 42)
    got = [syslog_sock.recv(65536).decode() for _ in range(3)]
    pid = os.getpid()
    assert got[0] == f"<30>pbs-chroot-test[{pid}]: job 1.vm joined /v1"
    assert got[1] == f"<28>pbs-chroot-test[{pid}]: 100% sure, as logging"
    assert got[2].startswith(f"<27>pbs-chroot-test[{pid}]: failed: 42 | Traceback ")
    assert got[2].endswith(" | RuntimeError: boom") and "\n" not in got[2]
    assert capfd.readouterr().err == ""


def test_logging_package_records_reach_the_same_syslog(tmp_path: Path, syslog_sock: Any) -> None:
    import logging
    log.setup("pbs-chroot", str(tmp_path / "log.sock"))
    log.setup("pbs-chroot", str(tmp_path / "log.sock"))  # idempotent: one handler
    logging.getLogger("pbs_chroot.images").warning("image %s switched", "/x")
    assert syslog_sock.recv(65536).decode() == f"<28>pbs-chroot[{os.getpid()}]: image /x switched"
    with pytest.raises(socket.timeout):
        syslog_sock.settimeout(0.2)
        syslog_sock.recv(65536)


def test_without_syslog_warnings_go_to_stderr(tmp_path: Path, capfd: Any) -> None:
    log.setup("pbs-chroot-prologue", str(tmp_path / "missing.sock"))
    logger = log.get_logger("pbs_chroot.hooks")
    logger.info("dropped")
    logger.error("job %s: bad", "2.vm")
    log._sink = None
    logger.warning("before setup: %d", 1)
    logger.info("dropped too")
    assert capfd.readouterr().err == \
        f"pbs-chroot-prologue[{os.getpid()}]: job 2.vm: bad\nbefore setup: 1\n"


def test_use_socket_switches_and_a_bad_format_never_raises(tmp_path: Path, syslog_sock: Any,
                                                           capfd: Any) -> None:
    log.setup("x", str(tmp_path / "missing.sock"))
    log.use_socket(str(tmp_path / "log.sock"))
    log.get_logger("t").info("%d", "not a number")  # logging must never take a hook down
    log.get_logger("t").info("now %s", "here")
    assert syslog_sock.recv(65536).decode().endswith(": now here")
    assert capfd.readouterr().err == ""


# --- command.run: subprocess's Popen(start_new_session=True).communicate(timeout) -------------

def script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "cmd"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_command_output_status_and_environment(tmp_path: Path) -> None:
    res = command.run([script(tmp_path, 'echo "out $1 $FOO"; echo err >&2; exit 3'), "a b"],
                      {"FOO": "bar"}, 5)
    assert (res.returncode, res.stdout, res.stderr, res.timed_out) == \
        (3, b"out a b bar\n", b"err\n", False)
    res = command.run([script(tmp_path, "kill -TERM $$")], {}, 5)
    assert res.returncode == -signal.SIGTERM


def test_command_child_gets_a_session_devnull_default_signals_no_fds(tmp_path: Path) -> None:
    leaked_r, leaked_w = os.pipe()
    os.set_inheritable(leaked_w, True)
    try:
        res = command.run([script(tmp_path, (
            f"cat /proc/$$/stat; readlink /proc/$$/fd/0\n"
            f"test -e /proc/$$/fd/{leaked_w} && echo leaked\n"
            "grep '^SigIgn:' /proc/$$/status"))], {"PATH": "/bin:/usr/bin"}, 5)
    finally:
        os.close(leaked_r)
        os.close(leaked_w)
    assert res.returncode == 0, res.stderr
    stat, stdin, ign = res.stdout.decode().splitlines()
    pid, fields = int(stat.split()[0]), stat.rsplit(")", 1)[1].split()
    assert int(fields[3]) == pid  # its own session
    assert stdin == "/dev/null"
    ignored = int(ign.split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1)) and not ignored & (1 << (signal.SIGXFSZ - 1))


def test_command_timeout_kills_the_whole_session(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    start = time.monotonic()
    res = command.run([script(tmp_path, f"sleep 30 & echo $! > {pidfile}; wait")], {}, 0.5)
    assert res.timed_out and res.returncode is None
    assert time.monotonic() - start < 3
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{grandchild}").exists() and time.monotonic() < deadline:
        stat = Path(f"/proc/{grandchild}/stat").read_text() if \
            Path(f"/proc/{grandchild}/stat").exists() else ""
        if stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]:
            break
        time.sleep(0.02)
    else:
        assert not Path(f"/proc/{grandchild}").exists()


def test_command_that_closes_its_output_but_stays_is_killed_at_the_deadline(
        tmp_path: Path) -> None:
    res = command.run([script(tmp_path, "exec >&- 2>&-; sleep 30")], {}, 0.5)
    assert res.timed_out


@pytest.mark.parametrize("name, errno_", [("missing", 2), ("not-executable", 13)])
def test_command_that_cannot_start_raises_with_the_exec_errno(
        tmp_path: Path, name: str, errno_: int) -> None:
    path = tmp_path / name
    if name == "not-executable":
        path.write_text("#!/bin/sh\n")
        path.chmod(0o644)
    fds = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError) as info:
        command.run([str(path)], {}, 5)
    assert info.value.errno == errno_
    assert sorted(os.listdir("/proc/self/fd")) == fds  # no pipe left open


def test_command_without_posix_spawn_sessions_uses_subprocess(tmp_path: Path,
                                                              monkeypatch: Any) -> None:
    monkeypatch.setattr(command, "_posix_spawn_starts_sessions", lambda: False)
    res = command.run([script(tmp_path, "echo hi; echo err >&2; exit 4")], {}, 5)
    assert (res.returncode, res.stdout, res.stderr) == (4, b"hi\n", b"err\n")
    assert command.run([script(tmp_path, "sleep 30")], {}, 0.3).timed_out
