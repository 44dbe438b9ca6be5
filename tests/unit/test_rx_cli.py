"""``iort-audit`` over real logs with checks against a prescription (issue 18, item 3):
written by the audit-log writer (rxlog.py), verified, reported and exported by the command,
the DICOM record checked by Debian's dciodvfy for each outcome and for a delivery never
checked; ``--keyring`` prints the physicist's name; ``--store`` puts the real Patient ID and
the plan reference in the DICOM file and nowhere else."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pydicom
import pytest
from handlog import DID
from rxlog import checked_log, verification, write_real_log

from iortd.audit import cli
from iortd.auditlog.note import generate_keypair
from iortd.plan.store import HandOff, save_hand_off

OK = verification()
BAD = verification("NOT_VERIFIED", failed=("dose",), preset_gy=1.2)
OVR = verification("VERIFIED_OVR", "override", overridden=("dose", "expired"), preset_gy=1.2)
LOGS = {"VERIFIED": (OK,), "NOT_VERIFIED": (BAD,), "VERIFIED_OVR": (BAD, OVR), "": ()}

# dicom3tools 2022-06-18 (Debian's dciodvfy) lists the enumerated values of Treatment
# Verification Status (3008,002C) as VERIFED / VERIFIED_OVR / NOT_VERIFED: a misspelling in
# its module table. PS3.3 C.8.8.21 and PS3.4 DD.3.2.2.4 define VERIFIED, VERIFIED_OVR and
# NOT_VERIFIED, which the record keeps; these two messages, and only they, are allowed.
ALLOWED_DCIODVFY = {
    "VERIFIED": "Error - Unrecognized enumerated value <VERIFIED> for value 1 of attribute "
    "<Treatment Verification Status>",
    "NOT_VERIFIED": "Error - Unrecognized enumerated value <NOT_VERIFIED> for value 1 of "
    "attribute <Treatment Verification Status>",
}
PATIENT_ID = "MRN-778812"  # what a hospital's id looks like: never in a log nor on stdout
PLAN_UID = "1.2.826.0.1.3680043.8.498.42"


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    base = tmp_path_factory.mktemp("rxlogs")
    return {k: write_real_log(base / (k or "none"), checked_log(*c)) for k, c in LOGS.items()}


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.mark.parametrize("outcome", sorted(LOGS))
def test_verify_passes_and_the_dicom_record_passes_dciodvfy(
    outcome: str,
    logs: dict[str, tuple[Path, Path]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    log, pub = logs[outcome]
    rc, text = _run(["verify", str(log), "--pubkey", str(pub)], capsys)
    assert rc == 0, text
    out = tmp_path / "record.dcm"
    argv = ["export", str(log), "--delivery", DID, "--pubkey", str(pub), "--format", "dicom"]
    rc, text = _run([*argv, "--out", str(out)], capsys)
    assert rc == 0, text
    ds = pydicom.dcmread(out)
    assert {i.TreatmentVerificationStatus for i in ds.TreatmentSessionBeamSequence} == {outcome}
    p = subprocess.run(
        ["dciodvfy", str(out)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (p.stdout + p.stderr).splitlines()
    assert lines[0] == "RTBeamsTreatmentRecord", lines
    allowed = ALLOWED_DCIODVFY.get(outcome)
    assert [x for x in lines if x.startswith(("Error", "Warning")) and x != allowed] == []


def test_show_summarises_the_governing_check(
    logs: dict[str, tuple[Path, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    rc, text = _run(["show", str(logs["VERIFIED_OVR"][0]), "--delivery", DID], capsys)
    assert rc == 0, text
    assert "verification    VERIFIED WITH OVERRIDE (seq" in text
    assert "override): dose, expired; prescription used (seq" in text
    _, text = _run(["show", str(logs[""][0]), "--delivery", DID], capsys)
    assert "verification    NOT CHECKED against a prescription" in text


def test_the_report_names_the_physicist_from_the_keyring(
    logs: dict[str, tuple[Path, Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log, pub = logs["VERIFIED_OVR"]
    ring = tmp_path / "keyring.toml"
    ring.write_text(
        "[[key]]\n"
        'holder = "phys-anna"\n'
        'name = "A. Example, MPE"\n'
        'roles = ["physicist"]\n'
        f'public_key = "{generate_keypair("phys-anna").verifier.text}"\n'
        'valid_from = "2026-01-01T00:00:00Z"\n'
        'valid_until = "2099-01-01T00:00:00Z"\n',
        "utf-8",
    )
    out = tmp_path / "report.html"
    argv = ["report", str(log), "--delivery", DID, "--pubkey", str(pub), "--out", str(out)]
    rc, text = _run([*argv, "--keyring", str(ring)], capsys)
    assert rc == 0, text
    page = out.read_text("utf-8")
    assert '<p class="outcome">VERIFIED WITH OVERRIDE</p>' in page
    assert "A. Example, MPE (phys-anna)" in page
    ring.write_text("[[key]]\nholder = 1\n", "utf-8")
    rc, text = _run([*argv, "--keyring", str(ring)], capsys)
    assert rc == 2
    assert f"--keyring: {ring}: key[0]" in text


def test_the_store_puts_the_patient_and_plan_in_the_dicom_file_only(
    logs: dict[str, tuple[Path, Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log, pub = logs["VERIFIED"]
    store = tmp_path / "store"
    save_hand_off(store, HandOff("T-0042", "P-0042", PATIENT_ID, PLAN_UID), "2026-11-26T08:00:00Z")
    out = tmp_path / "handoff.dcm"
    argv = ["export", str(log), "--delivery", DID, "--pubkey", str(pub), "--format", "dicom"]
    rc, text = _run([*argv, "--out", str(out), "--store", str(store)], capsys)
    assert rc == 0, text
    assert PATIENT_ID not in text
    assert PLAN_UID not in text
    ds = pydicom.dcmread(out)
    assert ds.PatientID == PATIENT_ID
    [ref] = ds.ReferencedRTPlanSequence
    assert ref.ReferencedSOPInstanceUID == PLAN_UID
    p = subprocess.run(
        ["dciodvfy", str(out)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (p.stdout + p.stderr).splitlines()
    bad = [x for x in lines if x.startswith(("Error", "Warning"))]
    assert [x for x in bad if x != ALLOWED_DCIODVFY["VERIFIED"]] == []
    for segment in log.iterdir():  # nothing of it reached the log
        if segment.is_file():
            assert PATIENT_ID.encode() not in segment.read_bytes()

    # refused, and nothing written: a store open to others, a missing entry, a bad entry
    def refused(store_dir: Path, why: str) -> None:
        out.unlink(missing_ok=True)
        rc, text = _run([*argv, "--out", str(out), "--store", str(store_dir)], capsys)
        assert rc == 2, text
        assert why in text
        assert PATIENT_ID not in text
        assert not out.exists()

    os.chmod(store, 0o750)  # noqa: S103 - the permissive store being refused
    refused(store, "chmod 700")
    os.chmod(store, 0o700)
    entry = store / "T-0042.json"
    os.chmod(entry, 0o640)
    refused(store, "chmod 600")
    os.chmod(entry, 0o600)
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    refused(empty, "no entry for treatment id T-0042")
    (empty / "T-0042.json").symlink_to(entry)
    refused(empty, "a link is refused")
    (empty / "T-0042.json").unlink()
    (empty / "T-0042.json").write_text('{"v": 1, "treatment_id": "T-0042"}', "utf-8")
    os.chmod(empty / "T-0042.json", 0o600)
    refused(empty, "not a protected-store entry of format 1")
    csv_argv = ["export", str(log), "--delivery", DID, "--format", "csv"]
    rc, text = _run([*csv_argv, "--out", str(tmp_path / "x.csv"), "--store", str(store)], capsys)
    assert rc == 2
    assert "--store: only with --format dicom" in text
