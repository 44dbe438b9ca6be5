"""The seal and what recovery makes of it (auditlog/writer.py): every group commit is
sealed; after a crash the entries beyond the seal are unvouched, a forged end in them
cannot close the open delivery, and a log behind its own seal or checkpoint is refused.
Failing seal/checkpoint-file writes and a deleted segment are alarms, never a crash.

The forger here is the writer itself opened without a key: it chains entries correctly,
which is all that someone with write access to the directory (and no key) can do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from iortd.auditlog import logdir, segment_writer, writer
from iortd.auditlog.note import Checkpoint, Signer, generate_keypair
from iortd.auditlog.verify import verify_log
from iortd.auditlog.writer import AuditLog, RecoveryReport, segment_paths
from iortd.kernel import durable

ORIGIN = "iortd/test-site/or-9/00112233aabbccdd"
DID = "or-9-20260301T120000000000Z"


def entries(directory: Path) -> list[dict[str, Any]]:
    return [
        orjson.loads(line)
        for path in segment_paths(directory)
        for line in path.read_bytes().splitlines()
    ]


@contextlib.asynccontextmanager
async def running(directory: Path, **kw: Any) -> AsyncIterator[tuple[AuditLog, RecoveryReport]]:
    log, report = await AuditLog.open(directory, origin=ORIGIN, **kw)
    task = asyncio.create_task(log.run())
    try:
        yield log, report
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


async def crashed_mid_delivery(directory: Path, signer: Signer) -> tuple[int, dict[str, Any]]:
    """A signed run that dies during a delivery, every commit sealed: (head seq, last
    genuine sample's data)."""
    (
        log,
        _,
    ) = await AuditLog.open(directory, origin=ORIGIN, signer=signer)
    task = asyncio.create_task(log.run())
    log.append("daemon_start", {"verifier_key": signer.verifier.text}, durable=True)
    log.append("delivery_started", {"preset_gy": 20.0}, delivery_id=DID, durable=True)
    last: dict[str, Any] = {}
    for i in range(1, 6):
        last = {"dose_primary_gy": i * 1.0, "state": "IRRADIATING"}
        e = log.append("sample", last, delivery_id=DID)
    await e.committed
    await wait_sealed(directory, e.seq + 1)
    await crash(log, task)
    return e.seq, last


async def wait_sealed(directory: Path, count: int) -> None:
    """The seal is written right after the commit's futures resolve: a bounded poll."""
    async with asyncio.timeout(5):
        while True:
            seal = directory / "seal"
            if seal.exists():
                cp, _ = Checkpoint.parse_verified(seal.read_text(), None)
                if cp.count >= count:
                    return
            await asyncio.sleep(0.005)


async def forge(directory: Path, build: Any) -> list[int]:
    """Append entries as a forger would: the writer, opened without a key."""
    log, _ = await AuditLog.open(directory, origin=ORIGIN)
    task = asyncio.create_task(log.run())
    seqs = [e.seq for e in build(log)]
    await log.close()
    await task
    return seqs


def fake_end(log: AuditLog) -> list[writer.Entry]:
    return [
        log.append("sample", {"dose_primary_gy": 20.0, "state": "READY"}, delivery_id=DID),
        log.append(
            "delivery_terminated",
            {"status": "NORMAL", "reason": "preset reached", "summary": {"preset_gy": 20.0}},
            delivery_id=DID,
            durable=True,
        ),
    ]


async def test_every_group_commit_is_sealed_with_the_head_on_disk(tmp_path: Path) -> None:
    signer = generate_keypair("or-9")
    async with running(tmp_path, signer=signer) as (log, _):
        for n in range(3):
            e = log.append("sample", {"n": n}, durable=True)
            await e.committed
            await wait_sealed(tmp_path, e.seq + 1)
            cp, signed = Checkpoint.parse_verified((tmp_path / "seal").read_text(), signer.verifier)
            assert signed
            assert (cp.origin, cp.count, cp.head_hash) == (ORIGIN, e.seq + 1, e.hash)
            assert cp.extensions[1] == "reason seal"
    assert not (tmp_path / "seal.tmp").exists()
    # The seal is never an entry of the log.
    assert "seal" not in {e["type"] for e in entries(tmp_path)}


async def test_a_forged_end_after_a_crash_is_unvouched_and_does_not_close_the_delivery(
    tmp_path: Path,
) -> None:
    signer = generate_keypair("or-9")
    head, last = await crashed_mid_delivery(tmp_path, signer)
    forged = await forge(tmp_path, fake_end)
    assert forged == [head + 1, head + 2]
    async with running(tmp_path, signer=signer) as (_, report):
        assert report.previous_stop == "crash"
        assert report.unvouched == (head + 1, head + 2)
        assert report.unvouched_count == 2
        assert report.vouched_by == "seal"
        assert report.open_delivery_id == DID, "a forged end must not close the delivery"
        assert report.open_delivery_last_sample == last, "nor a forged sample stand as last"


async def test_without_the_seal_entries_after_the_last_checkpoint_are_unvouched(
    tmp_path: Path,
) -> None:
    signer = generate_keypair("or-9")
    async with running(tmp_path, signer=signer) as (log, _):
        log.append("delivery_started", {"preset_gy": 20.0}, delivery_id=DID, durable=True)
        await log.checkpoint("interval")
        cp_seq = log.head[0]
        for i in range(3):
            e = log.append("sample", {"dose_primary_gy": float(i)}, delivery_id=DID)
        await e.committed
    # The forger deletes the seal and the checkpoint file (they cannot forge them).
    (tmp_path / "seal").unlink()
    (tmp_path / "checkpoint").unlink()
    async with running(tmp_path, signer=signer) as (_, report):
        assert report.vouched_by == "checkpoint entry"
        assert report.unvouched == (cp_seq + 1, e.seq)
        assert "seal: missing" in report.anchor_problems


async def test_an_unsigned_log_vouches_for_nothing_and_reports_no_range(tmp_path: Path) -> None:
    async with running(tmp_path) as (log, _):
        await log.append("sample", {}, durable=True).committed
    assert not (tmp_path / "seal").exists()
    async with running(tmp_path) as (_, report):
        assert report.vouched_count is None
        assert report.unvouched is None
    rep = verify_log([tmp_path])
    assert rep.intact
    assert any("never signed" in w and "proves nothing" in w for w in rep.warnings)


async def restored_backup(tmp_path: Path, signer: Signer) -> Path:
    """A log copied aside, then written on: (the directory, with the older copy put back
    while the seal and checkpoint file stay those of the longer log)."""
    directory = tmp_path / "log"
    async with running(directory, signer=signer) as (log, _):
        await log.append("sample", {"n": 1}, durable=True).committed
    backup = tmp_path / "backup"
    shutil.copytree(directory, backup, ignore=shutil.ignore_patterns("seal", "checkpoint"))
    async with running(directory, signer=signer) as (log, _):
        await log.append("sample", {"n": 2}, durable=True).committed
        await log.checkpoint("interval")
    for seg in segment_paths(directory):
        seg.unlink()
    for seg in segment_paths(backup):
        shutil.copy2(seg, directory / seg.name)
    return directory


async def test_a_restored_older_copy_is_refused_then_accepted_on_request(tmp_path: Path) -> None:
    signer = generate_keypair("or-9")
    directory = await restored_backup(tmp_path, signer)
    before = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    with pytest.raises(writer.LogRolledBack, match="--accept-log-rollback") as err:
        await AuditLog.open(directory, origin=ORIGIN, signer=signer)
    assert "the log has 2 entries" in str(err.value)
    after = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    assert after == before | {"LOCK": after["LOCK"]}, "nothing is touched when refusing"
    async with running(directory, signer=signer, accept_rollback=True) as (_, report):
        assert report.rollback is not None
        assert report.rollback["log_count"] == 2
        assert report.rollback["seal_count"] > 2


async def test_a_log_rewritten_before_its_seal_is_refused(tmp_path: Path) -> None:
    signer = generate_keypair("or-9")
    async with running(tmp_path, signer=signer) as (log, _):
        await log.append("sample", {"n": 1}, durable=True).committed
    # Rewrite everything (no key needed) to a chain of the same length but other content.
    for seg in segment_paths(tmp_path):
        seg.unlink()
    async with running(tmp_path) as (log, _):
        await log.append("sample", {"n": 666}, durable=True).committed
    with pytest.raises(writer.LogRolledBack, match="seq 1 differs from its seal"):
        await AuditLog.open(tmp_path, origin=ORIGIN, signer=signer)


async def test_a_deleted_log_with_its_seal_left_is_refused(tmp_path: Path) -> None:
    signer = generate_keypair("or-9")
    async with running(tmp_path, signer=signer) as (log, _):
        await log.append("sample", {"n": 1}, durable=True).committed
    for seg in segment_paths(tmp_path):
        seg.unlink()
    with pytest.raises(writer.LogRolledBack, match="no log"):
        await AuditLog.open(tmp_path, origin=ORIGIN, signer=signer)


async def test_a_failing_checkpoint_file_write_is_an_alarm_and_a_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    signer = generate_keypair("or-9")
    failures: list[OSError] = []
    recovered: list[float] = []
    real = durable.write_atomic
    fails = {"n": 3}

    def write_atomic(path: Path, data: bytes, *, tmp: Path | None = None) -> None:
        if path.name == "checkpoint" and fails["n"] > 0:
            fails["n"] -= 1
            raise OSError(28, "No space left on device")
        real(path, data, tmp=tmp)

    monkeypatch.setattr(logdir, "write_atomic", write_atomic)
    async with running(
        tmp_path, signer=signer, on_failure=failures.append, on_recovered=recovered.append
    ) as (log, _):
        await log.append("sample", {}, durable=True).committed
        note = await log.checkpoint("interval")  # must not raise
        assert failures, "the failure is an alarm"
        async with asyncio.timeout(10):
            # The file is written before the writer reports the recovery: wait for both.
            while not ((tmp_path / "checkpoint").exists() and recovered):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert (tmp_path / "checkpoint").read_text() == note
    assert "write_recovered" in [e["type"] for e in entries(tmp_path)]


@pytest.mark.parametrize("what", ["segment", "directory"])
async def test_a_deleted_segment_or_directory_is_alarmed_at_the_next_write(
    tmp_path: Path, what: str
) -> None:
    directory = tmp_path / "log"
    failures: list[OSError] = []
    log, _ = await AuditLog.open(directory, origin=ORIGIN, on_failure=failures.append)
    task = asyncio.create_task(log.run())
    await log.append("sample", {}, durable=True).committed
    if what == "segment":
        segment_paths(directory)[0].unlink()
    else:
        shutil.rmtree(directory)
    pending = log.append("sample", {"after": what}, durable=True)
    async with asyncio.timeout(5):
        while not failures:  # noqa: ASYNC110 - the callback has no event of its own
            await asyncio.sleep(0.005)
    assert "deleted" in str(failures[0]) or "moved" in str(failures[0])
    assert not pending.committed.done(), "nothing is acknowledged into a file nobody sees"
    await crash(log, task)


async def test_a_stop_on_a_full_disk_spills_what_is_pending_and_the_next_start_restores_it(
    tmp_path: Path,
) -> None:
    """The disk is really full for the log: RLIMIT_FSIZE stops the segment from growing
    (the kernel answers EFBIG, as the crash tests do it for the daemon; Python ignores
    SIGXFSZ), while the small spill file elsewhere still fits."""
    signer = generate_keypair("or-9")
    directory, spill = tmp_path / "log", tmp_path / "spill"
    log, _ = await AuditLog.open(directory, origin=ORIGIN, signer=signer, spill_dir=spill)
    task = asyncio.create_task(log.run())
    for i in range(40):
        log.append("sample", {"n": i, "pad": "x" * 1000})
    await log.append("daemon_start", {}, durable=True).committed
    size = segment_paths(directory)[-1].stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, hard))
    try:
        pending = [log.append("sample", {"n": i}) for i in range(5)]
        pending.append(log.append("daemon_stop", {"clean": True}, durable=True))
        async with asyncio.timeout(5):
            while log.failing_since is None:  # noqa: ASYNC110 - the writer's own state
                await asyncio.sleep(0.005)
        # The daemon's shutdown deadline passes: it cancels the writer, closes the log.
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with pytest.raises(OSError, match="File too large"):
            await asyncio.wait_for(log.close(), 10)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert writer.spill_path(spill, ORIGIN).exists(), "what could not be written is kept"

    first, last = pending[0].seq, pending[-1].seq
    async with running(directory, signer=signer, spill_dir=spill) as (_, report):
        assert report.spilled is not None
        assert (report.spilled["count"], report.spilled["restored"]) == (6, 6)
        assert (report.spilled["first_seq"], report.spilled["last_seq"]) == (first, last)
        assert (directory / report.spilled["kept_at"]).exists()
        assert report.previous_stop == "crash", "its daemon_stop never reached the disk"
        assert report.unvouched == (first, last), "never sealed: restored as unvouched"
    assert not writer.spill_path(spill, ORIGIN).exists()
    logged = entries(directory)
    assert [e["seq"] for e in logged] == list(range(len(logged)))
    assert [e["hash"] for e in logged if first <= e["seq"] <= last] == [p.hash for p in pending]


async def test_a_planted_spill_directory_is_not_used(tmp_path: Path) -> None:
    """The spill directory sits in a shared place: a symlink planted there must not make
    the daemon write elsewhere, nor a file planted in a foreign directory be restored."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    planted = tmp_path / "spill"
    planted.symlink_to(elsewhere)
    log, _ = await AuditLog.open(tmp_path / "log", origin=ORIGIN, spill_dir=planted)
    await log._spill(
        [segment_writer.Pending(1, "20260301", b"{}\n", asyncio.Future(), True, "0" * 64)]
    )
    await log.close()
    assert list(elsewhere.iterdir()) == [], "nothing written through the symlink"
    writer.spill_path(elsewhere, ORIGIN).write_bytes(b"{}\n")
    async with running(tmp_path / "log", spill_dir=planted) as (_, report):
        assert report.spilled is not None
        assert "not a private directory" in report.spilled["unusable"]


async def test_a_new_key_on_an_existing_log_vouches_for_none_of_it(tmp_path: Path) -> None:
    """As docs/audit-log.md says: a new key goes with a new log directory."""
    old, new = generate_keypair("or-9"), generate_keypair("or-9")
    async with running(tmp_path, signer=old) as (log, _):
        await log.append("daemon_stop", {"clean": True}, durable=True).committed
        await log.checkpoint("shutdown")
        head = log.head[0]
    async with running(tmp_path, signer=new) as (_, report):
        assert report.unvouched == (0, head)
        assert any("not signed by this daemon's key" in p for p in report.anchor_problems)
