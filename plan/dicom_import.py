"""A DICOM RT Plan (beam model, intraoperative applicator) read into prescription facts.

The only module of iortd.plan that imports pydicom (the optional extra ``plan``; the daemon
never imports it: tests/unit/test_layers.py). What is read, attribute by attribute
(DICOM PS3.3, RT Plan IOD; docs/prescriptions.md has the table):

- SOP Class UID (0008,0016) must be RT Plan Storage;
- Beam Sequence (300A,00B0) with exactly one beam; its Primary Dosimeter Unit (300A,00B3)
  must be ``MINUTE`` (the meterset is then a time);
- its Applicator Sequence (300A,0107), one item, Applicator Type (300A,0109)
  ``INTRAOPERATIVE``; Applicator ID (300A,0108) is the applicator code; the diameter is
  Applicator Geometry Sequence (300A,0431) > Applicator Opening (300A,0433) for an
  Applicator Aperture Shape (300A,0432) ``SYM_CIRCULAR``, when the plan has it;
- Fraction Group Sequence (300A,0070): Number of Fractions Planned (300A,0078) and, in
  Referenced Beam Sequence (300C,0004), the beam's Beam Meterset (300A,0086), minutes, and
  Beam Dose (300A,0084) if given; several groups are accepted only when they agree;
- Dose Reference Sequence (300A,0010): the TARGET items' Target Prescription Dose
  (300A,0026), which must agree; the dose per fraction is it divided by the number of
  fractions, and must agree with Beam Dose when the plan gives one;
- Approval Status (300E,0002), when present, must be ``APPROVED``.

What is missing or contradictory is refused with :class:`PlanRefused`, one line naming the
attribute (exit 1 in the CLI). Identifying attributes: Patient ID (0010,0020) and the SOP
Instance UID are returned only for the protected store (plan/store.py); Patient's Name
(0010,0010) only as its parts, and Patient's Birth Date (0010,0030), for refusing ids built
from them; nothing else of the Patient,
Study or Series modules, nor the free-text RT Plan Label, is read. No message here contains
a value read from the file: pydicom's own warnings and log records, which can quote
element values, are silenced while the file is read.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, RTPlanStorage

__all__ = ["PlanFacts", "PlanRefused", "read_rt_plan"]

_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_SAME_REL = 1e-6  # two doses, metersets or counts in a plan are "the same" within this


class PlanRefused(Exception):
    """The file is not an RT Plan iort-plan can import; the message says why, on one line."""


@dataclass(frozen=True, slots=True)
class PlanFacts:
    dose_per_fraction_gy: float
    fractions: int
    applicator_code: str
    applicator_diameter_mm: float | None
    planned_time_s: float
    # identifying: for the protected store and the refusal of ids built from them only
    patient_id: str
    patient_name_parts: tuple[str, ...]
    patient_birth_date: str
    sop_instance_uid: str


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """pydicom's warnings and log records can quote element values (a patient's name):
    none of them may reach stderr."""
    logger = logging.getLogger("pydicom")
    was = logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = was


def _one(ds: Dataset, keyword: str, tag: str, where: str) -> Dataset:
    seq = ds.get(keyword)
    if not seq:
        raise PlanRefused(f"{where}{_name(keyword)} ({tag}): missing")
    if len(seq) != 1:
        raise PlanRefused(f"{where}{_name(keyword)} ({tag}): {len(seq)} items; expected one")
    item: Dataset = seq[0]
    return item


def _name(keyword: str) -> str:
    """'ApplicatorSequence' -> 'Applicator Sequence' (the standard's attribute name)."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", keyword)


def _num(ds: Dataset, keyword: str, tag: str) -> float:
    value: Any = ds.get(keyword)
    if value is None or value == "":
        raise PlanRefused(f"{_name(keyword)} ({tag}): missing")
    x = float(value)
    if not math.isfinite(x):
        raise PlanRefused(f"{_name(keyword)} ({tag}): not a finite number")
    return x


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= _SAME_REL * max(abs(a), abs(b), 1.0)


def read_rt_plan(raw: bytes) -> PlanFacts:
    """The facts of the RT Plan in ``raw``; PlanRefused when it cannot be imported."""
    with _quiet():
        try:
            ds = dcmread(io.BytesIO(raw))
        except InvalidDicomError:
            raise PlanRefused(
                "not a DICOM file (no 'DICM' after the 128-byte preamble): export the plan "
                "from the planning system as a DICOM RT Plan"
            ) from None
        except PlanRefused:
            raise
        except Exception as exc:  # any parse failure of a hostile file
            raise PlanRefused(f"not a readable DICOM file ({type(exc).__name__})") from None
        try:
            return _facts(ds)
        except PlanRefused:
            raise
        except Exception as exc:  # pydicom parses elements lazily, here
            raise PlanRefused(
                f"a malformed element in the plan ({type(exc).__name__}); export it again"
            ) from None


def _facts(ds: Dataset) -> PlanFacts:
    sop_class = UID(str(ds.get("SOPClassUID", "") or ""))
    if sop_class != RTPlanStorage:
        # Named only when it is a known SOP class: a damaged element's value may run into
        # the next ones (the patient's name), so nothing read is quoted as it is.
        known = sop_class.name if isinstance(sop_class, UID) and sop_class.is_valid else ""
        what = "missing" if not sop_class else (known if known != sop_class else "another")
        raise PlanRefused(
            f"not an RT Plan: SOP Class UID (0008,0016) is {what}, expected RT Plan Storage "
            f"({RTPlanStorage})"
        )
    beams = ds.get("BeamSequence")
    if not beams:
        raise PlanRefused(
            "Beam Sequence (300A,00B0): missing; iort-plan reads the beam model of an IORT "
            "plan (an applicator of type INTRAOPERATIVE)"
        )
    if len(beams) != 1:
        raise PlanRefused(f"Beam Sequence (300A,00B0): {len(beams)} beams; an IORT plan has one")
    beam: Dataset = beams[0]
    app = _one(beam, "ApplicatorSequence", "300A,0107", "Beam Sequence > ")
    if str(app.get("ApplicatorType", "")) != "INTRAOPERATIVE":
        raise PlanRefused(
            "Applicator Type (300A,0109) is not INTRAOPERATIVE (the one IORT applicator "
            "type DICOM defines): not an intraoperative plan"
        )
    code = str(app.get("ApplicatorID", ""))
    if not _CODE.fullmatch(code):
        raise PlanRefused(
            "Applicator ID (300A,0108): missing or not an applicator code (1-32 letters, "
            "digits, '.', '_' or '-', e.g. SPH30)"
        )
    diameter: float | None = None
    if app.get("ApplicatorGeometrySequence"):
        geo = _one(app, "ApplicatorGeometrySequence", "300A,0431", "Applicator Sequence > ")
        if str(geo.get("ApplicatorApertureShape", "")) != "SYM_CIRCULAR":
            raise PlanRefused(
                "Applicator Aperture Shape (300A,0432) is not SYM_CIRCULAR: the applicator's "
                "diameter cannot be read; give --diameter-mm for a plan without geometry"
            )
        diameter = _num(geo, "ApplicatorOpening", "300A,0433")
    if str(beam.get("PrimaryDosimeterUnit", "")) != "MINUTE":
        raise PlanRefused(
            "Primary Dosimeter Unit (300A,00B3) is not MINUTE: the Beam Meterset of an "
            "IORT plan must be its treatment time in minutes"
        )
    groups = ds.get("FractionGroupSequence")
    if not groups:
        raise PlanRefused("Fraction Group Sequence (300A,0070): missing")
    number = beam.get("BeamNumber")
    seen: list[tuple[int, float, float | None]] = []
    for group in groups:
        n = int(_num(group, "NumberOfFractionsPlanned", "300A,0078"))
        refs = [
            r
            for r in group.get("ReferencedBeamSequence") or []
            if r.get("ReferencedBeamNumber") == number
        ]
        if len(refs) != 1:
            raise PlanRefused(
                "Referenced Beam Sequence (300C,0004): the beam is referenced "
                f"{len(refs)} times in a fraction group; expected once"
            )
        minutes = _num(refs[0], "BeamMeterset", "300A,0086")
        beam_dose = _num(refs[0], "BeamDose", "300A,0084") if "BeamDose" in refs[0] else None
        seen.append((n, minutes, beam_dose))
    first = seen[0]
    for other in seen[1:]:
        agree = other[0] == first[0] and _same(other[1], first[1])
        if (other[2] is None) != (first[2] is None) or (
            other[2] is not None and first[2] is not None and not _same(other[2], first[2])
        ):
            agree = False
        if not agree:
            raise PlanRefused(
                f"Fraction Group Sequence (300A,0070): {len(seen)} fraction groups disagree "
                "(fractions, Beam Meterset or Beam Dose); export one fraction group"
            )
    fractions, minutes, beam_dose = first
    if fractions < 1:
        raise PlanRefused("Number of Fractions Planned (300A,0078): must be at least 1")
    targets = [
        d
        for d in ds.get("DoseReferenceSequence") or []
        if str(d.get("DoseReferenceType", "")) == "TARGET" and "TargetPrescriptionDose" in d
    ]
    if not targets:
        raise PlanRefused(
            "Target Prescription Dose (300A,0026): missing from the Dose Reference Sequence "
            "(300A,0010) (a TARGET item): the plan prescribes no dose"
        )
    totals = [_num(d, "TargetPrescriptionDose", "300A,0026") for d in targets]
    if any(not _same(t, totals[0]) for t in totals):
        raise PlanRefused(
            f"Target Prescription Dose (300A,0026): {len(totals)} targets with different "
            "doses; iort-plan imports a plan with one prescription"
        )
    per_fraction = totals[0] / fractions
    if beam_dose is not None and abs(beam_dose - per_fraction) > 0.001 * per_fraction:
        raise PlanRefused(
            "Beam Dose (300A,0084) disagrees with Target Prescription Dose (300A,0026) "
            "divided by Number of Fractions Planned (300A,0078)"
        )
    approval = ds.get("ApprovalStatus")
    if approval is not None and str(approval) != "APPROVED":
        raise PlanRefused("Approval Status (300E,0002) is not APPROVED: import the approved plan")
    name = str(ds.get("PatientName", "") or "")
    parts = tuple(p for p in re.split(r"[\^\s=,]+", name) if len(p) >= 3)
    return PlanFacts(
        dose_per_fraction_gy=per_fraction,
        fractions=fractions,
        applicator_code=code,
        applicator_diameter_mm=diameter,
        planned_time_s=minutes * 60.0,
        patient_id=str(ds.get("PatientID", "") or ""),
        patient_name_parts=parts,
        patient_birth_date=str(ds.get("PatientBirthDate", "") or ""),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
    )
