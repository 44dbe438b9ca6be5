"""The witness's state machine and its SQLite state (witness/core.py, witness/store.py),
by the rules of c2sp.org/tlog-witness ``add-checkpoint``.

Checkpoints are built from auditlog/merkle.py and tlog_checkpoint.py over generated
leaves; one case replays transparency-dev/witness's ``witness/witness_test.go`` vectors
(the ``monkeys`` log's checkpoints at 5 and 8 leaves, signed in Go, and the consistency
proof between them).
"""

from __future__ import annotations

import base64
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from iortd.auditlog.cosignature import CosignerKey, verify_cosignature
from iortd.auditlog.merkle import EMPTY_ROOT, consistency_proof, leaf_hash, root_of
from iortd.auditlog.note import Signer, Verifier, generate_keypair, parse_vkey
from iortd.auditlog.tlog_checkpoint import CheckpointBody, sign_checkpoint
from iortd.auditlog.witness_client import request_body
from iortd.witness.core import Reply, Witness, proven_forks
from iortd.witness.store import Store

ORIGIN = "iortd/site-a/or-1/5f0c"
T0 = 1_800_000_000


def leaves(n: int, fork_at: int | None = None) -> list[bytes]:
    return [
        leaf_hash(f"entry {i}{' forked' if fork_at is not None and i >= fork_at else ''}".encode())
        for i in range(n)
    ]


class Log:
    """A log of generated leaves: its signed checkpoints and consistency proofs."""

    def __init__(self, signer: Signer, origin: str = ORIGIN, fork_at: int | None = None) -> None:
        self.signer = signer
        self.origin = origin
        self.leaves = leaves(160, fork_at)

    def body(self, size: int) -> CheckpointBody:
        return CheckpointBody(self.origin, size, root_of(self.leaves[:size]))

    def note(self, size: int) -> str:
        return sign_checkpoint(self.body(size), self.signer)

    def request(self, old: int, size: int, proof: list[bytes] | None = None) -> bytes:
        if proof is None:
            proof = consistency_proof(self.leaves, old, size) if old else []
        return request_body(old, proof, self.note(size))


@pytest.fixture
def key() -> CosignerKey:
    return CosignerKey.generate("witness.example.org/w1")


@pytest.fixture
def log_key() -> Signer:
    return generate_keypair("iortd-or-1")


@pytest.fixture
def make(
    tmp_path: Path, key: CosignerKey, log_key: Signer
) -> Iterator[Callable[..., tuple[Witness, Store]]]:
    opened: list[Store] = []

    def build(
        logs: dict[str, list[Verifier]] | None = None, db: str = "w.sqlite"
    ) -> tuple[Witness, Store]:
        store = Store.open(tmp_path / db)
        opened.append(store)
        clock = iter(range(T0, T0 + 10_000))
        w = Witness(key, logs or {ORIGIN: [log_key.verifier]}, store, clock=lambda: next(clock))
        return w, store

    yield build
    for store in opened:
        store.close()


def cosigned(reply: Reply, key: CosignerKey, body: CheckpointBody) -> int:
    assert reply.status == 200, reply
    lines = reply.body.decode().splitlines(keepends=True)
    assert len(lines) == 1
    return verify_cosignature(key.verifier, body, lines[0])


def test_first_checkpoint_then_an_extension(make: Callable[..., tuple[Witness, Store]],
                                            key: CosignerKey, log_key: Signer) -> None:  # fmt: skip
    w, store = make()
    log = Log(log_key)
    assert cosigned(w.add_checkpoint(log.request(0, 5)), key, log.body(5)) == T0
    got = store.latest(ORIGIN)
    assert got is not None
    assert (got.size, got.root, got.cosigned_at) == (5, log.body(5).root, T0)
    assert cosigned(w.add_checkpoint(log.request(5, 13)), key, log.body(13)) == T0 + 1
    latest = store.latest(ORIGIN)
    assert latest is not None
    assert latest.size == 13
    # The stored checkpoint is the log's note with the witness's cosignature appended.
    assert latest.checkpoint.startswith(log.note(13))
    assert [(h.size, h.root) for h in store.history(ORIGIN)] == [
        (5, log.body(5).root),
        (13, log.body(13).root),
    ]


def test_rollback_is_refused_with_the_latest_size(make: Callable[..., tuple[Witness, Store]],
                                                  log_key: Signer) -> None:  # fmt: skip
    w, store = make()
    log = Log(log_key)
    assert w.add_checkpoint(log.request(0, 8)).status == 200
    stale = w.add_checkpoint(log.request(5, 5))  # "I think you are at 5": 409 with 8
    assert (stale.status, stale.body, stale.content_type) == (409, b"8\n", "text/x.tlog.size")
    assert stale.outcome == "conflict"
    assert w.add_checkpoint(log.request(0, 5)).status == 409
    back = w.add_checkpoint(log.request(8, 5, proof=[]))  # old above the checkpoint's size
    assert (back.status, back.outcome) == (400, "old_size_above_size")
    latest = store.latest(ORIGIN)
    assert latest is not None
    assert latest.size == 8


def test_a_fork_at_the_same_size_is_refused_and_kept_as_evidence(
    make: Callable[..., tuple[Witness, Store]], key: CosignerKey, log_key: Signer
) -> None:
    w, store = make()
    log, fork = Log(log_key), Log(log_key, fork_at=3)
    assert w.add_checkpoint(log.request(0, 8)).status == 200
    refused = w.add_checkpoint(fork.request(8, 8))
    assert (refused.status, refused.outcome) == (422, "fork")
    latest = store.latest(ORIGIN)
    assert latest is not None
    assert latest.root == log.body(8).root
    evidence = store.evidence(ORIGIN)
    assert [e.reason for e in evidence] == ["fork"]
    assert evidence[0].note == fork.note(8)
    assert evidence[0].root == fork.body(8).root
    assert proven_forks(store.history(ORIGIN), evidence) == evidence
    # The same checkpoint again is cosigned again, with a fresh time: never a second root.
    assert cosigned(w.add_checkpoint(log.request(8, 8)), key, log.body(8)) == T0 + 2
    assert {h.root for h in store.history(ORIGIN)} == {log.body(8).root}


def test_a_proof_that_does_not_match_is_refused(make: Callable[..., tuple[Witness, Store]],
                                                log_key: Signer) -> None:  # fmt: skip
    w, store = make()
    log, fork = Log(log_key), Log(log_key, fork_at=6)
    assert w.add_checkpoint(log.request(0, 8)).status == 200
    # A forked log with a proof that is right for its own tree, not for what was cosigned.
    assert w.add_checkpoint(fork.request(8, 20)).status == 422
    bad = consistency_proof(log.leaves, 8, 20)
    bad[0] = bytes(32)
    assert w.add_checkpoint(log.request(8, 20, proof=bad)).status == 422
    assert w.add_checkpoint(log.request(8, 20, proof=bad[:-1])).status == 422
    short = [*consistency_proof(log.leaves, 8, 20)[:-1], b"\x01" * 31]
    assert w.add_checkpoint(log.request(8, 20, proof=short)).status == 422
    # Kept once per signed note (the proof is not signed: anyone can replay a public
    # checkpoint with a wrong proof, so a bad proof alone proves nothing).
    evidence = store.evidence(ORIGIN)
    assert [(e.reason, e.note) for e in evidence] == [
        ("bad_proof", fork.note(20)),
        ("bad_proof", log.note(20)),
    ]
    assert proven_forks(store.history(ORIGIN), evidence) == []
    assert w.add_checkpoint(log.request(8, 20)).status == 200
    # Now the witness has cosigned size 20 with one root and holds the log's signature on
    # another: that is a fork, proven; the wrong proofs for the right root are not.
    assert proven_forks(store.history(ORIGIN), store.evidence(ORIGIN)) == [evidence[0]]


def test_spec_edges_of_size_zero(make: Callable[..., tuple[Witness, Store]],
                                 log_key: Signer) -> None:  # fmt: skip
    w, _ = make()
    log = Log(log_key)
    empty = CheckpointBody(ORIGIN, 0, EMPTY_ROOT)
    assert w.add_checkpoint(request_body(0, [], sign_checkpoint(empty, log_key))).status == 200
    not_empty = CheckpointBody(ORIGIN, 0, log.body(1).root)
    reply = w.add_checkpoint(request_body(0, [], sign_checkpoint(not_empty, log_key)))
    assert reply.status == 422
    # From old size 0 the proof must be empty.
    assert w.add_checkpoint(log.request(0, 4, proof=[bytes(32)])).status == 422
    assert w.add_checkpoint(log.request(0, 4)).status == 200


def test_unknown_origin_and_signatures(make: Callable[..., tuple[Witness, Store]],
                                       log_key: Signer, key: CosignerKey) -> None:  # fmt: skip
    w, store = make()
    stranger = Log(log_key, origin="iortd/site-b/or-9/0000")
    assert w.add_checkpoint(stranger.request(0, 3)).status == 404
    # Signed by another key only: no trusted signature.
    assert w.add_checkpoint(Log(generate_keypair("iortd-or-1")).request(0, 3)).status == 403
    # The trusted key's name and ID with a signature that does not verify.
    note = Log(log_key).note(3)
    sig = note.rsplit(" ", 1)[1]
    raw = bytearray(base64.b64decode(sig))
    raw[-1] ^= 1
    forged = note[: -len(sig)] + base64.b64encode(bytes(raw)).decode() + "\n"
    assert w.add_checkpoint(request_body(0, [], forged)).status == 403
    # A signature by an unknown key beside the trusted one is ignored.
    other = generate_keypair("someone-else")
    both = Log(log_key).note(3) + other.sign(Log(log_key).body(3).text).split("\n\n")[1]
    assert cosigned(w.add_checkpoint(request_body(0, [], both)), key, Log(log_key).body(3))
    assert store.latest("iortd/site-b/or-9/0000") is None


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "empty"),
        (b"old 01\n\n", "leading zero"),
        (b"old -1\n\n", "sign"),
        (b"old 18446744073709551616\n\n", "above uint64"),
        (b"Old 0\n\n", "case"),
        (b"old 0\nnot base64!\n\n", "proof line"),
        (b"old 0\n" + b"AAAA\n" * 64 + b"\n", "64 proof lines"),
        (b"old 0\n", "no blank line"),
        (b"old 0\r\n\r\n", "CRLF"),
        (b"old 0\n\nnot a note", "note"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_malformed_requests_are_400(
    make: Callable[..., tuple[Witness, Store]], body: bytes, why: str
) -> None:
    w, _ = make()
    assert w.add_checkpoint(body).status == 400, why


def test_a_checkpoint_body_that_is_not_c2sp_is_400(make: Callable[..., tuple[Witness, Store]],
                                                   log_key: Signer) -> None:  # fmt: skip
    w, _ = make()
    note = log_key.sign(f"{ORIGIN}\n012\n{base64.b64encode(EMPTY_ROOT).decode()}\n")
    assert w.add_checkpoint(request_body(0, [], note)).status == 400


def test_the_go_reference_vectors(tmp_path: Path, key: CosignerKey) -> None:
    """transparency-dev/witness witness_test.go: mInit (5) then mNext (8) with consProof."""
    m_pk = "monkeys+db4d9f7e+AULaJMvTtDLHPUcUrjdDad9vDlh/PTfC2VV60JUtCfWT"
    m_init = (
        "monkeys\n5\n41smjBUiAU70EtKlT6lIOIYtRTYxYXsDB+XHfcvu/BE=\n\n— monkeys 202fftzGl3LVoqjXf"
        "wCFZZXs8I+5G22+Ek2K0AOyBuSJ/8/CZawNF+6fNlTKOCd622pbzJNkkJFWuw9DbicZCkEx9AY=\n"
    )
    m_next = (
        "monkeys\n8\nV8K9aklZ4EPB+RMOk1/8VsJUdFZR77GDtZUQq84vSbo=\n\n— monkeys 202ffoUEboiQYpHzI"
        "CeaFmoy3RNviHTpAxYrq/eO4QQVQMvu9UebKBMX2MJC76NLthZaKsnKbCA8GxrjePZhvDCH7Ag=\n"
    )
    proof = [
        bytes.fromhex(h)
        for h in (
            "b9e1d62618f7fee8034e4c5010f727ab24d8e4705cb296c374bf2025a87a10d2",
            "aac66cd7a79ce4012d80762fe8eec3a77f22d1ca4145c3f4cee022e7efcd599d",
            "89d0f753f66a290c483b39cd5e9eafb12021293395fad3d4a2ad053cfbcfdc9e",
            "29e40bb79c966f4c6fe96aff6f30acfce5f3e8d84c02215175d6e018a5dee833",
        )
    ]
    store = Store.open(tmp_path / "w.sqlite")
    w = Witness(key, {"monkeys": [parse_vkey(m_pk)]}, store, clock=lambda: T0)
    assert w.add_checkpoint(request_body(0, [], m_init)).status == 200
    assert w.add_checkpoint(request_body(5, proof[:3], m_next)).status == 422
    assert w.add_checkpoint(request_body(5, proof, m_next)).status == 200
    store.close()


def test_concurrent_submissions_from_the_same_size_exactly_one_wins(
    make: Callable[..., tuple[Witness, Store]], log_key: Signer
) -> None:
    """Two witnesses (two connections, as two processes would have) on one database, both
    asked to extend from 5, 20 times over: one is cosigned, the other gets 409 with the
    winner's size; the state never goes back."""
    w1, store = make()
    w2, _ = make()
    log = Log(log_key)
    assert w1.add_checkpoint(log.request(0, 5)).status == 200
    old = 5
    for n in range(20):
        a, b = old + 1 + n % 2, old + 3 + n % 3
        replies: dict[int, Reply] = {}
        gate = threading.Barrier(2, timeout=10)

        def submit(
            w: Witness,
            size: int,
            old: int = old,
            gate: threading.Barrier = gate,
            replies: dict[int, Reply] = replies,
        ) -> None:
            body = log.request(old, size)
            gate.wait()
            replies[size] = w.add_checkpoint(body)

        threads = [
            threading.Thread(target=submit, args=(w1, a)),
            threading.Thread(target=submit, args=(w2, b)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        statuses = sorted(r.status for r in replies.values())
        assert statuses == [200, 409], replies
        loser = next(r for r in replies.values() if r.status == 409)
        winner = next(s for s, r in replies.items() if r.status == 200)
        assert loser.body == f"{winner}\n".encode()
        latest = store.latest(ORIGIN)
        assert latest is not None
        assert latest.size >= old
        old = latest.size


def test_state_is_sqlite_wal_with_full_sync(make: Callable[..., tuple[Witness, Store]],
                                            tmp_path: Path, log_key: Signer) -> None:  # fmt: skip
    w, store = make()
    assert w.add_checkpoint(Log(log_key).request(0, 3)).status == 200
    assert store.pragma("journal_mode") == "wal"
    assert store.pragma("synchronous") == 2  # FULL
    store.close()
    again = Store.open(tmp_path / "w.sqlite")
    latest = again.latest(ORIGIN)
    assert latest is not None
    assert latest.size == 3
    (tmp_path / "junk.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(sqlite3.DatabaseError):
        Store.open(tmp_path / "junk.sqlite")


def test_replaying_a_public_checkpoint_does_not_grow_the_state(
    make: Callable[..., tuple[Witness, Store]], log_key: Signer
) -> None:
    """Signed checkpoints are public (the retained MQTT topic): anyone can resubmit the
    latest one, and each is cosigned afresh (tlog-witness), but only its time changes;
    a refused fork sent again is kept once."""
    w, store = make()
    log, fork = Log(log_key), Log(log_key, fork_at=2)
    assert w.add_checkpoint(log.request(0, 8)).status == 200
    for _ in range(5):
        assert w.add_checkpoint(log.request(8, 8)).status == 200
        assert w.add_checkpoint(fork.request(8, 8)).status == 422
    assert len(store.history(ORIGIN)) == 1
    latest = store.latest(ORIGIN)
    assert latest is not None
    assert latest.cosigned_at == T0 + 9  # the clock ticks per cosignature and per refusal
    assert len(store.evidence(ORIGIN)) == 1


def test_evidence_keeps_the_log_s_signature_not_what_else_was_appended(
    make: Callable[..., tuple[Witness, Store]], log_key: Signer
) -> None:
    """Anyone can append signature lines of unknown keys to a public checkpoint: the
    evidence holds the text and the log's verified signature only, so such copies are
    one entry, of a bounded size."""
    w, store = make()
    log = Log(log_key)
    assert w.add_checkpoint(log.request(0, 8)).status == 200
    bad = [bytes(32)] * len(consistency_proof(log.leaves, 8, 20))
    for n in range(3):
        junk = "— someone " + base64.b64encode(bytes(8 + n)).decode() + "\n"
        note = log.note(20) + junk
        assert w.add_checkpoint(request_body(8, bad, note)).status == 422
    assert [e.note for e in store.evidence(ORIGIN)] == [log.note(20)]
