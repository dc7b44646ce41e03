"""Small value classes for hot paths: plain ``__slots__`` classes instead of frozen dataclasses.

A frozen dataclass sets each field through ``object.__setattr__`` (about 0.4 µs a field here);
the receive path of the shared state built some thirty such fields per update. A
:class:`Record` subclass lists its fields in ``__slots__`` and assigns them in a plain
``__init__``; equality, hashing and repr go by those fields, in order, as a frozen dataclass's
do. Instances are values: nothing assigns to them after ``__init__`` (not enforced, which is
what makes construction cheap).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar, cast, dataclass_transform

_C = TypeVar("_C", bound=type)


class Record:
    __slots__: tuple[str, ...] = ()

    def _fields(self) -> tuple[Any, ...]:
        return tuple([getattr(self, name) for name in self.__slots__])

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Record)
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__qualname__}({inner})"


@dataclass_transform(eq_default=True, field_specifiers=(field,))
def value(cls: _C) -> _C:
    """:class:`Record`'s idea for a class of many fields with defaults, whose ``__init__``
    is best generated: a slotted dataclass with equality and hashing by its fields, not
    frozen (a frozen one's ``__init__`` goes through ``object.__setattr__``: 6 µs for the
    22 fields of a task status, against 1.2 µs). Instances are values all the same."""
    return cast(_C, dataclass(slots=True, unsafe_hash=True)(cls))
