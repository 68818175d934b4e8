"""Torque's Resource_List, as the prologue's argv gives it, turned into cgroup limits.

Run as root by the prologue and the runner. The text comes from the server
(the user chose the values, within what the server accepted): parsed
strictly, ASCII digits only; anything unparsable is ignored for limits,
never guessed, and never an error.
"""
from __future__ import annotations

from .cgroups import Limits

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

__all__ = ["parse_size", "parse_resource_list", "limits_for"]

# Plain string code for ([0-9]{1,15})(b|kb|mb|gb|tb|pb|w|kw|mw|gw|tw)?, case-insensitive
# as re.IGNORECASE (re costs every job ~5 ms at start-up).
_DIGITS = "0123456789"
_SHIFT = {"b": 0, "kb": 10, "mb": 20, "gb": 30, "tb": 40, "pb": 50}
_UNITS = frozenset(_SHIFT) | {"w", "kw", "mw", "gw", "tw"}


def parse_size(text: str) -> Optional[int]:
    """Torque size ('512mb', '1gb', '100' bytes, 'w' = 8-byte words) in bytes, or None."""
    text = text.strip()
    rest = text.lstrip(_DIGITS)
    digits, unit = text[:len(text) - len(rest)], (rest.lower() or "b")
    if not 1 <= len(digits) <= 15 or unit not in _UNITS:
        return None
    words = unit.endswith("w")
    shift = _SHIFT["b" if unit == "w" else unit[0] + "b"] if words else _SHIFT[unit]
    return (int(digits) << shift) * (8 if words else 1)


def parse_resource_list(text: str) -> dict[str, str]:
    """'nodes=1:ppn=2,mem=512mb,...' -> {'nodes': '1:ppn=2', 'mem': '512mb', ...}."""
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep and key and key not in out:
            out[key.strip()] = value.strip()
    return out


def _count(text: str) -> int:
    """An ASCII count, else 0 ('²'.isdigit() is True, and int('²') raises)."""
    return int(text) if 1 <= len(text) <= 6 and not text.strip(_DIGITS) else 0


def _cores(res: dict[str, str]) -> tuple[int, int]:
    """(cores on this node, number of nodes) from nodes=N:ppn=P or ncpus=N."""
    parts = res.get("nodes", "").split("+")[0].split(":")
    nodes = _count(parts[0])
    ppn = next((_count(p[4:]) for p in parts[1:] if p.startswith("ppn=")), 0)
    return max(1, ppn or _count(res.get("ncpus", ""))), max(1, nodes)


def limits_for(resource_list: str, policy: str, mem_cap: Optional[int], limit_swap: bool,
               pids_max: Optional[int]) -> Limits:
    """The cgroup limits of a job on this node.

    mem is the job's total: a job on N nodes gets mem/N here; pmem is per
    process, times ppn. The larger of the two wins. vmem becomes the
    memory+swap limit when the site limits swap.
    """
    res = parse_resource_list(resource_list)
    cpus, nodes = _cores(res)
    total = parse_size(res.get("mem", ""))
    mem = total // nodes if total else None
    pmem = parse_size(res.get("pmem", ""))
    if pmem:
        mem = max(mem or 0, pmem * cpus)
    vmem = parse_size(res.get("vmem", ""))
    memsw = (vmem // nodes if vmem else mem) if limit_swap else None
    return Limits(mem_request=mem, policy=policy, mem_cap=mem_cap, memsw=memsw,
                  pids_max=pids_max, cpus=cpus)
