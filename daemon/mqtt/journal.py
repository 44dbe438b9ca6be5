"""The MQTT outbox's files: the journal's lines, ``state.json`` and recovery from them.

Pure file work, run in a worker thread by :mod:`~iortd.daemon.mqtt.outbox` (which says why
the outbox is built this way); kept apart so that each module stays one idea.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from iortd.daemon.mqtt.payloads import SEQ_MAX, TOPICS, Payload
from iortd.kernel.durable import write_atomic

__all__ = [
    "JOURNAL_FIRST",
    "RESERVE_BLOCK",
    "SAMPLE_TOPICS",
    "OutboxError",
    "Record",
    "Recovered",
    "Segment",
    "journal_line",
    "recover",
    "recovered_record",
    "save_state",
]

# Published from memory, within a durable block of seqs (outbox.py): after a crash, what
# the journal does not hold of the block is declared skipped.
SAMPLE_TOPICS = ("telemetry", "applicator")
# Published only once journaled (fsync'd): events (log-first, then journal-first: a crash
# never loses one a subscriber could have missed) and the skips that declare a hole.
# Everything else goes out from memory within its topic's durable block of seqs.
JOURNAL_FIRST = ("events", "skip")
# Seqs reserved per topic and block (one state save each), asked for when less than half
# is left: 10 s of 100 Hz telemetry, 100 s at 10 Hz. A crash skips the rest of a block.
RESERVE_BLOCK = 1000
STATE_FILE = "state.json"
PREV_STATE_FILE = "state.copy.json"
SEGMENT_RE = re.compile(r"^outbox-(\d{16})\.jsonl$")


class OutboxError(Exception):
    """The outbox directory cannot be used (names the file and what is wrong)."""


@dataclass(slots=True)
class Record:
    """One message, kept as its journal line only (memory is what the bound counts: a
    parsed payload would cost several times the bytes). ``created_ns`` is this process's
    monotonic clock at creation, -1 for a record recovered from disk."""

    n: int
    topic: str
    retained: bool
    seq: int
    session: int
    line: bytes  # {"n":..,"t":..,"r":..,"p":<body>}\n
    body_at: int  # where the payload's bytes start in ``line``
    created_ns: int
    journaled: bool = False
    done: bool = False  # acknowledged, thinned or superseded: nothing left to send

    @property
    def body(self) -> bytes:
        """The payload as published live."""
        return self.line[self.body_at : -2]

    @property
    def payload(self) -> Payload:
        payload: Payload = orjson.loads(self.body)
        return payload

    def wire(self, *, historical: bool) -> bytes:
        """The bytes to publish: the live body, or the same payload marked historical (the
        envelope's ``historical`` is the first such key in the payload)."""
        body = self.body
        if not historical:
            return body
        return body.replace(b'"historical":false', b'"historical":true', 1)


@dataclass(slots=True)
class Segment:
    path: Path
    first_n: int
    last_n: int
    size: int
    acked_at: float | None = None  # monotonic, when seen fully acknowledged (held since)


@dataclass(slots=True)
class Recovered:
    session: int
    next_seq: dict[str, int]
    next_n: int
    acked_through: int
    pending: list[Record] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    quarantined: bool = False
    # The previous run's unvouched seqs: (topic, its session, first, last), inclusive.
    skips: list[tuple[str, int, int, int]] = field(default_factory=list)


def save_state(directory: Path, state: bytes) -> None:
    # Two copies, each replaced atomically: if one is ever unreadable (a disk error, an
    # edit), the counters are not lost with it, and the other is just as new.
    write_atomic(directory / STATE_FILE, state)
    write_atomic(directory / PREV_STATE_FILE, state)


def journal_line(n: int, topic: str, retained: bool, body: bytes) -> tuple[bytes, int]:
    """The journal line around the payload's bytes as published (serialized once), and
    where those bytes start in it."""
    head = orjson.dumps({"n": n, "t": topic, "r": retained})[:-1] + b',"p":'
    return head + body + b"}\n", len(head)


def _quarantine(directory: Path, path: Path, why: str) -> str:
    q = directory / "quarantine"
    q.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = q / f"{path.name}.{stamp}"
    path.replace(target)
    return f"{path}: {why}; set aside as {target}"


def _parse_state(raw: bytes) -> dict[str, Any]:
    state = orjson.loads(raw)
    if not isinstance(state, dict):
        raise TypeError("not a JSON object")
    ints = (state["session"], state["next_n"], state["acked_through"])
    ints += tuple(state["next_seq"].values())
    ints += tuple(state.get("reserved", {}).values())  # absent before the seq blocks
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= -1 for x in ints):
        raise TypeError("session, next_n, acked_through and next_seq must be integers")
    return state


def _read_state(directory: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The state, or its copy if the state is missing or unreadable."""
    problems = []
    for name in (STATE_FILE, PREV_STATE_FILE):
        path = directory / name
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            continue
        try:
            state = _parse_state(raw)
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            problems.append(_quarantine(directory, path, f"unreadable ({exc})"))
            continue
        if problems:
            problems.append(f"{path}: the copy of the state was used instead")
        return state, problems
    return None, problems


def _parse_line(raw: bytes) -> tuple[int, str, bool, Payload]:
    """One journal line -> (n, topic, retained, payload); raises ValueError/TypeError."""
    obj = orjson.loads(raw)
    n, topic, retained, payload = obj["n"], obj["t"], obj["r"], obj["p"]
    if topic not in TOPICS or not isinstance(n, int) or not isinstance(payload, dict):
        raise TypeError("not an outbox record")
    if not isinstance(payload["seq"], int) or not isinstance(payload["session"], int):
        raise TypeError("payload without integer seq and session")
    return n, topic, bool(retained), payload


def recovered_record(n: int, topic: str, payload: Payload, raw: bytes) -> Record:
    at = raw.find(b',"p":') + 5
    if at < 5 or not raw.endswith(b"}\n"):  # not our own serialization: make it so
        raw, at = journal_line(n, topic, False, orjson.dumps(payload))
    return Record(n, topic, False, payload["seq"], payload["session"], raw, at, -1, journaled=True)


def recover(directory: Path) -> Recovered:
    """Read state.json and the journal; what was not acknowledged becomes pending."""
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob("*.tmp"):  # a save cut short: never renamed, not used
        leftover.unlink()
    state, problems = _read_state(directory)
    rec = Recovered(
        session=0 if state is None else state["session"],
        next_seq=dict.fromkeys(TOPICS, 0),
        next_n=0 if state is None else state["next_n"],
        acked_through=-1 if state is None else state["acked_through"],
    )
    rec.problems += problems
    if state is not None:
        for t, v in state["next_seq"].items():
            if t in rec.next_seq:
                rec.next_seq[t] = max(rec.next_seq[t], v)
    seen: dict[int, Record] = {}
    names = sorted(p for p in directory.iterdir() if SEGMENT_RE.match(p.name))
    for i, path in enumerate(names):
        data = path.read_bytes()
        pos = 0
        first_n: int | None = None
        last_n = -1
        lineno = 0
        bad: list[str] = []
        while pos < len(data):
            lineno += 1
            nl = data.find(b"\n", pos)
            raw = data[pos:] if nl < 0 else data[pos : nl + 1]
            pos = len(data) if nl < 0 else nl + 1
            try:
                if nl < 0:
                    raise ValueError("incomplete line")  # noqa: TRY301 - handled below
                n, topic, retained, payload = _parse_line(raw)
            except (ValueError, KeyError, TypeError) as exc:
                if i == len(names) - 1 and nl < 0:
                    # A write cut short by a crash: dropped. An event in it was never
                    # published (events wait for the fsync); a sample may have been,
                    # from memory, and its seq is then inside the declared skip.
                    with open(path, "r+b") as f:
                        f.truncate(len(data) - len(raw))
                        os.fsync(f.fileno())
                    rec.problems.append(f"{path}: line {lineno}: torn tail dropped ({exc})")
                else:
                    bad.append(f"line {lineno}: {exc}")
                continue
            first_n = n if first_n is None else first_n
            last_n = max(last_n, n)
            rec.next_seq[topic] = max(rec.next_seq[topic], payload["seq"] + 1)
            rec.session = max(rec.session, payload["session"])
            rec.next_n = max(rec.next_n, n + 1)
            if n > rec.acked_through and not retained and n not in seen:
                seen[n] = recovered_record(n, topic, payload, raw)
        if bad:
            # A line that cannot be read may have held any topic's highest seq: skip past
            # it for every topic (a gap, never a repeat).
            for t in rec.next_seq:
                rec.next_seq[t] += len(bad)
            # Set aside as evidence; what could be read is written again (compaction).
            why = "; ".join(bad) + "; every other line was kept"
            rec.problems.append(_quarantine(directory, path, why))
            rec.quarantined = True
        elif first_n is not None:
            rec.segments.append(Segment(path, first_n, last_n, path.stat().st_size))
        else:
            path.unlink()  # empty segment
    rec.pending = [seen[n] for n in sorted(seen)]
    if state is not None:
        _declare(rec, state)
    elif problems:
        # Both copies of the state were unreadable: the blocks are lost with them. No
        # block reached further than one beyond the seqs handed out, and the journal lags
        # those by one group commit: start two blocks above it (a gap, not a repeat, while
        # the journal holds the latest seqs; an emptied one cannot say: the new session
        # is then all that sets this run apart, as before the blocks).
        for t in rec.next_seq:
            if t not in JOURNAL_FIRST:
                rec.next_seq[t] += 2 * RESERVE_BLOCK
    rec.session += 1
    if rec.session > SEQ_MAX:
        raise OutboxError(f"{directory / STATE_FILE}: session counter exhausted")
    return rec


def _declare(rec: Recovered, state: dict[str, Any]) -> None:
    """The previous run (``state``'s session) may have published, from memory, any seq of
    a sample topic below its durable reservation (``reserved``); what the journal holds
    replays, and the rest, from the first seq not journaled (``rec.next_seq`` so far: the
    journal's and the state's ``next_seq``, which counts only journaled seqs) up to the
    reservation, is declared skipped. The new run starts above the reservation."""
    reserved: dict[str, int] = state.get("reserved", {})
    for topic, bound in reserved.items():
        if topic not in rec.next_seq:
            continue
        first = rec.next_seq[topic]
        if topic in SAMPLE_TOPICS and first < bound:
            rec.skips.append((topic, state["session"], first, bound - 1))
        rec.next_seq[topic] = max(first, bound)
