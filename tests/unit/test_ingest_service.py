"""iort-ingest's message handling without a broker (ingest/service.py): what is stored and
counted per room, bad messages confined to their room, declared skips as accounted, gap
requests signed with the replay-only key that a room's checks accept, the store and the
report read back, the lines rebuilt at a restart."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from iortd.auditlog.command import NonceBook, check_command
from iortd.auditlog.keyring import parse_keyring
from iortd.auditlog.note import generate_keypair
from iortd.ingest.config import ConfigError, IngestConfig, load
from iortd.ingest.report import room_report
from iortd.ingest.service import Ingest
from iortd.ingest.store import Store, StoreError
from iortd.kernel.broker import BrokerSettings

KEY = generate_keypair("ingest-central")
TS = "2026-12-06T10:00:00.000000Z"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def cfg(tmp_path: Path) -> IngestConfig:
    return IngestConfig.model_validate(
        {
            "name": "central",
            "database": str(tmp_path / "db.sqlite"),
            "replay": {"key_file": str(tmp_path / "k.key"), "settle_s": 1.0, "retry_s": 2.0},
        }
    )


def make(tmp_path: Path) -> tuple[Ingest, Store, Clock]:
    store = Store.open(tmp_path / "db.sqlite")
    clock = Clock()
    settings = BrokerSettings(host="127.0.0.1", port=1, tls=False, client_id="t")
    ing = Ingest(cfg(tmp_path), store, KEY, settings=settings, mono=clock)
    return ing, store, clock


def msg(seq: int, *, session: int = 1, historical: Any = False, **extra: Any) -> bytes:
    body = {
        "schema": "iort/v1", "session": session, "seq": seq, "ts": TS, "sim": True,
        "historical": historical, "kind": "daemon_notice", "delivery_id": None, "at": TS,
        "severity": "info", "message": "x",
    }  # fmt: skip
    return orjson.dumps({**body, **extra})


def skip(seq: int, first: int, last: int, *, of: str = "events") -> bytes:
    body = {"topic": of, "session": 1, "first": first, "last": last, "reason": "not_held"}
    return orjson.dumps(
        {"schema": "iort/v1", "session": 1, "seq": seq, "ts": TS, "sim": True,
         "historical": False, "skipped": body}
    )  # fmt: skip


EV = "iort/v1/site-a/or-1/events"


async def test_messages_are_counted_checked_and_confined_to_their_room(tmp_path: Path) -> None:
    ing, store, _ = make(tmp_path)
    for q in (0, 1, 2, 2, 5):
        ing.on_message(EV, msg(q))
    # Junk from another room: counted there, nothing else changes.
    for raw in (b"{not json", msg(9, kind="x"), orjson.dumps({"a": 1}), b"x" * 70_000):
        ing.on_message("iort/v1/site-a/or-2/events", raw)
    ing.on_message("iort/v1/_ingest/central/status", b"{}")  # not a room: ignored
    ing.on_message("iort/v1/site-a/or-1/cmd/replay", b"{}")  # not read
    ing.on_message("iort/v1/site-a/or-2/telemetry", skip(0, 0, 0))  # a skip's shape on telemetry
    assert ing.stats.received == 4
    assert ing.stats.repeats == 1
    assert ing.stats.invalid == 5
    line = ing.lines[("site-a", "or-1", "events")]
    assert line.holes() == [(3, 4)]
    assert ("site-a", "or-2", "events") not in ing.lines
    await ing.flush()
    rooms = {r["room"]: r for r in room_report(tmp_path / "db.sqlite")}
    assert rooms["or-1"]["received"] == 4
    assert rooms["or-1"]["missing"] == 2
    assert rooms["or-1"]["repeats"] == 1
    assert rooms["or-2"]["invalid"] == 5
    store.close()


async def test_a_gap_is_asked_with_a_request_the_room_accepts_then_filled(tmp_path: Path) -> None:
    ing, store, clock = make(tmp_path)
    for q in (0, 1, 4):
        ing.on_message(EV, msg(q))
    assert ing.due_requests() == []  # noticed now, asked after settle_s
    clock.t += 1.0
    ((site, room, req),) = ing.due_requests()
    assert (site, room, req.topic, req.session, req.first, req.last) == (
        "site-a", "or-1", "events", 1, 2, 3,
    )  # fmt: skip
    topic, raw, nonce = ing.request_bytes(site, room, req)
    assert topic == "iort/v1/site-a/or-1/cmd/replay"
    ring = parse_keyring(
        (
            f'[[key]]\nholder = "ingest-central"\nname = "Central"\nroles = ["replay"]\n'
            f'public_key = "{KEY.verifier.text}"\nvalid_from = "2026-01-01T00:00:00Z"\n'
            'valid_until = "2099-01-01T00:00:00Z"\n'
        ).encode(),
        Path("keyring.toml"),
    )
    cmd = check_command(raw, ring, site="site-a", room="or-1", now=datetime.now(UTC),
                        skew_s=60, seen=NonceBook(60))  # fmt: skip
    assert cmd.nonce == nonce
    assert dict(cmd.body) == {"topic": "events", "session": 1, "first": 2, "last": 3}
    assert ing.due_requests() == []  # asked: again only after retry_s
    # The room answers: 2 sent again, 3 declared not held. The gap closes: a repair.
    ing.on_message(EV, msg(2, historical=True))
    ing.on_message("iort/v1/site-a/or-1/skip", skip(0, 3, 3))
    clock.t += 0.5
    assert ing.due_requests() == []
    assert ing.stats.repaired == 1
    assert ing.stats.skipped == 1
    assert ing.stats.repair_s == [1.5]
    await ing.flush()
    (row,) = room_report(tmp_path / "db.sqlite")
    assert (row["received"], row["repaired"], row["skipped"], row["missing"]) == (4, 1, 1, 0)
    assert row["repair_max_s"] == 1.5
    store.close()

    # A restart rebuilds the lines from the store: nothing to ask.
    ing2, store2, _ = make(tmp_path)
    assert await asyncio.to_thread(ing2.rebuild) == 4
    assert ing2.lines[("site-a", "or-1", "events")].runs == [[0, 4]]
    store2.close()


def test_requests_per_room_are_rate_limited(tmp_path: Path) -> None:
    ing, store, clock = make(tmp_path)
    for q in range(0, 200, 2):  # 99 holes in one room
        ing.on_message(EV, msg(q))
    assert ing.due_requests() == []  # noticed
    clock.t += 1.0
    assert len(ing.due_requests()) == 20  # max_per_minute
    clock.t += 30.0
    assert ing.due_requests() == []
    clock.t += 31.0
    assert len(ing.due_requests()) == 20
    store.close()


def test_a_skip_with_first_after_last_is_refused(tmp_path: Path) -> None:
    ing, store, _ = make(tmp_path)
    ing.on_message("iort/v1/site-a/or-1/skip", skip(0, 9, 3))
    assert ing.stats.invalid == 1
    assert ing.lines == {}
    store.close()


def test_one_writer_per_database_and_config_errors_name_the_key(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "db.sqlite")
    with pytest.raises(StoreError, match="another iort-ingest"):
        Store.open(tmp_path / "db.sqlite")
    store.close()
    bad = tmp_path / "ingest.toml"
    bad.write_text(
        'name = "Central!"\ndatabase = "x.sqlite"\n[replay]\nkey_file = "k"\nextra = 1\n'
    )
    with pytest.raises(ConfigError) as exc:
        load(bad)
    text = str(exc.value)
    assert f"{bad}: name" in text
    assert "replay.extra" in text


def test_envelope_mode_checks_what_the_bookkeeping_reads(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "db.sqlite")
    c = cfg(tmp_path).model_copy(update={"validate_": "envelope"})
    settings = BrokerSettings(host="127.0.0.1", port=1, tls=False, client_id="t")
    ing = Ingest(c, store, KEY, settings=settings)
    ing.on_message(EV, msg(0, kind="not a kind"))  # the body is not walked
    assert ing.stats.received == 1
    for bad in (msg(-1), msg(1, ts="yesterday"), msg(1, historical=1), msg(1, schema="v2")):
        ing.on_message(EV, bad)
    assert ing.stats.invalid == 4
    ing.on_message("iort/v1/site-a/or-1/skip", skip(0, 9, 3))  # skips: always whole
    assert ing.stats.invalid == 5
    store.close()


def test_no_request_while_a_rooms_backlog_is_still_coming_in(tmp_path: Path) -> None:
    """A hole while the room's live messages arrive far later than usual is most likely
    what is still queued for the ingest: asked for only once that backlog is in."""
    ing, store, clock = make(tmp_path)
    wall = [1000.0]
    ing._wall = lambda: wall[0]
    made = datetime.fromisoformat(TS[:-1]).replace(tzinfo=UTC).timestamp()
    wall[0] = made + 0.05  # usual: 50 ms late
    ing.on_message(EV, msg(0))
    wall[0] = made + 30.0  # the same ts arriving 30 s late: a backlog
    ing.on_message(EV, msg(5))
    assert ing.due_requests() == []  # noticed
    for q in (6, 7):  # the backlog keeps coming: the hole is not asked for
        clock.t += 1.0
        ing.on_message(EV, msg(q))
        assert ing.draining("site-a", "or-1", clock.t)
        assert ing.due_requests() == []
    clock.t += 1.0  # not heard from for settle_s: the backlog is in
    ((_, _, req),) = ing.due_requests()
    assert (req.first, req.last) == (1, 4)
    store.close()


def test_no_retry_while_another_rooms_backlog_comes_in(tmp_path: Path) -> None:
    ing, store, clock = make(tmp_path)
    wall = [0.0]
    ing._wall = lambda: wall[0]
    made = datetime.fromisoformat(TS[:-1]).replace(tzinfo=UTC).timestamp()
    wall[0] = made + 0.05
    for q in (0, 3):
        ing.on_message(EV, msg(q))
    ing.on_message("iort/v1/site-a/or-2/events", msg(0))
    ing.due_requests()
    clock.t += 1.0
    assert len(ing.due_requests()) == 1  # or-1's gap, asked once
    wall[0] = made + 40.0  # or-2's messages now arrive 40 s late, and keep coming
    for q in range(1, 12):
        clock.t += 1.0
        ing.on_message("iort/v1/site-a/or-2/events", msg(q))
        assert ing.due_requests() == []  # or-1's retry (due after 2 s) waits
    clock.t += 1.0  # or-2 drained
    ((_, room, _),) = ing.due_requests()
    assert room == "or-1"
    store.close()
