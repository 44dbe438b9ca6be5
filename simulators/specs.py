"""What ``iort-sim serve`` serves: a :class:`DeviceSpec` per device, checked whole before
anything is started, from the single-device flags (:func:`build_spec`) or from a devices
file (:func:`load_devices`, one ``[[device]]`` table each).

A device is of a ``kind``: ``source`` (a console: XRS-ASCII/1 on a pty, XRS-MB/1 over
Modbus TCP or RTU) or ``applicator`` (an applicator reader and stand: APL-MB/1 over Modbus
TCP or RTU, unit id 2 unless configured). Modbus RTU devices with the same ``line`` share
one pty, i.e. one RS-485 line: they must agree on the baud rate and have distinct unit ids.
``reply_delay_ms`` gives a Modbus device a turnaround of its own (one slow unit on a
shared line). Errors name the file, the device and the key (or the flag).
"""

from __future__ import annotations

import importlib.resources
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iortd.kernel.files import FileReadError, read_small_file, toml_error
from iortd.simulators.applicator import MapError as AplMapError
from iortd.simulators.applicator import SimMap, load_register_map
from iortd.simulators.modbus_xrs import MapError, RegisterMap, default_map_path, load_map
from iortd.simulators.profiles import Profile, ProfileError, is_builtin_profile, load_profile
from iortd.simulators.scenario import KINDS, Scenario, ScenarioError, load_scenario

__all__ = [
    "KINDS",
    "PROTOCOLS",
    "TRANSPORTS",
    "DeviceSpec",
    "SpecError",
    "build_spec",
    "load_devices",
    "protocol_of",
    "scenario_path",
]

TRANSPORTS = ("serial", "modbus-tcp", "modbus-rtu")
PROTOCOLS = {"serial": "XRS-ASCII/1", "modbus-tcp": "XRS-MB/1", "modbus-rtu": "XRS-MB/1"}
APL_PROTOCOL = "APL-MB/1"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DEVICE_KEYS = frozenset(
    {"name", "transport", "profile", "applicator", "preset", "start_delay", "seed", "serial"}
    | {"scenario", "port", "unit_id", "baudrate", "map", "hold_until_polled"}
    | {"kind", "line", "reply_delay_ms", "uses_left"}
)
# Keys that only make sense for some transports.
_ONLY_FOR = {
    "port": ("modbus-tcp",),
    "unit_id": ("modbus-tcp", "modbus-rtu"),
    "map": ("modbus-tcp", "modbus-rtu"),
    "baudrate": ("modbus-rtu",),
    "line": ("modbus-rtu",),
    "reply_delay_ms": ("modbus-tcp", "modbus-rtu"),
}
# Keys that only make sense for one kind of device.
_KIND_ONLY = {"preset": "source", "start_delay": "source", "uses_left": "applicator"}
MAX_REPLY_DELAY_MS = 60_000


def protocol_of(kind: str, transport: str) -> str:
    """The wire protocol a device of ``kind`` speaks over ``transport``."""
    return APL_PROTOCOL if kind == "applicator" else PROTOCOLS[transport]


class SpecError(ValueError):
    """A device description that cannot be served; the message names file, device, key."""


@dataclass
class DeviceSpec:
    name: str
    transport: str
    profile: Profile
    applicator: str | None  # None: an applicator reader with nothing seated
    preset: float = 20.0
    start_delay: float = 5.0
    seed: int = 0
    serial: str = "SIM-0001"
    scenario: Scenario | None = None
    port: int = 0
    unit_id: int = 1
    baudrate: int = 19200
    regmap: RegisterMap | None = None
    # The console's clock (and so its scenario) starts at the first request or control
    # command, not when the simulator starts: a monitor that is slow to start misses nothing.
    hold_until_polled: bool = False
    kind: str = "source"  # KINDS
    line: str | None = None  # modbus-rtu: devices with the same line share one pty
    reply_delay_s: float = 0.0  # a turnaround of its own, real seconds
    uses_left: int | None = None  # applicator: the seated applicator's uses left
    apl_map: SimMap | None = None  # applicator: its register map (APL-MB/1)


_APL_MAP = Path(str(importlib.resources.files("iortd.config") / "maps" / "apl-mb1.toml"))


def scenario_path(name: str, base: Path | None = None) -> Path:
    """A path, or the name of a bundled scenario (config/scenarios/NAME.toml). A relative
    path is taken from ``base`` (a devices file's directory) when given."""
    path = _from(base, name)
    if path.suffix == ".toml" or path.exists():
        return path
    return Path(str(importlib.resources.files("iortd.config") / "scenarios" / f"{name}.toml"))


def _from(base: Path | None, name: str) -> Path:
    path = Path(name)
    return path if base is None or path.is_absolute() else base / path


def build_spec(
    raw: Mapping[str, Any],
    key: Callable[[str], str],
    maps: dict[Path, RegisterMap | SimMap],
    base: Path | None = None,
) -> DeviceSpec:
    """A checked DeviceSpec from ``raw`` (file keys); ``key(k)`` names a key in errors
    (``FILE: device[1].preset`` or ``--preset``). Relative ``profile``, ``map`` and
    ``scenario`` paths are taken from ``base`` (the devices file's directory, as the site
    config does); None (the command-line flags): from the current directory."""

    def fail(k: str, problem: str) -> SpecError:
        return SpecError(f"{key(k)}: {problem}")

    def number(k: str, default: float, *, positive: bool) -> float:
        v = raw.get(k, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise fail(k, f"expected a number, got {v!r}")
        if (positive and v <= 0) or v < 0:
            raise fail(k, f"must be {'> 0' if positive else '>= 0'}, got {v!r}")
        return float(v)

    def integer(k: str, default: int, lo: int, hi: int) -> int:
        v = raw.get(k, default)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise fail(k, f"expected an integer in {lo}..{hi}, got {v!r}")
        return v

    def flag(k: str) -> bool:
        v = raw.get(k, False)
        if not isinstance(v, bool):
            raise fail(k, f"true or false, got {v!r}")
        return v

    def text(k: str, default: str | None) -> str:
        v = raw.get(k, default)
        if not isinstance(v, str) or not v:
            raise fail(k, f"expected a non-empty string, got {v!r}")
        return v

    kind = text("kind", "source")
    if kind not in KINDS:
        raise fail("kind", f"expected one of {', '.join(KINDS)}, got {kind!r}")
    name = text("name", None)
    if not _NAME.fullmatch(name):
        raise fail("name", f"use letters, digits, '.', '_' and '-' (at most 64), got {name!r}")
    transport = text("transport", None)
    if transport not in TRANSPORTS:
        raise fail("transport", f"expected one of {', '.join(TRANSPORTS)}, got {transport!r}")
    for k, allowed in _ONLY_FOR.items():
        if k in raw and transport not in allowed:
            raise fail(k, f"only for transport {' or '.join(allowed)} (this is {transport})")
    if kind == "applicator" and transport == "serial":
        raise fail(
            "transport", "an applicator reader speaks APL-MB/1 over modbus-tcp or modbus-rtu"
        )
    for k, only in _KIND_ONLY.items():
        if k in raw and kind != only:
            raise fail(k, f"only for kind {only} (this is {kind})")
    try:
        profile_name = text("profile", "intrabeam")
        profile = load_profile(
            profile_name if is_builtin_profile(profile_name) else _from(base, profile_name)
        )
    except ProfileError as exc:
        raise fail("profile", str(exc)) from None
    applicator = text("applicator", None) if "applicator" in raw or kind == "source" else None
    if applicator is not None and applicator not in profile.applicators:
        known = ", ".join(sorted(profile.applicators))
        raise fail(
            "applicator",
            f"unknown applicator {applicator!r} for profile {profile.name!r} (known: {known})",
        )
    serial = text("serial", "APL-SIM-0001" if kind == "applicator" else "SIM-0001")
    if not serial.isprintable() or len(serial) > 16:
        raise fail("serial", f"at most 16 printable characters, got {serial!r}")
    scenario = None
    if "scenario" in raw:
        try:
            scenario = load_scenario(scenario_path(text("scenario", None), base), kind=kind)
        except ScenarioError as exc:
            raise fail("scenario", str(exc)) from None
    regmap = apl_map = None
    if kind == "applicator":
        path = _from(base, text("map", str(_APL_MAP)))
        cached = maps.get(path)
        if not isinstance(cached, SimMap):
            try:
                maps[path] = cached = load_register_map(path)
            except AplMapError as exc:
                raise fail("map", str(exc)) from None
        apl_map = cached
        codes = cached.points["applicator.type"].codes or {}
        if (
            applicator is not None
            and (kind_of := profile.applicators[applicator].type) not in codes
        ):
            raise fail(
                "applicator",
                f"type {kind_of!r} of applicator {applicator!r} has no code in the map "
                f"{cached.path} (its applicator types: {', '.join(codes)})",
            )
    elif transport != "serial":
        path = _from(base, text("map", str(default_map_path())))
        cached = maps.get(path)
        if not isinstance(cached, RegisterMap):
            try:
                maps[path] = cached = load_map(path)
            except MapError as exc:
                raise fail("map", str(exc)) from None
        regmap = cached
    line = text("line", None) if "line" in raw else None
    if line is not None and not _NAME.fullmatch(line):
        raise fail("line", f"use letters, digits, '.', '_' and '-' (at most 64), got {line!r}")
    uses_left = integer("uses_left", 0, 0, 0xFFFE) if "uses_left" in raw else None
    delay_ms = number("reply_delay_ms", 0.0, positive=False)
    if delay_ms > MAX_REPLY_DELAY_MS:
        raise fail("reply_delay_ms", f"at most {MAX_REPLY_DELAY_MS} ms, got {delay_ms:g}")
    return DeviceSpec(
        name=name,
        transport=transport,
        profile=profile,
        applicator=applicator,
        preset=number("preset", 20.0, positive=True),
        start_delay=number("start_delay", 5.0, positive=False),
        seed=integer("seed", 0, -(2**63), 2**63 - 1),
        serial=serial,
        scenario=scenario,
        port=integer("port", 0, 0, 65535),
        unit_id=integer("unit_id", 2 if kind == "applicator" else 1, 1, 247),
        baudrate=integer("baudrate", 19200, 0, 4_000_000),
        regmap=regmap,
        hold_until_polled=flag("hold_until_polled"),
        kind=kind,
        line=line,
        reply_delay_s=delay_ms / 1000.0,
        uses_left=uses_left,
        apl_map=apl_map,
    )


def _keyname(where: str) -> Callable[[str], str]:
    return lambda k: f"{where}.{k}"


def load_devices(path: Path) -> tuple[list[DeviceSpec], float | None]:
    """The devices of a devices file and its process-wide ``speed`` (None: not given)."""
    raw = b""
    try:
        raw = read_small_file(path)
        data = tomllib.loads(raw.decode("utf-8"))
    except FileReadError as exc:
        raise SpecError(f"{path}: cannot read: {exc.reason}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: cannot read: {exc}") from None
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise SpecError(f"{path}: not valid TOML: {toml_error(exc, raw)}") from None
    if unknown := set(data) - {"speed", "device"}:
        raise SpecError(f"{path}: unknown key(s) {sorted(unknown)} (known: device, speed)")
    speed = data.get("speed")
    if speed is not None and (
        isinstance(speed, bool) or not isinstance(speed, int | float) or not 0 < speed <= 1000
    ):
        raise SpecError(f"{path}: speed: expected a number in (0, 1000], got {speed!r}")
    raw_devices = data.get("device")
    if not isinstance(raw_devices, list) or not raw_devices:
        raise SpecError(f"{path}: expected at least one [[device]] table")
    specs: list[DeviceSpec] = []
    maps: dict[Path, RegisterMap | SimMap] = {}
    ports: dict[int, str] = {}
    lines: dict[str, list[DeviceSpec]] = {}
    for i, raw in enumerate(raw_devices):
        where = f"{path}: device[{i}]"
        if not isinstance(raw, dict):
            raise SpecError(f"{where}: expected a table")
        if unknown := set(raw) - _DEVICE_KEYS:
            known = ", ".join(sorted(_DEVICE_KEYS))
            raise SpecError(f"{where}: unknown key(s) {sorted(unknown)} (known: {known})")
        spec = build_spec(raw, _keyname(where), maps, path.parent)
        if any(s.name == spec.name for s in specs):
            raise SpecError(f"{where}.name: {spec.name!r} is used by an earlier device")
        if spec.transport == "modbus-tcp" and spec.port:
            if spec.port in ports:
                raise SpecError(f"{where}.port: {spec.port} is used by {ports[spec.port]!r}")
            ports[spec.port] = spec.name
        if spec.line is not None:
            _join_line(where, spec, lines.setdefault(spec.line, []))
        specs.append(spec)
    return specs, float(speed) if speed is not None else None


def _join_line(where: str, spec: DeviceSpec, on_line: list[DeviceSpec]) -> None:
    """Check that ``spec`` can share its line with the devices already on it."""
    if on_line and spec.baudrate != on_line[0].baudrate:
        first = on_line[0]
        raise SpecError(
            f"{where}.baudrate: {spec.baudrate}, but line {spec.line!r} runs at "
            f"{first.baudrate} (device {first.name!r}); devices on one line share its rate"
        )
    for other in on_line:
        if other.unit_id == spec.unit_id:
            raise SpecError(
                f"{where}.unit_id: {spec.unit_id} is used by {other.name!r} on line "
                f"{spec.line!r}; each device on a line needs its own unit id"
            )
    on_line.append(spec)
