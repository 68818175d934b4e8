"""The mount points an image version carries for the stage: made by `image build`,
`deploy` and `audit --add-mount-points`, never at job time (a stage refuses to write
to a version: mounts.with_mount_points).

Run as root by the admin. Trusts the config; makes nothing through a symlink
(paths.open_in_root), root-owned, 0755/0644 whatever the umask.
"""
from __future__ import annotations

import os
import stat

from . import stage
from .config import Config
from .errors import UnsafePathError
from .paths import open_in_root

__all__ = ["mount_points", "missing_mount_points", "add_mount_points"]


def mount_points(cfg: Config) -> list[tuple[str, bool, bool]]:
    """(target, is_file, required) of every bind a stage of this node may have
    (stage.all_binds): the mount points a version should carry. Optional binds whose
    source this host lacks are left out (the stage skips them too); the other optional
    ones are not required (the stage skips them with a warning), but the job directory is."""
    out = []
    jobs = stage.jobs_dir(cfg)
    for spec in stage.all_binds(cfg):
        required = not spec.optional or spec.target == jobs
        if not spec.source.startswith("/"):
            out.append((spec.target, False, required))  # proc, tmpfs
        elif spec.source.startswith(stage.GENERATED_SDIR + "/") or \
                (cfg.job_starter and spec.target == cfg.job_starter):
            # The stage's own passwd, group ...; the job starter (a file, whether or not
            # `install` has put its source on this host yet).
            out.append((spec.target, True, required))
        else:
            try:
                st = os.stat(spec.source)
            except OSError:
                if not spec.optional:
                    out.append((spec.target, False, required))
                continue
            out.append((spec.target, stat.S_ISREG(st.st_mode), required))
    return out


def missing_mount_points(cfg: Config, root: str) -> list[str]:
    """Mount points the stage would refuse (a symlink on the way) or lack."""
    bad = []
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for target, _, required in mount_points(cfg):
            try:
                os.close(open_in_root(fd, target))
            except UnsafePathError as e:
                bad.append(f"{target} ({e.detail})")
            except (FileNotFoundError, NotADirectoryError):
                if required:
                    bad.append(target)
    finally:
        os.close(fd)
    return bad


def add_mount_points(cfg: Config, root: str) -> list[str]:
    """Make the mount points the stage needs (never following a symlink); return them."""
    made = []
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for target, is_file, _ in mount_points(cfg):
            if os.path.lexists(root + target):
                continue  # (a symlink there is the audit's to report)
            try:
                os.close(open_in_root(fd, target, "file" if is_file else "dir"))
            except UnsafePathError:
                continue  # a symlink on the way: the audit reports it
            made.append(target)
    finally:
        os.close(fd)
    return made
