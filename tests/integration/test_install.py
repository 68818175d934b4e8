"""`pbs-chroot install`: hooks written as pbs_mom demands, foreign scripts respected."""
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pbs_chroot import starter
from pbs_chroot.errors import UserError
from tests.conftest import Site, pbs_chroot_cli, starter_dir

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chown")]

HOOKS = ["prologue", "epilogue", "prologue.parallel", "epilogue.parallel"]


def install(site: Site, *extra: str) -> subprocess.CompletedProcess:
    return pbs_chroot_cli("--config", str(site.config), "install", "--pbs-home",
                          str(site.pbs_home), "--pbsnodes", "/opt/fake/pbsnodes", *extra,
                          check=False)


def test_install_writes_root_only_hooks_that_run(site: Site) -> None:
    site.write_config()
    (site.pbs_home / "mom_priv").mkdir(parents=True)
    res = install(site)
    assert res.returncode == 0, res.stderr
    assert "$prologalarm" in res.stdout and "job_starter_run_privileged" in res.stdout
    for name in HOOKS:
        st = os.lstat(site.pbs_home / "mom_priv" / name)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and st.st_gid == 0
        assert stat.S_IMODE(st.st_mode) == 0o500
    text = (site.pbs_home / "mom_priv" / "prologue").read_text()
    assert text.startswith(f"#!{sys.executable} -IS\n")
    assert f'CONFIG = "{site.config}"' in text and 'PBSNODES = "/opt/fake/pbsnodes"' in text
    assert (site.state / "jobs").is_dir() and stat.S_IMODE(os.stat(site.state).st_mode) == 0o700
    # The installed epilogue runs with an empty environment, as pbs_mom starts it.
    res = subprocess.run([str(site.pbs_home / "mom_priv" / "epilogue"), "1.vm", "u", "g", "n",
                          "1", "", "", "batch", "", "0"], env={}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_install_refuses_foreign_hooks_without_force(site: Site) -> None:
    site.write_config()
    mom_priv = site.pbs_home / "mom_priv"
    mom_priv.mkdir(parents=True)
    (mom_priv / "epilogue").write_text("#!/bin/sh\nexit 0\n")
    res = install(site)
    assert res.returncode == 2 and "exists and is not ours" in res.stderr
    assert not (mom_priv / "prologue").exists()  # all or nothing
    assert install(site, "--force").returncode == 0
    assert "pbs_chroot.hooks" in (mom_priv / "epilogue").read_text()
    assert install(site).returncode == 0  # our own hooks are upgraded in place


def test_install_needs_mom_priv_and_an_importable_package(site: Site, tmp_path: Path) -> None:
    site.write_config()
    res = install(site)
    assert res.returncode == 2 and "is not a directory" in res.stderr
    (site.pbs_home / "mom_priv").mkdir(parents=True)
    res = install(site, "--python", str(tmp_path / "nope"))
    assert res.returncode == 2 and "can't run" in res.stderr
    if sys.prefix != sys.base_prefix:  # under a venv, the system python lacks the package
        res = install(site, "--python", "/usr/bin/python3")
        assert res.returncode == 2 and "cannot import pbs_chroot" in res.stderr
    assert not (site.pbs_home / "mom_priv" / "prologue").exists()


def test_check_reports_each_image(site: Site) -> None:
    site.write_config(extra=f"[image {site.base}/chroot/missing]\n")
    res = pbs_chroot_cli("--config", str(site.config), "check", check=False)
    assert res.returncode == 1
    assert f"image {site.image} -> {site.version}: OK" in res.stdout
    assert f"image {site.base}/chroot/missing: REFUSED: can't open" in res.stdout
    site.write_config()
    os.chmod(site.config, 0o666)
    res = pbs_chroot_cli("--config", str(site.config), "check", check=False)
    assert res.returncode == 1 and "refusing config" in res.stderr


def test_library_directory_must_be_root_only(tmp_path: Path) -> None:
    """The hooks append it to sys.path and may `import pbs` from it, as root."""
    from pbs_chroot.admin import check_library
    from pbs_chroot.errors import UnsafePathError
    os.chmod(tmp_path, 0o1777)  # a sticky ancestor, like /tmp: fine
    lib = tmp_path / "lib"
    (lib / "pbs_chroot").mkdir(parents=True)
    (lib / "pbs_chroot" / "hooks.py").write_text("")
    assert check_library(str(lib / "pbs_chroot")) == str(lib)
    os.chmod(lib, 0o1777)  # the library directory itself sticky and world-writable
    with pytest.raises(UnsafePathError, match="writable by group or others"):
        check_library(str(lib / "pbs_chroot"))
    os.chmod(lib, 0o755)
    os.chmod(lib / "pbs_chroot" / "hooks.py", 0o666)
    with pytest.raises(UserError, match="hooks.py must be root-owned"):
        check_library(str(lib / "pbs_chroot"))


def test_install_builds_the_starters_and_writes_the_job_starter_line(site: Site) -> None:
    starter = site.base / "libexec" / "job_starter"
    site.write_config(main=f"job_starter = {starter}\n")
    mom_priv = site.pbs_home / "mom_priv"
    mom_priv.mkdir(parents=True)
    (mom_priv / "config").write_text("$pbsserver vm\n$job_starter_run_privileged false\n")
    res = install(site)  # no --starters: compiled from the package's C source
    assert res.returncode == 0, res.stderr
    assert (mom_priv / "config").read_text() == (
        f"$pbsserver vm\n$job_starter_run_privileged false\n$job_starter {starter}\n")
    assert (mom_priv / "config.orig").read_text().startswith("$pbsserver vm\n")
    assert f"now has `$job_starter {starter}`" in res.stdout
    for path, mode in ((starter, 0o711), (Path(f"{starter}-nnp"), 0o711)):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, mode)
    nnp = [subprocess.run([str(path), "/bin/grep", "NoNewPrivs", "/proc/self/status"],
                          capture_output=True, text=True).stdout
           for path in (starter, f"{starter}-nnp")]
    assert nnp == ["NoNewPrivs:\t0\n", "NoNewPrivs:\t1\n"]
    res = install(site)
    assert res.returncode == 0 and "already had" in res.stdout
    res = pbs_chroot_cli("--config", str(site.config), "check", check=False)
    assert res.returncode == 0 and f"job starter {starter}" in res.stdout


@pytest.mark.parametrize("mom_config,message", [
    ("$job_starter_run_privileged true\n", "starts jobs as root inside their image"),
    ("$job_starter /opt/site/starter\n", "already starts jobs through `$job_starter "
                                         "/opt/site/starter`"),
])
def test_install_refuses_a_mom_config_that_would_bypass_the_starter(
        site: Site, mom_config: str, message: str) -> None:
    site.write_config()
    mom_priv = site.pbs_home / "mom_priv"
    mom_priv.mkdir(parents=True)
    (mom_priv / "config").write_text(mom_config)
    res = install(site, "--starters", str(starter_dir()))
    assert res.returncode == 2 and message in res.stderr
    assert (mom_priv / "config").read_text() == mom_config  # nothing changed
    assert not (mom_priv / "prologue").exists()
    if "/opt/site" in mom_config:  # another starter: replaced on request
        assert install(site, "--starters", str(starter_dir()), "--force").returncode == 0
        assert f"$job_starter {starter_dir() / 'job_starter'}" in \
            (mom_priv / "config").read_text()


def test_starters_follow_the_configs_cgroups_setting(site: Site) -> None:
    """With cgroups = no no task adopter runs, so a TM task must not wait for a cgroup:
    install compiles starters that never wait, even when given prebuilt ones that do,
    and check fails on starters built for the other setting."""
    starter_path = site.base / "libexec" / "job_starter"
    site.write_config(main=f"job_starter = {starter_path}\ncgroups = no\n")
    mom_priv = site.pbs_home / "mom_priv"
    mom_priv.mkdir(parents=True)
    (mom_priv / "config").write_text("$pbsserver vm\n")
    res = install(site, "--starters", str(starter_dir()))
    assert res.returncode == 0, res.stderr
    nnp = Path(f"{starter_path}-nnp")
    assert starter.built_await(str(starter_path)) == starter.built_await(str(nnp)) == 0
    assert starter.built_await(str(starter_dir() / "job_starter")) > 0
    res = pbs_chroot_cli("--config", str(site.config), "check", check=False)
    assert f"job starter {starter_path}" in res.stdout, res.stdout + res.stderr
    shutil.copy(starter_dir() / "job_starter-nnp", nnp)  # the RPM's, with cgroups = no
    res = pbs_chroot_cli("--config", str(site.config), "check", check=False)
    assert res.returncode != 0
    assert (f"{nnp} is built to wait for the job's cgroup, but the config has cgroups = no: "
            "TM tasks would be refused; run pbs-chroot install again") in res.stdout + res.stderr
