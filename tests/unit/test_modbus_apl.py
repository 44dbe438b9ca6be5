"""APL-MB/1 on the host's side: the register map as data, the decoder's checks of every
value (each refusal names the register), and the ``modbus-apl`` driver against a scripted
device over Modbus TCP and RTU framing, like tests/unit/test_modbus_xrs_driver.py."""

# ruff: noqa: E501 - the value cases read best one per line
from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from test_modbus_codec import crc16_modbus
from test_modbus_map import text_registers

from iortd.drivers.errors import DriverOptionError, ProtocolViolation, TransportTimeout
from iortd.drivers.interface import ApplicatorDriver, DriverContext, DriverFactory, DriverSpec
from iortd.drivers.modbus_apl import (
    MAGNITUDE_TOLERANCE_MM,
    ModbusAplDriver,
    ModbusAplFactory,
    decode_points,
    decode_sample,
    load_apl_map,
)
from iortd.drivers.modbus_codec import Framing, ModbusDeviceError, Table
from iortd.drivers.modbus_map import MapError, load_map, resolve_map
from iortd.drivers.registry import DriverRegistry
from iortd.drivers.transport import Eof, Expect, Reply, ScriptedTransport
from iortd.kernel.clock import SystemClock
from iortd.kernel.types import (
    ApplicatorFault,
    ApplicatorIdentity,
    ApplicatorReading,
    ApplicatorState,
    Tristate,
)

CTX = DriverContext(clock=SystemClock(), seed=0)
BUNDLED = Path(__file__).resolve().parents[2] / "config" / "maps" / "apl-mb1.toml"
MAP = load_apl_map(resolve_map("apl-mb1"))
H = bytes.fromhex
T0 = datetime(2026, 12, 6, 4, 0, tzinfo=UTC)

# Input registers 0-25 of a reader with a 30 mm sphere seated, the stand locked twice and
# drifted, worked by hand from docs/protocols.md ("APL-MB/1").
TELEMETRY = [
    2,  # 0 state READY
    0,  # 1 fault NONE
    1,  # 2 seated yes
    1,  # 3 locked to the source yes
    1,  # 4 brakes engaged yes
    1,  # 5 applicator spherical
    300,  # 6 diameter 30.0 mm
    *text_registers("APP-0042", 8),  # 7-14 serial
    17,  # 15 uses left
    0x0000, 0x0003,  # 16-17 seat counter 3
    0x0001, 0x0002,  # 18-19 lock counter 65538
    123,  # 20 x +1.23 mm
    0xFFCE,  # 21 y -0.50 mm
    200,  # 22 z +2.00 mm
    240,  # 23 |d| 2.40 mm (sqrt(1.23^2 + 0.5^2 + 2^2) = 2.4006)
    35,  # 24 tilt 0.35 deg
    0xBEEF,  # 25 heartbeat
]  # fmt: skip


def identity(manufacturer: str, scenario: str = "") -> list[int]:
    return (
        text_registers(manufacturer, 16)
        + text_registers("APL-1", 8)
        + text_registers("RD-0007", 8)
        + text_registers("2.1", 8)
        + text_registers(scenario, 32)
    )


def tcp_reply(tid: int, function: int, registers: Sequence[int], unit: int = 2) -> bytes:
    pdu = bytes([function, 2 * len(registers)]) + b"".join(r.to_bytes(2, "big") for r in registers)
    return (
        tid.to_bytes(2, "big") + b"\0\0" + (len(pdu) + 1).to_bytes(2, "big") + bytes([unit]) + pdu
    )


def rtu_reply(function: int, registers: Sequence[int], unit: int = 2) -> bytes:
    body = bytes([unit, function, 2 * len(registers)])
    body += b"".join(r.to_bytes(2, "big") for r in registers)
    return body + crc16_modbus(body).to_bytes(2, "little")


def rtu_exception(function: int, code: int, unit: int = 2) -> bytes:
    body = bytes([unit, function | 0x80, code])
    return body + crc16_modbus(body).to_bytes(2, "little")


# Requests worked by hand: read holding 100+72 and input 0+26 of unit 2.
def TCP_ID(tid: int) -> bytes:
    return tid.to_bytes(2, "big") + H("00 00 00 06 02 03 00 64 00 48")


def TCP_ST(tid: int) -> bytes:
    return tid.to_bytes(2, "big") + H("00 00 00 06 02 04 00 00 00 1A")


RTU_ST = H("02 04 00 00 00 1A") + crc16_modbus(H("02 04 00 00 00 1A")).to_bytes(2, "little")
RTU_ID = H("02 03 00 64 00 48") + crc16_modbus(H("02 03 00 64 00 48")).to_bytes(2, "little")


def decode(regs: Sequence[int]) -> ApplicatorReading:
    values, raws = decode_points(MAP, MAP.telemetry, [list(regs)])
    return decode_sample(MAP, values, mono_ns=1, utc=T0, simulated=False, raws=raws)


def with_(changes: dict[int, int]) -> list[int]:
    regs = list(TELEMETRY)
    for i, v in changes.items():
        regs[i] = v
    return regs


# ---- the map ---------------------------------------------------------------------------


def test_the_bundled_map_reads_in_one_telemetry_and_one_identity_request() -> None:
    assert Path(MAP.path).read_bytes() == BUNDLED.read_bytes()
    assert [(b.table, b.address, b.count) for b in MAP.telemetry] == [(Table.INPUT, 0, 26)]
    assert [(b.table, b.address, b.count) for b in MAP.identity] == [(Table.HOLDING, 100, 72)]


def test_the_source_consoles_loader_refuses_the_applicator_map() -> None:
    """So ``modbus-xrs`` with ``map = "apl-mb1"`` fails at check-config, not in a delivery."""
    with pytest.raises(MapError, match="unknown point name"):
        load_map(BUNDLED)


def test_the_applicator_loader_refuses_a_source_map() -> None:
    with pytest.raises(
        MapError,
        match=r"xrs-mb1\.toml: point\[0\] \(state\)\.values: table 'state' means 'EMERGENCY_STOP'",
    ):
        load_apl_map(resolve_map("xrs-mb1"))


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ('name = "heartbeat"', 'name = "heartbeet"', r"point\[16\] \(heartbeet\)\.name: unknown point name"),
        ('unit = "deg"', 'unit = "rad"', r"point\[15\] \(tilt\)\.unit: expected one of deg, mrad"),
        ("address = 25", "address = 24", r"point \(heartbeat\)\.address: input register 24 is already part of tilt"),
        ('name = "tilt"', 'name = "extra.tilt"', r"point: required point\(s\) missing: tilt"),
        ('values = "fault"', 'values = "nope"', r"point\[1\] \(fault\)\.values: expected the name of a \[values\] table"),
        ('type = "i16"', 'type = "u16"', r"point\[11\] \(displacement\.x\)\.type: expected f32 or i16 or i32; got \'u16\'"),
        ("missing = 32768", "", r"point\[11\] \(displacement\.x\)\.missing: required"),
        ('format = "iortd-register-map/1"', 'format = "x"', r"format: expected 'iortd-register-map/1'"),
        ('word_order = "big"', 'word_order = "big"\ncolour = 1', r"colour: unknown key"),
        ('values = "state"', 'values = "state"\nscale = 1', r"point\[0\] \(state\)\.scale: not for an enumerated point"),
    ],
)  # fmt: skip
def test_a_broken_map_names_the_file_the_point_and_the_key(
    tmp_path: Path, old: str, new: str, where: str
) -> None:
    text = BUNDLED.read_text("utf-8")
    assert old in text
    path = tmp_path / "apl.toml"
    path.write_text(text.replace(old, new, 1), "utf-8")
    with pytest.raises(MapError, match=rf"^{path}: {where}"):
        load_apl_map(path)


# ---- the decoder ---------------------------------------------------------------------------


def test_the_documented_values() -> None:
    s = decode(TELEMETRY)
    assert s.state is ApplicatorState.READY
    assert s.fault is None
    assert (s.seated, s.source_locked, s.brakes_engaged) == (
        Tristate.YES,
        Tristate.YES,
        Tristate.YES,
    )
    assert s.applicator == ApplicatorIdentity(type="spherical", diameter_mm=30.0, serial="APP-0042")
    assert s.uses_left == 17
    assert (s.seat_counter, s.lock_counter, s.heartbeat) == (3, 65538, 0xBEEF)
    assert s.displacement_mm == pytest.approx((1.23, -0.5, 2.0), abs=1e-12)
    assert s.displacement_magnitude_mm == pytest.approx(2.40, abs=1e-12)
    assert s.tilt_deg == pytest.approx(0.35, abs=1e-12)
    assert (s.mono_ns, s.utc, s.simulated) == (1, T0, False)


def test_the_driver_reads_the_kernels_applicator_reading() -> None:
    """One type for the applicator side (kernel.types), so the daemon needs nothing from
    the driver's modules; a reading that carries only an identity (a console's report of
    its applicator) is never read as safe."""
    assert type(decode(TELEMETRY)) is ApplicatorReading
    bare = ApplicatorReading(mono_ns=1, utc=T0, applicator=None, simulated=False)
    assert (bare.state, bare.fault) == (ApplicatorState.UNKNOWN, None)
    assert (bare.seated, bare.source_locked, bare.brakes_engaged) == (Tristate.UNKNOWN,) * 3
    assert (bare.uses_left, bare.seat_counter, bare.lock_counter, bare.heartbeat) == (None,) * 4
    assert (bare.displacement_mm, bare.displacement_magnitude_mm, bare.tilt_deg) == (None,) * 3
    assert bare.extra == {}


def test_not_available_values() -> None:
    s = decode(with_({15: 0xFFFF, 20: 0x8000, 21: 0x8000, 22: 0x8000, 23: 0xFFFF, 24: 0xFFFF}))
    assert (s.uses_left, s.displacement_mm, s.displacement_magnitude_mm, s.tilt_deg) == (None,) * 4


def test_no_applicator() -> None:
    s = decode(with_({2: 0, 3: 0, 5: 0, 6: 0, **dict.fromkeys(range(7, 15), 0), 15: 0xFFFF}))
    assert (s.applicator, s.seated, s.source_locked) == (None, Tristate.NO, Tristate.NO)


def test_a_fault_with_its_code_and_unlisted_codes_fail_safe() -> None:
    s = decode(with_({0: 3, 1: 2}))
    assert (s.state, s.fault) == (ApplicatorState.FAULT, ApplicatorFault.POSITION)
    s = decode(with_({0: 3, 1: 99}))
    assert (s.state, s.fault) == (ApplicatorState.FAULT, ApplicatorFault.UNKNOWN)
    s = decode(with_({0: 42, 1: 7, 2: 9, 4: 3}))  # a state, a fault and flags not listed
    assert (s.state, s.fault) == (ApplicatorState.UNKNOWN, ApplicatorFault.UNKNOWN)
    assert (s.seated, s.brakes_engaged) == (Tristate.UNKNOWN, Tristate.UNKNOWN)


def test_the_magnitude_may_differ_from_the_components_by_rounding_only() -> None:
    # |(1.23, -0.50, 2.00)| = 2.4006: 2.39 and 2.41 are within 0.02 mm, 2.37 and 2.43 are not
    for raw in (239, 241, 242):
        assert decode(with_({23: raw})).displacement_magnitude_mm == pytest.approx(raw / 100)
    assert MAGNITUDE_TOLERANCE_MM == 0.02
    for raw in (237, 243, 0):
        with pytest.raises(
            ProtocolViolation, match=r"input register 23 \(displacement\.magnitude\)"
        ):
            decode(with_({23: raw}))


@pytest.mark.parametrize(
    ("changes", "register"),
    [
        ({1: 1}, r"input register 1 \(fault\): READER while the state is READY"),
        ({0: 3}, r"input register 1 \(fault\): NONE while the state is FAULT"),
        ({5: 9}, r"input register 5 \(applicator\.type\): code 9 is not in the map's table"),
        ({6: 0}, r"input register 6 \(applicator\.diameter\): 0"),
        ({6: 2001}, r"input register 6 \(applicator\.diameter\): 200\.1"),
        (dict.fromkeys(range(7, 15), 0), r"input registers 7-14 \(applicator\.serial\): empty"),
        ({7: 0x8041}, r"input registers 7-14 \(applicator\.serial\): applicator\.serial: not ASCII text"),
        ({5: 0}, r"input register 6 \(applicator\.diameter\): 30 mm with no applicator"),
        ({5: 0, 6: 0}, r"input registers 7-14 \(applicator\.serial\): 'APP-0042' with no applicator"),
        ({5: 0, 6: 0, **dict.fromkeys(range(7, 15), 0)}, r"input register 15 \(applicator\.uses_left\): 17 with no applicator"),
        ({20: 0x8000}, r"input registers 20-23 \(displacement\): x, y, z and magnitude are reported together"),
        ({23: 0xFFFF}, r"input registers 20-23 \(displacement\)"),
        ({24: 18001}, r"input register 24 \(tilt\): 180\.01"),
    ],
)  # fmt: skip
def test_a_bad_value_is_refused_naming_the_register(changes: dict[int, int], register: str) -> None:
    with pytest.raises(ProtocolViolation, match=register):
        decode(with_(changes))


# ---- the driver --------------------------------------------------------------------------


def driver(t: ScriptedTransport, framing: Framing, timeout_s: float = 1.0) -> ModbusAplDriver:
    return ModbusAplDriver(t, CTX, MAP, framing=framing, timeout_s=timeout_s)


async def test_identify_and_read_over_tcp() -> None:
    heard: list[int] = []
    ctx = DriverContext(clock=SystemClock(), seed=0, heard=heard.append)
    t = ScriptedTransport(
        [
            *(
                Expect(TCP_ID(1)),
                Reply(tcp_reply(1, 3, identity("iortd simulator", "drift 0123456789ab"))),
            ),
            *(Expect(TCP_ST(2)), Reply(tcp_reply(2, 4, TELEMETRY))),
        ]
    )
    d = ModbusAplDriver(t, ctx, MAP, framing=Framing.TCP)
    assert isinstance(d, ApplicatorDriver)
    async with d:
        ident = await d.identify()
        sample = await d.read_applicator()
    t.assert_done()
    assert (ident.manufacturer, ident.model, ident.serial, ident.firmware) == (
        "iortd simulator",
        "APL-1",
        "RD-0007",
        "2.1",
    )
    assert (ident.simulated, ident.scenario) == (True, "drift 0123456789ab")
    assert sample.simulated is True
    assert sample.displacement_magnitude_mm == pytest.approx(2.4)
    assert len(heard) == 2  # each good reply is heard, for staleness


async def test_identify_and_read_over_rtu_unit_2_by_default() -> None:
    t = ScriptedTransport(
        [
            *(Expect(RTU_ID), Reply(rtu_reply(3, identity("Example Medical", "fake")))),
            *(Expect(RTU_ST), Reply(rtu_reply(4, TELEMETRY))),
            *(Expect(RTU_ST), Reply(rtu_reply(4, with_({0: 3, 1: 1})))),
        ],
        timeout_s=0.5,
    )
    async with driver(t, Framing.RTU, 0.5) as d:
        ident = await d.identify()
        reading = await d.read_applicator()
        second = await d.read_applicator()
    t.assert_done()
    assert (ident.simulated, ident.scenario) == (False, None)
    assert reading.applicator is not None
    assert reading.applicator.serial == "APP-0042"
    assert (second.state, second.fault) == (ApplicatorState.FAULT, ApplicatorFault.READER)


async def test_an_exception_and_a_bad_value_then_the_next_read_works() -> None:
    t = ScriptedTransport(
        [
            *(Expect(RTU_ST), Reply(rtu_exception(4, 0x04))),
            *(Expect(RTU_ST), Reply(rtu_reply(4, with_({24: 40000})))),
            *(Expect(RTU_ST), Reply(rtu_reply(4, TELEMETRY))),
        ]
    )
    async with driver(t, Framing.RTU) as d:
        with pytest.raises(ModbusDeviceError, match="Server Device Failure"):
            await d.read_applicator()
        with pytest.raises(ProtocolViolation, match="tilt"):
            await d.read_applicator()
        assert (await d.read_applicator()).tilt_deg == pytest.approx(0.35)
    t.assert_done()


async def test_a_late_rtu_reply_is_never_taken_for_the_next_one() -> None:
    late = with_({20: 5000, 21: 0, 22: 0, 23: 5000})  # 50 mm: wrong if believed
    t = ScriptedTransport(
        [
            *(Expect(RTU_ST), Reply(rtu_reply(4, late), delay_s=0.8)),
            *(Expect(RTU_ST), Reply(rtu_reply(4, TELEMETRY))),
        ],
        timeout_s=0.5,
    )
    async with driver(t, Framing.RTU, 0.5) as d:
        with pytest.raises(TransportTimeout):
            await d.read_applicator()
        assert (await d.read_applicator()).displacement_magnitude_mm == pytest.approx(2.4)
    t.assert_done()


async def test_another_units_reply_on_a_shared_line_is_not_taken() -> None:
    """On an RS-485 line shared with the source console (unit 1), a reply from unit 1 is
    skipped like line noise, a few bytes at most, or refused: never read as ours."""
    t = ScriptedTransport([Expect(RTU_ST), Reply(rtu_reply(4, TELEMETRY, unit=1))], timeout_s=0.5)
    async with driver(t, Framing.RTU, 0.5) as d:
        with pytest.raises((ProtocolViolation, TransportTimeout)):
            await d.read_applicator()


async def test_a_closed_link_is_transport_closed() -> None:
    t = ScriptedTransport([Expect(TCP_ST(1)), Eof()])
    async with driver(t, Framing.TCP) as d:
        with pytest.raises(Exception, match="closed") as excinfo:
            await d.read_applicator()
    assert type(excinfo.value).__name__ == "TransportClosed"


# ---- the factory -------------------------------------------------------------------------


TCP = {"type": "tcp", "host": "192.0.2.20", "port": 502}


def test_the_factory_serves_the_applicator_role() -> None:
    f = ModbusAplFactory()
    factory: DriverFactory = f  # a valid factory for mypy too
    assert DriverRegistry.of([factory]).get("modbus-apl") is f
    assert (f.name, f.roles, f.simulated, f.path_options) == (
        "modbus-apl",
        frozenset({"applicator"}),
        False,
        frozenset({"map"}),
    )
    spec = DriverSpec(
        name="stand-1",
        role="applicator",
        poll_interval_s=0.1,
        timeout_s=0.3,
        transport=TCP,
        options={},
    )
    d = f.create(spec, CTX)
    assert isinstance(d, ModbusAplDriver)
    assert isinstance(d, ApplicatorDriver)
    assert (d.unit, d.framing) == (2, Framing.TCP)
    rtu = ModbusAplFactory().create(
        DriverSpec(
            "stand-1",
            "applicator",
            0.1,
            0.3,
            {"type": "serial", "port": "/dev/ttyUSB0"},
            {"unit_id": 5},
        ),
        CTX,
    )
    assert (rtu.unit, rtu.framing) == (5, Framing.RTU)


@pytest.mark.parametrize(
    ("options", "transport", "key", "text"),
    [
        ({"unit": 2}, TCP, "options.unit", "unknown key (modbus-apl takes: map, unit_id, framing)"),
        ({"unit_id": 248}, TCP, "options.unit_id", "1..247"),
        ({"unit_id": True}, TCP, "options.unit_id", "1..247"),
        ({}, {}, "transport", "needs a [devices.transport]"),
        ({"framing": "tcp"}, {"type": "serial", "port": "/dev/x"}, "options.framing", "tcp transport"),
        ({"framing": "ascii"}, TCP, "options.framing", "'auto', 'tcp' or 'rtu'"),
        ({"map": "no-such-map"}, TCP, "options.map", "no such register map"),
        ({"map": "xrs-mb1"}, TCP, "options.map", "not one of FAULT, OFF, READY, SELF_TEST"),
    ],
)  # fmt: skip
def test_options_are_checked_with_the_key_named(
    options: dict[str, object], transport: dict[str, object], key: str, text: str
) -> None:
    with pytest.raises(DriverOptionError) as excinfo:
        ModbusAplFactory().validate(options, transport)
    assert excinfo.value.key == key
    assert text in excinfo.value.message


def test_flags_may_be_bits_of_one_status_word(tmp_path: Path) -> None:
    """A reader that packs seated / latched / braked into one status word is a map,
    not code; two flags on one bit are refused."""
    text = BUNDLED.read_text("utf-8")
    text = text.replace("[values.flag]", '[values.bit]\n0 = "no"\n1 = "yes"\n\n[values.flag]')
    for name, old, bit in (("seated", 2, 0), ("source_locked", 3, 1), ("brakes_engaged", 4, 2)):
        block = f'name = "{name}"\ntable = "input"\naddress = {old}\ntype = "u16"\nvalues = "flag"'
        assert block in text
        text = text.replace(
            block,
            block.replace(f"address = {old}", "address = 2").replace(
                'values = "flag"', f'values = "bit"\nbit = {bit}'
            ),
        )
    path = tmp_path / "bits.toml"
    path.write_text(text, "utf-8")
    regmap = load_apl_map(path)
    regs = with_({2: 0b101, 3: 0, 4: 0})  # seated, not latched, braked
    data = [regs[b.address : b.address + b.count] for b in regmap.telemetry]
    assert len(data) == 2  # registers 3-4 are no longer mapped: two reads
    values, raws = decode_points(regmap, regmap.telemetry, data)
    s = decode_sample(regmap, values, mono_ns=1, utc=T0, simulated=False, raws=raws)
    assert (s.seated, s.source_locked, s.brakes_engaged) == (
        Tristate.YES,
        Tristate.NO,
        Tristate.YES,
    )
    path.write_text(text.replace("bit = 2", "bit = 1"), "utf-8")
    with pytest.raises(
        MapError,
        match=r"point \(brakes_engaged\)\.bit: bit 1 of input register 2 is already source_locked",
    ):
        load_apl_map(path)


async def test_a_stale_tcp_reply_before_the_answer_is_passed_over() -> None:
    stale = with_({20: 5000, 21: 0, 22: 0, 23: 5000})
    t = ScriptedTransport(
        [Expect(TCP_ST(1)), Reply(tcp_reply(7, 4, stale) + tcp_reply(1, 4, TELEMETRY))]
    )
    async with driver(t, Framing.TCP) as d:
        assert (await d.read_applicator()).displacement_magnitude_mm == pytest.approx(2.4)
    t.assert_done()
