"""Fan-out from the one MQTT consumer to every open browser stream.

Each browser stream has a bounded queue. A browser that cannot keep up is not waited for:
its queue is closed, its stream ends, and the browser's EventSource reconnects and starts
again from a fresh snapshot (so it never shows a silently thinned stream as complete).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dashboard.state import Accepted, Rooms

__all__ = ["CLOSED", "Hub", "Outgoing", "Subscriber"]


@dataclass(frozen=True, slots=True)
class Outgoing:
    event: str
    data: dict[str, Any]


CLOSED = Outgoing("closed", {})


@dataclass(eq=False)
class Subscriber:
    only: str | None  # a room key, or None for every room
    queue: asyncio.Queue[Outgoing] = field(default_factory=lambda: asyncio.Queue(maxsize=5000))
    dropped: bool = False

    def offer(self, item: Outgoing) -> None:
        if self.dropped:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.dropped = True
            self.queue = asyncio.Queue(maxsize=1)
            self.queue.put_nowait(CLOSED)


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

    def subscribe(self, only: str | None) -> Subscriber:
        sub = Subscriber(only)
        if self.closing:
            sub.offer(CLOSED)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subs.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def snapshot(self, only: str | None) -> dict[str, Any]:
        return {
            "rooms": self.rooms.snapshot(self._clock(), only),
            "broker": self.broker.out(self.broker_url),
        }

    def message(self, acc: Accepted) -> None:
        out = Outgoing(
            "msg", {"room": acc.room.key, "name": acc.name, "payload": acc.payload, "age_ms": 0}
        )
        for sub in list(self._subs):
            if sub.only is None or sub.only == acc.room.key:
                sub.offer(out)

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
