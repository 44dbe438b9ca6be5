"""Fan-out from the one MQTT consumer to every open browser stream.

A stream follows one room (a room page), the rooms of one site (the overview of a site)
or every room; the overview's streams get summaries (no plots or event lists: the
overview does not show them, and the snapshot of hundreds of rooms stays small), and of at
most ``SNAPSHOT_ROOMS`` rooms, the most recently valid (``rooms_omitted`` says how many
were left out). Rooms
removed (aged out, or evicted for memory) are announced as ``removed``.

Each browser stream has a bounded queue, in messages (``QUEUE_MESSAGES``) and in the bytes
of the payloads waiting (``QUEUE_BYTES``). A browser that cannot keep up is not waited for:
its queue is closed, its stream ends, and the browser's EventSource reconnects and starts
again from a fresh snapshot (so it never shows a silently thinned stream as complete).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from iortd.dashboard.alarms import alarm_view
from iortd.dashboard.state import Accepted, Rooms

__all__ = [
    "CLOSED",
    "QUEUE_BYTES",
    "QUEUE_MESSAGES",
    "SNAPSHOT_ROOMS",
    "Hub",
    "Outgoing",
    "Subscriber",
]

QUEUE_MESSAGES = 5000  # per browser stream
QUEUE_BYTES = 16 * 1024 * 1024  # per browser stream, of payloads waiting
SNAPSHOT_ROOMS = 1000  # rooms in an overview's snapshot, the most recently valid
SUMMARY_BYTES = 256  # what an overview's summary of an alarm list is charged


@dataclass(frozen=True, slots=True)
class Outgoing:
    event: str
    data: dict[str, Any]
    size: int = 0  # bytes of the payload it carries, charged while it waits


CLOSED = Outgoing("closed", {})


@dataclass(eq=False)
class Subscriber:
    only: str | None  # a room key, or None for every room
    site: str | None = None  # only the rooms of this site

    queue: asyncio.Queue[Outgoing] = field(
        default_factory=lambda: asyncio.Queue(maxsize=QUEUE_MESSAGES)
    )
    dropped: bool = False
    bytes: int = 0  # of the messages waiting

    def wants(self, room: str) -> bool:
        return (self.only is None or self.only == room) and (
            self.site is None or room.split("/", 1)[0] == self.site
        )

    def offer(self, item: Outgoing) -> None:
        if self.dropped:
            return
        if self.bytes + item.size <= QUEUE_BYTES:
            try:
                self.queue.put_nowait(item)
            except asyncio.QueueFull:
                pass
            else:
                self.bytes += item.size
                return
        # Too far behind: end its stream; the browser reconnects to a fresh snapshot.
        self.dropped = True
        self.bytes = 0
        self.queue = asyncio.Queue(maxsize=1)
        self.queue.put_nowait(CLOSED)

    async def next(self) -> Outgoing:
        item = await self.queue.get()
        self.bytes -= item.size
        return item


def _alarms_out(acc: Accepted, *, summary: bool) -> Outgoing:
    """An ``alarms`` message as the pages take it (iortd.dashboard.alarms): the rows for a
    room page, the counts for an overview (which shows no list), the envelope as payload."""
    view = alarm_view(acc.payload, summary=summary)
    data = {"room": acc.room.key, "name": acc.name, "payload": view.pop("envelope")}
    return Outgoing(
        "msg", {**data, "alarms": view, "age_ms": 0}, SUMMARY_BYTES if summary else acc.size
    )


@dataclass
class BrokerState:
    connected: bool = False
    reason: str = "not connected yet"
    since: float = field(default_factory=time.monotonic)

    def out(self, url: str) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "reason": self.reason,
            "url": url,
            "age_ms": round((time.monotonic() - self.since) * 1000),
        }


class Hub:
    def __init__(self, rooms: Rooms, broker_url: str, *, clock: Callable[[], float]) -> None:
        self.rooms = rooms
        self.broker_url = broker_url
        self.broker = BrokerState()
        self._clock = clock
        self._subs: set[Subscriber] = set()
        self.closing = False
        # Told of every accepted message (commanding.py waits for the daemons' answers).
        self.listeners: list[Callable[[Accepted], None]] = []
        # Set by the MQTT consumer while it is connected: publish (topic, payload) at QoS 1,
        # never retained (the signed commands the page sends; dashboard/commanding.py).
        self.publish: Callable[[str, bytes], Awaitable[None]] | None = None

    def subscribe(self, only: str | None, site: str | None = None) -> Subscriber:
        sub = Subscriber(only, site)
        if self.closing:
            sub.offer(CLOSED)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subs.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def snapshot(self, only: str | None, site: str | None = None) -> dict[str, Any]:
        """One room in full, or (the overview) every room or one site's as summaries."""
        overview = only is None
        limit = SNAPSHOT_ROOMS if overview else None
        snap = self.rooms.snapshot(self._clock(), only, site=site, summary=overview, limit=limit)
        return {**snap, "broker": self.broker.out(self.broker_url)}

    def tick(self, sub: Subscriber) -> dict[str, Any]:
        """What a stream's once-a-second ``tick`` carries: the link is alive, the rooms
        per site (for the overview's list of sites), and the reject counters of the rooms
        it follows (so that a flood of bad messages costs the
        browser one small event a second, not one per message)."""
        rejected = {
            k: sum(v.values()) for k, v in self.rooms.rejects.items() if k in self.rooms.rooms
        }
        sites: dict[str, int] = {}
        for room in self.rooms.rooms.values():
            sites[room.site] = sites.get(room.site, 0) + 1
        return {
            "broker": self.broker.connected,
            "t": time.time(),
            "sites": dict(sorted(sites.items())),
            "links": self.rooms.links.out(),
            "rejected": {k: n for k, n in rejected.items() if sub.wants(k)},
            "diagnostics": self.rooms.diagnostics(),
        }

    def message(self, acc: Accepted) -> None:
        out = Outgoing(
            "msg",
            {"room": acc.room.key, "name": acc.name, "payload": acc.payload, "age_ms": 0},
            acc.size,
        )
        if acc.name == "alarms":
            # Rows for a room page, counts for an overview; each made only if someone wants it.
            subs = [sub for sub in self._subs if sub.wants(acc.room.key)]
            pages = [sub for sub in subs if sub.only is not None]
            overviews = [sub for sub in subs if sub.only is None]
            for group, summary in ((pages, False), (overviews, True)):
                if group:
                    item = _alarms_out(acc, summary=summary)
                    for sub in group:
                        sub.offer(item)
        else:
            for sub in list(self._subs):
                if sub.wants(acc.room.key):
                    sub.offer(out)
        for listener in list(self.listeners):
            listener(acc)
        self.removed(self.rooms.take_gone())

    def removed(self, keys: list[str]) -> None:
        for key in keys:
            out = Outgoing("removed", {"room": key})
            for sub in list(self._subs):
                if sub.wants(key):
                    sub.offer(out)

    def sweep(self) -> None:
        """Remove the rooms aged out past their bound and tell the browsers."""
        self.removed(self.rooms.sweep(self._clock()))

    def set_broker(self, connected: bool, reason: str) -> None:
        self.broker = BrokerState(connected, reason)
        out = Outgoing("broker", self.broker.out(self.broker_url))
        for sub in list(self._subs):
            sub.offer(out)

    def close(self) -> None:
        """End every stream (shutdown): the browsers see the link go and reconnect."""
        self.closing = True
        for sub in list(self._subs):
            sub.offer(CLOSED)
