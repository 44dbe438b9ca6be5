"""``SinkContext.record`` (daemon/sink_records.py) and ``Sink.signed``: the narrow door a
sink has into the record. Only listed entry types, bounded canonical data, no top-level
delivery id, log first and then every sink's ``report``, nothing after the stop; a
physicist's recorded sign-off reaches every sink's ``signed`` through its queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest
from signofflog import D1, Room, body, deliveries, open_room

from iortd.auditlog.writer import AuditLog, segment_paths
from iortd.daemon.sink_queue import QueuedSink
from iortd.daemon.sink_records import MAX_DATA_BYTES, SinkRecorder
from iortd.daemon.sinks import Sink


class Seen(Sink):
    name = "seen"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.reports: list[tuple[str, dict[str, Any], int]] = []
        self.signoffs: list[tuple[str, str]] = []
        self.got = asyncio.Event()

    async def report(self, kind: str, data: Mapping[str, Any]) -> None:
        # How many entries of that kind were on disk when the sink was told: log first.
        on_disk = sum(
            1
            for p in segment_paths(self.directory)
            for line in p.read_bytes().splitlines()
            if orjson.loads(line)["type"] == kind
        )
        self.reports.append((kind, dict(data), on_disk))
        self.got.set()

    async def signed(self, delivery_id: str, meaning: str) -> None:
        self.signoffs.append((delivery_id, meaning))
        self.got.set()


def entries(directory: Path, kind: str) -> list[dict[str, Any]]:
    return [
        e
        for p in segment_paths(directory)
        for line in p.read_bytes().splitlines()
        if (e := orjson.loads(line))["type"] == kind
    ]


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[AuditLog]:
    audit, _ = await AuditLog.open(tmp_path, origin="test/records")
    task = asyncio.create_task(audit.run())
    yield audit
    await audit.close()
    await task


async def queued(sink: Sink) -> tuple[QueuedSink, asyncio.Task[None]]:
    q = QueuedSink(sink, queue_size=10, overflow="drop_oldest", timeout_s=5.0)
    return q, asyncio.create_task(q.run())


async def test_an_entry_is_on_disk_before_any_sink_is_shown_it(
    log: AuditLog, tmp_path: Path
) -> None:
    seen = Seen(tmp_path)
    q, task = await queued(seen)
    rec = SinkRecorder(log)
    rec.connect([q])
    data = {"delivery_id": D1, "destination": "ois", "outcome": "stored", "attempt": 1}
    assert await rec.record("dicom_handoff", data)
    async with asyncio.timeout(10):
        await seen.got.wait()
    assert seen.reports == [("dicom_handoff", data, 1)]
    [e] = entries(tmp_path, "dicom_handoff")
    assert e["data"] == data
    assert "delivery_id" not in e  # a sink's entry never extends a delivery's range
    await q.aclose()
    await task


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        ("delivery_terminated", {"status": "NORMAL"}),  # not a sink's type
        ("checkpoint", {"note": "x"}),
        ("dicom_handoff", {"detail": "x" * (MAX_DATA_BYTES + 1)}),  # too large
        ("dicom_handoff", {"value": float("nan")}),  # not canonical JSON
    ],
)
async def test_what_a_sink_may_not_record_is_refused(
    log: AuditLog, tmp_path: Path, kind: str, data: dict[str, Any]
) -> None:
    rec = SinkRecorder(log)
    assert not await rec.record(kind, data)
    await log.append("marker", {}, durable=True).committed
    assert not entries(tmp_path, kind)


async def test_nothing_is_recorded_once_the_daemon_is_stopping(
    log: AuditLog, tmp_path: Path
) -> None:
    rec = SinkRecorder(log)
    rec.close()
    assert not await rec.record("dicom_handoff", {"outcome": "stored"})
    await log.append("marker", {}, durable=True).committed
    assert not entries(tmp_path, "dicom_handoff")


async def test_a_recorded_sign_off_reaches_each_sinks_signed(tmp_path: Path) -> None:
    room: Room = await open_room(tmp_path)
    try:
        await deliveries(room.audit)
        seen = Seen(tmp_path)
        q, task = await queued(seen)
        room.signoffs.on_signed = [q.signed]
        got = await room.send(body(room))
        assert got["type"] == "delivery_signed"
        async with asyncio.timeout(10):
            await seen.got.wait()
        assert seen.signoffs == [(D1, "approved")]
        refused = await room.send(body(room))  # a duplicate: refused, nobody told
        assert refused["type"] == "signoff_refused"
        await q.aclose()
        await task
        assert seen.signoffs == [(D1, "approved")]
    finally:
        await room.audit.close()
        await room.task


async def test_an_entry_type_is_written_only_by_the_sink_type_that_owns_it(
    log: AuditLog, tmp_path: Path
) -> None:
    rec = SinkRecorder(log)
    data = {"delivery_id": D1, "destination": "ois", "outcome": "stored"}
    assert not await rec.for_sink("pg-deliveries")("dicom_handoff", data)  # not its type
    assert await rec.for_sink("dicom")("dicom_handoff", data)
    await log.append("marker", {}, durable=True).committed
    assert len(entries(tmp_path, "dicom_handoff")) == 1
