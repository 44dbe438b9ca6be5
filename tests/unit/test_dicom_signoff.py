"""A sign-off in the DICOM RT Beams Treatment Record (audit/dicom.py): the IOD has no
Approval module and DICOM signatures exclude Ed25519, so the sign-offs are stated in the
RT Series' Comments on the Performed Procedure Step, and a signed record is a new instance
that references the unsigned one (Referenced Treatment Record Sequence); dciodvfy stays
clean."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pydicom
import pytest
from handlog import DID, interrupted_log, record

from iortd.audit.dicom import dicom_export


def signed(seq: int, meaning: str = "approved", reason: str | None = None) -> dict[str, Any]:
    data = {
        "delivery_id": DID,
        "meaning": meaning,
        "reason": reason,
        "by": "phys-anna",
        "name": "A. Example, MPE",
        "signed_at": "2026-11-26T11:00:00.000000Z",
        "utc_offset_min": 60,
    }
    return {"seq": seq, "type": "delivery_signed", "data": data, "hash": f"{seq:064x}"}


def test_a_signed_record_states_the_sign_offs_and_references_the_unsigned_one(
    tmp_path: Path,
) -> None:
    rec = record(interrupted_log())
    unsigned = pydicom.dcmread(io.BytesIO(dicom_export(rec)))
    assert "CommentsOnThePerformedProcedureStep" not in unsigned
    assert "ReferencedTreatmentRecordSequence" not in unsigned
    rec.signoffs = [signed(500, "reviewed"), signed(501, "approved_with_deviation", "2 % low")]
    ds = pydicom.dcmread(io.BytesIO(dicom_export(rec)))
    text = ds.CommentsOnThePerformedProcedureStep
    assert "reviewed by A. Example, MPE (phys-anna) 2026-11-26T11:00:00Z" in text
    assert "approved with deviation (2 % low) by A. Example, MPE" in text
    assert "audit log seq 500" in text
    assert ds.SOPInstanceUID != unsigned.SOPInstanceUID
    assert ds.SeriesInstanceUID == unsigned.SeriesInstanceUID
    assert ds.InstanceNumber == 3
    [ref] = ds.ReferencedTreatmentRecordSequence
    assert ref.ReferencedSOPInstanceUID == unsigned.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == unsigned.SOPClassUID
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    out = tmp_path / "signed.dcm"
    out.write_bytes(dicom_export(rec))
    p = subprocess.run(
        ["dciodvfy", str(out)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (p.stdout + p.stderr).splitlines()
    assert lines[0] == "RTBeamsTreatmentRecord", lines
    assert [x for x in lines if x.startswith(("Error", "Warning"))] == []


def test_the_json_export_carries_the_sign_off_entries_whole() -> None:
    """Only when there are any: a delivery without a sign-off exports as before."""
    from iortd.audit.export import json_export  # noqa: PLC0415 - this test only

    rec = record(interrupted_log())
    assert b'"signoffs"' not in json_export(rec)
    rec.signoffs = [signed(500)]
    doc = orjson.loads(json_export(rec))
    assert doc["signoffs"] == [signed(500)]
