"""Self-check of the pbs_mom emulator (tests/momemu.py) against the Torque 6.1 captures.

Run by pytest as root: tiny shell hooks record what they receive (argv, environment, umask,
cwd, parent, stdin), and the records are compared with the fixtures' shape. Jobs run as
`nobody` with qsub -S /bin/sh (its login shell is nologin) and PBS_O_INITDIR=/ (its home does
not exist, which pbs_mom treats as a failed start). Nothing may be left running or on disk.
"""
import json
import os
import shlex
import shutil
import signal
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests import fakes
from tests.captures import torque_file
from tests.momemu import EmuJob, MomEmulator, install_hook

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: fork, chroot, setuid")]

SERVER = "emuselfcheck"        # marks every process the emulator started (PBS_MSHOST/HOSTNAME)
HOST_JOB = [("PBS_O_INITDIR", "/"), ("MYVAR", "a,b=")]


def recorder(record: Path, kind: str, exit_code: int = 0, extra: str = "") -> str:
    """A hook that records what pbs_mom gave it into record/KIND.JOBID/."""
    return f"""#!/bin/sh
d={shlex.quote(str(record))}/{kind}.$1
/bin/mkdir -p "$d"
printf '%s\\0' "$0" "$@" > "$d/argv"
/bin/cat /proc/$$/environ > "$d/environ"
umask > "$d/umask"
pwd -P > "$d/cwd"
echo $PPID > "$d/ppid"
/bin/readlink /proc/$$/fd/0 > "$d/stdin"
/bin/cat /proc/$$/stat > "$d/stat"
/usr/bin/id -u > "$d/uid"
echo "{kind}-out $1"
echo "{kind}-err $1" >&2
{extra}
exit {exit_code}
"""


def read_record(record: Path, kind: str, job_id: str) -> dict:
    d = record / f"{kind}.{job_id}"
    stat_fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
    return {"argv": (d / "argv").read_text().split("\0")[:-1],
            "env": [e for e in (d / "environ").read_text().split("\0") if e],
            "umask": (d / "umask").read_text().strip(), "cwd": (d / "cwd").read_text().strip(),
            "ppid": int((d / "ppid").read_text()), "stdin": (d / "stdin").read_text().strip(),
            "sid": int(stat_fields[3]), "pid": int((d / "stat").read_text().split()[0]),
            "uid": int((d / "uid").read_text())}


def fixture_keys(source: Path, name: str) -> list:
    path = torque_file(source, name)  # a capture, or the project's sample of it
    return [e.split("=", 1)[0] for e in json.loads(path.read_text())["env_raw_order"]]


def leftovers() -> list:
    """Processes carrying our marker in their environment, and our zombie children.

    Only in this run's mount namespace: a test run beside this one has its own.
    """
    found = []
    ours = os.readlink("/proc/self/ns/mnt")
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{name}/ns/mnt") != ours:
                continue
            environ = Path(f"/proc/{name}/environ").read_bytes()
            status = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        marked = f"PBS_MSHOST={SERVER}\0".encode() in environ or \
            f"HOSTNAME={SERVER}\0".encode() in environ
        if marked or (status[0] == "Z" and int(status[1]) == os.getpid()):
            found.append(int(name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def base() -> Iterator[Path]:
    """A root-owned 0755 directory (nobody must reach the .SC under it)."""
    path = Path(tempfile.mkdtemp(prefix="momemu-"))
    os.chmod(path, 0o755)
    (path / "record").mkdir(mode=0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def make_emu(base: Path) -> Iterator[Callable[..., MomEmulator]]:
    made = []

    def make(**kwargs: object) -> MomEmulator:
        made.append(MomEmulator(base / "torque", server=SERVER, **kwargs))
        return made[-1]
    yield make
    for emu in made:
        emu.cleanup()
    assert leftovers() == []
    assert sorted(os.listdir(base / "torque" / "spool")) == []
    assert sorted(os.listdir(base / "torque" / "aux")) == []


@pytest.fixture
def emu(make_emu: Callable[..., MomEmulator]) -> MomEmulator:
    return make_emu()


def host_job(job_id: str, script: str = "#!/bin/sh\necho job-ran\n") -> EmuJob:
    return EmuJob(job_id, "nobody", script, list(HOST_JOB), name="selfcheck", shell="/bin/sh")


def install(emu: MomEmulator, base: Path, pro: int = 0, epi: int = 0, extra: str = "") -> None:
    install_hook(emu.prologue_path, recorder(base / "record", "prologue", pro, extra))
    install_hook(emu.epilogue_path, recorder(base / "record", "epilogue", epi))


JOB_SCRIPT = """#!/bin/sh
echo "job-uid=$(/usr/bin/id -u) job-cwd=$(pwd) job-umask=$(umask) job-ppid=$PPID"
echo ENV-BEGIN; /usr/bin/tr '\\0' '\\n' < /proc/$PPID/environ; echo ENV-END
exit 3
"""


def test_hooks_and_job_get_what_pbs_mom_gives(emu: MomEmulator, base: Path,
                                              torque_source: Path) -> None:
    install(emu, base)
    job = host_job("101.emu", JOB_SCRIPT)
    running = emu.start(job)
    res = running.wait(30)
    assert (res.action, res.prologue_rc, res.job_rc, res.epilogue_rc) == ("ran", 0, 3, 0)
    pro = read_record(base / "record", "prologue", "101.emu")
    sc = str(emu.mom_priv / "jobs" / "101.emu.SC")
    assert pro["argv"] == [str(emu.prologue_path), "101.emu", "nobody", "nogroup", "selfcheck",
                           job.resource_list, "batch", "", sc]
    assert [e.split("=", 1)[0] for e in pro["env"]] == \
        fixture_keys(torque_source, "env.prologue.23.vm.json")
    assert f"PBS_NODEFILE={emu.pbs_home}/aux//101.emu" in pro["env"]
    assert (pro["umask"], pro["cwd"], pro["stdin"], pro["uid"]) == (
        "0077", str(emu.mom_priv), "/dev/null", 0)
    assert pro["ppid"] == running.pid and pro["sid"] == pro["pid"]
    epi = read_record(base / "record", "epilogue", "101.emu")
    assert len(epi["argv"]) == 12 and epi["argv"][11] == sc
    assert epi["argv"][5] == str(running.pid) and epi["argv"][10] == "3"
    assert epi["argv"][7].startswith("cput=") and "walltime=00:00:0" in epi["argv"][7]
    assert [e.split("=", 1)[0] for e in epi["env"]] == \
        fixture_keys(torque_source, "env.epilogue.23.vm.json")
    assert (epi["umask"], epi["cwd"], epi["stdin"], epi["ppid"]) == (
        "0022", str(emu.mom_priv), "/dev/null", os.getpid())
    assert f"job-uid=65534 job-cwd=/ job-umask=0077 job-ppid={running.pid}" in res.stdout
    env = res.stdout.split("ENV-BEGIN\n")[1].split("ENV-END")[0].splitlines()
    keys = fixture_keys(torque_source, "env.job_starter.23.vm.json")
    keys[9:9] = ["PBS_O_INITDIR"]                      # our -v list is PBS_O_INITDIR, MYVAR
    assert [e.split("=", 1)[0] for e in env] == keys
    assert "PBS_JOBID=101.emu" in env and "SHELL=/bin/sh" in env and "MYVAR=a,b=" in env
    assert res.stdout.index("prologue-out") < res.stdout.index("job-uid") \
        < res.stdout.index("epilogue-out")
    assert "prologue-err 101.emu\nepilogue-err 101.emu\n" == res.stderr
    assert not (emu.mom_priv / "jobs" / "101.emu.SC").exists()


def test_job_files_as_pbs_mom_writes_them(emu: MomEmulator, base: Path) -> None:
    peek = f"/usr/bin/stat -c '%U %a %n' {emu.mom_priv}/jobs/$1.* {emu.pbs_home}/spool/$1.*"
    install(emu, base, extra=f"{peek} > {base}/record/files")
    res = emu.run(host_job("102.emu"))
    files = (base / "record" / "files").read_text().splitlines()
    assert files == [f"nobody 700 {emu.mom_priv}/jobs/102.emu.SC",      # no .JB yet
                     f"nobody 600 {emu.pbs_home}/spool/102.emu.ER",
                     f"nobody 600 {emu.pbs_home}/spool/102.emu.OU"]
    assert "job-ran" in res.stdout
    xml = (emu.qstat_jobs_dir / "102.emu.xml").read_bytes()
    assert b"<session_id>" in xml and b"PBS_O_INITDIR=/,MYVAR=a\\,b=" in xml


@pytest.mark.parametrize("code, action, status", [(1, "aborted", "-2"), (2, "requeued", "-3"),
                                                  (255, "requeued", "-3")])
def test_prologue_failure(emu: MomEmulator, base: Path, code: int, action: str,
                          status: str) -> None:
    install(emu, base, pro=code)
    res = emu.run(host_job("103.emu"))
    assert (res.action, res.prologue_rc, res.mom_prologue_rc) == (action, code, code)
    assert res.job_rc is None and "job-ran" not in res.stdout
    epi = read_record(base / "record", "epilogue", "103.emu")
    assert (epi["argv"][5], epi["argv"][7], epi["argv"][10]) == ("0", "", status)
    assert res.epilogue_rc == 0 and res.exit_status == int(status)


def test_group_writable_prologue_is_refused(emu: MomEmulator, base: Path) -> None:
    install(emu, base)
    os.chmod(emu.prologue_path, 0o570)
    res = emu.run(host_job("104.emu"))
    assert (res.action, res.prologue_rc, res.job_rc) == ("prologue_refused", -1, None)
    assert not (base / "record" / "prologue.104.emu").exists()
    assert read_record(base / "record", "epilogue", "104.emu")["argv"][10] == "-3"
    assert "job-ran" not in res.stdout and res.epilogue_rc == 0


def test_missing_hooks_count_as_success(emu: MomEmulator) -> None:
    res = emu.run(host_job("105.emu"))
    assert (res.action, res.prologue_rc, res.job_rc, res.epilogue_rc) == ("ran", 0, 0, None)
    assert res.stdout == "job-ran\n"


def test_rootdirx_prefix_chroots_and_fails(emu: MomEmulator, base: Path) -> None:
    install(emu, base)
    job = host_job("106.emu")
    job.variables.append(("PBS_O_ROOTDIRX", "/nonexistent-dir"))
    res = emu.run(job)
    assert (res.action, res.job_rc, res.exit_status) == ("ran", 254, -2)
    assert "TMomFinalizeChild - PBS: chroot to '/nonexistent-dir' failed: No such file or " \
           "directory\n" in res.stderr
    assert "job-ran" not in res.stdout
    assert read_record(base / "record", "epilogue", "106.emu")["argv"][10] == "-2"


def test_home_chdir_failure_fails_the_job(emu: MomEmulator) -> None:
    job = EmuJob("107.emu", "nobody", "#!/bin/sh\necho job-ran\n", shell="/bin/sh")
    res = emu.run(job)
    assert (res.job_rc, res.exit_status) == (254, -2)
    assert res.stderr == "PBS: chdir to '/nonexistent' failed: No such file or directory\n"


def test_chroot_into_first_rootdir_env_shows_last(emu: MomEmulator, base: Path) -> None:
    image = base / "image"
    (image / "bin").mkdir(parents=True, mode=0o755)
    shutil.copy2("/bin/busybox", image / "bin" / "busybox")
    (image / "bin" / "sh").symlink_to("busybox")
    (image / "MARKER").write_text("inside\n")
    copy_sc = f'umask 022; i={image}; /bin/mkdir -p "$i$(dirname "$8")"; /bin/cp -p "$8" "$i$8"'
    install(emu, base, extra=copy_sc)
    script = "#!/bin/sh\nread m < /MARKER; echo \"marker=$m rootdir=$PBS_O_ROOTDIR\"\n"
    job = EmuJob("108.emu", "nobody", script, [("PBS_O_ROOTDIR", str(image)),
                 ("PBS_O_ROOTDIR", "/b"), ("PBS_O_INITDIR", "/")], shell="/bin/sh")
    res = emu.run(job)
    assert (res.action, res.job_rc) == ("ran", 0), res.stderr
    assert "marker=inside rootdir=/b\n" in res.stdout       # fixture job 29


def test_prologue_alarm_kills_its_session(make_emu: Callable[..., MomEmulator],
                                          base: Path) -> None:
    emu = make_emu(prologue_alarm=1.0)
    bg = f"/bin/sleep 60 & echo $! > {base}/record/bg; /bin/sleep 60"
    install(emu, base, extra=bg)
    t0 = time.monotonic()
    res = emu.run(host_job("109.emu"))
    assert (res.action, res.mom_prologue_rc, res.prologue_rc) == ("requeued", -4, -9)
    assert 1.0 <= time.monotonic() - t0 < 10
    assert not alive(int((base / "record" / "bg").read_text()))


def test_prologue_killed_by_a_signal_lets_the_job_run(emu: MomEmulator) -> None:
    install_hook(emu.prologue_path, "#!/bin/sh\nexec /bin/sleep 60\n")
    running = emu.start(host_job("110.emu"))
    os.kill(running.wait_for_prologue(), signal.SIGKILL)
    res = running.wait(30)
    # Torque's run_pelog() only reads WEXITSTATUS: a signal death is success (prolog.c).
    assert (res.action, res.prologue_rc, res.mom_prologue_rc) == ("ran", -9, 0)
    assert res.stdout == "job-ran\n"


def test_ten_jobs_at_once(emu: MomEmulator, base: Path) -> None:
    install(emu, base, extra="/bin/sleep 0.2")
    running = [emu.start(host_job(f"{200 + i}.emu")) for i in range(10)]
    results = emu.wait_all(running, timeout=60)
    assert [r.action for r in results] == ["ran"] * 10
    assert all("job-ran" in r.stdout for r in results)
    for job in running:
        assert read_record(base / "record", "prologue", job.job.job_id)["ppid"] == job.pid
    assert len({job.pid for job in running}) == 10


def test_wait_timeout_kills_everything(emu: MomEmulator, base: Path) -> None:
    install(emu, base)
    running = emu.start(host_job("111.emu", "#!/bin/sh\n/bin/sleep 60 &\n/bin/sleep 60\n"))
    with pytest.raises(TimeoutError):
        running.wait(1.5)
    assert leftovers() == []
    assert not (emu.mom_priv / "jobs" / "111.emu.SC").exists()
    assert stat.S_IMODE(os.stat(emu.mom_priv).st_mode) == 0o751
    assert fakes.read_qstat_calls(emu.qstat_jobs_dir) == []
