"""A home that is a symlink on the host resolves the same way inside the image."""
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from pbs_chroot import config, homes, stage
from pbs_chroot.errors import UnsafePathError
from pbs_chroot.state import ensure_layout
from tests.conftest import Site, tmpfs_root

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real mounts")]

LINKED, LINKED_UID = "pbsct3", 64126


@pytest.fixture
def linked_home(site: Site) -> Iterator[tuple[Path, Path]]:
    """User pbsct3, added to the test's own passwd, whose home is root's symlink
    /BASE/homes/pbsct3 -> /BASE/net/fs1/pbsct3 (as /home/u -> an automounted tree)."""
    home = site.base / "homes" / LINKED
    real = site.base / "net" / "fs1" / LINKED
    real.mkdir(parents=True)
    os.chmod(site.base / "net", 0o755)
    os.chmod(site.base / "net" / "fs1", 0o755)
    os.chown(real, LINKED_UID, LINKED_UID)
    home.parent.mkdir(mode=0o755)
    home.symlink_to(real)
    files = {n: tmpfs_root() / "etc" / n for n in ("passwd", "group")}
    saved = {n: p.read_text() for n, p in files.items()}
    for name, line in (("passwd", f"{LINKED}:x:{LINKED_UID}:{LINKED_UID}::{home}:/bin/sh\n"),
                       ("group", f"{LINKED}:x:{LINKED_UID}:\n")):
        with open(files[name], "a") as f:  # in place: /etc/{name} is a bind of it
            f.write(line)
    try:
        yield home, real
    finally:
        for name, p in files.items():
            with open(p, "r+") as f:
                f.write(saved[name])
                f.truncate()


@contextmanager
def joined(site: Site, user: str) -> Iterator[tuple[config.Config, str]]:
    """A job of ``user`` in the stage of the site's version, for the block's length."""
    site.write_config()
    cfg = config.load(str(site.config))
    ensure_layout(cfg.state_dir)
    v = str(site.version)
    stage.join(cfg, "1.vm", v, user)
    try:
        yield cfg, v
    finally:
        stage.leave(cfg, "1.vm", v)


def test_symlinked_home_resolves_inside(site: Site, linked_home: tuple) -> None:
    home, real = linked_home
    site.write_config()
    res = site.run(LINKED, "cd ~ && pwd && touch mine && id -un && readlink $HOME")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [str(home), LINKED, str(real)]
    assert (real / "mine").exists()  # the host's directory itself
    # The chain in the image is root's link, as on the host.
    assert os.readlink(site.version / str(home).lstrip("/")) == str(real)


def test_a_link_not_made_by_root_is_never_followed(site: Site, linked_home: tuple) -> None:
    home, real = linked_home
    os.lchown(home, LINKED_UID, LINKED_UID)  # the user's own link: could point anywhere
    with pytest.raises(UnsafePathError):
        homes.resolve("/", str(home))
    with joined(site, LINKED) as (cfg, v):
        assert not os.path.lexists(v + str(home)) and not os.path.exists(v + str(real))


def test_a_home_whose_way_changed_after_resolving_is_not_bound(
        site: Site, linked_home: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    home, real = linked_home
    swapped = site.base / "swapped"
    swapped.symlink_to(real)  # as if a directory on the way became a link meanwhile
    host_resolve = homes.resolve
    monkeypatch.setattr(homes, "resolve", lambda root, p: (str(swapped), [(str(home), str(real))])
                        if root == "/" else host_resolve(root, p))
    with joined(site, LINKED) as (cfg, v):
        assert homes.ensure_home(v, stage.stage_dir(cfg, v), str(home)) is None
        assert not os.path.exists(v + str(real))


def test_work_directory_link_from_user_dirs_resolves_inside(site: Site) -> None:
    from tests.conftest import GID, UID, USER
    work, real = site.base / "work" / USER, site.base / "gpfs" / "proj" / USER
    real.mkdir(parents=True)
    for d in (site.base / "gpfs", site.base / "gpfs" / "proj"):
        os.chmod(d, 0o755)
    os.chown(real, UID, GID)
    work.parent.mkdir(mode=0o755)
    work.symlink_to(real)
    site.write_config(main=f"user_dirs = {site.base}/work/%u {site.base}/none/%u\n")
    res = site.run(USER, f"cd {work} && pwd && touch w")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [str(work)] and (real / "w").exists()
    assert config.parse("[pbs_chroot]\nuser_dirs = /work/%u /s/%u\n").user_dirs == (
        "/work/%u", "/s/%u")
    with pytest.raises(config.ConfigError):
        config.parse("[pbs_chroot]\nuser_dirs = work/%u\n")


def test_a_read_only_image_without_the_links_still_runs_the_job(
        site: Site, linked_home: tuple) -> None:
    """On a read-only image (CVMFS) the chain can't be made: a warning, not a node fault."""
    home, real = linked_home
    ro = site.base / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700", "ro-image", str(ro)], check=True)
    try:
        subprocess.run(["cp", "-a", str(site.version), str(ro / "v1")], check=True)
        (site.base / "chroot" / "ro").symlink_to(ro / "v1")
        site.write_config(extra=f"[image {site.base / 'chroot' / 'ro'}]\n")
        from pbs_chroot import images  # its mount points, as `image build` makes them
        images.add_mount_points(config.load(str(site.config)), str(ro / "v1"))
        subprocess.run(["mount", "-o", "remount,ro,nosuid,nodev", str(ro)], check=True)
        res = site.run(LINKED, "id -un", site.base / "chroot" / "ro")
        assert res.returncode == 0, res.stderr
        assert res.stdout == f"{LINKED}\n"
        assert f"home {home}: left as the bind set makes it" in res.stderr
    finally:
        subprocess.run(["umount", str(ro)], check=True)
