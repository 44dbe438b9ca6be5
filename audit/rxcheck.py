"""A delivery's check against its prescription, as the log records it (issue 18).

The daemon writes one ``verification`` entry per check of a delivery against its
prescription (when the console is READY, again after a change, when a prescription or an
output factor arrives while READY, after a physicist's override, and at beam-on when there
was no check before it) and one ``prescription_used`` entry the first time the beam comes on
in a delivery whose governing check named a prescription. Their data are the contract in
docs/audit-log.md; this module only reads them.

Which check governs: the last one made before the delivery's first beam-on (a check the
trigger says was made at beam-on or on joining a delivery in progress never counts as
before it); when there is none, the first one made at or after beam-on, and the record says
the prescription was checked only then. A delivery with no check at all has no governing
check: the outputs say "not checked against a prescription" and never invent an outcome.

A check in the unvouched tail of a crash that a restart then took the delivery over from
(record.py's ``untrusted_from``..``untrusted_to``) is listed but never governs: nothing
vouches that the daemon wrote it.

Only entries of this delivery count: the entry's own ``delivery_id`` when it has one (the
envelope is what the hash chain binds), else the ``delivery_id`` in its data. A malformed
entry (data not an object, an outcome outside the vocabulary) is kept in the list of checks
as it is, but can never govern: it reads as no outcome, which the outputs show as NOT
CHECKED with the entry named, never as VERIFIED.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "OUTCOMES",
    "RX_ENTRY_TYPES",
    "TRIGGERS_AT_BEAM_ON",
    "PrescriptionCheck",
    "is_rx_entry_of",
    "listed",
    "prescription_check",
]

RX_ENTRY_TYPES = ("verification", "prescription_used")
OUTCOMES = ("VERIFIED", "NOT_VERIFIED", "VERIFIED_OVR")  # DICOM (3008,002C) spelling
TRIGGERS_AT_BEAM_ON = frozenset({"beam_on", "joined"})


def listed(d: Any, key: str) -> list[Any]:
    """``d[key]`` when ``d`` is an object and that is a list, else [] (a malformed entry
    must not turn a string into a list of its characters)."""
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, list) else []


def is_rx_entry_of(e: Mapping[str, Any], delivery_id: str) -> bool:
    """A ``verification`` or ``prescription_used`` entry of this delivery."""
    if e.get("type") not in RX_ENTRY_TYPES:
        return False
    env = e.get("delivery_id")
    if env is not None:
        return bool(env == delivery_id)
    data = e.get("data")
    return isinstance(data, dict) and data.get("delivery_id") == delivery_id


@dataclass(frozen=True)
class PrescriptionCheck:
    """What the log says about checking one delivery against a prescription."""

    checks: tuple[dict[str, Any], ...] = ()  # every verification entry, whole, in seq order
    governing: dict[str, Any] | None = None  # one of ``checks``
    after_beam_on: bool = False  # the governing check was made only at/after beam-on
    beam_on_seq: int | None = None  # the delivery's first beam-on (None: never on)
    used: tuple[dict[str, Any], ...] = field(default_factory=tuple)  # prescription_used

    @property
    def data(self) -> dict[str, Any]:
        """The governing check's data ({} without one)."""
        if self.governing is None:
            return {}
        d = self.governing.get("data")
        return d if isinstance(d, dict) else {}

    @property
    def outcome(self) -> str | None:
        """VERIFIED, NOT_VERIFIED or VERIFIED_OVR; None when not checked."""
        o = self.data.get("outcome")
        return o if o in OUTCOMES else None

    @property
    def prescription(self) -> dict[str, Any]:
        p = self.data.get("prescription")
        return p if isinstance(p, dict) else {}


def _beam_on_seq(entries: Iterable[Mapping[str, Any]]) -> int | None:
    """The seq of the delivery's first beam-on: its first phase change to IRRADIATING, or
    (monitoring joined with the beam already on) its first sample that was irradiating."""
    first_sample: int | None = None
    for e in entries:
        d = e.get("data")
        if not isinstance(d, dict):
            continue
        if e.get("type") == "phase_changed" and d.get("to") == "IRRADIATING":
            return int(e["seq"])
        if (
            e.get("type") == "sample"
            and first_sample is None
            and "IRRADIATING" in (d.get("phase"), d.get("state"))
        ):
            first_sample = int(e["seq"])
    return first_sample


def prescription_check(
    rx_entries: Iterable[Mapping[str, Any]],
    delivery_entries: Iterable[Mapping[str, Any]],
    untrusted: tuple[int, int] | None = None,
) -> PrescriptionCheck:
    """The delivery's checks (``rx_entries``: its verification and prescription_used
    entries) judged against its other entries (for the first beam-on). ``untrusted``: the
    seq range of a crash's unvouched tail that a restart took the delivery over from
    (record.py); a check there is listed but never governs."""
    ordered = sorted(rx_entries, key=lambda e: int(e["seq"]))
    checks = tuple(dict(e) for e in ordered if e.get("type") == "verification")
    used = tuple(dict(e) for e in ordered if e.get("type") == "prescription_used")
    beam = _beam_on_seq(sorted(delivery_entries, key=lambda e: int(e["seq"])))

    def usable(e: Mapping[str, Any]) -> bool:
        d = e.get("data")
        if untrusted is not None and untrusted[0] <= int(e["seq"]) <= untrusted[1]:
            return False
        return isinstance(d, dict) and d.get("outcome") in OUTCOMES

    def at_beam_on(e: Mapping[str, Any]) -> bool:
        d = e.get("data")
        trig = d.get("trigger") if isinstance(d, dict) else None
        return trig in TRIGGERS_AT_BEAM_ON or (beam is not None and int(e["seq"]) > beam)

    before = [e for e in checks if usable(e) and not at_beam_on(e)]
    if before:
        return PrescriptionCheck(checks, before[-1], False, beam, used)
    after = [e for e in checks if usable(e)]
    if after:
        return PrescriptionCheck(checks, after[0], True, beam, used)
    return PrescriptionCheck(checks, None, False, beam, used)
