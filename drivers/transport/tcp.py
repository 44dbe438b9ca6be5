"""The TCP transport: a connection to a serial device server or a Modbus TCP device.

Connecting is bounded by the timeout; a refused, unreachable or unknown host is
TransportClosed. TCP_NODELAY is set: request/response frames are small, and Nagle's
algorithm would hold a request back waiting for more bytes that never come.
"""

from __future__ import annotations

import asyncio
import socket

from iortd.drivers.errors import TransportClosed, TransportTimeout
from iortd.drivers.transport.link import Link, LinkTransport

__all__ = ["TcpTransport"]


class TcpTransport(LinkTransport):
    """A TCP connection (a serial device server, a Modbus TCP device), with TCP_NODELAY."""

    def __init__(self, host: str, port: int, *, timeout_s: float) -> None:
        super().__init__(timeout_s)
        if not host:
            raise ValueError("host must not be empty")
        if isinstance(port, bool) or not 1 <= port <= 65535:
            raise ValueError(f"port must be 1..65535, got {port!r}")
        self.host = host
        self.port = port

    def describe(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp {host}:{self.port}"

    async def _connect(self, link: Link) -> asyncio.Transport:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout_s):
                transport, _ = await loop.create_connection(lambda: link, self.host, self.port)
        except TimeoutError:
            raise TransportTimeout(
                f"{self.describe()}: no connection within {self._timeout_s:g} s"
            ) from None
        except OSError as exc:  # refused, unreachable, unknown host
            raise TransportClosed(f"{self.describe()}: cannot connect: {exc}") from exc
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Small request/response frames: never let Nagle hold a request back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return transport
