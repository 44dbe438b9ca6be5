"""The ingest's bookkeeping (ingest/lines.py): accounted seqs, holes, gaps asked for after
a settle time and again with a doubling wait, the session a request names."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from iortd.ingest.lines import GapPolicy, Request, SeqLine

POLICY = GapPolicy(settle_s=2.0, retry_s=5.0, retry_max_s=20.0, max_span=100)


def test_runs_merge_and_count_what_is_new() -> None:
    line = SeqLine("telemetry")
    assert line.add(0, 4) == 5
    assert line.add(10, 12) == 3
    assert line.add(3, 11) == 5  # 5..9 new
    assert line.runs == [[0, 12]]
    assert line.add(2, 2) == 0
    assert line.holes() == []


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 20)), max_size=60))
def test_the_runs_are_the_union_of_what_was_added(adds: list[tuple[int, int]]) -> None:
    line, truth = SeqLine("t"), set[int]()
    for a, n in adds:
        new = set(range(a, a + n + 1)) - truth
        assert line.add(a, a + n) == len(new)
        truth |= new
    got = {q for a, b in line.runs for q in range(a, b + 1)}
    assert got == truth
    assert all(b + 1 < c for (_, b), (c, _) in zip(line.runs, line.runs[1:], strict=False))


def test_a_gap_is_asked_after_the_settle_time_then_again_doubling() -> None:
    line = SeqLine("telemetry")
    for q in (*range(0, 10), *range(15, 20)):
        line.received(q, 3)
    line.reconcile(100.0, POLICY)
    assert [(g.first, g.last) for g in line.gaps] == [(10, 14)]
    assert line.due(101.9, POLICY) == []
    assert line.due(102.0, POLICY) == [Request("telemetry", 3, 10, 14)]
    assert line.due(106.9, POLICY) == []
    assert line.due(107.0, POLICY) == [Request("telemetry", 3, 10, 14)]  # + 5 s
    assert line.due(116.9, POLICY) == []
    assert line.due(117.0, POLICY) == [Request("telemetry", 3, 10, 14)]  # + 10 s
    # Part arrives: the rest keeps its history; then all: the gap closes.
    line.received(12, 3)
    line.reconcile(118.0, POLICY)
    assert [(g.first, g.last, g.attempts) for g in line.gaps] == [(10, 11, 3), (13, 14, 3)]
    line.add(10, 14)  # a skip declaration
    closed = line.reconcile(119.0, POLICY)
    assert line.gaps == []
    assert [(g.first, g.last, g.noticed) for g in closed] == [(10, 11, 100.0), (13, 14, 100.0)]


def test_a_request_names_the_session_below_and_is_bounded() -> None:
    line = SeqLine("events")
    line.received(5, 1)
    line.received(500, 2)
    line.reconcile(0.0, POLICY)
    (req,) = line.due(10.0, POLICY)
    assert req == Request("events", 1, 6, 105)  # max_span 100
    assert line.session_at(499) == 1
    assert line.session_at(500) == 2
    assert line.missing() == 494


def test_retries_can_be_held_back_while_first_asks_go() -> None:
    line = SeqLine("telemetry")
    for q in (0, 5, 10):
        line.received(q, 1)
    line.reconcile(0.0, POLICY)
    (first,) = line.due(2.0, POLICY, limit=1)  # one of the two gaps asked
    assert (first.first, first.last) == (1, 4)
    assert [(r.first, r.last) for r in line.due(10.0, POLICY, retries=False)] == [(6, 9)]
    assert line.due(20.0, POLICY, retries=False) == []  # both asked once: no retry now
    assert len(line.due(20.0, POLICY)) == 2
