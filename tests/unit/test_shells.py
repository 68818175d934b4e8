"""The job's shell looked up inside an image as the kernel would after chroot(2): links
re-rooted, '..' stopping at the image's root, nothing outside the image ever opened."""
import os
import time
from pathlib import Path

import pytest

from pbs_chroot import shells
from pbs_chroot.shells import refusal, shell_problem
from pbs_chroot.userfile import target_path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    root = tmp_path / "image"
    (root / "usr" / "bin").mkdir(parents=True)
    sh = root / "usr" / "bin" / "busybox"
    sh.write_text("#!")
    sh.chmod(0o755)
    (root / "bin").symlink_to("usr/bin")                 # usrmerge, relative
    (root / "usr" / "bin" / "sh").symlink_to("busybox")
    (root / "usr" / "bin" / "ash").symlink_to("/usr/bin/busybox")  # absolute: re-rooted
    (root / "usr" / "bin" / "up").symlink_to("../../../../../usr/bin/busybox")
    (root / "usr" / "bin" / "noexec").write_text("")
    (root / "usr" / "bin" / "loop").symlink_to("loop")
    (root / "usr" / "bin" / "dir").mkdir()
    return root


@pytest.mark.parametrize("shell, problem", [
    ("/bin/sh", ""), ("/usr/bin/ash", ""), ("/bin/up", ""), ("//bin/./sh", ""),
    ("/bin/bash", "is not in the image"), ("/usr/bin/noexec", "is not executable in the image"),
    ("/usr/bin/dir", "is not a file in the image"), ("/usr/bin/loop", "is not in the image"),
    ("/bin/sh/x", "is not in the image"), ("bin/sh", "is not an absolute path"),
])
def test_shell_resolved_inside_the_image(image: Path, shell: str, problem: str) -> None:
    assert shell_problem(str(image), shell) == problem


def test_a_link_out_of_the_image_is_not_followed(image: Path, tmp_path: Path) -> None:
    outside = tmp_path / "host-bash"
    outside.write_text("")
    outside.chmod(0o755)
    (image / "bin" / "bash").symlink_to(str(outside))  # absolute: means /<that> inside
    assert shell_problem(str(image), "/bin/bash") == "is not in the image"
    (image / "usr" / "bin" / "esc").symlink_to("../../../host-bash")
    assert shell_problem(str(image), "/usr/bin/esc") == "is not in the image"


def test_a_shell_under_a_bind_is_not_judged(image: Path) -> None:
    assert shell_problem(str(image), "/cvmfs/sw/bin/bash", ["/cvmfs"]) == ""
    assert shell_problem(str(image), "/cvmfsx/bash", ["/cvmfs"]) == "is not in the image"


def test_a_missing_image_is_the_callers_to_judge(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        shell_problem(str(tmp_path / "none"), "/bin/sh")


def test_refusal_names_the_fix() -> None:
    assert refusal("/chroot/x", "/bin/bash", "is not in the image", True).endswith(
        "submit with a shell the image has, e.g. qsub -S /bin/sh")
    assert "qsub -S PATH" in refusal("/chroot/x", "/bin/bash", "is not in the image", False)


@pytest.mark.parametrize("err, out, join, want", [
    ("vm:/home/u/job.e1", "vm:/home/u/job.o1", "n", "/home/u/job.e1"),
    ("vm:/home/u/job.e1", "vm:/home/u/job.o1", "oe", "/home/u/job.o1"),
    ("vm:/home/u/job.e1", "vm:/home/u/job.o1", "eo", "/home/u/job.e1"),
    ("/home/u/job.e1", "", "", "/home/u/job.e1"),
    ("vm:relative.e1", "", "n", ""), ("", "", "", ""),
])
def test_the_file_the_user_reads(err: str, out: str, join: str, want: str) -> None:
    assert target_path(err, out, join) == want


def test_the_shell_cache_matches_the_whole_key(tmp_path: Path) -> None:
    version = tmp_path / "v1"
    version.mkdir()
    (tmp_path / "c").mkdir()
    cache = shells.ShellCache(str(tmp_path / "c"), str(version), "/proc\0/home")
    key = cache.key("/bin/sh", 1000, 100, [100, 7])
    assert not cache.has(key)
    cache.remember(key)
    assert cache.has(key) and cache.has(cache.key("/bin/sh", 1000, 100, [7, 100, 7]))
    for other in (cache.key("/bin/sh", 1001, 100, [100, 7]),
                  cache.key("/bin/sh", 1000, 100, [100]),
                  cache.key("/bin/bash", 1000, 100, [100, 7]),
                  shells.ShellCache(str(tmp_path / "c"), str(version), "/proc").key(
                      "/bin/sh", 1000, 100, [100, 7])):
        assert not cache.has(other)
    time.sleep(0.02)  # past the clock's tick (ctime is coarse)
    os.chmod(version, 0o700)  # a new ctime: another version for the cache
    assert not cache.has(cache.key("/bin/sh", 1000, 100, [100, 7]))
    (entry,) = os.listdir(tmp_path / "c")
    (tmp_path / "c" / entry).write_text('"shells-v1\\n')  # torn: a miss, never a pass
    assert not cache.has(key)
