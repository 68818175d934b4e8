"""pbs-chroot report: parsing the accounting log, per-user and per-image totals, formats."""
import argparse
import csv
import datetime
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest

from pbs_chroot import accounting, admin, report
from pbs_chroot.errors import StateError, UserError

GiB, MiB = 1 << 30, 1 << 20
HOUR = 3600 * 10**6  # µs


def day(y: int, m: int, d: int, hour: int = 12) -> float:
    """Epoch seconds of a local time (what report's dates mean)."""
    return datetime.datetime(y, m, d, hour).timestamp()


def job(job_id: str, user: str, image: Optional[str], end: float, cpu_user: int,
        cpu_system: int, peak: Optional[int], ooms: int = 0) -> dict[str, Any]:
    """An accounting record as lifecycle._account writes it (minus the schema)."""
    return {"job_id": job_id, "user": user, "group": user, "queue": "batch", "node": "n1",
            "image": image, "version": f"{image}.v1" if image else None, "start": end - 60,
            "end": end, "exit": 0, "cgroup_version": 2, "cpu_user_usec": cpu_user,
            "cpu_system_usec": cpu_system, "mem_peak_bytes": peak, "mem_anon_bytes": None,
            "mem_file_bytes": None, "swap_peak_bytes": None, "oom_kills": ooms,
            "mem_limit_bytes": None}


JOBS = [
    job("1.vm", "alice", "/chroot/sl5", day(2024, 5, 1), 2 * HOUR, HOUR, 512 * MiB),
    job("2.vm", "alice", None, day(2024, 5, 2), HOUR // 2, 0, 3 * GiB // 2, ooms=1),
    job("3.vm", "bob", "/chroot/sl5", day(2024, 5, 31, 23), HOUR, HOUR // 2, None),
    job("4.vm", "bob", "/chroot/el7", day(2024, 6, 1, 0), 0, 0, 4096, ooms=2),
]
BAD_LINES = [
    '{"schema": 1, "job_id": "5.vm", "user": "carol", "end": 17',   # torn write
    "[1, 2, 3]",                                                     # not an object
    json.dumps({**job("6.vm", "carol", None, day(2024, 5, 3), 1, 1, 1), "schema": 1,
                "cpu_user_usec": "12"}),                             # a number as text
    json.dumps({**job("7.vm", "carol", None, day(2024, 5, 3), 1, 1, 1), "schema": 99}),
    "\x00\x00garbage",
]


@pytest.fixture
def log(tmp_path: Path) -> Path:
    """A log written by accounting.append, with malformed lines and a blank one mixed in."""
    path = tmp_path / "acct" / "accounting.jsonl"
    for i, rec in enumerate(JOBS):
        accounting.append(str(path), rec)
        with open(path, "a") as f:
            f.write(BAD_LINES[i] + "\n")
            if i == 1:
                f.write("\n")
    with open(path, "a") as f:
        f.write(BAD_LINES[-1])  # and no final newline
    return path


def records(log: Path) -> list[dict[str, Any]]:
    recs, malformed = report.parse(log.read_text().splitlines())
    assert malformed == len(BAD_LINES)
    return recs


def test_parse_keeps_sound_records_and_counts_the_rest(log: Path) -> None:
    recs = records(log)
    assert [r["user"] for r in recs] == ["alice", "alice", "bob", "bob"]
    assert recs[0] == {"user": "alice", "image": "/chroot/sl5", "end": day(2024, 5, 1),
                       "mem_peak_bytes": 512 * MiB, "cpu_usec": 3 * HOUR, "oom_kills": 0}


@pytest.mark.parametrize("change", [
    {"user": None}, {"job_id": 7}, {"end": "yesterday"}, {"end": True}, {"image": 3},
    {"mem_peak_bytes": -1}, {"cpu_system_usec": None}, {"oom_kills": 1.5}, {"schema": "1"},
])
def test_unsound_fields_make_a_line_malformed(change: dict[str, Any]) -> None:
    line = json.dumps({"schema": 1, **JOBS[0], **change})
    assert report.parse([line]) == ([], 1)


def test_nan_end_is_malformed() -> None:
    line = json.dumps({"schema": 1, **JOBS[0]}).replace(f'"end": {JOBS[0]["end"]}', '"end": NaN')
    assert "NaN" in line and report.parse([line]) == ([], 1)


def test_summarize_by_user(log: Path) -> None:
    assert report.summarize(records(log), "user") == [
        {"user": "alice", "jobs": 2, "max_mem_peak_bytes": 3 * GiB // 2, "oom_kills": 1,
         "cpu_hours": 3.5},
        {"user": "bob", "jobs": 2, "max_mem_peak_bytes": 4096, "oom_kills": 2,
         "cpu_hours": 1.5},
    ]


def test_summarize_by_image_with_host_jobs(log: Path) -> None:
    rows = report.summarize(records(log), "image")
    assert [(r["image"], r["jobs"], r["cpu_hours"], r["max_mem_peak_bytes"], r["oom_kills"])
            for r in rows] == [("/chroot/sl5", 2, 4.5, 512 * MiB, 0),
                               (None, 1, 0.5, 3 * GiB // 2, 1),
                               ("/chroot/el7", 1, 0.0, 4096, 2)]


def test_a_user_without_any_peak_shows_none() -> None:
    rows = report.summarize([report.parse([json.dumps({"schema": 1, **JOBS[2]})])[0][0]])
    assert rows[0]["max_mem_peak_bytes"] is None
    assert report.format_table(rows, "user").splitlines()[1].split()[3] == "-"


def test_summarize_rejects_an_unknown_key() -> None:
    with pytest.raises(ValueError):
        report.summarize([], "queue")


@pytest.mark.parametrize("since, until, users", [
    ("2024-05-02", None, ["bob", "alice"]),     # most CPU hours first
    (None, "2024-05-31", ["alice", "bob"]),     # the whole day of the 31st, to 23:00 and later
    (None, "2024-05-30", ["alice"]),
    ("2024-06-01", "2024-06-01", ["bob"]),
    ("2024-06-02", None, []),
])
def test_since_and_until_select_by_end(log: Path, since: Optional[str], until: Optional[str],
                                       users: list[str]) -> None:
    rows = report.summarize(records(log), "user",
                            since=report.parse_since(since) if since else None,
                            until=report.parse_until(until) if until else None)
    assert [r["user"] for r in rows] == users


def test_since_until_dates_count_jobs_exactly(log: Path) -> None:
    rows = report.summarize(records(log), "image", since=report.parse_since("2024-05-02"),
                            until=report.parse_until("2024-05-31"))
    assert {r["image"]: r["jobs"] for r in rows} == {None: 1, "/chroot/sl5": 1}


def test_epoch_bounds_are_inclusive(log: Path) -> None:
    end = str(int(day(2024, 5, 2)))  # job 2.vm ended exactly then
    rows = report.summarize(records(log), "user", since=report.parse_since(end),
                            until=report.parse_until(end))
    assert [(r["user"], r["jobs"]) for r in rows] == [("alice", 1)]


@pytest.mark.parametrize("text", ["2024-13-01", "yesterday", "", "1e9", "-5", "2024-5-1x"])
def test_bad_dates_are_argument_errors(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        report.parse_since(text)


def test_user_filter(log: Path) -> None:
    rows = report.summarize(records(log), "image", user="bob")
    assert [(r["image"], r["jobs"]) for r in rows] == [("/chroot/sl5", 1), ("/chroot/el7", 1)]
    assert report.summarize(records(log), "user", user="nobody") == []


def test_table_format(log: Path) -> None:
    assert report.format_table(report.summarize(records(log), "image"), "image") == (
        "IMAGE       JOBS CPU_HOURS MAX_MEM OOM_KILLS\n"
        "/chroot/sl5    2      4.50 512 MiB         0\n"
        "(host)         1      0.50 1.5 GiB         1\n"
        "/chroot/el7    1      0.00   0 MiB         2\n")


def test_csv_and_json_formats(log: Path) -> None:
    recs = records(log)
    tables = {by: report.summarize(recs, by) for by in report.BY}
    rows = list(csv.reader(io.StringIO(report.format_csv(tables))))
    assert rows[0] == ["by", "key", "jobs", "cpu_hours", "max_mem_peak_bytes", "oom_kills"]
    assert rows[1:3] == [["user", "alice", "2", "3.500000", str(3 * GiB // 2), "1"],
                         ["user", "bob", "2", "1.500000", "4096", "2"]]
    assert ["image", "(host)", "1", "0.500000", str(3 * GiB // 2), "1"] in rows
    data = json.loads(report.format_json(tables))
    assert data["by_user"] == tables["user"] and data["by_image"] == tables["image"]
    assert {"image": None, "jobs": 1, "max_mem_peak_bytes": 3 * GiB // 2, "oom_kills": 1,
            "cpu_hours": 0.5} in data["by_image"]


def run_report(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """The report subcommand through admin's parser, without admin.main's root check."""
    args = admin._parser().parse_args(argv)
    assert args.command == "report"
    rc = report.main_report(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_prints_both_tables_and_counts_malformed_lines(log: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    rc, out, err = run_report(["report", "--log", str(log)], capsys)
    assert rc == 0
    assert err == f"pbs-chroot: {len(BAD_LINES)} malformed lines skipped in {log}\n"
    user_table, image_table = out.split("\n\n")
    assert user_table.splitlines()[0].split() == ["USER", "JOBS", "CPU_HOURS", "MAX_MEM",
                                                  "OOM_KILLS"]
    assert user_table.splitlines()[1].split() == ["alice", "2", "3.50", "1.5", "GiB", "1"]
    assert "(host)" in image_table and len(image_table.splitlines()) == 4


def test_cli_one_table_filtered(log: Path, capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = run_report(["report", "--log", str(log), "--by", "image", "--user", "alice",
                             "--since", "2024-05-02"], capsys)
    assert rc == 0 and out.splitlines()[1:] == ["(host)    1      0.50 1.5 GiB         1"]


def test_cli_json_and_csv(log: Path, capsys: pytest.CaptureFixture) -> None:
    _, out, _ = run_report(["report", "--log", str(log), "--json", "--by", "user"], capsys)
    assert list(json.loads(out)) == ["by_user"]
    _, out, _ = run_report(["report", "--log", str(log), "--csv"], capsys)
    assert out.startswith("by,key,jobs,") and len(out.splitlines()) == 1 + 2 + 3
    with pytest.raises(SystemExit) as e:
        admin._parser().parse_args(["report", "--json", "--csv"])
    assert e.value.code == 2
    capsys.readouterr()


def test_cli_one_malformed_line_is_singular(tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a.jsonl").write_text("{\n")
    rc, out, err = run_report(["report", "--log", str(tmp_path / "a.jsonl"), "--by", "user"],
                              capsys)
    assert rc == 0 and out == "USER JOBS CPU_HOURS MAX_MEM OOM_KILLS\n"
    assert err.startswith("pbs-chroot: 1 malformed line skipped")


def test_missing_log_given_is_a_user_error(tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(UserError, match="can't read accounting log"):
        run_report(["report", "--log", str(tmp_path / "none")], capsys)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: config.load() wants a root-owned "
                    "config, and admin.main() refuses non-root")
def test_cli_reads_the_configured_log(log: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "pbs_chroot.conf"
    cfg.write_text(f"[pbs_chroot]\naccounting_log = {log}\n")
    os.chmod(cfg, 0o644)
    res = subprocess.run([sys.executable, "-m", "pbs_chroot", "--config", str(cfg), "report",
                          "--by", "user"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert [line.split()[0] for line in res.stdout.splitlines()] == ["USER", "alice", "bob"]
    assert "5 malformed lines skipped" in res.stderr
    (tmp_path / "empty.conf").write_text(f"[pbs_chroot]\naccounting_log = {tmp_path}/none\n")
    os.chmod(tmp_path / "empty.conf", 0o644)
    res = subprocess.run([sys.executable, "-m", "pbs_chroot", "--config",
                          str(tmp_path / "empty.conf"), "report"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "can't read accounting log" in res.stderr  # a site fault
    with pytest.raises(StateError):
        report.main_report(admin._parser().parse_args(
            ["--config", str(tmp_path / "empty.conf"), "report"]))
