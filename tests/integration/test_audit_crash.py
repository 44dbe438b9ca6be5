"""Crash and disk-full tests of the audit log, against the real daemon process.

"Acknowledged" means told to any sink other than the record: the operational log on
stderr hears an event only after the audit log has fsync'd it. Every acknowledged event
must therefore be in the log after a SIGKILL, a power cut (a torn last line) or a full
disk.

The fifty daemons killed are forked from a process that has imported the daemon once
(forkdaemon.py): each is a process of its own running ``main(["run", ...])``, killed
by SIGKILL, without the interpreter's start and imports that a console-script start
spends before ``main`` (most of a cycle, and nothing the test checks). The start after the
last crash, which recovers and stops cleanly, is the console script itself.
"""

from __future__ import annotations

import asyncio
import random
import resource
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from daemonproc import Daemon, Site
from forkdaemon import ForkServer

from iortd.auditlog.note import load_verifier
from iortd.auditlog.verify import collect_files, verify_log

pytestmark = pytest.mark.integration

CRASH_RUNS = 50


def log_entries(log_dir: Path) -> list[dict[str, Any]]:
    out = []
    for f in collect_files([log_dir]):
        out += [orjson.loads(line) for line in f.read_bytes().splitlines()]
    return out


def acknowledged(lines: list[dict[str, Any]]) -> Counter[tuple[Any, ...]]:
    """Events the operational log reported, as keys comparable with audit entries."""
    keys: Counter[tuple[Any, ...]] = Counter()
    for rec in lines:
        ev = rec.get("event")
        if ev == "phase":
            keys[
                ("phase_changed", rec.get("delivery_id"), rec["src"], rec["dst"], rec["cause"])
            ] += 1
        elif ev == "interlock":
            keys[("interlock_changed", rec["interlock"], rec["old"], rec["new"])] += 1
        elif ev == "alarm_raised":
            keys[("alarm_raised", rec.get("delivery_id"), rec["key"], rec["message"])] += 1
        elif ev == "delivery_started":
            keys[("delivery_started", rec.get("delivery_id"))] += 1
        elif ev == "delivery_terminated":
            keys[("delivery_terminated", rec.get("delivery_id"), rec["status"])] += 1
    return keys


def recorded(entries: list[dict[str, Any]]) -> Counter[tuple[Any, ...]]:
    keys: Counter[tuple[Any, ...]] = Counter()
    for e in entries:
        d, did = e["data"], e.get("delivery_id")
        t = e["type"]
        if t == "phase_changed":
            keys[(t, did, d["from"], d["to"], d["cause"])] += 1
        elif t == "interlock_changed":
            keys[(t, d["interlock"], d["from"], d["to"])] += 1
        elif t == "alarm_raised":
            keys[(t, did, d["key"], d["message"])] += 1
        elif t == "delivery_started":
            keys[(t, did)] += 1
        elif t == "delivery_terminated" and "summary" in d:
            keys[(t, did, d["status"])] += 1
    return keys


def append_bytes(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def assert_intact(site: Site) -> None:
    rep = verify_log([site.log_dir], pubkey=load_verifier(site.pubkey))
    assert rep.intact, f"log not intact: {rep.problem}"


async def _crash_runs(
    forks: ForkServer,
    site: Site,
    rng: random.Random,
    acked: Counter[tuple[Any, ...]],
    torn: list[bytes],
) -> None:
    """CRASH_RUNS starts of the daemon on one log, each killed at a random moment; what
    each acknowledged goes to ``acked``, each torn tail appended to ``torn``."""
    for run in range(CRASH_RUNS):
        d = await forks.start_daemon(site)
        try:
            await d.wait_for(lambda r: r.get("event") == "device_connected", "device_connected")
            # Kill while it writes: samples every 20 ms, group commits every 50 ms.
            await asyncio.sleep(rng.uniform(0.0, 0.6))
            await d.kill()
        finally:
            await d.ensure_dead()
        acked.update(acknowledged(d.lines))
        if run % 10 == 9:
            # A power cut can leave half a line behind: simulate it before the restart.
            seg = collect_files([site.log_dir])[-1]
            tail = b'{"data":{"device":"source-1","dose_primary_gy":1' + bytes([run])
            await asyncio.to_thread(append_bytes, seg, tail)
            torn.append(tail)
        # The next start recovers; opening it is enough to check (the daemon does it).


@pytest.mark.timeout(300)
async def test_sigkill_at_many_points_loses_no_acknowledged_event(
    make_site: Any, tmp_path: Path
) -> None:
    site: Site = make_site(speed=300, poll=0.02)
    rng = random.Random(20261126)  # noqa: S311 - reproducible kill points, not crypto
    acked: Counter[tuple[Any, ...]] = Counter()
    torn: list[bytes] = []
    forks = await ForkServer.start(tmp_path)
    try:
        await _crash_runs(forks, site, rng, acked, torn)
    finally:
        await forks.stop()
    d = await Daemon.start(site)  # the console script, as an operator would start it
    try:
        await d.wait_for(lambda r: r.get("event") == "device_connected", "final start")
        assert await d.stop() == 0
    finally:
        await d.ensure_dead()

    assert_intact(site)
    entries = log_entries(site.log_dir)
    missing = acked - recorded(entries)
    assert not missing, f"acknowledged but not in the log: {missing}"
    assert sum(acked.values()) > CRASH_RUNS, "the test must actually acknowledge events"
    recoveries = [e for e in entries if e["type"] == "recovery"]
    assert len(recoveries) == CRASH_RUNS, "one recovery entry per crash"
    kept = [r["data"] for r in recoveries if r["data"]["tail_bytes"]]
    assert len(kept) >= len(torn)
    for tail in torn:
        assert any((site.log_dir / k["tail_kept_at"]).read_bytes().endswith(tail) for k in kept), (
            "every torn tail is kept aside in quarantine/"
        )
    starts = [e for e in entries if e["type"] == "daemon_start"]
    assert [s["data"]["previous_stop"] for s in starts][1:] == ["crash"] * CRASH_RUNS
    # A delivery cut by a crash is taken over by the next start (daemon_start names it) and
    # decided by its first reading: this in-process simulator restarts with the daemon, so
    # the console has left the selection, and the delivery is closed UNKNOWN with the
    # outage as a gap in it, with its span (docs/audit-log.md).
    taken = {e["data"]["open_delivery"] for e in starts if e["data"].get("open_delivery")}
    assert taken, "some kill must have fallen inside a delivery"
    ends = {e["delivery_id"]: e["data"] for e in entries if e["type"] == "delivery_terminated"}
    decided = [ends[did] for did in taken if did in ends]
    assert decided
    for data in decided:
        assert data["status"] == "UNKNOWN"
        assert "daemon was not running" in data["reason"]
        outage = [g for g in data["summary"]["gaps"] if g["cause"].startswith("daemon not running")]
        assert outage, data["summary"]["gaps"]
        assert all(g["start"] < g["end"] for g in outage)


@pytest.mark.timeout(120)
async def first_segment(log_dir: Path, within_s: float = 10.0) -> Path:
    """The log's current segment. "device_connected" is logged before the writer thread
    has necessarily created the first segment file, and a file appearing has no event to
    wait on: a bounded poll, failing with a clear message."""
    try:
        async with asyncio.timeout(within_s):
            while not (files := collect_files([log_dir])):  # noqa: ASYNC110 - no event for a file
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"no log segment in {log_dir} within {within_s} s") from None
    return files[-1]


async def test_a_full_disk_raises_the_alarm_and_loses_nothing(make_site: Any) -> None:
    site: Site = make_site(speed=300, poll=0.01, rotate=16 * 1024 * 1024)
    d = await Daemon.start(site)
    try:
        await d.wait_for(lambda r: r.get("event") == "device_connected", "device_connected")
        seg = await first_segment(site.log_dir)
        # From now on the daemon may not grow a file past this size: the disk is "full".
        limit = seg.stat().st_size + 20_000
        resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        await d.wait_for(
            lambda r: r.get("event") == "audit_log_write_failed" and r["level"] == "critical",
            "the write failure",
        )
        alarm = await d.wait_for(
            lambda r: r.get("event") == "notice" and r["level"] == "critical", "the alarm"
        )
        assert "audit log cannot be written" in alarm["message"]
        n_failed = sum(1 for r in d.lines if r.get("event") == "audit_log_write_failed")
        await d.wait_for(
            lambda r: (
                r.get("event") == "audit_log_write_failed"
                and sum(1 for x in d.lines if x.get("event") == "audit_log_write_failed") > n_failed
            ),
            "a retry",
        )
        # Space again: the writer catches up by itself.
        resource.prlimit(
            d.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        )
        await d.wait_for(lambda r: r.get("event") == "audit_log_write_recovered", "recovery")
        assert await d.stop() == 0
    finally:
        await d.ensure_dead()
    assert_intact(site)
    entries = log_entries(site.log_dir)
    missing = acknowledged(d.lines) - recorded(entries)
    assert not missing, f"acknowledged but not in the log: {missing}"
    types = [e["type"] for e in entries]
    assert "write_recovered" in types
    assert types[-2:] == ["daemon_stop", "checkpoint"]
    # Samples kept coming in while the disk was full, and none was dropped: seqs are
    # continuous (verify) and samples taken during the outage are in the log.
    failed_at = next(r["timestamp"] for r in d.lines if r.get("event") == "audit_log_write_failed")
    back_at = next(r["timestamp"] for r in d.lines if r.get("event") == "audit_log_write_recovered")
    during = [e for e in entries if e["type"] == "sample" and failed_at < e["ts"] < back_at]
    assert during, f"no sample from the outage {failed_at} .. {back_at} in the log"
