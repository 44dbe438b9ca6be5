"""``iort-sim serve``: one or several simulated devices, each on its own endpoint.

A device is described by a :class:`DeviceSpec` (specs.py), from the single-device flags or
from a devices file (``--devices FILE.toml``, one ``[[device]]`` table each, validated
whole before anything is started). :func:`serve` builds a :class:`SimDevice` per console
and an :class:`ApplicatorDevice` per applicator reader, serves each over its transport
(XRS-ASCII/1 on a pty, XRS-MB/1 or APL-MB/1 over Modbus TCP or RTU on a pty; the RTU
devices of one ``line`` together on one pty, each at its unit id), opens the control
channel, and prints JSON lines until SIGINT/SIGTERM. Simulated time runs at one speed for
the whole process (one clock): rooms of one process stay comparable.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from iortd.kernel.clock import Clock, ScaledClock, SystemClock
from iortd.kernel.types import DeviceState, InterlockState
from iortd.simulators.apl_device import ApplicatorConsole, ApplicatorDevice
from iortd.simulators.applicator import ApplicatorSnapshot
from iortd.simulators.control import ControlError, ControlHandler, ControlServer, Served
from iortd.simulators.device import SimDevice
from iortd.simulators.modbus_xrs import ModbusConsole, ModbusSlave, ModbusTcpServer, RtuPtyConsole
from iortd.simulators.model import ModelSnapshot, SourceModel
from iortd.simulators.scenario import Step
from iortd.simulators.sequence import ClinicalSequence
from iortd.simulators.serial_xrs import ConsoleProtocol, PtyConsole
from iortd.simulators.specs import (
    PROTOCOLS,
    TRANSPORTS,
    DeviceSpec,
    SpecError,
    build_spec,
    load_devices,
    protocol_of,
    scenario_path,
)

__all__ = [
    "FIELDS",
    "PROTOCOLS",
    "TRANSPORTS",
    "DeviceSpec",
    "ServeError",
    "SpecError",
    "build_device",
    "build_spec",
    "load_devices",
    "scenario_path",
    "serve",
    "trace_row",
]

STOP_TIMEOUT_S = 2.0

Emit = Callable[..., None]


class ServeError(Exception):
    """An endpoint or the control socket cannot be opened; the message says which."""


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


Device = SimDevice | ApplicatorDevice


def _slave(spec: DeviceSpec, device: Device) -> ModbusSlave:
    if isinstance(device, ApplicatorDevice):
        assert spec.apl_map is not None  # noqa: S101 - build_spec loads one for a reader
        return ApplicatorConsole(device, spec.apl_map, spec.unit_id)
    assert spec.regmap is not None  # noqa: S101 - build_spec loads one for Modbus
    return ModbusConsole(device, spec.regmap, spec.unit_id)


def _endpoints(
    specs: list[DeviceSpec], devices: dict[str, Device]
) -> list[tuple[list[DeviceSpec], Endpoint]]:
    """One endpoint per device, but one pty per shared RTU ``line`` (its devices, in
    the order given, each answering at its own unit id)."""
    groups: list[list[DeviceSpec]] = []
    by_line: dict[str, list[DeviceSpec]] = {}
    for spec in specs:
        if spec.line is None:
            groups.append([spec])
        elif spec.line in by_line:
            by_line[spec.line].append(spec)
        else:
            by_line[spec.line] = [spec]
            groups.append(by_line[spec.line])
    out: list[tuple[list[DeviceSpec], Endpoint]] = []
    for group in groups:
        spec = group[0]
        device = devices[spec.name]
        if spec.transport == "serial":
            assert isinstance(device, SimDevice)  # noqa: S101 - build_spec: consoles only
            out.append((group, _SerialEndpoint(device)))
        elif spec.transport == "modbus-tcp":
            slave = _slave(spec, device)
            out.append((group, ModbusTcpServer(slave, port=spec.port, seed=spec.seed)))
        else:
            first, *rest = (_slave(member, devices[member.name]) for member in group)
            pty = RtuPtyConsole(first, others=rest, baudrate=spec.baudrate, seed=spec.seed)
            out.append((group, _RtuEndpoint(pty)))
    return out


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
    assert spec.applicator is not None  # noqa: S101 - build_spec: a console has one
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


def _reader(spec: DeviceSpec, clock: Clock, emit: Emit) -> ApplicatorDevice:
    device = ApplicatorDevice.build(
        spec.name,
        spec.profile,
        spec.applicator,
        clock,
        seed=spec.seed,
        serial=spec.serial,
        uses_left=spec.uses_left,
        scenario=spec.scenario,
        hold=spec.hold_until_polled,
        reply_delay_s=spec.reply_delay_s,
    )
    name = spec.name

    def on_step(step: Step, source: str) -> None:
        t = round(device.time_s, 3)
        if source == "scenario":
            emit("scenario_step", device_name=name, action=step.action, at_s=step.at_s, time_s=t)
        else:
            emit("control", device_name=name, action=step.action, args=dict(step.args), time_s=t)

    last: list[str] = []

    def watch(snap: ApplicatorSnapshot) -> None:
        if not last or snap.state != last[-1]:
            last.append(snap.state)
            emit("state", device_name=name, state=snap.state, time_s=round(device.time_s, 3))

    device.on_step = on_step
    device.on_snapshot = watch
    return device


def _where(spec: DeviceSpec, ep: Endpoint) -> dict[str, object]:
    """Where ``spec`` is served: its endpoint's place, with its own unit id on a line."""
    where = ep.where()
    if "unit_id" in where:
        where["unit_id"] = spec.unit_id
    if spec.line is not None:
        where["line"] = spec.line
    return where


def build_device(spec: DeviceSpec, clock: Clock, emit: Emit) -> Device:
    """The simulated device ``spec`` describes, printing its events through ``emit``."""
    if spec.kind == "applicator":
        return _reader(spec, clock, emit)
    device = _device(spec, clock, emit)
    device.reply_delay_base_s = spec.reply_delay_s
    return device


async def serve(
    specs: list[DeviceSpec], speed: float, control_path: Path | None, emit: Emit
) -> int:
    """Serve every device until SIGINT/SIGTERM and return 0. Raises ServeError (after
    closing what was opened) if an endpoint or the control socket cannot be opened."""
    clock: Clock = SystemClock() if speed == 1 else ScaledClock(speed)
    served: dict[str, Served] = {}
    devices: dict[str, Device] = {}
    for spec in specs:
        devices[spec.name] = device = build_device(spec, clock, emit)
        served[spec.name] = Served(device, spec.transport, protocol_of(spec.kind, spec.transport))
    endpoints = _endpoints(specs, devices)
    control = ControlServer(ControlHandler(served), control_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started: list[Endpoint] = []
    try:
        try:
            for group, ep in endpoints:
                spec = group[0]
                async with asyncio.timeout(STOP_TIMEOUT_S * 2):
                    await ep.start()
                started.append(ep)
                for member in group:
                    served[member.name].endpoint = _where(member, ep)
            await control.start()
        except (OSError, TimeoutError) as exc:
            where = f" on port {spec.port}" if spec.transport == "modbus-tcp" else ""
            raise ServeError(
                f"device {spec.name!r}: cannot serve {spec.transport}{where}: {exc}"
            ) from None
        except ControlError as exc:
            raise ServeError(str(exc)) from None
        for group, ep in endpoints:
            for spec in group:
                emit(
                    "serving",
                    device_name=spec.name,
                    kind=spec.kind,
                    transport=spec.transport,
                    protocol=protocol_of(spec.kind, spec.transport),
                    **_where(spec, ep),
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
