"""Serving a replay request from what the room still holds (issue 22, gap repair).

A central consumer (``iort-ingest``) that finds a gap in a room's ``(session, topic,
seq)`` sends a signed ``cmd/replay`` with the body ``{"topic", "session", "first",
"last"}`` (daemon/replay.py judges and records it); this module serves it:

* **What is held**: :meth:`Outbox.held <iortd.daemon.mqtt.outbox.Outbox.held>`, the
  acknowledged journal segments kept ``[mqtt] replay_retention_s`` plus what is still
  pending. Each held message is queued to go out again **as it was**: its original
  ``session`` and ``seq``, marked ``historical: true``, on its own topic.
* **What is not** is declared on the ``skip`` topic, reason ``not_held``, one message per
  missing run of seqs (its own ``seq``, through the outbox like ``events``), so that the
  consumer counts it as accounted for rather than asking for ever. ``last`` is first cut
  to the last ``seq`` this room has handed out on the topic (no session has used a larger
  one: nothing is declared about seqs that may still come).
* **Bounded**: at most :data:`MAX_SPAN` seqs per request (a larger one is refused; the
  consumer splits it); at most ``max_per_minute`` requests a minute (a sliding window;
  beyond, refused ``rate_limited``); the queue of messages to send again is bounded in
  bytes (beyond, refused ``busy``); and the sink takes from it at most ``rate_per_s``
  messages a second (a token bucket), between its live batches, so that a replay never
  holds up the live stream for long. Refusals are the caller's to record.

The queue lives in memory: a request in progress when the daemon stops is not resumed;
the consumer asks again (its gap is still open). The sink (daemon/mqtt/sink.py) owns one
:class:`ReplayServer` and sends what :meth:`ReplayServer.take` hands it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from iortd.daemon.mqtt.outbox import Outbox, Record
from iortd.daemon.mqtt.payloads import SEQ_MAX, SKIPPABLE_TOPICS, Envelope, skip_payload

__all__ = [
    "MAX_SPAN",
    "ReplayRange",
    "ReplayRefused",
    "ReplayServer",
    "Served",
    "missing_runs",
    "parse_range",
]

MAX_SPAN = 20_000  # seqs per request: ~33 min of a 10 Hz stream, ~12 MB queued at most
MAX_QUEUED_BYTES = 32 * 1024 * 1024
WINDOW_S = 60.0
_BODY_KEYS = frozenset({"topic", "session", "first", "last"})


class ReplayRefused(Exception):
    """A replay request not served; ``reason`` a fixed word, ``detail`` one line."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True, slots=True)
class ReplayRange:
    topic: str
    session: int
    first: int
    last: int

    def fields(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "session": self.session,
            "first": self.first,
            "last": self.last,
        }


@dataclass(frozen=True, slots=True)
class Served:
    """What a request gave: messages queued to go again, seq runs declared ``not_held``,
    and the ``last`` actually judged (cut to the last seq handed out)."""

    served: int
    skipped: tuple[tuple[int, int], ...]
    judged_last: int

    @property
    def skipped_seqs(self) -> int:
        return sum(b - a + 1 for a, b in self.skipped)


def _int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_range(body: Mapping[str, Any]) -> ReplayRange:
    """The body of a ``replay`` command; ReplayRefused(``malformed_body``) says what is
    wrong (never echoing the sender's text)."""
    if set(body) != _BODY_KEYS:
        raise ReplayRefused("malformed_body", f"the body holds exactly {sorted(_BODY_KEYS)}")
    topic, session, first, last = body["topic"], body["session"], body["first"], body["last"]
    if topic not in SKIPPABLE_TOPICS:
        raise ReplayRefused("malformed_body", f"topic: one of {', '.join(SKIPPABLE_TOPICS)}")
    if not (_int(session) and 1 <= session <= SEQ_MAX):
        raise ReplayRefused("malformed_body", "session: an integer in 1..2**64-1")
    if not (_int(first) and _int(last) and 0 <= first <= last <= SEQ_MAX):
        raise ReplayRefused("malformed_body", "first, last: integers, 0 <= first <= last < 2**64")
    if last - first + 1 > MAX_SPAN:
        raise ReplayRefused("span_too_large", f"at most {MAX_SPAN} seqs per request; split it")
    return ReplayRange(topic, session, first, last)


def missing_runs(first: int, last: int, have: list[int]) -> list[tuple[int, int]]:
    """The runs of ``first..last`` not in ``have`` (sorted, within the range)."""
    runs: list[tuple[int, int]] = []
    at = first
    for q in have:
        if q > at:
            runs.append((at, q - 1))
        at = max(at, q + 1)
    if at <= last:
        runs.append((at, last))
    return runs


class ReplayServer:
    """The sink's replay queue, its rate limits and the serving of one request."""

    def __init__(
        self,
        rate_per_s: float,
        max_per_minute: int,
        wake: Callable[[], None] = lambda: None,
        retention_s: float = 0.0,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``retention_s``: how long the outbox holds what was acknowledged (the sink
        opens it with that)."""
        self.rate_per_s = rate_per_s
        self.max_per_minute = max_per_minute
        self.wake = wake  # the sink's: something to send
        self._mono = monotonic
        self._requests: deque[float] = deque()
        self._queue: deque[Record] = deque()
        self.queued_bytes = 0
        self._tokens = 0.0
        self._filled_at = monotonic()
        self.retention_s = retention_s
        # The last seq the sink handed out per topic in this run: a range is cut there.
        self.handed: dict[str, int] = {}
        self.sent = 0  # messages sent again, since start
        self.served = 0  # requests served, since start

    def admit(self) -> None:
        """Count a request against the minute's window; ReplayRefused when over it or
        when the queue is full."""
        now = self._mono()
        while self._requests and now - self._requests[0] >= WINDOW_S:
            self._requests.popleft()
        if len(self._requests) >= self.max_per_minute:
            raise ReplayRefused(
                "rate_limited", f"more than {self.max_per_minute} replay requests a minute"
            )
        if self.queued_bytes >= MAX_QUEUED_BYTES // 2:
            raise ReplayRefused("busy", "a replay is still being sent; ask again later")
        self._requests.append(now)

    async def serve(
        self,
        outbox: Outbox,
        rng: ReplayRange,
        skip_env: Callable[[], Envelope],
    ) -> Served:
        """Queue what ``outbox`` holds of ``rng``; declare each missing run on ``skip``
        (``not_held``, in the envelope ``skip_env`` makes). The range is cut at the last
        seq handed out on its topic in this run (:attr:`handed`; not cut before the
        first). A session newer than the outbox's is refused (``unknown_session``)."""
        if rng.session > outbox.session:
            raise ReplayRefused("unknown_session", f"this room is at session {outbox.session}")
        last = min(rng.last, self.handed.get(rng.topic, rng.last))
        if last < rng.first:
            return Served(0, (), last)
        recs = await outbox.held(rng.topic, rng.session, rng.first, last)
        for rec in recs:
            self._queue.append(rec)
            self.queued_bytes += len(rec.line)
        runs = missing_runs(rng.first, last, [r.seq for r in recs])
        for a, b in runs:
            p = skip_payload(
                skip_env(), of_topic=rng.topic, of_session=rng.session, first=a, last=b,
                reason="not_held",
            )  # fmt: skip
            outbox.add("skip", p)
        self.served += 1
        if recs or runs:
            self.wake()
        return Served(len(recs), tuple(runs), last)

    # ---- the sink's side ----------------------------------------------------------------

    def _refill(self) -> None:
        now = self._mono()
        burst = max(1.0, self.rate_per_s)  # at most a second's worth at once
        self._tokens = min(burst, self._tokens + (now - self._filled_at) * self.rate_per_s)
        self._filled_at = now

    def take(self, most: int) -> list[Record]:
        """Up to ``most`` messages to send again now, within the rate."""
        if not self._queue:
            return []
        self._refill()
        k = min(most, int(self._tokens), len(self._queue))
        self._tokens -= k
        out = [self._queue.popleft() for _ in range(k)]
        self.queued_bytes -= sum(len(r.line) for r in out)
        self.sent += k
        return out

    def next_due(self) -> float | None:
        """Seconds until :meth:`take` can hand out something (None: nothing queued)."""
        if not self._queue:
            return None
        self._refill()
        return max(0.0, (1.0 - self._tokens) / self.rate_per_s)

    async def send(self, most: int, send: Callable[..., Coroutine[Any, Any, None]]) -> bool:
        """Send up to ``most`` queued messages again (historical), within the rate, at once
        (``send(rec, historical=True)``); False when there was none to send now."""
        again = self.take(most)
        if again:
            async with asyncio.TaskGroup() as tg:
                for rec in again:
                    tg.create_task(send(rec, historical=True))
        return bool(again)

    def sooner(self, timeout: float | None) -> float | None:
        """``timeout``, or sooner when a queued message may go before it."""
        due = self.next_due()
        return due if timeout is None else timeout if due is None else min(timeout, due)

    def drop(self) -> int:
        """Forget the queue (the sink closing): the consumer asks again. Returns how many."""
        n = len(self._queue)
        self._queue.clear()
        self.queued_bytes = 0
        return n
