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

Every exchange is one request and one reply within the device's ``timeout_s``. Input
pending before a request is discarded; after a timeout or a frame that cannot be read, the
driver waits (one timeout at most) for the rest of a late reply and drops it, so that a
late reply is never taken for the answer to the next request (RTU has no transaction id).
Over TCP a reply to an older transaction is skipped. The driver only reads (functions 03
and 04): it is a passive monitor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from types import MappingProxyType, TracebackType
from typing import Any, Self

from iortd.drivers.errors import (
    DriverOptionError,
    ProtocolViolation,
    TransportClosed,
    TransportTimeout,
)
from iortd.drivers.interface import DriverContext, DriverSpec, Role
from iortd.drivers.modbus_codec import (
    Framing,
    Table,
    decode_reply,
    encode_read,
    reply_head_size,
    reply_rest_size,
)
from iortd.drivers.modbus_map import (
    INTERLOCK_POINTS,
    Block,
    MapError,
    RegisterMap,
    load_map,
    resolve_map,
)
from iortd.drivers.transport import Transport, transport_from_config, validate_transport
from iortd.kernel.types import (
    ApplicatorIdentity,
    Capability,
    DeviceIdentity,
    DeviceState,
    Interlock,
    InterlockState,
    SourceReading,
    TerminationStatus,
)

__all__ = ["SIMULATOR_MANUFACTURER", "ModbusXrsDriver", "ModbusXrsFactory"]

SIMULATOR_MANUFACTURER = "iortd simulator"
_MAX_LEADING_NOISE = 16  # bytes skipped before an RTU reply, at most
_OPTIONS = ("map", "unit_id", "framing")
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


def _check(
    options: Mapping[str, Any], transport: Mapping[str, Any]
) -> tuple[RegisterMap, int, Framing]:
    for key in options:
        if key not in _OPTIONS:
            raise DriverOptionError(
                f"options.{key}", f"unknown key (modbus-xrs takes: {', '.join(_OPTIONS)})"
            )
    unit = options.get("unit_id", 1)
    if not isinstance(unit, int) or isinstance(unit, bool) or not 1 <= unit <= 247:
        raise DriverOptionError("options.unit_id", f"expected an integer 1..247; got {unit!r}")
    if not transport:
        raise DriverOptionError(
            "transport", 'modbus-xrs needs a [devices.transport] table, e.g. type = "tcp"'
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
    name = options.get("map", "xrs-mb1")
    if not isinstance(name, str) or not name:
        raise DriverOptionError("options.map", f"expected a map name or path; got {name!r}")
    try:
        regmap = load_map(resolve_map(name))
    except MapError as exc:
        raise DriverOptionError("options.map", str(exc)) from None
    return regmap, unit, framing


class ModbusXrsFactory:
    name = "modbus-xrs"
    roles: frozenset[Role] = frozenset({"source"})
    simulated = False  # real equipment; a simulator says so in its identity registers
    path_options = frozenset({"map"})

    def validate(self, options: Mapping[str, Any], transport: Mapping[str, Any]) -> None:
        _check(options, transport)

    def create(self, spec: DriverSpec, context: DriverContext) -> ModbusXrsDriver:
        regmap, unit, framing = _check(spec.options, spec.transport)
        return ModbusXrsDriver(
            transport_from_config(spec.transport, timeout_s=spec.timeout_s),
            context,
            regmap,
            unit=unit,
            framing=framing,
            timeout_s=spec.timeout_s,
        )


class ModbusXrsDriver:
    capabilities = frozenset(
        {Capability.READ_TELEMETRY, Capability.READ_INTERLOCKS, Capability.READ_APPLICATOR}
    )

    def __init__(
        self,
        transport: Transport,
        context: DriverContext,
        regmap: RegisterMap,
        *,
        unit: int = 1,
        framing: Framing = Framing.TCP,
        timeout_s: float = 1.0,
    ) -> None:
        self._transport = transport
        self._clock = context.clock
        self._map = regmap
        self._unit = unit
        self._framing = framing
        self._timeout_s = timeout_s
        # Silence that ends a late reply while resynchronising: well above an RTU frame
        # gap (3.5 characters: 2 ms at 19200 baud), below the reply timeout.
        self._quiet_s = min(max(timeout_s / 4, 0.02), 0.25)
        self._tid = 0
        self._open = False
        self._late_reply_possible = False
        self._simulated = False

    async def __aenter__(self) -> Self:
        await self._transport.open()
        self._open = True
        # A line just (re)opened may still carry a reply that an earlier connection gave
        # up on; RTU has no transaction id to tell it by, so resynchronise first.
        self._late_reply_possible = self._framing is Framing.RTU
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        await self._transport.close()

    # ---- exchanges -------------------------------------------------------------------

    async def _read_block(self, block: Block) -> list[int]:
        if not self._open:
            raise TransportClosed(f"modbus-xrs: {self._transport.describe()} is not open")
        try:
            if self._late_reply_possible:
                await self._settle()
            # A server never talks unasked: anything pending is stale.
            await self._transport.drain_input()
            self._tid = (self._tid + 1) & 0xFFFF
            request = encode_read(
                self._framing,
                block.table,
                block.address,
                block.count,
                unit=self._unit,
                tid=self._tid,
            )
            await self._transport.write(request)
            try:
                async with asyncio.timeout(self._timeout_s):  # one deadline per exchange
                    return await self._reply(block)
            except TimeoutError:
                raise TransportTimeout(
                    f"no complete reply from {self._transport.describe()} "
                    f"within {self._timeout_s:g} s"
                ) from None
        except (TransportTimeout, ProtocolViolation):
            self._late_reply_possible = True
            raise

    async def _reply(self, block: Block) -> list[int]:
        while True:
            head = await self._read_head(block)
            rest = await self._transport.read_exactly(reply_rest_size(self._framing, head))
            frame = head + rest
            if self._framing is Framing.TCP and int.from_bytes(head[:2], "big") != self._tid:
                continue  # a late reply to an earlier request: skip it, read on
            return decode_reply(
                self._framing,
                frame,
                block.table,
                block.address,
                block.count,
                unit=self._unit,
                tid=self._tid,
            )

    async def _read_head(self, block: Block) -> bytes:
        """The first bytes of the reply. On RTU, bytes before ``<unit><function>`` (an
        RS-485 turnaround glitch, a stray 0x00 or 0xFF) are skipped, a few at most, within
        the exchange's deadline; what follows is checked by the CRC."""
        size = reply_head_size(self._framing)
        head = await self._transport.read_exactly(size)
        if self._framing is not Framing.RTU:
            return head
        function = 0x04 if block.table is Table.INPUT else 0x03
        skipped = 0
        while head[0] != self._unit or head[1] not in (function, function | 0x80):
            skipped += 1
            if skipped > _MAX_LEADING_NOISE:
                raise ProtocolViolation(
                    f"no reply from unit {self._unit} in the first {skipped} bytes: "
                    f"{head.hex(' ')}..."
                )
            head = head[1:] + await self._transport.read_exactly(1)
        return head

    async def _settle(self) -> None:
        """After a timeout or a frame that could not be read, the device may still be
        sending, and an RTU reply has no transaction id to tell it from the next one. So
        wait (one timeout at most) for a late reply to begin; if anything comes, discard
        until the line has been quiet for ``quiet_s`` (at most one more timeout). A plain
        drain, or reading one frame's worth, would leave a reply still on its way to be
        taken for the answer to the next request."""
        try:
            await self._transport.read_exactly(1)
        except (TransportTimeout, ProtocolViolation):
            pass  # nothing late: the line is quiet
        else:
            loop = asyncio.get_running_loop()
            end = loop.time() + self._timeout_s
            while loop.time() < end:
                await self._transport.drain_input()
                try:
                    await self._transport.read_exactly(1, timeout_s=self._quiet_s)
                except TransportTimeout:
                    break
        await self._transport.drain_input()
        self._late_reply_possible = False

    async def _read(self, blocks: Sequence[Block]) -> dict[str, Any]:
        data = [await self._read_block(b) for b in blocks]
        return self._map.decode(blocks, data)

    # ---- the driver interface --------------------------------------------------------

    async def identify(self) -> DeviceIdentity:
        values = await self._read(self._map.identity)

        def text(key: str) -> str:
            return str(values.get(f"identity.{key}") or "-")

        manufacturer = text("manufacturer")
        self._simulated = manufacturer == SIMULATOR_MANUFACTURER
        scenario = values.get("identity.scenario") or None
        return DeviceIdentity(
            manufacturer=manufacturer,
            model=text("model"),
            serial=text("serial"),
            firmware=text("firmware"),
            simulated=self._simulated,
            scenario=scenario if self._simulated else None,
        )

    async def read(self) -> SourceReading:
        v = await self._read(self._map.telemetry)
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


def _counter(x: object) -> int | None:
    """The selection counter as read (None: not mapped, or the map's "missing" value)."""
    if x is None:
        return None
    if not isinstance(x, int | float) or x < 0 or x != int(x):
        raise ProtocolViolation(f"selection = {x!r}: a counter is a non-negative integer")
    return int(x)
