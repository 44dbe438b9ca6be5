"""The register map, this simulator's own reading of the map format (docs/protocols.md,
"Register maps"): ``config/maps/xrs-mb1.toml`` parsed without the drivers' parser.

Only the data file is shared with the host's side (drivers/modbus_map.py); the parser is
written again here, so that a misreading of the format in one shows up as a failure against
the other. :func:`load_map` refuses what it cannot serve (unknown keys, a point outside the
readable windows of XRS-MB/1, overlapping points) with a :class:`MapError` that names the
file, the point and the key.
"""

from __future__ import annotations

import importlib.resources
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from iortd.kernel.files import FileReadError, read_small_file, toml_error

__all__ = [
    "HOLDING_WINDOW",
    "INPUT_WINDOW",
    "MAP_FORMAT",
    "MAX_COUNT",
    "MapError",
    "Point",
    "RegisterMap",
    "default_map_path",
    "load_map",
]

# The readable windows of XRS-MB/1 (docs/protocols.md, "Exception responses"): a read that
# touches any register outside them is answered with exception 02. The map lays points out
# inside them; registers without a point read 0.
INPUT_WINDOW = range(0, 40)  # function 04
HOLDING_WINDOW = range(100, 172)  # function 03
MAX_COUNT = 125  # registers per read (Modbus limit for 03/04)


class MapError(ValueError):
    """A register map this simulator cannot serve; the message names file, point, key."""


_TYPES = {"u16": 1, "i16": 1, "u32": 2, "i32": 2, "f32": 2, "string": 0}
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
