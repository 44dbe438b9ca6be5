"""The simulated console's side of XRS-ASCII/1 (docs/protocols.md), over a pty.

Written apart from the host's codec (drivers/xrs_ascii.py) on purpose: two independent
readings of the specification, so that a mistake in one shows up as a failure against the
other rather than hiding in shared code. (Only the specification is shared.)

:class:`ConsoleProtocol` turns request lines into reply lines for a device model;
:class:`PtyConsole` serves it on a pseudo-terminal whose slave path a driver opens like a
real serial port. The model is advanced by the time that passed on the simulator's clock
at each request (simulators.device.SimDevice), as the in-process ``sim`` driver does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import string
import tty

from iortd.kernel.types import DeviceState, Interlock, InterlockState
from iortd.simulators.device import SimDevice
from iortd.simulators.model import ModelSnapshot

__all__ = ["ConsoleProtocol", "PtyConsole", "crc_ccitt"]

LINE_LIMIT = 128
_ORDER = (
    Interlock.DOOR,
    Interlock.EMERGENCY_STOP,
    Interlock.APPLICATOR,
    Interlock.TUBE_VOLTAGE,
    Interlock.TUBE_CURRENT,
    Interlock.COOLING,
    Interlock.DOSE_CHANNELS,
    Interlock.DOSE_RATE,
    Interlock.BACKUP_TIMER,
)
_LETTER = {InterlockState.OK: "O", InterlockState.TRIPPED: "T", InterlockState.UNKNOWN: "U"}


def _table() -> list[int]:
    out = []
    for i in range(256):
        c = i << 8
        for _ in range(8):
            c = ((c << 1) ^ 0x1021) & 0xFFFF if c & 0x8000 else (c << 1) & 0xFFFF
        out.append(c)
    return out


_TABLE = _table()


def crc_ccitt(data: bytes) -> int:
    """CRC-16/CCITT-FALSE, table-driven (the host's is bitwise: two implementations)."""
    crc = 0xFFFF
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[(crc >> 8) ^ b]
    return crc


def _reply(*fields: str) -> bytes:
    body = ",".join(fields).encode("ascii")
    return b"$%s*%04X\r\n" % (body, crc_ccitt(body))


def _num(x: float, places: int = 4) -> str:
    """A number as the spec allows: no exponent, at most 6 decimals, trailing zeros off."""
    text = f"{x:.{places}f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


_TEXT_CHARS = frozenset(string.ascii_letters + string.digits + "._/ -")


def _text(s: str) -> str:
    keep = "".join(ch if ch in _TEXT_CHARS else "-" for ch in s)
    return keep[:64] or "-"


class ConsoleProtocol:
    """Request line in, reply line out, for one simulated console."""

    def __init__(self, device: SimDevice) -> None:
        self.device = device

    @property
    def requests(self) -> int:
        return self.device.requests

    def handle(self, line: bytes) -> bytes | None:
        """The reply to one received line (``None``: nothing to say, e.g. an empty line)."""
        self.device.requests += 1
        text = line.rstrip(b"\r\n")
        if not text:
            return None
        if (
            len(line) > LINE_LIMIT
            or not text.startswith(b"$")
            or len(text) < 7
            or text[-5:-4] != b"*"
        ):
            return _reply("ER", "02", "not a frame")
        body, crc = text[1:-5], text[-4:]
        try:
            if int(crc, 16) != crc_ccitt(body) or crc.upper() != crc:
                return _reply("ER", "02", "bad CRC")
        except ValueError:
            return _reply("ER", "02", "bad CRC")
        cmd, _, arg = body.partition(b",")
        snap = self.device.advance()
        if cmd == b"ID" and not arg:
            ident = self.device.identity()
            fields = [ident.manufacturer, ident.model, ident.serial, ident.firmware]
            if note := self.device.scenario_note():
                fields.append(note)  # the optional fifth field: the scenario played
            return _reply("ID", *(_text(f) for f in fields))
        if cmd == b"ST" and not arg:
            return self._status(snap)
        if cmd == b"IL" and not arg:
            return _reply("IL", self._interlocks(snap))
        if cmd == b"AP" and not arg:
            app = snap.applicator
            if app is None:
                return _reply("AP", "NONE")
            return _reply("AP", _text(app.type), _num(app.diameter_mm, 1), _text(app.serial))
        if cmd == b"AB":
            return _reply("ER", "03", "beam abort is not simulated")
        return _reply("ER", "01", "unknown command")

    @staticmethod
    def _interlocks(snap: ModelSnapshot) -> str:
        return "".join(_LETTER[snap.interlocks.get(i, InterlockState.UNKNOWN)] for i in _ORDER)

    def _status(self, snap: ModelSnapshot) -> bytes:
        planned = (
            _num(snap.preset_gy / snap.expected_rate_gy_min * 60.0, 1)
            if snap.expected_rate_gy_min and snap.preset_gy
            else "-"
        )
        state = snap.state if snap.state is not DeviceState.UNKNOWN else DeviceState.FAULT
        return _reply(
            "ST",
            state.value,
            _num(snap.dose_rate_gy_min),
            _num(snap.dose_primary_gy, 5),
            _num(snap.dose_secondary_gy, 5),
            _num(snap.preset_gy),
            _num(snap.beam_on_s, 2),
            planned,
            _num(snap.kv, 2),
            _num(snap.ua, 2),
            self._interlocks(snap),
            snap.termination.value if snap.termination is not None else "-",
            str(snap.selection),
        )


class PtyConsole:
    """The console on a pseudo-terminal: :attr:`device` is the path a driver opens."""

    def __init__(self, protocol: ConsoleProtocol) -> None:
        self.protocol = protocol
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # a fresh pty is cooked: no echo, no CRLF translation
        tty.setraw(self._master)
        self.device = os.ttyname(self._slave)
        self._buf = bytearray()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._noise = random.Random(0x5CE7)  # noqa: S311 - seeded noise, reproducible
        self._pending: set[asyncio.TimerHandle] = set()  # replies held back (slow link)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        os.set_blocking(self._master, False)
        self._loop.add_reader(self._master, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EIO: the other side went away; keep serving the next opener
            return
        self._buf += data
        device = self.protocol.device
        while (nl := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[: nl + 1])
            del self._buf[: nl + 1]
            reply = self.protocol.handle(line)
            if device.link_down():
                continue  # the cable is pulled: the request goes nowhere
            if device.garbled():
                reply = self._garbage()
            if reply is not None:
                self._send(reply, device.reply_delay_s())
        if len(self._buf) > LINE_LIMIT:  # a line too long: drop it, answer once
            self._buf.clear()
            self._send(_reply("ER", "02", "line too long"), device.reply_delay_s())

    def _send(self, data: bytes, delay_s: float) -> None:
        if delay_s > 0 and self._loop is not None:  # a slow console

            def fire() -> None:
                self._pending.discard(handle)
                self._write(data)

            handle = self._loop.call_later(delay_s, fire)
            self._pending.add(handle)
        else:
            self._write(data)

    def _garbage(self) -> bytes:
        """Line noise: random bytes, sometimes a whole line, sometimes a broken frame."""
        n = self._noise.randint(1, 90)
        noise = bytes(self._noise.randrange(256) for _ in range(n)).replace(b"\n", b"~")
        if self._noise.random() < 0.7:
            noise += b"\r\n"
        return noise

    def _write(self, data: bytes) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._master, data)

    def close(self) -> None:
        for handle in self._pending:  # never write into an fd number reused after close
            handle.cancel()
        self._pending.clear()
        if self._loop is not None:
            self._loop.remove_reader(self._master)
        for fd in (self._master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)
