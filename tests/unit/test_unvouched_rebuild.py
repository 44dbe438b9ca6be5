"""Entries after the last seal (unvouched: written after the last seal before a crash, or by
someone with write access to the log directory) are not believed by the command handlers'
rebuilds at start: a forged ``prescription_received`` is not the pending prescription, a
forged ``output_factor_received`` is not the day's factor, a forged ``alarm_acknowledged``
acknowledges nothing, and a forged ``command_accepted`` is refused at start
(``interrupted_unvouched``), never acted on. The forger is the writer opened without a key
(as tests/unit/test_audit_seal.py's ``forge``); the start is the daemon's: recovery gives
``vouched_count``, each handler's rebuild takes it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
from structlog.testing import capture_logs
from test_daemon_alarm_acks import DOOR, alarm, body, raised, started
from test_daemon_output_factor import factor, today
from test_daemon_prescriptions import rx
from test_daemon_prescriptions import sha as rx_sha

from iortd.auditlog.command import sign_command
from iortd.auditlog.keyring import parse_keyring
from iortd.auditlog.note import Signer, generate_keypair
from iortd.auditlog.writer import AuditLog, segment_paths
from iortd.daemon.alarm_acks import AlarmAcks
from iortd.daemon.alarm_acks import install as install_acks
from iortd.daemon.commands import CommandIntake
from iortd.daemon.entries import event_entry
from iortd.daemon.handlers import Handlers
from iortd.daemon.output_factor import OutputFactors
from iortd.daemon.output_factor import summary as factor_summary
from iortd.daemon.prescriptions import Prescriptions
from iortd.daemon.prescriptions import summary as rx_summary

ORIGIN = "iortd/site-a/or-3/00112233aabbccdd"
SEAL = generate_keypair("or-3")  # the daemon's key: it seals what it writes
CURIE = generate_keypair("phys.curie")
OPER = generate_keypair("op-bob")
RING = parse_keyring(
    "".join(
        f'[[key]]\nholder = "{k.name}"\nname = "Staff"\nroles = ["{r}"]\n'
        f'public_key = "{k.verifier.text}"\nvalid_from = "2026-01-01T00:00:00Z"\n'
        'valid_until = "2099-01-01T00:00:00Z"\n\n'
        for k, r in ((CURIE, "physicist"), (OPER, "operator"))
    ).encode(),
    Path("keyring.toml"),
)


def entries(directory: Path, kind: str) -> list[dict[str, Any]]:
    return [
        e
        for path in segment_paths(directory)
        for line in path.read_bytes().splitlines()
        if (e := orjson.loads(line))["type"] == kind
    ]


def intake_on(audit: AuditLog) -> CommandIntake:
    return CommandIntake(
        RING, audit, site="site-a", room="or-3", skew_s=60, max_per_minute=60,
        notice=lambda _sev, _msg: None,
    )  # fmt: skip


def signed(kind: str, b: dict[str, Any], signer: Signer) -> bytes:
    env = sign_command(
        kind, b, signer=signer, holder=signer.name, site="site-a", room="or-3", ttl_s=300
    )
    return orjson.dumps(env)


async def genuine(directory: Path) -> None:
    """The daemon's own, sealed: a delivery with a standing alarm."""
    audit, _ = await AuditLog.open(directory, origin=ORIGIN, signer=SEAL)
    task = asyncio.create_task(audit.run())
    for ev in (started("D1", -1), raised(alarm())):
        kind, data, did = event_entry(ev, None)
        audit.append(kind, data, delivery_id=did, durable=True)
    await audit.close()
    await task


async def forged(directory: Path, build: Any) -> None:
    """Appended as a forger would: the writer opened without a key (chained, unsealed)."""
    audit, _ = await AuditLog.open(directory, origin=ORIGIN)
    task = asyncio.create_task(audit.run())
    await build(audit)
    await audit.close()
    await task


async def start(directory: Path) -> tuple[AuditLog, asyncio.Task[None], int | None]:
    """As the daemon's start: recovery says from which seq on nothing is vouched."""
    audit, report = await AuditLog.open(directory, origin=ORIGIN, signer=SEAL)
    assert report.unvouched is not None
    return audit, asyncio.create_task(audit.run()), report.vouched_count


async def test_forged_outcomes_after_the_seal_are_not_believed(tmp_path: Path) -> None:
    await genuine(tmp_path)

    async def build(audit: AuditLog) -> None:
        p = rx(dose=20.0)
        audit.append("prescription_received", {
            "outcome": "new", "prescription": p, "sha256": "e" * 64, "nonce": "forged-1",
            "signer": "phys.curie", "replaces_sha256": None,
        }, durable=True)  # fmt: skip
        audit.append("output_factor_received", {
            **factor(1.04, by="mallory"), "sha256": "0" * 64, "nonce": "forged-2",
            "signer": "mallory", "replaces_sha256": None,
        }, durable=True)  # fmt: skip
        a = alarm()
        await audit.append("alarm_acknowledged", {
            "key": DOOR, "code": a.code.value, "severity": a.severity.value,
            "raised_at": body()["raised_at"], "delivery_id": "D1", "by": "op-bob",
            "name": "Staff", "roles": ["operator"], "nonce": "forged-3", "comment": None,
        }, delivery_id="D1", durable=True).committed  # fmt: skip

    await forged(tmp_path, build)
    audit, task, vouched = await start(tmp_path)
    try:
        rxs = Prescriptions(audit, notice=lambda *_: None, delivery_open=lambda: False, skew_s=60)
        with capture_logs() as logs:
            rxs.rebuild(tmp_path, vouched)
        assert rxs.latest is None
        assert rxs.pending is None
        said = [x for x in logs if x["log_level"] == "warning"]
        assert [(x["event"], x["entries"]) for x in said] == [("prescriptions_unvouched", 1)]
        factors = OutputFactors(audit, notice=lambda *_: None, skew_s=60)
        factors.rebuild(tmp_path, vouched)
        assert factors.for_day(today()) is None
        acks = AlarmAcks(audit, notice=lambda *_: None)
        acks.rebuild(tmp_path, vouched)
        [shown] = acks.ledger.view()
        assert shown["key"] == DOOR
        assert shown["acknowledged"] is None
    finally:
        await audit.close()
        await task


async def test_forged_accepted_commands_are_refused_at_start_never_acted_on(
    tmp_path: Path,
) -> None:
    await genuine(tmp_path)

    async def build(audit: AuditLog) -> None:
        intake = intake_on(audit)  # command_accepted entries: what a forger writes too
        intake.register("prescription", _never, rx_summary)
        intake.register("output_factor", _never, factor_summary)
        intake.register("ack", _never, lambda b: {"parsed": True, **b, "comment": None})
        for kind, b, who in (
            ("prescription", rx(), CURIE),
            ("output_factor", factor(), CURIE),
            ("ack", body(), OPER),
        ):
            verdict = intake.submit(signed(kind, b, who), source="inbox")
            assert verdict.recorded is not None, verdict.reason
            await verdict.recorded

    await forged(tmp_path, build)
    assert len(entries(tmp_path, "command_accepted")) == 3
    audit, task, vouched = await start(tmp_path)
    try:
        intake = intake_on(audit)
        rxs = Prescriptions(audit, notice=lambda *_: None, delivery_open=lambda: False, skew_s=60)
        rxs.rebuild(tmp_path, vouched)
        factors = OutputFactors(audit, notice=lambda *_: None, skew_s=60)
        factors.rebuild(tmp_path, vouched)
        acks = AlarmAcks(audit, notice=lambda *_: None)
        acks.rebuild(tmp_path, vouched)
        assert install_acks(intake, acks)
        await rxs.resume()
        await factors.resume()
        await acks.resume()
        assert rxs.pending is None
        assert factors.for_day(today()) is None
        assert acks.ledger.view()[0]["acknowledged"] is None
    finally:
        await audit.close()
        await task
    assert entries(tmp_path, "prescription_received") == []
    assert entries(tmp_path, "output_factor_received") == []
    assert entries(tmp_path, "alarm_acknowledged") == []
    for kind in ("prescription_refused", "output_factor_refused", "ack_refused"):
        [e] = entries(tmp_path, kind)
        assert e["data"]["reason"] == "interrupted_unvouched", kind


async def test_a_vouched_command_with_an_unvouched_outcome_is_judged_again(
    tmp_path: Path,
) -> None:
    """A crash after the outcome's commit, before its seal (or a forged outcome): the
    vouched ``command_accepted`` is judged again at start, from what it holds."""
    audit, _ = await AuditLog.open(tmp_path, origin=ORIGIN, signer=SEAL)
    task = asyncio.create_task(audit.run())
    intake = intake_on(audit)
    intake.register("prescription", _never, rx_summary)
    p = rx()
    verdict = intake.submit(signed("prescription", p, CURIE), source="inbox")
    assert verdict.command is not None
    assert verdict.recorded is not None, verdict.reason
    await verdict.recorded
    await audit.close()
    await task
    nonce = verdict.command.nonce

    async def build(audit: AuditLog) -> None:
        await audit.append("prescription_received", {
            "outcome": "new", "prescription": rx(dose=25.0), "sha256": "e" * 64,
            "nonce": nonce, "signer": "phys.curie", "replaces_sha256": None,
        }, durable=True).committed  # fmt: skip

    await forged(tmp_path, build)
    audit, task, vouched = await start(tmp_path)
    try:
        rxs = Prescriptions(audit, notice=lambda *_: None, delivery_open=lambda: False, skew_s=60)
        rxs.rebuild(tmp_path, vouched)
        assert rxs.latest is None  # the forged outcome is not believed
        await rxs.resume()
        assert rxs.pending is not None
        assert rxs.pending.sha256 == rx_sha(p)
        assert rxs.pending.prescription.prescribed_dose_gy == 20.0
    finally:
        await audit.close()
        await task
    assert [e["data"]["outcome"] for e in entries(tmp_path, "prescription_received")] == [
        "new",
        "new",
    ]


async def test_the_daemons_handlers_get_recoverys_vouched_count(tmp_path: Path) -> None:
    """daemon/handlers.py hands recovery's ``vouched_count`` to every handler's rebuild."""
    await genuine(tmp_path)

    async def build(audit: AuditLog) -> None:
        await audit.append("prescription_received", {
            "outcome": "new", "prescription": rx(), "sha256": "e" * 64, "nonce": "forged-1",
            "signer": "phys.curie", "replaces_sha256": None,
        }, durable=True).committed  # fmt: skip
        await audit.append("output_factor_received", {
            **factor(1.04), "sha256": "0" * 64, "nonce": "forged-2", "signer": "phys.curie",
            "replaces_sha256": None,
        }, durable=True).committed  # fmt: skip

    await forged(tmp_path, build)
    audit, report = await AuditLog.open(tmp_path, origin=ORIGIN, signer=SEAL)
    task = asyncio.create_task(audit.run())
    try:
        c: Any = SimpleNamespace(
            log=SimpleNamespace(directory=tmp_path),
            verification=SimpleNamespace(on=lambda _ring: False),
            commands=SimpleNamespace(keyring=None),
        )
        service: Any = SimpleNamespace(tracker=None, notice=lambda *_: None)
        handlers = Handlers()
        acks = AlarmAcks(audit, notice=lambda *_: None)
        await handlers.install(c, intake_on(audit), audit, service, report, acks)
        assert handlers.prescriptions is not None
        assert handlers.prescriptions.latest is None
        assert handlers.output_factors is not None
        assert handlers.output_factors.for_day(today()) is None
    finally:
        await audit.close()
        await task


async def _never(_cmd: Any) -> None:
    raise AssertionError("the forger's handler does not run")


async def test_the_prescriptions_sha256_is_computed_not_read(tmp_path: Path) -> None:
    """The rebuild takes the SHA-256 of the prescription the entry holds, not its
    ``sha256`` field: already_delivered compares that."""
    p = rx()
    audit, _ = await AuditLog.open(tmp_path, origin=ORIGIN)
    task = asyncio.create_task(audit.run())
    audit.append("prescription_received", {
        "outcome": "new", "prescription": p, "sha256": "e" * 64, "nonce": "n-1",
        "signer": "phys.curie", "replaces_sha256": None,
    }, durable=True)  # fmt: skip
    await audit.close()
    await task
    rxs = Prescriptions(audit, notice=lambda *_: None, delivery_open=lambda: False, skew_s=60)
    rxs.rebuild(tmp_path)
    assert rxs.latest is not None
    assert rxs.latest.sha256 == rx_sha(p)
