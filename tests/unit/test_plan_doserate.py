"""The independent time check (plan/doserate.py) and the bundled EXAMPLE tables."""

from __future__ import annotations

import json
import tomllib
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from iortd.plan.doserate import (
    DoseRateError,
    OutputFactor,
    expected_time_s,
    load_doserate_table,
    parse_output_factor,
    time_agrees,
)
from iortd.plan.model import DoseReference, Prescription, Tolerances

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 12, 6, 7, 0, tzinfo=UTC)
TODAY = date(2026, 12, 6)


def rx(code: str = "SPH30", dose: float = 20.0, depth: float | None = None) -> Prescription:
    return Prescription(
        treatment_id="T-1",
        plan_id="P-1",
        fraction=1,
        fractions=1,
        prescribed_dose_gy=dose,
        dose_reference=DoseReference.DEPTH if depth else DoseReference.SURFACE,
        depth_mm=depth,
        applicator_code=code,
        applicator_diameter_mm=30.0,
        planned_time_s=1380.0,
        approved_by="phys.curie",
        approved_at=T0,
        not_after=T0 + timedelta(hours=12),
        tolerances=Tolerances(),
    )


def factor(value: float = 1.0) -> OutputFactor:
    return OutputFactor(value=value, measured_on=TODAY, measured_by="phys.curie", machine="m")


TABLE = """
format = 1
example = false
machine = "INTRABEAM-like s/n 0001"
source = "commissioning report CR-2026-07"
date = 2026-07-01
[applicators.SPH30]
surface_gy_min = 0.8
depth = [{ mm = 5.0, gy_min = 0.4 }, { mm = 10.0, gy_min = 0.1 }]
[applicators.SPH40]
surface_gy_min = 0.5
"""


def write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "t.toml"
    f.write_text(text, "utf-8")
    return f


def test_expected_time_is_dose_over_rate_times_factor(tmp_path: Path) -> None:
    t = load_doserate_table(write(tmp_path, TABLE))
    assert t.source == "commissioning report CR-2026-07"
    assert t.date == date(2026, 7, 1)
    assert expected_time_s(rx(), t, factor()) == pytest.approx(20.0 / 0.8 * 60)
    assert expected_time_s(rx(), t, factor(1.02)) == pytest.approx(20.0 / (0.8 * 1.02) * 60)
    # at a tabulated depth exactly, and between two (log-linear: dose falls ~1/r^3)
    assert expected_time_s(rx(dose=4.0, depth=5.0), t, factor()) == pytest.approx(600.0)
    mid = expected_time_s(rx(dose=4.0, depth=7.5), t, factor())
    assert mid == pytest.approx(4.0 / 0.2 * 60)  # geometric mean of 0.4 and 0.1


def test_what_the_table_cannot_answer_is_refused_with_the_reason(tmp_path: Path) -> None:
    t = load_doserate_table(write(tmp_path, TABLE))
    with pytest.raises(DoseRateError, match="SPH50: not in the dose-rate table"):
        expected_time_s(rx("SPH50"), t, factor())
    with pytest.raises(DoseRateError, match="SPH40: the table gives no depth dose rates"):
        expected_time_s(rx("SPH40", depth=5.0), t, factor())
    with pytest.raises(DoseRateError, match=r"depth 12 mm: outside the table's depths \(5-10"):
        expected_time_s(rx(depth=12.0), t, factor())


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (TABLE.replace('source = "commissioning report CR-2026-07"\n', ""), "source: missing"),
        (TABLE.replace("surface_gy_min = 0.5", "surface_gy_min = -1"), "SPH40.surface_gy_min"),
        (TABLE.replace("surface_gy_min = 0.5", "surface_gy_min = 0.5\ncolour = 1"), "colour"),
        (TABLE.replace("{ mm = 10.0, gy_min = 0.1 }", "{ mm = 5.0, gy_min = 0.1 }"), "depth"),
        (TABLE.replace("date = 2026-07-01", 'date = "July"'), "date"),
        (TABLE.replace("format = 1", "format = 2"), "format"),
        ("[applicators", "not valid TOML"),
    ],
)
def test_bad_tables_name_the_file_and_key(tmp_path: Path, text: str, named: str) -> None:
    f = write(tmp_path, text)
    with pytest.raises(DoseRateError) as exc:
        load_doserate_table(f)
    assert str(f) in str(exc.value)
    assert named in str(exc.value)


def test_time_agrees() -> None:
    ok, detail = time_agrees(1380.0, 1375.0, 0.05)
    assert ok
    assert detail == "planned 1380.0 s, expected 1375.0 s: +0.36 % (tolerance 5.00 %)"
    ok, detail = time_agrees(1500.0, 1375.0, 0.05)
    assert not ok
    assert "+9.09 %" in detail
    assert time_agrees(1306.25, 1375.0, 0.05)[0]  # -5.00 % exactly is within
    with pytest.raises(ValueError, match="expected_s"):
        time_agrees(1.0, 0.0, 0.05)


def test_output_factor_form_and_bounds() -> None:
    doc = {
        "v": 1,
        "output_factor": 1.012,
        "measured_on": "2026-12-06",
        "measured_by": "phys.curie",
        "machine": "INTRABEAM-like s/n 0001",
    }
    f = parse_output_factor(json.dumps(doc).encode())
    assert f.value == 1.012
    assert f.valid_on(TODAY)
    assert not f.valid_on(TODAY + timedelta(days=1))
    for bad, named in (
        ({"output_factor": 1.08}, "output_factor"),
        ({"output_factor": True}, "output_factor"),
        ({"measured_on": "6.12.2026"}, "measured_on"),
        ({"measured_by": "Marie Curie"}, "measured_by"),
        ({"extra": 1}, "extra"),
    ):
        with pytest.raises(DoseRateError, match=named):
            parse_output_factor(json.dumps(dict(doc, **bad)).encode())


def test_the_bundled_examples_say_so_and_match_the_simulators_profiles() -> None:
    """So that an end-to-end run of the simulator agrees with the time check."""
    tables = sorted((ROOT / "config/doserate").glob("*.toml"))
    assert tables
    for path in tables:
        t = load_doserate_table(path)
        assert t.example, f"{path.name}: the bundled tables are examples"
        assert "EXAMPLE" in t.source
        profile = tomllib.loads((ROOT / "config/profiles" / path.name).read_text("utf-8"))
        rates = {c: a["surface_dose_rate_gy_min"] for c, a in profile["applicators"].items()}
        assert {c: r.surface_gy_min for c, r in t.applicators.items()} == rates


def test_iort_plan_factor_writes_the_form_check_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from iortd.plan.cli import main  # noqa: PLC0415

    out = tmp_path / "factor.json"
    argv = ["factor", "--value", "1.012", "--measured-on", "2026-12-06"]
    argv += ["--measured-by", "phys.curie", "--machine", "INTRABEAM s/n 0001", "--out", str(out)]
    assert main(argv) == 0
    f = parse_output_factor(out.read_bytes())
    assert (f.value, f.measured_on, f.measured_by) == (1.012, TODAY, "phys.curie")
    assert out.read_bytes().startswith(b'{"machine":')  # canonical: sorted keys
    capsys.readouterr()
    assert main([*argv[:2], "1.2", *argv[3:]]) == 2
    assert "output_factor" in capsys.readouterr().err
