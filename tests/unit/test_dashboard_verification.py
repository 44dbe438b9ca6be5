"""The verification object on the dashboard's server (issue 18, item 3): a ``delivery``
whose ``verification`` passes the published schema and says one thing is held and shown; a
hostile or self-contradictory one is rejected (counted, never shown) and the room keeps
what it had; and every item, outcome and trigger of the contract has its words in the
page's script and in docs/dashboard.md (so a new item cannot reach a page as a bare code).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from iortd.dashboard.room import APPLICATOR_CODE, PSEUDONYM, verification_error
from iortd.dashboard.state import Rejected, Rooms
from iortd.kernel.types import VerificationItem, VerificationOutcome, VerificationTrigger
from iortd.plan import model as plan_model

ROOT = Path(__file__).resolve().parents[2]
T = "iort/v1/site-a/or-1/"
TS = "2026-11-26T10:00:00.000000Z"
DELIVERY = "or-1-20261126T100000000000Z"
SHA = "ab" * 32


def verification(outcome: object = "VERIFIED", **kw: Any) -> dict[str, Any]:
    v: dict[str, Any] = {
        "outcome": outcome,
        "at": TS,
        "trigger": "ready",
        "reasons": [],
        "overridden": [],
        "prescription_sha256": SHA,
        "treatment_id": "T-0042",
        "plan_id": "P-0042-1",
        "prescribed_dose_gy": 20.0,
        "applicator_code": "SPH40",
        "expected_time_s": 1380.0,
        "planned_time_s": 1380.0,
        "preset_gy": 20.0,
    }
    v.update(kw)
    return v


def delivery(seq: int, v: object, phase: str = "READY", **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "delivery_id": DELIVERY,
        "phase": phase,
        "joined_in_progress": False,
        "preset_gy": 20.0,
        "delivered_primary_gy": 0.0,
        "delivered_secondary_gy": 0.0,
        "remaining_gy": 20.0,
        "expected_rate_gy_min": 0.87,
        "planned_time_s": 1380.0,
        "backup_timer_limit_s": 1518.0,
        "beam_on_s": 0.0,
        "elapsed_s": 0.0,
        "applicator": {"type": "spherical", "diameter_mm": 40.0, "serial": "APL-40-0042"},
        "segments": [],
        "interruptions": [],
        "gaps": [],
        "termination": None,
        "termination_reason": None,
        "started": TS,
        "simulated": True,
        "dose_rate_gy_min": 0.0,
        "estimated_remaining_s": None,
        "verification": v,
    }
    d.update(extra)
    return {
        "schema": "iort/v1",
        "session": 1,
        "seq": seq,
        "ts": TS,
        "sim": True,
        "historical": False,
        "delivery": d,
    }


def held_verification(rooms: Rooms) -> Any:
    return rooms.rooms["site-a/or-1"].retained["delivery"].payload["delivery"]["verification"]


CONSISTENT = [
    verification(),
    verification("NOT_VERIFIED", reasons=["applicator", "dose"]),
    verification(
        "NOT_VERIFIED",
        reasons=["no_prescription"],
        **dict.fromkeys(
            (
                "prescription_sha256",
                "treatment_id",
                "plan_id",
                "prescribed_dose_gy",
                "applicator_code",
                "expected_time_s",
            ),
            None,
        ),
    ),
    verification("VERIFIED_OVR", trigger="override", reasons=["time"], overridden=["time"]),
    None,
]


@pytest.mark.parametrize("v", CONSISTENT)
def test_a_consistent_verification_is_held_as_it_came(v: object) -> None:
    rooms = Rooms("iort")
    assert verification_error(delivery(1, v)) is None
    assert rooms.receive(T + "delivery", orjson.dumps(delivery(1, v)), 0.0) is not None
    assert held_verification(rooms) == v


def test_a_delivery_from_before_verification_is_held_too() -> None:
    p = delivery(1, None)
    del p["delivery"]["verification"]
    rooms = Rooms("iort")
    assert rooms.receive(T + "delivery", orjson.dumps(p), 0.0) is not None
    assert "verification" not in rooms.rooms["site-a/or-1"].retained["delivery"].payload["delivery"]


# Each says two things at once: a page could only pick one, and a green one is the worst.
CONTRADICTORY = {
    "verified with a reason": verification(reasons=["dose"]),
    "verified with an override": verification(overridden=["time"]),
    "not verified without a reason": verification("NOT_VERIFIED"),
    "not verified yet overridden": verification(
        "NOT_VERIFIED", reasons=["dose"], overridden=["dose"]
    ),
    "override without an item": verification("VERIFIED_OVR", reasons=["time"]),
    "override leaving a reason": verification(
        "VERIFIED_OVR", reasons=["time", "dose"], overridden=["time"]
    ),
    "override of an item that did not fail": verification(
        "VERIFIED_OVR", reasons=["time"], overridden=["time", "dose"]
    ),
}


@pytest.mark.parametrize("name", list(CONTRADICTORY))
def test_a_self_contradictory_verification_is_rejected_and_the_room_keeps_its_own(
    name: str,
) -> None:
    rooms = Rooms("iort")
    good = verification("NOT_VERIFIED", reasons=["applicator"])
    rooms.receive(T + "delivery", orjson.dumps(delivery(1, good)), 0.0)
    with pytest.raises(Rejected) as caught:
        rooms.receive(T + "delivery", orjson.dumps(delivery(2, CONTRADICTORY[name])), 0.1)
    assert caught.value.reason == "verification inconsistent"
    assert held_verification(rooms) == good
    assert rooms.rejects["site-a/or-1"] == {"verification inconsistent": 1}


# Ids no daemon can send (plan/model.py: pseudonyms and applicator codes are letters,
# digits, '.', '_', '-'): a right-to-left override would make "prescribed SPH30" read as
# another code on the page; a space or a name is what a pseudonym must never hold.
NOT_PSEUDONYMS = {
    "a bidi override in the treatment id": verification(treatment_id="T-\u202e24-0"),
    "a name as the plan id": verification(plan_id="Jane Doe"),
    "a zero-width space in the applicator code": verification(applicator_code="SPH\u200b40"),
    "an applicator code starting with a dot": verification(applicator_code=".SPH40"),
}


@pytest.mark.parametrize("name", list(NOT_PSEUDONYMS))
def test_an_id_no_daemon_can_send_is_rejected(name: str) -> None:
    rooms = Rooms("iort")
    good = verification()
    rooms.receive(T + "delivery", orjson.dumps(delivery(1, good)), 0.0)
    with pytest.raises(Rejected) as caught:
        rooms.receive(T + "delivery", orjson.dumps(delivery(2, NOT_PSEUDONYMS[name])), 0.1)
    assert caught.value.reason == "verification ids"
    assert held_verification(rooms) == good


def test_the_id_shapes_are_the_prescriptions() -> None:
    assert PSEUDONYM.pattern == plan_model._PSEUDONYM.pattern
    assert APPLICATOR_CODE.pattern == plan_model._APPLICATOR.pattern


HOSTILE = {
    "outcome as a boolean": verification(outcome=True),
    "an unknown outcome": verification(outcome="OK"),
    "reasons as a string": verification("NOT_VERIFIED", reasons="applicator"),
    "an unknown item": verification("NOT_VERIFIED", reasons=["<img src=x onerror=alert(1)>"]),
    "an extra key": verification(comment="trust me"),
    "a key missing": {k: v for k, v in verification().items() if k != "trigger"},
    "a 10 kB reason list": verification("NOT_VERIFIED", reasons=["dose"] * 2000),
    "a treatment id of 10 kB": verification(treatment_id="T" * 10_000),
    "a dose as text": verification(prescribed_dose_gy="20"),
    "not an object": ["VERIFIED"],
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_verification_is_refused_by_the_schema(name: str) -> None:
    rooms = Rooms("iort")
    good = verification()
    rooms.receive(T + "delivery", orjson.dumps(delivery(1, good)), 0.0)
    with pytest.raises(Rejected) as caught:
        rooms.receive(T + "delivery", orjson.dumps(delivery(2, HOSTILE[name])), 0.1)
    assert caught.value.reason.startswith("schema delivery /delivery"), caught.value.reason
    # Never the offending value in the reason (a counter key and a log field).
    assert "onerror" not in caught.value.reason
    assert "trust" not in caught.value.reason
    assert held_verification(rooms) == good


def test_the_overview_summary_carries_the_verification() -> None:
    rooms = Rooms("iort")
    v = verification("NOT_VERIFIED", reasons=["dose"])
    rooms.receive(T + "delivery", orjson.dumps(delivery(1, v)), 0.0)
    snap = rooms.snapshot(1.0, summary=True)
    got = snap["rooms"]["site-a/or-1"]["retained"]["delivery"]["payload"]["delivery"]
    assert got["verification"] == v


# ---- the words: every code of the contract has them, in the page and in the docs -----------


def _js_table(name: str) -> set[str]:
    src = (ROOT / "dashboard" / "static" / "verification.js").read_text("utf-8")
    m = re.search(r"const " + name + r" = \{(.*?)\n  \};", src, re.S)
    assert m, f"dashboard/static/verification.js: no table {name}"
    return set(re.findall(r"^\s{4}(\w+):", m.group(1), re.M))


def test_every_item_outcome_and_trigger_has_words_in_the_page() -> None:
    assert _js_table("ITEM_LINES") == {i.value for i in VerificationItem}
    assert _js_table("OUTCOMES") == {o.value for o in VerificationOutcome} | {"NOT_CHECKED"}
    assert _js_table("TRIGGERS") == {t.value for t in VerificationTrigger}


def test_every_item_has_its_line_in_the_docs() -> None:
    doc = (ROOT / "docs" / "dashboard.md").read_text("utf-8")
    section = doc.split("## Verification before beam-on", 1)
    assert len(section) == 2, "docs/dashboard.md: no section 'Verification before beam-on'"
    for item in VerificationItem:
        assert f"| `{item.value}` |" in section[1], f"docs/dashboard.md: no line for {item}"
    for word in ("VERIFIED", "NOT VERIFIED", "VERIFIED WITH OVERRIDE", "NOT CHECKED"):
        assert f"**{word}**" in section[1], word
