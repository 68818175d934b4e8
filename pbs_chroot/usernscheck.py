"""Whether unprivileged user namespaces work on this node: read from sysctls, nothing else.

Its own module so that a root hook (OpenPBS's execjob_begin, openpbs.node_problem) can ask
without loading the user-namespace mode itself (ctypes, signal).
"""
from __future__ import annotations

import os

__all__ = ["SYSCTLS", "userns_problem"]

# (sysctl, the value that switches unprivileged user namespaces off, whose it is)
SYSCTLS = (
    ("user.max_user_namespaces", "0", ""),
    ("kernel.unprivileged_userns_clone", "0", "Debian's "),
    ("kernel.apparmor_restrict_unprivileged_userns", "1", "Ubuntu's AppArmor "),
)


def userns_problem(proc_sys: str = "/proc/sys") -> str:
    """Why this user cannot create a user namespace here ('' if nothing says so)."""
    for name, off, whose in SYSCTLS:
        try:
            with open(os.path.join(proc_sys, *name.split(".")), encoding="ascii") as f:
                value = f.read().strip()
        except OSError:
            continue  # this kernel has no such setting
        if value == off:
            return (f"can't run unprivileged: user namespaces are switched off on this node "
                    f"({whose}sysctl {name}={off})")
    return ""
