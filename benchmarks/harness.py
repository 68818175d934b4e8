"""`benchmarks/run`: what a job pays for the hooks, inside the image, and at 128 jobs per node.

Run as root (benchmarks/run starts it with the project's virtualenv). The parent process
stays in the host's mount namespace: it records the host's mountinfo and cgroup tree,
forks the measuring child, and afterwards checks that both are exactly as before, prints
the table, evaluates the budgets and writes the JSON. The child enters a private mount
namespace (benchmarks/node.py), measures (benchmarks/sections.py), cleans up what it made
(job records, its cgroup parent) and sends its results back on a pipe.

Exit status: 0 all budgets and checks pass; 1 a budget or check failed; 2 the run itself
failed (a job, a hook or the set-up), with no figures worth reading.
"""
import argparse
import datetime
import json
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

from . import node as node_mod
from . import report, sections

DEFAULT_JSON = Path(__file__).resolve().parent / "results.json"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="fewer runs (10 per series, 32 jobs, shorter tasks): for iteration, "
                   "not for the record")
    p.add_argument("--json", default=str(DEFAULT_JSON),
                   help="where to write the results (default: %(default)s)")
    p.add_argument("--markdown", metavar="FILE",
                   help="also write the README's results section (markdown) to FILE")
    p.add_argument("--runs", type=int, help="runs per hook-cost series (default 100; quick 10)")
    p.add_argument("--jobs", type=int, help="jobs in the scale test (default 128; quick 32)")
    p.add_argument("--reps", type=int, help="repetitions of each inside/outside task "
                   "(default 7; quick 3)")
    p.add_argument("--throughput-jobs", type=int, metavar="N",
                   help="trivial jobs per case in the throughput section (default 200; quick 50)")
    p.add_argument("--mom-ms", type=float, default=sections.TORQUE_MOM_MS,
                   help="pbs_mom's own time per job in the throughput section (default "
                   "%(default)s ms, measured on a real Torque 6.1 without hooks)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a [pbs_chroot] setting for the hooks' config (repeatable), e.g. "
                   "stage_grace=5: to measure a lever")
    p.add_argument("--lever", metavar="KEY=VALUE[;KEY=VALUE]",
                   help="measure one setting against the config without it, in the same run "
                   "(blocks of jobs alternating); with --only throughput")
    p.add_argument("--only", choices=("throughput", "lever"),
                   help="run only this section (and its reference points)")
    return p


def main(argv: "list | None" = None) -> int:
    args = _parser().parse_args(argv)
    if os.geteuid() != 0:
        print("benchmarks/run: run as root (mounts, cgroups, chroot)", file=sys.stderr)
        return 2
    for name in ("runs", "jobs", "reps", "throughput_jobs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            print(f"benchmarks/run: --{name} must be at least 1", file=sys.stderr)
            return 2
    plan = {"runs": args.runs or (10 if args.quick else 100),
            "jobs": args.jobs or (32 if args.quick else 128),
            "reps": args.reps or (3 if args.quick else 7), "quick": args.quick,
            "throughput_jobs": args.throughput_jobs or (50 if args.quick else 200),
            "mom_ms": args.mom_ms, "only": args.only, "lever": args.lever,
            "settings": "".join(f"{kv.replace('=', ' = ', 1)}\n" for kv in args.set)}
    busy = _cpu_busy(1.0)  # is anything else running? (nothing of ours yet)
    t0 = time.monotonic()
    host_before = (node_mod.mount_points(), node_mod.cgroup_tree())
    res = _measure_in_child(plan)
    res.setdefault("machine", {})["cpu_busy_before"] = busy
    res["host"] = _host_check(host_before, res.get("cg_parent", ""))
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    if "error" in res:
        print(f"benchmarks/run: the run failed: {res['error']}", file=sys.stderr)
        print(f"host state: {res['host']['mounts_text']}; {res['host']['cgroups_text']}",
              file=sys.stderr)
        _write_json(args.json, res)
        return 2
    res["budgets"] = report.budgets(res)
    res["checks"] = report.checks(res)
    print(report.table(res), end="")
    _write_json(args.json, res)
    print(f"results: {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(report.markdown(res))
        print(f"README section: {args.markdown}")
    return 0 if all(b["pass"] for b in res["budgets"] + res["checks"]) else 1


def _write_json(path: str, res: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _measure_in_child(plan: dict) -> dict:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        code = 2
        try:
            out = _child(plan)
            code = 0
        except BaseException as e:  # noqa: B902 - reported to the parent, never unwound
            out = {"error": f"{e!r}", "traceback": traceback.format_exc()}
        data = json.dumps(out).encode()
        try:
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(code)
    os.close(w)
    # ^C reaches the child too (same process group): it cleans up and reports; wait for it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    chunks = []
    while True:
        chunk = os.read(r, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    try:
        res: dict = json.loads(b"".join(chunks).decode())
    except ValueError:
        res = {"error": f"the measuring child died (wait status {status}) without results"}
    if "traceback" in res:
        print(res["traceback"], file=sys.stderr)
    return res


def _child(plan: dict) -> dict:
    """Everything measured, inside a private mount namespace."""
    node_mod.enter_namespace()
    node = node_mod.Node(node_mod.pick_root(), f"pbs_chroot_bench.{os.getpid()}",
                         plan["settings"])
    res: dict = {"quick": plan["quick"], "plan": plan, "cg_parent": node.cg_parent,
                 "machine": _machine(), "bind_set": node.binds_note}
    from .mom import Mom
    mom = None
    try:
        node.setup()
        base_mounts = node_mod.mount_points()
        mom = Mom(node)
        ids = sections.Ids()
        n, warm = plan["runs"], 2
        tn = plan["throughput_jobs"]
        if plan["lever"]:
            _say(f"lever {plan['lever']}: {tn} jobs per variant and case")
            res["lever"] = sections.lever(mom, node, ids, tn,
                                          "\n".join(kv.replace("=", " = ", 1) for kv in
                                                    plan["lever"].split(";")),
                                          plan["mom_ms"])
        if plan["only"] == "lever":
            res["namespace"] = _namespace_check(node, base_mounts)
            return res
        _say(f"throughput: {tn} trivial jobs x 3 cases, one after another")
        res["throughput"] = sections.throughput(mom, node, ids, tn, plan["mom_ms"])
        _say(f"warm hook pair vs python -IS -c pass x{min(tn, 100)}")
        res["warm_pair"] = sections.warm_pair(mom, node, ids, min(tn, 100))
        sections.settle(node, 60)  # the holder's stage, torn down after any stage_grace
        if plan["only"] == "throughput":
            res["namespace"] = _namespace_check(node, base_mounts)
            return res
        _say(f"interpreter start-up x{max(n, 50)}")
        res["reference"] = sections.startup(max(n, 50))
        _say(f"hook cost: 3 cases x {n} jobs")
        res["hooks"] = sections.hook_cost(mom, node, ids, n, warm)
        res["job_info"] = sections.job_info(mom, node, ids, max(n, 20))
        _say("submit filter, as qsub runs it")
        from . import submitfilter
        res["submit_filter"] = submitfilter.measure(max(n // 2, 20))
        _say("floor and naive baseline")
        res["reference"]["floor"] = sections.floor(node, 20, 0.15)
        res["reference"]["naive"] = sections.naive(mom, node, ids, n, warm)
        _say("import graph (-X importtime)")
        res["imports"] = sections.imports(mom, node, ids, 3 if plan["quick"] else 5)
        _say(f"inside vs outside x{plan['reps']}")
        res["inside_outside"] = sections.inside_outside(node, plan["reps"], plan["quick"])
        _say(f"scale: {plan['jobs']} jobs at once")
        res["scale"] = sections.scale(mom, node, ids, plan["jobs"],
                                      res["hooks"]["stage_mounts"])
        res["namespace"] = _namespace_check(node, base_mounts)
    finally:
        _cleanup(node, mom, res)
    return res


def _namespace_check(node: node_mod.Node, base_mounts: list) -> dict:
    """Mountinfo as before the first job; no job record, stage or offline call left."""
    after = node_mod.mount_points()
    left = node.state_files() + [f"offline: {c}" for c in node.offline_calls()]
    return {"mounts_unchanged": after == base_mounts,
            "mounts_text": "as before" if after == base_mounts else
            f"differs: +{sorted(set(after) - set(base_mounts))[:5]} "
            f"-{sorted(set(base_mounts) - set(after))[:5]}",
            "state_clean": not left, "state_text": "none" if not left else ", ".join(left[:5])}


def _cleanup(node: node_mod.Node, mom: "object", res: dict) -> None:
    """Whatever is left, ours only: processes started here, job records, our cgroup parent.
    The syslog drainer is stopped whatever fails here: it holds the results pipe open."""
    try:
        node.stop_hookd()
        if mom is not None:
            mom.kill_all()  # type: ignore[attr-defined]
        if node.state.is_dir():
            _end_records(node, res)
        left = node_mod.remove_cgroup_parent(node.cg_parent)
        if left:
            res.setdefault("cleanup_errors", []).extend(left)
    finally:
        if node.syslog is not None:
            res["syslog"] = node.syslog.stop()


def _end_records(node: node_mod.Node, res: dict) -> None:
    from pbs_chroot import config, lifecycle
    try:
        node.write_config()  # the run's own settings may be what failed
        cfg = config.load(str(node.config))
    except Exception as e:  # noqa: B902 - best effort, reported
        res.setdefault("cleanup_errors", []).append(repr(e))
        return
    for name in sorted(os.listdir(node.state / "jobs")):
        if name.endswith(".json"):
            try:
                lifecycle.end_job(cfg, name[:-len(".json")])
            except Exception as e:  # noqa: B902 - best effort, reported
                res.setdefault("cleanup_errors", []).append(repr(e))
    try:
        sections.settle(node, 60)  # idle stages: their workers tear them down
    except sections.BenchError as e:
        res.setdefault("cleanup_errors", []).append(str(e))


def _host_check(before: tuple, cg_parent: str) -> dict:
    """Host mountinfo exactly as before; no cgroup of ours left. Cgroups that others made or
    removed meanwhile (a test run beside us) are reported, not counted: ours all live below
    ``cg_parent``."""
    mounts, cgs = node_mod.mount_points(), node_mod.cgroup_tree()
    ours = [c for c in cgs if cg_parent and f"/{cg_parent}" in c]
    added, removed = sorted(set(cgs) - set(before[1])), sorted(set(before[1]) - set(cgs))
    others = "" if not (added or removed) else (
        f"; meanwhile others changed {len(added) + len(removed)} cgroup(s): "
        f"+{added[:3]} -{removed[:3]}")
    return {
        "mounts_unchanged": mounts == before[0],
        "mounts_text": "as before" if mounts == before[0] else
        f"differs: +{sorted(set(mounts) - set(before[0]))[:5]} "
        f"-{sorted(set(before[0]) - set(mounts))[:5]}",
        "cgroups_unchanged": not ours,
        "cgroups_text": (f"{cg_parent} removed, nothing of ours left" if not ours else
                         f"left: {ours[:5]}") + others}


def _cpu_busy(seconds: float) -> float:
    """Fraction of all CPUs' time spent busy over ``seconds`` (from /proc/stat)."""
    def sample() -> "tuple[int, int]":
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return round(1.0 - float(i1 - i0) / max(1, t1 - t0), 3)


def _machine() -> dict:
    from pbs_chroot import cgroups
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    pretty = "?"
    if os.path.exists("/etc/os-release"):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                pretty = line.split("=", 1)[1].strip('"')
    return {"host": os.uname().nodename, "cpu": cpu,
            "cpus": os.cpu_count(), "mem_gib": round(mem_kb / 2**20, 1),
            "kernel": os.uname().release, "os": pretty,
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "python_path": sys.executable, "cgroup": cgroups.detect().version,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _say(text: str) -> None:
    print(f"benchmarks: {text}...", file=sys.stderr, flush=True)
