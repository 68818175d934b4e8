"""Logging for the entry points: syslog for the admin, one line on stderr for the user.

setup() is called only by entry points (hooks.py, admin.py). Setup never
raises, and sending never blocks: when syslog cannot be reached or its queue
is full, warnings and errors go to stderr prefixed with the ident, so they are
not lost (on Torque, stderr is the job's error file: the admin reads it
there); info lines are dropped.

The library logs through get_logger(__name__): the part of logging.Logger it
uses (info, warning, error, exception; %-style arguments), on the C _socket
module. The logging package costs every job about 10 ms at start-up (threading,
traceback, string, re ...); a traceback is formatted only when there is one.
Modules that use the logging package (the admin CLI's) reach the same syslog
through a handler that setup() installs on its root logger.
"""
from __future__ import annotations

import os
import sys

import _socket

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Any, Optional

    ExcInfo = tuple[Optional[type[BaseException]], Optional[BaseException],
                    Optional[TracebackType]]

__all__ = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "Logger", "get_logger", "setup",
           "use_socket", "syslog_only", "reset"]

DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50  # logging's levels
_DAEMON = 3  # syslog(3) LOG_DAEMON
_SEVERITY = {DEBUG: 7, INFO: 6, WARNING: 4, ERROR: 3, CRITICAL: 2}


class _Syslog:
    """Send to a syslog socket; on failure, fall back to stderr."""

    def __init__(self, ident: str, address: str, level: int) -> None:
        self.ident = ident
        self.address = address
        self.level = level
        self.sock: Optional[_socket.socket] = None

    def _connect(self) -> Optional[_socket.socket]:
        if self.sock is None:
            s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
            try:
                s.connect(self.address)
            except OSError:
                s.close()
                return None
            self.sock = s
        return self.sock

    def reset(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def emit(self, level: int, text: str, fallback: bool = True) -> None:
        msg = f"{self.ident}[{os.getpid()}]: {text}"
        prio = _DAEMON << 3 | _SEVERITY.get(level, 6)
        try:
            sock = self._connect()
        except OSError:
            sock = None
        if sock is not None:
            try:
                # Never block: a stuck syslog daemon must not hang a hook
                # (pbs_mom would kill it at $prologalarm and requeue).
                sock.send(f"<{prio}>{msg}".encode("utf-8", "backslashreplace"),
                          _socket.MSG_DONTWAIT)
                return
            except BlockingIOError:
                pass
            except OSError:
                self.reset()
        if level >= WARNING and fallback:
            sys.stderr.write(f"{msg}\n")


_sink: Optional[_Syslog] = None


def _emit(level: int, msg: str, args: tuple[Any, ...], exc_info: Optional[ExcInfo]) -> None:
    """One record; never raises (logging must never take a hook down)."""
    try:
        if level < (_sink.level if _sink is not None else WARNING):
            return
        text = msg % args if args else msg
        if exc_info is not None and exc_info[1] is not None:
            text += " | " + _format_exception(exc_info).replace("\n", " | ")
        if _sink is not None:
            _sink.emit(level, text)
        else:  # before setup(): as logging's last resort, warnings and worse to stderr
            sys.stderr.write(f"{text}\n")
    except Exception:
        pass


def _format_exception(exc_info: ExcInfo) -> str:
    import traceback
    text = "".join(traceback.format_exception(*exc_info))
    return text[:-1] if text.endswith("\n") else text


class Logger:
    """A module's logger: logging.Logger's info/warning/error/exception."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def debug(self, msg: str, *args: Any) -> None:
        _emit(DEBUG, msg, args, None)

    def info(self, msg: str, *args: Any) -> None:
        _emit(INFO, msg, args, None)

    def warning(self, msg: str, *args: Any) -> None:
        _emit(WARNING, msg, args, None)

    def error(self, msg: str, *args: Any) -> None:
        _emit(ERROR, msg, args, None)

    def exception(self, msg: str, *args: Any) -> None:
        """An error, with the traceback of the exception being handled."""
        _emit(ERROR, msg, args, sys.exc_info())


def syslog_only(level: int, msg: str) -> None:
    """One line to syslog and nowhere else (for a caller that prints it itself)."""
    try:
        if _sink is not None:
            _sink.emit(level, msg, fallback=False)
    except Exception:
        pass


def get_logger(name: str) -> Logger:
    """The logger of module ``name``."""
    return Logger(name)


def setup(ident: str, address: str = "/dev/log", level: int = INFO,
          route_logging: bool = True) -> None:
    """Send log records to syslog as ``ident[pid]`` (idempotent).

    ``route_logging``: also what the logging package gets (never in a process that is
    not ours, such as the OpenPBS server running a queuejob hook)."""
    global _sink
    if _sink is not None:
        _sink.reset()
    _sink = _Syslog(ident, address, level)
    if route_logging and "logging" in sys.modules:
        _route_logging_package(level)


def reset() -> None:
    """Forget the syslog socket (reconnected at the next record): for a forked process
    that gives up its parent's files."""
    if _sink is not None:
        _sink.reset()


def use_socket(address: str) -> None:
    """Point syslog at another socket (the config's syslog_socket)."""
    if _sink is not None and _sink.address != address:
        _sink.reset()
        _sink.address = address


def _route_logging_package(level: int) -> None:
    """Send what modules log through the logging package to the same syslog."""
    import logging

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            _emit(record.levelno, record.getMessage(), (), record.exc_info)

    root = logging.getLogger()
    for old in [h for h in root.handlers if type(h).__name__ == "_Handler"
                and type(h).__module__ == __name__]:
        root.removeHandler(old)
    root.addHandler(_Handler())
    root.setLevel(level)
    logging.raiseExceptions = False
