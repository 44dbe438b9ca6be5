"""The auditors' outputs of a real delivery in a room with an applicator reader (issue 16):
a log made by the real daemon reading ``iort-sim serve --devices`` (a console and a reader
and stand over Modbus TCP, production drivers; reportlogs.make_stand: a 3 mm bump past the
2 mm tolerance, the brakes released, engaged, the stand re-locked). ``iort-audit`` writes
the report (read back with poppler's pdftotext), the applicator CSV, the JSON and the DICOM
record (checked with dciodvfy); each is compared with the log, parsed here plainly."""

from __future__ import annotations

import asyncio
import csv
import io
import re
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pydicom
import pytest
from reportlogs import LogRun, make_stand, read_log

from iortd.audit import cli as audit_cli

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stand(tmp_path_factory: pytest.TempPathFactory) -> tuple[LogRun, list[dict[str, Any]]]:
    r = asyncio.run(make_stand(tmp_path_factory.mktemp("stand-log")))
    return r, [e for e in read_log(r.log_dir) if e.get("delivery_id") == r.delivery_id]


def export(r: LogRun, out: Path, *args: str) -> bytes:
    common = (str(r.log_dir), "--delivery", r.delivery_id, "--pubkey", str(r.pubkey))
    assert audit_cli.main([args[0], *common, *args[1:], "--out", str(out)]) == 0
    return out.read_bytes()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, check=False)


def test_the_report_shows_the_stand_events(
    stand: tuple[LogRun, list[dict[str, Any]]], tmp_path: Path
) -> None:
    r, mine = stand
    pdf, html = tmp_path / "r.pdf", tmp_path / "r.html"
    export(r, pdf, "report")
    page = " ".join(re.sub(r"<[^>]+>", " ", export(r, html, "report").decode()).split())
    p = run("pdftotext", "-layout", str(pdf), "-")
    assert p.returncode == 0, p.stderr
    text = " ".join(p.stdout.split())
    kinds = [e["type"] for e in mine]
    assert "applicator_relocked" in kinds, kinds
    wants = [
        "Applicator and stand",
        "Tolerances in force (config) displacement 2.00 mm, tilt 2.00°",
        "balloon 35.0 mm",
        "applicator displaced",
        "monitor interlock applicator (stand-1): ok -> tripped",
        "stand re-locked (stand-1)",
        "Applicator displacement against time",
    ]
    for want in wants:
        assert want in text, (want, text[-3000:])
        assert want.replace(">", "&gt;") in page, want


def test_the_csv_has_every_sample_and_the_json_its_block(
    stand: tuple[LogRun, list[dict[str, Any]]], tmp_path: Path
) -> None:
    r, mine = stand
    data = export(r, tmp_path / "a.csv", "export", "--format", "csv", "--table", "applicator")
    rows = list(csv.DictReader(io.StringIO(data.decode())))
    samples = [e for e in mine if e["type"] == "applicator_sample"]
    assert len(samples) > 10
    assert [int(x["seq"]) for x in rows] == [e["seq"] for e in samples]
    assert [x["hash"] for x in rows] == [e["hash"] for e in samples]
    peak = max(e["data"]["peak_displacement_mm"] or 0 for e in samples)
    assert peak > 2.9
    doc = orjson.loads(export(r, tmp_path / "d.json", "export", "--format", "json"))
    assert doc["applicator"]["peak_displacement_from_lock_mm"] == peak
    assert doc["applicator"]["tolerances"]["applicator_displacement_mm"] == 2.0


def test_the_dicom_record_names_the_readers_applicator_and_passes_dciodvfy(
    stand: tuple[LogRun, list[dict[str, Any]]], tmp_path: Path
) -> None:
    r, mine = stand
    [on] = [e["data"] for e in mine if e["type"] == "applicator_at_beam_on"]
    f = tmp_path / "record.dcm"
    ds = pydicom.dcmread(io.BytesIO(export(r, f, "export", "--format", "dicom")))
    for item in ds.TreatmentSessionBeamSequence:
        [a] = item.ApplicatorSequence
        assert a.ApplicatorID == on["applicator"]["serial"]
        assert a.ApplicatorType == "INTRAOPERATIVE"
        assert "applicator reader" in a.ApplicatorDescription
    p = run("dciodvfy", str(f))
    lines = (p.stdout + p.stderr).splitlines()
    assert lines[0] == "RTBeamsTreatmentRecord", lines
    assert [x for x in lines if x.startswith(("Error", "Warning"))] == []
