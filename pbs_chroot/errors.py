"""The only exception hierarchy of pbs_chroot.

Raised by every module; turned into exit codes only by hooks.py and admin.py.
Classify by who can fix it: the job owner (UserError) or the site (SiteError).
"""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

__all__ = [
    "PbsChrootError", "UserError", "SiteError", "ConfigError", "JobInfoError",
    "UnsafePathError", "MountError", "CgroupError", "PrivilegeError", "StateError",
]


class PbsChrootError(Exception):
    """Base class: a short message for the job owner and a detail for the admin.

    ``user_msg`` reaches the job's error file: one line, no host paths or config.
    ``detail`` reaches syslog only.
    """

    def __init__(self, user_msg: str, detail: str = "", job_id: Optional[str] = None) -> None:
        super().__init__(user_msg)
        self.user_msg = user_msg
        self.detail = detail or user_msg
        self.job_id = job_id

    def __str__(self) -> str:
        return self.detail


class UserError(PbsChrootError):
    """The job asked for something it may not have: the prologue aborts the job (exit 1)."""


class SiteError(PbsChrootError):
    """A fault of this node or its configuration: offline the node, requeue (exit 2)."""

    def __init__(self, detail: str, user_msg: str = "", job_id: Optional[str] = None) -> None:
        super().__init__(user_msg or "can't start the job: a fault on this node (the admin "
                         "has been told)", detail, job_id)


class ConfigError(SiteError):
    """The config file is missing, unsafe or malformed."""


class JobInfoError(SiteError):
    """The job's variables could not be read from the server (fail closed)."""


class UnsafePathError(SiteError):
    """An admin path (image, config, bind source) is not root-owned or is writable by others."""


class MountError(SiteError):
    """A mount or unmount of the stage failed."""


class CgroupError(SiteError):
    """A cgroup could not be created, limited, emptied or removed."""


class PrivilegeError(SiteError):
    """Dropping privileges failed or could not be verified."""


class StateError(SiteError):
    """A job record or stage membership file is unreadable or inconsistent."""
