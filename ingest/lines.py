"""What a central consumer has of each stream, and the gaps it asks the rooms to repair.

Pure bookkeeping (no I/O, no clock reads: the caller passes ``now``), used by the ingest
service (ingest/service.py) and rebuilt from its store at start.

A room's stream (``telemetry``, ``applicator``, ``events``) counts ``seq`` per topic from
0; it never repeats or goes back across the room's restarts (the outbox persists it), so
one :class:`SeqLine` per (room, topic) holds every seq *accounted for*: received (in any
session) or declared by the room on ``skip`` (a declared range counts as accounted, never
as loss). The session of each seq is kept as where each session's seqs begin, which is
what a replay request names. The one case where a room reuses seqs (its outbox could not
be written at all, docs/mqtt-topics.md) is stored under both sessions and does not upset
the line: the second copy is simply already accounted for.

A **gap** is a hole below the highest seq accounted for. It is asked for only after it
has been open ``settle_s`` (messages overtaken by others, a bridge's queue draining, a
replay still on its way), then again while it stays open, at ``retry_s`` doubling up to
``retry_max_s``; each request covers at most ``max_span`` seqs and names the session of
the seq just below the hole (or just above, for a hole at the start of what is known).
A hole that straddles a restart of the room whose newer session's first seqs were lost is
asked of the older session: the room then declares those seqs ``not_held`` for it
(documented limitation, docs/ingest.md). Seqs before the first one received of a stream
are not asked for: an ingest started late does not ask every room for its history.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

__all__ = ["Gap", "GapPolicy", "Request", "SeqLine"]


@dataclass(frozen=True, slots=True)
class GapPolicy:
    settle_s: float = 2.0
    retry_s: float = 5.0
    retry_max_s: float = 60.0
    max_span: int = 20_000


@dataclass(slots=True)
class Gap:
    first: int
    last: int
    noticed: float
    attempts: int = 0
    next_ask: float = 0.0


@dataclass(frozen=True, slots=True)
class Request:
    topic: str
    session: int
    first: int
    last: int


@dataclass(slots=True)
class SeqLine:
    """One (room, topic): accounted seqs as sorted, disjoint, merged [start, end] runs."""

    topic: str
    runs: list[list[int]] = field(default_factory=list)
    first_of: dict[int, int] = field(default_factory=dict)  # session -> its first seq known
    gaps: list[Gap] = field(default_factory=list)

    def add(self, first: int, last: int) -> int:
        """Account for ``first..last``; returns how many of them are new."""
        runs = self.runs
        i = bisect.bisect_left(runs, [first, -1])
        if i > 0 and runs[i - 1][1] >= first - 1:
            i -= 1
        j = i
        covered = 0
        lo, hi = first, last
        while j < len(runs) and runs[j][0] <= last + 1:
            a, b = runs[j]
            covered += max(0, min(b, last) - max(a, first) + 1)
            lo, hi = min(lo, a), max(hi, b)
            j += 1
        runs[i:j] = [[lo, hi]]
        return (last - first + 1) - covered

    def received(self, seq: int, session: int) -> int:
        """A message: accounts for its seq and notes its session. Returns 1 if new."""
        known = self.first_of.get(session)
        if known is None or seq < known:
            self.first_of[session] = seq
        return self.add(seq, seq)

    def contains(self, seq: int) -> bool:
        i = bisect.bisect_right(self.runs, [seq, 2**64]) - 1
        return i >= 0 and self.runs[i][0] <= seq <= self.runs[i][1]

    def session_at(self, seq: int) -> int | None:
        """The session whose first known seq is the largest at or below ``seq``."""
        best: tuple[int, int] | None = None
        for session, first in self.first_of.items():
            if first <= seq and (best is None or (first, session) > best):
                best = (first, session)
        return None if best is None else best[1]

    def holes(self) -> list[tuple[int, int]]:
        return [(a[1] + 1, b[0] - 1) for a, b in zip(self.runs, self.runs[1:], strict=False)]

    def missing(self) -> int:
        return sum(b - a + 1 for a, b in self.holes())

    def in_gap(self, seq: int) -> Gap | None:
        for g in self.gaps:
            if g.first <= seq <= g.last:
                return g
        return None

    def reconcile(self, now: float, policy: GapPolicy) -> list[Gap]:
        """Bring :attr:`gaps` in line with the holes; returns the gaps that closed."""
        old, new = self.gaps, []
        for a, b in self.holes():
            over = [g for g in old if g.first <= b and a <= g.last]
            if over:
                noticed = min(g.noticed for g in over)
                attempts = max(g.attempts for g in over)
                next_ask = max(g.next_ask for g in over)
                new.append(Gap(a, b, noticed, attempts, next_ask))
            else:
                new.append(Gap(a, b, now, 0, now + policy.settle_s))
        self.gaps = new
        return [g for g in old if not any(n.first <= g.last and g.first <= n.last for n in new)]

    def due(
        self, now: float, policy: GapPolicy, limit: int = 2**31, *, retries: bool = True
    ) -> list[Request]:
        """Requests for the gaps whose time has come, at most ``limit`` (each marked
        asked; the others stay due); ``retries`` false: only gaps never asked for."""
        out: list[Request] = []
        for g in self.gaps:
            if now < g.next_ask or len(out) >= limit or (g.attempts and not retries):
                continue
            session = self.session_at(g.first - 1) or self.session_at(g.last + 1)
            if session is None:
                continue
            last = min(g.last, g.first + policy.max_span - 1)
            out.append(Request(self.topic, session, g.first, last))
            g.attempts += 1
            g.next_ask = now + min(policy.retry_max_s, policy.retry_s * 2 ** (g.attempts - 1))
        return out
