"""Statistics, budgets, the table on stdout and the README section (markdown).

Run by the harness's parent process (on the host side) from the results the measuring
child sent it. Trusts those results.
"""
import math
from typing import Optional

__all__ = ["summary", "percentile", "budgets", "table", "markdown"]


def percentile(values: list, q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def summary(ns: list) -> dict:
    """median/p90/p99/min/max in ms of a list of nanosecond durations."""
    if not ns:
        return {"n": 0}
    ms = [v / 1e6 for v in ns]
    return {"n": len(ms), "median": round(percentile(ms, 50), 3),
            "p90": round(percentile(ms, 90), 3), "p99": round(percentile(ms, 99), 3),
            "min": round(min(ms), 3), "max": round(max(ms), 3)}


def _check(name: str, value: Optional[float], limit: Optional[float], ok: bool,
           text: str) -> dict:
    return {"name": name, "value": value, "limit": limit, "pass": bool(ok), "text": text}


def budgets(res: dict) -> list:
    """The issue's budgets and the run's own checks, each PASS or FAIL with its numbers."""
    out = _throughput_budgets(res)
    if "hooks" not in res:  # --only throughput
        return out
    start = res["reference"]["startup_S"]["median"]
    hooks = res["hooks"]
    for case, extra in (("warm", 10.0), ("cold", 25.0)):
        for hook in ("prologue", "epilogue"):
            med = hooks[case][hook]["median"]
            limit = round(start + extra, 3)
            out.append(_check(f"{case} {hook} median <= start-up + {extra:g} ms", med, limit,
                              med <= limit, f"{med:.1f} ms vs {limit:.1f} ms "
                              f"({start:.1f} + {extra:g})"))
    for task, r in res.get("inside_outside", {}).get("tasks", {}).items():
        out.append(_check(f"inside/outside ratio ({task}) <= 1.02", r["ratio"], 1.02,
                          r["ratio"] <= 1.02, f"{r['ratio']:.3f} (inside {r['inside_median']:.1f}"
                          f" ms, outside {r['outside_median']:.1f} ms)"))
    sc = res.get("scale")
    if sc:
        ok = sc["succeeded"] == sc["jobs"]
        out.append(_check(f"{sc['jobs']} jobs all succeed", sc["succeeded"], sc["jobs"], ok,
                          f"{sc['succeeded']}/{sc['jobs']} succeeded"))
        limit = sc["mount_lines_before"] + sc["stage_mounts"]
        out.append(_check("peak mount lines <= start + one stage", sc["mount_lines_peak"], limit,
                          sc["mount_lines_peak"] <= limit,
                          f"peak {sc['mount_lines_peak']} vs {sc['mount_lines_before']} + "
                          f"{sc['stage_mounts']} = {limit}"))
    sf = res.get("submit_filter")
    if sf:
        bare = sf["python -IS -c pass"]["median"]
        worst = max(s["median"] for k, s in sf.items() if not k.startswith("python"))
        limit = round(bare + 10.0, 3)
        out.append(_check("submit filter median <= python -IS start-up + 10 ms", worst, limit,
                          worst <= limit, f"{worst:.1f} ms (slowest case) vs {limit:.1f} ms "
                          f"({bare:.1f} + 10)"))
    imp = res.get("imports", {})
    if imp:
        heavy = [m for m in ("psutil",) if m in imp.get("warm_modules", [])]
        out.append(_check("warm path does not import psutil", None, None, not heavy,
                          "psutil imported" if heavy else "not imported"))
    return out


def _throughput_budgets(res: dict) -> list:
    out = []
    wp = res.get("warm_pair")
    if wp:
        for key, what in (("", "Python hooks"), ("server_", "hook server")):
            if f"{key}ratio" not in wp:
                continue
            r, pm = wp[f"{key}ratio"], wp[f"{key}pair"]["median"]
            sm = wp["startup_IS"]["median"]
            out.append(_check(f"warm hook pair ({what}) median <= 3x `python -IS -c pass` "
                              "(same run)", r, 3.0, r <= 3.0,
                              f"{r:.2f}x ({pm:.1f} ms vs {sm:.1f} ms)"))
    tp = res.get("throughput")
    if tp:
        for case in ("noimage", "image", "srv_noimage", "srv_image"):
            if case not in tp:
                continue
            r = tp[case]["ratio"]
            out.append(_check(f"throughput with hooks ({_LABELS[case]}) >= 0.6x without "
                              f"(emulated, pbs_mom {tp['mom_ms']:g} ms/job)", r, 0.6, r >= 0.6,
                              f"{r:.3f} ({tp[case]['rate']:.1f} vs {tp['none']['rate']:.1f} "
                              f"jobs/s)"))
    return out


_LABELS = {"none": "no hooks", "noimage": "Python hooks, no image",
           "image": "Python hooks, job in the image", "srv_noimage": "hook server, no image",
           "srv_image": "hook server, job in the image"}


def throughput_text(res: dict) -> str:
    """The throughput section of the table."""
    tp, wp, lv = res.get("throughput"), res.get("warm_pair"), res.get("lever")
    out = []
    if lv:
        out.append(f"  lever `{lv['setting']}` (B) against the config without it (A), "
                   f"{lv['n']} jobs each, blocks of {lv['block']}:\n")
        for case in ("noimage", "image", "srv_noimage", "srv_image"):
            c = lv[case]
            out.append(f"    {case:<11} pair A {c['A_pair']['median']:.1f} (p90 "
                       f"{c['A_pair']['p90']:.1f}) -> B {c['B_pair']['median']:.1f} (p90 "
                       f"{c['B_pair']['p90']:.1f}) ms: x{c['pair_ratio']:.3f}; whole job "
                       f"{c['A_job']['median']:.1f} -> {c['B_job']['median']:.1f} ms\n")
    if not tp:
        return "".join(out)
    out += [f"6. Throughput: {tp['jobs']} trivial jobs per case, one after another, "
            f"interleaved; pbs_mom's own work modelled as {tp['mom_ms']:g} ms/job\n"]
    for case, label in _LABELS.items():
        if case not in tp:
            continue
        c = tp[case]
        line = (f"  {label:<31} {c['total_s']:>7.2f} s  {c['rate']:>6.1f} jobs/s")
        if "ratio" in c:
            line += (f"  x{c['ratio']:.3f} of no hooks (mom.py alone: x{c['own_ratio']:.3f}); "
                     f"pair {c['pair']['median']:.1f} ms (p90 {c['pair']['p90']:.1f})"
                     + (f", prologue {c['prologue']['median']:.1f}" if "prologue" in c else ""))
        out.append(line + "\n")
    out.append(f"  `python -IS -c pass` in the same rounds: {tp['startup_IS']['median']:.1f} ms "
               f"(p90 {tp['startup_IS']['p90']:.1f})\n")
    for key, what in (("", "Python hooks"), ("server_", "hook server")):
        if not wp or f"{key}ratio" not in wp:
            continue
        out.append(f"  warm pair, {what} (stage held by another job), x{wp['n']}, alternating "
                   f"with `python -IS -c pass`: prologue {wp[key + 'prologue']['median']:.1f} + "
                   f"epilogue {wp[key + 'epilogue']['median']:.1f} ms, pair "
                   f"{wp[key + 'pair']['median']:.1f} ms (p90 {wp[key + 'pair']['p90']:.1f}) vs "
                   f"{wp['startup_IS']['median']:.1f} ms (p90 {wp['startup_IS']['p90']:.1f}): "
                   f"x{wp[key + 'ratio']:.2f}\n")
    return "".join(out)


def checks(res: dict) -> list:
    """The run's own checks: state left as found."""
    out = []
    host = res.get("host", {})
    if host:
        out.append(_check("host mountinfo unchanged", None, None, host["mounts_unchanged"],
                          host["mounts_text"]))
        out.append(_check("host cgroup tree: nothing of ours left", None, None,
                          host["cgroups_unchanged"], host["cgroups_text"]))
    ns = res.get("namespace", {})
    if ns:
        out.append(_check("namespace mountinfo as before the jobs", None, None,
                          ns["mounts_unchanged"], ns["mounts_text"]))
        out.append(_check("no job record, stage or offline call left", None, None,
                          ns["state_clean"], ns["state_text"]))
    return out


def _busy(res: dict) -> bool:
    """Was something else running when we started?"""
    return bool(res["machine"].get("cpu_busy_before", 0) > 0.10)


def _row(label: str, s: dict, note: str = "") -> str:
    if not s or not s.get("n"):
        return f"  {label:<44} {'n/a':>9}\n"
    return (f"  {label:<44} {s['median']:>9.2f} {s['p90']:>9.2f} {s['n']:>5}"
            + (f"  {note}" if note else "") + "\n")


def table(res: dict) -> str:
    """The human-readable table."""
    m = res["machine"]
    head = [f"pbs_chroot benchmarks ({'quick' if res['quick'] else 'full'} run, "
            f"{res['elapsed_s']:.0f} s) on {m['host']}: {m['cpu']} x{m['cpus']}, "
            f"{m['mem_gib']} GiB, Linux {m['kernel']}, Python {m['python']}, cgroup v"
            f"{m['cgroup']}\n",
            f"  settings: {res['plan'].get('settings', '').strip() or 'defaults'}\n",
            f"  bind set: {res['bind_set']}; job info: stub qstat; CPUs "
            f"{100 * m.get('cpu_busy_before', 0):.0f}% busy in the second before the run"
            + (" (NOT IDLE: the figures may be noisy)" if _busy(res) else "") + "\n\n"]
    if "hooks" not in res:  # --only throughput
        return "".join(head + [throughput_text(res), "5. Budgets and checks\n"] + [
            f"  {'PASS' if b['pass'] else 'FAIL'}  {b['name']}: {b['text']}\n"
            for b in res["budgets"] + res["checks"]])
    ref, hooks = res["reference"], res["hooks"]
    out = head + [f"  {'':<44} {'median':>9} {'p90':>9} {'n':>5}   (ms)\n",
                  "1. Hook cost (installed hooks, run as pbs_mom runs them)\n"]
    for case, label in (("noimage", "a. no image"), ("warm", "b. warm (stage up)"),
                        ("warm_nocg", "b'. warm, cgroups = no (info)"),
                        ("cold", "c. cold (sets up, tears down)")):
        if case not in hooks:
            continue
        out.append(_row(f"{label}: prologue", hooks[case]["prologue"]))
        out.append(_row(f"{label}: epilogue", hooks[case]["epilogue"]))
        for text in hooks[case].get("stderr_samples", []):
            out.append(f"    on the job's stderr: {text.splitlines()[0]}\n")
    src = res["job_info"]
    out.append(_row("job info: one qstat call (stub, in-process)", src["qstat_stub"]))
    out.append(f"  {'job info: real qstat':<44} {src['qstat_real']}\n")
    out.append(f"  {'job info: pbs_python':<44} {src['pbs_python']}\n")
    for case, s in res.get("submit_filter", {}).items():
        if not case.startswith("python"):
            out.append(_row(f"submit filter (qsub waits): {case}", s))
    out.append("2. Reference points (same run)\n")
    out.append(_row("python -S -c pass", ref["startup_S"]))
    out.append(_row("python -IS -c pass (the hooks' flags)", ref["startup_IS"]))
    out.append(_row("python -I -c pass (with site)", ref["startup_I"]))
    fl = ref["floor"]
    out.append(_row("floor, no image: set-up (cgroup, attach)", fl["noimage_setup"]))
    out.append(_row("floor, no image: teardown (kill, rmdir)", fl["noimage_teardown"]))
    out.append(_row("floor, cold: set-up (cgroup, attach, binds)", fl["cold_setup"]))
    out.append(_row("floor, cold: teardown (kill, umount, rmdir)", fl["cold_teardown"]))
    out.append(f"  {'  of which (medians, cold)':<44} " + ", ".join(
        f"{k} {fl['cold_' + k]['median']:.2f}" for k in
        ("create", "attach", "binds", "kill", "umount", "rmdir")) + "\n")
    nv = ref.get("naive")
    if nv and nv.get("prologue"):
        out.append(_row("naive shell, cold: prologue.sh", nv["prologue"]))
        out.append(_row("naive shell, cold: epilogue.sh", nv["epilogue"]))
    else:
        out.append(f"  {'naive shell baseline':<44} {nv.get('skipped', 'n/a') if nv else 'n/a'}\n")
    io = res.get("inside_outside", {})
    if io:
        out.append(f"3. Inside vs outside ({io['reps']} reps each, TMPDIR {io['tmpdir']})\n")
        for task, r in io["tasks"].items():
            out.append(f"  {task:<44} {r['inside_median']:>9.1f} {r['outside_median']:>9.1f} "
                       f"  inside/outside {r['ratio']:.3f} (cpu {r['cpu_ratio']:.3f})\n")
    sc = res.get("scale")
    if sc:
        out.append(f"4. Scale: {sc['jobs']} jobs on one image, started at once\n")
        out.append(_row("prologue latency (p50, p90; p99 below)", sc["prologue"],
                        f"p99 {sc['prologue'].get('p99', 0):.1f}"))
        out.append(_row("epilogue latency", sc["epilogue"],
                        f"p99 {sc['epilogue'].get('p99', 0):.1f}"))
        out.append(f"  {'all running after / total wall time':<44} {sc['all_running_s']:>8.2f}s"
                   f" {sc['total_s']:>8.2f}s\n")
        out.append(f"  {'mountinfo lines before / peak / after':<44} "
                   f"{sc['mount_lines_before']} / {sc['mount_lines_peak']} / "
                   f"{sc['mount_lines_after']} (one stage = {sc['stage_mounts']})\n")
    imp = res.get("imports")
    if imp:
        out.append(_imports_text(res))
    log = res.get("syslog")
    if log:
        out.append(f"Hooks' syslog: {log['lines']} lines, {log.get('problem_count', 0)} warnings "
                   "or errors" + (": " + "; ".join(log.get("distinct_problems", []))
                                  if log.get("problem_count") else "") + "\n")
    out.append(throughput_text(res))
    out.append("5. Budgets and checks\n")
    for b in res["budgets"] + res["checks"]:
        out.append(f"  {'PASS' if b['pass'] else 'FAIL'}  {b['name']}: {b['text']}\n")
    return "".join(out)


def _imports_text(res: dict) -> str:
    imp = res["imports"]
    out = [f"Imports of the warm path (-X importtime, fastest of {imp['runs']} runs; beyond "
           "`python -IS -c pass`)\n"]
    for hook in ("prologue", "epilogue"):
        h = imp[hook]
        out.append(f"  {hook}: {h['modules']} modules, {h['total_ms']:.1f} ms "
                   f"(pbs_chroot's own {h['ours_self_ms']:.1f}, stdlib {h['stdlib_ms']:.1f}); "
                   "stdlib imports by cost (ms, imported by):\n    "
                   + ", ".join(f"{n} {ms:.1f} ({by.replace('pbs_chroot.', '')})"
                               for n, ms, by in h["stdlib_entries"][:12]) + "\n")
        b = h["bare"]
        out.append(f"    the same modules in a bare `python -IS -c`: {b['imports_ms']:.1f} ms to "
                   f"import, {b['exit_teardown_ms']:.1f} ms more at exit (interpreter teardown; "
                   "os._exit skips it)\n")
    start = res["reference"]["startup_IS"]["median"]
    attach = res["reference"]["floor"].get("noimage_attach", {}).get("median", 0.0)
    for hook in ("prologue", "epilogue"):
        b, med = imp[hook]["bare"], res["hooks"]["warm"][hook]["median"]
        # The installed hooks end with os._exit: no interpreter teardown to add.
        rest = med - start - b["imports_ms"]
        out.append(f"  warm {hook} {med:.1f} ms ~ start-up {start:.1f} + imports "
                   f"{b['imports_ms']:.1f} + the work {rest:.1f}"
                   + (f" (of which the cgroup attach, in the floor: {attach:.1f})"
                      if hook == "prologue" else "") + "\n")
    return "".join(out)


def markdown(res: dict) -> str:
    """A results section for the README."""
    m = res["machine"]
    lines = ["## Benchmark results", "",
             f"`sudo ./benchmarks/run` on {m['date']}: {m['cpu']} ({m['cpus']} vCPU), "
             f"{m['mem_gib']} GiB, Linux {m['kernel']}, {m['os']}, Python {m['python']}, "
             f"cgroup v{m['cgroup']}; bind set {res['bind_set']}; job info from a stub qstat. "
             "Milliseconds, median / p90."
             + (f" The machine was not idle when the run started "
                f"({100 * m.get('cpu_busy_before', 0):.0f}% CPU busy): figures may be noisy."
                if _busy(res) else ""), "",
             "| | median | p90 | n |", "|---|---:|---:|---:|"]
    ref, hooks = res["reference"], res["hooks"]
    rows = [("prologue, no image", hooks["noimage"]["prologue"]),
            ("epilogue, no image", hooks["noimage"]["epilogue"]),
            ("prologue, warm stage", hooks["warm"]["prologue"]),
            ("epilogue, warm stage", hooks["warm"]["epilogue"]),
            ("prologue, warm stage, `cgroups = no` (no v1 attach)",
             hooks["warm_nocg"]["prologue"]),
            ("epilogue, warm stage, `cgroups = no`", hooks["warm_nocg"]["epilogue"]),
            ("prologue, cold (sets the stage up)", hooks["cold"]["prologue"]),
            ("epilogue, cold (tears it down)", hooks["cold"]["epilogue"]),
            ("one qstat call (stub), in-process", res["job_info"]["qstat_stub"]),
            ("`python -S -c pass`", ref["startup_S"]),
            ("`python -IS -c pass`", ref["startup_IS"]),
            ("floor, cold set-up (one process)", ref["floor"]["cold_setup"]),
            ("floor, cold teardown (one process)", ref["floor"]["cold_teardown"])]
    rows += [(f"submit filter, {case}", s) for case, s in res.get("submit_filter", {}).items()
             if not case.startswith("python")]
    nv = ref.get("naive") or {}
    if nv.get("prologue"):
        rows += [("naive shell prologue (cold, mount(8))", nv["prologue"]),
                 ("naive shell epilogue (cold, umount(8))", nv["epilogue"])]
    for label, s in rows:
        lines.append(f"| {label} | {s['median']:.1f} | {s['p90']:.1f} | {s['n']} |")
    io, sc = res.get("inside_outside"), res.get("scale")
    lines.append("")
    if io:
        lines.append("Inside the image vs on the host (median wall time, "
                     f"{io['reps']} runs each): " + "; ".join(
                         f"{t} {r['inside_median']:.0f} vs {r['outside_median']:.0f} ms, "
                         f"ratio {r['ratio']:.3f}" for t, r in io["tasks"].items()) + ".")
    if sc:
        lines.append(f"{sc['jobs']} jobs at once on one image: {sc['succeeded']} succeeded; "
                     f"prologue p50 {sc['prologue']['median']:.0f} ms, p99 "
                     f"{sc['prologue']['p99']:.0f} ms; all running after "
                     f"{sc['all_running_s']:.1f} s, all done after {sc['total_s']:.1f} s; "
                     f"mountinfo lines {sc['mount_lines_before']} before, "
                     f"{sc['mount_lines_peak']} at peak, {sc['mount_lines_after']} after.")
    imp = res.get("imports")
    if imp:
        lines += ["", "Where the warm hooks' time goes (`-X importtime`, and the same modules "
                  "imported by a bare interpreter):", ""]
        lines += ["- " + line.strip() for line in _imports_text(res).splitlines()[1:]
                  if line.strip().startswith("warm ")]
        for hook in ("prologue", "epilogue"):
            h = imp[hook]
            lines.append(f"- {hook} imports, by cost: " + ", ".join(
                f"{n} {ms:.1f} ms ({by.replace('pbs_chroot.', '')})"
                for n, ms, by in h["stdlib_entries"][:8]))
    lines += ["", "Budgets:", ""]
    for b in res["budgets"]:
        lines.append(f"- {'PASS' if b['pass'] else 'FAIL'} {b['name']}: {b['text']}")
    return "\n".join(lines) + "\n"
