"""What the installed hooks load on the warm path: a job joining and leaving a stage that is
already up (the budget: start-up + 10 ms, of which imports are the larger part)."""
import os
import time
from pathlib import Path

import pytest

from tests import fakes
from tests.conftest import SUMMARY, USER, Node, home_of
from tests.unit.test_hook_path import FORBIDDEN, modules_of

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real mounts")]

HOLD = """#!/bin/sh
touch "$HOME/started.$PBS_JOBID"
until [ -e "$HOME/end.$PBS_JOBID" ]; do sleep 0.05; done
"""


def record_modules(hook: Path, dump: Path) -> None:
    """Make an installed hook append the modules it loaded to ``dump`` when it is done."""
    text = hook.read_text()
    call = next(line for line in text.splitlines() if line.startswith("rc = "))
    fakes.install_hook(hook, text.replace(call, (
        f"{call}\n"
        f"with open({str(dump)!r}, 'a') as f:\n"
        "    f.write(' '.join(sorted(sys.modules)) + '\\n')")))


def test_warm_prologue_and_epilogue_load_no_heavy_module(node: Node) -> None:
    dump = node.site.base / "modules"
    for name in ("prologue", "epilogue"):
        record_modules(node.site.pbs_home / "mom_priv" / name, dump)
    holder = node.job(node.rootdir(), HOLD)
    running = node.emu.start(holder)
    started = home_of(USER) / f"started.{holder.job_id}"
    deadline = time.monotonic() + 60
    while not started.exists():
        assert time.monotonic() < deadline, "the holder job did not start"
        running.poll()
        time.sleep(0.05)
    cold = set(dump.read_text().split())
    dump.unlink()
    job = node.job(node.rootdir(), "#!/bin/sh\ntrue\n")
    res = node.emu.run(job)
    assert res.action == "ran" and res.job_rc == 0 and res.epilogue_rc == 0, res.stderr
    prologue, epilogue = (set(line.split()) for line in dump.read_text().splitlines())
    (home_of(USER) / f"end.{holder.job_id}").touch()
    assert running.wait(60).epilogue_rc == 0
    baseline = modules_of("pass")
    for loaded in (prologue, epilogue):
        assert not loaded & FORBIDDEN, sorted(loaded & FORBIDDEN)
    assert "pbs_chroot.jobinfo" not in epilogue and "ctypes" not in prologue | epilogue
    assert "ctypes" in cold  # the cold path mounts: _sys, and only there
    stdlib = sorted(m for m in prologue - baseline if not m.startswith("pbs_chroot"))
    SUMMARY["warm hooks' imports (prologue)"] = (
        f"{len([m for m in prologue if m.startswith('pbs_chroot')])} of ours, stdlib beyond "
        f"python -IS: {', '.join(stdlib)}")
    node.assert_clean()
