"""The dashboard's alarm acknowledgement (dashboard/ack.py) over its real ASGI app, in
process, with a real account store: operators and physicists only, CSRF as every POST, no
password re-entry, only an alarm of the room's current retained list that nobody has
acknowledged, the envelope a daemon accepts, and the outcome only as the daemon's notice
says it (never "acknowledged" without it)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from ipaddress import ip_network
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from test_dashboard_login import (
    ORIGIN,
    PW_ADMIN,
    PW_ANNA,
    PW_TEMP,
    PW_VIC,
    Browser,
    Clock,
    make_store,
)

from iortd.auditlog.command import NonceBook, check_command
from iortd.dashboard import ack as ack_mod
from iortd.dashboard.app import build_app
from iortd.dashboard.hub import Hub
from iortd.dashboard.login import ACTIONS, Auth, AuthSettings
from iortd.dashboard.room import Held, Room
from iortd.dashboard.state import Accepted, Rooms
from iortd.users.access import ACCESS_DIR, AccessRecord
from iortd.users.changes import open_session
from iortd.users.kdf import TEST_COST
from iortd.users.keyring import keyring_bytes
from iortd.users.store import load_store

DID = "or-3-20261206T080000000000Z"
RAISED = "2026-12-06T08:01:02.345678Z"
KEY = "interlock_tripped:door"
PW_OTTO = "an operator's own long password"
ITEM = {
    "key": KEY,
    "code": "interlock_tripped",
    "severity": "high",
    "message": "interlock door tripped with beam on",
    "raised_at": RAISED,
    "cleared_at": None,
    "delivery_id": DID,
    "acknowledged": None,
}


def make_store_with_operator(d: Path) -> Path:
    make_store(d)
    s = open_session(d, cost=TEST_COST)
    try:
        admin = s.admin("admin-eva", PW_ADMIN)
        s.add(admin, "op-otto", "O. Operator, RTT", {"operator"}, None, PW_TEMP)
    finally:
        s.close()
    s = open_session(d, cost=TEST_COST)
    try:
        s.passwd("op-otto", PW_TEMP, PW_OTTO)
    finally:
        s.close()
    return d


@dataclass
class Rig:
    auth: Auth
    hub: Hub
    app: Any
    room: Room
    users: Path
    sent: list[tuple[str, bytes]] = field(default_factory=list)
    # what the fake daemon answers to an ack: a notice's (severity, text[, command]), or None
    answer: Callable[[dict[str, Any]], tuple[Any, ...] | None] | None = None
    answer_from: Room | None = None  # the room whose events carry the answer (default: ours)
    published: asyncio.Event = field(default_factory=asyncio.Event)

    def alarms(self, *items: dict[str, Any]) -> None:
        self.room.retained["alarms"] = Held({"alarms": list(items), "omitted": 0}, 0.0, 100)

    async def publish(self, topic: str, raw: bytes) -> None:
        self.sent.append((topic, raw))
        self.published.set()
        env = orjson.loads(raw)
        said = None if self.answer is None else self.answer(env)
        if said is not None:
            notice = {"kind": "daemon_notice", "severity": said[0], "message": said[1],
                      "command": said[2] if len(said) > 2 else None}  # fmt: skip
            asyncio.get_running_loop().call_soon(
                lambda: self.hub.message(Accepted(self.answer_from or self.room, "events", notice))
            )


def acknowledged(env: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    return (
        "info",
        f"alarm {KEY} raised {RAISED} acknowledged by O. Operator, RTT (op-otto) "
        f"[nonce {env['nonce']}]",
        answer(env, "done"),
    )


def answer(env: dict[str, Any], outcome: str, reason: str | None = None) -> dict[str, Any]:
    """A notice's ``command`` fields answering ``env`` (daemon/answers.py)."""
    return {"kind": env["kind"], "nonce": env["nonce"], "sha256": None, "outcome": outcome,
            "reason": reason}  # fmt: skip


@pytest.fixture
async def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    monkeypatch.setattr(ack_mod, "ANSWER_WAIT_S", 0.5)  # no answer: said fast
    users = await asyncio.to_thread(make_store_with_operator, tmp_path / "users")
    record = await AccessRecord.open(users / ACCESS_DIR)
    task = asyncio.create_task(record.run())
    settings = AuthSettings(
        users, idle_s=900, max_s=43200, anonymous_view=(ip_network("10.9.0.0/24"),)
    )
    auth = Auth(settings, load_store(users), record, clock=Clock())
    hub = Hub(Rooms("iort"), "mqtt://127.0.0.1:1883", clock=lambda: 0.0)
    room = Room("site-a", "or-3", 100, 50)
    hub.rooms.rooms[room.key] = room
    app = build_app(hub, stale_after_s=5, history_points=100, auth=auth)
    r = Rig(auth, hub, app, room, users)
    hub.publish = r.publish
    r.alarms(ITEM)
    try:
        yield r
    finally:
        await record.close()
        await task


async def ack(
    b: Browser, *, csrf: str | None = None, origin: str = ORIGIN, **form: str
) -> tuple[int, Any]:
    fields = {
        "room": "site-a/or-3",
        "alarm_key": KEY,
        "raised_at": RAISED,
        "delivery_id": DID,
        **form,
    }
    if csrf is None:
        _, _, info = await b.call("GET", "/api/session")
        csrf = info["session"]["csrf"] if info["session"] else ""
    status, _, body = await b.call(
        "POST",
        "/api/ack",
        body=urlencode(fields).encode(),
        headers={
            "content-type": "application/x-www-form-urlencoded",
            "origin": origin,
            "x-csrf-token": csrf or "",
        },
    )
    return status, body


async def logged_in(rig: Rig, holder: str = "op-otto", password: str = PW_OTTO) -> Browser:
    b = Browser(rig.app)
    assert (await b.login(holder, password))[0] == 200
    return b


def test_the_role_table_lets_operators_and_physicists_acknowledge() -> None:
    assert ACTIONS["ack"] == frozenset({"operator", "physicist"})


async def test_an_operator_acknowledges_with_the_sessions_key_and_no_password(rig: Rig) -> None:
    rig.answer = acknowledged
    b = await logged_in(rig)
    status, body = await ack(b, comment="door closed, resumed")
    assert status == 200, body
    assert body["recorded"] is True
    assert "acknowledged by O. Operator, RTT (op-otto)" in body["message"]
    [(topic, raw)] = rig.sent
    assert topic == "iort/v1/site-a/or-3/cmd/ack"
    _, ring = keyring_bytes(load_store(rig.users))
    cmd = check_command(
        raw, ring, site="site-a", room="or-3", now=datetime.now(UTC), skew_s=60,
        seen=NonceBook(60),
    )  # fmt: skip
    assert (cmd.kind, cmd.signer) == ("ack", "op-otto")
    assert dict(cmd.body) == {
        "alarm_key": KEY,
        "raised_at": RAISED,
        "delivery_id": DID,
        "comment": "door closed, resumed",
    }
    assert body["nonce"] == cmd.nonce
    assert rig_waiting(rig) == 0


def rig_waiting(rig: Rig) -> int:
    """The answers still waited for (each request removes its own when it ends)."""
    from iortd.dashboard.commanding import Commander  # noqa: PLC0415 - only here

    found = [
        getattr(f, "__self__", None)
        for f in rig.hub.listeners
        if isinstance(getattr(f, "__self__", None), Commander)
    ]
    assert len(found) == 1, "one Commander hears the answers for every desk"
    commander = found[0]
    assert isinstance(commander, Commander)
    return commander.waiting


async def test_a_physicist_acknowledges_an_alarm_between_deliveries(rig: Rig) -> None:
    rig.alarms({**ITEM, "delivery_id": None})
    rig.answer = acknowledged
    b = await logged_in(rig, "phys-anna", PW_ANNA)
    status, body = await ack(b, delivery_id="")  # empty: null, as the list shows it
    assert status == 200, body
    [(_, raw)] = rig.sent
    sent = orjson.loads(raw)["body"]
    assert sent == {"alarm_key": KEY, "raised_at": RAISED, "delivery_id": None}


async def test_a_viewer_a_forged_token_another_origin_and_no_session_are_refused(
    rig: Rig,
) -> None:
    v = await logged_in(rig, "viewer-vic", PW_VIC)
    status, body = await ack(v)
    assert status == 403
    assert "operator or physicist" in body["error"]
    b = await logged_in(rig)
    assert (await ack(b, csrf="forged"))[0] == 403
    assert (await ack(b, origin="http://evil.example"))[0] == 403
    assert (await ack(Browser(rig.app), csrf="x"))[0] == 401
    anonymous = Browser(rig.app, client="10.9.0.5")  # may see without a login, not act
    assert (await ack(anonymous, csrf="x"))[0] == 401
    assert rig.sent == []


@pytest.mark.parametrize(
    ("form", "status", "words"),
    [
        ({"alarm_key": "stale_data"}, 409, "not in the room's current alarm list"),
        ({"raised_at": "2026-12-06T08:01:03.000000Z"}, 409, "not in the room's current"),
        ({"delivery_id": "or-3-other"}, 409, "not in the room's current alarm list"),
        ({"room": "site-a/or-9"}, 409, "no alarm list"),
        ({"room": "Site A"}, 400, "room"),
        ({"comment": "x" * 201}, 400, "comment"),
        ({"comment": "line one\nline two"}, 400, "comment"),
        ({"alarm_key": ""}, 400, "alarm_key"),
        ({"raised_at": "yesterday"}, 400, "raised_at"),
        ({"password": "anything"}, 400, "form"),  # no such field: no password here
    ],
)
async def test_nothing_is_sent_for_what_cannot_be_acknowledged(
    rig: Rig, form: dict[str, str], status: int, words: str
) -> None:
    b = await logged_in(rig)
    got, body = await ack(b, **form)
    assert got == status, body
    assert words in body["error"]
    assert rig.sent == []


async def test_an_alarm_acknowledged_already_is_not_sent_again(rig: Rig) -> None:
    at = "2026-12-06T08:02:00.000000Z"
    rig.alarms({**ITEM, "acknowledged": {"by": "phys-anna", "name": "A. Example, MPE", "at": at}})
    b = await logged_in(rig)
    status, body = await ack(b)
    assert status == 409
    assert f"already acknowledged by A. Example, MPE (phys-anna) at {at}" in body["error"]
    assert rig.sent == []


async def test_two_clicks_send_one_acknowledgement(rig: Rig) -> None:
    b = await logged_in(rig)
    first = asyncio.create_task(ack(b))
    async with asyncio.timeout(5):  # the first is sent and waits for the daemon's answer
        await rig.published.wait()
    status, body = await ack(b)
    assert status == 409
    assert "being sent" in body["error"]
    assert (await first)[0] == 504
    assert len(rig.sent) == 1


async def test_never_acknowledged_without_the_daemons_word(rig: Rig) -> None:
    b = await logged_in(rig)
    rig.answer = None  # no daemon
    status, body = await ack(b)
    assert status == 504
    assert body["recorded"] is False
    assert body["error"].startswith("NOT recorded")
    # the daemon refused it: its words, not an acknowledgement
    rig.answer = lambda env: (
        "info",
        f"acknowledgement refused (superseded): raised again since [nonce {env['nonce']}]",
        answer(env, "refused", "superseded"),
    )
    status, body = await ack(b)
    assert (status, body["recorded"]) == (422, False)
    assert "acknowledgement refused (superseded)" in body["message"]
    # refused by the intake: its notice names the command's SHA-256
    rig.answer = lambda env: (
        "info",
        "command refused (role_not_allowed): ...",
        {"kind": None, "nonce": None, "sha256": hashlib.sha256(rig.sent[-1][1]).hexdigest(),
         "outcome": "refused", "reason": "role_not_allowed"},
    )  # fmt: skip
    status, body = await ack(b)
    assert (status, body["recorded"]) == (422, False)
    # the words of an acknowledgement without its command fields: not an answer
    rig.answer = lambda env: acknowledged(env)[:2]
    status, body = await ack(b)
    assert (status, body["recorded"]) == (504, False)
    # another room's notice naming this command is not its answer
    rig.answer, rig.answer_from = acknowledged, Room("site-a", "or-4", 100, 50)
    status, body = await ack(b)
    assert (status, body["recorded"]) == (504, False)
    rig.hub.publish = None  # no broker
    status, body = await ack(b)
    assert (status, body["recorded"]) == (503, False)
    assert "NOT sent" in body["error"]
