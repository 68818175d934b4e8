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
