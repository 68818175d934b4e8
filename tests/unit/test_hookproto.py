"""The hook server's wire format and its config setting (no root needed)."""
import os

import pytest

from pbs_chroot import config, hookproto
from pbs_chroot.errors import ConfigError
from pbs_chroot.hooks import is_parallel


def test_request_round_trip() -> None:
    argv = ["/var/spool/torque/mom_priv/prologue", "1.vm", "u", "g", "j k", "", "q", "a"]
    env = {"PATH": "/bin:/usr/bin", "PBS_NODEFILE": "/x", "EMPTY": "", "EQ": "a=b"}
    data = hookproto.encode_request(argv, env, 0o077)
    magic, length = hookproto.HEADER.unpack(data[:hookproto.HEADER.size])
    assert magic == hookproto.MAGIC and length == len(data) - hookproto.HEADER.size
    assert hookproto.decode_request(data[hookproto.HEADER.size:]) == (argv, env, 0o077)


def test_non_utf8_bytes_survive() -> None:
    argv = ["/p/prologue", "1.vm", "caf\udce9"]  # as sys.argv decodes a latin-1 byte
    body = hookproto.encode_request(argv, {}, 0o22)[hookproto.HEADER.size:]
    assert b"caf\xe9\0" in body
    assert hookproto.decode_request(body)[0] == argv


@pytest.mark.parametrize("body", [b"", b"22", b"22\0", b"22\x005\0a\0b\x000\0",
                                  b"999\x000\x000\0", b"22\x001\0a\x001\0", b"x\x000\x000\0"])
def test_malformed_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        hookproto.decode_request(body)


@pytest.mark.parametrize("value, want", [
    ("no", ""), ("none", ""), ("yes", config.DEFAULT_HOOK_SERVER),
    ("/run/x/sock", "/run/x/sock")])
def test_hook_server_setting(value: str, want: str) -> None:
    cfg = config.parse(f"[pbs_chroot]\nhook_server = {value}\n")
    assert cfg.hook_server == want
    assert config.parse("[pbs_chroot]\n").hook_server == ""  # default: no


@pytest.mark.parametrize("value", ["sock", "/sock", "/run/a b/sock", "/run/../x/sock",
                                   "/run/" + "x" * 100 + "/sock"])
def test_bad_hook_server_paths_are_refused(value: str) -> None:
    with pytest.raises(ConfigError):
        config.parse(f"[pbs_chroot]\nhook_server = {value}\n")


@pytest.mark.parametrize("argv0, sister", [
    ("/m/prologue", False), ("/m/prologue.parallel", True), ("/m/prologue.py", False),
    ("/m/prologue.parallel.py", True), ("/m/epilogue.parallel", True)])
def test_sister_hooks_are_told_by_name(argv0: str, sister: bool) -> None:
    assert is_parallel(argv0) == sister


def test_the_job_process_is_the_given_parent() -> None:
    """The hook server's worker passes its client's parent: the hooks use it, not their own
    parent (hooks.prologue_main(parent=...))."""
    from pbs_chroot import hooks
    me = os.getpid()  # a parent whose own parent is not init: a "job child"
    assert hooks._future_job_process("/m/prologue", me) == me
    assert hooks._future_job_process("/m/prologue.parallel", me) is None
    assert hooks._future_job_process("/m/prologue", 1) is None
    # A sister's prologue.parallel: its parent is the pbs_mom daemon, the task spawner.
    assert hooks._task_spawner("/m/prologue.parallel.py", None, 4242) == 4242
    assert hooks._task_spawner("/m/prologue.parallel", None, 1) is None
