"""An intraoperative DICOM RT Plan written with pydicom, for the import tests.

The plan is a real one: tests run Debian's ``dciodvfy`` on it before importing it. The
beam model of an INTRABEAM-like delivery (docs/prescriptions.md, "Importing an RT Plan"):
one beam, Radiation Type PHOTON, Primary Dosimeter Unit MINUTE, one Applicator Sequence
item of type INTRAOPERATIVE, the prescription in the Dose Reference Sequence and the beam
meterset in minutes in the Fraction Group Sequence. ``tweak`` edits the dataset before it
is written, so each broken plan of the tests is the good one with one thing changed.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, RTPlanStorage

__all__ = ["PATIENT_ID", "PATIENT_NAME", "PLAN_UID", "rt_plan"]

PATIENT_NAME = "Quixote^Dulcinea"
PATIENT_ID = "MRN7730419"
PLAN_UID = "2.25.318749206011285431690937116503420987"
_ROOT = "2.25.31874920601128543169093711650342"


def _item(**kw: object) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def rt_plan(
    *,
    dose_gy: float = 20.0,
    minutes: float = 23.0,
    applicator: str = "SPH30",
    diameter_mm: float | None = 30.0,
    fractions: int = 1,
    tweak: Callable[[Dataset], None] | None = None,
) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = RTPlanStorage
    ds.SOPInstanceUID = PLAN_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate = "20261206"
    ds.InstanceCreationTime = "070000"
    # Patient, General Study, RT Series, General Equipment
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19540312"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = _ROOT + "1"
    ds.StudyDate = "20261206"
    ds.StudyTime = "070000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "S1"
    ds.AccessionNumber = ""
    ds.Modality = "RTPLAN"
    ds.SeriesInstanceUID = _ROOT + "2"
    ds.SeriesNumber = 1
    ds.OperatorsName = ""
    ds.Manufacturer = "iortd tests"
    # RT General Plan
    ds.RTPlanLabel = "LEFT BREAST"
    ds.RTPlanDate = "20261206"
    ds.RTPlanTime = "070000"
    ds.RTPlanGeometry = "TREATMENT_DEVICE"
    # RT Prescription
    ds.DoseReferenceSequence = Sequence(
        [
            _item(
                DoseReferenceNumber=1,
                DoseReferenceUID=_ROOT + "3",
                DoseReferenceStructureType="SITE",
                DoseReferenceDescription="tumour bed",
                DoseReferenceType="TARGET",
                TargetPrescriptionDose=dose_gy * fractions,
            )
        ]
    )
    # RT Fraction Scheme
    ds.FractionGroupSequence = Sequence(
        [
            _item(
                FractionGroupNumber=1,
                NumberOfFractionsPlanned=fractions,
                NumberOfBeams=1,
                NumberOfBrachyApplicationSetups=0,
                ReferencedBeamSequence=Sequence(
                    [_item(ReferencedBeamNumber=1, BeamDose=dose_gy, BeamMeterset=minutes)]
                ),
            )
        ]
    )
    # RT Beams
    app = _item(ApplicatorID=applicator, ApplicatorType="INTRAOPERATIVE")
    app.ApplicatorDescription = "spherical applicator"
    if diameter_mm is not None:
        app.ApplicatorGeometrySequence = Sequence(
            [_item(ApplicatorApertureShape="SYM_CIRCULAR", ApplicatorOpening=diameter_mm)]
        )
    cp0 = _item(
        ControlPointIndex=0,
        CumulativeMetersetWeight=0.0,
        NominalBeamEnergy=0.05,
        GantryAngle=0.0,
        GantryRotationDirection="NONE",
        BeamLimitingDeviceAngle=0.0,
        BeamLimitingDeviceRotationDirection="NONE",
        PatientSupportAngle=0.0,
        PatientSupportRotationDirection="NONE",
        TableTopEccentricAngle=0.0,
        TableTopEccentricRotationDirection="NONE",
        IsocenterPosition=[0.0, 0.0, 0.0],
    )
    cp1 = _item(ControlPointIndex=1, CumulativeMetersetWeight=1.0)
    ds.BeamSequence = Sequence(
        [
            _item(
                BeamNumber=1,
                BeamName="IORT",
                BeamType="STATIC",
                RadiationType="PHOTON",
                TreatmentMachineName="IORT-1",
                PrimaryDosimeterUnit="MINUTE",
                SourceAxisDistance=1000.0,
                BeamLimitingDeviceSequence=Sequence(
                    [_item(RTBeamLimitingDeviceType="X", NumberOfLeafJawPairs=1)]
                ),
                TreatmentDeliveryType="TREATMENT",
                NumberOfWedges=0,
                NumberOfCompensators=0,
                NumberOfBoli=0,
                NumberOfBlocks=0,
                NumberOfControlPoints=2,
                FinalCumulativeMetersetWeight=1.0,
                ApplicatorSequence=Sequence([app]),
                ControlPointSequence=Sequence([cp0, cp1]),
            )
        ]
    )
    # Approval
    ds.ApprovalStatus = "APPROVED"
    ds.ReviewDate = "20261206"
    ds.ReviewTime = "071500"
    ds.ReviewerName = "Curie^Marie"
    if tweak is not None:
        tweak(ds)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
