"""A room's audit log with deliveries and the real intake and ``signoff`` handler, for the
sign-off tests (test_daemon_signoff.py, test_audit_signoffs.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from iortd.auditlog.command import sign_command
from iortd.auditlog.keyring import parse_keyring
from iortd.auditlog.note import generate_keypair
from iortd.auditlog.signoff import delivery_record
from iortd.auditlog.writer import AuditLog, segment_paths
from iortd.daemon.commands import CommandIntake
from iortd.daemon.signoff import Signoffs, install

ORIGIN = "iortd/site-a/or-3/00112233aabbccdd"
LOGKEY = generate_keypair("or-3")
ANNA, BEA = generate_keypair("phys-anna"), generate_keypair("phys-bea")


def ring_text(roles: str = '["physicist"]', *, without: str = "") -> str:
    """The keyring's TOML: both physicists (``without`` one of them; ``roles`` for both)."""
    return "".join(
        f'[[key]]\nholder = "{k.name}"\nname = "{name}"\nroles = {roles}\n'
        f'public_key = "{k.verifier.text}"\nvalid_from = "2026-01-01T00:00:00Z"\n'
        'valid_until = "2099-01-01T00:00:00Z"\n\n'
        for k, name in ((ANNA, "A. Example, MPE"), (BEA, "B. Other, MPE"))
        if k.name != without
    )


RING = parse_keyring(ring_text().encode(), Path("keyring.toml"))
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
    audit.append("daemon_start", {"verifier_key": LOGKEY.verifier.text}, durable=True)
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


def body(room: Room, **kw: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "delivery_id": D1,
        "meaning": "approved",
        "name": "A. Example, MPE",
        "utc_offset_min": 60,
        "record": room.record(),
    }
    return {**b, **kw}
