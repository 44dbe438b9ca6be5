"""End to end over a real pty: `iort-sim serve --transport serial` answers XRS-ASCII/1 on
a pseudo-terminal, `iortd run` polls it with the production `serial-xrs` driver through a
whole delivery, and the tracker's result matches the simulator's ground truth."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from daemonproc import Daemon, Site

from daemon.audit.note import generate_keypair, write_keypair

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
PRESET_GY = 0.3  # Axxent-like BAL34 at 2.5 Gy/min: about 7 s of beam at speed 1

SITE = """
[site]
id = "test-site"
room = "or-5"
[log]
directory = "log"
signing_key_file = "keys/or-5.key"
[mqtt]
enabled = false
[tolerances]
stale_after_polls = 5
[[devices]]
name = "console-1"
driver = "serial-xrs"
poll_interval_s = 0.1
timeout_s = 0.5
[devices.transport]
type = "serial"
port = "{port}"
baudrate = 19200
[devices.options]
applicator_every = 5
"""


@dataclass
class Simulator:
    proc: asyncio.subprocess.Process
    device: str
    lines: list[dict[str, Any]]

    async def until(self, event: str, within_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for rec in self.lines:
            if rec["event"] == event:
                return rec
        async with asyncio.timeout(within_s):
            while raw := await self.proc.stdout.readline():
                rec = json.loads(raw)
                self.lines.append(rec)
                if rec["event"] == event:
                    return rec
        raise AssertionError(f"iort-sim exited before {event}: {self.lines[-3:]}")


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "iort-sim"),
        *("serve", "--transport", "serial", "--profile", "axxent", "--applicator", "BAL34"),
        *("--preset", str(PRESET_GY), "--start-delay", "1", "--seed", "5"),
        stdout=asyncio.subprocess.PIPE,
    )
    sim = Simulator(proc, "", [])
    try:
        serving = await sim.until("serving", within_s=10)
        sim.device = serving["device"]
        yield sim
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 10)


def site_for(tmp_path: Path, port: str) -> Site:
    _, pub = write_keypair(generate_keypair("or-5"), tmp_path / "keys")
    cfg = tmp_path / "site.toml"
    cfg.write_text(SITE.format(port=port), encoding="utf-8")
    return Site(cfg, tmp_path / "log", pub)


async def test_a_whole_delivery_over_a_pty_matches_the_simulators_ground_truth(
    tmp_path: Path, simulator: Simulator
) -> None:
    site = site_for(tmp_path, simulator.device)
    daemon = await Daemon.follow(site)
    try:
        ident = await daemon.seen(
            lambda r: r.get("event") == "device_identified", "the console identified"
        )
        end = await daemon.seen(
            lambda r: r.get("event") == "delivery_terminated", "the delivery's end", within_s=60
        )
        assert await daemon.stop() == 0
    finally:
        await daemon.ensure_dead()
    truth = await simulator.until("terminated", within_s=5)
    assert ident["simulated"] is True, "a simulator on the line is marked simulated"
    assert ident["serial"] == "SIM-0001"
    assert end["status"] == truth["termination"] == "NORMAL"
    assert end["preset_gy"] == pytest.approx(PRESET_GY)
    dose = truth["dose_primary_gy"]
    assert end["delivered_primary_gy"] == pytest.approx(dose, rel=0.005, abs=1e-4)
    assert end["delivered_secondary_gy"] == pytest.approx(
        truth["dose_secondary_gy"], rel=0.005, abs=1e-4
    )
    assert abs(end["beam_on_s"] - truth["beam_on_s"]) <= 0.1
    assert [r for r in daemon.lines if r.get("event") == "protocol_violation"] == []
    assert [r for r in daemon.lines if r.get("event") == "device_link_lost"] == []
