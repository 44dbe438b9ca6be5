"""Discovery of drivers through the ``iort.drivers`` entry-point group.

Only the composition root (and check-config) builds a registry; nothing imports driver
modules directly, so an installed third-party driver is found exactly like a built-in one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib.metadata import EntryPoint, entry_points

from iortd.drivers.errors import DriverConfigError, UnknownDriverError
from iortd.drivers.interface import DriverFactory

__all__ = ["ENTRY_POINT_GROUP", "DriverRegistry"]

ENTRY_POINT_GROUP = "iort.drivers"


class DriverRegistry:
    def __init__(self, entries: Mapping[str, EntryPoint | DriverFactory]) -> None:
        self._entries = dict(entries)
        self._loaded: dict[str, DriverFactory] = {}

    @classmethod
    def from_entry_points(cls) -> DriverRegistry:
        return cls({ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)})

    @classmethod
    def of(cls, factories: Iterable[DriverFactory]) -> DriverRegistry:
        return cls({f.name: f for f in factories})

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> DriverFactory:
        if name in self._loaded:
            return self._loaded[name]
        try:
            entry = self._entries[name]
        except KeyError:
            raise UnknownDriverError(name, self.names()) from None
        if isinstance(entry, EntryPoint):
            try:
                obj = entry.load()
            except Exception as exc:
                # A broken plug-in must not look like a missing one: say which and why.
                raise DriverConfigError(
                    f"driver {name!r} is installed but failed to load ({entry.value}): {exc}"
                ) from exc
            factory: DriverFactory = obj() if isinstance(obj, type) else obj
        else:
            factory = entry
        self._loaded[name] = factory
        return factory
