"""Reports and exports of real deliveries, checked with independent tools.

Four real logs are made once for the module by the real daemon (reportlogs.py): a
normal delivery, an interrupted and resumed one, one ended by an interlock, one with a
monitoring gap. For each, ``iort-audit report`` and ``export`` write every output; the
PDF is read back with poppler (pdftotext for its text, pdftoppm for its pages, kept under
test-artifacts/reports/), the DICOM file with Debian's dciodvfy (dicom3tools) and with
pydicom, and the figures are compared with what the log holds, parsed here plainly.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import itertools
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pydicom
import pytest
from reportlogs import KINDS, LogRun, make_all, read_log

from iortd.audit import cli as audit_cli

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "reports"
# dciodvfy warnings that are allowed, each with its reason. None are left today: the
# record was made to pass without errors or warnings (docs/reports.md).
ALLOWED_DCIODVFY_WARNINGS: tuple[str, ...] = ()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, check=False)


@dataclass(frozen=True)
class Outputs:
    run: LogRun
    entries: list[dict[str, Any]]  # the whole log, parsed here
    pdf: Path
    html: Path
    samples_csv: Path
    events_csv: Path
    json: Path
    dicom: Path

    def delivery_entries(self) -> list[dict[str, Any]]:
        return [e for e in self.entries if e.get("delivery_id") == self.run.delivery_id]

    def terminated(self) -> dict[str, Any]:
        [t] = [e for e in self.delivery_entries() if e["type"] == "delivery_terminated"]
        return t

    def checkpoint_after(self) -> dict[str, Any]:
        last = self.delivery_entries()[-1]["seq"]
        return next(e for e in self.entries if e["type"] == "checkpoint" and e["seq"] > last)


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LogRun]:
    return asyncio.run(make_all(tmp_path_factory.mktemp("report-logs")))


def cli(*args: str | Path) -> int:
    """``iort-audit`` in this process (one import of matplotlib for the whole module)."""
    return audit_cli.main([str(a) for a in args])


@pytest.fixture(scope="module")
def outputs(
    logs: dict[str, LogRun], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Outputs]:
    out: dict[str, Outputs] = {}
    base = tmp_path_factory.mktemp("report-out")
    for kind, r in logs.items():
        d = base / kind
        d.mkdir()
        common = (r.log_dir, "--delivery", r.delivery_id, "--pubkey", r.pubkey)
        o = Outputs(
            r,
            read_log(r.log_dir),
            d / "report.pdf",
            d / "report.html",
            d / "samples.csv",
            d / "events.csv",
            d / "delivery.json",
            d / "record.dcm",
        )
        assert cli("report", *common, "--out", o.pdf) == 0
        assert cli("report", *common, "--out", o.html) == 0
        assert cli("export", *common, "--format", "csv", "--out", o.samples_csv) == 0
        assert (
            cli("export", *common, "--format", "csv", "--table", "events", "--out", o.events_csv)
            == 0
        )
        assert cli("export", *common, "--format", "json", "--out", o.json) == 0
        assert cli("export", *common, "--format", "dicom", "--out", o.dicom) == 0
        out[kind] = o
    return out


def pdf_text(pdf: Path, page: int | None = None) -> str:
    pages = ["-f", str(page), "-l", str(page)] if page else []
    p = run("pdftotext", "-layout", *pages, str(pdf), "-")
    assert p.returncode == 0, p.stderr
    return p.stdout


def pdf_pages(pdf: Path) -> int:
    p = run("pdfinfo", str(pdf))
    m = re.search(r"^Pages:\s+(\d+)$", p.stdout, re.MULTILINE)
    assert m is not None, p.stdout
    return int(m.group(1))


def gy(x: float) -> str:
    return f"{x:.3f} Gy"


# ---- the PDF and HTML report ----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_the_pdf_text_holds_the_figures_the_log_holds(
    outputs: dict[str, Outputs], kind: str
) -> None:
    o = outputs[kind]
    t = o.terminated()
    s = t["data"]["summary"]
    text = pdf_text(o.pdf)
    flat = " ".join(text.split())
    assert f"Termination: {t['data']['status']} ({t['data']['reason']})" in flat
    assert f"Dose, primary channel {gy(s['preset_gy'])} {gy(s['delivered_primary_gy'])}" in flat
    assert f"Dose, secondary channel {gy(s['preset_gy'])} {gy(s['delivered_secondary_gy'])}" in flat
    assert f"({s['beam_on_s']:.1f} s)" in flat, "delivered beam-on time"
    plan = o.entries[2]["data"]["config"]["plan"]
    assert plan["treatment_id"] in flat
    assert plan["plan_id"] in flat
    last = o.delivery_entries()[-1]
    cp = o.checkpoint_after()
    head = o.entries[-1]
    assert f"last entry hash {last['hash']}" in text, "the footer names the last entry's hash"
    assert f"log head seq {head['seq']} hash {head['hash']}" in text
    assert f"checkpoint seq {cp['seq']}" in text
    assert cp["data"]["head"] in flat, "the covering checkpoint's head hash"
    assert f"INTACT: {len(o.entries)} entries" in flat
    assert "Signatures checked against --pubkey or-9" in flat
    ident = next(e for e in o.entries if e["type"] == "device_identified")["data"]
    assert f"s/n {ident['serial']}" in flat
    assert o.entries[2]["data"]["sha256"] in flat, "the configuration hash"
    n_intr = len(s["interruptions"])
    n_gaps = len(s["gaps"])
    assert f"Interruptions {n_intr if n_intr else 'none'}" in flat
    assert f"Monitoring gaps {n_gaps if n_gaps else 'none'}" in flat


def test_the_interrupted_delivery_shows_its_interruption_and_tiling(
    outputs: dict[str, Outputs],
) -> None:
    o = outputs["interrupted"]
    s = o.terminated()["data"]["summary"]
    flat = " ".join(pdf_text(o.pdf).split())
    assert len(s["segments"]) == 2
    first, second = s["segments"]
    assert first["end_gy"] == second["start_gy"], "the log's segments tile"
    assert f"{first['end_gy']:.4f} Gy" in flat
    assert "interruption: interlock door" in flat
    assert "IRRADIATING -> INTERRUPTED" in flat
    assert "INTERRUPTED -> IRRADIATING: resumed" in flat


def test_the_interlock_delivery_shows_the_interlock_and_machine_termination(
    outputs: dict[str, Outputs],
) -> None:
    o = outputs["interlock"]
    flat = " ".join(pdf_text(o.pdf).split())
    assert "Termination status (3008,002A) MACHINE" in flat
    assert "interlock applicator: ok -> tripped" in flat
    assert re.search(r"alarm (HIGH|MEDIUM) raised: interlock applicator tripped", flat), (
        "the interlock's alarm is in the report"
    )


def test_the_gap_delivery_shows_the_monitoring_gap(outputs: dict[str, Outputs]) -> None:
    o = outputs["gap"]
    [gap] = o.terminated()["data"]["summary"]["gaps"]
    flat = " ".join(pdf_text(o.pdf).split())
    assert "monitoring gap started" in flat
    assert "monitoring gap ended" in flat
    assert f"gap {gap['start'][:10]} {gap['start'][11:23]} UTC" in flat


@pytest.mark.parametrize("kind", KINDS)
def test_the_pdf_renders_to_png_pages(outputs: dict[str, Outputs], kind: str) -> None:
    o = outputs[kind]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    prefix = ARTIFACTS / kind
    for old in ARTIFACTS.glob(f"{kind}-*.png"):
        old.unlink()
    p = run("pdftoppm", "-r", "60", "-png", str(o.pdf), str(prefix))
    assert p.returncode == 0, p.stderr
    pngs = sorted(ARTIFACTS.glob(f"{kind}-*.png"))
    assert len(pngs) == pdf_pages(o.pdf) >= 2
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(b"\x89PNG"), png
        assert len(data) > 10_000, png


@pytest.mark.parametrize("kind", KINDS)
def test_every_page_has_the_reverification_footer(outputs: dict[str, Outputs], kind: str) -> None:
    o = outputs[kind]
    origin = o.entries[0]["data"]["origin"]
    n = pdf_pages(o.pdf)
    for page in range(1, n + 1):
        text = pdf_text(o.pdf, page)
        assert f"Log {origin}" in text, page
        assert f"page {page} of {n}" in text


def test_the_html_report_says_the_same(outputs: dict[str, Outputs]) -> None:
    o = outputs["interrupted"]
    s = o.terminated()["data"]["summary"]
    page = o.html.read_text("utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "<svg" in page, "the plot is inline"
    assert gy(s["delivered_primary_gy"]) in page
    assert o.delivery_entries()[-1]["hash"] in page
    assert "NOT VERIFIED" not in page


# ---- CSV and JSON ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_the_samples_csv_is_every_sample_of_the_delivery(
    outputs: dict[str, Outputs], kind: str
) -> None:
    o = outputs[kind]
    rows = list(csv.DictReader(io.StringIO(o.samples_csv.read_text("utf-8"))))
    samples = [e for e in o.delivery_entries() if e["type"] == "sample"]
    assert [int(r["seq"]) for r in rows] == [e["seq"] for e in samples]
    for r, e in zip(rows, samples, strict=True):
        assert r["hash"] == e["hash"]
        assert float(r["dose_primary_gy"]) == e["data"]["dose_primary_gy"]
        assert r["state"] == e["data"]["state"]
    s = o.terminated()["data"]["summary"]
    assert float(rows[-1]["dose_primary_gy"]) == s["delivered_primary_gy"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_events_csv_is_every_event_of_the_delivery(
    outputs: dict[str, Outputs], kind: str
) -> None:
    o = outputs[kind]
    rows = list(csv.DictReader(io.StringIO(o.events_csv.read_text("utf-8"))))
    events = [e for e in o.delivery_entries() if e["type"] != "sample"]
    assert [(int(r["seq"]), r["type"]) for r in rows] == [(e["seq"], e["type"]) for e in events]
    assert [orjson.loads(r["data"]) for r in rows] == [e["data"] for e in events]


@pytest.mark.parametrize("kind", KINDS)
def test_the_json_export_holds_the_entries_verbatim(outputs: dict[str, Outputs], kind: str) -> None:
    o = outputs[kind]
    doc = orjson.loads(o.json.read_bytes())
    assert doc["delivery_id"] == o.run.delivery_id
    assert doc["verification"]["intact"] is True
    assert doc["entries"] == o.delivery_entries()
    for e in doc["entries"]:  # each re-hashes by the published rule (docs/audit-log.md)
        body = {k: v for k, v in e.items() if k != "hash"}
        digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
        assert digest == e["hash"]
    assert doc["covering_checkpoint"]["seq"] == o.checkpoint_after()["seq"]
    assert doc["delivery"]["status"] == o.terminated()["data"]["status"]


# ---- DICOM ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_the_dicom_record_passes_dciodvfy(outputs: dict[str, Outputs], kind: str) -> None:
    p = run("dciodvfy", str(outputs[kind].dicom))
    lines = (p.stdout + p.stderr).splitlines()
    assert lines[0] == "RTBeamsTreatmentRecord", lines
    errors = [x for x in lines if x.startswith("Error")]
    assert errors == []
    warnings = [x for x in lines if x.startswith("Warning")]
    assert [w for w in warnings if not w.startswith(ALLOWED_DCIODVFY_WARNINGS or ("\0",))] == []


@pytest.mark.parametrize("kind", KINDS)
def test_the_dicom_record_reads_back_with_the_logs_values(
    outputs: dict[str, Outputs], kind: str
) -> None:
    o = outputs[kind]
    ds = pydicom.dcmread(o.dicom)
    t = o.terminated()["data"]
    s = t["summary"]
    plan = o.entries[2]["data"]["config"]["plan"]
    ident = next(e for e in o.entries if e["type"] == "device_identified")["data"]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.4"
    assert ds.PatientID == plan["treatment_id"]
    assert ds.PatientName.family_name == plan["treatment_id"]
    assert ds.StudyID == plan["plan_id"]
    [machine] = ds.TreatmentMachineSequence
    assert machine.DeviceSerialNumber == ident["serial"]
    assert machine.ManufacturerModelName == ident["model"]
    items = list(ds.TreatmentSessionBeamSequence)
    assert len(items) == len(s["segments"])
    assert items[-1].TreatmentTerminationStatus == t["status"]
    assert [i.TreatmentDeliveryType for i in items] == ["TREATMENT"] + ["CONTINUATION"] * (
        len(items) - 1
    )
    for i in items:
        assert float(i.SpecifiedPrimaryMeterset) == pytest.approx(s["preset_gy"], abs=1e-6)
        assert i.ApplicatorSequence[0].ApplicatorID == s["applicator"]["serial"]
        assert i.ApplicatorSequence[0].ApplicatorType == "INTRAOPERATIVE"
        assert float(i.SpecifiedTreatmentTime) == pytest.approx(s["planned_time_s"], abs=1e-6)
    delivered = sum(float(i.DeliveredPrimaryMeterset) for i in items)
    assert delivered == pytest.approx(s["delivered_primary_gy"], abs=1e-6 * len(items))
    secondary = sum(float(i.DeliveredSecondaryMeterset) for i in items)
    assert secondary == pytest.approx(s["delivered_secondary_gy"], abs=1e-6 * len(items))
    beam = sum(float(i.DeliveredTreatmentTime) for i in items)
    assert beam == pytest.approx(s["beam_on_s"], abs=1e-6 * len(items))
    # The tiling rule (PS3.3 C.8.8.21.2.2): each item's control points hold where its
    # delivery started and ended; the next item starts where the last one ended.
    for seg, item in zip(s["segments"], items, strict=True):
        cp0, cp1 = item.ControlPointDeliverySequence
        assert float(cp0.DeliveredMeterset) == pytest.approx(seg["start_gy"], abs=1e-6)
        assert float(cp1.DeliveredMeterset) == pytest.approx(seg["end_gy"], abs=1e-6)
    for a, b in itertools.pairwise(items):
        end = a.ControlPointDeliverySequence[1].DeliveredMeterset
        assert b.ControlPointDeliverySequence[0].DeliveredMeterset == end
    [p, sec] = ds.MeasuredDoseReferenceSequence
    assert float(p.MeasuredDoseValue) == pytest.approx(s["delivered_primary_gy"], abs=1e-6)
    assert float(sec.MeasuredDoseValue) == pytest.approx(s["delivered_secondary_gy"], abs=1e-6)


# ---- determinism ----------------------------------------------------------------------------


def test_the_same_log_gives_byte_identical_outputs(
    outputs: dict[str, Outputs], tmp_path: Path
) -> None:
    o = outputs["interrupted"]
    r = o.run
    common = (r.log_dir, "--delivery", r.delivery_id, "--pubkey", r.pubkey)
    again = {
        "csv": (o.samples_csv, ("--format", "csv")),
        "events": (o.events_csv, ("--format", "csv", "--table", "events")),
        "json": (o.json, ("--format", "json")),
        "dcm": (o.dicom, ("--format", "dicom")),
    }
    for name, (first, args) in again.items():
        out = tmp_path / f"again-{name}{first.suffix}"
        assert cli("export", *common, *args, "--out", out) == 0
        assert out.read_bytes() == first.read_bytes(), name
    # The PDF and HTML, from a separate process: nothing depends on process state.
    for first in (o.pdf, o.html):
        out = tmp_path / f"again{first.suffix}"
        p = run(str(BIN / "iort-audit"), "report", *map(str, common), "--out", str(out))
        assert p.returncode == 0, p.stderr
        assert out.read_bytes() == first.read_bytes(), first.name


# ---- refusals -------------------------------------------------------------------------------


@pytest.fixture
def tampered(logs: dict[str, LogRun], tmp_path: Path) -> tuple[LogRun, Path, int, int]:
    """A copy of the normal log with one delivery sample's dose changed: (run, log, line,
    seq) of the altered entry."""
    r = logs["normal"]
    log = tmp_path / "log"
    shutil.copytree(r.log_dir, log)
    [seg] = sorted(log.glob("log-*.jsonl"))
    lines = seg.read_bytes().splitlines(keepends=True)
    entries = [orjson.loads(x) for x in lines]
    n = next(
        i
        for i, e in enumerate(entries)
        if e["type"] == "sample" and e.get("delivery_id") == r.delivery_id and i > 40
    )
    dose = entries[n]["data"]["dose_primary_gy"]
    lines[n] = lines[n].replace(
        f'"dose_primary_gy":{orjson.dumps(dose).decode()}'.encode(),
        f'"dose_primary_gy":{orjson.dumps(round(dose + 0.5, 6)).decode()}'.encode(),
    )
    seg.write_bytes(b"".join(lines))
    return r, log, n + 1, int(entries[n]["seq"])


def test_a_report_of_a_tampered_log_exits_1_naming_where_it_breaks(
    tampered: tuple[LogRun, Path, int, int], tmp_path: Path
) -> None:
    r, log, line, seq = tampered
    out = tmp_path / "report.pdf"
    p = run(
        str(BIN / "iort-audit"),
        *("report", str(log), "--delivery", r.delivery_id, "--out", str(out)),
    )
    assert p.returncode == 1, p.stdout + p.stderr
    [seg] = sorted(log.glob("log-*.jsonl"))
    assert f"NOT INTACT: {seg}:{line} (seq {seq}): hash does not match" in p.stdout
    assert "nothing written" in p.stderr
    assert "Traceback" not in p.stderr
    assert not out.exists()
    assert list(tmp_path.glob(".*.tmp")) == [], "no temporary file is left"
    for fmt, name in (("dicom", "x.dcm"), ("csv", "x.csv"), ("json", "x.json")):
        p = run(
            str(BIN / "iort-audit"),
            *("export", str(log), "--delivery", r.delivery_id, "--format", fmt),
            *("--out", str(tmp_path / name)),
        )
        assert p.returncode == 1, fmt
        assert not (tmp_path / name).exists()


def test_allow_unverified_stamps_every_page(
    tampered: tuple[LogRun, Path, int, int], tmp_path: Path
) -> None:
    r, log, _, seq = tampered
    out = tmp_path / "report.pdf"
    p = run(
        str(BIN / "iort-audit"),
        *("report", str(log), "--delivery", r.delivery_id, "--out", str(out)),
        "--allow-unverified",
    )
    assert p.returncode == 1, "the log is still not intact"
    assert "NOT VERIFIED" in p.stderr
    n = pdf_pages(out)
    assert n >= 2
    for page in range(1, n + 1):
        text = pdf_text(out, page)
        assert "NOT VERIFIED" in text, f"page {page} is not stamped"
        assert f"(seq {seq})" in " ".join(text.split()), f"page {page} does not say where"
    html_out = tmp_path / "report.html"
    assert (
        cli("report", log, "--delivery", r.delivery_id, "--out", html_out, "--allow-unverified")
        == 1
    )
    assert html_out.read_text("utf-8").count("NOT VERIFIED") >= 2
    doc = tmp_path / "d.json"
    common = (log, "--delivery", r.delivery_id, "--allow-unverified")
    assert cli("export", *common, "--format", "json", "--out", doc) == 1
    assert orjson.loads(doc.read_bytes())["verification"]["intact"] is False


def test_usage_errors_exit_2_with_one_line_naming_the_problem(
    logs: dict[str, LogRun], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r = logs["normal"]
    cases = [
        (
            ("report", r.log_dir, "--delivery", "or-9-nope", "--out", tmp_path / "a.pdf"),
            "--delivery or-9-nope: no such delivery",
        ),
        (("report", r.log_dir, "--delivery", r.delivery_id, "--out", tmp_path / "a.txt"), "--out"),
        (
            ("report", r.log_dir, "--delivery", r.delivery_id, "--out", tmp_path / "no" / "a.pdf"),
            "does not exist",
        ),
        (
            (
                "export",
                r.log_dir,
                "--delivery",
                r.delivery_id,
                "--format",
                "dicom",
                "--out",
                tmp_path / "a.json",
            ),
            ".dcm",
        ),
        (
            (
                "export",
                r.log_dir,
                "--delivery",
                r.delivery_id,
                "--format",
                "dicom",
                "--out",
                tmp_path / "a.dcm",
                "--allow-unverified",
            ),
            "--allow-unverified",
        ),
        (
            (
                "export",
                r.log_dir,
                "--delivery",
                r.delivery_id,
                "--format",
                "json",
                "--table",
                "events",
                "--out",
                tmp_path / "a.json",
            ),
            "--table",
        ),
        (
            (
                "report",
                tmp_path / "missing",
                "--delivery",
                r.delivery_id,
                "--out",
                tmp_path / "a.pdf",
            ),
            "no such file",
        ),
    ]
    for args, says in cases:
        assert cli(*args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, (args, err)
        assert says in err[0], (args, err)
    assert "iort-audit deliveries" in cli_err(r, tmp_path, capsys)
    assert list(tmp_path.iterdir()) == []


def cli_err(r: LogRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    cli("report", r.log_dir, "--delivery", "or-9-nope", "--out", tmp_path / "a.pdf")
    return capsys.readouterr().err


def test_an_unwritable_place_is_a_usage_error_and_leaves_nothing(
    logs: dict[str, LogRun], capsys: pytest.CaptureFixture[str]
) -> None:
    """/proc takes no new files, not even from root (the tests run as root in CI)."""
    r = logs["normal"]
    out = Path("/proc/iortd-report-test.pdf")
    assert cli("report", r.log_dir, "--delivery", r.delivery_id, "--out", out) == 2
    [err] = capsys.readouterr().err.strip().splitlines()
    assert err.startswith(f"iort-audit: --out {out}: ")
    assert not out.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_a_proof_bundle_of_each_real_delivery_verifies_offline(
    logs: dict[str, LogRun], kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """iort-audit prove / verify-bundle (issue 20, item 2) on the daemon's own logs: the
    bundle, copied away from the log, verifies with the public key only, and names the
    entry when one of its entries is changed (audit/bundle.py; tests/unit/test_audit_bundle.py
    tries every other tampering)."""
    r = logs[kind]
    out = tmp_path / "bundle.json"
    assert (
        cli("prove", r.log_dir, "--delivery", r.delivery_id, "--pubkey", r.pubkey, "--out", out)
        == 0
    )
    capsys.readouterr()
    assert cli("verify-bundle", out, "--pubkey", r.pubkey) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"VERIFIED: delivery {r.delivery_id}, entries seq "), said
    b = orjson.loads(out.read_bytes())
    mine = [e for e in read_log(r.log_dir) if e.get("delivery_id") == r.delivery_id]
    assert (b["first_seq"], b["last_seq"]) == (mine[0]["seq"], mine[-1]["seq"])
    i = len(b["entries"]) // 2
    b["entries"][i] = b["entries"][i].replace('"ts":"2', '"ts":"3', 1)
    out.write_bytes(orjson.dumps(b))
    assert cli("verify-bundle", out, "--pubkey", r.pubkey) == 1
    assert f"entry seq {b['start'] + i}" in capsys.readouterr().out
