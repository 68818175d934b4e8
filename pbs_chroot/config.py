"""The site's configuration: allowlisted images, the bind set, paths and policies.

Read as root by the hooks, the runner and the admin CLI. The file is trusted
only if root owns it and neither group nor others can write it (the rule
pbs_mom applies to its own scripts); otherwise ConfigError. See
examples/pbs_chroot.conf for an annotated example.
"""
from __future__ import annotations

import errno
import os
import stat

from .errors import ConfigError
from .record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

__all__ = ["DEFAULT_PATH", "DEFAULT_HOOK_SERVER", "BindSpec", "Image", "Config", "load", "parse",
           "parse_bind"]

DEFAULT_PATH = "/etc/pbs_chroot/pbs_chroot.conf"
DEFAULT_JOB_STARTER = "/usr/libexec/pbs_chroot/job_starter"
NNP_SUFFIX = "-nnp"
MAIN = "pbs_chroot"
IMAGE_PREFIX = "image "
BIND_OPTIONS = frozenset({"ro", "rw", "rec", "dev", "exec", "noexec", "optional"})

# target = source [options]; the order matters (/dev before /dev/pts).
DEFAULT_BINDS = (
    ("/proc", "proc"),
    ("/sys", "/sys ro,noexec"),
    ("/dev", "/dev dev,noexec"),
    ("/dev/pts", "/dev/pts dev,noexec"),
    ("/dev/shm", "/dev/shm noexec"),
    ("/home", "/home rec"),
    ("/etc/passwd", "/etc/passwd ro"),
    ("/etc/group", "/etc/group ro"),
    ("/etc/resolv.conf", "/etc/resolv.conf ro,optional"),
    ("/etc/hosts", "/etc/hosts ro,optional"),
)


class BindSpec(Record):
    """One mount of the stage: ``source`` on the host at ``target`` in the image.

    Two sources are not paths: "proc", a fresh procfs, and "tmpfs", a fresh
    tmpfs of mode 1777 (the stage's /tmp: the image's root is read-only).
    """

    __slots__ = ("target", "source", "readonly", "rec", "dev", "noexec", "optional")

    def __init__(self, target: str, source: str, readonly: bool = False, rec: bool = False,
                 dev: bool = False, noexec: bool = False, optional: bool = False) -> None:
        self.target = target
        self.source = source
        self.readonly = readonly
        self.rec = rec
        self.dev = dev
        self.noexec = noexec
        self.optional = optional

    def describe(self) -> str:
        opts = [o for o, on in (("ro", self.readonly), ("rec", self.rec), ("dev", self.dev),
                                ("noexec", self.noexec), ("optional", self.optional)) if on]
        return f"{self.target} <- {self.source} [{','.join(opts) or 'rw'}]"


class Image(Record):
    """An allowlisted image: the exact path users write, and who may use it."""

    __slots__ = ("path", "users", "groups", "queues", "versions", "identity")

    def __init__(self, path: str, users: frozenset[str] = frozenset(),
                 groups: frozenset[str] = frozenset(), queues: frozenset[str] = frozenset(),
                 versions: str = "", identity: str = "") -> None:
        self.path = path
        self.users = users
        self.groups = groups
        self.queues = queues
        self.versions = versions  # where its versions live ('' = beside the current one)
        self.identity = identity  # generated, host or nscd ('' = the [pbs_chroot] default)


class Config(Record):
    """The whole configuration, validated."""

    __slots__ = ("path", "images", "binds", "state_dir", "pbs_home", "job_info", "qstat",
                 "job_info_timeout", "lock_timeout", "offline_node", "node_name", "keep_stage",
                 "syslog_socket", "cgroups", "cgroup_parent", "torque_cgroup_parent",
                 "memory_policy", "memory_cap", "limit_swap", "pids_max", "kill_timeout",
                 "accounting_log", "identity", "tmpdir", "user_dirs", "job_starter",
                 "entry_dir", "early_attach", "stage_grace", "defer_teardown", "identity_cache",
                 "image_resource", "hook_server", "shell_cache")

    def __init__(self, path: str, images: tuple[Image, ...], binds: tuple[BindSpec, ...],
                 state_dir: str = "/var/lib/pbs_chroot", pbs_home: str = "/var/spool/torque",
                 job_info: str = "auto", qstat: str = "/usr/bin/qstat",
                 job_info_timeout: float = 30.0, lock_timeout: float = 60.0,
                 offline_node: bool = True, node_name: str = "", keep_stage: bool = False,
                 syslog_socket: str = "/dev/log", cgroups: bool = True,
                 cgroup_parent: str = "pbs_chroot", torque_cgroup_parent: str = "torque",
                 memory_policy: str = "hard", memory_cap: Optional[int] = None,
                 limit_swap: bool = False, pids_max: Optional[int] = None,
                 kill_timeout: float = 30.0,
                 accounting_log: str = "/var/log/pbs_chroot/accounting.jsonl",
                 identity: str = "generated", tmpdir: str = "",
                 user_dirs: tuple[str, ...] = (),
                 job_starter: str = DEFAULT_JOB_STARTER, entry_dir: str = "",
                 early_attach: bool = True, stage_grace: float = 0.0,
                 defer_teardown: bool = False, identity_cache: float = 60.0,
                 image_resource: str = "image", hook_server: str = "",
                 shell_cache: bool = True) -> None:
        self.path = path
        self.images = images
        self.binds = binds
        self.state_dir = state_dir
        self.pbs_home = pbs_home
        self.job_info = job_info
        self.qstat = qstat
        self.job_info_timeout = job_info_timeout
        self.lock_timeout = lock_timeout
        self.offline_node = offline_node
        self.node_name = node_name
        self.keep_stage = keep_stage
        self.syslog_socket = syslog_socket
        self.cgroups = cgroups
        self.cgroup_parent = cgroup_parent
        self.torque_cgroup_parent = torque_cgroup_parent
        self.memory_policy = memory_policy
        self.memory_cap = memory_cap
        self.limit_swap = limit_swap
        self.pids_max = pids_max
        self.kill_timeout = kill_timeout
        self.accounting_log = accounting_log
        self.identity = identity  # how users are known inside images (identity.py)
        self.tmpdir = tmpdir  # pbs_mom's $tmpdir: the base of each job's $TMPDIR ('' = none)
        self.user_dirs = user_dirs  # work directories like a home ("%u": the user's name)
        # pbs_mom's $job_starter: a pass-through on the host, its -nnp sibling
        # bound over it in every stage ('' = none: not a Torque node).
        self.job_starter = job_starter
        self.entry_dir = entry_dir  # where users' jobs enter stages without root ('' = off)
        # Issue 16: move the job process into its cgroup while the request is being
        # checked (early.py); keep a stage its last job left for this many seconds.
        self.early_attach = early_attach
        self.stage_grace = stage_grace
        self.defer_teardown = defer_teardown  # the epilogue leaves the undoing to a worker
        self.identity_cache = identity_cache  # a stage's passwd/group kept for one user set
        self.image_resource = image_resource  # OpenPBS: qsub -l NAME=/chroot/sl5 (openpbs.py)
        # The hook server's socket (hookd.py; '' = no: the hooks are the Python scripts).
        self.hook_server = hook_server
        self.shell_cache = shell_cache  # remember shells found in a stage (shells.ShellCache)

    def image(self, path: str) -> Optional[Image]:
        """The allowlisted image whose path equals ``path`` as text, or None."""
        for img in self.images:
            if img.path == path:
                return img
        return None

    def nnp_starter(self) -> str:
        """The no_new_privs job starter, bound over job_starter in every stage ('' = none)."""
        return self.job_starter + NNP_SUFFIX if self.job_starter else ""

    def identity_of(self, path: str) -> str:
        """How users are known inside the image whose allowlisted path is ``path``."""
        img = self.image(path)
        return img.identity if img is not None and img.identity else self.identity


def load(path: str = DEFAULT_PATH) -> Config:
    """Read and validate the config file, refusing one that is not safe to trust."""
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang the caller.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"refusing config {path}: it is a symlink (symlinks are refused: "
                              "name the file itself)") from e
        raise ConfigError(f"can't read config {path}: {e.strerror}") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ConfigError(f"config {path} is not a regular file")
    with os.fdopen(fd, encoding="utf-8") as f:
        if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(f"refusing config {path}: it must be owned by root and not "
                              f"writable by group or others (owner uid {st.st_uid}, "
                              f"mode {stat.S_IMODE(st.st_mode):04o})")
        try:
            text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"can't read config {path}: {e}") from e
    return parse(text, path)


def parse(text: str, path: str = "<string>") -> Config:
    """Parse config text into a Config (no ownership checks: see load())."""
    sections, defaults = _read_ini(text, path)

    def items(name: str) -> dict[str, str]:
        # configparser's rule: a [DEFAULT] setting holds in every section.
        own = sections[name]
        return {**own, **{k: v for k, v in defaults.items() if k not in own}}
    main = items(MAIN) if MAIN in sections else {}
    unknown = set(main) - set(_FIELDS)
    if unknown:
        raise ConfigError(f"config {path}: unknown setting(s) in [{MAIN}]: "
                          f"{', '.join(sorted(unknown))}")
    values = {k: _convert(path, k, v) for k, v in main.items()}
    images = tuple(_image(path, s[len(IMAGE_PREFIX):].strip(), items(s))
                   for s in sections if s.startswith(IMAGE_PREFIX))
    pairs = tuple(items("binds").items()) if "binds" in sections else DEFAULT_BINDS
    binds = tuple(parse_bind(t, v, path) for t, v in pairs)
    other = [s for s in sections if s not in (MAIN, "binds") and not s.startswith(IMAGE_PREFIX)]
    if other:
        raise ConfigError(f"config {path}: unknown section(s): {', '.join(other)}")
    return Config(path=path, images=images, binds=binds, **values)  # type: ignore[arg-type]


def _read_ini(text: str, path: str) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """The sections (in order) and the [DEFAULT] settings of an INI text.

    What configparser.ConfigParser(interpolation=None, delimiters=("=",),
    comment_prefixes=("#", ";"), inline_comment_prefixes=None) reads, with
    names kept case-sensitive (paths are): ``name = value`` lines; a line
    indented deeper than its setting continues the value; whole-line comments;
    a header runs to the last ']' of its line (as since Python 3.10); no
    section or setting given twice. configparser costs every job ~10 ms to
    import. (Review note: one loop of ~45 lines, kept whole so that it reads
    against configparser's own _read.)
    """
    sections: dict[str, dict[str, list[str]]] = {}
    defaults: dict[str, list[str]] = {}
    current: Optional[dict[str, list[str]]] = None
    section, name, indent = "", "", 0
    seen: set[tuple[str, str]] = set()
    bad: list[str] = []
    for lineno, line in enumerate(text.split("\n"), 1):
        value = line.strip()
        if value.startswith(("#", ";")):
            continue
        if not value:
            if current is not None and name:
                current[name].append("")
            continue
        depth = len(line) - len(line.lstrip())
        if current is not None and name and depth > indent:
            current[name].append(value)
            continue
        indent = depth
        if value.startswith("[") and value.rfind("]") >= 2:
            section, name = value[1:value.rfind("]")], ""
            if section in sections:
                raise ConfigError(f"config {path}: line {lineno}: section [{section}] "
                                  "appears twice")
            current = defaults if section == "DEFAULT" else sections.setdefault(section, {})
        elif current is None:
            raise ConfigError(f"config {path}: line {lineno}: {value!r} comes before any "
                              "[section] header")
        elif "=" not in value:
            bad.append(f"line {lineno}: {value!r}")
        else:
            key, _, rest = value.partition("=")
            name = key.rstrip()
            if not name:
                bad.append(f"line {lineno}: {value!r}")
            if (section, name) in seen:
                raise ConfigError(f"config {path}: line {lineno}: {name!r} is set twice in "
                                  f"[{section}]")
            seen.add((section, name))
            current[name] = [rest.strip()]
    if bad:
        raise ConfigError(f"config {path}: want 'name = value' lines, got {'; '.join(bad)}")
    joined = {s: {k: "\n".join(v).rstrip() for k, v in opts.items()}
              for s, opts in sections.items()}
    return joined, {k: "\n".join(v).rstrip() for k, v in defaults.items()}


_FIELDS = {
    "state_dir": "abspath", "pbs_home": "abspath", "job_info": "source", "qstat": "abspath",
    "job_info_timeout": "seconds", "lock_timeout": "seconds", "offline_node": "bool",
    "node_name": "str", "keep_stage": "bool", "syslog_socket": "abspath", "cgroups": "bool",
    "cgroup_parent": "cgroupname", "torque_cgroup_parent": "cgroupname",
    "memory_policy": "policy", "memory_cap": "size", "limit_swap": "bool", "pids_max": "count",
    "kill_timeout": "seconds", "accounting_log": "abspath", "identity": "identity",
    "tmpdir": "abspath", "user_dirs": "userdirs", "job_starter": "starter",
    "entry_dir": "abspath",
    "early_attach": "bool", "stage_grace": "grace", "defer_teardown": "bool",
    "identity_cache": "grace", "image_resource": "resname", "hook_server": "hookserver",
    "shell_cache": "bool",
}
DEFAULT_HOOK_SERVER = "/run/pbs_chroot/hookd/sock"
_IDENTITY_MODES = ("generated", "host", "nscd")
_SPECIAL_SOURCES = ("proc", "tmpfs")


def _convert(path: str, key: str, value: str) -> object:
    kind = _FIELDS[key]
    value = value.strip()
    if kind == "abspath" and not (value.startswith("/") and "\n" not in value):
        raise ConfigError(f"config {path}: {key} must be an absolute path, not {value!r}")
    if kind == "source" and value not in ("auto", "pbs_python", "qstat"):
        raise ConfigError(f"config {path}: job_info must be auto, pbs_python or qstat")
    if kind == "identity" and value not in _IDENTITY_MODES:
        raise ConfigError(f"config {path}: {key} must be generated, host or nscd")
    if kind == "policy" and value not in ("hard", "soft", "none"):
        raise ConfigError(f"config {path}: memory_policy must be hard, soft or none")
    if kind == "cgroupname" and not _is_cgroup_name(value):
        raise ConfigError(f"config {path}: {key} must be a relative cgroup path like "
                          f"'pbs_chroot', not {value!r}")
    if kind == "resname" and not (value[:1].isascii() and value[:1].isalpha() and value.isascii()
                                  and all(c.isalnum() or c in "_-" for c in value)):
        raise ConfigError(f"config {path}: {key} must be an OpenPBS resource name like "
                          f"'image', not {value!r}")
    if kind == "starter":
        if value == "none":
            return ""
        if not (value.startswith("/") and value.isprintable() and " " not in value
                and ".." not in value.split("/")):
            raise ConfigError(f"config {path}: {key} must be an absolute path without spaces "
                              f"(pbs_mom's $job_starter), or none, not {value!r}")
        return value
    if kind == "hookserver":
        if value in ("no", "none", ""):
            return ""
        value = DEFAULT_HOOK_SERVER if value in ("yes", "default") else value
        if not (_is_normal_abs(value) and " " not in value and len(value) < 100
                and value.count("/") >= 2):
            raise ConfigError(f"config {path}: {key} must be no, yes or the absolute path of "
                              f"a socket in a directory of its own (< 100 bytes), not {value!r}")
        return value
    if kind == "userdirs":
        dirs = tuple(value.split())
        if not all(d.startswith("/") and ".." not in d.split("/") for d in dirs):
            raise ConfigError(f"config {path}: {key} must be absolute paths like /work/%u")
        return dirs
    if kind in ("size", "count"):
        return _number(path, key, value, kind)
    if kind == "grace":  # 0: none
        try:
            grace = float(value)
        except ValueError:
            grace = -1.0
        if not 0 <= grace <= 3600:
            raise ConfigError(f"config {path}: {key} must be a number of seconds [0, 3600]")
        return grace
    if kind == "seconds":
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds <= 3600:
            raise ConfigError(f"config {path}: {key} must be a number of seconds (0, 3600]")
        return seconds
    if kind == "bool":
        if value.lower() not in ("yes", "no", "true", "false", "1", "0", "on", "off"):
            raise ConfigError(f"config {path}: {key} must be yes or no, not {value!r}")
        return value.lower() in ("yes", "true", "1", "on")
    return value


def _is_cgroup_name(value: str) -> bool:
    parts = value.split("/")
    return all(p and p not in (".", "..") and all(c.isalnum() or c in "_.-" for c in p)
               for p in parts)


def _number(path: str, key: str, value: str, kind: str) -> Optional[int]:
    if value in ("", "0", "none"):
        return None
    from .resources import parse_size
    n = parse_size(value) if kind == "size" else (
        int(value) if value.isascii() and value.isdigit() else None)
    if not n:
        raise ConfigError(f"config {path}: {key}: can't read {value!r} as a "
                          f"{'size like 64gb' if kind == 'size' else 'whole number'}")
    return n


def _image(path: str, image_path: str, fields: dict[str, str]) -> Image:
    if not _is_normal_abs(image_path):
        raise ConfigError(f"config {path}: image path {image_path!r} must be absolute and "
                          "normalised (no trailing slash, '.', '..' or '//')")
    unknown = set(fields) - {"users", "groups", "queues", "versions", "identity"}
    if unknown:
        raise ConfigError(f"config {path}: unknown setting(s) for image {image_path}: "
                          f"{', '.join(sorted(unknown))}")

    def names(key: str) -> frozenset[str]:
        return frozenset(fields.get(key, "").replace(",", " ").split())
    versions = fields.get("versions", "").strip()
    if versions and not _is_normal_abs(versions):
        raise ConfigError(f"config {path}: image {image_path}: versions must be an absolute, "
                          "normalised path")
    identity = fields.get("identity", "").strip()
    if identity and identity not in _IDENTITY_MODES:
        raise ConfigError(f"config {path}: image {image_path}: identity must be generated, "
                          "host or nscd")
    return Image(image_path, names("users"), names("groups"), names("queues"), versions,
                 identity)


def _is_normal_abs(p: str) -> bool:
    # normpath keeps a leading '//', so refuse it explicitly.
    return (p.startswith("/") and not p.startswith("//") and p != "/"
            and p == os.path.normpath(p) and p.isprintable())


def parse_bind(target: str, value: str, path: str = "<string>") -> BindSpec:
    """Parse one ``TARGET = SOURCE [opt,opt]`` line of the [binds] section."""
    words = value.split()
    if not 1 <= len(words) <= 2:
        raise ConfigError(f"config {path}: bind {target}: want 'SOURCE [options]'")
    source = words[0]
    opts = set(words[1].split(",")) if len(words) == 2 else set()
    bad = opts - BIND_OPTIONS
    if bad:
        raise ConfigError(f"config {path}: bind {target}: unknown option(s) {sorted(bad)}")
    if not _is_normal_abs(target):
        raise ConfigError(f"config {path}: bind target {target!r} must be an absolute, "
                          "normalised path below /")
    if source not in _SPECIAL_SOURCES and not _is_normal_abs(source):
        raise ConfigError(f"config {path}: bind source {source!r} must be 'proc', 'tmpfs' or "
                          "an absolute, normalised path")
    return BindSpec(target=target, source=source, readonly="ro" in opts, rec="rec" in opts,
                    dev="dev" in opts, noexec="noexec" in opts, optional="optional" in opts)
