"""The hook server (hookd.py) and its C clients (starter/hook_client.c), end to end.

The emulated pbs_mom runs the installed C clients; a real `pbs-chroot hookd`, started
here (in the tests' private mount namespace, its socket in the test's tmp dir), runs the
hooks. Every process started here is killed by pid; the leak check covers mounts and
cgroups.
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

from pbs_chroot import hookproto as hookd
from tests import fakes
from tests.conftest import (CG_PARENT, PROBE, UID, USER, Node, Site, Syslog, home_of,
                            mount_points, pbs_chroot_cli, starter_dir)
from tests.momemu import EmuJob, EmuResult

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real mounts")]

HOOKS = ("prologue", "epilogue", "prologue.parallel", "epilogue.parallel")


def _children(pid: int) -> list[int]:
    out = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(name))
    return out


def _starttime(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


class HookdNode(Node):
    """A Node whose hooks are the C clients, served by a hookd started here."""

    def __init__(self, site: Site, syslog: Syslog) -> None:
        super().__init__(site, syslog)
        self.sock = site.base / "hookd" / "sock"
        self.configure(f"hook_server = {self.sock}")
        self.install()
        self.proc: Optional[subprocess.Popen] = None
        self.workers_seen: set = set()
        self.helpers: set = set()

    def install(self) -> None:
        res = pbs_chroot_cli("--config", str(self.site.config), "install", "--pbs-home",
                             str(self.site.pbs_home), "--pbsnodes", str(self.emu.pbsnodes_path),
                             "--starters", str(starter_dir()),
                             "--syslog-socket", str(self.site.base / "log.sock"))
        assert res.returncode == 0, res.stderr

    def start_server(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pbs_chroot", "--config", str(self.site.config), "hookd",
             "--pbsnodes", str(self.emu.pbsnodes_path),
             "--syslog-socket", str(self.site.base / "log.sock")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        deadline = time.monotonic() + 30
        while hookd.ping(str(self.sock), 2.0):
            assert self.proc.poll() is None, self.proc.stderr.read().decode()  # type: ignore
            assert time.monotonic() < deadline, "hookd did not answer within 30 s"
            time.sleep(0.05)
        self.helpers = set(_children(self.proc.pid))  # (a ping's worker, exiting)
        self.workers_seen.update((pid, _starttime(pid)) for pid in self.helpers)

    def workers(self) -> list[int]:
        found = _children(self.proc.pid) if self.proc is not None else []
        found = [pid for pid in found if pid not in self.helpers]
        self.workers_seen.update((pid, _starttime(pid)) for pid in found)
        return found

    def stop_server(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        self.workers()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def settle(self, timeout: float = 30) -> None:
        """Until no worker runs (an epilogue's worker answers before its stage and cgroup
        are undone, and goes on with them)."""
        deadline = time.monotonic() + timeout
        while self.workers():
            assert time.monotonic() < deadline, f"workers still running: {self.workers()}"
            time.sleep(0.01)

    def assert_clean(self) -> None:
        self.settle()
        super().assert_clean()

    def kill_leftovers(self) -> None:
        """Workers still alive after their daemon: by pid, each one seen here."""
        for pid, start in self.workers_seen:
            if start is not None and _starttime(pid) == start:  # not a reused pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def python_hooks(self, on: bool) -> None:
        """Move the Python hooks beside the clients away (on=False) or back: a job that
        runs with them away was served by hookd."""
        for name in HOOKS:
            py = self.site.pbs_home / "mom_priv" / f"{name}.py"
            off = py.with_name(py.name + ".off")
            if on and off.exists():
                off.rename(py)
            elif not on and py.exists():
                py.rename(off)

    def fallback_lines(self) -> list:
        return [line for line in self.syslog.lines() if "hook server" in line
                and ("not answering" in line or "broke" in line)]


@pytest.fixture
def hnode(site: Site, syslog: Syslog) -> Iterator[HookdNode]:
    n = HookdNode(site, syslog)
    try:
        n.start_server()
        yield n
        n.settle()
    finally:
        n.stop_server()
        n.emu.cleanup()
        n.kill_leftovers()


def ran_in_image(res: EmuResult, job: EmuJob) -> None:
    assert res.action == "ran" and res.prologue_rc == 0, res.stderr
    assert res.job_rc == 0, res.stdout + res.stderr
    assert 'PRETTY_NAME="pbs_chroot demo image' in res.stdout
    assert f"user={USER}" in res.stdout and "home-ok" in res.stdout
    assert (home_of(USER) / f"by-{job.job_id}").exists()
    assert res.epilogue_rc == 0, res.stderr


def test_install_puts_the_clients_and_the_python_hooks_beside(hnode: HookdNode) -> None:
    mom_priv = hnode.site.pbs_home / "mom_priv"
    for name in HOOKS:
        client, py = mom_priv / name, mom_priv / f"{name}.py"
        st = client.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o500)
        assert client.read_bytes().startswith(b"\x7fELF")
        assert py.read_text().startswith("#!") and py.stat().st_mode & 0o7777 == 0o500
    res = pbs_chroot_cli("--config", str(hnode.site.config), "check", check=False)
    assert f"hook server {hnode.sock}: answers: OK" in res.stdout, res.stdout + res.stderr
    # hook_server = no again: the Python hooks are the hooks, nothing left beside them
    hnode.configure("")
    hnode.install()
    assert (mom_priv / "prologue").read_text().startswith("#!")
    assert not any((mom_priv / f"{name}.py").exists() for name in HOOKS)


def test_whole_lifecycle_through_the_server(hnode: HookdNode) -> None:
    before = mount_points()
    hnode.python_hooks(False)  # served by hookd, or the job fails
    job = hnode.job(hnode.rootdir(), PROBE + "cat /proc/self/cgroup\n")
    res = hnode.emu.run(job)
    ran_in_image(res, job)
    # The job ran in its cgroup: the worker moved the client's parent (the job child).
    assert f"{CG_PARENT}/{job.job_id}" in res.stdout, res.stdout
    plain = hnode.job([("MYVAR", "x")], "#!/bin/sh\nhead -n 1 /etc/os-release\n")
    res = hnode.emu.run(plain)
    assert res.action == "ran" and res.job_rc == 0 and res.epilogue_rc == 0, res.stderr
    hnode.assert_clean()  # (the epilogue answers before the stage's leave: settled first)
    assert mount_points() == before
    assert {a["job_id"] for a in hnode.site.accounting_lines()} >= {job.job_id, plain.job_id}
    assert hnode.offline_calls() == [] and hnode.fallback_lines() == []
    assert any(f"job {job.job_id}" in line and "runs in image" in line
               for line in hnode.syslog.lines())
    # No worker was killed for a client that left after its answer (pings included).
    assert not any("went away" in line for line in hnode.syslog.lines())


def test_refusal_reaches_the_job_error_file(hnode: HookdNode) -> None:
    hnode.python_hooks(False)
    job = hnode.job([("PBS_O_ROOTDIR", "/tmp/x")])
    res = hnode.emu.run(job)
    assert res.prologue_rc == 1 and res.action == "aborted" and res.job_rc is None
    lines = [line for line in res.stderr.splitlines() if line.startswith("pbs-chroot:")]
    assert len(lines) == 1 and lines[0].startswith(f"pbs-chroot: job {job.job_id}: can't "
                                                   "use image"), res.stderr
    assert hnode.offline_calls() == []
    hnode.assert_clean()


def test_site_fault_offlines_the_node(hnode: HookdNode) -> None:
    hnode.python_hooks(False)
    os.chmod(hnode.site.config, 0o664)  # refused: a site fault
    try:
        res = hnode.emu.run(hnode.job(hnode.rootdir()))
    finally:
        os.chmod(hnode.site.config, 0o644)
    assert res.prologue_rc == 2 and res.action == "requeued", res.stderr
    assert "pbs-chroot: job" in res.stderr
    calls = hnode.offline_calls()
    assert calls and calls[0][:2] == ["-o", "-N"], calls  # the daemon's --pbsnodes
    hnode.assert_clean()


def test_server_down_the_python_hooks_still_gate(hnode: HookdNode) -> None:
    hnode.stop_server()
    assert not hnode.sock.exists()  # unlinked at stop: clients fall back at once
    refused = hnode.emu.run(hnode.job([("PBS_O_ROOTDIR", "/tmp/x")]))
    assert refused.prologue_rc == 1 and refused.action == "aborted", refused.stderr
    assert "can't use image" in refused.stderr
    job = hnode.job(hnode.rootdir())
    ran_in_image(hnode.emu.run(job), job)
    assert any("not answering, running the Python hook" in line
               for line in hnode.fallback_lines())
    hnode.assert_clean()


def _wait_worker(hnode: HookdNode, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while True:
        found = hnode.workers()
        if found:
            return found[0]
        assert time.monotonic() < deadline, "no hookd worker appeared"
        time.sleep(0.02)


def test_worker_killed_mid_request_is_a_site_fault(hnode: HookdNode) -> None:
    job = hnode.job(hnode.rootdir())
    fakes.set_qstat_fault(hnode.emu.qstat_jobs_dir, job.job_id, delay=3)
    running = hnode.emu.start(job)
    worker = _wait_worker(hnode)
    time.sleep(0.5)  # inside start_job: record and cgroup made, the server query running
    # The worker holds none of the daemon's descriptors: not the lock, not the listener.
    mine = {os.readlink(f"/proc/{worker}/fd/{fd}") for fd in os.listdir(f"/proc/{worker}/fd")}
    theirs = {os.readlink(f"/proc/{hnode.proc.pid}/fd/{fd}")  # type: ignore[union-attr]
              for fd in os.listdir(f"/proc/{hnode.proc.pid}/fd")}  # type: ignore[union-attr]
    assert str(hnode.sock.parent / "lock") not in mine
    shared = {t for t in mine & theirs if t.startswith("socket:")}
    assert len(shared) <= 1, (mine, theirs)  # its own connection only (the daemon's copy)
    os.kill(worker, signal.SIGKILL)
    res = running.wait(60)
    assert res.prologue_rc == 2 and res.action == "requeued", res.stderr
    assert f"pbs-chroot: job {job.job_id}:" in res.stderr
    assert hnode.offline_calls(), "the node must go offline (no requeue storm)"
    assert any("broke before the answer" in line for line in hnode.fallback_lines())
    # What the worker left, the epilogue (served again) finished.
    assert res.epilogue_rc == 0
    hnode.assert_clean()


def test_daemon_killed_mid_request_the_worker_still_answers(hnode: HookdNode) -> None:
    job = hnode.job(hnode.rootdir())
    fakes.set_qstat_fault(hnode.emu.qstat_jobs_dir, job.job_id, delay=2)
    running = hnode.emu.start(job)
    _wait_worker(hnode)
    hnode.stop_server(signal.SIGKILL)  # a crash: no unlink, no goodbye
    res = running.wait(60)  # the epilogue falls back to Python (no server now)
    ran_in_image(res, job)
    assert hnode.offline_calls() == []
    hnode.assert_clean()


def test_client_killed_by_the_alarm_kills_its_worker(hnode: HookdNode) -> None:
    """pbs_mom's $prologalarm SIGKILLs the client's session: the worker dies with it (the
    daemon sees the EOF); the epilogue and the reconciler finish what it left."""
    hnode.emu.prologue_alarm = 1.5
    job = hnode.job(hnode.rootdir())
    fakes.set_qstat_fault(hnode.emu.qstat_jobs_dir, job.job_id, delay=20)
    running = hnode.emu.start(job)
    worker = _wait_worker(hnode)
    res = running.wait(60)
    assert res.mom_prologue_rc == -4 and res.action == "requeued"
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{worker}") and _state(worker) != "Z":
        assert time.monotonic() < deadline, "the worker outlived its client"
        time.sleep(0.02)
    assert any(f"worker {worker} answered" in line for line in hnode.syslog.lines())
    out = pbs_chroot_cli("--config", str(hnode.site.config), "cleanup", check=False)
    assert out.returncode == 0, out.stderr
    hnode.assert_clean()


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.mark.parametrize("point", ["stage_joined", "end:killed", "end:stage_left"])
def test_killed_worker_leaves_what_the_reconciler_finishes(hnode: HookdNode,
                                                           point: str) -> None:
    """A worker killed at a step (as the OOM killer would): its record is finished by the
    epilogue (prologue steps) or by `pbs-chroot cleanup` (an epilogue killed before it
    answered, and its Python re-run killed at the same step; or one killed after it
    answered, while it undid the stage)."""
    hnode.emu.hook_env = {"PBS_CHROOT_TEST_KILL_AT": point}
    job = hnode.job(hnode.rootdir())
    res = hnode.emu.run(job)
    hnode.emu.hook_env = {}
    if point == "stage_joined":
        assert res.prologue_rc == 2 and res.action == "requeued", res.stderr
        assert hnode.offline_calls()
    elif point == "end:killed":
        assert res.action == "ran" and res.epilogue_rc == -signal.SIGKILL
        assert os.listdir(hnode.site.state / "jobs") != []  # left for the reconciler
    else:  # answered (accounted), then killed while leaving the stage
        assert res.action == "ran" and res.epilogue_rc == 0, res.stderr
        hnode.settle()
        assert os.listdir(hnode.site.state / "jobs") != []  # left for the reconciler
    out = pbs_chroot_cli("--config", str(hnode.site.config), "cleanup", check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    hnode.assert_clean()


def test_non_root_clients_are_refused(hnode: HookdNode) -> None:
    sockdir = hnode.sock.parent
    assert sockdir.stat().st_mode & 0o777 == 0o700 and hnode.sock.stat().st_mode & 0o777 == 0o600
    assert _as_user_ping(hnode.sock) == "connect: EACCES"  # the directory keeps users out
    os.chmod(sockdir, 0o711)  # an admin's mistake: the server still refuses them
    os.chmod(hnode.sock, 0o666)
    try:
        assert _as_user_ping(hnode.sock).startswith("closed")
    finally:
        os.chmod(hnode.sock, 0o600)
        os.chmod(sockdir, 0o700)
    assert any(f"refused a connection from uid {UID}" in line for line in hnode.syslog.lines())
    assert hookd.ping(str(hnode.sock)) == ""  # root still served


def _as_user_ping(path: Path) -> str:
    """Connect and send a request as the test user, in a forked child; what happened."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        out = "child failed"
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(UID)
            os.setuid(UID)
            out = _try_ping(str(path))
        finally:
            os.write(w, out.encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def _try_ping(path: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        try:
            s.connect(path)
        except PermissionError:
            return "connect: EACCES"
        try:
            s.sendall(hookd.encode_request(["ping"], {}, 0o022))
            return "closed" if s.recv(16) == b"" else "answered"
        except OSError as e:
            return f"closed ({e.strerror})"


def test_install_takes_the_prebuilt_client_for_the_default_paths(
        site: Site, syslog: Syslog, tmp_path: Path) -> None:
    """`install --starters DIR` (the RPM's libexec) uses DIR/hook_client, built with no
    paths baked in, when the config's socket is the default one and the syslog socket is
    /dev/log; such a client finds NAME.py beside the path pbs_mom ran it by."""
    starters = tmp_path / "libexec"
    starters.mkdir(mode=0o755)
    for name in ("job_starter", "job_starter-nnp"):
        (starters / name).write_bytes((starter_dir() / name).read_bytes())
        os.chmod(starters / name, 0o755)
    from pbs_chroot import hookinstall
    subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(starters / "hook_client"),
                    hookinstall.SOURCE], check=True)
    node = Node(site, syslog)
    try:
        node.configure("hook_server = yes")
        res = pbs_chroot_cli("--config", str(site.config), "install", "--pbs-home",
                             str(site.pbs_home), "--pbsnodes", str(node.emu.pbsnodes_path),
                             "--starters", str(starters), "--syslog-socket", "/dev/log")
        assert res.returncode == 0, res.stderr
        mom_priv = site.pbs_home / "mom_priv"
        assert (mom_priv / "prologue").read_bytes() == (starters / "hook_client").read_bytes()
        if os.path.exists("/dev/log") or os.path.exists("/run/pbs_chroot"):
            return  # the job part would log to this machine's syslog, or find a server
        refused = node.emu.run(node.job([("PBS_O_ROOTDIR", "/tmp/x")]))  # no server: NAME.py
        assert refused.prologue_rc == 1 and "can't use image" in refused.stderr
        node.assert_clean()
    finally:
        node.emu.cleanup()


def test_a_stuck_daemon_costs_a_job_five_seconds_not_its_start(hnode: HookdNode) -> None:
    """The daemon stopped (SIGSTOP) with the client's connection queued: after 5 s without
    the worker's acknowledgement the client runs the Python hook; the worker the daemon
    forks later for that request finds the client gone and does nothing (one accounting
    line, no offline): the outside review's findings 1 and 2."""
    assert hnode.proc is not None
    job = hnode.job(hnode.rootdir())
    os.kill(hnode.proc.pid, signal.SIGSTOP)
    started = time.monotonic()
    try:
        running = hnode.emu.start(job)
        time.sleep(6)  # the client gives up after 5 s and runs the Python prologue
    finally:
        os.kill(hnode.proc.pid, signal.SIGCONT)
    res = running.wait(60)
    ran_in_image(res, job)
    assert time.monotonic() - started >= 5
    assert any("took no request in time" in line for line in hnode.syslog.lines()), \
        hnode.syslog.lines()
    hnode.settle()
    assert hnode.offline_calls() == []
    assert [a["job_id"] for a in hnode.site.accounting_lines()] == [job.job_id]
    # The worker the daemon forked once resumed finds its client gone: it is killed by the
    # daemon (the client's end closed), or it does nothing (its acknowledgement fails).
    assert any("gave up before its request was taken" in line or "went away before its "
               "worker" in line for line in hnode.syslog.lines()), hnode.syslog.lines()
    hnode.assert_clean()


def test_a_daemon_stopped_with_requests_queued_sends_them_back(hnode: HookdNode) -> None:
    """Stopped (SIGTERM) while a client's connection waits in its queue: the request is
    served, or answered "run it yourself"; never dropped (a dropped one looked like a
    killed worker: a site fault, the node offline)."""
    assert hnode.proc is not None
    job = hnode.job(hnode.rootdir())
    os.kill(hnode.proc.pid, signal.SIGSTOP)
    running = hnode.emu.start(job)
    time.sleep(1)  # the client is connected, its request queued
    hnode.proc.send_signal(signal.SIGTERM)
    os.kill(hnode.proc.pid, signal.SIGCONT)
    res = running.wait(60)
    ran_in_image(res, job)
    assert hnode.offline_calls() == []
    # Served by a worker forked just before the stop, or sent back: never dropped.
    assert not any("broke before the answer" in line for line in hnode.syslog.lines())
    hnode.stop_server()
    hnode.assert_clean()
