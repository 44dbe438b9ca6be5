"""What every map-driven Modbus driver shares, whatever device it reads.

A Modbus driver in this package (``modbus-xrs``, ``modbus-apl``) is a register map and a
vocabulary of point names (drivers/modbus_map.py) read through one unit's exchanges
(drivers/modbus_exchange.py). What is the same for all of them lives here:

- :func:`check_options`: the options ``map``, ``unit_id`` and ``framing`` and the
  transport, checked before any device is touched (the map loaded against the driver's
  vocabulary); a DriverOptionError names the key;
- :func:`device_identity`: the ``identity.*`` points as a DeviceIdentity; a device whose
  manufacturer reads :data:`SIMULATOR_MANUFACTURER` is simulated (its readings are marked
  so), and only a simulator's scenario is kept;
- :class:`ModbusMapDriver`: the exchange with its unit and framing, connecting on enter and
  closing on exit, and the identity read once after connecting. A subclass adds what its
  device's readings are;
- :class:`ModbusMapFactory`: an ``iort.drivers`` factory for such a driver, generic in it.
  Over RTU it can share a serial line with other units (``shared_line_unit``): it then
  talks through the view of the line the composition root lends in the context
  (``DriverContext.shared_line``), one exchange per turn (drivers/transport/shared.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar, Final, Generic, Self, TypeVar

from iortd.drivers.errors import DriverOptionError
from iortd.drivers.interface import DriverContext, DriverSpec, Role
from iortd.drivers.modbus_codec import Framing
from iortd.drivers.modbus_exchange import ModbusExchange
from iortd.drivers.modbus_map import (
    Block,
    MapError,
    RegisterMap,
    Vocabulary,
    load_map,
    resolve_map,
)
from iortd.drivers.transport import Transport, transport_from_config, validate_transport
from iortd.kernel.types import Capability, DeviceIdentity

__all__ = [
    "OPTIONS",
    "SIMULATOR_MANUFACTURER",
    "ModbusMapDriver",
    "ModbusMapFactory",
    "check_options",
    "device_identity",
]

SIMULATOR_MANUFACTURER: Final = "iortd simulator"  # what the project's simulators say
OPTIONS: Final = ("map", "unit_id", "framing")


def check_options(
    driver: str,
    options: Mapping[str, Any],
    transport: Mapping[str, Any],
    *,
    default_unit: int,
    default_map: str,
    vocabulary: Vocabulary,
) -> tuple[RegisterMap, int, Framing]:
    """The map (loaded and checked against ``vocabulary``), the unit id and the framing a
    Modbus driver's options and transport give; a DriverOptionError names the key."""
    for key in options:
        if key not in OPTIONS:
            raise DriverOptionError(
                f"options.{key}", f"unknown key ({driver} takes: {', '.join(OPTIONS)})"
            )
    unit = options.get("unit_id", default_unit)
    if not isinstance(unit, int) or isinstance(unit, bool) or not 1 <= unit <= 247:
        raise DriverOptionError("options.unit_id", f"expected an integer 1..247; got {unit!r}")
    if not transport:
        raise DriverOptionError(
            "transport", f'{driver} needs a [devices.transport] table, e.g. type = "tcp"'
        )
    validate_transport(transport)
    framing_opt = options.get("framing", "auto")
    if framing_opt not in ("auto", "tcp", "rtu"):
        raise DriverOptionError(
            "options.framing", f"expected 'auto', 'tcp' or 'rtu'; got {framing_opt!r}"
        )
    if framing_opt == "auto":
        framing = Framing.TCP if transport.get("type") == "tcp" else Framing.RTU
    else:
        framing = Framing(framing_opt)
    if framing is Framing.TCP and transport.get("type") != "tcp":
        raise DriverOptionError("options.framing", "Modbus TCP framing needs a tcp transport")
    name = options.get("map", default_map)
    if not isinstance(name, str) or not name:
        raise DriverOptionError("options.map", f"expected a map name or path; got {name!r}")
    try:
        regmap = load_map(resolve_map(name), vocabulary)
    except MapError as exc:
        raise DriverOptionError("options.map", str(exc)) from None
    return regmap, unit, framing


def device_identity(values: Mapping[str, Any]) -> DeviceIdentity:
    """The identity from a map's decoded ``identity.*`` points ("-" for one not mapped or
    empty)."""

    def text(key: str) -> str:
        return str(values.get(f"identity.{key}") or "-")

    manufacturer = text("manufacturer")
    simulated = manufacturer == SIMULATOR_MANUFACTURER
    scenario = values.get("identity.scenario") or None
    return DeviceIdentity(
        manufacturer=manufacturer,
        model=text("model"),
        serial=text("serial"),
        firmware=text("firmware"),
        simulated=simulated,
        scenario=scenario if simulated else None,
    )


class ModbusMapDriver:
    """The device-independent part of a map-driven Modbus driver. A subclass sets
    ``NAME`` (the driver's name, for messages), ``DEFAULT_UNIT`` and ``capabilities``, and
    adds its reading method."""

    NAME: ClassVar[str]
    DEFAULT_UNIT: ClassVar[int]
    capabilities: frozenset[Capability]

    def __init__(
        self,
        transport: Transport,
        context: DriverContext,
        regmap: RegisterMap,
        *,
        unit: int | None = None,
        framing: Framing = Framing.TCP,
        timeout_s: float = 1.0,
    ) -> None:
        self._clock = context.clock
        self._map = regmap
        self._link = ModbusExchange(
            transport,
            unit=self.DEFAULT_UNIT if unit is None else unit,
            framing=framing,
            timeout_s=timeout_s,
            name=self.NAME,
            heard=context.heard,
            monotonic_ns=context.clock.monotonic_ns,
        )
        self._simulated = False

    @property
    def unit(self) -> int:
        return self._link.unit

    @property
    def framing(self) -> Framing:
        return self._link.framing

    async def __aenter__(self) -> Self:
        await self._link.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._link.close()

    async def _values(self, blocks: Sequence[Block]) -> dict[str, Any]:
        """The decoded points of ``blocks``, one exchange per block."""
        return self._map.decode(blocks, await self._link.read_blocks(blocks))

    async def identify(self) -> DeviceIdentity:
        identity = device_identity(await self._values(self._map.identity))
        self._simulated = identity.simulated
        return identity


D = TypeVar("D", bound=ModbusMapDriver)


class ModbusMapFactory(Generic[D]):
    """An ``iort.drivers`` factory for a :class:`ModbusMapDriver`. A subclass sets
    ``name``, ``roles``, ``driver`` (the class it builds), ``default_map`` and
    ``vocabulary``."""

    name: str
    roles: frozenset[Role]
    driver: type[D]
    default_map: str
    vocabulary: Vocabulary
    simulated = False  # real equipment; a simulator says so in its identity registers
    path_options = frozenset({"map"})

    def _check(
        self, options: Mapping[str, Any], transport: Mapping[str, Any]
    ) -> tuple[RegisterMap, int, Framing]:
        return check_options(
            self.name,
            options,
            transport,
            default_unit=self.driver.DEFAULT_UNIT,
            default_map=self.default_map,
            vocabulary=self.vocabulary,
        )

    def validate(self, options: Mapping[str, Any], transport: Mapping[str, Any]) -> None:
        self._check(options, transport)

    def shared_line_unit(
        self, options: Mapping[str, Any], transport: Mapping[str, Any]
    ) -> int | None:
        """The unit id this device answers to on a shared serial line, or None when it
        cannot share one (Modbus TCP framing). Raises DriverOptionError like validate."""
        _, unit, framing = self._check(options, transport)
        return unit if framing is Framing.RTU else None

    def create(self, spec: DriverSpec, context: DriverContext) -> D:
        regmap, unit, framing = self._check(spec.options, spec.transport)
        shared = context.shared_line if framing is Framing.RTU else None
        return self.driver(
            shared or transport_from_config(spec.transport, timeout_s=spec.timeout_s),
            context,
            regmap,
            unit=unit,
            framing=framing,
            timeout_s=spec.timeout_s,
        )
