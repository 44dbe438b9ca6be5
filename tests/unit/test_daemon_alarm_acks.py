"""Alarm acknowledgements (daemon/alarm_ledger.py, daemon/alarm_acks.py): the ledger judges
an ``ack`` against the raisings it saw (standing, cleared-unacknowledged, already
acknowledged, unknown key, wrong raised_at, superseded, wrong delivery, malformed), keeps a
window of two deliveries, continues an alarm across a restart; the handler records
``alarm_acknowledged``/``ack_refused`` durably over a real audit log and the real intake
(a viewer's key is refused there, by role); the state is rebuilt from the log at start,
and an ack accepted but not handled before a crash is judged at the next start."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iortd.auditlog.command import RejectReason, sign_command
from iortd.auditlog.keyring import parse_keyring
from iortd.auditlog.note import Signer, generate_keypair
from iortd.auditlog.writer import AuditLog, segment_paths
from iortd.daemon.alarm_acks import AlarmAcks, LedgerSink, install, rebuild
from iortd.daemon.alarm_ledger import (
    MAX_RAISINGS,
    Ack,
    AckRefused,
    AlarmLedger,
    parse_ack_body,
)
from iortd.daemon.commands import CommandIntake
from iortd.daemon.entries import event_entry
from iortd.daemon.sink_registry import BUILT_IN_NAMES
from iortd.daemon.tracker import (
    Alarm,
    AlarmCleared,
    AlarmCode,
    AlarmRaised,
    DeliveryStarted,
    Severity,
    TrackerEvent,
)
from iortd.kernel.timefmt import utc_ts

ORIGIN = "iortd/site-a/or-3/00112233aabbccdd"
OPER = generate_keypair("op-bob")
VIEW = generate_keypair("view-vic")
RING = parse_keyring(
    "".join(
        f'[[key]]\nholder = "{k.name}"\nname = "{n}"\nroles = ["{r}"]\n'
        f'public_key = "{k.verifier.text}"\nvalid_from = "2026-01-01T00:00:00Z"\n'
        'valid_until = "2099-01-01T00:00:00Z"\n\n'
        for k, n, r in ((OPER, "B. Operator, RTT", "operator"), (VIEW, "V. Viewer", "viewer"))
    ).encode(),
    Path("keyring.toml"),
)
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
DOOR = "interlock_tripped:door"


def t(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def alarm(key: str = DOOR, at: float = 0, sev: Severity = Severity.MEDIUM) -> Alarm:
    code = AlarmCode(key.split(":", maxsplit=1)[0])
    return Alarm(code, key, sev, f"{key} ({sev})", int(at * 1e9), t(at))


def raised(a: Alarm, did: str | None = "D1") -> AlarmRaised:
    return AlarmRaised(did, a)


def cleared(a: Alarm, at: float, did: str | None = "D1") -> AlarmCleared:
    return AlarmCleared(did, a, int(at * 1e9), t(at))


def started(did: str, at: float) -> DeliveryStarted:
    return DeliveryStarted(did, int(at * 1e9), t(at), 1.0, False)


def body(key: str = DOOR, at: float = 0, did: str | None = "D1", **kw: Any) -> dict[str, Any]:
    return {"alarm_key": key, "raised_at": utc_ts(t(at)), "delivery_id": did, **kw}


def judge(ledger: AlarmLedger, b: dict[str, Any]) -> str:
    try:
        ledger.judge(parse_ack_body(b))
    except AckRefused as exc:
        return exc.reason
    return "ok"


# ---- the ledger: pure --------------------------------------------------------------------


def test_a_standing_alarm_can_be_acknowledged_and_stays_standing() -> None:
    led = AlarmLedger()
    a = alarm()
    led.events([raised(a)])
    assert judge(led, body()) == "ok"
    led.acknowledged(DOOR, utc_ts(t(0)), Ack("op-bob", "B. Operator", utc_ts(t(5))))
    (item,) = led.view()
    assert item["cleared_at"] is None  # acknowledging clears nothing
    assert item["acknowledged"] == {"by": "op-bob", "name": "B. Operator", "at": utc_ts(t(5))}
    assert judge(led, body()) == "already_acknowledged"
    led.events([cleared(a, 9)])
    assert led.view() == []  # cleared and acknowledged: nothing left to show


def test_a_cleared_alarm_stays_shown_until_acknowledged() -> None:
    led = AlarmLedger()
    a = alarm()
    led.events([raised(a), cleared(a, 3)])
    (item,) = led.view()
    assert item["cleared_at"] == utc_ts(t(3))
    assert item["acknowledged"] is None
    assert judge(led, body()) == "ok"  # after it cleared: normal practice


@pytest.mark.parametrize(
    ("b", "reason"),
    [
        (body(key="interlock_tripped:cooling"), "unknown_alarm"),
        (body(at=1), "unknown_alarm"),  # the right key, another raising
        (body(did="D2"), "wrong_delivery"),
        (body(did=None), "wrong_delivery"),
        ({**body(), "extra": 1}, "malformed_body"),
        ({"alarm_key": DOOR, "raised_at": utc_ts(t(0))}, "malformed_body"),  # no delivery_id
        (body(comment="x" * 201), "malformed_body"),
        (body(comment="line\nbreak"), "malformed_body"),
        ({**body(), "raised_at": "yesterday"}, "malformed_body"),
        ({**body(), "alarm_key": ""}, "malformed_body"),
    ],
)
def test_what_is_refused(b: dict[str, Any], reason: str) -> None:
    led = AlarmLedger()
    led.events([raised(alarm())])
    assert judge(led, b) == reason


def test_raised_at_is_compared_as_a_time() -> None:
    led = AlarmLedger()
    led.events([raised(alarm())])
    assert judge(led, {**body(), "raised_at": "2026-12-01T09:00:00Z"}) == "ok"


def test_an_escalation_supersedes_the_earlier_raising() -> None:
    led = AlarmLedger()
    led.events([raised(alarm()), raised(alarm(at=4, sev=Severity.HIGH))])
    assert judge(led, body()) == "superseded"
    assert judge(led, body(at=4)) == "ok"
    assert [i["raised_at"] for i in led.view()] == [utc_ts(t(4))]


def test_the_window_is_this_delivery_and_the_one_before() -> None:
    led = AlarmLedger()
    a, b, c = alarm(at=0), alarm("stale_data", at=20), alarm("overdose", at=40)
    led.events([started("D1", -1), raised(a), cleared(a, 1)])
    led.events([started("D2", 19), raised(b, "D2"), cleared(b, 21, "D2")])
    assert judge(led, body()) == "ok"  # the last delivery's: still acknowledgeable
    led.events([started("D3", 39), raised(c, "D3")])
    assert judge(led, body()) == "unknown_alarm"  # two deliveries ago: forgotten
    assert [i["key"] for i in led.view()] == ["stale_data", "overdose"]


def test_the_ledger_is_bounded() -> None:
    led = AlarmLedger()
    for i in range(MAX_RAISINGS + 10):
        a = alarm(at=i)
        led.events([raised(a), cleared(a, i + 0.5)])
    assert len(led.view()) == MAX_RAISINGS
    assert led.omitted == 10


def test_a_restart_continues_an_alarm_nothing_cleared() -> None:
    led = AlarmLedger()
    led.events([raised(alarm())])
    led.acknowledged(DOOR, utc_ts(t(0)), Ack("op-bob", "B", utc_ts(t(1))))
    led.run_ended()
    led.events([raised(alarm(at=60))])  # the next run sees the door still open
    (item,) = led.view()
    assert item["raised_at"] == utc_ts(t(0))
    assert item["acknowledged"] is not None
    led.events([raised(alarm(at=70, sev=Severity.HIGH))])  # but an escalation is new
    assert [i["raised_at"] for i in led.view()] == [utc_ts(t(70))]


def test_a_carried_alarm_not_raised_again_clears_at_the_next_delivery() -> None:
    led = AlarmLedger()
    led.events([raised(alarm())])
    led.run_ended()
    assert led.view()[0]["cleared_at"] is None  # unknown since the restart: still shown
    led.events([started("D2", 50)])
    (item,) = led.view()  # cleared, not acknowledged: shown until acknowledged
    assert item["cleared_at"] == utc_ts(t(50))
    assert judge(led, body()) == "ok"


# ---- the handler over a real log and the real intake ---------------------------------------


def signed(b: dict[str, Any], signer: Signer = OPER) -> bytes:
    env = sign_command(
        "ack", b, signer=signer, holder=signer.name, site="site-a", room="or-3", ttl_s=300
    )
    return orjson.dumps(env)


@dataclass
class Room:
    directory: Path
    audit: AuditLog
    intake: CommandIntake
    acks: AlarmAcks
    task: asyncio.Task[None]
    notices: list[str] = field(default_factory=list)
    published: list[list[dict[str, Any]]] = field(default_factory=list)

    def entries(self, kind: str) -> list[dict[str, Any]]:
        return [
            e
            for path in segment_paths(self.directory)
            for line in path.read_bytes().splitlines()
            if (e := orjson.loads(line))["type"] == kind
        ]

    async def happen(self, events: Sequence[TrackerEvent]) -> None:
        """As the daemon: the record first, then the sinks (here the ledger)."""
        for ev in events:
            kind, data, did = event_entry(ev, None)
            await self.audit.append(kind, data, delivery_id=did, durable=True).committed
        self.acks.observe(events)

    async def send(self, b: dict[str, Any], *, handle: bool = True) -> str | None:
        verdict = self.intake.submit(signed(b), source="mqtt", topic_kind="ack")
        assert verdict.command is not None, verdict.reason
        assert verdict.recorded is not None
        await verdict.recorded
        if handle:
            await self.acks.handle(verdict.command)
        return verdict.command.nonce


async def open_room(directory: Path, *, resume: bool = True) -> Room:
    audit, _ = await AuditLog.open(directory, origin=ORIGIN)
    task = asyncio.create_task(audit.run())
    notices: list[str] = []

    def notice(sev: str, msg: str) -> None:
        notices.append(f"{sev}: {msg}")

    intake = CommandIntake(
        RING, audit, site="site-a", room="or-3", skew_s=60, max_per_minute=60, notice=notice
    )
    intake.rebuild_nonces(directory)
    acks = AlarmAcks(audit, notice=notice)
    await rebuild(acks, directory, notice)
    assert install(intake, acks)
    room = Room(directory, audit, intake, acks, task, notices)
    acks.on_change(lambda items, omitted: room.published.append(items))
    if resume:
        await acks.resume()
    return room


async def close_room(room: Room) -> None:
    await room.audit.close()
    await room.task


@pytest.fixture
async def room(tmp_path: Path) -> AsyncIterator[Room]:
    r = await open_room(tmp_path)
    yield r
    await close_room(r)


async def test_an_ack_is_recorded_with_the_printed_name_and_shown(room: Room) -> None:
    await room.happen([started("D1", -1), raised(alarm())])
    nonce = await room.send(body(comment="door closed by the nurse"))
    (e,) = room.entries("alarm_acknowledged")
    assert e["delivery_id"] == "D1"
    assert e["data"] == {
        "key": DOOR,
        "code": "interlock_tripped",
        "severity": "medium",
        "raised_at": utc_ts(t(0)),
        "delivery_id": "D1",
        "by": "op-bob",
        "name": "B. Operator, RTT",
        "roles": ["operator"],
        "nonce": nonce,
        "comment": "door closed by the nurse",
    }
    ack = room.published[-1][0]["acknowledged"]
    assert ack == {"by": "op-bob", "name": "B. Operator, RTT", "at": e["ts"]}
    assert any("acknowledged by B. Operator, RTT (op-bob)" in n for n in room.notices)
    # the notice names the command's nonce: the dashboard that sent it waits for that
    assert any(n.endswith(f"[nonce {nonce}]") for n in room.notices)


async def test_a_refused_ack_is_recorded_and_said(room: Room) -> None:
    await room.happen([raised(alarm(), None)])
    await room.send(body(did=None))
    nonce = await room.send(body(did=None))
    (e,) = room.entries("ack_refused")
    assert e["data"]["reason"] == "already_acknowledged"
    assert e["data"]["nonce"] == nonce
    assert "delivery_id" not in e
    assert any("acknowledgement refused (already_acknowledged)" in n for n in room.notices)
    assert any(n.endswith(f"[nonce {nonce}]") for n in room.notices)


async def test_a_viewer_cannot_acknowledge(room: Room) -> None:
    await room.happen([raised(alarm())])
    verdict = room.intake.submit(signed(body(), VIEW), source="mqtt", topic_kind="ack")
    assert verdict.reason is RejectReason.role_not_allowed
    assert room.entries("alarm_acknowledged") == []


async def test_the_state_is_rebuilt_from_the_log(tmp_path: Path) -> None:
    room = await open_room(tmp_path)
    a, b = alarm(), alarm("stale_data", at=2)
    await room.happen([started("D1", -1), raised(a), raised(b), cleared(b, 3)])
    await room.send(body())
    before = room.acks.ledger.view()
    assert len(before) == 2
    await close_room(room)
    again = await open_room(tmp_path)
    try:
        assert again.acks.ledger.view() == before
        assert again.published[0] == before  # the retained topic's first state at start
        await again.send(body())  # and the acknowledgement is remembered
        assert again.entries("ack_refused")[-1]["data"]["reason"] == "already_acknowledged"
    finally:
        await close_room(again)


async def test_an_ack_accepted_before_a_crash_is_judged_at_the_next_start(
    tmp_path: Path,
) -> None:
    room = await open_room(tmp_path)
    await room.happen([raised(alarm())])
    nonce = await room.send(body(), handle=False)  # recorded; the SIGKILL comes here
    await close_room(room)
    again = await open_room(tmp_path)
    try:
        (e,) = again.entries("alarm_acknowledged")
        assert e["data"]["nonce"] == nonce
        assert e["data"]["name"] == "B. Operator, RTT"  # from the keyring
        assert again.acks.ledger.view()[0]["acknowledged"]["by"] == "op-bob"
    finally:
        await close_room(again)
    third = await open_room(tmp_path)  # handled once: not again
    try:
        assert len(third.entries("alarm_acknowledged")) == 1
    finally:
        await close_room(third)


def test_the_ledger_sink_name_is_reserved() -> None:
    """A [[sinks]] table named like it would be two series with one label in /metrics."""
    assert LedgerSink.name in BUILT_IN_NAMES


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=90),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)
BODIES = st.fixed_dictionaries(
    {},
    optional={
        "alarm_key": JSON | st.just(DOOR),
        "raised_at": JSON | st.just(utc_ts(t(0))),
        "delivery_id": JSON | st.just("D1"),
        "comment": JSON,
    },
) | st.dictionaries(st.text(max_size=12), JSON, max_size=6)


@settings(max_examples=100, deadline=None)
@given(BODIES)
def test_any_body_is_judged_or_refused_with_a_reason(b: dict[str, Any]) -> None:
    """A hostile body (an enrolled key can send anything) is a refusal, never a crash."""
    led = AlarmLedger()
    led.events([raised(alarm())])
    assert judge(led, b) in {
        "ok",
        "malformed_body",
        "unknown_alarm",
        "wrong_delivery",
    }
