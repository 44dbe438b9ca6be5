"""The guard on the broker's retained checkpoint (daemon/checkpoint_guard.py): what it
says, and that it always keeps the off-host copy when this log cannot show it contains it.

A stand-in for the audit log is enough here: the guard uses four of its members, and the
real log's ``hash_at`` (None for an entry that retention deleted and the archive cannot
vouch for) is tested with the fork guard itself (test_marker_guard.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from iortd.auditlog.note import Checkpoint
from iortd.daemon.checkpoint_guard import guard_checkpoint

ORIGIN = "iortd/test-site/or-1/abc"
HEAD = "ab" * 32


class Log:
    def __init__(self, hashes: dict[int, str | None], committed: int) -> None:
        self.origin = ORIGIN
        self.committed_seq = committed
        self._hashes = hashes
        self.appended: list[tuple[str, dict[str, Any]]] = []

    async def hash_at(self, seq: int) -> str | None:
        return self._hashes.get(seq)

    def append(self, kind: str, data: dict[str, Any], *, durable: bool) -> None:
        assert durable
        self.appended.append((kind, data))


def guard(log: Log, cp: Checkpoint) -> tuple[str | None, list[tuple[str, str]]]:
    said: list[tuple[str, str]] = []
    why = asyncio.run(
        guard_checkpoint(log, cp, lambda sev, text: said.append((sev, text)))  # type: ignore[arg-type]
    )
    return why, said


def test_a_checkpoint_this_log_contains_is_allowed() -> None:
    log = Log({9: HEAD}, committed=20)
    assert guard(log, Checkpoint(ORIGIN, 10, HEAD)) == (None, [])
    assert log.appended == []


@pytest.mark.parametrize(
    ("hashes", "committed", "words"),
    [
        ({}, 5, "this log is behind it"),
        ({9: "cd" * 32}, 20, "a fork"),
        ({9: None}, 20, "cannot show its entry at seq 9"),
    ],
    ids=["behind", "fork", "cannot-show"],
)
def test_a_conflict_is_recorded_alarmed_and_worded_for_what_it_is(
    hashes: dict[int, str | None], committed: int, words: str
) -> None:
    log = Log(hashes, committed)
    why, said = guard(log, Checkpoint(ORIGIN, 10, HEAD))
    assert why is not None
    assert words in why
    if words != "a fork":
        assert "fork" not in why  # an entry it cannot show is not proof of a fork
    assert [k for k, _ in log.appended] == ["checkpoint_publish_refused"]
    assert log.appended[0][1]["why"] == why
    assert said[0][0] == "critical"
    assert "NOT published" in said[0][1]
