"""XRS-ASCII/1 host codec: golden vectors from docs/protocols.md and the typed errors.

The bytes below are fixed: they are the protocol. A change that breaks one of them breaks
every console and simulator that speaks it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from iortd.drivers.errors import DeviceFault, ProtocolViolation
from iortd.drivers.xrs_ascii import (
    INTERLOCK_ORDER,
    MAX_FRAME,
    Command,
    ConsoleError,
    FrameSplitter,
    XrsIdentity,
    crc16,
    decode_applicator,
    decode_identity,
    decode_interlocks,
    decode_reply,
    decode_status,
    encode_request,
    parse_frame,
)
from iortd.kernel.types import (
    ApplicatorIdentity,
    DeviceState,
    Interlock,
    InterlockState,
    TerminationStatus,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocols.md"

ID_REPLY = b"$ID,iortd sim,XRS-50,SIM-0001,1.0*26CB\r\n"
ST_REPLY = b"$ST,IRRADIATING,0.87,9.6412,9.6387,20,723.1,1380,50,40.1,OOOOOOOOO,-*FEA2\r\n"
AP_REPLY = b"$AP,spherical,30,APP-0042*FE6C\r\n"


def frame(body: bytes) -> bytes:
    return b"$" + body + b"*" + f"{crc16(body):04X}".encode() + b"\r\n"


# ---- golden vectors ----------------------------------------------------------------------


def test_crc_check_value() -> None:
    # The catalogue check value of CRC-16/CCITT-FALSE.
    assert crc16(b"123456789") == 0x29B1
    assert crc16(b"") == 0xFFFF


@pytest.mark.parametrize(
    ("command", "wire"),
    [
        (Command.IDENTIFY, b"$ID*A21B\r\n"),
        (Command.STATUS, b"$ST*5C92\r\n"),
        (Command.INTERLOCKS, b"$IL*2313\r\n"),
        (Command.APPLICATOR, b"$AP*7907\r\n"),
    ],
)
def test_requests_are_the_documented_bytes(command: Command, wire: bytes) -> None:
    assert encode_request(command) == wire
    assert wire.decode().replace("\r\n", "\\r\\n") in DOC.read_text("utf-8")


def test_abort_carries_its_token_and_nothing_else() -> None:
    assert encode_request(Command.ABORT, "op-42") == frame(b"AB,op-42")
    for bad in ((), ("a,b",), ("x", "y"), ("",)):
        with pytest.raises(ValueError, match="AB takes one text field"):
            encode_request(Command.ABORT, *bad)
    with pytest.raises(ValueError, match="takes no fields"):
        encode_request(Command.STATUS, "x")
    with pytest.raises(ValueError, match="reply"):
        encode_request(Command.ERROR)


def test_an_identity_may_name_the_scenario_a_simulator_plays() -> None:
    reply = frame(b"ID,iortd simulator,XRS-50,SIM-0001,1.0,link-drop-5s 3fa9c2d1e0b4")
    assert decode_identity(parse_frame(reply)) == XrsIdentity(
        "iortd simulator", "XRS-50", "SIM-0001", "1.0", "link-drop-5s 3fa9c2d1e0b4"
    )
    with pytest.raises(ProtocolViolation, match="scenario"):
        decode_identity(parse_frame(frame(b"ID,a,b,c,d,e=f")))


def test_the_documented_replies_decode() -> None:
    text = DOC.read_text("utf-8")
    for reply in (ID_REPLY, ST_REPLY, AP_REPLY):
        assert reply.decode().replace("\r\n", "\\r\\n") in text
    assert decode_identity(parse_frame(ID_REPLY)) == XrsIdentity(
        "iortd sim", "XRS-50", "SIM-0001", "1.0"
    )
    st = decode_status(parse_frame(ST_REPLY))
    assert st.state is DeviceState.IRRADIATING
    assert (st.dose_rate_gy_min, st.dose_primary_gy, st.dose_secondary_gy) == (
        0.87,
        9.6412,
        9.6387,
    )
    assert (st.preset_gy, st.beam_on_s, st.planned_time_s, st.kv, st.ua) == (
        20.0,
        723.1,
        1380.0,
        50.0,
        40.1,
    )
    assert st.interlocks == dict.fromkeys(INTERLOCK_ORDER, InterlockState.OK)
    assert Interlock.COMMUNICATION not in st.interlocks  # the host's own
    assert st.termination is None
    assert decode_applicator(parse_frame(AP_REPLY)) == ApplicatorIdentity(
        "spherical", 30.0, "APP-0042"
    )


def test_status_with_no_planned_time_a_termination_and_mixed_interlocks() -> None:
    st = decode_status(
        parse_frame(frame(b"ST,TERMINATED,0,20,19.98,20,1381.2,-,0,0,TOUUOOOOO,NORMAL"))
    )
    assert st.planned_time_s is None
    assert st.termination is TerminationStatus.NORMAL
    assert st.interlocks[Interlock.DOOR] is InterlockState.TRIPPED
    assert st.interlocks[Interlock.EMERGENCY_STOP] is InterlockState.OK
    assert st.interlocks[Interlock.APPLICATOR] is InterlockState.UNKNOWN
    assert st.interlocks[Interlock.TUBE_VOLTAGE] is InterlockState.UNKNOWN


def test_interlocks_and_no_applicator_and_abort_ack() -> None:
    got = decode_interlocks(parse_frame(frame(b"IL,OOOOOOOOT")))
    assert got[Interlock.BACKUP_TIMER] is InterlockState.TRIPPED
    assert decode_applicator(parse_frame(frame(b"AP,NONE"))) is None
    assert decode_reply(Command.ABORT, parse_frame(frame(b"AB,OK"))) is None


def test_a_console_error_is_a_device_fault_with_its_code() -> None:
    with pytest.raises(ConsoleError) as excinfo:
        decode_reply(Command.STATUS, parse_frame(frame(b"ER,03,not allowed in FAULT")))
    assert isinstance(excinfo.value, DeviceFault)
    assert excinfo.value.code == "03"
    assert "not allowed in FAULT" in str(excinfo.value)


# ---- typed errors, each naming the frame -------------------------------------------------


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"$ST*5C93\r\n", "bad CRC 5C93 (computed 5C92)"),
        (b"$ST*5c92\r\n", "4 upper-case hex digits"),
        (b"ST*5C92\r\n", "does not start with '$'"),
        (b"$ST*5C92\n", "without CRLF"),
        (b"$ST*5C92", "without CRLF"),
        (b"$ST5C92\r\n", "'*' and 4-digit CRC"),
        (b"$" + b"A" * 130 + b"*0000\r\n", "overlong frame"),
        (frame(b"S"), "two upper-case letters"),
        (frame(b"st"), "two upper-case letters"),
        (b"$S\xffT*0000\r\n", "outside printable ASCII"),
        (frame(b"ST\tX"), "outside printable ASCII"),
    ],
)
def test_malformed_frames_are_protocol_violations(line: bytes, reason: str) -> None:
    with pytest.raises(ProtocolViolation, match=re.escape(reason)):
        parse_frame(line)


GOOD_ST = b"ST,READY,0,0,0,20,0,1380,50,40,OOOOOOOOO,-"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (GOOD_ST.replace(b"READY", b"READYISH"), "unknown device state"),
        (GOOD_ST.replace(b"READY", b"UNKNOWN"), "unknown device state"),
        (GOOD_ST.replace(b",20,", b",2e1,"), "preset is not a number"),
        (GOOD_ST.replace(b",20,", b",+20,"), "preset is not a number"),
        (GOOD_ST.replace(b",20,", b",nan,"), "preset is not a number"),
        (GOOD_ST.replace(b",20,", b",12345678,"), "preset is not a number"),
        (GOOD_ST.replace(b",20,", b",,"), "preset is not a number"),
        (GOOD_ST.replace(b"OOOOOOOOO", b"OOOOOOOO"), "interlocks must be 9 letters"),
        (GOOD_ST.replace(b"OOOOOOOOO", b"OOOOOOOOX"), "interlocks must be 9 letters"),
        (GOOD_ST.replace(b",-", b",DONE"), "unknown termination status"),
        (GOOD_ST + b",7,extra", "needs 11 to 12 fields, got 13"),
        (GOOD_ST + b",x7", "selection counter is not an integer"),
        (GOOD_ST + b",4294967296", "selection counter is not an integer"),
        (b"ID,a,b,c", "needs 4 to 5 fields, got 3"),
        (b"ID,a,b,c,d,e,f", "needs 4 to 5 fields, got 6"),
        (b"IL,OOOOOOOOO", "expected a ST reply, got IL"),
        (b"ER,3,x", "malformed ER reply"),
    ],
)
def test_wrong_replies_are_protocol_violations(body: bytes, reason: str) -> None:
    command = Command.IDENTIFY if body.startswith(b"ID") else Command.STATUS
    with pytest.raises(ProtocolViolation, match=re.escape(reason)):
        decode_reply(command, parse_frame(frame(body)))


def test_applicator_fields_are_checked() -> None:
    with pytest.raises(ProtocolViolation, match="diameter out of range"):
        decode_applicator(parse_frame(frame(b"AP,spherical,0,X")))
    with pytest.raises(ProtocolViolation, match="not a valid text field"):
        decode_applicator(parse_frame(frame(b"AP,spherical,30,")))
    with pytest.raises(ProtocolViolation, match="needs 3 fields"):
        decode_applicator(parse_frame(frame(b"AP,NONE,30")))


# ---- splitting a byte stream into frames -------------------------------------------------


def test_split_frames_are_joined_and_empty_lines_skipped() -> None:
    sp = FrameSplitter()
    assert sp.feed(ST_REPLY[:7]) == []
    assert sp.feed(ST_REPLY[7:] + b"\r\n" + ID_REPLY[:3]) == [ST_REPLY]
    assert sp.pending == 3
    assert sp.feed(ID_REPLY[3:]) == [ID_REPLY]
    assert sp.pending == 0


def test_an_overlong_line_is_reported_once_and_skipped_with_bounded_memory() -> None:
    sp = FrameSplitter()
    out: list[bytes | ProtocolViolation] = []
    for _ in range(100):
        out += sp.feed(b"x" * 50)
        assert sp.pending <= MAX_FRAME + 50
    out += sp.feed(b"tail\r\n" + AP_REPLY)
    [err, good] = out
    assert isinstance(err, ProtocolViolation)
    assert "overlong" in str(err)
    assert good == AP_REPLY


def test_reset_drops_what_is_held() -> None:
    sp = FrameSplitter()
    sp.feed(b"$ST,READY")
    assert sp.reset() == 9
    assert sp.feed(AP_REPLY) == [AP_REPLY]


@pytest.mark.parametrize(
    ("tail", "selection"),
    [(b"", None), (b",-", None), (b",0", 0), (b",7", 7), (b",4294967295", 4294967295)],
)
def test_the_selection_counter_is_optional(tail: bytes, selection: int | None) -> None:
    """A console that keeps no selection counter sends 11 fields (or ``-``): tolerated."""
    st = decode_status(parse_frame(frame(GOOD_ST + tail)))
    assert st.selection == selection
