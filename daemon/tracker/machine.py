"""The tracker's state table: the phases it may move between, and what each console state
means for it.

A table, not code (h11's ``_state.py`` is the model): :data:`TRANSITIONS` is every move the
tracker makes, and a move not in it raises :class:`IllegalTransition` (a bug in the tracker,
never the console's fault: what the console reports outside the table is contradictory
input and goes to FAULT by a move that *is* in it).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from iortd.daemon.tracker.events import Phase
from iortd.kernel.types import DeviceState

__all__ = ["ACTIVE", "TARGET_PHASE", "TRANSITIONS", "IllegalTransition"]

P = Phase
# The only moves the tracker makes. A selection dropped before beam-on (console back to
# STANDBY from PREPARATORY or READY) is closed as TERMINATED (OPERATOR) first, then IDLE.
# Joining a delivery already under way (the daemon started late, or restarted) is allowed
# from IDLE and recorded as such; anything else the console reports that is not in this
# table is contradictory and goes to FAULT.
TRANSITIONS: frozenset[tuple[Phase, Phase]] = frozenset(
    {
        (P.IDLE, P.PREPARATORY),
        (P.IDLE, P.READY),
        (P.IDLE, P.IRRADIATING),
        (P.IDLE, P.INTERRUPTED),
        (P.PREPARATORY, P.READY),
        (P.PREPARATORY, P.TERMINATED),
        (P.READY, P.IRRADIATING),
        (P.READY, P.PREPARATORY),
        (P.READY, P.TERMINATED),
        (P.IRRADIATING, P.INTERRUPTED),
        (P.IRRADIATING, P.TERMINATED),
        (P.INTERRUPTED, P.IRRADIATING),
        (P.INTERRUPTED, P.TERMINATED),
        (P.TERMINATED, P.IDLE),
        (P.TERMINATED, P.PREPARATORY),
        (P.FAULT, P.IDLE),
        (P.FAULT, P.PREPARATORY),
    }
    | {(p, P.FAULT) for p in Phase if p is not P.FAULT}
)


# Phases in which a delivery is open and being given or about to be.
ACTIVE = frozenset({P.PREPARATORY, P.READY, P.IRRADIATING, P.INTERRUPTED})

# The phase each console state asks for (UNKNOWN asks for none: it is contradictory).
TARGET_PHASE: Mapping[DeviceState, Phase] = MappingProxyType(
    {
        DeviceState.OFF: P.IDLE,
        DeviceState.SELF_TEST: P.IDLE,
        DeviceState.STANDBY: P.IDLE,
        DeviceState.PREPARATORY: P.PREPARATORY,
        DeviceState.READY: P.READY,
        DeviceState.IRRADIATING: P.IRRADIATING,
        DeviceState.INTERRUPTED: P.INTERRUPTED,
        DeviceState.TERMINATED: P.TERMINATED,
        DeviceState.FAULT: P.FAULT,
        DeviceState.EMERGENCY_STOP: P.FAULT,
    }
)


class IllegalTransition(Exception):
    def __init__(self, src: Phase, dst: Phase) -> None:
        super().__init__(f"illegal tracker transition {src} -> {dst}")
        self.src = src
        self.dst = dst
