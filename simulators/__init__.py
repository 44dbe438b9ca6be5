"""Simulated IORT sources: device profiles as data, a pure model, an automatic operator,
and the wire adapters (serial_xrs, modbus_xrs) with their shared core (device), scenarios,
the control channel and the serving loop (serve, control)."""

from iortd.simulators.model import (
    IllegalTransition,
    InterlocksNotClear,
    ModelSnapshot,
    SourceModel,
)
from iortd.simulators.profiles import (
    ApplicatorSpec,
    Profile,
    ProfileError,
    available_profiles,
    load_profile,
)
from iortd.simulators.sequence import ClinicalSequence, SequenceStage

__all__ = [
    "ApplicatorSpec",
    "ClinicalSequence",
    "IllegalTransition",
    "InterlocksNotClear",
    "ModelSnapshot",
    "Profile",
    "ProfileError",
    "SequenceStage",
    "SourceModel",
    "available_profiles",
    "load_profile",
]
