"""One registry per kind of thing (normalizers, datasets, adaptation methods, corruptions).

Adding an entry is one module and one decorator, as with timm's ``@register_model``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from repro.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry mapping with a decorator for registration and a readable error on lookup."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return decorator

    def register_named(self, name: str) -> Callable[[T], T]:
        """``register`` for classes that also carry their registered name, as ``cls.name``."""

        def decorator(cls: T) -> T:
            cls.name = name  # type: ignore[attr-defined]
            return self.register(name)(cls)

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UserError(f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
