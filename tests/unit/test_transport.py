"""Transports (drivers/transport/): the scripted fake, the [transport] config checks, and
TcpTransport against an in-test asyncio server on 127.0.0.1.

The serial transport over a real pty is tested in tests/integration/test_transport_pty.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import socket
import types
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import pytest

from iortd.drivers.errors import (
    DriverOptionError,
    ProtocolViolation,
    TransportClosed,
    TransportTimeout,
)
from iortd.drivers.transport import (
    Eof,
    Expect,
    Reply,
    ScriptedTransport,
    ScriptError,
    SerialTransport,
    TcpTransport,
    Transport,
    transport_from_config,
    validate_transport,
)

T = TypeVar("T")
CRLF = b"\r\n"
MARGIN_S = 0.3  # scheduling slack on a noisy CI machine, over a timeout


async def within(seconds: float, aw: Awaitable[T], what: str) -> T:
    try:
        async with asyncio.timeout(seconds):
            return await aw
    except TimeoutError:
        pytest.fail(f"{what} did not happen within {seconds} s")


# ---- ScriptedTransport -------------------------------------------------------------------


async def test_scripted_round_trip_and_done() -> None:
    t = ScriptedTransport([Expect(b"STATUS?\r\n"), Reply(b"OK 1\r\n")])
    assert isinstance(t, Transport)
    async with t:
        await t.write(b"STATUS?\r\n")
        assert await t.read_until(CRLF, 64) == b"OK 1\r\n"
    t.assert_done()
    assert t.writes == [b"STATUS?\r\n"]
    assert t.describe() == "scripted device"


async def test_scripted_one_expect_may_be_written_in_pieces() -> None:
    t = ScriptedTransport([Expect(b"ABCDEF"), Reply(b"ok\n")])
    async with t:
        await t.write(b"AB")
        await t.write(b"CDEF")
        assert await t.read_until(b"\n", 8) == b"ok\n"
    t.assert_done()


async def test_scripted_reply_is_not_sent_before_its_request() -> None:
    t = ScriptedTransport([Expect(b"Q"), Reply(b"A\n")], timeout_s=0.5)
    async with t:
        with pytest.raises(TransportTimeout):
            await t.read_until(b"\n", 8)
        await t.write(b"Q")
        assert await t.read_until(b"\n", 8) == b"A\n"


async def test_scripted_unexpected_write_fails_clearly() -> None:
    t = ScriptedTransport([Expect(b"READ 1\r\n"), Reply(b"1\r\n")])
    async with t:
        with pytest.raises(AssertionError, match=r"READ 1.*got b'READ 2\\r\\n'") as info:
            await t.write(b"READ 2\r\n")
    assert isinstance(info.value, ScriptError)
    # A driver that swallowed it is still caught at the end.
    with pytest.raises(ScriptError, match="READ 2"):
        t.assert_done()


async def test_scripted_write_beyond_the_script_fails() -> None:
    t = ScriptedTransport([Expect(b"A")])
    async with t:
        await t.write(b"A")
        with pytest.raises(ScriptError, match="expects no write"):
            await t.write(b"B")


async def test_scripted_split_reply_within_the_timeout() -> None:
    t = ScriptedTransport(
        [Expect(b"Q\n"), Reply(b"VAL", delay_s=0.2), Reply(b"UE 4", delay_s=0.3), Reply(b"2\n")],
        timeout_s=1.0,
    )
    async with t:
        await t.write(b"Q\n")
        assert await t.read_until(b"\n", 32) == b"VALUE 42\n"
        assert t.elapsed_s == pytest.approx(0.5)
    t.assert_done()


async def test_scripted_split_reply_past_the_timeout_times_out() -> None:
    # One timeout covers the whole frame, not each chunk.
    t = ScriptedTransport(
        [Expect(b"Q\n"), Reply(b"VAL", delay_s=0.6), Reply(b"UE\n", delay_s=0.6)], timeout_s=1.0
    )
    async with t:
        await t.write(b"Q\n")
        with pytest.raises(TransportTimeout, match=r"3 bytes buffered"):
            await t.read_until(b"\n", 32)
        assert t.elapsed_s == pytest.approx(1.0)
        assert await t.drain_input() == 3  # the partial frame; b"UE\n" is still in flight
        assert await t.read_until(b"\n", 32) == b"UE\n"  # what a real port would deliver


async def test_scripted_late_reply_times_out_and_is_drained() -> None:
    t = ScriptedTransport(
        [Expect(b"Q1\n"), Reply(b"junk\xff\x00"), Reply(b"R1\n", delay_s=1.5)], timeout_s=1.0
    )
    async with t:
        await t.write(b"Q1\n")
        with pytest.raises(TransportTimeout, match=r"within 1 s \(6 bytes buffered"):
            await t.read_until(b"\n", 32)
        assert t.elapsed_s == pytest.approx(1.0)
        assert await t.drain_input() == 6  # R1 is due at 1.5 s: not here yet
        with pytest.raises(TransportTimeout, match="3 of 4 bytes within 1 s"):
            await t.read_exactly(4)
        assert t.elapsed_s == pytest.approx(2.0)
        assert await t.drain_input() == 3  # the late R1
        assert await t.drain_input() == 0
    t.assert_done()


async def test_scripted_eof_after_data() -> None:
    t = ScriptedTransport([Expect(b"Q"), Reply(b"A\nPART"), Eof()])
    async with t:
        await t.write(b"Q")
        assert await t.read_until(b"\n", 8) == b"A\n"
        with pytest.raises(TransportClosed, match="closed the link"):
            await t.read_until(b"\n", 8)
        with pytest.raises(TransportClosed):
            await t.write(b"Q")
        assert await t.read_exactly(4) == b"PART"  # what came before the EOF is kept
        with pytest.raises(TransportClosed):
            await t.read_exactly(1)


async def test_scripted_continues_after_reopen() -> None:
    t = ScriptedTransport([Eof(delay_s=0.1), Expect(b"HI"), Reply(b"yo\n")])
    await t.open()
    with pytest.raises(TransportClosed):
        await t.read_exactly(1)
    await t.close()
    await t.close()  # idempotent
    async with t:
        await t.write(b"HI")
        assert await t.read_until(b"\n", 4) == b"yo\n"
    t.assert_done()


async def test_scripted_not_open_is_closed() -> None:
    t = ScriptedTransport([Expect(b"x")])
    with pytest.raises(TransportClosed, match="closed"):
        await t.write(b"x")
    with pytest.raises(TransportClosed, match="not open"):
        await t.read_until(b"\n", 8)


async def test_scripted_overlong_line_is_discarded_through_its_terminator() -> None:
    t = ScriptedTransport([Reply(b"X" * 40 + CRLF + b"OK\r\n")])
    async with t:
        with pytest.raises(ProtocolViolation, match=r"more than 16 bytes.*discarded 42 bytes"):
            await t.read_until(CRLF, 16)
        assert await t.read_until(CRLF, 16) == b"OK\r\n"
    t.assert_done()


async def test_scripted_overlong_line_whose_end_comes_late() -> None:
    t = ScriptedTransport(
        [Reply(b"X" * 40), Reply(b"XX\r", delay_s=1.5), Reply(b"\nOK\r\n")], timeout_s=1.0
    )
    async with t:
        with pytest.raises(ProtocolViolation, match="the next read discards through it"):
            await t.read_until(CRLF, 16)
        assert t.elapsed_s == pytest.approx(1.0)
        # The rest of the long line arrives (terminator split across chunks) and is skipped.
        assert await t.read_until(CRLF, 16) == b"OK\r\n"
    t.assert_done()


async def test_scripted_frame_exactly_max_bytes_is_accepted() -> None:
    t = ScriptedTransport([Reply(b"12345678\r\n" + b"123456789\r\n")])
    async with t:
        assert await t.read_until(CRLF, 10) == b"12345678\r\n"
        with pytest.raises(ProtocolViolation):
            await t.read_until(CRLF, 10)
    t.assert_done()


async def test_scripted_read_exactly_for_binary_frames() -> None:
    t = ScriptedTransport(
        [
            Expect(bytes.fromhex("0103000000010a84")),
            Reply(bytes.fromhex("0103")),
            Reply(bytes.fromhex("02002a"), delay_s=0.1),
            Reply(bytes.fromhex("3843")),
        ]
    )
    async with t:
        await t.write(bytes.fromhex("0103000000010a84"))
        assert await t.read_exactly(3) == bytes.fromhex("010302")
        assert await t.read_exactly(4) == bytes.fromhex("002a3843")
    t.assert_done()


async def test_scripted_assert_done_names_what_is_left() -> None:
    t = ScriptedTransport([Expect(b"A"), Reply(b"B\n"), Expect(b"C")])
    async with t:
        await t.write(b"A")
    with pytest.raises(ScriptError, match=r"unwritten b'C'"):
        t.assert_done()
    t2 = ScriptedTransport([Reply(b"unread")])
    await t2.open()
    with pytest.raises(ScriptError, match="6 byte"):
        t2.assert_done()


def test_script_steps_are_checked() -> None:
    with pytest.raises(ValueError, match="at least one byte"):
        Expect(b"")
    with pytest.raises(ValueError, match="delay_s"):
        Reply(b"x", delay_s=-1)
    with pytest.raises(TypeError, match="not a script step"):
        ScriptedTransport([b"raw"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="timeout_s"):
        ScriptedTransport([], timeout_s=0)


async def test_read_arguments_are_checked() -> None:
    async with ScriptedTransport([]) as t:
        with pytest.raises(ValueError, match="terminator"):
            await t.read_until(b"", 8)
        with pytest.raises(ValueError, match="max_bytes"):
            await t.read_until(CRLF, 1)
        with pytest.raises(ValueError, match="n must be"):
            await t.read_exactly(0)


# ---- config ------------------------------------------------------------------------------

SERIAL = {"type": "serial", "port": "/dev/ttyUSB0"}
TCP = {"type": "tcp", "host": "192.0.2.10", "port": 502}


@pytest.mark.parametrize(
    ("transport", "key", "fragment"),
    [
        ({}, "transport.type", "missing"),
        ({"type": "rs485"}, "transport.type", "'serial' or 'tcp'"),
        ({"type": "serial"}, "transport.port", "missing"),
        ({**SERIAL, "port": ""}, "transport.port", "device path"),
        ({**SERIAL, "port": 3}, "transport.port", "device path"),
        ({**SERIAL, "port": "socket://10.0.0.1:4001"}, "transport.port", "type = 'tcp'"),
        ({**SERIAL, "baudrate": "fast"}, "transport.baudrate", "integer"),
        ({**SERIAL, "baudrate": True}, "transport.baudrate", "integer"),
        ({**SERIAL, "baudrate": 0}, "transport.baudrate", "50..4000000"),
        ({**SERIAL, "bytesize": 9}, "transport.bytesize", "5, 6, 7 or 8"),
        ({**SERIAL, "parity": "X"}, "transport.parity", "'N', 'E'"),
        ({**SERIAL, "parity": "n"}, "transport.parity", "'N', 'E'"),
        ({**SERIAL, "stopbits": 3}, "transport.stopbits", "1, 1.5 or 2"),
        ({**SERIAL, "stopbits": "1"}, "transport.stopbits", "1, 1.5 or 2"),
        ({**SERIAL, "baud": 9600}, "transport.baud", "unknown key for a serial transport"),
        ({**SERIAL, "host": "x"}, "transport.host", "unknown key for a serial transport"),
        ({"type": "tcp", "port": 502}, "transport.host", "missing"),
        ({"type": "tcp", "host": "h"}, "transport.port", "missing"),
        ({**TCP, "host": " "}, "transport.host", "host name"),
        ({**TCP, "port": 70000}, "transport.port", "1..65535"),
        ({**TCP, "port": "502"}, "transport.port", "1..65535"),
        ({**TCP, "baudrate": 9600}, "transport.baudrate", "unknown key for a tcp transport"),
        ({**TCP, "timeout_s": 1.0}, "transport.timeout_s", "unknown key"),
    ],
)
def test_validate_transport_names_the_key(
    transport: dict[str, Any], key: str, fragment: str
) -> None:
    with pytest.raises(DriverOptionError) as info:
        validate_transport(transport)
    assert info.value.key == key
    assert fragment in info.value.message
    assert str(info.value).startswith(f"{key}: ")


def test_transport_from_config_builds_serial_with_defaults() -> None:
    validate_transport(SERIAL)
    t = transport_from_config(SERIAL, timeout_s=0.5)
    assert isinstance(t, SerialTransport)
    assert t.describe() == "serial /dev/ttyUSB0 19200 8N1"
    full = {**SERIAL, "baudrate": 9600, "bytesize": 7, "parity": "E", "stopbits": 1.5}
    assert transport_from_config(full, timeout_s=0.5).describe() == "serial /dev/ttyUSB0 9600 7E1.5"


def test_transport_from_config_builds_tcp() -> None:
    t = transport_from_config(TCP, timeout_s=0.5)
    assert isinstance(t, TcpTransport)
    assert t.describe() == "tcp 192.0.2.10:502"
    assert TcpTransport("::1", 5020, timeout_s=1).describe() == "tcp [::1]:5020"


def test_transport_from_config_rejects_bad_config_and_timeout() -> None:
    with pytest.raises(DriverOptionError, match=r"transport\.type"):
        transport_from_config({"type": "usb"}, timeout_s=1.0)
    with pytest.raises(ValueError, match="timeout_s"):
        transport_from_config(TCP, timeout_s=float("inf"))


# ---- TcpTransport against a local server -----------------------------------------------


class Peer:
    """The device side: an asyncio server on 127.0.0.1 port 0 handing over connections."""

    def __init__(self) -> None:
        self.connections: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        await self.connections.put((reader, writer))

    async def accept(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await within(2.0, self.connections.get(), "the client's connection")

    async def stop(self) -> None:
        for w in self.writers:
            w.close()
            with contextlib.suppress(OSError):
                await within(2.0, w.wait_closed(), "closing a server connection")
        if self.server is not None:
            self.server.close()
            await within(2.0, self.server.wait_closed(), "closing the server")


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    p = Peer()
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture
async def client(peer: Peer) -> AsyncIterator[TcpTransport]:
    t = TcpTransport("127.0.0.1", peer.port, timeout_s=0.3)
    try:
        yield t
    finally:
        await within(2.0, t.close(), "closing the client")


async def test_tcp_round_trip_with_split_reply(peer: Peer, client: TcpTransport) -> None:
    await client.open()
    assert client.describe() == f"tcp 127.0.0.1:{peer.port}"
    sock = client._link.transport.get_extra_info("socket")  # type: ignore[union-attr]
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    reader, writer = await peer.accept()
    await client.write(b"PING\r\n")
    assert await within(1.0, reader.readuntil(CRLF), "the request") == b"PING\r\n"
    reading = asyncio.create_task(client.read_until(CRLF, 64))
    writer.write(b"PO")
    await writer.drain()
    writer.write(b"NG\r")
    await writer.drain()
    writer.write(b"\nEXTRA\r\n")
    assert await within(1.0, reading, "the reply") == b"PONG\r\n"
    assert await client.read_until(CRLF, 64) == b"EXTRA\r\n"


async def test_tcp_timeout_and_drain(peer: Peer, client: TcpTransport) -> None:
    await client.open()
    _, writer = await peer.accept()
    writer.write(b"PARTIAL")
    await writer.drain()
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(TransportTimeout, match=r"no complete reply within 0.3 s \(7 bytes"):
        await client.read_until(CRLF, 64)
    elapsed = loop.time() - start
    assert 0.3 <= elapsed < 0.3 + MARGIN_S, elapsed
    assert await client.drain_input() == 7
    assert await client.drain_input() == 0
    writer.write(b"OK\r\n")
    assert await client.read_until(CRLF, 64) == b"OK\r\n"


async def test_tcp_read_exactly(peer: Peer, client: TcpTransport) -> None:
    await client.open()
    _, writer = await peer.accept()
    writer.write(bytes(range(10)))
    assert await client.read_exactly(4) == bytes(range(4))
    assert await client.read_exactly(6) == bytes(range(4, 10))
    with pytest.raises(TransportTimeout, match="0 of 1 bytes"):
        await client.read_exactly(1)


async def test_tcp_peer_close_is_transport_closed(peer: Peer, client: TcpTransport) -> None:
    await client.open()
    _, writer = await peer.accept()
    writer.write(b"LAST\r\n")
    writer.close()
    # Bytes sent before the close are still delivered, then the close is reported.
    assert await client.read_until(CRLF, 64) == b"LAST\r\n"
    with pytest.raises(TransportClosed, match="peer closed"):
        await within(1.0, client.read_until(CRLF, 64), "TransportClosed")
    with pytest.raises(TransportClosed):
        await client.write(b"PING\r\n")
    await client.close()
    await client.close()
    # A lost link may be reopened without a close first.
    await client.open()
    await peer.accept()


async def test_tcp_overlong_line_then_usable(peer: Peer, client: TcpTransport) -> None:
    await client.open()
    _, writer = await peer.accept()
    writer.write(b"X" * 100 + CRLF + b"OK\r\n")
    with pytest.raises(ProtocolViolation, match="discarded 102 bytes up to and including"):
        await client.read_until(CRLF, 32)
    assert await client.read_until(CRLF, 32) == b"OK\r\n"
    # The end of the long line comes after the deadline: the next read skips it.
    writer.write(b"Y" * 100)
    with pytest.raises(ProtocolViolation, match="the next read discards through it"):
        await client.read_until(CRLF, 32)
    writer.write(b"YYYY\r\nAGAIN\r\n")
    assert await client.read_until(CRLF, 32) == b"AGAIN\r\n"


async def test_tcp_write_blocked_by_peer_times_out(peer: Peer, client: TcpTransport) -> None:
    await client.open()
    await peer.accept()  # and never read
    loop = asyncio.get_running_loop()
    chunk = b"\0" * (1024 * 1024)
    last_write_started = 0.0

    async def fill() -> None:
        nonlocal last_write_started
        for _ in range(1024):  # 1 GiB: far more than loopback socket buffers hold
            last_write_started = loop.time()
            await client.write(chunk)

    with pytest.raises(TransportTimeout, match=r"not sent within 0\.3 s"):
        await fill()
    assert loop.time() - last_write_started < 0.3 + MARGIN_S
    await within(1.0, client.close(), "close after a stuck write")


async def test_tcp_refused_is_transport_closed() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        t = TcpTransport("127.0.0.1", port, timeout_s=1.0)
        with pytest.raises(TransportClosed, match=rf"tcp 127.0.0.1:{port}: cannot connect"):
            await t.open()
    with pytest.raises(TransportClosed, match="not open"):
        await t.read_until(CRLF, 8)


async def test_tcp_open_twice_is_a_bug(peer: Peer, client: TcpTransport) -> None:
    async with client:
        with pytest.raises(RuntimeError, match="already open"):
            await client.open()


async def test_read_exactly_can_wait_less_than_the_timeout_never_more() -> None:
    t = ScriptedTransport([Expect(b"?"), Reply(b"ab", delay_s=0.3)], timeout_s=1.0)
    async with t:
        await t.write(b"?")
        with pytest.raises(TransportTimeout, match=r"0 of 1 bytes within 0\.1 s"):
            await t.read_exactly(1, timeout_s=0.1)
        assert t.elapsed_s == pytest.approx(0.1)
        assert await t.read_exactly(2, timeout_s=5.0) == b"ab"  # capped at 1.0, in time
        with pytest.raises(TransportTimeout, match="within 1 s"):
            await t.read_exactly(1, timeout_s=5.0)
        assert t.elapsed_s == pytest.approx(1.3)
        with pytest.raises(ValueError, match="timeout_s must be > 0"):
            await t.read_exactly(1, timeout_s=0)


# ---- the public surface -----------------------------------------------------------------

# What third-party drivers and their tests import (docs/engineers.md, "Writing a driver";
# examples/iortd-driver-example): the package may be laid out in any number of modules, but
# this list only grows, and only on purpose.
PUBLIC_NAMES = {
    "Eof",
    "Expect",
    "Reply",
    "ScriptError",
    "ScriptStep",
    "ScriptedTransport",
    "SerialTransport",
    "TcpTransport",
    "Transport",
    "transport_from_config",
    "validate_transport",
}


def test_public_surface_is_stable_and_defined_in_the_transport_package() -> None:
    module = importlib.import_module("iortd.drivers.transport")
    assert set(module.__all__) == PUBLIC_NAMES, "iortd.drivers.transport.__all__ changed"
    assert len(module.__all__) == len(PUBLIC_NAMES), "a name is listed twice in __all__"
    for name in PUBLIC_NAMES:
        value = getattr(module, name)
        if isinstance(value, types.UnionType):  # ScriptStep: an alias, no home of its own
            continue
        home = value.__module__
        assert home.startswith("iortd.drivers.transport"), f"{name} comes from {home}"
    # The scripted fake is a Transport by the same protocol the real links satisfy.
    assert issubclass(ScriptedTransport, Transport)
    assert issubclass(TcpTransport, Transport)
    assert issubclass(SerialTransport, Transport)
