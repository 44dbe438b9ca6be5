"""A shared RS-485 line (drivers/transport/shared.py) under two Modbus RTU units: one
exchange on the wire at a time, turns handed round-robin, a slow or silent unit delaying
the other by one exchange only, a late reply never taken for the next unit's, and one
device's close never closing the line under the other."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from test_modbus_xrs_driver import rtu_reply

from iortd.drivers.errors import ProtocolViolation, TransportClosed, TransportTimeout
from iortd.drivers.modbus_codec import Framing, Table, encode_read
from iortd.drivers.modbus_exchange import ModbusExchange
from iortd.drivers.transport import Eof, Expect, Reply, ScriptedTransport, ScriptStep
from iortd.drivers.transport.shared import LineView, SharedLine

TIMEOUT_S = 0.5


def req(unit: int) -> bytes:
    return encode_read(Framing.RTU, Table.INPUT, 0, 2, unit=unit, tid=0)


def rep(unit: int, a: int) -> bytes:
    return rtu_reply(0x04, [a, unit], unit=unit)


def exchange(
    view: LineView, unit: int, heard: list[tuple[int, float]] | None = None
) -> ModbusExchange:
    t = view.line._transport
    assert isinstance(t, ScriptedTransport)

    def on_heard(_ns: int) -> None:
        if heard is not None:
            heard.append((unit, t.elapsed_s))

    return ModbusExchange(
        view,
        unit=unit,
        framing=Framing.RTU,
        timeout_s=TIMEOUT_S,
        name=f"unit{unit}",
        heard=on_heard,
        monotonic_ns=lambda: 0,
    )


async def _open_settled(line: SharedLine, *views: LineView) -> None:
    for v in views:
        await v.open()
    line.unsettled = False  # the script starts on a quiet line


async def _open(*xs: ModbusExchange) -> None:
    for x in xs:
        await x.open()  # a fresh RTU line is settled first: virtual time, nothing read


async def test_two_units_take_turns_round_robin_a_slow_one_delays_the_other_a_turn() -> None:
    script: list[ScriptStep] = []
    for i in range(4):
        script += [Expect(req(1)), Reply(rep(1, i), delay_s=0.01)]
        script += [Expect(req(2)), Reply(rep(2, i), delay_s=0.15)]  # unit 2 answers late
    t = ScriptedTransport(script, timeout_s=TIMEOUT_S)
    line = SharedLine(t)
    v1, v2 = line.view("source"), line.view("stand")
    heard: list[tuple[int, float]] = []
    x1, x2 = exchange(v1, 1, heard), exchange(v2, 2, heard)
    await _open(x1, x2)

    async def poll(x: ModbusExchange) -> list[list[int]]:
        return [await x.read(Table.INPUT, 0, 2) for _ in range(4)]

    r1, r2 = await asyncio.gather(poll(x1), poll(x2))
    assert r1 == [[i, 1] for i in range(4)]
    assert r2 == [[i, 2] for i in range(4)]
    t.assert_done()
    assert [u for u, _ in heard] == [1, 2] * 4  # round-robin
    # unit 1's replies come one slow exchange of unit 2's apart, never more
    times1 = [s for u, s in heard if u == 1]
    gaps = [b - a for a, b in itertools.pairwise(times1[1:])]  # after settling
    assert max(gaps) == pytest.approx(0.16, abs=1e-6)


async def test_a_timeout_releases_the_line_and_its_late_reply_is_never_the_next_units() -> None:
    script: list[ScriptStep] = [
        Expect(req(2)),
        Reply(rep(2, 7), delay_s=0.7),  # after unit 2's timeout (0.5): still on the wire
        Expect(req(1)),
        Reply(rep(1, 5), delay_s=0.01),
    ]
    t = ScriptedTransport(script, timeout_s=TIMEOUT_S)
    line = SharedLine(t)
    v1, v2 = line.view("source"), line.view("stand")
    x1, x2 = exchange(v1, 1), exchange(v2, 2)
    await _open(x1, x2)
    with pytest.raises(TransportTimeout):
        await x2.read(Table.INPUT, 0, 2)
    assert line.holder is None  # the timeout released the line
    assert v1.unsettled  # and told whoever comes next that a reply may be on its way
    assert await x1.read(Table.INPUT, 0, 2) == [5, 1]
    t.assert_done()


@pytest.mark.parametrize(
    ("stale", "then", "outcome"),
    [
        (rep(2, 7), rep(1, 5), [5, 1]),  # skipped as noise before unit 1's own reply
        (rep(2, 0x0104), rep(1, 5), ProtocolViolation),  # "01 04" in its data: the CRC fails
        (rep(2, 7), None, TransportTimeout),  # only the stale frame: no reply, no value
    ],
)
async def test_a_stale_frame_of_another_unit_is_never_decoded_as_this_units(
    stale: bytes, then: bytes | None, outcome: list[int] | type[Exception]
) -> None:
    # Were the late frame read (no settling), the unit id and the CRC keep it out: unit 2's
    # registers are never taken for unit 1's.
    script: list[ScriptStep] = [Expect(req(1)), Reply(stale)]
    script += [Reply(then, delay_s=0.01)] if then else []
    t = ScriptedTransport(script, timeout_s=TIMEOUT_S)
    line = SharedLine(t)
    v1 = line.view("source")
    x1 = exchange(v1, 1)
    await _open(x1)
    x1._late_reply_possible = line.unsettled = False  # no settling: the frame is read and judged
    if isinstance(outcome, list):
        assert await x1.read(Table.INPUT, 0, 2) == outcome
    else:
        with pytest.raises(outcome):
            await x1.read(Table.INPUT, 0, 2)


async def test_closing_one_device_does_not_close_the_line_for_the_other() -> None:
    t = ScriptedTransport([Expect(req(1)), Reply(rep(1, 3))], timeout_s=TIMEOUT_S)
    line = SharedLine(t)
    v1, v2 = line.view("source"), line.view("stand")
    x1, x2 = exchange(v1, 1), exchange(v2, 2)
    await _open(x1, x2)
    await x2.close()
    assert await x1.read(Table.INPUT, 0, 2) == [3, 1]
    assert t._open  # still open: the stand's close left it to the source
    await x1.close()
    assert not t._open  # closed with its last view


async def test_io_outside_a_turn_is_refused_and_a_cancelled_waiter_never_wedges_the_line() -> None:
    t = ScriptedTransport([], timeout_s=TIMEOUT_S)
    line = SharedLine(t)
    v1, v2 = line.view("a"), line.view("b")
    await _open_settled(line, v1, v2)
    with pytest.raises(RuntimeError, match="outside"):
        await v1.write(b"\x01")
    async with v1.turn():
        waiter = asyncio.create_task(_hold(v2))
        await asyncio.sleep(0)
        assert holder_of(line) == "a"
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert line.holder is None
    async with v2.turn():
        assert holder_of(line) == "b"


def holder_of(line: SharedLine) -> str | None:
    return line.holder


async def _hold(view: LineView) -> None:
    async with view.turn():
        await asyncio.Event().wait()


async def test_a_lost_line_is_reopened_once_by_whichever_device_comes_back_first() -> None:
    script: list[ScriptStep] = [
        Expect(req(1)),
        Eof(),
        Expect(req(2)),
        Reply(rep(2, 4)),
        Expect(req(1)),
        Reply(rep(1, 6)),
    ]
    t = ScriptedTransport(script, timeout_s=TIMEOUT_S)
    line = SharedLine(t)
    x1, x2 = exchange(line.view("source"), 1), exchange(line.view("stand"), 2)
    await _open(x1, x2)
    with pytest.raises(TransportClosed):
        await x1.read(Table.INPUT, 0, 2)
    # The source's loop closes and reopens its driver: the line is reopened under both.
    await x1.close()
    await x1.open()
    assert t._open
    assert await x2.read(Table.INPUT, 0, 2) == [4, 2]
    assert await x1.read(Table.INPUT, 0, 2) == [6, 1]
    t.assert_done()


async def test_the_time_a_unit_waits_for_the_line_is_counted_each_wait_capped() -> None:
    # Unit 2 times out (0.5 s) and unit 1's turn then settles the line (up to one more
    # timeout) before its own request: all of that is unit 1 waiting for the line, which
    # its staleness is paused by, up to the cap per wait; unit 1's own exchange is not.
    script: list[ScriptStep] = [
        Expect(req(2)),
        Reply(rep(2, 7), delay_s=0.7),  # late: after unit 2's timeout
        Expect(req(1)),
        Reply(rep(1, 5), delay_s=0.02),
        Expect(req(1)),
        Reply(rep(1, 6), delay_s=0.02),
    ]
    t = ScriptedTransport(script, timeout_s=TIMEOUT_S)
    line = SharedLine(t, now_ns=lambda: round(t.elapsed_s * 1e9))
    v1, v2 = line.view("source", wait_cap_ns=2_000_000_000), line.view("stand")
    x1, x2 = exchange(v1, 1), exchange(v2, 2)
    await _open(x1, x2)
    assert v1.waited_ns(0) == 0  # opening the line is no wait for an exchange
    start = t.elapsed_s

    async def stand() -> None:
        with pytest.raises(TransportTimeout):
            await x2.read(Table.INPUT, 0, 2)

    task = asyncio.create_task(stand())
    await asyncio.sleep(0)  # unit 2 holds the line
    assert line.holder == "stand"
    assert await x1.read(Table.INPUT, 0, 2) == [5, 1]
    await task
    waited = v1.waited_ns(round(t.elapsed_s * 1e9)) / 1e9
    # From the start of unit 2's turn to unit 1's request: its timeout and the settling.
    assert waited == pytest.approx(t.elapsed_s - start - 0.02, abs=1e-6)
    assert waited >= TIMEOUT_S
    # A turn with nothing to wait for adds nothing.
    assert await x1.read(Table.INPUT, 0, 2) == [6, 1]
    assert v1.waited_ns(round(t.elapsed_s * 1e9)) / 1e9 == pytest.approx(waited, abs=1e-6)
    t.assert_done()


async def test_a_wait_for_the_line_counts_only_up_to_the_cap_and_nothing_by_default() -> None:
    script: list[ScriptStep] = [Expect(req(2)), Reply(rep(2, 7), delay_s=0.7)]
    script += [Expect(req(1)), Reply(rep(1, 5), delay_s=0.02)]
    t = ScriptedTransport(script, timeout_s=TIMEOUT_S)
    line = SharedLine(t, now_ns=lambda: round(t.elapsed_s * 1e9))
    capped, uncounted = line.view("source", wait_cap_ns=100_000_000), line.view("other")
    x1, x2 = exchange(capped, 1), exchange(line.view("stand"), 2)
    await _open(x1, x2)
    await uncounted.open()

    async def stand() -> None:
        with pytest.raises(TransportTimeout):
            await x2.read(Table.INPUT, 0, 2)

    task = asyncio.create_task(stand())
    await asyncio.sleep(0)
    async with uncounted.turn():  # wants the line while unit 2 holds it; writes nothing
        assert uncounted.waited_ns(round(t.elapsed_s * 1e9)) == 0
    assert await x1.read(Table.INPUT, 0, 2) == [5, 1]
    await task
    assert capped.waited_ns(round(t.elapsed_s * 1e9)) == 100_000_000
    t.assert_done()
