"""What qsub waits for: the submit filter, installed as `pbs-chroot install --submit-filter`
writes it (`#!python -IS`), run as qsub runs it (its argv, the script on stdin, stdout and
stderr on pipes it reads), from posix_spawn to waitpid.

    python -m benchmarks.submitfilter [--runs N]      # alone: a quick figure, no root needed

Cases: a job with no image (the config is never read), an allowed image (-D, the shell
given with -S, the image not visible to the user: text checks), a refused image (the gate's
line on stderr, exit 1). Beside them, `python -IS -c pass` on the same interpreter: the
filter's own cost is the difference.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from .report import summary

CONF = """[pbs_chroot]
state_dir = {base}/state
[image /chroot/sl5]
[image /chroot/el7]
users = alice bob
[binds]
/proc = proc
/home = /home rec
"""
SCRIPT = b"#!/bin/sh\n#PBS -N bench\n#PBS -l nodes=1:ppn=2,walltime=01:00:00\necho hi\n" * 4
CASES = {
    "no image": ["-l", "nodes=1", "job.sh"],
    "allowed image": ["-D", "/chroot/sl5", "-S", "/bin/sh", "job.sh"],
    "refused image": ["-D", "/chroot/sl5/", "job.sh"],
}


def _spawn(argv: list, stdin: str) -> "tuple[int, int]":
    """(ns, exit code) of one run, stdin from a file, stdout/stderr to /dev/null."""
    actions = [(os.POSIX_SPAWN_OPEN, 0, stdin, os.O_RDONLY, 0)] + [
        (os.POSIX_SPAWN_OPEN, fd, "/dev/null", os.O_WRONLY, 0) for fd in (1, 2)]
    t0 = time.perf_counter_ns()
    pid = os.posix_spawn(argv[0], argv, {"PATH": "/usr/bin:/bin", "HOME": "/"},
                         file_actions=actions)
    _, status = os.waitpid(pid, 0)
    return time.perf_counter_ns() - t0, os.waitstatus_to_exitcode(status)


def measure(runs: int) -> dict:
    """Medians/p90 per case (ms), and the interpreter's bare start-up beside them."""
    from pbs_chroot.filterinstall import render_filter
    import pbs_chroot
    libdir = str(Path(pbs_chroot.__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory(prefix="pbs_chroot-bench-filter-") as base:
        conf = Path(base, "pbs_chroot.conf")
        conf.write_text(CONF.format(base=base))
        filt = Path(base, "filter")
        filt.write_text(render_filter(str(filt), sys.executable, str(conf), libdir))
        os.chmod(filt, 0o755)
        script = Path(base, "job.sh")
        script.write_bytes(SCRIPT)
        want = {"no image": 0, "allowed image": 0, "refused image": 1}
        times: dict = {k: [] for k in list(CASES) + ["python -IS -c pass"]}
        for _ in range(3):  # page cache, not measured
            _spawn([str(filt)] + CASES["no image"], str(script))
        for _ in range(runs):
            for case, args in CASES.items():
                ns, code = _spawn([str(filt)] + args, str(script))
                if code != want[case]:
                    raise RuntimeError(f"submit filter, {case}: exit {code}, want {want[case]}")
                times[case].append(ns)
            times["python -IS -c pass"].append(
                _spawn([sys.executable, "-IS", "-c", "pass"], str(script))[0])
    return {k: summary(v) for k, v in times.items()}


def table(res: dict) -> str:
    """Markdown rows, as the README's results table has them."""
    rows = ["| submit filter | median | p90 | n |", "|---|---:|---:|---:|"]
    for case, s in res.items():
        rows.append(f"| {case} | {s['median']:.1f} | {s['p90']:.1f} | {s['n']} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=50)
    print(table(measure(p.parse_args().runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
