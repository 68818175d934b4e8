"""`python -m benchmarks.userns`: the cost of entering an image without root (issue 13).

Run as root. Forks a child that enters a private mount namespace and sets up the
benchmark node (benchmarks/node.py: tmpfs, user pbsbench, BusyBox image, config, with
``entry_dir``), starts one job as root (lifecycle.start_job: cgroup, stage, entry), whose
process, dropped to pbsbench, times the user-side commands from inside the job's cgroup
(as a batch system's job would run the shim). Root-side commands are timed by the child.
Wall time from posix_spawn to waitpid; median and p90 over --runs runs after 3 unmeasured.
The parent removes the cgroup parent afterwards; the namespace takes every mount with it.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from . import node as node_mod
from .report import summary
from .sections import spawn_time

TIMER = r"""
import json, os, sys, time
spec = json.loads(sys.argv[1])
out = {}
for _ in range(3):
    for key, argv in spec["cmds"].items():
        pid = os.posix_spawn(argv[0], argv, spec["env"],
                             file_actions=[(os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0)])
        os.waitpid(pid, 0)
for _ in range(spec["runs"]):
    for key, argv in spec["cmds"].items():
        t0 = time.perf_counter_ns()
        pid = os.posix_spawn(argv[0], argv, spec["env"],
                             file_actions=[(os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0)])
        _, status = os.waitpid(pid, 0)
        if status:
            sys.exit(f"{argv} failed: wait status {status}")
        out.setdefault(key, []).append(time.perf_counter_ns() - t0)
print(json.dumps(out))
"""

ROWS = (
    ("root_true", "`/bin/true` (root)"),
    ("root_chroot", "bare: `chroot STAGE /bin/true` (root, chroot(8))"),
    ("root_shim", "root mode: `pbs-chroot-shim --root STAGE --user U -- /bin/true`"),
    ("user_true", "`/bin/true` (the user, in the job's cgroup)"),
    ("user_python", "`python -I -c pass` (the user's interpreter)"),
    ("user_bare", "bare: `unshare -r -m -p -f chroot ENTRY /bin/true` (the user)"),
    ("user_shim", "user namespace: `pbs-chroot-shim -- /bin/true` (root-prepared stage)"),
    ("user_run_entry", "user namespace: `pbs-chroot run --image` (the job's stage)"),
    ("user_run_dir", "user namespace: `pbs-chroot run --dir` (private stage, bind set)"),
)


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.userns", description=__doc__)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("benchmarks.userns: run as root")
    parent = f"pbs_chroot_bench_userns.{os.getpid()}"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 2
        try:
            os.write(w, json.dumps(_measure(parent, args.runs)).encode())
            code = 0
        except BaseException:  # the figures would mean nothing: say why, exit 2
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    left = node_mod.remove_cgroup_parent(parent)
    if status or not data or left:
        print(f"benchmarks.userns: the run failed (status {status}; cgroups left: {left})",
              file=sys.stderr)
        return 2
    res = json.loads(data)
    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


def table(res: dict) -> str:
    lines = ["| | median | p90 | n |", "|---|---:|---:|---:|"]
    for key, label in ROWS:
        s = res["series"][key]
        lines.append(f"| {label} | {s['median']:.1f} | {s['p90']:.1f} | {s['n']} |")
    return "\n".join(lines) + f"\n\nuser interpreter: {res['user_python']}\n"


def _measure(parent: str, runs: int) -> dict:
    from pbs_chroot import config, lifecycle
    from pbs_chroot.state import ensure_layout
    node_mod.enter_namespace()
    node = node_mod.Node(node_mod.pick_root(), parent)
    node.setup()
    try:
        node.write_config(main=f"entry_dir = {node.root / 'entry'}\n")
        cfg = config.load(str(node.config))
        ensure_layout(cfg.state_dir)
        python, pkg = _user_python(node)
        tree = _own_tree(node)
        timer_r, timer_w, out = _start_timer(node, python, pkg, tree, runs)
        lifecycle.start_job(cfg, lifecycle.Job("1.bench", node_mod.USER, node_mod.USER,
                                               "batch", ""), str(node.image), timer_w)
        series = _root_series(node, runs)
        os.write(timer_r, b"x")
        os.close(timer_r)
        _, status = os.waitpid(timer_w, 0)
        lifecycle.end_job(cfg, "1.bench", "0")
        if status:
            raise RuntimeError(f"the user's timer failed: {out.read_text()}")
        user = json.loads(out.read_text().splitlines()[-1])
        series.update({k: summary(v) for k, v in user.items()})
        return {"series": series, "user_python": python}
    finally:
        if node.syslog is not None:
            node.syslog.stop()


def _root_series(node: node_mod.Node, runs: int) -> dict:
    version = str(node.version)
    cmds = {"root_true": ["/bin/true"],
            "root_chroot": [shutil.which("chroot") or "/usr/sbin/chroot", version, "/bin/true"],
            "root_shim": [sys.executable, "-I", "-m", "pbs_chroot.shim", "--root", version,
                          "--user", node_mod.USER, "--", "/bin/true"]}
    times: dict = {k: [] for k in cmds}
    for _ in range(3):
        for argv in cmds.values():
            spawn_time(argv)
    for _ in range(runs):
        for key, argv in cmds.items():
            times[key].append(spawn_time(argv))
    return {k: summary(v) for k, v in times.items()}


def _user_python(node: node_mod.Node) -> tuple:
    """An interpreter the user can run and a root-owned copy of the package (the checkout
    may sit under a directory the user cannot enter)."""
    pkg = node.root / "userns-pkg"
    shutil.copytree(node_mod.REPO / "pbs_chroot", pkg / "pbs_chroot",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["chmod", "-R", "a+rX", str(pkg)], check=True)
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            subprocess.run([python, "-I", "-c", "pass"], user=node_mod.UID, group=node_mod.GID,
                           check=True, capture_output=True)
            return python, str(pkg)
        except (OSError, subprocess.CalledProcessError):
            continue
    raise RuntimeError("no interpreter the benchmark user can run")


def _own_tree(node: node_mod.Node) -> str:
    tree = node.home / "tree"
    subprocess.run(["cp", "-a", str(node.version), str(tree)], check=True)
    subprocess.run(["chown", "-R", "-h", f"{node_mod.UID}:{node_mod.GID}", str(tree)], check=True)
    return str(tree)


def _start_timer(node: node_mod.Node, python: str, pkg: str, tree: str, runs: int) -> tuple:
    """Fork the user's timer; it waits until root has put it in the job's cgroup."""
    main = ("import sys; sys.path.insert(0, sys.argv.pop(1)); from pbs_chroot.{} import main; "
            "sys.exit(main())")
    cli = [python, "-I", "-c", main.format("admin"), pkg, "--config", str(node.config), "run"]
    cmds = {"user_true": ["/bin/true"], "user_python": [python, "-I", "-c", "pass"],
            "user_bare": [shutil.which("unshare") or "/usr/bin/unshare", "-r", "-m", "-p", "-f",
                          shutil.which("chroot") or "/usr/sbin/chroot",
                          _entry_root(node), "/bin/true"],
            "user_shim": [python, "-I", "-c", main.format("shim"), pkg, "--config",
                          str(node.config), "--", "/bin/true"],
            "user_run_entry": cli + ["--image", str(node.image), "--", "/bin/true"],
            "user_run_dir": cli + ["--dir", tree, "--", "/bin/true"]}
    spec = json.dumps({"cmds": cmds, "runs": runs, "env": {"PATH": "/usr/bin:/bin"}})
    out = node.root / "timer.out"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(w)
            os.read(r, 1)
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.closerange(3, 1 << 16)
            os.setgroups([])
            os.setresgid(node_mod.GID, node_mod.GID, node_mod.GID)
            os.setresuid(node_mod.UID, node_mod.UID, node_mod.UID)
            os.chdir("/")
            os.execve(python, [python, "-I", "-c", TIMER, spec], {"PATH": "/usr/bin:/bin"})
        finally:
            os._exit(127)
    os.close(r)
    return w, pid, out


def _entry_root(node: node_mod.Node) -> str:
    from pbs_chroot import config, entry, stage
    cfg = config.load(str(node.config))
    return os.path.join(entry.path_of(cfg, stage.stage_dir(cfg, str(node.version))), "root")


if __name__ == "__main__":
    sys.exit(main())
