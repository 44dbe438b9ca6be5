"""Verification before beam-on: the console checked against the room's pending prescription.

The record-and-verify check of issue 18 (DICOM's verifier role: Treatment Verification
Status (3008,002C) VERIFIED / NOT_VERIFIED / VERIFIED_OVR; IHE-RO QAPV's independent time
check). iortd is a passive monitor: a check never inhibits the beam; it is recorded, and a
NOT_VERIFIED outcome (or beam-on with no prescription) is a HIGH alarm.

**The judging** (:func:`judge`) is a pure function of :class:`Inputs`: every item is checked
and written to ``checks`` with its expected and actual value, in the fixed order of
:class:`VerificationItem`. With no prescription pending only ``no_prescription`` is
checked. ``applicator_reader`` is checked only when a reader is configured; ``time`` only
when the independent time can be computed (``time_unchecked`` fails otherwise: no planned
time from the console, no dose-rate table, the applicator or depth not in it, or no output
factor for the day when one is required).

The console reports an applicator's type, diameter and serial, never the prescription's
code: the applicator item compares the diameter within 0.05 mm (the slack of the
applicator cross-check, daemon/tracker/applicator.py) and, when ``[verification]
applicator_types`` names the code's type, the type too; otherwise the detail says the type
was not compared.

**Overrides** bind to the values they overrode: an :class:`Override` holds the actual value
of its item at the check it overrode, and covers a later failure of that item only while the
actual value is the same (and only under the prescription it was given for: the verifier
passes the judging no other). A check whose every failed item is covered is VERIFIED_OVR;
``signature``, ``expired``, ``already_delivered`` and ``no_prescription`` are never
overridable.

**The class** (:class:`Verifier`) holds what the judging needs from the running daemon (the
keyring in force, the used prescriptions, the table, the day's output factor) and the
per-delivery state (the latest check, the overrides, whether ``prescription_used`` was
written); it writes nothing itself: the service appends what it returns, log first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from iortd.auditlog.keyring import Keyring
from iortd.kernel.timefmt import utc_ts
from iortd.kernel.types import (
    ApplicatorIdentity,
    VerificationItem,
    VerificationOutcome,
    VerificationTrigger,
)
from iortd.plan.doserate import (
    DoseRateError,
    DoseRateTable,
    OutputFactor,
    expected_time_s,
    time_agrees,
)
from iortd.plan.model import Prescription, prescription_dict

__all__ = [
    "NEVER_OVERRIDABLE",
    "OVERRIDABLE",
    "Console",
    "Inputs",
    "Override",
    "applicator_dict",
    "judge",
    "public_object",
    "signature_status",
]

Item = VerificationItem
OVERRIDABLE: Final = frozenset(
    {Item.APPLICATOR, Item.APPLICATOR_READER, Item.DOSE, Item.TIME, Item.TIME_UNCHECKED}
)
NEVER_OVERRIDABLE: Final = frozenset(
    {Item.NO_PRESCRIPTION, Item.SIGNATURE, Item.EXPIRED, Item.ALREADY_DELIVERED}
)
DIAMETER_SLACK_MM: Final = 0.05  # as the applicator cross-check (daemon/tracker/applicator.py)
_ORDER: Final = tuple(VerificationItem)


@dataclass(frozen=True, slots=True)
class Console:
    """What the console reports of the selected plan."""

    preset_gy: float | None
    planned_time_s: float | None
    applicator: ApplicatorIdentity | None


@dataclass(frozen=True, slots=True)
class Override:
    """A physicist's signed override of one item, bound to the value it overrode."""

    item: VerificationItem
    reason: str
    by: str
    nonce: str
    actual: Any  # the item's actual value at the check it overrode (JSON)
    # The prescription it was given for: the verifier applies it to that one only.
    prescription_sha256: str = ""


@dataclass(frozen=True, slots=True)
class Inputs:
    prescription: Prescription | None
    sha256: str | None
    now: datetime
    signature: tuple[bool, str]  # (ok, detail): :func:`signature_status`
    already_delivered: bool
    console: Console
    reader_configured: bool = False
    reader: ApplicatorIdentity | None = None
    table: DoseRateTable | None = None
    table_sha256: str = ""  # of the table file's bytes as loaded
    factor: OutputFactor | None = None
    require_factor: bool = True
    applicator_types: Mapping[str, str] = field(default_factory=dict)
    overrides: Sequence[Override] = ()


def applicator_dict(a: ApplicatorIdentity | None) -> dict[str, Any] | None:
    if a is None:
        return None
    return {"type": a.type, "diameter_mm": a.diameter_mm, "serial": a.serial}


def signature_status(keyring: Keyring | None, holder: str, now: datetime) -> tuple[bool, str]:
    """Whether the approver's key is enrolled in the keyring in force, valid now, with the
    physicist role."""
    if keyring is None:
        return False, "no keyring in force"
    keys = keyring.of(holder)
    if not keys:
        return False, f"{holder} has no key in the keyring in force ({keyring.sha256[:16]})"
    if not any(k.valid_at(now) for k in keys):
        return False, f"{holder}'s key is not valid at {utc_ts(now)}"
    if not any(k.valid_at(now) and "physicist" in k.roles for k in keys):
        return False, f"{holder}'s key does not have the physicist role"
    return True, f"{holder} enrolled as a physicist (keyring {keyring.sha256[:16]})"


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def _check(
    item: VerificationItem, ok: bool, expected: Any, actual: Any, detail: str
) -> dict[str, Any]:
    return {
        "item": item.value,
        "ok": ok,
        "expected": expected,
        "actual": actual,
        "detail": detail,
    }


def _applicator(
    item: VerificationItem,
    p: Prescription,
    seen: ApplicatorIdentity | None,
    types: Mapping[str, str],
    who: str,
) -> dict[str, Any]:
    want_type = types.get(p.applicator_code)
    expected: dict[str, Any] = {"code": p.applicator_code, "diameter_mm": p.applicator_diameter_mm}
    if want_type is not None:
        expected["type"] = want_type
    actual = applicator_dict(seen)
    if seen is None:
        return _check(item, False, expected, None, f"no applicator reported by the {who}")
    problems = []
    if abs(seen.diameter_mm - p.applicator_diameter_mm) > DIAMETER_SLACK_MM:
        problems.append(
            f"diameter {seen.diameter_mm:g} mm, prescribed {p.applicator_diameter_mm:g} mm"
        )
    if want_type is not None and seen.type != want_type:
        problems.append(f"type {seen.type}, prescribed {want_type} ({p.applicator_code})")
    if problems:
        return _check(item, False, expected, actual, f"the {who}: " + "; ".join(problems))
    typed = "" if want_type is not None else " (type not compared: not in applicator_types)"
    return _check(
        item,
        True,
        expected,
        actual,
        f"the {who} reports {seen.type} {seen.diameter_mm:g} mm{typed}",
    )


def _time(inp: Inputs, p: Prescription) -> tuple[list[dict[str, Any]], float | None, Any]:
    """The ``time`` and ``time_unchecked`` checks, the expected time and the time basis."""
    planned = _num(inp.console.planned_time_s)
    table, factor = inp.table, inp.factor
    day = inp.now.date()
    why: str | None = None
    if table is None:
        why = "no dose-rate table configured ([verification] doserate_table)"
    elif factor is None or not factor.valid_on(day):
        if inp.require_factor:
            why = f"no output factor for {day.isoformat()} (require_output_factor = true)"
        else:
            factor = None
    expected: float | None = None
    basis: dict[str, Any] | None = None
    if why is None and table is not None:
        used = factor or OutputFactor(1.0, day, "assumed", table.machine)
        try:
            expected = expected_time_s(p, table, used)
        except DoseRateError as exc:
            why = str(exc)
        else:
            rates = table.applicators[p.applicator_code]
            basis = {
                "table_source": table.source,
                "table_date": table.date.isoformat(),
                "table_sha256": inp.table_sha256,
                "rate_gy_min": rates.surface_gy_min
                if p.depth_mm is None
                else p.prescribed_dose_gy / expected * 60.0 / used.value,
                "output_factor": used.value,
                "factor_measured_on": None if factor is None else factor.measured_on.isoformat(),
                "factor_assumed": factor is None,
            }
    if why is None and planned is None:
        why = "the console reports no planned time"
    if why is not None or expected is None:
        detail = why or "no expected time"
        return (
            [_check(Item.TIME_UNCHECKED, False, None, planned, detail)],
            expected,
            basis,
        )
    ok, line = time_agrees(planned or 0.0, expected, p.tolerances.time_rel)
    return (
        [
            _check(Item.TIME, ok, round(expected, 3), planned, line),
            _check(Item.TIME_UNCHECKED, True, None, planned, "the independent time was computed"),
        ],
        expected,
        basis,
    )


def judge(inp: Inputs, trigger: VerificationTrigger, delivery_id: str) -> dict[str, Any]:
    """The ``verification`` entry's data for one check (docs/audit-log.md)."""
    p = inp.prescription
    c = inp.console
    console = {
        "preset_gy": _num(c.preset_gy),
        "planned_time_s": _num(c.planned_time_s),
        "applicator": applicator_dict(c.applicator),
    }
    checks: list[dict[str, Any]] = []
    expected: float | None = None
    basis: Any = None
    if p is None:
        checks.append(
            _check(Item.NO_PRESCRIPTION, False, None, None, "no prescription pending for the room")
        )
    else:
        checks.append(_check(Item.NO_PRESCRIPTION, True, inp.sha256, inp.sha256, "pending"))
        ok, detail = inp.signature
        checks.append(_check(Item.SIGNATURE, ok, p.approved_by, p.approved_by, detail))
        expired = p.expired(inp.now)
        checks.append(
            _check(
                Item.EXPIRED,
                not expired,
                utc_ts(p.not_after),
                utc_ts(inp.now),
                f"not valid after {utc_ts(p.not_after)}" if expired else "within validity",
            )
        )
        checks.append(
            _check(
                Item.ALREADY_DELIVERED,
                not inp.already_delivered,
                False,
                inp.already_delivered,
                "a delivery was already given under this prescription (prescription_used)"
                if inp.already_delivered
                else "not used before",
            )
        )
        types = inp.applicator_types
        checks.append(_applicator(Item.APPLICATOR, p, c.applicator, types, "console"))
        if inp.reader_configured:
            checks.append(
                _applicator(Item.APPLICATOR_READER, p, inp.reader, inp.applicator_types, "reader")
            )
        preset = _num(c.preset_gy)
        want = p.prescribed_dose_gy
        limit = p.tolerances.dose_rel * want
        dose_ok = preset is not None and abs(preset - want) <= limit + 1e-12
        checks.append(
            _check(
                Item.DOSE,
                dose_ok,
                want,
                preset,
                "the console reports no preset"
                if preset is None
                else f"preset {preset:g} Gy, prescribed {want:g} Gy (tolerance ±{limit:.3g} Gy)",
            )
        )
        timed, expected, basis = _time(inp, p)
        checks += timed
    checks.sort(key=lambda ch: _ORDER.index(VerificationItem(ch["item"])))
    failed = [ch for ch in checks if not ch["ok"]]
    reasons = [ch["item"] for ch in failed]
    applied: list[Override] = []
    for ch in failed:
        o = next(
            (
                o
                for o in inp.overrides
                if o.item.value == ch["item"] and o.item in OVERRIDABLE and o.actual == ch["actual"]
            ),
            None,
        )
        if o is not None:
            applied.append(o)
    if not failed:
        outcome = VerificationOutcome.VERIFIED
    elif len(applied) == len(failed):
        outcome = VerificationOutcome.VERIFIED_OVR
    else:
        outcome = VerificationOutcome.NOT_VERIFIED
    ovr = outcome is VerificationOutcome.VERIFIED_OVR
    return {
        "delivery_id": delivery_id,
        "outcome": outcome.value,
        "trigger": trigger.value,
        "reasons": reasons,
        "overridden": [o.item.value for o in applied] if ovr else [],
        "prescription_sha256": inp.sha256 if p is not None else None,
        "prescription": prescription_dict(p) if p is not None else None,
        "console": console,
        "reader_applicator": applicator_dict(inp.reader) if inp.reader_configured else None,
        "expected_time_s": None if expected is None else round(expected, 3),
        "time_basis": basis,
        "checks": checks,
        "overrides": [
            {"item": o.item.value, "reason": o.reason, "by": o.by, "nonce": o.nonce}
            for o in applied
        ]
        if ovr
        else [],
    }


def public_object(entry: Mapping[str, Any], at: datetime) -> dict[str, Any]:
    """The MQTT ``verification`` object (delivery topic, events) of one check's entry."""
    rx = entry.get("prescription")
    console = entry["console"]
    return {
        "outcome": entry["outcome"],
        "at": utc_ts(at),
        "trigger": entry["trigger"],
        "reasons": list(entry["reasons"]),
        "overridden": list(entry["overridden"]),
        "prescription_sha256": entry["prescription_sha256"],
        "treatment_id": None if rx is None else rx["treatment_id"],
        "plan_id": None if rx is None else rx["plan_id"],
        "prescribed_dose_gy": None if rx is None else rx["prescribed_dose_gy"],
        "applicator_code": None if rx is None else rx["applicator"]["code"],
        "expected_time_s": entry["expected_time_s"],
        "planned_time_s": console["planned_time_s"],
        "preset_gy": console["preset_gy"],
    }
