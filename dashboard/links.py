"""Each site's link to the central broker, from its bridge's own notification.

In a fabric of site brokers bridged to a central one (docs/fabric.md), every site's bridge
publishes ``1`` (up) or ``0`` (down), retained, on ``{prefix}/v1/_bridge/{site}/state``;
the ``0`` is the bridge's will at the centre, so the central broker says so when a site
vanished without a word. A dashboard pointed at the central broker shows, per site,
whether its link is up; while it is down, every room of that site is *unknown because of
the link*, not merely stale: what the centre holds of them is from before the cut, and
their daemons may be delivering right now (the site's own dashboard still sees them).

What is kept per site: ``up``, ``since_ms`` (the dashboard's UTC clock when it saw the state
change; None when it has only seen the retained value, whose age it cannot know) and
``seen_ms`` (when it last received it). A payload other than exactly ``0`` or ``1``, or a
topic not of that shape, is refused (counted by the caller with the rooms' rejects) and
changes nothing: never taken as up. At most ``MAX_SITES`` sites are kept; the topics are
writable only by the bridges (the generated ACL), so more is a misconfiguration or a
forgery, counted in ``dropped``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["BRIDGE_LEVEL", "MAX_SITES", "SiteLink", "SiteLinks"]

BRIDGE_LEVEL = "_bridge"
MAX_SITES = 1024
_SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


class LinkRejected(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class SiteLink:
    up: bool
    since_ms: float | None
    seen_ms: float

    def out(self) -> dict[str, Any]:
        return {"up": self.up, "since_ms": self.since_ms, "seen_ms": self.seen_ms}


class SiteLinks:
    def __init__(self, prefix: str) -> None:
        self.head = f"{prefix}/v1/{BRIDGE_LEVEL}/"
        self.sites: dict[str, SiteLink] = {}
        self.dropped = 0
        # (site, up) for each change (or first sight) not yet taken: logged by the caller.
        self._changes: list[tuple[str, bool]] = []

    def handles(self, topic: str) -> bool:
        """Whether ``topic`` is under the bridges' level (valid or not)."""
        return topic.startswith(self.head) or topic == self.head.rstrip("/")

    def receive(
        self, topic: str, data: bytes, *, wall: float | None, retained: bool = False
    ) -> SiteLink | None:
        """Apply one notification; the site's link, or None when it was not kept (over
        the bound). Raises LinkRejected for a malformed one."""
        parts = topic[len(self.head) :].split("/") if topic.startswith(self.head) else []
        if len(parts) != 2 or parts[1] != "state" or not _SLUG.fullmatch(parts[0]):
            raise LinkRejected("bridge state topic")
        if data not in (b"0", b"1"):
            raise LinkRejected("bridge state not 0 or 1")
        site, up = parts[0], data == b"1"
        now_ms = None if wall is None else wall * 1000
        link = self.sites.get(site)
        if link is None:
            if len(self.sites) >= MAX_SITES:
                self.dropped += 1
                return None
            link = self.sites[site] = SiteLink(up, None if retained else now_ms, now_ms or 0.0)
            self._note(site, up)
            return link
        if link.up != up:
            link.up = up
            link.since_ms = now_ms
            self._note(site, up)
        link.seen_ms = now_ms or link.seen_ms
        return link

    def _note(self, site: str, up: bool) -> None:
        if len(self._changes) < MAX_SITES:
            self._changes.append((site, up))

    def take_changes(self) -> list[tuple[str, bool]]:
        """The changes since the last call (at most ``MAX_SITES``), oldest first."""
        out, self._changes = self._changes, []
        return out

    def out(self) -> dict[str, dict[str, Any]]:
        return {site: link.out() for site, link in sorted(self.sites.items())}
