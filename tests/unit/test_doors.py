"""The image audit's known doors (doors.py), on trees made here; no root needed."""
from pathlib import Path

import pytest

from pbs_chroot import _sys, doors


def tree(tmp_path: Path, files: dict) -> str:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(tmp_path)


def test_a_well_known_or_empty_root_password_is_a_door(tmp_path: Path) -> None:
    sha = _sys.crypt("changeme", "$6$saltsalt$")
    assert sha is not None and _sys.crypt("changeme", sha) == sha
    root = tree(tmp_path, {
        "etc/passwd": "root:x:0:0::/root:/bin/sh\ntoor:x:0:0::/:/bin/sh\nold::0:0::/:/bin/sh\n"
                      "alice::1000:1000::/home/alice:/bin/sh\n",
        "etc/shadow": f"root:{sha}:1::::::\ntoor:!:1::::::\nalice::1::::::\n"})
    found, _ = doors.inspect(root)
    assert len(found) == 4, found  # not the locked toor
    assert "/etc/shadow: root (uid 0) has the well-known password 'changeme'" in found[0]
    assert "/etc/shadow: alice has an empty password" in found[1]  # su alice = su to the
    assert "/etc/passwd: old (uid 0) has an empty password" in found[2]  # host's uid 1000
    assert "/etc/passwd: alice has an empty password" in found[3]


def test_a_strong_or_locked_root_password_is_no_door(tmp_path: Path) -> None:
    strong = _sys.crypt("k9#Lq!x2v", "$6$abcdefgh$")
    root = tree(tmp_path, {"etc/passwd": "root:x:0:0::/root:/bin/sh\n",
                           "etc/shadow": f"root:{strong}:1::::::\n"})
    assert doors.inspect(root)[0] == []
    root = tree(tmp_path, {"etc/shadow": "root:*:1::::::\n"})
    assert doors.inspect(root)[0] == []


def test_sudoers_and_fstab_doors_are_found_through_links_inside_the_image(
        tmp_path: Path) -> None:
    root = tree(tmp_path, {
        "etc/sudoers": "# NOPASSWD in a comment is fine\nroot ALL=(ALL) ALL\n",
        "real/sudoers.d/ops": "Defaults:ops !authenticate\n",
        "etc/fstab": "/dev/vda / ext4 defaults 0 1\n/dev/sdb1 /mnt vfat noauto,users 0 0\n"})
    (tmp_path / "etc" / "sudoers.d").symlink_to("/real/sudoers.d")  # absolute: inside the image
    found, _ = doors.inspect(root)
    assert len(found) == 2, found
    assert found[0].startswith("/etc/sudoers.d/ops:1: !authenticate")
    assert found[1].startswith("/etc/fstab:2: option users")


def test_a_link_out_of_the_image_reads_nothing_of_the_host(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "shadow").symlink_to("/etc/shadow")  # the image's own /etc/shadow: none
    (tmp_path / "etc" / "passwd").symlink_to("../../../../../../etc/passwd")
    assert doors.inspect(str(tmp_path))[0] == []


@pytest.mark.parametrize("files,version", [
    ({"lib/libc-2.5.so": "", "lib64/libc.so.6": "->/lib/libc-2.5.so"}, (2, 5)),
    ({"lib/x86_64-linux-gnu/libc.so.6":
      "\0GNU C Library (Debian GLIBC 2.31-13) stable release version 2.31.\n"}, (2, 31)),
    ({"lib/ld-musl-x86_64.so.1": ""}, (0, 0)),
])
def test_glibc_version_from_the_file_name_or_its_banner(
        tmp_path: Path, files: dict, version: tuple) -> None:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if text.startswith("->"):
            path.symlink_to(text[2:])
        else:
            path.write_text(text)
    assert doors.glibc_version(str(tmp_path))[1] == version


def test_loader_flaws_by_version() -> None:
    assert len(doors.loader_flaws((2, 5))) == 2 and "CVE-2010-3847" in doors.loader_flaws((2, 5))[0]
    assert doors.loader_flaws((2, 17)) == ["CVE-2017-1000366 (LD_LIBRARY_PATH stack clash)"]
    assert "CVE-2023-4911" in doors.loader_flaws((2, 36))[0]
    assert doors.loader_flaws((2, 28)) == doors.loader_flaws((2, 39)) == []
    assert doors.loader_flaws((0, 0)) == []


def test_pam_that_lets_anyone_through_and_sudoers_includes(tmp_path: Path) -> None:
    root = tree(tmp_path, {
        "etc/pam.d/su": "auth sufficient pam_rootok.so\nauth sufficient pam_wheel.so trust\n",
        "etc/pam.d/login": "auth sufficient pam_permit.so\n",
        # Debian's own common-auth: pam_permit after a requisite pam_deny is no door
        "etc/pam.d/common-auth": "auth [success=1 default=ignore] pam_unix.so nullok\n"
                                 "auth requisite pam_deny.so\nauth required pam_permit.so\n",
        "etc/pam.d/other": "auth required pam_permit.so\n",  # its only auth line: a door
        "etc/pam.d/passwd": "# auth sufficient pam_permit.so\npassword required pam_permit.so\n",
        "etc/sudoers": "@include /etc/sudo.extra\n#includedir /etc/more\n",
        "etc/sudo.extra": "ops ALL=(ALL) NOPASSWD: ALL\n",
        "etc/more/a": "Defaults !authenticate\n",
        "etc/more/b.bak": "x ALL=(ALL) NOPASSWD: ALL\n"})  # sudo skips names with a dot
    found, _ = doors.inspect(root)
    assert [f.split(":")[0] for f in found] == [
        "/etc/sudo.extra", "/etc/more/a", "/etc/pam.d/login", "/etc/pam.d/other",
        "/etc/pam.d/su"], found


def test_a_pbs_demux_in_the_image_is_a_door(tmp_path: Path) -> None:
    root = tree(tmp_path, {"usr/sbin/pbs_demux": ""})
    (tmp_path / "sbin").symlink_to("usr/sbin")
    found, _ = doors.inspect(root)
    assert [f.split(":")[0] for f in found] == ["/usr/sbin/pbs_demux", "/sbin/pbs_demux"]
