"""The measurements: hook cost, reference points, imports, inside vs outside, scale.

Run as root by the harness's measuring child, inside its namespace, one section after the
other. Every job must succeed (BenchError otherwise): a figure of a failing hook is no figure.
"""
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, Optional

from pbs_chroot import config as config_mod

from .floor import Floor
from .mom import Job, Mom
from .node import GID, HERE, UID, USER, Node, mount_lines
from .report import summary

HOOK_ENV = {"PATH": "/bin:/usr/bin", "LANG": "C.UTF-8"}


class BenchError(Exception):
    """A job or a step failed: the run's figures would be meaningless."""


class Ids:
    """Torque-like job ids, unique in the run."""

    def __init__(self) -> None:
        self.n = 1000

    def __call__(self) -> str:
        self.n += 1
        return f"{self.n}.bench"


def _must(job: Job) -> Job:
    if not job.ok:
        raise BenchError(job.failure())
    return job


def spawn_time(argv: list, env: Optional[dict] = None) -> int:
    """ns from posix_spawn to waitpid of one process (stdio on /dev/null); raises on failure."""
    actions = [(os.POSIX_SPAWN_OPEN, fd, "/dev/null", os.O_RDWR, 0) for fd in (0, 1, 2)]
    t0 = time.perf_counter_ns()
    pid = os.posix_spawn(argv[0], argv, env or HOOK_ENV, file_actions=actions)
    _, status = os.waitpid(pid, 0)
    ns = time.perf_counter_ns() - t0
    if status:
        raise BenchError(f"{argv} exited with wait status {status}")
    return ns


# -- 2. reference: interpreter start-up ---------------------------------------------------

def startup(n: int) -> dict:
    """`python -S -c pass` and friends on the hooks' interpreter, interleaved."""
    flags = {"startup_S": "-S", "startup_IS": "-IS", "startup_I": "-I"}
    times: dict = {k: [] for k in flags}
    for _ in range(3):  # page cache, not measured
        spawn_time([sys.executable, "-S", "-c", "pass"])
    for _ in range(n):
        for key, flag in flags.items():
            times[key].append(spawn_time([sys.executable, flag, "-c", "pass"]))
    return {k: summary(v) for k, v in times.items()}


# -- 1. hook cost -----------------------------------------------------------------------------

def hook_cost(mom: Mom, node: Node, ids: Ids, n: int, warmup: int) -> dict:
    """Prologue and epilogue of (a) no image, (b) warm stage, (c) cold stage, n runs each."""
    image = [("PBS_O_ROOTDIR", str(node.image))]
    out: dict = {}
    base = mount_lines()
    for case, variables in (("noimage", [("MYVAR", "x")]), ("cold", image)):
        out[case] = _series(mom, ids, variables, n, warmup)
        if mount_lines() != base:
            raise BenchError(f"{case}: mountinfo has {mount_lines()} lines, {base} before")
    holder = mom.start(Job(ids(), image, "hold"))
    while holder.pro_rc is None:
        mom.step(0.05)
    if holder.pro_rc != 0:
        raise BenchError(f"the warm stage's holder job failed: {holder.failure()}")
    stage_mounts = mount_lines() - base
    try:
        out["warm"] = _series(mom, ids, image, n, warmup)
        # The same with `cgroups = no`: what the hooks cost without the kernel's
        # cgroup v1 attach (an RCU grace period, the floor's "attach").
        node.write_config(main="cgroups = no\n")
        try:
            out["warm_nocg"] = _series(mom, ids, image, n, warmup)
        finally:
            node.write_config()
    finally:
        mom.release(holder)
        mom.wait([holder])
    _must(holder)
    out["stage_mounts"] = stage_mounts
    return out


def _series(mom: Mom, ids: Ids, variables: list, n: int, warmup: int) -> dict:
    pro: list = []
    epi: list = []
    first: list = []
    said: list = []
    for i in range(warmup + n):
        job = _must(mom.run(Job(ids(), variables)))
        if job.stderr.strip() and len(said) < 3:
            said.append(job.stderr.strip()[:200])
        if i < warmup:
            first.append([round((job.pro_ns or 0) / 1e6, 2), round((job.epi_ns or 0) / 1e6, 2)])
            continue
        pro.append(job.pro_ns)
        epi.append(job.epi_ns)
    return {"prologue": summary(pro), "epilogue": summary(epi), "warmup_ms": first,
            "stderr_samples": said}


# -- 1. the job-information sources on their own ---------------------------------------------

def job_info(mom: Mom, node: Node, ids: Ids, n: int) -> dict:
    """One qstat call through jobinfo.read_variables (stub qstat), and what else is here."""
    from pbs_chroot import jobinfo
    job = Job(ids(), [("PBS_O_ROOTDIR", str(node.image))])
    mom._prepare(job)
    times = []
    for _ in range(n + 2):
        t0 = time.perf_counter_ns()
        jobinfo.read_variables(job.job_id, source="qstat", qstat=str(node.qstat), timeout=30)
        times.append(time.perf_counter_ns() - t0)
    for path in mom._files(job) + (str(node.jobs_xml / f"{job.job_id}.xml"),):
        os.unlink(path)
    real = shutil.which("qstat", path="/usr/bin:/bin:/usr/local/bin")
    probe = subprocess.run([sys.executable, "-I", "-c", "import pbs"], capture_output=True)
    return {"qstat_stub": summary(times[2:]),
            "qstat_real": f"present ({real}), not timed: needs a server and a job" if real
            else "not installed on this machine",
            "pbs_python": "importable, not timed: needs a server and a job"
            if probe.returncode == 0 else "not installed on this machine (`import pbs` fails)"}


# -- 2. the floor -------------------------------------------------------------------------------

def floor(node: Node, n: int, pause: float) -> dict:
    """The kernel operations alone, each run after ``pause`` s of quiet; per step too."""
    cfg = config_mod.load(str(node.config))
    out: dict = {"pause_s": pause}
    for case, version in (("noimage", None), ("cold", str(node.version))):
        fl = Floor(cfg, version, node.cg_parent)
        fl.run()  # first: not measured
        runs = [fl.run(pause) for _ in range(n)]
        for key in runs[0]:
            out[f"{case}_{key}"] = summary([r[key] for r in runs])
    return out


# -- 2. the naive shell baseline -------------------------------------------------------------

def naive(mom: Mom, node: Node, ids: Ids, n: int, warmup: int) -> dict:
    """benchmarks/naive/{prologue,epilogue}.sh, installed as pbs_mom wants, on the cold path."""
    from pbs_chroot import cgroups
    layout = cgroups.detect()
    if layout.version != 1:
        return {"skipped": "cgroup v1 only (the naive scripts write v1 files)"}
    d = node.root / "naive"
    d.mkdir(mode=0o755)
    for name in ("prologue.sh", "epilogue.sh"):
        shutil.copyfile(HERE / "naive" / name, d / name)
        os.chmod(d / name, 0o500)
    cgroot = os.path.dirname(layout.v1["memory"])
    (d / "naive.conf").write_text(
        f"QSTAT={node.qstat}\nIMAGE={node.image}\nCGROOT={cgroot}\n"
        "CONTROLLERS='memory cpuacct cpu freezer pids'\n"
        f"CGPARENT={node.cg_parent}\nSTATE={d}\nPBS_HOME={node.pbs_home}\n")
    image = [("PBS_O_ROOTDIR", str(node.image))]
    base = mount_lines()
    pro, epi = [], []
    for i in range(warmup + n):
        job = _must(mom.run(Job(ids(), image, prologue_path=str(d / "prologue.sh"),
                                epilogue_path=str(d / "epilogue.sh"))))
        if i >= warmup:
            pro.append(job.pro_ns)
            epi.append(job.epi_ns)
    if mount_lines() != base:
        raise BenchError(f"naive baseline left mounts ({mount_lines()} lines, {base} before)")
    return {"prologue": summary(pro), "epilogue": summary(epi)}


# -- imports --------------------------------------------------------------------------------

def _parse_importtime(text: str) -> list:
    """[(module, level, self_us, cumulative_us, parent)] from -X importtime output.

    The output is post-order (a module after what it imported): a row's parent is the
    next row one level up.
    """
    rows = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        head, cum, name = line[len("import time:"):].split("|", 2)
        level = (len(name) - len(name.lstrip(" ")) - 1) // 2
        rows.append((name.strip(), level, int(head), int(cum)))
    return [(name, level, self_us, cum_us,
             next((r[0] for r in rows[i + 1:] if r[1] == level - 1), "") if level else "")
            for i, (name, level, self_us, cum_us) in enumerate(rows)]


def imports(mom: Mom, node: Node, ids: Ids, runs: int) -> dict:
    """The warm prologue's and epilogue's import graphs, beyond the interpreter's start-up."""
    cmd = (sys.executable, "-X", "importtime", "-IS")
    base = subprocess.run([*cmd, "-c", "pass"], capture_output=True, text=True, env=HOOK_ENV)
    startup_mods = {r[0] for r in _parse_importtime(base.stderr)}
    image = [("PBS_O_ROOTDIR", str(node.image))]
    holder = mom.start(Job(ids(), image, "hold"))
    while holder.pro_rc is None:
        mom.step(0.05)
    samples: dict = {"prologue": [], "epilogue": []}
    try:
        for _ in range(runs):
            job = _must(mom.run(Job(ids(), image, prologue_cmd=cmd)))
            samples["prologue"].append(_parse_importtime(job.stderr))
            job = _must(mom.run(Job(ids(), image, epilogue_cmd=cmd)))
            samples["epilogue"].append(_parse_importtime(job.stderr))
    finally:
        mom.release(holder)
        mom.wait([holder])
    out: dict = {"runs": runs, "startup_modules": len(startup_mods)}
    for hook, rows_list in samples.items():
        out[hook] = _import_summary(rows_list, startup_mods)
    out["warm_modules"] = sorted(set(out["prologue"]["names"]) | set(out["epilogue"]["names"]))
    for hook in ("prologue", "epilogue"):
        out[hook]["bare"] = _bare_imports(out[hook]["names"], 10 if runs < 5 else 30)
    return out


def _bare_imports(names: list, n: int) -> dict:
    """The same modules imported by a bare `python -IS -c`: their cost without -X importtime,
    and what the interpreter's teardown at exit costs with them loaded (os._exit skips it)."""
    import pbs_chroot
    lib = os.path.dirname(os.path.dirname(pbs_chroot.__file__))
    code = f"import os, sys\nsys.path.append({lib!r})\n" + "".join(
        f"try:\n    import {m}\nexcept ImportError:\n    pass\n" for m in names)
    argv = [sys.executable, "-IS", "-c"]
    t: dict = {"pass": [], "normal": [], "os_exit": []}
    for _ in range(n):
        t["pass"].append(spawn_time(argv + ["pass"]))
        t["normal"].append(spawn_time(argv + [code]))
        t["os_exit"].append(spawn_time(argv + [code + "os._exit(0)\n"]))
    med = {k: summary(v)["median"] for k, v in t.items()}
    return {"imports_ms": round(med["os_exit"] - med["pass"], 2),
            "exit_teardown_ms": round(med["normal"] - med["os_exit"], 2), "n": n}


def _import_summary(rows_list: list, startup_mods: set) -> dict:
    """Per module the fastest of the runs; what each stdlib import costs and who asks for it."""
    best: dict = {}
    for rows in rows_list:
        for name, level, self_us, cum_us, parent in rows:
            if name in startup_mods:
                continue
            old = best.get(name)
            best[name] = (level, min(self_us, old[1]) if old else self_us,
                          min(cum_us, old[2]) if old else cum_us, parent)

    def ours(name: str) -> bool:
        return name == "pbs_chroot" or name.startswith("pbs_chroot.")
    # A stdlib module imported by one of ours (or by the script itself): what that import
    # costs, everything it pulls in included.
    entry = sorted(((n, v[2] / 1000, v[3] or "at run time") for n, v in best.items()
                    if not ours(n) and (not v[3] or ours(v[3]))), key=lambda x: -x[1])
    top_self = sorted(((n, v[1] / 1000) for n, v in best.items()), key=lambda x: -x[1])
    return {"modules": len(best), "total_ms": round(sum(v[1] for v in best.values()) / 1000, 2),
            "ours_self_ms": round(sum(v[1] for n, v in best.items() if ours(n)) / 1000, 2),
            "stdlib_ms": round(sum(v[1] for n, v in best.items() if not ours(n)) / 1000, 2),
            "stdlib_entries": [(n, round(ms, 2), by) for n, ms, by in entry],
            "top_self": [(n, round(ms, 2)) for n, ms in top_self[:20]],
            "pbs_chroot_modules": sorted(n for n in best if ours(n)),
            "names": sorted(best)}


# -- 3. inside vs outside -----------------------------------------------------------------

def tasks(quick: bool) -> dict:
    """The two tasks, as busybox sh scripts (the same binary on the host and in the image)."""
    loops = 300_000 if quick else 1_000_000
    files = 10_000
    bb = "/bin/busybox"
    return {
        f"cpu: sh arithmetic loop x{loops}":
            f"i=0; while [ $i -lt {loops} ]; do i=$((i+1)); done",
        f"metadata: {files} files made, removed in TMPDIR":
            f'TMPDIR=$HOME/tmp; d=$TMPDIR/meta.$$; {bb} mkdir -p "$d" && cd "$d" || exit 1; '
            f'i=0; while [ $i -lt {files} ]; do echo x > f$i; i=$((i+1)); done; '
            f'cd / && {bb} rm -r "$d"',
    }


def inside_outside(node: Node, reps: int, quick: bool) -> dict:
    """Each task through `pbs-chroot run` (in the image) and on the host as the same user."""
    pbs_chroot = [sys.executable, "-m", "pbs_chroot", "--config", str(node.config), "run",
                  "--image", str(node.image), "--user", USER, "--"]
    env = {"HOME": str(node.home), "USER": USER, "LOGNAME": USER,
           "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"}
    out: dict = {"reps": reps, "tmpdir": f"{node.home}/tmp (the user's home: the stage binds "
                 "/home; the bind set has no TMPDIR)", "tasks": {}}
    for name, script in tasks(quick).items():
        argv = [str(node.timeit), "/bin/busybox", "sh", "-c", script]
        res: dict = {"inside": [], "outside": [], "inside_cpu": [], "outside_cpu": []}
        for rep in range(reps + 1):  # the first pair warms caches: not counted
            order = ("inside", "outside") if rep % 2 else ("outside", "inside")
            for where in order:
                wall, cpu = _timed(pbs_chroot + argv if where == "inside" else argv,
                                   env if where == "outside" else None, node)
                if rep:
                    res[where].append(wall)
                    res[f"{where}_cpu"].append(cpu)
        si, so = summary(res["inside"]), summary(res["outside"])
        ci, co = summary(res["inside_cpu"]), summary(res["outside_cpu"])
        out["tasks"][name] = {
            "inside_median": si["median"], "outside_median": so["median"],
            "ratio": round(si["median"] / so["median"], 4),
            "cpu_ratio": round(ci["median"] / co["median"], 4) if co["median"] else 0.0,
            "inside": si, "outside": so}
    return out


def _timed(argv: list, env: Optional[dict], node: Node) -> tuple:
    if env is None:  # pbs-chroot run, as root
        res = subprocess.run(argv, capture_output=True, text=True, cwd="/", timeout=300)
    else:
        res = subprocess.run(argv, capture_output=True, text=True, cwd=str(node.home), env=env,
                             user=UID, group=GID, extra_groups=[], timeout=300)
    line = [x for x in res.stdout.splitlines() if x.startswith("timeit ")]
    if res.returncode != 0 or not line or line[-1].split()[4] != "0":
        raise BenchError(f"task failed ({res.returncode}): {argv[-1][:60]}...: "
                         f"{res.stdout[-300:]} {res.stderr[-300:]}")
    _, wall, user, sys_, _ = line[-1].split()
    return int(wall), (int(user) + int(sys_)) * 1000


# -- 4. scale -------------------------------------------------------------------------------

SCALE_SCRIPT = """read -r line < /etc/os-release
case $line in *"pbs_chroot demo image"*) ;; *) echo "not in the image: $line"; exit 3 ;; esac
read -r x
exit 0
"""


def scale(mom: Mom, node: Node, ids: Ids, jobs: int, stage_mounts: int) -> dict:
    """``jobs`` jobs on one image started at once; each runs in the image until released."""
    image = [("PBS_O_ROOTDIR", str(node.image))]
    before = mount_lines()
    peak = [before]

    def sample() -> None:
        peak[0] = max(peak[0], mount_lines())

    t0 = time.perf_counter_ns()
    started = [mom.start(Job(ids(), image, "shell", SCALE_SCRIPT)) for _ in range(jobs)]
    t_spawned = time.perf_counter_ns()
    _until(mom, lambda: all(j.start_code is not None or j.t_done is not None
                            or (j.pro_rc not in (None, 0)) for j in started), sample)
    t_running = time.perf_counter_ns()
    for j in started:
        mom.release(j)
    mom.wait(started, timeout=600, on_step=sample)
    t_end = time.perf_counter_ns()
    after = mount_lines()
    ok = [j for j in started if j.ok]
    failures = [j.failure() for j in started if not j.ok][:5]
    return {"jobs": jobs, "succeeded": len(ok), "failures": failures,
            "prologue": summary([j.pro_ns for j in started if j.pro_ns is not None]),
            "epilogue": summary([j.epi_ns for j in started if j.epi_ns is not None]),
            "spawn_s": round((t_spawned - t0) / 1e9, 3),
            "all_running_s": round((t_running - t0) / 1e9, 3),
            "total_s": round((t_end - t0) / 1e9, 3),
            "mount_lines_before": before, "mount_lines_peak": peak[0],
            "mount_lines_after": after, "stage_mounts": stage_mounts,
            "driver": "benchmarks/mom.py (pbs_mom's way, as tests/momemu.py): installed hooks"}


def _until(mom: Mom, cond: Callable[[], bool], sample: Callable[[], None],
           timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise BenchError(f"jobs not running after {timeout} s")
        mom.step(0.005)
        sample()


# -- 6. throughput: a node's job-start rate, with the hooks and without (issue 16) -------------

# pbs_mom's own work per job, outside the hooks: on a real Torque 6.1 (one node, 2 cores),
# 200 trivial jobs without hooks took 5.8 s, 29 ms a job (issue 16). The lean mom here
# costs far less, so the emulation spends that time per job (a sleep: pbs_mom's share is
# mostly server round trips and job files), and reports the ratio without it as well.
TORQUE_MOM_MS = 29.0
TRIVIAL = "exit 0\n"


def throughput(mom: Mom, node: Node, ids: Ids, n: int, mom_ms: float) -> dict:
    """n trivial jobs per case, one after another as a serial pbs_mom runs them, the cases
    interleaved job by job: no hooks; the Python hooks without an image, and with a job in
    the image (no other job holds its stage); the same two through the hook server (the C
    clients, `pbs-chroot hookd`). Each round also times `python -IS -c pass`."""
    image = [("PBS_O_ROOTDIR", str(node.image))]
    plain = [("MYVAR", "x")]
    cases = {"none": (None, plain), "noimage": ("py", plain), "image": ("py", image),
             "srv_noimage": ("srv", plain), "srv_image": ("srv", image)}
    wall: dict = {k: [] for k in cases}
    own: dict = {k: [] for k in cases}     # without the modelled mom time
    pair: dict = {k: [] for k in cases if k != "none"}
    pro: dict = {k: [] for k in pair}
    start: list = []
    base = mount_lines()
    for i in range(n + 2):  # two rounds unmeasured (page cache)
        names = list(cases)
        names = names[i % len(names):] + names[:i % len(names)]
        for name in names:
            hooks, variables = cases[name]
            t0 = time.perf_counter_ns()
            time.sleep(mom_ms / 1000)
            t1 = time.perf_counter_ns()
            job = _must(mom.run(_job(ids, node, variables, hooks)))
            t2 = time.perf_counter_ns()
            if i >= 2:
                wall[name].append(t2 - t0)
                own[name].append(t2 - t1)
                if hooks:
                    pair[name].append((job.pro_ns or 0) + (job.epi_ns or 0))
                    pro[name].append(job.pro_ns or 0)
        t = spawn_time([sys.executable, "-IS", "-c", "pass"])
        if i >= 2:
            start.append(t)
    settle(node, 3600)
    if mount_lines() != base:
        raise BenchError(f"throughput: mountinfo has {mount_lines()} lines, {base} before")
    out: dict = {"jobs": n, "mom_ms": mom_ms, "startup_IS": summary(start)}
    for name in cases:
        total = sum(wall[name]) / 1e9
        out[name] = {"total_s": round(total, 3), "rate": round(n / total, 2),
                     "own_total_s": round(sum(own[name]) / 1e9, 3),
                     "job": summary(own[name])}
        if name in pair:
            out[name]["pair"] = summary(pair[name])
            out[name]["prologue"] = summary(pro[name])
    for name in pair:
        out[name]["ratio"] = round(out["none"]["total_s"] / out[name]["total_s"], 3)
        out[name]["own_ratio"] = round(out["none"]["own_total_s"] / out[name]["own_total_s"], 3)
    return out


def _job(ids: Ids, node: Node, variables: list, hooks: Optional[str],
         body: str = "shell") -> Job:
    """A trivial job: no hooks (None), the Python hooks ("py") or the C clients ("srv")."""
    job = Job(ids(), variables, body, TRIVIAL if body == "shell" else "", hooks=bool(hooks))
    if hooks == "srv":
        job.prologue_path, job.epilogue_path = node.served_prologue, node.served_epilogue
    return job


def warm_pair(mom: Mom, node: Node, ids: Ids, n: int) -> dict:
    """The hook pair of a job joining a stage another job holds, against `python -IS -c pass`,
    alternating (one of each per round): the Python hooks, and the C clients with the hook
    server."""
    image = [("PBS_O_ROOTDIR", str(node.image))]
    holder = mom.start(Job(ids(), image, "hold"))
    while holder.pro_rc is None:
        mom.step(0.05)
    if holder.pro_rc != 0:
        raise BenchError(f"the warm stage's holder job failed: {holder.failure()}")
    times: dict = {k: {"pro": [], "epi": []} for k in ("py", "srv")}
    start: list = []
    try:
        for i in range(n + 2):
            for kind in ("py", "srv") if i % 2 else ("srv", "py"):
                job = _must(mom.run(_job(ids, node, image, kind)))
                if i >= 2:
                    times[kind]["pro"].append(job.pro_ns)
                    times[kind]["epi"].append(job.epi_ns)
            t = spawn_time([sys.executable, "-IS", "-c", "pass"])
            if i >= 2:
                start.append(t)
    finally:
        mom.release(holder)
        mom.wait([holder])
    _must(holder)
    s = summary(start)
    out: dict = {"n": n, "startup_IS": s}
    for kind, key in (("py", ""), ("srv", "server_")):
        pro, epi = times[kind]["pro"], times[kind]["epi"]
        p = summary([a + b for a, b in zip(pro, epi)])
        out.update({f"{key}prologue": summary(pro), f"{key}epilogue": summary(epi),
                    f"{key}pair": p, f"{key}ratio": round(p["median"] / s["median"], 2)})
    return out


def lever(mom: Mom, node: Node, ids: Ids, n: int, setting: str, mom_ms: float,
          block: int = 8) -> dict:
    """One lever, measured against the config without it in the same run: blocks of
    ``block`` trivial jobs with the config as given (A) and with ``setting`` added (B),
    alternating; the first job of each block is not counted (it may meet the other
    config's stage). Per case (no image; in the image, no other job holding its stage):
    the hook pair and the job's whole time (mom.py's own work included). Each job starts
    after ``mom_ms`` of quiet, as in the throughput section (the cgroup v1 attach waits
    for an RCU grace period after a quiet spell only)."""
    image = [("PBS_O_ROOTDIR", str(node.image))]
    cases = {"noimage": (None, [("MYVAR", "x")]), "image": (None, image),
             "srv_noimage": ("srv", [("MYVAR", "x")]), "srv_image": ("srv", image)}
    out: dict = {"setting": setting, "n": n, "block": block, "mom_ms": mom_ms}
    data: dict = {(c, v): {"pair": [], "job": []} for c in cases for v in "AB"}
    done = 0
    variant = "A"
    while done < n:
        node.write_config(main=setting + "\n" if variant == "B" else "")
        for k in range(block):
            for case, (hooks, variables) in cases.items():
                time.sleep(mom_ms / 1000)
                t0 = time.perf_counter_ns()
                job = _must(mom.run(_job(ids, node, variables, hooks or "py")))
                t1 = time.perf_counter_ns()
                if k:
                    data[(case, variant)]["pair"].append((job.pro_ns or 0) + (job.epi_ns or 0))
                    data[(case, variant)]["job"].append(t1 - t0)
        if variant == "B":
            done += block - 1
        variant = "B" if variant == "A" else "A"
    node.write_config()
    settle(node, 30)
    for case in cases:
        a, b = data[(case, "A")], data[(case, "B")]
        pa, pb = summary(a["pair"]), summary(b["pair"])
        out[case] = {"A_pair": pa, "B_pair": pb, "A_job": summary(a["job"]),
                     "B_job": summary(b["job"]),
                     "pair_ratio": round(pb["median"] / pa["median"], 3)}
    return out


def settle(node: Node, timeout: float) -> None:
    """Wait until no stage is left (an idle stage's deferred teardown runs after its grace
    period, in a detached worker)."""
    deadline = time.monotonic() + timeout
    while any(f.startswith("stages/") for f in node.state_files()):
        if time.monotonic() > deadline:
            raise BenchError(f"stages left {timeout} s after the last job: "
                             f"{node.state_files()}")
        time.sleep(0.05)
