"""What a Torque user is told: at qsub (the submit filter, run as the user) and at start
(the prologue's refusal appended to the job's own error file, as the user; the shell check)."""
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import GID, UID, USER, Node, Site, home_of, mount_points

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real users")]


def filter_as_user(site: Site, argv: list, script: bytes, env: dict) -> tuple:
    """Run the submit filter as qsub does: as the user (a forked child with the user's ids),
    in the user's home, the script on stdin. Returns (rc, stdout, stderr)."""
    work = site.base / "filter-io"
    work.mkdir(exist_ok=True)
    (work / "in").write_bytes(script)
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            fds = [os.open(work / "in", os.O_RDONLY)] + [
                os.open(work / n, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                for n in ("out", "err")]
            for want, fd in enumerate(fds):
                os.dup2(fd, want)
            os.setgroups([GID])
            os.setresgid(GID, GID, GID)
            os.setresuid(UID, UID, UID)
            os.chdir(home_of(USER))
            sys.stdin = io.TextIOWrapper(os.fdopen(0, "rb"))
            sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb"))
            sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb"))
            os.environ.clear()
            os.environ.update(env)
            from pbs_chroot.submitfilter import main
            code = main(["/usr/local/sbin/pbs-chroot-submit-filter"] + argv, str(site.config))
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return (os.waitstatus_to_exitcode(status), (work / "out").read_bytes(),
            (work / "err").read_bytes().decode())


USER_ENV = {"USER": USER, "HOME": str(home_of(USER)), "PATH": "/usr/bin:/bin",
            "SHELL": "/bin/bash"}


@pytest.fixture
def visible_image(site: Site) -> Path:
    """A second image that users can see from the submit host (as on CVMFS)."""
    path = site.base / "pub" / "busybox"
    path.parent.mkdir(mode=0o755)
    subprocess.run(["cp", "-a", str(site.version), str(path)], check=True)
    os.chmod(path, 0o755)
    site.write_config(extra=f"[image {path}]\n")
    return path


def test_filter_as_the_user_refuses_what_the_prologue_would(site: Site) -> None:
    site.write_config()
    script = b"#!/bin/sh\n#PBS -N x\necho hi\n"
    rc, out, err = filter_as_user(site, ["-D", f"{site.image}/", "job.sh"], script, USER_ENV)
    assert rc == 1 and out == b""
    assert err == (f"pbs-chroot: can't use image PBS_O_ROOTDIR={site.image}/: not an image "
                   f"of this site; allowed: {site.image}\n")
    # Allowed, and no image: passed through unchanged.
    for argv in (["-D", str(site.image), "job.sh"], ["-v", f"PBS_O_ROOTDIR={site.image}"],
                 ["-l", "nodes=1", "job.sh"]):
        assert filter_as_user(site, argv, script, USER_ENV) == (0, script, "")


def test_filter_finds_a_missing_shell_in_a_visible_image(site: Site, visible_image: Path
                                                         ) -> None:
    script = b"#!/bin/bash\necho hi\n"
    # The user's login shell ($SHELL is not what qsub uses: NSS says /bin/sh) is there.
    assert filter_as_user(site, ["-D", str(visible_image)], script, USER_ENV) == (0, script, "")
    rc, out, err = filter_as_user(site, ["-D", str(visible_image), "-S", "/bin/bash"],
                                  script, USER_ENV)
    assert rc == 1 and out == b""
    assert err == (f"pbs-chroot: can't use image {visible_image}: the job's shell /bin/bash "
                   "is not in the image; submit with a shell the image has, e.g. "
                   "qsub -S /bin/sh\n")
    rc, _, err = filter_as_user(site, ["-D", str(visible_image)],
                                b"#PBS -S /bin/bash\ntrue\n", USER_ENV)
    assert rc == 1 and "the job's shell /bin/bash is not in the image" in err
    # The raw versions directory is root's only: the user can't look, so text checks only.
    assert filter_as_user(site, ["-D", str(site.image), "-S", "/bin/bash"], script,
                          USER_ENV) == (0, script, "")


def test_install_submit_filter_writes_the_script_and_the_torque_cfg_line(site: Site) -> None:
    site.write_config()
    home = site.base / "submit-host"
    home.mkdir()
    (home / "torque.cfg").write_text("QSUBSLEEP 2\nSUBMITFILTER /old/filter\n")
    path = site.base / "sbin" / "pbs-chroot-submit-filter"
    path.parent.mkdir()
    res = subprocess.run([sys.executable, "-m", "pbs_chroot", "--config", str(site.config),
                          "install", "--submit-filter", str(path), "--pbs-home", str(home)],
                         capture_output=True, text=True, timeout=120)
    if "must be root-owned" in res.stderr or "can't install" in res.stderr:
        # The checkout itself is not root-only (install refuses it, as for the hooks).
        assert res.returncode == 2
        return
    assert res.returncode == 0, res.stderr
    st = os.stat(path)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
    assert (home / "torque.cfg").read_text() == f"QSUBSLEEP 2\nSUBMITFILTER {path}\n"
    script = b"#!/bin/sh\ntrue\n"
    # (Run as root here, whose login shell may be bash: name the image's shell.)
    ok = subprocess.run([str(path), "-D", str(site.image), "-S", "/bin/sh"], input=script,
                        capture_output=True, timeout=60)
    assert (ok.returncode, ok.stdout) == (0, script), ok.stderr
    bad = subprocess.run([str(path), "-D", "/chroot/nope"], input=script, capture_output=True,
                         timeout=60)
    assert bad.returncode == 1 and bad.stdout == b""
    assert bad.stderr.decode().startswith("pbs-chroot: can't use image PBS_O_ROOTDIR=/chroot/")


# --- at start: the line in the job's own error file ------------------------------------------

@pytest.fixture(autouse=True)
def no_old_error_files() -> Iterator[None]:
    """The test users' homes live for the session: job ids repeat from one test to the next."""
    def sweep() -> None:
        for p in home_of(USER).glob("*.e[0-9]*"):
            p.unlink()
    sweep()
    yield
    sweep()


def error_file(node: Node, job_id: str) -> Path:
    return home_of(USER) / f"emujob.e{job_id.split('.')[0]}"


def test_refused_job_leaves_the_user_its_line_in_the_error_file(node: Node) -> None:
    before = mount_points()
    job = node.job([("PBS_O_ROOTDIR", "/chroot/removed")])
    res = node.emu.run(job)
    assert res.prologue_rc == 1 and res.action == "aborted"
    path = error_file(node, job.job_id)
    line = (f"pbs-chroot: job {job.job_id}: can't use image PBS_O_ROOTDIR=/chroot/removed: "
            f"not an image of this site; allowed: {node.site.image}\n")
    assert path.read_text() == line
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (UID, GID, 0o600)
    assert any(f"job {job.job_id} refused" in x for x in node.syslog.lines())  # syslog too
    # Appended, never truncated: a second refusal of the same job id adds a line.
    node.seq -= 1
    node.emu.run(node.job([("PBS_O_ROOTDIR", "/chroot/removed")]))
    assert path.read_text() == line * 2
    assert mount_points() == before and node.offline_calls() == []
    node.assert_clean()


def test_shell_missing_from_the_image_is_refused_at_start(node: Node) -> None:
    job = node.job(node.rootdir())
    job.shell = "/bin/bash"  # qsub -S /bin/bash; the BusyBox image has no bash
    res = node.emu.run(job)
    assert res.prologue_rc == 1 and res.action == "aborted", res.stderr
    line = (f"pbs-chroot: job {job.job_id}: can't use image {node.site.image}: the job's "
            "shell /bin/bash is not in the image; submit with a shell the image has, "
            "e.g. qsub -S /bin/sh\n")
    assert line in res.stderr
    assert error_file(node, job.job_id).read_text() == line
    assert node.offline_calls() == []
    node.assert_clean()
    job = node.job(node.rootdir())
    job.shell = "/bin/sh"
    assert node.emu.run(job).action == "ran"


@pytest.mark.parametrize("plant", ["file-link", "fifo"])
def test_refusal_never_follows_what_the_user_planted(node: Node, plant: str) -> None:
    victim = node.site.base / "victim"
    victim.write_text("root's\n")
    job = node.job([("PBS_O_ROOTDIR", "/chroot/removed")])
    path = error_file(node, job.job_id)
    if plant == "file-link":
        path.symlink_to(victim)
    else:
        os.mkfifo(path)
    os.lchown(path, UID, GID)
    res = node.emu.run(job)
    assert res.prologue_rc == 1
    assert victim.read_text() == "root's\n"
    why = {"file-link": "a symlink on the way", "fifo": "not a regular file"}[plant]
    assert any("can't leave user" in x and why in x for x in node.syslog.lines()), \
        node.syslog.lines()


def test_user_cannot_be_written_for_where_it_may_not_write(node: Node, site: Site) -> None:
    """The writer has the user's rights only: a root-owned directory stays untouched."""
    from pbs_chroot import userfile
    root_dir = site.base / "rootonly"
    root_dir.mkdir(mode=0o755)
    assert not userfile.append_as_user(USER, str(root_dir / "x.e1"), "line\n")
    assert not (root_dir / "x.e1").exists()
    assert userfile.append_as_user(USER, str(home_of(USER) / "x.e1"), "line\n")
    assert (home_of(USER) / "x.e1").stat().st_uid == UID
    # A directory on the way that is a link (to a place the user may write): not followed.
    (home_of(USER) / "sub").mkdir()
    os.chown(home_of(USER) / "sub", UID, GID)
    (home_of(USER) / "via").symlink_to(home_of(USER) / "sub")
    assert not userfile.append_as_user(USER, str(home_of(USER) / "via" / "x.e2"), "line\n")
    assert not (home_of(USER) / "sub" / "x.e2").exists()
    for p in ("x.e1", "via"):
        os.unlink(home_of(USER) / p)
    os.rmdir(home_of(USER) / "sub")
    shutil.rmtree(root_dir)


@pytest.mark.parametrize("where, problem", [
    ("opt/rootonly/sh", "is not in the image"),     # a directory only root may enter
    ("opt/sh-0700", "is not executable in the image"),
])
def test_shell_is_judged_with_the_users_rights_not_roots(node: Node, where: str,
                                                         problem: str) -> None:
    """The prologue looks the shell up as pbs_mom will run it: chrooted, as the user."""
    v = node.site.version
    (v / "opt" / "rootonly").mkdir(parents=True, mode=0o700)
    os.chmod(v / "opt", 0o755)
    for p in (v / "opt" / "rootonly" / "sh", v / "opt" / "sh-0700"):
        shutil.copy(v / "bin" / "busybox", p)
        os.chmod(p, 0o700)
    job = node.job(node.rootdir())
    job.shell = "/" + where
    res = node.emu.run(job)
    assert res.prologue_rc == 1, res.stderr
    assert f"the job's shell /{where} {problem}" in res.stderr
    node.assert_clean()


def _remembered(node: Node) -> list:
    """The keys of the shells the prologues remembered (shells.ShellCache), one list of
    lines each."""
    base = node.site.state / "shells"
    return [json.loads((base / n).read_text()).split("\n") for n in sorted(os.listdir(base))
            if ".tmp." not in n]


def test_a_shell_found_in_the_image_is_remembered_and_used(node: Node) -> None:
    """The lookup's child runs once per version, stage mounts, ids and path: the next job
    with the same key is not looked up again (an entry planted for a shell the image lacks
    lets that job through, which shows the entry is what decides)."""
    job = node.job(node.rootdir())
    job.shell = "/bin/sh"
    assert node.emu.run(job).action == "ran"
    keys = _remembered(node)
    assert len(keys) == 1, keys
    st = os.stat(node.site.version)
    ident = f"{st.st_dev}:{st.st_ino}:{st.st_ctime_ns}"
    assert keys[0][1:3] == [str(node.site.version), ident]
    assert keys[0][4].startswith(f"{UID}:{GID}:") and keys[0][5] == "/bin/sh"
    # The same key for a path the image lacks, written as the cache writes it.
    from pbs_chroot import shells
    cache = shells.ShellCache(str(node.site.state / "shells"), keys[0][1], keys[0][3])
    uid, gid, groups = keys[0][4].split(":")
    ids = (int(uid), int(gid), [int(g) for g in groups.split(",")])
    cache.remember(cache.key("/bin/bash", *ids))
    job = node.job(node.rootdir())
    job.shell = "/bin/bash"
    assert node.emu.run(job).action == "ran"
    # Without the cache, that job is refused as before.
    node.configure("shell_cache = no\n")
    job = node.job(node.rootdir())
    job.shell = "/bin/bash"
    assert node.emu.run(job).prologue_rc == 1
    node.assert_clean()


def test_a_shell_reached_through_a_mount_is_never_remembered(node: Node) -> None:
    """A link in the image to a path the stage mounts (the user's home): what is there is
    the user's to change, so every job looks it up again."""
    v = node.site.version
    home = home_of(USER)
    (v / "opt").mkdir(mode=0o755, exist_ok=True)
    (v / "opt" / "mysh").symlink_to(f"{home}/mysh")
    shutil.copy(v / "bin" / "busybox", home / "mysh")
    os.chown(home / "mysh", UID, GID)
    try:
        job = node.job(node.rootdir())
        job.shell = "/opt/mysh"
        assert node.emu.run(job).action == "ran"
        assert [k[5] for k in _remembered(node)] == []
        os.unlink(home / "mysh")  # the user removes it: the next job is refused
        job = node.job(node.rootdir())
        job.shell = "/opt/mysh"
        res = node.emu.run(job)
        assert res.prologue_rc == 1 and "/opt/mysh is not in the image" in res.stderr
    finally:
        os.unlink(v / "opt" / "mysh")
        if (home / "mysh").exists():
            os.unlink(home / "mysh")
    node.assert_clean()


def test_cleanup_forgets_the_shells_of_versions_that_are_gone(node: Node) -> None:
    from pbs_chroot import config, reconcile, shells
    job = node.job(node.rootdir())
    job.shell = "/bin/sh"
    assert node.emu.run(job).action == "ran"
    base = node.site.state / "shells"
    gone = shells.ShellCache(str(base), str(node.site.base / "gone-version"), "")
    gone.remember("\n".join([shells.CACHE_VERSION, gone.version, "1:2:3", "", "0:0:0", "/x"]))
    (base / "torn").write_text('"shells-v1\\n')
    assert len(os.listdir(base)) == 3
    assert reconcile.prune_shells(config.load(str(node.site.config))) == 2
    assert [k[5] for k in _remembered(node)] == ["/bin/sh"]
    node.assert_clean()
