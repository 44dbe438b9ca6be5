"""Register maps: where a Modbus device keeps each value, as data (TOML), not code.

The format (``format = "iortd-register-map/1"``) is specified in docs/protocols.md,
"Register maps"; config/maps/xrs-mb1.toml is the reference console's. :func:`load_map`
checks a map completely, before any device is touched, and names the file, the point and
the key of every problem. Decoding registers into values is sans-I/O
(:meth:`RegisterMap.decode`), locked by golden vectors in tests/unit/test_modbus_map.py.

What a map may name is a :class:`Vocabulary`: a table of point names, each with its
:class:`PointKind` (wire types, units, value-table meanings, whether it is required, may be
"not available", may be one bit of a status word, the register table it lives in). The
format's rules are this module's and the same for every kind of device; the vocabulary is
data. :data:`XRS_MB1` (a source console: doses, kV, interlocks, ...) is the default;
drivers/apl_map.py holds the applicator reader's.

Fail-safe reading: a value-table entry that is not listed reads as UNKNOWN (a state the
tracker treats as FAULT, an interlock that counts as tripped), never as a plausible value;
a float that is not finite is a protocol violation.
"""

from __future__ import annotations

import importlib.resources
import math
import re
import struct
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

from iortd.drivers.errors import ProtocolViolation
from iortd.drivers.modbus_codec import MAX_READ, Table
from iortd.kernel.files import FileReadError, read_small_file, toml_error

__all__ = [
    "INTERLOCK_POINTS",
    "MAP_FORMAT",
    "NUMERIC",
    "STRING",
    "XRS_MB1",
    "Block",
    "MapError",
    "Point",
    "PointKind",
    "RegisterMap",
    "Vocabulary",
    "load_map",
    "resolve_map",
]

MAP_FORMAT: Final = "iortd-register-map/1"

# The wire types and how many registers each takes (a string: its ``length``).
_TYPES: Final = MappingProxyType({"u16": 1, "i16": 1, "u32": 2, "i32": 2, "f32": 2, "string": 0})
NUMERIC: Final = frozenset({"u16", "i16", "u32", "i32", "f32"})
STRING: Final = frozenset({"string"})
_EXTRA = re.compile(r"^extra\.[a-z][a-z0-9_]{0,31}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_MEANING = re.compile(r"^[A-Za-z][A-Za-z0-9_./-]{0,31}$")
_POINT_KEYS: Final = frozenset(
    {"name", "table", "address", "type", "scale", "unit", "word_order", "bit", "missing"}
    | {"values", "length"}
)
_TOP_KEYS: Final = frozenset({"format", "name", "description", "word_order", "values", "point"})


@dataclass(frozen=True, slots=True)
class PointKind:
    """What a map may say about one point name: a row of a :class:`Vocabulary`.

    The format's own rules hold for every kind: a string is ``type = "string"`` with a
    ``length``; an enumerated point (``enumerated``) is u16 or u32 and names a value table,
    without scale or unit; a ``counter`` is u16 or u32 without scale or unit; a physical
    quantity (``units``) needs one of its units and a positive scale; a point with neither
    (``extra.*``) is recorded as read, in the unit the map gives it.
    """

    types: frozenset[str] = NUMERIC  # the wire types it may have
    units: Mapping[str, float] | None = None  # unit -> factor to the daemon's unit
    enumerated: bool = False
    meanings: frozenset[str] | None = None  # enumerated: what a value may mean (None: any word)
    must_mean: frozenset[str] = frozenset()  # enumerated: what its table must list
    counter: bool = False
    bit: bool = False  # may be one flag of a status word (u16)
    missing: Literal["never", "allowed", "required"] = "never"  # a "not available" value
    required: bool = False  # every map of this vocabulary has it
    signed: bool = False  # a physical quantity that may be negative (the device's sign)
    table: Table | None = None  # the register table it is read from (None: either)
    needs: tuple[str, ...] = ()  # points that must be mapped with it


@dataclass(frozen=True, slots=True)
class Vocabulary:
    """The point names a kind of device's maps may use, each with its :class:`PointKind`;
    ``extra`` is the kind of every ``extra.<word>`` point. ``listed_in`` and ``bit_for``
    complete two messages: where the names are listed, and which points may be a bit."""

    name: str
    points: Mapping[str, PointKind]
    extra: PointKind
    listed_in: str
    bit_for: str

    def kind(self, name: str) -> PointKind | None:
        kind = self.points.get(name)
        if kind is None and _EXTRA.fullmatch(name):
            return self.extra
        return kind


# ---- XRS-MB/1: a source console (docs/protocols.md, "Register maps") --------------------

# What each physical point is measured in, inside the daemon, and the units a map may use
# for it (with the factor to the daemon's unit).
_DOSE = MappingProxyType({"Gy": 1.0, "cGy": 0.01, "mGy": 0.001})
_RATE = MappingProxyType(
    {"Gy/min": 1.0, "cGy/min": 0.01, "mGy/min": 0.001, "Gy/s": 60.0, "mGy/s": 0.06}
)
_TIME = MappingProxyType({"s": 1.0, "ms": 0.001, "min": 60.0})
INTERLOCK_POINTS: Final = (
    *("door", "emergency_stop", "applicator", "kv", "ua", "cooling", "dose_channels"),
    *("dose_rate", "backup_timer"),
)
# What the daemon accepts as a value-table meaning, per enumerated point.
_STATES: Final = frozenset(
    {"OFF", "SELF_TEST", "STANDBY", "PREPARATORY", "READY", "IRRADIATING", "INTERRUPTED"}
    | {"TERMINATED", "FAULT", "EMERGENCY_STOP"}
)
_INTERLOCK = PointKind(
    enumerated=True,
    meanings=frozenset({"ok", "tripped", "unknown"}),
    must_mean=frozenset({"ok", "tripped"}),
    bit=True,
)
_TEXT = PointKind(types=STRING)
XRS_MB1: Final = Vocabulary(
    name="XRS-MB/1",
    points=MappingProxyType(
        {
            # The required points first, in the order a message lists the missing ones.
            "state": PointKind(enumerated=True, meanings=_STATES, required=True),
            "dose_rate": PointKind(units=_RATE, required=True),
            "dose_primary": PointKind(units=_DOSE, required=True),
            "dose_secondary": PointKind(units=_DOSE, required=True),
            "preset": PointKind(units=_DOSE, required=True),
            "beam_on_time": PointKind(units=_TIME, required=True),
            "kv": PointKind(units=MappingProxyType({"kV": 1.0, "V": 0.001}), required=True),
            "ua": PointKind(
                units=MappingProxyType({"uA": 1.0, "µA": 1.0, "mA": 1000.0}), required=True
            ),
            "planned_time": PointKind(units=_TIME, missing="allowed"),
            "termination": PointKind(
                enumerated=True,
                meanings=frozenset({"NONE", "NORMAL", "OPERATOR", "MACHINE", "UNKNOWN"}),
            ),
            **{f"interlock.{i}": _INTERLOCK for i in INTERLOCK_POINTS},
            # Free text (the applicator's type), or NONE.
            "applicator.type": PointKind(enumerated=True, needs=("applicator.diameter",)),
            "applicator.diameter": PointKind(units=MappingProxyType({"mm": 1.0, "cm": 10.0})),
            "applicator.serial": _TEXT,
            "selection": PointKind(counter=True, missing="allowed"),  # the selection counter
            **{
                f"identity.{k}": _TEXT
                for k in ("manufacturer", "model", "serial", "firmware", "scenario")
            },
        }
    ),
    extra=PointKind(missing="allowed"),
    listed_in="docs/protocols.md",
    bit_for="an interlock (a flag of a status word)",
)


class MapError(ValueError):
    """A register map that cannot be used; the message names file, point and key."""


@dataclass(frozen=True, slots=True)
class Point:
    name: str
    table: Table
    address: int
    type: str
    count: int  # registers
    scale: float = 1.0
    unit: str | None = None
    factor: float = 1.0  # from the map's unit to the daemon's
    word_order: str = "big"
    bit: int | None = None
    missing: int | None = None
    values: Mapping[int, str] | None = None

    @property
    def end(self) -> int:
        return self.address + self.count


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: ``count`` registers of ``table`` from ``address``."""

    table: Table
    address: int
    count: int
    points: tuple[Point, ...]


@dataclass(frozen=True, slots=True)
class RegisterMap:
    name: str
    description: str
    path: str
    points: Mapping[str, Point]
    telemetry: tuple[Block, ...] = field(default=())  # read at every poll
    identity: tuple[Block, ...] = field(default=())  # read once after connecting

    def decode(self, blocks: Sequence[Block], data: Sequence[Sequence[int]]) -> dict[str, Any]:
        """The values of every point in ``blocks``, given each block's registers. Strings
        are text, enumerated points their value-table meaning (``"UNKNOWN"`` for a raw value
        not listed), numbers in the daemon's units, ``None`` for a ``missing`` value."""
        out: dict[str, Any] = {}
        for block, regs in zip(blocks, data, strict=True):
            if len(regs) != block.count:
                raise ProtocolViolation(f"{len(regs)} registers for a block of {block.count}")
            for p in block.points:
                start = p.address - block.address
                out[p.name] = _decode(p, regs[start : start + p.count])
        return out


def _word(regs: Sequence[int], i: int) -> int:
    value = regs[i]
    if not 0 <= value <= 0xFFFF:
        raise ProtocolViolation(f"register value {value} is not 16 bits")
    return value


def _decode(p: Point, regs: Sequence[int]) -> Any:
    if p.type == "string":
        raw = b"".join(_word(regs, i).to_bytes(2, "big") for i in range(p.count))
        text = raw.split(b"\x00", 1)[0]
        try:
            s = text.decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolViolation(f"{p.name}: not ASCII text: {raw!r}") from None
        if not s.isprintable():
            raise ProtocolViolation(f"{p.name}: not printable text: {s!r}")
        return s.strip()
    # ``missing`` is compared with the register contents as on the wire (unsigned), the
    # same way for every type: 0x8000 for an i16, 0xFFFFFFFF for an i32 or f32.
    if p.count == 1:
        raw_bits = _word(regs, 0)
        if p.bit is not None:
            raw_bits = (raw_bits >> p.bit) & 1
        if p.missing is not None and raw_bits == p.missing:
            return None
        raw_int = raw_bits - 0x10000 if p.type == "i16" and raw_bits & 0x8000 else raw_bits
    else:
        hi, lo = _word(regs, 0), _word(regs, 1)
        if p.word_order == "little":
            hi, lo = lo, hi
        packed = (hi << 16) | lo
        if p.missing is not None and packed == p.missing:
            return None
        if p.type == "f32":
            value = struct.unpack(">f", packed.to_bytes(4, "big"))[0]
            if not math.isfinite(value):
                raise ProtocolViolation(f"{p.name}: not a finite number ({packed:#010x})")
            return _finite(p, value * p.scale * p.factor)
        raw_int = packed - (1 << 32) if p.type == "i32" and packed & 0x8000_0000 else packed
    if p.values is not None:
        return p.values.get(raw_int, "UNKNOWN")
    return _finite(p, raw_int * p.scale * p.factor)


def _finite(p: Point, value: float) -> float:
    if not math.isfinite(value):
        raise ProtocolViolation(f"{p.name}: {value} after scaling")
    return value


# ---- loading ---------------------------------------------------------------------------


def resolve_map(name_or_path: str) -> Path:
    """A map file: a path, or the name of a bundled map (config/maps/NAME.toml).

    A value with a ``/`` or ending in ``.toml`` is a path; a bare word is a bundled name,
    whatever files the current directory holds (the daemon's config loader has already
    made a relative path absolute against the config file's directory).
    """
    path = Path(name_or_path)
    if path.suffix == ".toml" or "/" in name_or_path:
        return path
    return Path(str(importlib.resources.files("iortd.config") / "maps" / f"{name_or_path}.toml"))


def load_map(path: Path, vocabulary: Vocabulary = XRS_MB1) -> RegisterMap:
    """A register map, checked completely against the format and ``vocabulary``'s point
    names; every problem is a :class:`MapError` naming the file, the point and the key."""
    raw = b""
    try:
        raw = read_small_file(path)
        data = tomllib.loads(raw.decode("utf-8"))
    except FileReadError as exc:
        if exc.missing:
            raise MapError(f"{path}: no such register map") from None
        raise MapError(f"{path}: cannot read: {exc.reason}") from None
    except UnicodeDecodeError as exc:
        raise MapError(f"{path}: cannot read: {exc}") from None
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise MapError(f"{path}: not valid TOML: {toml_error(exc, raw)}") from None
    return _parse(path, data, vocabulary)


_Fail = Callable[[str, str], MapError]  # (where, what) -> the error naming the file


def _parse(path: Path, data: dict[str, Any], vocabulary: Vocabulary) -> RegisterMap:
    def fail(where: str, msg: str) -> MapError:
        return MapError(f"{path}: {where}: {msg}")

    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise fail(unknown[0], f"unknown key (a map has: {', '.join(sorted(_TOP_KEYS))})")
    if data.get("format") != MAP_FORMAT:
        raise fail("format", f"expected {MAP_FORMAT!r}; got {data.get('format')!r}")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise fail("name", f"expected lower-case letters, digits and '-'; got {name!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise fail("description", "expected a string")
    default_order = data.get("word_order", "big")
    if default_order not in ("big", "little"):
        raise fail("word_order", f"expected 'big' or 'little'; got {default_order!r}")
    tables = _value_tables(data.get("values", {}), fail)
    raw_points = data.get("point")
    if not isinstance(raw_points, list) or not raw_points:
        raise fail("point", "expected one or more [[point]] tables")
    points: dict[str, Point] = {}
    for i, raw in enumerate(raw_points):
        p = _point(raw, f"point[{i}]", default_order, tables, vocabulary, fail)
        if p.name in points:
            raise fail(f"point[{i}].name", f"{p.name!r} is mapped twice")
        points[p.name] = p
    missing = [n for n, k in vocabulary.points.items() if k.required and n not in points]
    if missing:
        raise fail("point", f"required point(s) missing: {', '.join(missing)}")
    for p in points.values():
        kind = vocabulary.kind(p.name)
        for other in kind.needs if kind is not None else ():
            if other not in points:
                raise fail("point", f"{p.name} is mapped without {other}")
    _check_overlaps(list(points.values()), fail)
    telemetry = _blocks([p for p in points.values() if not p.name.startswith("identity.")])
    identity = _blocks([p for p in points.values() if p.name.startswith("identity.")])
    return RegisterMap(
        name, description, str(path), MappingProxyType(points), tuple(telemetry), tuple(identity)
    )


def _value_tables(raw: Any, fail: _Fail) -> dict[str, Mapping[int, str]]:
    if not isinstance(raw, dict):
        raise fail("values", "expected tables of raw value = meaning")
    out: dict[str, Mapping[int, str]] = {}
    for tname, table in raw.items():
        if not isinstance(table, dict) or not table:
            raise fail(f"values.{tname}", "expected a table of raw value = meaning")
        entries: dict[int, str] = {}
        for key, meaning in table.items():
            if not re.fullmatch(r"\d{1,10}", key) or int(key) > 0xFFFF_FFFF:
                raise fail(f"values.{tname}.{key}", "keys are raw register values (0-4294967295)")
            if int(key) in entries:
                raise fail(f"values.{tname}.{key}", f"raw value {int(key)} is listed twice")
            if not isinstance(meaning, str) or not _MEANING.fullmatch(meaning):
                raise fail(
                    f"values.{tname}.{key}",
                    f"expected a word (letters, digits, '_', '.', '/', '-'); got {meaning!r}",
                )
            entries[int(key)] = meaning
        out[tname] = MappingProxyType(entries)
    return out


def _int(raw: dict[str, Any], key: str, where: str, lo: int, hi: int, fail: _Fail) -> int:
    v = raw.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise fail(f"{where}.{key}", f"expected an integer {lo}..{hi}; got {v!r}")
    return v


def _point(
    raw: Any,
    where: str,
    default_order: str,
    tables: Mapping[str, Mapping[int, str]],
    vocabulary: Vocabulary,
    fail: _Fail,
) -> Point:
    if not isinstance(raw, dict):
        raise fail(where, "expected a table")
    name = raw.get("name")
    if not isinstance(name, str):
        raise fail(f"{where}.name", f"expected a point name; got {name!r}")
    where = f"{where} ({name})"
    kind = vocabulary.kind(name)
    if kind is None:
        raise fail(f"{where}.name", f"unknown point name ({vocabulary.listed_in} lists them)")
    unknown = sorted(set(raw) - _POINT_KEYS)
    if unknown:
        raise fail(f"{where}.{unknown[0]}", "unknown key")
    table = raw.get("table")
    if table not in ("input", "holding"):
        raise fail(f"{where}.table", f"expected 'input' or 'holding'; got {table!r}")
    if kind.table is not None and table != kind.table:
        raise fail(f"{where}.table", f"{name} is read from the {kind.table} registers")
    address = _int(raw, "address", where, 0, 0xFFFF, fail)
    ptype = raw.get("type")
    if not isinstance(ptype, str) or ptype not in _TYPES:
        raise fail(f"{where}.type", f"expected one of {', '.join(_TYPES)}; got {ptype!r}")
    is_string = kind.types == STRING
    if is_string != (ptype == "string"):
        need = "type = 'string'" if is_string else "a numeric type"
        raise fail(f"{where}.type", f"{name} needs {need}")
    if ptype not in kind.types:
        raise fail(f"{where}.type", f"expected {' or '.join(sorted(kind.types))}; got {ptype!r}")
    count = _TYPES[ptype]
    if ptype == "string":
        count = _int(raw, "length", where, 1, MAX_READ, fail)
        for k in ("scale", "unit", "values", "bit", "missing", "word_order"):
            if k in raw:
                raise fail(f"{where}.{k}", "not for a string")
    elif "length" in raw:
        raise fail(f"{where}.length", "only a string has a length")
    if address + count > 0x10000:
        raise fail(f"{where}.address", "the point runs past register 65535")
    order = raw.get("word_order", default_order)
    if order not in ("big", "little"):
        raise fail(f"{where}.word_order", f"expected 'big' or 'little'; got {order!r}")
    if "word_order" in raw and count != 2:
        raise fail(f"{where}.word_order", "only for 32-bit types")
    bit = None
    if "bit" in raw:
        if ptype != "u16":
            raise fail(f"{where}.bit", "only for type = 'u16'")
        if not kind.bit:
            raise fail(f"{where}.bit", f"only for {vocabulary.bit_for}")
        bit = _int(raw, "bit", where, 0, 15, fail)
    values = _values_of(raw, name, kind, where, ptype, tables, fail)
    if bit is not None and values is not None and set(values) != {0, 1}:
        raise fail(f"{where}.values", "a bit's value table lists exactly the raw values 0 and 1")
    scale, unit, factor = _scale_and_unit(raw, name, kind, where, fail)
    missing = None
    if "missing" in raw:
        if kind.missing == "never":
            raise fail(f"{where}.missing", f"{name} must always be reported")
        missing = _int(raw, "missing", where, 0, 0xFFFF_FFFF, fail)
    elif kind.missing == "required":
        raise fail(
            f"{where}.missing",
            "required: the register contents that mean 'not available' (a device that "
            "cannot measure must never report a plausible value such as 0)",
        )
    return Point(
        name=name,
        table=Table(table),
        address=address,
        type=ptype,
        count=count,
        scale=scale,
        unit=unit,
        factor=factor,
        word_order=order,
        bit=bit,
        missing=missing,
        values=values,
    )


def _values_of(
    raw: dict[str, Any],
    name: str,
    kind: PointKind,
    where: str,
    ptype: str,
    tables: Mapping[str, Mapping[int, str]],
    fail: _Fail,
) -> Mapping[int, str] | None:
    if not kind.enumerated:
        if "values" in raw:
            raise fail(f"{where}.values", f"{name} is a number, not an enumeration")
        return None
    ref = raw.get("values")
    if not isinstance(ref, str) or ref not in tables:
        have = ", ".join(sorted(tables)) or "none"
        raise fail(
            f"{where}.values", f"expected the name of a [values] table ({have}); got {ref!r}"
        )
    if ptype not in ("u16", "u32"):
        raise fail(f"{where}.type", "an enumerated point is u16 or u32")
    table = tables[ref]
    if not kind.must_mean <= set(table.values()):
        must = " and ".join(sorted(kind.must_mean))
        raise fail(f"{where}.values", f"table {ref!r} must say which raw value is {must}")
    if kind.meanings is not None:
        bad = sorted({m for m in table.values() if m not in kind.meanings})
        if bad:
            raise fail(
                f"{where}.values",
                f"table {ref!r} means {bad[0]!r}, not one of {', '.join(sorted(kind.meanings))}",
            )
    return table


def _scale_and_unit(
    raw: dict[str, Any], name: str, kind: PointKind, where: str, fail: _Fail
) -> tuple[float, str | None, float]:
    if kind.enumerated:
        for k in ("scale", "unit"):
            if k in raw:
                raise fail(f"{where}.{k}", "not for an enumerated point")
        return 1.0, None, 1.0
    scale = raw.get("scale", 1)
    if (
        not isinstance(scale, int | float)
        or isinstance(scale, bool)
        or not math.isfinite(scale)
        or scale == 0
    ):
        raise fail(f"{where}.scale", f"expected a non-zero number; got {scale!r}")
    unit = raw.get("unit")
    units = kind.units
    if units is not None and scale < 0:
        if kind.signed:
            raise fail(
                f"{where}.scale", f"{name} takes its sign from the device: the scale must be > 0"
            )
        raise fail(f"{where}.scale", f"{name} is never negative: the scale must be > 0")
    if kind.counter:
        if raw.get("type") not in ("u16", "u32") or scale != 1 or unit is not None:
            raise fail(f"{where}.type", f"{name} is a counter: u16 or u32, no scale, no unit")
        return 1.0, None, 1.0
    if units is None:  # extra.*: recorded as read, in the unit the map says
        if unit is not None and (not isinstance(unit, str) or not 0 < len(unit) <= 16):
            raise fail(f"{where}.unit", f"expected a short unit symbol; got {unit!r}")
        return float(scale), unit, 1.0
    if not isinstance(unit, str) or unit not in units:
        raise fail(f"{where}.unit", f"expected one of {', '.join(units)}; got {unit!r}")
    return float(scale), unit, units[unit]


def _check_overlaps(points: list[Point], fail: _Fail) -> None:
    """Every register belongs to one point, or each of its bits to at most one point."""
    owner: dict[tuple[Table, int], str] = {}
    bits: dict[tuple[Table, int, int], str] = {}
    for p in sorted(points, key=lambda p: (p.table, p.address)):
        for address in range(p.address, p.end):
            whole = owner.get((p.table, address))
            if p.bit is None or (whole is not None and not whole.startswith("bit:")):
                if whole is not None:
                    taken = whole.removeprefix("bit:")
                    raise fail(
                        f"point ({p.name}).address",
                        f"{p.table} register {address} is already part of {taken}",
                    )
                owner[(p.table, address)] = p.name
                continue
            if (p.table, address, p.bit) in bits:
                raise fail(
                    f"point ({p.name}).bit",
                    f"bit {p.bit} of {p.table} register {address} is already "
                    f"{bits[(p.table, address, p.bit)]}",
                )
            bits[(p.table, address, p.bit)] = p.name
            owner[(p.table, address)] = f"bit:{p.name}"


def _blocks(points: list[Point]) -> list[Block]:
    """Group points into as few reads as contiguous addresses allow (no gaps: a real
    device may refuse a read that touches a register it does not have)."""
    out: list[Block] = []
    for table in Table:
        run: list[Point] = []
        for p in sorted((p for p in points if p.table is table), key=lambda p: p.address):
            if run:
                start, end = run[0].address, max(q.end for q in run)
                if p.address <= end and max(end, p.end) - start <= MAX_READ:
                    run.append(p)
                    continue
                out.append(Block(table, start, end - start, tuple(run)))
            run = [p]
        if run:
            start, end = run[0].address, max(q.end for q in run)
            out.append(Block(table, start, end - start, tuple(run)))
    return out
