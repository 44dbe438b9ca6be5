"""A source on a shared line (daemon/service.py, through its public API): its waits for
the line (other devices' turns) do not count towards staleness, and a *reading* resets
that count like a reply reported through ``heard`` does (8dc5c66). Without the reset, the
waits before the last reading still counted as a pause after it, and a driver that never
reports replies (a plug-in) could hold the stale alarm off by that much."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_log_volume import room

STALE_POLLS, POLL_S = 5, 0.1  # config/demo.toml: stale_after_polls, the source's poll


async def test_a_reading_resets_the_line_wait_and_staleness_counts_from_it(
    tmp_path: Path,
) -> None:
    async with room(tmp_path, reader=False, preset_gy=1.0) as r:
        waited = [0]  # the source's running total of waits for its line (LineView.waited_ns)
        r.service.source_shares_a_line(lambda now: waited[0])
        waited[0] += 30 * 10**9  # it waited 30 s for its turns ...
        await r.poll(1)  # ... and was then read
        # Nothing since, and no more waiting: stale one second past its bound.
        r.clock.ns += round((STALE_POLLS * POLL_S + 1.0) * 1e9)
        stop = asyncio.Event()
        watchdog = asyncio.create_task(r.service.watchdog(stop))
        try:
            async with asyncio.timeout(3):
                while not r.service.tracker.in_gap:  # noqa: ASYNC110 - no event for it
                    await asyncio.sleep(0.01)
        except TimeoutError:
            pytest.fail("not stale: the line waits before the reading still count after it")
        finally:
            stop.set()
            await watchdog
