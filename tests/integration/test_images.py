"""Image versions: the symlink switch and what it does to running jobs' stages."""
import os
import subprocess
import sys
from typing import Any

import pytest

from pbs_chroot import config, images, lifecycle, stage
from pbs_chroot.errors import UserError
from pbs_chroot.state import ensure_layout
from tests.conftest import Site, USER, mount_points

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real mounts")]


def second_version(site: Site, name: str = "v2") -> str:
    v = site.versions / name
    subprocess.run(["cp", "-a", str(site.version), str(v)], check=True)
    return str(v)


def load(site: Site) -> config.Config:
    site.write_config()
    cfg = config.load(str(site.config))
    ensure_layout(cfg.state_dir)
    return cfg


def test_switch_stages_running_jobs_in_the_new_version_first(site: Site) -> None:
    cfg, v2 = load(site), second_version(site)
    before = mount_points()
    job = lifecycle.Job("5.vm", USER, USER, "batch")
    assert lifecycle.start_job(cfg, job, str(site.image), None) == str(site.version)
    assert images.switch(cfg, str(site.image), v2) == ["5.vm"]
    assert os.readlink(site.image) == v2 and images.current(str(site.image)) == v2
    assert stage.memberships(cfg, "5.vm") == sorted([str(site.version), v2])
    assert v2 in mount_points() and str(site.version) in mount_points()
    # A new job resolves the new version; the old one's stage stays for job 5.
    job6 = lifecycle.Job("6.vm", USER, USER, "batch")
    assert lifecycle.start_job(cfg, job6, str(site.image), None) == v2
    acct = lifecycle.end_job(cfg, "5.vm", "0")
    assert acct is not None and acct["version"] == str(site.version)
    assert acct["versions"] == sorted([str(site.version), v2])
    assert str(site.version) not in mount_points() and v2 in mount_points()
    acct6 = lifecycle.end_job(cfg, "6.vm", "0")
    assert acct6 is not None and acct6["version"] == v2 and "versions" not in acct6
    assert mount_points() == before
    assert os.listdir(site.state / "stages") == []


def test_switch_without_jobs_mounts_nothing(site: Site) -> None:
    cfg, v2 = load(site), second_version(site)
    before = mount_points()
    assert images.switch(cfg, str(site.image), v2) == []
    assert os.readlink(site.image) == v2 and mount_points() == before
    assert [n for n in os.listdir(site.image.parent) if n != "sl5"] == []  # no temp link


def test_switch_refuses_what_is_not_a_versioned_allowlisted_image(site: Site) -> None:
    cfg, v2 = load(site), second_version(site)
    with pytest.raises(UserError, match="not an allowlisted image"):
        images.switch(cfg, str(site.base / "chroot" / "other"), v2)
    (site.base / "images" / "other").mkdir(mode=0o700)
    elsewhere = site.base / "images" / "other" / "v3"
    subprocess.run(["cp", "-a", str(site.version), str(elsewhere)], check=True)
    with pytest.raises(UserError, match="not beside the current version"):
        images.switch(cfg, str(site.image), str(elsewhere))
    site.image.unlink()
    site.image.symlink_to(site.version)
    os.chmod(site.versions, 0o755)
    with pytest.raises(Exception, match="reachable by users"):
        images.switch(cfg, str(site.image), v2)
    os.chmod(site.versions, 0o700)
    site.image.unlink()
    site.image.mkdir()
    with pytest.raises(UserError, match="not a symlink"):
        images.switch(cfg, str(site.image), v2)


# --- audit, deploy, rollback, list, gc (the CLI, as the admin runs it) ---------

def cli(site: Site, *args: str, check: bool = True) -> "subprocess.CompletedProcess[str]":
    from tests.conftest import pbs_chroot_cli
    res = pbs_chroot_cli("--config", str(site.config), *args, check=False)
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_audit_passes_the_built_image_and_refuses_unsafe_ones(site: Site) -> None:
    site.write_config()
    ok = cli(site, "image", "audit", str(site.version))
    assert ok.stdout.splitlines()[-1].startswith(f"{site.version}: OK (0 problem(s)")
    bad = second_version(site, "bad")
    os.mkdir(os.path.join(bad, "scratch"), 0o777)
    os.chmod(os.path.join(bad, "scratch"), 0o777)  # world-writable, not sticky
    os.chmod(os.path.join(bad, "tmp"), 0o1777)     # sticky: allowed
    for name, gid in (("etc/os-release", 1234), ("etc/group", 43)):  # a users', utmp's
        os.chown(os.path.join(bad, name), 0, gid)
        os.chmod(os.path.join(bad, name), 0o664)
    os.chown(os.path.join(bad, "etc", "hostname") if os.path.exists(
        os.path.join(bad, "etc", "hostname")) else os.path.join(bad, "bin"), 1234, 0)
    os.unlink(os.path.join(bad, "proc")) if os.path.islink(os.path.join(bad, "proc")) \
        else os.rmdir(os.path.join(bad, "proc"))
    res = cli(site, "image", "audit", bad, check=False)
    assert res.returncode == 1
    fails = [line for line in res.stdout.splitlines() if line.startswith("FAIL ")]
    assert "FAIL /scratch: writable by others (mode 0777)" in fails
    assert "FAIL /etc/os-release: writable by group 1234, not a system group (mode 0664)" \
        in fails
    assert "note /etc/group: writable by system group 43 (mode 0664)" in res.stdout
    assert any("owned by uid 1234, not root" in line for line in fails), fails
    assert any(line.startswith("FAIL /proc: mount point missing") for line in fails), fails
    assert not any("/tmp" in line for line in fails)
    assert res.stdout.splitlines()[-1].startswith(f"{bad}: REFUSED")


def test_strip_setuid_leaves_no_setuid_file(site: Site) -> None:
    site.write_config()
    v = second_version(site, "suid")
    for name, mode in (("bin/su-like", 0o4755), ("bin/sg-like", 0o2755)):
        path = os.path.join(v, name)
        with open(path, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(path, mode)
    listed = cli(site, "image", "audit", v)
    assert "setuid /bin/su-like (4755)" in listed.stdout
    assert "setuid /bin/sg-like (2755)" in listed.stdout
    cli(site, "image", "audit", "--strip-setuid", v)
    found = subprocess.run(["find", v, "-xdev", "-perm", "/6000", "-type", "f"],
                           capture_output=True, text=True, check=True).stdout
    assert found == ""
    assert os.stat(os.path.join(v, "bin/su-like")).st_mode & 0o7777 == 0o755


def test_deploy_rollback_list_gc_with_a_running_job(site: Site) -> None:
    """The issue's acceptance, on the BusyBox image (the Debian 11 run is opt-in)."""
    from tests.conftest import home_of
    site.write_config()
    before = mount_points()
    source = site.base / "master-copy"  # the seed's master copy, on this host
    subprocess.run(["cp", "-a", str(site.version), str(source)], check=True)
    (source / "etc" / "img-version").write_text("second\n")
    first = str(site.version)

    def job(wait_for: str = "") -> "subprocess.Popen[str]":
        script = ("cat /etc/img-version 2>/dev/null || echo first; "
                  + (f"while [ ! -e {home_of(USER)}/{wait_for} ]; do sleep 0.1; done" if wait_for
                     else ""))
        return subprocess.Popen([sys.executable, "-m", "pbs_chroot", "--config",
                                 str(site.config), "run", "--image", str(site.image), "--user",
                                 USER, "--", "/bin/sh", "-c", script],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    long_job = job(f"go-{site.base.name}")  # (homes outlive a test: a name of its own)
    try:
        acceptance_steps(site, long_job, job, source, first)
    finally:
        if long_job.poll() is None:
            long_job.terminate()  # the runner passes it on to the job and cleans up
            long_job.wait(30)
    assert mount_points() == before


def acceptance_steps(site: Site, long_job: "subprocess.Popen[str]", job: "Any",
                     source: "Any", first: str) -> None:
    import time
    from tests.conftest import home_of
    deadline = time.monotonic() + 30
    while "jobs: run-" not in cli(site, "image", "list").stdout:
        assert time.monotonic() < deadline and long_job.poll() is None
        time.sleep(0.1)
    res = cli(site, "image", "deploy", "sl5", str(source))
    assert "to-chk" in res.stdout or "100%" in res.stdout  # rsync's own progress
    second = os.readlink(site.image)
    assert second != first and os.path.dirname(second) == str(site.versions)
    out, _ = job().communicate(timeout=30)
    assert out.splitlines()[0] == "second"  # a new job sees the new version
    listing = cli(site, "image", "list").stdout
    assert f"* {os.path.basename(second)}" in listing
    assert f"  {os.path.basename(first)}  jobs: run-" in listing  # the running job's version
    cli(site, "image", "rollback", "sl5")
    assert os.readlink(site.image) == first
    out, _ = job().communicate(timeout=30)
    assert out.splitlines()[0] == "first"
    cli(site, "image", "deploy", "sl5", second)  # forward again, no copy: it is a version
    assert os.readlink(site.image) == second
    res = cli(site, "image", "gc", "sl5", "--keep", "1")
    assert f"kept {first} (in use by run-" in res.stdout  # the running job's
    assert os.path.isdir(first)
    (home_of(USER) / f"go-{site.base.name}").touch()
    out, err = long_job.communicate(timeout=30)
    assert long_job.returncode == 0 and out.splitlines()[0] == "first", err
    res = cli(site, "image", "gc", "sl5", "--keep", "1")
    assert f"removed {first}" in res.stdout and not os.path.exists(first)
    assert os.readlink(site.image) == second and os.path.isdir(second)
    assert sorted(os.listdir(site.versions)) == [".history", os.path.basename(second)]
    acct = site.accounting_lines()
    assert [a["version"] for a in acct] == [second, first, first]


def test_deploy_refuses_an_image_that_fails_the_audit(site: Site) -> None:
    site.write_config()
    source = site.base / "bad-source"
    subprocess.run(["cp", "-a", str(site.version), str(source)], check=True)
    os.chmod(source / "etc", 0o777)
    res = cli(site, "image", "deploy", "sl5", str(source), check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "refused by the audit, nothing deployed: /etc: writable by others" in res.stderr
    assert os.readlink(site.image) == str(site.version)
    assert sorted(os.listdir(site.versions)) == ["v1"]  # the copy is gone


def test_image_on_a_read_only_nosuid_tree_like_cvmfs(site: Site) -> None:
    """An image published on a read-only, nosuid file system (as /cvmfs is): world-
    readable versions are fine there, the stage writes nothing, and a missing mount
    point is a clear error rather than a write."""
    from tests.conftest import home_of
    repo = site.base / "cvmfs" / "sft.example.org"
    repo.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "cvmfs-test", str(repo)],
                   check=True)
    try:
        versions = repo / "images" / "sl5"
        versions.mkdir(parents=True)
        os.chmod(repo / "images", 0o755)
        os.chmod(versions, 0o755)  # world-readable: everything on CVMFS is
        subprocess.run(["cp", "-a", str(site.version), str(versions / "v1")], check=True)
        subprocess.run(["cp", "-a", str(site.version), str(versions / "no-mount-points")],
                       check=True)
        site.write_config(extra=f"[image {repo / 'sl5'}]\n[image {repo / 'sl5-broken'}]\n")
        cfg = config.load(str(site.config))
        for v in ("v1", "no-mount-points"):  # as the publisher's `image build` makes them
            images.add_mount_points(cfg, str(versions / v))
        os.rmdir(versions / "no-mount-points" / "proc")
        (repo / "sl5").symlink_to("images/sl5/v1")
        (repo / "sl5-broken").symlink_to("images/sl5/no-mount-points")
        subprocess.run(["mount", "-o", "remount,ro,nosuid,nodev", str(repo)], check=True)
        before = mount_points()
        res = cli(site, "run", "--image", str(repo / "sl5"), "--user", USER, "--",
                  "/bin/sh", "-c", "head -n 1 /etc/os-release; cd && pwd")
        assert "pbs_chroot demo image" in res.stdout and str(home_of(USER)) in res.stdout
        assert mount_points() == before
        broken = cli(site, "run", "--image", str(repo / "sl5-broken"), "--user", USER, "--",
                     "/bin/true", check=False)
        assert broken.returncode == 1
        assert "mount point /proc is missing in the image; add it with `pbs-chroot image " \
            "audit" in broken.stderr
        assert mount_points() == before
        # The same tree writable: world-readable versions are refused again.
        subprocess.run(["mount", "-o", "remount,rw,nosuid", str(repo)], check=True)
        refused = cli(site, "run", "--image", str(repo / "sl5"), "--user", USER, "--",
                      "/bin/true", check=False)
        assert refused.returncode == 1 and "reachable by users (mode 0755)" in refused.stderr
    finally:
        subprocess.run(["umount", str(repo)], check=True)


def test_deploy_from_a_staged_tree_copies_the_image_not_the_host(site: Site) -> None:
    """A source directory with a stage up (the host's /proc, /etc/passwd, homes mounted
    in it) is copied as the image's own files."""
    other, other_versions = site.base / "chroot" / "other", site.base / "images" / "other"
    site.write_config(extra=f"[image {other}]\nversions = {other_versions}\n")
    cfg = config.load(str(site.config))
    ensure_layout(cfg.state_dir)
    before = mount_points()
    stage.join(cfg, "9.vm", str(site.version))
    try:
        assert str(site.version) + "/proc" in mount_points()
        cli(site, "image", "deploy", "other", str(site.version))
    finally:
        stage.leave(cfg, "9.vm", str(site.version))
    new = os.readlink(other)
    assert os.path.dirname(new) == str(other_versions)
    assert os.listdir(os.path.join(new, "proc")) == []
    with open(os.path.join(new, "etc", "passwd")) as f:
        assert f.read() == (site.version / "etc" / "passwd").read_text()
    assert "pbsct" not in (site.version / "etc" / "passwd").read_text()
    assert mount_points() == before


@pytest.mark.skipif(not __import__("shutil").which("rpmbuild"),
                    reason="needs rpmbuild (Debian's rpm package; scripts/setup installs it)")
def test_image_rpm_writes_and_builds_a_spec_for_a_version(site: Site) -> None:
    site.write_config()
    out = site.base / "rpms"
    res = cli(site, "image", "rpm", "sl5", "v1", "--out", str(out))
    spec = out / "pbs-chroot-image-sl5-v1.spec"
    assert f"wrote {spec}" in res.stdout and spec.exists()
    built = res.stdout.splitlines()[-1].split(" ", 1)[1]
    assert built.endswith(".rpm") and os.path.exists(built)
    files = subprocess.run(["rpm", "-qpl", "--nosignature", built], capture_output=True,
                           text=True, check=True).stdout.splitlines()
    assert str(site.version / "bin" / "busybox") in files
    scripts = subprocess.run(["rpm", "-qp", "--scripts", "--nosignature", built],
                             capture_output=True, text=True, check=True).stdout
    assert f'--config {site.config} image rollback "$image" "$tree"' in scripts
    assert f"image={site.image}\n" in scripts and f"tree={site.version}\n" in scripts


def test_gc_and_rollback_see_through_a_symlinked_versions_dir(site: Site) -> None:
    """`versions =` written through a (root-owned) symlink: the current version and
    the ones jobs use are still recognised, whatever the spelling."""
    link = site.base / "via"
    link.symlink_to(site.base / "images")
    site.write_config(images=f"versions = {link / 'sl5'}\n")
    second_version(site)
    cli(site, "image", "deploy", "sl5", str(site.versions / "v2"))
    res = cli(site, "image", "gc", "sl5", "--keep", "1", "--dry-run")
    assert res.stdout == f"would remove {site.version}\n"  # never v2, the current one
    cli(site, "image", "rollback", "sl5")
    assert os.readlink(site.image) == str(site.version)
    res = cli(site, "image", "gc", "sl5", "--keep", "1")
    assert res.stdout == f"removed {site.versions / 'v2'}\n"
    assert os.path.isdir(site.version) and os.readlink(site.image) == str(site.version)
    # With a running job on the old version, behind the same symlinked spelling:
    second_version(site, "v3")
    cfg = config.load(str(site.config))
    assert lifecycle.start_job(cfg, lifecycle.Job("7.vm", USER, USER, "b"), str(site.image),
                               None) == str(site.version)
    try:
        cli(site, "image", "deploy", "sl5", str(site.versions / "v3"))
        res = cli(site, "image", "gc", "sl5", "--keep", "1")
        assert f"kept {site.version} (in use by 7.vm)" in res.stdout
    finally:
        lifecycle.end_job(cfg, "7.vm")


def test_audit_refuses_symlinked_mount_points(site: Site) -> None:
    """The stage refuses a symlink on the way to a mount point: so does the audit."""
    site.write_config()
    v = second_version(site, "links")
    os.rename(os.path.join(v, "home"), os.path.join(v, "home.real"))
    os.symlink("/home", os.path.join(v, "home"))
    res = cli(site, "image", "audit", v, check=False)
    assert res.returncode == 1
    assert "FAIL /home (/home is a symlink in the image" in res.stdout, res.stdout
    res = cli(site, "image", "deploy", "sl5", str(site.base / "images" / "sl5" / "links"),
              check=False)
    assert res.returncode == 2 and os.readlink(site.image) == str(site.version)
