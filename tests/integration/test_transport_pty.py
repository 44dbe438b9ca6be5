"""SerialTransport over a real pty: pyserial + pyserial-asyncio-fast on the slave end, the
test acting as the device on the master end (loop.add_reader, no threads, no sleeps).

Closing the master is a faithful "cable pulled": the slave's next read fails at once.
"""

from __future__ import annotations

import asyncio
import os
import tty
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TypeVar

import pytest

from iortd.drivers.errors import TransportClosed, TransportError, TransportTimeout
from iortd.drivers.transport import SerialTransport

pytestmark = pytest.mark.integration

T = TypeVar("T")
CRLF = b"\r\n"
MARGIN_S = 0.3  # scheduling slack on a noisy CI machine, over a timeout


async def within(seconds: float, aw: Awaitable[T], what: str) -> T:
    try:
        async with asyncio.timeout(seconds):
            return await aw
    except TimeoutError:
        pytest.fail(f"{what} did not happen within {seconds} s")


def open_fds() -> set[int]:
    """This process's open fds (without the one listdir used, closed by now)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        fds.add(int(name))
    return fds


class PtyDevice:
    """The device end of a pty pair. The test keeps the slave fd open (so the master
    never sees EIO while the transport reopens the slave by path) and raw."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # a fresh pty is cooked: echo and CR/LF translation
        self.path = os.ttyname(self.slave)
        self.received = bytearray()
        self._arrived = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._reading = False
        self.resume_reading()

    def resume_reading(self) -> None:
        if not self._reading:
            self._loop.add_reader(self.master, self._on_readable)
            self._reading = True

    def stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.master)
            self._reading = False

    def _on_readable(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: no slave open any more
            data = b""
        if not data:
            self.stop_reading()
        self.received += data
        self._arrived.set()

    async def expect(self, data: bytes) -> None:
        async def wait() -> None:
            while not self.received.startswith(data):
                if len(self.received) >= len(data):
                    pytest.fail(f"device expected {data!r}, got {bytes(self.received)!r}")
                self._arrived.clear()
                await self._arrived.wait()

        await within(1.0, wait(), f"the device receiving {data!r}")
        del self.received[: len(data)]

    def send(self, data: bytes) -> None:
        assert os.write(self.master, data) == len(data)

    def pull_cable(self) -> None:
        self.stop_reading()
        os.close(self.master)
        self.master = -1

    def close(self) -> None:
        self.stop_reading()  # never leave a reader on an fd number about to be reused
        if self.master >= 0:
            os.close(self.master)
            self.master = -1
        os.close(self.slave)


@pytest.fixture
async def device() -> AsyncIterator[PtyDevice]:
    dev = PtyDevice()
    try:
        yield dev
    finally:
        dev.close()


@pytest.fixture
async def port(device: PtyDevice) -> AsyncIterator[SerialTransport]:
    t = SerialTransport(device.path, baudrate=19200, timeout_s=0.3)
    try:
        yield t
    finally:
        await within(2.0, t.close(), "closing the serial transport")


async def test_round_trip_and_split_reply(device: PtyDevice, port: SerialTransport) -> None:
    await port.open()
    assert port.describe() == f"serial {device.path} 19200 8N1"
    await port.write(b"$STATUS?\r\n")
    await device.expect(b"$STATUS?\r\n")
    reading = asyncio.create_task(port.read_until(CRLF, 128))
    device.send(b"$OK 12")
    device.send(b".5 READY\r")
    device.send(b"\n$NEXT\r\n")
    assert await within(1.0, reading, "the reply") == b"$OK 12.5 READY\r\n"
    assert await port.read_until(CRLF, 128) == b"$NEXT\r\n"
    # Binary framing on the same link.
    device.send(bytes.fromhex("010302002a3843"))
    assert await port.read_exactly(3) == bytes.fromhex("010302")
    assert await port.read_exactly(4) == bytes.fromhex("002a3843")


async def test_bytes_pass_untranslated(device: PtyDevice, port: SerialTransport) -> None:
    every_byte = bytes(range(256))
    await port.open()
    await port.write(every_byte)
    await device.expect(every_byte)
    device.send(every_byte)
    assert await port.read_exactly(256) == every_byte


async def test_timeout_is_bounded_then_drain(device: PtyDevice, port: SerialTransport) -> None:
    await port.open()
    device.send(b"$PARTIAL")
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(TransportTimeout, match=r"within 0\.3 s \(8 bytes buffered"):
        await port.read_until(CRLF, 128)
    elapsed = loop.time() - start
    assert 0.3 <= elapsed < 0.3 + MARGIN_S, elapsed
    assert await port.drain_input() == 8
    device.send(b"$OK\r\n")
    assert await port.read_until(CRLF, 128) == b"$OK\r\n"


async def test_cable_pulled_is_transport_closed(device: PtyDevice) -> None:
    before = open_fds() - {device.master}  # the test closes the master itself
    port = SerialTransport(device.path, timeout_s=5.0)
    await port.open()
    reading = asyncio.create_task(port.read_until(CRLF, 128))
    loop = asyncio.get_running_loop()
    start = loop.time()
    device.pull_cable()
    with pytest.raises(TransportClosed, match=rf"serial {device.path} .*link lost"):
        await within(1.0, reading, "TransportClosed after the cable was pulled")
    assert loop.time() - start < 1.0
    with pytest.raises(TransportClosed):
        await port.write(b"$PING\r\n")
    await within(1.0, port.close(), "close after the cable was pulled")
    await port.close()
    assert open_fds() == before


async def test_close_is_idempotent_and_releases_the_port(
    device: PtyDevice, port: SerialTransport
) -> None:
    before = open_fds()
    async with port:
        assert open_fds() != before
        await port.write(b"x")
        await device.expect(b"x")
    assert open_fds() == before
    await port.close()
    with pytest.raises(TransportClosed, match="not open"):
        await port.read_until(CRLF, 8)
    # Reopen works, and the exclusive lock was released with the port.
    async with port:
        await port.write(b"y")
        await device.expect(b"y")
    assert open_fds() == before


async def test_port_is_opened_exclusively(device: PtyDevice, port: SerialTransport) -> None:
    await port.open()
    other = SerialTransport(device.path, timeout_s=1.0)
    with pytest.raises(TransportClosed, match=rf"serial {device.path} .*cannot open.*lock"):
        await other.open()


async def test_missing_port_is_transport_closed(tmp_path: Path) -> None:
    port = SerialTransport(f"{tmp_path}/ttyNOPE", timeout_s=1.0)
    with pytest.raises(TransportClosed, match=r"ttyNOPE 19200 8N1: cannot open.*No such file"):
        await port.open()


async def test_write_to_a_stalled_device_times_out(
    device: PtyDevice, port: SerialTransport
) -> None:
    # The device stops reading and small writes fill the pty exactly. pyserial's own
    # non-blocking write then retries EAGAIN in a busy loop inside the event loop (a
    # frozen daemon); ours must raise TransportTimeout instead.
    await port.open()
    device.stop_reading()
    loop = asyncio.get_running_loop()
    last_write_started = 0.0

    async def fill() -> None:
        nonlocal last_write_started
        for _ in range(16 * 1024):  # 16 MiB of 1 KiB writes: far more than a pty buffers
            last_write_started = loop.time()
            await port.write(b"\0" * 1024)

    with pytest.raises(TransportTimeout, match=r"not sent within 0\.3 s"):
        await fill()
    assert loop.time() - last_write_started < 0.3 + MARGIN_S
    await within(1.0, port.close(), "close after a stalled write")


async def test_settings_the_port_refuses_are_an_error_and_leave_it_free(
    device: PtyDevice,
) -> None:
    """A pseudo-terminal refuses parity (tcsetattr: EINVAL, a termios.error, not an
    OSError). That is a TransportError naming the settings, never a crash of the daemon,
    and the port is not left open and locked."""
    before = open_fds()
    odd = SerialTransport(device.path, baudrate=19200, parity="E", timeout_s=1.0)
    with pytest.raises(TransportError, match=r"8E1: cannot configure the port.*parity"):
        await odd.open()
    assert open_fds() == before
    plain = SerialTransport(device.path, baudrate=19200, timeout_s=1.0)
    async with plain:
        await plain.write(b"z")
        await device.expect(b"z")
