"""The dashboard's sign-off (dashboard/signoff.py) over its real ASGI app, in process, with a
real account store: physicist only, CSRF as every POST, the ID and password at the first
signing of a session and the password alone later, a wrong password signs nothing (the
third ends the session), only an ended delivery with its published record, the envelope a
daemon accepts, and the outcome only as the daemon's notice says it (never "recorded"
without it)."""

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
from test_dashboard_login import ORIGIN, PW_ANNA, PW_VIC, Browser, Clock, make_store

from iortd.auditlog.command import NonceBook, check_command
from iortd.dashboard import signoff as signoff_mod
from iortd.dashboard.app import build_app
from iortd.dashboard.hub import Hub
from iortd.dashboard.login import Auth, AuthSettings
from iortd.dashboard.room import Held, Room
from iortd.dashboard.state import Accepted, Rooms
from iortd.users.access import ACCESS_DIR, AccessRecord
from iortd.users.keyring import keyring_bytes
from iortd.users.store import load_store

DID = "or-3-20261206T080000000000Z"
RECORD = {
    "first_seq": 5,
    "last_seq": 90,
    "entries_sha256": "ab" * 32,
    "checkpoint": {"size": 92, "hash": "cd" * 32},
}


@dataclass
class Rig:
    auth: Auth
    hub: Hub
    app: Any
    room: Room
    users: Path
    sent: list[tuple[str, bytes]] = field(default_factory=list)
    # what the fake daemon answers to a sign-off: a notice's (severity, text[, command]), or None
    answer: Callable[[dict[str, Any]], tuple[Any, ...] | None] | None = None

    def delivery(self, phase: str = "TERMINATED", record: dict[str, Any] | None = RECORD) -> None:
        d: dict[str, Any] = {"delivery_id": DID, "phase": phase}
        if record is not None:
            d["record"] = record
        self.room.retained["delivery"] = Held({"delivery": d}, 0.0, 100)

    async def publish(self, topic: str, raw: bytes) -> None:
        self.sent.append((topic, raw))
        env = orjson.loads(raw)
        said = None if self.answer is None else self.answer(env)
        if said is not None:
            notice = {"kind": "daemon_notice", "severity": said[0], "message": said[1],
                      "command": said[2] if len(said) > 2 else None}  # fmt: skip
            asyncio.get_running_loop().call_soon(
                lambda: self.hub.message(Accepted(self.room, "events", notice))
            )


def recorded(env: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    said = f"sign-off recorded: delivery {DID} approved [nonce {env['nonce']}]"
    return ("info", said, answer(env, "done"))


def answer(env: dict[str, Any], outcome: str, reason: str | None = None) -> dict[str, Any]:
    """A notice's ``command`` fields answering ``env`` (daemon/answers.py)."""
    return {"kind": env["kind"], "nonce": env["nonce"], "sha256": None, "outcome": outcome,
            "reason": reason}  # fmt: skip


@pytest.fixture
async def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    monkeypatch.setattr(signoff_mod, "ANSWER_WAIT_S", 0.5)  # no answer: said fast
    users = await asyncio.to_thread(make_store, tmp_path / "users")
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
    r.delivery()
    try:
        yield r
    finally:
        await record.close()
        await task


async def sign(
    b: Browser, *, csrf: str | None = None, origin: str = ORIGIN, **form: str
) -> tuple[int, Any]:
    fields = {"room": "site-a/or-3", "delivery_id": DID, "meaning": "approved", **form}
    if csrf is None:
        _, _, info = await b.call("GET", "/api/session")
        csrf = info["session"]["csrf"] if info["session"] else ""
    status, _, body = await b.call(
        "POST",
        "/api/signoff",
        body=urlencode(fields).encode(),
        headers={
            "content-type": "application/x-www-form-urlencoded",
            "origin": origin,
            "x-csrf-token": csrf or "",
        },
    )
    return status, body


async def physicist(rig: Rig) -> Browser:
    b = Browser(rig.app)
    assert (await b.login("phys-anna", PW_ANNA))[0] == 200
    return b


async def test_a_physicist_signs_and_sees_the_daemons_answer(rig: Rig) -> None:
    rig.answer = recorded
    b = await physicist(rig)
    status, body = await sign(b, holder="phys-anna", password=PW_ANNA)
    assert status == 200, body
    assert body["recorded"] is True
    assert "sign-off recorded" in body["message"]
    [(topic, raw)] = rig.sent
    assert topic == "iort/v1/site-a/or-3/cmd/signoff"
    # the envelope a daemon with the store's keyring accepts
    _, ring = keyring_bytes(load_store(rig.users))
    cmd = check_command(
        raw, ring, site="site-a", room="or-3", now=datetime.now(UTC), skew_s=60,
        seen=NonceBook(60),
    )  # fmt: skip
    assert (cmd.kind, cmd.signer) == ("signoff", "phys-anna")
    assert dict(cmd.body) == {
        "delivery_id": DID,
        "meaning": "approved",
        "reason": None,
        "name": "A. Example, MPE",
        "utc_offset_min": cmd.body["utc_offset_min"],
        "record": RECORD,
    }
    assert PW_ANNA.encode() not in raw
    # a later signing of the same session: the password alone
    rig.answer = lambda env: (
        "info", f"sign-off recorded: delivery {DID} [nonce {env['nonce']}]", answer(env, "done")
    )  # fmt: skip
    status, body = await sign(b, meaning="reviewed", password=PW_ANNA)
    assert status == 200, body


async def test_the_first_signing_needs_the_id_and_a_wrong_password_signs_nothing(rig: Rig) -> None:
    b = await physicist(rig)
    status, body = await sign(b, password=PW_ANNA)  # no ID at the first signing
    assert (status, body["needs_id"]) == (400, True)
    status, body = await sign(b, holder="viewer-vic", password=PW_ANNA)  # not the session's
    assert status == 400
    wrong = "not my password at all"
    for _ in range(3):
        status, body = await sign(b, holder="phys-anna", password=wrong)
        assert status == 401
    assert "session has ended" in body["error"]
    assert rig.sent == []
    assert not rig.auth.book.of("phys-anna")


async def test_only_a_physicist_with_a_valid_token_from_this_page(rig: Rig) -> None:
    v = Browser(rig.app)
    assert (await v.login("viewer-vic", PW_VIC))[0] == 200
    status, body = await sign(v, holder="viewer-vic", password=PW_VIC)
    assert status == 403
    assert "physicist" in body["error"]
    b = await physicist(rig)
    assert (await sign(b, csrf="forged", holder="phys-anna", password=PW_ANNA))[0] == 403
    other = "http://evil.example"
    assert (await sign(b, origin=other, holder="phys-anna", password=PW_ANNA))[0] == 403
    assert (await sign(Browser(rig.app), csrf="x", holder="phys-anna", password=PW_ANNA))[0] == 401
    assert rig.sent == []


@pytest.mark.parametrize(
    ("phase", "record", "form", "status"),
    [
        ("IRRADIATING", RECORD, {}, 409),  # not ended
        ("TERMINATED", None, {}, 409),  # its record not published yet
        ("TERMINATED", RECORD, {"delivery_id": "or-3-other"}, 409),
        ("TERMINATED", RECORD, {"meaning": "approved_with_deviation"}, 400),  # no reason
        ("TERMINATED", RECORD, {"meaning": "fine"}, 400),
    ],
)
async def test_nothing_is_sent_for_what_cannot_be_signed(
    rig: Rig, phase: str, record: dict[str, Any] | None, form: dict[str, str], status: int
) -> None:
    rig.delivery(phase, record)
    b = await physicist(rig)
    got, _ = await sign(b, holder="phys-anna", password=PW_ANNA, **form)
    assert got == status
    assert rig.sent == []


async def test_never_recorded_without_the_daemons_word(rig: Rig) -> None:
    b = await physicist(rig)
    rig.answer = None  # no daemon
    status, body = await sign(b, holder="phys-anna", password=PW_ANNA)
    assert status == 504
    assert body["recorded"] is False
    assert body["error"].startswith("NOT recorded")
    # the words of a recording without its command fields: not an answer
    rig.answer = lambda env: recorded(env)[:2]
    status, body = await sign(b, password=PW_ANNA)
    assert (status, body["recorded"]) == (504, False)
    # refused by the handler, refused by the intake (its fields name the bytes' SHA-256)
    rig.answer = lambda env: ("critical", "sign-off NOT recorded", answer(env, "refused", "x"))
    status, body = await sign(b, password=PW_ANNA)
    assert (status, body["recorded"]) == (422, False)
    rig.answer = lambda env: (
        "info",
        "command refused (wrong_room): ...",
        {"kind": None, "nonce": None, "sha256": hashlib.sha256(rig.sent[-1][1]).hexdigest(),
         "outcome": "refused", "reason": "wrong_room"},
    )  # fmt: skip
    status, body = await sign(b, password=PW_ANNA)
    assert (status, body["recorded"]) == (422, False)
    rig.hub.publish = None  # no broker
    status, body = await sign(b, password=PW_ANNA)
    assert (status, body["recorded"]) == (503, False)
