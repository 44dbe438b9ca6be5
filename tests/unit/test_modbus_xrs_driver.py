"""The `modbus-xrs` driver against a scripted device: the requests it sends (byte exact),
what it makes of the replies through the register map, and how it recovers from an
exception, a late reply, a stale transaction and noise."""

# ruff: noqa: E501 - the option cases read best one per line
from __future__ import annotations

from collections.abc import Sequence

import pytest
from test_modbus_codec import crc16_modbus
from test_modbus_map import TELEMETRY, text_registers

from iortd.drivers.errors import DriverOptionError, ProtocolViolation, TransportTimeout
from iortd.drivers.interface import DriverContext
from iortd.drivers.modbus_codec import Framing, ModbusDeviceError
from iortd.drivers.modbus_map import load_map, resolve_map
from iortd.drivers.modbus_xrs import ModbusXrsDriver, ModbusXrsFactory
from iortd.drivers.transport import Eof, Expect, Reply, ScriptedTransport
from iortd.kernel.clock import SystemClock
from iortd.kernel.types import DeviceState, Interlock, InterlockState

CTX = DriverContext(clock=SystemClock(), seed=0)
MAP = load_map(resolve_map("xrs-mb1"))
H = bytes.fromhex


def tcp_reply(tid: int, function: int, registers: Sequence[int], unit: int = 1) -> bytes:
    pdu = bytes([function, 2 * len(registers)]) + b"".join(r.to_bytes(2, "big") for r in registers)
    return (
        tid.to_bytes(2, "big") + b"\0\0" + (len(pdu) + 1).to_bytes(2, "big") + bytes([unit]) + pdu
    )


def rtu_reply(function: int, registers: Sequence[int], unit: int = 1) -> bytes:
    body = bytes([unit, function, 2 * len(registers)])
    body += b"".join(r.to_bytes(2, "big") for r in registers)
    return body + crc16_modbus(body).to_bytes(2, "little")


def rtu_exception(function: int, code: int, unit: int = 1) -> bytes:
    body = bytes([unit, function | 0x80, code])
    return body + crc16_modbus(body).to_bytes(2, "little")


def identity(manufacturer: str, scenario: str = "") -> list[int]:
    return (
        text_registers(manufacturer, 16)
        + text_registers("XRS-50", 8)
        + text_registers("SN-77", 8)
        + text_registers("4.2", 8)
        + text_registers(scenario, 32)
    )


# Requests worked by hand: read holding 100+72 and input 0+38 of unit 1.
def TCP_ID(tid: int) -> bytes:
    return tid.to_bytes(2, "big") + H("00 00 00 06 01 03 00 64 00 48")


def TCP_ST(tid: int) -> bytes:
    return tid.to_bytes(2, "big") + H("00 00 00 06 01 04 00 00 00 26")


RTU_ST = H("01 04 00 00 00 26") + crc16_modbus(H("01 04 00 00 00 26")).to_bytes(2, "little")


def driver(t: ScriptedTransport, framing: Framing, timeout_s: float = 1.0) -> ModbusXrsDriver:
    return ModbusXrsDriver(t, CTX, MAP, unit=1, framing=framing, timeout_s=timeout_s)


async def test_identify_and_read_over_tcp() -> None:
    sim_id = identity("iortd simulator", "link-drop-5s 3fa9c2d1e0b4")
    t = ScriptedTransport(
        [
            *(Expect(TCP_ID(1)), Reply(tcp_reply(1, 3, sim_id))),
            *(Expect(TCP_ST(2)), Reply(tcp_reply(2, 4, TELEMETRY))),
        ]
    )
    async with driver(t, Framing.TCP) as d:
        ident = await d.identify()
        reading = await d.read()
    t.assert_done()
    assert (ident.manufacturer, ident.model, ident.serial, ident.firmware) == (
        "iortd simulator",
        "XRS-50",
        "SN-77",
        "4.2",
    )
    assert ident.simulated is True
    assert ident.scenario == "link-drop-5s 3fa9c2d1e0b4"
    assert reading.simulated is True
    assert reading.state is DeviceState.IRRADIATING
    assert reading.dose_primary_gy == pytest.approx(9.64123)
    assert reading.preset_gy == 20.0
    assert reading.planned_time_s == pytest.approx(1380.0)
    assert reading.termination is None
    assert reading.interlock(Interlock.BACKUP_TIMER) is InterlockState.TRIPPED
    assert reading.interlock(Interlock.DOOR) is InterlockState.OK
    assert reading.interlock(Interlock.COMMUNICATION) is InterlockState.UNKNOWN
    assert reading.applicator is not None
    assert (reading.applicator.type, reading.applicator.serial) == ("spherical", "APP-0042")
    assert reading.extra == {"rate_deviation": pytest.approx(-1.25)}
    assert reading.selection == 7


async def test_each_good_reply_is_heard_for_staleness_an_exception_is_not() -> None:
    """As serial-xrs does: the daemon judges staleness from the console's last good reply
    (drivers/modbus_exchange.py reports each one)."""
    heard: list[int] = []
    clock = SystemClock()
    ctx = DriverContext(clock=clock, seed=0, heard=heard.append)
    exception = (2).to_bytes(2, "big") + H("00 00 00 03 01 84 04")
    t = ScriptedTransport(
        [
            *(Expect(TCP_ID(1)), Reply(tcp_reply(1, 3, identity("Example Medical")))),
            *(Expect(TCP_ST(2)), Reply(exception)),
            *(Expect(TCP_ST(3)), Reply(tcp_reply(3, 4, TELEMETRY))),
        ]
    )
    before = clock.monotonic_ns()
    async with ModbusXrsDriver(t, ctx, MAP, unit=1, framing=Framing.TCP) as d:
        await d.identify()
        assert len(heard) == 1
        with pytest.raises(ModbusDeviceError):
            await d.read()
        assert len(heard) == 1
        reading = await d.read()
    t.assert_done()
    assert len(heard) == 2
    assert before <= heard[0] <= heard[1] <= reading.mono_ns


async def test_a_real_console_is_neither_simulated_nor_given_a_scenario() -> None:
    t = ScriptedTransport(
        [Expect(TCP_ID(1)), Reply(tcp_reply(1, 3, identity("Example Medical", "fake")))]
    )
    async with driver(t, Framing.TCP) as d:
        ident = await d.identify()
    assert (ident.simulated, ident.scenario) == (False, None)


async def test_unlisted_codes_are_unknown_and_fail_safe() -> None:
    regs = list(TELEMETRY)
    regs[0], regs[16], regs[1] = 77, 9, 3  # unknown state, unknown door code, MACHINE
    t = ScriptedTransport([Expect(RTU_ST), Reply(rtu_reply(4, regs))])
    async with driver(t, Framing.RTU) as d:
        reading = await d.read()
    assert reading.state is DeviceState.UNKNOWN
    assert reading.interlock(Interlock.DOOR) is InterlockState.UNKNOWN
    assert reading.termination is not None
    assert reading.termination.value == "MACHINE"


async def test_an_exception_response_is_a_typed_device_error_and_the_next_read_works() -> None:
    t = ScriptedTransport(
        [
            *(Expect(RTU_ST), Reply(rtu_exception(4, 0x02))),
            *(Expect(RTU_ST), Reply(rtu_reply(4, TELEMETRY))),
        ]
    )
    async with driver(t, Framing.RTU) as d:
        with pytest.raises(ModbusDeviceError, match="Illegal Data Address") as excinfo:
            await d.read()
        assert excinfo.value.code == 2
        assert (await d.read()).state is DeviceState.IRRADIATING
    t.assert_done()


async def test_a_late_rtu_reply_is_never_taken_for_the_next_one() -> None:
    late = list(TELEMETRY)
    late[4:6] = [0x0098, 0x9680]  # 100 Gy: the wrong answer if it were believed
    t = ScriptedTransport(
        [
            *(Expect(RTU_ST), Reply(rtu_reply(4, late), delay_s=0.8)),
            *(Expect(RTU_ST), Reply(rtu_reply(4, TELEMETRY))),
        ],
        timeout_s=0.5,
    )
    async with driver(t, Framing.RTU, 0.5) as d:
        with pytest.raises(TransportTimeout):
            await d.read()
        reading = await d.read()
    t.assert_done()
    assert reading.dose_primary_gy == pytest.approx(9.64123)
    # a quiet line waited for on open (one timeout), the timeout, the late reply at 0.8 s,
    # then a quiet line (0.125 s) before the next request
    assert t.elapsed_s <= 0.5 + 0.8 + 0.125 + 1e-9


async def test_a_reply_to_an_older_tcp_transaction_is_skipped() -> None:
    stale = list(TELEMETRY)
    stale[4:6] = [0x0098, 0x9680]
    t = ScriptedTransport(
        [
            *(Expect(TCP_ST(1)), Reply(tcp_reply(1, 4, stale), delay_s=0.8)),
            # the settle wait catches the late reply; then request 2 answered by 2
            *(Expect(TCP_ST(2)), Reply(tcp_reply(2, 4, TELEMETRY))),
        ],
        timeout_s=0.5,
    )
    async with driver(t, Framing.TCP, 0.5) as d:
        with pytest.raises(TransportTimeout):
            await d.read()
        assert (await d.read()).dose_primary_gy == pytest.approx(9.64123)
    t.assert_done()


async def test_a_stale_tcp_reply_arriving_with_the_answer_is_passed_over() -> None:
    stale = list(TELEMETRY)
    stale[4:6] = [0x0098, 0x9680]
    t = ScriptedTransport(
        [Expect(TCP_ST(1)), Reply(tcp_reply(7, 4, stale) + tcp_reply(1, 4, TELEMETRY))]
    )
    async with driver(t, Framing.TCP) as d:
        assert (await d.read()).dose_primary_gy == pytest.approx(9.64123)
    t.assert_done()


async def test_noise_is_a_protocol_violation_and_the_driver_resynchronises() -> None:
    t = ScriptedTransport(
        [
            *(Expect(RTU_ST), Reply(H("01 04 48") + b"\x17" * 10)),  # cut short, then quiet
            *(Expect(RTU_ST), Reply(rtu_reply(4, TELEMETRY)[:-1] + b"\x00")),  # bad CRC
            *(Expect(RTU_ST), Reply(rtu_reply(4, TELEMETRY))),
        ],
        timeout_s=0.5,
    )
    async with driver(t, Framing.RTU, 0.5) as d:
        with pytest.raises(TransportTimeout):
            await d.read()
        with pytest.raises(ProtocolViolation, match="bad CRC"):
            await d.read()
        assert (await d.read()).state is DeviceState.IRRADIATING
    t.assert_done()


async def test_a_negative_dose_is_refused() -> None:
    t = ScriptedTransport([Expect(RTU_ST), Reply(rtu_reply(4, TELEMETRY))])
    regmap = load_map(resolve_map("xrs-mb1"))
    object.__setattr__(regmap.points["dose_primary"], "scale", -0.00001)
    async with ModbusXrsDriver(t, CTX, regmap, framing=Framing.RTU) as d:
        with pytest.raises(ProtocolViolation, match="dose_primary"):
            await d.read()


async def test_a_closed_link_is_transport_closed() -> None:
    t = ScriptedTransport([Expect(RTU_ST), Eof()])
    async with driver(t, Framing.RTU) as d:
        with pytest.raises(Exception, match="closed") as excinfo:
            await d.read()
    assert type(excinfo.value).__name__ == "TransportClosed"


@pytest.mark.parametrize(
    ("options", "transport", "key", "text"),
    [
        ({"unit": 1}, {"type": "tcp", "host": "h", "port": 502}, "options.unit", "unknown key"),
        ({"unit_id": 0}, {"type": "tcp", "host": "h", "port": 502}, "options.unit_id", "1..247"),
        ({}, {}, "transport", "needs a [devices.transport]"),
        ({"framing": "tcp"}, {"type": "serial", "port": "/dev/x"}, "options.framing", "tcp transport"),
        ({"map": "no-such-map"}, {"type": "tcp", "host": "h", "port": 502}, "options.map", "no such register map"),
    ],
)  # fmt: skip
def test_options_are_checked_with_the_key_named(
    options: dict[str, object], transport: dict[str, object], key: str, text: str
) -> None:
    with pytest.raises(DriverOptionError) as excinfo:
        ModbusXrsFactory().validate(options, transport)
    assert excinfo.value.key == key
    assert text in excinfo.value.message


async def test_a_late_rtu_reply_from_before_a_reconnect_is_dropped_on_open() -> None:
    """A reply an earlier connection gave up on can still arrive on a reopened RTU line
    (no transaction id): the driver waits for the line to be quiet before its first
    request."""
    late = list(TELEMETRY)
    late[4:6] = [0x0098, 0x9680]  # 100 Gy
    t = ScriptedTransport(
        [Reply(rtu_reply(4, late), delay_s=0.2), Expect(RTU_ST), Reply(rtu_reply(4, TELEMETRY))],
        timeout_s=0.5,
    )
    async with driver(t, Framing.RTU, 0.5) as d:
        assert (await d.read()).dose_primary_gy == pytest.approx(9.64123)
    t.assert_done()


async def test_a_stray_byte_before_an_rtu_reply_is_skipped() -> None:
    t = ScriptedTransport(
        [
            *(Expect(RTU_ST), Reply(b"\x00" + rtu_reply(4, TELEMETRY))),
            *(Expect(RTU_ST), Reply(b"\xff\xff" + rtu_reply(4, TELEMETRY))),
            *(Expect(RTU_ST), Reply(b"\x00" * 40)),
        ],
        timeout_s=0.5,
    )
    async with driver(t, Framing.RTU, 0.5) as d:
        assert (await d.read()).state is DeviceState.IRRADIATING
        assert (await d.read()).state is DeviceState.IRRADIATING
        with pytest.raises(ProtocolViolation, match="no reply from unit 1 in the first 17 bytes"):
            await d.read()


async def test_an_applicator_the_map_cannot_name_is_refused_not_taken_for_none() -> None:
    regs = list(TELEMETRY)
    regs[25] = 99  # not in the applicator_type table
    t = ScriptedTransport([Expect(RTU_ST), Reply(rtu_reply(4, regs))], timeout_s=0.5)
    async with driver(t, Framing.RTU, 0.5) as d:
        with pytest.raises(ProtocolViolation, match="applicator type code"):
            await d.read()
