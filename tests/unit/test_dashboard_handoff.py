"""The DICOM hand-off on the dashboard (issue 23, item 3): a ``dicom_handoff`` events
message that passes the published schema is held with the room's events (the room page
shows each destination's latest outcome for the delivery shown: "Hand-off to the
hospital"); one carrying more than the contract's fields (a patient id) or an unknown
outcome is rejected, counted, never shown; every outcome has its words in the page's
script."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from iortd.daemon.sinks import HANDOFF_OUTCOMES
from iortd.dashboard.state import Rejected, Rooms

ROOT = Path(__file__).resolve().parents[2]
T = "iort/v1/site-a/or-1/"
TS = "2026-11-26T10:00:00.000000Z"


def handoff(seq: int, **kw: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "schema": "iort/v1",
        "session": 1,
        "seq": seq,
        "ts": TS,
        "sim": True,
        "historical": False,
        "kind": "dicom_handoff",
        "delivery_id": "or-1-20261126T100000000000Z",
        "at": TS,
        "destination": "ois",
        "what": "record",
        "sop_instance_uid": "2.25.1234",
        "outcome": "refused",
        "status": None,
        "detail": "association rejected: called AE title not recognised (reason 7)",
        "attempt": 3,
    }
    return {**p, **kw}


def test_a_hand_off_outcome_is_held_with_the_rooms_events() -> None:
    rooms = Rooms("iort")
    assert rooms.accept(T + "events", handoff(1), 0.0) is not None
    room = rooms.rooms["site-a/or-1"]
    assert [h.payload["outcome"] for h in room.events] == ["refused"]


@pytest.mark.parametrize(
    "bad",
    [
        handoff(1, patient_id="MRN-5550123"),
        handoff(1, outcome="lost"),
        handoff(1, destination="../etc"),
        handoff(1, detail="x" * 301),
    ],
)
def test_a_hand_off_message_beyond_the_contract_is_rejected(bad: dict[str, Any]) -> None:
    rooms = Rooms("iort")
    with pytest.raises(Rejected):
        rooms.accept(T + "events", bad, 0.0)


def test_every_outcome_has_its_words_on_the_room_page() -> None:
    script = (ROOT / "dashboard" / "static" / "app.js").read_text("utf-8")
    assert "Hand-off to the hospital" in script
    for outcome in HANDOFF_OUTCOMES:
        assert f"{outcome}:" in script, outcome
