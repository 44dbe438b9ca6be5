"""Register maps of an applicator reader and stand: the vocabulary of APL-MB/1's points.

A map is in the format of drivers/modbus_map.py (``iortd-register-map/1``, docs/protocols.md,
"Register maps"); what differs is the point names (docs/protocols.md, APL-MB/1, "Its
register map"). drivers/modbus_map.py's loader checks the names of a *source console* (it
requires doses, kV, ...), so this module checks the applicator's vocabulary itself and
builds the same :class:`RegisterMap`, :class:`Point` and :class:`Block` objects: decoding
registers into values stays drivers/modbus_map.py's (scales, units, value tables,
``missing``). Every problem names the file, the point and the key, before any device is
touched. Beyond the console's rules: the displacement and the tilt must have a ``missing``
value (a device that cannot measure must never report "no movement"), and a flag may be
one ``bit`` of a status word.

When modbus_map.py takes its vocabulary as a parameter, this module shrinks to the
:data:`_VOCABULARY` table.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from iortd.drivers.apl_types import ApplicatorFault, ApplicatorState
from iortd.drivers.modbus_codec import MAX_READ, Table
from iortd.drivers.modbus_map import MAP_FORMAT, Block, MapError, Point, RegisterMap
from iortd.kernel.files import FileReadError, read_small_file, toml_error

__all__ = ["load_apl_map"]


@dataclass(frozen=True, slots=True)
class _Kind:
    types: frozenset[str]
    meanings: frozenset[str] | None = None  # enumerated: what a table entry may mean
    must_mean: frozenset[str] = frozenset()  # enumerated: the table must say these
    units: Mapping[str, float] | None = None  # physical: unit -> factor to the sample's
    missing: str = "forbidden"  # "forbidden" | "optional" | "required"
    required: bool = True
    bit: bool = False  # may be one flag of a status word


_U: Final = frozenset({"u16", "u32"})
_MM: Final = MappingProxyType({"mm": 1.0, "cm": 10.0})
_FLAG = _Kind(_U, frozenset({"yes", "no", "unknown"}), frozenset({"yes", "no"}), bit=True)
_STATES: Final = frozenset(s.value for s in ApplicatorState) - {"UNKNOWN"}
_FAULTS: Final = frozenset({"NONE", *(f.value for f in ApplicatorFault)}) - {"UNKNOWN"}
_COUNTER = _Kind(_U)
_COMPONENT = _Kind(frozenset({"i16", "i32", "f32"}), units=_MM, missing="required")
_VOCABULARY: Final[Mapping[str, _Kind]] = MappingProxyType(
    {
        "state": _Kind(_U, _STATES, frozenset({"READY", "FAULT"})),
        "fault": _Kind(_U, _FAULTS, frozenset({"NONE"})),
        "seated": _FLAG,
        "source_locked": _FLAG,
        "brakes_engaged": _FLAG,
        "applicator.type": _Kind(_U, None, frozenset({"NONE"})),
        "applicator.diameter": _Kind(frozenset({"u16", "u32", "f32"}), units=_MM),
        "applicator.serial": _Kind(frozenset({"string"})),
        "applicator.uses_left": _Kind(_U, missing="optional", required=False),
        "seat_counter": _COUNTER,
        "lock_counter": _COUNTER,
        "displacement.x": _COMPONENT,
        "displacement.y": _COMPONENT,
        "displacement.z": _COMPONENT,
        "displacement.magnitude": _Kind(
            frozenset({"u16", "u32", "f32"}), units=_MM, missing="required"
        ),
        "tilt": _Kind(
            frozenset({"u16", "u32", "f32"}),
            units=MappingProxyType({"deg": 1.0, "mrad": 180.0 / math.pi / 1000.0}),
            missing="required",
        ),
        "heartbeat": _COUNTER,
        **{
            f"identity.{k}": _Kind(frozenset({"string"}), required=False)
            for k in ("manufacturer", "model", "serial", "firmware", "scenario")
        },
    }
)
_EXTRA = re.compile(r"^extra\.[a-z][a-z0-9_]{0,31}$")
_EXTRA_KIND = _Kind(frozenset({"u16", "i16", "u32", "i32", "f32"}), missing="optional")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_MEANING = re.compile(r"^[A-Za-z][A-Za-z0-9_./-]{0,31}$")
_SIZES: Final = MappingProxyType({"u16": 1, "i16": 1, "u32": 2, "i32": 2, "f32": 2})
_TOP_KEYS: Final = frozenset({"format", "name", "description", "word_order", "values", "point"})
_POINT_KEYS: Final = frozenset(
    {"name", "table", "address", "type", "scale", "unit", "word_order", "bit", "missing"}
    | {"values", "length"}
)


class _Fail:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, where: str, msg: str) -> MapError:
        return MapError(f"{self.path}: {where}: {msg}")


def load_apl_map(path: Path) -> RegisterMap:
    """An applicator register map, checked completely; every problem names the file, the
    point and the key (docs/protocols.md, "Register maps" and "APL-MB/1")."""
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
    return _parse(path, data)


def _parse(path: Path, data: dict[str, Any]) -> RegisterMap:
    fail = _Fail(path)
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
    order = data.get("word_order", "big")
    if order not in ("big", "little"):
        raise fail("word_order", f"expected 'big' or 'little'; got {order!r}")
    tables = _value_tables(data.get("values", {}), fail)
    raw_points = data.get("point")
    if not isinstance(raw_points, list) or not raw_points:
        raise fail("point", "expected one or more [[point]] tables")
    points: dict[str, Point] = {}
    for i, raw_point in enumerate(raw_points):
        p = _point(raw_point, f"point[{i}]", order, tables, fail)
        if p.name in points:
            raise fail(f"point[{i}].name", f"{p.name!r} is mapped twice")
        points[p.name] = p
    missing = [n for n, k in _VOCABULARY.items() if k.required and n not in points]
    if missing:
        raise fail("point", f"required point(s) missing: {', '.join(missing)}")
    _check_overlaps(points.values(), fail)
    ident = [p for p in points.values() if p.name.startswith("identity.")]
    telemetry = [p for p in points.values() if not p.name.startswith("identity.")]
    return RegisterMap(
        name,
        description,
        str(path),
        MappingProxyType(points),
        _blocks(telemetry),
        _blocks(ident),
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
                raise fail(f"values.{tname}.{key}", f"expected a word; got {meaning!r}")
            entries[int(key)] = meaning
        out[tname] = MappingProxyType(entries)
    return out


def _int(raw: Mapping[str, Any], key: str, where: str, lo: int, hi: int, fail: _Fail) -> int:
    v = raw.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise fail(f"{where}.{key}", f"expected an integer {lo}..{hi}; got {v!r}")
    return v


def _point(
    raw: Any, where: str, order: str, tables: Mapping[str, Mapping[int, str]], fail: _Fail
) -> Point:
    if not isinstance(raw, dict):
        raise fail(where, "expected a table")
    name = raw.get("name")
    if not isinstance(name, str):
        raise fail(f"{where}.name", f"expected a point name; got {name!r}")
    where = f"{where} ({name})"
    kind = _VOCABULARY.get(name) or (_EXTRA_KIND if _EXTRA.fullmatch(name) else None)
    if kind is None:
        raise fail(f"{where}.name", "unknown point name (docs/protocols.md, APL-MB/1, lists them)")
    unknown = sorted(set(raw) - _POINT_KEYS)
    if unknown:
        raise fail(f"{where}.{unknown[0]}", "unknown key")
    table = raw.get("table")
    if table not in ("input", "holding"):
        raise fail(f"{where}.table", f"expected 'input' or 'holding'; got {table!r}")
    if (table == "holding") != name.startswith("identity."):
        want = "holding" if name.startswith("identity.") else "input"
        raise fail(f"{where}.table", f"{name} is read from the {want} registers")
    address = _int(raw, "address", where, 0, 0xFFFF, fail)
    ptype = raw.get("type")
    if ptype not in kind.types:
        raise fail(f"{where}.type", f"expected {' or '.join(sorted(kind.types))}; got {ptype!r}")
    if ptype == "string":
        count = _int(raw, "length", where, 1, MAX_READ, fail)
        for k in ("scale", "unit", "values", "bit", "missing", "word_order"):
            if k in raw:
                raise fail(f"{where}.{k}", "not for a string")
    else:
        count = _SIZES[ptype]
        if "length" in raw:
            raise fail(f"{where}.length", "only a string has a length")
    if address + count > 0x10000:
        raise fail(f"{where}.address", "the point runs past register 65535")
    word_order = raw.get("word_order", order)
    if word_order not in ("big", "little") or ("word_order" in raw and count != 2):
        raise fail(f"{where}.word_order", "'big' or 'little', for 32-bit types only")
    bit = None
    if "bit" in raw:
        if not kind.bit or ptype != "u16":
            raise fail(f"{where}.bit", "only for a flag of type u16 (one bit of a status word)")
        bit = _int(raw, "bit", where, 0, 15, fail)
    values = _values_of(raw, kind, where, tables, fail)
    if bit is not None and values is not None and set(values) != {0, 1}:
        raise fail(f"{where}.values", "a bit's value table lists exactly the raw values 0 and 1")
    scale, unit, factor = _scale_and_unit(raw, name, kind, where, fail)
    missing = None
    if "missing" in raw:
        if kind.missing == "forbidden":
            raise fail(f"{where}.missing", f"{name} must always be reported")
        missing = _int(raw, "missing", where, 0, 0xFFFF_FFFF, fail)
    elif kind.missing == "required":
        raise fail(
            f"{where}.missing",
            "required: the register contents that mean 'not available' (never 0: a device "
            "that cannot measure must not report 'no movement')",
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
        word_order=word_order,
        bit=bit,
        missing=missing,
        values=values,
    )


def _values_of(
    raw: Mapping[str, Any],
    kind: _Kind,
    where: str,
    tables: Mapping[str, Mapping[int, str]],
    fail: _Fail,
) -> Mapping[int, str] | None:
    enumerated = kind.meanings is not None or kind.must_mean
    if not enumerated:
        if "values" in raw:
            raise fail(f"{where}.values", "a number, not an enumeration")
        return None
    ref = raw.get("values")
    if not isinstance(ref, str) or ref not in tables:
        have = ", ".join(sorted(tables)) or "none"
        raise fail(
            f"{where}.values", f"expected the name of a [values] table ({have}); got {ref!r}"
        )
    table = tables[ref]
    meanings = set(table.values())
    if kind.meanings is not None:
        bad = sorted(meanings - kind.meanings)
        if bad:
            allowed = ", ".join(sorted(kind.meanings))
            raise fail(f"{where}.values", f"table {ref!r} means {bad[0]!r}, not one of {allowed}")
    lacking = sorted(kind.must_mean - meanings)
    if lacking:
        raise fail(f"{where}.values", f"table {ref!r} must say which raw value is {lacking[0]!r}")
    return table


def _scale_and_unit(
    raw: Mapping[str, Any], name: str, kind: _Kind, where: str, fail: _Fail
) -> tuple[float, str | None, float]:
    if kind.units is None:
        for k in ("scale", "unit"):
            if k in raw and (k != "scale" or raw[k] != 1) and not name.startswith("extra."):
                raise fail(f"{where}.{k}", f"not for {name} (a count, a code or a text)")
    scale = raw.get("scale", 1)
    if (
        not isinstance(scale, int | float)
        or isinstance(scale, bool)
        or not math.isfinite(scale)
        or scale == 0
    ):
        raise fail(f"{where}.scale", f"expected a non-zero number; got {scale!r}")
    unit = raw.get("unit")
    if kind.units is None:
        if unit is not None and (not isinstance(unit, str) or not 0 < len(unit) <= 16):
            raise fail(f"{where}.unit", f"expected a short unit symbol; got {unit!r}")
        return float(scale), unit, 1.0
    if scale < 0:
        raise fail(f"{where}.scale", "must be > 0 (a negative axis is a sign in the device)")
    if not isinstance(unit, str) or unit not in kind.units:
        raise fail(f"{where}.unit", f"expected one of {', '.join(kind.units)}; got {unit!r}")
    return float(scale), unit, kind.units[unit]


def _check_overlaps(points: Iterable[Point], fail: _Fail) -> None:
    """Every register belongs to one point, or each of its bits to at most one point."""
    whole: dict[tuple[Table, int], str] = {}
    bits: dict[tuple[Table, int], dict[int, str]] = {}
    for p in sorted(points, key=lambda p: (p.table, p.address)):
        for address in range(p.address, p.end):
            key = (p.table, address)
            flags = bits.get(key, {})
            taken = whole.get(key) or (
                next(iter(flags.values())) if flags and p.bit is None else None
            )
            if p.bit is not None and p.bit in flags:
                taken = flags[p.bit]
            if taken is not None:
                raise fail(
                    f"point ({p.name}).address",
                    f"{p.table} register {address} is already part of {taken}",
                )
            if p.bit is None:
                whole[key] = p.name
            else:
                bits.setdefault(key, {})[p.bit] = p.name


def _blocks(points: Sequence[Point]) -> tuple[Block, ...]:
    """As few reads as contiguous addresses allow (no gaps: a real device may refuse a
    read that touches a register it does not have)."""
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
    return tuple(out)
