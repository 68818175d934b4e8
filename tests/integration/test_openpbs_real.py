"""Issue 14's acceptance against a real OpenPBS, when one is installed and running here.

Skipped (with the reason) unless: /opt/pbs/bin/qsub exists (PBS_EXEC: $PBS_CHROOT_OPENPBS_EXEC),
`qstat -B` answers, the hooks are installed (`pbs-chroot install --openpbs --apply`), and
$PBS_CHROOT_OPENPBS_USER names the user to submit as and $PBS_CHROOT_OPENPBS_IMAGE an image
of the site's config (default /chroot/sl5) that has /etc/debian_version. CI cannot build
OpenPBS: there, tests/integration/test_openpbs.py runs the same jobs through the emulator.
"""
import os
import subprocess
import time
from pathlib import Path

import pytest

EXEC = Path(os.environ.get("PBS_CHROOT_OPENPBS_EXEC", "/opt/pbs"))
USER = os.environ.get("PBS_CHROOT_OPENPBS_USER", "")
IMAGE = os.environ.get("PBS_CHROOT_OPENPBS_IMAGE", "/chroot/sl5")


def _why_not() -> str:
    if os.geteuid() != 0:
        return "needs root (to submit as $PBS_CHROOT_OPENPBS_USER)"
    if not (EXEC / "bin" / "qsub").exists():
        return f"no OpenPBS here ({EXEC}/bin/qsub missing)"
    if not USER:
        return "set PBS_CHROOT_OPENPBS_USER to the user to submit as"
    try:
        res = subprocess.run([str(EXEC / "bin" / "qstat"), "-B"], capture_output=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"qstat -B failed: {e}"
    if res.returncode != 0:
        return f"the OpenPBS server does not answer: {res.stderr.decode(errors='replace')}"
    hooks = subprocess.run([str(EXEC / "bin" / "qmgr"), "-c", "list hook pbs_chroot_begin"],
                           capture_output=True, timeout=20)
    if hooks.returncode != 0:
        return "pbs_chroot's hooks are not installed (pbs-chroot install --openpbs --apply)"
    return ""


_REASON = _why_not()
pytestmark = [pytest.mark.root,
              pytest.mark.skipif(bool(_REASON), reason=f"real OpenPBS: skipped: {_REASON}")]

SCRIPT = "cat /etc/debian_version; id -u; grep NoNewPrivs /proc/self/status\n"


def _as_user(*argv: str, stdin: str = "", cwd: str = "/tmp") -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", USER, "--", *argv], input=stdin,
                          capture_output=True, text=True, timeout=60, cwd=cwd)


def _wait_done(job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = subprocess.run([str(EXEC / "bin" / "qstat"), "-xf", job_id], capture_output=True,
                             text=True, timeout=30)
        attrs = dict(line.strip().split(" = ", 1) for line in res.stdout.splitlines()
                     if " = " in line)
        if attrs.get("job_state") == "F":
            return attrs
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def test_a_job_in_the_image_runs_as_the_user_with_no_new_privs() -> None:
    import pwd
    pw = pwd.getpwnam(USER)
    work = Path(pw.pw_dir)
    res = _as_user(str(EXEC / "bin" / "qsub"), "-l", f"image={IMAGE}", "-l",
                   "select=1:ncpus=1:mem=100mb", "-j", "oe", "-o", f"{work}/pbs_chroot_real.out",
                   stdin=SCRIPT, cwd=str(work))
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()
    attrs = _wait_done(job_id)
    assert attrs.get("Exit_status") == "0", attrs
    out = (work / "pbs_chroot_real.out").read_text().splitlines()
    assert out[0] and out[1] == str(pw.pw_uid), out  # the image's /etc/debian_version
    assert out[2].split() == ["NoNewPrivs:", "1"], out
    (work / "pbs_chroot_real.out").unlink()


def test_qsub_refuses_a_near_miss_with_the_allowed_list() -> None:
    res = _as_user(str(EXEC / "bin" / "qsub"), "-l", f"image={IMAGE}/", stdin=SCRIPT)
    assert res.returncode != 0
    assert f"pbs-chroot: can't use image -l image={IMAGE}/: not an image of this site; " \
           f"allowed: " in res.stderr
