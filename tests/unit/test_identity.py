"""Merging the image's system entries with the stage users' (identity.py), no root needed."""
import pytest

from pbs_chroot import config, identity
from pbs_chroot.errors import ConfigError

IMAGE_PW = ("root:x:0:0:root:/root:/bin/bash\n# comment\n+@netgroup\nbroken\n"
            "daemon:x:2:2::/:/sbin/nologin\nold:x:500:500::/home/old:/bin/sh\n"
            "nfsnobody:x:4294967294:4294967294::/:/sbin/nologin\n")


def test_system_lines_follow_the_images_login_defs() -> None:
    names = [line.split(":")[0] for line in identity.system_lines(IMAGE_PW, 500)]
    assert names == ["root", "daemon", "nfsnobody"]
    assert "old" in [line.split(":")[0] for line in identity.system_lines(IMAGE_PW, 1000)]


def test_merge_passwd_user_wins_over_a_clashing_image_entry() -> None:
    image = "root:x:0:0::/root:/bin/sh\nalice:x:9:9::/:/bin/sh\nother:x:1001:1:::\n"
    text = identity.merge_passwd(image, [("alice", 1001, 100, "A", "/home/a", "/bin/bash")])
    assert text == "root:x:0:0::/root:/bin/sh\nalice:x:1001:100:A:/home/a:/bin/bash\n"


def test_merge_group_adds_members_to_the_images_group_of_that_gid() -> None:
    image = "root:x:0:\nusers:x:100:old\n"
    groups = {100: ("users", ["alice"]), 2000: ("physics", ["alice", "bob"]),
              0: ("root", [])}
    assert identity.merge_group(image, dict(groups)) == (
        "root:x:0:\nusers:x:100:old,alice\nphysics:x:2000:alice,bob\n")


def test_identity_mode_per_image_and_default() -> None:
    cfg = config.parse("[pbs_chroot]\nidentity = nscd\n[image /c/a]\nidentity = host\n"
                       "[image /c/b]\n")
    assert cfg.identity_of("/c/a") == "host" and cfg.identity_of("/c/b") == "nscd"
    assert config.parse("").identity_of("/x") == "generated"
    for bad in ("[pbs_chroot]\nidentity = ldap\n", "[image /c/a]\nidentity = files\n"):
        with pytest.raises(ConfigError):
            config.parse(bad)


def test_rewrite_keeps_the_inode_and_drops_the_old_tail(tmp_path) -> None:  # type: ignore
    import os
    path = tmp_path / "passwd"
    identity._write_in_place(str(path), "a" * 100 + "\n")
    ino = os.stat(path).st_ino
    identity._write_in_place(str(path), "root:x:0:0::/:/bin/sh\n")
    assert path.read_text() == "root:x:0:0::/:/bin/sh\n" and os.stat(path).st_ino == ino
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_image_password_fields_become_x_and_every_shadow_password_is_locked() -> None:
    image = "root::0:0:root:/root:/bin/sh\ntoor:$1$ab$xyz:0:0::/:/bin/sh\n"
    passwd = identity.merge_passwd(image, [("alice", 1001, 100, "", "/home/a", "/bin/sh")])
    assert [line.split(":")[1] for line in passwd.splitlines()] == ["x", "x", "x"]
    assert identity.merge_group("wheel:secret:10:root\n", {}) == "wheel:x:10:root\n"
    shadow = identity.locked_shadow(passwd, "*:1:0:99999:7:::")
    assert shadow == ("root:*:1:0:99999:7:::\ntoor:*:1:0:99999:7:::\n"
                      "alice:*:1:0:99999:7:::\n")


class _Recorder:
    def __init__(self) -> None:
        self.lines: list = []

    def warning(self, msg: str, *args: object) -> None:
        self.lines.append(msg % args)

    info = error = warning


@pytest.mark.parametrize("field,value,what", [
    ("pw_shell", "/bin/sh\nevil::0:0::/:/bin/sh", "a newline"),
    ("pw_dir", "/home/a:0:0", "a colon"),
    ("pw_gecos", "A\rB", "a control character (0x0d)"),
    ("pw_name", "al\x7fice", "a control character (0x7f)"),
    ("pw_gecos", "A\x85B", "a control character (0x85)"),
    ("pw_gecos", "caf\udce9", "bytes that are not UTF-8"),  # what NSS gives for b"caf\xe9"
])
def test_an_nss_entry_that_could_add_a_line_is_left_out(monkeypatch: pytest.MonkeyPatch,
                                                        field: str, value: str,
                                                        what: str) -> None:
    import grp
    import os
    import pwd
    fields = {"pw_name": "alice", "pw_passwd": "x", "pw_uid": 1001, "pw_gid": 100,
              "pw_gecos": "Alice", "pw_dir": "/home/alice", "pw_shell": "/bin/sh"}
    fields[field] = value
    entry = pwd.struct_passwd(tuple(fields.values()))
    monkeypatch.setattr(pwd, "getpwnam", lambda name: entry)
    monkeypatch.setattr(grp, "getgrgid", lambda gid: grp.struct_group(("users", "x", gid, [])))
    monkeypatch.setattr(os, "getgrouplist", lambda name, gid: [gid])
    rec = _Recorder()
    monkeypatch.setattr(identity, "log", rec)
    people, groups = identity._host_entries(["alice"])
    assert people == [] and groups == {}
    assert len(rec.lines) == 1 and what in rec.lines[0] and "left out" in rec.lines[0]
    text = identity.merge_passwd("root:x:0:0::/root:/bin/sh\n", people)
    assert text == "root:x:0:0::/root:/bin/sh\n"  # nothing added, no uid-0 line


def test_a_group_whose_name_could_add_a_line_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    import grp
    import os
    import pwd
    entry = pwd.struct_passwd(("alice", "x", 1001, 100, "Alice", "/home/alice", "/bin/sh"))
    names = {100: "users", 200: "evil\nroot:x:0:alice"}
    monkeypatch.setattr(pwd, "getpwnam", lambda name: entry)
    monkeypatch.setattr(grp, "getgrgid",
                        lambda gid: grp.struct_group((names[gid], "x", gid, [])))
    monkeypatch.setattr(os, "getgrouplist", lambda name, gid: [100, 200])
    rec = _Recorder()
    monkeypatch.setattr(identity, "log", rec)
    people, groups = identity._host_entries(["alice"])
    assert [p[0] for p in people] == ["alice"] and sorted(groups) == [100]
    assert len(rec.lines) == 1 and "group 200" in rec.lines[0]
    assert identity.merge_group("", groups) == "users:x:100:\n"
