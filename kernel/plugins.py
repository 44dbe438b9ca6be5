"""Plug-ins found through an entry-point group: one registry for every kind of plug-in.

Drivers (``iort.drivers``, :mod:`iortd.drivers.registry`) and sinks (``iort.sinks``,
:mod:`iortd.daemon.sink_registry`) are found the same way: by entry-point name, loaded on
first use, a class instantiated once. Each kind says how its errors read (an unknown name
lists what is installed; a plug-in that is installed but fails to import names its entry
point and the reason, so that a broken plug-in never looks like a missing one).

Only composition roots and config loaders build a registry; nothing imports plug-in
modules directly, so an installed third-party plug-in is found exactly like a built-in one.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Generic, TypeVar

__all__ = ["PluginRegistry"]

F = TypeVar("F")


class PluginRegistry(Generic[F]):
    """Factories by name. Subclasses set :attr:`group` and say how errors read."""

    group: str = ""

    def __init__(self, entries: Mapping[str, EntryPoint | F]) -> None:
        self._entries: dict[str, EntryPoint | F] = dict(entries)
        self._loaded: dict[str, F] = {}

    @classmethod
    def _entry_points(cls) -> dict[str, EntryPoint]:
        return {ep.name: ep for ep in entry_points(group=cls.group)}

    def names(self) -> list[str]:
        return sorted(self._entries)

    # ---- what a kind of plug-in says when something is wrong ---------------------------

    def unknown(self, name: str) -> Exception:
        """The error for a name nothing is installed under."""
        return LookupError(f"{name!r} is not installed (installed: {self.names()})")

    def failed_to_load(self, name: str, entry: EntryPoint, exc: Exception) -> Exception:
        """The error for a plug-in that is installed but cannot be imported."""
        return ImportError(f"{name!r} is installed but failed to load ({entry.value}): {exc}")

    # ----------------------------------------------------------------------------------

    def get(self, name: str) -> F:
        if name in self._loaded:
            return self._loaded[name]
        try:
            entry = self._entries[name]
        except KeyError:
            raise self.unknown(name) from None
        if isinstance(entry, EntryPoint):
            try:
                obj: Any = entry.load()
            except Exception as exc:
                # A broken plug-in must not look like a missing one: say which and why.
                raise self.failed_to_load(name, entry, exc) from exc
            factory: F = obj() if isinstance(obj, type) else obj
        else:
            factory = entry
        self._loaded[name] = factory
        return factory
