"""Every verification object the daemon's check can produce is one the dashboard draws.

The dashboard refuses a ``delivery`` payload whose ``verification`` contradicts itself
(dashboard/room.py ``verification_error``) and keeps what it showed before: so a real
check that the dashboard judged "inconsistent" would leave a room showing its previous
outcome (possibly VERIFIED) while the daemon says NOT_VERIFIED. Each outcome the pure
check (daemon/verification.py) makes, including the partial overrides, goes through the
daemon's payload and the dashboard's checks here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from test_verification import NOW, SPH30, check, inputs

from iortd.daemon.verification import Console, Override, judge, public_object
from iortd.dashboard.room import verification_error
from iortd.kernel.types import VerificationItem, VerificationTrigger


def drawn(entry: dict[str, Any]) -> tuple[str, str] | None:
    payload = {"delivery": {"verification": public_object(entry, NOW)}}
    return verification_error(payload)


def test_every_outcome_the_check_makes_is_drawn_by_the_dashboard() -> None:
    bad = inputs(console=Console(20.0, 1500.0, SPH30))
    e = check(bad)
    actual = next(c["actual"] for c in e["checks"] if c["item"] == "time")
    ovr = Override(VerificationItem.TIME, "measured today", "phys.curie", "n1", actual)
    cases = {
        "verified": check(inputs()),
        "not verified": e,
        "no prescription": check(inputs(prescription=None, sha256=None)),
        "overridden": judge(replace(bad, overrides=[ovr]), VerificationTrigger.OVERRIDE, "D"),
        # An override in force for one item while another fails: NOT_VERIFIED.
        "partly overridden": check(
            replace(bad, console=Console(20.5, 1500.0, SPH30), overrides=[ovr])
        ),
        # The override's value no longer the console's: NOT_VERIFIED again.
        "stale override": check(
            replace(bad, console=Console(20.0, 1510.0, SPH30), overrides=[ovr])
        ),
    }
    outcomes = {name: c["outcome"] for name, c in cases.items()}
    assert outcomes == {
        "verified": "VERIFIED",
        "not verified": "NOT_VERIFIED",
        "no prescription": "NOT_VERIFIED",
        "overridden": "VERIFIED_OVR",
        "partly overridden": "NOT_VERIFIED",
        "stale override": "NOT_VERIFIED",
    }
    assert {name: drawn(c) for name, c in cases.items()} == dict.fromkeys(cases)
