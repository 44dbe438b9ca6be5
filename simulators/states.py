"""The simulated console's state table: which state may follow which, which operator action
the console accepts in which states and where it leads, which interlocks latch, and the
errors a refused action raises.

Data, not code: :class:`~iortd.simulators.model.SourceModel` checks every operator action
against :data:`ACTIONS` before it acts and every change of state against
:data:`TRANSITIONS` (a change outside the table is a bug in the model, never a refused
action), so the table is the whole answer to "what does the console allow", readable
without the physics. The states are the device states of docs/domain.md
(:class:`~iortd.kernel.types.DeviceState`); the latches are cleared by the console reset or,
for the selection-scoped ones (applicator, backup timer), by a new selection.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from iortd.kernel.types import DeviceState, Interlock

__all__ = [
    "ACTIONS",
    "DELIVERING",
    "LATCHING",
    "POWERED",
    "SELECTION_ACTIVE",
    "TRANSITIONS",
    "IllegalTransition",
    "InterlocksNotClear",
]

_S = DeviceState

# States in which the source is powered up and a machine fault can latch.
POWERED: tuple[DeviceState, ...] = (
    _S.SELF_TEST,
    _S.STANDBY,
    _S.PREPARATORY,
    _S.READY,
    _S.IRRADIATING,
    _S.INTERRUPTED,
    _S.TERMINATED,
)
# A selection (plan + applicator) is being prepared or delivered.
SELECTION_ACTIVE = frozenset({_S.PREPARATORY, _S.READY, _S.IRRADIATING, _S.INTERRUPTED})
# A delivery has started and not yet terminated.
DELIVERING = frozenset({_S.IRRADIATING, _S.INTERRUPTED})

TRANSITIONS: frozenset[tuple[DeviceState, DeviceState]] = frozenset(
    {
        (_S.OFF, _S.SELF_TEST),
        (_S.SELF_TEST, _S.STANDBY),
        (_S.STANDBY, _S.PREPARATORY),
        (_S.TERMINATED, _S.PREPARATORY),  # a new selection after a termination
        (_S.PREPARATORY, _S.READY),
        (_S.READY, _S.PREPARATORY),  # an interlock opened while armed: disarm
        (_S.READY, _S.IRRADIATING),
        (_S.IRRADIATING, _S.INTERRUPTED),
        (_S.INTERRUPTED, _S.IRRADIATING),
        (_S.IRRADIATING, _S.TERMINATED),
        (_S.INTERRUPTED, _S.TERMINATED),
        (_S.FAULT, _S.STANDBY),  # two-step console reset
        (_S.EMERGENCY_STOP, _S.STANDBY),  # release at the button, then console reset
        *((s, _S.FAULT) for s in POWERED),
        *((s, _S.EMERGENCY_STOP) for s in (*POWERED, _S.FAULT)),
        # Power can always be cut; latched faults survive it (see power_on).
        *((s, _S.OFF) for s in (*POWERED, _S.FAULT, _S.EMERGENCY_STOP)),
    }
)

# Operator actions: the states the console accepts each one in, and where it leads.
ACTIONS: Mapping[str, tuple[frozenset[DeviceState], DeviceState]] = MappingProxyType(
    {
        "power_on": (frozenset({_S.OFF}), _S.SELF_TEST),
        "power_off": (frozenset({*POWERED, _S.FAULT, _S.EMERGENCY_STOP}), _S.OFF),
        "load_plan": (frozenset({_S.STANDBY, _S.TERMINATED}), _S.PREPARATORY),
        "arm": (frozenset({_S.PREPARATORY}), _S.READY),
        "start_beam": (frozenset({_S.READY}), _S.IRRADIATING),
        "pause": (frozenset({_S.IRRADIATING}), _S.INTERRUPTED),
        "resume": (frozenset({_S.INTERRUPTED}), _S.IRRADIATING),
        "end_delivery": (frozenset(DELIVERING), _S.TERMINATED),
        "reset_request": (frozenset({_S.FAULT, _S.EMERGENCY_STOP}), _S.STANDBY),
        "reset_confirm": (frozenset({_S.FAULT, _S.EMERGENCY_STOP}), _S.STANDBY),
    }
)


# Interlocks that latch when tripped (the others follow their physical condition).
LATCHING = frozenset(
    {
        Interlock.APPLICATOR,
        Interlock.TUBE_VOLTAGE,
        Interlock.TUBE_CURRENT,
        Interlock.DOSE_CHANNELS,
        Interlock.DOSE_RATE,
        Interlock.BACKUP_TIMER,
    }
)


class IllegalTransition(Exception):
    """The console refuses an operator action in the current state."""

    def __init__(
        self,
        action: str,
        from_state: DeviceState,
        to_state: DeviceState,
        detail: str | None = None,
    ) -> None:
        self.action = action
        self.from_state = from_state
        self.to_state = to_state
        message = f"{action}: {from_state} -> {to_state} is not allowed"
        super().__init__(f"{message} ({detail})" if detail else message)


class InterlocksNotClear(IllegalTransition):
    """The action needs every interlock clear, and some are not."""

    def __init__(
        self,
        action: str,
        from_state: DeviceState,
        to_state: DeviceState,
        tripped: frozenset[Interlock],
    ) -> None:
        self.tripped = tripped
        names = ", ".join(sorted(str(i) for i in tripped))
        super().__init__(action, from_state, to_state, f"interlocks not clear: {names}")
