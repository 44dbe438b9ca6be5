"""The ``modbus-apl`` driver: an applicator reader and positioning stand over Modbus TCP or
RTU (APL-MB/1, docs/protocols.md), read through a register map (config/maps/apl-mb1.toml).

Three layers, each usable alone:

* :func:`load_apl_map`: a map in the format of drivers/modbus_map.py
  (``iortd-register-map/1``) with the applicator's point names. drivers/modbus_map.py's
  loader checks the names of a *source console* (it requires doses, kV, ...), so this module
  checks the applicator's vocabulary itself and builds the same :class:`RegisterMap`,
  :class:`Point` and :class:`Block` objects: decoding registers into values is
  drivers/modbus_map.py's (scales, units, value tables, ``missing``), unchanged.
* :func:`decode_points` and :func:`decode_sample` (sans-I/O): registers to an
  :class:`ApplicatorSample`, refusing with a ProtocolViolation that names the register any
  value outside its documented range or inconsistent with the others (a magnitude that is
  not the length of its components beyond rounding, a fault code without the FAULT state,
  an applicator type code the map does not list, a diameter or serial with no applicator,
  half of the displacement missing). A state, fault or flag code the map does not list reads
  as UNKNOWN (fail safe: an unknown flag counts as the unsafe case), as in XRS-MB/1.
* :class:`ModbusAplDriver`: identity once after connecting (holding registers), then one
  telemetry read per poll, so that all the values of a sample come from one instant; the
  exchanges are drivers/modbus_exchange.py's (timeouts, resynchronisation after a late
  reply, noise before an RTU reply). It only reads: a passive monitor.

The reader is usually on the RS-485 line of the source console at another unit id (2 by
default; the console is at 1). A reply from the other unit is never read as this one's:
the RTU head must carry this unit id (a few stray bytes are skipped, then the CRC decides).

Config::

    [[devices]]
    name = "stand-1"
    role = "applicator"
    driver = "modbus-apl"
    timeout_s = 0.3
    [devices.transport]
    type = "tcp"               # or "serial" (RTU): port, baudrate, parity = "E", ...
    host = "192.0.2.20"
    port = 502
    [devices.options]
    map = "apl-mb1"            # a bundled map, or the path of the site's own
    unit_id = 2
"""

from __future__ import annotations

import enum
import math
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final, Self

from iortd.drivers.errors import DriverOptionError, ProtocolViolation
from iortd.drivers.interface import DriverContext, DriverSpec, Role
from iortd.drivers.modbus_codec import MAX_READ, Framing, Table
from iortd.drivers.modbus_exchange import ModbusExchange
from iortd.drivers.modbus_map import (
    MAP_FORMAT,
    Block,
    MapError,
    Point,
    RegisterMap,
    resolve_map,
)
from iortd.drivers.transport import Transport, transport_from_config, validate_transport
from iortd.kernel.files import FileReadError, read_small_file, toml_error
from iortd.kernel.types import (
    ApplicatorIdentity,
    ApplicatorReading,
    Capability,
    DeviceIdentity,
)

__all__ = [
    "DEFAULT_UNIT",
    "MAGNITUDE_TOLERANCE_MM",
    "MAX_DIAMETER_MM",
    "MAX_TILT_DEG",
    "SIMULATOR_MANUFACTURER",
    "ApplicatorFault",
    "ApplicatorSample",
    "ApplicatorState",
    "Flag",
    "ModbusAplDriver",
    "ModbusAplFactory",
    "decode_points",
    "decode_sample",
    "load_apl_map",
]

SIMULATOR_MANUFACTURER: Final = "iortd simulator"
DEFAULT_UNIT: Final = 2  # the source console is unit 1 on a shared line
MAX_DIAMETER_MM: Final = 200.0  # as XRS-ASCII/1's and XRS-MB/1's applicator diameter
MAX_TILT_DEG: Final = 180.0
# The magnitude and the length of the three components may differ by rounding only: each
# component is off by half a step at most, the magnitude by half a step, so
# (sqrt(3)/2 + 1/2) steps < 2 steps. 0.01 mm steps in APL-MB/1; a map with coarser steps
# gets two of its coarsest.
MAGNITUDE_TOLERANCE_MM: Final = 0.02
_SLACK: Final = 1e-9  # binary floating point of the scaled values


class ApplicatorState(enum.StrEnum):
    """The reader/stand's own state (APL-MB/1 input register 0)."""

    OFF = "OFF"
    SELF_TEST = "SELF_TEST"
    READY = "READY"
    FAULT = "FAULT"
    UNKNOWN = "UNKNOWN"  # a code the map does not list: the device cannot be trusted


class ApplicatorFault(enum.StrEnum):
    """What failed, when the state is FAULT (APL-MB/1 input register 1)."""

    READER = "READER"
    POSITION = "POSITION"
    TILT = "TILT"
    BRAKE = "BRAKE"
    INTERNAL = "INTERNAL"
    UNKNOWN = "UNKNOWN"  # a code the map does not list: still a fault


class Flag(enum.StrEnum):
    """A yes/no sensor that may not be able to tell. Fail safe: UNKNOWN counts as the
    unsafe answer (not seated, not locked, brakes released)."""

    YES = "yes"
    NO = "no"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class ApplicatorSample:
    """One reading of an applicator reader and stand: everything APL-MB/1 carries.

    ``displacement_mm`` is the tip's displacement (x, y, z) since the stand was last locked,
    ``displacement_magnitude_mm`` its length as the device computed it, ``tilt_deg`` the
    angle between the applicator's axis now and at that lock; each None when the device
    cannot say (never locked, a position or tilt fault). ``lock_counter`` changes at every
    lock (a re-lock moves the reference), ``seat_counter`` at every seating (a swap
    included), ``heartbeat`` at every refresh of the measurements (unchanged over several
    polls: the values are frozen). ``mono_ns``/``utc``: when the sample was taken, on the
    daemon's clock.
    """

    mono_ns: int
    utc: datetime
    state: ApplicatorState
    fault: ApplicatorFault | None
    seated: Flag
    source_locked: Flag
    brakes_engaged: Flag
    applicator: ApplicatorIdentity | None
    uses_left: int | None
    seat_counter: int
    lock_counter: int
    displacement_mm: tuple[float, float, float] | None
    displacement_magnitude_mm: float | None
    tilt_deg: float | None
    heartbeat: int
    simulated: bool
    extra: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    def reading(self) -> ApplicatorReading:
        """The part of the sample today's kernel type carries (the identity)."""
        return ApplicatorReading(
            mono_ns=self.mono_ns,
            utc=self.utc,
            applicator=self.applicator,
            simulated=self.simulated,
        )


# ---- the map's vocabulary ------------------------------------------------------------------


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


# ---- decoding ------------------------------------------------------------------------------


def _where(regmap: RegisterMap, *names: str) -> str:
    """``input register 23 (displacement.magnitude)``, ``input registers 20-23
    (displacement)``: where a refused value is, for the message."""
    pts = [regmap.points[n] for n in names if n in regmap.points]
    if not pts:
        return ", ".join(names)
    addresses = sorted({a for p in pts for a in range(p.address, p.end)})
    label = names[0] if len(names) == 1 else names[0].split(".")[0]
    if len(addresses) == 1:
        return f"{pts[0].table} register {addresses[0]} ({label})"
    if addresses == list(range(addresses[0], addresses[-1] + 1)):
        span = f"{addresses[0]}-{addresses[-1]}"
    else:
        span = ", ".join(map(str, addresses))
    return f"{pts[0].table} registers {span} ({label})"


def decode_points(
    regmap: RegisterMap, blocks: Sequence[Block], data: Sequence[Sequence[int]]
) -> tuple[dict[str, Any], dict[str, int]]:
    """The values of every point (as drivers/modbus_map.py decodes them), and the raw
    register contents of each enumerated point, for messages. A value that cannot be
    decoded is refused naming its register."""
    try:
        values = regmap.decode(blocks, data)
    except ProtocolViolation:
        values = _decode_naming(regmap, blocks, data)  # raises, naming the register
    raws: dict[str, int] = {}
    for block, regs in zip(blocks, data, strict=True):
        for p in block.points:
            if p.values is not None:
                start = p.address - block.address
                raws[p.name] = (
                    regs[start] if p.count == 1 else (regs[start] << 16) | regs[start + 1]
                )
    return values, raws


def _decode_naming(
    regmap: RegisterMap, blocks: Sequence[Block], data: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """Point by point, so that the error names the register."""
    values: dict[str, Any] = {}
    for block, regs in zip(blocks, data, strict=True):
        if len(regs) != block.count:
            raise ProtocolViolation(f"{len(regs)} registers for a block of {block.count}")
        for p in block.points:
            start = p.address - block.address
            one = Block(p.table, p.address, p.count, (p,))
            try:
                values.update(regmap.decode((one,), (list(regs[start : start + p.count]),)))
            except ProtocolViolation as exc:
                raise ProtocolViolation(f"{_where(regmap, p.name)}: {exc}") from None
    return values


def _flag(word: object) -> Flag:
    return Flag.__members__.get(str(word).upper(), Flag.UNKNOWN)


def _count(regmap: RegisterMap, values: Mapping[str, Any], name: str) -> int | None:
    x = values.get(name)
    if x is None:
        return None
    if not isinstance(x, int | float) or x < 0 or x != int(x):
        raise ProtocolViolation(f"{_where(regmap, name)}: {x!r} is not a count")
    return int(x)


def decode_sample(
    regmap: RegisterMap,
    values: Mapping[str, Any],
    *,
    mono_ns: int,
    utc: datetime,
    simulated: bool,
    raws: Mapping[str, int] | None = None,
) -> ApplicatorSample:
    """A sample from decoded point values (:func:`decode_points`), every documented
    invariant checked; a refusal names the register (docs/protocols.md, APL-MB/1, "What a
    master does with a bad value")."""
    raws = raws or {}

    def bad(*names: str) -> str:
        return _where(regmap, *names)

    state = ApplicatorState.__members__.get(str(values["state"]), ApplicatorState.UNKNOWN)
    fault_word = str(values["fault"])
    fault = None if fault_word == "NONE" else ApplicatorFault.__members__.get(fault_word)
    if fault_word != "NONE" and fault is None:
        fault = ApplicatorFault.UNKNOWN
    if state is ApplicatorState.FAULT and fault is None:
        raise ProtocolViolation(f"{bad('fault')}: NONE while the state is FAULT")
    if state not in (ApplicatorState.FAULT, ApplicatorState.UNKNOWN) and fault is not None:
        raise ProtocolViolation(f"{bad('fault')}: {fault} while the state is {state}")

    applicator = _applicator(regmap, values, raws)
    uses_left = _count(regmap, values, "applicator.uses_left")
    if applicator is None and uses_left is not None:
        raise ProtocolViolation(f"{bad('applicator.uses_left')}: {uses_left} with no applicator")

    names = ("displacement.x", "displacement.y", "displacement.z", "displacement.magnitude")
    x, y, z, m = (values[n] for n in names)
    if (x is None, y is None, z is None, m is None).count(True) not in (0, 4):
        raise ProtocolViolation(
            f"{bad(*names)}: x, y, z and magnitude are reported together "
            f"(got {x!r}, {y!r}, {z!r}, {m!r})"
        )
    displacement = None
    if x is not None:
        displacement = (float(x), float(y), float(z))
        length = math.sqrt(x * x + y * y + z * z)
        steps = [regmap.points[n].scale * regmap.points[n].factor for n in names]
        tolerance = max(MAGNITUDE_TOLERANCE_MM, 2 * max(abs(s) for s in steps))
        if not m >= 0 or abs(m - length) > tolerance + _SLACK:
            raise ProtocolViolation(
                f"{bad('displacement.magnitude')}: {m:g} mm, but the components "
                f"({x:g}, {y:g}, {z:g}) are {length:.4f} mm long "
                f"(more than {tolerance:g} mm apart)"
            )
    tilt = values["tilt"]
    if tilt is not None and not 0 <= tilt <= MAX_TILT_DEG + _SLACK:
        raise ProtocolViolation(f"{bad('tilt')}: {tilt:g} deg out of range (0 to 180)")

    counters = {}
    for name in ("seat_counter", "lock_counter", "heartbeat"):
        n = _count(regmap, values, name)
        if n is None:  # a counter has no "missing": cannot happen with a checked map
            raise ProtocolViolation(f"{bad(name)}: not reported")
        counters[name] = n
    return ApplicatorSample(
        mono_ns=mono_ns,
        utc=utc,
        state=state,
        fault=fault,
        seated=_flag(values["seated"]),
        source_locked=_flag(values["source_locked"]),
        brakes_engaged=_flag(values["brakes_engaged"]),
        applicator=applicator,
        uses_left=uses_left,
        seat_counter=counters["seat_counter"],
        lock_counter=counters["lock_counter"],
        displacement_mm=displacement,
        displacement_magnitude_mm=None if m is None else float(m),
        tilt_deg=None if tilt is None else float(tilt),
        heartbeat=counters["heartbeat"],
        simulated=simulated,
        extra=MappingProxyType(
            {
                k.removeprefix("extra."): float(v)
                for k, v in values.items()
                if k.startswith("extra.") and v is not None
            }
        ),
    )


def _applicator(
    regmap: RegisterMap, values: Mapping[str, Any], raws: Mapping[str, int]
) -> ApplicatorIdentity | None:
    kind = str(values["applicator.type"])
    diameter = values["applicator.diameter"]
    serial = str(values["applicator.serial"])
    where = _where(regmap, "applicator.type")
    if kind == "UNKNOWN":
        # Never "no applicator": one is there and cannot be named.
        code = raws.get("applicator.type")
        raise ProtocolViolation(f"{where}: code {code} is not in the map's table")
    if kind == "NONE":
        if diameter != 0:
            raise ProtocolViolation(
                f"{_where(regmap, 'applicator.diameter')}: {diameter:g} mm with no applicator"
            )
        if serial:
            raise ProtocolViolation(
                f"{_where(regmap, 'applicator.serial')}: {serial!r} with no applicator"
            )
        return None
    if not 0 < diameter <= MAX_DIAMETER_MM + _SLACK:
        raise ProtocolViolation(
            f"{_where(regmap, 'applicator.diameter')}: {diameter:g} mm out of range "
            f"(above 0, at most {MAX_DIAMETER_MM:g})"
        )
    if not serial:
        raise ProtocolViolation(
            f"{_where(regmap, 'applicator.serial')}: empty: an applicator is named by its serial"
        )
    return ApplicatorIdentity(type=kind, diameter_mm=float(diameter), serial=serial)


# ---- the driver ----------------------------------------------------------------------------

_OPTIONS = ("map", "unit_id", "framing")


def _check(
    options: Mapping[str, Any], transport: Mapping[str, Any]
) -> tuple[RegisterMap, int, Framing]:
    for key in options:
        if key not in _OPTIONS:
            raise DriverOptionError(
                f"options.{key}", f"unknown key (modbus-apl takes: {', '.join(_OPTIONS)})"
            )
    unit = options.get("unit_id", DEFAULT_UNIT)
    if not isinstance(unit, int) or isinstance(unit, bool) or not 1 <= unit <= 247:
        raise DriverOptionError("options.unit_id", f"expected an integer 1..247; got {unit!r}")
    if not transport:
        raise DriverOptionError(
            "transport", 'modbus-apl needs a [devices.transport] table, e.g. type = "tcp"'
        )
    validate_transport(transport)
    framing_opt = options.get("framing", "auto")
    if framing_opt not in ("auto", "tcp", "rtu"):
        raise DriverOptionError(
            "options.framing", f"expected 'auto', 'tcp' or 'rtu'; got {framing_opt!r}"
        )
    if framing_opt == "auto":
        framing = Framing.TCP if transport.get("type") == "tcp" else Framing.RTU
    else:
        framing = Framing(framing_opt)
    if framing is Framing.TCP and transport.get("type") != "tcp":
        raise DriverOptionError("options.framing", "Modbus TCP framing needs a tcp transport")
    name = options.get("map", "apl-mb1")
    if not isinstance(name, str) or not name:
        raise DriverOptionError("options.map", f"expected a map name or path; got {name!r}")
    try:
        regmap = load_apl_map(resolve_map(name))
    except MapError as exc:
        raise DriverOptionError("options.map", str(exc)) from None
    return regmap, unit, framing


class ModbusAplFactory:
    """The ``modbus-apl`` entry point's factory (role ``applicator``)."""

    name = "modbus-apl"
    roles: frozenset[Role] = frozenset({"applicator"})
    simulated = False  # real equipment; a simulator says so in its identity registers
    path_options = frozenset({"map"})

    def validate(self, options: Mapping[str, Any], transport: Mapping[str, Any]) -> None:
        _check(options, transport)

    def create(self, spec: DriverSpec, context: DriverContext) -> ModbusAplDriver:
        regmap, unit, framing = _check(spec.options, spec.transport)
        return ModbusAplDriver(
            transport_from_config(spec.transport, timeout_s=spec.timeout_s),
            context,
            regmap,
            unit=unit,
            framing=framing,
            timeout_s=spec.timeout_s,
        )


class ModbusAplDriver:
    """An :class:`~iortd.drivers.interface.ApplicatorDriver` for APL-MB/1 devices."""

    capabilities = frozenset({Capability.READ_APPLICATOR})

    def __init__(
        self,
        transport: Transport,
        context: DriverContext,
        regmap: RegisterMap,
        *,
        unit: int = DEFAULT_UNIT,
        framing: Framing = Framing.TCP,
        timeout_s: float = 1.0,
    ) -> None:
        self._clock = context.clock
        self._map = regmap
        self._link = ModbusExchange(
            transport,
            unit=unit,
            framing=framing,
            timeout_s=timeout_s,
            name="modbus-apl",
            heard=context.heard,
            monotonic_ns=context.clock.monotonic_ns,
        )
        self._simulated = False

    @property
    def unit(self) -> int:
        return self._link.unit

    @property
    def framing(self) -> Framing:
        return self._link.framing

    async def __aenter__(self) -> Self:
        await self._link.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._link.close()

    async def _read(self, blocks: Sequence[Block]) -> tuple[dict[str, Any], dict[str, int]]:
        data = [await self._link.read(b.table, b.address, b.count) for b in blocks]
        return decode_points(self._map, blocks, data)

    async def identify(self) -> DeviceIdentity:
        values, _ = await self._read(self._map.identity)

        def text(key: str) -> str:
            return str(values.get(f"identity.{key}") or "-")

        manufacturer = text("manufacturer")
        self._simulated = manufacturer == SIMULATOR_MANUFACTURER
        scenario = values.get("identity.scenario") or None
        return DeviceIdentity(
            manufacturer=manufacturer,
            model=text("model"),
            serial=text("serial"),
            firmware=text("firmware"),
            simulated=self._simulated,
            scenario=scenario if self._simulated else None,
        )

    async def read_sample(self) -> ApplicatorSample:
        values, raws = await self._read(self._map.telemetry)
        return decode_sample(
            self._map,
            values,
            mono_ns=self._clock.monotonic_ns(),
            utc=self._clock.utc(),
            simulated=self._simulated,
            raws=raws,
        )

    async def read_applicator(self) -> ApplicatorReading:
        return (await self.read_sample()).reading()
