"""The override's scope (daemon/verifier.py): an override applies to the prescription it
was given for, never to another one pending later in the same delivery (live and rebuilt
from the log); and an override a crash left accepted but unjudged is refused
(``interrupted``) at the next start, so that every accepted override has an outcome."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
from test_verification import CURIE, TECH  # the pure check's fixtures
from test_verifier import ORIGIN, Room, S, _Service, override, prescription

from iortd.auditlog.command import sign_command
from iortd.auditlog.keyring import Keyring, parse_keyring
from iortd.auditlog.writer import AuditLog, segment_paths
from iortd.daemon.commands import CommandIntake
from iortd.daemon.config.model import VerificationConfig
from iortd.daemon.handlers import Handlers
from iortd.daemon.prescriptions import Prescriptions
from iortd.daemon.tracker import DeliveryTracker, TrackerSettings
from iortd.daemon.verifier import install


def _override_a_then_b_pending(room: Room) -> None:
    """Prescription A (20 Gy) against a console preset of 18 Gy: NOT_VERIFIED, then the
    physicist overrides dose and time for A; then B (22 Gy) replaces A while READY."""
    [bad] = room.new_selection(preset=18.0, planned=1500.0)
    assert bad["outcome"] == "NOT_VERIFIED"
    e = room.verifier.override(override(room, ["dose", "time"]), room.tracker)
    assert e["outcome"] == "VERIFIED_OVR"
    room.pending[0] = prescription(22.0)
    b = room.verifier.recheck(room.tracker)
    assert b is not None
    assert b["outcome"] == "NOT_VERIFIED"


def _checks_under_b(room: Room) -> list[dict[str, Any]]:
    room.read(S.PREPARATORY, preset=18.0, planned=1500.0)
    return room.read(S.READY, preset=18.0, planned=1500.0)[1]


def test_an_override_for_one_prescription_is_not_applied_to_another() -> None:
    room = Room()
    _override_a_then_b_pending(room)
    [c] = _checks_under_b(room)  # READY again under B: the latest check names B now
    assert (c["outcome"], c["overridden"], c["overrides"]) == ("NOT_VERIFIED", [], [])
    assert c["prescription_sha256"] == prescription(22.0).sha256
    # A again (the same bytes): its own override, bound to the same values, still holds.
    room.pending[0] = prescription(20.0)
    again = room.verifier.recheck(room.tracker)
    assert again is not None
    assert again["outcome"] == "VERIFIED_OVR"


async def test_a_rebuilt_override_is_not_applied_to_another_prescription(tmp_path: Path) -> None:
    room = Room()
    [_bad] = room.new_selection(preset=18.0, planned=1500.0)
    ovr = room.verifier.override(override(room, ["dose", "time"]), room.tracker)
    audit, _ = await AuditLog.open(tmp_path, origin=ORIGIN)
    task = asyncio.create_task(audit.run())
    await audit.append("verification", ovr, delivery_id=room.delivery_id, durable=True).committed
    await audit.close()
    await task
    fresh = Room()  # the restart: the same delivery taken over, B arrives
    fresh.tracker, fresh.t = room.tracker, room.t
    assert fresh.verifier.rebuild(tmp_path) == 1
    fresh.pending[0] = prescription(22.0)
    first = fresh.verifier.recheck(fresh.tracker)
    assert first is not None
    assert first["outcome"] == "NOT_VERIFIED"
    [c] = _checks_under_b(fresh)
    assert (c["outcome"], c["overrides"]) == ("NOT_VERIFIED", [])


# ---- an override a crash left accepted but unjudged ---------------------------------------


def _ring() -> Keyring:
    return parse_keyring(
        "".join(
            f'[[key]]\nholder = "{h}"\nname = "Staff"\nroles = ["{r}"]\n'
            f'public_key = "{k.verifier.text}"\nvalid_from = "2026-01-01T00:00:00Z"\n'
            'valid_until = "2099-01-01T00:00:00Z"\n\n'
            for h, k, r in (("phys.curie", CURIE, "physicist"), ("tech.bob", TECH, "operator"))
        ).encode(),
        Path("keyring.toml"),
    )


async def _start(tmp_path: Path, notices: list[str]) -> tuple[Any, ...]:
    """One daemon start over the log in ``tmp_path``: the writer, the intake, the verifier."""
    audit, _ = await AuditLog.open(tmp_path, origin=ORIGIN)
    task = asyncio.create_task(audit.run())
    intake = CommandIntake(
        _ring(), audit, site="site-a", room="or-3", skew_s=60, max_per_minute=60,
        notice=lambda sev, msg: notices.append(f"{sev}: {msg}"),
    )  # fmt: skip
    rx = Prescriptions(audit, notice=lambda _s, _m: None, delivery_open=lambda: False, skew_s=60)
    service = _Service(DeliveryTracker(TrackerSettings(stale_after_s=3.0)))
    v = await install(
        VerificationConfig(), intake, audit, tmp_path, service, rx,
        lambda sev, msg: notices.append(f"{sev}: {msg}"), lambda _day: None,
    )  # fmt: skip
    assert v is not None
    return audit, task, intake, v


async def _accept(intake: CommandIntake, reason: str) -> Any:
    body = {"delivery_id": "or-3-x", "prescription_sha256": "0" * 64, "items": ["time"],
            "reason": reason}  # fmt: skip
    env = sign_command("override", body, signer=CURIE, holder="phys.curie", site="site-a",
                       room="or-3", ttl_s=60)  # fmt: skip
    verdict = intake.submit(orjson.dumps(env), source="mqtt", topic_kind="override")
    assert verdict.command is not None
    assert verdict.recorded is not None
    await verdict.recorded  # accepted and on disk
    return verdict.command


async def test_an_override_a_crash_left_unjudged_is_refused_interrupted_at_the_next_start(
    tmp_path: Path,
) -> None:
    notices: list[str] = []
    audit, task, intake, _v = await _start(tmp_path, notices)
    judged = await _accept(intake, "judged")
    await intake._handlers["override"][0](judged)  # refused: no_open_delivery
    applied = await _accept(intake, "applied")  # its check names its nonce
    check = {"delivery_id": "or-3-x", "outcome": "VERIFIED_OVR", "trigger": "override",
             "overrides": [{"item": "time", "nonce": applied.nonce}]}  # fmt: skip
    await audit.append("verification", check, durable=True).committed
    await _accept(intake, "checked")  # its check (NOT_VERIFIED) names no nonce
    check = {**check, "outcome": "NOT_VERIFIED", "overrides": []}
    await audit.append("verification", check, durable=True).committed
    failed = await _accept(intake, "failed")
    await audit.append(
        "command_failed", {"kind": "override", "nonce": failed.nonce, "error": "X"}, durable=True
    ).committed
    orphan = await _accept(intake, "killed before the handler ran")  # the SIGKILL
    await audit.close()
    await task

    audit, task, _intake, v = await _start(tmp_path, notices)
    handlers = Handlers()  # as the composition root resumes every kind, once the writer runs
    handlers.verifier = v
    async with asyncio.TaskGroup() as tg:
        handlers.resume(tg)
    assert v.orphans == {}  # judged by the handlers' resume
    assert v.resume is not None
    await v.resume()  # once only
    await audit.close()
    await task
    entries = [
        orjson.loads(x) for p in segment_paths(tmp_path) for x in p.read_bytes().splitlines()
    ]
    refused = [e["data"] for e in entries if e["type"] == "override_refused"]
    assert [(r["nonce"], r["reason"]) for r in refused] == [
        (judged.nonce, "no_open_delivery"),
        (orphan.nonce, "interrupted"),
    ]
    assert refused[1]["signer"] == "phys.curie"
    assert "send it again" in refused[1]["detail"]
    assert any(n.startswith("critical: override refused (interrupted)") for n in notices)
