"""Simulated IORT sources: device profiles as data, a pure model, an automatic operator."""

from simulators.model import (
    IllegalTransition,
    InterlocksNotClear,
    ModelSnapshot,
    SourceModel,
)
from simulators.profiles import (
    ApplicatorSpec,
    Profile,
    ProfileError,
    available_profiles,
    load_profile,
)
from simulators.sequence import ClinicalSequence, SequenceStage

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
