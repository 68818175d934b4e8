"""What a qsub call asks for, from qsub's own argv and the job script's directives.

Run by the submit filter as the submitting user: trusts nothing it reads.
Facts (fixtures/torque-6.1/submitfilter, Torque's qsub): argv is qsub's own
arguments; ``#PBS`` directives are only in the script, read until its first
line that is neither blank nor a comment; an option given on the command
line wins over the same option in the script (a command-line ``-v`` replaces
the script's ``-v``); ``-D DIR`` sets PBS_O_ROOTDIR; ``-V`` exports the
user's environment. Only what the gate and the shell check need is kept.
"""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Mapping, Optional, Sequence

__all__ = ["Request", "parse", "split_directive", "variable_list"]

# qsub's options that take an argument (Torque 6.1 qsub(1)); the others are flags.
WITH_ARG = frozenset("aAbcCdDeFjkKlLmMNopPqrStTuvwW")
ROOTDIR = "PBS_O_ROOTDIR"
DEFAULT_PREFIX = "#PBS"


class Request:
    """The options of one submission that matter here, in the order qsub meets them."""

    __slots__ = ("options", "export_env")

    def __init__(self) -> None:
        self.options: list[tuple[str, str]] = []  # (letter, argument) of WITH_ARG options
        self.export_env = False  # -V

    def last(self, letter: str) -> Optional[str]:
        """The argument of the last ``-letter`` ('None' if not given)."""
        found = [a for o, a in self.options if o == letter]
        return found[-1] if found else None

    def letters(self) -> set[str]:
        return {o for o, _ in self.options} | ({"V"} if self.export_env else set())


def _getopt(args: Sequence[str], into: Request) -> list[str]:
    """Parse qsub-style options (GNU getopt, permuting); return the operands."""
    operands: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            operands += args[i:]
            break
        if not arg.startswith("-") or arg == "-":
            operands.append(arg)
            continue
        j = 1
        while j < len(arg):
            letter = arg[j]
            j += 1
            if letter in WITH_ARG:
                if j < len(arg):
                    value = arg[j:]
                elif i < len(args):
                    value = args[i]
                    i += 1
                else:
                    value = ""
                into.options.append((letter, value))
                break
            if letter == "V":
                into.export_env = True
    return operands


def split_directive(text: str) -> list[str]:
    """Split a directive's options into words as a shell would (quotes, no expansion)."""
    words: list[str] = []
    cur: list[str] = []
    quote = ""
    has_word = False
    for ch in text:
        if quote:
            if ch == quote:
                quote = ""
            else:
                cur.append(ch)
        elif ch in "\"'":
            quote, has_word = ch, True
        elif ch in " \t":
            if has_word:
                words.append("".join(cur))
                cur, has_word = [], False
        elif ch == "#" and not has_word:
            break  # a comment after the options
        else:
            cur.append(ch)
            has_word = True
    if has_word:
        words.append("".join(cur))
    return words


def _directives(script: bytes, prefix: str) -> list[str]:
    """The option words of the script's directives, up to its first command line."""
    words: list[str] = []
    for raw in script.split(b"\n"):
        line = raw.decode("utf-8", "surrogateescape").rstrip("\r")
        stripped = line.strip()
        if line.startswith(prefix):
            words += split_directive(line[len(prefix):])
        elif stripped and not stripped.startswith("#"):
            break
    return words


def parse(argv: Sequence[str], script: bytes, environ: Mapping[str, str]) -> Request:
    """The submission's options: the command line's, then the script's for options it lacks."""
    cmdline = Request()
    _getopt(argv, cmdline)
    prefix = cmdline.last("C") or environ.get("PBS_DPREFIX") or DEFAULT_PREFIX
    script_req = Request()
    _getopt(_directives(script, prefix), script_req)
    given = cmdline.letters()
    merged = Request()
    merged.options = list(cmdline.options) + [(o, a) for o, a in script_req.options
                                              if o not in given]
    merged.export_env = cmdline.export_env or script_req.export_env
    return merged


def _split_v(text: str) -> list[str]:
    """Split a -v list on commas outside quotes, dropping the quotes (qsub's parse)."""
    items: list[str] = []
    cur: list[str] = []
    quote = ""
    for ch in text:
        if quote:
            if ch == quote:
                quote = ""
            else:
                cur.append(ch)
        elif ch in "\"'":
            quote = ch
        elif ch == ",":
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur))
    return [i for i in items if i]


def variable_list(req: Request, environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """The (name, value) variables this submission gives the job that concern the gate.

    Every variable is kept (the gate counts PBS_O_ROOTDIR* names hidden in values);
    qsub's own PBS_O_* set-up variables are left out: none starts with PBS_O_ROOTDIR.
    """
    out: list[tuple[str, str]] = []
    if req.export_env:
        out += [(n, v) for n, v in environ.items() if n.startswith(ROOTDIR)]
    # An attribute: a second -D replaces the first.
    last_d = max((i for i, (o, _) in enumerate(req.options) if o == "D"), default=-1)
    for i, (letter, arg) in enumerate(req.options):
        if letter == "D" and i == last_d:
            out.append((ROOTDIR, arg))
        elif letter == "v":
            for item in _split_v(arg):
                name, eq, value = item.partition("=")
                if not eq:
                    if name not in environ:
                        continue  # qsub passes nothing for an unset name
                    value = environ[name]
                out.append((name, value))
    return out
