"""End to end on one RS-485 line shared by two Modbus RTU units: `iort-sim serve
--devices` puts a console (unit 1, XRS-MB/1) and an applicator reader (unit 2, APL-MB/1)
on one pty with the line time modelled at 38400 baud, the reader answering 150 ms late;
`iortd run` polls both at 10 Hz through one shared line (drivers/transport/shared.py). The
console is never stale and has no gap, the slow reader's readings still arrive, and the
console's turns come at most one slow exchange apart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from daemonproc import Daemon, Site
from simproc import Simulator

from iortd.auditlog.note import generate_keypair, write_keypair

pytestmark = pytest.mark.integration

DEVICES = """
speed = 4.0

[[device]]
name = "console"
transport = "modbus-rtu"
profile = "axxent"
applicator = "BAL34"
preset = 1.0
start_delay = 1
seed = 5
line = "or-7-rs485"
baudrate = 38400
unit_id = 1

[[device]]
name = "stand"
kind = "applicator"
transport = "modbus-rtu"
profile = "axxent"
applicator = "BAL34"
line = "or-7-rs485"
baudrate = 38400
unit_id = 2
reply_delay_ms = 150
"""
SITE = """
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
applicator_displacement_mm = 2.0
applicator_tilt_deg = 2.0
[[devices]]
name = "console-1"
driver = "modbus-xrs"
poll_interval_s = 0.1
timeout_s = 0.5
[devices.options]
unit_id = 1
[devices.transport]
type = "serial"
port = "{port}"
baudrate = 38400
[[devices]]
name = "stand-1"
role = "applicator"
driver = "modbus-apl"
poll_interval_s = 0.1
timeout_s = 0.5
[devices.options]
unit_id = 2
[devices.transport]
type = "serial"
port = "{port}"
baudrate = 38400
"""


def entries(site: Site) -> list[dict[str, Any]]:
    out = []
    for seg in sorted(site.log_dir.glob("log-*.jsonl")):
        out += [json.loads(line) for line in seg.read_text("utf-8").splitlines()]
    return out


async def run_line(
    tmp_path: Path, devices_text: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The simulated line on one pty and `iortd run` polling both units through the
    delivery's end: the daemon's end line and the log's entries."""
    devices = tmp_path / "devices.toml"
    devices.write_text(devices_text, "utf-8")
    sim = await Simulator.start("--devices", str(devices), transport=None)
    try:
        serving = [r for r in sim.lines if r["event"] == "serving"]
        assert len({r["device"] for r in serving}) == 1, "one pty: one line"
        _, pub = write_keypair(generate_keypair("or-7"), tmp_path / "keys")
        cfg = tmp_path / "site.toml"
        cfg.write_text(SITE.format(port=serving[0]["device"]), "utf-8")
        site = Site(cfg, tmp_path / "log", pub)
        daemon = await Daemon.follow(site)
        try:
            end = await daemon.seen(
                lambda r: r.get("event") == "delivery_terminated", "the delivery's end"
            )
            assert await daemon.stop() == 0
        finally:
            await daemon.ensure_dead()
    finally:
        await sim.stop()
    return end, entries(site)


async def test_one_slow_unit_never_makes_the_other_stale_on_a_shared_line(
    tmp_path: Path,
) -> None:
    end, log = await run_line(tmp_path, DEVICES)
    kinds = [e["type"] for e in log]
    alarms = [e["data"]["code"] for e in log if e["type"] == "alarm_raised"]
    assert "stale_data" not in alarms, alarms
    assert "monitoring_gap_started" not in kinds
    assert "device_gap_started" not in kinds
    assert end["status"] == "NORMAL"
    samples = [e for e in log if e["type"] == "sample"]
    stand = [e for e in log if e["type"] == "applicator_sample"]
    assert len(samples) >= 10, len(samples)
    assert len(stand) >= 5, "the slow unit's readings still arrive"


async def test_a_reader_that_times_out_never_makes_the_console_stale(tmp_path: Path) -> None:
    # The reader answers 700 ms late against its 0.5 s timeout: each of its turns (its
    # reconnects, with backoff) holds the line for its timeout, and the console's next turn
    # first settles the late reply. That is the line's time, not the console's missed
    # turns: the console is never stale and has no gap; only the reader has one.
    end, log = await run_line(
        tmp_path, DEVICES.replace("reply_delay_ms = 150", "reply_delay_ms = 700")
    )
    kinds = [e["type"] for e in log]
    alarms = [e["data"]["code"] for e in log if e["type"] == "alarm_raised"]
    assert "stale_data" not in alarms, alarms
    assert "monitoring_gap_started" not in kinds
    reader_gaps = [e["data"] for e in log if e["type"] == "device_gap_started"]
    assert reader_gaps, "the reader that never answers in time has a gap of its own"
    assert {g["device"] for g in reader_gaps} == {"stand-1"}
    assert end["status"] == "NORMAL"
    assert len([e for e in log if e["type"] == "sample"]) >= 10
