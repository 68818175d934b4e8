"""No setuid program, the host's or the image's, raises a job's privileges (issue 11).

The attack: a job in an image runs the HOST's setuid su through /proc/PID/root
of a process of its own user outside the chroot (here a `sleep` the user
started on the node). su then loads the image's ld.so, libc and PAM and reads
the image's shadow: in a lax image (tests/laximage.py: empty root password,
nullok) that is root. Each test first shows the attack working where the
defence under test is absent (its control), then that it fails.

- Torque: pbs_mom execs $job_starter inside the chroot; the stage binds the
  no_new_privs starter there. Control: the same job on a mom whose config
  lacks the line.
- identity = generated: the stage's shadow has every password locked, so
  even without no_new_privs su cannot authenticate.
- `pbs-chroot run`: the shim sets no_new_privs.
"""
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import (UID, USER, Node, Site, Syslog, home_of, mount_points,
                            open_to_users, pbs_chroot_cli, starter_dir)
from tests.laximage import build_lax_image

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts, chroot")]

HOST_FILE = "etc/pbs-chroot-escaped"


@pytest.fixture(scope="module")
def lax_image(image_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("lax")
    os.chmod(base, 0o755)
    return build_lax_image(image_root, base / "v1")


@pytest.fixture
def outside_pid() -> Iterator[int]:
    """A process of the job's user on the node, outside any chroot (an ssh login's)."""
    p = subprocess.Popen(["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups",
                          "sleep", "300"])
    try:
        yield p.pid
    finally:
        p.kill()
        p.wait()


def become_user() -> None:
    os.setgroups([])
    os.setgid(UID)
    os.setuid(UID)


def probe(pid: int) -> str:
    """The job: what its privileges are, then the attack, then writes through /proc."""
    root = f"/proc/{pid}/root"
    return (f"#!/bin/sh\n"
            f"grep NoNewPrivs /proc/self/status\n"
            f"echo \"su: $({root}/usr/bin/su root -c 'id -u' </dev/null 2>&1 | tail -n 1)\"\n"
            f"touch {root}/{HOST_FILE} 2>/dev/null && echo ESCAPED wrote the host etc\n"
            f"touch {root}$HOME/via-proc && echo own-home-ok\n")


def su_result(stdout: str) -> str:
    return next(line[4:] for line in stdout.splitlines() if line.startswith("su: "))


def drop_starter(node: Node) -> None:
    """The control: the same mom without pbs_chroot's $job_starter line."""
    config = node.site.pbs_home / "mom_priv" / "config"
    config.write_text("".join(line + "\n" for line in config.read_text().splitlines()
                              if not line.startswith("$job_starter")))


@pytest.mark.parametrize("identity", ["host", "generated"])
def test_host_su_through_proc_root_gives_no_root_on_torque(
        tmp_path: Path, lax_image: Path, syslog: Syslog, outside_pid: int,
        identity: str) -> None:
    site = Site(tmp_path, lax_image)
    node = Node(site, syslog)
    try:
        node.configure(f"identity = {identity}\n")
        res = node.emu.run(node.job(node.rootdir(), probe(outside_pid)))
        assert res.job_rc == 0, res.stderr
        assert "NoNewPrivs:\t1" in res.stdout
        assert su_result(res.stdout) != "0" and "ESCAPED" not in res.stdout
        assert "own-home-ok" in res.stdout  # what the user may do anyway still works
        assert not (Path("/") / HOST_FILE).exists()
        # The control: without the starter, only the locked shadow stands in the way.
        drop_starter(node)
        res = node.emu.run(node.job(node.rootdir(), probe(outside_pid)))
        assert res.job_rc == 0, res.stderr
        assert "NoNewPrivs:\t0" in res.stdout
        if identity == "host":  # the image's own shadow: the attack works
            assert su_result(res.stdout) == "0", res.stdout
        else:  # every password locked
            assert su_result(res.stdout) != "0" and "Authentication failure" in res.stdout
    finally:
        node.emu.cleanup()
    (home_of(USER) / "via-proc").unlink()


def test_host_su_through_proc_root_gives_no_root_under_the_runner(
        tmp_path: Path, lax_image: Path, outside_pid: int) -> None:
    site = Site(tmp_path, lax_image)
    site.write_config(main="identity = host\n")  # only no_new_privs stands in the way
    res = site.run(USER, probe(outside_pid))
    assert res.returncode == 0, res.stderr
    assert "NoNewPrivs:\t1" in res.stdout
    assert su_result(res.stdout) != "0" and "ESCAPED" not in res.stdout
    assert "own-home-ok" in res.stdout and not (Path("/") / HOST_FILE).exists()
    (home_of(USER) / "via-proc").unlink()


def test_jobs_without_an_image_keep_their_setuid_helpers(node: Node) -> None:
    """The host's starter passes through: no no_new_privs where there is no image."""
    script = "#!/bin/sh\ngrep NoNewPrivs /proc/self/status\ntr '\\0' ' ' </proc/$PPID/cmdline\n"
    res = node.emu.run(node.job([], script))
    assert res.job_rc == 0, res.stderr
    # The script's parent is the job's shell: a login shell, as pbs_mom starts it
    # without a starter ($source_login_batch true).
    assert res.stdout.splitlines() == ["NoNewPrivs:\t0", "-sh "]


def test_the_audit_refuses_the_lax_image_unless_forced(tmp_path: Path, lax_image: Path) -> None:
    site = Site(tmp_path, lax_image)
    site.write_config()
    res = pbs_chroot_cli("--config", str(site.config), "image", "audit", str(site.version),
                         check=False)
    fails = [line for line in res.stdout.splitlines() if line.startswith("FAIL")]
    assert res.returncode == 1 and "REFUSED" in res.stdout
    assert any("/etc/shadow: root (uid 0) has an empty password" in f for f in fails)
    assert any("/etc/sudoers:2: NOPASSWD" in f for f in fails)
    assert any("/etc/fstab:1: option user" in f for f in fails)
    assert len(fails) == 3, res.stdout
    notes = [line for line in res.stdout.splitlines() if line.startswith("note ld.so:")]
    assert notes and "/lib64/ld-linux-x86-64.so.2" in notes[0] and "glibc 2." in notes[0]
    res = pbs_chroot_cli("--config", str(site.config), "image", "audit", "--force",
                         str(site.version), check=False)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout
    assert sum(line.startswith("note forced: ") for line in res.stdout.splitlines()) == 3


def test_selftest_probes_through_a_process_outside_and_fails_without_no_new_privs(
        tmp_path: Path, lax_image: Path) -> None:
    site = Site(tmp_path, lax_image)
    site.write_config(main="identity = host\n")
    res = pbs_chroot_cli("--config", str(site.config), "selftest", "--user", USER, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "13 escapes tried as pbsct through the job starter, 0 worked" in res.stdout
    # The control: a "no_new_privs" starter that only passes through, as a broken
    # install would leave it. The same probes now get the host's su to give root.
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("job_starter", "job_starter-nnp"):
        shutil.copy2(starter_dir() / "job_starter", broken / name)
    starter = site.version / str(broken / "job_starter").lstrip("/")
    starter.parent.mkdir(parents=True)
    starter.touch()
    site.write_config(main=f"identity = host\njob_starter = {broken / 'job_starter'}\n")
    res = pbs_chroot_cli("--config", str(site.config), "selftest", "--user", USER, check=False)
    assert res.returncode == 1
    line = next((x for x in res.stdout.splitlines() if x.startswith("FAIL  stage and escapes")),
                res.stdout)
    assert line.endswith("2 escape(s): no no_new_privs, the host's su through /proc/PID/root")


def test_selftest_and_check_fail_where_the_mom_starts_jobs_without_the_starter(
        site: Site) -> None:
    site.write_config()
    mom_priv = site.pbs_home / "mom_priv"
    mom_priv.mkdir(parents=True)
    (mom_priv / "config").write_text("$pbsserver vm\n")
    res = pbs_chroot_cli("--config", str(site.config), "selftest", "--user", USER, check=False)
    assert res.returncode == 1
    assert "FAIL  job starter (no_new_privs for Torque jobs): " \
        f"{site.pbs_home}/mom_priv/config has no $job_starter line" in res.stdout
    res = pbs_chroot_cli("--config", str(site.config), "check", check=False)
    assert res.returncode == 1 and "job starter: REFUSED" in res.stdout
    (mom_priv / "config").write_text(f"$job_starter {starter_dir() / 'job_starter'}\n"
                                     "$job_starter_run_privileged true\n")
    res = pbs_chroot_cli("--config", str(site.config), "check", check=False)
    assert res.returncode == 1 and "$job_starter_run_privileged true" in res.stdout
    (mom_priv / "config").write_text(f"$job_starter {starter_dir() / 'job_starter'}\n")
    res = pbs_chroot_cli("--config", str(site.config), "check", check=False)
    assert res.returncode == 0 and "job starter" in res.stdout and "OK" in res.stdout


def test_an_execute_only_starter_cannot_be_traced_before_it_sets_no_new_privs(
        tmp_path: Path, outside_pid: int) -> None:
    """Between pbs_mom's exec of the starter and its prctl, a process of the same user could
    ptrace it and make it exec a setuid program. The -nnp starter is execute-only, and a
    process that execs a file its user cannot read is not dumpable (execve(2)): shown here
    on a program that stops in that state, beside the same program readable (the control)."""
    for built in ("job_starter", "job_starter-nnp"):  # the host's waits for cgroups too
        assert os.stat(starter_dir() / built).st_mode & 0o7777 == 0o711
    src = tmp_path / "wait.c"
    src.write_text("#include <unistd.h>\nint main(void) { pause(); return 0; }\n")
    open_to_users(tmp_path)
    seen = {}
    for mode in (0o711, 0o755):
        prog = tmp_path / f"wait-{mode:o}"
        subprocess.run(["gcc", "-static", "-O", "-o", str(prog), str(src)], check=True)
        os.chmod(prog, mode)
        # Dropped as pbs_mom drops (TMomFinalizeChild: setgroups, setgid, setuid): no
        # capability is left when it execs. (setpriv keeps its effective capabilities
        # until the exec, which can read the file: not the case to test.)
        p = subprocess.Popen([str(prog)], preexec_fn=become_user)
        try:
            deadline = time.monotonic() + 10
            while os.readlink(f"/proc/{p.pid}/exe") != str(prog):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            # As a same-uid process would: look into it (ptrace access, PTRACE_MODE_READ).
            res = subprocess.run(["setpriv", f"--reuid={UID}", f"--regid={UID}",
                                  "--clear-groups", "cat", f"/proc/{p.pid}/environ"],
                                 capture_output=True, text=True)
            seen[mode] = res.returncode
        finally:
            p.kill()
            p.wait()
    assert seen[0o755] == 0 and seen[0o711] != 0  # the control, then the starter's case


def test_tm_tasks_and_shells_through_the_starter(tmp_path: Path) -> None:
    """pbs_mom runs a TM task (pbsdsh, mpiexec) as STARTER PROGRAM [ARG...], a bare name
    looked up in PATH; only the job's shell (argv[1] == $SHELL) becomes a login shell."""
    nnp = f"{starter_dir() / 'job_starter'}-nnp"

    def run(*argv: str, shell: str = "/bin/sh") -> str:
        return subprocess.run(
            ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", nnp, *argv],
            capture_output=True, text=True, input="echo $0; grep NoNewPrivs /proc/self/status",
            env={"PATH": "/usr/bin:/bin", "SHELL": shell}).stdout
    assert run("sh") == "sh\nNoNewPrivs:\t1\n"  # a bare name, a task with no arguments
    assert run("/bin/sh") == "-sh\nNoNewPrivs:\t1\n"  # the job's shell: a login shell
    assert run("/bin/sh", shell="/bin/bash") == "/bin/sh\nNoNewPrivs:\t1\n"
    assert run("printf", "%s\n", "a b") == "a b\n"


def test_a_stage_made_before_the_starter_gets_it_when_the_next_job_joins(site: Site) -> None:
    """Stages in use are kept as they were made (jobs run in them); but no new job may join
    one that lacks the no_new_privs starter: it is bound in, under the running jobs."""
    from pbs_chroot import config, stage
    from pbs_chroot.state import ensure_layout
    site.write_config(main="job_starter = none\n")
    old = config.load(str(site.config))
    ensure_layout(old.state_dir)
    v = str(site.version)
    target = v + str(starter_dir() / "job_starter")
    stage.join(old, "1.vm", v, USER)
    assert target not in mount_points()
    site.write_config()
    new = config.load(str(site.config))
    stage.join(new, "2.vm", v, USER)
    try:
        assert target in mount_points()
        with open(target, "rb") as f, open(new.nnp_starter(), "rb") as g:
            assert f.read() == g.read()
    finally:
        stage.leave(new, "1.vm", v)
        stage.leave(new, "2.vm", v)
    assert not [m for m in mount_points() if m.startswith(v)]


def test_a_pbs_demux_in_the_image_runs_nothing(node: Node) -> None:
    """pbs_mom execs its pbs_demux inside the image for a job on several nodes, without the
    job starter: the stage covers an image's copy with the starter, which with no program
    to run execs nothing."""
    demux = node.site.version / "usr" / "sbin" / "pbs_demux"
    demux.parent.mkdir(parents=True, exist_ok=True)
    demux.write_text("#!/bin/sh\necho DEMUX RAN\n")
    os.chmod(demux, 0o755)
    res = node.emu.run(node.job(node.rootdir(), "#!/bin/sh\n/usr/sbin/pbs_demux\necho rc=$?\n"))
    assert res.job_rc == 0, res.stderr
    assert "DEMUX RAN" not in res.stdout and "rc=125" in res.stdout
    assert "usage: job_starter" in res.stderr
