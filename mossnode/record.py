"""Small value classes for hot paths: plain ``__slots__`` classes instead of frozen dataclasses.

A frozen dataclass sets each field through ``object.__setattr__`` (about 0.4 µs a field here);
the receive path of the shared state built some thirty such fields per update. A
:class:`Record` subclass lists its fields in ``__slots__`` and assigns them in a plain
``__init__``; equality, hashing and repr go by those fields, in order, as a frozen dataclass's
do. Instances are values: nothing assigns to them after ``__init__`` (not enforced, which is
what makes construction cheap).
"""

from __future__ import annotations

from typing import Any


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
