"""RTU slaves on a pseudo-terminal, with the time a real line takes.

:class:`RtuFramer` finds request frames in the bytes of an RTU line (sans-I/O): by the
request length each function code implies and a good CRC, dropping a byte at a time to
resynchronise after noise (also when the line falls silent, in case a frame sits behind it).
:class:`RtuPtyConsole` serves one device, or several at their own unit ids (one RS-485
line shared by a source console and an applicator reader), on a pty that a driver opens
like a real serial port; since a pty moves bytes at memory speed, each reply is held back
for the time the request and the reply would take on the wire (:func:`line_time_s`), and
the line carries one frame at a time: a reply never starts before the previous one, of
whichever unit, has gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from collections.abc import Sequence

from iortd.simulators.modbus_xrs.console import ModbusSlave
from iortd.simulators.modbus_xrs.crc import crc_ok
from iortd.simulators.modbus_xrs.faults import Noise, Sender, through_link

__all__ = ["BITS_PER_CHAR", "MAX_RTU_FRAME", "RtuFramer", "RtuPtyConsole", "line_time_s"]

BITS_PER_CHAR = 11  # RTU: start + 8 data + parity + stop (8E1), or 8N2
MAX_RTU_FRAME = 256


def line_time_s(n_bytes: int, baudrate: int) -> float:
    """Seconds ``n_bytes`` take on an RTU line at ``baudrate`` (0: no line time)."""
    return n_bytes * BITS_PER_CHAR / baudrate if baudrate > 0 else 0.0


# Request lengths by function code: fixed, or 9 + the byte count at offset 6 (0F, 10).
_FIXED_LENGTH = {0x01: 8, 0x02: 8, 0x03: 8, 0x04: 8, 0x05: 8, 0x06: 8}


class RtuFramer:
    """Finds request frames in the bytes received on an RTU line.

    A frame is the address, the function code, the request's length for that function
    (8 bytes for 03/04) and a good CRC; when the CRC fails, one byte is dropped and the
    search starts again (resynchronisation after noise). A function of unknown length is
    taken as a frame when the CRC of everything received is good, or at the end of the
    line's silence (:meth:`idle`) as garbage."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.dropped = 0

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        frames = []
        buf = self._buf
        while len(buf) >= 2:
            function = buf[1]
            if function in _FIXED_LENGTH:
                need: int | None = _FIXED_LENGTH[function]
            elif function in (0x0F, 0x10):
                need = 9 + buf[6] if len(buf) >= 7 else MAX_RTU_FRAME
            else:
                need = None
            if need is None:
                if len(buf) >= 4 and crc_ok(buf):
                    frames.append(bytes(buf))
                    buf.clear()
                elif (k := self._next_frame_at()) is not None:
                    del buf[:k]  # noise before a good frame: drop it now, not at silence
                    self.dropped += k
                    continue
                break
            if len(buf) < need:
                break
            candidate = bytes(buf[:need])
            if crc_ok(candidate):
                frames.append(candidate)
                del buf[:need]
            else:
                del buf[0]
                self.dropped += 1
        if len(buf) > MAX_RTU_FRAME:
            self.dropped += len(buf) - MAX_RTU_FRAME
            del buf[: len(buf) - MAX_RTU_FRAME]
        return frames

    def _next_frame_at(self) -> int | None:
        """The offset of the first complete fixed-length frame with a good CRC."""
        buf = self._buf
        for k in range(1, len(buf) - 7):
            n = _FIXED_LENGTH.get(buf[k + 1])
            if n is not None and len(buf) >= k + n and crc_ok(buf[k : k + n]):
                return k
        return None

    def idle(self) -> list[bytes]:
        """The line went silent: what is left is no frame; drop it a byte at a time, in
        case a whole frame sits behind the noise."""
        frames = []
        while self._buf:
            del self._buf[0]
            self.dropped += 1
            frames += self.feed(b"")
        return frames


class RtuPtyConsole:
    """RTU slaves on a pseudo-terminal: :attr:`device` is the path a driver opens like a
    real serial port. ``console`` answers at its unit id, each of ``others`` at its own
    (a shared line); a frame for any other address is not answered.

    A pty moves bytes at memory speed whatever baud rate is set on it, so the time a real
    line takes is modelled: each reply is held for the time the request and the reply
    would take on the wire, ``(request + reply bytes) x 11 bits / baudrate`` (11 bits a
    character: 8E1), e.g. 53 ms for a 40-register read at 19200 baud. ``baudrate=0``
    turns the model off (benchmarks). One :class:`Sender` for the line: the replies of all
    units go out in the order they were asked for, never overlapping."""

    def __init__(
        self,
        console: ModbusSlave,
        *,
        others: Sequence[ModbusSlave] = (),
        baudrate: int = 19200,
        seed: int = 0,
    ) -> None:
        if baudrate < 0:
            raise ValueError(f"baudrate must be >= 0, got {baudrate}")
        self.console = console
        self.units: dict[int, ModbusSlave] = {}
        slaves: list[ModbusSlave] = [console, *others]
        for slave in slaves:
            if slave.unit_id in self.units:
                raise ValueError(f"unit id {slave.unit_id} is served twice on one line")
            self.units[slave.unit_id] = slave
        self.baudrate = baudrate
        self.framer = RtuFramer()
        self.noise = Noise(0x5A7E ^ seed)
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # a fresh pty is cooked: no echo, no CR/LF translation
        tty.setraw(self._master)
        self.device = os.ttyname(self._slave)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sender: Sender | None = None
        self._idle: asyncio.TimerHandle | None = None
        # Silence that ends a frame: 3.5 characters (Modbus), but at least 50 ms, since a
        # loaded machine can split one write to a pty into reads a few ms apart.
        self.idle_s = max(3.5 * line_time_s(1, baudrate), 0.05)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sender = Sender(self._write)
        os.set_blocking(self._master, False)
        self._loop.add_reader(self._master, self._readable)

    def where(self, unit_id: int | None = None) -> dict[str, object]:
        """Where ``unit_id`` (the first device's by default) is served."""
        unit = self.console.unit_id if unit_id is None else unit_id
        return {"device": self.device, "unit_id": unit, "baudrate": self.baudrate}

    def _readable(self) -> None:
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EIO: the other side went away; keep serving the next opener
            return
        self._frames(self.framer.feed(data))
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self.framer.pending and self._loop is not None:
            self._idle = self._loop.call_later(self.idle_s, self._silence)

    def _silence(self) -> None:
        self._idle = None
        self._frames(self.framer.idle())

    def _frames(self, frames: list[bytes]) -> None:
        for frame in frames:
            slave = self.units.get(frame[0])
            if slave is None:
                continue  # another address (or a broadcast): nobody here answers
            reply = slave.rtu_reply(frame)
            if reply is None:
                continue
            device = slave.device
            out = through_link(device, reply, lambda _r: self.noise.random_bytes(1, 40))
            if out is not None and self._sender is not None:
                hold = line_time_s(len(frame) + len(out), self.baudrate)
                self._sender.send(out, hold + device.reply_delay_s())

    def _write(self, data: bytes) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._master, data)

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
        if self._idle is not None:
            self._idle.cancel()
        if self._loop is not None:
            self._loop.remove_reader(self._master)
            self._loop = None
        for fd in (self._master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._master = self._slave = -1
