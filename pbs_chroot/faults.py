"""Test-only fault injection: die at a named step, or record the steps taken.

Imported by the modules that change the node (lifecycle, stage, mounts).
PBS_CHROOT_TEST_KILL_AT=NAME makes the process SIGKILL itself at step NAME,
as $prologalarm or the OOM killer would; PBS_CHROOT_TEST_TRACE=FILE appends
every step's name to FILE, so tests can enumerate the steps from the code.
pbs_mom gives hooks a fixed environment, so a job owner can set neither.
"""
import os

__all__ = ["point", "configure"]

_KILL_AT = os.environ.get("PBS_CHROOT_TEST_KILL_AT", "")
_TRACE = os.environ.get("PBS_CHROOT_TEST_TRACE", "")


def configure() -> None:
    """Read the switches again: the hook server's worker has taken on the environment
    pbs_mom gave its client (hookd.py), after this module was imported."""
    global _KILL_AT, _TRACE
    _KILL_AT = os.environ.get("PBS_CHROOT_TEST_KILL_AT", "")
    _TRACE = os.environ.get("PBS_CHROOT_TEST_TRACE", "")


def point(name: str) -> None:
    """A step boundary: record it, or die here, if a test asked for it."""
    if _TRACE:
        with open(_TRACE, "a") as f:
            f.write(name + "\n")
    if _KILL_AT == name:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)
