"""The undo stack of a transactional step: contextlib.ExitStack's callback/pop_all, for less.

Used as root by lifecycle.start_job and mounts.apply (STYLE.md section 4).
contextlib costs every job about a millisecond at start-up (collections,
functools); this is the part of ExitStack those two use, with its semantics:
on leaving the block, the registered callbacks run last first, every one of
them even if one raises, and the block's own exception wins unless a callback
raised (then the last callback error is raised, chained to the first).
"""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Any, Callable, Optional

__all__ = ["Undo"]


class Undo:
    """``with Undo() as undo: step(); undo.callback(unstep); ...; undo.pop_all()``."""

    __slots__ = ("_steps",)

    def __init__(self) -> None:
        self._steps: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def callback(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` if the block is left before pop_all()."""
        self._steps.append((fn, args))

    def pop_all(self) -> None:
        """The step succeeded: forget every callback."""
        self._steps = []

    def __enter__(self) -> Undo:
        return self

    def __exit__(self, etype: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        pending = exc
        failed = False
        while self._steps:
            fn, args = self._steps.pop()
            try:
                fn(*args)
            except BaseException as e:  # run the others, then raise the last of these
                _chain(e, pending, exc)
                pending, failed = e, True
        if failed:
            assert pending is not None
            ctx = pending.__context__
            try:
                raise pending
            except BaseException:
                pending.__context__ = ctx  # raise set it to the block's exception
                raise


def _chain(new: BaseException, old: Optional[BaseException],
           frame: Optional[BaseException]) -> None:
    """Make ``old`` the context at the end of ``new``'s chain (ExitStack's rule)."""
    while True:
        ctx = new.__context__
        if ctx is None or ctx is old:
            return
        if ctx is frame:
            break
        new = ctx
    new.__context__ = old
