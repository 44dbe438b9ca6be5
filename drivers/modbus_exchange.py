"""One Modbus master's request/reply exchanges over a :class:`~iortd.drivers.transport.Transport`.

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
  measured from the device's last reply;
- on a line shared with other units (a :class:`~iortd.drivers.transport.shared.LineView` of an
  RS-485 line, drivers/transport/shared.py) each exchange is one turn of the line, taken
  in round-robin order with the other units, and "a late reply may be on its way" is the
  line's, not this unit's: a timeout on one unit's turn makes the next unit (whichever)
  settle the line before its request.

Framing, CRC and reply checks are drivers/modbus_codec.py's; errors are those of
drivers/errors.py plus :class:`~iortd.drivers.modbus_codec.ModbusDeviceError`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Final

from iortd.drivers.errors import ProtocolViolation, TransportClosed, TransportTimeout
from iortd.drivers.modbus_codec import (
    Framing,
    Table,
    decode_reply,
    encode_read,
    reply_head_size,
    reply_rest_size,
)
from iortd.drivers.modbus_map import Block
from iortd.drivers.transport import Transport
from iortd.drivers.transport.shared import LineView

__all__ = ["MAX_LEADING_NOISE", "ModbusExchange"]

MAX_LEADING_NOISE: Final = 16  # bytes skipped before an RTU reply, at most


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
        shared = self._transport if isinstance(self._transport, LineView) else None
        async with shared.turn() if shared else contextlib.nullcontext():
            return await self._exchange(table, address, count, shared)

    async def _exchange(
        self, table: Table, address: int, count: int, shared: LineView | None
    ) -> list[int]:
        try:
            if self._late_reply_possible or (shared is not None and shared.unsettled):
                await self._settle()
                if shared is not None:
                    shared.unsettled = False
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
            if shared is not None:
                shared.unsettled = True
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
