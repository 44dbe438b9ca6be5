"""The dashboard at the centre of a fabric: each site's link state from its bridge's
notification (`{prefix}/v1/_bridge/{site}/state`, 1 up / 0 down, docs/fabric.md), kept
apart from the rooms, bounded, and given in the snapshot and each tick; a malformed one
is refused and counted, never taken as up."""

from __future__ import annotations

import pytest

from iortd.dashboard.links import MAX_SITES, SiteLinks
from iortd.dashboard.state import Rejected, Rooms

UP, DOWN = b"1", b"0"
T0 = 1_780_000_000.0


def topic(site: str) -> str:
    return f"iort/v1/_bridge/{site}/state"


def test_link_states_and_since() -> None:
    rooms = Rooms("iort")
    assert rooms.receive(topic("site-a"), UP, 1.0, retained=True, wall=T0) is None
    rooms.receive(topic("site-b"), DOWN, 1.0, retained=True, wall=T0)
    links = rooms.snapshot(2.0)["links"]
    # Retained: the dashboard does not know when it changed, only that it was so at T0.
    assert links["site-a"] == {"up": True, "since_ms": None, "seen_ms": T0 * 1000}
    assert links["site-b"] == {"up": False, "since_ms": None, "seen_ms": T0 * 1000}
    rooms.receive(topic("site-a"), DOWN, 3.0, wall=T0 + 60)
    assert rooms.snapshot(4.0)["links"]["site-a"] == {
        "up": False,
        "since_ms": (T0 + 60) * 1000,
        "seen_ms": (T0 + 60) * 1000,
    }
    # A repeat of the same state keeps the time it changed.
    rooms.receive(topic("site-a"), DOWN, 5.0, wall=T0 + 90)
    assert rooms.snapshot(6.0)["links"]["site-a"]["since_ms"] == (T0 + 60) * 1000
    # Each first sight and change once, for the operational log.
    assert rooms.links.take_changes() == [("site-a", True), ("site-b", False), ("site-a", False)]
    assert rooms.links.take_changes() == []
    assert rooms.accepted == 0  # not a room's message
    assert rooms.rooms == {}


@pytest.mark.parametrize(
    ("t", "data", "why"),
    [
        (topic("site-a"), b"yes", "bridge state not 0 or 1"),
        (topic("site-a"), b"", "bridge state not 0 or 1"),
        (topic("Site A"), UP, "bridge state topic"),
        ("iort/v1/_bridge/site-a/other", UP, "bridge state topic"),
        ("iort/v1/_bridge/site-a", UP, "bridge state topic"),
    ],
)
def test_a_malformed_link_state_is_refused(t: str, data: bytes, why: str) -> None:
    rooms = Rooms("iort")
    rooms.receive(topic("site-a"), UP, 1.0, wall=T0)
    with pytest.raises(Rejected) as info:
        rooms.receive(t, data, 2.0, wall=T0)
    assert info.value.reason == why
    assert rooms.snapshot(3.0)["links"]["site-a"]["up"] is True  # unchanged


def test_sites_are_bounded() -> None:
    links = SiteLinks("iort")
    for i in range(MAX_SITES + 10):
        links.receive(f"iort/v1/_bridge/s-{i}/state", UP, wall=T0)
    assert len(links.out()) == MAX_SITES
    assert links.dropped == 10
