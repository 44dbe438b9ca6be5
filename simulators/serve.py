"""``iort-sim serve``: one or several simulated consoles, each on its own endpoint.

A device is described by a :class:`DeviceSpec`, from the single-device flags or from a
devices file (``--devices FILE.toml``, one ``[[device]]`` table each, validated whole
before anything is started). :func:`serve` builds a :class:`SimDevice` per spec, serves it
over its transport (XRS-ASCII/1 on a pty, XRS-MB/1 over Modbus TCP or RTU on a pty), opens
the control channel, and prints JSON lines until SIGINT/SIGTERM. Simulated time runs at one
speed for the whole process (one clock): rooms of one process stay comparable.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import math
import re
import signal
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from iortd.kernel.clock import Clock, ScaledClock, SystemClock
from iortd.kernel.files import FileReadError, read_small_file, toml_error
from iortd.kernel.types import DeviceState, InterlockState
from iortd.simulators.control import ControlError, ControlHandler, ControlServer, Served
from iortd.simulators.device import SimDevice
from iortd.simulators.modbus_xrs import (
    MapError,
    ModbusConsole,
    ModbusTcpServer,
    RegisterMap,
    RtuPtyConsole,
    default_map_path,
    load_map,
)
from iortd.simulators.model import ModelSnapshot, SourceModel
from iortd.simulators.profiles import Profile, ProfileError, is_builtin_profile, load_profile
from iortd.simulators.scenario import Scenario, ScenarioError, Step, load_scenario
from iortd.simulators.sequence import ClinicalSequence
from iortd.simulators.serial_xrs import ConsoleProtocol, PtyConsole

__all__ = [
    "FIELDS",
    "PROTOCOLS",
    "TRANSPORTS",
    "DeviceSpec",
    "ServeError",
    "SpecError",
    "build_spec",
    "load_devices",
    "serve",
    "trace_row",
]

TRANSPORTS = ("serial", "modbus-tcp", "modbus-rtu")
PROTOCOLS = {"serial": "XRS-ASCII/1", "modbus-tcp": "XRS-MB/1", "modbus-rtu": "XRS-MB/1"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DEVICE_KEYS = frozenset(
    {"name", "transport", "profile", "applicator", "preset", "start_delay", "seed", "serial"}
    | {"scenario", "port", "unit_id", "baudrate", "map", "hold_until_polled"}
)
# Keys that only make sense for some transports.
_ONLY_FOR = {
    "port": ("modbus-tcp",),
    "unit_id": ("modbus-tcp", "modbus-rtu"),
    "map": ("modbus-tcp", "modbus-rtu"),
    "baudrate": ("modbus-rtu",),
}
STOP_TIMEOUT_S = 2.0

Emit = Callable[..., None]


class SpecError(ValueError):
    """A device description that cannot be served; the message names file, device, key."""


class ServeError(Exception):
    """An endpoint or the control socket cannot be opened; the message says which."""


@dataclass
class DeviceSpec:
    name: str
    transport: str
    profile: Profile
    applicator: str
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
    maps: dict[Path, RegisterMap],
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

    name = text("name", None)
    if not _NAME.fullmatch(name):
        raise fail("name", f"use letters, digits, '.', '_' and '-' (at most 64), got {name!r}")
    transport = text("transport", None)
    if transport not in TRANSPORTS:
        raise fail("transport", f"expected one of {', '.join(TRANSPORTS)}, got {transport!r}")
    for k, allowed in _ONLY_FOR.items():
        if k in raw and transport not in allowed:
            raise fail(k, f"only for transport {' or '.join(allowed)} (this is {transport})")
    try:
        profile_name = text("profile", "intrabeam")
        profile = load_profile(
            profile_name if is_builtin_profile(profile_name) else _from(base, profile_name)
        )
    except ProfileError as exc:
        raise fail("profile", str(exc)) from None
    applicator = text("applicator", None)
    if applicator not in profile.applicators:
        known = ", ".join(sorted(profile.applicators))
        raise fail(
            "applicator",
            f"unknown applicator {applicator!r} for profile {profile.name!r} (known: {known})",
        )
    serial = text("serial", "SIM-0001")
    if not serial.isprintable() or len(serial) > 16:
        raise fail("serial", f"at most 16 printable characters, got {serial!r}")
    scenario = None
    if "scenario" in raw:
        try:
            scenario = load_scenario(scenario_path(text("scenario", None), base))
        except ScenarioError as exc:
            raise fail("scenario", str(exc)) from None
    regmap = None
    if transport != "serial":
        path = _from(base, text("map", str(default_map_path())))
        if path not in maps:
            try:
                maps[path] = load_map(path)
            except MapError as exc:
                raise fail("map", str(exc)) from None
        regmap = maps[path]
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
        unit_id=integer("unit_id", 1, 1, 247),
        baudrate=integer("baudrate", 19200, 0, 4_000_000),
        regmap=regmap,
        hold_until_polled=flag("hold_until_polled"),
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
    maps: dict[Path, RegisterMap] = {}
    ports: dict[int, str] = {}
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
        specs.append(spec)
    return specs, float(speed) if speed is not None else None


# ---- serving ---------------------------------------------------------------------------


class Endpoint(Protocol):
    async def start(self) -> None: ...

    def where(self) -> dict[str, object]: ...

    async def close(self) -> None: ...


class _SerialEndpoint:
    def __init__(self, device: SimDevice) -> None:
        self.console = PtyConsole(ConsoleProtocol(device))

    async def start(self) -> None:
        self.console.start()

    def where(self) -> dict[str, object]:
        return {"device": self.console.device}

    async def close(self) -> None:
        self.console.close()


class _RtuEndpoint:
    def __init__(self, console: RtuPtyConsole) -> None:
        self.console = console

    async def start(self) -> None:
        self.console.start()

    def where(self) -> dict[str, object]:
        return self.console.where()

    async def close(self) -> None:
        await self.console.close()


def _endpoint(spec: DeviceSpec, device: SimDevice) -> Endpoint:
    if spec.transport == "serial":
        return _SerialEndpoint(device)
    assert spec.regmap is not None  # noqa: S101 - build_spec loads one for Modbus
    console = ModbusConsole(device, spec.regmap, spec.unit_id)
    if spec.transport == "modbus-tcp":
        return ModbusTcpServer(console, port=spec.port, seed=spec.seed)
    return _RtuEndpoint(RtuPtyConsole(console, baudrate=spec.baudrate, seed=spec.seed))


FIELDS = (
    "time_s",
    "state",
    "dose_rate_gy_min",
    "dose_primary_gy",
    "dose_secondary_gy",
    "preset_gy",
    "beam_on_s",
    "kv",
    "ua",
    "termination",
    "termination_reason",
    "simulated",
)


def trace_row(s: ModelSnapshot) -> dict[str, object]:
    """One snapshot as a trace row (``iort-sim run``) or a ``terminated`` line."""
    row: dict[str, object] = {k: getattr(s, k) for k in FIELDS}
    row["interlocks"] = {str(k): str(v) for k, v in s.interlocks.items()}
    row["interlocks_clear"] = all(v is InterlockState.OK for v in s.interlocks.values())
    return row


def _device(spec: DeviceSpec, clock: Clock, emit: Emit) -> SimDevice:
    model = SourceModel(spec.profile, seed=spec.seed, serial=spec.serial)
    seq = ClinicalSequence(
        model,
        preset_gy=spec.preset,
        applicator_code=spec.applicator,
        start_delay_s=spec.start_delay,
    )
    device = SimDevice(spec.name, seq, clock, spec.scenario, hold=spec.hold_until_polled)
    name = spec.name

    def on_step(step: Step, source: str) -> None:
        if source == "scenario":
            emit(
                "scenario_step",
                device_name=name,
                action=step.action,
                at_s=step.at_s,
                time_s=round(seq.time_s, 3),
            )
        else:
            emit(
                "control",
                device_name=name,
                action=step.action,
                args=dict(step.args),
                time_s=round(seq.time_s, 3),
            )

    last: list[DeviceState] = []

    def watch(snap: ModelSnapshot) -> None:
        if not last or snap.state is not last[-1]:
            last.append(snap.state)
            emit("state", device_name=name, state=snap.state.value, time_s=round(seq.time_s, 3))
            if snap.termination is not None:
                emit("terminated", device_name=name, **trace_row(snap))

    device.on_step = on_step
    device.on_snapshot = watch
    return device


async def serve(
    specs: list[DeviceSpec], speed: float, control_path: Path | None, emit: Emit
) -> int:
    """Serve every device until SIGINT/SIGTERM and return 0. Raises ServeError (after
    closing what was opened) if an endpoint or the control socket cannot be opened."""
    clock: Clock = SystemClock() if speed == 1 else ScaledClock(speed)
    served: dict[str, Served] = {}
    endpoints: list[tuple[DeviceSpec, Endpoint]] = []
    for spec in specs:
        device = _device(spec, clock, emit)
        served[spec.name] = Served(device, spec.transport, PROTOCOLS[spec.transport])
        endpoints.append((spec, _endpoint(spec, device)))
    control = ControlServer(ControlHandler(served), control_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started: list[Endpoint] = []
    try:
        try:
            for spec, ep in endpoints:
                async with asyncio.timeout(STOP_TIMEOUT_S * 2):
                    await ep.start()
                started.append(ep)
                served[spec.name].endpoint = ep.where()
            await control.start()
        except (OSError, TimeoutError) as exc:
            where = f" on port {spec.port}" if spec.transport == "modbus-tcp" else ""
            raise ServeError(
                f"device {spec.name!r}: cannot serve {spec.transport}{where}: {exc}"
            ) from None
        except ControlError as exc:
            raise ServeError(str(exc)) from None
        for spec, ep in endpoints:
            emit(
                "serving",
                device_name=spec.name,
                transport=spec.transport,
                protocol=PROTOCOLS[spec.transport],
                **ep.where(),
                control=str(control.path),
            )
        emit("ready", devices=[s.name for s in specs], control=str(control.path))
        await stop.wait()
    finally:
        for ep in started:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await ep.close()
        await control.close(STOP_TIMEOUT_S)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    for name, s in served.items():
        emit("stopped", device_name=name, requests=s.device.requests)
    return 0
