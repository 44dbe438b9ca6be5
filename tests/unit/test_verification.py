"""The check of the console against the prescription (daemon/verification.py, ``judge``):
every item, every mismatch, the outcome, overrides bound to the values they overrode."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from iortd.auditlog.keyring import parse_keyring
from iortd.auditlog.note import generate_keypair
from iortd.daemon.verification import (
    Console,
    Inputs,
    Override,
    judge,
    public_object,
    signature_status,
)
from iortd.kernel.types import (
    ApplicatorIdentity,
    VerificationItem,
    VerificationTrigger,
)
from iortd.plan.doserate import OutputFactor, load_doserate_table
from iortd.plan.model import Tolerances, make_prescription

ROOT = Path(__file__).resolve().parents[2]
TABLE = load_doserate_table(ROOT / "config" / "doserate" / "intrabeam.toml")
NOW = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
CURIE = generate_keypair("phys.curie")
TECH = generate_keypair("tech.bob")
RING = parse_keyring(
    (
        f'[[key]]\nholder = "phys.curie"\nname = "Staff"\nroles = ["physicist"]\n'
        f'public_key = "{CURIE.verifier.text}"\nvalid_from = "2026-01-01T00:00:00Z"\n'
        'valid_until = "2099-01-01T00:00:00Z"\n\n'
        f'[[key]]\nholder = "tech.bob"\nname = "Staff"\nroles = ["operator"]\n'
        f'public_key = "{TECH.verifier.text}"\nvalid_from = "2026-01-01T00:00:00Z"\n'
        'valid_until = "2099-01-01T00:00:00Z"\n'
    ).encode(),
    Path("keyring.toml"),
)
SPH30 = ApplicatorIdentity("spherical", 30.0, "SIM-SPH30")
# 20 Gy at 0.8696 Gy/min x 1.0 = 1380 s.
FACTOR = OutputFactor(1.0, NOW.date(), "phys.curie", "sim")
RX = make_prescription(
    treatment_id="T-2026-0042",
    plan_id="IORT-P1",
    fraction=1,
    fractions=1,
    prescribed_dose_gy=20.0,
    dose_reference="surface",
    depth_mm=None,
    applicator_code="SPH30",
    applicator_diameter_mm=30.0,
    planned_time_s=1380.0,
    approved_by="phys.curie",
    approved_at=NOW - timedelta(hours=1),
    not_after=NOW + timedelta(hours=11),
    tolerances=Tolerances(),
)


def inputs(**kw: object) -> Inputs:
    base = Inputs(
        prescription=RX,
        sha256="ab" * 32,
        now=NOW,
        signature=signature_status(RING, "phys.curie", NOW),
        already_delivered=False,
        console=Console(20.0, 1380.0, SPH30),
        table=TABLE,
        table_sha256="cd" * 32,
        factor=FACTOR,
        applicator_types={"SPH30": "spherical"},
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def check(inp: Inputs) -> dict[str, Any]:
    return judge(inp, VerificationTrigger.READY, "D-1")


def test_matching_prescription_is_verified_with_every_item_in_order() -> None:
    e = check(inputs())
    assert e["outcome"] == "VERIFIED"
    assert e["reasons"] == []
    assert e["overridden"] == []
    assert e["overrides"] == []
    items = [c["item"] for c in e["checks"]]
    assert items == [
        "no_prescription", "signature", "expired", "already_delivered", "applicator",
        "dose", "time", "time_unchecked",
    ]  # fmt: skip
    assert e["expected_time_s"] == pytest.approx(1380.0, abs=0.01)
    basis = e["time_basis"]
    assert basis["factor_assumed"] is False
    assert basis["table_date"] == "2026-11-26"
    assert set(e) == {
        "delivery_id", "outcome", "trigger", "reasons", "overridden", "prescription_sha256",
        "prescription", "console", "reader_applicator", "expected_time_s", "time_basis",
        "checks", "overrides",
    }  # fmt: skip


def test_no_prescription_checks_nothing_else() -> None:
    e = check(inputs(prescription=None, sha256=None))
    assert e["outcome"] == "NOT_VERIFIED"
    assert e["reasons"] == ["no_prescription"]
    assert [c["item"] for c in e["checks"]] == ["no_prescription"]
    assert e["prescription"] is None
    assert e["prescription_sha256"] is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"console": Console(20.0, 1380.0, ApplicatorIdentity("spherical", 35.0, "x"))},
         "applicator"),
        ({"console": Console(20.0, 1380.0, ApplicatorIdentity("flat", 30.0, "x"))}, "applicator"),
        ({"console": Console(20.0, 1380.0, None)}, "applicator"),
        ({"console": Console(20.2, 1380.0, SPH30)}, "dose"),
        ({"console": Console(20.0, 1500.0, SPH30)}, "time"),
        ({"console": Console(20.0, None, SPH30)}, "time_unchecked"),
        ({"factor": None}, "time_unchecked"),
        ({"factor": replace(FACTOR, measured_on=date(2026, 12, 5))}, "time_unchecked"),
        ({"table": None}, "time_unchecked"),
        ({"now": NOW + timedelta(hours=12)}, "expired"),
        ({"already_delivered": True}, "already_delivered"),
        ({"signature": signature_status(RING, "phys.other", NOW)}, "signature"),
        ({"signature": signature_status(RING, "tech.bob", NOW)}, "signature"),
        ({"reader_configured": True, "reader": ApplicatorIdentity("spherical", 40.0, "y")},
         "applicator_reader"),
        ({"reader_configured": True, "reader": None}, "applicator_reader"),
    ],
)  # fmt: skip
def test_each_mismatch_is_not_verified_with_that_reason(
    change: dict[str, object], reason: str
) -> None:
    e = check(inputs(**change))
    assert e["outcome"] == "NOT_VERIFIED"
    assert e["reasons"] == [reason]
    failed = [c for c in e["checks"] if not c["ok"]]
    assert failed[0]["detail"]


def test_dose_tolerance_edge_and_time_tolerance_edge() -> None:
    assert check(inputs(console=Console(20.1, 1380.0, SPH30)))["outcome"] == "VERIFIED"
    assert check(inputs(console=Console(20.0, 1380.0 * 1.05, SPH30)))["outcome"] == "VERIFIED"


def test_factor_not_required_is_assumed_one_and_recorded() -> None:
    e = check(inputs(factor=None, require_factor=False))
    assert e["outcome"] == "VERIFIED"
    assert e["time_basis"]["factor_assumed"] is True
    assert e["time_basis"]["factor_measured_on"] is None


def test_signature_status_key_removed_expired_or_not_physicist() -> None:
    assert signature_status(RING, "phys.curie", NOW)[0]
    assert not signature_status(RING, "phys.curie", datetime(2100, 1, 1, tzinfo=UTC))[0]
    assert not signature_status(RING, "tech.bob", NOW)[0]
    assert not signature_status(None, "phys.curie", NOW)[0]


def test_override_binds_to_the_actual_value_it_overrode() -> None:
    bad = inputs(console=Console(20.0, 1500.0, SPH30))
    e = check(bad)
    actual = next(c["actual"] for c in e["checks"] if c["item"] == "time")
    ovr = Override(VerificationItem.TIME, "measured today", "phys.curie", "n1", actual)
    e2 = judge(replace(bad, overrides=[ovr]), VerificationTrigger.OVERRIDE, "D-1")
    assert e2["outcome"] == "VERIFIED_OVR"
    assert e2["reasons"] == ["time"]
    assert e2["overridden"] == ["time"]
    assert e2["overrides"] == [
        {"item": "time", "reason": "measured today", "by": "phys.curie", "nonce": "n1"}
    ]
    # Another planned time: the override does not cover it.
    other = replace(bad, console=Console(20.0, 1510.0, SPH30), overrides=[ovr])
    assert check(other)["outcome"] == "NOT_VERIFIED"
    # A second failure not overridden: NOT_VERIFIED.
    two = replace(bad, console=Console(20.5, 1500.0, SPH30), overrides=[ovr])
    assert check(two)["outcome"] == "NOT_VERIFIED"


def test_never_overridable_items_stay_not_verified() -> None:
    bad = inputs(already_delivered=True)
    ovr = Override(VerificationItem.ALREADY_DELIVERED, "x", "phys.curie", "n", True)
    assert judge(replace(bad, overrides=[ovr]), VerificationTrigger.OVERRIDE, "D")["outcome"] == (
        "NOT_VERIFIED"
    )


def test_public_object_has_every_key() -> None:
    obj = public_object(check(inputs()), NOW)
    assert set(obj) == {
        "outcome", "at", "trigger", "reasons", "overridden", "prescription_sha256",
        "treatment_id", "plan_id", "prescribed_dose_gy", "applicator_code", "expected_time_s",
        "planned_time_s", "preset_gy",
    }  # fmt: skip
    assert obj["treatment_id"] == "T-2026-0042"
    assert obj["applicator_code"] == "SPH30"
    empty = public_object(check(inputs(prescription=None, sha256=None)), NOW)
    assert empty["treatment_id"] is None
    assert empty["outcome"] == "NOT_VERIFIED"
