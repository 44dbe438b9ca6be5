"""The ``modbus-apl`` driver: an applicator reader and positioning stand over Modbus TCP or
RTU (APL-MB/1, docs/protocols.md), read through a register map (config/maps/apl-mb1.toml).

Three layers, each usable alone:

* :func:`~iortd.drivers.apl_map.load_apl_map`: a map in the format of
  drivers/modbus_map.py, loaded and checked there against APL-MB/1's point names
  (drivers/apl_map.py); the values are decoded by :meth:`RegisterMap.decode`, unchanged.
* :func:`decode_points` and :func:`decode_sample` (sans-I/O): registers to an
  :class:`~iortd.kernel.types.ApplicatorReading` (with its ApplicatorState,
  ApplicatorFault and Tristate flags, all in the kernel), refusing with a
  ProtocolViolation that names the register any value outside its documented range or
  inconsistent with the others (a magnitude that is not the length of its components
  beyond rounding, a fault code without the FAULT state, an applicator type code the map
  does not list, a diameter or serial with no applicator, half of the displacement
  missing). A state, fault or flag code the map does not list reads as UNKNOWN (fail safe:
  an unknown flag counts as the unsafe case), as in XRS-MB/1.
* :class:`ModbusAplDriver`: identity once after connecting (holding registers), then one
  telemetry read per poll, so that all the values of a sample come from one instant. What
  is not the applicator's is shared with ``modbus-xrs`` (drivers/modbus_device.py: options,
  identity, connecting; drivers/modbus_exchange.py: timeouts, resynchronisation after a
  late reply, noise before an RTU reply). It only reads: a passive monitor.

The reader is usually on the RS-485 line of the source console at another unit id (2 by
default; the console is at 1). A reply from the other unit is never read as this one's:
the RTU head must carry this unit id (a few stray bytes are skipped, then the CRC decides).

Config::

    [[devices]]
    name = "stand-1"
    role = "applicator"
    driver = "modbus-apl"
    timeout_s = 0.3
    [devices.transport]
    type = "tcp"               # or "serial" (RTU): port, baudrate, parity = "E", ...
    host = "192.0.2.20"
    port = 502
    [devices.options]
    map = "apl-mb1"            # a bundled map, or the path of the site's own
    unit_id = 2
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final

from iortd.drivers.apl_map import APL_MB1, load_apl_map
from iortd.drivers.errors import ProtocolViolation
from iortd.drivers.interface import Role
from iortd.drivers.modbus_device import SIMULATOR_MANUFACTURER, ModbusMapDriver, ModbusMapFactory
from iortd.drivers.modbus_map import Block, RegisterMap
from iortd.kernel.types import (
    ApplicatorFault,
    ApplicatorIdentity,
    ApplicatorReading,
    ApplicatorState,
    Capability,
    Tristate,
)

__all__ = [
    "DEFAULT_UNIT",
    "MAGNITUDE_TOLERANCE_MM",
    "MAX_DIAMETER_MM",
    "MAX_TILT_DEG",
    "SIMULATOR_MANUFACTURER",
    "ModbusAplDriver",
    "ModbusAplFactory",
    "decode_points",
    "decode_sample",
    "load_apl_map",
]

DEFAULT_UNIT: Final = 2  # the source console is unit 1 on a shared line
MAX_DIAMETER_MM: Final = 200.0  # as XRS-ASCII/1's and XRS-MB/1's applicator diameter
MAX_TILT_DEG: Final = 180.0
# The magnitude and the length of the three components may differ by rounding only: each
# component is off by half a step at most, the magnitude by half a step, so
# (sqrt(3)/2 + 1/2) steps < 2 steps. 0.01 mm steps in APL-MB/1; a map with coarser steps
# gets two of its coarsest.
MAGNITUDE_TOLERANCE_MM: Final = 0.02
_SLACK: Final = 1e-9  # binary floating point of the scaled values


# ---- decoding ------------------------------------------------------------------------------


def _where(regmap: RegisterMap, *names: str) -> str:
    """``input register 23 (displacement.magnitude)``, ``input registers 20-23
    (displacement)``: where a refused value is, for the message."""
    pts = [regmap.points[n] for n in names if n in regmap.points]
    if not pts:
        return ", ".join(names)
    addresses = sorted({a for p in pts for a in range(p.address, p.end)})
    label = names[0] if len(names) == 1 else names[0].split(".")[0]
    if len(addresses) == 1:
        return f"{pts[0].table} register {addresses[0]} ({label})"
    if addresses == list(range(addresses[0], addresses[-1] + 1)):
        span = f"{addresses[0]}-{addresses[-1]}"
    else:
        span = ", ".join(map(str, addresses))
    return f"{pts[0].table} registers {span} ({label})"


def decode_points(
    regmap: RegisterMap, blocks: Sequence[Block], data: Sequence[Sequence[int]]
) -> tuple[dict[str, Any], dict[str, int]]:
    """The values of every point (as drivers/modbus_map.py decodes them), and the raw
    register contents of each enumerated point, for messages. A value that cannot be
    decoded is refused naming its register."""
    try:
        values = regmap.decode(blocks, data)
    except ProtocolViolation:
        values = _decode_naming(regmap, blocks, data)  # raises, naming the register
    raws: dict[str, int] = {}
    for block, regs in zip(blocks, data, strict=True):
        for p in block.points:
            if p.values is not None:
                start = p.address - block.address
                raws[p.name] = (
                    regs[start] if p.count == 1 else (regs[start] << 16) | regs[start + 1]
                )
    return values, raws


def _decode_naming(
    regmap: RegisterMap, blocks: Sequence[Block], data: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """Point by point, so that the error names the register."""
    values: dict[str, Any] = {}
    for block, regs in zip(blocks, data, strict=True):
        if len(regs) != block.count:
            raise ProtocolViolation(f"{len(regs)} registers for a block of {block.count}")
        for p in block.points:
            start = p.address - block.address
            one = Block(p.table, p.address, p.count, (p,))
            try:
                values.update(regmap.decode((one,), (list(regs[start : start + p.count]),)))
            except ProtocolViolation as exc:
                raise ProtocolViolation(f"{_where(regmap, p.name)}: {exc}") from None
    return values


def _flag(word: object) -> Tristate:
    return Tristate.__members__.get(str(word).upper(), Tristate.UNKNOWN)


def _count(regmap: RegisterMap, values: Mapping[str, Any], name: str) -> int | None:
    x = values.get(name)
    if x is None:
        return None
    if not isinstance(x, int | float) or x < 0 or x != int(x):
        raise ProtocolViolation(f"{_where(regmap, name)}: {x!r} is not a count")
    return int(x)


def decode_sample(
    regmap: RegisterMap,
    values: Mapping[str, Any],
    *,
    mono_ns: int,
    utc: datetime,
    simulated: bool,
    raws: Mapping[str, int] | None = None,
) -> ApplicatorReading:
    """A sample from decoded point values (:func:`decode_points`), every documented
    invariant checked; a refusal names the register (docs/protocols.md, APL-MB/1, "What a
    master does with a bad value")."""
    raws = raws or {}

    def bad(*names: str) -> str:
        return _where(regmap, *names)

    state = ApplicatorState.__members__.get(str(values["state"]), ApplicatorState.UNKNOWN)
    fault_word = str(values["fault"])
    fault = None if fault_word == "NONE" else ApplicatorFault.__members__.get(fault_word)
    if fault_word != "NONE" and fault is None:
        fault = ApplicatorFault.UNKNOWN
    if state is ApplicatorState.FAULT and fault is None:
        raise ProtocolViolation(f"{bad('fault')}: NONE while the state is FAULT")
    if state not in (ApplicatorState.FAULT, ApplicatorState.UNKNOWN) and fault is not None:
        raise ProtocolViolation(f"{bad('fault')}: {fault} while the state is {state}")

    applicator = _applicator(regmap, values, raws)
    uses_left = _count(regmap, values, "applicator.uses_left")
    if applicator is None and uses_left is not None:
        raise ProtocolViolation(f"{bad('applicator.uses_left')}: {uses_left} with no applicator")

    names = ("displacement.x", "displacement.y", "displacement.z", "displacement.magnitude")
    x, y, z, m = (values[n] for n in names)
    if (x is None, y is None, z is None, m is None).count(True) not in (0, 4):
        raise ProtocolViolation(
            f"{bad(*names)}: x, y, z and magnitude are reported together "
            f"(got {x!r}, {y!r}, {z!r}, {m!r})"
        )
    displacement = None
    if x is not None:
        displacement = (float(x), float(y), float(z))
        length = math.sqrt(x * x + y * y + z * z)
        steps = [regmap.points[n].scale * regmap.points[n].factor for n in names]
        tolerance = max(MAGNITUDE_TOLERANCE_MM, 2 * max(abs(s) for s in steps))
        if not m >= 0 or abs(m - length) > tolerance + _SLACK:
            raise ProtocolViolation(
                f"{bad('displacement.magnitude')}: {m:g} mm, but the components "
                f"({x:g}, {y:g}, {z:g}) are {length:.4f} mm long "
                f"(more than {tolerance:g} mm apart)"
            )
    tilt = values["tilt"]
    if tilt is not None and not 0 <= tilt <= MAX_TILT_DEG + _SLACK:
        raise ProtocolViolation(f"{bad('tilt')}: {tilt:g} deg out of range (0 to 180)")

    counters = {}
    for name in ("seat_counter", "lock_counter", "heartbeat"):
        n = _count(regmap, values, name)
        if n is None:  # a counter has no "missing": cannot happen with a checked map
            raise ProtocolViolation(f"{bad(name)}: not reported")
        counters[name] = n
    return ApplicatorReading(
        mono_ns=mono_ns,
        utc=utc,
        state=state,
        fault=fault,
        seated=_flag(values["seated"]),
        source_locked=_flag(values["source_locked"]),
        brakes_engaged=_flag(values["brakes_engaged"]),
        applicator=applicator,
        uses_left=uses_left,
        seat_counter=counters["seat_counter"],
        lock_counter=counters["lock_counter"],
        displacement_mm=displacement,
        displacement_magnitude_mm=None if m is None else float(m),
        tilt_deg=None if tilt is None else float(tilt),
        heartbeat=counters["heartbeat"],
        simulated=simulated,
        extra=MappingProxyType(
            {
                k.removeprefix("extra."): float(v)
                for k, v in values.items()
                if k.startswith("extra.") and v is not None
            }
        ),
    )


def _applicator(
    regmap: RegisterMap, values: Mapping[str, Any], raws: Mapping[str, int]
) -> ApplicatorIdentity | None:
    kind = str(values["applicator.type"])
    diameter = values["applicator.diameter"]
    serial = str(values["applicator.serial"])
    where = _where(regmap, "applicator.type")
    if kind == "UNKNOWN":
        # Never "no applicator": one is there and cannot be named.
        code = raws.get("applicator.type")
        raise ProtocolViolation(f"{where}: code {code} is not in the map's table")
    if kind == "NONE":
        if diameter != 0:
            raise ProtocolViolation(
                f"{_where(regmap, 'applicator.diameter')}: {diameter:g} mm with no applicator"
            )
        if serial:
            raise ProtocolViolation(
                f"{_where(regmap, 'applicator.serial')}: {serial!r} with no applicator"
            )
        return None
    if not 0 < diameter <= MAX_DIAMETER_MM + _SLACK:
        raise ProtocolViolation(
            f"{_where(regmap, 'applicator.diameter')}: {diameter:g} mm out of range "
            f"(above 0, at most {MAX_DIAMETER_MM:g})"
        )
    if not serial:
        raise ProtocolViolation(
            f"{_where(regmap, 'applicator.serial')}: empty: an applicator is named by its serial"
        )
    return ApplicatorIdentity(type=kind, diameter_mm=float(diameter), serial=serial)


# ---- the driver ----------------------------------------------------------------------------


class ModbusAplDriver(ModbusMapDriver):
    """An :class:`~iortd.drivers.interface.ApplicatorDriver` for APL-MB/1 devices."""

    NAME = "modbus-apl"
    DEFAULT_UNIT = DEFAULT_UNIT
    capabilities = frozenset({Capability.READ_APPLICATOR})

    async def _points(self, blocks: Sequence[Block]) -> tuple[dict[str, Any], dict[str, int]]:
        return decode_points(self._map, blocks, await self._link.read_blocks(blocks))

    async def _values(self, blocks: Sequence[Block]) -> dict[str, Any]:
        return (await self._points(blocks))[0]  # a value refused names its register

    async def read_applicator(self) -> ApplicatorReading:
        values, raws = await self._points(self._map.telemetry)
        return decode_sample(
            self._map,
            values,
            mono_ns=self._clock.monotonic_ns(),
            utc=self._clock.utc(),
            simulated=self._simulated,
            raws=raws,
        )


class ModbusAplFactory(ModbusMapFactory[ModbusAplDriver]):
    """The ``modbus-apl`` entry point's factory (role ``applicator``)."""

    name = "modbus-apl"
    roles: frozenset[Role] = frozenset({"applicator"})
    driver = ModbusAplDriver
    default_map = "apl-mb1"
    vocabulary = APL_MB1
