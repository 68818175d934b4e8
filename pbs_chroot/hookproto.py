"""The hook server's wire format, and the admin's probe of a running server.

Used as root by the daemon (hookd.py), by `pbs-chroot check` and `selftest` (ping), and
mirrored by the C clients (starter/hook_client.c). One request per connection, client to
server: ``PCH1``, a native u32 length, then that many bytes of NUL-terminated strings:
umask (octal), argc, argv..., envc, env...; fds 0, 1, 2 and the client's cwd ride on the
first bytes (SCM_RIGHTS). Answers: ``R<code>\\n`` (the hook's exit code) or ``F\\n`` (nothing
was done: run the Python hook yourself).
"""
from __future__ import annotations

import array
import os
import socket
import struct

from .errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Sequence

    from .config import Config

__all__ = ["MAGIC", "HEADER", "MAX_REQUEST", "NFDS", "HOOK_NAMES", "PING", "FALLBACK", "ACK",
           "peer",
           "encode_request", "decode_request", "ping", "check_config"]

MAGIC = b"PCH1"
HEADER = struct.Struct("=4sI")
MAX_REQUEST = 1 << 20
NFDS = 4                    # stdin, stdout, stderr, cwd
HOOK_NAMES = ("prologue", "epilogue", "prologue.parallel", "epilogue.parallel")
PING = "ping"
FALLBACK = b"F\n"
# A worker's first words once it holds a whole request, before it does anything: until
# the client reads them, nothing was done for the request (a daemon stopped, crashed or
# stuck with the connection still queued), and the client runs the Python hook itself.
ACK = b"A\n"


def peer(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end, as the kernel saw it at connect(2)."""
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         12))
    return pid, uid


def encode_request(argv: Sequence[str], env: dict[str, str], umask: int) -> bytes:
    """Header and body of a request (the fds go beside it): what starter/hook_client.c sends."""
    words = [f"{umask:o}", str(len(argv)), *argv, str(len(env)),
             *(f"{k}={v}" for k, v in env.items())]
    body = b"".join(os.fsencode(w) + b"\0" for w in words)
    return HEADER.pack(MAGIC, len(body)) + body


def decode_request(body: bytes) -> tuple[list[str], dict[str, str], int]:
    """argv, environment and umask of a request's body (ValueError if malformed)."""
    words = body.split(b"\0")
    if not words or words.pop() != b"":
        raise ValueError("request body not NUL-terminated")
    try:
        umask = int(words[0], 8)
        argc = int(words[1])
        argv = [os.fsdecode(w) for w in words[2:2 + argc]]
        envc = int(words[2 + argc])
        pairs = words[3 + argc:]
    except (IndexError, ValueError):
        raise ValueError("malformed request body") from None
    if len(argv) != argc or len(pairs) != envc or not 0 <= umask <= 0o777:
        raise ValueError("request counts do not match")
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = os.fsdecode(pair).partition("=")
        if sep and key:
            env[key] = value
    return argv, env, umask


def ping(path: str, timeout: float = 5.0) -> str:
    """'' if the hook server at ``path`` answers a request (a worker forked, read it and
    replied), else why not. Run as root by `pbs-chroot check` and `selftest`."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            pid, uid = peer(s)
            if uid != 0:
                return f"the process listening on {path} (pid {pid}) is not root's"
            cwd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fds = array.array("i", [0, 1, 2, cwd])
                s.sendmsg([encode_request([PING], {}, 0o022)],
                          [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
            finally:
                os.close(cwd)
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(16)
                if not chunk:
                    break
                reply += chunk
    except OSError as e:
        return f"{path}: {e.strerror or e}"
    return "" if reply == b"R0\n" else f"{path}: unexpected answer {reply!r}"


def check_config(cfg: Config) -> str:
    """What check/selftest say of the hook server ('' when hook_server = no)."""
    if not cfg.hook_server:
        return ""
    problem = ping(cfg.hook_server)
    if problem:
        raise ConfigError(f"hook server not answering: {problem} (the C hooks run the Python "
                          "hooks instead: every job is still checked, at the old cost; "
                          "systemctl start pbs-chroot-hookd)")
    return f"hook server {cfg.hook_server}: answers"
