"""The retained ``alarms`` topic on the dashboard's server state (issue 19, item 3, the
reading side): validated like every retained topic, held per room, and turned into the
rows the room page draws (`iortd.dashboard.alarms`): in the order a physicist needs them
(standing unacknowledged HIGH first), each with a stable id for the acknowledge button to
come, who acknowledged it, and the counts the overview's card shows.

Hostile payloads on this topic are also in test_dashboard_hostile.py's tables."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]

from iortd.dashboard.alarms import CheckedItems, alarm_error, alarm_rows, alarm_view, row_id
from iortd.dashboard.hub import Hub
from iortd.dashboard.schemas import published, schema_error
from iortd.dashboard.state import Rejected, Rooms

T = "iort/v1/site-a/or-1/"
TS = "2026-11-26T10:52:31.004211Z"
D1 = "or-1-20261126T1045Z"
BOB = {"by": "op-bob", "name": "B. Operator, RTT", "at": "2026-11-26T10:52:30.998102Z"}


def at(s: int) -> str:
    return f"2026-11-26T10:{s // 60:02d}:{s % 60:02d}.000000Z"


def item(
    key: str,
    severity: str = "high",
    raised: int = 0,
    cleared: int | None = None,
    ack: dict[str, str] | None = None,
    delivery_id: str | None = D1,
) -> dict[str, Any]:
    return {
        "key": key,
        "code": key.split(":", maxsplit=1)[0],
        "severity": severity,
        "message": f"{key} message",
        "raised_at": at(raised),
        "cleared_at": None if cleared is None else at(cleared),
        "delivery_id": delivery_id,
        "acknowledged": ack,
    }


def alarms(seq: int, *items: dict[str, Any], omitted: int = 0, **kw: Any) -> dict[str, Any]:
    return {
        "schema": "iort/v1",
        "session": 1,
        "seq": seq,
        "ts": TS,
        "sim": True,
        "historical": False,
        "alarms": list(items),
        "omitted": omitted,
        **kw,
    }


def feed(rooms: Rooms, p: dict[str, Any], mono: float = 0.0, topic: str = T) -> None:
    rooms.receive(topic + "alarms", orjson.dumps(p), mono)


# ---- the rows: order, ids, who acknowledged -------------------------------------------------


def test_standing_unacknowledged_high_alarms_come_first_then_by_what_needs_someone() -> None:
    """The daemon lists its alarms oldest first; the page needs what stands and has no one
    on it first, the highest priority first (IEC 60601-1-8), then what stands and someone
    has taken, then what cleared unseen (latched, waiting for an acknowledgement); newest
    first within each."""
    p = alarms(
        1,
        item("dose_rate_deviation", "medium", raised=10, cleared=40),  # cleared, unacked
        item("interlock_tripped:door", "high", raised=20, ack=BOB),  # standing, acked
        item("backup_timer_near", "low", raised=30),  # standing, unacked, low
        item("applicator_displaced", "high", raised=50),  # standing, unacked, high
        item("no_prescription", "high", raised=60),  # standing, unacked, high, newest
        item("monitor_gap", "medium", raised=70),  # standing, unacked, medium
        item("interlock_tripped:kv", "high", raised=80, cleared=90),  # cleared, unacked
    )
    rows = alarm_rows(p)
    assert [r["key"] for r in rows] == [
        "no_prescription",
        "applicator_displaced",
        "monitor_gap",
        "backup_timer_near",
        "interlock_tripped:door",
        "interlock_tripped:kv",
        "dose_rate_deviation",
    ]
    assert [r["standing"] for r in rows] == [True] * 5 + [False] * 2


def test_each_row_says_who_acknowledged_it_and_when_or_none() -> None:
    p = alarms(
        1,
        item("interlock_tripped:door", raised=20, ack=BOB),
        item("dose_rate_deviation", "medium", raised=10, cleared=40),
    )
    door, rate = alarm_rows(p)
    assert door["acknowledged"] == BOB
    assert door["cleared_at"] is None
    assert door["message"] == "interlock_tripped:door message"
    assert door["raised_at"] == at(20)
    assert rate["acknowledged"] is None
    assert rate["cleared_at"] == at(40)


def test_a_rows_id_is_its_raising_and_delivery_and_stays_the_same_when_acknowledged() -> None:
    """The acknowledge button (next) names a raising by key and raised_at, with its
    delivery id (docs/commands.md, the ack command's body): the row's id carries the three,
    unambiguously (a key may hold any character), and does not change when the same
    raising comes back acknowledged or cleared."""
    before = alarm_rows(alarms(1, item("x|y:z", raised=5, delivery_id=None)))[0]
    after = alarm_rows(alarms(2, item("x|y:z", raised=5, cleared=9, ack=BOB, delivery_id=None)))
    assert before["id"] == after[0]["id"] == row_id(item("x|y:z", raised=5, delivery_id=None))
    assert orjson.loads(before["id"]) == ["x|y:z", at(5), None]
    other = alarm_rows(alarms(3, item("x|y:z", raised=6, delivery_id=None)))[0]
    assert other["id"] != before["id"], "another raising of the same key is another row"


def test_the_counts_for_the_overview_include_what_the_daemon_left_out() -> None:
    p = alarms(
        1,
        item("a", "high", raised=1),
        item("b", "high", raised=2, ack=BOB),
        item("c", "high", raised=3, cleared=4),
        item("d", "low", raised=5),
        omitted=7,
    )
    v = alarm_view(p, summary=True)
    assert "rows" not in v
    assert v["listed"] == 4
    assert v["standing"] == 3
    assert v["unacknowledged"] == 3 + 7, "the omitted ones are cleared and unacknowledged"
    assert v["standing_unacknowledged_high"] == 1
    assert v["omitted"] == 7
    full = alarm_view(p, summary=False)
    assert [r["key"] for r in full["rows"]] == ["a", "d", "b", "c"]


# ---- held per room, served to the page --------------------------------------------------


def test_the_alarms_topic_is_held_per_room_and_served_to_the_room_page() -> None:
    rooms = Rooms("iort")
    feed(rooms, alarms(1, item("interlock_tripped:door", raised=20)), 1.0)
    feed(rooms, alarms(1), 1.0, topic="iort/v1/site-a/or-2/")
    feed(rooms, alarms(2, item("interlock_tripped:door", raised=20, ack=BOB)), 2.0)
    snap = rooms.snapshot(3.0, "site-a/or-1")["rooms"]["site-a/or-1"]
    view = snap["alarms"]
    assert view["age_ms"] == 1000
    assert [r["acknowledged"] for r in view["rows"]] == [BOB], "the latest message is the truth"
    assert "alarms" not in snap["retained"], "served as rows, not twice"
    other = rooms.snapshot(3.0, "site-a/or-2")["rooms"]["site-a/or-2"]["alarms"]
    assert other["rows"] == []
    assert other["unacknowledged"] == 0
    assert rooms.diagnostics()["ignored"] == 0, "no longer a topic passed over"


def test_the_overview_gets_the_counts_only() -> None:
    rooms = Rooms("iort")
    many = [item(f"k{i}", "medium", raised=i, cleared=i + 1) for i in range(200)]
    feed(rooms, alarms(1, *many), 0.0)
    summary = rooms.snapshot(1.0, summary=True)["rooms"]["site-a/or-1"]
    assert "rows" not in summary["alarms"]
    assert summary["alarms"]["unacknowledged"] == 200
    assert len(orjson.dumps(summary)) < 2000, "200 alarms cost the overview nothing"


def test_a_room_without_an_alarms_message_says_none_received() -> None:
    rooms = Rooms("iort")
    status = {k: v for k, v in alarms(1).items() if k not in ("alarms", "omitted")}
    status |= {"online": True, "software_version": "0.1.0", "site": "site-a", "room": "or-1"}
    rooms.receive(T + "status", orjson.dumps(status), 0.0)
    assert rooms.snapshot(1.0, "site-a/or-1")["rooms"]["site-a/or-1"]["alarms"] is None
    assert rooms.snapshot(1.0, summary=True)["rooms"]["site-a/or-1"]["alarms"] is None


def test_the_alarms_list_is_charged_to_its_room() -> None:
    rooms = Rooms("iort")
    feed(rooms, alarms(1), 0.0)
    small = rooms.rooms["site-a/or-1"].bytes
    big = alarms(2, *[item(f"k{i}", raised=i) for i in range(200)])
    feed(rooms, big, 0.0)
    assert rooms.rooms["site-a/or-1"].bytes - small >= len(orjson.dumps(big)) - 200


def test_a_live_alarms_message_goes_to_room_pages_as_rows_and_to_overviews_as_counts() -> None:
    rooms = Rooms("iort")
    hub = Hub(rooms, "mqtt://127.0.0.1:1883", clock=lambda: 0.0)
    page, overview, elsewhere = (
        hub.subscribe("site-a/or-1"),
        hub.subscribe(None),
        hub.subscribe("x/y"),
    )
    acc = rooms.accept(
        T + "alarms", alarms(1, item("a", raised=1), item("b", "low", raised=2)), 0.0
    )
    assert acc is not None
    hub.message(acc)
    to_page, to_overview = page.queue.get_nowait(), overview.queue.get_nowait()
    assert elsewhere.queue.empty()
    assert to_page.event == to_overview.event == "msg"
    assert [r["key"] for r in to_page.data["alarms"]["rows"]] == ["a", "b"]
    assert "rows" not in to_overview.data["alarms"]
    assert to_overview.data["alarms"]["unacknowledged"] == 2
    assert to_overview.size < to_page.size
    for d in (to_page.data, to_overview.data):
        assert "alarms" not in d["payload"], "the list goes once, as rows"
        assert d["payload"]["seq"] == 1


# ---- hostile payloads -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (alarms(2, item("a") | {"severity": "critical"}), "schema alarms"),
        (
            alarms(2, item("a") | {"acknowledged": {"by": "Op Bob", "name": "x", "at": TS}}),
            "schema",
        ),
        (alarms(2, item("a") | {"patient": "x"}), "schema"),
        (alarms(2, *[item(f"k{i}", raised=i) for i in range(257)]), "schema"),
        (alarms(2, item("a"), omitted=-1), "schema"),
        (alarms(2, item("a"), item("a")), "alarms duplicate"),
        (alarms(2, item("a", ack=BOB | {"name": "B. \u202eOperator"})), "alarms names"),
        (alarms(2, item("a", ack=BOB | {"name": "B.\u200bOperator"})), "alarms names"),
        (alarms(2, item("a\u202e:b")), "alarms names"),
    ],
)
def test_a_hostile_alarms_payload_is_rejected_and_the_room_keeps_its_list(
    payload: dict[str, Any], reason: str
) -> None:
    rooms = Rooms("iort")
    feed(rooms, alarms(1, item("interlock_tripped:door", raised=20)), 0.0)
    with pytest.raises(Rejected, match=reason):
        feed(rooms, payload, 1.0)
    room = rooms.snapshot(2.0, "site-a/or-1")["rooms"]["site-a/or-1"]
    assert sum(room["rejected"].values()) == 1
    assert [r["key"] for r in room["alarms"]["rows"]] == ["interlock_tripped:door"]


def test_alarm_error_accepts_what_a_daemon_sends() -> None:
    """The daemon's own example (docs/mqtt-topics.md) passes: nothing genuine is refused."""
    p = alarms(
        1,
        item("interlock_tripped:door", raised=20, ack=BOB),
        item("interlock_tripped:door", "medium", raised=10, cleared=15),  # an earlier raising
        item("a", "low", raised=1, delivery_id=None),
    )
    assert alarm_error(p) is None


# ---- the schema check remembers the items found valid --------------------------------------


def test_a_republished_list_has_only_its_new_items_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """256 items cost some 50 ms to check against the schema, and the daemon republishes
    the whole list on every change (up to 4 times a second): an item already found valid
    is not checked again."""
    checked: list[int] = []

    def counting(name: str, payload: dict[str, Any]) -> str | None:
        checked.append(len(payload["alarms"]))
        return schema_error(name, payload)

    monkeypatch.setattr("iortd.dashboard.alarms.schema_error", counting)
    rooms = Rooms("iort")
    full = [item(f"k{i}", raised=i, cleared=i + 1) for i in range(255)]
    feed(rooms, alarms(1, *full), 0.0)
    feed(rooms, alarms(2, *full, item("new", raised=300)), 0.0)
    feed(rooms, alarms(3, *full[1:], item("new", raised=300, ack=BOB)), 0.0)
    assert checked == [255, 1, 1]
    assert rooms.rooms["site-a/or-1"].retained["alarms"].payload["seq"] == 3


def test_remembered_items_never_change_a_verdict() -> None:
    """The published schema's verdict on every item broken field by field, with valid
    items already remembered around it, and on a list one item too long."""
    reference = Draft202012Validator(published("alarms"))
    checked = CheckedItems()
    good = [item(f"k{i}", raised=i, ack=BOB if i % 2 else None) for i in range(5)]
    assert checked.schema_error(alarms(1, *good)) is None
    bads: tuple[object, ...] = (True, 1, -1, "x", None, [], {}, "x" * 600)
    variants = []
    for key in good[0]:
        variants.append({k: v for k, v in good[0].items() if k != key})
        variants += [{**good[0], key: bad} for bad in bads]
    for key in BOB:
        variants += [{**good[1], "acknowledged": {**BOB, key: bad}} for bad in bads]
    for v in variants:
        p = alarms(2, *good, v)
        assert (checked.schema_error(p) is None) == reference.is_valid(p), v
    many = [item(f"m{i}", raised=i) for i in range(256)]
    assert checked.schema_error(alarms(3, *many)) is None
    assert checked.schema_error(alarms(4, *many, good[0])) is not None, "maxItems"
    assert checked.schema_error(alarms(5, *good) | {"extra": 1}) is not None


def test_what_is_remembered_is_bounded_in_bytes() -> None:
    checked = CheckedItems(max_bytes=10_000)
    for n in range(20):
        p = alarms(n + 1, *[item(f"k{n}-{i}", raised=i) for i in range(100)])
        assert checked.schema_error(p) is None
        assert checked.bytes <= 10_000
