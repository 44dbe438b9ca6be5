"""A delivery as a DICOM RT Beams Treatment Record (PS3.3 A.29), written with pydicom.

Why RT Beams and not RT Brachy: a low-kV miniature X-ray source is an X-ray tube, not a
radionuclide. The RT Brachy Treatment Record requires (Type 1) a source isotope name,
half-life and reference air-kerma rate for every recorded source, which such a source does
not have and the log does not hold; inventing them would put data from outside the log in
the record. The RT Beams record describes it without invention: Radiation Type PHOTON,
Applicator Type INTRAOPERATIVE, the console as the treatment machine, the dose monitor as
the primary dosimeter. The mapping, attribute by attribute: docs/reports.md. The
Applicator Sequence names the applicator the reader read at beam-on when the room has an
applicator reader (its serial as Applicator ID), the console's otherwise.

Interruption and resumption (PS3.3 C.8.8.21.2): each dose segment of the delivery (the
tracker's segments tile the delivered dose with no gap and no double count) is one item of
the Treatment Session Beam Sequence, a partial treatment of the one planned beam: the
first TREATMENT, the others CONTINUATION. Each item's two control points carry the
Delivered Meterset of C.8.8.21.2.2, DelMS[CPn] = MAX(StartMS, MIN(SpecMS[CPn], EndMS)),
with SpecMS = 0 and the preset; so the Delivered Primary Metersets of the items add up to
the delivered dose and their meterset ranges tile it.

Verification (issue 18): each beam item's Treatment Verification Status (3008,002C) is the
outcome of the delivery's governing check against its prescription (audit/rxcheck.py),
empty (Type 2) when the log holds none; a VERIFIED_OVR's overrides are an Override Sequence
in the item's first control point. The protected store's hand-off entry (``--store``), and
only it, puts the real Patient ID and the RT Plan reference in the object; nothing of it is
logged or printed.

Sign-off (issue 19): the RT Beams Treatment Record IOD has no Approval module (the RT Plan's
RT Approval module, with its Reviewer Name, is not part of it), and DICOM Digital Signatures
(PS3.15 C) allow RSA, DSA and ECDSA, not Ed25519, so the physicist's signature cannot be
carried as a DICOM signature. What the IOD allows is said in words: the RT Series module's
Performed Procedure Step Summary macro has Comments on the Performed Procedure Step
(0040,0280, ST, Type 3), which lists each ``delivery_signed`` entry (meaning, reason,
printed name and holder, UTC time, and the log seq where the Ed25519 signature is kept:
``iort-audit verify --keyring`` checks it). A record with sign-offs is a new instance (its
SOP Instance UID also derived from the sign-offs' seqs, Instance Number 1 + their count) in
the same series, referencing the unsigned record by the RT General Treatment Record's
Referenced Treatment Record Sequence (300C,0030, Type 3): a later sign-off sends a new
instance, and every one of them names the first. So does an amendment (issue 23): a
``delivery_amended`` makes a new instance (SOP Instance UID also from that entry's hash) in
the same study and series, naming the first record; other entries of the delivery after
its end (an alarm cleared) change nothing the record says, and leave it as it is.

Deterministic: UIDs are derived from the log (origin, delivery id, the hash of the
delivery's termination entry; whether it is the hand-off; for a later record, the last
amendment's hash and the sign-offs' seqs) under the UUID-derived root 2.25 (PS3.5 B.2);
dates and times come from the log; nothing from the clock. The same log (and store entry)
gives the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Mapping
from typing import Any

from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    RTBeamsTreatmentRecordStorage,
    RTPlanStorage,
)

from iortd.audit.applicator import applicator_side
from iortd.audit.dose_segments import SegmentRow, segments_with_context
from iortd.audit.record import DeliveryRecord
from iortd.audit.rxcheck import listed
from iortd.kernel.version import __version__

__all__ = [
    "UID_NAMESPACE",
    "DicomExportError",
    "dicom_export",
    "ds_number",
    "segments_with_context",
    "uid_for",
]

UID_NAMESPACE = "iortd-dicom-uid/1"
IMPLEMENTATION_VERSION = f"IORTD_{__version__}"[:16]


class DicomExportError(ValueError):
    """The delivery lacks something a treatment record needs (e.g. no dose was given)."""


def uid_for(*parts: str) -> str:
    """A UID under 2.25 (a UUID as a decimal integer, PS3.5 B.2): the first 128 bits of
    SHA-256 over the parts, with the RFC 9562 version 8 and variant bits set."""
    h = hashlib.sha256("\x00".join((UID_NAMESPACE, *parts)).encode()).digest()
    n = int.from_bytes(h[:16], "big")
    n = (n & ~(0xF << 76)) | (0x8 << 76)  # version 8 (custom)
    n = (n & ~(0x3 << 62)) | (0x2 << 62)  # RFC variant
    return f"2.25.{n}"


def ds_number(x: float) -> str:
    """A Decimal String (at most 16 characters): six decimals (1 µGy, 1 µs), trailing
    zeros dropped."""
    text = f"{x:.6f}".rstrip("0").rstrip(".")
    text = "0" if text in ("", "-0") else text
    if len(text) > 16:
        text = f"{x:.10g}"
    return text


def _da(ts: str | None) -> str:
    return "" if not ts else ts[0:4] + ts[5:7] + ts[8:10]


def _tm(ts: str | None) -> str:
    return "" if not ts else ts[11:13] + ts[14:16] + ts[17:26].rstrip("Z")


def _cs(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.upper())[:16]


def _sh(text: Any) -> str:
    return str(text or "").replace("\\", "/")[:16]


def _lo(text: Any) -> str:
    return str(text or "").replace("\\", "/")[:64]


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _termination_of(row: SegmentRow, rec: DeliveryRecord, last: bool) -> str:
    if last:
        status = rec.status or "UNKNOWN"
        return status if status in ("NORMAL", "OPERATOR", "MACHINE", "UNKNOWN") else "UNKNOWN"
    if row.ended_by.startswith("interruption: interlock"):
        return "MACHINE"
    if row.ended_by == "interruption: operator":
        return "OPERATOR"
    return "UNKNOWN"


_KIND_TEXT = {
    "beam": "irradiation reported by the console",
    "beam_off": "dose counted while the console reported the beam off (alarmed)",
    "unmonitored": "dose given while not monitored (before monitoring began, or while the "
    "daemon was not running)",
    "before_restart": "dose recorded before a restart of the monitor (its samples hold the detail)",
    "in_previous_record": "dose already recorded in the record this one continues",
}


# Where each overridable item of a check lives in this record (PS3.3 C.8.8.21: an Override
# Sequence item names the parent sequence, the item in it, and the overridden attribute).
# None as the item index: the beam item that carries the Override Sequence.
_OVERRIDE_POINTERS: dict[str, tuple[int, int | None, int]] = {
    # Specified Primary Meterset (3008,0032) in the Treatment Session Beam Sequence (3008,0020)
    "dose": (0x30080020, None, 0x30080032),
    # Specified Treatment Time (3008,003A), ditto
    "time": (0x30080020, None, 0x3008003A),
    "time_unchecked": (0x30080020, None, 0x3008003A),
    # Applicator ID (300A,0108) in the beam's Applicator Sequence (300A,0107)
    "applicator": (0x300A0107, 1, 0x300A0108),
    "applicator_reader": (0x300A0107, 1, 0x300A0108),
}
# The prescription's own items (signature, expired, already_delivered, no_prescription):
# the plan the record refers to, Referenced SOP Instance UID (0008,1155) in the Referenced
# RT Plan Sequence (300C,0002).
_PLAN_POINTER = (0x300C0002, 1, 0x00081155)


def _overrides(d: Mapping[str, Any], beam_index: int) -> list[Dataset]:
    out = []
    for o in listed(d, "overrides"):
        if not isinstance(o, dict):
            continue
        item = str(o.get("item"))
        seq_tag, index, attr = _OVERRIDE_POINTERS.get(item, _PLAN_POINTER)
        ov = Dataset()
        ov.ParameterSequencePointer = Tag(seq_tag)
        ov.ParameterItemIndex = str(beam_index if index is None else index)
        ov.OverrideParameterPointer = Tag(attr)
        # a keyring holder id (staff, never a patient) as the family name (no retired PN
        # form); anything but an id's characters (a PN delimiter) is replaced
        by = re.sub(r"[^A-Za-z0-9._-]", "_", str(o.get("by") or ""))[:64]
        ov.OperatorsName = by + "^"
        reason = f"{item}: {o.get('reason')}"
        ov.OverrideReason = "".join(c if c.isprintable() else " " for c in reason)[:1024]
        out.append(ov)
    return out


def _later_instance(ds: Dataset, rec: DeliveryRecord, key: tuple[str, ...], later: bool) -> None:
    """A record after the first (an amendment, sign-offs): the sign-offs in words, its
    Instance Number, and the reference to the first record of the delivery."""
    if rec.signoffs:
        said = []
        for e in rec.signoffs:
            d = e["data"]
            meaning = str(d.get("meaning")).replace("_", " ")
            if d.get("reason"):
                meaning += f" ({d['reason']})"
            at = str(d.get("signed_at"))
            at = at[:19] + "Z" if len(at) >= 19 else at
            said.append(
                f"{meaning} by {d.get('name')} ({d.get('by')}) {at}, audit log seq {e['seq']}"
            )
        text = "Electronic sign-off (Ed25519, in the iortd audit log): " + "; ".join(said)
        ds.CommentsOnThePerformedProcedureStep = text[:1024]  # ST: at most 1024 characters
    if not rec.signoffs and not later:
        return
    ds.InstanceNumber = str(1 + len(rec.signoffs) + (1 if later else 0))
    ref = Dataset()
    ref.ReferencedSOPClassUID = RTBeamsTreatmentRecordStorage
    ref.ReferencedSOPInstanceUID = uid_for(*key, "instance")
    ds.ReferencedTreatmentRecordSequence = Sequence([ref])


def dicom_export(rec: DeliveryRecord, hand_off: Mapping[str, str] | None = None) -> bytes:
    """The RT Beams Treatment Record of the delivery, as a DICOM Part 10 file.

    ``hand_off``: the protected store's entry for the treatment (``patient_id``,
    ``plan_sop_instance_uid``; ``iort-audit export --store``): the record then names the
    real patient and refers to the RT Plan. Without it the record is pseudonymous."""
    rows = segments_with_context(rec)
    if rec.status is None:
        raise DicomExportError(
            f"delivery {rec.delivery_id} has not terminated in the log: a treatment record "
            "needs its termination status"
        )
    if not rows:
        raise DicomExportError(
            f"delivery {rec.delivery_id} has no dose segments (no beam was recorded): "
            "there is no treatment to record"
        )
    origin = rec.verification.origin or ""
    # The first record of the delivery is keyed by its termination entry (its last entry
    # when it ended; later entries that change nothing it says, an alarm cleared after the
    # end, leave it as it is); an amendment makes a later record: a new instance in the
    # same study and series that references the first.
    term = [e for e in rec.events if e.get("type") == "delivery_terminated"]
    first_hash = (term[-1].get("hash") if term else None) or rec.last_hash or ""
    amends = [e for e in rec.events if e.get("type") == "delivery_amended"]
    amended = [str(e.get("hash")) for e in amends]
    later = bool(amended)
    # The instance is as of the entry it records: the last amendment, else the end.
    as_of = (amends or term or [{}])[-1].get("ts") or rec.last_ts
    # The hand-off names another patient identity: another object, with its own UIDs (one
    # store entry per treatment id, never rewritten, so still the same for the same log).
    key: tuple[str, ...] = (origin, rec.delivery_id, first_hash)
    key += ("hand-off",) if hand_off is not None else ()
    plan, dev = rec.plan, rec.device
    preset = _num(rec.preset_gy) or 0.0
    planned_s = _num(rec.summary.get("planned_time_s"))
    expected_rate = _num(rec.summary.get("expected_rate_gy_min"))
    start_ts, end_ts = rec.started or rec.first_ts, as_of
    console_app = rec.summary.get("applicator")
    console_app = console_app if isinstance(console_app, dict) else {}
    # The applicator reader's identity at beam-on when the room has one (issue 16), else
    # the console's: the reader reads the applicator itself, the console what it was told.
    side = applicator_side(rec)
    reader_app = side.identity if side is not None and side.identity else None
    app = reader_app or console_app

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    # SOP Common
    ds.SOPClassUID = RTBeamsTreatmentRecordStorage
    # a new instance per state after the first: amended (which), signed (which)
    state = ["amended", amended[-1]] if later else []
    state += [str(e["seq"]) for e in rec.signoffs]
    ds.SOPInstanceUID = uid_for(*key, "instance", *state)
    ds.InstanceCreationDate = _da(end_ts)
    ds.InstanceCreationTime = _tm(end_ts)
    ds.TimezoneOffsetFromUTC = "+0000"
    pc = rec.prescription_check
    rx = pc.prescription
    rx_id = rx.get("treatment_id") if isinstance(rx.get("treatment_id"), str) else None
    treatment_id = str(rx_id or plan.get("treatment_id") or rec.delivery_id)
    if hand_off is None:
        # Patient: pseudonymous ids only (the log holds no other); marked as such.
        ds.PatientName = _lo(treatment_id) + "^"  # family name = the id (no retired PN form)
        ds.PatientID = _lo(treatment_id)
    else:
        # The hand-off to the hospital: the real Patient ID from the protected store (it
        # holds no name: Type 2, empty), and no claim that the identity was removed.
        ds.PatientName = ""
        ds.PatientID = _lo(hand_off["patient_id"])
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    if hand_off is None:
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "iortd: pseudonymous treatment id only"
    # General Study
    ds.StudyInstanceUID = uid_for(*key, "study")
    ds.StudyDate = _da(start_ts)
    ds.StudyTime = _tm(start_ts)
    ds.ReferringPhysicianName = ""
    rx_plan = rx.get("plan_id") if isinstance(rx.get("plan_id"), str) else None
    ds.StudyID = _sh(rx_plan or plan.get("plan_id"))
    ds.AccessionNumber = ""
    ds.StudyDescription = _lo(f"IORT delivery {rec.delivery_id}")
    # RT Series
    ds.Modality = "RTRECORD"
    ds.SeriesInstanceUID = uid_for(*key, "series")
    ds.SeriesNumber = "1"
    ds.SeriesDescription = _lo(f"iortd audit log {origin}")
    ds.OperatorsName = ""
    _later_instance(ds, rec, key, later)
    # General Equipment: the recorder that produced this instance (iortd).
    ds.Manufacturer = "iortd"
    ds.ManufacturerModelName = "iortd delivery monitor"
    ds.SoftwareVersions = [_lo(rec.software_version or "unknown"), f"iort-audit {__version__}"]
    ds.StationName = _sh((rec.site or {}).get("room"))
    # RT General Treatment Record
    if not rec.signoffs and not later:
        ds.InstanceNumber = "1"
    ds.TreatmentDate = _da(start_ts)
    ds.TreatmentTime = _tm(start_ts)
    # Type 2 (C.8.8.17): the log names the plan (plan_id) but never its SOP instance, which
    # links to the patient; the protected store has it for the hand-off.
    refs = []
    if hand_off is not None:
        ref = Dataset()
        ref.ReferencedSOPClassUID = RTPlanStorage
        ref.ReferencedSOPInstanceUID = hand_off["plan_sop_instance_uid"]
        refs.append(ref)
    ds.ReferencedRTPlanSequence = Sequence(refs)
    # RT Treatment Machine Record: the console (source) the log identified.
    machine = Dataset()
    machine.TreatmentMachineName = _sh(dev.get("device") or "source")
    machine.Manufacturer = _lo(dev.get("manufacturer"))
    machine.InstitutionName = _lo((rec.site or {}).get("id"))
    machine.ManufacturerModelName = _lo(dev.get("model"))
    machine.DeviceSerialNumber = _lo(dev.get("serial"))
    ds.TreatmentMachineSequence = Sequence([machine])
    # Measured Dose Reference Record: the delivered dose of each channel, in Gy.
    measured = []
    for n, (what, value) in enumerate(
        (
            ("primary dose channel (console dose monitor)", rec.delivered_primary_gy),
            ("secondary dose channel", rec.delivered_secondary_gy),
        ),
        start=1,
    ):
        item = Dataset()
        item.MeasuredDoseReferenceNumber = str(n)
        item.MeasuredDoseDescription = f"{what}, Gy at the applicator surface"
        item.MeasuredDoseValue = ds_number(_num(value) or 0.0)
        item.MeasuredDoseType = ""  # Type 2: a monitor chamber is none of the defined types
        item.DoseUnits = "GY"
        measured.append(item)
    ds.MeasuredDoseReferenceSequence = Sequence(measured)
    # RT Beams Session Record
    ds.NumberOfFractionsPlanned = "1"
    ds.PrimaryDosimeterUnit = "MU"  # 1 MU = 1 Gy as the console's dose monitor counts it
    beams = []
    for n, row in enumerate(rows):
        last = n == len(rows) - 1
        item = Dataset()
        item.ReferencedBeamNumber = "1"
        item.BeamName = "IORT"
        desc = (
            f"segment {n + 1} of {len(rows)}: {_KIND_TEXT.get(row.kind, row.kind)}; "
            f"{row.start_gy:.4f}-{row.end_gy:.4f} Gy; ended by {row.ended_by}; "
            f"source firmware {dev.get('firmware')}"
        )
        item.BeamDescription = desc[:1024]
        item.BeamType = "STATIC"
        item.RadiationType = "PHOTON"
        item.TreatmentDeliveryType = "TREATMENT" if n == 0 else "CONTINUATION"
        item.NumberOfWedges = "0"
        item.NumberOfCompensators = "0"
        item.NumberOfBoli = "0"
        item.NumberOfBlocks = "0"
        # Type 1 in this IOD; the only beam-limiting device is the applicator's fixed
        # opening: one item stands for it, with no positions anywhere (docs/reports.md).
        bld = Dataset()
        bld.RTBeamLimitingDeviceType = "X"
        bld.NumberOfLeafJawPairs = "1"
        item.BeamLimitingDeviceLeafPairsSequence = Sequence([bld])
        if app:
            a = Dataset()
            a.ApplicatorID = _sh(app.get("serial") or plan.get("applicator") or "unknown")
            a.ApplicatorType = "INTRAOPERATIVE"
            a.ApplicatorDescription = _lo(
                f"{app.get('type')} {app.get('diameter_mm')} mm"
                + (", applicator reader" if reader_app else "")
                + (f", plan {plan.get('applicator')}" if plan.get("applicator") else "")
                + (
                    f", console s/n {console_app.get('serial')}"
                    if reader_app and console_app and console_app != reader_app
                    else ""
                )
            )
            item.ApplicatorSequence = Sequence([a])
        item.CurrentFractionNumber = str(int(plan.get("fraction") or 1))
        item.TreatmentTerminationStatus = _termination_of(row, rec, last)
        reason = rec.reason if last else row.ended_by.partition(": ")[2]
        if reason and len(reason) <= 16 and "\\" not in reason:
            item.TreatmentTerminationCode = reason
        # Type 2: the governing check's outcome (DICOM's own terms); empty (unknown) for a
        # delivery the log holds no check of. An override names what it overrode.
        item.TreatmentVerificationStatus = pc.outcome or ""
        item.SpecifiedPrimaryMeterset = ds_number(preset)
        item.SpecifiedSecondaryMeterset = ds_number(preset)
        item.DeliveredPrimaryMeterset = ds_number(row.end_gy - row.start_gy)
        item.DeliveredSecondaryMeterset = ds_number(row.end_secondary_gy - row.start_secondary_gy)
        if planned_s is not None:
            item.SpecifiedTreatmentTime = ds_number(planned_s)
        item.DeliveredTreatmentTime = ds_number(max(row.end_beam_on_s - row.start_beam_on_s, 0))
        item.NumberOfControlPoints = "2"
        cps: list[Dataset] = []
        for spec, at, rate in (
            (0.0, row.start_at, row.start_rate),
            (preset, row.end_at, row.end_rate),
        ):
            cp = Dataset()
            cp.TreatmentControlPointDate = _da(at or start_ts)
            cp.TreatmentControlPointTime = _tm(at or start_ts)
            cp.SpecifiedMeterset = ds_number(spec)
            # PS3.3 C.8.8.21.2.2: DelMS = MAX(StartMS, MIN(SpecMS, EndMS)).
            cp.DeliveredMeterset = ds_number(max(row.start_gy, min(spec, row.end_gy)))
            cp.DoseRateSet = "" if expected_rate is None else ds_number(expected_rate)
            cp.DoseRateDelivered = "" if rate is None else ds_number(rate)
            if not cps and pc.outcome == "VERIFIED_OVR":
                # The overrides were in force from the item's first control point on.
                overridden = _overrides(pc.data, n + 1)
                if overridden:
                    cp.OverrideSequence = Sequence(overridden)
            cps.append(cp)
        item.ControlPointDeliverySequence = Sequence(cps)
        beams.append(item)
    ds.TreatmentSessionBeamSequence = Sequence(beams)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(uid_for("implementation", "iortd"))
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds.file_meta = meta
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
