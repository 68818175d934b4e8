"""`pbs-chroot run` and the exec shim, on real mounts, chroot and privilege drop."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pbs_chroot import config, stage
from pbs_chroot.state import ensure_layout
from tests.conftest import (EXTRA_GID, GID, UID, USER, Site, home_of, mount_points,
                            pbs_chroot_cli)

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chroot, setuid")]


def run(site: Site, *cmd: str, user: str = USER, image: str = "") -> subprocess.CompletedProcess:
    return pbs_chroot_cli("--config", str(site.config), "run", "--image",
                          image or str(site.image), "--user", user, "--", *cmd, check=False)


def test_job_runs_in_the_image_as_the_user(site: Site) -> None:
    site.write_config()
    before = mount_points()
    res = run(site, "/bin/sh", "-c",
              "cat /etc/os-release; id; pwd; grep -E '^(Uid|Gid|Groups|NoNewPrivs|CapEff)' "
              "/proc/self/status; test -c /dev/null && echo devnull-ok; echo $PBS_JOBID")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "pbs_chroot demo image" in out  # the image's os-release, not the host's
    assert f"uid={UID}({USER}) gid={GID}({USER})" in out and f"{EXTRA_GID}(pbsctx)" in out
    assert f"{home_of(USER)}\n" in out and "devnull-ok" in out
    assert f"Uid:\t{UID}\t{UID}\t{UID}\t{UID}" in out and f"Gid:\t{GID}\t{GID}\t{GID}\t{GID}" in out
    assert "NoNewPrivs:\t1" in out and "CapEff:\t0000000000000000" in out
    assert out.rstrip().splitlines()[-1].startswith("run-")
    assert "exited with status 0" in res.stderr
    assert mount_points() == before
    assert site.state_files() == ["audit", "audit/" + os.listdir(site.state / "audit")[0],
                                  "jobs", "lock", "shells", "stages"]


def _run_on_a_pty(argv: list) -> tuple[int, str]:
    """Run argv with a fresh pty as its controlling terminal, as an admin's shell would."""
    import fcntl
    import termios
    master, slave = os.openpty()

    def take_tty() -> None:
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    p = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, preexec_fn=take_tty)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: every holder of the slave side is gone
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return p.wait(60), out.decode(errors="replace").replace("\r\n", "\n")


def test_job_cannot_reach_the_admins_terminal(site: Site) -> None:
    """The job has no controlling tty (so no TIOCSTI into the admin's root shell), its
    own session, default signals and Torque's umask."""
    site.write_config()
    cmd = [sys.executable, "-m", "pbs_chroot", "--config", str(site.config), "run", "--image",
           str(site.image), "--user", USER, "--", "/bin/sh", "-c",
           "cat /proc/self/stat; grep -E '^Sig(Blk|Ign)' /proc/self/status; umask"]
    code, out = _run_on_a_pty(cmd)
    assert code == 0, out
    lines = out.splitlines()
    fields = lines[0].rsplit(")", 1)[1].split()
    assert int(fields[4]) == 0, "the job has a controlling terminal"  # tty_nr
    assert int(fields[3]) != os.getsid(0)
    assert lines[1:4] == ["SigBlk:\t0000000000000000", "SigIgn:\t0000000000000000", "0077"]
    # The shim started as a session leader (setsid fails: EPERM) forks, then setsid()s.
    cfg = config.load(str(site.config))
    ensure_layout(cfg.state_dir)
    stage.join(cfg, "shim.1", str(site.version))
    try:
        p = subprocess.Popen([sys.executable, "-I", "-m", "pbs_chroot.shim", "--root",
                              str(site.version), "--user", USER, "--", "/bin/cat",
                              "/proc/self/stat"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True, text=True)
        out, err = p.communicate(timeout=60)
    finally:
        stage.leave(cfg, "shim.1", str(site.version))
    assert p.returncode == 0, err
    sid = int(out.rsplit(")", 1)[1].split()[3])
    assert sid not in (p.pid, os.getsid(0))  # a session of the shim's own child


def test_exit_status_and_environment_are_clean(site: Site) -> None:
    site.write_config()
    env = dict(os.environ, LD_PRELOAD="/evil.so", SECRET="x")
    res = subprocess.run([sys.executable, "-m", "pbs_chroot", "--config", str(site.config), "run",
                          "--image", str(site.image), "--user", USER, "--", "/bin/sh", "-c",
                          "env; exit 7"], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 7
    names = {line.split("=")[0] for line in res.stdout.splitlines()}
    assert names <= {"HOME", "USER", "LOGNAME", "PATH", "SHELL", "PBS_JOBID", "PWD", "SHLVL"}


def test_refused_image_and_user(site: Site) -> None:
    site.write_config()
    res = run(site, "/bin/true", image=str(site.image) + "/")
    assert res.returncode == 2 and "not an image of this site" in res.stderr
    res = run(site, "/bin/true", user="root")  # refused before anything is set up
    assert res.returncode == 2 and "refusing to run a job as 'root' (uid 0)" in res.stderr
    assert not any(str(site.version) in m for m in mount_points())


@pytest.mark.parametrize("cmd, code, words", [
    (["/no/such/program"], 127, "can't run: /no/such/program"),
    (["/etc/os-release"], 126, "can't run: /etc/os-release"),
])
def test_shim_exit_codes(site: Site, cmd: list, code: int, words: str) -> None:
    site.write_config()
    res = run(site, *cmd)
    assert res.returncode == code and words in res.stderr


def test_shim_alone_refuses_bad_use(tmp_path: Path) -> None:
    shim = [sys.executable, "-I", "-m", "pbs_chroot.shim"]
    res = subprocess.run(shim + ["--root", "/"], capture_output=True, text=True)
    assert res.returncode == 125 and "required" in res.stderr
    res = subprocess.run(shim + ["--root", str(tmp_path / "none"), "--user", USER, "--", "true"],
                         capture_output=True, text=True)
    assert res.returncode == 125 and "can't chroot" in res.stderr
    # Started by a non-root user (or setuid), it does nothing. Forked, not exec'd: a
    # pyenv interpreter cannot even load its libpython as another user.
    # Imported before the drop: the checkout may sit under a directory only root can read.
    from pbs_chroot import shim as shim_mod
    err = tmp_path / "err"
    pid = os.fork()
    if pid == 0:
        try:
            fd = os.open(err, os.O_WRONLY | os.O_CREAT, 0o600)
            os.dup2(fd, 2)
            os.setgroups([])
            os.setresgid(GID, GID, GID)
            os.setresuid(UID, 0, 0)  # as if setuid root: euid and saved still 0
            os.seteuid(UID)
            shim_mod.main(["--root", "/", "--user", USER, "--", "/bin/true"])
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 125
    assert "must be started by root" in err.read_text()


def test_image_writable_by_others_is_refused(site: Site) -> None:
    site.write_config()
    os.chmod(site.version, 0o757)
    res = run(site, "/bin/true")
    assert res.returncode == 1 and "writable by group or others" in res.stderr
    assert not any(str(site.version) in m for m in mount_points())
