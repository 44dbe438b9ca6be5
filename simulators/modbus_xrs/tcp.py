"""The console on a TCP port: Modbus TCP, several clients at once.

Each connection splits its byte stream into MBAP frames, has the console answer each one
and sends the reply through the link faults (faults.py). A header that is not Modbus (a
protocol id other than 0, an impossible length) closes the connection: there is no way to
find the next frame in such a stream. A client that sends and never reads is dropped once
its unsent replies pass :data:`WRITE_BUFFER_LIMIT`, so it cannot grow the simulator's
memory. Closing the server closes every connection and waits, bounded, until each is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct

from iortd.simulators.modbus_xrs.console import MAX_MBAP_LENGTH, MBAP_LEN, ModbusSlave
from iortd.simulators.modbus_xrs.faults import Noise, Sender, through_link

__all__ = ["WRITE_BUFFER_LIMIT", "ModbusTcpServer"]

WRITE_BUFFER_LIMIT = 64 * 1024  # a client that never reads is dropped past this


class _TcpConnection(asyncio.Protocol):
    def __init__(self, server: ModbusTcpServer) -> None:
        self._server = server
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._sender: Sender | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, asyncio.Transport):  # pragma: no cover - TCP only
            raise TypeError(f"expected a stream transport, got {transport!r}")
        self._transport = transport
        self._sender = Sender(self._write)
        self._server.connections.add(self)
        self._server.idle.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._sender is not None:
            self._sender.cancel()
        self._server.connections.discard(self)
        if not self._server.connections:
            self._server.idle.set()

    def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
        if self._transport is not None:
            self._transport.close()

    def _write(self, data: bytes) -> None:
        t = self._transport
        if t is None or t.is_closing():
            return
        if t.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            t.abort()  # a client that sends and never reads: drop it, not the simulator
            return
        t.write(data)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        console = self._server.console
        while len(self._buf) >= MBAP_LEN and self._transport is not None:
            _, protocol, length, _ = struct.unpack(">HHHB", self._buf[:MBAP_LEN])
            if protocol != 0 or not 2 <= length <= MAX_MBAP_LENGTH:
                # Not Modbus: no way to find the next frame in this stream.
                self._server.bad_headers += 1
                self.close()
                return
            end = 6 + length
            if len(self._buf) < end:
                return
            adu = bytes(self._buf[:end])
            del self._buf[:end]
            reply = through_link(console.device, console.tcp_reply(adu), self._server.noise.tcp)
            if reply is not None and self._sender is not None:
                self._sender.send(reply, console.device.reply_delay_s())


class ModbusTcpServer:
    """A device (a console, an applicator reader) on a TCP port (``port=0``: a free
    one), several clients at once."""

    def __init__(
        self, console: ModbusSlave, *, host: str = "127.0.0.1", port: int = 0, seed: int = 0
    ) -> None:
        self.console = console
        self.host = host
        self.port = port
        self.noise = Noise(0x3B0D ^ seed)
        self.connections: set[_TcpConnection] = set()
        self.bad_headers = 0
        self.idle = asyncio.Event()  # set while no client is connected
        self.idle.set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _TcpConnection(self), self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def where(self) -> dict[str, object]:
        return {"host": self.host, "port": self.port, "unit_id": self.console.unit_id}

    async def close(self, timeout_s: float = 2.0) -> None:
        if self._server is None:
            return
        self._server.close()
        for conn in list(self.connections):
            conn.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.idle.wait()  # every connection_lost has run
                await self._server.wait_closed()
        self._server = None
