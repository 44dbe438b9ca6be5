"""The `serial-xrs` driver against a scripted device: the exchanges it makes, what it
makes of the replies, and how it recovers from a bad or late one."""

from __future__ import annotations

import pytest

from iortd.drivers.errors import DriverOptionError, ProtocolViolation, TransportTimeout
from iortd.drivers.interface import DriverContext
from iortd.drivers.serial_xrs import SerialXrsDriver, SerialXrsFactory
from iortd.drivers.transport import Expect, Reply, ScriptedTransport
from iortd.drivers.xrs_ascii import Command, crc16, encode_request
from iortd.kernel.clock import SystemClock
from iortd.kernel.types import DeviceState, Interlock, InterlockState

CTX = DriverContext(clock=SystemClock(), seed=0)


def frame(body: bytes) -> bytes:
    return b"$" + body + b"*" + f"{crc16(body):04X}".encode() + b"\r\n"


ID = encode_request(Command.IDENTIFY)
ST = encode_request(Command.STATUS)
AP = encode_request(Command.APPLICATOR)
SIM_ID = frame(b"ID,iortd simulator,XRS-50,SIM-0001,sim-1.0")
REAL_ID = frame(b"ID,Example Medical,XR-50,SN-77,4.2")
STATUS = frame(b"ST,IRRADIATING,0.87,9.6412,9.6387,20,723.1,1380,50,40.1,OOOOOOOOT,-")
APPL = frame(b"AP,spherical,30,APP-0042")


async def test_identify_read_and_applicator_every_n_reads() -> None:
    t = ScriptedTransport(
        [
            *(Expect(ID), Reply(SIM_ID)),
            *(Expect(ST), Reply(STATUS), Expect(AP), Reply(APPL)),
            *(Expect(ST), Reply(STATUS)),
            *(Expect(ST), Reply(STATUS), Expect(AP), Reply(frame(b"AP,NONE"))),
        ]
    )
    async with SerialXrsDriver(t, CTX, applicator_every=2) as d:
        ident = await d.identify()
        assert ident.simulated is True, "the project's simulator says so in its ID"
        first = await d.read()
        second = await d.read()
        third = await d.read()
    t.assert_done()
    assert first.state is DeviceState.IRRADIATING
    assert first.simulated is True
    assert first.dose_primary_gy == 9.6412
    assert first.interlock(Interlock.BACKUP_TIMER) is InterlockState.TRIPPED
    assert first.interlock(Interlock.COMMUNICATION) is InterlockState.UNKNOWN
    assert first.applicator is not None
    assert second.applicator == first.applicator  # not asked again on every read
    assert third.applicator is None


async def test_a_real_console_is_not_marked_simulated() -> None:
    # The applicator is asked at the first read, then every applicator_every reads.
    t = ScriptedTransport(
        [Expect(ID), Reply(REAL_ID), Expect(ST), Reply(STATUS), Expect(AP), Reply(APPL)]
    )
    async with SerialXrsDriver(t, CTX, applicator_every=1000) as d:
        assert (await d.identify()).simulated is False
        assert (await d.read()).simulated is False


async def test_a_bad_reply_is_a_protocol_violation_and_the_next_exchange_is_clean() -> None:
    garbled = STATUS.replace(b"9.6412", b"9.6413")  # CRC no longer matches
    t = ScriptedTransport(
        [
            *(Expect(ID), Reply(SIM_ID), Expect(ST), Reply(garbled)),
            *(Expect(ST), Reply(STATUS), Expect(AP), Reply(APPL)),
        ]
    )
    async with SerialXrsDriver(t, CTX, applicator_every=1000) as d:
        await d.identify()
        with pytest.raises(ProtocolViolation, match="bad CRC"):
            await d.read()
        assert (await d.read()).dose_primary_gy == 9.6412


async def test_a_late_reply_is_a_timeout_and_is_never_taken_for_the_next_answer() -> None:
    late = frame(b"ST,READY,0,0,0,20,0,1380,50,40,OOOOOOOOO,-")
    t = ScriptedTransport(
        [
            *(Expect(ID), Reply(SIM_ID), Expect(ST), Reply(late, delay_s=0.6)),
            *(Expect(ST), Reply(STATUS), Expect(AP), Reply(APPL)),
        ],
        timeout_s=0.5,
    )
    async with SerialXrsDriver(t, CTX, applicator_every=1000) as d:
        await d.identify()
        with pytest.raises(TransportTimeout):
            await d.read()
        got = await d.read()
    assert got.state is DeviceState.IRRADIATING, "the late READY reply was dropped"


@pytest.mark.parametrize(
    ("options", "transport", "key"),
    [
        ({}, {}, "transport"),
        ({"every": 2}, {"type": "serial", "port": "/dev/ttyS0"}, "options.every"),
        (
            {"applicator_every": 0},
            {"type": "serial", "port": "/dev/ttyS0"},
            "options.applicator_every",
        ),
        ({}, {"type": "serial"}, "transport.port"),
        ({}, {"type": "serial", "port": "/dev/ttyS0", "baud": 9600}, "transport.baud"),
    ],
)
def test_options_and_transport_are_checked_naming_the_key(
    options: dict[str, object], transport: dict[str, object], key: str
) -> None:
    with pytest.raises(DriverOptionError) as excinfo:
        SerialXrsFactory().validate(options, transport)
    assert excinfo.value.key == key


async def test_a_reply_after_a_garbled_line_is_never_taken_for_the_next_answer() -> None:
    """Noise, then the real (now late) reply: the next read must not return the previous
    poll's answer (which would leave every reading one poll stale from then on)."""
    late = frame(b"ST,READY,0,7.77,7.77,20,0,1380,50,40,OOOOOOOOO,-")
    t = ScriptedTransport(
        [
            *(Expect(ID), Reply(SIM_ID)),
            *(Expect(ST), Reply(b"\x00junk\r\n"), Reply(late, delay_s=0.05)),
            *(Expect(ST), Reply(STATUS), Expect(AP), Reply(APPL)),
        ],
        timeout_s=0.5,
    )
    async with SerialXrsDriver(t, CTX, applicator_every=10) as d:
        await d.identify()
        with pytest.raises(ProtocolViolation):
            await d.read()
        got = await d.read()
    assert got.dose_primary_gy == 9.6412, "the late 7.77 reply was dropped"


async def test_a_failing_applicator_request_keeps_the_status_and_is_asked_again() -> None:
    refused = frame(b"ER,04,busy")
    t = ScriptedTransport(
        [
            *(Expect(ID), Reply(SIM_ID)),
            *(Expect(ST), Reply(STATUS), Expect(AP), Reply(refused)),
            *(Expect(ST), Reply(STATUS), Expect(AP), Reply(APPL)),
        ]
    )
    async with SerialXrsDriver(t, CTX, applicator_every=10) as d:
        await d.identify()
        first = await d.read()
        second = await d.read()
    t.assert_done()
    assert first.interlock(Interlock.BACKUP_TIMER) is InterlockState.TRIPPED
    assert first.applicator is None
    assert second.applicator is not None


async def test_a_late_reply_from_before_a_reconnect_is_dropped_on_open() -> None:
    """A reply an earlier connection gave up on may still arrive on the reopened line;
    it is dropped before the first request, not taken for the answer to it."""
    t = ScriptedTransport(
        [Reply(STATUS, delay_s=0.2), Expect(ID), Reply(SIM_ID)],
        timeout_s=0.5,
    )
    async with SerialXrsDriver(t, CTX) as d:
        ident = await d.identify()
    t.assert_done()
    assert ident.manufacturer == "iortd simulator"
