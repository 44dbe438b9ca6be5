"""The daemon's ``signoff`` command (daemon/signoff.py) over a real audit log and the real
intake: judged against what the log holds (ended, covered, the record recomputed, not a
duplicate), recorded with the whole signed envelope, and a crash's unjudged one refused."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from signofflog import ANNA, BEA, D1, D2, D3, RING, Room, body, deliveries, open_room

from iortd.auditlog.command import sign_command
from iortd.auditlog.signoff import check_envelope
from iortd.daemon.signoff import RecordWatch
from iortd.daemon.tracker import DeliveryAmended


def amended(did: str) -> DeliveryAmended:
    """An end event for ``did`` (the watch reads its id only)."""
    return DeliveryAmended(did, "test", None)  # type: ignore[arg-type]


@pytest.fixture
async def room(tmp_path: Path) -> AsyncIterator[Room]:
    r = await open_room(tmp_path)
    await deliveries(r.audit)
    yield r
    await r.audit.close()
    await r.task


async def test_a_sign_off_is_recorded_with_its_envelope(room: Room) -> None:
    got = await room.send(body(room))
    assert got["type"] == "delivery_signed"
    assert "delivery_id" not in got  # never extends the range it signs
    d = got["data"]
    assert (d["delivery_id"], d["meaning"], d["reason"], d["by"], d["name"], d["roles"]) == (
        D1,
        "approved",
        None,
        "phys-anna",
        "A. Example, MPE",
        ["physicist"],
    )
    assert d["record"] == room.record()
    assert d["signed_at"] == d["envelope"]["issued_at"]
    assert d["utc_offset_min"] == 60
    assert check_envelope(d["envelope"], RING).holder == "phys-anna"  # checkable offline
    [acc] = room.entries("command_accepted")
    assert acc["data"]["body"]["delivery_id"] == D1
    assert any(
        n.startswith(f"info: sign-off recorded: delivery {D1} approved") for n in room.notices
    )


async def test_several_sign_offs_but_no_duplicate(room: Room) -> None:
    first = await room.send(body(room, meaning="reviewed"))
    assert first["type"] == "delivery_signed"
    assert (await room.send(body(room)))["type"] == "delivery_signed"  # then approved
    other = body(room, name="B. Other, MPE")
    assert (await room.send(other, BEA))["type"] == "delivery_signed"  # a second physicist
    again = await room.send(body(room, meaning="reviewed"))
    assert again["data"]["reason"] == "duplicate"
    assert len(room.entries("delivery_signed")) == 3


@pytest.mark.parametrize(
    ("change", "reason", "said"),
    [
        ({"delivery_id": "or-3-nothing"}, "unknown_delivery", "no delivery"),
        ({"delivery_id": D3}, "not_ended", "has not ended"),
        ({"delivery_id": D2}, "not_covered", "no signed checkpoint"),
        ({"name": "Someone Else"}, "name_mismatch", "not the keyring's"),
        ({"meaning": "ok"}, "malformed", "meaning"),
        ({"entries_sha256": "00" * 32}, "record_mismatch", "record.entries_sha256"),
        ({"last_seq": 3}, "record_mismatch", "record.last_seq"),
    ],
)
async def test_refused_with_a_fixed_reason(
    room: Room, change: dict[str, Any], reason: str, said: str
) -> None:
    b = body(room)
    if "entries_sha256" in change or "last_seq" in change:
        b["record"] = {**b["record"], **change}
    else:
        b.update(change)
    got = await room.send(b)
    assert got["type"] == "signoff_refused"
    assert got["data"]["reason"] == reason
    assert said in got["data"]["detail"]
    assert not room.entries("delivery_signed")
    assert any(n.startswith(f"critical: sign-off NOT recorded ({reason})") for n in room.notices)


async def test_a_crash_before_the_judgement_is_refused_at_the_next_start(tmp_path: Path) -> None:
    r = await open_room(tmp_path)
    await deliveries(r.audit)
    env = sign_command(
        "signoff", body(r), signer=ANNA, holder="phys-anna", site="site-a", room="or-3", ttl_s=300
    )
    verdict = r.intake.submit(orjson.dumps(env), source="mqtt", topic_kind="signoff")
    assert verdict.recorded is not None
    await verdict.recorded  # accepted and on disk; the handler never runs
    await r.audit.close()
    await r.task
    r2 = await open_room(tmp_path)
    try:
        [refused] = r2.entries("signoff_refused")
        assert refused["data"]["reason"] == "interrupted"
        assert refused["data"]["delivery_id"] == D1
        assert not r2.entries("delivery_signed")
    finally:
        await r2.audit.close()
        await r2.task


async def test_the_record_is_published_once_a_checkpoint_covers_the_ended_delivery(
    room: Room,
) -> None:
    """What the dashboard builds the body from (the retained delivery topic): the same
    record the judgement recomputes, handed on at the first checkpoint that covers it."""
    watch = RecordWatch(room.directory)
    got: list[tuple[str, dict[str, Any]]] = []
    watch.targets = [lambda did, rec: got.append((did, dict(rec)))]
    ended = amended(D2)
    await watch.events([ended], None)
    await watch.checkpoint("note")  # D2 ended but no checkpoint covers it yet
    assert got == []
    await room.audit.checkpoint("delivery_end")
    await watch.checkpoint("note")
    assert got == [(D2, room.record(D2))]
    await watch.checkpoint("note")
    assert len(got) == 1  # once
    assert (await room.send(body(room, delivery_id=D2, record=got[0][1])))["type"] == (
        "delivery_signed"
    )
