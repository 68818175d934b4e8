"""The task adopter's event handling, without root: proc connector messages are built
as the kernel lays them out (linux/connector.h, linux/cn_proc.h); the cgroup and the
ptrace calls are recorded. The real thing runs in tests/integration/test_multinode.py."""
import struct
from typing import Optional

import pytest

from pbs_chroot import _sys, adopt
from pbs_chroot.errors import CgroupError

MOM = 100


class FakeCgroup:
    def __init__(self, name: str, log: Optional[list] = None) -> None:
        self.name = name
        self.attached: list = []
        self.log = log  # shared with the ptrace calls, to see the order

    def attach(self, pid: int) -> None:
        if pid == 999:
            raise CgroupError("no such process")
        self.attached.append(pid)
        if self.log is not None:
            self.log.append(("attach", pid))

    def procs(self) -> list:
        return list(self.attached)


def _msg(what: int, *pids: int) -> bytes:
    event = struct.pack("=IIQ", what, 0, 0) + struct.pack(f"={len(pids)}I", *pids)
    cn = struct.pack("=IIIIHH", 1, 1, 0, 0, len(event), 0) + event
    return struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, 0) + cn


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Processes: pid -> (ppid, PBS_JOBID or None, children)."""
    procs: dict = {}
    calls: list = []
    monkeypatch.setattr(adopt, "_ppid", lambda pid: procs.get(pid, (None,))[0])
    monkeypatch.setattr(adopt, "_job_of", lambda pid: procs.get(pid, (None, None))[1])
    monkeypatch.setattr(adopt, "children_of",
                        lambda pid: list(procs.get(pid, (None, None, []))[2]))

    held: set = set()  # pids another adopter has seized

    def ptrace(request: int, pid: int, data: int = 0) -> None:
        calls.append((request, pid, data))
        if pid not in procs:
            raise OSError(3, "No such process")
        if request == _sys.PTRACE_SEIZE and pid in held:
            raise OSError(1, "Operation not permitted")

    def waitpid(pid: int, options: int) -> tuple:
        """A tracee's stop after PTRACE_INTERRUPT: SIGTRAP | PTRACE_EVENT_STOP << 8."""
        calls.append(("wait", pid))
        return pid, 0x7f | (5 << 8) | (128 << 16)
    monkeypatch.setattr(adopt._sys, "ptrace", ptrace)
    monkeypatch.setattr(adopt.os, "waitpid", waitpid)
    return {"procs": procs, "ptrace": calls, "held": held}


def _adopter(others: Optional[dict] = None) -> tuple:
    mine = FakeCgroup("p/1.vm")
    a = adopt.Adopter(MOM, "1.vm", mine, lambda: True,  # type: ignore[arg-type]
                      lambda job: (others or {}).get(job))
    return a, mine


def test_a_message_is_parsed_into_events(world: dict) -> None:
    a, mine = _adopter()
    world["procs"].update({7: (MOM, "1.vm", [8]), 8: (7, "1.vm", [])})
    world["held"].add(7)  # another adopter holds it: placed as seen
    # two messages in one datagram: EXEC of pbs_mom's child 7 (unseized), EXIT of 7
    a._dispatch(_msg(adopt._PROC_EVENT_EXEC, 7, 7) + _msg(adopt._PROC_EVENT_EXIT, 7, 7, 0, 0))
    assert mine.attached == [7, 8]   # it and what it forked already
    assert 7 not in a.adopted and 8 in a.adopted


def test_an_exec_seen_before_the_fork_is_seized_stopped_placed_and_let_go(world: dict) -> None:
    """Its FORK event came after its exec: it is seized at the EXEC event and held while
    every hierarchy's move is written (the job starter waits for the first it sees)."""
    a, _ = _adopter()
    mine = a.cgroup = FakeCgroup("p/1.vm", world["ptrace"])
    world["procs"].update({7: (MOM, "1.vm", [])})
    a.on_event(adopt._PROC_EVENT_EXEC, struct.pack("=II", 7, 7))
    assert world["ptrace"] == [(_sys.PTRACE_SEIZE, 7, _sys.PTRACE_O_TRACEEXEC),
                               (_sys.PTRACE_INTERRUPT, 7, 0), ("wait", 7), ("attach", 7),
                               (_sys.PTRACE_DETACH, 7, 0)]
    assert mine.attached == [7] and a.traced == set()


def test_pbs_moms_new_child_is_seized_and_its_forks_followed(world: dict) -> None:
    a, mine = _adopter()
    world["procs"].update({7: (MOM, None, [])})
    a.on_event(adopt._PROC_EVENT_FORK, struct.pack("=IIII", MOM, MOM, 7, 7))
    assert world["ptrace"] == [(_sys.PTRACE_SEIZE, 7, _sys.PTRACE_O_TRACEEXEC)]
    assert a.traced == {7} and mine.attached == []
    # a thread of pbs_mom, and a process of nobody we know: ignored
    a.on_event(adopt._PROC_EVENT_FORK, struct.pack("=IIII", MOM, MOM, 9, 8))
    a.on_event(adopt._PROC_EVENT_FORK, struct.pack("=IIII", 50, 50, 51, 51))
    assert a.traced == {7} and mine.attached == []
    a.adopted.add(60)
    world["procs"][61] = (60, "1.vm", [])
    a.on_event(adopt._PROC_EVENT_FORK, struct.pack("=IIII", 60, 60, 61, 61))
    assert mine.attached == [61]


def test_placed_by_its_own_job_id(world: dict) -> None:
    other = FakeCgroup("p/2.vm")
    a, mine = _adopter({"2.vm": other})
    world["procs"].update({7: (MOM, "2.vm", []), 8: (MOM, "1.vm", []), 9: (MOM, None, []),
                           10: (MOM, "3.vm", [])})
    for pid in (7, 8, 9, 10):
        a._place(pid)
    assert other.attached == [7] and mine.attached == [8]  # no job, or not ours: left


def test_an_exec_before_the_seize_took_hold_is_stopped_then_placed(world: dict) -> None:
    a, _ = _adopter()
    mine = a.cgroup = FakeCgroup("p/1.vm", world["ptrace"])
    world["procs"].update({7: (MOM, "1.vm", [])})
    a.traced.add(7)  # seized, but the EXEC event came: it exec'd first
    a.on_event(adopt._PROC_EVENT_EXEC, struct.pack("=II", 7, 7))
    assert mine.attached == [7]
    # stopped before the first write, let go after the last
    assert world["ptrace"] == [(_sys.PTRACE_INTERRUPT, 7, 0), ("wait", 7), ("attach", 7),
                               (_sys.PTRACE_DETACH, 7, 0)]


def test_a_vanished_process_is_skipped(world: dict) -> None:
    a, mine = _adopter()
    a.adopt_tree(999)  # attach fails: gone meanwhile
    assert mine.attached == [] and 999 not in a.adopted


def test_a_task_claiming_another_users_job_is_not_moved(
        world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A running task may rewrite its own environment: PBS_JOBID decides only among the jobs
    of the process's own user."""
    theirs = FakeCgroup("p/2.vm")
    mine = FakeCgroup("p/1.vm")
    owners = {"1.vm": 1000, "2.vm": 2000}
    a = adopt.Adopter(MOM, "1.vm", mine, lambda: True,  # type: ignore[arg-type]
                      lambda job: {"2.vm": theirs}.get(job), owners.get)
    world["procs"].update({7: (MOM, "2.vm", []), 8: (MOM, "1.vm", [])})
    monkeypatch.setattr(adopt, "_uid_of", lambda pid: 1000)  # both are user 1000's
    a._place(7, late=True)
    a._place(8)
    assert theirs.attached == [] and mine.attached == [8]


def test_only_the_job_users_processes_are_adopted_and_lost_events_resync(
        world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = FakeCgroup("p/1.vm")
    a = adopt.Adopter(MOM, "1.vm", mine, lambda: True,  # type: ignore[arg-type]
                      lambda job: None, {"1.vm": 1000}.get)
    world["procs"].update({7: (MOM, "1.vm", [8, 9]), 8: (7, None, []), 9: (7, None, [])})
    monkeypatch.setattr(adopt, "_uid_of", lambda pid: 2000 if pid == 9 else 1000)
    a.adopt_tree(7)
    assert mine.attached == [7, 8] and a.adopted == {7, 8}  # 9: someone else's (a reused pid)
    monkeypatch.setattr(mine, "procs", lambda: [8], raising=False)
    a._resync()  # events were lost: 7's EXIT among them
    assert a.adopted == {8}
