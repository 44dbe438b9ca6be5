"""The DICOM RT Beams Treatment Record and the CSV/JSON exports, from a delivery written
by hand: the mapping rules (tiling, termination status, UIDs, number format) without a
daemon. The real deliveries are in tests/integration/test_audit_report.py."""

from __future__ import annotations

import io
import re
from typing import Any

import orjson
import pydicom
import pytest
from handlog import DID, VERIFIED, at, interrupted_log, record

from iortd.audit.dicom import (
    DicomExportError,
    dicom_export,
    ds_number,
    segments_with_context,
    uid_for,
)
from iortd.audit.export import events_csv, fmt_value, json_export, samples_csv
from iortd.audit.record import NoSuchDelivery, _collect


def test_uids_are_deterministic_valid_and_differ_by_their_parts() -> None:
    a = uid_for("origin", DID, "ab" * 32, "instance")
    assert a == uid_for("origin", DID, "ab" * 32, "instance")
    assert a != uid_for("origin", DID, "ab" * 32, "series")
    assert a != uid_for("origin", DID, "cd" * 32, "instance"), "a longer log, a new instance"
    assert re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", a)
    assert len(a) <= 64


@pytest.mark.parametrize(
    ("x", "text"),
    [(20.0, "20"), (0.0, "0"), (0.1261, "0.1261"), (1384.7725753191, "1384.772575"), (-0.0, "0")],
)
def test_decimal_strings_fit_16_characters(x: float, text: str) -> None:
    assert ds_number(x) == text
    assert len(ds_number(123456789.123456)) <= 16


def test_each_segment_is_one_partial_treatment_and_they_tile() -> None:
    ds = pydicom.dcmread(io.BytesIO(dicom_export(record(interrupted_log()))))
    first, second = ds.TreatmentSessionBeamSequence
    assert first.TreatmentDeliveryType == "TREATMENT"
    assert second.TreatmentDeliveryType == "CONTINUATION"
    assert first.TreatmentTerminationStatus == "MACHINE", "the door interlock stopped it"
    assert second.TreatmentTerminationStatus == "NORMAL"
    assert float(first.DeliveredPrimaryMeterset) == pytest.approx(0.4)
    assert float(second.DeliveredPrimaryMeterset) == pytest.approx(0.6)
    assert float(first.DeliveredSecondaryMeterset) == pytest.approx(0.402)
    assert float(second.DeliveredSecondaryMeterset) == pytest.approx(0.601)
    assert float(first.DeliveredTreatmentTime) == pytest.approx(24.0)
    assert float(second.DeliveredTreatmentTime) == pytest.approx(36.0)
    # C.8.8.21.2.2: DelMS = MAX(StartMS, MIN(SpecMS, EndMS)) with SpecMS 0 and the preset.
    assert [float(c.DeliveredMeterset) for c in first.ControlPointDeliverySequence] == [0.0, 0.4]
    assert [float(c.DeliveredMeterset) for c in second.ControlPointDeliverySequence] == [0.4, 1.0]
    assert [float(c.SpecifiedMeterset) for c in second.ControlPointDeliverySequence] == [0.0, 1.0]
    assert second.ControlPointDeliverySequence[0].TreatmentControlPointTime == "100040.000000"
    assert ds.PatientID == "T-0042"
    assert ds.PatientIdentityRemoved == "YES"


def test_dose_with_the_beam_reported_off_is_its_own_item_and_keeps_the_tiling() -> None:
    rec = record(interrupted_log(extra_segment=True))
    rows = segments_with_context(rec)
    assert [r.kind for r in rows] == ["beam", "beam", "beam_off"]
    assert rows[1].ended_by == "dose counted with the beam reported off"
    ds = pydicom.dcmread(io.BytesIO(dicom_export(rec)))
    total = sum(float(i.DeliveredPrimaryMeterset) for i in ds.TreatmentSessionBeamSequence)
    assert total == pytest.approx(1.01)


def test_a_delivery_without_a_termination_or_a_beam_has_no_treatment_record() -> None:
    log = interrupted_log()
    log.entries = [e for e in log.entries if e["type"] != "delivery_terminated"]
    with pytest.raises(DicomExportError, match="not terminated"):
        dicom_export(record(log))


def test_an_unknown_delivery_is_refused() -> None:
    with pytest.raises(NoSuchDelivery):
        _collect(interrupted_log().entries, "or-1-nope", VERIFIED)


def test_the_record_reads_context_interruptions_and_the_covering_checkpoint() -> None:
    rec = record(interrupted_log())
    assert rec.plan["treatment_id"] == "T-0042"
    assert rec.device["serial"] == "S-1"
    assert rec.config_sha256 == "cd" * 32
    [intr] = rec.intervals()
    assert (intr.kind, intr.start, intr.end, intr.cause) == (
        "interruption",
        at(25),
        at(40),
        "interlock door",
    )
    assert rec.last_seq == 14
    assert rec.checkpoint is None, "a note that does not parse covers nothing"


def test_csv_and_json_are_stable_and_hold_every_entry() -> None:
    rec = record(interrupted_log())
    assert samples_csv(rec) == samples_csv(record(interrupted_log()))
    lines = samples_csv(rec).decode().split("\r\n")
    assert lines[0].startswith("seq,ts,at,device,state,phase,dose_rate_gy_min")
    assert len(lines) == 1 + 5 + 1  # header, five samples, the final CRLF
    events = events_csv(rec).decode()
    assert "interlock door: ok -> tripped" in events
    doc = orjson.loads(json_export(rec))
    assert [e["seq"] for e in doc["entries"]] == list(range(4, 15))
    assert doc["delivery"]["intervals"][0]["cause"] == "interlock door"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, ""),
        (True, "true"),
        (0.1, "0.1"),
        (1e-07, "1e-07"),
        (3, "3"),
        ({"b": 1, "a": 2}, '{"a":2,"b":1}'),
    ],
)
def test_csv_values_are_written_one_way(value: Any, text: str) -> None:
    assert fmt_value(value) == text
