"""``iort-plan new`` and ``iort-plan import`` (plan/cli.py, plan/dicom_import.py,
plan/store.py): a real RT Plan, checked by dciodvfy, imports to the same prescription as the
command line; broken plans are refused on one line each; nothing identifying gets out."""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
import stat
import subprocess
import sys
import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from rtplan import PATIENT_ID, PATIENT_NAME, PLAN_UID, rt_plan

from iortd.plan.cli import main
from iortd.plan.model import parse_prescription

IDENTIFYING = [*PATIENT_NAME.split("^"), PATIENT_ID, "19540312", PLAN_UID, "LEFT BREAST"]
COMMON = [
    "--treatment-id",
    "T-2026-0042",
    "--plan-id",
    "IORT-P1",
    "--approved-by",
    "phys.curie",
    "--approved-at",
    "2026-12-06T07:15:00Z",
    "--valid-hours",
    "12",
]
NEW = [
    "new",
    *COMMON,
    "--dose-gy",
    "20",
    "--applicator",
    "SPH30",
    "--diameter-mm",
    "30",
    "--planned-time-min",
    "23",
]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_new_writes_a_valid_prescription(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(NEW, capsys)
    assert (code, err) == (0, "")
    p = parse_prescription(out.strip().encode())
    assert (p.planned_time_s, p.prescribed_dose_gy, p.applicator_code) == (1380.0, 20.0, "SPH30")
    assert p.not_after.isoformat() == "2026-12-06T19:15:00+00:00"
    f = tmp_path / "rx.json"
    assert run([*NEW, "--out", str(f)], capsys)[:2] == (0, "")
    assert f.read_bytes() == out.encode()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--treatment-id", "Dulcinea Quixote"], "treatment_id"),
        (["--dose-gy", "60"], "prescribed_dose_gy"),
        (["--depth-mm", "5"], "depth_mm"),
        (["--approved-at", "yesterday"], "--approved-at"),
    ],
)
def test_new_refuses_bad_flags_with_exit_2(
    change: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run([*NEW, *change], capsys)
    assert (code, out) == (2, "")
    assert named in err
    assert err.count("\n") == 1


def test_a_dciodvfy_checked_rt_plan_imports_to_the_same_prescription_and_leaks_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    plan = tmp_path / "plan.dcm"
    plan.write_bytes(rt_plan())
    p = subprocess.run(
        ["dciodvfy", str(plan)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (p.stdout + p.stderr).splitlines()
    assert lines[0] == "RTPlan", lines
    assert [x for x in lines if x.startswith(("Error", "Warning"))] == [], lines

    store = tmp_path / "protected"
    out_file = tmp_path / "out" / "rx.json"
    out_file.parent.mkdir()
    caplog.set_level(logging.DEBUG)
    argv = ["import", str(plan), *COMMON, "--protected-store", str(store)]
    code, out, err = run([*argv, "--out", str(out_file)], capsys)
    assert code == 0, err
    _, cli_out, _ = run(NEW, capsys)
    assert out_file.read_bytes() == cli_out.encode()

    # the hand-off identifiers are in the protected store, and only there
    entry = store / "T-2026-0042.json"
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    kept = json.loads(entry.read_text("utf-8"))
    assert (kept["patient_id"], kept["plan_sop_instance_uid"]) == (PATIENT_ID, PLAN_UID)
    assert os.listdir(store) == ["T-2026-0042.json"]

    # the real console script, to see its real stdout and stderr
    exe = Path(sys.executable).parent / "iort-plan"
    real = subprocess.run(
        [str(exe), *argv], capture_output=True, text=True, timeout=60, check=False
    )
    assert real.returncode == 0, real.stderr
    seen = {
        "stdout": out + real.stdout,
        "stderr": err + real.stderr,
        "prescription file": out_file.read_text("utf-8"),
        "log records": "\n".join(r.getMessage() for r in caplog.records),
        "file names": " ".join(str(q) for q in tmp_path.rglob("*")),
    }
    for where, text in seen.items():
        for secret in IDENTIFYING:
            assert secret.lower() not in text.lower(), f"{secret!r} in {where}"


def _seq_del(name: str) -> Callable[[Dataset], None]:
    return lambda ds: delattr(ds.BeamSequence[0], name)


def _two_groups(ds: Dataset) -> None:
    other = copy.deepcopy(ds.FractionGroupSequence[0])
    other.FractionGroupNumber = 2
    other.ReferencedBeamSequence[0].BeamMeterset = 25.0
    ds.FractionGroupSequence.append(other)


def _not_rt_plan(ds: Dataset) -> None:
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.2"  # RT Dose Storage


def _set(path: str, value: object) -> Callable[[Dataset], None]:
    def tweak(ds: Dataset) -> None:
        *parents, last = path.split(".")
        node = ds
        for name in parents:
            node = getattr(node, name)[0]
        setattr(node, last, value)

    return tweak


def _del_target_dose(ds: Dataset) -> None:
    del ds.DoseReferenceSequence[0].TargetPrescriptionDose


BROKEN: list[tuple[str, Callable[[Dataset], None] | None, bytes | None, str]] = [
    ("no applicator", _seq_del("ApplicatorSequence"), None, "Applicator Sequence (300A,0107)"),
    (
        "not intraoperative",
        _set("BeamSequence.ApplicatorSequence.ApplicatorType", "ELECTRON_SQUARE"),
        None,
        "Applicator Type (300A,0109)",
    ),
    ("no prescription dose", _del_target_dose, None, "Target Prescription Dose (300A,0026)"),
    (
        "meterset in MU",
        _set("BeamSequence.PrimaryDosimeterUnit", "MU"),
        None,
        "Primary Dosimeter Unit (300A,00B3)",
    ),
    ("two groups contradicting", _two_groups, None, "Fraction Group Sequence (300A,0070)"),
    ("not an RT Plan", _not_rt_plan, None, "not an RT Plan"),
    ("not DICOM", None, b"%PDF-1.4 not dicom at all" * 10, "not a DICOM file"),
    (
        "beam dose contradicts",
        _set("FractionGroupSequence.ReferencedBeamSequence.BeamDose", 18.0),
        None,
        "Beam Dose (300A,0084)",
    ),
    ("unapproved", _set("ApprovalStatus", "UNAPPROVED"), None, "Approval Status (300E,0002)"),
]


@pytest.mark.parametrize(("what", "tweak", "raw", "named"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_plans_are_refused_on_one_line_with_exit_1(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    what: str,
    tweak: Callable[[Dataset], None] | None,
    raw: bytes | None,
    named: str,
) -> None:
    plan = tmp_path / "plan.dcm"
    plan.write_bytes(raw if raw is not None else rt_plan(tweak=tweak))
    store = tmp_path / "store"
    code, out, err = run(["import", str(plan), *COMMON, "--protected-store", str(store)], capsys)
    assert (code, out) == (1, ""), (what, err)
    assert named in err, err
    assert err.count("\n") == 1, err
    assert not store.exists() or not os.listdir(store), "a refused plan left a store entry"
    for secret in IDENTIFYING:
        assert secret.lower() not in err.lower()


def test_ids_built_from_the_patient_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = tmp_path / "plan.dcm"
    plan.write_bytes(rt_plan())
    argv = ["import", str(plan), *COMMON]
    for bad in ("T-" + PATIENT_ID, "quixote-1", "T-19540312"):
        code, out, err = run([*argv, "--treatment-id", bad], capsys)
        assert (code, out) == (2, "")
        assert "Patient" in err
        assert bad.lower() not in err.lower()


def test_protected_store_refuses_an_open_directory_and_a_second_patient(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = tmp_path / "plan.dcm"
    plan.write_bytes(rt_plan())
    store = tmp_path / "store"
    store.mkdir(mode=0o755)
    store.chmod(0o755)
    argv = ["import", str(plan), *COMMON, "--protected-store", str(store)]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert "chmod 700" in err
    store.chmod(0o700)
    assert run(argv, capsys)[0] == 0
    assert run(argv, capsys)[0] == 0  # the same plan again: nothing changes
    other = tmp_path / "other.dcm"
    other.write_bytes(rt_plan(tweak=_set("PatientID", "MRN0000001")))
    code, out, err = run(["import", str(other), *COMMON, "--protected-store", str(store)], capsys)
    assert (code, out) == (1, "")
    assert "already holds" in err
    assert "MRN" not in err


def test_check_runs_the_time_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rx = tmp_path / "rx.json"
    assert main([*NEW, "--out", str(rx)]) == 0
    factor = tmp_path / "factor.json"
    factor.write_text(
        json.dumps(
            {
                "v": 1,
                "output_factor": 1.0,
                "measured_on": "2026-12-06",
                "measured_by": "phys.curie",
                "machine": "sim",
            }
        ),
        "utf-8",
    )
    table = Path(__file__).resolve().parents[2] / "config/doserate/intrabeam.toml"
    argv = ["check", str(rx), "--doserate", str(table), "--output-factor", str(factor)]
    code, out, err = run(argv, capsys)
    assert (code, err) == (0, "")
    assert "time check: agrees: planned 1380.0 s, expected 1380.0 s: +0.00 %" in out
    assert "EXAMPLE" in out
    slow = tmp_path / "slow.json"
    assert main([*NEW, "--planned-time-min", "26", "--out", str(slow)]) == 0
    code, out, err = run(["check", str(slow), *argv[2:]], capsys)
    assert code == 1
    assert "time check: DISAGREES" in out


def test_without_dicom3tools_the_test_would_not_prove_anything() -> None:
    assert shutil.which("dciodvfy"), "install Debian's dicom3tools (make test does)"


def test_import_without_pydicom_says_what_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`iort-plan new` and `check` need nothing beyond the base install; `import` needs the
    extra `plan` and says so (as an installed wheel without it would)."""
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "iortd.plan.dicom_import", raising=False)
    plan = tmp_path / "plan.dcm"
    plan.write_bytes(b"x")
    code, out, err = run(["import", str(plan), *COMMON], capsys)
    assert (code, out) == (2, "")
    assert "pip install 'iortd[plan]'" in err
    assert run(NEW, capsys)[0] == 0


def test_pydicoms_own_warnings_never_print_a_patients_data(tmp_path: Path) -> None:
    """pydicom warns about malformed values quoting them ("Invalid value for VR UI:
    'Quixote...'"): in a real process with Python's default warning filter, nothing of it
    reaches stderr."""

    def tweak(ds: Dataset) -> None:
        ds.SOPInstanceUID = "Quixote.1"  # not a UID: pydicom warns, quoting it, when read
        ds.add_new(0x00100030, "DA", "Dulcinea1954")  # Patient's Birth Date, malformed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the test's own writing of the broken values
        raw = rt_plan(tweak=tweak)
    plan = tmp_path / "plan.dcm"
    plan.write_bytes(raw)
    exe = Path(sys.executable).parent / "iort-plan"
    real = subprocess.run(
        [str(exe), "import", str(plan), *COMMON, "--protected-store", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    assert real.returncode == 0, real.stderr
    assert real.stderr == ""
    assert "Quixote" not in real.stdout
    assert "Dulcinea" not in real.stdout


def test_damaged_plans_are_refused_never_crash_and_never_leak() -> None:
    """Every truncation and a seeded set of byte flips of a good plan: read_rt_plan either
    gives facts or refuses with one line naming no patient data; nothing else escapes."""
    from iortd.plan.dicom_import import PlanRefused, read_rt_plan  # noqa: PLC0415

    good = rt_plan()
    rng = random.Random(20261206)  # noqa: S311 - a reproducible fuzz, not a secret
    damaged = [good[:n] for n in range(0, len(good), 7)]
    for _ in range(400):
        b = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(128, len(b))] = rng.randrange(256)
        damaged.append(bytes(b))
    refused = 0
    for raw in damaged:
        try:
            read_rt_plan(raw)
        except PlanRefused as exc:
            refused += 1
            msg = str(exc)
            assert "\n" not in msg
            assert not any(s.lower() in msg.lower() for s in IDENTIFYING), msg
    assert refused > len(damaged) // 4, refused


def test_an_approval_in_the_future_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """A prescription approved "tomorrow" would stay valid a day longer than meant: the
    approval time is when the physicist approves, give or take a clock's skew."""
    at = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    code, out, err = run([*NEW, "--approved-at", at], capsys)
    assert (code, out) == (2, "")
    assert "--approved-at: in the future" in err
