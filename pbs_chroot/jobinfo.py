"""Read a Torque job's Variable_List (its ``-v`` variables) from the batch server.

Run by the prologue, as root, under pbs_mom: the prologue's environment holds none
of the job's variables and mom's ``.JB`` file is written only after the prologue
returns, so the server is asked, through the site's pbs_python module or
``qstat -f -x ID`` at an absolute path from the config.

Trusts: the config (qstat path, source, timeout) and the job id from pbs_mom's argv.
Does not trust: the variable names and values, which the job owner chose, nor the
server's answer to arrive in time or in one piece. Every failure is a JobInfoError
(fail closed: a job whose variables cannot be read does not start).
"""
from __future__ import annotations

import os
import time

from . import command, jsonio
from .errors import JobInfoError
from .record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn, Optional

__all__ = [
    "PendingRead",
    "JobVariables", "parse_variable_list", "lossy_names", "parse_qstat_xml",
    "read_variables", "SOURCES",
]

SOURCES = ("auto", "pbs_python", "qstat")

# JobVariables fields read besides Variable_List: qstat's XML tags (pbs_python's names).
_ATTRS = {"shell": "Shell_Path_List", "error_path": "Error_Path", "output_path": "Output_Path",
          "join": "Join_Path"}

_USER_MSG = "can't start the job: can't read its variables from the batch server"
_QSTAT_ENV = {"PATH": "/bin:/usr/bin", "LC_ALL": "C"}
_MAX_REPLY = 16 * 1024 * 1024  # bytes accepted from the pbs_python child

# Characters XML 1.0 forbids (C0 controls but TAB/LF/CR, U+FFFE, U+FFFF) become
# U+FFFD before parsing: qstat copies them raw from user-chosen values, and a
# parse error would let any user take nodes offline. They are not part of the
# Variable_List grammar (',' '\\' '='), so entry boundaries and names stay as
# pbs_mom sees them; a value holding one can no longer match the allowlist.
_XML_BAD = {c: 0xFFFD for c in list(range(0x20)) + [0xFFFE, 0xFFFF] if c not in (9, 10, 13)}


class JobVariables(Record):
    """A job's Variable_List: unescaped (name, value) pairs and the raw server text.

    With the attributes the prologue needs to speak to the user: the job's
    shell (Shell_Path_List) and its output files (Error_Path, Output_Path,
    Join_Path), as the server holds them ('' when unset).
    """

    __slots__ = ("entries", "raw", "shell", "error_path", "output_path", "join")

    def __init__(self, entries: tuple[tuple[str, str], ...], raw: str, shell: str = "",
                 error_path: str = "", output_path: str = "", join: str = "") -> None:
        self.entries = entries
        self.raw = raw
        self.shell = shell
        self.error_path = error_path
        self.output_path = output_path
        self.join = join


def _unescape_split(text: str) -> list[str]:
    """Split on unescaped commas and drop the escaping backslashes."""
    items: list[str] = []
    cur: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            # A trailing lone backslash has nothing to escape: keep it literally.
            cur.append(next(chars, "\\"))
        elif ch == ",":
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur))
    return items


def parse_variable_list(text: str) -> tuple[tuple[str, str], ...]:
    """Parse a server Variable_List (``\\,`` escapes) into ordered (name, value) pairs."""
    entries: list[tuple[str, str]] = []
    for item in _unescape_split(text):
        if not item:
            continue
        # Split the unescaped entry at its first '=', as pbs_mom does with the
        # strings it gets from the server (its PBS_O_ROOTDIR test is a prefix test).
        name, _, value = item.partition("=")
        entries.append((name, value))
    return tuple(entries)


def lossy_names(raw: str) -> tuple[str, ...]:
    """Names seen by splitting on every comma, escaped or not, like mom's ``.JB`` text."""
    # The .JB holds the unescaped entries joined by ','; escaped and separating
    # commas sit at the same places in `raw`, so this is the same segmentation.
    names: list[str] = []
    for piece in ",".join(_unescape_split(raw)).split(","):
        if piece:
            names.append(piece.partition("=")[0])
    return tuple(names)


def _decode_xml(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # Non-UTF-8 bytes from a user's environment: latin-1 maps every byte to
        # one character, so the ASCII structure is kept and nothing fails open.
        text = data.decode("latin-1")
    return text.translate(_XML_BAD)


class _Element:
    """An XML element as xml.etree reads it, as far as parse_qstat_xml looks."""

    __slots__ = ("tag", "text", "children")

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.text = ""  # the character data before the first child
        self.children: list[_Element] = []

    def findall(self, tag: str) -> list[_Element]:
        return [c for c in self.children if c.tag == tag]

    def findtext(self, tag: str) -> Optional[str]:
        return next((c.text for c in self.children if c.tag == tag), None)


def _parse_xml_root(data: bytes, job_id: str) -> _Element:
    """The root element, parsed by expat as ElementTree.fromstring would (namespaces
    as {uri}tag, comments and processing instructions dropped); xml.etree costs every
    job ~10 ms to import (re, enum, collections ...)."""
    import pyexpat

    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise JobInfoError(f"qstat XML for job {job_id}: refusing a DOCTYPE/ENTITY "
                           "declaration", user_msg=_USER_MSG, job_id=job_id)
    top = _Element("")
    open_ = [top]

    def start(tag: str, attrs: object) -> None:
        elem = _Element("{" + tag if "}" in tag else tag)
        open_[-1].children.append(elem)
        open_.append(elem)

    def chars(text: str) -> None:
        if not open_[-1].children:
            open_[-1].text += text

    parser = pyexpat.ParserCreate(None, "}")
    parser.buffer_text = True
    parser.StartElementHandler = start
    parser.EndElementHandler = lambda tag: open_.pop()
    parser.CharacterDataHandler = chars
    try:
        parser.Parse(_decode_xml(data), True)
    except pyexpat.ExpatError as e:
        raise JobInfoError(f"qstat XML for job {job_id} is malformed or truncated "
                           f"({len(data)} bytes): {e}", user_msg=_USER_MSG,
                           job_id=job_id) from e
    return top.children[0]


def parse_qstat_xml(data: bytes, job_id: str) -> JobVariables:
    """Parse ``qstat -f -x ID`` output and return the Variable_List of exactly job_id."""
    root = _parse_xml_root(data, job_id)

    def fail(what: str) -> JobInfoError:
        return JobInfoError(f"qstat XML for job {job_id}: {what}", user_msg=_USER_MSG,
                            job_id=job_id)

    if root.tag != "Data":
        raise fail(f"root element is <{root.tag}>, expected <Data>")
    jobs = root.findall("Job")
    mine = [j for j in jobs if j.findtext("Job_Id") == job_id]
    if len(mine) != 1:
        seen = [j.findtext("Job_Id") for j in jobs]
        raise fail(f"expected one <Job> with that Job_Id, found {len(mine)} (ids: {seen})")
    varlists = mine[0].findall("Variable_List")
    if len(varlists) != 1:
        raise fail(f"expected one <Variable_List>, found {len(varlists)}")
    if varlists[0].children:
        raise fail("<Variable_List> has child elements")
    raw = varlists[0].text
    job = mine[0]
    return JobVariables(entries=parse_variable_list(raw), raw=raw,
                        **{k: job.findtext(tag) or "" for k, tag in _ATTRS.items()})


def read_variables(job_id: str, *, source: str, qstat: str, timeout: float) -> JobVariables:
    """Ask the server for job_id's Variable_List via pbs_python or qstat, fail closed."""
    _check_request(job_id, timeout)
    if source == "auto":
        source = "pbs_python" if _import_pbs(job_id, required=False) is not None else "qstat"
    if source == "pbs_python":
        return _read_pbs_python(job_id, timeout)
    if source == "qstat":
        return _read_qstat(job_id, qstat, timeout)
    raise JobInfoError(f"unknown job info source {source!r} (expected one of {SOURCES})",
                       user_msg=_USER_MSG, job_id=job_id)


def _check_request(job_id: str, timeout: float) -> None:
    if not job_id or job_id.startswith("-") or any(c in job_id for c in "\0\n/ "):
        raise JobInfoError(f"refusing job id {job_id!r} from pbs_mom", user_msg=_USER_MSG)
    if not timeout > 0:
        raise JobInfoError(f"job info timeout must be > 0 seconds, got {timeout!r}",
                           user_msg=_USER_MSG, job_id=job_id)


# --- qstat -------------------------------------------------------------------

def _first_line(data: bytes) -> str:
    for line in data.decode("utf-8", "replace").splitlines():
        if line.strip():
            return line.strip()[:200]
    return "(no stderr)"


def _read_qstat(job_id: str, qstat: str, timeout: float) -> JobVariables:
    return _qstat_result(job_id, qstat, timeout, _start_qstat(job_id, qstat, timeout))


def _start_qstat(job_id: str, qstat: str, timeout: float) -> command.Running:
    if not os.path.isabs(qstat):
        raise _qstat_fail(job_id, f"qstat path {qstat!r} is not absolute (the prologue's PATH "
                          "is /bin:/usr/bin; set the full path in the config)")
    try:
        # A new session lets a timeout kill qstat and anything a site wrapper started.
        return command.start([qstat, "-f", "-x", job_id], dict(_QSTAT_ENV), timeout)
    except OSError as e:
        raise _qstat_fail(job_id, f"can't run {qstat}: {e.strerror} (errno {e.errno})") from e


def _qstat_result(job_id: str, qstat: str, timeout: float,
                  running: command.Running) -> JobVariables:
    cmd = f"{qstat} -f -x {job_id}"
    res = running.finish()
    if res.timed_out:
        raise _qstat_fail(job_id, f"`{cmd}` timed out after {timeout:g} s; killed it")
    if res.returncode != 0:
        raise _qstat_fail(job_id, f"`{cmd}` exited with status {res.returncode}: "
                          f"{_first_line(res.stderr)}")
    return parse_qstat_xml(res.stdout, job_id)


def _qstat_fail(job_id: str, what: str) -> JobInfoError:
    return JobInfoError(f"source qstat: {what}", user_msg=_USER_MSG, job_id=job_id)


class PendingRead:
    """read_variables(), begun: with qstat as the source, qstat is started at once and
    runs while the prologue makes the job's record and cgroup; result() waits for it
    (and fails closed as read_variables does). cancel() kills a qstat never waited for."""

    def __init__(self, job_id: str, source: str, qstat: str, timeout: float) -> None:
        self.args = (job_id, source, qstat, timeout)
        self.running: Optional[command.Running] = None
        try:
            _check_request(job_id, timeout)
            if source == "auto":
                source = "pbs_python" if _import_pbs(job_id, required=False) else "qstat"
            if source == "qstat":
                self.running = _start_qstat(job_id, qstat, timeout)
        except JobInfoError:
            self.running = None  # result() raises it again, where the caller expects it

    def result(self) -> JobVariables:
        job_id, source, qstat, timeout = self.args
        running, self.running = self.running, None
        if running is None:
            return read_variables(job_id, source=source, qstat=qstat, timeout=timeout)
        return _qstat_result(job_id, qstat, timeout, running)

    def cancel(self) -> None:
        running, self.running = self.running, None
        if running is not None:
            running.cancel()


# --- pbs_python ---------------------------------------------------------------

class _PbsCallError(Exception):
    """A pbs_python call failed inside the child; the text goes back to the parent."""


def _import_pbs(job_id: str, *, required: bool) -> Optional[Any]:
    try:
        import pbs  # type: ignore[import-not-found,unused-ignore]
    except ImportError as e:
        if not required:
            return None
        raise JobInfoError(f"source pbs_python: can't import pbs: {e}",
                           user_msg=_USER_MSG, job_id=job_id) from e
    return pbs


def _read_pbs_python(job_id: str, timeout: float) -> JobVariables:
    pbs = _import_pbs(job_id, required=True)
    deadline = time.monotonic() + timeout
    rfd, wfd = os.pipe()
    try:
        pid = os.fork()
    except OSError as e:
        os.close(rfd)
        os.close(wfd)
        raise _pbs_fail(job_id, f"can't fork the query child: {e.strerror}") from e
    if pid == 0:
        os.close(rfd)
        _child_statjob(pbs, job_id, wfd)
    os.close(wfd)
    try:
        data = _read_until_eof(rfd, pid, deadline, job_id)
    finally:
        os.close(rfd)
    status = _wait_child(pid, deadline, job_id)
    raw, attrs = _decode_reply(data, status, job_id)
    return JobVariables(entries=parse_variable_list(raw), raw=raw,
                        **{k: attrs.get(tag, "") for k, tag in _ATTRS.items()})


def _decode_reply(data: bytes, status: int, job_id: str) -> tuple[str, dict[str, str]]:
    try:
        reply = jsonio.loads(data.decode("utf-8")) if data else {}
    except ValueError as e:
        raise _pbs_fail(job_id, f"garbled reply from the query child: {e}") from e
    if isinstance(reply, dict) and isinstance(reply.get("raw"), str):
        raw: str = reply["raw"]
        attrs = reply.get("attrs")
        if not isinstance(attrs, dict):
            attrs = {}
        return raw, {k: v for k, v in attrs.items() if isinstance(v, str)}
    if isinstance(reply, dict) and isinstance(reply.get("error"), str):
        raise _pbs_fail(job_id, reply["error"])
    how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
           else f"exit status {os.WEXITSTATUS(status)}")
    raise _pbs_fail(job_id, f"query child gave no answer ({how})")


def _pbs_fail(job_id: str, what: str) -> JobInfoError:
    return JobInfoError(f"source pbs_python: {what}", user_msg=_USER_MSG, job_id=job_id)


def _child_statjob(pbs: Any, job_id: str, wfd: int) -> NoReturn:
    """Forked child: run the blocking pbs_python calls, send JSON, always os._exit."""
    code = 1
    try:
        try:
            raw, attrs = _statjob_raw(pbs, job_id)
            msg = {"raw": raw, "attrs": attrs}
        except _PbsCallError as e:
            msg = {"error": str(e)}
        except Exception as e:  # the site's C module: report anything it raises
            msg = {"error": f"pbs_python raised {type(e).__name__}: {e}"}
        data = jsonio.dumps(msg).encode("ascii")
        while data:
            data = data[os.write(wfd, data):]
        code = 0
    finally:
        # Never unwind into the parent's stack (or flush its buffers) from here.
        os._exit(code)


def _statjob_raw(pbs: Any, job_id: str) -> tuple[str, dict[str, str]]:
    server = pbs.pbs_default()
    if not server:
        raise _PbsCallError("pbs_default() gave no server name (check PBS_HOME/server_name)")
    conn = pbs.pbs_connect(server)
    if conn < 0:
        raise _PbsCallError(f"pbs_connect({server!r}) failed: {_pbs_error(pbs)}")
    try:
        wanted = [pbs.ATTR_v] + list(_ATTRS.values())
        attrl = pbs.new_attrl(len(wanted))
        for slot, name in zip(attrl, wanted):
            slot.name = name
        statuses = pbs.pbs_statjob(conn, job_id, attrl, None)
        mine = [s for s in statuses or [] if s.name == job_id]
        if len(mine) != 1:
            names = [s.name for s in statuses or []]
            raise _PbsCallError(f"pbs_statjob({job_id!r}) on {server!r} returned "
                                f"{len(mine)} matching jobs (names {names}): {_pbs_error(pbs)}")
        values = [a.value for a in mine[0].attribs or [] if a.name == pbs.ATTR_v]
        if len(values) != 1:
            raise _PbsCallError(f"pbs_statjob({job_id!r}) on {server!r}: expected one "
                                f"{pbs.ATTR_v} attribute, got {len(values)}")
        attrs = {a.name: _text(a.value) for a in mine[0].attribs or []
                 if a.name in _ATTRS.values()}
        return _text(values[0]), attrs
    finally:
        pbs.pbs_disconnect(conn)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value or "")


def _pbs_error(pbs: Any) -> str:
    err = pbs.error()
    if isinstance(err, tuple) and len(err) == 2:
        return f"errno {err[0]}: {err[1]}"
    return f"error {err!r}"


def _read_until_eof(rfd: int, pid: int, deadline: float, job_id: str) -> bytes:
    import select

    poller = select.poll()
    poller.register(rfd, select.POLLIN | select.POLLHUP)
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            _kill_child(pid)
            raise _pbs_fail(job_id, f"pbs_statjob for {job_id} timed out; killed pid {pid}")
        chunk = os.read(rfd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > _MAX_REPLY:
            _kill_child(pid)
            raise _pbs_fail(job_id, f"reply larger than {_MAX_REPLY} bytes")


def _wait_child(pid: int, deadline: float, job_id: str) -> int:
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= deadline:
            _kill_child(pid)
            raise _pbs_fail(job_id, f"query child {pid} did not exit in time; killed it")
        time.sleep(0.002)


def _kill_child(pid: int) -> None:
    import _signal  # type: ignore[import-not-found]  # the signal module imports enum

    try:
        os.kill(pid, _signal.SIGKILL)
    except ProcessLookupError:
        pass  # exited on its own
    os.waitpid(pid, 0)
