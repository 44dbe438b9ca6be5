"""The sample policy through the real daemon process (issue 17 item 3): full rate during the
delivery, heartbeats after it, a SIGKILL in the idle stretch and a restart that reads the
silence before it as policy, not as a gap.

The site runs at speed 300 with a 20 ms poll: 6 simulated seconds a poll, so a 60 s
heartbeat comes every ~10 polls (0.2 s) and the 60 s window after the end lasts ~0.2 s.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from daemonproc import Daemon, Site

from iortd.audit.review import load_entries
from iortd.audit.sampling import policy_findings
from iortd.auditlog.note import load_verifier
from iortd.auditlog.verify import collect_files, unvouched_deliveries, verify_log

pytestmark = pytest.mark.integration


def entries(log_dir: Path) -> list[dict[str, Any]]:
    out = []
    for f in collect_files([log_dir]):
        for line in f.read_bytes().splitlines():
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                break  # a line being written
    return out


async def on_disk(
    log_dir: Path, pred: Callable[[list[dict[str, Any]]], bool], what: str, within_s: float = 20
) -> list[dict[str, Any]]:
    """A bounded poll of the log files (they are group-committed every 50 ms)."""
    try:
        async with asyncio.timeout(within_s):
            while True:
                if pred(got := entries(log_dir)):
                    return got
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not in the log within {within_s} s: {what}") from None


def heartbeats(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in log if e["type"] == "sample" and e["data"].get("kept") == "heartbeat"]


async def test_a_kill_in_an_idle_stretch_restarts_with_no_gap_and_verifies(
    make_site: Callable[..., Site],
) -> None:
    site = make_site(speed=300, poll=0.02)
    first = await Daemon.follow(site)
    try:
        end = await first.seen(
            lambda r: r.get("event") == "delivery_terminated", "the delivery's end", 60
        )
        assert end["status"] == "NORMAL", end
        await on_disk(site.log_dir, lambda log: len(heartbeats(log)) >= 3, "three heartbeats")
        await first.kill()
    finally:
        await first.ensure_dead()
    before = entries(site.log_dir)

    # Full rate during the delivery: every sample of it is consecutive polls, none thinned.
    did = end["delivery_id"]
    mine = [e for e in before if e["type"] == "sample" and e.get("delivery_id") == did]
    assert len(mine) > 50, len(mine)
    assert not any("kept" in e["data"] for e in mine)
    # Idle: heartbeats at most 60 s (+ one 6 s poll, + a late poll on a loaded machine)
    # apart, each counting the polls it stands for.
    beats = heartbeats(before)
    for a, b in itertools.pairwise(beats):
        gap_s = (b["data"]["device_mono_ns"] - a["data"]["device_mono_ns"]) / 1e9
        assert 60 <= gap_s <= 90, gap_s
        assert b["data"]["unrecorded"] >= 1, b["data"]

    second = await Daemon.follow(site)
    try:
        await on_disk(
            site.log_dir,
            lambda log: (
                sum(e["type"] == "daemon_start" for e in log) == 2
                and log[-1]["type"] != "daemon_start"
            ),
            "the second start",
        )
        assert await second.stop() == 0
    finally:
        await second.ensure_dead()
    after = entries(site.log_dir)[len(before) :]
    kinds = [e["type"] for e in after]
    assert kinds[0] == "recovery", kinds[:4]
    assert after[0]["data"]["previous_stop"] == "crash"
    assert not {"monitoring_gap", "monitoring_gap_started", "delivery_terminated"} & set(kinds)
    [start] = [e for e in after if e["type"] == "daemon_start"]
    assert start["data"]["open_delivery"] is None
    assert "sample" in kinds, "the second run recorded its first reading"

    rep = verify_log([site.log_dir], pubkey=load_verifier(site.pubkey))
    assert rep.intact, rep.problem
    touched = unvouched_deliveries(collect_files([site.log_dir]), rep.unvouched)
    assert did not in touched, touched
    # verify's check of the samples against their policy finds nothing to question.
    assert policy_findings(load_entries(rep.files)) == []
