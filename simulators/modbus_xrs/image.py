"""A model snapshot laid out in registers, as the register map says (pure functions).

:func:`point_values` says what each point name means for one snapshot, in the daemon's
units; :func:`build_image` encodes those values into the input and holding registers of a
:class:`~iortd.simulators.modbus_xrs.regmap.RegisterMap`: scale and unit, 16 or 32 bits in
the map's word order, IEEE floats, bit points sharing a register, value tables, strings,
and the ``missing`` sentinel for a value the console does not report. Numbers outside a
type's range are clamped, never wrapped.
"""

from __future__ import annotations

import math
import struct

from iortd.kernel.types import DeviceIdentity, DeviceState, Interlock
from iortd.simulators.modbus_xrs.regmap import Point, RegisterMap
from iortd.simulators.model import ModelSnapshot

__all__ = ["build_image", "point_values"]

_RANGES = {
    "u16": (0, 0xFFFF),
    "i16": (-0x8000, 0x7FFF),
    "u32": (0, 0xFFFFFFFF),
    "i32": (-0x80000000, 0x7FFFFFFF),
}
# How many of the daemon's units (Gy, Gy/min, s, kV, uA, mm) one map unit is.


def point_values(
    snap: ModelSnapshot, identity: DeviceIdentity, scenario_note: str
) -> dict[str, float | str | None]:
    """What each point name means for this snapshot, in the daemon's units (numbers),
    as a value-table meaning (enumerations), or text. ``None``: not reported."""
    state = snap.state if snap.state is not DeviceState.UNKNOWN else DeviceState.FAULT
    app = snap.applicator
    expected = snap.expected_rate_gy_min
    deviation = 0.0
    if snap.state is DeviceState.IRRADIATING and expected:
        deviation = (snap.dose_rate_gy_min / expected - 1.0) * 100.0
    out: dict[str, float | str | None] = {
        "state": state.value,
        "termination": snap.termination.value if snap.termination is not None else "NONE",
        "dose_rate": snap.dose_rate_gy_min,
        "dose_primary": snap.dose_primary_gy,
        "dose_secondary": snap.dose_secondary_gy,
        "preset": snap.preset_gy,
        "beam_on_time": snap.beam_on_s,
        "planned_time": (snap.preset_gy / expected * 60.0 if expected and snap.preset_gy else None),
        "kv": snap.kv,
        "ua": snap.ua,
        "applicator.type": app.type if app is not None else "NONE",
        "applicator.diameter": app.diameter_mm if app is not None else 0.0,
        "applicator.serial": app.serial if app is not None else "",
        "extra.rate_deviation": deviation,
        "selection": float(snap.selection),
        "identity.manufacturer": identity.manufacturer,
        "identity.model": identity.model,
        "identity.serial": identity.serial,
        "identity.firmware": identity.firmware,
        "identity.scenario": scenario_note,
    }
    for lock in Interlock:
        if lock is not Interlock.COMMUNICATION:  # the host's own, never on the wire
            state_of = snap.interlocks.get(lock)
            out[f"interlock.{lock.value}"] = state_of.value if state_of is not None else "unknown"
    return out


def _words(point: Point, value: float | str | None) -> list[int]:
    """The registers of one point for one value."""
    typ = point.type
    if typ == "string":
        text = "" if value is None else str(value)
        raw = bytes(ord(c) if 0x20 <= ord(c) <= 0x7E else 0x3F for c in text)
        raw = raw[: 2 * point.size].ljust(2 * point.size, b"\0")
        return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    if point.values is not None:
        table = point.values
        meaning = str(value)
        code = table.get(meaning)
        if code is None:  # e.g. a profile's applicator type the map does not list
            lowered = {k.lower(): v for k, v in table.items()}
            code = lowered.get(meaning.lower(), _RANGES.get(typ, (0, 0xFFFF))[1])
        number: int = code
    elif value is None or isinstance(value, str):
        if point.missing is not None:  # not reported: the sentinel's raw bits
            if point.size == 1:
                return [point.missing]
            hi, lo = point.missing >> 16, point.missing & 0xFFFF
            return [hi, lo] if point.big_endian_words else [lo, hi]
        number = 0
    elif typ == "f32":
        word = struct.pack(">f", value / point.unit_factor / point.scale)
        hi, lo = struct.unpack(">HH", word)
        return [hi, lo] if point.big_endian_words else [lo, hi]
    else:
        scaled = value / point.unit_factor / point.scale
        number = round(scaled) if math.isfinite(scaled) else 0
    lo_lim, hi_lim = _RANGES.get(typ, (0, 0xFFFF))
    number = max(lo_lim, min(hi_lim, number))
    if point.bit is not None:
        return [(1 << point.bit) if number else 0]
    if point.size == 1:
        return [number & 0xFFFF]
    raw32 = number & 0xFFFFFFFF
    hi, lo = raw32 >> 16, raw32 & 0xFFFF
    return [hi, lo] if point.big_endian_words else [lo, hi]


def build_image(
    regmap: RegisterMap,
    snap: ModelSnapshot,
    identity: DeviceIdentity,
    scenario_note: str = "",
) -> dict[str, dict[int, int]]:
    """The registers of one snapshot: ``{"input": {address: raw}, "holding": {...}}``.
    Registers of the windows that no point uses are absent (they read 0)."""
    values = point_values(snap, identity, scenario_note)
    image: dict[str, dict[int, int]] = {"input": {}, "holding": {}}
    for point in regmap.points:
        value = values.get(point.name)  # an extra.* this simulator does not know: 0
        regs = image[point.table]
        for offset, word in enumerate(_words(point, value)):
            a = point.address + offset
            regs[a] = (regs.get(a, 0) | word) if point.bit is not None else word
    return image
