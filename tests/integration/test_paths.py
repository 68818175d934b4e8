"""Hostile paths: admin paths must be root-owned all the way up; stage paths never follow links.

The corpus is built in tmp_path at test time: git cannot store owners and modes.
"""
import os
from pathlib import Path

import pytest

from pbs_chroot.errors import UnsafePathError
from pbs_chroot.paths import open_in_root, resolve_admin_path
from tests.conftest import UID

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chown")]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    os.chmod(tmp_path, 0o755)
    (tmp_path / "images" / "v1").mkdir(parents=True)
    (tmp_path / "images" / "v2").mkdir()
    (tmp_path / "chroot").mkdir()
    (tmp_path / "chroot" / "abs").symlink_to(tmp_path / "images" / "v1")
    (tmp_path / "chroot" / "rel").symlink_to("../images/v2")
    (tmp_path / "chroot" / "chain").symlink_to("rel")
    return tmp_path


def test_root_owned_symlinks_are_followed(tree: Path) -> None:
    assert resolve_admin_path(str(tree / "chroot" / "abs")) == str(tree / "images" / "v1")
    assert resolve_admin_path(str(tree / "chroot" / "rel")) == str(tree / "images" / "v2")
    assert resolve_admin_path(str(tree / "chroot" / "chain")) == str(tree / "images" / "v2")
    assert resolve_admin_path(str(tree / "images" / "v1")) == str(tree / "images" / "v1")


@pytest.mark.parametrize("case, words", [
    ("user_owned_version", "owned by uid"),
    ("user_owned_parent", "owned by uid"),
    ("user_owned_symlink", "owned by uid"),
    ("world_writable_version", "writable by group or others"),
    ("group_writable_parent", "writable by group or others"),
    ("sticky_parent", "writable by group or others"),
    ("broken_link", "can't open"),
    ("file_in_the_middle", "not a directory"),
    ("link_to_user_dir", "owned by uid"),
    ("loop", "too many symlinks"),
    ("relative", "not an absolute path"),
])
def test_unsafe_admin_paths(tree: Path, case: str, words: str) -> None:
    v1 = tree / "images" / "v1"
    path = tree / "chroot" / "abs"
    if case == "user_owned_version":
        os.chown(v1, UID, UID)
    elif case == "user_owned_parent":
        os.chown(tree / "images", UID, UID)
    elif case == "user_owned_symlink":
        path = tree / "chroot" / "mine"
        path.symlink_to(v1)
        os.chown(path, UID, UID, follow_symlinks=False)
    elif case == "world_writable_version":
        os.chmod(v1, 0o757)
    elif case == "group_writable_parent":
        os.chmod(tree / "images", 0o775)
    elif case == "sticky_parent":
        os.chmod(tree / "images", 0o1777)
    elif case == "broken_link":
        path = tree / "chroot" / "broken"
        path.symlink_to(tree / "nothing")
    elif case == "file_in_the_middle":
        (tree / "f").write_text("")
        path = tree / "f" / "x"
    elif case == "link_to_user_dir":
        (tree / "home").mkdir()
        os.chown(tree / "home", UID, UID)
        path = tree / "chroot" / "u"
        path.symlink_to(tree / "home")
    elif case == "loop":
        path = tree / "chroot" / "loop"
        path.symlink_to("loop")
    elif case == "relative":
        path = Path("chroot/abs")
    with pytest.raises(UnsafePathError, match=words):
        resolve_admin_path(str(path))


def test_sticky_ok_accepts_tmp_like_parents_only_for_code(tree: Path) -> None:
    os.chmod(tree / "images", 0o1777)
    assert resolve_admin_path(str(tree / "images" / "v1"), sticky_ok=True)
    os.chmod(tree / "images" / "v1", 0o1777)  # the final component may not be
    with pytest.raises(UnsafePathError):
        resolve_admin_path(str(tree / "images" / "v1"), sticky_ok=True)


@pytest.mark.parametrize("plant", ["etc", "etc/passwd", "home"])
def test_open_in_root_never_follows_links(tree: Path, plant: str) -> None:
    root = tree / "images" / "v1"
    (root / "etc").mkdir()
    victim = tree / "victim"
    victim.mkdir()
    target = root / plant
    if target.exists():
        target.rmdir()
    target.symlink_to(victim)
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(UnsafePathError, match="symlink"):
            os.close(open_in_root(fd, "/" + plant + "/x" if plant == "etc" else "/" + plant,
                                  "file" if plant == "etc/passwd" else "dir"))
        with pytest.raises(UnsafePathError, match=r"'\.\.'"):
            open_in_root(fd, "/etc/../../victim", "dir")
    finally:
        os.close(fd)
    assert os.listdir(victim) == []  # nothing was created through the link
