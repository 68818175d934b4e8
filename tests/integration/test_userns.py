"""Unprivileged mode (issue 13): `pbs-chroot run` by a real user, through a user namespace.

Every command here runs as the test user pbsct, dropped completely (groups,
real/effective/saved ids) by subprocess before exec, with an interpreter that
user can run and a copy of the package on the test tmpfs, so neither the
checkout's place nor its permissions matter. The image is published the way
this mode needs: its versions on a read-only, nosuid mount (as CVMFS is).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

import pytest

from pbs_chroot import _sys
from tests.conftest import (EXTRA_GID, GID, REPO, UID, USER, Site, home_of, mount_points,
                            pbs_chroot_cli, tmpfs_root)

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: to make a user, "
                                 "publish an image and drop to that user")]


@pytest.fixture(scope="module")
def user_python(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """An interpreter pbsct can run, and a root-owned copy of the package it can import."""
    pkg = tmp_path_factory.mktemp("userns-pkg")
    shutil.copytree(REPO / "pbs_chroot", pkg / "pbs_chroot",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for d in [pkg, *pkg.parents]:
        if d == tmpfs_root():
            break
        os.chmod(d, 0o755)
    for top, dirs, files in os.walk(pkg):
        for name in dirs:
            os.chmod(os.path.join(top, name), 0o755)
        for name in files:
            os.chmod(os.path.join(top, name), 0o644)
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            res = subprocess.run([python, "-I", "-c", "import sys; assert sys.version_info "
                                  ">= (3, 9)"], user=UID, group=GID, extra_groups=[EXTRA_GID],
                                 capture_output=True)
        except PermissionError:
            continue  # e.g. a pyenv interpreter under /root (0700)
        if res.returncode == 0:
            return python, pkg
    pytest.skip(f"no Python >= 3.9 that {USER} can run ({sys.executable} is not readable to "
                "them and there is no /usr/bin/python3)")


def as_user(user_python: tuple[str, Path], *args: str, env: Optional[dict] = None,
            preexec: Optional[object] = None) -> subprocess.CompletedProcess:
    """`pbs-chroot ARGS` as pbsct, dropped completely before exec."""
    python, pkg = user_python
    code = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
            "from pbs_chroot.admin import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([python, "-I", "-c", code, str(pkg), *args], user=UID, group=GID,
                          extra_groups=[EXTRA_GID], capture_output=True, text=True, timeout=120,
                          env=env or {"PATH": "/usr/bin:/bin"}, cwd="/",
                          preexec_fn=preexec)  # type: ignore[arg-type]


@pytest.fixture
def published(site: Site) -> Iterator[Site]:
    """The site's versions reachable by users, on a read-only nosuid bind (as on CVMFS)."""
    os.chmod(site.versions, 0o755)
    v = str(site.versions)
    _sys.mount(v, v, None, _sys.MS_BIND)
    try:
        _sys.mount(None, v, None, _sys.MS_PRIVATE)
        _sys.mount(None, v, None, _sys.MS_REMOUNT | _sys.MS_BIND | _sys.MS_RDONLY
                   | _sys.MS_NOSUID | _sys.MS_NODEV)
        site.write_config()
        yield site
    finally:
        _sys.umount2(v)


def run_in(user_python: tuple[str, Path], site: Site, script: str, *where: str
           ) -> subprocess.CompletedProcess:
    return as_user(user_python, "--config", str(site.config), "run",
                   *(where or ("--image", str(site.image))), "--", "/bin/sh", "-c", script)


def test_image_shows_the_image_the_users_uid_and_home(user_python: tuple[str, Path],
                                                      published: Site) -> None:
    """The issue's acceptance command, plus what the job keeps of privileges."""
    (home_of(USER) / "in-my-home").write_text("x")
    before = mount_points()
    res = run_in(user_python, published,
                 "cat /etc/os-release; id; ls $HOME; grep -E '^(Uid|Gid|Cap|NoNewPrivs)' "
                 "/proc/self/status; cat /proc/self/uid_map; "
                 "echo mypid $$ pids $(ls -d /proc/[0-9]* | wc -l); "
                 "touch /tmp/t && echo tmp-ok; test -c /dev/null && echo devnull-ok")
    (home_of(USER) / "in-my-home").unlink()
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "pbs_chroot demo image" in out and "Debian" not in out
    assert f"uid={UID}({USER}) gid={GID}({USER})" in out
    # An unprivileged process may map its own gid only: its other groups (here pbsctx)
    # show as the overflow gid, named by the image's group file.
    assert "groups=65534(nogroup)\n" in out
    assert "in-my-home" in out
    assert f"Uid:\t{UID}\t{UID}\t{UID}\t{UID}" in out
    assert f"Gid:\t{GID}\t{GID}\t{GID}\t{GID}" in out
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert f"{cap}:\t0000000000000000" in out
    assert "NoNewPrivs:\t1" in out
    assert f"{UID} {UID} 1" in " ".join(out.split())
    # A fresh /proc of a PID namespace of its own: the job is PID 2 (after our init); a
    # handful of processes, not the host's.
    pids = out.split("mypid 2 pids ")[1].split()[0]
    assert int(pids) < 10
    assert "tmp-ok" in out and "devnull-ok" in out
    assert "(user namespace) exited with status 0" in res.stderr
    assert mount_points() == before


def test_supplementary_groups_still_give_access(user_python: tuple[str, Path],
                                                published: Site) -> None:
    """A file readable only by pbsctx (a supplementary group) is readable inside."""
    secret = tmpfs_root() / "home" / "group-only"
    secret.write_text("for pbsctx\n")
    os.chown(secret, 0, EXTRA_GID)
    os.chmod(secret, 0o040)
    try:
        res = run_in(user_python, published, f"cat {secret}; stat -c 'owner %u:%g' {secret}")
    finally:
        secret.unlink()
    assert res.returncode == 0, res.stderr
    assert "for pbsctx" in res.stdout
    assert "owner 65534:65534" in res.stdout  # root and pbsctx are not mapped: overflow ids


def test_own_tree_with_dir(user_python: tuple[str, Path], published: Site) -> None:
    """--dir on a tree the user unpacked (here: a copy of the image, given to the user)."""
    tree = home_of(USER) / "tree"
    subprocess.run(["cp", "-a", str(published.version), str(tree)], check=True)
    subprocess.run(["chown", "-R", "-h", f"{UID}:{GID}", str(tree)], check=True)
    try:
        (tree / "etc" / "os-release").write_text('NAME="my own tree"\n')
        res = run_in(user_python, published, "cat /etc/os-release; id -u; echo x > /made && "
                     "echo write-ok", "--dir", str(tree))
        assert res.returncode == 0, res.stderr
        assert 'NAME="my own tree"' in res.stdout and f"{UID}\n" in res.stdout
        assert "write-ok" in res.stdout and (tree / "made").exists()
        # Someone else's tree is refused; so is --dir as root.
        res = run_in(user_python, published, "true", "--dir", str(published.version))
        assert res.returncode == 2 and "not a directory of yours" in res.stderr
        res = pbs_chroot_cli("--config", str(published.config), "run", "--dir", str(tree),
                             "--", "/bin/true", check=False)
        assert res.returncode == 2 and "run --dir is for users without root" in res.stderr
    finally:
        shutil.rmtree(tree)


def test_same_gate_as_root_mode(user_python: tuple[str, Path], published: Site) -> None:
    res = run_in(user_python, published, "true", "--image", str(published.image) + "/")
    assert res.returncode == 2 and "not an image of this site" in res.stderr
    published.write_config(images="users = somebody-else\n")
    res = run_in(user_python, published, "true")
    assert res.returncode == 2 and f"not allowed for user {USER}" in res.stderr
    published.write_config()
    res = as_user(user_python, "--config", str(published.config), "run", "--image",
                  str(published.image), "--user", "root", "--", "/bin/true")
    assert res.returncode == 2 and "only as yourself" in res.stderr


def test_private_versions_are_refused_clearly(user_python: tuple[str, Path], site: Site) -> None:
    """Versions in a root-only directory (the root mode's rule) are not reachable."""
    site.write_config()
    res = run_in(user_python, site, "true")
    assert res.returncode == 2 and "root's only" in res.stderr, res.stderr


def _in_nested_userns(fn_child: "object") -> int:
    """Run ``fn_child`` as root of a new user namespace (ids mapped 1:1), return its status."""
    r, w = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.close(r2)
        code = 99
        try:
            _sys.unshare(_sys.CLONE_NEWUSER)
            os.write(w2, b"x")
            os.read(r, 1)  # the parent has written our maps
            code = fn_child()  # type: ignore[operator]
        finally:
            os._exit(code)
    os.close(r)
    os.close(w2)
    os.read(r2, 1)  # the child is in its new user namespace
    os.close(r2)
    for name in ("uid_map", "gid_map"):
        Path(f"/proc/{pid}/{name}").write_text("0 0 4294967295\n")
    os.write(w, b"x")
    os.close(w)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("limit", ["0", None])
def test_user_namespaces_switched_off(user_python: tuple[str, Path], published: Site,
                                      tmp_path: Path, limit: Optional[str]) -> None:
    """user.max_user_namespaces=0, set inside a throw-away user namespace (the sysctl is per
    namespace): one line naming it, nothing set up. The control (limit left alone, same
    nesting) runs the job."""
    out = tmp_path / "out"

    def child() -> int:
        if limit is not None:
            Path("/proc/sys/user/max_user_namespaces").write_text(limit)
        res = run_in(user_python, published, "cat /etc/os-release")
        out.write_text(f"{res.returncode}\n{res.stdout}\n---\n{res.stderr}")
        return 0
    assert _in_nested_userns(child) == 0
    code, rest = out.read_text().split("\n", 1)
    stdout, stderr = rest.split("\n---\n")
    if limit == "0":
        assert code == "1" and stdout.strip() == ""
        assert stderr.strip().splitlines() == [
            "pbs-chroot: can't run unprivileged: user namespaces are switched off on this "
            "node (sysctl user.max_user_namespaces=0)"]
    else:
        assert code == "0" and "pbs_chroot demo image" in stdout, stderr


def test_each_setting_is_named(tmp_path: Path) -> None:
    from pbs_chroot import userns
    for name, off, whose in userns.SYSCTLS:
        d = tmp_path / name
        path = d.joinpath(*name.split("."))
        path.parent.mkdir(parents=True)
        path.write_text(off + "\n")
        assert userns.userns_problem(str(d)).endswith(f"({whose}sysctl {name}={off})")
        path.write_text("1\n" if off == "0" else "0\n")
        assert userns.userns_problem(str(d)) == ""
