"""A sink's recorded entry on the ``events`` topic (daemon/mqtt/payloads.py
``report_payload``): a DICOM hand-off attempt validates against the published schema; a
kind not listed is not published; what the schema refuses (patient data has no field)."""

from __future__ import annotations

from typing import Any

import pytest
from test_mqtt_payloads import check, rejects

from iortd.daemon.mqtt.payloads import Envelope, report_payload

ENV = Envelope(3, 2, "2026-11-26T10:00:00.000000Z", sim=True)


def attempt(**kw: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "delivery_id": "or-3-20261126T095900Z",
        "destination": "ois",
        "what": "record",
        "sop_instance_uid": "1.2.826.0.1.3680043.8.498.12345",
        "outcome": "refused",
        "status": None,
        "detail": "association rejected: called AE title not recognised (reason 7)",
        "attempt": 2,
    }
    return {**data, **kw}


@pytest.mark.parametrize(
    "data",
    [
        attempt(),
        attempt(outcome="stored", status=0, detail=""),
        attempt(outcome="commit_failed", status=0x0112, detail="no such object instance"),
        attempt(outcome="overdue", what=None, sop_instance_uid=None, attempt=0),
    ],
)
def test_a_hand_off_outcome_is_a_valid_events_message(data: dict[str, Any]) -> None:
    p = report_payload(ENV, "dicom_handoff", data)
    assert p is not None
    check("events", p)
    assert p["kind"] == "dicom_handoff"
    assert p["delivery_id"] == data["delivery_id"]


def test_fields_beyond_the_listed_ones_are_not_published() -> None:
    p = report_payload(ENV, "dicom_handoff", attempt(patient_id="123456"))
    assert p is not None
    assert "patient_id" not in p
    check("events", p)


def test_a_kind_not_listed_is_not_published() -> None:
    assert report_payload(ENV, "delivery_terminated", attempt()) is None


def test_the_schema_refuses_an_unknown_outcome() -> None:
    p = report_payload(ENV, "dicom_handoff", attempt(outcome="lost"))
    assert p is not None
    assert rejects("events", p)
