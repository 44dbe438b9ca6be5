"""The daemon's own start on a log directory someone else has changed (auditlog/writer.py
``_recover`` and ``_lock``): files that are not regular files under a segment's name or as
``LOCK`` are refused with one error naming the file, never read (a FIFO would hang the
start, a link to /dev/zero would exhaust memory) and never followed (a link would make the
daemon truncate or read a file of the attacker's choosing).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from iortd.auditlog.note import generate_keypair
from iortd.auditlog.writer import AuditLog, LogUnusable, segment_paths

ORIGIN = "iortd/test-site/or-9/00112233aabbccdd"
BOUND_S = 10  # the refusal is immediate; a hang is what is tested against


async def a_log(directory: Path) -> Path:
    """A small, cleanly stopped log; returns its (only) segment."""
    log, _ = await AuditLog.open(directory, origin=ORIGIN)
    task = asyncio.create_task(log.run())
    await log.append("daemon_stop", {"clean": True}, durable=True).committed
    await log.close()
    await task
    [seg] = segment_paths(directory)
    return seg


def later_segment(seg: Path) -> Path:
    """A name that sorts after ``seg``: the one recovery reads as the newest."""
    return seg.with_name(seg.name.replace("log-0000000000000000", "log-0000000000000099"))


async def refused(directory: Path, fifo: Path | None = None) -> str:
    try:
        async with asyncio.timeout(BOUND_S):
            await AuditLog.open(directory, origin=ORIGIN)
    except LogUnusable as exc:
        return str(exc)
    except TimeoutError:
        if fifo is not None:  # let the stuck reader go, so that the test can end
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"the start hung for {BOUND_S} s on {fifo}")
    pytest.fail("the start was not refused")


async def test_a_fifo_as_the_newest_segment_is_refused_at_once(tmp_path: Path) -> None:
    seg = await a_log(tmp_path)
    fifo = later_segment(seg)
    os.mkfifo(fifo)
    err = await refused(tmp_path, fifo)
    assert str(fifo) in err
    assert "FIFO" in err


async def test_a_link_to_dev_zero_as_a_segment_is_refused_without_reading_it(
    tmp_path: Path,
) -> None:
    seg = await a_log(tmp_path)
    link = later_segment(seg)
    link.symlink_to("/dev/zero")
    err = await refused(tmp_path)
    assert str(link) in err
    assert "symbolic link" in err


async def test_a_link_to_a_regular_file_as_a_segment_is_refused(tmp_path: Path) -> None:
    # Even one with valid content: the daemon never makes links, and following one would
    # let whoever planted it make the daemon append to (and truncate) any file it can write.
    seg = await a_log(tmp_path)
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere.jsonl"
    seg.rename(elsewhere)
    seg.symlink_to(elsewhere)
    before = elsewhere.read_bytes()
    err = await refused(tmp_path)
    assert str(seg) in err
    assert elsewhere.read_bytes() == before


async def test_a_lock_file_linked_elsewhere_is_refused_and_its_target_untouched(
    tmp_path: Path,
) -> None:
    await a_log(tmp_path)
    victim = tmp_path.parent / f"{tmp_path.name}-victim.txt"
    victim.write_text("the signing key, say\n")
    (tmp_path / "LOCK").unlink()
    (tmp_path / "LOCK").symlink_to(victim)
    err = await refused(tmp_path)
    assert str(tmp_path / "LOCK") in err
    assert victim.read_text() == "the signing key, say\n"


def torn(seg: Path) -> None:
    """What a crash mid-write leaves (and what anyone can append): bytes after the last
    newline, which recovery sets aside into quarantine/."""
    with seg.open("ab") as f:
        f.write(b"ssh-ed25519 AAAA... planted\n"[:-1])


async def test_a_planted_link_at_the_quarantine_name_is_not_written_through(
    tmp_path: Path,
) -> None:
    seg = await a_log(tmp_path)
    torn(seg)
    victim = tmp_path.parent / f"{tmp_path.name}-authorized_keys"
    victim.write_text("the real keys\n")
    q = tmp_path / "quarantine"
    q.mkdir()
    size = seg.stat().st_size - len(b"ssh-ed25519 AAAA... planted")
    now = datetime.now(UTC)
    for ahead in range(-1, 6):  # the name has a per-second stamp: plant a few
        stamp = (now + timedelta(seconds=ahead)).strftime("%Y%m%dT%H%M%SZ")
        (q / f"{seg.name}.tail-at-{size}.{stamp}.bin").symlink_to(victim)
    with contextlib.suppress(LogUnusable):
        async with asyncio.timeout(BOUND_S):
            log, _ = await AuditLog.open(tmp_path, origin=ORIGIN)
            await log.close()
    assert victim.read_text() == "the real keys\n"


async def test_a_quarantine_linked_elsewhere_is_refused(tmp_path: Path) -> None:
    seg = await a_log(tmp_path)
    torn(seg)
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    (tmp_path / "quarantine").symlink_to(elsewhere)
    err = await refused(tmp_path)
    assert str(tmp_path / "quarantine") in err
    assert list(elsewhere.iterdir()) == []


async def test_a_link_planted_as_the_seals_temporary_file_is_not_written_through(
    tmp_path: Path,
) -> None:
    """The seal and checkpoint file are replaced through seal.tmp / checkpoint.tmp, fixed
    names in the log directory: a link planted there must not make the daemon truncate
    and overwrite its target (its signing key, say) with a note."""
    signer = generate_keypair("or-9")
    key = tmp_path.parent / f"{tmp_path.name}-signing.key"
    key.write_text("the signing key\n")
    for name in ("seal.tmp", "checkpoint.tmp"):
        (tmp_path / name).symlink_to(key)
    log, _ = await AuditLog.open(tmp_path, origin=ORIGIN, signer=signer)
    task = asyncio.create_task(log.run())
    await log.append("daemon_start", {}, durable=True).committed
    await log.checkpoint("start")
    await asyncio.wait_for(log.close(), BOUND_S)
    await task
    assert key.read_text() == "the signing key\n"
    for name in ("seal", "checkpoint"):
        assert (tmp_path / name).is_file()
        assert not (tmp_path / name).is_symlink()


async def test_a_link_planted_at_the_next_segments_name_is_not_written_through(
    tmp_path: Path,
) -> None:
    """The next segment's name is predictable (its first seq and the date): a link planted
    there is a failing write (alarmed, retried), never a log appended to another file."""
    victim = tmp_path.parent / f"{tmp_path.name}-victim.txt"
    victim.write_text("not a log\n")
    failures: list[OSError] = []
    log, _ = await AuditLog.open(
        tmp_path, origin=ORIGIN, rotate_max_bytes=1, on_failure=failures.append
    )
    task = asyncio.create_task(log.run())
    await log.append("daemon_start", {}, durable=True).committed
    seq, _ = log.head
    date = segment_paths(tmp_path)[-1].name.split("-")[2]
    (tmp_path / f"log-{seq + 1:016d}-{date}").symlink_to(victim)
    entry = log.append("sample", {"n": 1}, durable=True)
    async with asyncio.timeout(BOUND_S):
        while not (failures or entry.committed.done()):  # noqa: ASYNC110 - the writer's state
            await asyncio.sleep(0.005)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, OSError):
        await task
    with contextlib.suppress(OSError):
        await asyncio.wait_for(log.close(), BOUND_S)
    assert victim.read_text() == "not a log\n", "the log was appended to the link's target"
    assert failures, "a link at the next segment's name is a failing write, alarmed"


async def test_a_seal_that_is_a_fifo_or_huge_is_not_read_and_vouches_for_nothing(
    tmp_path: Path,
) -> None:
    signer = generate_keypair("or-9")
    log, _ = await AuditLog.open(tmp_path, origin=ORIGIN, signer=signer)
    task = asyncio.create_task(log.run())
    await log.append("daemon_start", {}, durable=True).committed
    await log.checkpoint("start")
    await log.close()
    await task
    for plant in ("fifo", "huge"):
        seal = tmp_path / "seal"
        seal.unlink()
        if plant == "fifo":
            os.mkfifo(seal)
        else:
            with seal.open("wb") as f:
                f.truncate(8 * 1024**3)  # sparse: 8 GiB that cost nothing on disk
        async with asyncio.timeout(BOUND_S):
            log, report = await AuditLog.open(tmp_path, origin=ORIGIN, signer=signer)
            await log.close()
        assert any(p.startswith("seal: ") for p in report.anchor_problems), report
        assert report.vouched_by in ("checkpoint file", "checkpoint entry")
