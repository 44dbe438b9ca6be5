"""The applicator reader's side in the auditors' outputs (issue 16): the record, the CSV
and JSON exports, the report's section. A log written by hand (handlog.py) with the
entries the daemon writes for a reader (daemon/entries.py, docs/audit-log.md)."""

from __future__ import annotations

import csv
import io
import re
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pydicom
from handlog import DID, Log, at, interrupted_log, record

from iortd.audit.applicator import applicator_side
from iortd.audit.dicom import dicom_export
from iortd.audit.export import APPLICATOR_COLUMNS, applicator_csv, events_csv, json_export
from iortd.audit.report.content import build_doc
from iortd.audit.report.html_page import html_report
from iortd.audit.report.model import Heading, KeyValues, Plot
from iortd.audit.report.pdf import pdf_report

SPH30 = {"type": "spherical", "diameter_mm": 30.0, "serial": "A-7"}


def _app_sample(t: float, disp: float, from_on: float, peak: float, tilt: float) -> dict[str, Any]:
    return {
        "device": "stand-1",
        "at": at(t),
        "device_mono_ns": int(t * 1e9),
        "state": "READY",
        "fault": None,
        "applicator": SPH30,
        "seated": "yes",
        "source_locked": "yes",
        "brakes_engaged": "yes",
        "uses_left": 12,
        "seat_counter": 1,
        "lock_counter": 1,
        "heartbeat": int(t),
        "displacement_mm": [disp, 0.0, 0.0],
        "displacement_magnitude_mm": disp,
        "tilt_deg": tilt,
        "displacement_from_beam_on_mm": from_on,
        "peak_displacement_mm": peak,
        "monitor_interlocks": {"applicator": "ok" if disp < 2 else "tripped"},
        "simulated": True,
    }


def applicator_log() -> Log:
    """interrupted_log with a reader: identity at beam-on, drift past 2 mm, the brakes
    released (the monitor's interlock trips), a re-lock, a gap of the reader only."""
    base = interrupted_log().entries
    cut = next(i for i, e in enumerate(base) if e["type"] == "delivery_terminated")
    log = Log()
    for e in base[:cut]:
        data = e["data"]
        if e["type"] == "config_loaded":
            data = {
                **data,
                "config": {
                    **data["config"],
                    "tolerances": {"applicator_displacement_mm": 2.0, "applicator_tilt_deg": 2.0},
                },
            }
        log.add(e["type"], data, e.get("delivery_id"))
    add = log.add
    add(
        "applicator_at_beam_on",
        {
            "device": "stand-1",
            "applicator": SPH30,
            "displacement_mm": 0.1,
            "tilt_deg": 0.2,
            "at": at(1),
        },
    )
    for t, disp in ((2, 0.1), (10, 1.0), (20, 2.5)):
        add("applicator_sample", _app_sample(t, disp, disp - 0.1, disp, 0.3))
    add(
        "alarm_raised",
        {
            "code": "applicator_displaced",
            "key": "applicator_displaced",
            "severity": "high",
            "message": "applicator displaced 2.40 mm from beam-on (tolerance 2.0 mm)",
            "at": at(20),
        },
    )
    add(
        "monitor_interlock_changed",
        {
            "device": "stand-1",
            "interlock": "applicator",
            "from": "ok",
            "to": "tripped",
            "cause": "brakes released",
            "at": at(21),
        },
    )
    add(
        "applicator_relocked",
        {
            "device": "stand-1",
            "from_counter": 1,
            "to_counter": 2,
            "displacement_before_mm": 2.5,
            "at": at(22),
        },
    )
    gap = {"cause": "reader link lost", "start": at(30), "end": None, "duration_s": None}
    add("device_gap_started", {"device": "stand-1", **gap, "at": at(30)})
    add(
        "device_gap_ended",
        {"device": "stand-1", **gap, "end": at(33), "duration_s": 3.0, "at": at(33)},
    )
    add("applicator_sample", _app_sample(34, 0.2, 0.1, 2.5, 0.4))
    for e in base[cut:]:
        log.add(e["type"], e["data"], e.get("delivery_id"))
    return log


def test_a_log_without_a_reader_has_no_applicator_side_and_exports_as_before() -> None:
    rec = record(interrupted_log())
    assert applicator_side(rec) is None
    assert rec.applicator_samples == []
    assert b'"applicator":{' not in json_export(rec).replace(b" ", b"").split(b'"context"')[0]
    assert "applicator" not in orjson.loads(json_export(rec))
    assert applicator_csv(rec).count(b"\r\n") == 1  # the header only


def test_the_record_holds_the_readers_identity_peaks_events_and_gaps() -> None:
    rec = record(applicator_log())
    side = applicator_side(rec)
    assert side is not None
    assert side.device == "stand-1"
    assert side.identity == SPH30
    assert (side.displacement_tolerance_mm, side.tilt_tolerance_deg) == (2.0, 2.0)
    assert side.peak_from_lock_mm == 2.5
    assert side.peak_from_beam_on_mm == 2.4
    assert side.peak_tilt_deg == 0.4
    assert [e["type"] for e in side.events] == [
        "applicator_at_beam_on",
        "alarm_raised",
        "monitor_interlock_changed",
        "applicator_relocked",
        "device_gap_started",
        "device_gap_ended",
    ]
    assert side.gaps == [(at(30), at(33), "reader link lost")]
    assert side.samples == 4
    # the reader's samples are not events (the events table and CSV stay readable) but
    # are entries of the delivery (the JSON export holds every one)
    assert all(e["type"] != "applicator_sample" for e in rec.events)
    assert sum(e["type"] == "applicator_sample" for e in rec.entries) == 4


def test_the_applicator_csv_has_every_sample_in_documented_columns() -> None:
    rec = record(applicator_log())
    rows = list(csv.DictReader(io.StringIO(applicator_csv(rec).decode())))
    assert len(rows) == 4
    assert list(rows[0]) == [c for c, _ in APPLICATOR_COLUMNS]
    third = rows[2]
    assert third["displacement_x_mm"] == "2.5"
    assert third["displacement_from_beam_on_mm"] == "2.4"
    assert third["applicator_serial"] == "A-7"
    assert third["monitor_interlocks_not_ok"] == "applicator=tripped"
    assert [r["seq"] for r in rows] == [str(e["seq"]) for e in rec.applicator_samples]
    assert applicator_csv(rec) == applicator_csv(record(applicator_log()))


def test_the_events_csv_and_json_describe_the_stand_events() -> None:
    rec = record(applicator_log())
    text = events_csv(rec).decode()
    assert "monitor interlock applicator (stand-1): ok -> tripped: brakes released" in text
    assert "stand re-locked (stand-1): lock counter 1 -> 2" in text
    assert "gap of stand-1 only ended: reader link lost, 3.0 s" in text
    assert "applicator at beam-on (stand-1): spherical 30.0 mm s/n A-7" in text
    block = orjson.loads(json_export(rec))["applicator"]
    assert block["identity_at_beam_on"] == SPH30
    assert block["peak_displacement_from_beam_on_mm"] == 2.4
    assert block["reader_gaps"] == [{"start": at(30), "end": at(33), "cause": "reader link lost"}]
    assert len(block["events"]) == 6
    assert DID


def _pdf_text(pdf: bytes, tmp: Path) -> str:
    f = tmp / "r.pdf"
    f.write_bytes(pdf)
    p = subprocess.run(
        ["pdftotext", "-layout", str(f), "-"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    return " ".join(p.stdout.split())


def test_the_report_shows_the_applicator_and_every_stand_event(tmp_path: Path) -> None:
    rec = record(applicator_log())
    doc = build_doc(rec)
    kv = {k: v for b in doc.blocks if isinstance(b, KeyValues) for k, v in b.rows}
    assert kv["Applicator at beam-on (reader)"] == "spherical 30.0 mm, s/n A-7"
    assert kv["Tolerances in force (config)"] == "displacement 2.00 mm, tilt 2.00°"
    assert kv["Peak displacement from beam-on"] == "2.40 mm (beyond tolerance)"
    assert kv["Peak displacement from the stand's lock"] == "2.50 mm (beyond tolerance)"
    assert kv["Reader gaps"].endswith("reader link lost")
    assert any(isinstance(b, Plot) and b.kind == "displacement" for b in doc.blocks)
    pdf = pdf_report(rec)
    assert pdf == pdf_report(record(applicator_log()))  # deterministic
    html = html_report(rec)
    assert html == html_report(record(applicator_log()))
    text = _pdf_text(pdf, tmp_path)
    page = " ".join(re.sub(r"<[^>]+>", " ", html.decode()).split())
    for want in (
        "Applicator and stand",
        "monitor interlock applicator (stand-1): ok -> tripped: brakes released",
        "stand re-locked (stand-1): lock counter 1 -> 2",
        "gap of stand-1 only ended: reader link lost",
        "applicator displaced 2.40 mm",
        "Applicator displacement against time",
    ):
        assert want in text, want
        assert want.replace(">", "&gt;") in page, want


def test_a_report_without_a_reader_has_no_applicator_section() -> None:
    doc = build_doc(record(interrupted_log()))
    assert not any(isinstance(b, Heading) and "Applicator" in b.text for b in doc.blocks)
    assert all(not isinstance(b, Plot) or b.kind == "dose" for b in doc.blocks)


def _reader_log(serial: str) -> Log:
    """applicator_log with the reader reading a given serial at beam-on."""
    log = applicator_log()
    for e in log.entries:
        if e["type"] == "applicator_at_beam_on":
            e["data"] = {**e["data"], "applicator": {**SPH30, "serial": serial}}
    return log


def test_the_dicom_applicator_is_the_readers_at_beam_on_and_passes_dciodvfy(
    tmp_path: Path,
) -> None:
    ds = pydicom.dcmread(io.BytesIO(dicom_export(record(_reader_log("R-9")))))
    for item in ds.TreatmentSessionBeamSequence:
        [a] = item.ApplicatorSequence
        assert a.ApplicatorID == "R-9"
        assert a.ApplicatorType == "INTRAOPERATIVE"
        assert a.ApplicatorDescription == ("spherical 30.0 mm, applicator reader, console s/n A-7")
    f = tmp_path / "record.dcm"
    f.write_bytes(dicom_export(record(applicator_log())))
    p = subprocess.run(
        ["dciodvfy", str(f)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (p.stdout + p.stderr).splitlines()
    assert lines[0] == "RTBeamsTreatmentRecord", lines
    assert [x for x in lines if x.startswith(("Error", "Warning"))] == []
    # without a reader: the console's, as before
    ds = pydicom.dcmread(io.BytesIO(dicom_export(record(interrupted_log()))))
    [a] = ds.TreatmentSessionBeamSequence[0].ApplicatorSequence
    assert (a.ApplicatorID, a.ApplicatorDescription) == ("A-7", "spherical 30.0 mm")


def test_malformed_reader_entries_never_break_the_outputs() -> None:
    """What an unverified log (--allow-unverified) or a confused reader can put there:
    identities that are not objects, vectors of the wrong length, numbers that are text."""
    log = applicator_log()
    cut = next(i for i, e in enumerate(log.entries) if e["type"] == "delivery_terminated")
    bad: list[Any] = [
        {"applicator": "SPH30", "displacement_mm": {"x": 1}, "tilt_deg": "level"},
        {"applicator": {"serial": None}, "displacement_mm": [1, 2], "at": 5},
        {"peak_displacement_mm": True, "monitor_interlocks": "tripped", "device": 7},
    ]
    for n, data in enumerate(bad):
        e = dict(log.entries[cut - 1], seq=cut - 1, data=data, type="applicator_sample")
        log.entries.insert(cut - 1, e)
        log.entries.insert(cut - 1, dict(e, type="applicator_relocked", hash=f"{n}"))
    rec = record(log)
    side = applicator_side(rec)
    assert side is not None
    assert side.peak_from_lock_mm == 2.5  # a boolean is not a displacement
    assert applicator_csv(rec).count(b"\r\n") == 1 + 4 + len(bad)
    assert b"applicator" in json_export(rec)
    build_doc(rec)
    pdf_report(rec)
    html_report(rec)
    dicom_export(rec)


def test_a_simulated_reader_marks_the_delivery_simulated() -> None:
    """A real console with a simulated reader: the report still says SIMULATED."""
    log = applicator_log()
    for e in log.entries:
        if e["type"] == "sample":
            e["data"] = {**e["data"], "simulated": False}
    assert record(log).simulated
    for e in log.entries:
        if e["type"] == "applicator_sample":
            e["data"] = {**e["data"], "simulated": False}
    assert not record(log).simulated
