"""How much the audit log grows (issue 17 item 3): bytes per idle minute and per delivery,
measured through the real service, tracker, entries and writer, with the in-process
simulators polled at 10 Hz on a clock the test moves (a 23-minute delivery in a few
seconds), and bounded.

The figures are printed (``-s``) and quoted in docs/operations.md ("How much the audit log
grows"); the bounds leave room for a few more fields, not for a return to logging every
idle poll (about 530 KB a minute per device).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from test_audit_seal import crash
from test_config import ROOT

from iortd.auditlog.note import Signer, generate_keypair
from iortd.auditlog.verify import verify_log
from iortd.auditlog.writer import AuditLog, segment_paths
from iortd.daemon.config import LoadedConfig, load_config
from iortd.daemon.service import Service
from iortd.drivers.interface import DriverContext, DriverSpec
from iortd.drivers.registry import DriverRegistry

POLL_NS = 100_000_000  # 10 Hz, in the clock's (simulated) time
MINUTE = 600  # polls


class StepClock:
    """Simulated time the test advances one poll at a time (speed 1: seconds are seconds)."""

    speed = 1.0

    def __init__(self) -> None:
        self.ns = 1_000_000_000
        self._utc0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)

    def monotonic_ns(self) -> int:
        return self.ns

    def utc(self) -> datetime:
        return self._utc0 + timedelta(microseconds=self.ns // 1000)


def site(tmp: Path, *, reader: bool, preset_gy: float, extra: str = "") -> Path:
    """The demo's room (INTRABEAM-like source, a 3 cm sphere at ~0.87 Gy/min: 20 Gy take
    ~23 min), with or without its applicator reader, ``preset_gy`` prescribed."""
    text = (ROOT / "config" / "demo.toml").read_text()
    text = text.replace('directory = "demo-log"', f'directory = "{tmp / "log"}"\n{extra}')
    text = text.replace("speed = 60.0", "speed = 1.0")
    text, n = re.subn(r"(?m)^start_delay_s = [0-9.]+", "start_delay_s = 5.0", text)
    assert n == 1, "config/demo.toml: the console's start_delay_s not found"
    text = text.replace("= 20.0", f"= {preset_gy}")  # the plan's and the console's preset
    if not reader:
        text = text.split("# The applicator reader and positioning stand")[0]
    path = tmp / "site.toml"
    path.write_text(text)
    return path


@dataclass
class Room:
    service: Service
    audit: AuditLog
    clock: StepClock
    drivers: list[tuple[Any, Any]]  # (device config, driver)
    directory: Path
    writer: asyncio.Task[None]
    crashed: bool = False

    async def poll(self, n: int) -> None:
        """``n`` polls of every device, 100 ms of the clock apart; the writer commits as
        it would between them (a yield every few polls)."""
        for i in range(n):
            self.clock.ns += POLL_NS
            for dev, drv in self.drivers:
                if dev.role == "applicator":
                    self.service.reading(dev, await drv.read_applicator())
                else:
                    self.service.reading(dev, await drv.read())
            if i % 50 == 0:
                await asyncio.sleep(0)

    probes: int = 0  # bytes of the entries :meth:`size` added to find out

    async def size(self) -> int:
        """Bytes of entries on disk so far (every segment), once all is committed, less
        the entries this method appended to wait for that."""
        await self.audit.append("probe", {}, durable=True).committed
        paths = segment_paths(self.directory)
        self.probes += len(paths[-1].read_bytes().splitlines(keepends=True)[-1])
        return sum(p.stat().st_size for p in paths) - self.probes

    def phase(self) -> str:
        return str(self.service.tracker.phase)

    async def kill(self) -> None:
        """As a SIGKILL: nothing pending is written, nothing is closed in order."""
        await crash(self.audit, self.writer)
        self.crashed = True


@asynccontextmanager
async def room(
    tmp: Path,
    *,
    reader: bool,
    preset_gy: float,
    extra: str = "",
    signer: Signer | None = None,
) -> AsyncIterator[Room]:
    registry = DriverRegistry.from_entry_points()
    path = site(tmp, reader=reader, preset_gy=preset_gy, extra=extra)
    loaded: LoadedConfig = load_config(path, registry)
    clock = StepClock()
    audit, report = await AuditLog.open(
        loaded.config.log.directory, origin="test/or-1/volume", signer=signer
    )
    writer = asyncio.create_task(audit.run())
    service = Service(loaded, clock, [], audit, report)
    service.record_start()
    drivers: list[tuple[Any, Any]] = []
    try:
        for dev in loaded.config.devices:
            spec = DriverSpec(
                dev.name, dev.role, dev.poll_interval_s, dev.timeout_s, {}, dev.options
            )
            drv = registry.get(dev.driver).create(spec, DriverContext(clock=clock, seed=7))
            await drv.__aenter__()
            service.identified(dev.name, await drv.identify())
            drivers.append((dev, drv))
        r = Room(service, audit, clock, drivers, loaded.config.log.directory, writer)
        yield r
    finally:
        for _, drv in drivers:
            await drv.__aexit__(None, None, None)
        if not r.crashed:
            await asyncio.wait_for(audit.close(), 10)
            await asyncio.wait_for(writer, 10)


async def delivered(r: Room) -> tuple[int, float]:
    """Polls until the delivery ends (bounded: 30 simulated minutes): the bytes it added
    and its beam-on minutes."""
    before = await r.size()
    for _ in range(30):
        await r.poll(MINUTE)
        if r.service.result.terminated:
            break
    assert r.service.result.terminated, f"no end in 30 min: phase {r.phase()}"
    [end] = r.service.result.terminated
    assert str(end.status) == "NORMAL", end
    return await r.size() - before, end.summary.beam_on_s / 60


def entries(directory: Path) -> list[dict[str, Any]]:
    out = []
    for p in segment_paths(directory):
        out += [orjson.loads(line) for line in p.read_bytes().splitlines()]
    return out


async def idle_minute(r: Room) -> int:
    before = await r.size()
    await r.poll(MINUTE)
    return await r.size() - before


async def test_idle_minutes_and_a_delivery_stay_within_their_bounds(tmp_path: Path) -> None:
    """One room with its reader: a 2 Gy delivery at the reference rate (SPH30, ~0.87
    Gy/min: ~2.3 min of beam; a 20 Gy one is ten times as long at the same bytes per
    minute), the window after it, then idle minutes at 10 Hz."""
    async with room(tmp_path, reader=True, preset_gy=2.0) as r:
        per_delivery, beam_min = await delivered(r)
        await r.poll(2 * MINUTE)  # the post-delivery window (60 s by default) and more
        idle = [await idle_minute(r) for _ in range(3)]
    per_min = per_delivery / beam_min
    print(  # noqa: T201 - the figures docs/operations.md quotes (run with -s)
        f"\nwith a reader: 2 Gy delivery {per_delivery} B over {beam_min:.2f} min of beam "
        f"({per_min:.0f} B/min; x23 min = {per_min * 23:.0f} B), idle minutes {idle} B"
    )
    # Full rate during the delivery: 600 polls a minute of two devices, ~1 KB each.
    assert 600_000 < per_min < 1_800_000, per_min
    # At most one heartbeat of each device per minute, and the checkpoints' entries.
    assert max(idle) <= 4_000, f"idle minute with a reader: {idle} B (bound 4 000 B)"
    log = entries(tmp_path / "log")
    kept = [e for e in log if e["type"] in ("sample", "applicator_sample") and "kept" in e["data"]]
    assert kept, "no sample of the idle stretch says why it was kept"
    assert all(e.get("delivery_id") is None for e in kept), "a thinned sample named a delivery"


async def test_an_idle_room_without_a_reader(tmp_path: Path) -> None:
    async with room(tmp_path, reader=False, preset_gy=1.0) as r:
        await delivered(r)
        await r.poll(2 * MINUTE)
        idle = [await idle_minute(r) for _ in range(2)]
    print(f"\nsource only: idle minutes {idle} B")  # noqa: T201 - as above
    assert max(idle) <= 2_000, f"idle minute, source only: {idle} B (bound 2 000 B)"


# ---- what the record says around a thinned stretch --------------------------------------

QUICK = "sample_window_s = 0"  # thinned from the reading after the end


async def test_the_reading_before_a_gap_and_before_a_stop_is_recorded(tmp_path: Path) -> None:
    """The last reading of an idle stretch, held back, is written before the monitoring
    gap the lost link starts (the record shows when the console was last heard), and
    the last one before a clean stop; the values in force are in ``config_loaded``."""
    async with room(tmp_path, reader=False, preset_gy=1.0, extra=QUICK) as r:
        await delivered(r)
        await r.poll(50)
        last_polled = r.clock.ns
        [(dev, _)] = r.drivers
        r.service.link_lost(dev, "test: cable pulled")
        await r.poll(30)  # heard again: the gap ends (an event: recorded)
        await r.poll(20)
        await r.service.record_stop(5)
    log = entries(tmp_path / "log")
    kinds = [e["type"] for e in log]
    gap = kinds.index("monitoring_gap_started")
    before = log[gap - 1]
    assert before["type"] == "sample", kinds[gap - 3 : gap + 1]
    assert before["data"]["kept"] == "before_change"
    assert before["data"]["device_mono_ns"] == last_polled
    prev = [e for e in log[: gap - 1] if e["type"] == "sample"][-1]["data"]["device_mono_ns"]
    # Every poll in between is counted: taken, not recorded, within the deadbands.
    assert before["data"]["unrecorded"] == (last_polled - prev) // POLL_NS - 1 > 0
    end = kinds.index("monitoring_gap_ended")
    heard = next(e for e in log[end:] if e["type"] == "sample")
    assert heard["data"]["kept"] == "event", heard
    stop = kinds.index("daemon_stop")
    assert log[stop - 1]["data"]["kept"] == "stop"
    assert log[stop - 1]["data"]["device_mono_ns"] == r.clock.ns
    [cfg] = [e for e in log if e["type"] == "config_loaded"]
    in_force = cfg["data"]["config"]["log"]
    assert in_force["idle_sample_interval_s"] == 60.0
    assert in_force["sample_window_s"] == 0.0
    assert in_force["sample_deadband"]["kv"] == 0.5


async def test_a_restart_after_a_kill_while_idle_finds_no_gap_and_no_open_delivery(
    tmp_path: Path,
) -> None:
    """SIGKILL 40 s into a thinned stretch (no sample for 39 s), then a restart: the log
    verifies, the delivery before stays NORMAL, and the start records the crash and
    nothing else (no monitoring gap, no delivery closed UNKNOWN)."""
    signer = generate_keypair("or-1")
    async with room(tmp_path, reader=False, preset_gy=1.0, extra=QUICK, signer=signer) as r:
        await delivered(r)
        await r.poll(400)
        await r.audit.append("probe", {}, durable=True).committed
        await r.kill()
    before = len(entries(tmp_path / "log"))
    async with room(tmp_path, reader=False, preset_gy=1.0, extra=QUICK, signer=signer) as r:
        assert r.service.tracker.phase == "IDLE"
        await r.poll(10)
    after = entries(tmp_path / "log")[before:]
    kinds = [e["type"] for e in after]
    assert kinds[0] == "recovery", kinds[:3]
    assert after[0]["data"]["previous_stop"] == "crash"
    assert not {"monitoring_gap", "monitoring_gap_started", "delivery_terminated"} & set(kinds)
    assert "open_delivery" in after[1]["data"]
    assert after[1]["data"]["open_delivery"] is None
    rep = verify_log([tmp_path / "log"], pubkey=None)
    assert rep.intact, rep.problem
