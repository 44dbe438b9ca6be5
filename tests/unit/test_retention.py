"""Segment retention (auditlog/retention.py, archive.py): a closed segment leaves the log
directory only once it verified, is in the archive with the same bytes, is covered by a
signed checkpoint and holds nothing of an open delivery; the budget's alarms are entries,
log lines and notices; the log still opens and verifies, across both places, afterwards.

Real files in tmp directories, the real writer with tiny segments (4 KiB) so that a log of
a few hundred entries has many of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from iortd.audit.cli import main as audit_main
from iortd.auditlog import retention, retention_round, segment_writer
from iortd.auditlog.archive import archive_dir_for
from iortd.auditlog.archive import delete_segment as real_delete
from iortd.auditlog.note import Signer, generate_keypair
from iortd.auditlog.retention import RetentionManager, RetentionSettings
from iortd.auditlog.verify import verify_log
from iortd.auditlog.writer import AuditLog, segment_paths
from iortd.kernel import durable

ORIGIN = "iortd/test-site/or-9/00112233aabbccdd"
DID = "or-9-20260301T120000000000Z"
SEG = 4096


def entries(directory: Path) -> list[dict[str, Any]]:
    return [
        orjson.loads(line)
        for path in segment_paths(directory)
        for line in path.read_bytes().splitlines()
    ]


@contextlib.asynccontextmanager
async def running(directory: Path, signer: Signer | None) -> AsyncIterator[AuditLog]:
    log, _ = await AuditLog.open(directory, origin=ORIGIN, signer=signer, rotate_max_bytes=SEG)
    task = asyncio.create_task(log.run())
    try:
        yield log
    finally:
        await asyncio.wait_for(log.close(), 10)
        await asyncio.wait_for(task, 10)


async def fill(log: AuditLog, n: int, *, delivery_at: int | None = None) -> None:
    """``n`` samples (~300 B each); a delivery started at sample ``delivery_at`` and left
    open; then a signed checkpoint."""
    if log.signer is not None:
        log.append("daemon_start", {"verifier_key": log.signer.verifier.text}, durable=True)
    did = None
    for i in range(n):
        if i == delivery_at:
            did = DID
            log.append("delivery_started", {"preset_gy": 20.0}, delivery_id=did, durable=True)
        e = log.append("sample", {"i": i, "pad": "x" * 240}, delivery_id=did)
    await e.committed
    await log.checkpoint("test")


def settings(archive: Path | None, budget: int, **kw: Any) -> RetentionSettings:
    return RetentionSettings(
        budget_bytes=budget, archive_dir=archive, archive_mount_required=False, **kw
    )


def kinds(directory: Path) -> list[str]:
    return [e["type"] for e in entries(directory)]


@pytest.fixture
def signer() -> Signer:
    return generate_keypair("or-9")


async def test_archives_every_closed_segment_and_deletes_only_down_to_keep(
    tmp_path: Path, signer: Signer
) -> None:
    logdir, share = tmp_path / "log", tmp_path / "share"
    share.mkdir()
    notices: list[tuple[str, str]] = []
    async with running(logdir, signer) as log:
        await fill(log, 120)
        before = segment_paths(logdir)
        total = sum(p.stat().st_size for p in before)
        # Budget: the directory is at ~95 % of it: deletion runs down to 70 %.
        mgr = RetentionManager(
            log, settings(share, int(total / 0.95)), notice=lambda s, m: notices.append((s, m))
        )
        res = await mgr.run_once()
        assert res is not None
        assert res.problem is None
        assert res.archive_error is None
        dest = archive_dir_for(share, ORIGIN)
        archived = [p.name for p in segment_paths(dest)]
        assert archived == [p.name for p in before[:-1]], "every closed segment, never the newest"
        after = segment_paths(logdir)
        gone = [p.name for p in before if p not in after]
        assert gone == [p.name for p in before[: len(gone)]], "oldest first, no hole"
        assert gone, "the directory was over warn_fraction: something was deleted"
        assert res.used_bytes <= 0.7 * mgr.settings.budget_bytes
        st = mgr.status()
        assert st.oldest_local_segment == after[0].name
        assert st.unarchived_segments == 0
        assert st.deleted_total == len(gone)
    got = kinds(logdir)
    assert "segments_archived" in got
    assert "segments_deleted" in got
    deleted = next(e for e in entries(logdir) if e["type"] == "segments_deleted")
    assert [s["name"] for s in deleted["data"]["segments"]] == gone
    # The log opens again without its first segment (origin from the marker, no rollback)
    # and the union of both places verifies as one log.
    # As the daemon does, a new origin is offered at each start; the log keeps its own.
    log, _ = await AuditLog.open(logdir, origin="iortd/test-site/or-9/ffff", signer=signer)
    await log.close()
    assert log.origin == ORIGIN
    rep = verify_log([logdir], pubkey=signer.verifier, archive=share)
    assert rep.problem is None, rep.problem
    assert rep.archive_counts is not None
    assert rep.archive_counts[1] == len(gone)
    alone = verify_log([logdir], pubkey=signer.verifier)
    assert alone.problem is not None
    assert "verify with --archive" in alone.problem.what


async def test_nothing_deleted_without_a_covering_checkpoint_or_a_key(tmp_path: Path) -> None:
    logdir, share = tmp_path / "log", tmp_path / "share"
    share.mkdir()
    async with running(logdir, None) as log:
        await fill(log, 80)
        before = segment_paths(logdir)
        mgr = RetentionManager(log, settings(share, 1024))  # far over budget
        res = await mgr.run_once()
        assert res is not None
        assert len(res.archived) == len(before) - 1
        assert segment_paths(logdir) == before, "no signed checkpoint: nothing deleted"
        assert mgr.status().level == "budget_reached"
    assert "storage_budget_reached" in kinds(logdir)


async def test_checkpoint_entry_kept_local_and_open_delivery_kept(
    tmp_path: Path, signer: Signer
) -> None:
    logdir, share = tmp_path / "log", tmp_path / "share"
    share.mkdir()
    async with running(logdir, signer) as log:
        await fill(log, 120, delivery_at=40)
        mgr = RetentionManager(log, settings(share, 1024))
        await mgr.run_once()
        first = segment_paths(logdir)[0]
        seqs = [e["seq"] for e in entries(logdir) if e["type"] == "delivery_started"]
        assert int(first.name[4:20]) <= seqs[0], "the open delivery's start stays local"
        assert int(first.name[4:20]) > 0, "what is before it went"


async def test_archive_unreachable_keeps_writing_alarms_and_deletes_nothing(
    tmp_path: Path, signer: Signer
) -> None:
    logdir = tmp_path / "log"
    share = tmp_path / "not-a-dir"
    share.write_text("a file where the share should be mounted")
    notices: list[tuple[str, str]] = []
    async with running(logdir, signer) as log:
        await fill(log, 80)
        before = segment_paths(logdir)
        mgr = RetentionManager(
            log, settings(share, 1024), notice=lambda s, m: notices.append((s, m))
        )
        res = await mgr.run_once()
        assert res is not None
        assert res.archive_error is not None
        assert segment_paths(logdir) == before
        st = mgr.status()
        assert st.level == "budget_reached"
        assert st.last_archive_error
        assert st.unarchived_segments == len(before) - 1
        e = log.append("sample", {"i": -1}, durable=True)  # the record goes on
        await e.committed
        # The share comes back: archived at the next round, then deleted, and it is said.
        share.unlink()
        share.mkdir()
        res = await mgr.run_once()
        assert res is not None
        assert res.archive_error is None
        assert res.deleted
    got = kinds(logdir)
    assert got.count("archive_failed") == 1
    assert "archive_recovered" in got
    assert "storage_budget_reached" in got
    assert [s for s, _ in notices][:2] == ["critical", "critical"]
    failed = next(e for e in entries(logdir) if e["type"] == "archive_failed")["data"]
    assert failed["archive"] == "unreachable"
    assert failed["used_bytes"] > failed["budget_bytes"]


async def test_no_archive_dir_never_deletes_and_warns_before_the_budget(
    tmp_path: Path, signer: Signer
) -> None:
    logdir = tmp_path / "log"
    async with running(logdir, signer) as log:
        await fill(log, 60)
        before = segment_paths(logdir)
        total = sum(p.stat().st_size for p in before)
        mgr = RetentionManager(log, settings(None, int(total / 0.85)))
        await mgr.run_once()
        assert segment_paths(logdir) == before
        assert mgr.status().level == "warning"
    warning = next(e for e in entries(logdir) if e["type"] == "storage_warning")["data"]
    assert warning["archive"] == "not configured"
    assert warning["warn_bytes"] < warning["used_bytes"] < warning["budget_bytes"]


async def test_altered_segment_is_neither_archived_nor_deleted(
    tmp_path: Path, signer: Signer
) -> None:
    logdir, share = tmp_path / "log", tmp_path / "share"
    share.mkdir()
    async with running(logdir, signer) as log:
        await fill(log, 80)
        victim = segment_paths(logdir)[2]
        victim.write_bytes(victim.read_bytes().replace(b'"i":', b'"j":', 1))
        mgr = RetentionManager(log, settings(share, 1024))
        res = await mgr.run_once()
        assert res is not None
        assert res.problem is not None
        assert victim.name in res.problem
        dest = archive_dir_for(share, ORIGIN)
        assert victim.name not in [p.name for p in segment_paths(dest)]
        assert victim.exists()
        assert all(p.name < victim.name for p in segment_paths(dest))
    assert "retention_blocked" in kinds(logdir)


async def test_differing_file_in_the_archive_is_set_aside_never_overwritten(
    tmp_path: Path, signer: Signer
) -> None:
    logdir, share = tmp_path / "log", tmp_path / "share"
    async with running(logdir, signer) as log:
        await fill(log, 60)
        first = segment_paths(logdir)[0]
        dest = archive_dir_for(share, ORIGIN)
        dest.mkdir(parents=True)
        (dest / first.name).write_bytes(b"not this segment\n")
        (dest / f".{first.name}.part").write_bytes(b"half a copy")
        await RetentionManager(log, settings(share, 10**9)).run_once()
        assert (dest / first.name).read_bytes() == first.read_bytes()
        aside = [p for p in dest.iterdir() if ".differs-" in p.name]
        assert len(aside) == 1
        assert aside[0].read_bytes() == b"not this segment\n"
        assert not (dest / f".{first.name}.part").exists()


def _retained(tmp_path: Path, signer: Signer) -> tuple[Path, Path, list[str]]:
    logdir, share = tmp_path / "log", tmp_path / "share"
    share.mkdir()

    async def go() -> list[str]:
        async with running(logdir, signer) as log:
            await fill(log, 200)
            total = sum(p.stat().st_size for p in segment_paths(logdir))
            # Kept: 0.7 / 0.85 of it, so that some archived segments are local still.
            res = await RetentionManager(log, settings(share, int(total / 0.85))).run_once()
            assert res is not None
            return [i.name for i in res.deleted]

    gone = asyncio.run(go())
    assert len(gone) >= 2
    return logdir, archive_dir_for(share, ORIGIN), gone


def test_verify_cli_across_archive_and_log(
    tmp_path: Path, signer: Signer, capsys: pytest.CaptureFixture[str]
) -> None:
    logdir, dest, gone = _retained(tmp_path, signer)
    share = tmp_path / "share"
    assert audit_main(["verify", str(logdir), "--archive", str(share)]) == 0
    out = capsys.readouterr().out
    assert "INTACT" in out
    assert f"{len(gone)} segment(s) read from it" in out
    assert audit_main(["verify", str(logdir), "--archive", str(dest)]) == 0
    capsys.readouterr()
    # A segment present in both places that differs: not intact, named.
    both = segment_paths(logdir)[0]
    assert (dest / both.name).exists()
    (dest / both.name).write_bytes((dest / both.name).read_bytes()[:-10] + b"x" * 10)
    assert audit_main(["verify", str(logdir), "--archive", str(dest)]) == 1
    out = capsys.readouterr().out
    assert both.name in out
    assert "differs from its archived copy" in out
    (dest / both.name).write_bytes(both.read_bytes())
    # A deleted segment missing from the archive too: named, exit 1.
    (dest / gone[1]).unlink()
    assert audit_main(["verify", str(logdir), "--archive", str(dest)]) == 1
    out = capsys.readouterr().out
    assert f"log-{int(gone[1][4:20]):016d}-*.jsonl was deleted without being archived" in out
    assert audit_main(["verify", str(logdir), "--archive", str(tmp_path / "nope")]) == 2


def test_half_copy_under_its_final_name_is_not_accepted(tmp_path: Path, signer: Signer) -> None:
    logdir, dest, gone = _retained(tmp_path, signer)
    data = (dest / gone[0]).read_bytes()
    (dest / gone[0]).write_bytes(data[: len(data) // 2])
    rep = verify_log([logdir], pubkey=signer.verifier, archive=dest)
    assert rep.problem is not None
    assert rep.problem.file.name == gone[0]


async def test_hash_of_an_archived_entry_is_still_known_to_the_writer(
    tmp_path: Path, signer: Signer
) -> None:
    """The MQTT sink asks the log for the hash at the broker's retained checkpoint before
    it overwrites it (service.py): an entry retention moved to the archive is not a fork."""
    logdir, share = tmp_path / "log", tmp_path / "share"
    share.mkdir()
    async with running(logdir, signer) as log:
        await fill(log, 120)
        first = entries(logdir)[5]
        res = await RetentionManager(log, settings(share, 1024)).run_once()
        assert res is not None
        assert res.deleted
        assert int(segment_paths(logdir)[0].name[4:20]) > 5
        assert await log.hash_at(5) == first["hash"]


async def test_full_disk_deletes_archived_segments_and_records_it_once_space_is_free(
    tmp_path: Path, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk is full: the log cannot be written, so the deletion's entry cannot become
    durable first. Archived, covered segments are deleted anyway (that frees the space),
    and the entry, pending in the writer in its place, is written after."""
    logdir, share = tmp_path / "log", tmp_path / "share"
    share.mkdir()
    monkeypatch.setattr(retention, "FAILING_WAIT_S", 0.05)
    monkeypatch.setattr(retention, "ROUND_TIMEOUT_S", 5.0)
    full = {"on": False}

    def write_all(fd: int, data: bytes) -> None:
        if full["on"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        durable.write_all(fd, data)

    def delete_segment(*args: Any) -> None:
        real_delete(*args)
        full["on"] = False  # space freed

    monkeypatch.setattr(segment_writer, "write_all", write_all)
    monkeypatch.setattr(retention_round, "delete_segment", delete_segment)
    async with running(logdir, signer) as log:
        await fill(log, 120)
        await RetentionManager(log, settings(share, 10**9)).run_once()  # archived, marker
        full["on"] = True
        res = await RetentionManager(log, settings(share, 1024)).run_once()
        assert res is not None
        assert res.deleted, "archived segments deleted to free the space"
        e = log.append("sample", {"i": -1}, durable=True)
        await asyncio.wait_for(e.committed, 10)
    log_entries = entries(logdir)
    deleted = next(x for x in log_entries if x["type"] == "segments_deleted")
    after = next(x for x in log_entries if x["type"] == "sample" and x["data"]["i"] == -1)
    assert deleted["seq"] < after["seq"], "the pending entry kept its place"
    rep = verify_log([logdir], pubkey=signer.verifier, archive=share)
    assert rep.problem is None, rep.problem


async def test_a_segment_just_created_and_still_empty_does_not_block(
    tmp_path: Path, signer: Signer
) -> None:
    """The writer creates the next segment before its first write (and on a failing disk
    it stays empty): the segment before it is not closed yet, and nothing is wrong."""
    logdir, share = tmp_path / "log", tmp_path / "share"
    share.mkdir()
    async with running(logdir, signer) as log:
        await fill(log, 60)
        newest = segment_paths(logdir)[-1]
        seq, _ = log.head
        (logdir / f"log-{seq + 1:016d}-{newest.name[21:29]}.jsonl").touch()
        res = await RetentionManager(log, settings(share, 10**9)).run_once()
        assert res is not None
        assert res.problem is None
        dest = archive_dir_for(share, ORIGIN)
        assert newest.name not in {p.name for p in segment_paths(dest)}


async def test_a_segment_roll_wakes_the_task_before_its_interval(
    tmp_path: Path, signer: Signer
) -> None:
    logdir, share = tmp_path / "log", tmp_path / "share"
    share.mkdir()
    async with running(logdir, signer) as log:
        log.append("daemon_start", {"verifier_key": signer.verifier.text}, durable=True)
        mgr = RetentionManager(log, settings(share, 10**9, interval_s=3600))
        log.on_rotate = mgr.wake_threadsafe
        stop = asyncio.Event()
        task = asyncio.create_task(mgr.run(stop))
        try:
            await asyncio.wait_for(mgr.round_finished.wait(), 10)  # the first, at once
            assert mgr.status().archived_total == 0
            mgr.round_finished.clear()
            for i in range(40):  # several rolls of a 4 KiB segment
                e = log.append("sample", {"i": i, "pad": "x" * 240})
            await e.committed
            while not mgr.status().archived_total:  # rounds at the rolls, not in an hour
                await asyncio.wait_for(mgr.round_finished.wait(), 10)
                mgr.round_finished.clear()
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)


async def test_share_gone_after_deletions_is_an_archive_alarm_not_a_broken_log(
    tmp_path: Path, signer: Signer
) -> None:
    """Once the oldest segments are only in the archive, an unmounted share must not be
    taken for a log whose first segment does not link (nor be recreated empty)."""
    logdir, share = tmp_path / "log", tmp_path / "share"
    share.mkdir()
    async with running(logdir, signer) as log:
        await fill(log, 120)
        res = await RetentionManager(log, settings(share, 1024)).run_once()
        assert res is not None
        assert res.deleted
        share.rename(tmp_path / "unmounted")
        mgr = RetentionManager(log, settings(share, 1024))
        res = await mgr.run_once()
        assert res is not None
        assert res.problem is None
        assert res.archive_error is not None
        assert "missing" in res.archive_error
        assert not share.exists()
    assert "retention_blocked" not in kinds(logdir)


async def test_a_round_is_bounded_and_the_next_goes_on_at_once(
    tmp_path: Path, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first round on a large log (or after days without the share) reads at most
    ROUND_BYTES; the task runs the next round at once, not an interval later."""
    logdir, share = tmp_path / "log", tmp_path / "share"
    share.mkdir()
    monkeypatch.setattr(retention_round, "ROUND_BYTES", 3 * SEG)
    async with running(logdir, signer) as log:
        await fill(log, 120)
        closed = len(segment_paths(logdir)) - 1
        mgr = RetentionManager(log, settings(share, 10**9, interval_s=3600))
        res = await mgr.run_once()
        assert res is not None
        assert res.more
        assert 0 < len(res.archived) < closed
        stop = asyncio.Event()
        task = asyncio.create_task(mgr.run(stop))
        try:
            while True:  # each round sets round_finished; the last one archived the rest
                await asyncio.wait_for(mgr.round_finished.wait(), 10)
                mgr.round_finished.clear()
                if not mgr.status().unarchived_segments:
                    break
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
        assert mgr.status().archived_total >= closed  # (its own entries may roll one more)


async def test_a_delivery_carried_across_a_restart_keeps_its_start_local(
    tmp_path: Path, signer: Signer
) -> None:
    """The delivery left open by one run and taken over by the next (its daemon_start
    names it) spans both runs' segments: none of them goes, from its delivery_started on."""
    logdir, share = tmp_path / "log", tmp_path / "share"
    share.mkdir()
    async with running(logdir, signer) as log:
        await fill(log, 60, delivery_at=30)  # left open
    async with running(logdir, signer) as log:
        log.append(
            "daemon_start",
            {"verifier_key": signer.verifier.text, "open_delivery": DID},
            durable=True,
        )
        for i in range(80):
            e = log.append("sample", {"i": i, "pad": "x" * 240}, delivery_id=DID)
        await e.committed
        await log.checkpoint("test")
        res = await RetentionManager(log, settings(share, 1024)).run_once()
        assert res is not None
        assert res.deleted, "what is before the delivery went"
    start = next(e["seq"] for e in entries(logdir) if e["type"] == "delivery_started")
    assert int(segment_paths(logdir)[0].name[4:20]) <= start


def test_a_segment_in_the_archive_only_after_the_first_local_one_is_refused(
    tmp_path: Path, signer: Signer
) -> None:
    # Whoever can write the share must not extend the log: retention deletes oldest first,
    # so an archive-only segment after the first local one was never one of its deletions.
    logdir, dest, _gone = _retained(tmp_path, signer)
    newest = segment_paths(logdir)[-1]
    forged = dest / f"log-{int(newest.name[4:20]) + 10**6:016d}{newest.name[20:]}"
    forged.write_bytes(newest.read_bytes())
    rep = verify_log([logdir], pubkey=signer.verifier, archive=dest)
    assert rep.problem is not None
    assert rep.problem.file == forged
    assert "comes after the first local segment" in rep.problem.what
