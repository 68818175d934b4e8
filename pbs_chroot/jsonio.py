"""JSON text for the state files and the accounting log, without importing json.

Used as root by the hooks, the runner and the admin CLI. The json package
compiles regular expressions at import (re, enum, ...: about 7 ms for every
job); its C accelerator ``_json`` does the work on its own. dumps() writes
exactly what ``json.dumps(obj, sort_keys=True)`` writes for the plain types we
store (dict with str keys, list, tuple, str, int, float, bool, None), and
hands anything else to json itself; loads() is ``json.loads`` on the same C
scanner, and lets json report (and word) any error.
"""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

try:
    from _json import encode_basestring_ascii as _quote
    from _json import make_scanner as _make_scanner
except ImportError:  # an interpreter built without the accelerator: plain json
    _quote = None  # type: ignore[assignment]

__all__ = ["dumps", "loads"]

_WHITESPACE = " \t\n\r"  # json.decoder.WHITESPACE


class _Unsupported(Exception):
    """A value dumps() leaves to the json module."""


class _Context:
    """What the C scanner reads from a json.JSONDecoder: its defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"),
                      "NaN": float("nan")}.__getitem__
    memo: dict[str, str] = {}


_scan = _make_scanner(_Context()) if _quote is not None else None  # type: ignore[arg-type]


def dumps(obj: Any) -> str:
    """``json.dumps(obj, sort_keys=True)``."""
    if _quote is not None:
        out: list[str] = []
        try:
            _encode(obj, out.append)
            return "".join(out)
        except _Unsupported:
            pass
    import json
    return json.dumps(obj, sort_keys=True)


def _encode(obj: Any, put: Callable[[str], Any]) -> None:
    if isinstance(obj, str):
        put(_quote(obj))
    elif obj is None:
        put("null")
    elif obj is True:
        put("true")
    elif obj is False:
        put("false")
    elif isinstance(obj, int):
        put(int.__repr__(obj))
    elif isinstance(obj, float):
        put(_float(obj))
    elif isinstance(obj, dict):
        if not all(type(k) is str for k in obj):
            raise _Unsupported
        put("{")
        for i, key in enumerate(sorted(obj)):
            put(", " if i else "")
            put(_quote(key))
            put(": ")
            _encode(obj[key], put)
        put("}")
    elif isinstance(obj, (list, tuple)):
        put("[")
        for i, item in enumerate(obj):
            put(", " if i else "")
            _encode(item, put)
        put("]")
    else:
        raise _Unsupported


def _float(x: float) -> str:
    if x != x:
        return "NaN"
    if x in (float("inf"), float("-inf")):
        return "Infinity" if x > 0 else "-Infinity"
    return float.__repr__(x)


def loads(text: str) -> Any:
    """``json.loads(text)``: ValueError (json.JSONDecodeError) if it is not one JSON value."""
    if _scan is not None and not text.startswith("\ufeff"):
        start = len(text) - len(text.lstrip(_WHITESPACE))
        try:
            obj, end = _scan(text, start)
        except (StopIteration, ValueError):
            pass
        else:
            if end == len(text.rstrip(_WHITESPACE)):
                return obj
    import json  # to raise its error, worded as ever
    return json.loads(text)
