"""XRS-ASCII/1, the host side: a sans-I/O codec (docs/protocols.md).

No sockets, no clocks, no asyncio: bytes in, typed values or typed errors out, so that it
is tested exhaustively by golden vectors and fuzzing and reused by any transport. Every
problem raises :class:`~iortd.drivers.errors.ProtocolViolation` (the frame is dropped, the
caller resynchronises) naming the frame; a console's own error reply raises
:class:`~iortd.drivers.errors.DeviceFault`. Nothing here ever accepts a value that does not
match the specification exactly.

The simulator's side of the protocol is written separately (the issue asks for two
independent codecs, so that one cannot hide the other's mistakes).
"""

from __future__ import annotations

import binascii
import enum
import re
from dataclasses import dataclass
from typing import Final

from iortd.drivers.errors import DeviceFault, ProtocolViolation
from iortd.kernel.types import (
    ApplicatorIdentity,
    DeviceState,
    Interlock,
    InterlockState,
    TerminationStatus,
)

__all__ = [
    "INTERLOCK_ORDER",
    "MAX_FRAME",
    "Command",
    "ConsoleError",
    "Frame",
    "FrameSplitter",
    "XrsIdentity",
    "XrsStatus",
    "crc16",
    "decode_applicator",
    "decode_identity",
    "decode_interlocks",
    "decode_reply",
    "decode_status",
    "encode_request",
    "parse_frame",
]

MAX_FRAME: Final = 128  # bytes from '$' to '\n' inclusive
TERMINATOR: Final = b"\r\n"

# The console's nine interlocks, in wire order; the tenth (communication) is the host's.
INTERLOCK_ORDER: Final = (
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
_IL_LETTER: Final = {
    ord("O"): InterlockState.OK,
    ord("T"): InterlockState.TRIPPED,
    ord("U"): InterlockState.UNKNOWN,
}
# ER codes of the specification: unknown command, bad field, not allowed now, busy.
ERROR_CODES: Final = frozenset({b"01", b"02", b"03", b"04"})
MAX_DIAMETER_MM: Final = 200.0
_WIRE_STATES: Final = frozenset(s.value for s in DeviceState if s is not DeviceState.UNKNOWN)

_NUMBER = re.compile(rb"-?[0-9]{1,7}(?:\.[0-9]{1,6})?")
_WORD = re.compile(rb"[A-Z_]{1,16}")
_TEXT = re.compile(rb"[A-Za-z0-9._/ -]{1,64}")
_FIELD_BYTES = re.compile(rb"[\x20-\x7e]*")


class Command(enum.StrEnum):
    IDENTIFY = "ID"
    STATUS = "ST"
    INTERLOCKS = "IL"
    APPLICATOR = "AP"
    ABORT = "AB"
    ERROR = "ER"  # reply only


class ConsoleError(DeviceFault):
    """The console answered ``ER``: it could not serve the request."""

    def __init__(self, code: str, text: str) -> None:
        self.code = code
        self.text = text
        super().__init__(f"console error {code}: {text}")


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection, no final XOR (the
    standard library's ``crc_hqx`` with that initial value; the simulator computes it
    with a table of its own)."""
    return binascii.crc_hqx(data, 0xFFFF)


def _show(raw: bytes) -> str:
    """A frame as an error message shows it: printable, bounded."""
    text = raw[:60].decode("ascii", "backslashreplace").replace("\r", "\\r").replace("\n", "\\n")
    return repr(text + ("..." if len(raw) > 60 else ""))


def encode_request(command: Command, *fields: str) -> bytes:
    """A request frame. Only ``AB`` takes a field (its token, a text)."""
    if command is Command.ERROR:
        raise ValueError("ER is a reply, not a request")
    if command is Command.ABORT:
        if len(fields) != 1 or not _TEXT.fullmatch(fields[0].encode("ascii", "replace")):
            raise ValueError("AB takes one text field (its token)")
    elif fields:
        raise ValueError(f"{command.value} takes no fields")
    body = ",".join((command.value, *fields)).encode("ascii")
    return b"$" + body + b"*" + f"{crc16(body):04X}".encode() + TERMINATOR


@dataclass(frozen=True, slots=True)
class Frame:
    command: str
    fields: tuple[bytes, ...]
    raw: bytes


def parse_frame(line: bytes) -> Frame:
    """One line (with its ``\\r\\n``) -> a checked frame; ProtocolViolation otherwise."""
    if len(line) > MAX_FRAME:
        raise ProtocolViolation(f"overlong frame ({len(line)} bytes > {MAX_FRAME}): {_show(line)}")
    if not line.endswith(TERMINATOR):
        raise ProtocolViolation(f"frame without CRLF terminator: {_show(line)}")
    if not line.startswith(b"$"):
        raise ProtocolViolation(f"frame does not start with '$': {_show(line)}")
    star = line.rfind(b"*")
    if star < 1 or star != len(line) - 7:
        raise ProtocolViolation(f"frame without '*' and 4-digit CRC before CRLF: {_show(line)}")
    body, crc_text = line[1:star], line[star + 1 : -2]
    if not re.fullmatch(rb"[0-9A-F]{4}", crc_text):
        raise ProtocolViolation(f"CRC is not 4 upper-case hex digits: {_show(line)}")
    if not _FIELD_BYTES.fullmatch(body) or b"$" in body or b"*" in body:
        raise ProtocolViolation(f"frame body holds a byte outside printable ASCII: {_show(line)}")
    if int(crc_text, 16) != crc16(body):
        raise ProtocolViolation(
            f"bad CRC {crc_text.decode()} (computed {crc16(body):04X}): {_show(line)}"
        )
    command, *fields = body.split(b",")
    if not re.fullmatch(rb"[A-Z]{2}", command):
        raise ProtocolViolation(f"command is not two upper-case letters: {_show(line)}")
    return Frame(command.decode(), tuple(fields), line)


class FrameSplitter:
    """Bytes as they arrive -> complete lines, bounded: never more than MAX_FRAME bytes
    held, an overlong line reported once and skipped to its end."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> list[bytes | ProtocolViolation]:
        out: list[bytes | ProtocolViolation] = []
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                # MAX_FRAME bytes without a terminator can never become a frame.
                if len(self._buf) >= MAX_FRAME and not self._skipping:
                    out.append(self._overlong(bytes(self._buf)))
                    self._skipping = True
                if self._skipping:
                    self._buf.clear()  # keep nothing until the next terminator
                return out
            line = bytes(self._buf[: nl + 1])
            del self._buf[: nl + 1]
            if self._skipping:
                self._skipping = False
                continue
            if line in (b"\n", b"\r\n"):
                continue  # an empty line is not a frame
            # The same whatever the chunks: a line over the bound is reported, not returned.
            out.append(self._overlong(line) if len(line) > MAX_FRAME else line)

    @staticmethod
    def _overlong(raw: bytes) -> ProtocolViolation:
        return ProtocolViolation(
            f"overlong frame (no terminator in {MAX_FRAME} bytes): {_show(raw)}"
        )

    @property
    def pending(self) -> int:
        return len(self._buf)

    def reset(self) -> int:
        """Drop what is held (resynchronisation); returns the bytes dropped."""
        n = len(self._buf)
        self._buf.clear()
        self._skipping = False
        return n


# ---- replies ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class XrsIdentity:
    manufacturer: str
    model: str
    serial: str
    firmware: str
    scenario: str | None = None  # optional fifth field (simulators: the scenario played)


@dataclass(frozen=True, slots=True)
class XrsStatus:
    state: DeviceState
    dose_rate_gy_min: float
    dose_primary_gy: float
    dose_secondary_gy: float
    preset_gy: float
    beam_on_s: float
    planned_time_s: float | None
    kv: float
    ua: float
    interlocks: dict[Interlock, InterlockState]
    termination: TerminationStatus | None
    selection: int | None = None  # optional twelfth field: the selection counter


MAX_SELECTION: Final = 0xFFFF_FFFF
_COUNTER = re.compile(rb"[0-9]{1,10}")


def _expect(frame: Frame, command: Command, count: int, optional: int = 0) -> None:
    if frame.command == Command.ERROR.value:
        if (
            len(frame.fields) != 2
            or frame.fields[0] not in ERROR_CODES
            or not _TEXT.fullmatch(frame.fields[1])
        ):
            raise ProtocolViolation(f"malformed ER reply: {_show(frame.raw)}")
        raise ConsoleError(frame.fields[0].decode(), frame.fields[1].decode("ascii"))
    if frame.command != command.value:
        raise ProtocolViolation(
            f"expected a {command.value} reply, got {frame.command}: {_show(frame.raw)}"
        )
    if not count <= len(frame.fields) <= count + optional:
        need = f"{count}" if not optional else f"{count} to {count + optional}"
        raise ProtocolViolation(
            f"{command.value} reply needs {need} fields, got {len(frame.fields)}: "
            f"{_show(frame.raw)}"
        )


def _number(frame: Frame, i: int, name: str) -> float:
    raw = frame.fields[i]
    if len(raw) > 12 or not _NUMBER.fullmatch(raw):
        raise ProtocolViolation(f"{name} is not a number: {raw!r} in {_show(frame.raw)}")
    return float(raw)


def _optional_number(frame: Frame, i: int, name: str) -> float | None:
    return None if frame.fields[i] == b"-" else _number(frame, i, name)


def _text(frame: Frame, i: int, name: str) -> str:
    raw = frame.fields[i]
    if not _TEXT.fullmatch(raw):
        raise ProtocolViolation(f"{name} is not a valid text field: {raw!r} in {_show(frame.raw)}")
    return raw.decode("ascii")


def _interlocks(frame: Frame, i: int) -> dict[Interlock, InterlockState]:
    raw = frame.fields[i]
    if len(raw) != len(INTERLOCK_ORDER) or any(b not in _IL_LETTER for b in raw):
        raise ProtocolViolation(
            f"interlocks must be {len(INTERLOCK_ORDER)} letters O/T/U: {raw!r} in "
            f"{_show(frame.raw)}"
        )
    return {il: _IL_LETTER[b] for il, b in zip(INTERLOCK_ORDER, raw, strict=True)}


def decode_identity(frame: Frame) -> XrsIdentity:
    _expect(frame, Command.IDENTIFY, 4, optional=1)
    names = ("manufacturer", "model", "serial", "firmware", "scenario")
    return XrsIdentity(*(_text(frame, i, n) for i, n in enumerate(names[: len(frame.fields)])))


def decode_status(frame: Frame) -> XrsStatus:
    _expect(frame, Command.STATUS, 11, optional=1)
    state = frame.fields[0]
    if not _WORD.fullmatch(state) or state.decode() not in _WIRE_STATES:
        raise ProtocolViolation(f"unknown device state {state!r} in {_show(frame.raw)}")
    term_raw = frame.fields[10]
    termination = None
    if term_raw != b"-":
        try:
            termination = TerminationStatus(term_raw.decode("ascii"))
        except ValueError:
            raise ProtocolViolation(
                f"unknown termination status {term_raw!r} in {_show(frame.raw)}"
            ) from None
    values = {
        name: _number(frame, i, name)
        for i, name in (
            (1, "dose rate"),
            (2, "primary dose"),
            (3, "secondary dose"),
            (4, "preset"),
            (5, "beam-on time"),
            (7, "kV"),
            (8, "uA"),
        )
    }
    return XrsStatus(
        state=DeviceState(state.decode()),
        dose_rate_gy_min=values["dose rate"],
        dose_primary_gy=values["primary dose"],
        dose_secondary_gy=values["secondary dose"],
        preset_gy=values["preset"],
        beam_on_s=values["beam-on time"],
        planned_time_s=_optional_number(frame, 6, "planned time"),
        kv=values["kV"],
        ua=values["uA"],
        interlocks=_interlocks(frame, 9),
        termination=termination,
        selection=_selection(frame),
    )


def _selection(frame: Frame) -> int | None:
    """The optional twelfth ``ST`` field: absent or ``-`` when the console has none."""
    if len(frame.fields) < 12 or frame.fields[11] == b"-":
        return None
    raw = frame.fields[11]
    if not _COUNTER.fullmatch(raw) or int(raw) > MAX_SELECTION:
        raise ProtocolViolation(
            f"selection counter is not an integer 0..{MAX_SELECTION}: {raw!r} in {_show(frame.raw)}"
        )
    return int(raw)


def decode_interlocks(frame: Frame) -> dict[Interlock, InterlockState]:
    _expect(frame, Command.INTERLOCKS, 1)
    return _interlocks(frame, 0)


def decode_applicator(frame: Frame) -> ApplicatorIdentity | None:
    if frame.fields == (b"NONE",) and frame.command == Command.APPLICATOR.value:
        return None
    _expect(frame, Command.APPLICATOR, 3)
    kind = _text(frame, 0, "applicator type")
    diameter = _number(frame, 1, "applicator diameter")
    if not 0 < diameter <= MAX_DIAMETER_MM:
        raise ProtocolViolation(
            f"applicator diameter out of range (0, {MAX_DIAMETER_MM:g}] mm: {diameter} in "
            f"{_show(frame.raw)}"
        )
    return ApplicatorIdentity(type=kind, diameter_mm=diameter, serial=_text(frame, 2, "serial"))


def decode_reply(
    request: Command, frame: Frame
) -> XrsIdentity | XrsStatus | dict[Interlock, InterlockState] | ApplicatorIdentity | None:
    """The reply to ``request``, decoded; ProtocolViolation if it is not that reply."""
    if request is Command.IDENTIFY:
        return decode_identity(frame)
    if request is Command.STATUS:
        return decode_status(frame)
    if request is Command.INTERLOCKS:
        return decode_interlocks(frame)
    if request is Command.APPLICATOR:
        return decode_applicator(frame)
    if request is Command.ABORT:
        _expect(frame, Command.ABORT, 1)
        if frame.fields[0] != b"OK":
            raise ProtocolViolation(f"AB reply must be OK: {_show(frame.raw)}")
        return None
    raise ValueError(f"{request} is not a request")
