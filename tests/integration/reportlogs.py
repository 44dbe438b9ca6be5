"""Real audit logs of the four kinds of delivery the reports must handle, made by running
the real daemon: a normal delivery (the in-process ``sim`` driver, time-compressed), and
three fault scenarios played by ``iort-sim serve --transport serial`` against the
production ``serial-xrs`` driver (door opened and closed: an interruption and a resume;
the applicator swapped: an interlock and a MACHINE termination; the link dropped for
5 s: a monitoring gap). All four run at once; each waits on what the daemon logs, never
on the clock."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemonproc import Daemon, Site
from simproc import (
    APPLICATOR_ROOM_DEVICES,
    APPLICATOR_ROOM_SIM,
    SERIAL_XRS_DEVICE,
    Simulator,
    fast_console,
)

from iortd.auditlog.note import generate_keypair, write_keypair

KINDS = ("normal", "interrupted", "interlock", "gap")
SCENARIOS = {
    "interrupted": "door-mid-delivery",
    "interlock": "applicator-swap",
    "gap": "link-drop-5s",
}

PLAN = """
[plan]
treatment_id = "T-RPT-{n:04d}"
plan_id = "P-RPT-{n:04d}"
fraction = 1
prescribed_dose_gy = {preset}
"""

SIM_SITE = """
[site]
id = "report-site"
room = "or-9"
[log]
directory = "log"
signing_key_file = "keys/or-9.key"
checkpoint_interval_s = 300
[health]
listen = ""
[mqtt]
enabled = false
[simulation]
speed = 200
seed = 7
[tolerances]
stale_after_polls = 5
{plan}
[[devices]]
name = "source-1"
driver = "sim"
poll_interval_s = 0.05
timeout_s = 1.0
[devices.options]
profile = "intrabeam"
applicator = "SPH30"
preset_gy = 20.0
start_delay_s = 300.0
serial = "SIM-IB-0042"
"""

SERIAL_SITE = (
    """
[site]
id = "report-site"
room = "or-5"
[log]
directory = "log"
signing_key_file = "keys/or-9.key"
checkpoint_interval_s = 300
[health]
listen = ""
[mqtt]
enabled = false
[tolerances]
stale_after_polls = 5
{plan}
"""
    + SERIAL_XRS_DEVICE
)


@dataclass(frozen=True)
class LogRun:
    kind: str
    log_dir: Path
    pubkey: Path
    delivery_id: str
    end: dict[str, Any]  # the daemon's own delivery_terminated record (operational log)


def _keys(base: Path) -> Path:
    _, pub = write_keypair(generate_keypair("or-9"), base / "keys")
    return pub


async def _run_daemon(site: Site, what: str) -> dict[str, Any]:
    daemon = await Daemon.follow(site)
    try:
        end = await daemon.seen(
            lambda r: r.get("event") == "delivery_terminated", f"the end of {what}", within_s=90
        )
        # The checkpoint at the delivery's end is signed before the daemon stops.
        assert await daemon.stop() == 0, f"iortd exited non-zero ({what})"
    finally:
        await daemon.ensure_dead()
    return end


async def _normal(base: Path) -> LogRun:
    pub = _keys(base)
    cfg = base / "site.toml"
    cfg.write_text(
        SIM_SITE.format(plan=PLAN.format(n=1, preset=20.0)),
        encoding="utf-8",
    )
    end = await _run_daemon(Site(cfg, base / "log", pub), "the normal delivery")
    return LogRun("normal", base / "log", pub, str(end["delivery_id"]), end)


async def _scenario(base: Path, kind: str, n: int) -> LogRun:
    pub = _keys(base)
    # A 2 s self-test and the bundled scenario moved 8 s earlier to match: the same
    # delivery, 8 s sooner (simproc.fast_console).
    sim = await Simulator.start(
        *fast_console(base / "sim", SCENARIOS[kind]),
        *("--applicator", "BAL34"),
        *("--preset", "0.5", "--start-delay", "1", "--seed", str(n)),
        *("--serial", f"SIM-AX-{n:04d}"),
    )
    try:
        cfg = base / "site.toml"
        cfg.write_text(
            SERIAL_SITE.format(plan=PLAN.format(n=n, preset=0.5), port=sim.device),
            encoding="utf-8",
        )
        end = await _run_daemon(Site(cfg, base / "log", pub), f"scenario {SCENARIOS[kind]}")
    finally:
        await sim.stop()
    return LogRun(kind, base / "log", pub, str(end["delivery_id"]), end)


async def make_all(base: Path) -> dict[str, LogRun]:
    runs = await asyncio.gather(
        _normal(base / "normal"),
        *(_scenario(base / kind, kind, n) for n, kind in enumerate(SCENARIOS, start=2)),
    )
    return {r.kind: r for r in runs}


def read_log(log_dir: Path) -> list[dict[str, Any]]:
    """The log's entries, parsed plainly (independently of the code under test)."""
    out: list[dict[str, Any]] = []
    for seg in sorted(log_dir.glob("log-*.jsonl")):
        out += [json.loads(line) for line in seg.read_text("utf-8").splitlines()]
    return out


# ---- a room with an applicator reader (issue 16) ---------------------------------------------

STAND_DEVICES = APPLICATOR_ROOM_SIM.format(speed=5.0, seed=11)

STAND_SITE = (
    """
[site]
id = "report-site"
room = "or-7"
[log]
directory = "log"
signing_key_file = "keys/or-9.key"
checkpoint_interval_s = 300
[health]
listen = ""
[mqtt]
enabled = false
[tolerances]
stale_after_polls = 5
applicator_displacement_mm = 2.0
applicator_tilt_deg = 2.0
{plan}"""
    + APPLICATOR_ROOM_DEVICES
)


async def make_stand(base: Path) -> LogRun:
    """A delivery in a room with a console and an applicator reader over Modbus TCP
    (``iort-sim serve --devices``, production drivers): mid-beam the stand is bumped 3 mm
    past the 2 mm tolerance (applicator_displaced), its brakes are released (the monitor's
    applicator interlock trips), engaged again and the stand re-locked; the console
    delivers to its preset throughout."""
    pub = _keys(base)
    devices = base / "devices.toml"
    devices.write_text(STAND_DEVICES, "utf-8")
    sim = await Simulator.start("--devices", str(devices), transport=None)
    try:
        port = {r["device_name"]: r["port"] for r in sim.lines if r["event"] == "serving"}
        cfg = base / "site.toml"
        cfg.write_text(
            STAND_SITE.format(
                plan=PLAN.format(n=7, preset=1.5),
                console_port=port["console"],
                stand_port=port["stand"],
            ),
            "utf-8",
        )
        daemon = await Daemon.follow(Site(cfg, base / "log", pub))
        try:
            await daemon.seen(
                lambda r: r.get("event") == "phase" and r.get("dst") == "IRRADIATING",
                "the beam on",
            )
            await sim.ctl("stand", "bump", "mm=3", "direction=x")
            await daemon.seen(
                lambda r: (
                    r.get("event") == "alarm_raised" and r.get("code") == "applicator_displaced"
                ),
                "applicator_displaced",
                within_s=10,
            )
            await sim.ctl("stand", "release_brakes")
            await daemon.seen(
                lambda r: r.get("event") == "monitor_interlock",
                "the monitor's applicator interlock",
                within_s=10,
            )
            await sim.ctl("stand", "engage_brakes")
            await sim.ctl("stand", "lock")
            end = await daemon.seen(
                lambda r: r.get("event") == "delivery_terminated", "the delivery's end", within_s=60
            )
            assert await daemon.stop() == 0, "iortd exited non-zero (the stand delivery)"
        finally:
            await daemon.ensure_dead()
    finally:
        await sim.stop()
    return LogRun("stand", base / "log", pub, str(end["delivery_id"]), end)
