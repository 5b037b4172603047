"""One registry helper for every kind of pluggable thing: backbone adapters, merging methods, shared-part
merges and routed-layer wrappers.

A thing registers itself where it is defined (`@REGISTRY.register(name)`), never as a side effect of a sibling
package's import. A registry knows the modules that define its built-ins (imported on the first lookup, so
`import didi.backbones` does not import open_clip or transformers) and an entry-point group through which
other installed packages add theirs. Registering a second, different object under a taken key is an error.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Callable, Generic, Hashable, Iterator, TypeVar

from didi.errors import DidiError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name → object, with lazy built-ins and plugins.

    Args:
        kind: what is registered, for error messages ("backbone adapter", "merging method", ...).
        builtins: modules whose import registers the built-in entries (imported on the first lookup).
        group: entry-point group of plugins (`[project.entry-points."didi.backbones"]` in a plugin's
            pyproject); each entry point names a module (or object) whose import registers its entries.
        identity: what makes two registrations the same (a method spec is the same when its function is).
    """

    def __init__(
        self,
        kind: str,
        builtins: tuple[str, ...] = (),
        group: str | None = None,
        identity: Callable[[T], object] = lambda obj: obj,
    ) -> None:
        self.kind, self.builtins, self.group, self.identity = kind, tuple(builtins), group, identity
        self._items: dict[Hashable, T] = {}
        self._loaded = False

    def add(self, key: Hashable, obj: T) -> T:
        """Register `obj` under `key`; the same object twice is a no-op (a module imported twice)."""
        old = self._items.get(key)
        if old is not None and not _same_definition(self.identity(old), self.identity(obj)):
            raise DidiError(
                f"{self.kind} {_label(key)!r} is registered twice ({_label(old)} and {_label(obj)}); "
                f"choose another name"
            )
        self._items[key] = obj
        return obj

    def unregister(self, key: Hashable) -> None:
        """Remove an entry (a test's temporary registration); absent keys are ignored."""
        self._items.pop(key, None)

    def register(self, key: Hashable) -> Callable[[T], T]:
        """Decorator form of `add`."""

        def deco(obj: T) -> T:
            return self.add(key, obj)

        return deco

    def load(self) -> "Registry[T]":
        """Import the built-in modules and the plugins' entry points (once)."""
        if self._loaded:
            return self
        self._loaded = True
        for mod in self.builtins:
            importlib.import_module(mod)
        if self.group:
            for ep in entry_points(group=self.group):
                ep.load()
        return self

    def get(self, key: Hashable) -> T:
        if key not in self._items:
            self.load()
        if key not in self._items:
            raise DidiError(
                f"unknown {self.kind} {_label(key)!r}; registered: {sorted(map(_label, self._items))}"
            )
        return self._items[key]

    def find(self, key: Hashable) -> T | None:
        """The entry under `key`, or None (no error): for lookups by type, where absence is normal."""
        if key not in self._items:
            self.load()
        return self._items.get(key)

    def __getitem__(self, key: Hashable) -> T:
        return self.get(key)

    def __len__(self) -> int:
        return len(self.items())

    def __contains__(self, key: Hashable) -> bool:
        return self.find(key) is not None

    def items(self) -> list[tuple[Hashable, T]]:
        self.load()
        return sorted(self._items.items(), key=lambda kv: _label(kv[0]))

    def names(self) -> list[str]:
        return [_label(k) for k, _ in self.items()]

    def __iter__(self) -> Iterator[Hashable]:
        return iter(k for k, _ in self.items())


def _label(x: object) -> str:
    if isinstance(x, str):
        return x
    qual = getattr(x, "__qualname__", None)
    return f"{getattr(x, '__module__', '')}.{qual}" if qual else repr(x)


def _same_definition(a: object, b: object) -> bool:
    """True for one definition seen twice: a module re-executed (importlib.reload, a test importing a plugin
    file by path) defines new objects with the same module and qualified name."""
    if a is b:
        return True
    qual = getattr(a, "__qualname__", None)
    return bool(qual) and (getattr(a, "__module__", None), qual) == (
        getattr(b, "__module__", None),
        getattr(b, "__qualname__", None),
    )
