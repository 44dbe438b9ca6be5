"""The ``serial-xrs`` driver: an IORT source console speaking XRS-ASCII/1 on a serial line.

The protocol (docs/protocols.md) is decoded by the sans-I/O codec in drivers/xrs_ascii.py;
this module only runs the exchanges over a transport (drivers/transport/): one request,
one reply, every exchange bounded by the device's ``timeout_s``. A reading may take two
exchanges (status, then every ``applicator_every`` reads the applicator): it is
timestamped at the status reply, and every good reply is reported to the daemon as it comes
(``DriverContext.heard``), so that a slow console is judged stale by its last reply, not by
the driver's last finished reading. Pending input is discarded
before every request, and after a timeout or a frame that cannot be read the driver also
waits (one timeout at most) for a late reply and drops it, so that a late reply is never
taken for the answer to the next request.

It is a passive monitor: it sends ``ID``, ``ST`` and ``AP`` only. ``AB`` (beam abort) is
specified but this driver never sends it.

A console that identifies itself with the manufacturer ``iortd simulator`` is the
project's own simulator: its readings are marked simulated, whatever the transport.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from types import MappingProxyType, TracebackType
from typing import Any, Self

from iortd.drivers.errors import (
    DeviceFault,
    DriverOptionError,
    ProtocolViolation,
    TransportClosed,
    TransportTimeout,
)
from iortd.drivers.interface import DriverContext, DriverSpec, Role
from iortd.drivers.transport import Transport, transport_from_config, validate_transport
from iortd.drivers.xrs_ascii import (
    MAX_FRAME,
    Command,
    Frame,
    decode_applicator,
    decode_identity,
    decode_status,
    encode_request,
    parse_frame,
)
from iortd.kernel.types import ApplicatorIdentity, Capability, DeviceIdentity, SourceReading

__all__ = ["SIMULATOR_MANUFACTURER", "SerialXrsDriver", "SerialXrsFactory"]

SIMULATOR_MANUFACTURER = "iortd simulator"
_OPTIONS: Mapping[str, type] = MappingProxyType({"applicator_every": int})


def _check(options: Mapping[str, Any], transport: Mapping[str, Any]) -> int:
    for key in options:
        if key not in _OPTIONS:
            raise DriverOptionError(
                f"options.{key}", "unknown key (serial-xrs takes: applicator_every)"
            )
    every = options.get("applicator_every", 10)
    if not isinstance(every, int) or isinstance(every, bool) or not 1 <= every <= 1000:
        raise DriverOptionError(
            "options.applicator_every",
            f"expected an integer 1..1000 (reads per AP request); got {every!r}",
        )
    if not transport:
        raise DriverOptionError(
            "transport", 'serial-xrs needs a [devices.transport] table, e.g. type = "serial"'
        )
    validate_transport(transport)
    return every


class SerialXrsFactory:
    name = "serial-xrs"
    roles: frozenset[Role] = frozenset({"source"})
    simulated = False  # real equipment; a simulator on the line says so in its ID

    def validate(self, options: Mapping[str, Any], transport: Mapping[str, Any]) -> None:
        _check(options, transport)

    def create(self, spec: DriverSpec, context: DriverContext) -> SerialXrsDriver:
        every = _check(spec.options, spec.transport)
        return SerialXrsDriver(
            transport_from_config(spec.transport, timeout_s=spec.timeout_s),
            context,
            applicator_every=every,
        )


class SerialXrsDriver:
    capabilities = frozenset(
        {Capability.READ_TELEMETRY, Capability.READ_INTERLOCKS, Capability.READ_APPLICATOR}
    )

    def __init__(
        self, transport: Transport, context: DriverContext, *, applicator_every: int = 10
    ) -> None:
        self._transport = transport
        self._clock = context.clock
        self._heard = context.heard
        self._every = applicator_every
        self._reads = 0
        self._applicator: ApplicatorIdentity | None = None
        self._simulated = False
        self._open = False
        self._late_reply_possible = False

    async def __aenter__(self) -> Self:
        await self._transport.open()
        self._open = True
        # A line just (re)opened may still carry a reply that an earlier connection gave
        # up on: resynchronise before the first request.
        self._late_reply_possible = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        await self._transport.close()

    async def _exchange(self, command: Command) -> Frame:
        if not self._open:
            raise TransportClosed(f"serial-xrs: {self._transport.describe()} is not open")
        if self._late_reply_possible:
            await self._settle()
        # A console never talks unasked: anything pending now is stale (the rest of an
        # earlier answer), never the answer to this request.
        await self._transport.drain_input()
        await self._transport.write(encode_request(command))
        line = await self._transport.read_until(b"\n", MAX_FRAME)
        frame = parse_frame(line)
        # The device answered: staleness counts from here, also while the reading this
        # reply belongs to is still being assembled (a status, then an applicator).
        self._heard(self._clock.monotonic_ns())
        return frame

    async def _settle(self) -> None:
        """After a timeout or a frame that could not be read, the console may still be
        answering the old request: wait one reply timeout at most for that line and drop
        it, so that it is never taken for the answer to the next request (a plain drain
        would miss a reply still on its way)."""
        with contextlib.suppress(TransportTimeout, ProtocolViolation):
            await self._transport.read_until(b"\n", MAX_FRAME)
        await self._transport.drain_input()
        self._late_reply_possible = False

    async def _ask(self, command: Command) -> Frame:
        """One exchange; after a failure the next one resynchronises first."""
        try:
            return await self._exchange(command)
        except (TransportTimeout, ProtocolViolation):
            self._late_reply_possible = True
            raise

    async def identify(self) -> DeviceIdentity:
        ident = decode_identity(await self._ask(Command.IDENTIFY))
        self._simulated = ident.manufacturer == SIMULATOR_MANUFACTURER
        return DeviceIdentity(
            manufacturer=ident.manufacturer,
            model=ident.model,
            serial=ident.serial,
            firmware=ident.firmware,
            simulated=self._simulated,
            scenario=ident.scenario if self._simulated else None,
        )

    async def read(self) -> SourceReading:
        # The reading is timestamped at the status reply, which all its values come from;
        # the applicator exchange that may follow reports itself through ``heard``.
        status = decode_status(await self._ask(Command.STATUS))
        mono_ns, utc = self._clock.monotonic_ns(), self._clock.utc()
        if self._reads % self._every == 0:
            try:
                self._applicator = decode_applicator(await self._ask(Command.APPLICATOR))
            except (ProtocolViolation, DeviceFault):
                # The status (and its interlocks, the applicator's among them) is good:
                # keep it, with the applicator last known, and ask again next read.
                self._reads -= 1
        self._reads += 1
        return SourceReading(
            mono_ns=mono_ns,
            utc=utc,
            state=status.state,
            dose_rate_gy_min=status.dose_rate_gy_min,
            dose_primary_gy=status.dose_primary_gy,
            dose_secondary_gy=status.dose_secondary_gy,
            preset_gy=status.preset_gy,
            beam_on_s=status.beam_on_s,
            kv=status.kv,
            ua=status.ua,
            interlocks=MappingProxyType(status.interlocks),
            planned_time_s=status.planned_time_s,
            termination=status.termination,
            applicator=self._applicator,
            simulated=self._simulated,
            selection=status.selection,
        )
