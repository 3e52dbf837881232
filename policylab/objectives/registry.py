"""Name -> function registries, so that a config can pick an estimator or loss by name."""

from __future__ import annotations

from typing import Callable, TypeVar

from policylab.errors import ConfigError, suggest

F = TypeVar("F", bound=Callable)


class Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def decorate(fn: F) -> F:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            return fn

        return decorate

    def get(self, name: str) -> Callable:
        if name not in self._items:
            raise ConfigError(
                f"unknown {self.kind} {name!r}.{suggest(name, self._items)}",
                f"choose one of: {', '.join(sorted(self._items))}",
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)


ADVANTAGES = Registry("advantage estimator")
AGGREGATIONS = Registry("loss aggregation")
