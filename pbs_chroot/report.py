"""``pbs-chroot report``: jobs, CPU hours, peak memory and OOM kills per user and per image.

Run by the admin; only reads the accounting log (accounting.py). Trusts no
line of it: each is parsed on its own, and one that is not a record of the
known schema with the fields used here is skipped and counted. Dates given as
YYYY-MM-DD are local days; ``--since``/``--until`` select jobs by their end.
"""
import argparse
import csv
import datetime
import io
import json
import math
import sys
from typing import Any, Iterable, Mapping, Optional, Sequence

from .accounting import SCHEMA
from .errors import StateError, UserError

__all__ = ["HOST", "BY", "parse_since", "parse_until", "parse", "summarize", "format_table",
           "format_csv", "format_json", "add_arguments", "main_report"]

HOST = "(host)"          # how a job without an image is shown
BY = ("user", "image")
_MiB, _GiB = 1 << 20, 1 << 30
_USEC_PER_HOUR = 3600 * 10**6
_COLUMNS = ("jobs", "cpu_hours", "max_mem_peak_bytes", "oom_kills")


def _parse_time(text: str, day_end: bool) -> float:
    if text.replace(".", "", 1).isdigit():
        value = float(text)
        return math.nextafter(value, math.inf) if day_end else value
    try:
        day = datetime.datetime.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a date (YYYY-MM-DD) nor epoch seconds") from None
    return (day + datetime.timedelta(days=1 if day_end else 0)).timestamp()


def parse_since(text: str) -> float:
    """``--since``: the first instant of a local day, or epoch seconds (inclusive)."""
    return _parse_time(text, day_end=False)


def parse_until(text: str) -> float:
    """``--until``: an exclusive bound on ``end`` that includes the whole day or that second."""
    return _parse_time(text, day_end=True)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _record(line: str) -> Optional[dict[str, Any]]:
    """The fields a report uses from one log line, or None if it is not a sound record."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict) or rec.get("schema") != SCHEMA:
        return None
    end, image, peak = rec.get("end"), rec.get("image"), rec.get("mem_peak_bytes")
    sound = (isinstance(rec.get("user"), str) and isinstance(rec.get("job_id"), str)
             and isinstance(end, (int, float)) and not isinstance(end, bool)
             and math.isfinite(end)
             and (image is None or isinstance(image, str))
             and (peak is None or _is_count(peak))
             and all(_is_count(rec.get(k)) for k in ("cpu_user_usec", "cpu_system_usec",
                                                     "oom_kills")))
    if not sound:
        return None
    return {"user": rec["user"], "image": image, "end": float(rec["end"]), "mem_peak_bytes": peak,
            "cpu_usec": rec["cpu_user_usec"] + rec["cpu_system_usec"],
            "oom_kills": rec["oom_kills"]}


def parse(lines: Iterable[str]) -> tuple[list[dict[str, Any]], int]:
    """The sound records of the log's lines, and how many non-blank lines were not."""
    records, malformed = [], 0
    for line in lines:
        if not line.strip():
            continue
        rec = _record(line)
        if rec is None:
            malformed += 1
        else:
            records.append(rec)
    return records, malformed


def summarize(records: Iterable[dict[str, Any]], by: str = "user",
              since: Optional[float] = None, until: Optional[float] = None,
              user: Optional[str] = None) -> list[dict[str, Any]]:
    """One row per user (or image; None: no image) of the records that pass the filters.

    ``until`` is exclusive (parse_until() makes it so); rows come most CPU hours first.
    """
    if by not in BY:
        raise ValueError(f"can't summarize by {by!r}")
    rows: dict[Optional[str], dict[str, Any]] = {}
    for rec in records:
        if (since is not None and rec["end"] < since) or \
                (until is not None and rec["end"] >= until) or \
                (user is not None and rec["user"] != user):
            continue
        row = rows.setdefault(rec[by], {by: rec[by], "jobs": 0, "cpu_usec": 0,
                                        "max_mem_peak_bytes": None, "oom_kills": 0})
        row["jobs"] += 1
        row["cpu_usec"] += rec["cpu_usec"]
        row["oom_kills"] += rec["oom_kills"]
        if rec["mem_peak_bytes"] is not None:
            row["max_mem_peak_bytes"] = max(row["max_mem_peak_bytes"] or 0, rec["mem_peak_bytes"])
    out = []
    for row in rows.values():
        usec = row.pop("cpu_usec")
        out.append({**row, "cpu_hours": usec / _USEC_PER_HOUR})
    return sorted(out, key=lambda r: (-r["cpu_hours"], str(r[by])))


def _key(row: dict[str, Any], by: str) -> str:
    return HOST if row[by] is None else str(row[by])


def _size(n: Optional[int]) -> str:
    if n is None:
        return "-"
    return f"{n / _GiB:.1f} GiB" if n >= _GiB else f"{n / _MiB:.0f} MiB"


def format_table(rows: Sequence[dict[str, Any]], by: str) -> str:
    """An aligned text table, header first."""
    table = [(by.upper(), "JOBS", "CPU_HOURS", "MAX_MEM", "OOM_KILLS")]
    table += [(_key(r, by), str(r["jobs"]), f"{r['cpu_hours']:.2f}",
               _size(r["max_mem_peak_bytes"]), str(r["oom_kills"])) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "".join(" ".join([line[0].ljust(widths[0])] +
                            [cell.rjust(w) for cell, w in zip(line[1:], widths[1:])]).rstrip()
                   + "\n" for line in table)


def format_csv(tables: Mapping[str, Sequence[dict[str, Any]]]) -> str:
    """CSV with a header; the first column says which table (user or image) a row is from."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(("by", "key") + _COLUMNS)
    for by, rows in tables.items():
        for r in rows:
            peak = "" if r["max_mem_peak_bytes"] is None else r["max_mem_peak_bytes"]
            w.writerow((by, _key(r, by), r["jobs"], f"{r['cpu_hours']:.6f}", peak,
                        r["oom_kills"]))
    return out.getvalue()


def format_json(tables: Mapping[str, Sequence[dict[str, Any]]]) -> str:
    """{"by_user": [...], "by_image": [...]}; a job without an image has "image": null."""
    return json.dumps({f"by_{by}": list(rows) for by, rows in tables.items()}, indent=2) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``report`` subcommand's options."""
    p.add_argument("--log", metavar="PATH",
                   help="accounting log to read (default: the config's accounting_log)")
    p.add_argument("--by", choices=BY, help="one table only (default: both)")
    p.add_argument("--since", type=parse_since, metavar="DATE|EPOCH",
                   help="jobs that ended on or after this day (YYYY-MM-DD, local time) "
                   "or epoch second")
    p.add_argument("--until", type=parse_until, metavar="DATE|EPOCH",
                   help="jobs that ended on or before this day (YYYY-MM-DD, the whole day) "
                   "or epoch second")
    p.add_argument("--user", metavar="NAME", help="only this user's jobs")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON instead of tables")
    fmt.add_argument("--csv", action="store_true", help="CSV instead of tables")


def _read_lines(path: str, given: bool) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    except OSError as e:
        msg = f"can't read accounting log {path}: {e.strerror}"
        raise (UserError(msg) if given else StateError(msg)) from e


def main_report(args: argparse.Namespace) -> int:
    """``pbs-chroot report``: print the tables; say on stderr how many lines were skipped."""
    path = args.log
    if path is None:
        from . import config as config_mod
        path = config_mod.load(args.config).accounting_log
    records, malformed = parse(_read_lines(path, given=args.log is not None))
    if malformed:
        print(f"pbs-chroot: {malformed} malformed line{'s' if malformed != 1 else ''} "
              f"skipped in {path}", file=sys.stderr)
    bys: tuple[str, ...] = (args.by,) if args.by else BY
    tables = {by: summarize(records, by, args.since, args.until, args.user) for by in bys}
    if args.json:
        sys.stdout.write(format_json(tables))
    elif args.csv:
        sys.stdout.write(format_csv(tables))
    else:
        sys.stdout.write("\n".join(format_table(rows, by) for by, rows in tables.items()))
    return 0
