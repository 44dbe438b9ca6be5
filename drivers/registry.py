"""Discovery of drivers through the ``iort.drivers`` entry-point group.

Only the composition root (and check-config) builds a registry; nothing imports driver
modules directly, so an installed third-party driver is found exactly like a built-in one.
The lookup itself is the kernel's (:mod:`iortd.kernel.plugins`, shared with sinks); this
module says how a driver's errors read.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import EntryPoint

from iortd.drivers.errors import DriverConfigError, UnknownDriverError
from iortd.drivers.interface import DriverFactory
from iortd.kernel.plugins import PluginRegistry

__all__ = ["ENTRY_POINT_GROUP", "DriverRegistry"]

ENTRY_POINT_GROUP = "iort.drivers"


class DriverRegistry(PluginRegistry[DriverFactory]):
    group = ENTRY_POINT_GROUP

    @classmethod
    def from_entry_points(cls) -> DriverRegistry:
        return cls(cls._entry_points())

    @classmethod
    def of(cls, factories: Iterable[DriverFactory]) -> DriverRegistry:
        return cls({f.name: f for f in factories})

    def unknown(self, name: str) -> Exception:
        return UnknownDriverError(name, self.names())

    def failed_to_load(self, name: str, entry: EntryPoint, exc: Exception) -> Exception:
        return DriverConfigError(
            f"driver {name!r} is installed but failed to load ({entry.value}): {exc}"
        )
