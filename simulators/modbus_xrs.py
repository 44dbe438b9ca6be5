"""The simulated console's side of XRS-MB/1 (docs/protocols.md): Modbus TCP and RTU.

Written apart from the host's side (drivers/modbus_*.py) and without pymodbus, on purpose:
two independent readings of the specification, so that a mistake in one shows up as a
failure against the other rather than hiding in shared code. Only data is shared: the
register map ``config/maps/xrs-mb1.toml``, which this module parses with its own code.

Layers, from the bottom:

* :func:`crc16_modbus`, :func:`load_map` and :func:`build_image`: pure functions (the
  CRC, the map file, a model snapshot laid out in registers);
* :class:`ModbusConsole`: sans-I/O, one request in, one reply out (PDU, MBAP frame or RTU
  frame), advancing the device once per request so that one read is one snapshot;
* :class:`RtuFramer`: finds RTU request frames in a byte stream (sans-I/O);
* :class:`ModbusTcpServer` and :class:`RtuPtyConsole`: the console on a TCP port and on a
  pseudo-terminal, with the link faults of :class:`iortd.simulators.device.SimDevice` (dropped,
  garbled, slow) and, on RTU, the time the bytes would take on a real line.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import math
import os
import random
import struct
import tomllib
import tty
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from iortd.kernel.files import FileReadError, read_small_file, toml_error
from iortd.kernel.types import DeviceIdentity, DeviceState, Interlock
from iortd.simulators.device import SimDevice
from iortd.simulators.model import ModelSnapshot

__all__ = [
    "HOLDING_WINDOW",
    "INPUT_WINDOW",
    "MapError",
    "ModbusConsole",
    "ModbusTcpServer",
    "Point",
    "RegisterMap",
    "RtuFramer",
    "RtuPtyConsole",
    "build_image",
    "crc16_modbus",
    "default_map_path",
    "line_time_s",
    "load_map",
]

# The readable windows of XRS-MB/1 (docs/protocols.md, "Exception responses"): a read that
# touches any register outside them is answered with exception 02. The map lays points out
# inside them; registers without a point read 0.
INPUT_WINDOW = range(0, 40)  # function 04
HOLDING_WINDOW = range(100, 172)  # function 03
MAX_COUNT = 125  # registers per read (Modbus limit for 03/04)

READ_HOLDING = 0x03
READ_INPUT = 0x04
ILLEGAL_FUNCTION = 0x01
ILLEGAL_ADDRESS = 0x02
ILLEGAL_VALUE = 0x03
GATEWAY_NO_RESPONSE = 0x0B

BITS_PER_CHAR = 11  # RTU: start + 8 data + parity + stop (8E1), or 8N2
MBAP_LEN = 7
MAX_MBAP_LENGTH = 254  # unit id + the largest PDU (253 bytes)
MAX_RTU_FRAME = 256
WRITE_BUFFER_LIMIT = 64 * 1024  # a client that never reads is dropped past this

# ---- CRC-16/MODBUS -------------------------------------------------------------------


def _crc_table() -> tuple[int, ...]:
    out = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xA001 if c & 1 else c >> 1
        out.append(c)
    return tuple(out)


_CRC_TABLE = _crc_table()


def crc16_modbus(data: bytes) -> int:
    """CRC-16/MODBUS (reflected polynomial 0xA001, initial 0xFFFF), table-driven.
    Check value: ``crc16_modbus(b"123456789") == 0x4B37``. On the wire: low byte first."""
    crc = 0xFFFF
    for b in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ b) & 0xFF]
    return crc


def _crc_ok(frame: bytes | bytearray) -> bool:
    return crc16_modbus(bytes(frame[:-2])) == int.from_bytes(frame[-2:], "little")


def _with_crc(frame: bytes) -> bytes:
    return frame + crc16_modbus(frame).to_bytes(2, "little")


def line_time_s(n_bytes: int, baudrate: int) -> float:
    """Seconds ``n_bytes`` take on an RTU line at ``baudrate`` (0: no line time)."""
    return n_bytes * BITS_PER_CHAR / baudrate if baudrate > 0 else 0.0


# ---- the register map (this module's own reading of the map format) ----------------


class MapError(ValueError):
    """A register map this simulator cannot serve; the message names file, point, key."""


_TYPES = {"u16": 1, "i16": 1, "u32": 2, "i32": 2, "f32": 2, "string": 0}
_RANGES = {
    "u16": (0, 0xFFFF),
    "i16": (-0x8000, 0x7FFF),
    "u32": (0, 0xFFFFFFFF),
    "i32": (-0x80000000, 0x7FFFFFFF),
}
# How many of the daemon's units (Gy, Gy/min, s, kV, uA, mm) one map unit is.
_UNITS: Mapping[str, float] = {
    "Gy": 1.0,
    "cGy": 0.01,
    "mGy": 0.001,
    "Gy/min": 1.0,
    "cGy/min": 0.01,
    "mGy/min": 0.001,
    "Gy/s": 60.0,
    "mGy/s": 0.06,
    "s": 1.0,
    "ms": 0.001,
    "min": 60.0,
    "kV": 1.0,
    "V": 0.001,
    "uA": 1.0,
    "mA": 1000.0,
    "mm": 1.0,
    "cm": 10.0,
    "%": 1.0,
}
_POINT_KEYS = frozenset(
    {"name", "table", "address", "type", "scale", "unit", "word_order", "bit", "missing"}
    | {"values", "length"}
)
_TOP_KEYS = frozenset({"format", "name", "description", "word_order", "values", "point"})
MAP_FORMAT = "iortd-register-map/1"


@dataclass(frozen=True, slots=True)
class Point:
    name: str
    table: str  # "input" | "holding"
    address: int
    type: str
    size: int  # registers
    scale: float = 1.0
    unit_factor: float = 1.0  # daemon units per map unit
    big_endian_words: bool = True
    bit: int | None = None
    missing: int | None = None
    values: Mapping[str, int] | None = None  # meaning -> raw (inverted value table)


@dataclass(frozen=True, slots=True)
class RegisterMap:
    name: str
    points: tuple[Point, ...]


def default_map_path() -> Path:
    return Path(str(importlib.resources.files("iortd.config") / "maps" / "xrs-mb1.toml"))


def _int(where: str, raw: object, lo: int, hi: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not lo <= raw <= hi:
        raise MapError(f"{where}: expected an integer in {lo}..{hi}, got {raw!r}")
    return raw


def load_map(path: Path) -> RegisterMap:
    """Read a register map file (format ``iortd-register-map/1``) for serving."""
    raw = b""
    try:
        raw = read_small_file(path)
        data = tomllib.loads(raw.decode("utf-8"))
    except FileReadError as exc:
        raise MapError(f"{path}: cannot read: {exc.reason}") from None
    except UnicodeDecodeError as exc:
        raise MapError(f"{path}: cannot read: {exc}") from None
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise MapError(f"{path}: not valid TOML: {toml_error(exc, raw)}") from None
    if unknown := set(data) - _TOP_KEYS:
        raise MapError(f"{path}: unknown key(s) {sorted(unknown)}")
    if data.get("format") != MAP_FORMAT:
        raise MapError(f"{path}: key 'format': expected {MAP_FORMAT!r}, got {data.get('format')!r}")
    default_order = data.get("word_order", "big")
    if default_order not in ("big", "little"):
        raise MapError(f"{path}: key 'word_order': expected 'big' or 'little'")
    tables: dict[str, dict[str, int]] = {}
    raw_tables = data.get("values", {})
    if not isinstance(raw_tables, dict):
        raise MapError(f"{path}: key 'values': expected tables of raw value = meaning")
    for tname, table in raw_tables.items():
        if not isinstance(table, dict):
            raise MapError(f"{path}: values.{tname}: expected a table")
        inverted: dict[str, int] = {}
        for raw, meaning in table.items():
            try:
                code = int(raw)
            except ValueError:
                raise MapError(f"{path}: values.{tname}: key {raw!r} is not an integer") from None
            inverted.setdefault(str(meaning), code)
        tables[tname] = inverted
    points = []
    raw_points = data.get("point", [])
    if not isinstance(raw_points, list):
        raise MapError(f"{path}: key 'point': expected [[point]] tables")
    for i, raw in enumerate(raw_points):
        points.append(_point(f"{path}: point[{i}]", raw, tables, default_order))
    _check_layout(path, points)
    return RegisterMap(str(data.get("name", path.stem)), tuple(points))


def _point(
    where: str, raw: object, tables: Mapping[str, Mapping[str, int]], default_order: str
) -> Point:
    if not isinstance(raw, dict):
        raise MapError(f"{where}: expected a table")
    if unknown := set(raw) - _POINT_KEYS:
        raise MapError(f"{where}: unknown key(s) {sorted(unknown)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise MapError(f"{where}.name: expected a point name")
    where = f"{where} ({name})"
    table = raw.get("table")
    if table not in ("input", "holding"):
        raise MapError(f"{where}.table: expected 'input' or 'holding', got {table!r}")
    typ = raw.get("type")
    if typ not in _TYPES:
        raise MapError(f"{where}.type: expected one of {sorted(_TYPES)}, got {typ!r}")
    size = _TYPES[typ]
    if typ == "string":
        size = _int(f"{where}.length", raw.get("length"), 1, MAX_COUNT)
    elif "length" in raw:
        raise MapError(f"{where}.length: only for strings")
    address = _int(f"{where}.address", raw.get("address"), 0, 0xFFFF)
    scale = raw.get("scale", 1)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
        raise MapError(f"{where}.scale: expected a number > 0, got {scale!r}")
    unit = raw.get("unit")
    if unit is not None and unit not in _UNITS:
        raise MapError(f"{where}.unit: unknown unit {unit!r} (known: {', '.join(_UNITS)})")
    order = raw.get("word_order", default_order)
    if order not in ("big", "little") or ("word_order" in raw and size != 2):
        raise MapError(f"{where}.word_order: 'big' or 'little', 32-bit types only")
    bit = raw.get("bit")
    if bit is not None:
        if typ != "u16":
            raise MapError(f"{where}.bit: only for u16 points")
        bit = _int(f"{where}.bit", bit, 0, 15)
    missing = raw.get("missing")
    if missing is not None:  # the raw register contents, unsigned (0x8000 for an i16)
        if typ == "string":
            raise MapError(f"{where}.missing: not for strings")
        missing = _int(f"{where}.missing", missing, 0, (1 << (16 * size)) - 1)
    values = None
    if "values" in raw:
        if raw["values"] not in tables:
            raise MapError(f"{where}.values: no value table {raw['values']!r}")
        values = tables[raw["values"]]
    return Point(
        name=name,
        table=table,
        address=address,
        type=typ,
        size=size,
        scale=float(scale),
        unit_factor=_UNITS[unit] if unit is not None else 1.0,
        big_endian_words=order == "big",
        bit=bit,
        missing=missing,
        values=values,
    )


def _check_layout(path: Path, points: list[Point]) -> None:
    used: dict[tuple[str, int], str] = {}
    for p in points:
        window = INPUT_WINDOW if p.table == "input" else HOLDING_WINDOW
        if p.address < window.start or p.address + p.size > window.stop:
            raise MapError(
                f"{path}: point {p.name!r}: registers {p.address}..{p.address + p.size - 1} "
                f"are outside the {p.table} window {window.start}..{window.stop - 1} of XRS-MB/1"
            )
        if p.bit is not None:
            continue  # several bit points may share one register
        for a in range(p.address, p.address + p.size):
            if (other := used.get((p.table, a))) is not None:
                raise MapError(f"{path}: point {p.name!r} overlaps {other!r} at {p.table} {a}")
            used[(p.table, a)] = p.name


# ---- a snapshot laid out in registers ------------------------------------------------


def point_values(
    snap: ModelSnapshot, identity: DeviceIdentity, scenario_note: str
) -> dict[str, float | str | None]:
    """What each point name means for this snapshot, in the daemon's units (numbers),
    as a value-table meaning (enumerations), or text. ``None``: not reported."""
    state = snap.state if snap.state is not DeviceState.UNKNOWN else DeviceState.FAULT
    app = snap.applicator
    expected = snap.expected_rate_gy_min
    deviation = 0.0
    if snap.state is DeviceState.IRRADIATING and expected:
        deviation = (snap.dose_rate_gy_min / expected - 1.0) * 100.0
    out: dict[str, float | str | None] = {
        "state": state.value,
        "termination": snap.termination.value if snap.termination is not None else "NONE",
        "dose_rate": snap.dose_rate_gy_min,
        "dose_primary": snap.dose_primary_gy,
        "dose_secondary": snap.dose_secondary_gy,
        "preset": snap.preset_gy,
        "beam_on_time": snap.beam_on_s,
        "planned_time": (snap.preset_gy / expected * 60.0 if expected and snap.preset_gy else None),
        "kv": snap.kv,
        "ua": snap.ua,
        "applicator.type": app.type if app is not None else "NONE",
        "applicator.diameter": app.diameter_mm if app is not None else 0.0,
        "applicator.serial": app.serial if app is not None else "",
        "extra.rate_deviation": deviation,
        "selection": float(snap.selection),
        "identity.manufacturer": identity.manufacturer,
        "identity.model": identity.model,
        "identity.serial": identity.serial,
        "identity.firmware": identity.firmware,
        "identity.scenario": scenario_note,
    }
    for lock in Interlock:
        if lock is not Interlock.COMMUNICATION:  # the host's own, never on the wire
            state_of = snap.interlocks.get(lock)
            out[f"interlock.{lock.value}"] = state_of.value if state_of is not None else "unknown"
    return out


def _words(point: Point, value: float | str | None) -> list[int]:
    """The registers of one point for one value."""
    typ = point.type
    if typ == "string":
        text = "" if value is None else str(value)
        raw = bytes(ord(c) if 0x20 <= ord(c) <= 0x7E else 0x3F for c in text)
        raw = raw[: 2 * point.size].ljust(2 * point.size, b"\0")
        return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    if point.values is not None:
        table = point.values
        meaning = str(value)
        code = table.get(meaning)
        if code is None:  # e.g. a profile's applicator type the map does not list
            lowered = {k.lower(): v for k, v in table.items()}
            code = lowered.get(meaning.lower(), _RANGES.get(typ, (0, 0xFFFF))[1])
        number: int = code
    elif value is None or isinstance(value, str):
        if point.missing is not None:  # not reported: the sentinel's raw bits
            if point.size == 1:
                return [point.missing]
            hi, lo = point.missing >> 16, point.missing & 0xFFFF
            return [hi, lo] if point.big_endian_words else [lo, hi]
        number = 0
    elif typ == "f32":
        word = struct.pack(">f", value / point.unit_factor / point.scale)
        hi, lo = struct.unpack(">HH", word)
        return [hi, lo] if point.big_endian_words else [lo, hi]
    else:
        scaled = value / point.unit_factor / point.scale
        number = round(scaled) if math.isfinite(scaled) else 0
    lo_lim, hi_lim = _RANGES.get(typ, (0, 0xFFFF))
    number = max(lo_lim, min(hi_lim, number))
    if point.bit is not None:
        return [(1 << point.bit) if number else 0]
    if point.size == 1:
        return [number & 0xFFFF]
    raw32 = number & 0xFFFFFFFF
    hi, lo = raw32 >> 16, raw32 & 0xFFFF
    return [hi, lo] if point.big_endian_words else [lo, hi]


def build_image(
    regmap: RegisterMap,
    snap: ModelSnapshot,
    identity: DeviceIdentity,
    scenario_note: str = "",
) -> dict[str, dict[int, int]]:
    """The registers of one snapshot: ``{"input": {address: raw}, "holding": {...}}``.
    Registers of the windows that no point uses are absent (they read 0)."""
    values = point_values(snap, identity, scenario_note)
    image: dict[str, dict[int, int]] = {"input": {}, "holding": {}}
    for point in regmap.points:
        value = values.get(point.name)  # an extra.* this simulator does not know: 0
        regs = image[point.table]
        for offset, word in enumerate(_words(point, value)):
            a = point.address + offset
            regs[a] = (regs.get(a, 0) | word) if point.bit is not None else word
    return image


# ---- requests and replies (sans-I/O) -------------------------------------------------


def _exception(function: int, code: int) -> bytes:
    return bytes([(function | 0x80) & 0xFF, code])


class ModbusConsole:
    """One simulated console answering Modbus requests from its register map."""

    def __init__(self, device: SimDevice, regmap: RegisterMap, unit_id: int = 1) -> None:
        if not 1 <= unit_id <= 247:
            raise ValueError(f"unit id must be in 1..247, got {unit_id}")
        self.device = device
        self.regmap = regmap
        self.unit_id = unit_id

    @property
    def requests(self) -> int:
        return self.device.requests

    def _tick(self) -> ModelSnapshot:
        self.device.requests += 1
        return self.device.advance()

    def pdu_reply(self, pdu: bytes) -> bytes:
        """The response PDU to a request PDU addressed to this console."""
        snap = self._tick()  # once per request: the whole read is one snapshot
        if not pdu:
            return _exception(0, ILLEGAL_FUNCTION)
        function = pdu[0]
        if function not in (READ_HOLDING, READ_INPUT):
            return _exception(function, ILLEGAL_FUNCTION)
        if len(pdu) != 5:
            return _exception(function, ILLEGAL_VALUE)
        start, count = struct.unpack(">HH", pdu[1:5])
        if not 1 <= count <= MAX_COUNT:
            return _exception(function, ILLEGAL_VALUE)
        window = INPUT_WINDOW if function == READ_INPUT else HOLDING_WINDOW
        if start < window.start or start + count > window.stop:
            return _exception(function, ILLEGAL_ADDRESS)
        table = "input" if function == READ_INPUT else "holding"
        regs = build_image(self.regmap, snap, self.device.identity(), self.device.scenario_note())
        words = [regs[table].get(a, 0) for a in range(start, start + count)]
        return bytes([function, 2 * count]) + struct.pack(f">{count}H", *words)

    def tcp_reply(self, adu: bytes) -> bytes:
        """The reply frame to one complete MBAP frame (header already checked)."""
        tid, _, _, unit = struct.unpack(">HHHB", adu[:MBAP_LEN])
        pdu = adu[MBAP_LEN:]
        if unit != self.unit_id:
            self._tick()
            reply = _exception(pdu[0] if pdu else 0, GATEWAY_NO_RESPONSE)
        else:
            reply = self.pdu_reply(pdu)
        return struct.pack(">HHHB", tid, 0, len(reply) + 1, unit) + reply

    def rtu_reply(self, frame: bytes) -> bytes | None:
        """The reply to one RTU frame (``None``: not answered: another address, a
        broadcast, or a bad CRC)."""
        if len(frame) < 4 or not _crc_ok(frame):
            return None
        if frame[0] != self.unit_id:
            return None
        return _with_crc(bytes([self.unit_id]) + self.pdu_reply(frame[1:-2]))


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
                if len(buf) >= 4 and _crc_ok(buf):
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
            if _crc_ok(candidate):
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
            if n is not None and len(buf) >= k + n and _crc_ok(buf[k : k + n]):
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


# ---- link faults ---------------------------------------------------------------------


class _Noise:
    """Seeded line noise, so that a garbled run can be reproduced."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)  # noqa: S311 - seeded noise, reproducible

    def random_bytes(self, lo: int, hi: int) -> bytes:
        n = self.rng.randint(lo, hi)
        return bytes(self.rng.randrange(256) for _ in range(n))

    def tcp(self, reply: bytes) -> bytes:
        """Garbage for a TCP reply: half the time a plausible MBAP header (the request's
        transaction id, length matching) around random PDU bytes; else a broken header
        (wrong protocol id or length) or bytes without any header."""
        roll = self.rng.random()
        body = self.random_bytes(1, 60)
        if roll < 0.5:
            return reply[:4] + struct.pack(">HB", len(body) + 1, reply[6]) + body
        if roll < 0.8:
            bad = struct.pack(">HHHB", self.rng.randrange(0x10000), 0x1234, 0xFFF0, reply[6])
            return bad + body
        return body


class _Sender:
    """Writes replies in order, each held back for its delay (slow console, line time)
    but never before the previous one has gone; pending writes are cancelled on close,
    so nothing is written into a closed (or reused) descriptor."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self._loop = asyncio.get_running_loop()
        self._free_at = 0.0
        self._pending: set[asyncio.TimerHandle] = set()

    def send(self, data: bytes, hold_s: float) -> None:
        now = self._loop.time()
        at = max(now + hold_s, self._free_at)
        self._free_at = at
        if at <= now:
            self._write(data)
            return

        def fire() -> None:
            self._pending.discard(handle)
            self._write(data)

        handle = self._loop.call_at(at, fire)
        self._pending.add(handle)

    def cancel(self) -> None:
        for handle in self._pending:
            handle.cancel()
        self._pending.clear()


def _link(device: SimDevice, reply: bytes, garble: Callable[[bytes], bytes]) -> bytes | None:
    """The reply as the link delivers it now (``None``: nothing arrives)."""
    if device.link_down():
        return None  # the cable is pulled: the request goes nowhere
    if device.garbled():
        return garble(reply)
    return reply


# ---- Modbus TCP ----------------------------------------------------------------------


class _TcpConnection(asyncio.Protocol):
    def __init__(self, server: ModbusTcpServer) -> None:
        self._server = server
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._sender: _Sender | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, asyncio.Transport):  # pragma: no cover - TCP only
            raise TypeError(f"expected a stream transport, got {transport!r}")
        self._transport = transport
        self._sender = _Sender(self._write)
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
            reply = _link(console.device, console.tcp_reply(adu), self._server.noise.tcp)
            if reply is not None and self._sender is not None:
                self._sender.send(reply, console.device.reply_delay_s())


class ModbusTcpServer:
    """The console on a TCP port (``port=0``: a free one), several clients at once."""

    def __init__(
        self, console: ModbusConsole, *, host: str = "127.0.0.1", port: int = 0, seed: int = 0
    ) -> None:
        self.console = console
        self.host = host
        self.port = port
        self.noise = _Noise(0x3B0D ^ seed)
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


# ---- Modbus RTU on a pty -------------------------------------------------------------


class RtuPtyConsole:
    """The console on a pseudo-terminal, as RTU slave: :attr:`device` is the path a
    driver opens like a real serial port.

    A pty moves bytes at memory speed whatever baud rate is set on it, so the time a real
    line takes is modelled: each reply is held for the time the request and the reply
    would take on the wire, ``(request + reply bytes) x 11 bits / baudrate`` (11 bits a
    character: 8E1), e.g. 53 ms for a 40-register read at 19200 baud. ``baudrate=0``
    turns the model off (benchmarks)."""

    def __init__(self, console: ModbusConsole, *, baudrate: int = 19200, seed: int = 0) -> None:
        if baudrate < 0:
            raise ValueError(f"baudrate must be >= 0, got {baudrate}")
        self.console = console
        self.baudrate = baudrate
        self.framer = RtuFramer()
        self.noise = _Noise(0x5A7E ^ seed)
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # a fresh pty is cooked: no echo, no CR/LF translation
        tty.setraw(self._master)
        self.device = os.ttyname(self._slave)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sender: _Sender | None = None
        self._idle: asyncio.TimerHandle | None = None
        # Silence that ends a frame: 3.5 characters (Modbus), but at least 50 ms, since a
        # loaded machine can split one write to a pty into reads a few ms apart.
        self.idle_s = max(3.5 * line_time_s(1, baudrate), 0.05)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sender = _Sender(self._write)
        os.set_blocking(self._master, False)
        self._loop.add_reader(self._master, self._readable)

    def where(self) -> dict[str, object]:
        return {"device": self.device, "unit_id": self.console.unit_id, "baudrate": self.baudrate}

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
            reply = self.console.rtu_reply(frame)
            if reply is None:
                continue
            device = self.console.device
            out = _link(device, reply, lambda _r: self.noise.random_bytes(1, 40))
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
