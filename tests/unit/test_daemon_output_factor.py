"""The daemon's ``output_factor`` command (daemon/output_factor.py) over a real audit log and
the real intake: judged (parse, signer = measurer, the day), recorded, kept per day for the
verifier (``for_day``, ``on_change``), and rebuilt from the log at start (also after a crash
before the handler ran)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from iortd.auditlog.command import sign_command
from iortd.auditlog.keyring import parse_keyring
from iortd.auditlog.note import Signer, generate_keypair
from iortd.auditlog.writer import AuditLog, segment_paths
from iortd.daemon.commands import CommandIntake
from iortd.daemon.output_factor import OutputFactors, install, summary
from iortd.plan.doserate import output_factor_bytes

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


def today() -> date:
    return datetime.now(UTC).date()


def factor(
    value: float = 1.012, *, days_ago: int = 0, by: str = "phys.curie", machine: str = "XRS-1"
) -> dict[str, Any]:
    day = today() - timedelta(days=days_ago)
    return {
        "v": 1,
        "output_factor": value,
        "measured_on": day.isoformat(),
        "measured_by": by,
        "machine": machine,
    }


def sha(body: dict[str, Any]) -> str:
    on = date.fromisoformat(body["measured_on"])
    raw = output_factor_bytes(body["output_factor"], on, body["measured_by"], body["machine"])
    return hashlib.sha256(raw).hexdigest()


def cmd(body: dict[str, Any], signer: Signer = CURIE) -> bytes:
    env = sign_command(
        "output_factor", body, signer=signer, holder=signer.name, site="site-a", room="or-3",
        ttl_s=300,
    )  # fmt: skip
    return orjson.dumps(env)


@dataclass
class Room:
    directory: Path
    audit: AuditLog
    intake: CommandIntake
    factors: OutputFactors
    task: asyncio.Task[None]
    notices: list[str] = field(default_factory=list)
    changes: list[float | None] = field(default_factory=list)

    def entries(self, kind: str | None = None) -> list[dict[str, Any]]:
        found = [
            orjson.loads(line)
            for path in segment_paths(self.directory)
            for line in path.read_bytes().splitlines()
        ]
        return [e for e in found if kind is None or e["type"] == kind]

    async def send(self, raw: bytes) -> dict[str, Any]:
        """Submit, handle (as the intake's task would), and return the outcome entry."""
        verdict = self.intake.submit(raw, source="mqtt", topic_kind="output_factor")
        assert verdict.command is not None, verdict.reason
        assert verdict.recorded is not None
        await verdict.recorded
        await self.factors.handle(verdict.command)
        outcome = [
            e
            for e in self.entries()
            if e["type"].startswith("output_factor_")
            and e["data"]["nonce"] == verdict.command.nonce
        ]
        assert len(outcome) == 1
        return outcome[0]


async def open_room(directory: Path, *, handle_orphans: bool = True) -> Room:
    audit, _ = await AuditLog.open(directory, origin=ORIGIN)
    task = asyncio.create_task(audit.run())
    notices: list[str] = []
    intake = CommandIntake(
        RING, audit, site="site-a", room="or-3", skew_s=60, max_per_minute=60,
        notice=lambda sev, msg: notices.append(f"{sev}: {msg}"),
    )  # fmt: skip
    intake.rebuild_nonces(directory)
    factors = await install(
        intake, audit, directory, lambda sev, msg: notices.append(f"{sev}: {msg}")
    )
    assert factors is not None
    room = Room(directory, audit, intake, factors, task, notices)

    def changed() -> None:
        f = factors.for_day(today())
        room.changes.append(None if f is None else f.value)

    factors.on_change(changed)
    if handle_orphans:
        await factors.resume()
    return room


async def close_room(room: Room) -> None:
    await room.audit.close()
    await room.task


@pytest.fixture
async def room(tmp_path: Path) -> AsyncIterator[Room]:
    r = await open_room(tmp_path)
    yield r
    await close_room(r)


async def test_a_factor_is_received_recorded_and_the_days(room: Room) -> None:
    body = factor()
    got = await room.send(cmd(body))
    assert got["type"] == "output_factor_received"
    data = got["data"]
    assert {k: data[k] for k in body} == body  # the document's fields
    assert (data["sha256"], data["signer"], data["replaces_sha256"]) == (
        sha(body),
        "phys.curie",
        None,
    )
    [acc] = room.entries("command_accepted")
    assert acc["data"]["body"] == {"factor": body, "sha256": sha(body), "parsed": True}
    f = room.factors.for_day(today())
    assert f is not None
    assert (f.value, f.measured_on, f.measured_by, f.machine) == (
        1.012,
        today(),
        "phys.curie",
        "XRS-1",
    )
    assert room.factors.for_day(today() - timedelta(days=1)) is None
    assert room.changes == [1.012]  # the verifier is told, once, after the record
    assert any(n.startswith("info: output factor 1.0120") for n in room.notices)


async def test_a_later_factor_the_same_day_replaces_the_earlier(room: Room) -> None:
    first, second = factor(1.012), factor(0.991)
    await room.send(cmd(first))
    got = await room.send(cmd(second))
    assert got["data"]["replaces_sha256"] == sha(first)
    f = room.factors.for_day(today())
    assert f is not None
    assert f.value == 0.991
    assert room.changes == [1.012, 0.991]


async def test_yesterdays_factor_is_taken_for_yesterday_only(room: Room) -> None:
    got = await room.send(cmd(factor(days_ago=1)))
    assert got["type"] == "output_factor_received"
    assert room.factors.for_day(today()) is None
    assert room.factors.for_day(today() - timedelta(days=1)) is not None


@pytest.mark.parametrize(
    ("body", "signer", "reason", "said"),
    [
        ({**factor(), "patient_Quixote": 1}, CURIE, "unparseable", "an unknown key"),
        (factor(1.2), CURIE, "unparseable", "within 5 % of 1"),
        ({"v": 1}, CURIE, "unparseable", "missing"),
        (factor(), ANNA, "signer_not_measurer", "measured by phys.curie but signed by phys-anna"),
        (factor(days_ago=-2), CURIE, "measured_in_future", "in the future"),
        (factor(days_ago=2), CURIE, "too_old", "more than 1 day ago"),
    ],
)
async def test_refused_with_a_fixed_reason_and_nothing_changes(
    room: Room, body: dict[str, Any], signer: Signer, reason: str, said: str
) -> None:
    got = await room.send(cmd(body, signer))
    assert got["type"] == "output_factor_refused"
    assert (got["data"]["reason"], got["data"]["signer"]) == (reason, signer.name)
    assert said in got["data"]["detail"]
    assert len(got["data"]["body_sha256"]) == 64
    assert "Quixote" not in orjson.dumps(room.entries()).decode()  # an unknown key unrecorded
    assert room.factors.for_day(today()) is None
    assert room.changes == []
    assert any(n.startswith("critical: output factor refused") for n in room.notices)


async def test_a_callback_that_fails_does_not_undo_the_record(room: Room) -> None:
    def broken() -> None:
        raise RuntimeError("a verifier bug")

    room.factors.on_change(broken)
    got = await room.send(cmd(factor()))
    assert got["type"] == "output_factor_received"
    assert room.changes == [1.012]  # the others are still told


async def test_the_days_factor_is_rebuilt_from_the_log(tmp_path: Path) -> None:
    room = await open_room(tmp_path)
    await room.send(cmd(factor(1.012)))
    await room.send(cmd(factor(0.991)))
    await room.send(cmd(factor(1.03), ANNA))  # refused: not the measurer
    await close_room(room)
    room = await open_room(tmp_path)
    try:
        f = room.factors.for_day(today())
        assert f is not None
        assert f.value == 0.991  # the last accepted one, not the refused one after it
        got = await room.send(cmd(factor(1.0)))
        assert got["data"]["replaces_sha256"] == sha(factor(0.991))
    finally:
        await close_room(room)


async def test_a_crash_before_the_handler_is_finished_at_the_next_start(tmp_path: Path) -> None:
    room = await open_room(tmp_path)
    body = factor()
    verdict = room.intake.submit(cmd(body), source="inbox")
    assert verdict.command is not None
    assert verdict.recorded is not None
    await verdict.recorded  # on disk; the handler never ran (the SIGKILL)
    await close_room(room)
    room = await open_room(tmp_path)
    try:
        [got] = room.entries("output_factor_received")
        assert (got["data"]["nonce"], got["data"]["sha256"]) == (verdict.command.nonce, sha(body))
        f = room.factors.for_day(today())
        assert f is not None
        assert f.value == 1.012
    finally:
        await close_room(room)
    room = await open_room(tmp_path)  # and handled once, not at every start
    try:
        assert len(room.entries("output_factor_received")) == 1
    finally:
        await close_room(room)


async def test_a_crashed_unparseable_command_is_refused_at_the_next_start(tmp_path: Path) -> None:
    room = await open_room(tmp_path)
    verdict = room.intake.submit(cmd({"v": 1, "secret_name": "x"}), source="inbox")
    assert verdict.recorded is not None
    await verdict.recorded
    await close_room(room)
    room = await open_room(tmp_path)
    try:
        [got] = room.entries("output_factor_refused")
        [acc] = room.entries("command_accepted")
        assert got["data"]["reason"] == "unparseable"
        assert got["data"]["body_sha256"] == acc["data"]["body"]["body_sha256"]  # the body's own
        assert "secret_name" not in orjson.dumps(room.entries()).decode()
    finally:
        await close_room(room)


def test_the_summary_of_a_body_that_does_not_parse_is_its_hash_only() -> None:
    got = summary({"v": 1, "patient": "Quixote"})
    assert set(got) == {"body_sha256", "parsed"}
    assert got["parsed"] is False
