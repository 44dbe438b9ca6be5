"""The built-in ``sim`` driver: the simulated IORT source, or the simulated applicator
reader and stand, run in-process.

In the ``source`` role it advances the device model (simulators.model) by the time that
passed on the shared clock at each read, so under a speed factor the daemon and the
simulator share one compressed time base. In the ``applicator`` role it plays the
APL-MB/1 reader (simulators.apl_device: the model of simulators.applicator, refreshed at
least every 100 ms of simulated time) with the profile's applicator ``applicator`` seated,
and returns every reading as a full :class:`~iortd.kernel.types.ApplicatorReading`; there
``preset_gy`` and ``start_delay_s`` do not apply and are refused. Every reading is marked
simulated. The wire-protocol simulators (serial, Modbus) are separate; this driver is for
demos and tests of the daemon.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType, TracebackType
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from iortd.drivers.errors import DriverOptionError, TransportClosed
from iortd.drivers.interface import DriverContext, DriverSpec, Role
from iortd.kernel.types import (
    ApplicatorFault,
    ApplicatorReading,
    ApplicatorState,
    Capability,
    DeviceIdentity,
    SourceReading,
    Tristate,
)
from iortd.simulators.apl_device import ApplicatorDevice
from iortd.simulators.applicator import ApplicatorModel, ApplicatorSnapshot
from iortd.simulators.model import SourceModel
from iortd.simulators.profiles import ProfileError, load_profile
from iortd.simulators.sequence import ClinicalSequence

__all__ = ["SimApplicatorDriver", "SimDriver", "SimDriverFactory", "SimOptions", "reading_of"]


class SimOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    profile: str = Field(default="intrabeam", min_length=1)
    applicator: str = Field(min_length=1)
    preset_gy: float = Field(default=20.0, gt=0, le=50)
    start_delay_s: float = Field(default=5.0, ge=0, le=3600)
    serial: str = Field(default="SIM-0001", pattern=r"^[A-Za-z0-9._-]{1,32}$")
    seed: int | None = Field(default=None, ge=0)


def _parse(options: Mapping[str, Any], transport: Mapping[str, Any]) -> SimOptions:
    if transport and dict(transport) != {"kind": "in-process"}:
        raise DriverOptionError(
            "transport",
            "the sim driver runs in-process; omit [transport] or set kind = 'in-process'",
        )
    try:
        opts = SimOptions.model_validate(dict(options))
    except ValidationError as exc:
        e = exc.errors(include_url=False)[0]
        key = ".".join(str(p) for p in e["loc"]) or "options"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        raise DriverOptionError(f"options.{key}", msg) from None
    try:
        profile = load_profile(opts.profile)
    except ProfileError as exc:
        raise DriverOptionError("options.profile", str(exc)) from None
    if opts.applicator not in profile.applicators:
        known = ", ".join(sorted(profile.applicators))
        raise DriverOptionError(
            "options.applicator",
            f"{opts.applicator!r} is not an applicator of profile {profile.name!r} "
            f"(known: {known})",
        )
    return opts


class SimDriverFactory:
    name = "sim"
    roles: frozenset[Role] = frozenset({"source", "applicator"})
    simulated = True
    path_options = frozenset({"profile"})

    def validate(self, options: Mapping[str, Any], transport: Mapping[str, Any]) -> None:
        _parse(options, transport)

    def create(self, spec: DriverSpec, context: DriverContext) -> SimDriver | SimApplicatorDriver:
        options = _parse(spec.options, spec.transport)
        if spec.role == "applicator":
            for key in ("preset_gy", "start_delay_s"):
                if key in options.model_fields_set:
                    raise DriverOptionError(
                        f"options.{key}", "not for role 'applicator' (a reader has no dose)"
                    )
            return SimApplicatorDriver(options, context)
        return SimDriver(options, context)


class SimDriver:
    capabilities = frozenset(
        {Capability.READ_TELEMETRY, Capability.READ_INTERLOCKS, Capability.READ_APPLICATOR}
    )

    def __init__(self, options: SimOptions, context: DriverContext) -> None:
        self._options = options
        self._clock = context.clock
        self._seed = options.seed if options.seed is not None else context.seed
        self._model: SourceModel | None = None
        self._sequence: ClinicalSequence | None = None
        self._last_mono_ns = 0

    async def __aenter__(self) -> Self:
        profile = load_profile(self._options.profile)
        self._model = SourceModel(profile, seed=self._seed, serial=self._options.serial)
        self._sequence = ClinicalSequence(
            self._model,
            preset_gy=self._options.preset_gy,
            applicator_code=self._options.applicator,
            start_delay_s=self._options.start_delay_s,
        )
        self._last_mono_ns = self._clock.monotonic_ns()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._model = None
        self._sequence = None

    @property
    def model(self) -> SourceModel:
        """The device model, for in-process fault injection (tests, demo)."""
        if self._model is None:
            raise TransportClosed("sim driver is not connected")
        return self._model

    async def identify(self) -> DeviceIdentity:
        return self.model.identity()

    async def read(self) -> SourceReading:
        model, sequence = self.model, self._sequence
        if sequence is None:  # pragma: no cover - set together with the model
            raise TransportClosed("sim driver is not connected")
        now = self._clock.monotonic_ns()
        dt = (now - self._last_mono_ns) / 1e9
        self._last_mono_ns = now
        if dt > 0:
            sequence.process(dt)
        snap = model.snapshot()
        planned = (
            snap.preset_gy / snap.expected_rate_gy_min * 60.0
            if snap.expected_rate_gy_min and snap.preset_gy
            else None
        )
        return SourceReading(
            mono_ns=now,
            utc=self._clock.utc(),
            state=snap.state,
            dose_rate_gy_min=snap.dose_rate_gy_min,
            dose_primary_gy=snap.dose_primary_gy,
            dose_secondary_gy=snap.dose_secondary_gy,
            preset_gy=snap.preset_gy,
            beam_on_s=snap.beam_on_s,
            kv=snap.kv,
            ua=snap.ua,
            interlocks=MappingProxyType(dict(snap.interlocks)),
            planned_time_s=planned,
            termination=snap.termination,
            termination_reason=snap.termination_reason,
            applicator=snap.applicator,
            simulated=True,
            selection=snap.selection,
        )


_TRI = {True: Tristate.YES, False: Tristate.NO, None: Tristate.UNKNOWN}


def reading_of(snap: ApplicatorSnapshot, mono_ns: int, utc: datetime) -> ApplicatorReading:
    """One reader snapshot as the daemon's reading (what modbus-apl decodes from the
    same registers, without the register rounding)."""
    d = snap.displacement_mm
    return ApplicatorReading(
        mono_ns=mono_ns,
        utc=utc,
        applicator=snap.applicator,
        simulated=True,
        state=ApplicatorState(snap.state),
        fault=ApplicatorFault(snap.fault) if snap.fault is not None else None,
        seated=_TRI[snap.seated],
        source_locked=_TRI[snap.source_locked],
        brakes_engaged=_TRI[snap.brakes_engaged],
        uses_left=snap.uses_left,
        seat_counter=snap.seat_counter,
        lock_counter=snap.lock_counter,
        heartbeat=snap.heartbeat,
        displacement_mm=d,
        displacement_magnitude_mm=None if d is None else math.sqrt(sum(c * c for c in d)),
        tilt_deg=snap.tilt_deg,
    )


class SimApplicatorDriver:
    """The ``sim`` driver in the ``applicator`` role: the reader and stand in-process."""

    capabilities = frozenset({Capability.READ_APPLICATOR})

    def __init__(self, options: SimOptions, context: DriverContext) -> None:
        self._options = options
        self._clock = context.clock
        self._seed = options.seed if options.seed is not None else context.seed
        self._device: ApplicatorDevice | None = None

    async def __aenter__(self) -> Self:
        o = self._options
        serial = o.serial if "serial" in o.model_fields_set else "APL-SIM-0001"
        self._device = ApplicatorDevice.build(
            "applicator",
            load_profile(o.profile),
            o.applicator,
            self._clock,
            seed=self._seed,
            serial=serial,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._device = None

    @property
    def device(self) -> ApplicatorDevice:
        """The simulated reader, for in-process actions (tests, demo): ``apply``."""
        if self._device is None:
            raise TransportClosed("sim driver is not connected")
        return self._device

    @property
    def model(self) -> ApplicatorModel:
        """The reader's model, for in-process fault injection (tests, demo)."""
        return self.device.model

    async def identify(self) -> DeviceIdentity:
        return self.device.identity()

    async def read_applicator(self) -> ApplicatorReading:
        snap = self.device.advance()
        return reading_of(snap, self._clock.monotonic_ns(), self._clock.utc())
