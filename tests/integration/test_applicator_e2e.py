"""End to end with two devices in one room over Modbus TCP: `iort-sim serve --devices`
serves a console (XRS-MB/1) and an applicator reader and stand (APL-MB/1), `iortd run`
reads both with the production drivers (modbus-xrs, modbus-apl). Mid-beam the stand drifts
past the tolerance (`iort-sim ctl drift`): the alarm is raised on the reading that first
shows the crossing, with the simulator's true magnitude; then the reader's link is lost
for 10 s (simulated) while the source keeps delivering: the dose record equals the
simulator's truth and the gap is the reader's alone."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from daemonproc import Daemon, Site
from simproc import APPLICATOR_ROOM_DEVICES, APPLICATOR_ROOM_SIM, Simulator

from iortd.auditlog.note import generate_keypair, write_keypair

pytestmark = pytest.mark.integration

SPEED = 4.0
DEVICES = APPLICATOR_ROOM_SIM
SITE = (
    """
[site]
id = "test-site"
room = "or-7"
[log]
directory = "log"
signing_key_file = "keys/or-7.key"
[health]
listen = ""
[mqtt]
enabled = false
[tolerances]
stale_after_polls = 5
applicator_displacement_mm = 2.0
applicator_tilt_deg = 2.0"""
    + APPLICATOR_ROOM_DEVICES
)


def serving(sim: Simulator, name: str) -> dict[str, Any]:
    return next(r for r in sim.lines if r["event"] == "serving" and r.get("device_name") == name)


def entries(site: Site) -> list[dict[str, Any]]:
    out = []
    for seg in sorted(site.log_dir.glob("log-*.jsonl")):
        out += [json.loads(line) for line in seg.read_text("utf-8").splitlines()]
    return out


async def test_drift_mid_beam_then_the_reader_lost_while_the_source_delivers(
    tmp_path: Path,
) -> None:
    devices = tmp_path / "devices.toml"
    devices.write_text(DEVICES.format(speed=SPEED, seed=5), "utf-8")
    sim = await Simulator.start("--devices", str(devices), transport=None)
    try:
        _, pub = write_keypair(generate_keypair("or-7"), tmp_path / "keys")
        cfg = tmp_path / "site.toml"
        cfg.write_text(
            SITE.format(
                console_port=serving(sim, "console")["port"],
                stand_port=serving(sim, "stand")["port"],
            ),
            "utf-8",
        )
        site = Site(cfg, tmp_path / "log", pub)
        daemon = await Daemon.follow(site)
        try:
            await daemon.seen(
                lambda r: r.get("event") == "phase" and r.get("dst") == "IRRADIATING",
                "the beam on",
            )
            await sim.ctl("stand", "drift", "rate=60", "direction=1,0,0")
            alarm = await daemon.seen(
                lambda r: (
                    r.get("event") == "alarm_raised" and r.get("code") == "applicator_displaced"
                ),
                "applicator_displaced",
                within_s=10,
            )
            await sim.ctl("stand", "drift", "rate=0")
            truth = (await sim.ctl("stand", "status"))["true_displacement_mm"]
            await sim.ctl("stand", "drop_link", "duration=10s")
            await daemon.seen(
                lambda r: r.get("event") == "device_gap_ended", "the reader back", within_s=15
            )
            end = await daemon.seen(
                lambda r: r.get("event") == "delivery_terminated",
                "the delivery's end",
                within_s=30,
            )
            assert await daemon.stop() == 0
        finally:
            await daemon.ensure_dead()
        sim_end = await sim.until("terminated", within_s=5)
    finally:
        await sim.stop()
    log = entries(site)
    kinds = [e["type"] for e in log]
    # The tolerances in force are in the record (config_loaded holds every setting).
    loaded = next(e for e in log if e["type"] == "config_loaded")["data"]["config"]
    assert loaded["tolerances"]["applicator_displacement_mm"] == 2.0
    assert loaded["tolerances"]["applicator_tilt_deg"] == 2.0
    # Raised on the reading that first showed the crossing: its events come first (log
    # first), then that reading's applicator sample, the first beyond the tolerance.
    beyond = next(
        i
        for i, e in enumerate(log)
        if e["type"] == "applicator_sample" and (e["data"]["displacement_magnitude_mm"] or 0) > 2
    )
    displaced = [
        i
        for i, e in enumerate(log)
        if e["type"] == "alarm_raised" and e["data"]["code"] == "applicator_displaced"
    ]
    assert displaced, "no applicator_displaced in the log"
    assert displaced[0] < beyond, (displaced, beyond)
    assert "applicator_sample" not in kinds[displaced[0] : beyond], "not the crossing reading"
    assert "applicator displaced" in alarm["message"]
    # The magnitude recorded once the drift stopped equals the simulator's truth.
    still = [
        e["data"]["displacement_magnitude_mm"]
        for e in log
        if e["type"] == "applicator_sample" and e["data"]["displacement_magnitude_mm"] is not None
    ][-1]
    assert abs(still - math.hypot(*truth)) < 0.1, (still, truth)
    # The reader's gap is the reader's alone; the source's record has none and its dose
    # equals the simulator's truth.
    gaps = [e["data"] for e in log if e["type"] == "device_gap_started"]
    assert [g["device"] for g in gaps] == ["stand-1"]
    assert "monitoring_gap_started" not in kinds
    assert kinds.index("device_gap_ended") < kinds.index("delivery_terminated"), (
        "the reader was lost and back while the source was still delivering"
    )
    assert end["status"] == sim_end["termination"] == "NORMAL"
    summary = next(e for e in log if e["type"] == "delivery_terminated")["data"]["summary"]
    assert abs(summary["delivered_primary_gy"] - sim_end["dose_primary_gy"]) <= 1e-5
    assert summary["gaps"] == []
