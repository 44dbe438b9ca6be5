"""The daemon's ``prescription`` command (daemon/prescriptions.py) over a real audit log and
the real intake: parsed strictly, judged (expiry, signer = approver, one pending per room),
recorded, and rebuilt from the log at start (also after a crash before the handler ran)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from iortd.auditlog.command import sign_command
from iortd.auditlog.keyring import parse_keyring
from iortd.auditlog.note import Signer, generate_keypair
from iortd.auditlog.writer import AuditLog, segment_paths
from iortd.daemon.commands import CommandIntake
from iortd.daemon.prescriptions import Prescriptions, summary
from iortd.plan.model import Tolerances, make_prescription, prescription_bytes, prescription_dict

ORIGIN = "iortd/site-a/or-3/00112233aabbccdd"
CURIE = generate_keypair("phys.curie")
ANNA = generate_keypair("phys-anna")
RING = parse_keyring(
    "".join(
        f'[[key]]\nholder = "{k.name}"\nname = "Staff"\nroles = ["physicist"]\n'
        f'public_key = "{k.verifier.text}"\nvalid_from = "2026-01-01T00:00:00Z"\n'
        'valid_until = "2099-01-01T00:00:00Z"\n\n'
        for k in (CURIE, ANNA)
    ).encode(),
    Path("keyring.toml"),
)


def rx(
    treatment: str = "T-2026-0042",
    *,
    approved_at: datetime | None = None,
    hours: float = 12,
    by: str = "phys.curie",
    dose: float = 20.0,
) -> dict[str, Any]:
    at = approved_at or datetime.now(UTC) - timedelta(minutes=5)
    p = make_prescription(
        treatment_id=treatment,
        plan_id="IORT-P1",
        fraction=1,
        fractions=1,
        prescribed_dose_gy=dose,
        dose_reference="surface",
        depth_mm=None,
        applicator_code="SPH30",
        applicator_diameter_mm=30.0,
        planned_time_s=1380.0,
        approved_by=by,
        approved_at=at,
        not_after=at + timedelta(hours=hours),
        tolerances=Tolerances(),
    )
    return prescription_dict(p)


def sha(body: dict[str, Any]) -> str:
    from iortd.plan.model import parse_prescription  # noqa: PLC0415

    return hashlib.sha256(prescription_bytes(parse_prescription(orjson.dumps(body)))).hexdigest()


def cmd(body: dict[str, Any], signer: Signer = CURIE) -> bytes:
    env = sign_command(
        "prescription", body, signer=signer, holder=signer.name, site="site-a", room="or-3",
        ttl_s=300,
    )  # fmt: skip
    return orjson.dumps(env)


@dataclass
class Room:
    directory: Path
    audit: AuditLog
    intake: CommandIntake
    rx: Prescriptions
    task: asyncio.Task[None]
    notices: list[str] = field(default_factory=list)
    delivery: list[bool] = field(default_factory=lambda: [False])

    def entries(self, kind: str | None = None) -> list[dict[str, Any]]:
        found = [
            orjson.loads(line)
            for path in segment_paths(self.directory)
            for line in path.read_bytes().splitlines()
        ]
        return [e for e in found if kind is None or e["type"] == kind]

    async def send(self, raw: bytes) -> dict[str, Any]:
        """Submit, handle (as the intake's task would), and return the outcome entry."""
        verdict = self.intake.submit(raw, source="mqtt", topic_kind="prescription")
        assert verdict.command is not None, verdict.reason
        assert verdict.recorded is not None
        await verdict.recorded
        await self.rx.handle(verdict.command)
        outcome = [
            e
            for e in self.entries()
            if e["type"].startswith("prescription_") and e["data"]["nonce"] == verdict.command.nonce
        ]
        assert len(outcome) == 1
        return outcome[0]


async def open_room(directory: Path, *, handle_orphans: bool = True) -> Room:
    audit, _ = await AuditLog.open(directory, origin=ORIGIN)
    task = asyncio.create_task(audit.run())
    notices: list[str] = []
    delivery = [False]
    intake = CommandIntake(
        RING, audit, site="site-a", room="or-3", skew_s=60, max_per_minute=60,
        notice=lambda sev, msg: notices.append(f"{sev}: {msg}"),
    )  # fmt: skip
    intake.rebuild_nonces(directory)
    rx = Prescriptions(
        audit,
        notice=lambda sev, msg: notices.append(f"{sev}: {msg}"),
        delivery_open=lambda: delivery[0],
        skew_s=60,
    )
    rx.rebuild(directory)
    intake.register("prescription", rx.handle, summary)
    if handle_orphans:
        await rx.resume()
    return Room(directory, audit, intake, rx, task, notices, delivery)


async def close_room(room: Room) -> None:
    await room.audit.close()
    await room.task


@pytest.fixture
async def room(tmp_path: Path) -> AsyncIterator[Room]:
    r = await open_room(tmp_path)
    yield r
    await close_room(r)


async def test_a_prescription_is_received_recorded_and_pending(room: Room) -> None:
    body = rx()
    got = await room.send(cmd(body))
    assert got["type"] == "prescription_received"
    assert got["data"]["outcome"] == "new"
    assert got["data"]["sha256"] == sha(body)
    assert got["data"]["prescription"]["treatment_id"] == "T-2026-0042"
    assert got["data"]["signer"] == "phys.curie"
    [acc] = room.entries("command_accepted")
    assert acc["data"]["body"]["sha256"] == sha(body)  # the summary keeps the prescription
    assert room.rx.pending is not None
    assert room.rx.pending.sha256 == sha(body)
    assert any("prescription received" in n and "T-2026-0042" in n for n in room.notices)


async def test_a_body_that_does_not_parse_is_refused_with_the_reason(room: Room) -> None:
    body = {**rx(), "patient_name_Quixote": "x"}
    got = await room.send(cmd(body))
    assert got["type"] == "prescription_refused"
    assert got["data"]["reason"] == "unparseable"
    assert "Quixote" not in orjson.dumps(room.entries()).decode()  # an unknown key unrecorded
    bad = {**rx(), "prescribed_dose_gy": 500.0}
    got = await room.send(cmd(bad))
    assert got["data"]["reason"] == "unparseable"
    assert "prescribed_dose_gy" in got["data"]["detail"]
    assert room.rx.pending is None


async def test_expired_and_signer_not_approver_are_refused(room: Room) -> None:
    old = rx(approved_at=datetime.now(UTC) - timedelta(hours=3), hours=1)
    got = await room.send(cmd(old))
    assert (got["type"], got["data"]["reason"]) == ("prescription_refused", "expired")
    got = await room.send(cmd(rx(), signer=ANNA))  # approved by phys.curie
    assert got["data"]["reason"] == "signer_not_approver"
    assert "signed by phys-anna" in got["data"]["detail"]
    ahead = rx(approved_at=datetime.now(UTC) + timedelta(minutes=10))
    got = await room.send(cmd(ahead))
    assert got["data"]["reason"] == "approved_in_future"
    assert room.rx.pending is None
    assert sum("critical: prescription refused" in n for n in room.notices) == 3


async def test_same_again_newer_replaces_older_refused(room: Room) -> None:
    t0 = datetime.now(UTC) - timedelta(minutes=30)
    first = rx(approved_at=t0)
    await room.send(cmd(first))
    again = await room.send(cmd(first))  # a new command (nonce), the same prescription
    assert again["data"]["outcome"] == "same"
    newer = rx(approved_at=t0 + timedelta(minutes=10), dose=18.0)
    got = await room.send(cmd(newer))
    assert got["data"]["outcome"] == "replaces"
    assert got["data"]["replaces_sha256"] == sha(first)
    assert room.rx.pending is not None
    assert room.rx.pending.sha256 == sha(newer)
    older = await room.send(cmd(rx(approved_at=t0 + timedelta(minutes=5))))
    assert older["data"]["reason"] == "older_than_pending"
    assert room.rx.pending.sha256 == sha(newer)


async def test_another_treatment_during_a_delivery_is_refused(room: Room) -> None:
    await room.send(cmd(rx("T-2026-0042")))
    room.delivery[0] = True
    got = await room.send(cmd(rx("T-2026-0043")))
    assert got["data"]["reason"] == "other_treatment_in_delivery"
    assert room.rx.pending is not None
    assert room.rx.pending.prescription.treatment_id == "T-2026-0042"
    room.delivery[0] = False  # after the delivery, the next treatment's is taken
    got = await room.send(cmd(rx("T-2026-0043")))
    assert got["data"]["outcome"] == "replaces"


async def test_the_pending_prescription_is_rebuilt_from_the_log(tmp_path: Path) -> None:
    room = await open_room(tmp_path)
    body = rx()
    await room.send(cmd(body))
    await close_room(room)
    room = await open_room(tmp_path)
    try:
        assert room.rx.pending is not None
        assert room.rx.pending.sha256 == sha(body)
        again = await room.send(cmd(body))
        assert again["data"]["outcome"] == "same"  # judged against the rebuilt one
    finally:
        await close_room(room)


async def test_a_crash_before_the_handler_is_finished_at_the_next_start(tmp_path: Path) -> None:
    room = await open_room(tmp_path)
    body = rx()
    verdict = room.intake.submit(cmd(body), source="inbox")
    assert verdict.command is not None
    assert verdict.recorded is not None
    await verdict.recorded  # on disk; the handler never ran (the SIGKILL)
    await close_room(room)
    room = await open_room(tmp_path)
    try:
        [got] = room.entries("prescription_received")
        assert got["data"]["nonce"] == verdict.command.nonce
        assert got["data"]["sha256"] == sha(body)
        assert room.rx.pending is not None
    finally:
        await close_room(room)
    room = await open_room(tmp_path)  # and handled once, not at every start
    try:
        assert len(room.entries("prescription_received")) == 1
    finally:
        await close_room(room)
