"""The check against a prescription in the auditors' outputs (issue 18, item 3): which check
governs a delivery, the report's section "Prescription and verification", the JSON export
and the DICOM record's Treatment Verification Status, Override Sequence and referenced
plan. From deliveries written by hand (handlog.py + rxlog.py); the command line over a real
log, with dciodvfy: test_rx_cli.py."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import orjson
import pydicom
import pytest
from handlog import DID, record
from pydicom.tag import Tag
from rxlog import checked_log, verification

from iortd.audit.dicom import dicom_export
from iortd.audit.export import describe, json_export
from iortd.audit.report.content import build_doc
from iortd.audit.report.html_page import html_report
from iortd.audit.report.model import KeyValues, Para, Table
from iortd.audit.review import collect_deliveries, format_summary
from iortd.auditlog.keyring import Keyring, parse_keyring
from iortd.auditlog.note import generate_keypair

OK = verification()
BAD_DOSE = verification("NOT_VERIFIED", failed=("dose",), preset_gy=1.2)
OVR_DOSE = verification("VERIFIED_OVR", "override", overridden=("dose",), preset_gy=1.2)
NONE_AT_BEAM = verification(
    "NOT_VERIFIED", "beam_on", ("no_prescription",), with_prescription=False
)


def _text(doc: Any) -> str:
    out = []
    for b in doc.blocks:
        if isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, KeyValues):
            out += [f"{k}: {v}" for k, v in b.rows]
        elif isinstance(b, Table):
            out += [" | ".join(b.header)] + [" | ".join(r) for r in b.rows]
    return "\n".join(out)


def _keyring(role: str) -> Keyring:
    text = (
        "[[key]]\n"
        'holder = "phys-anna"\n'
        'name = "A. Example, MPE"\n'
        f'roles = ["{role}"]\n'
        f'public_key = "{generate_keypair("phys-anna").verifier.text}"\n'
        'valid_from = "2026-01-01T00:00:00Z"\n'
        'valid_until = "2099-01-01T00:00:00Z"\n'
    )
    return parse_keyring(text.encode(), Path("keyring.toml"))


def _section(doc: Any) -> list[Any]:
    heads = [
        i
        for i, b in enumerate(doc.blocks)
        if getattr(b, "text", None) == ("Prescription and verification")
    ]
    assert heads, "the report has no section 'Prescription and verification'"
    blocks: list[Any] = doc.blocks[heads[0] :]
    return blocks


# ---- which check governs ------------------------------------------------------------------


def test_the_last_check_before_beam_on_governs_and_the_use_is_recorded() -> None:
    pc = record(checked_log(BAD_DOSE, OK)).prescription_check
    assert pc.outcome == "VERIFIED"
    assert [e["data"]["outcome"] for e in pc.checks] == ["NOT_VERIFIED", "VERIFIED"]
    assert pc.governing is pc.checks[1]
    assert not pc.after_beam_on
    assert len(pc.used) == 1


def test_an_override_after_beam_on_does_not_govern() -> None:
    pc = record(checked_log(BAD_DOSE, after_beam_on=(OVR_DOSE,))).prescription_check
    assert pc.outcome == "NOT_VERIFIED"
    assert len(pc.checks) == 2


def test_a_check_only_at_beam_on_governs_flagged() -> None:
    pc = record(checked_log(after_beam_on=(NONE_AT_BEAM, OK))).prescription_check
    assert pc.outcome == "NOT_VERIFIED"
    assert pc.after_beam_on
    assert pc.used == ()


def test_a_delivery_without_a_check_has_no_outcome() -> None:
    pc = record(checked_log()).prescription_check
    assert pc.governing is None
    assert pc.outcome is None
    assert pc.checks == ()


def test_another_deliverys_check_and_a_malformed_one_never_govern() -> None:
    other = verification(did="or-1-20261126T090000000000Z")
    forged = dict(OK, outcome="YES")
    log = checked_log(BAD_DOSE)
    log.add("verification", other, None)  # names another delivery in its data only
    log.add("verification", forged)
    n = len(log.entries)
    log.add("verification", OK, "or-1-20261126T090000000000Z")  # another delivery's envelope
    pc = record(log).prescription_check
    assert pc.outcome == "NOT_VERIFIED"
    assert [int(e["seq"]) for e in pc.checks][-1] == n - 1, "the malformed one is listed"


# ---- the report ---------------------------------------------------------------------------


def test_the_report_states_the_outcome_and_the_three_columns() -> None:
    doc = build_doc(record(checked_log(OK)))
    blocks = _section(doc)
    assert isinstance(blocks[1], Para)
    assert (blocks[1].text, blocks[1].style) == ("VERIFIED", "outcome")
    [table] = [b for b in blocks if isinstance(b, Table) and "prescribed" in b.header]
    assert list(table.header) == ["", "prescribed", "console (at the check)", "delivered"]
    rows = {r[0]: r[1:] for r in table.rows}
    assert rows["Treatment ID"] == ["T-0042", "—", "T-0042"]
    assert rows["Fraction"] == ["1 of 1", "—", "1"]
    assert rows["Dose"][0] == "1.000 Gy at 5.0 mm depth in water"
    assert rows["Dose"][1] == "preset 1.000 Gy"
    assert rows["Dose"][2].startswith("1.000 Gy")
    assert rows["Applicator"] == [
        "SPH30 30.0 mm",
        "spherical 30.0 mm, s/n A-7",
        "spherical 30.0 mm, s/n A-7",
    ]
    assert rows["Treatment time"] == [
        "1:00 (60.0 s) planned",
        "1:00 (60.0 s) planned",
        "1:00 (60.0 s) beam-on",
    ]
    assert rows["Expected time (independent)"][0] == "1:01 (61.2 s)"
    text = _text(doc)
    assert "commissioning 2026 of 2026-01-15" in text
    assert "output factor 0.98 (measured 2026-11-26)" in text
    assert "Prescription used: yes: recorded at seq" in text


def test_the_report_names_the_overriding_physicist_and_the_reasons() -> None:
    rec = record(checked_log(BAD_DOSE, OVR_DOSE))
    doc = build_doc(rec, keyring=_keyring("physicist"))
    blocks = _section(doc)
    assert blocks[1].text == "VERIFIED WITH OVERRIDE"
    text = _text(doc)
    assert "Overridden by a physicist: the console's preset dose differs" in text
    [ovr] = [b for b in blocks if isinstance(b, Table) and b.header[0] == "overridden item"]
    assert ovr.rows[0][:3] == [
        "dose",
        "A. Example, MPE (phys-anna)",
        "dose: checked by hand against the plan",
    ]
    assert ovr.rows[0][3].startswith("2026-11-26 ")
    assert "seq | time | trigger | outcome | reasons" in text, "every check is listed"
    assert "Keyring:" not in text
    # without the keyring: the holder id only
    assert "| phys-anna |" in _text(build_doc(rec))
    # a keyring in which the holder was no physicist: marked, and said in red
    text = _text(build_doc(rec, keyring=_keyring("operator")))
    assert "| A. Example, MPE (phys-anna) [NOT ENROLLED AS PHYSICIST THEN] |" in text
    assert "Keyring: phys-anna held no physicist key valid at 2026-11-26T" in text


def test_a_delivery_without_a_check_says_so_in_one_line() -> None:
    doc = build_doc(record(checked_log()))
    blocks = _section(doc)
    assert blocks[1].text == "NOT CHECKED"
    assert blocks[2].text.startswith("Not checked against a prescription")
    assert blocks[3].text == "Prescription and delivery", "nothing else in the section"


def test_a_used_prescription_that_is_not_the_checked_one_is_said_in_red() -> None:
    log = checked_log(OK)
    for e in log.entries:
        if e["type"] == "prescription_used":
            e["data"] = {**e["data"], "prescription_sha256": "ab" * 32}
    doc = build_doc(record(log))
    [warn] = [b for b in _section(doc) if isinstance(b, Para) and "recorded as used" in b.text]
    assert warn.style == "warn"
    assert f"({'ab' * 8}...) is not the one the governing check named ({'5e' * 8}...)" in warn.text


def test_a_check_only_at_beam_on_is_flagged_in_the_report() -> None:
    text = _text(build_doc(record(checked_log(after_beam_on=(NONE_AT_BEAM,)))))
    assert "Checked only at or after beam-on" in text
    assert "no prescription was in force for this delivery" in text


def test_the_html_sets_the_outcome_large() -> None:
    page = html_report(record(checked_log(BAD_DOSE))).decode()
    assert '<p class="outcome">NOT VERIFIED</p>' in page
    assert ".outcome{" in page


def test_events_review_and_json_name_the_checks() -> None:
    log = checked_log(OVR_DOSE)
    rec = record(log)
    [v] = [e for e in rec.events if e["type"] == "verification"]
    assert describe(v) == "verification VERIFIED_OVR (override): overridden dose"
    [u] = [e for e in rec.events if e["type"] == "prescription_used"]
    assert describe(u) == f"prescription used: T-0042 / P-0042 fraction 1 ({'5e' * 8}...)"
    doc = orjson.loads(json_export(rec))
    pv = doc["prescription_verification"]
    assert pv["outcome"] == "VERIFIED_OVR"
    assert pv["governing_seq"] == v["seq"]
    assert pv["checked_only_at_or_after_beam_on"] is False
    assert pv["checks_seq"] == [v["seq"]]
    assert pv["prescription_used_seq"] == u["seq"]
    none = orjson.loads(json_export(record(checked_log())))["prescription_verification"]
    assert none == {
        "outcome": None,
        "governing_seq": None,
        "checked_only_at_or_after_beam_on": False,
        "checks_seq": [],
        "prescription_used_seq": None,
    }
    [summary] = collect_deliveries(log.entries)
    assert "verification    VERIFIED WITH OVERRIDE (seq" in format_summary(summary)


# ---- the DICOM record ---------------------------------------------------------------------


def _ds(log: Any, **kw: Any) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(dicom_export(record(log), **kw)))


@pytest.mark.parametrize(
    ("checks", "status"),
    [((OK,), "VERIFIED"), ((BAD_DOSE,), "NOT_VERIFIED"), ((BAD_DOSE, OVR_DOSE), "VERIFIED_OVR")],
)
def test_every_beam_item_carries_the_verification_status(
    checks: tuple[dict[str, Any], ...], status: str
) -> None:
    ds = _ds(checked_log(*checks))
    assert [i.TreatmentVerificationStatus for i in ds.TreatmentSessionBeamSequence] == [status] * 2


def test_not_checked_leaves_the_type_2_status_empty() -> None:
    ds = _ds(checked_log())
    for item in ds.TreatmentSessionBeamSequence:
        assert "TreatmentVerificationStatus" in item
        assert item.TreatmentVerificationStatus == ""
        assert all("OverrideSequence" not in cp for cp in item.ControlPointDeliverySequence)


def test_an_override_points_at_the_overridden_attribute() -> None:
    ovr = verification(
        "VERIFIED_OVR", "override", overridden=("dose", "applicator", "expired"), preset_gy=1.2
    )
    ds = _ds(checked_log(BAD_DOSE, ovr))
    for n, item in enumerate(ds.TreatmentSessionBeamSequence, start=1):
        # PS3.3 C.8.8.21: in the Control Point Delivery Sequence; in force from the first on
        first, second = item.ControlPointDeliverySequence
        assert "OverrideSequence" not in second
        overrides = first.OverrideSequence
        got = [
            (o.ParameterSequencePointer, o.ParameterItemIndex, o.OverrideParameterPointer)
            for o in overrides
        ]
        assert got == [
            (Tag(0x3008, 0x0020), n, Tag(0x3008, 0x0032)),  # Specified Primary Meterset
            (Tag(0x300A, 0x0107), 1, Tag(0x300A, 0x0108)),  # Applicator ID
            (Tag(0x300C, 0x0002), 1, Tag(0x0008, 0x1155)),  # the referenced plan
        ]
        assert [str(o.OperatorsName) for o in overrides] == ["phys-anna^"] * 3
        assert overrides[0].OverrideReason == "dose: dose: checked by hand against the plan"


def test_the_plan_reference_and_patient_id_come_only_from_the_store() -> None:
    ds = _ds(checked_log(OK))
    assert ds.ReferencedRTPlanSequence == []
    assert ds.PatientID == "T-0042"
    assert ds.PatientIdentityRemoved == "YES"
    hand = {"patient_id": "MRN-778812", "plan_sop_instance_uid": "1.2.826.0.1.3680043.8.498.1"}
    ds = _ds(checked_log(OK), hand_off=hand)
    [ref] = ds.ReferencedRTPlanSequence
    assert ref.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.481.5"
    assert ref.ReferencedSOPInstanceUID == "1.2.826.0.1.3680043.8.498.1"
    assert ds.PatientID == "MRN-778812"
    assert "PatientIdentityRemoved" not in ds
    assert "DeidentificationMethod" not in ds
    # another object (another patient identity): its own UIDs, still derived from the log
    plain = _ds(checked_log(OK))
    for uid in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        assert ds[uid].value != plain[uid].value
        assert ds[uid].value == _ds(checked_log(OK), hand_off=hand)[uid].value


def test_a_malformed_check_never_breaks_an_output_nor_reads_as_verified() -> None:
    """What a confused verifier or a --allow-unverified log can hold: wrong types
    everywhere in an entry whose outcome is valid, and one whose outcome is not."""
    odd = dict(
        OVR_DOSE,
        reasons="dose",
        overridden="dose",
        overrides=["dose", {"item": "dose", "by": "x^y=z\\w", "reason": "a\x00b", "nonce": 1}],
        checks={"item": "dose"},
        console=["preset"],
        prescription="T-0042",
        time_basis="table",
        reader_applicator=7,
    )
    rec = record(checked_log(BAD_DOSE, odd))
    text = _text(build_doc(rec))
    assert "VERIFIED WITH OVERRIDE" in text
    assert "d, o, s, e" not in text, "a string is not a list of reasons"
    html_report(rec)
    ds = pydicom.dcmread(io.BytesIO(dicom_export(rec)))
    [ov] = ds.TreatmentSessionBeamSequence[0].ControlPointDeliverySequence[0].OverrideSequence
    assert str(ov.OperatorsName) == "x_y_z_w^"
    assert ov.OverrideReason == "dose: a b"
    json_export(rec)
    log = checked_log(BAD_DOSE, odd)
    log.add("verification", verification(did="phantom"), None)
    [summary] = collect_deliveries(log.entries)  # no delivery "phantom"
    assert "d, o, s, e" not in format_summary(summary)
    forged = record(checked_log(dict(OK, outcome="VERIFIED ")))
    assert "NOT CHECKED" in _text(build_doc(forged))
    assert {
        i.TreatmentVerificationStatus
        for i in _ds(checked_log(dict(OK, outcome=1))).TreatmentSessionBeamSequence
    } == {""}


def test_a_check_in_a_crashs_unvouched_tail_never_governs() -> None:
    """A restart took the delivery over after a crash whose tail no signature vouches for:
    a check in that tail (possibly written by anyone with write access) is listed, but the
    governing check is the last one before it."""
    log = checked_log(BAD_DOSE, OK)
    [i] = [n for n, e in enumerate(log.entries) if e["data"] is not None and e["data"] == OK]
    tail = log.entries[i]["seq"]
    extra = [
        {"type": "recovery", "data": {"unvouched": {"first_seq": tail}}},
        {"type": "daemon_start", "data": {"open_delivery": DID}},
    ]
    log.entries[i + 1 : i + 1] = extra
    for n, e in enumerate(log.entries):
        e["seq"] = n
    pc = record(log).prescription_check
    assert len(pc.checks) == 2
    assert pc.outcome == "NOT_VERIFIED"
