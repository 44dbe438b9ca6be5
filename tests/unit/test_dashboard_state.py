"""What the dashboard holds, fed by hand: the consumer rules of docs/mqtt-topics.md
(repeats dropped, replays never the current state), rooms kept apart, and the bounds.
Hostile input (schemas, seq poisoning, bytes, ageing): test_dashboard_hostile.py."""

from __future__ import annotations

from typing import Any

import pytest

from iortd.dashboard.state import Rejected, Rooms, parse_topic

T = "iort/v1/site-a/or-1/"


def env(seq: int, *, session: int = 1, historical: bool = False, **data: Any) -> dict[str, Any]:
    return {
        "schema": "iort/v1",
        "session": session,
        "seq": seq,
        "ts": "2026-11-26T10:00:00.000000Z",
        "sim": True,
        "historical": historical,
        **data,
    }


def status(seq: int, room: str, *, online: bool) -> dict[str, Any]:
    return env(seq, online=online, software_version="0.1.0", site="site-a", room=room)


def telemetry(seq: int, dose: float, *, delivery: str | None = "d1", **kw: Any) -> dict[str, Any]:
    sec = seq % 60
    return env(
        seq,
        device="source",
        at=f"2026-11-26T10:{seq // 60:02d}:{sec:02d}.000000Z",
        state="IRRADIATING",
        phase="IRRADIATING",
        delivery_id=delivery,
        dose_rate_gy_min=0.8,
        dose_primary_gy=dose,
        dose_secondary_gy=dose,
        preset_gy=20.0,
        remaining_gy=20 - dose,
        beam_on_s=float(seq),
        elapsed_s=float(seq),
        estimated_remaining_s=100.0,
        kv=50.0,
        ua=40.0,
        **kw,
    )


def test_a_repeated_session_and_seq_is_dropped_per_topic() -> None:
    rooms = Rooms("iort")
    assert rooms.accept(T + "telemetry", telemetry(5, 1.0), 0.0) is not None
    assert rooms.accept(T + "telemetry", telemetry(5, 1.0), 0.1) is None
    assert rooms.accept(T + "telemetry", telemetry(4, 0.9), 0.1) is None
    # seq counts per topic: events seq 5 is another message
    notice = env(5, kind="daemon_notice", delivery_id=None, at=env(0)["ts"])
    notice.update(severity="info", message="audit log writable again")
    assert rooms.accept(T + "events", notice, 0.2) is not None
    # a new session (a daemon restart) is new, whatever its seq
    assert rooms.accept(T + "telemetry", telemetry(5, 1.0, session=2), 0.3) is not None
    assert rooms.repeats == 2


def test_a_replayed_sample_is_plotted_as_such_but_never_the_current_state() -> None:
    rooms = Rooms("iort")
    rooms.accept(T + "telemetry", telemetry(1, 0.1), 0.0)
    rooms.accept(T + "telemetry", telemetry(2, 0.2, historical=True), 0.1)
    room = rooms.rooms["site-a/or-1"]
    assert room.telemetry is not None
    assert room.telemetry.payload["seq"] == 1, "the live sample stays current"
    assert [p["h"] for p in room.history] == [False, True]


def test_the_history_is_bounded_and_keeps_the_newest_point() -> None:
    rooms = Rooms("iort", history_points=100)
    for i in range(1000):
        rooms.accept(T + "telemetry", telemetry(i, i / 100), float(i))
    room = rooms.rooms["site-a/or-1"]
    assert 50 <= len(room.history) <= 100
    assert room.history[-1]["d1"] == pytest.approx(9.99)
    assert room.history[0]["d1"] == 0.0, "the start of the delivery stays in view"
    ts = [p["t"] for p in room.history]
    assert ts == sorted(ts)


def test_a_new_delivery_starts_a_new_plot_and_idle_samples_are_not_plotted() -> None:
    rooms = Rooms("iort")
    rooms.accept(T + "telemetry", telemetry(1, 0.1, delivery="d1"), 0.0)
    rooms.accept(T + "telemetry", telemetry(2, 0.0, delivery=None), 0.1)
    room = rooms.rooms["site-a/or-1"]
    assert len(room.history) == 1
    rooms.accept(T + "telemetry", telemetry(3, 0.1, delivery="d2"), 0.2)
    assert room.history_delivery == "d2"
    assert len(room.history) == 1
    # a replay of the old delivery does not wipe the live plot of the new one
    rooms.accept(T + "telemetry", telemetry(0, 0.05, delivery="d1", historical=True), 0.3)
    assert room.history_delivery == "d2"


def test_rooms_are_kept_apart_and_the_snapshot_gives_ages() -> None:
    rooms = Rooms("iort")
    rooms.accept("iort/v1/site-a/or-1/status", status(0, "or-1", online=True), 10.0)
    rooms.accept("iort/v1/site-a/or-2/status", status(0, "or-2", online=False), 11.0)
    snap = rooms.snapshot(12.5)["rooms"]
    assert set(snap) == {"site-a/or-1", "site-a/or-2"}
    assert snap["site-a/or-1"]["retained"]["status"]["age_ms"] == 2500
    assert snap["site-a/or-2"]["retained"]["status"]["payload"]["online"] is False
    assert set(rooms.snapshot(12.5, "site-a/or-2")["rooms"]) == {"site-a/or-2"}


@pytest.mark.parametrize(
    ("topic", "payload", "why"),
    [
        ("other/v1/s/r/status", env(0), "not under"),
        ("iort/v2/s/r/status", env(0), "not under"),
        ("iort/v1/s/r/nonsense", env(0), "unknown name"),
        ("iort/v1/s/status", env(0), "expected"),
        (T + "status", [1, 2], "not a JSON object"),
        (T + "status", {**env(0), "schema": "iort/v2"}, "schema"),
        (T + "status", {**env(0), "seq": -1}, "seq"),
        (T + "status", {**env(0), "session": True}, "session"),
        (T + "status", {**env(0), "historical": "no"}, "booleans"),
    ],
)
def test_what_is_not_a_v1_message_is_rejected(topic: str, payload: object, why: str) -> None:
    with pytest.raises(Rejected, match=why):
        Rooms("iort").accept(topic, payload, 0.0)


def test_the_audit_checkpoint_topic_keeps_its_slash() -> None:
    assert parse_topic("iort", "iort/v1/s/r/audit/checkpoint") == ("s", "r", "audit/checkpoint")


def skip(seq: int, **change: Any) -> dict[str, Any]:
    skipped = {"topic": "telemetry", "session": 1, "first": 7, "last": 999, "reason": "unpublished"}
    return env(seq, session=2, skipped={**skipped, **change})


def test_a_declared_skip_is_accepted_and_counted_and_a_bad_one_rejected_for_its_room() -> None:
    rooms = Rooms("iort")
    acc = rooms.accept(T + "skip", skip(0), 0.0)
    assert acc is not None
    room = rooms.rooms["site-a/or-1"]
    assert room.skipped_seqs == 993  # 7..999 of telemetry, session 1: accounted for
    assert rooms.accept(T + "skip", skip(0), 0.1) is None  # a repeat, as on any stream
    other = "iort/v1/site-a/or-2/"
    assert rooms.accept(other + "telemetry", telemetry(1, 1.0), 0.2) is not None
    for bad in (skip(1, topic="skip"), skip(2, reason="lost"), skip(3, first=-1), skip(4, x=1)):
        with pytest.raises(Rejected, match="skip"):
            rooms.accept(T + "skip", bad, 0.3)
    assert room.skipped_seqs == 993
    assert rooms.rooms[other[len("iort/v1/") : -1]].telemetry is not None  # untouched


def test_a_reversed_skip_range_is_rejected() -> None:
    with pytest.raises(Rejected, match="skip: first > last"):
        Rooms("iort").accept(T + "skip", skip(0, first=10, last=9), 0.0)
