"""A simulated applicator reader and positioning stand (APL-MB/1, docs/protocols.md): a
pure model advanced by ``process(dt)``, and its register image.

The model is built like simulators/model.py's source: it knows nothing about time but the
``dt`` it is given, does no I/O, and its only randomness (measurement noise) comes from one
seeded :class:`random.Random`, drawn in a fixed order once per measurement (once per
``process`` with ``dt > 0``), so a scenario, the control channel or a test gets the same
values for the same seed and the same calls, whatever the poll rate.

What it models, in the terms of docs/protocols.md:

* the reader: the applicator seated (its identity: type, diameter, serial, uses left),
  latched to the source, a seat counter (+1 at every seating, a swap included);
* the stand: the tip's position and the applicator axis's tilt, brakes, and the lock: a
  lock engages the brakes and takes the current position and axis as the reference
  (displacement and tilt are measured from it) and counts +1. The stand locks itself at the
  end of its self-test. A re-lock moves the reference; nothing else does (releasing the
  brakes does not);
* faults, latched until :meth:`ApplicatorModel.clear_fault`: ``READER`` (no identity read),
  ``POSITION`` (no displacement), ``TILT`` (no tilt), ``BRAKE`` (brake state unknown),
  ``INTERNAL`` (nothing measured can be trusted). A displacement component beyond the
  protocol's measuring range (±327.67 mm) or a tilt beyond 180° is a ``POSITION`` or
  ``TILT`` fault while it lasts, never a wrapped value;
* the heartbeat: +1 (wrapping at 2^16) at every measurement.

Environment actions a scenario or the control channel calls (part B wires them): ``drift``
(mm/min along a direction), ``bump`` (a step of N mm), ``tilt``, ``release_brakes`` /
``engage_brakes``, ``lock`` (re-lock), ``unseat`` / ``seat``, ``swap`` (a new identity),
``unlatch_source`` / ``latch_source``, ``fault`` / ``reader_fault`` / ``clear_fault``.

The register image (:func:`build_image`) lays a snapshot out as the map
``config/maps/apl-mb1.toml`` says, read by this module's own parser
(:func:`load_register_map`): written apart from the driver's decoder
(drivers/modbus_apl.py), so that the two codecs check each other; only the map file is
shared.
"""

from __future__ import annotations

import importlib.resources
import math
import random
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final

from iortd.kernel.files import FileReadError, read_small_file, toml_error
from iortd.kernel.types import ApplicatorIdentity, DeviceIdentity

__all__ = [
    "FAULT_CODES",
    "HOLDING_WINDOW",
    "INPUT_WINDOW",
    "RANGE_MM",
    "ApplicatorModel",
    "ApplicatorSnapshot",
    "IllegalAction",
    "MapError",
    "RegisterImage",
    "SimMap",
    "build_image",
    "load_register_map",
]

FAULT_CODES: Final = ("READER", "POSITION", "TILT", "BRAKE", "INTERNAL")
RANGE_MM: Final = 327.67  # each displacement component, APL-MB/1 (i16 at 0.01 mm)
TILT_RANGE_DEG: Final = 180.0
# The readable windows of APL-MB/1 (docs/protocols.md): a read outside them is answered
# with exception 02; registers without a point read 0.
INPUT_WINDOW: Final = range(0, 40)
HOLDING_WINDOW: Final = range(100, 172)
_MANUFACTURER: Final = "iortd simulator"
_VEC = tuple[float, float, float]


class IllegalAction(Exception):
    """An action the device would refuse (or that makes no sense in its state)."""


@dataclass(frozen=True, slots=True)
class ApplicatorSnapshot:
    """What the device measures and reports at one instant. ``None`` for a flag: the
    sensor cannot tell; for a measurement: not available."""

    time_s: float
    state: str  # OFF, SELF_TEST, READY, FAULT
    fault: str | None
    seated: bool | None
    source_locked: bool | None
    brakes_engaged: bool | None
    applicator: ApplicatorIdentity | None
    uses_left: int | None
    seat_counter: int
    lock_counter: int
    displacement_mm: _VEC | None
    tilt_deg: float | None
    heartbeat: int


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _unit(direction: tuple[float, ...], n: int) -> tuple[float, ...]:
    if len(direction) != n or not all(math.isfinite(c) for c in direction):
        raise ValueError(f"direction must be {n} finite numbers, got {direction!r}")
    norm = math.sqrt(sum(c * c for c in direction))
    if norm == 0:
        raise ValueError("direction must not be the zero vector")
    return tuple(c / norm for c in direction)


class ApplicatorModel:
    """The reader and stand. Position is the tip's, in mm, in the stand's own frame; tilt
    is two small rotations (degrees) of the applicator's axis, and the reported tilt is the
    angle between the axis now and at the lock (their Euclidean combination)."""

    def __init__(
        self,
        *,
        seed: int,
        applicator: ApplicatorIdentity | None = None,
        uses_left: int | None = None,
        serial: str = "APL-SIM-0001",
        self_test_s: float = 1.0,
        noise_mm: float = 0.0,
        noise_deg: float = 0.0,
    ) -> None:
        if not _finite("self_test_s", self_test_s) > 0:
            raise ValueError("self_test_s must be > 0")
        for name, v in (("noise_mm", noise_mm), ("noise_deg", noise_deg)):
            if not _finite(name, v) >= 0:
                raise ValueError(f"{name} must be >= 0")
        self._rng = random.Random(seed)  # noqa: S311 - simulation noise, not cryptography
        self._serial = serial
        self.self_test_s = float(self_test_s)
        self._noise_mm = float(noise_mm)
        self._noise_deg = float(noise_deg)
        self._time_s = 0.0
        self._state = "SELF_TEST"
        self._faults: list[str] = []  # latched, in the order they came
        self._applicator = applicator
        self._uses_left = self._check_uses(uses_left)
        self._seated = applicator is not None
        self._latched = self._seated
        self._seat_counter = 1 if self._seated else 0
        self._lock_counter = 0
        self._brakes = True
        self._pos: _VEC = (0.0, 0.0, 0.0)
        self._ref: _VEC | None = None
        self._axis: tuple[float, float] = (0.0, 0.0)
        self._axis_ref: tuple[float, float] | None = None
        self._velocity: _VEC = (0.0, 0.0, 0.0)  # mm/min
        self._noise: _VEC = (0.0, 0.0, 0.0)
        self._tilt_noise = 0.0
        self._heartbeat = 0

    @staticmethod
    def _check_uses(uses_left: int | None) -> int | None:
        if uses_left is not None and not 0 <= uses_left <= 0xFFFE:
            raise ValueError(f"uses_left must be 0..65534 or None, got {uses_left!r}")
        return uses_left

    @property
    def identity(self) -> DeviceIdentity:
        return DeviceIdentity(
            manufacturer=_MANUFACTURER,
            model="APL-SIM",
            serial=self._serial,
            firmware="1.0",
            simulated=True,
        )

    @property
    def true_displacement_mm(self) -> _VEC | None:
        """The displacement without measurement noise (the scenario's truth)."""
        if self._ref is None:
            return None
        return _sub(self._pos, self._ref)

    # ---- time ------------------------------------------------------------------------

    def process(self, dt: float) -> None:
        """Advance ``dt`` seconds: drift, self-test, and one measurement (noise drawn,
        heartbeat +1) when ``dt > 0``."""
        if not math.isfinite(dt) or dt < 0:
            raise ValueError(f"dt must be a finite number >= 0, got {dt!r}")
        if dt == 0:
            return
        self._time_s += dt
        self._pos = _add(self._pos, _scale(self._velocity, dt / 60.0))
        if self._state == "SELF_TEST" and self._time_s >= self.self_test_s - 1e-12:
            self._state = "FAULT" if self._faults else "READY"
            self.lock()
        g = self._rng.gauss
        self._noise = (g(0, self._noise_mm), g(0, self._noise_mm), g(0, self._noise_mm))
        self._tilt_noise = abs(g(0, self._noise_deg))
        self._heartbeat = (self._heartbeat + 1) & 0xFFFF

    # ---- actions -----------------------------------------------------------------------

    def drift(self, rate_mm_min: float, direction: tuple[float, float, float]) -> None:
        """Move the tip at ``rate_mm_min`` along ``direction`` from now on (0 stops)."""
        rate = _finite("rate", rate_mm_min)
        if rate < 0:
            raise ValueError(f"rate must be >= 0 mm/min, got {rate!r}")
        u = _unit(direction, 3)
        self._velocity = (rate * u[0], rate * u[1], rate * u[2])

    def bump(self, mm: float, direction: tuple[float, float, float]) -> None:
        """A step of ``mm`` along ``direction``, at once."""
        step = _finite("mm", mm)
        u = _unit(direction, 3)
        self._pos = (
            self._pos[0] + step * u[0],
            self._pos[1] + step * u[1],
            self._pos[2] + step * u[2],
        )

    def tilt(self, deg: float, direction: tuple[float, float]) -> None:
        """Tilt the applicator's axis by ``deg`` about the axes in ``direction``."""
        step = _finite("deg", deg)
        u = _unit(direction, 2)
        self._axis = (self._axis[0] + step * u[0], self._axis[1] + step * u[1])

    def release_brakes(self) -> None:
        self._brakes = False

    def engage_brakes(self) -> None:
        """Brakes on again without a new reference (:meth:`lock` takes one)."""
        self._brakes = True

    def lock(self) -> None:
        """Lock the stand where it is: brakes on, the reference zeroed, the counter +1."""
        if self._state == "SELF_TEST" and self._time_s < self.self_test_s - 1e-12:
            raise IllegalAction("lock: the stand is still in its self-test")
        self._brakes = True
        self._ref = self._pos
        self._axis_ref = self._axis
        self._lock_counter = (self._lock_counter + 1) & 0xFFFF_FFFF

    def unseat(self) -> None:
        if not self._seated:
            raise IllegalAction("unseat: no applicator is seated")
        self._seated = self._latched = False

    def seat(
        self, applicator: ApplicatorIdentity | None = None, uses_left: int | None = None
    ) -> None:
        """Seat ``applicator`` (or the one last seated) and latch it to the source."""
        if self._seated:
            raise IllegalAction("seat: an applicator is already seated (unseat or swap)")
        if applicator is not None:
            self._applicator, self._uses_left = applicator, self._check_uses(uses_left)
        if self._applicator is None:
            raise IllegalAction("seat: no applicator to seat (name one)")
        self._seat()

    def swap(self, applicator: ApplicatorIdentity, uses_left: int | None = None) -> None:
        """Another applicator seated in place of the one there (one seating)."""
        self._applicator, self._uses_left = applicator, self._check_uses(uses_left)
        self._seat()

    def _seat(self) -> None:
        self._seated = self._latched = True
        self._seat_counter = (self._seat_counter + 1) & 0xFFFF_FFFF

    def unlatch_source(self) -> None:
        self._latched = False

    def latch_source(self) -> None:
        if not self._seated:
            raise IllegalAction("latch_source: no applicator is seated")
        self._latched = True

    def fault(self, code: str) -> None:
        if code not in FAULT_CODES:
            raise IllegalAction(f"fault code {code!r}: expected one of {', '.join(FAULT_CODES)}")
        if code in self._faults:
            self._faults.remove(code)
        self._faults.append(code)
        if self._state != "SELF_TEST":
            self._state = "FAULT"

    def reader_fault(self) -> None:
        self.fault("READER")

    def clear_fault(self) -> None:
        self._faults.clear()
        if self._state == "FAULT":
            self._state = "READY"

    # ---- what the device reports --------------------------------------------------------

    def snapshot(self) -> ApplicatorSnapshot:
        faults = list(self._faults)
        internal = "INTERNAL" in faults
        displacement: _VEC | None = None
        if self._ref is not None and "POSITION" not in faults and not internal:
            displacement = _add(_sub(self._pos, self._ref), self._noise)
            if any(abs(c) > RANGE_MM for c in displacement):
                displacement = None
                faults.append("POSITION")
        tilt: float | None = None
        if self._axis_ref is not None and "TILT" not in faults and not internal:
            tilt = math.dist(self._axis, self._axis_ref) + self._tilt_noise
            if tilt > TILT_RANGE_DEG:
                tilt = None
                faults.append("TILT")
        reader_ok = "READER" not in faults and not internal
        seated = self._seated if not internal else None
        applicator = self._applicator if self._seated and reader_ok else None
        state = self._state
        if faults and state == "READY":
            state = "FAULT"
        return ApplicatorSnapshot(
            time_s=self._time_s,
            state=state,
            fault=faults[-1] if faults and state == "FAULT" else None,
            seated=seated,
            source_locked=self._latched if not internal else None,
            brakes_engaged=None if "BRAKE" in faults or internal else self._brakes,
            applicator=applicator,
            uses_left=self._uses_left if applicator is not None else None,
            seat_counter=self._seat_counter,
            lock_counter=self._lock_counter,
            displacement_mm=displacement,
            tilt_deg=tilt,
            heartbeat=self._heartbeat,
        )


def _sub(a: _VEC, b: _VEC) -> _VEC:
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2])


def _add(a: _VEC, b: _VEC) -> _VEC:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


def _scale(a: _VEC, k: float) -> _VEC:
    return (a[0] * k, a[1] * k, a[2] * k)


# ---- the register map, read by the simulator's own parser -------------------------------


class MapError(ValueError):
    """The register map cannot be served; the message names the file and the point."""


@dataclass(frozen=True, slots=True)
class _SimPoint:
    name: str
    table: str  # "input" | "holding"
    address: int
    type: str  # u16 i16 u32 i32 string
    scale: float
    length: int  # registers
    codes: Mapping[str, int] | None  # meaning -> raw
    missing: int | None


@dataclass(frozen=True, slots=True)
class SimMap:
    path: str
    points: Mapping[str, _SimPoint]


_WORDS: Final = MappingProxyType({"u16": 1, "i16": 1, "u32": 2, "i32": 2})
_SERVED: Final = frozenset(
    {
        "state",
        "fault",
        "seated",
        "source_locked",
        "brakes_engaged",
        "applicator.type",
        "applicator.diameter",
        "applicator.serial",
        "applicator.uses_left",
        "seat_counter",
        "lock_counter",
        "displacement.x",
        "displacement.y",
        "displacement.z",
        "displacement.magnitude",
        "tilt",
        "heartbeat",
        "identity.manufacturer",
        "identity.model",
        "identity.serial",
        "identity.firmware",
        "identity.scenario",
    }
)


def load_register_map(path: Path | None = None) -> SimMap:
    """The map the simulator serves (config/maps/apl-mb1.toml unless ``path``). Only
    what the simulator needs is read: the points' places, types, scales, value tables and
    ``missing``; each point must fit its window (INPUT_WINDOW / HOLDING_WINDOW)."""
    if path is None:
        path = Path(str(importlib.resources.files("iortd.config") / "maps" / "apl-mb1.toml"))
    raw = b""
    try:
        raw = read_small_file(path)
        data = tomllib.loads(raw.decode("utf-8"))
    except FileReadError as exc:
        raise MapError(f"{path}: cannot read: {exc.reason}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise MapError(f"{path}: not valid TOML: {toml_error(exc, raw)}") from None
    tables = data.get("values", {})
    points: dict[str, _SimPoint] = {}
    for i, p in enumerate(data.get("point", [])):
        name = p.get("name")
        where = f"{path}: point[{i}] ({name})"
        if name not in _SERVED:
            raise MapError(f"{where}: not a point the applicator simulator serves")
        ptype = p.get("type")
        if ptype == "string":
            length = p.get("length")
        elif ptype in _WORDS:
            length = _WORDS[ptype]
        else:
            raise MapError(f"{where}: type {ptype!r} is not served (u16, i16, u32, i32, string)")
        window = INPUT_WINDOW if p.get("table") == "input" else HOLDING_WINDOW
        address = p.get("address")
        if not isinstance(address, int) or not isinstance(length, int) or length < 1:
            raise MapError(f"{where}: address and length must be integers")
        if address not in window or address + length - 1 not in window:
            raise MapError(f"{where}: registers {address}+{length} outside {window}")
        codes = None
        if "values" in p:
            codes = MappingProxyType({str(m): int(k) for k, m in tables[p["values"]].items()})
        points[name] = _SimPoint(
            name,
            str(p["table"]),
            address,
            ptype,
            float(p.get("scale", 1)),
            length,
            codes,
            p.get("missing"),
        )
    lacking = sorted(_SERVED - set(points))
    if lacking:
        raise MapError(f"{path}: the simulator needs point(s): {', '.join(lacking)}")
    return SimMap(str(path), MappingProxyType(points))


@dataclass(frozen=True, slots=True)
class RegisterImage:
    """The registers served: ``input`` covers INPUT_WINDOW, ``holding`` HOLDING_WINDOW."""

    input: tuple[int, ...]
    holding: tuple[int, ...]


def _flag(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "no")


def _raw(p: _SimPoint, value: float | int | str | None) -> list[int]:
    """The registers of one point; never a wrapped value (a number out of its type's
    range is a bug in the caller, raised)."""
    if p.type == "string":
        data = str(value or "").encode("ascii")
        if len(data) > 2 * p.length:
            raise ValueError(f"{p.name}: {value!r} longer than {2 * p.length} characters")
        data = data.ljust(2 * p.length, b"\0")
        return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    bits = 16 * p.length
    if value is None:
        if p.missing is None:
            raise ValueError(f"{p.name}: no value and no 'missing' contents in the map")
        n = p.missing
    elif p.codes is not None:
        if str(value) not in p.codes:
            raise ValueError(f"{p.name}: {value!r} is not in the map's value table")
        n = p.codes[str(value)]
    else:
        n = round(float(value) / p.scale)
        lo, hi = (
            (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
            if p.type[0] == "i"
            else (0, (1 << bits) - 1)
        )
        n &= (1 << bits) - 1
        if not lo <= round(float(value) / p.scale) <= hi or n == p.missing:
            raise ValueError(f"{p.name}: {value!r} does not fit {p.type} at scale {p.scale:g}")
    return [(n >> 16) & 0xFFFF, n & 0xFFFF] if p.length == 2 else [n & 0xFFFF]


def build_image(
    snapshot: ApplicatorSnapshot,
    identity: DeviceIdentity,
    regmap: SimMap,
    scenario: str = "",
) -> RegisterImage:
    """The snapshot laid out in registers, as the map says (docs/protocols.md, APL-MB/1)."""
    s = snapshot
    a = s.applicator
    d = s.displacement_mm
    magnitude = None if d is None else math.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
    values: dict[str, float | int | str | None] = {
        "state": s.state,
        "fault": s.fault or "NONE",
        "seated": _flag(s.seated),
        "source_locked": _flag(s.source_locked),
        "brakes_engaged": _flag(s.brakes_engaged),
        "applicator.type": a.type if a else "NONE",
        "applicator.diameter": a.diameter_mm if a else 0,
        "applicator.serial": a.serial if a else "",
        "applicator.uses_left": s.uses_left if a else None,
        "seat_counter": s.seat_counter,
        "lock_counter": s.lock_counter,
        "displacement.x": None if d is None else d[0],
        "displacement.y": None if d is None else d[1],
        "displacement.z": None if d is None else d[2],
        "displacement.magnitude": magnitude,
        "tilt": s.tilt_deg,
        "heartbeat": s.heartbeat,
        "identity.manufacturer": identity.manufacturer,
        "identity.model": identity.model,
        "identity.serial": identity.serial,
        "identity.firmware": identity.firmware,
        "identity.scenario": scenario,
    }
    regs = {"input": [0] * len(INPUT_WINDOW), "holding": [0] * len(HOLDING_WINDOW)}
    base = {"input": INPUT_WINDOW.start, "holding": HOLDING_WINDOW.start}
    for name, p in regmap.points.items():
        words = _raw(p, values[name])
        start = p.address - base[p.table]
        regs[p.table][start : start + len(words)] = words
    return RegisterImage(tuple(regs["input"]), tuple(regs["holding"]))
