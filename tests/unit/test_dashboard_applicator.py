"""The applicator topic on the dashboard's server state (issue 16, B2c): accepted and
validated against the published schema, the latest live message held, a bounded
displacement trace per delivery charged in bytes, and ``unknown`` kept as it came.

Hostile input on this topic (schema, size, seq) is in test_dashboard_hostile.py's tables."""

from __future__ import annotations

from typing import Any

import aiomqtt
import orjson
import pytest

from iortd.dashboard.mqtt import incoming_queue
from iortd.dashboard.room import POINT_BYTES, epoch_ms
from iortd.dashboard.state import Rejected, Rooms

T = "iort/v1/site-a/or-1/"
TS = "2026-11-26T10:00:00.000000Z"
DELIVERY = "or-1-20261126T100000000000Z"


def at(ms: int) -> str:
    return f"2026-11-26T10:00:{ms // 1000:02d}.{ms % 1000:03d}000Z"


def applicator(seq: int, mag: float | None = 0.5, **kw: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "schema": "iort/v1",
        "session": 1,
        "seq": seq,
        "ts": TS,
        "sim": True,
        "historical": False,
        "device": "stand",
        "at": at(seq * 100),
        "delivery_id": DELIVERY,
        "applicator": {"type": "spherical", "diameter_mm": 40.0, "serial": "APL-40-0042"},
        "uses_left": 17,
        "state": "READY",
        "fault": None,
        "seated": "yes",
        "source_locked": "yes",
        "brakes_engaged": "yes",
        "displacement_mm": {"x": 0.3, "y": -0.4, "z": 0.0},
        "displacement_magnitude_mm": mag,
        "displacement_from_beam_on_mm": 0.2,
        "peak_displacement_mm": 0.6,
        "tilt_deg": 0.1,
        "lock_counter": 5,
        "seat_counter": 3,
        "heartbeat": seq,
    }
    p.update(kw)
    return p


def feed(rooms: Rooms, p: dict[str, Any], mono: float = 0.0) -> None:
    rooms.receive(T + "applicator", orjson.dumps(p), mono)


def test_an_applicator_message_is_held_and_in_the_snapshot() -> None:
    rooms = Rooms("iort")
    feed(rooms, applicator(1), 1.0)
    feed(rooms, applicator(2, 0.7), 2.0)
    room = rooms.snapshot(3.0)["rooms"]["site-a/or-1"]
    assert room["applicator"]["payload"]["seq"] == 2
    assert room["applicator"]["age_ms"] == 1000
    assert room["applicator_trace_delivery"] == DELIVERY
    assert [(p["m"], p["h"]) for p in room["applicator_trace"]] == [(0.5, False), (0.7, False)]
    assert rooms.diagnostics()["ignored"] == 0


def test_the_overview_snapshot_has_the_latest_but_no_trace() -> None:
    rooms = Rooms("iort")
    feed(rooms, applicator(1))
    room = rooms.snapshot(1.0, summary=True)["rooms"]["site-a/or-1"]
    assert room["applicator"]["payload"]["seq"] == 1
    assert "applicator_trace" not in room


def test_unknown_stays_unknown() -> None:
    rooms = Rooms("iort")
    bare = applicator(
        1,
        None,
        state="UNKNOWN",
        seated="unknown",
        source_locked="unknown",
        brakes_engaged="unknown",
        applicator=None,
        displacement_mm=None,
    )
    feed(rooms, bare)
    room = rooms.snapshot(1.0)["rooms"]["site-a/or-1"]
    held = room["applicator"]["payload"]
    assert (held["seated"], held["brakes_engaged"], held["state"]) == ("unknown",) * 2 + (
        "UNKNOWN",
    )
    assert room["applicator_trace"] == [
        {"t": epoch_ms(bare["at"]), "m": None, "b": 0.2, "h": False}
    ]


def test_a_replay_is_traced_but_never_the_current_reading() -> None:
    rooms = Rooms("iort")
    feed(rooms, applicator(1))
    feed(rooms, applicator(2, 9.0, historical=True))
    room = rooms.snapshot(1.0)["rooms"]["site-a/or-1"]
    assert room["applicator"]["payload"]["seq"] == 1
    assert [p["h"] for p in room["applicator_trace"]] == [False, True]


def test_a_new_delivery_starts_a_new_trace() -> None:
    rooms = Rooms("iort")
    feed(rooms, applicator(1))
    feed(rooms, applicator(2, delivery_id="or-1-20261126T110000000000Z"))
    room = rooms.snapshot(1.0)["rooms"]["site-a/or-1"]
    assert room["applicator_trace_delivery"] == "or-1-20261126T110000000000Z"
    assert len(room["applicator_trace"]) == 1


def test_the_trace_is_bounded_and_charged_in_bytes() -> None:
    rooms = Rooms("iort", history_points=50)
    for i in range(1, 400):
        feed(rooms, applicator(i, i / 100))
    r = rooms.rooms["site-a/or-1"]
    snap = rooms.snapshot(1.0)["rooms"]["site-a/or-1"]
    trace = snap["applicator_trace"]
    assert len(trace) <= 50
    assert trace[-1]["m"] == 3.99  # the newest stays
    assert r.bytes >= POINT_BYTES * len(trace) + len(orjson.dumps(applicator(399, 3.99)))
    assert rooms.bytes == r.bytes


def test_a_broken_applicator_message_is_rejected_not_held() -> None:
    rooms = Rooms("iort")
    with pytest.raises(Rejected, match="schema applicator"):
        feed(rooms, applicator(1, seated=True))
    assert rooms.snapshot(1.0)["rooms"] == {}


def test_a_forged_huge_seq_does_not_hide_the_readers_stream() -> None:
    rooms = Rooms("iort")
    feed(rooms, applicator(10))
    with pytest.raises(Rejected, match="seq"):
        feed(rooms, applicator(2**52, at=TS))  # a rogue "brakes engaged"
    feed(rooms, applicator(11, brakes_engaged="no"))
    held = rooms.snapshot(1.0)["rooms"]["site-a/or-1"]["applicator"]["payload"]
    assert (held["seq"], held["brakes_engaged"]) == (11, "no")


def test_a_flood_of_applicator_messages_uses_its_own_rooms_share_only() -> None:
    """The topic goes through the per-room queue like telemetry: one room's flood of
    readings fills that room's share, never another room's."""
    rooms = Rooms("iort")
    queue = incoming_queue(rooms, lambda _t, _e: None, room_messages=3)()
    for i in range(1, 11):
        queue.put_nowait(
            aiomqtt.Message(T + "applicator", orjson.dumps(applicator(i)), 1, False, 1, None)
        )
    other = orjson.dumps(applicator(1))
    queue.put_nowait(aiomqtt.Message("iort/v1/site-a/or-2/applicator", other, 1, False, 1, None))
    assert queue.qsize() == 4
    assert rooms.rejects["site-a/or-1"]["dropped: dashboard busy"] == 7
    assert "site-a/or-2" not in rooms.rejects
