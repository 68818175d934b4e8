"""Logging for the entry points: syslog for the admin, one line on stderr for the user.

Called only by entry points (hooks.py, admin.py). Setup never raises, and
sending never blocks: when syslog cannot be reached or its queue is full,
warnings and errors go to stderr prefixed with the ident, so they are not
lost (on Torque, stderr is the job's error file: the admin reads it there);
info lines are dropped.
"""
import logging
import socket
import sys
from typing import Optional

__all__ = ["setup", "use_socket"]

_DAEMON = 3  # syslog(3) LOG_DAEMON
_SEVERITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class _SyslogOrStderr(logging.Handler):
    """Send to a syslog socket; on failure, fall back to stderr."""

    def __init__(self, ident: str, address: str) -> None:
        super().__init__()
        self.ident = ident
        self.address = address
        self.sock: Optional[socket.socket] = None

    def _connect(self) -> Optional[socket.socket]:
        if self.sock is None:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                s.connect(self.address)
                self.sock = s
            except OSError:
                s.close()
                return None
        return self.sock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = f"{self.ident}[{record.process}]: {record.getMessage()}"
            if record.exc_info:
                msg += " | " + logging.Formatter().formatException(record.exc_info).replace(
                    "\n", " | ")
            prio = _DAEMON << 3 | _SEVERITY.get(record.levelno, 6)
            sock = self._connect()
            if sock is not None:
                try:
                    # Never block: a stuck syslog daemon must not hang a hook
                    # (pbs_mom would kill it at $prologalarm and requeue).
                    sock.send(f"<{prio}>{msg}".encode("utf-8", "backslashreplace"),
                              socket.MSG_DONTWAIT)
                    return
                except BlockingIOError:
                    pass
                except OSError:
                    self.sock = None
            if record.levelno >= logging.WARNING:
                sys.stderr.write(f"{msg}\n")
        except Exception:  # logging must never take a hook down
            self.handleError(record)


_handler: Optional[_SyslogOrStderr] = None


def setup(ident: str, address: str = "/dev/log", level: int = logging.INFO) -> None:
    """Install the syslog handler on the root logger (idempotent)."""
    global _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = _SyslogOrStderr(ident, address)
    root.addHandler(_handler)
    root.setLevel(level)
    logging.raiseExceptions = False


def use_socket(address: str) -> None:
    """Point syslog at another socket (the config's syslog_socket)."""
    if _handler is not None and _handler.address != address:
        _handler.address = address
        _handler.sock = None
