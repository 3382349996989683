"""Registry: the extension point every layer uses (a new algorithm, module kind, family or
report format adds a file that registers itself, not an `if` somewhere else).

A registry lives in the layer that looks things up; a later layer fills it when it is
imported (`import lowbit` imports every layer), so no import ever goes upward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from lowbit.errors import LowbitError

Value = TypeVar("Value")


class Registry(Generic[Value]):
    """Named implementations of one kind of thing, in the order they were registered."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[Any, Value] = {}

    def register(self, key: Any) -> Callable[[Value], Value]:
        """Decorator: `@REGISTRY.register("name")` above a function or class."""
        def add(value: Value) -> Value:
            self._entries[key] = value
            return value
        return add

    def add(self, key: Any, value: Value) -> None:
        self._entries[key] = value

    def get(self, key: Any) -> Value:
        try:
            return self._entries[key]
        except KeyError:
            known = ", ".join(map(str, self._entries)) or "none registered"
            raise LowbitError(f"no {self.what} {key!r}; known: {known}") from None

    def known(self, key: Any) -> Any:
        """`key`, if registered; else a ValueError naming the known ones (for pydantic validators)."""
        if key not in self._entries:
            known = ", ".join(map(str, self._entries))
            raise ValueError(f"unknown {self.what} {key!r}; choose one of {known}")
        return key

    def __contains__(self, key: Any) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[Any]:
        return iter(self._entries)

    def items(self) -> list[tuple[Any, Value]]:
        return list(self._entries.items())

    def values(self) -> list[Value]:
        return list(self._entries.values())
