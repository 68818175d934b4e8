"""Config parsing and the ownership rule for the config file."""
import os
import sys
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

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
    with pytest.raises(ConfigError, match="it is a symlink \\(symlinks are refused"):
        config.load(str(tmp_path / "link"))
    with pytest.raises(ConfigError, match="can't read config"):
        config.load(str(tmp_path / "missing"))


# --- the INI reader reads what configparser reads (config.py no longer imports it) ---------

LINES = ["[image /chroot/sl5]", "[binds]", "[pbs_chroot]", "[DEFAULT]", "  [binds]", "[binds] x",
         "[]", "[x]y]", "key = value", "key=value", "key = a = b", "Key = V", "key: value",
         "key =", "= value", " = value", "  continued", "\tcontinued more", "", "   ", "# note",
         "; note", "  # note", "bad line", "key = v\r", "[binds]\r", "\x0bkey = z",
         "k\u00e9y = \u00fc", "key\u00a0= v", "users = alice,  bob"]


def configparser_view(text: str) -> tuple:
    import configparser
    cp = configparser.ConfigParser(interpolation=None, delimiters=("=",),
                                   comment_prefixes=("#", ";"), inline_comment_prefixes=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        cp.read_string(text)
    except configparser.Error:
        return ("error",)
    return {s: dict(cp[s]) for s in cp.sections()}, dict(cp.defaults())


def ini_view(text: str) -> tuple:
    try:
        sections, defaults = config._read_ini(text, "x")
    except ConfigError:
        return ("error",)
    return {s: {**opts, **{k: v for k, v in defaults.items() if k not in opts}}
            for s, opts in sections.items()}, defaults


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(LINES) | st.text("[]=#; \tabk", max_size=8), max_size=10),
       st.sampled_from(["", "\n"]))
def test_ini_reader_reads_what_configparser_reads(lines: list, end: str) -> None:
    if sys.version_info < (3, 10):  # 3.9's section header ended at the first ']'
        assume(not any(ln.strip().startswith("[") and ln.count("]") > 1 for ln in lines))
    text = "\n".join(lines) + end
    assert ini_view(text) == configparser_view(text)


@pytest.mark.parametrize("text, words", [
    ("[binds]\n/x = /y\n[binds]\n", r"line 3: section \[binds\] appears twice"),
    ("[binds]\n/x = /y\n/x = /z\n", r"line 3: '/x' is set twice in \[binds\]"),
    ("[binds]\n/x\n", r"want 'name = value' lines, got line 2: '/x'"),
    ("users = x\n", r"line 1: 'users = x' comes before any \[section\] header"),
])
def test_ini_errors_name_the_line(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        config.parse(text)


def test_default_section_holds_everywhere_as_in_configparser() -> None:
    cfg = config.parse("[DEFAULT]\nqueues = batch\n[image /chroot/sl5]\n"
                       "[image /chroot/el7]\nqueues = long\n")
    assert [i.queues for i in cfg.images] == [frozenset({"batch"}), frozenset({"long"})]


def test_config_is_a_value() -> None:
    a, b = config.parse("[image /chroot/sl5]\n"), config.parse("[image /chroot/sl5]\n")
    assert a == b and hash(a) == hash(b) and a != a._replace(state_dir="/x")
    assert a._replace(cgroups=False).cgroups is False and a.cgroups is True
    assert "state_dir='/var/lib/pbs_chroot'" in repr(a)
    with pytest.raises(ValueError):
        a._replace(no_such_field=1)
