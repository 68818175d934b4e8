"""Config parsing and the ownership rule for the config file."""
import os
from pathlib import Path

import pytest

from pbs_chroot import config
from pbs_chroot.errors import ConfigError


def test_defaults_and_images() -> None:
    cfg = config.parse("[image /chroot/sl5]\nusers = alice, bob\nqueues = batch\n"
                       "[image /chroot/el7]\n")
    assert [i.path for i in cfg.images] == ["/chroot/sl5", "/chroot/el7"]
    assert cfg.image("/chroot/sl5").users == frozenset({"alice", "bob"})
    assert cfg.image("/chroot/sl5").queues == frozenset({"batch"})
    assert cfg.image("/chroot/sl5/") is None
    assert cfg.state_dir == "/var/lib/pbs_chroot" and cfg.offline_node is True
    assert [b.target for b in cfg.binds][:3] == ["/proc", "/sys", "/dev"]
    assert cfg.binds[0].source == "proc"


def test_binds_section_replaces_defaults() -> None:
    cfg = config.parse("[binds]\n/proc = proc\n/scratch = /srv/scratch rec,noexec,optional\n"
                       "/Data = /Data ro\n")
    assert [b.describe() for b in cfg.binds] == [
        "/proc <- proc [rw]", "/scratch <- /srv/scratch [rec,noexec,optional]",
        "/Data <- /Data [ro]"]


@pytest.mark.parametrize("text, words", [
    ("[image sl5]\n", "absolute"),
    ("[image /chroot/sl5/]\n", "normalised"),
    ("[image /chroot/../sl5]\n", "normalised"),
    ("[image //chroot/sl5]\n", "normalised"),
    ("[image /chroot/sl5]\nowner = x\n", "unknown setting"),
    ("[pbs_chroot]\nstate_dir = relative\n", "absolute path"),
    ("[pbs_chroot]\nqstat_path = /x\n", "unknown setting"),
    ("[pbs_chroot]\njob_info = ldap\n", "job_info"),
    ("[pbs_chroot]\njob_info_timeout = 0\n", "seconds"),
    ("[pbs_chroot]\noffline_node = maybe\n", "yes or no"),
    ("[binds]\n/x = /y ro,suid\n", "unknown option"),
    ("[binds]\n/x = y\n", "bind source"),
    ("[binds]\nx = /y\n", "bind target"),
    ("[binds]\n/ = /y\n", "bind target"),
    ("[binds]\n/x = /y ro extra\n", r"SOURCE \[options\]"),
    ("[imagez /x]\n", "unknown section"),
    ("no section header\n", "config"),
])
def test_bad_config_is_refused(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        config.parse(text)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chown")
@pytest.mark.parametrize("mode, uid, ok", [
    (0o644, 0, True), (0o600, 0, True), (0o664, 0, False), (0o646, 0, False),
    (0o644, 64123, False),
])
def test_config_ownership_rule(tmp_path: Path, mode: int, uid: int, ok: bool) -> None:
    path = tmp_path / "c.conf"
    path.write_text("[image /chroot/sl5]\n")
    os.chown(path, uid, 0)
    os.chmod(path, mode)
    if ok:
        assert config.load(str(path)).images[0].path == "/chroot/sl5"
    else:
        with pytest.raises(ConfigError, match="refusing config"):
            config.load(str(path))


def test_symlinked_or_missing_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ConfigError, match="can't read config"):
        config.load(str(tmp_path / "link"))
    with pytest.raises(ConfigError, match="can't read config"):
        config.load(str(tmp_path / "missing"))
