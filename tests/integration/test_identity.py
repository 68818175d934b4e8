"""Generated passwd and group inside a stage (identity.py), on real mounts.

The test users exist only in the throwaway /etc/passwd and /etc/group that
conftest binds over the host's in the test's private mount namespace: a
stand-in for users the host gets from LDAP/SSSD, which an image cannot see.
"""
import errno
import os
from pathlib import Path

import pytest

from pbs_chroot import config, identity, stage
from pbs_chroot.errors import PbsChrootError
from pbs_chroot.state import ensure_layout
from tests.conftest import EXTRA_GID, EXTRA_GROUP, GID, OTHER, OTHER_UID, UID, USER, Site

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real mounts")]


def load(site: Site, main: str = "", images: str = "") -> config.Config:
    site.write_config(main=main, images=images)
    cfg = config.load(str(site.config))
    ensure_layout(cfg.state_dir)
    return cfg


def entries(path: Path) -> dict:
    return {line.split(":")[0]: line for line in path.read_text().splitlines()}


def test_stage_passwd_and_group_are_the_images_system_entries_and_its_users(site: Site) -> None:
    (site.version / "etc" / "login.defs").write_text("UID_MIN 500\nGID_MIN 500\n")
    with open(site.version / "etc" / "passwd", "a") as f:
        f.write("daemon:x:2:2:daemon:/sbin:/sbin/nologin\nimgonly:x:600:600::/home/i:/bin/sh\n")
    cfg = load(site)
    v = site.version
    stage.join(cfg, "1.vm", str(v), USER)
    try:
        pw, gr = entries(v / "etc" / "passwd"), entries(v / "etc" / "group")
        # The image's system accounts, not the host's; its ordinary users left out.
        assert pw["root"] == "root:x:0:0:root:/root:/bin/sh" and "daemon" in pw
        assert "nobody" in pw and "imgonly" not in pw
        assert pw[USER].startswith(f"{USER}:x:{UID}:{GID}:") and OTHER not in pw
        assert gr[EXTRA_GROUP] == f"{EXTRA_GROUP}:x:{EXTRA_GID}:{USER}"
        assert gr[USER] == f"{USER}:x:{GID}:" and "nogroup" in gr
        host_only = {line.split(":")[0] for line in open("/etc/passwd")} - set(pw) - {USER}
        assert host_only, "the host has accounts the image lacks"
        # Bound read-only over the image's files: a job cannot change them.
        with pytest.raises(OSError) as e:
            open(v / "etc" / "passwd", "a")
        assert e.value.errno == errno.EROFS
        ino = os.stat(v / "etc" / "passwd").st_ino
        # Another user's job joins: the same bound file (same inode) now names them too.
        stage.join(cfg, "2.vm", str(v), OTHER)
        assert os.stat(v / "etc" / "passwd").st_ino == ino
        assert OTHER in entries(v / "etc" / "passwd")
        assert entries(v / "etc" / "group")[OTHER] == f"{OTHER}:x:{OTHER_UID}:"
        # The first leaves: its user and its groups go.
        stage.leave(cfg, "1.vm", str(v))
        pw, gr = entries(v / "etc" / "passwd"), entries(v / "etc" / "group")
        assert USER not in pw and OTHER in pw and EXTRA_GROUP not in gr
    finally:
        stage.leave(cfg, "1.vm", str(v))
        stage.leave(cfg, "2.vm", str(v))
    # The image itself was never written to.
    assert "pbsct" not in (v / "etc" / "passwd").read_text()


def test_id_inside_the_image_names_the_user_and_every_group(site: Site) -> None:
    site.write_config()
    res = site.run(USER, "id; whoami; ls -ln /etc/passwd >/dev/null && echo ok")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == (f"uid={UID}({USER}) gid={GID}({USER}) "
                        f"groups={GID}({USER}),{EXTRA_GID}({EXTRA_GROUP})")
    assert lines[1:] == [USER, "ok"]


def test_a_symlinked_image_passwd_is_never_read(site: Site) -> None:
    secret = site.base / "secret"
    secret.write_text("leak:x:5:5::/:/bin/sh\n")
    os.unlink(site.version / "etc" / "passwd")
    os.symlink(str(secret), site.version / "etc" / "passwd")
    cfg = load(site)
    with pytest.raises(PbsChrootError) as e:
        stage.join(cfg, "1.vm", str(site.version), USER)
    assert "symlink" in e.value.detail
    made = Path(stage.stage_dir(cfg, str(site.version)), "passwd")
    assert not made.exists() or "leak" not in made.read_text()
    stage.sweep(cfg, str(site.version))


def test_host_mode_binds_the_hosts_files(site: Site) -> None:
    cfg = load(site, images="identity = host\n")
    v = site.version
    stage.join(cfg, "1.vm", str(v), USER, str(site.image))
    try:
        assert (v / "etc" / "passwd").read_text() == Path("/etc/passwd").read_text()
    finally:
        stage.leave(cfg, "1.vm", str(v))


def test_bind_sets_per_mode(site: Site) -> None:
    cfg = load(site)
    targets = {m: {b.target: b for b in stage.bind_set(cfg, "/s", m)} for m in identity.MODES}
    assert targets["generated"]["/etc/passwd"].source == "/s/passwd"
    assert targets["generated"]["/etc/group"].readonly
    assert targets["host"]["/etc/passwd"].source == "/etc/passwd"
    assert "/etc/passwd" not in targets["nscd"] and targets["nscd"]["/var/run/nscd"].optional
