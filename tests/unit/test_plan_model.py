"""The prescription (plan/model.py) and its published JSON Schema."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]

from iortd.plan.model import (
    Prescription,
    PrescriptionError,
    parse_prescription,
    prescription_bytes,
)

SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "docs/schemas/v1/prescription.schema.json").read_text(
        "utf-8"
    )
)
T0 = datetime(2026, 12, 6, 7, 0, tzinfo=UTC)


def good() -> dict[str, Any]:
    return {
        "v": 1,
        "treatment_id": "T-2026-0042",
        "plan_id": "IORT-P1",
        "fraction": 1,
        "fractions": 1,
        "prescribed_dose_gy": 20.0,
        "dose_reference": "surface",
        "applicator": {"code": "SPH30", "diameter_mm": 30.0},
        "planned_time_s": 1380.0,
        "approved_by": "phys.curie",
        "approved_at": "2026-12-06T07:00:00.000000Z",
        "not_after": "2026-12-07T07:00:00.000000Z",
        "tolerances": {"dose_rel": 0.005, "time_rel": 0.05, "applicator": "exact"},
    }


def test_round_trip_is_canonical_and_schema_valid() -> None:
    p = parse_prescription(json.dumps(good()).encode())
    assert isinstance(p, Prescription)
    assert p.prescribed_dose_gy == 20.0
    assert p.approved_at == T0
    raw = prescription_bytes(p)
    assert raw == prescription_bytes(parse_prescription(raw))
    assert raw.startswith(b'{"applicator":{"code":"SPH30"')  # keys sorted, no spaces
    Draft202012Validator(SCHEMA).validate(json.loads(raw))
    depth = dict(good(), dose_reference="depth", depth_mm=10.0)
    p = parse_prescription(json.dumps(depth).encode())
    assert p.depth_mm == 10.0
    Draft202012Validator(SCHEMA).validate(json.loads(prescription_bytes(p)))


BAD: list[tuple[str, Any, str]] = [
    ("treatment_id", "Dulcinea Quixote", "treatment_id"),
    ("treatment_id", "7730419", "record number"),
    ("treatment_id", "", "treatment_id"),
    ("treatment_id", "x" * 65, "treatment_id"),
    ("plan_id", "../etc", "plan_id"),
    ("fraction", 2, "fraction"),
    ("fraction", True, "fraction"),
    ("fractions", 0, "fractions"),
    ("prescribed_dose_gy", 0.0, "prescribed_dose_gy"),
    ("prescribed_dose_gy", 50.01, "prescribed_dose_gy"),
    ("prescribed_dose_gy", "20", "prescribed_dose_gy"),
    ("dose_reference", "Surface", "dose_reference"),
    ("planned_time_s", 0, "planned_time_s"),
    ("planned_time_s", 14400.5, "planned_time_s"),
    ("approved_by", "Marie Curie", "approved_by"),
    ("approved_at", "2026-12-06 07:00:00", "approved_at"),
    ("not_after", "2026-12-06T06:59:59.000000Z", "not_after"),
    ("not_after", "2026-12-20T07:00:00.000000Z", "not_after"),
    ("applicator", {"code": "SPH 30", "diameter_mm": 30.0}, "applicator.code"),
    ("applicator", {"code": "SPH30", "diameter_mm": -1}, "applicator.diameter_mm"),
    ("applicator", {"code": "SPH30"}, "applicator.diameter_mm"),
    ("tolerances", {"dose_rel": 0.5, "time_rel": 0.05, "applicator": "exact"}, "dose_rel"),
    ("tolerances", {"dose_rel": 0.0, "time_rel": 0.05, "applicator": "near"}, "applicator"),
    ("v", 2, "v"),
    ("patient_name", "Quixote^Dulcinea", "patient_name"),
]


@pytest.mark.parametrize(("key", "value", "named"), BAD)
def test_each_bad_field_is_refused_naming_it_and_the_schema_agrees(
    key: str, value: Any, named: str
) -> None:
    doc = dict(good(), **{key: value})
    with pytest.raises(PrescriptionError) as exc:
        parse_prescription(json.dumps(doc).encode())
    assert named in str(exc.value)
    assert "\n" not in str(exc.value)
    # Cross-field rules (fraction <= fractions, not_after's window) and the digits-only rule
    # are the parser's alone: the schema's description says so.
    if named != "record number" and key not in ("not_after", "fraction"):
        assert not Draft202012Validator(SCHEMA).is_valid(doc), f"schema accepts {key}={value!r}"


def test_depth_needs_depth_mm_and_surface_refuses_it() -> None:
    with pytest.raises(PrescriptionError, match="depth_mm"):
        parse_prescription(json.dumps(dict(good(), dose_reference="depth")).encode())
    with pytest.raises(PrescriptionError, match="depth_mm"):
        parse_prescription(json.dumps(dict(good(), depth_mm=5.0)).encode())


def test_missing_field_and_junk_are_refused() -> None:
    doc = good()
    del doc["plan_id"]
    with pytest.raises(PrescriptionError, match="plan_id: missing"):
        parse_prescription(json.dumps(doc).encode())
    for junk in (b"", b"[]", b"{", b"\xff", b'{"v":1}' + b" " * 70000, b"[" * 5000):
        with pytest.raises(PrescriptionError):
            parse_prescription(junk)


def test_expiry() -> None:
    p = parse_prescription(json.dumps(good()).encode())
    assert not p.expired(T0 + timedelta(hours=23))
    assert p.expired(T0 + timedelta(hours=24, microseconds=1))


def test_duplicate_keys_are_refused() -> None:
    """Two parsers may keep different ones of a duplicated key (orjson keeps the last): a
    signed prescription must mean one thing to everyone who reads it."""
    raw = json.dumps(good()).encode()
    dup = raw.replace(
        b'"prescribed_dose_gy": 20.0', b'"prescribed_dose_gy": 2.0, "prescribed_dose_gy": 20.0'
    )
    assert dup != raw
    with pytest.raises(PrescriptionError, match="prescribed_dose_gy: duplicate key"):
        parse_prescription(dup)
    nested = raw.replace(b'"code": "SPH30"', b'"code": "SPH40", "code": "SPH30"')
    with pytest.raises(PrescriptionError, match="code: duplicate key"):
        parse_prescription(nested)
