"""Exact-key registries: a component is chosen by its full name, never by substring."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from lmm.errors import UnknownComponentError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps exact names to factories; unknown names list the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise KeyError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda entry: self.add(name, entry)

    def get(self, name: str, *, option: str | None = None) -> T:
        try:
            return self._entries[name]
        except KeyError:
            where = f"{option}: " if option else ""
            raise UnknownComponentError(
                f"{where}unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))
