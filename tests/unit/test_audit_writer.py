"""The audit-log writer (auditlog/writer.py): chain, durability, group commit,
rotation, crash recovery, checkpoints and disk failures.

Every test reads what is on disk and checks it with an independent reading (orjson per
line, hashlib) and with the verifier (auditlog/verify.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import errno
import hashlib
import json
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from iortd.auditlog import segment_writer
from iortd.auditlog.canonical import ZERO_HASH, CanonicalError, check_json_value
from iortd.auditlog.note import Checkpoint, generate_keypair
from iortd.auditlog.verify import verify_log
from iortd.auditlog.writer import (
    FORMAT,
    AuditLog,
    AuditLogClosed,
    LogDamaged,
    LogInUse,
    segment_paths,
)
from iortd.kernel import durable


class Phase(enum.Enum):
    IRRADIATING = 2


@dataclasses.dataclass
class Reading:
    dose_gy: float


ORIGIN = "iortd/test-site/or-9/00112233aabbccdd"
SEGMENT_NAME = re.compile(r"^log-(\d{16})-(\d{8})\.jsonl$")
PARTIAL = b'{"data":{"x"'


# ---- helpers -----------------------------------------------------------------------------


def read_entries(directory: Path) -> list[dict[str, Any]]:
    """Every entry of every segment, in order; fails on a torn or unparsable line."""
    out = []
    for path in segment_paths(directory):
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), f"{path.name}: torn last line"
        for line in data.splitlines():
            entry = orjson.loads(line)
            # Each line is exactly the canonical JSON of the entry it holds.
            assert line == orjson.dumps(entry, option=orjson.OPT_SORT_KEYS), line
            out.append(entry)
    return out


def independent_hash(entry: dict[str, Any]) -> str:
    without = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(orjson.dumps(without, option=orjson.OPT_SORT_KEYS)).hexdigest()


def assert_chain(entries: list[dict[str, Any]]) -> None:
    prev = ZERO_HASH
    for i, e in enumerate(entries):
        assert e["seq"] == i
        assert e["prev"] == prev
        assert e["hash"] == independent_hash(e)
        prev = e["hash"]


def assert_verifies(directory: Path, **kw: Any) -> None:
    rep = verify_log([directory], **kw)
    assert rep.intact, str(rep.problem)


class FakeClock:
    """Monotonic and wall clocks that the test moves; the wall can be stepped."""

    def __init__(self, start: datetime) -> None:
        self.mono_ns = 10**15
        self._mono0 = self.mono_ns
        self._start = start
        self.step = timedelta(0)

    def mono(self) -> int:
        return self.mono_ns

    def wall(self) -> datetime:
        elapsed = timedelta(microseconds=(self.mono_ns - self._mono0) // 1000)
        return self._start + elapsed + self.step

    def advance(self, seconds: float) -> None:
        self.mono_ns += int(seconds * 1e9)


@contextlib.asynccontextmanager
async def running(directory: Path, **kw: Any) -> AsyncIterator[tuple[AuditLog, Any]]:
    """An open log with its writer task, closed (flushed) at the end."""
    origin = kw.pop("origin", ORIGIN)
    log, report = await AuditLog.open(directory, origin=origin, **kw)
    task = asyncio.create_task(log.run())
    try:
        yield log, report
    finally:
        await asyncio.wait_for(log.close(), 10)
        await asyncio.wait_for(task, 10)


async def start(directory: Path, **kw: Any) -> tuple[AuditLog, Any, asyncio.Task[None]]:
    log, report = await AuditLog.open(directory, origin=kw.pop("origin", ORIGIN), **kw)
    return log, report, asyncio.create_task(log.run())


async def crash(log: AuditLog, task: asyncio.Task[None]) -> None:
    """Die without closing: no daemon_stop, no flush of what is pending; the fd goes."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    seg = log._segment  # the process dies, so its descriptors close
    if seg is not None:
        os.close(seg.fd)
    if log._lock_fd is not None:  # and the kernel drops its lock on the directory
        os.close(log._lock_fd)
        log._lock_fd = None


def sample(i: int, pad: int = 0) -> dict[str, Any]:
    return {"dose_primary_gy": i * 0.01, "state": "IRRADIATING", "pad": "x" * pad}


# ---- opening and appending ---------------------------------------------------------------


async def test_open_creates_log_created_at_seq_0_with_zero_prev(tmp_path: Path) -> None:
    async with running(tmp_path / "log") as (log, report):
        assert report.created is True
        assert report.previous_stop == "none"
        assert report.origin == ORIGIN
        assert log.head[0] == 0
    [entry] = read_entries(tmp_path / "log")
    assert entry["seq"] == 0
    assert entry["prev"] == ZERO_HASH
    assert entry["type"] == "log_created"
    assert entry["data"] == {"origin": ORIGIN, "format": FORMAT}
    assert entry["hash"] == independent_hash(entry) == log.head[1]
    [seg] = segment_paths(tmp_path / "log")
    m = SEGMENT_NAME.match(seg.name)
    assert m is not None
    assert m.group(1) == "0" * 16
    assert m.group(2) == entry["ts"][:10].replace("-", "")


async def test_appended_entries_chain(tmp_path: Path) -> None:
    async with running(tmp_path) as (log, _):
        heads = []
        for i in range(20):
            e = log.append(
                "sample" if i % 3 else "phase_changed",
                sample(i),
                delivery_id="d-1" if i % 2 else None,
                durable=i % 3 == 0,
            )
            heads.append((e.seq, e.hash))
            assert log.head == (e.seq, e.hash)
        await e.committed
    entries = read_entries(tmp_path)
    assert len(entries) == 21
    assert_chain(entries)
    assert [(x["seq"], x["hash"]) for x in entries[1:]] == heads
    assert entries[2]["delivery_id"] == "d-1"
    assert "delivery_id" not in entries[1]
    assert_verifies(tmp_path)


async def test_append_returns_seq_hash_type_ts(tmp_path: Path) -> None:
    clock = FakeClock(datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC))
    async with running(tmp_path, wall=clock.wall, mono=clock.mono) as (log, _):
        clock.advance(0.25)
        e = log.append("event", {"k": "v"}, durable=True)
        await e.committed
    assert (e.seq, e.type, e.ts) == (1, "event", "2026-03-01T12:00:00.250000Z")
    last = read_entries(tmp_path)[-1]
    assert (last["seq"], last["hash"], last["ts"], last["mono_ns"]) == (
        1,
        e.hash,
        e.ts,
        clock.mono_ns,
    )


async def test_durable_entry_is_written_and_fsynced_when_committed_resolves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[tuple[int, int]] = []  # (fd, file size at the fsync)
    real_fsync = os.fsync

    def spy_fsync(fd: int) -> None:
        synced.append((fd, os.fstat(fd).st_size))
        real_fsync(fd)

    async with running(tmp_path, group_commit_s=5.0) as (log, _):
        await log.append("warmup", {}, durable=True).committed
        monkeypatch.setattr(os, "fsync", spy_fsync)
        e = log.append("interlock_changed", {"interlock": "door", "to": "open"}, durable=True)
        await asyncio.wait_for(e.committed, 2)  # well inside the 5 s sample window
        data = (tmp_path / segment_paths(tmp_path)[0].name).read_bytes()
        seg = log._segment
        assert seg is not None
        assert data.endswith(b"\n")
        assert orjson.loads(data.splitlines()[-1])["hash"] == e.hash
        assert (seg.fd, len(data)) in synced, "committed before the bytes were fsync'd"
        assert log.committed_seq == e.seq


async def test_samples_are_group_committed_within_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[int] = []
    real_write_all = durable.write_all

    def counting(fd: int, data: bytes) -> None:
        writes.append(data.count(b"\n"))
        real_write_all(fd, data)

    window = 0.05
    async with running(tmp_path, group_commit_s=window) as (log, _):
        await log.append("warmup", {}, durable=True).committed
        monkeypatch.setattr(segment_writer, "write_all", counting)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        futures = [log.append("sample", sample(i)).committed for i in range(10)]
        await asyncio.sleep(0)
        assert not any(f.done() for f in futures), "samples are not committed one by one"
        await asyncio.wait_for(futures[-1], 5)
        elapsed = loop.time() - t0
        assert all(f.done() for f in futures)
        on_disk = read_entries(tmp_path)  # before close: durable already
    assert [e["type"] for e in on_disk].count("sample") == 10
    assert writes == [10], "one write for the whole group"
    assert elapsed >= window * 0.9, "the writer waits for the window to gather samples"
    assert elapsed < 2.0


async def test_a_durable_entry_flushes_waiting_samples_at_once(tmp_path: Path) -> None:
    async with running(tmp_path, group_commit_s=10.0) as (log, _):
        futures = [log.append("sample", sample(i)).committed for i in range(5)]
        event = log.append("alarm_raised", {"code": "X"}, durable=True)
        await asyncio.wait_for(event.committed, 2)  # not after the 10 s window
        assert all(f.done() for f in futures)
        assert [e["type"] for e in read_entries(tmp_path)][-6:] == ["sample"] * 5 + ["alarm_raised"]


async def test_any_type_and_delivery_id_text_is_written_canonically(tmp_path: Path) -> None:
    odd = ['q"uote', "back\\slash", "\u2014 dash", "\U0001f600", "new\nline", "\x00", "é"]
    async with running(tmp_path) as (log, _):
        for i, text in enumerate(odd):
            e = log.append(text, {text: text, "n": i}, delivery_id=text, durable=True)
        await e.committed
    entries = read_entries(tmp_path)
    assert [(x["type"], x["delivery_id"], x["data"][x["type"]]) for x in entries[1:]] == [
        (t, t, t) for t in odd
    ]
    assert_chain(entries)
    assert_verifies(tmp_path)


async def test_refused_data_appends_nothing(tmp_path: Path) -> None:
    async with running(tmp_path) as (log, _):
        head = log.head
        with pytest.raises(CanonicalError, match=r"data\.dose"):
            log.append("sample", {"dose": float("nan")})
        with pytest.raises(CanonicalError, match=r"data\.n"):
            log.append("sample", {"n": 2**64})
        assert log.head == head
        await log.append("after", {}, durable=True).committed
    entries = read_entries(tmp_path)
    assert [e["type"] for e in entries] == ["log_created", "after"]
    assert_chain(entries)


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 3, 1, 12, 0),  # noqa: DTZ001 - the point: no zone in the record
        datetime(2026, 3, 1, 12, 0, tzinfo=UTC),
        Reading(1.5),
    ],
    ids=["naive-datetime", "aware-datetime", "dataclass"],
)
async def test_append_refuses_what_check_json_value_refuses(tmp_path: Path, value: Any) -> None:
    with pytest.raises(CanonicalError):
        check_json_value({"at": value})
    async with running(tmp_path) as (log, _):
        head = log.head
        with pytest.raises(CanonicalError, match=r"data\.at"):
            log.append("sample", {"at": value, "x": None})
        with pytest.raises(CanonicalError, match=r"data\.at"):
            log.append("sample", {"at": value, "x": 1})  # refused alike without a null
        assert log.head == head


@pytest.mark.parametrize(
    ("value", "written"),
    [(uuid.UUID(int=7), "00000000-0000-0000-0000-000000000007"), (Phase.IRRADIATING, 2)],
    ids=["uuid", "enum"],
)
async def test_check_and_writer_agree_on_uuid_and_enum(
    tmp_path: Path, value: Any, written: object
) -> None:
    check_json_value({"at": value})  # accepted: written in one well-defined form
    async with running(tmp_path) as (log, _):
        await log.append("sample", {"at": value}, durable=True).committed
    assert read_entries(tmp_path)[-1]["data"]["at"] == written


async def test_close_flushes_pending_samples(tmp_path: Path) -> None:
    log, _, task = await start(tmp_path, group_commit_s=30.0)
    futures = [log.append("sample", sample(i)).committed for i in range(7)]
    await asyncio.wait_for(log.close(), 5)  # not after the 30 s window
    await asyncio.wait_for(task, 5)
    assert all(f.done() and f.exception() is None for f in futures)
    assert [e["type"] for e in read_entries(tmp_path)] == ["log_created"] + ["sample"] * 7
    with pytest.raises(AuditLogClosed):
        log.append("sample", sample(0))
    await log.close()  # idempotent


async def test_close_without_the_writer_task_still_writes_everything(tmp_path: Path) -> None:
    log, _ = await AuditLog.open(tmp_path, origin=ORIGIN)
    f = log.append("config_error", {"key": "x"}, durable=True).committed
    await asyncio.wait_for(log.close(), 5)
    assert f.done()
    assert [e["type"] for e in read_entries(tmp_path)] == ["log_created", "config_error"]


async def test_close_without_the_writer_task_reports_a_disk_error_as_oserror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, _ = await AuditLog.open(tmp_path, origin=ORIGIN)

    def full_disk(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(segment_writer, "write_all", full_disk)
    try:
        with pytest.raises(OSError, match="No space left") as err:
            await log.close()
        assert err.value.errno == errno.ENOSPC
    finally:
        seg = log._segment
        if seg is not None:
            os.close(seg.fd)


# ---- rotation ----------------------------------------------------------------------------

MIN_ROTATE = 64 * 1024  # the smallest log.rotate_max_bytes the config allows


async def test_rotation_by_size_links_segments(tmp_path: Path) -> None:
    async with running(tmp_path, rotate_max_bytes=MIN_ROTATE, group_commit_s=0.01) as (log, _):
        for i in range(260):  # ~1.1 kB each: ~280 kB, several segments
            e = log.append("sample", sample(i, pad=1000), durable=i % 50 == 0)
        await e.committed
    paths = segment_paths(tmp_path)
    assert len(paths) >= 4
    prev_last: dict[str, Any] | None = None
    for path in paths:
        m = SEGMENT_NAME.match(path.name)
        assert m is not None
        data = path.read_bytes()
        assert len(data) <= MIN_ROTATE
        seg_entries = [orjson.loads(x) for x in data.splitlines()]
        first = seg_entries[0]
        assert int(m.group(1)) == first["seq"], "a segment is named by its first seq"
        assert m.group(2) == first["ts"][:10].replace("-", "")
        if prev_last is not None:
            assert first["prev"] == prev_last["hash"]
            assert first["seq"] == prev_last["seq"] + 1
        prev_last = seg_entries[-1]
    entries = read_entries(tmp_path)
    assert len(entries) == 261
    assert_chain(entries)
    assert_verifies(tmp_path)


async def test_rotation_by_utc_day_and_a_clock_step_entry(tmp_path: Path) -> None:
    clock = FakeClock(datetime(2026, 3, 1, 23, 59, 58, 500000, tzinfo=UTC))
    async with running(tmp_path, wall=clock.wall, mono=clock.mono) as (log, _):
        e = log.append("sample", sample(1), durable=True)
        await e.committed
        clock.advance(2.0)  # midnight passes, the clocks agree: a new segment, no step
        e = log.append("sample", sample(2), durable=True)
        await e.committed
        clock.advance(0.5)
        clock.step += timedelta(days=1)  # the wall clock jumps a day
        e = log.append("sample", sample(3), durable=True)
        await e.committed
    names = [p.name for p in segment_paths(tmp_path)]
    assert names == [
        "log-0000000000000000-20260301.jsonl",
        "log-0000000000000002-20260302.jsonl",
        "log-0000000000000003-20260303.jsonl",
    ]
    entries = read_entries(tmp_path)
    assert [e["type"] for e in entries] == [
        "log_created",
        "sample",
        "sample",
        "clock_step",
        "sample",
    ]
    step = entries[3]
    assert step["data"]["step_s"] == pytest.approx(86400.0, abs=1e-3)
    assert step["data"]["actual_wall"].startswith("2026-03-03T00:00:01")
    assert step["data"]["expected_wall"].startswith("2026-03-02T00:00:01")
    assert step["ts"].startswith("2026-03-03T00:00:01")
    assert [e["ts"][:10] for e in entries] == [
        "2026-03-01",
        "2026-03-01",
        "2026-03-02",
        "2026-03-03",
        "2026-03-03",
    ]
    assert_chain(entries)
    assert_verifies(tmp_path)


async def test_a_backward_clock_step_is_logged(tmp_path: Path) -> None:
    clock = FakeClock(datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC))
    async with running(tmp_path, wall=clock.wall, mono=clock.mono) as (log, _):
        clock.advance(1.0)
        clock.step -= timedelta(seconds=30)
        await log.append("sample", sample(1), durable=True).committed
        clock.advance(0.9)  # small drift is not a step
        await log.append("sample", sample(2), durable=True).committed
    types = [e["type"] for e in read_entries(tmp_path)]
    assert types == ["log_created", "clock_step", "sample", "sample"]
    assert read_entries(tmp_path)[1]["data"]["step_s"] == pytest.approx(-30.0)


# ---- recovery ----------------------------------------------------------------------------


async def test_reopen_after_a_crash_reports_it_and_continues_the_chain(tmp_path: Path) -> None:
    log, _, task = await start(tmp_path)
    for i in range(5):
        e = log.append("sample", sample(i), durable=i == 4)
    await e.committed
    await crash(log, task)

    async with running(tmp_path, origin="iortd/another/origin/ffff") as (log2, report):
        assert report.created is False
        assert report.previous_stop == "crash"
        assert report.origin == ORIGIN, "an existing log keeps its origin"
        assert (report.last_seq, report.last_hash, report.last_ts) == (5, e.hash, e.ts)
        assert report.tail_bytes == 0
        assert report.tail_kept_at is None
        assert report.segments_set_aside == ()
        assert report.open_delivery_id is None
        e2 = log2.append("recovery", {"previous_stop": "crash"}, durable=True)
        assert e2.seq == 6
        await e2.committed
    entries = read_entries(tmp_path)
    assert entries[6]["prev"] == e.hash
    assert_chain(entries)
    assert_verifies(tmp_path)


async def test_reopen_after_daemon_stop_reports_a_clean_stop(tmp_path: Path) -> None:
    async with running(tmp_path) as (log, _):
        await log.append("daemon_stop", {"clean": True}, durable=True).committed
    async with running(tmp_path) as (_, report):
        assert report.previous_stop == "clean"
        assert report.last_seq == 1


async def test_a_partial_last_line_is_quarantined_and_the_chain_continues(
    tmp_path: Path,
) -> None:
    log, _, task = await start(tmp_path)
    e = log.append("sample", sample(1), durable=True)
    await e.committed
    await crash(log, task)
    [seg] = segment_paths(tmp_path)
    intact = seg.read_bytes()
    seg.write_bytes(intact + PARTIAL)

    async with running(tmp_path) as (log2, report):
        assert report.previous_stop == "crash"
        assert report.last_seq == 1
        assert report.tail_bytes == len(PARTIAL)
        assert report.tail_kept_at is not None
        kept = tmp_path / report.tail_kept_at
        assert kept.parent == tmp_path / "quarantine"
        assert kept.read_bytes() == PARTIAL, "the torn bytes are kept, exactly"
        assert seg.read_bytes() == intact, "the segment is cut back to its last whole entry"
        e2 = log2.append("recovery", {"tail_bytes": report.tail_bytes}, durable=True)
        await e2.committed
    assert seg.read_bytes().startswith(intact)
    entries = read_entries(tmp_path)
    assert entries[-1]["seq"] == 2
    assert entries[-1]["prev"] == e.hash
    assert_chain(entries)
    assert_verifies(tmp_path)


async def test_a_corrupt_last_entry_is_quarantined_not_kept_in_the_chain(tmp_path: Path) -> None:
    log, _, task = await start(tmp_path)
    await log.append("sample", sample(1), durable=True).committed
    await log.append("sample", sample(2), durable=True).committed
    await crash(log, task)
    [seg] = segment_paths(tmp_path)
    lines = seg.read_bytes().splitlines(keepends=True)
    bad = lines[-1].replace(b'"IRRADIATING"', b'"IRRADIATINX"')
    seg.write_bytes(b"".join(lines[:-1]) + bad)

    async with running(tmp_path) as (_, report):
        assert report.last_seq == 1
        assert report.tail_bytes == len(bad)
        assert (tmp_path / str(report.tail_kept_at)).read_bytes() == bad
    assert_verifies(tmp_path)


async def test_a_garbage_newest_segment_is_set_aside_whole(tmp_path: Path) -> None:
    log, _, task = await start(tmp_path)
    e = log.append("sample", sample(1), durable=True)
    await e.committed
    await crash(log, task)
    [seg] = segment_paths(tmp_path)
    date = SEGMENT_NAME.match(seg.name).group(2)  # type: ignore[union-attr]
    garbage_path = tmp_path / f"log-{2:016d}-{date}.jsonl"
    garbage = b"\x00\x00\xffnot a log entry\n" + PARTIAL
    garbage_path.write_bytes(garbage)

    async with running(tmp_path) as (log2, report):
        assert len(report.segments_set_aside) == 1
        aside = tmp_path / report.segments_set_aside[0]
        assert aside.parent == tmp_path / "quarantine"
        assert aside.name.startswith(garbage_path.name)
        assert aside.read_bytes() == garbage, "set aside whole, never deleted"
        assert not garbage_path.exists()
        assert (report.last_seq, report.last_hash) == (1, e.hash)
        await log2.append("recovery", {}, durable=True).committed
    assert_chain(read_entries(tmp_path))
    assert_verifies(tmp_path)


async def test_an_empty_newest_segment_is_set_aside(tmp_path: Path) -> None:
    async with running(tmp_path) as (log, _):
        await log.append("sample", sample(1), durable=True).committed
    empty = tmp_path / "log-0000000000000002-20991231.jsonl"
    empty.touch()
    async with running(tmp_path) as (_, report):
        assert len(report.segments_set_aside) == 1
        assert (tmp_path / report.segments_set_aside[0]).read_bytes() == b""
        assert report.last_seq == 1


async def test_a_first_segment_torn_in_its_first_write_is_kept_and_a_new_log_starts(
    tmp_path: Path,
) -> None:
    (tmp_path / "log-0000000000000000-20260301.jsonl").write_bytes(PARTIAL)
    async with running(tmp_path) as (_, report):
        assert report.created
        assert report.segments_set_aside == ()  # not part of a chain: nothing to report
    [kept] = (tmp_path / "quarantine").iterdir()
    assert kept.read_bytes() == PARTIAL
    assert read_entries(tmp_path)[0]["seq"] == 0


async def _two_segments(tmp_path: Path) -> list[Path]:
    async with running(tmp_path, rotate_max_bytes=64 * 1024) as (log, _):
        for i in range(150):
            log.append("sample", sample(i, pad=600))
        await log.append("event", {}, durable=True).committed
    segs = segment_paths(tmp_path)
    assert len(segs) >= 2
    return segs


def _alter_line(path: Path, n: int) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    lines[n] = lines[n].replace(b"IRRADIATING", b"IRRADIATINX", 1)
    path.write_bytes(b"".join(lines))


@pytest.mark.parametrize(("which", "line"), [(-1, 0), (-2, -1), (-2, 3)])
async def test_damage_anywhere_but_a_torn_end_is_refused_before_anything_moves(
    tmp_path: Path, which: int, line: int
) -> None:
    segs = await _two_segments(tmp_path)
    _alter_line(segs[which], line)
    before = {p.name: p.read_bytes() for p in segment_paths(tmp_path)}
    with pytest.raises(LogDamaged, match="nothing was moved"):
        await AuditLog.open(tmp_path, origin=ORIGIN)
    assert {p.name: p.read_bytes() for p in segment_paths(tmp_path)} == before
    assert not (tmp_path / "quarantine").exists()


async def test_a_clean_stop_whose_checkpoint_rotated_into_a_new_segment_is_clean(
    tmp_path: Path,
) -> None:
    signer = generate_keypair("or-1")
    async with running(tmp_path, signer=signer, rotate_max_bytes=64 * 1024) as (log, _):
        while len(segment_paths(tmp_path)) < 2 or log.head[0] < 3:
            await log.append("sample", sample(1, pad=2000), durable=True).committed
        segs = segment_paths(tmp_path)
        # Fill the newest segment so that the checkpoint after daemon_stop rotates.
        room = 64 * 1024 - segs[-1].stat().st_size
        await log.append("daemon_stop", {"pad": "x" * (room - 400)}, durable=True).committed
        assert await log.checkpoint("shutdown") is not None
    last = segment_paths(tmp_path)[-1]
    assert [e["type"] for e in map(json.loads, last.read_text().splitlines())] == ["checkpoint"]
    async with running(tmp_path) as (_, report):
        assert report.previous_stop == "clean"


async def test_an_open_delivery_is_reported_with_its_last_sample(tmp_path: Path) -> None:
    log, _, task = await start(tmp_path)
    log.append("delivery_started", {"preset_gy": 20.0}, delivery_id="d-7", durable=True)
    log.append("sample", {"dose_primary_gy": 1.5}, delivery_id="d-7")
    last = {"dose_primary_gy": 2.5, "phase": "IRRADIATING"}
    log.append("sample", last, delivery_id="d-7")
    e = log.append("interlock_changed", {"interlock": "door"}, durable=True)
    await e.committed
    await crash(log, task)
    async with running(tmp_path) as (_, report):
        assert report.previous_stop == "crash"
        assert report.open_delivery_id == "d-7"
        assert report.open_delivery_last_sample == last


async def test_a_terminated_delivery_is_not_reported_open(tmp_path: Path) -> None:
    async with running(tmp_path) as (log, _):
        log.append("delivery_started", {"preset_gy": 20.0}, delivery_id="d-8", durable=True)
        log.append("sample", {"dose_primary_gy": 1.5}, delivery_id="d-8")
        log.append("delivery_terminated", {"status": "NORMAL"}, delivery_id="d-8", durable=True)
        await log.append("sample", {"dose_primary_gy": 20.0}).committed
    async with running(tmp_path) as (_, report):
        assert report.open_delivery_id is None
        assert report.open_delivery_last_sample is None


async def test_an_open_delivery_across_segments_is_found(tmp_path: Path) -> None:
    async with running(tmp_path, rotate_max_bytes=MIN_ROTATE) as (log, _):
        log.append("delivery_started", {"preset_gy": 20.0}, delivery_id="d-9", durable=True)
        for i in range(80):
            e = log.append("sample", sample(i, pad=1000), delivery_id="d-9", durable=True)
        await e.committed
        log.append("daemon_stop", {"clean": True}, durable=True)
    assert len(segment_paths(tmp_path)) >= 2
    async with running(tmp_path) as (_, report):
        assert report.previous_stop == "clean"
        assert report.open_delivery_id == "d-9"
        assert report.open_delivery_last_sample == sample(79, pad=1000)


# ---- checkpoints -------------------------------------------------------------------------


async def test_checkpoint_signs_the_head_and_records_it(tmp_path: Path) -> None:
    signer = generate_keypair("iortd-test")
    async with running(tmp_path, signer=signer) as (log, _):
        for i in range(3):
            log.append("sample", sample(i))
        seq, head = log.head
        note = await log.checkpoint("delivery_end")
        assert note is not None
        assert (tmp_path / "checkpoint").read_text(encoding="utf-8") == note
        assert not (tmp_path / "checkpoint.tmp").exists()
    cp, signed = Checkpoint.parse_verified(note, signer.verifier)
    assert signed is True
    assert (cp.origin, cp.count, cp.head_hash) == (ORIGIN, seq + 1, head)
    assert cp.extensions[1] == "reason delivery_end"
    assert cp.extensions[0].startswith("time ")
    entries = read_entries(tmp_path)
    last = entries[-1]
    assert last["type"] == "checkpoint"
    assert last["seq"] == seq + 1
    root = cp.root
    assert root is not None  # a tree checkpoint (issue 20): test_audit_tree.py checks it
    assert last["data"] == {
        "note": note,
        "count": seq + 1,
        "head": head,
        "root": root,
        "tree": "rfc6962",
    }
    assert_chain(entries)
    rep = verify_log([tmp_path], pubkey=signer.verifier, external=note)
    assert rep.intact, str(rep.problem)
    assert rep.checkpoints == rep.checkpoints_by_pubkey == 1


async def test_checkpoint_without_a_signer_returns_none(tmp_path: Path) -> None:
    async with running(tmp_path) as (log, _):
        assert await log.checkpoint("interval") is None
    assert not (tmp_path / "checkpoint").exists()
    assert [e["type"] for e in read_entries(tmp_path)] == ["log_created"]


async def test_a_checkpoint_right_after_a_clock_step_verifies(tmp_path: Path) -> None:
    signer = generate_keypair("iortd-test")
    clock = FakeClock(datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC))
    async with running(tmp_path, signer=signer, wall=clock.wall, mono=clock.mono) as (log, _):
        await log.append("sample", sample(1), durable=True).committed
        clock.advance(300.0)
        clock.step += timedelta(seconds=5)  # NTP steps the clock while nothing else happens
        note = await log.checkpoint("interval")
    types = [e["type"] for e in read_entries(tmp_path)]
    assert types == ["log_created", "sample", "clock_step", "checkpoint"]
    rep = verify_log([tmp_path], pubkey=signer.verifier, external=note)
    assert rep.intact, str(rep.problem)


# ---- a failing disk ----------------------------------------------------------------------


def flaky_write_all(fail: Callable[[int], bool], calls: list[int]) -> Callable[[int, bytes], None]:
    """write_all that, when fail(call number) says so, writes half the bytes then raises
    ENOSPC: a torn write, as a full disk gives."""
    real = durable.write_all

    def write_all(fd: int, data: bytes) -> None:
        calls.append(len(data))
        if fail(len(calls)):
            real(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    return write_all


async def test_a_failing_disk_loses_nothing_and_recovery_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures: list[OSError] = []
    recovered: list[float] = []
    calls: list[int] = []
    async with running(
        tmp_path,
        group_commit_s=0.01,
        on_failure=failures.append,
        on_recovered=recovered.append,
    ) as (log, _):
        await log.append("daemon_start", {}, durable=True).committed
        monkeypatch.setattr(segment_writer, "write_all", flaky_write_all(lambda n: n <= 3, calls))
        futures = [log.append("sample", sample(i)).committed for i in range(5)]
        futures.append(log.append("alarm_raised", {"code": "A"}, durable=True).committed)
        futures += [log.append("sample", sample(i)).committed for i in range(5, 8)]
        await asyncio.wait_for(asyncio.gather(*futures), 10)
        assert log.failing_since is None
        # write_recovered is appended as the retry succeeds; let it be written too
        await asyncio.wait_for(log.append("after", {}, durable=True).committed, 5)
    assert len(failures) == 3
    assert all(f.errno == errno.ENOSPC for f in failures)
    assert len(recovered) == 1
    assert recovered[0] > 0
    entries = read_entries(tmp_path)  # no torn line anywhere
    types = [e["type"] for e in entries]
    assert types[:2] == ["log_created", "daemon_start"]
    assert [e["data"].get("dose_primary_gy") for e in entries if e["type"] == "sample"] == [
        i * 0.01 for i in range(8)
    ], "every sample once, in order"
    assert types.count("alarm_raised") == 1
    assert types.count("write_recovered") == 1
    rec = next(e for e in entries if e["type"] == "write_recovered")
    assert rec["data"]["outage_s"] == pytest.approx(recovered[0], abs=1e-3)
    assert_chain(entries)
    assert_verifies(tmp_path)


async def test_close_waits_for_a_failing_disk_to_recover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    log, _, task = await start(tmp_path, group_commit_s=5.0, on_failure=lambda _: None)
    await log.append("x", {}, durable=True).committed
    monkeypatch.setattr(segment_writer, "write_all", flaky_write_all(lambda n: n <= 2, calls))
    f = log.append("sample", sample(1)).committed
    await asyncio.wait_for(log.close(), 10)
    await asyncio.wait_for(task, 5)
    assert f.done()
    entries = read_entries(tmp_path)
    assert [e["type"] for e in entries] == ["log_created", "x", "sample"]
    assert_verifies(tmp_path)


async def test_a_failure_in_the_second_segment_of_a_batch_duplicates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    async with running(
        tmp_path, rotate_max_bytes=MIN_ROTATE, group_commit_s=0.05, on_failure=lambda _: None
    ) as (log, _):
        await log.append("daemon_start", {}, durable=True).committed
        monkeypatch.setattr(segment_writer, "write_all", flaky_write_all(lambda n: n == 2, calls))
        # ~100 kB of samples in one group-commit window: one batch over two segments
        futures = [log.append("sample", sample(i, pad=1000)).committed for i in range(90)]
        await asyncio.wait_for(asyncio.gather(*futures), 10)
    assert len(calls) >= 3, "the batch was written in two chunks, the second failed once"
    seqs = [e["seq"] for e in read_entries(tmp_path)]
    assert len(seqs) == len(set(seqs)), "an entry was written twice"
    assert_verifies(tmp_path)


async def test_damage_in_the_middle_is_refused_not_quarantined(tmp_path: Path) -> None:
    """A crash tears only the end. Valid entries after a bad one mean damage or tampering:
    the writer must neither hide it (set it aside) nor bury it (write after it)."""
    async with running(tmp_path) as (log, _):
        for i in range(5):
            log.append("sample", sample(i))
        await log.append("event", {}, durable=True).committed
    seg = segment_paths(tmp_path)[0]
    lines = seg.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"IRRADIATING", b"IRRADIATINX")
    seg.write_bytes(b"".join(lines))
    before = seg.read_bytes()
    with pytest.raises(LogDamaged, match=rf"{seg.name}:3: hash mismatch, but valid entries"):
        await AuditLog.open(tmp_path, origin=ORIGIN)
    assert seg.read_bytes() == before, "nothing written, nothing moved"
    assert not (tmp_path / "quarantine").exists()


async def test_one_writer_per_directory(tmp_path: Path) -> None:
    async with running(tmp_path):
        with pytest.raises(LogInUse, match=rf"pid {os.getpid()}"):
            await AuditLog.open(tmp_path, origin=ORIGIN)
    # Released at close: the next writer opens it.
    async with running(tmp_path) as (_, report):
        assert report.previous_stop == "crash"  # no daemon_stop entry was written


async def test_close_after_the_writer_task_was_cancelled_still_writes_everything(
    tmp_path: Path,
) -> None:
    """A shutdown cut short (the task group cancelled) must not lose what was appended."""
    log, _, task = await start(tmp_path, group_commit_s=30.0)
    futures = [log.append("sample", sample(i)).committed for i in range(5)]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await asyncio.wait_for(log.close(), 5)
    assert all(f.done() for f in futures)
    assert [e["type"] for e in read_entries(tmp_path)] == ["log_created"] + ["sample"] * 5


async def test_a_clean_stop_followed_by_its_checkpoint_is_clean(tmp_path: Path) -> None:
    """The daemon signs after daemon_stop; that checkpoint must not make it look a crash."""
    signer = generate_keypair("or-1")
    async with running(tmp_path, signer=signer) as (log, _):
        await log.append("daemon_stop", {"clean": True}, durable=True).committed
        assert await log.checkpoint("shutdown") is not None
    async with running(tmp_path) as (_, report):
        assert report.previous_stop == "clean"


async def test_the_open_delivery_search_stops_at_the_last_start(tmp_path: Path) -> None:
    """Every start closes what an earlier run left open before writing daemon_start, so
    the search need not (and does not) read past it."""
    log, _, task = await start(tmp_path)
    log.append("delivery_started", {"preset_gy": 20.0}, delivery_id="d-old", durable=True)
    log.append("daemon_start", {}, durable=True)
    await log.append("sample", {"dose_primary_gy": 0.0}, durable=True).committed
    await crash(log, task)
    async with running(tmp_path) as (_, report):
        assert report.open_delivery_id is None


async def test_an_open_delivery_taken_over_at_a_start_is_still_found(tmp_path: Path) -> None:
    """A start that took the open delivery over names it in daemon_start: the search goes
    on past it to that delivery's last sample and its start (issue 14: one treatment is
    one record across restarts), and stops at a start that names another or none."""
    log, _, task = await start(tmp_path)
    log.append("delivery_started", {"preset_gy": 20.0, "at": "t0"}, delivery_id="d-9", durable=True)
    last = {"dose_primary_gy": 2.5, "phase": "IRRADIATING"}
    log.append("sample", last, delivery_id="d-9")
    log.append("daemon_start", {"open_delivery": "d-9"}, durable=True)
    log.append("monitoring_gap_started", {"cause": "daemon not running"}, delivery_id="d-9")
    await log.append("daemon_start", {"open_delivery": "d-9"}, durable=True).committed
    await crash(log, task)
    async with running(tmp_path) as (_, report):
        assert report.open_delivery_id == "d-9"
        assert report.open_delivery_last_sample == last
        assert report.open_delivery_started == {"preset_gy": 20.0, "at": "t0"}


async def test_a_start_naming_another_delivery_ends_the_search(tmp_path: Path) -> None:
    log, _, task = await start(tmp_path)
    log.append("delivery_started", {"preset_gy": 20.0}, delivery_id="d-1", durable=True)
    await log.append("daemon_start", {"open_delivery": "d-2"}, durable=True).committed
    await crash(log, task)
    async with running(tmp_path) as (_, report):
        assert report.open_delivery_id is None
