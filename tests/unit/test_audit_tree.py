"""The Merkle tree in the log's checkpoints (issue 20, item 1): the writer keeps the
frontier, checkpoints and seals are C2SP tlog-checkpoints over it, the frontier survives a
restart and a crash, and verify checks every root against the tree it recomputes.

The roots are checked against an independent RFC 6962 root over the segments' lines (the
recursive definition, written here again on purpose: not merkle.py's code).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from iortd.auditlog import tree_state
from iortd.auditlog.logdir import SEAL_FILE
from iortd.auditlog.marker import write_marker
from iortd.auditlog.merkle import Frontier
from iortd.auditlog.merkle_log import RebuildError, leaf_hashes, rebuild_chained
from iortd.auditlog.note import Checkpoint, Signer, generate_keypair
from iortd.auditlog.tlog_checkpoint import open_checkpoint
from iortd.auditlog.tree_state import seal_frontier
from iortd.auditlog.verify import verify_log
from iortd.auditlog.writer import AuditLog, segment_paths

ORIGIN = "iortd/test-site/or-9/00112233aabbccdd"


def lines(directory: Path) -> list[bytes]:
    return [ln for p in segment_paths(directory) for ln in p.read_bytes().splitlines()]


def mth(leaves: list[bytes]) -> bytes:
    """RFC 6962 §2.1 MTH, recursively."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


@contextlib.asynccontextmanager
async def running(directory: Path, signer: Signer) -> AsyncIterator[AuditLog]:
    log, _ = await AuditLog.open(directory, origin=ORIGIN, signer=signer, group_commit_s=0.01)
    task = asyncio.create_task(log.run())
    try:
        yield log
    finally:
        await asyncio.wait_for(log.close(), 10)
        await asyncio.wait_for(task, 10)


async def crash(log: AuditLog, task: asyncio.Task[None]) -> None:
    """Die without closing: nothing pending is written, the descriptors go."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if log._segment is not None:
        os.close(log._segment.fd)
    if log._lock_fd is not None:
        os.close(log._lock_fd)
        log._lock_fd = None


async def fill(log: AuditLog, signer: Signer, n: int) -> None:
    log.append("daemon_start", {"verifier_key": signer.verifier.text}, durable=True)
    for i in range(n):
        e = log.append("sample", {"dose_primary_gy": i * 0.5})
    await e.committed


async def sealed(directory: Path, count: int, within_s: float = 10.0) -> int:
    """Wait for the seal to cover ``count`` entries: it is written after the commit, and
    a file has no event to wait on (a bounded poll with a clear failure)."""
    try:
        async with asyncio.timeout(within_s):
            while True:
                path = directory / SEAL_FILE
                text = path.read_text() if path.exists() else ""
                got = Checkpoint.parse_verified(text, None)[0].count if text else -1
                if got >= count:
                    return got
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"no seal covering {count} entries within {within_s} s") from None


def checkpoint_entries(directory: Path) -> list[dict[str, Any]]:
    out = []
    for ln in lines(directory):
        e = orjson.loads(ln)
        if e["type"] == "checkpoint":
            out.append(e)
    return out


def assert_tree_checkpoint(directory: Path, entry: dict[str, Any], signer: Signer) -> None:
    body, _ = open_checkpoint(entry["data"]["note"], [signer.verifier])
    covered = lines(directory)[: entry["seq"]]
    assert body.origin == ORIGIN
    assert body.size == entry["seq"] == entry["data"]["count"]
    assert body.root == mth(covered), "line 3 is not the RFC 6962 root of the entries before it"
    assert body.extensions[0] == f"head {entry['prev']}"
    assert entry["data"]["tree"] == "rfc6962"
    assert entry["data"]["root"] == body.root.hex()


async def test_checkpoints_and_the_seal_are_tree_checkpoints(tmp_path: Path) -> None:
    signer = generate_keypair("or-9")
    async with running(tmp_path, signer) as log:
        await fill(log, signer, 37)
        await log.checkpoint("interval")
        await fill(log, signer, 5)
        await log.checkpoint("shutdown")
    cps = checkpoint_entries(tmp_path)
    assert len(cps) == 2
    for e in cps:
        assert_tree_checkpoint(tmp_path, e, signer)
    seal = (tmp_path / SEAL_FILE).read_text()
    cp, signed = Checkpoint.parse_verified(seal, signer.verifier)
    every = lines(tmp_path)
    assert signed
    assert cp.count == len(every)
    assert cp.root == mth(every).hex()
    assert cp.head_hash == orjson.loads(every[-1])["hash"]
    saved = seal_frontier(cp)
    assert saved is not None
    assert saved.size == len(every)
    rep = verify_log([tmp_path], pubkey=signer.verifier)
    assert rep.problem is None, rep.problem


@pytest.mark.parametrize("seal", ["kept", "deleted"])
async def test_after_a_crash_the_frontier_is_rebuilt_and_the_next_checkpoint_is_right(
    tmp_path: Path, seal: str
) -> None:
    signer = generate_keypair("or-9")
    log, _ = await AuditLog.open(tmp_path, origin=ORIGIN, signer=signer, group_commit_s=0.01)
    task = asyncio.create_task(log.run())
    await fill(log, signer, 20)
    await log.checkpoint("interval")
    await fill(log, signer, 11)
    await crash(log, task)
    seg = segment_paths(tmp_path)[-1]
    with seg.open("ab") as f:
        f.write(b'{"data":{"torn')  # a torn last write
    if seal == "deleted":
        (tmp_path / SEAL_FILE).unlink()  # the frontier comes from the log, not the seal
    async with running(tmp_path, signer) as log:
        assert log.frontier is not None
        log.append("sample", {"dose_primary_gy": 99.0})
        await log.checkpoint("start")
    last = checkpoint_entries(tmp_path)[-1]
    assert_tree_checkpoint(tmp_path, last, signer)


async def test_a_log_that_switches_from_chain_head_to_tree_checkpoints_verifies(
    tmp_path: Path,
) -> None:
    signer = generate_keypair("or-9")
    async with running(tmp_path, signer) as log:
        log.frontier = log._committed_frontier = None  # as a version before the tree wrote
        await fill(log, signer, 9)
        await log.checkpoint("shutdown")
    old = checkpoint_entries(tmp_path)
    assert "tree" not in old[-1]["data"]
    assert Checkpoint.parse_verified(old[-1]["data"]["note"], None)[0].root is None
    async with running(tmp_path, signer) as log:
        await fill(log, signer, 6)
        await log.checkpoint("shutdown")
    assert_tree_checkpoint(tmp_path, checkpoint_entries(tmp_path)[-1], signer)
    rep = verify_log([tmp_path], pubkey=signer.verifier)
    assert rep.problem is None, rep.problem
    assert rep.checkpoints == 2


async def test_verify_names_a_checkpoint_whose_root_is_not_the_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder of the key signing a wrong root with the right head: the chain alone
    cannot see it; the recomputed tree does."""
    signer = generate_keypair("or-9")
    async with running(tmp_path, signer) as log:
        await fill(log, signer, 12)
        with monkeypatch.context() as m:
            m.setattr(Frontier, "root", lambda self: b"\x42" * 32)
            await log.checkpoint("interval")
        cp_seq = log.head[0]
        log.frontier = log._committed_frontier = None  # the seal stays a chain-head one
        await fill(log, signer, 2)
    rep = verify_log([tmp_path], pubkey=signer.verifier)
    assert rep.problem is not None
    assert rep.problem.seq == cp_seq
    assert "root" in rep.problem.what, rep.problem.what
    assert "tree" in rep.problem.what, rep.problem.what


async def test_verify_checks_the_seals_root(tmp_path: Path) -> None:
    signer = generate_keypair("or-9")
    async with running(tmp_path, signer) as log:
        await fill(log, signer, 12)
        await log.checkpoint("shutdown")
    seal = (tmp_path / SEAL_FILE).read_text()
    cp, _ = Checkpoint.parse_verified(seal, signer.verifier)
    wrong = Checkpoint(cp.origin, cp.count, cp.head_hash, cp.extensions[:2], "42" * 32)
    # Held elsewhere (--checkpoint): the head matches the log, the root does not.
    rep = verify_log([tmp_path], pubkey=signer.verifier, external=wrong.signed(signer))
    assert rep.problem is not None
    assert "held elsewhere has root" in rep.problem.what, rep.problem.what
    (tmp_path / SEAL_FILE).write_text(wrong.signed(signer))
    rep = verify_log([tmp_path], pubkey=signer.verifier)
    assert rep.problem is not None
    assert "seal" in rep.problem.what, rep.problem.what
    assert "root" in rep.problem.what, rep.problem.what


@pytest.mark.parametrize("point", ["entries_past_the_seal", "pending_never_written"])
async def test_a_crash_after_the_seal_continues_the_seals_frontier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    """The writer's crash points after a seal: entries fsync'd but not sealed (the seal
    write fails, then the process dies), or appended and never written. The next start
    takes the frontier from the (older) seal, reads only the entries after it, and signs
    the right root."""
    signer = generate_keypair("or-9")
    log, _ = await AuditLog.open(tmp_path, origin=ORIGIN, signer=signer, group_commit_s=0.01)
    task = asyncio.create_task(log.run())
    await fill(log, signer, 13)
    await log.checkpoint("interval")
    await fill(log, signer, 1)
    sealed_at = await sealed(tmp_path, log.committed_seq + 1)

    def no_seal(*_args: Any) -> None:
        # This run's seal writes fail from here on, also a retry still in a worker thread
        # after the "crash" (a thread outlives the cancelled task; a SIGKILL would not).
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(log, "_write_side_files", no_seal)
    if point == "entries_past_the_seal":
        await fill(log, signer, 6)
    else:
        log.append("sample", {"dose_primary_gy": 7.0})  # the crash comes before the commit
    await crash(log, task)
    assert Checkpoint.parse_verified((tmp_path / SEAL_FILE).read_text(), None)[0].count == sealed_at
    read: list[int] = []
    real_rebuild = rebuild_chained

    def counting(files: Any, *, start: Frontier | None, start_head: str, head: str) -> Frontier:
        read.append(0 if start is None else start.size)
        return real_rebuild(files, start=start, start_head=start_head, head=head)

    monkeypatch.setattr(tree_state, "rebuild_chained", counting)
    async with running(tmp_path, signer) as log:
        assert read == [sealed_at], "continued from the seal's frontier, not rebuilt from 0"
        await log.checkpoint("start")
    assert_tree_checkpoint(tmp_path, checkpoint_entries(tmp_path)[-1], signer)
    assert verify_log([tmp_path], pubkey=signer.verifier).problem is None


async def test_leaf_hashes_of_a_range_come_from_the_segments(tmp_path: Path) -> None:
    """The hook for proofs (issue 20, item 2): the leaf hashes of entries [first, end),
    read from the log across segments, equal to the leaves the tree was built from."""
    signer = generate_keypair("or-9")
    log, _ = await AuditLog.open(
        tmp_path, origin=ORIGIN, signer=signer, group_commit_s=0.01, rotate_max_bytes=2000
    )
    task = asyncio.create_task(log.run())
    await fill(log, signer, 30)
    await asyncio.wait_for(log.close(), 10)
    await asyncio.wait_for(task, 10)
    files = segment_paths(tmp_path)
    assert len(files) > 3, "the range must cross segments"
    every = lines(tmp_path)
    want = [hashlib.sha256(b"\x00" + ln).digest() for ln in every]
    assert list(leaf_hashes(files, 7, 23)) == want[7:23]
    assert list(leaf_hashes(files, 0, len(every))) == want
    with pytest.raises(RebuildError, match="holds 32 entries"):
        list(leaf_hashes(files, 30, 40))


async def written_in_segments(directory: Path, signer: Signer) -> list[Path]:
    log, _ = await AuditLog.open(
        directory, origin=ORIGIN, signer=signer, group_commit_s=0.01, rotate_max_bytes=2000
    )
    task = asyncio.create_task(log.run())
    await fill(log, signer, 30)
    await log.checkpoint("shutdown")
    await asyncio.wait_for(log.close(), 10)
    await asyncio.wait_for(task, 10)
    files = segment_paths(directory)
    assert len(files) > 3
    return files


async def test_an_altered_old_entry_is_never_signed_into_the_tree(tmp_path: Path) -> None:
    """Someone with write access changes an entry in an old segment and deletes the seal,
    so that the next start must rebuild the tree: the rebuild checks the chain and refuses;
    the run signs chain-head checkpoints (said in the operational log), not a tree over
    the altered entry."""
    signer = generate_keypair("or-9")
    files = await written_in_segments(tmp_path, signer)
    first = files[0].read_bytes()
    files[0].write_bytes(first.replace(b'"dose_primary_gy":1.0', b'"dose_primary_gy":9.0', 1))
    assert files[0].read_bytes() != first
    (tmp_path / SEAL_FILE).unlink()
    with structlog.testing.capture_logs() as logs:
        async with running(tmp_path, signer) as log:
            assert log.frontier is None
            await log.checkpoint("start")
    said = [e for e in logs if e["event"] == "audit_merkle_frontier_unavailable"]
    assert said, logs
    assert "does not chain" in said[0]["why"]
    last = checkpoint_entries(tmp_path)[-1]
    assert "tree" not in last["data"]
    assert Checkpoint.parse_verified(last["data"]["note"], None)[0].root is None


async def test_the_tree_is_rebuilt_with_the_archive_retention_names(tmp_path: Path) -> None:
    signer = generate_keypair("or-9")
    log_dir, archive = tmp_path / "log", tmp_path / "archive"
    files = await written_in_segments(log_dir, signer)
    every = lines(log_dir)
    archive.mkdir()
    for f in files[:2]:
        f.rename(archive / f.name)
    first_local = int(segment_paths(log_dir)[0].name[4:20])
    write_marker(log_dir, ORIGIN, archive, first_local)
    (log_dir / SEAL_FILE).unlink()  # no saved frontier: the tree needs the archive
    async with running(log_dir, signer) as log:
        assert log.frontier is not None
        assert log.frontier.size == len(every)
        await log.checkpoint("start")
    last = checkpoint_entries(log_dir)[-1]
    body, _ = open_checkpoint(last["data"]["note"], [signer.verifier])
    on_disk = [ln for p in sorted(archive.iterdir()) for ln in p.read_bytes().splitlines()]
    on_disk += lines(log_dir)
    assert body.root == mth(on_disk[: last["seq"]])
