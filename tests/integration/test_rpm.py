"""RPM images: dnf --installroot from a real repo, the rpmdb rebuilt by the image's own rpm,
an image version packaged as an RPM and installed, and the RPM of pbs_chroot itself.

The repo is real: packages built here with rpmbuild (busybox-static as the
image's userland), indexed by createrepo_c, installed by the host's dnf.
No old distribution is reachable, so the image's rpm is a stand-in: the
host's own rpm 4.18 binaries and libraries shipped in a package, called
through a wrapper that logs each call (and, in pbsct-rpm-old, claims to be
EL7's rpm 4.11, which has no --importdb, so that the package-file rebuild
is taken). The rpm that rebuilds the database is thus a real one, run
chrooted; only its version number is pretended. Nothing is written outside
tmp_path: rpm databases are given with --dbpath, rpmbuild's top directory
is in tmp_path, and ~/.rpmdb (Debian's default) is checked untouched.
"""
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from pbs_chroot import _sys, rpm
from pbs_chroot.errors import SiteError, UserError
from tests.conftest import REPO, Site, pbs_chroot_cli

TOOLS = ("rpmbuild", "dnf", "createrepo_c", "rpmspec")
MISSING = [t for t in TOOLS if shutil.which(t) is None]

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chroot, rpm installs"),
              # In CI they must be there (scripts/setup installs them): fail, don't skip.
              pytest.mark.skipif(bool(MISSING) and os.environ.get("CI") != "true",
                                 reason=f"missing: {' '.join(MISSING)} (apt-get install rpm dnf "
                                        "createrepo-c)")]

LOG = "var/log/pbsct-rpm.log"
# rpm 4.18's --initdb runs rpmdb, its --import rpmkeys (EL7 has both too).
RPM_BINARIES = ("rpm", "rpmdb", "rpmkeys")
ENV_MARK = "PBSCT_MUST_NOT_LEAK"

# The image's rpm, logging its calls: the first word is the program, then its
# arguments, then its environment.
WRAPPER = """#!/bin/sh
# Stand-in for the image's {what}: a wrapper of the host's real rpm binaries.
echo "${{0##*/}} $* | env: $(/bin/busybox env | /bin/busybox tr '\\n' ' ')" >> /{log}
{body}exec /usr/lib/pbsct-rpm/${{0##*/}} "$@"
"""
OLD_BODY = """case "$1" in
    --version) echo "RPM version 4.11.3"; exit 0 ;;
    --importdb|--exportdb) echo "rpm: --importdb: unknown option" >&2; exit 1 ;;
esac
"""


def spec_text(name: str, install: str, files: str, requires: str = "") -> str:
    return f"""Name: {name}
Version: 1
Release: 1
Summary: pbs_chroot test package {name}
License: MIT
AutoReqProv: no
{requires}
%global __spec_install_post %{{nil}}
%global debug_package %{{nil}}
%global _build_id_links none
%define _binary_payload w.ufdio

%description
pbs_chroot test package.

%install
set -e
R=%{{buildroot}}
{install}

%files
{files}
"""


def rpm_libraries() -> list[str]:
    out = subprocess.run(["ldd", *(f"/usr/bin/{b}" for b in RPM_BINARIES)], capture_output=True,
                         text=True, check=True).stdout
    return sorted({m for m in re.findall(r"(/\S+\.so[.\d]*) \(", out)})


def package_specs(outside: Path) -> dict[str, str]:
    libs = rpm_libraries()
    copy_libs = "\n".join(f"mkdir -p $R{os.path.dirname(p)}; cp -L {p} $R{p}" for p in libs)
    wrapper = WRAPPER.format(what="rpm 4.18", log=LOG, body="")
    old = WRAPPER.format(what="EL7 rpm 4.11 (claimed)", log=LOG, body=OLD_BODY)
    wrappers = "\n".join(f"cp $R/usr/bin/rpm $R/usr/bin/{b}" for b in RPM_BINARIES[1:])
    wrapped = "\n".join(f"/usr/bin/{b}" for b in RPM_BINARIES)
    return {
        "pbsct-base": spec_text("pbsct-base", """
mkdir -p $R/bin $R/etc $R/var/lib $R/var/log $R/tmp $R/root
cp /bin/busybox $R/bin/busybox
ln -s busybox $R/bin/sh
echo 'NAME="pbsct test image"' > $R/etc/os-release
""", "/bin\n/etc/os-release\n%dir /etc\n%dir /var\n%dir /var/lib\n%dir /var/log\n"
                                "%dir /tmp\n%dir /root"),
        "pbsct-rpm-real": spec_text("pbsct-rpm-real", f"""
{copy_libs}
mkdir -p $R/usr/lib/pbsct-rpm $R/usr/lib/rpm/platform/x86_64-linux $R/etc/rpm
cp {" ".join(f"/usr/bin/{b}" for b in RPM_BINARIES)} $R/usr/lib/pbsct-rpm/
cp /usr/lib/rpm/rpmrc /usr/lib/rpm/macros /usr/lib/rpm/rpmpopt-* $R/usr/lib/rpm/
cp /usr/lib/rpm/platform/x86_64-linux/macros $R/usr/lib/rpm/platform/x86_64-linux/
# Like EL's rpm (Debian's looks in ~/.rpmdb, through bash, which the image lacks).
echo '%%_dbpath /var/lib/rpm' > $R/etc/rpm/macros
""", "/usr/lib/pbsct-rpm\n/usr/lib/rpm\n/etc/rpm\n" + "\n".join(libs),
                                    "Requires: pbsct-base"),
        "pbsct-rpm-new": spec_text("pbsct-rpm-new", f"""
mkdir -p $R/usr/bin
cat > $R/usr/bin/rpm <<'EOT'
{wrapper}EOT
chmod 0755 $R/usr/bin/rpm
{wrappers}
""", wrapped, "Requires: pbsct-rpm-real\nConflicts: pbsct-rpm-old"),
        "pbsct-rpm-old": spec_text("pbsct-rpm-old", f"""
mkdir -p $R/usr/bin
cat > $R/usr/bin/rpm <<'EOT'
{old}EOT
chmod 0755 $R/usr/bin/rpm
{wrappers}
""", wrapped, "Requires: pbsct-rpm-real\nConflicts: pbsct-rpm-new"),
        # Symlinks where the conversion works, pointing out of the image (the
        # image's files are read as the host's paths when root writes them).
        "pbsct-evil": spec_text("pbsct-evil", f"""
mkdir -p $R/var/lib
for n in new old pkgs; do ln -s {outside}/$n $R/var/lib/rpm.pbs-chroot-$n; done
""", "/var/lib/rpm.pbs-chroot-*", "Requires: pbsct-base"),
    }


class Repo:
    """A real yum repository of the test packages, and a repo file naming it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.outside = base / "outside"
        self.dir = base / "repo"
        top = base / "rpmbuild"
        for d in (self.outside, self.dir, top / "SPECS"):
            d.mkdir(parents=True)
        for sub in ("new", "old", "pkgs"):
            (self.outside / sub).mkdir()
        self.files: dict[str, str] = {}
        for name, text in package_specs(self.outside).items():
            spec = top / "SPECS" / f"{name}.spec"
            spec.write_text(text)
            self.files[name] = rpm.build_rpm(str(spec), str(top))
            shutil.copy(self.files[name], self.dir)
        subprocess.run(["createrepo_c", "-q", str(self.dir)], check=True)
        self.repo_file = base / "pbsct.repo"
        self.repo_file.write_text(f"[pbsct]\nname=pbs_chroot tests\nbaseurl=file://{self.dir}\n"
                                  "gpgcheck=0\n")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    if MISSING:
        pytest.fail(f"missing: {' '.join(MISSING)} (scripts/setup installs rpm dnf createrepo-c)")
    return Repo(tmp_path_factory.mktemp("rpmrepo"))


@pytest.fixture(autouse=True)
def home_rpmdb_untouched() -> Iterator[None]:
    """Debian's rpm keeps its database in ~/.rpmdb: nothing here may write there.

    (sqlite's -shm index changes when anyone merely reads the database.)
    """
    def snapshot() -> list:
        db = Path(os.path.expanduser("~/.rpmdb"))
        if not db.exists():
            return []
        return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in db.iterdir()
                      if not p.name.endswith("-shm"))
    before = snapshot()
    yield
    assert snapshot() == before, "~/.rpmdb was written"


def guest(root: Path, *argv: str) -> str:
    """Run the image's program chrooted, as the conversion does."""
    res = subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True,
                         env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def host_query(root: Path) -> set[str]:
    out = subprocess.run(["rpm", "--root", str(root), "--dbpath", "/var/lib/rpm", "-qa", "--qf",
                          "%{NAME}\\n"], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def calls(root: Path) -> list[str]:
    """The image's rpm calls, without their environment."""
    log = root / LOG
    return [line.split(" | env:")[0] for line in log.read_text().splitlines()] \
        if log.exists() else []


def fresh(tmp_path: Path, name: str = "root") -> Path:
    d = tmp_path / name
    d.mkdir(mode=0o755)
    return d


def test_installroot_with_a_new_rpm_imports_the_exported_headers(
        repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_MARK, "1")
    root = fresh(tmp_path)
    assert rpm.installroot(str(root), str(repo.repo_file), ["pbsct-base", "pbsct-rpm-new"],
                           "7") == []
    assert calls(root) == [
        "rpm --version", "rpm --eval %{_dbpath}",
        "rpmdb --importdb --dbpath /var/lib/rpm.pbs-chroot-new",
        "rpm -qa --dbpath /var/lib/rpm.pbs-chroot-new --qf %{NAME} %{EPOCH} %{VERSION} "
        "%{RELEASE} %{ARCH}\\n",
        "rpm -qa --qf %{NAME} %{EPOCH} %{VERSION} %{RELEASE} %{ARCH}\\n"]
    log = (root / LOG).read_text()
    assert ENV_MARK not in log and "PATH=/usr/sbin:/usr/bin:/sbin:/bin" in log
    assert guest(root, "/bin/sh", "-c", "echo ok") == "ok\n"
    # Where the image's rpm looks, not Debian's ~/.rpmdb below the root.
    assert (root / "var/lib/rpm/rpmdb.sqlite").is_file()
    assert not (root / "root/.rpmdb").exists() and os.listdir(root / "root") == []
    assert guest(root, "rpm", "--eval", "%{_dbpath}") == "/var/lib/rpm\n"
    names = {"pbsct-base", "pbsct-rpm-real", "pbsct-rpm-new"}
    assert set(guest(root, "rpm", "-qa", "--qf", "%{NAME}\\n").split()) == names
    assert host_query(root) == names
    assert sorted(n for n in os.listdir(root / "var/lib") if n.startswith("rpm")) == ["rpm"]
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temp files
    assert os.listdir(root / "var/cache/dnf") == []  # no repo metadata in the image


def test_installroot_with_an_old_rpm_rebuilds_from_the_package_files(
        repo: Repo, tmp_path: Path) -> None:
    root = fresh(tmp_path)
    assert rpm.installroot(str(root), str(repo.repo_file),
                           ["pbsct-base", "pbsct-rpm-old", "pbsct-evil"], "7") == []
    done = calls(root)
    assert "rpm --initdb --dbpath /var/lib/rpm.pbs-chroot-new" in done
    justdb = [c for c in done if c.startswith("rpm -i --justdb")]
    assert len(justdb) == 1 and justdb[0].count(".rpm") == 4  # the four packages
    assert not any("importdb" in c for c in done)
    names = {"pbsct-base", "pbsct-rpm-real", "pbsct-rpm-old", "pbsct-evil"}
    assert set(guest(root, "rpm", "-qa", "--qf", "%{NAME}\\n").split()) == names
    # The image's symlinks in the way were removed, never written through.
    for sub in ("new", "old", "pkgs"):
        assert os.listdir(repo.outside / sub) == []
        assert not os.path.lexists(root / f"var/lib/rpm.pbs-chroot-{sub}")


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_repo(repo: Repo, tmp_path: Path) -> Iterator[Path]:
    """The repo served over HTTP (in a thread of this process), and a repo file naming it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(repo.dir)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    repo_file = tmp_path / "http.repo"
    repo_file.write_text(f"[pbsct-http]\nname=x\nbaseurl=http://127.0.0.1:{server.server_port}/"
                         "\ngpgcheck=0\n")
    yield repo_file
    server.shutdown()
    server.server_close()
    thread.join()


def test_downloaded_packages_are_kept_for_the_rebuild(http_repo: Path, tmp_path: Path) -> None:
    root = fresh(tmp_path)
    assert rpm.installroot(str(root), str(http_repo), ["pbsct-rpm-old"], "7") == []
    assert any(c.startswith("rpm -i --justdb") and c.count(".rpm") == 3 for c in calls(root))
    assert set(guest(root, "rpm", "-qa", "--qf", "%{NAME}\\n").split()) == {
        "pbsct-base", "pbsct-rpm-real", "pbsct-rpm-old"}
    assert os.listdir(root / "var/cache/dnf") == []


# A key dnf would have imported for a signed repo (any OpenPGP key will do).
KEY = "/etc/apt/trusted.gpg.d/debian-archive-bookworm-stable.asc"


@pytest.mark.parametrize("guest_rpm, how", [
    ("pbsct-rpm-new", "rpmdb --importdb"), ("pbsct-rpm-old", "rpm --import")])
def test_gpg_keys_survive_the_rebuild(repo: Repo, tmp_path: Path, guest_rpm: str,
                                      how: str) -> None:
    root = fresh(tmp_path)
    assert rpm.installroot(str(root), str(repo.repo_file), [guest_rpm], "7") == []
    subprocess.run(["rpm", "--root", str(root), "--dbpath", "/var/lib/rpm", "--import", KEY],
                   check=True)
    before = host_query(root)
    assert "gpg-pubkey" in before
    pkgs = [repo.files[p] for p in ("pbsct-base", "pbsct-rpm-real", guest_rpm)]
    assert rpm.convert_rpmdb(str(root), pkgs) == []
    assert any(c.startswith(f"{how} --dbpath /var/lib/rpm.pbs-chroot-new") for c in calls(root))
    assert set(guest(root, "rpm", "-qa", "--qf", "%{NAME}\\n").split()) == before


def test_a_rebuild_missing_a_package_changes_nothing(repo: Repo, tmp_path: Path) -> None:
    root = fresh(tmp_path)
    assert rpm.installroot(str(root), str(repo.repo_file), ["pbsct-rpm-old"], "7") == []
    before = host_query(root)
    with pytest.raises(SiteError, match="differs from the installed set: pbsct-base"):
        rpm.convert_rpmdb(str(root), [repo.files["pbsct-rpm-real"], repo.files["pbsct-rpm-old"]])
    assert host_query(root) == before
    assert sorted(n for n in os.listdir(root / "var/lib") if n.startswith("rpm")) == ["rpm"]


def test_an_image_without_rpm_keeps_the_host_database_with_a_warning(
        repo: Repo, tmp_path: Path) -> None:
    root = fresh(tmp_path)
    warnings = rpm.installroot(str(root), str(repo.repo_file), ["pbsct-base"], "7")
    assert len(warnings) == 1 and "has no rpm of its own" in warnings[0], warnings
    assert host_query(root) == {"pbsct-base"}


def test_a_missing_package_is_named_and_the_user_told_what_to_fix(
        repo: Repo, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no package pbsct-nosuch in the repos of .*pbsct\.repo: "
                                        r"check the name, or add the repo that has it"):
        rpm.installroot(str(fresh(tmp_path)), str(repo.repo_file),
                        ["pbsct-base", "pbsct-nosuch"], "7")


@pytest.mark.parametrize("content, error", [
    (None, r"can't read repo file .*: No such file or directory: give the \.repo file"),
    ("baseurl=file:///x\n", r"is not a repo file: File contains no section headers"),
    ("[main]\ngpgcheck=0\n", r"defines no enabled repository: add a \[name\] section"),
    ("[x]\nname=x\nbaseurl=file:///x\nenabled=0\n", r"defines no enabled repository"),
    ("[x]\nname=x\nbaseurl=file:///nonexistent/repo\ngpgcheck=0\n",
     r"can't read repo 'x' of .*: check its baseurl/mirrorlist and that this host reaches it"),
])
def test_bad_repo_files_are_user_errors(repo: Repo, tmp_path: Path, content: str,
                                        error: str) -> None:
    repo_file = tmp_path / "bad.repo"
    if content is not None:
        repo_file.write_text(content)
    with pytest.raises(UserError, match=error):
        rpm.installroot(str(fresh(tmp_path)), str(repo_file), ["pbsct-base"], "7")


def test_unsigned_packages_need_gpgcheck_off_or_a_key(repo: Repo, tmp_path: Path) -> None:
    repo_file = tmp_path / "signed.repo"
    repo_file.write_text(f"[pbsct]\nname=x\nbaseurl=file://{repo.dir}\n")  # gpgcheck: ours
    with pytest.raises(UserError, match=r"can't verify the packages of repo 'pbsct' in .*: "
                                        r"give its key"):
        rpm.installroot(str(fresh(tmp_path)), str(repo_file), ["pbsct-base"], "7")


def test_bad_requests_and_missing_tools(repo: Repo, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    root = fresh(tmp_path)
    (root / "x").touch()
    for dest, pkgs, error in ((str(root), ["pbsct-base"], "not an empty directory"),
                              ("relative", ["pbsct-base"], "give an absolute path"),
                              (str(fresh(tmp_path, "r2")), ["--all"], "not a package name"),
                              (str(tmp_path / "r2"), [], "no packages to install")):
        with pytest.raises(UserError, match=error):
            rpm.installroot(dest, str(repo.repo_file), pkgs, "7")
    monkeypatch.setattr(rpm, "_PATH", str(tmp_path / "r2"))
    with pytest.raises(SiteError, match="neither dnf nor yum is installed"):
        rpm.installroot(str(tmp_path / "r2"), str(repo.repo_file), ["pbsct-base"], "7")
    with pytest.raises(SiteError, match="rpmbuild is not installed .* Debian: the rpm package"):
        rpm.build_rpm(str(tmp_path / "x.spec"), str(tmp_path / "top"))


# --- an image version as an RPM ---------------------------------------------------

def make_version(site: Site, name: str) -> Path:
    """A copy of the site's version with what an RPM payload must get right."""
    v = site.versions / name
    subprocess.run(["cp", "-a", str(site.version), str(v)], check=True)
    # (New names: the image's applets are symlinks to /bin/busybox, which a
    # write from the host would follow to the host's busybox.)
    (v / "usr/bin/pbsct-wall").write_text("#!/bin/sh\n")
    os.chown(v / "usr/bin/pbsct-wall", 0, 5)    # root:tty 2755, as EL ships wall
    os.chmod(v / "usr/bin/pbsct-wall", 0o2755)
    os.symlink("pbsct-wall", v / "usr/bin/pbsct-write")
    os.lchown(v / "usr/bin/pbsct-write", 0, 12)  # a group on a symlink
    os.link(v / "etc/os-release", v / "etc/os-release.hard")
    os.mkfifo(v / "tmp/fifo")
    os.mknod(v / "dev/pbsct-null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return v


def listing(root: Path) -> dict[str, tuple]:
    """What the payload must keep: types, modes, owners, sizes, link targets, hard links."""
    found = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(top, name)
            st = os.lstat(p)
            found[os.path.relpath(p, root)] = (
                stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                st.st_size if stat.S_ISREG(st.st_mode) else 0,
                os.readlink(p) if stat.S_ISLNK(st.st_mode) else "",
                st.st_nlink if not stat.S_ISDIR(st.st_mode) else 0)
    return found


class RpmDb:
    """rpm -i/-e into the real file system, with a database of the test's own."""

    def __init__(self, tmp_path: Path) -> None:
        self.db = tmp_path / "rpmdb"
        self.tmp = tmp_path / "rpmtmp"
        self.tmp.mkdir()

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(["rpm", "--dbpath", str(self.db), "--define",
                              f"_tmppath {self.tmp}", "--nodeps", *args],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 or not check, res.stderr
        return res

    def query(self, *args: str) -> list[str]:
        # (--dbpath: even a query of a package file opens a database, for its keys.)
        return subprocess.run(["rpm", "--dbpath", str(self.db), "-q", *args], check=True,
                              capture_output=True, text=True).stdout.splitlines()


def build_image_rpm(site: Site, tmp_path: Path, version: str, **kw: object) -> str:
    spec = rpm.write_image_spec("sl5", version, str(site.image), str(site.versions),
                                str(tmp_path), **kw)  # type: ignore[arg-type]
    assert os.path.basename(spec) == f"pbs-chroot-image-sl5-{version}.spec"
    return rpm.build_rpm(spec, str(tmp_path / "rpmbuild"))


def test_image_rpm_first_install_links_the_image_and_keeps_the_tree(
        site: Site, tmp_path: Path) -> None:
    v2 = make_version(site, "v2")
    want = {k: v for k, v in listing(v2).items() if k not in ("dev/pbsct-null", "tmp/fifo")}
    pkg = build_image_rpm(site, tmp_path, "v2", cli=(str(tmp_path / "no-pbs-chroot"),))
    shutil.rmtree(v2)                           # a node that never had it...
    site.image.unlink()                         # ...nor the image
    rpm_ = RpmDb(tmp_path)
    rpm_("-i", pkg)
    assert os.readlink(site.image) == str(v2)
    assert listing(v2) == want                  # groups by number, set-gid bit, links
    assert not os.path.lexists(v2 / "dev/pbsct-null")  # devices and FIFOs left out
    assert not os.path.lexists(v2 / "tmp/fifo")
    assert stat.S_IMODE(os.stat(site.versions).st_mode) == 0o700
    assert [n for n in os.listdir(site.image.parent) if n != "sl5"] == []
    # Erasing the current version is refused; after a switch away, it goes.
    res = rpm_("-e", "pbs-chroot-image-sl5-v2", check=False)
    assert res.returncode != 0 and f"{site.image} points to {v2}: not erased" in res.stderr
    assert (v2 / "bin/busybox").exists()
    site.image.unlink()
    site.image.symlink_to(site.version)
    rpm_("-e", "pbs-chroot-image-sl5-v2")
    assert not v2.exists() and site.version.is_dir()
    assert stat.S_IMODE(os.stat(site.versions).st_mode) == 0o700


def test_image_rpm_without_pbs_chroot_renames_a_new_link_over_the_old(
        site: Site, tmp_path: Path) -> None:
    v3 = make_version(site, "v3")
    # Built while staged: the node's trees mounted in the version are no payload.
    host = tmp_path / "host-home"
    host.mkdir()
    (host / "host-secret").touch()
    (v3 / "mnt").mkdir()
    _sys.mount(str(host), str(v3 / "mnt"), None, _sys.MS_BIND)
    try:
        pkg = build_image_rpm(site, tmp_path, "v3", cli=(str(tmp_path / "no-pbs-chroot"),))
    finally:
        _sys.umount2(str(v3 / "mnt"), 0)
    rpm_ = RpmDb(tmp_path)
    payload = rpm_.query("-lp", pkg)
    assert f"{v3}/mnt" in payload and f"{v3}/etc/os-release" in payload
    assert not [p for p in payload if "host-secret" in p]
    rpm_("-i", pkg)
    assert os.readlink(site.image) == str(v3)
    site.image.unlink()
    site.image.symlink_to(site.version)
    # A job's stage binds the version onto itself: erasing it is refused then.
    _sys.mount(str(v3), str(v3), None, _sys.MS_BIND)
    try:
        res = rpm_("-e", "pbs-chroot-image-sl5-v3", check=False)
    finally:
        _sys.umount2(str(v3), 0)
    assert res.returncode != 0 and f"{v3} is mounted (a job's stage): not erased" in res.stderr
    rpm_("-e", "pbs-chroot-image-sl5-v3")
    # The tree was here before the RPM (the host it was built on): what was not
    # payload stays.
    assert set(listing(v3)) == {"dev", "dev/pbsct-null", "tmp", "tmp/fifo"}


def test_image_rpm_switches_through_pbs_chroot_when_installed(
        site: Site, tmp_path: Path) -> None:
    site.write_config()
    log = tmp_path / "cli.args"
    cli = tmp_path / "pbs-chroot"               # the real CLI, its arguments recorded
    cli.write_text(f'#!/bin/sh\necho "$@" > {log}\nexec {sys.executable} -m pbs_chroot "$@"\n')
    cli.chmod(0o755)
    v4 = make_version(site, "v4")
    pkg = build_image_rpm(site, tmp_path, "v4", cli=(str(tmp_path / "absent"), str(cli)),
                          config=str(site.config))
    RpmDb(tmp_path)("-i", pkg)
    assert log.read_text().split() == ["--config", str(site.config), "image", "rollback",
                                       str(site.image), str(v4)]
    assert os.readlink(site.image) == str(v4)
    listed = pbs_chroot_cli("--config", str(site.config), "image", "list", "sl5").stdout
    assert "* v4" in listed


def test_image_spec_refusals(site: Site, tmp_path: Path) -> None:
    args = (str(site.image), str(site.versions), str(tmp_path))
    for name, version, error in (("sl 5", "v1", "image name 'sl 5'"),
                                 ("sl5", "../v1", "image version '../v1'"),
                                 ("sl5", "v9", "no such version directory")):
        with pytest.raises(UserError, match=error):
            rpm.write_image_spec(name, version, *args)
    with pytest.raises(UserError, match="plain absolute path"):
        rpm.write_image_spec("sl5", "v1", "/chroot/../etc", *args[1:])
    os.chown(site.version / "etc/os-release", 1000, 0)
    with pytest.raises(UserError, match=r"etc/os-release: owned by uid 1000: .* image audit"):
        rpm.write_image_spec("sl5", "v1", *args)


# --- pbs_chroot's own RPM ---------------------------------------------------------

BUILD_PYTHON = "/usr/bin/python3"


def test_project_spec_builds_a_working_rpm_from_the_sdist(tmp_path: Path) -> None:
    if subprocess.run([BUILD_PYTHON, "-c", "import setuptools, wheel, pip"],
                      capture_output=True).returncode != 0:
        message = ("the spec's BuildRequires are missing: apt-get install python3-pip "
                   "python3-setuptools python3-wheel")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    spec = REPO / "packaging" / "pbs_chroot.spec"
    parsed = subprocess.run(["rpmspec", "-P", str(spec)], capture_output=True, text=True,
                            check=True).stdout
    version = re.search(r"^version = (\S+)$", (REPO / "setup.cfg").read_text(), re.M)
    assert version and re.search(rf"^Version:\s+{re.escape(version.group(1))}$", parsed, re.M)
    # The sdist of the working tree (new files included), built away from the checkout.
    src, top = tmp_path / "src", tmp_path / "rpmbuild"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
    (top / "SOURCES").mkdir(parents=True)
    # The interpreter the spec builds with (%{python3}), which has setuptools
    # (venvs of Python >= 3.12 have not).
    subprocess.run([BUILD_PYTHON, "-c", "import sys; from setuptools import build_meta as b; "
                    "b.build_sdist(sys.argv[1])", str(top / "SOURCES")], cwd=src, check=True,
                   capture_output=True)
    pkg = rpm.build_rpm(str(spec), str(top))
    # Not noarch: it carries the static job starters.
    assert re.search(rf"pbs_chroot-{re.escape(version.group(1))}-1\.[a-z0-9_]+\.rpm$", pkg)
    assert not pkg.endswith(".noarch.rpm")

    query = RpmDb(tmp_path).query
    assert "python3-psutil" in query("-p", "--requires", pkg)
    entries = {line.split()[0]: line.split()[1:] for line in query(
        "-p", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}. %{FILEMODES:perms} %{FILEUSERNAME}\\n]",
        pkg)}
    assert entries["/etc/pbs_chroot/pbs_chroot.conf"] == ["cn.", "-rw-r--r--", "root"]
    names = set(entries)
    for module in ("rpm.py", "admin.py", "cgroups/v2.py"):  # (cgroups: a subpackage)
        assert any(n.endswith(f"/pbs_chroot/{module}") for n in names), module
    assert {os.path.basename(n) for n in names if "/bin/" in n} == {"pbs-chroot",
                                                                    "pbs-chroot-shim"}
    assert any(n.endswith("/examples/pbs_chroot.conf") and "/doc/" in n for n in names)
    for name, perms in (("job_starter", "-rwx--x--x"), ("job_starter-nnp", "-rwx--x--x"),
                        ("hook_client", "-rwx------")):  # (install copies it: hook server)
        assert entries[f"/usr/libexec/pbs_chroot/{name}"] == [".", perms, "root"]


def test_image_build_installroot_through_the_cli(repo: Repo, site: Site) -> None:
    """`pbs-chroot image build --installroot`: a new version with the stage's mount
    points, its database converted, audited, deployable."""
    from tests.conftest import mount_points
    site.write_config()
    before = mount_points()
    res = pbs_chroot_cli("--config", str(site.config), "image", "build", "sl5", "--installroot",
                         "--repo", str(repo.repo_file), "--package", "pbsct-base",
                         "--package", "pbsct-rpm-new", check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    version = res.stdout.strip().splitlines()[-1].split()[1].rstrip(";")
    assert os.path.dirname(version) == str(site.versions)
    assert guest(Path(version), "/bin/sh", "-c", "echo ok") == "ok\n"
    assert (Path(version) / "var/lib/rpm/rpmdb.sqlite").is_file()
    for mount_point in ("proc", "sys", "dev/pts", "etc/passwd"):
        assert os.path.lexists(Path(version) / mount_point), mount_point
    assert not [n for n in os.listdir(site.versions) if n.startswith(".incoming")]
    assert mount_points() == before
