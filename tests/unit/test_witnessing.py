"""The daemon's witness submitter (daemon/witnessing.py) as a state machine: a fake
witness that checks proofs like a real one, a fake log, a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from iortd.auditlog.cosignature import CosignerKey
from iortd.auditlog.merkle import leaf_hash, root_of, verify_consistency
from iortd.auditlog.note import Checkpoint, generate_keypair
from iortd.auditlog.signed_note import split_note
from iortd.auditlog.witness_client import (
    Conflict,
    Cosigned,
    Outcome,
    Refused,
    WitnessUnavailable,
)
from iortd.auditlog.writer import AuditLogClosed
from iortd.daemon.witnessing import (
    COSIGNED,
    REFUSED,
    WitnessSubmitter,
    WitnessTarget,
    last_cosigned,
)

ORIGIN = "iortd/site/or-1/0a1b2c3d"
SIGNER = generate_keypair("iortd-or-1")
WITNESS = CosignerKey.generate("witness.example.org/w1")
LEAVES = [leaf_hash(b"entry %d" % i) for i in range(64)]


def note_at(size: int) -> str:
    root = root_of(LEAVES[:size]).hex()
    return Checkpoint(ORIGIN, size, "ab" * 32, ("reason test",), root).signed(SIGNER)


class FakeWitness:
    """Keeps the last cosigned size and root; checks the proof like iort-witness."""

    def __init__(self) -> None:
        self.size = 0
        self.root = b""
        self.down = False
        self.calls: list[tuple[int, int]] = []  # (old, new)
        self.answer: Outcome | None = None  # forced once
        self.called = asyncio.Event()

    async def submit(
        self,
        url: str,
        old: int,
        proof: Sequence[bytes],
        note: str,
        timeout: float,  # noqa: ASYNC109 - the client's signature
    ) -> Outcome:
        self.called.set()
        text, _ = split_note(note, "checkpoint")
        cp, _ = Checkpoint.parse_verified(note, SIGNER.verifier)
        assert cp.root is not None
        self.calls.append((old, cp.count))
        if self.down:
            raise WitnessUnavailable("cannot connect")
        if self.answer is not None:
            answer, self.answer = self.answer, None
            return answer
        if old != self.size:
            return Conflict(self.size)
        root = bytes.fromhex(cp.root)
        if old:
            try:
                verify_consistency(old, cp.count, proof, self.root, root)
            except ValueError as exc:
                return Refused(422, str(exc))
        self.size, self.root = cp.count, root
        return Cosigned((WITNESS.cosign(text, 1_700_000_000 + cp.count),))


class FakeLog:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.entries: list[tuple[str, dict[str, Any]]] = []
        self.closed = False
        self.appended = asyncio.Event()

    def append(self, kind: str, data: dict[str, Any], *, durable: bool = False) -> None:
        if self.closed:
            raise AuditLogClosed("closed")
        self.entries.append((kind, dict(data)))
        self.appended.set()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(
    tmp_path: Path, witness: FakeWitness, alarm_after_s: float = 900
) -> tuple[WitnessSubmitter, FakeLog, Clock, list[tuple[str, str]]]:
    target = WitnessTarget("w1", "http://127.0.0.1:9/", WITNESS.verifier, 5.0, alarm_after_s)
    audit = FakeLog(tmp_path)
    clock = Clock()
    notices: list[tuple[str, str]] = []
    sub = WitnessSubmitter(
        [target],
        audit,  # type: ignore[arg-type]
        lambda sev, msg: notices.append((sev, msg)),
        submit_fn=witness.submit,
        leaves=lambda size: LEAVES[:size],
        mono=clock,
    )
    return sub, audit, clock, notices


async def test_first_submission_then_extension_with_a_proof(tmp_path: Path) -> None:
    w = FakeWitness()
    sub, audit, _, _ = make(tmp_path, w)
    await sub.checkpoint(note_at(5))
    assert await sub.attempt("w1")
    await sub.checkpoint(note_at(13))
    assert await sub.attempt("w1")
    assert w.calls == [(0, 5), (5, 13)]
    assert [k for k, _ in audit.entries] == [COSIGNED, COSIGNED]
    data = audit.entries[1][1]
    assert data["witness"] == "w1"
    assert data["size"] == 13
    assert data["root"] == root_of(LEAVES[:13]).hex()
    assert data["time"] == 1_700_000_013
    assert data["cosignature"].startswith("\u2014 witness.example.org/w1 ")
    assert sub.states["w1"].size == 13
    assert sub.states["w1"].pending is None


async def test_only_the_newest_pending_checkpoint_is_sent(tmp_path: Path) -> None:
    w = FakeWitness()
    sub, _, _, _ = make(tmp_path, w)
    for size in (3, 7, 11):
        await sub.checkpoint(note_at(size))
    assert await sub.attempt("w1")
    assert w.calls == [(0, 11)]


async def test_chain_head_checkpoints_are_never_submitted(tmp_path: Path) -> None:
    w = FakeWitness()
    sub, _, _, _ = make(tmp_path, w)
    await sub.checkpoint(Checkpoint(ORIGIN, 4, "cd" * 32, ("reason x",)).signed(SIGNER))
    assert sub.states["w1"].pending is None
    assert await sub.attempt("w1")
    assert w.calls == []


async def test_409_takes_the_witness_size_and_retries_once_with_its_proof(
    tmp_path: Path,
) -> None:
    w = FakeWitness()
    w.size, w.root = 9, root_of(LEAVES[:9])  # cosigned in a run whose entry was lost
    sub, audit, _, _ = make(tmp_path, w)
    await sub.checkpoint(note_at(20))
    assert await sub.attempt("w1")
    assert w.calls == [(0, 20), (9, 20)]
    assert [(k, d["size"]) for k, d in audit.entries] == [(COSIGNED, 20)]


async def test_a_witness_ahead_of_the_log_is_a_recorded_rollback(tmp_path: Path) -> None:
    w = FakeWitness()
    w.size, w.root = 40, root_of(LEAVES[:40])
    sub, audit, _, _ = make(tmp_path, w)
    await sub.checkpoint(note_at(20))
    assert await sub.attempt("w1")
    assert len(w.calls) == 1
    (kind, data), *_ = audit.entries
    assert kind == REFUSED
    assert data["status"] == 409
    assert "rollback" in data["detail"]
    assert sub.states["w1"].pending is None


async def test_outage_keeps_the_checkpoint_then_catches_up(tmp_path: Path) -> None:
    w = FakeWitness()
    sub, audit, _, _ = make(tmp_path, w)
    await sub.checkpoint(note_at(5))
    assert await sub.attempt("w1")
    w.down = True
    await sub.checkpoint(note_at(8))
    assert not await sub.attempt("w1")
    await sub.checkpoint(note_at(30))
    assert not await sub.attempt("w1")
    assert sub.states["w1"].pending is not None
    w.down = False
    assert await sub.attempt("w1")
    assert w.calls[-1] == (5, 30)
    assert [(k, d["size"]) for k, d in audit.entries] == [(COSIGNED, 5), (COSIGNED, 30)]


async def test_busy_is_retried_and_a_fork_is_recorded_and_dropped(tmp_path: Path) -> None:
    w = FakeWitness()
    sub, audit, _, _ = make(tmp_path, w)
    await sub.checkpoint(note_at(5))
    w.answer = Refused(503, "busy")
    assert not await sub.attempt("w1")
    assert audit.entries == []
    w.answer = Refused(422, "fork: another root for this size\x07")
    assert await sub.attempt("w1")
    assert audit.entries == [
        (
            REFUSED,
            {
                "witness": "w1",
                "status": 422,
                "size": 5,
                "detail": "fork: another root for this size ",
            },
        )
    ]
    assert sub.states["w1"].pending is None


async def test_a_cosignature_by_another_key_is_not_recorded_as_one(tmp_path: Path) -> None:
    w = FakeWitness()
    sub, audit, _, _ = make(tmp_path, w)
    note = note_at(5)
    text, _ = split_note(note, "checkpoint")
    other = CosignerKey.generate("witness.example.org/w1")  # the same name, another key
    w.answer = Cosigned((other.cosign(text, 1_700_000_000),))
    await sub.checkpoint(note)
    assert await sub.attempt("w1")
    assert [(k, d["status"]) for k, d in audit.entries] == [(REFUSED, 200)]


async def test_alarm_after_the_bound_once_then_info_when_cosigned(tmp_path: Path) -> None:
    w = FakeWitness()
    w.down = True
    sub, _, clock, notices = make(tmp_path, w, alarm_after_s=600)
    await sub.checkpoint(note_at(5))
    assert not await sub.attempt("w1")
    clock.t += 599
    sub.check_alarm("w1")
    assert notices == []
    clock.t += 2
    sub.check_alarm("w1")
    sub.check_alarm("w1")
    assert len(notices) == 1
    assert notices[0][0] == "critical"
    assert "witness w1 has not cosigned" in notices[0][1]
    w.down = False
    assert await sub.attempt("w1")
    assert notices[1] == ("info", "witness w1 cosigns again (size 5)")
    clock.t += 10_000
    sub.check_alarm("w1")  # nothing waiting: no alarm
    assert len(notices) == 2


async def test_nothing_is_recorded_once_closing(tmp_path: Path) -> None:
    w = FakeWitness()
    sub, audit, _, _ = make(tmp_path, w)
    await sub.checkpoint(note_at(5))
    await sub.aclose()
    assert await sub.attempt("w1")
    assert audit.entries == []


async def test_state_is_rebuilt_from_the_log(tmp_path: Path) -> None:
    seg = tmp_path / "log-0000000000000000-20260101.jsonl"
    lines = [
        b'{"seq":0,"type":"witness_cosigned","data":{"witness":"w1","size":5,"root":"aa"}}',
        b'{"seq":1,"type":"note","data":{"text":"witness_cosigned"}}',
        b'{"seq":2,"type":"witness_cosigned","data":{"witness":"w1","size":9,"root":"bb"}}',
        b'{"seq":3,"type":"witness_cosigned","data":{"witness":"w2","size":7,"root":"cc"}}',
    ]
    seg.write_bytes(b"\n".join(lines) + b"\n")
    assert last_cosigned(tmp_path) == {"w1": (9, "bb"), "w2": (7, "cc")}
    w = FakeWitness()
    w.size, w.root = 9, root_of(LEAVES[:9])
    sub, _, _, _ = make(tmp_path, w)
    await sub.start()
    await sub.checkpoint(note_at(12))
    assert await sub.attempt("w1")
    assert w.calls == [(9, 12)]


async def test_run_retries_until_the_witness_answers(tmp_path: Path) -> None:
    w = FakeWitness()
    w.down = True
    sub, audit, _, _ = make(tmp_path, w)
    sub._backoff_initial_s = 0.01
    async with asyncio.timeout(10), asyncio.TaskGroup() as tg:
        tg.create_task(sub.run())
        await sub.checkpoint(note_at(5))
        for _ in range(2):  # two failed attempts, then it answers
            await w.called.wait()
            w.called.clear()
        w.down = False
        await audit.appended.wait()
        await sub.aclose()
    assert audit.entries[0][0] == COSIGNED
    assert len(w.calls) >= 3


@pytest.mark.parametrize("size", [1, 2, 63, 64])
async def test_proofs_verify_for_every_shape(tmp_path: Path, size: int) -> None:
    w = FakeWitness()
    sub, audit, _, _ = make(tmp_path, w)
    await sub.checkpoint(note_at(1))
    assert await sub.attempt("w1")
    await sub.checkpoint(note_at(size))
    assert await sub.attempt("w1")
    assert all(k == COSIGNED for k, _ in audit.entries)


async def test_a_log_that_cannot_be_read_back_is_kept_not_refused(tmp_path: Path) -> None:
    """The proof needs the log's leaves (an archive unmounted, a damaged segment): not
    the witness's fault, so nothing is recorded and the checkpoint is tried again."""
    from iortd.auditlog.merkle_log import RebuildError  # noqa: PLC0415

    w = FakeWitness()
    sub, audit, _, _ = make(tmp_path, w)
    await sub.checkpoint(note_at(5))
    assert await sub.attempt("w1")

    def unreadable(size: int) -> list[bytes]:
        raise RebuildError("log-0000000000000000-20260101.jsonl: line 3 is torn")

    sub._leaves = unreadable
    await sub.checkpoint(note_at(9))
    assert not await sub.attempt("w1")
    assert [k for k, _ in audit.entries] == [COSIGNED]
    assert sub.states["w1"].pending is not None


async def test_a_recorded_size_beyond_the_log_is_asked_of_the_witness(tmp_path: Path) -> None:
    """A witness_cosigned entry claiming more than the log holds (appended by someone who
    can write the log directory) does not stop witnessing: the witness says its size."""
    w = FakeWitness()
    w.size, w.root = 5, root_of(LEAVES[:5])
    sub, audit, _, _ = make(tmp_path, w)
    sub.states["w1"].size = 50
    await sub.checkpoint(note_at(12))
    assert await sub.attempt("w1")
    assert w.calls == [(0, 12), (5, 12)]
    assert [(k, d["size"]) for k, d in audit.entries] == [(COSIGNED, 12)]
