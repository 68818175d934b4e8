"""`pbs-chroot hookd`: the hook server, a root daemon that runs the hooks for tiny C clients.

Run as root by systemd before pbs_mom (examples/pbs-chroot-hookd.service), with a fixed
command line. Trusts its config and command line, and root clients only: its socket lives
in a directory of root's, mode 0700, and every connection's SO_PEERCRED uid must be 0 (the
clients are mom_priv's prologue, epilogue and *.parallel, run by pbs_mom as root:
starter/hook_client.c). The daemon imports the hooks' modules once; for each request it forks a
worker that runs exactly the Python hook's code (hooks.prologue_main / epilogue_main) with
the client's argv, environment, umask, cwd and stdin/stdout/stderr (received over
SCM_RIGHTS, so messages land in the job's files), and whose parent is taken to be the
client's: the prologue's "future job process" is the client's parent (DESIGN.md). The
worker answers ``R<code>\\n`` and exits; ``F\\n`` (from the daemon or a worker that did
nothing) tells the client to run the Python hook itself. When the client goes away
first (pbs_mom's $prologalarm killed it), the daemon SIGKILLs that request's worker: what
it had done is journaled, and the epilogue or the reconciler finishes it, as after a
Python hook killed by the alarm. A daemon that stops leaves running workers alone: they
still answer (each holds its own connection).

The wire format is hookproto.py's.
"""
from __future__ import annotations

import array
import os
import select
import signal
import socket
import stat
import sys

from . import config as config_mod
from . import log
from .errors import UnsafePathError, UserError
from .hookproto import (ACK, FALLBACK, HEADER, HOOK_NAMES, MAGIC, MAX_REQUEST, NFDS, PING,
                        decode_request, peer)
from .paths import resolve_admin_path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn, Optional

__all__ = ["serve"]

logger = log.get_logger("pbs_chroot.hookd")

_REQUEST_TIMEOUT = 10.0     # a client sends its request at once: a slow one is broken
_MAX_WORKERS = 512          # beyond: the client runs the Python hook itself
# What the hooks import on their way (most of it lazily): the workers start with it loaded.
_PRELOAD = ("hooks", "lifecycle", "gate", "jobinfo", "stage", "mounts", "mountpoints",
            "identity", "homes", "early", "cgroups", "shells", "userfile", "accounting",
            "deferred", "adopt", "resources", "command", "undo", "faults", "paths", "state",
            "cgroups.v1", "cgroups.v2")


def serve(config_path: str, pbsnodes: str, syslog: str) -> int:
    """Run the daemon until SIGTERM/SIGINT; 0. ConfigError/UserError if it cannot start."""
    cfg = config_mod.load(config_path)
    if not cfg.hook_server:
        raise UserError(f"hookd: {config_path} sets hook_server = no: nothing to serve "
                        "(the hooks are the Python scripts)")
    log.setup("pbs-chroot-hookd", syslog)  # its lines as the C clients name it
    log.use_socket(cfg.syslog_socket)
    # What it imports runs as root for as long as it runs: root's only, as install checks
    # the Python hooks' library (a module others can write is root for them).
    import pbs_chroot

    from .admin import check_library
    check_library(os.path.dirname(os.path.abspath(pbs_chroot.__file__)))
    _preload()
    lock, listener = _listen(cfg.hook_server)
    server = _Server(listener, lock, (config_path, pbsnodes, syslog))
    logger.info("serving the hooks on %s (config %s)", cfg.hook_server, config_path)
    server.run()
    logger.info("stopped; %d worker(s) still running finish on their own",
                len(server.workers))
    return 0


def _preload() -> None:
    import gc
    import importlib
    for name in _PRELOAD:
        try:
            importlib.import_module(f"pbs_chroot.{name}")
        except ImportError as e:  # the worker imports it itself (and fails there, logged)
            logger.warning("can't preload pbs_chroot.%s: %s", name, e)
    for name in ("subprocess", "pwd", "grp", "json", "traceback", "pyexpat", "_blake2"):
        importlib.import_module(name)
    # glibc loads the NSS modules (nsswitch.conf) at a process's first lookup: once here,
    # not in every worker (a job's owner, groups and home are looked up in each; ~0.3 ms).
    import pwd
    try:
        os.getgrouplist(pwd.getpwuid(0).pw_name, 0)
    except (KeyError, OSError):
        pass
    gc.collect()
    gc.freeze()  # the workers' copy-on-write pages stay shared: no GC pass touches them


def _listen(path: str) -> tuple[int, socket.socket]:
    """The lock (one daemon per socket) and the listening socket, in a root-only 0700
    directory whose ancestors are root's and not writable by others."""
    import fcntl
    sockdir = os.path.dirname(path)
    os.makedirs(os.path.dirname(sockdir), mode=0o755, exist_ok=True)
    resolve_admin_path(os.path.dirname(sockdir))
    try:
        os.mkdir(sockdir, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(sockdir)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
        raise UnsafePathError(f"hookd: {sockdir} must be a directory of root's, mode 0700 "
                              f"(owner {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})")
    lock = os.open(os.path.join(sockdir, "lock"),
                   os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise UserError(f"hookd: another hook server serves {path}") from None
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    listener.listen(128)
    listener.setblocking(False)
    return lock, listener


class _Server:
    """Accept, fork a worker per request, reap; kill a worker whose client went away."""

    def __init__(self, listener: socket.socket, lock: int, hook_args: tuple[str, str, str]
                 ) -> None:
        self.listener = listener
        self.lock = lock
        self.hook_args = hook_args
        self.workers: dict[int, tuple[socket.socket, int]] = {}  # pid -> (conn, client pid)
        self.by_fd: dict[int, int] = {}   # conn fd -> worker pid
        self.stopping = False
        self.poller = select.poll()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def run(self) -> None:
        def stop(_signum: int, _frame: object) -> None:
            self.stopping = True
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda _s, _f: None)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, stop)
        self.poller.register(self.listener.fileno(), select.POLLIN)
        self.poller.register(self.wake_r, select.POLLIN)
        try:
            while not self.stopping:
                for fd, _events in self.poller.poll():
                    if fd == self.listener.fileno():
                        self._accept()
                    elif fd == self.wake_r:
                        self._drain_wakeups()
                    elif fd in self.by_fd:
                        self._client_gone(fd)
                self._reap()
        finally:
            try:
                os.unlink(self.listener.getsockname())  # clients fall back at once
            except OSError:
                pass
            while True:  # and those already queued, told so rather than dropped
                try:
                    conn, _ = self.listener.accept()
                except OSError:
                    break
                self._fallback(conn)
            self.listener.close()

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # EMFILE and the like: the client sees EOF before sending
            logger.error("can't accept a connection: %s", e.strerror)
            return
        try:
            client, uid = peer(conn)
        except OSError as e:
            logger.error("can't tell who connected: %s", e.strerror)
            conn.close()
            return
        if uid != 0:
            logger.warning("refused a connection from uid %d (pid %d): the hook server "
                           "serves root (pbs_mom) only", uid, client)
            conn.close()
            return
        if len(self.workers) >= _MAX_WORKERS:
            logger.error("%d requests running: client %d runs the Python hook itself",
                         len(self.workers), client)
            self._fallback(conn)
            return
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as e:
            logger.error("can't fork a worker for client %d: %s (it runs the Python hook)",
                         client, e.strerror)
            self._fallback(conn)
            return
        if pid == 0:
            self._become_worker(conn, client)
        self.workers[pid] = (conn, client)
        self.by_fd[conn.fileno()] = pid
        # POLLRDHUP: the client closed its end (it never shuts down its writing side).
        self.poller.register(conn.fileno(), select.POLLRDHUP)

    @staticmethod
    def _fallback(conn: socket.socket) -> None:
        try:
            conn.send(FALLBACK, socket.MSG_DONTWAIT)
        except OSError:
            pass
        conn.close()

    def _client_gone(self, fd: int) -> None:
        """The client closed its end. If its worker is still running (pbs_mom killed the
        client at its alarm), kill the worker and what it started in its session."""
        pid = self.by_fd.pop(fd)
        conn, client = self.workers[pid]
        self.poller.unregister(fd)
        conn.close()
        if _is_running(pid) and not _has_answered(pid):
            logger.warning("client %d went away before its worker %d answered ($prologalarm?):"
                           " worker killed; its steps are journaled (the epilogue or "
                           "pbs-chroot cleanup finishes them)", client, pid)
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def _reap(self) -> None:
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn, client = self.workers.pop(pid, (None, 0))
            if conn is not None and self.by_fd.pop(conn.fileno(), None) is not None:
                self.poller.unregister(conn.fileno())
                conn.close()  # the client sees EOF now, if the worker never answered
            if os.WIFSIGNALED(status):
                logger.warning("worker %d (client %d) was killed by signal %d", pid, client,
                               os.WTERMSIG(status))

    def _become_worker(self, conn: socket.socket, client: int) -> NoReturn:
        """The forked child: drop the daemon's state, serve the one request, exit."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            os.setsid()  # its own group: killed as one, with what it started
            self.listener.close()
            for other, _ in self.workers.values():
                other.close()  # another client's connection must close when its worker dies
            for fd in (self.wake_r, self.wake_w, self.lock):
                os.close(fd)
            cfd = conn.fileno()
            # Nothing the hook forks (a task adopter, a teardown worker) may hold the
            # connection: the client's EOF must mean "this worker is dead".
            os.register_at_fork(after_in_child=lambda: _close_quietly(cfd))
            _worker(conn, client, self.hook_args)
            code = 0
        except BaseException as e:  # noqa: B902 - a forked child must never unwind into the loop
            logger.error("worker for client %d failed before answering: %r", client, e)
        finally:
            os._exit(code)


def _worker(conn: socket.socket, client: int, hook_args: tuple[str, str, str]) -> None:
    """Read the request, become the hook pbs_mom ran (stdio, cwd, umask, environment), run
    it, answer its exit code."""
    import gc
    gc.disable()  # short-lived: no collection pass (each would touch the shared pages)
    conn.settimeout(_REQUEST_TIMEOUT)
    try:
        argv, env, umask, fds = _receive(conn)
    except (OSError, ValueError) as e:
        logger.error("bad request from client %d: %s", client, e)
        _reply(conn, FALLBACK)  # nothing was done: the client runs the Python hook
        return
    name = os.path.basename(argv[0]) if argv else ""
    if name == PING or name not in HOOK_NAMES:
        for fd in fds:
            os.close(fd)
        if name != PING:
            logger.error("client %d asked for hook %r: not one of %s", client, name,
                         ", ".join(HOOK_NAMES))
        _reply(conn, b"R0\n" if name == PING else FALLBACK)
        return
    parent = _parent_of(client)
    if parent is None:
        raise ProcessLookupError(f"client {client} is gone")
    try:  # the request is ours now; a client that gave up on us gets EPIPE here
        conn.sendall(ACK)
    except OSError:
        logger.warning("client %d gave up before its request was taken: nothing done", client)
        return
    _become_client(fds, umask, env)
    from . import hooks
    config_path, pbsnodes, syslog = hook_args
    answer = _Answer(conn)
    if name.startswith("prologue"):
        rc = hooks.prologue_main(argv, config_path, pbsnodes, syslog, parent=parent)
    else:
        rc = hooks.epilogue_main(argv, config_path, pbsnodes, syslog, answer=answer)
    if answer.code is not None and rc != answer.code:
        logger.warning("%s of %s answered %d before its end, which made it %d (see above)",
                       name, argv[1] if len(argv) > 1 else "?", answer.code, rc)
    answer(rc)


class _Answer:
    """Answer the client, once; from then on the rest of the work is the worker's own: the
    daemon lets it finish (_ANSWERED), and nothing more goes to the job's files."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.code: Optional[int] = None

    def __call__(self, code: int = 0) -> None:
        if self.code is not None:
            return
        self.code = code
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:
                pass
        _reply(self.conn, f"R{code}\n".encode())
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)


_ANSWERED = "hookd-answered"  # a worker's name (/proc/PID/comm) once it has answered


def _reply(conn: socket.socket, data: bytes) -> None:
    """Send the one answer, marked first: the client may exit at once, and the daemon must
    not take that for a client gone before its answer."""
    _mark_answered()
    conn.sendall(data)


def _mark_answered() -> None:
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(_ANSWERED)
    except OSError:
        pass


def _has_answered(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == _ANSWERED
    except OSError:
        return False


def _become_client(fds: list[int], umask: int, env: dict[str, str]) -> None:
    """The client's stdin/stdout/stderr on 0, 1, 2, its cwd, umask and environment."""
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    os.fchdir(fds[3])
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.umask(umask)
    os.environ.clear()
    os.environ.update(env)
    from . import faults
    faults.configure()  # its test switches, from the environment pbs_mom gave the hook


def _receive(conn: socket.socket) -> tuple[list[str], dict[str, str], int, list[int]]:
    """One request: argv, environment, umask and the four fds (ValueError if malformed)."""
    fds: list[int] = []
    head = b""
    while len(head) < HEADER.size:
        data, ancdata, _flags, _addr = conn.recvmsg(
            HEADER.size - len(head), socket.CMSG_SPACE(NFDS * 4))
        for level, kind, blob in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(blob[:len(blob) - len(blob) % 4])
                fds += list(got)
        if not data:
            break
        head += data
    try:
        if len(head) < HEADER.size:
            raise ValueError("connection closed before the request")
        magic, length = HEADER.unpack(head)
        if magic != MAGIC or length > MAX_REQUEST:
            raise ValueError(f"not a request of this version ({magic!r}, {length} bytes)")
        if len(fds) != NFDS:
            raise ValueError(f"{len(fds)} file descriptors, want {NFDS}")
        body = b""
        while len(body) < length:
            chunk = conn.recv(length - len(body))
            if not chunk:
                raise ValueError("connection closed inside the request")
            body += chunk
        argv, env, umask = decode_request(body)
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise
    return argv, env, umask, fds


def _parent_of(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _is_running(pid: int) -> bool:
    """Whether ``pid`` lives and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
