"""Birth and death with the session (issue 22, from Sparkplug's practice): the retained
``status`` is the birth (session, config hash, software version, audit-log origin) and
the Last Will names the same session; a consumer keeps the newest session's status and
ignores an older one's will; the daemon answers a stale will on its own status topic by
publishing its birth again (daemon/mqtt/birth.py). The real broker and daemon:
tests/integration/test_birth_death_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker  # type: ignore[import-untyped]

from iortd.daemon.mqtt.birth import BirthGuard
from iortd.daemon.mqtt.payloads import Envelope, status_payload
from iortd.dashboard.state import Rooms

SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "docs/schemas/v1/status.schema.json").read_text()
)
HASH = "ab" * 32
T = "iort/v1/site-a/or-1/status"


def status(session: int, seq: int, *, online: bool) -> dict[str, Any]:
    env = Envelope(seq, session, "2026-11-26T10:00:00.000000Z")
    return status_payload(
        env, online, "0.1.0", "site-a", "or-1", config_hash=HASH, origin="site-a/or-1"
    )


def test_birth_and_will_carry_session_config_hash_and_origin() -> None:
    birth, will = status(4, 0, online=True), status(4, 1, online=False)
    check = Draft202012Validator(SCHEMA, format_checker=FormatChecker())
    for p in (birth, will):
        check.validate(p)
        assert (p["session"], p["config_hash"], p["origin"]) == (4, HASH, "site-a/or-1")
    assert (birth["online"], will["online"]) == (True, False)
    bad = {**birth, "config_hash": "not-hex"}
    assert list(check.iter_errors(bad))


def test_dashboard_ignores_an_older_sessions_will() -> None:
    rooms = Rooms("iort")
    rooms.accept(T, status(5, 10, online=True), 1.0)
    rooms.accept(T, status(4, 99, online=False), 2.0)  # session 4's will, arriving late
    room = rooms.rooms["site-a/or-1"]
    assert room.retained["status"].payload["online"] is True
    assert room.retained["status"].payload["session"] == 5
    assert room.notices.get("stale_will_ignored") == 1
    # A late will of an earlier connection of the same session (its seq is lower).
    rooms.accept(T, status(5, 9, online=False), 3.0)
    assert room.retained["status"].payload["online"] is True
    # The session's own, current will does count.
    rooms.accept(T, status(5, 11, online=False), 4.0)
    assert room.retained["status"].payload["online"] is False


def test_birth_guard_answers_a_stale_will_once() -> None:
    guard = BirthGuard()
    guard.born(session=5, seq=10)
    assert not guard.stale(status(5, 10, online=True))  # our own birth, echoed back
    assert guard.stale(status(4, 3, online=False))  # an older session's will
    assert guard.stale(status(5, 9, online=False))  # an earlier connection's will
    assert guard.stale(status(4, 3, online=True))  # an older session's birth
    assert not guard.stale(status(5, 11, online=False))  # our own will: we are gone
    assert not guard.stale(status(6, 0, online=True))  # a newer session: not ours to fix
    assert not guard.stale({"online": False})  # not a status: left alone
    assert not guard.stale(b"\xff")
    assert not guard.answer(b"\xff not json", 5, 10)


def test_birth_guard_is_rate_limited() -> None:
    now = [100.0]
    guard = BirthGuard(min_interval_s=1.0, clock=lambda: now[0])
    guard.born(session=5, seq=10)
    assert guard.due(status(4, 3, online=False))
    assert not guard.due(status(4, 3, online=False))  # within the interval: coalesced
    now[0] += 1.5
    assert guard.due(status(4, 3, online=False))
