"""An example third-party iortd driver: ``example-kv``.

It talks to a (fictitious) source console that answers one request per line over a serial
line or a TCP serial server, with space-separated ``key=value`` pairs::

    -> IDENT\\r\\n
    <- mfr=Example model=KV-1 serial=KV1-0042 fw=1.3\\r\\n
    -> STATUS\\r\\n
    <- state=IRRADIATING dose1=4.210 dose2=4.198 rate=0.62 preset=20 beam_s=407.3
       kv=50.0 ua=40.0 door=ok estop=ok\\r\\n                          (one line)
    <- err=E17\\r\\n                                   (the console reports a fault)

It is a template, not a product: copy the folder, rename the package and the entry point,
and replace the protocol. What it shows:

- it imports only iortd's public driver modules (docs/engineers.md, "Writing a driver"):
  ``iortd.drivers.interface``, ``.types``, ``.errors`` and ``.transport``;
- the factory checks every option and the transport in ``validate`` without opening
  anything, and each error names the key (``options.max_line``), so ``iortd check-config``
  reports it like a built-in driver's;
- every I/O goes through an iortd transport and is bounded by the device's ``timeout_s``;
  bad bytes raise ``ProtocolViolation`` (the daemon drops the frame and retries), an error
  reply raises ``DeviceFault``, and an interlock the console does not report is
  ``UNKNOWN`` (which counts as tripped), never assumed ``OK``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType, TracebackType
from typing import Any, Self

from iortd.drivers.errors import DeviceFault, DriverOptionError, ProtocolViolation
from iortd.drivers.interface import DriverContext, DriverSpec, Role
from iortd.drivers.transport import Transport, transport_from_config, validate_transport
from iortd.kernel.types import (
    Capability,
    DeviceIdentity,
    DeviceState,
    Interlock,
    InterlockState,
    SourceReading,
)

__all__ = ["ExampleKvDriver", "ExampleKvFactory", "parse_pairs"]

TERMINATOR = b"\r\n"
_DEFAULT_MAX_LINE = 256
_NUMBERS = ("dose1", "dose2", "rate", "preset", "beam_s", "kv", "ua")
_INTERLOCKS = MappingProxyType({"door": Interlock.DOOR, "estop": Interlock.EMERGENCY_STOP})
_INTERLOCK_STATES = MappingProxyType({"ok": InterlockState.OK, "trip": InterlockState.TRIPPED})


def _max_line(options: Mapping[str, Any]) -> int:
    for key in options:
        if key != "max_line":
            raise DriverOptionError(f"options.{key}", "unknown key (example-kv takes: max_line)")
    value = options.get("max_line", _DEFAULT_MAX_LINE)
    if isinstance(value, bool) or not isinstance(value, int) or not 16 <= value <= 4096:
        raise DriverOptionError("options.max_line", f"expected an integer 16..4096, got {value!r}")
    return value


def _check(options: Mapping[str, Any], transport: Mapping[str, Any]) -> int:
    max_line = _max_line(options)
    if not transport:
        raise DriverOptionError(
            "transport", 'example-kv needs a [devices.transport] table, e.g. type = "tcp"'
        )
    validate_transport(transport)
    return max_line


def _number(pairs: Mapping[str, str], key: str) -> float:
    try:
        value = float(pairs[key])
    except (KeyError, ValueError):
        raise ProtocolViolation(f"example-kv: {key} missing or not a number") from None
    if not math.isfinite(value):
        raise ProtocolViolation(f"example-kv: {key} is not finite ({value})")
    return value


def parse_pairs(line: bytes) -> dict[str, str]:
    """Split one reply (terminator included) into its pairs; ProtocolViolation if it is
    not ASCII ``key=value`` pairs or names a key twice."""
    try:
        text = line.removesuffix(TERMINATOR).decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolViolation("example-kv: reply is not ASCII") from None
    pairs: dict[str, str] = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not key or not value or key in pairs:
            raise ProtocolViolation(f"example-kv: malformed pair {item[:32]!r}")
        pairs[key] = value
    if not pairs:
        raise ProtocolViolation("example-kv: empty reply")
    return pairs


class ExampleKvFactory:
    """What the ``example-kv`` entry point names (iortd instantiates the class)."""

    name = "example-kv"
    roles: frozenset[Role] = frozenset({"source"})
    simulated = False  # its readings come from real equipment

    def validate(self, options: Mapping[str, Any], transport: Mapping[str, Any]) -> None:
        _check(options, transport)

    def create(self, spec: DriverSpec, context: DriverContext) -> ExampleKvDriver:
        max_line = _check(spec.options, spec.transport)
        transport = transport_from_config(spec.transport, timeout_s=spec.timeout_s)
        return ExampleKvDriver(transport, context, max_line=max_line)


class ExampleKvDriver:
    capabilities = frozenset({Capability.READ_TELEMETRY, Capability.READ_INTERLOCKS})

    def __init__(self, transport: Transport, context: DriverContext, *, max_line: int) -> None:
        self._transport = transport
        self._context = context
        self._max_line = max_line

    async def __aenter__(self) -> Self:
        await self._transport.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._transport.close()

    async def _ask(self, request: bytes) -> dict[str, str]:
        await self._transport.drain_input()  # a late reply is never taken for this one
        await self._transport.write(request + TERMINATOR)
        pairs = parse_pairs(await self._transport.read_until(TERMINATOR, self._max_line))
        self._context.heard(self._context.clock.monotonic_ns())
        if "err" in pairs:
            raise DeviceFault(f"example-kv: console reports {pairs['err'][:32]!r}")
        return pairs

    async def identify(self) -> DeviceIdentity:
        pairs = await self._ask(b"IDENT")
        try:
            return DeviceIdentity(
                manufacturer=pairs["mfr"],
                model=pairs["model"],
                serial=pairs["serial"],
                firmware=pairs["fw"],
                simulated=False,
            )
        except KeyError as missing:
            raise ProtocolViolation(f"example-kv: IDENT reply lacks {missing}") from None

    async def read(self) -> SourceReading:
        clock = self._context.clock
        mono_ns, utc = clock.monotonic_ns(), clock.utc()
        pairs = await self._ask(b"STATUS")
        try:
            state = DeviceState(pairs.get("state", "UNKNOWN"))
        except ValueError:
            state = DeviceState.UNKNOWN  # the tracker treats it as contradictory (FAULT)
        n = {key: _number(pairs, key) for key in _NUMBERS}
        interlocks = {
            interlock: _INTERLOCK_STATES.get(pairs.get(key, ""), InterlockState.UNKNOWN)
            for key, interlock in _INTERLOCKS.items()
        }
        return SourceReading(
            mono_ns=mono_ns,
            utc=utc,
            state=state,
            dose_rate_gy_min=n["rate"],
            dose_primary_gy=n["dose1"],
            dose_secondary_gy=n["dose2"],
            preset_gy=n["preset"],
            beam_on_s=n["beam_s"],
            kv=n["kv"],
            ua=n["ua"],
            interlocks=MappingProxyType(interlocks),
        )
