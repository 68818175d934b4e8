"""Image versions: the symlink switch and what it does to running jobs' stages."""
import os
import subprocess

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
