"""The simulator's side of XRS-ASCII/1: what the console answers, checked with the
host's codec (two independent implementations of docs/protocols.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
from manualclock import ManualClock

from iortd.drivers.errors import ProtocolViolation
from iortd.drivers.xrs_ascii import (
    Command,
    ConsoleError,
    crc16,
    decode_identity,
    decode_reply,
    decode_status,
    encode_request,
    parse_frame,
)
from iortd.kernel.clock import SystemClock
from iortd.kernel.types import DeviceState
from iortd.simulators.device import SimDevice
from iortd.simulators.model import SourceModel
from iortd.simulators.profiles import load_profile
from iortd.simulators.scenario import load_scenario
from iortd.simulators.sequence import ClinicalSequence
from iortd.simulators.serial_xrs import ConsoleProtocol, crc_ccitt


@pytest.fixture
def console() -> ConsoleProtocol:
    model = SourceModel(load_profile("axxent"), seed=1, serial="SIM-0042")
    seq = ClinicalSequence(model, preset_gy=1.0, applicator_code="BAL34", start_delay_s=0)
    return ConsoleProtocol(SimDevice("console", seq, SystemClock()))


def test_both_crc_implementations_agree() -> None:
    for data in (b"", b"123456789", bytes(range(256)), b"ST,READY,0,0" * 7):
        assert crc_ccitt(data) == crc16(data)


def test_identify_and_status_are_valid_frames_for_the_host(console: ConsoleProtocol) -> None:
    reply = console.handle(encode_request(Command.IDENTIFY))
    assert reply is not None
    ident = decode_identity(parse_frame(reply))
    assert ident.manufacturer == "iortd simulator"
    assert ident.serial == "SIM-0042"
    reply = console.handle(encode_request(Command.STATUS))
    assert reply is not None
    st = decode_status(parse_frame(reply))
    assert st.state is DeviceState.SELF_TEST
    for command in (Command.INTERLOCKS, Command.APPLICATOR):
        reply = console.handle(encode_request(command))
        assert reply is not None
        decode_reply(command, parse_frame(reply))  # a valid reply of that kind


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"$ST*0000\r\n", "02"),  # bad CRC
        (b"ST*5C92\r\n", "02"),  # not a frame
        (b"$XX*" + f"{crc16(b'XX'):04X}".encode() + b"\r\n", "01"),
        (encode_request(Command.ABORT, "op-1"), "03"),  # never simulated
        (b"$" + b"A" * 200 + b"\r\n", "02"),
    ],
)
def test_bad_requests_get_the_documented_error(
    console: ConsoleProtocol, line: bytes, code: str
) -> None:
    reply = console.handle(line)
    assert reply is not None
    with pytest.raises(ConsoleError) as excinfo:
        decode_reply(Command.STATUS, parse_frame(reply))
    assert excinfo.value.code == code


def test_an_empty_line_gets_no_reply(console: ConsoleProtocol) -> None:
    assert console.handle(b"\r\n") is None


def test_numbers_are_written_as_the_spec_allows(console: ConsoleProtocol) -> None:
    """Run a delivery to its end in fixed steps: every ST reply on the way is a frame the
    host accepts (no exponent, no 'nan', at most 12 characters per number)."""
    for _ in range(700):
        console.device.sequence.process(1.0)
        reply = console.handle(encode_request(Command.STATUS))
        assert reply is not None
        try:
            st = decode_status(parse_frame(reply))
        except ProtocolViolation as exc:  # pragma: no cover - the failure message
            pytest.fail(f"the simulator wrote an invalid ST reply: {exc}")
        if st.termination is not None:
            break
    assert st.state is DeviceState.TERMINATED
    assert st.dose_primary_gy == pytest.approx(1.0, rel=0.01)


def test_a_scenario_step_acts_at_its_own_time_not_at_the_next_request(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[[step]]\nat = "5s"\naction = "open_door"\n', encoding="utf-8")
    clock = ManualClock()
    model = SourceModel(load_profile("axxent"), seed=1)
    seq = ClinicalSequence(model, preset_gy=1.0, applicator_code="BAL34", start_delay_s=0)
    device = SimDevice("console", seq, clock, load_scenario(path))
    console = ConsoleProtocol(device)
    applied: list[float] = []
    device.on_step = lambda step, source: applied.append(seq.time_s)
    console.handle(encode_request(Command.STATUS))
    clock.ns = 20 * 10**9  # the next request comes 20 s later
    console.handle(encode_request(Command.STATUS))
    assert applied == [5.0]
    assert seq.time_s == 20.0
