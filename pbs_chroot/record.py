"""Plain value classes for the hooks' path: what typing.NamedTuple gave, for less.

Imported by every module pbs_mom's hooks load, as root. typing (and the
collections it pulls in) costs every job several milliseconds at start-up, so
the library's records are small classes: the fields are the ``__slots__``, in
order, set once by a typed ``__init__``; this base adds equality, hashing,
``repr``, iteration, ``_asdict`` and ``_replace``. Treat them as immutable.
"""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Iterator, TypeVar

    R = TypeVar("R", bound="Record")

__all__ = ["Record"]


class Record:
    """Base of the value classes: subclasses list their fields in ``__slots__``."""

    __slots__: tuple[str, ...] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple([getattr(self, f) for f in self.__slots__])

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined,no-any-return]

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values())

    def _asdict(self) -> dict[str, Any]:
        """The fields as a dict, in order."""
        return {f: getattr(self, f) for f in self.__slots__}

    def _replace(self: R, **changes: Any) -> R:
        """A copy with some fields changed (as a NamedTuple's _replace)."""
        new = object.__new__(type(self))
        for f in self.__slots__:
            setattr(new, f, changes.pop(f) if f in changes else getattr(self, f))
        if changes:
            raise ValueError(f"Got unexpected field names: {list(changes)!r}")
        return new
