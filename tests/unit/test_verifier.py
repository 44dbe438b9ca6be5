"""The verifier in the daemon (daemon/verifier.py) with a real tracker fed by hand: when a
check is made, ``prescription_used`` at the first beam-on, the override command's rules,
and the state rebuilt from a real audit log; and the prescriptions' memory following what
was appended (daemon/prescriptions.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_verification import CURIE, FACTOR, RING, TABLE, TECH  # the pure check's fixtures

from iortd.auditlog.command import Command, sign_command
from iortd.auditlog.keyring import parse_keyring
from iortd.auditlog.note import generate_keypair
from iortd.auditlog.writer import AuditLog, segment_paths
from iortd.daemon.commands import CommandIntake
from iortd.daemon.config.model import VerificationConfig
from iortd.daemon.prescriptions import Pending, Prescriptions
from iortd.daemon.tracker import (
    DeliveryTracker,
    Phase,
    ResumedDelivery,
    TrackerEvent,
    TrackerSettings,
)
from iortd.daemon.verifier import OverrideRefused, Verifier, install, parse_override
from iortd.kernel.types import (
    ApplicatorIdentity,
    DeviceState,
    Interlock,
    InterlockState,
    SourceReading,
)
from iortd.plan.model import Tolerances, make_prescription, prescription_dict

S = DeviceState
NS = 1_000_000_000
NOW = datetime.now(UTC)
SPH30 = ApplicatorIdentity("spherical", 30.0, "SIM-SPH30")
ALL_OK = dict.fromkeys(Interlock, InterlockState.OK)
ORIGIN = "iortd/site-a/or-3/00112233aabbccdd"


def prescription(dose: float = 20.0) -> Pending:
    p = make_prescription(
        treatment_id="T-2026-0042", plan_id="IORT-P1", fraction=1, fractions=1,
        prescribed_dose_gy=dose, dose_reference="surface", depth_mm=None,
        applicator_code="SPH30", applicator_diameter_mm=30.0, planned_time_s=1380.0,
        approved_by="phys.curie", approved_at=NOW - timedelta(hours=1),
        not_after=NOW + timedelta(hours=11), tolerances=Tolerances(),
    )  # fmt: skip
    return Pending(p, f"{int(dose * 10):064x}", "n0")


@dataclass
class Room:
    pending: list[Pending | None] = field(default_factory=lambda: [prescription()])
    tracker: DeliveryTracker = field(
        default_factory=lambda: DeliveryTracker(TrackerSettings(stale_after_s=3.0))
    )
    t: float = 0.0
    dose: float = 0.0
    verifier: Verifier = field(init=False)

    def __post_init__(self) -> None:
        factor = FACTOR.__class__(1.0, NOW.date(), "phys.curie", "sim")
        self.verifier = Verifier(
            keyring=RING, pending=lambda: self.pending[0], table=TABLE, table_sha256="ab" * 32,
            factor_for=lambda day: factor if day == NOW.date() else None,
            require_factor=True, applicator_types={"SPH30": "spherical"}, now=lambda: NOW,
        )  # fmt: skip

    def read(
        self, state: DeviceState, *, preset: float = 20.0, planned: float | None = 1380.0
    ) -> tuple[list[TrackerEvent], list[dict[str, Any]], bool, dict[str, Any] | None]:
        self.t += 0.5
        if state is S.IRRADIATING:
            self.dose += 0.01
        r = SourceReading(
            mono_ns=round(self.t * NS), utc=NOW + timedelta(seconds=self.t), state=state,
            dose_rate_gy_min=0.87 if state is S.IRRADIATING else 0.0,
            dose_primary_gy=self.dose, dose_secondary_gy=self.dose, preset_gy=preset,
            beam_on_s=self.dose * 60 / 0.87, kv=50.0, ua=40.0, interlocks=ALL_OK,
            planned_time_s=planned, applicator=SPH30,
        )  # fmt: skip
        events = self.tracker.on_reading(r)
        checks, no_rx, used = self.verifier.follow(events, self.tracker)
        return events, checks, no_rx, used

    def new_selection(self, **kw: Any) -> list[dict[str, Any]]:
        self.dose = 0.0
        self.read(S.STANDBY)
        self.read(S.PREPARATORY, **kw)
        return self.read(S.READY, **kw)[1]

    @property
    def delivery_id(self) -> str:
        snap = self.tracker.snapshot()
        assert snap is not None
        return snap.delivery_id


def override(room: Room, items: list[str], **body: Any) -> Command:
    pending = room.pending[0]
    full = {
        "delivery_id": room.delivery_id,
        "prescription_sha256": pending.sha256 if pending else "0" * 64,
        "items": items,
        "reason": "planned time checked by hand",
        **body,
    }
    return Command("override", "phys.curie", full, "nonce-ovr", NOW, NOW, "0" * 64)


def test_ready_checks_once_and_again_after_a_change_then_beam_on_writes_used() -> None:
    room = Room()
    [check] = room.new_selection()
    assert (check["trigger"], check["outcome"]) == ("ready", "VERIFIED")
    assert room.read(S.READY)[1] == []  # unchanged: no second check
    room.read(S.PREPARATORY, preset=20.5)
    [again] = room.read(S.READY, preset=20.5)[1]
    assert (again["trigger"], again["outcome"], again["reasons"]) == (
        "ready",
        "NOT_VERIFIED",
        ["dose"],
    )
    room.read(S.PREPARATORY)
    room.read(S.READY)
    _, checks, no_rx, used = room.read(S.IRRADIATING)
    assert checks == []  # checked at READY: the last check governs
    assert not no_rx
    assert used == {
        "delivery_id": room.delivery_id, "prescription_sha256": "c8".rjust(64, "0"),
        "treatment_id": "T-2026-0042", "plan_id": "IORT-P1", "fraction": 1,
    }  # fmt: skip
    room.read(S.INTERRUPTED)
    assert room.read(S.IRRADIATING)[3] is None  # written once per delivery
    # The same prescription again, for the next delivery: already delivered.
    room.read(S.TERMINATED)
    [next_check] = room.new_selection()
    assert next_check["reasons"] == ["already_delivered"]


def test_a_prescription_arriving_while_ready_is_checked_at_once() -> None:
    room = Room(pending=[None])
    [first] = room.new_selection()
    assert first["reasons"] == ["no_prescription"]
    room.pending[0] = prescription()
    check = room.verifier.recheck(room.tracker)
    assert check is not None
    assert (check["trigger"], check["outcome"]) == ("prescription", "VERIFIED")
    room.read(S.STANDBY)
    assert room.verifier.recheck(room.tracker) is None  # not READY: nothing to check


def test_beam_on_with_no_prescription_says_so() -> None:
    room = Room(pending=[None])
    room.new_selection()
    _, _, no_rx, used = room.read(S.IRRADIATING)
    assert no_rx
    assert used is None


def test_a_delivery_joined_in_progress_is_checked_joined() -> None:
    room = Room()
    room.dose = 1.0
    _, checks, _, used = room.read(S.IRRADIATING)
    assert [c["trigger"] for c in checks] == ["joined"]
    assert used is not None


def test_override_covers_the_failed_items_and_binds_to_their_values() -> None:
    room = Room()
    [bad] = room.new_selection(planned=1500.0)
    assert bad["reasons"] == ["time"]
    entry = room.verifier.override(override(room, ["time"]), room.tracker)
    assert (entry["outcome"], entry["trigger"], entry["overridden"]) == (
        "VERIFIED_OVR", "override", ["time"],
    )  # fmt: skip
    assert entry["overrides"][0]["by"] == "phys.curie"
    # The same values again: still overridden; another planned time: NOT_VERIFIED again.
    room.read(S.PREPARATORY, planned=1500.0)
    [same] = room.read(S.READY, planned=1500.0)[1]
    assert same["outcome"] == "VERIFIED_OVR"
    room.read(S.PREPARATORY, planned=1600.0)
    [other] = room.read(S.READY, planned=1600.0)[1]
    assert other["outcome"] == "NOT_VERIFIED"


@pytest.mark.parametrize(
    ("items", "body", "reason"),
    [
        (["dose"], {}, "does_not_cover"),
        (["time"], {"delivery_id": "or-3-other"}, "other_delivery"),
        (["time"], {"prescription_sha256": "f" * 64}, "stale_prescription"),
        (["signature"], {}, "not_overridable"),
        (["time", "time"], {}, "malformed"),
        (["time"], {"reason": ""}, "malformed"),
        (["time"], {"reason": "x\n"}, "malformed"),
        (["time"], {"extra": 1}, "malformed"),
    ],
)
def test_override_refusals(items: list[str], body: dict[str, Any], reason: str) -> None:
    room = Room()
    room.new_selection(planned=1500.0)
    with pytest.raises(OverrideRefused) as exc:
        room.verifier.override(override(room, items, **body), room.tracker)
    assert exc.value.reason == reason


def test_override_refused_when_verified_or_not_overridable_failure() -> None:
    room = Room()
    room.new_selection()
    with pytest.raises(OverrideRefused) as exc:
        room.verifier.override(override(room, ["time"]), room.tracker)
    assert exc.value.reason == "not_not_verified"
    expired = Room()
    expired.verifier._now = lambda: NOW + timedelta(hours=12)
    expired.new_selection(planned=1500.0)
    with pytest.raises(OverrideRefused) as exc:
        expired.verifier.override(override(expired, ["time"]), expired.tracker)
    assert exc.value.reason == "not_overridable"
    with pytest.raises(OverrideRefused):
        parse_override({"delivery_id": "x", "prescription_sha256": "0" * 64, "items": [],
                        "reason": "r"})  # fmt: skip


def test_a_flood_of_overrides_is_bounded_per_delivery() -> None:
    room = Room()
    room.new_selection(planned=1500.0)
    for i in range(16):
        room.verifier.override(override(room, ["time"]), room.tracker)
        room.read(S.PREPARATORY, planned=1501.0 + i)
        room.read(S.READY, planned=1501.0 + i)
    with pytest.raises(OverrideRefused) as exc:
        room.verifier.override(override(room, ["time"]), room.tracker)
    assert exc.value.reason == "too_many"


async def test_rebuild_from_the_log_used_prescriptions_latest_check_and_overrides(
    tmp_path: Path,
) -> None:
    room = Room()
    room.new_selection(planned=1500.0)
    entry = room.verifier.override(override(room, ["time"]), room.tracker)
    _, _, _, used = room.read(S.IRRADIATING, planned=1500.0)
    assert used is not None
    audit, _ = await AuditLog.open(tmp_path, origin=ORIGIN)
    task = asyncio.create_task(audit.run())
    audit.append("verification", entry, delivery_id=room.delivery_id, durable=True)
    await audit.append(
        "prescription_used", used, delivery_id=room.delivery_id, durable=True
    ).committed
    await audit.close()
    await task

    fresh = Room()
    assert fresh.verifier.rebuild(tmp_path) == 2
    assert fresh.verifier.used == {used["prescription_sha256"]}
    latest = fresh.verifier.latest(room.delivery_id)
    assert latest is not None
    assert latest["outcome"] == "VERIFIED_OVR"
    # A replayed prescription after the restart: already delivered.
    [again] = fresh.new_selection()
    assert "already_delivered" in again["reasons"]


class _Appended:
    def __init__(self) -> None:
        self.committed: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class _StuckAudit:
    """An audit log whose fsync never completes (a failing disk): the entry is appended."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, dict[str, Any]]] = []

    def append(self, kind: str, data: dict[str, Any], *, durable: bool = False) -> _Appended:
        self.entries.append((kind, data))
        return _Appended()


async def test_prescription_memory_follows_the_log_when_the_wait_for_the_disk_times_out() -> None:
    audit = _StuckAudit()
    rx = Prescriptions(
        audit,  # type: ignore[arg-type]
        notice=lambda _s, _m: None, delivery_open=lambda: False, skew_s=60,
    )  # fmt: skip
    changes: list[str] = []
    rx.on_change = lambda: changes.append("changed")
    body = prescription_dict(prescription().prescription)
    cmd = Command("prescription", "phys.curie", body, "n1", NOW, NOW, "0" * 64)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):  # the handler's bound, as the intake's
            await rx.handle(cmd)
    assert [k for k, _ in audit.entries] == ["prescription_received"]
    assert rx.pending is not None  # memory follows what was appended
    assert changes == ["changed"]


# ---- crash windows (a SIGKILL, then the restart's rebuild and takeover) -------------------


def _resumed(
    room: Room, phase: Any, beam_on_s: float, did: str = "or-7-20261206T090000000000Z"
) -> None:
    rd = ResumedDelivery(
        delivery_id=did, started_utc=NOW, phase=Phase(phase),
        preset_gy=20.0, primary_gy=0.01 if beam_on_s else 0.0,
        secondary_gy=0.01 if beam_on_s else 0.0, beam_on_s=beam_on_s, elapsed_s=beam_on_s,
        selection=7, simulated=False, unwatched_since_utc=NOW, cause="daemon not running",
    )  # fmt: skip
    room.tracker.resume(rd, 0, NOW)


def _reading(room: Room, state: DeviceState, dose: float, beam_on_s: float) -> SourceReading:
    room.t += 0.5
    return SourceReading(
        mono_ns=round(room.t * NS), utc=NOW + timedelta(seconds=room.t), state=state,
        dose_rate_gy_min=0.87, dose_primary_gy=dose, dose_secondary_gy=dose, preset_gy=20.0,
        beam_on_s=beam_on_s, kv=50.0, ua=40.0, interlocks=ALL_OK, planned_time_s=1380.0,
        applicator=SPH30, selection=7,
    )  # fmt: skip


def test_killed_between_beam_on_and_prescription_used_writes_it_after_the_restart() -> None:
    before = Room()
    before.new_selection()
    did = before.delivery_id
    # The log holds the governing check, not prescription_used: rebuilt into a new room.
    fresh = Room()
    entry = before.verifier.latest(did)
    assert entry is not None
    fresh.verifier._of(did).latest = entry
    _resumed(fresh, "IRRADIATING", 1.0)
    fresh.tracker._machine.delivery.delivery_id = did  # type: ignore[union-attr]
    events = fresh.tracker.on_reading(_reading(fresh, S.IRRADIATING, 0.02, 1.5))
    checks, _, used = fresh.verifier.follow(events, fresh.tracker)
    assert checks == []  # checked before the crash: no second (joined) check
    assert used is not None
    assert used["delivery_id"] == did
    assert fresh.verifier.used == {entry["prescription_sha256"]}


def test_killed_after_a_check_was_recorded_its_alarm_and_view_come_back_without_an_event() -> None:
    room = Room()
    _resumed(room, "READY", 0.0)
    did = room.tracker.snapshot().delivery_id  # type: ignore[union-attr]
    entry = {"delivery_id": did, "outcome": "NOT_VERIFIED", "reasons": ["dose"],
             "trigger": "ready"}  # fmt: skip
    out = room.tracker.on_verification(entry, {"outcome": "NOT_VERIFIED"}, 0, NOW, True)
    assert [type(e).__name__ for e in out] == ["AlarmRaised"]  # no second verification entry
    snap = room.tracker.snapshot()
    assert snap is not None
    assert snap.verification == {"outcome": "NOT_VERIFIED"}


# ---- the override command through the real intake ---------------------------------------


@dataclass
class _Service:
    """The service as the verifier sees it: the tracker, and checks recorded."""

    tracker: DeliveryTracker
    verifier: Verifier | None = None
    recorded: list[dict[str, Any]] = field(default_factory=list)

    def record_check(self, entry: Any) -> asyncio.Future[None] | None:
        self.recorded.append(dict(entry))
        return None


async def test_override_through_the_intake_forged_role_and_refusal_are_recorded(
    tmp_path: Path,
) -> None:

    ring = parse_keyring(
        "".join(
            f'[[key]]\nholder = "{h}"\nname = "Staff"\nroles = ["{r}"]\n'
            f'public_key = "{k.verifier.text}"\nvalid_from = "2026-01-01T00:00:00Z"\n'
            'valid_until = "2099-01-01T00:00:00Z"\n\n'
            for h, k, r in (("phys.curie", CURIE, "physicist"), ("tech.bob", TECH, "operator"))
        ).encode(),
        Path("keyring.toml"),
    )
    audit, _ = await AuditLog.open(tmp_path, origin=ORIGIN)
    task = asyncio.create_task(audit.run())
    notices: list[str] = []
    intake = CommandIntake(
        ring, audit, site="site-a", room="or-3", skew_s=60, max_per_minute=60,
        notice=lambda sev, msg: notices.append(f"{sev}: {msg}"),
    )  # fmt: skip
    rx = Prescriptions(audit, notice=lambda _s, _m: None, delivery_open=lambda: False, skew_s=60)
    service = _Service(DeliveryTracker(TrackerSettings(stale_after_s=3.0)))
    v = await install(
        VerificationConfig(), intake, audit, tmp_path, service, rx,
        lambda sev, msg: notices.append(f"{sev}: {msg}"), lambda _day: None,
    )  # fmt: skip
    assert v is not None
    assert service.verifier is v
    body = {"delivery_id": "or-3-x", "prescription_sha256": "0" * 64, "items": ["time"],
            "reason": "checked"}  # fmt: skip
    forged = generate_keypair("phys.curie")  # the holder's name, another key
    for signer, holder in ((TECH, "tech.bob"), (forged, "phys.curie")):
        env = sign_command("override", body, signer=signer, holder=holder, site="site-a",
                           room="or-3", ttl_s=60)  # fmt: skip
        verdict = intake.submit(orjson.dumps(env), source="mqtt", topic_kind="override")
        assert verdict.command is None
        assert verdict.reason is not None
    env = sign_command("override", body, signer=CURIE, holder="phys.curie", site="site-a",
                       room="or-3", ttl_s=60)  # fmt: skip
    verdict = intake.submit(orjson.dumps(env), source="mqtt", topic_kind="override")
    assert verdict.command is not None
    assert verdict.recorded is not None
    await verdict.recorded
    handler = intake._handlers["override"][0]
    await handler(verdict.command)
    await audit.close()
    await task
    entries = [
        orjson.loads(x) for p in segment_paths(tmp_path) for x in p.read_bytes().splitlines()
    ]
    rejected = [e["data"]["reason"] for e in entries if e["type"] == "command_rejected"]
    assert rejected == ["role_not_allowed", "bad_signature"]
    [refused] = [e["data"] for e in entries if e["type"] == "override_refused"]
    assert refused["reason"] == "no_open_delivery"
    assert service.recorded == []
    assert any("override refused (no_open_delivery)" in n for n in notices)


def test_beam_on_with_no_check_for_the_delivery_is_checked_at_beam_on() -> None:
    room = Room()
    # Taken over at READY with no check in the log (killed before it); the first reading
    # after the restart finds the beam on in the same selection.
    _resumed(room, "READY", 0.0)
    events = room.tracker.on_reading(_reading(room, S.IRRADIATING, 0.01, 0.5))
    checks, no_rx, used = room.verifier.follow(events, room.tracker)
    assert [(c["trigger"], c["outcome"]) for c in checks] == [("beam_on", "VERIFIED")]
    assert not no_rx
    assert used is not None


def test_a_delivery_taken_over_with_the_beam_on_and_no_believed_check_is_joined() -> None:
    room = Room()
    _resumed(room, "INTERRUPTED", 1.0)
    events = room.tracker.on_reading(_reading(room, S.INTERRUPTED, 0.01, 1.0))
    checks, _, _ = room.verifier.follow(events, room.tracker)
    assert [c["trigger"] for c in checks] == ["joined"]
    events = room.tracker.on_reading(_reading(room, S.IRRADIATING, 0.02, 1.5))
    assert room.verifier.follow(events, room.tracker)[0] == []  # checked once


async def test_an_unvouched_check_is_not_believed_an_unvouched_use_still_counts(
    tmp_path: Path,
) -> None:
    room = Room()
    [check] = room.new_selection()
    used = {"delivery_id": room.delivery_id, "prescription_sha256": "e" * 64,
            "treatment_id": "T-1", "plan_id": "P-1", "fraction": 1}  # fmt: skip
    audit, _ = await AuditLog.open(tmp_path, origin=ORIGIN)
    task = asyncio.create_task(audit.run())
    audit.append("verification", check, delivery_id=room.delivery_id, durable=True)
    await audit.append("prescription_used", used, durable=True).committed
    await audit.close()
    await task
    lines = [x for p in segment_paths(tmp_path) for x in p.read_bytes().splitlines()]
    first = next(e["seq"] for e in map(orjson.loads, lines) if e["type"] == "verification")
    fresh = Room()
    assert fresh.verifier.rebuild(tmp_path, vouched_count=first) == 1  # the use only
    assert fresh.verifier.latest(room.delivery_id) is None
    assert fresh.verifier.used == {"e" * 64}
    believed = Room()
    assert believed.verifier.rebuild(tmp_path, vouched_count=first + 2) == 2
    assert believed.verifier.latest(room.delivery_id) is not None


async def test_rebuilt_entries_of_another_shape_are_not_taken(
    tmp_path: Path,
) -> None:
    room = Room()
    [good] = room.new_selection()
    audit, _ = await AuditLog.open(tmp_path, origin=ORIGIN)
    task = asyncio.create_task(audit.run())
    did = room.delivery_id
    for bad in (
        {**good, "console": "x"},
        {**good, "outcome": "MAYBE"},
        {k: v for k, v in good.items() if k != "trigger"},
        {**good, "prescription": {"plan_id": "P"}},
        {**good, "checks": [{"item": "time"}]},
    ):
        audit.append("verification", bad, delivery_id=did)
    await audit.append("prescription_used", {"delivery_id": did}, durable=True).committed
    await audit.close()
    await task
    fresh = Room()
    assert fresh.verifier.rebuild(tmp_path) == 0
    assert fresh.verifier.latest(did) is None
    assert fresh.verifier.used == set()


def test_an_expired_prescription_fails_expired_and_the_beam_on_it_is_without_one() -> None:
    room = Room()
    later = NOW + timedelta(hours=12)  # past midnight UTC when run after noon
    room.verifier._now = lambda: later
    # That day's output factor, so that only the expiry fails whatever the time of day.
    factor = FACTOR.__class__(1.0, later.date(), "phys.curie", "sim")
    room.verifier._factor_for = lambda day: factor if day == later.date() else None
    [check] = room.new_selection()
    assert check["reasons"] == ["expired"]
    _, _, no_rx, _ = room.read(S.IRRADIATING)
    assert no_rx  # no valid prescription pending: the no_prescription alarm too


async def test_prescriptions_keep_the_latest_also_once_expired(tmp_path: Path) -> None:
    audit = _StuckAudit()
    clock = [NOW]
    rx = Prescriptions(
        audit,  # type: ignore[arg-type]
        notice=lambda _s, _m: None, delivery_open=lambda: False, skew_s=60,
        now=lambda: clock[0],
    )  # fmt: skip
    body = prescription_dict(prescription().prescription)
    cmd = Command("prescription", "phys.curie", body, "n1", NOW, NOW, "0" * 64)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await rx.handle(cmd)
    clock[0] = NOW + timedelta(hours=12)
    assert rx.pending is None
    assert rx.latest is not None


async def test_killed_after_an_unvouched_check_and_beam_on_the_prescription_still_counts_used(
    tmp_path: Path,
) -> None:
    room = Room()
    [check] = room.new_selection()
    did = room.delivery_id
    audit, _ = await AuditLog.open(tmp_path, origin=ORIGIN)
    task = asyncio.create_task(audit.run())
    await audit.append("verification", check, delivery_id=did, durable=True).committed
    await audit.close()
    await task
    fresh = Room()
    assert fresh.verifier.rebuild(tmp_path, vouched_count=0) == 0  # nothing vouched
    assert fresh.verifier.latest(did) is None
    assert fresh.verifier.taken_over(did, 0.0) is None  # the beam never came on
    used = fresh.verifier.taken_over(did, 2.5)
    assert used is not None
    assert used["prescription_sha256"] == check["prescription_sha256"]
    assert fresh.verifier.used == {check["prescription_sha256"]}
    assert fresh.verifier.taken_over(did, 2.5) is None  # once
