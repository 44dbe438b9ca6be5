"""One room's flood must not starve another (issue 13): the dashboard's incoming queue
(`iortd.dashboard.mqtt.incoming_queue`, between aiomqtt and validation) is fed here by
hand, as aiomqtt's callback feeds it, and drained as `iortd.dashboard.mqtt.consume` drains
it, with the real validation (`Rooms.receive`) in between. No broker is needed: the defect
and its fix are in how that queue orders and drops."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiomqtt
import orjson

from iortd.dashboard.mqtt import MESSAGE_OVERHEAD, incoming_queue
from iortd.dashboard.state import Rooms

TS = "2026-11-26T10:00:00.000000Z"
FLOOD = "iort/v1/site-a/or-1/telemetry"
QUIET = "iort/v1/site-a/or-2/telemetry"
BUSY = "dropped: dashboard busy"


def telemetry(seq: int, room: str) -> bytes:
    return orjson.dumps(
        {
            "schema": "iort/v1",
            "session": 1,
            "seq": seq,
            "ts": TS,
            "sim": True,
            "historical": False,
            "device": "source",
            "at": TS,
            "state": "IRRADIATING",
            "phase": "IRRADIATING",
            "delivery_id": f"{room}-20261126T100000000000Z",
            "dose_rate_gy_min": 0.8,
            "dose_primary_gy": 1.0,
            "dose_secondary_gy": 1.0,
            "preset_gy": 20.0,
            "remaining_gy": 19.0,
            "beam_on_s": 10.0,
            "elapsed_s": 11.0,
            "estimated_remaining_s": 100.0,
            "kv": 50.0,
            "ua": 40.0,
        }
    )


def message(topic: str, payload: bytes) -> aiomqtt.Message:
    return aiomqtt.Message(topic, payload, 1, False, 1, None)


async def test_a_flood_of_valid_messages_from_one_room_does_not_delay_another() -> None:
    """or-1 publishes valid telemetry far faster than the dashboard validates it; or-2
    publishes at 10 Hz. Every or-2 message is applied within 1 s of its arrival, and
    what the flood loses is counted under or-1 only."""
    rooms = Rooms("iort")
    queue = incoming_queue(rooms, lambda _t, _e: None, max_bytes=16 * 1024 * 1024)()
    arrived: dict[int, float] = {}
    latency: dict[int, float] = {}
    quiet_n = 10
    stop = asyncio.Event()
    all_applied = asyncio.Event()

    async def flood() -> None:
        seq = 0
        while not stop.is_set():
            for _ in range(500):  # ~300 KB a tick: far faster than validation
                seq += 1
                queue.put_nowait(message(FLOOD, telemetry(seq, "or-1")))
            await asyncio.sleep(0.005)

    async def quiet() -> None:
        for seq in range(1, quiet_n + 1):
            arrived[seq] = time.monotonic()
            queue.put_nowait(message(QUIET, telemetry(seq, "or-2")))
            await asyncio.sleep(0.1)

    async def drain() -> None:
        while True:
            m = await queue.get()
            assert isinstance(m.payload, bytes)
            acc = rooms.receive(m.topic.value, m.payload, time.monotonic(), wall=time.time())
            if acc is not None and acc.room.room == "or-2":
                latency[acc.payload["seq"]] = time.monotonic() - arrived[acc.payload["seq"]]
                if len(latency) == quiet_n:
                    all_applied.set()
            await asyncio.sleep(0)  # aiomqtt's iterator awaits a task per message

    async with asyncio.TaskGroup() as tg:
        flooding = tg.create_task(flood())
        draining = tg.create_task(drain())
        await asyncio.sleep(0.3)  # the flood's backlog builds up first
        await tg.create_task(quiet())
        # Bounded: the assertions below say what was missing.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_applied.wait(), 2.0)
        stop.set()
        await flooding
        draining.cancel()

    rejects = rooms.snapshot(time.monotonic())["diagnostics"]
    assert sorted(latency) == list(range(1, quiet_n + 1)), (
        f"or-2 messages applied: {sorted(latency)} of 1..{quiet_n}; "
        f"dropped busy: {rooms.dropped_busy}; rejects: {rooms.rejects}"
    )
    assert max(latency.values()) < 1.0, f"or-2 latencies (s): {latency}"
    assert rooms.rejects.get("site-a/or-1", {}).get(BUSY, 0) > 0, (
        f"the flood's excess is counted under or-1: {rooms.rejects}"
    )
    assert "site-a/or-2" not in rooms.rejects, rooms.rejects
    assert rejects["dropped_busy"] == rooms.rejects["site-a/or-1"][BUSY]


def test_each_room_is_bounded_in_messages_and_bytes_and_served_in_turn() -> None:
    rooms = Rooms("iort")
    queue = incoming_queue(
        rooms, lambda _t, _e: None, max_bytes=10**9, room_bytes=10**9, room_messages=3
    )()
    for _ in range(5):
        queue.put_nowait(message(FLOOD, b""))
    queue.put_nowait(message(QUIET, b""))
    queue.put_nowait(message("elsewhere", b""))
    assert queue.qsize() == 5, "3 of or-1 (2 dropped), 1 of or-2, 1 of no room"
    assert rooms.rejects == {"site-a/or-1": {BUSY: 2}}
    order = [queue.get_nowait().topic.value for _ in range(5)]
    assert order == [FLOOD, QUIET, "elsewhere", FLOOD, FLOOD], "one each, in turn"
    assert queue.qsize() == 0
    assert queue.bytes == 0  # type: ignore[attr-defined]


def test_empty_payloads_are_charged_so_the_queue_stays_bounded() -> None:
    """A flood of empty payloads was free of charge, so unbounded in number."""
    rooms = Rooms("iort")
    queue = incoming_queue(rooms, lambda _t, _e: None, max_bytes=1024 * 1024)()
    for i in range(100_000):
        queue.put_nowait(message(f"iort/v1/site-a/or-{i % 50}/telemetry", b""))
    assert queue.qsize() <= 1024 * 1024 // 512
    assert rooms.dropped_busy == 100_000 - queue.qsize()


def test_topics_not_shown_take_no_place_in_a_rooms_queue() -> None:
    """The topics the dashboard passes over (the commands) are counted as ignored when
    they arrive: a flood of them under a room's name does not use up that room's queue and
    push its telemetry out. (``alarms`` is shown since issue 19: it queues as the others.)"""
    rooms = Rooms("iort")
    queue = incoming_queue(rooms, lambda _t, _e: None, room_messages=3)()
    for _ in range(10):
        queue.put_nowait(message("iort/v1/site-a/or-2/cmd/start", b"{}"))
        queue.put_nowait(message("iort/v1/site-a/or-2/cmd/ack", b"{}"))
    queue.put_nowait(message(QUIET, telemetry(1, "or-2")))
    assert queue.qsize() == 1
    assert rooms.ignored == 20
    assert rooms.dropped_busy == 0, rooms.rejects


def test_when_all_rooms_together_are_full_the_heaviest_room_loses_not_the_newcomer() -> None:
    """Many flooding rooms can fill the total bound; a quiet room's message then still
    gets in, and the message that makes way is the oldest of the room holding most."""
    rooms = Rooms("iort")
    cost = 100 + MESSAGE_OVERHEAD
    queue = incoming_queue(rooms, lambda _t, _e: None, max_bytes=10 * cost)()
    for i in range(10):
        queue.put_nowait(message(FLOOD if i < 7 else "iort/v1/site-a/or-3/telemetry", b"x" * 100))
    queue.put_nowait(message(QUIET, b"q" * 100))
    assert queue.qsize() == 10
    assert rooms.rejects == {"site-a/or-1": {BUSY: 1}}, "counted under the heaviest room"
    taken = [queue.get_nowait() for _ in range(10)]
    assert [m.payload for m in taken].count(b"q" * 100) == 1
    queue.put_nowait(message(FLOOD, b"x" * 100))
    queue.put_nowait(message(FLOOD, b"x" * 100))
    assert queue.qsize() == 2
