"""The prescription: one delivery as the physicist approved it, and its canonical JSON.

A :class:`Prescription` is frozen; made through :func:`parse_prescription` or
:func:`make_prescription` (the only ways the tools make one) every field is checked against
the bounds below, and a bad one raises
:class:`PrescriptionError` naming the field (``applicator.diameter_mm: ...``) on one line.
Its JSON form (docs/schemas/v1/prescription.schema.json; docs/prescriptions.md) is written
canonically by :func:`prescription_bytes`: the audit log's canonical JSON (sorted keys, no
whitespace, UTF-8), so the same prescription is always the same bytes, which is what a
signature and a "this prescription was already delivered" check need.

No patient data: the treatment and plan ids are pseudonyms. A pseudonym here is 1 to 64
of ``A-Z a-z 0-9 . _ -``, starting with a letter or digit, and not digits only: a space
(``Dulcinea Quixote``), a caret (DICOM's ``Family^Given``), a comma, a slash or a path
cannot be written, and an all-digit id, the usual shape of a medical record number or a
birth date, is refused as one. That is a filter, not a proof: a pseudonym can still be a
surname; ``iort-plan import`` also refuses ids that contain the plan's Patient ID, a part
of its Patient Name or its birth date. Duplicated keys are refused (parsers differ on which
one they keep). The approving physicist is a keyring holder id (lower-case, as the
keyring's ``holder``), staff, never a patient.

Times are UTC, RFC 3339 with ``Z``; written with microseconds (the log's one format).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final

import orjson

from iortd.auditlog.canonical import canonical
from iortd.auditlog.keyring import HOLDER_RE
from iortd.auditlog.keyring import parse_utc as keyring_parse_utc
from iortd.kernel.timefmt import utc_ts

__all__ = [
    "BOUNDS",
    "FORMAT_VERSION",
    "MAX_PRESCRIPTION_BYTES",
    "DoseReference",
    "Prescription",
    "PrescriptionError",
    "Tolerances",
    "check_holder",
    "check_pseudonym",
    "make_prescription",
    "parse_prescription",
    "parse_utc",
    "prescription_bytes",
    "prescription_dict",
]

FORMAT_VERSION: Final = 1
MAX_PRESCRIPTION_BYTES: Final = 8192  # a prescription is ~450 bytes; room for the envelope

_PSEUDONYM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HOLDER = HOLDER_RE  # the keyring's holder id
_APPLICATOR = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")


@dataclass(frozen=True, slots=True)
class Bound:
    low: float
    high: float
    low_open: bool  # low < x (True) or low <= x (False); always x <= high

    def holds(self, x: float) -> bool:
        return (x > self.low if self.low_open else x >= self.low) and x <= self.high

    def text(self) -> str:
        return f"{self.low:g} {'<' if self.low_open else '<='} x <= {self.high:g}"


# field -> its bound (docs/prescriptions.md, "Fields and bounds" gives the reasons)
BOUNDS: Final[Mapping[str, Bound]] = {
    "prescribed_dose_gy": Bound(0.0, 50.0, low_open=True),
    "depth_mm": Bound(0.0, 100.0, low_open=True),
    "applicator.diameter_mm": Bound(0.0, 150.0, low_open=True),
    "planned_time_s": Bound(0.0, 4 * 3600.0, low_open=True),
    "tolerances.dose_rel": Bound(0.0, 0.05, low_open=False),
    "tolerances.time_rel": Bound(0.0, 0.25, low_open=True),
}
MAX_FRACTIONS: Final = 40
MAX_VALIDITY: Final = timedelta(days=7)
DEFAULT_DOSE_REL: Final = 0.005
DEFAULT_TIME_REL: Final = 0.05


class PrescriptionError(ValueError):
    """A prescription that cannot be used; the message names the field, on one line."""


class DoseReference(StrEnum):
    SURFACE = "surface"  # at the applicator's surface
    DEPTH = "depth"  # at depth_mm from the applicator's surface, in water


@dataclass(frozen=True, slots=True)
class Tolerances:
    dose_rel: float = DEFAULT_DOSE_REL  # console preset vs prescribed dose
    time_rel: float = DEFAULT_TIME_REL  # planned vs independently expected time
    # The applicator must match exactly: there is no tolerance to set (the JSON says "exact").


@dataclass(frozen=True, slots=True)
class Prescription:
    treatment_id: str
    plan_id: str
    fraction: int
    fractions: int
    prescribed_dose_gy: float
    dose_reference: DoseReference
    depth_mm: float | None
    applicator_code: str
    applicator_diameter_mm: float
    planned_time_s: float
    approved_by: str
    approved_at: datetime
    not_after: datetime
    tolerances: Tolerances

    def expired(self, now: datetime) -> bool:
        return now > self.not_after


def check_pseudonym(field: str, value: object) -> str:
    if not isinstance(value, str) or not _PSEUDONYM.fullmatch(value):
        raise PrescriptionError(
            f"{field}: must be a pseudonym of 1-64 letters, digits, '.', '_' or '-' starting "
            "with a letter or digit (no spaces: never a patient's name)"
        )
    if value.isdigit():
        raise PrescriptionError(
            f"{field}: digits only looks like a record number or a date; a pseudonym must "
            "contain a letter (e.g. T-2026-0042)"
        )
    return value


def check_holder(field: str, value: object) -> str:
    if not isinstance(value, str) or not _HOLDER.fullmatch(value):
        raise PrescriptionError(
            f"{field}: must be a keyring holder id: 1-64 of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return value


def parse_utc(field: str, value: object) -> datetime:
    """The one parser of the log's UTC times (auditlog/keyring.py), its error naming
    ``field`` as a :class:`PrescriptionError`."""
    if not isinstance(value, str) or not _UTC.fullmatch(value):
        raise PrescriptionError(
            f"{field}: must be a UTC time in RFC 3339 with Z, e.g. 2026-12-06T07:00:00.000000Z"
        )
    try:
        return keyring_parse_utc(value)
    except ValueError:
        raise PrescriptionError(f"{field}: not a valid date and time") from None


def _number(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PrescriptionError(f"{field}: must be a number")
    x = float(value)
    bound = BOUNDS[field]
    if not math.isfinite(x) or not bound.holds(x):
        raise PrescriptionError(f"{field}: {x:g} is out of bounds ({bound.text()})")
    return x


def _int(field: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PrescriptionError(f"{field}: must be a whole number")
    if not low <= value <= high:
        raise PrescriptionError(f"{field}: {value} is out of bounds ({low} to {high})")
    return value


def make_prescription(
    *,
    treatment_id: object,
    plan_id: object,
    fraction: object,
    fractions: object,
    prescribed_dose_gy: object,
    dose_reference: object,
    depth_mm: object,
    applicator_code: object,
    applicator_diameter_mm: object,
    planned_time_s: object,
    approved_by: object,
    approved_at: datetime,
    not_after: datetime,
    tolerances: Tolerances,
) -> Prescription:
    """A checked prescription from loose values (the CLI's flags, a parsed document)."""
    n_of = _int("fractions", fractions, 1, MAX_FRACTIONS)
    n = _int("fraction", fraction, 1, n_of)
    try:
        ref = DoseReference(dose_reference)  # type: ignore[arg-type]
    except ValueError:
        raise PrescriptionError("dose_reference: must be 'surface' or 'depth'") from None
    depth: float | None = None
    if ref is DoseReference.DEPTH:
        if depth_mm is None:
            raise PrescriptionError("depth_mm: required when dose_reference is 'depth'")
        depth = _number("depth_mm", depth_mm)
    elif depth_mm is not None:
        raise PrescriptionError("depth_mm: only with dose_reference 'depth' (remove it)")
    if not isinstance(applicator_code, str) or not _APPLICATOR.fullmatch(applicator_code):
        raise PrescriptionError(
            "applicator.code: must be 1-32 letters, digits, '.', '_' or '-' (e.g. SPH30)"
        )
    for f, t in (("approved_at", approved_at), ("not_after", not_after)):
        if t.tzinfo is None or t.utcoffset() != timedelta(0):
            raise PrescriptionError(f"{f}: must be in UTC")
    if not_after <= approved_at:
        raise PrescriptionError("not_after: must be after approved_at")
    if not_after - approved_at > MAX_VALIDITY:
        raise PrescriptionError(
            f"not_after: at most {MAX_VALIDITY.days} days after approved_at (a prescription "
            "is for one delivery; approve a new one for a later day)"
        )
    tol = Tolerances(
        dose_rel=_number("tolerances.dose_rel", tolerances.dose_rel),
        time_rel=_number("tolerances.time_rel", tolerances.time_rel),
    )
    return Prescription(
        treatment_id=check_pseudonym("treatment_id", treatment_id),
        plan_id=check_pseudonym("plan_id", plan_id),
        fraction=n,
        fractions=n_of,
        prescribed_dose_gy=_number("prescribed_dose_gy", prescribed_dose_gy),
        dose_reference=ref,
        depth_mm=depth,
        applicator_code=applicator_code,
        applicator_diameter_mm=_number("applicator.diameter_mm", applicator_diameter_mm),
        planned_time_s=_number("planned_time_s", planned_time_s),
        approved_by=check_holder("approved_by", approved_by),
        approved_at=approved_at.astimezone(UTC),
        not_after=not_after.astimezone(UTC),
        tolerances=tol,
    )


_KEYS: Final = frozenset(
    {
        "v",
        "treatment_id",
        "plan_id",
        "fraction",
        "fractions",
        "prescribed_dose_gy",
        "dose_reference",
        "depth_mm",
        "applicator",
        "planned_time_s",
        "approved_by",
        "approved_at",
        "not_after",
        "tolerances",
    }
)
_OPTIONAL: Final = frozenset({"depth_mm"})


def _object(field: str, value: object, keys: frozenset[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise PrescriptionError(f"{field}: must be an object")
    for k in sorted(set(value) - keys, key=str):
        raise PrescriptionError(f"{field}.{k}: unknown key (a prescription holds no other data)")
    return value


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise PrescriptionError(f"{k}: duplicate key (a key may appear once)")
        seen[k] = v
    return seen


def _no_duplicate_keys(raw: bytes) -> None:
    """orjson keeps the last of duplicated keys, another parser may keep the first: a
    signed document must mean one thing to all of them. Run after orjson accepted ``raw``
    (strict JSON, bounded size and nesting), so the standard parser sees only that."""
    json.loads(raw, object_pairs_hook=_refuse_duplicates)


def parse_prescription(raw: bytes) -> Prescription:
    """The prescription in ``raw`` (its JSON form), strictly: unknown keys, wrong types,
    missing fields and values out of bounds are refused, each naming the field."""
    if len(raw) > MAX_PRESCRIPTION_BYTES:
        raise PrescriptionError(
            f"too large: {len(raw)} bytes (a prescription is at most {MAX_PRESCRIPTION_BYTES})"
        )
    try:
        doc = orjson.loads(raw)  # bounded by the size check; orjson limits nesting too
    except orjson.JSONDecodeError as exc:
        raise PrescriptionError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PrescriptionError("not a JSON object")
    _no_duplicate_keys(raw)
    for k in sorted(set(doc) - _KEYS):
        raise PrescriptionError(f"{k}: unknown key (a prescription holds no other data)")
    for k in sorted(_KEYS - _OPTIONAL - set(doc)):
        raise PrescriptionError(f"{k}: missing")
    if doc["v"] != FORMAT_VERSION or isinstance(doc["v"], bool):
        raise PrescriptionError(f"v: must be {FORMAT_VERSION} (the prescription format)")
    app = _object("applicator", doc["applicator"], frozenset({"code", "diameter_mm"}))
    for k in ("code", "diameter_mm"):
        if k not in app:
            raise PrescriptionError(f"applicator.{k}: missing")
    tol = _object(
        "tolerances", doc["tolerances"], frozenset({"dose_rel", "time_rel", "applicator"})
    )
    for k in ("dose_rel", "time_rel", "applicator"):
        if k not in tol:
            raise PrescriptionError(f"tolerances.{k}: missing")
    if tol["applicator"] != "exact":
        raise PrescriptionError("tolerances.applicator: must be 'exact' (no other is allowed)")
    for k in ("dose_rel", "time_rel"):  # type-check here: Tolerances holds floats
        _number(f"tolerances.{k}", tol[k])
    return make_prescription(
        treatment_id=doc["treatment_id"],
        plan_id=doc["plan_id"],
        fraction=doc["fraction"],
        fractions=doc["fractions"],
        prescribed_dose_gy=doc["prescribed_dose_gy"],
        dose_reference=doc["dose_reference"],
        depth_mm=doc.get("depth_mm"),
        applicator_code=app["code"],
        applicator_diameter_mm=app["diameter_mm"],
        planned_time_s=doc["planned_time_s"],
        approved_by=doc["approved_by"],
        approved_at=parse_utc("approved_at", doc["approved_at"]),
        not_after=parse_utc("not_after", doc["not_after"]),
        tolerances=Tolerances(float(tol["dose_rel"]), float(tol["time_rel"])),
    )


def prescription_dict(p: Prescription) -> dict[str, Any]:
    """The JSON form (docs/schemas/v1/prescription.schema.json)."""
    out: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "treatment_id": p.treatment_id,
        "plan_id": p.plan_id,
        "fraction": p.fraction,
        "fractions": p.fractions,
        "prescribed_dose_gy": p.prescribed_dose_gy,
        "dose_reference": p.dose_reference.value,
        "applicator": {"code": p.applicator_code, "diameter_mm": p.applicator_diameter_mm},
        "planned_time_s": p.planned_time_s,
        "approved_by": p.approved_by,
        "approved_at": utc_ts(p.approved_at),
        "not_after": utc_ts(p.not_after),
        "tolerances": {
            "dose_rel": p.tolerances.dose_rel,
            "time_rel": p.tolerances.time_rel,
            "applicator": "exact",
        },
    }
    if p.depth_mm is not None:
        out["depth_mm"] = p.depth_mm
    return out


def prescription_bytes(p: Prescription) -> bytes:
    """Canonical JSON (the audit log's form), with no trailing newline."""
    return canonical(prescription_dict(p))
