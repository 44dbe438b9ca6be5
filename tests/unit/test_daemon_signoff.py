"""The daemon's ``signoff`` command (daemon/signoff.py) over a real audit log and the real
intake: judged against what the log holds (ended, covered, the record recomputed, not a
duplicate), recorded with the whole signed envelope, and a crash's unjudged one refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from iortd.auditlog.command import sign_command
from iortd.auditlog.keyring import parse_keyring
from iortd.auditlog.note import generate_keypair
from iortd.auditlog.signoff import check_envelope, delivery_record
from iortd.auditlog.writer import AuditLog, segment_paths
from iortd.daemon.commands import CommandIntake
from iortd.daemon.signoff import Signoffs, install

ORIGIN = "iortd/site-a/or-3/00112233aabbccdd"
LOGKEY = generate_keypair("or-3")
ANNA, BEA = generate_keypair("phys-anna"), generate_keypair("phys-bea")
RING = parse_keyring(
    "".join(
        f'[[key]]\nholder = "{k.name}"\nname = "{name}"\nroles = ["physicist"]\n'
        f'public_key = "{k.verifier.text}"\nvalid_from = "2026-01-01T00:00:00Z"\n'
        'valid_until = "2099-01-01T00:00:00Z"\n\n'
        for k, name in ((ANNA, "A. Example, MPE"), (BEA, "B. Other, MPE"))
    ).encode(),
    Path("keyring.toml"),
)
D1, D2, D3 = ("or-3-20261206T080000000000Z", "or-3-20261206T090000000000Z", "or-3-open")


@dataclass
class Room:
    directory: Path
    audit: AuditLog
    intake: CommandIntake
    signoffs: Signoffs
    task: asyncio.Task[None]
    notices: list[str] = field(default_factory=list)

    def entries(self, kind: str | None = None) -> list[dict[str, Any]]:
        found = [
            orjson.loads(line)
            for path in segment_paths(self.directory)
            for line in path.read_bytes().splitlines()
        ]
        return [e for e in found if kind is None or e["type"] == kind]

    def record(self, did: str = D1) -> dict[str, Any]:
        got = delivery_record(self.entries(), did)
        assert got is not None
        rec = got.record()
        assert rec is not None
        return rec

    async def send(self, body: dict[str, Any], key: Any = ANNA) -> dict[str, Any]:
        env = sign_command(
            "signoff", body, signer=key, holder=key.name, site="site-a", room="or-3", ttl_s=300
        )
        verdict = self.intake.submit(orjson.dumps(env), source="mqtt", topic_kind="signoff")
        assert verdict.command is not None, verdict.reason
        assert verdict.recorded is not None
        await verdict.recorded
        await self.signoffs.handle(verdict.command)
        [outcome] = [
            e
            for e in self.entries()
            if e["type"] in ("delivery_signed", "signoff_refused")
            and e["data"]["nonce"] == verdict.command.nonce
        ]
        return outcome


async def open_room(directory: Path, *, resume: bool = True) -> Room:
    audit, _ = await AuditLog.open(directory, origin=ORIGIN, signer=LOGKEY)
    task = asyncio.create_task(audit.run())
    notices: list[str] = []

    def notice(sev: str, msg: str) -> None:
        notices.append(f"{sev}: {msg}")

    intake = CommandIntake(
        RING, audit, site="site-a", room="or-3", skew_s=60, max_per_minute=60, notice=notice
    )
    intake.rebuild_nonces(directory)
    signoffs = await install(intake, audit, directory, notice)
    assert signoffs is not None
    if resume:
        await signoffs.resume()
    return Room(directory, audit, intake, signoffs, task, notices)


async def deliveries(audit: AuditLog) -> None:
    """D1 ended and covered; D2 ended, not covered; D3 open."""
    for kind, did in [
        ("delivery_started", D1),
        ("sample", D1),
        ("device_identified", None),
        ("delivery_terminated", D1),
    ]:
        audit.append(kind, {"x": 1}, delivery_id=did, durable=True)
    await audit.checkpoint("delivery_end")
    for kind, did in [("delivery_started", D3), ("delivery_started", D2)]:
        audit.append(kind, {}, delivery_id=did, durable=True)
    await audit.append("delivery_terminated", {}, delivery_id=D2, durable=True).committed


@pytest.fixture
async def room(tmp_path: Path) -> AsyncIterator[Room]:
    r = await open_room(tmp_path)
    await deliveries(r.audit)
    yield r
    await r.audit.close()
    await r.task


def body(room: Room, **kw: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "delivery_id": D1,
        "meaning": "approved",
        "name": "A. Example, MPE",
        "record": room.record(),
    }
    return {**b, **kw}


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
