"""One Modbus master's request/reply exchanges over a :class:`~iortd.drivers.transport.Transport`,
and what else every map-driven Modbus driver shares: its options and its identity.

The lifecycle of the ``modbus-xrs`` and ``modbus-apl`` drivers (drivers/modbus_xrs.py,
drivers/modbus_apl.py), with the rules of docs/protocols.md, XRS-MB/1 "Link":

- one request outstanding at a time, one deadline (``timeout_s``) per exchange;
- input pending before a request is discarded (a server never talks unasked);
- after a timeout or a frame that cannot be read, and on a freshly opened RTU line, wait
  (one timeout at most) for a late reply to begin and drop it with everything up to a
  quiet line, so a late reply is never taken for the answer to the next request (RTU has
  no transaction id);
- over RTU a few bytes before ``<unit><function>`` (an RS-485 turnaround glitch, a stray
  0x00 or 0xFF) are skipped, at most :data:`MAX_LEADING_NOISE`; over TCP a reply to an
  older transaction is skipped;
- every good reply is reported to ``heard`` (the clock's monotonic time), so staleness is
  measured from the device's last reply.

Framing, CRC and reply checks are drivers/modbus_codec.py's; errors are those of
drivers/errors.py plus :class:`~iortd.drivers.modbus_codec.ModbusDeviceError`.

:func:`check_options` validates a driver's ``map``, ``unit_id`` and ``framing`` options
and its transport (the map loaded against the driver's vocabulary), naming the key;
:func:`device_identity` reads the ``identity.*`` points the same way for every device, a
simulator recognised by its manufacturer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from iortd.drivers.errors import (
    DriverOptionError,
    ProtocolViolation,
    TransportClosed,
    TransportTimeout,
)
from iortd.drivers.modbus_codec import (
    Framing,
    Table,
    decode_reply,
    encode_read,
    reply_head_size,
    reply_rest_size,
)
from iortd.drivers.modbus_map import (
    Block,
    MapError,
    RegisterMap,
    Vocabulary,
    load_map,
    resolve_map,
)
from iortd.drivers.transport import Transport, validate_transport
from iortd.kernel.types import DeviceIdentity

__all__ = [
    "MAX_LEADING_NOISE",
    "OPTIONS",
    "SIMULATOR_MANUFACTURER",
    "ModbusExchange",
    "check_options",
    "device_identity",
]

MAX_LEADING_NOISE: Final = 16  # bytes skipped before an RTU reply, at most
SIMULATOR_MANUFACTURER: Final = "iortd simulator"  # the project's simulators call themselves
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
    empty); a device whose manufacturer is :data:`SIMULATOR_MANUFACTURER` is simulated,
    and only a simulator's scenario is kept."""

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


class ModbusExchange:
    """Reads of register blocks from one unit, one at a time (not reentrant: the driver
    that owns it is polled by one loop)."""

    def __init__(
        self,
        transport: Transport,
        *,
        unit: int,
        framing: Framing,
        timeout_s: float,
        name: str,
        heard: Callable[[int], None],
        monotonic_ns: Callable[[], int],
    ) -> None:
        self._transport = transport
        self.unit = unit
        self.framing = framing
        self._timeout_s = timeout_s
        self._name = name
        self._heard = heard
        self._monotonic_ns = monotonic_ns
        # Silence that ends a late reply while resynchronising: well above an RTU frame
        # gap (3.5 characters: 2 ms at 19200 baud), below the reply timeout.
        self._quiet_s = min(max(timeout_s / 4, 0.02), 0.25)
        self._tid = 0
        self._open = False
        self._late_reply_possible = False

    def describe(self) -> str:
        return self._transport.describe()

    async def open(self) -> None:
        await self._transport.open()
        self._open = True
        # A line just (re)opened may still carry a reply that an earlier connection gave
        # up on; RTU has no transaction id to tell it by, so resynchronise first.
        self._late_reply_possible = self.framing is Framing.RTU

    async def close(self) -> None:
        self._open = False
        await self._transport.close()

    async def read(self, table: Table, address: int, count: int) -> list[int]:
        """The ``count`` registers of ``table`` from ``address``."""
        if not self._open:
            raise TransportClosed(f"{self._name}: {self._transport.describe()} is not open")
        try:
            if self._late_reply_possible:
                await self._settle()
            # A server never talks unasked: anything pending is stale.
            await self._transport.drain_input()
            self._tid = (self._tid + 1) & 0xFFFF
            request = encode_read(
                self.framing, table, address, count, unit=self.unit, tid=self._tid
            )
            await self._transport.write(request)
            try:
                async with asyncio.timeout(self._timeout_s):  # one deadline per exchange
                    registers = await self._reply(table, address, count)
            except TimeoutError:
                raise TransportTimeout(
                    f"no complete reply from {self._transport.describe()} "
                    f"within {self._timeout_s:g} s"
                ) from None
        except (TransportTimeout, ProtocolViolation):
            self._late_reply_possible = True
            raise
        self._heard(self._monotonic_ns())
        return registers

    async def read_blocks(self, blocks: Sequence[Block]) -> list[list[int]]:
        """The registers of each block, one exchange per block, in order."""
        return [await self.read(b.table, b.address, b.count) for b in blocks]

    async def _reply(self, table: Table, address: int, count: int) -> list[int]:
        while True:
            head = await self._read_head(table)
            rest = await self._transport.read_exactly(reply_rest_size(self.framing, head))
            if self.framing is Framing.TCP and int.from_bytes(head[:2], "big") != self._tid:
                continue  # a late reply to an earlier request: skip it, read on
            return decode_reply(
                self.framing, head + rest, table, address, count, unit=self.unit, tid=self._tid
            )

    async def _read_head(self, table: Table) -> bytes:
        """The first bytes of the reply. On RTU, bytes before ``<unit><function>`` (an
        RS-485 turnaround glitch, a stray 0x00 or 0xFF) are skipped, a few at most, within
        the exchange's deadline; what follows is checked by the CRC."""
        size = reply_head_size(self.framing)
        head = await self._transport.read_exactly(size)
        if self.framing is not Framing.RTU:
            return head
        function = 0x04 if table is Table.INPUT else 0x03
        skipped = 0
        while head[0] != self.unit or head[1] not in (function, function | 0x80):
            skipped += 1
            if skipped > MAX_LEADING_NOISE:
                raise ProtocolViolation(
                    f"no reply from unit {self.unit} in the first {skipped} bytes: "
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
