"""Retention in the real daemon: ``iortd run`` with ``[log.retention]`` archives and
deletes in its own task; SIGKILLed between archiving and deleting (the crash point
``renamed-before-delete``), it deletes nothing, and the next start completes the step; the
log directory and the archive then verify as one log (``iort-audit verify --archive``).
Over its budget with the share not mounted, it records on, deletes nothing, and says so
on the MQTT ``events`` topic (a real Mosquitto, an independent ``mosquitto_sub``).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from daemonproc import Daemon, Site
from mqttobs import Message, Observer, schema_errors

from iortd.auditlog.archive import CRASH_ENV, archive_dir_for
from iortd.auditlog.note import load_signer, load_verifier
from iortd.auditlog.verify import verify_log
from iortd.auditlog.writer import AuditLog, new_origin, segment_paths
from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto

RETENTION = """
[log.retention]
budget_mb = 1
archive_dir = "share"
archive_mount_required = false
interval_s = 1
"""
SEG = 64 * 1024


async def prefill(site: Site, key: Path) -> str:
    """About 1 MB of earlier runs (a signed log of 64 KiB segments, a checkpoint): over
    the 0.8 MiB warning level of the 1 MiB budget. Returns the log's origin."""
    signer = load_signer(key)
    log, _ = await AuditLog.open(
        site.log_dir,
        origin=new_origin("test-site", "or-7"),
        signer=signer,
        rotate_max_bytes=SEG,
    )
    task = asyncio.create_task(log.run())
    log.append("daemon_start", {"verifier_key": signer.verifier.text}, durable=True)
    for i in range(3400):
        e = log.append("sample", {"i": i, "pad": "x" * 240})
    await e.committed
    await log.checkpoint("earlier run")
    await log.close()
    await task
    return log.origin


async def test_daemon_killed_before_delete_deletes_nothing_then_completes(
    make_site: Callable[..., Site], tmp_path: Path
) -> None:
    site = make_site(rotate=SEG)
    site.config.write_text(site.config.read_text() + RETENTION)
    share = tmp_path / "share"
    share.mkdir()
    origin = await prefill(site, tmp_path / "keys" / "or-7.key")
    before = [p.name for p in segment_paths(site.log_dir)]
    dest = archive_dir_for(share, origin)

    crashing = await Daemon.follow(site, env={**os.environ, CRASH_ENV: "renamed-before-delete"})
    try:
        async with asyncio.timeout(30):
            assert await crashing.proc.wait() == -9, crashing.lines[-5:]
    finally:
        await crashing.ensure_dead()
    assert crashing.events("segments_archived"), "archived before the crash"
    assert [p.name for p in segment_paths(site.log_dir)][: len(before)] == before
    assert {p.name for p in segment_paths(dest)} >= set(before[:-1])

    daemon = await Daemon.follow(site)
    try:
        done = await daemon.seen(lambda r: r.get("event") == "segments_deleted", "a deletion")
        assert done["count"] >= 1
        assert await daemon.stop() == 0
    finally:
        await daemon.ensure_dead()
    local = [p.name for p in segment_paths(site.log_dir)]
    assert local[0] != before[0], "the oldest segments left the directory"
    assert set(before) - set(local) <= {p.name for p in segment_paths(dest)}
    # One log across both places. The SIGKILL left the entries of its last commit window
    # unsealed: recovery recorded them as unvouched, as after any crash (audit-log.md).
    rep = verify_log([site.log_dir], pubkey=load_verifier(site.pubkey), archive=share)
    assert rep.problem is None, rep.problem
    assert rep.archive_counts is not None
    assert rep.archive_counts[1] == len(set(before) - set(local))
    assert all(u.recorded_at is not None for u in rep.unvouched), rep.unvouched


def _notice(words: str) -> Callable[[Message], bool]:
    return lambda m: (
        m.name == "events" and m.payload.get("kind") == "daemon_notice" and words in m.raw
    )


@pytest.fixture
async def observed(tmp_path: Path) -> AsyncIterator[tuple[Mosquitto, Observer]]:
    with Mosquitto(BrokerOptions(), tmp_path / "broker") as broker:
        obs = await Observer(broker.port).start()
        try:
            yield broker, obs
        finally:
            await obs.stop()


async def test_over_budget_with_the_share_unmounted_records_on_and_alarms_on_mqtt(
    make_site: Callable[..., Site], tmp_path: Path, observed: tuple[Mosquitto, Observer]
) -> None:
    broker, obs = observed
    site = make_site(rotate=SEG, mqtt=f'url = "{broker.url}"')
    # archive_dir exists but is no mount point: the share is "not mounted".
    site.config.write_text(
        site.config.read_text() + RETENTION.replace("archive_mount_required = false\n", "")
    )
    (tmp_path / "share").mkdir()
    await prefill(site, tmp_path / "keys" / "or-7.key")
    before = [p.name for p in segment_paths(site.log_dir)]
    daemon = await Daemon.follow(site)
    try:
        unmounted = await obs.wait_for(_notice("archive unreachable"), "the archive notice")
        assert unmounted.payload["severity"] == "critical"
        assert "not a mount point" in unmounted.payload["message"]
        budget = await obs.wait_for(_notice("disk use"), "the budget notice")
        assert budget.payload["severity"] == "critical"
        assert await daemon.stop() == 0
    finally:
        await daemon.ensure_dead()
    assert [p.name for p in segment_paths(site.log_dir)][: len(before)] == before
    kinds = [
        json.loads(line)["type"]
        for p in segment_paths(site.log_dir)
        for line in p.read_bytes().splitlines()
    ]
    assert "archive_failed" in kinds
    assert "storage_warning" in kinds or "storage_budget_reached" in kinds
    assert kinds[-2:] == ["daemon_stop", "checkpoint"], "recording went on to the end"
    assert schema_errors(obs.messages) == []
