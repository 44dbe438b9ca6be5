"""The instances handed to the hospital for one delivery (issue 23), from the verified log.

``handoff_instances`` is what both the daemon's DICOM sink and ``iort-audit send`` send:

* ``record``: the RT Beams Treatment Record of ``audit/dicom.py``, the very bytes
  ``iort-audit export --format dicom [--store DIR]`` writes for the same log (read back
  into a dataset; sent in Explicit VR Little Endian it is the same byte string).
* ``report``: the PDF report of ``iort-audit report --out FILE.pdf [--keyring] [--pubkey]``
  (the same bytes) as an Encapsulated PDF instance (PS3.3 A.45.1, SOP Class
  1.2.840.10008.5.1.4.1.1.104.1), in the record's patient and study (the same Patient
  module and General Study attributes, copied from the record), in a series of its own
  (Modality DOC). Its Source Instance Sequence names the record it goes with and, for a
  later record (amended, signed off), the first record too.

UIDs (deterministic, under 2.25 as in audit/dicom.py): the record's are audit/dicom.py's
(the same log, store entry and sign-offs give the same SOP Instance UID; an amendment or a
sign-off makes a new instance in the same study and series, referencing the first). The
report's SOP Instance UID is derived from the record's and the SHA-256 of the PDF: the same
UID always means the same bytes, so a resend is the same instance to the receiver, and a
report whose content changed (a sign-off, names from a keyring) is a new instance. Its
series UID is derived from the record's study.

Only from a verified log: a log that is not intact, or whose entries of this delivery are
unvouched (after the last seal before a crash), gives ``HandoffError`` (``usage=False``: the
thing checked is bad) and nothing to send; there is no ``--allow-unverified`` for a hand-off
to a clinical system. With retention, the log's archive (``archive``) is verified with it,
as ``iort-audit verify --archive`` does. Verified against ``pubkey`` when given, else the
key recorded in the log: a caller that knows the room's key (the daemon's sink) passes it,
so that a log rewritten whole under another key is not taken. The protected store
(``store_dir``, read by audit/handoff.py) puts the real Patient ID and plan UID into the
instances and nowhere else: no error or message here holds a value of it.

Needs the extra ``reports`` (pydicom, reportlab, matplotlib): import it only where that is
installed (the sink plug-in and iort-audit send load it when they run).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, EncapsulatedPDFStorage, ExplicitVRLittleEndian

from iortd.audit.dicom import IMPLEMENTATION_VERSION, DicomExportError, dicom_export, uid_for
from iortd.audit.handoff import load_report_keyring, read_hand_off
from iortd.audit.inputs import UsageError, load_pubkey
from iortd.audit.record import DeliveryRecord, NoSuchDelivery, Verification, read_delivery
from iortd.audit.report.pdf import pdf_report
from iortd.audit.signoffs import attach_verdicts
from iortd.auditlog.archive import ArchiveError
from iortd.auditlog.verify import unvouched_deliveries, verify_log

__all__ = [
    "WHAT",
    "HandoffError",
    "encapsulated_pdf",
    "handoff_instances",
    "instance_bytes",
    "read_instance",
]

WHAT = ("record", "report")
_COPIED = (
    # Patient module
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    # General Study module
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
    # General Equipment
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "StationName",
)


class HandoffError(ValueError):
    """Nothing to hand off. ``usage``: a usage or configuration problem (exit 2: a missing
    delivery, an unusable store or key); otherwise the log is not intact or the delivery's
    entries are unvouched (exit 1)."""

    def __init__(self, message: str, *, usage: bool) -> None:
        super().__init__(message)
        self.usage = usage


def instance_bytes(ds: Dataset) -> bytes:
    """A dataset of ``handoff_instances`` as a DICOM Part 10 file (what an outbox keeps)."""
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def read_instance(data: bytes) -> Dataset:
    """The dataset of a Part 10 file (its file meta included)."""
    return dcmread(io.BytesIO(data))


def _meta(ds: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(uid_for("implementation", "iortd"))
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    return meta


def encapsulated_pdf(record: Dataset, pdf: bytes, delivery_id: str) -> Dataset:
    """The Encapsulated PDF instance of ``pdf`` beside ``record`` (an RT Beams Treatment
    Record of audit/dicom.py): the same patient and study, its own series."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = EncapsulatedPDFStorage
    digest = hashlib.sha256(pdf).hexdigest()
    ds.SOPInstanceUID = uid_for(str(record.SOPInstanceUID), "encapsulated-pdf", digest)
    ds.InstanceCreationDate = record.InstanceCreationDate
    ds.InstanceCreationTime = record.InstanceCreationTime
    ds.TimezoneOffsetFromUTC = "+0000"
    for keyword in _COPIED:
        if keyword in record:
            ds[keyword] = record[keyword]
    # Encapsulated Document Series
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = uid_for(str(record.StudyInstanceUID), "report-series")
    ds.SeriesNumber = "2"
    ds.SeriesDescription = f"iortd delivery report {delivery_id}"[:64]
    # SC Equipment: made on a workstation (the auditors' tool), not scanned
    ds.ConversionType = "WSD"
    # Encapsulated Document
    ds.InstanceNumber = record.InstanceNumber
    ds.ContentDate = record.InstanceCreationDate
    ds.ContentTime = record.InstanceCreationTime
    ds.AcquisitionDateTime = ""
    # The report prints the treatment and plan ids (pseudonyms the protected store links to
    # the patient): identifying in the hospital's sense, so said to be burned in.
    ds.BurnedInAnnotation = "YES"
    sources = [(record.SOPClassUID, record.SOPInstanceUID)]
    for ref in record.get("ReferencedTreatmentRecordSequence", []):
        sources.append((ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID))
    items = []
    for sop_class, sop_instance in sources:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.SourceInstanceSequence = DicomSequence(items)
    ds.DocumentTitle = f"IORT delivery report {delivery_id}"[:64]
    ds.ConceptNameCodeSequence = DicomSequence([])
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    # OB must have an even length: pad with one NUL and say how long the document is.
    ds.EncapsulatedDocument = pdf + (b"\x00" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.file_meta = _meta(ds)
    # Round-trip through the encoder so the dataset is what a receiver gets back.
    return read_instance(instance_bytes(ds))


def _verified(
    log_dir: Path, delivery_id: str, pubkey: Path | None, archive: Path | None
) -> tuple[DeliveryRecord, str | None]:
    if not log_dir.is_dir():
        raise HandoffError(f"{log_dir}: not a log directory", usage=True)
    try:
        verifier = load_pubkey(pubkey) if pubkey is not None else None
    except UsageError as exc:
        raise HandoffError(str(exc), usage=True) from None
    if archive is not None and not archive.is_dir():
        raise HandoffError(f"archive {archive}: not a directory (the log's archive)", usage=True)
    try:
        rep = verify_log([log_dir], pubkey=verifier, archive=archive)
    except (ArchiveError, OSError) as exc:
        raise HandoffError(f"archive {archive}: {exc}", usage=True) from None
    if not rep.intact:
        raise HandoffError(
            f"{log_dir}: the log is not intact ({rep.problem}); nothing is handed off. Check "
            "it with iort-audit verify",
            usage=False,
        )
    touched = unvouched_deliveries(rep.files, rep.unvouched).get(delivery_id)
    if touched:
        raise HandoffError(
            f"entries {touched} of delivery {delivery_id} are UNVOUCHED (written after the "
            "last seal before a crash); nothing is handed off",
            usage=False,
        )
    key = f"--pubkey {verifier.name}" if verifier else "the key recorded in the log"
    try:
        rec = read_delivery([log_dir], delivery_id, Verification.of(rep, key, None))
    except NoSuchDelivery:
        raise HandoffError(
            f"delivery {delivery_id}: no such delivery in {log_dir} (list them with: "
            f"iort-audit deliveries {log_dir})",
            usage=True,
        ) from None
    return rec, verifier.name if verifier else None


def handoff_instances(
    log_dir: Path,
    delivery_id: str,
    *,
    what: Sequence[str],
    store_dir: Path | None,
    keyring: Path | None,
    pubkey: Path | None = None,
    require_signoff: bool = False,
    archive: Path | None = None,
) -> list[Dataset]:
    """The instances of ``delivery_id`` to hand off, in the order of ``what`` (``record``,
    ``report``), from the log in ``log_dir`` verified first (against ``pubkey``, else the
    key recorded in the log). ``store_dir``: the protected store (the real Patient ID and
    plan UID); ``keyring``: the command keyring (the report's printed names and sign-off
    verdicts); ``require_signoff``: refuse (not a usage error) a delivery the log holds no
    sign-off of (a site that sends only after the physicist's sign-off). Raises
    HandoffError. Blocking (reads and verifies the whole log)."""
    if not what or any(w not in WHAT for w in what) or len(set(what)) != len(what):
        raise HandoffError(
            f"what to send: {list(what)!r}; give one or both of {', '.join(WHAT)}", usage=True
        )
    try:
        ring = load_report_keyring(keyring) if keyring is not None else None
        rec, key_name = _verified(log_dir, delivery_id, pubkey, archive)
        rx_id = rec.prescription_check.prescription.get("treatment_id")
        tid = str(rx_id or rec.plan.get("treatment_id") or "")
        hand_off = read_hand_off(store_dir, tid) if store_dir is not None else None
    except UsageError as exc:
        raise HandoffError(str(exc), usage=True) from None
    if require_signoff and not rec.signoffs:
        raise HandoffError(
            f"delivery {delivery_id} has no sign-off in the log, and the site hands off only "
            'signed deliveries (when = "signoff"): nothing is handed off',
            usage=False,
        )
    if ring is not None:
        attach_verdicts(rec, [log_dir], ring)
    try:
        record = read_instance(dicom_export(rec, hand_off))
    except DicomExportError as exc:
        raise HandoffError(str(exc), usage=True) from None
    out = []
    for w in what:
        if w == "record":
            out.append(record)
        else:
            pdf = pdf_report(rec, pubkey_name=key_name, keyring=ring)
            out.append(encapsulated_pdf(record, pdf, delivery_id))
    return out
