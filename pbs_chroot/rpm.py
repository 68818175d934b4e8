"""RPM images: fill a version with dnf --installroot; package a version as an RPM.

Run as root by the admin (`pbs-chroot image build --installroot`, and sites
whose configuration systems deploy RPMs), never by the hooks. Trusts its
arguments and the host's dnf, yum and rpm. The tree dnf writes is trusted
only as far as running the image's own rpm chrooted in it (dnf has already
run the image's scriptlets there as root); a symlink in it is never followed
when this module writes.

The host's rpm writes its own database format (sqlite on rpm >= 4.16, also
Debian's), which an older image's rpm (Berkeley DB: EL5 to EL8) cannot read.
convert_rpmdb() therefore rebuilds the database with the image's own rpm,
from a form both understand: the host's exported headers for an image rpm
>= 4.16 (`rpmdb --exportdb | rpmdb --importdb`), else the package files dnf
installed from (`rpm -i --justdb`, the one way in every rpm since 4.0).
An image version is packaged as an RPM by write_image_spec() (in rpmspec)
and build_rpm().
"""
import configparser
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from contextlib import ExitStack
from typing import IO, Any, NamedTuple, Optional, Sequence, Union

from .errors import PbsChrootError, SiteError, UserError
from .paths import open_in_root
from .rpmspec import DEFAULT_CLI, write_image_spec

__all__ = ["installroot", "convert_rpmdb", "write_image_spec", "build_rpm", "DEFAULT_CLI"]

_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_DBPATH = "/var/lib/rpm"                       # where EL5 to EL9's rpm looks
_NEW, _OLD, _PKGS = "rpm.pbs-chroot-new", "rpm.pbs-chroot-old", "rpm.pbs-chroot-pkgs"
_QUERY = "%{NAME} %{EPOCH} %{VERSION} %{RELEASE} %{ARCH}\\n"   # every rpm has these tags
_EXPORTDB = (4, 16)                            # rpmdb --exportdb/--importdb appeared in 4.16
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _Result(NamedTuple):
    code: int
    out: str
    err: str


def installroot(dest: str, repo_file: str, packages: Sequence[str], releasever: str,
                timeout: float = 3600.0) -> list[str]:
    """Install ``packages`` into the empty directory ``dest``; return warnings to print.

    Only the repos of ``repo_file`` are used (it is dnf's config file; the
    host's repos, variables and plugins are not), with gpgcheck on unless a
    repo says otherwise. The database lands in dest/var/lib/rpm (Debian's rpm
    would put it in dest/root/.rpmdb) and is then rebuilt by the image's own
    rpm (convert_rpmdb). On an error dest is left partly filled: remove it.
    """
    deadline = time.monotonic() + timeout
    tool = _which("dnf") or _which("yum")
    if tool is None:
        raise SiteError("can't build an RPM image: neither dnf nor yum is installed "
                        "(Debian: apt-get install dnf)")
    _check_request(dest, packages, releasever)
    dest = os.path.normpath(dest)
    _check_repo_file(repo_file)
    try:
        return _installroot(tool, dest, repo_file, packages, releasever, deadline)
    except OSError as e:
        raise SiteError(f"can't install into {dest}: {e}") from e


def _installroot(tool: str, dest: str, repo_file: str, packages: Sequence[str],
                 releasever: str, deadline: float) -> list[str]:
    # Beside dest, not in /tmp: the packages are as big as the image.
    tmp = tempfile.mkdtemp(prefix=".pbs-chroot-rpm.", dir=os.path.dirname(dest))
    try:
        for sub in ("home", "empty", "packages"):
            os.mkdir(os.path.join(tmp, sub), 0o700)
        # rpm reads ~/.rpmmacros: the override holds for this run only.
        with open(os.path.join(tmp, "home", ".rpmmacros"), "w") as f:
            f.write(f"%_dbpath {_DBPATH}\n")
        argv = _installer_argv(tool, dest, repo_file, packages, releasever, tmp)
        res = _run(argv, deadline, f"run {os.path.basename(tool)}",
                   _env(HOME=os.path.join(tmp, "home")))
        if res.code != 0:
            raise _installer_error(res, tool, repo_file, packages)
        _check_dbpath(dest)
        kept = os.path.join(tmp, "packages")
        files = sorted(os.path.join(kept, n) for n in os.listdir(kept) if n.endswith(".rpm"))
        warnings = convert_rpmdb(dest, files, timeout=deadline - time.monotonic())
        _drop_caches(dest)
        return warnings
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_request(dest: str, packages: Sequence[str], releasever: str) -> None:
    if not os.path.isabs(dest):
        raise UserError(f"{dest}: give an absolute path to install into")
    try:
        st = os.lstat(dest)
        empty = not os.listdir(dest) if stat.S_ISDIR(st.st_mode) else False
    except OSError as e:
        raise UserError(f"can't install into {dest}: {e.strerror}") from e
    if not empty:
        raise UserError(f"can't install into {dest}: not an empty directory")
    if not packages:
        raise UserError("no packages to install: name at least one")
    for pkg in packages:
        if not pkg or pkg.startswith("-") or any(c.isspace() for c in pkg):
            raise UserError(f"{pkg!r} is not a package name")
    if not releasever or "/" in releasever or any(c.isspace() for c in releasever):
        raise UserError(f"{releasever!r} is not a release version (e.g. 7)")


def _check_repo_file(repo_file: str) -> None:
    """Refuse a repo file dnf would read as no repos, or not at all."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        with open(repo_file, encoding="utf-8", errors="replace") as f:
            parser.read_file(f)
    except OSError as e:
        raise UserError(f"can't read repo file {repo_file}: {e.strerror}: give the .repo "
                        "file with the repositories to install from") from e
    except configparser.Error as e:
        raise UserError(f"{repo_file} is not a repo file: {str(e).splitlines()[0]}") from e
    repos = [s for s in parser.sections() if s != "main"
             and parser[s].get("enabled", "1").strip() not in ("0", "false", "False", "no")
             and any(parser[s].get(k, "").strip() for k in ("baseurl", "mirrorlist", "metalink"))]
    if not repos:
        raise UserError(f"{repo_file} defines no enabled repository: add a [name] section "
                        "with baseurl=, mirrorlist= or metalink=")


def _installer_argv(tool: str, dest: str, repo_file: str, packages: Sequence[str],
                    releasever: str, tmp: str) -> list[str]:
    argv = [tool, "-y", f"--installroot={dest}", f"--releasever={releasever}",
            f"--config={os.path.abspath(repo_file)}", "--noplugins",
            # A path given here is the host's, even with --installroot.
            f"--setopt=reposdir={tmp}/empty", "--setopt=gpgcheck=True",
            "--setopt=skip_if_unavailable=False",
            # The package files, for an old image rpm to rebuild its database
            # from: downloaded ones stay in dest's cache (keepcache), dnf copies
            # those of file:// repos to destdir.
            "--setopt=keepcache=True"]
    if os.path.basename(tool) == "dnf":
        argv += [f"--setopt=varsdir={tmp}/empty", f"--setopt=destdir={tmp}/packages",
                 "--setopt=install_weak_deps=False"]
    return argv + ["install", *packages]


def _installer_error(res: _Result, tool: str, repo_file: str,
                     packages: Sequence[str]) -> PbsChrootError:
    out = f"{res.out}\n{res.err}"
    missing = [p for p in packages
               if re.search(rf"(No match for argument: |No package ){re.escape(p)}(?=\s|$)", out)]
    if missing:
        return UserError(f"no package {', '.join(missing)} in the repos of {repo_file}: "
                         "check the name, or add the repo that has it")
    repo = re.search(r"Failed to download metadata for repo '([^']*)'|"
                     r"Cannot retrieve repository metadata \(repomd\.xml\) for repository: "
                     r"(\S+)", out)
    if repo:
        return UserError(f"can't read repo {repo.group(1) or repo.group(2)!r} of {repo_file}: "
                         f"check its baseurl/mirrorlist and that this host reaches it "
                         f"({_tail(res.err, 2)})")
    if re.search(r"GPG public keys|GPG check FAILED|Public key for .* is not installed", out):
        where = re.search(r"Problem repository: \[([^\]]*)\]", out)
        repo_name = f" of repo {where.group(1)!r}" if where else ""
        return UserError(f"can't verify the packages{repo_name} in {repo_file}: give its key "
                         "(gpgkey=file:///...) or, for a repository you trust unsigned, "
                         "gpgcheck=0")
    return SiteError(f"{os.path.basename(tool)} failed (exit {res.code}): "
                     f"{_tail(res.err or res.out)}")


def _check_dbpath(dest: str) -> None:
    """The database must be where the image's rpm looks, and nowhere else."""
    st = os.lstat(dest + _DBPATH) if os.path.lexists(dest + _DBPATH) else None
    if st is None or not stat.S_ISDIR(st.st_mode):
        raise SiteError(f"the installer left no rpm database in {dest}{_DBPATH} (was the "
                        "%_dbpath of ~/.rpmmacros ignored?)")


def convert_rpmdb(dest: str, package_files: Sequence[str] = (),
                  timeout: float = 600.0) -> list[str]:
    """Rebuild the rpm database of the tree ``dest`` with the tree's own rpm; return warnings.

    The new database is built beside the old one, checked to hold exactly the
    packages (and keys) the host's rpm reads in the old one, and only then
    renamed into place. When either rpm is older than 4.16 it is rebuilt from
    the package files dest was installed from: ``package_files`` (on the
    host) and those kept in dest's dnf or yum cache. No rpm in dest, or no
    way to convert, leaves the host's database and says so in a warning.
    """
    deadline = time.monotonic() + timeout
    dest = os.path.normpath(dest)
    try:
        return _convert(dest, package_files, deadline)
    except OSError as e:
        raise SiteError(f"can't rebuild the rpm database of {dest}: {e}") from e


def _convert(dest: str, package_files: Sequence[str], deadline: float) -> list[str]:
    host_rpm = _which("rpm")
    if host_rpm is None:
        raise SiteError("can't convert the rpm database: rpm is not installed on this host")
    host = _version(_run([host_rpm, "--version"], deadline, "run rpm", _env()).out)
    try:
        guest_out = _guest(dest, ["rpm", "--version"], deadline)
    except FileNotFoundError:
        return [f"{dest} has no rpm of its own: its package database stays in the format of "
                f"this host's rpm {'.'.join(map(str, host))}, which the image's tools may "
                "not read"]
    guest = _version(guest_out)
    where = _guest(dest, ["rpm", "--eval", "%{_dbpath}"], deadline).strip()
    if where != _DBPATH:
        return [f"the rpm of {dest} keeps its database in {where}, not {_DBPATH}: "
                "left in the host's format"]
    query = [host_rpm, "--root", dest, "--dbpath", _DBPATH, "-qa", "--qf", _QUERY]
    want = _lines(_run(query, deadline, "query the rpm database", _env(), check=True).out)
    cached = _cached_packages(dest)
    if min(host, guest) < _EXPORTDB and not (package_files or cached):
        return [f"the rpm of {dest} ({'.'.join(map(str, guest))}) may not read its database "
                "and there are no package files to rebuild it from: left in the host's format"]
    with ExitStack() as undo:
        lib = _open_in(dest, "var/lib", undo)
        for name in (_NEW, _OLD, _PKGS):
            _remove(lib, name)  # left by a killed run, or planted
        _make_dir(lib, _NEW)
        undo.callback(_remove, lib, _NEW)
        if min(host, guest) >= _EXPORTDB:
            _import_headers(dest, host_rpm, deadline, undo)
        else:
            _install_justdb(dest, lib, host_rpm, (package_files, cached), want, deadline,
                            undo)
        _check_same(want, dest, ["--dbpath", f"/var/lib/{_NEW}"], deadline)
        _swap(lib)
        _check_same(want, dest, [], deadline)  # where the image's rpm looks by itself
    return []


def _swap(lib: int) -> None:
    """The new database in place of the old one, which is then removed."""
    os.rename("rpm", _OLD, src_dir_fd=lib, dst_dir_fd=lib)
    try:
        os.rename(_NEW, "rpm", src_dir_fd=lib, dst_dir_fd=lib)
    except OSError:
        os.rename(_OLD, "rpm", src_dir_fd=lib, dst_dir_fd=lib)
        raise
    _remove(lib, _OLD)


def _import_headers(dest: str, host_rpm: str, deadline: float, undo: ExitStack) -> None:
    """Host: export the headers (a stream any rpm >= 4.16 reads); image: import them."""
    fd, export = tempfile.mkstemp(prefix=".pbs-chroot-rpmdb.", dir=os.path.dirname(dest))
    undo.callback(os.unlink, export)
    with os.fdopen(fd, "w+b") as f:
        argv = [_which("rpmdb") or "rpmdb", "--root", dest, "--dbpath", _DBPATH, "--exportdb"]
        _run(argv, deadline, "export the rpm database", _env(), stdout=f, check=True)
        f.seek(0)
        _guest(dest, ["rpmdb", "--importdb", "--dbpath", f"/var/lib/{_NEW}"], deadline, stdin=f)


def _install_justdb(dest: str, lib: int, host_rpm: str,
                    files: tuple[Sequence[str], Sequence[str]], want: set[str],
                    deadline: float, undo: ExitStack) -> None:
    """Image: record the package files dest came from, and the keys, in a new database."""
    _make_dir(lib, _PKGS)
    undo.callback(_remove, lib, _PKGS)
    keys, pkgs = _copy_in(dest, lib, host_rpm, files, want, deadline)
    new = ["--dbpath", f"/var/lib/{_NEW}"]
    _guest(dest, ["rpm", "--initdb", *new], deadline)
    if keys:
        _guest(dest, ["rpm", "--import", *new, *keys], deadline)
    # dnf checked the files; their payload is in place already (--justdb) and
    # their scripts have run (--noscripts).
    _guest(dest, ["rpm", "-i", "--justdb", "--nodeps", "--noscripts", "--notriggers",
                  "--nosignature", "--ignoresize", "--ignorearch", "--ignoreos",
                  *new, *pkgs], deadline)


def _copy_in(dest: str, lib: int, host_rpm: str, files: tuple[Sequence[str], Sequence[str]],
             want: set[str], deadline: float) -> tuple[list[str], list[str]]:
    """Write the old database's keys and the host's package files into dest's _PKGS;
    return their paths in dest, and the package files already in dest (files[1])."""
    inside = f"/var/lib/{_PKGS}"
    keys = []
    found: dict[str, str] = {}
    with ExitStack() as close:
        fd = open_in_root(lib, _PKGS)
        close.callback(os.close, fd)
        names = sorted("gpg-pubkey-{2}-{3}".format(*w.split()) for w in want
                       if w.startswith("gpg-pubkey "))
        for i, key in enumerate(names):
            text = _run([host_rpm, "--root", dest, "--dbpath", _DBPATH, "-q", key, "--qf",
                         "%{DESCRIPTION}\\n"], deadline, "read a key", _env(), check=True)
            _write_in(fd, f"key-{i}.asc", text.out.encode())
            keys.append(f"{inside}/key-{i}.asc")
        for path in files[0]:
            name = os.path.basename(path)
            if name not in found:
                with open(path, "rb") as src:
                    _write_in(fd, name, src)
                found[name] = f"{inside}/{name}"
    for path in files[1]:
        found.setdefault(os.path.basename(path), path)
    return keys, sorted(found.values())


def _cached_packages(dest: str) -> list[str]:
    """Paths in dest of the package files its dnf or yum cache kept (keepcache)."""
    found: list[str] = []
    with ExitStack() as undo:
        for top in ("var/cache/dnf", "var/cache/yum"):
            try:
                fd = _open_in(dest, top, undo)
            except FileNotFoundError:
                continue
            found += _find_rpms(fd, f"/{top}", 4)  # yum: ARCH/RELEASEVER/REPO/packages
    return sorted(found)


def _find_rpms(dir_fd: int, where: str, depth: int) -> list[str]:
    fd = os.open(".", _DIR, dir_fd=dir_fd)
    try:
        entries = list(os.scandir(fd))
    finally:
        os.close(fd)
    found = []
    for entry in entries:
        if entry.is_dir(follow_symlinks=False) and depth > 0:
            sub = os.open(entry.name, _DIR, dir_fd=dir_fd)
            try:
                found += _find_rpms(sub, f"{where}/{entry.name}", depth - 1)
            finally:
                os.close(sub)
        elif where.endswith("/packages") and entry.name.endswith(".rpm") \
                and entry.is_file(follow_symlinks=False):
            found.append(f"{where}/{entry.name}")
    return found


def _check_same(want: set[str], dest: str, dbpath: list[str], deadline: float) -> None:
    got = _lines(_guest(dest, ["rpm", "-qa", *dbpath, "--qf", _QUERY], deadline))
    if got != want:
        diff = sorted(want ^ got)
        raise SiteError(f"the rpm database rebuilt by the image's rpm in {dest} differs from "
                        f"the installed set: {', '.join(diff[:5])}"
                        + (f" (and {len(diff) - 5} more)" if len(diff) > 5 else ""))


def _guest(dest: str, argv: list[str], deadline: float,
           stdin: Optional[IO[bytes]] = None) -> str:
    """Run the image's own ``argv[0]`` chrooted in ``dest`` with a clean environment; its
    output. FileNotFoundError if the image has no such program."""
    def enter() -> None:
        os.chroot(dest)
        os.chdir("/")
    env = {"PATH": _PATH, "HOME": "/root", "LC_ALL": "C"}
    res = _run(argv, deadline, f"run the image's {argv[0]}", env, stdin=stdin,
               preexec_fn=enter)
    if res.code != 0:
        raise SiteError(f"the image's {' '.join(argv[:2])} failed in {dest} (exit "
                        f"{res.code}): {_tail(res.err or res.out)}")
    return res.out


def _version(text: str) -> tuple[int, int]:
    m = re.search(r"RPM version (\d+)\.(\d+)", text)
    if m is None:
        raise SiteError(f"can't tell the rpm version from {text.strip()[:80]!r}")
    return int(m.group(1)), int(m.group(2))


def _lines(text: str) -> set[str]:
    return {line.strip() for line in text.splitlines() if line.strip()}


# --- files in the image: never through a symlink -------------------------------

def _open_in(dest: str, rel: str, undo: ExitStack) -> int:
    """An O_PATH fd of ``rel`` in ``dest``, no symlink on the way; closed by ``undo``."""
    root = os.open(dest, _DIR)
    try:
        fd = open_in_root(root, rel)
    finally:
        os.close(root)
    undo.callback(os.close, fd)
    return fd


def _drop_caches(dest: str) -> None:
    """Empty dest's dnf and yum caches: the repos' metadata (100 MB and more for a
    distribution) and the package files kept for convert_rpmdb are no part of the image."""
    with ExitStack() as undo:
        for top in ("var/cache/dnf", "var/cache/yum"):
            try:
                cache = _open_in(dest, top, undo)
            except FileNotFoundError:
                continue
            fd = os.open(".", _DIR, dir_fd=cache)
            undo.callback(os.close, fd)
            for entry in list(os.scandir(fd)):
                _remove(fd, entry.name)


def _remove(dir_fd: int, name: str) -> None:
    """Remove ``name`` (a tree, a file or a symlink itself) below ``dir_fd``, if there."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, _DIR, dir_fd=dir_fd)
    try:
        for entry in list(os.scandir(fd)):
            _remove(fd, entry.name)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def _make_dir(dir_fd: int, name: str) -> None:
    os.mkdir(name, 0o755, dir_fd=dir_fd)
    fd = os.open(name, _DIR, dir_fd=dir_fd)
    try:
        os.fchmod(fd, 0o755)  # whatever the umask
    finally:
        os.close(fd)


def _write_in(dir_fd: int, name: str, data: Union[bytes, IO[bytes]]) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644, dir_fd=dir_fd)
    with os.fdopen(fd, "wb") as out:
        if isinstance(data, bytes):
            out.write(data)
        else:
            shutil.copyfileobj(data, out, 1 << 20)


# --- processes -------------------------------------------------------------------

def _which(name: str) -> Optional[str]:
    return shutil.which(name, path=_PATH)


def _env(**extra: str) -> dict[str, str]:
    env = {"PATH": _PATH, "LC_ALL": "C", "HOME": os.environ.get("HOME", "/root")}
    env.update(extra)
    return env


def _run(argv: Sequence[str], deadline: float, what: str, env: dict[str, str],
         stdin: Optional[IO[bytes]] = None, stdout: Optional[IO[bytes]] = None,
         check: bool = False, preexec_fn: Any = None) -> _Result:
    """Run ``argv`` in a session of its own; kill the whole session at the deadline."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise SiteError(f"can't {what}: out of time")
    proc = subprocess.Popen(argv, stdin=stdin or subprocess.DEVNULL,
                            stdout=stdout or subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True, preexec_fn=preexec_fn)
    try:
        out, err = proc.communicate(timeout=left)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # and the scriptlets it started
        except ProcessLookupError:
            pass
        proc.communicate()
        raise SiteError(f"can't {what}: not done within the deadline, killed") from None
    res = _Result(proc.returncode, (out or b"").decode(errors="replace"),
                  err.decode(errors="replace"))
    if check and res.code != 0:
        raise SiteError(f"can't {what}: {os.path.basename(argv[0])} failed (exit "
                        f"{res.code}): {_tail(res.err)}")
    return res


def _tail(text: str, n: int = 5) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-n:]) or "no output"


# --- building RPMs -------------------------------------------------------------

def build_rpm(spec: str, topdir: str, timeout: float = 3600.0) -> str:
    """Build the binary RPM of ``spec`` with rpmbuild in ``topdir``; return the .rpm's path.

    Run as root for an image spec (its versions directory is root's only).
    Build dependencies are not checked (--nodeps): an image spec has none, and
    Debian's rpm has an empty database.
    """
    rpmbuild = _which("rpmbuild")
    if rpmbuild is None:
        raise SiteError("can't build an RPM: rpmbuild is not installed (RPM distributions: "
                        "rpm-build; Debian: the rpm package has it)")
    topdir = os.path.abspath(topdir)
    if any(c.isspace() for c in topdir):
        raise UserError(f"{topdir!r}: rpmbuild's top directory can't hold white space")
    os.makedirs(os.path.join(topdir, "tmp"), 0o700, exist_ok=True)
    argv = [rpmbuild, "-bb", "--nodeps", "--define", f"_topdir {topdir}",
            "--define", f"_tmppath {topdir}/tmp", spec]
    res = _run(argv, time.monotonic() + timeout, "build the RPM", _env())
    if res.code != 0:
        raise SiteError(f"rpmbuild failed for {spec} (exit {res.code}): "
                        f"{_tail(res.err or res.out, 8)}")
    built = [str(p) for p in re.findall(r"^Wrote: (\S+\.rpm)$", res.out, re.M)
             if not p.endswith(".src.rpm")]
    if len(built) != 1:
        raise SiteError(f"rpmbuild wrote {len(built)} binary RPMs for {spec}, not one")
    return built[0]
