"""The ``modbus-xrs`` driver: an IORT source console over Modbus TCP or RTU, read through
a register map (drivers/modbus_map.py; the reference console's is XRS-MB/1,
config/maps/xrs-mb1.toml, specified in docs/protocols.md).

The driver's errors: TransportTimeout and TransportClosed (the link), ProtocolViolation
(bytes that are not the reply), and ModbusDeviceError, a DeviceFault (an exception
response, with its code). A real console is integrated by writing its map, not code::

    [[devices]]
    name = "console-1"
    driver = "modbus-xrs"
    timeout_s = 0.5
    [devices.transport]        # Modbus TCP ...
    type = "tcp"
    host = "192.0.2.10"
    port = 502
    [devices.options]
    map = "xrs-mb1"            # a bundled map, or the path of the site's own
    unit_id = 1

or ``type = "serial"`` (``port``, ``baudrate``, ``parity = "E"``, ...) for RTU; the
framing follows the transport (``framing = "rtu"`` for an RTU device behind a TCP serial
server).

Every exchange is one request and one reply within the device's ``timeout_s``, run by
drivers/modbus_exchange.py (shared with ``modbus-apl``): input pending before a request is
discarded; after a timeout or a frame that cannot be read, the driver waits (one timeout at
most) for the rest of a late reply and drops it, so that a late reply is never taken for the
answer to the next request (RTU has no transaction id); over TCP a reply to an older
transaction is skipped. Each good reply is reported to ``DriverContext.heard``, as
``serial-xrs`` does (a reading is one exchange, so staleness is judged as before). The
driver only reads (functions 03 and 04): it is a passive monitor.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from iortd.drivers.errors import ProtocolViolation
from iortd.drivers.interface import Role
from iortd.drivers.modbus_device import SIMULATOR_MANUFACTURER, ModbusMapDriver, ModbusMapFactory
from iortd.drivers.modbus_map import INTERLOCK_POINTS, XRS_MB1
from iortd.kernel.types import (
    ApplicatorIdentity,
    Capability,
    DeviceState,
    Interlock,
    InterlockState,
    SourceReading,
    TerminationStatus,
)

__all__ = ["SIMULATOR_MANUFACTURER", "ModbusXrsDriver", "ModbusXrsFactory"]

_INTERLOCKS: Mapping[str, Interlock] = MappingProxyType(
    {
        "door": Interlock.DOOR,
        "emergency_stop": Interlock.EMERGENCY_STOP,
        "applicator": Interlock.APPLICATOR,
        "kv": Interlock.TUBE_VOLTAGE,
        "ua": Interlock.TUBE_CURRENT,
        "cooling": Interlock.COOLING,
        "dose_channels": Interlock.DOSE_CHANNELS,
        "dose_rate": Interlock.DOSE_RATE,
        "backup_timer": Interlock.BACKUP_TIMER,
    }
)
assert tuple(_INTERLOCKS) == INTERLOCK_POINTS  # noqa: S101 - one list, two modules


class ModbusXrsDriver(ModbusMapDriver):
    """A :class:`~iortd.drivers.interface.SourceDriver` for consoles with a register map
    (XRS-MB/1's by default)."""

    NAME = "modbus-xrs"
    DEFAULT_UNIT = 1
    capabilities = frozenset(
        {Capability.READ_TELEMETRY, Capability.READ_INTERLOCKS, Capability.READ_APPLICATOR}
    )

    async def read(self) -> SourceReading:
        v = await self._values(self._map.telemetry)
        mono_ns, utc = self._clock.monotonic_ns(), self._clock.utc()
        state_word = v["state"]
        state = DeviceState(state_word) if state_word in DeviceState.__members__ else None
        termination = None
        term = v.get("termination")
        if term not in (None, "NONE"):
            termination = TerminationStatus.__members__.get(str(term), TerminationStatus.UNKNOWN)
        interlocks: dict[Interlock, InterlockState] = {}
        for key, which in _INTERLOCKS.items():
            word = v.get(f"interlock.{key}", "unknown")
            interlocks[which] = InterlockState.__members__.get(
                str(word).upper(), InterlockState.UNKNOWN
            )
        numbers = {
            k: v[k]
            for k in ("dose_rate", "dose_primary", "dose_secondary", "preset", "beam_on_time")
        }
        for k, x in numbers.items():
            if x is None or x < 0:
                raise ProtocolViolation(f"{k} = {x!r}: a dose, rate or time is never negative")
        return SourceReading(
            mono_ns=mono_ns,
            utc=utc,
            state=state if state is not None else DeviceState.UNKNOWN,
            dose_rate_gy_min=numbers["dose_rate"],
            dose_primary_gy=numbers["dose_primary"],
            dose_secondary_gy=numbers["dose_secondary"],
            preset_gy=numbers["preset"],
            beam_on_s=numbers["beam_on_time"],
            kv=v["kv"],
            ua=v["ua"],
            interlocks=MappingProxyType(interlocks),
            planned_time_s=v.get("planned_time"),
            termination=termination,
            applicator=self._applicator(v),
            simulated=self._simulated,
            selection=_counter(v.get("selection")),
            extra=MappingProxyType(
                {
                    k.removeprefix("extra."): float(x)
                    for k, x in v.items()
                    if k.startswith("extra.") and x is not None
                }
            ),
        )

    def _applicator(self, v: Mapping[str, Any]) -> ApplicatorIdentity | None:
        kind = v.get("applicator.type")
        if kind is None or kind == "NONE":
            return None
        if kind == "UNKNOWN":
            # Never "no applicator": an applicator is there and cannot be named.
            raise ProtocolViolation("applicator type code not in the map's value table")
        diameter = v.get("applicator.diameter")
        if diameter is None or not 0 < diameter <= 200:
            raise ProtocolViolation(f"applicator diameter {diameter!r} mm out of range")
        return ApplicatorIdentity(
            type=str(kind),
            diameter_mm=float(diameter),
            serial=str(v.get("applicator.serial") or "-"),
        )


class ModbusXrsFactory(ModbusMapFactory[ModbusXrsDriver]):
    name = "modbus-xrs"
    roles: frozenset[Role] = frozenset({"source"})
    driver = ModbusXrsDriver
    default_map = "xrs-mb1"
    vocabulary = XRS_MB1


def _counter(x: object) -> int | None:
    """The selection counter as read (None: not mapped, or the map's "missing" value)."""
    if x is None:
        return None
    if not isinstance(x, int | float) or x < 0 or x != int(x):
        raise ProtocolViolation(f"selection = {x!r}: a counter is a non-negative integer")
    return int(x)
