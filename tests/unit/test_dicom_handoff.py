"""The instances handed to the hospital (audit/dicom_handoff.py), from the committed golden
log: the record is the export's bytes, the PDF is the report's bytes, both in one patient
and study; only a verified log gives anything; the protected store's identifiers are in
the objects and nowhere else; a sign-off makes new instances that name the first."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from handlog import interrupted_log, record
from pydicom.uid import EncapsulatedPDFStorage, RTBeamsTreatmentRecordStorage
from test_dicom_signoff import signed

from iortd.audit.dicom import dicom_export
from iortd.audit.dicom_handoff import (
    HandoffError,
    encapsulated_pdf,
    handoff_instances,
    instance_bytes,
    read_instance,
)
from iortd.plan.store import HandOff, save_hand_off

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "golden-log"
DELIVERY = "or-5-20261206T035245018711Z"
PATIENT_ID = "MRN-7781234"
PLAN_UID = "1.2.826.0.1.3680043.8.498.77812340001"


def _digests() -> dict[str, str]:
    out = {}
    for line in (FIXTURE / "outputs.sha256").read_text("utf-8").splitlines():
        if line and not line.startswith("#"):
            digest, name = line.split()
            out[name] = digest
    return out


def _pdf_of(ds: pydicom.Dataset) -> bytes:
    return bytes(ds.EncapsulatedDocument)[: int(ds.EncapsulatedDocumentLength)]


def test_the_record_and_the_pdf_are_the_exports_bytes() -> None:
    rec, rep = handoff_instances(
        FIXTURE / "log",
        DELIVERY,
        what=["record", "report"],
        store_dir=None,
        keyring=None,
        pubkey=FIXTURE / "or-9.pub",
    )
    golden = _digests()
    # iort-audit export --format dicom and iort-audit report FILE.pdf of the same log
    assert hashlib.sha256(instance_bytes(rec)).hexdigest() == golden["dicom.dcm"]
    assert hashlib.sha256(_pdf_of(rep)).hexdigest() == golden["report.pdf"]
    assert rec.SOPClassUID == RTBeamsTreatmentRecordStorage
    assert rep.SOPClassUID == EncapsulatedPDFStorage
    assert rep.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert len(rep.EncapsulatedDocument) % 2 == 0
    for kw in ("PatientID", "PatientName", "StudyInstanceUID", "StudyID"):
        assert rep[kw].value == rec[kw].value, kw
    assert rep.SeriesInstanceUID != rec.SeriesInstanceUID
    assert [s.ReferencedSOPInstanceUID for s in rep.SourceInstanceSequence] == [rec.SOPInstanceUID]
    # without --pubkey the report names "the key recorded in the log": other bytes, other
    # UID; the same inputs give the same instance (a resend is the same to the receiver)
    again = handoff_instances(
        FIXTURE / "log", DELIVERY, what=["record", "report"], store_dir=None, keyring=None
    )
    assert again[0].SOPInstanceUID == rec.SOPInstanceUID
    assert again[1].SOPInstanceUID != rep.SOPInstanceUID
    assert (
        again[1].SOPInstanceUID
        == encapsulated_pdf(again[0], _pdf_of(again[1]), DELIVERY).SOPInstanceUID
    )


def test_the_protected_store_is_in_the_objects_only(tmp_path: Path) -> None:
    store = tmp_path / "protected"
    save_hand_off(
        store, HandOff("T-RPT-0002", "P-RPT-0002", PATIENT_ID, PLAN_UID), "2026-12-06T03:00:00Z"
    )
    rec, rep = handoff_instances(
        FIXTURE / "log", DELIVERY, what=["record", "report"], store_dir=store, keyring=None
    )
    assert rec.PatientID == rep.PatientID == PATIENT_ID
    assert rec.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == PLAN_UID
    assert "PatientIdentityRemoved" not in rep
    assert PATIENT_ID.encode() not in _pdf_of(rep), "the PDF report itself stays pseudonymous"
    # the PDF and the record of the hand-off are other instances than the pseudonymous ones
    plain = handoff_instances(
        FIXTURE / "log", DELIVERY, what=["record"], store_dir=None, keyring=None
    )
    assert plain[0].SOPInstanceUID != rec.SOPInstanceUID
    # an unusable store is a usage error that names no stored value
    shutil.rmtree(store)
    with pytest.raises(HandoffError) as caught:
        handoff_instances(FIXTURE / "log", DELIVERY, what=["record"], store_dir=store, keyring=None)
    assert caught.value.usage
    assert PATIENT_ID not in str(caught.value)


def test_only_a_verified_log_is_handed_off(tmp_path: Path) -> None:
    log = tmp_path / "log"
    shutil.copytree(FIXTURE / "log", log)
    seg = sorted(log.glob("*.jsonl"))[0]
    seg.write_bytes(seg.read_bytes().replace(b'"dose_primary_gy":0.1', b'"dose_primary_gy":0.2', 1))
    with pytest.raises(HandoffError, match="the log is not intact") as caught:
        handoff_instances(log, DELIVERY, what=["record"], store_dir=None, keyring=None)
    assert not caught.value.usage, "a bad log is exit 1, not a usage error"


@pytest.mark.parametrize(
    ("what", "delivery", "message"),
    [
        ([], DELIVERY, "give one or both of record, report"),
        (["record", "record"], DELIVERY, "give one or both"),
        (["images"], DELIVERY, "give one or both"),
        (["record"], "or-5-nope", "no such delivery"),
    ],
)
def test_usage_errors(what: list[str], delivery: str, message: str) -> None:
    with pytest.raises(HandoffError, match=message) as caught:
        handoff_instances(FIXTURE / "log", delivery, what=what, store_dir=None, keyring=None)
    assert caught.value.usage


def test_a_signed_report_is_a_new_instance_naming_the_first_record(tmp_path: Path) -> None:
    log = interrupted_log()
    unsigned = read_instance(dicom_export(record(log)))
    log.entries.append(signed(len(log.entries)))
    signed_rec = read_instance(dicom_export(record(log)))
    pdf = b"%PDF-1.4 stand-in\n"
    first, second = (
        encapsulated_pdf(unsigned, pdf, "d"),
        encapsulated_pdf(signed_rec, pdf + b"signed", "d"),
    )
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.StudyInstanceUID == second.StudyInstanceUID
    assert [s.ReferencedSOPInstanceUID for s in second.SourceInstanceSequence] == [
        signed_rec.SOPInstanceUID,
        unsigned.SOPInstanceUID,
    ]
    assert first.SOPInstanceUID == encapsulated_pdf(unsigned, pdf, "d").SOPInstanceUID
    assert _pdf_of(first) == pdf
    assert first.EncapsulatedDocumentLength == len(pdf)
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    out = tmp_path / "report.dcm"
    out.write_bytes(instance_bytes(second))
    p = subprocess.run(
        ["dciodvfy", str(out)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (p.stdout + p.stderr).splitlines()
    assert lines[0] == "EncapsulatedPDF", lines
    assert [x for x in lines if x.startswith(("Error", "Warning"))] == []


def _amend(log: Any) -> None:
    """The console ended the selection after the monitor closed it: a correction appended
    to the delivery (auditlog: delivery_amended), so its last entry moves on."""
    summary = dict(next(e for e in log.entries if e["type"] == "delivery_terminated")["data"])
    summary = {**summary["summary"], "delivered_primary_gy": 1.01}
    log.add("delivery_amended", {"reason": "0.0100 Gy more after closing", "summary": summary})


def test_an_amendment_is_a_new_instance_in_the_same_study_naming_the_first() -> None:
    log = interrupted_log()
    first = read_instance(dicom_export(record(log)))
    # an entry of the delivery after its end that changes nothing the record says (an
    # alarm cleared once the delivery had ended): still the first record, byte for byte
    log.add("alarm_cleared", {"alarm": "door_open", "at": "2026-11-26T10:02:00.000000Z"})
    assert dicom_export(record(log)) == instance_bytes(first)
    _amend(log)
    amended = read_instance(dicom_export(record(log)))
    assert amended.SOPInstanceUID != first.SOPInstanceUID
    assert amended.StudyInstanceUID == first.StudyInstanceUID, "the hospital's same study"
    assert amended.SeriesInstanceUID == first.SeriesInstanceUID
    [ref] = amended.ReferencedTreatmentRecordSequence
    assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert amended.InstanceNumber == 2
    # and signed after the amendment: another instance, still naming the first
    log.entries.append(signed(len(log.entries)))
    both = read_instance(dicom_export(record(log)))
    assert both.SOPInstanceUID not in (first.SOPInstanceUID, amended.SOPInstanceUID)
    assert both.ReferencedTreatmentRecordSequence[0].ReferencedSOPInstanceUID == (
        first.SOPInstanceUID
    )
    assert both.InstanceNumber == 3
    # the same log gives the same instance
    assert read_instance(dicom_export(record(log))).SOPInstanceUID == both.SOPInstanceUID


def test_a_log_with_an_archive_is_verified_across_both(tmp_path: Path) -> None:
    """With retention the oldest segments are in the archive only, and the directory alone
    does not verify: the hand-off verifies both places as one log (verify --archive)."""
    archive = tmp_path / "archive"
    archive.mkdir()
    (seg,) = (FIXTURE / "log").glob("log-*.jsonl")
    rec = handoff_instances(
        FIXTURE / "log", DELIVERY, what=["record"], store_dir=None, keyring=None, archive=archive
    )
    assert rec[0].SOPClassUID == RTBeamsTreatmentRecordStorage
    # an archived copy that differs from the segment: the union is not intact
    (archive / seg.name).write_bytes(seg.read_bytes()[:-10] + b"x" * 10)
    with pytest.raises(HandoffError, match="differs from its archived copy") as caught:
        handoff_instances(
            FIXTURE / "log",
            DELIVERY,
            what=["record"],
            store_dir=None,
            keyring=None,
            archive=archive,
        )
    assert not caught.value.usage
    with pytest.raises(HandoffError) as caught:
        handoff_instances(
            FIXTURE / "log",
            DELIVERY,
            what=["record"],
            store_dir=None,
            keyring=None,
            archive=tmp_path / "nope",
        )
    assert caught.value.usage
