"""End to end, the rest of issue 16's "Done when" for two devices in one room: a clean
delivery over one real pty (a shared RS-485 line, Modbus RTU) raises no alarm once the
daemon has read both devices (before the reader's first turn, a delivery the console
opens has the monitor's interlock rightly unknown: one MEDIUM alarm, cleared by it); over
Modbus TCP, the stand's brakes released mid-beam trip the monitor's applicator interlock
(HIGH) on the first reading that shows it and it clears once they are engaged again, then
an applicator swapped on the reader only (the console keeps its own) is an identity
mismatch (HIGH) and trips the monitor's interlock, never the console's. The set-ups are
the existing e2e tests' (test_shared_line_e2e, test_applicator_e2e), reused as they are."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import test_applicator_e2e as tcp
import test_shared_line_e2e as rtu
from daemonproc import Daemon, Site
from simproc import Simulator

from iortd.auditlog.note import generate_keypair, write_keypair

pytestmark = pytest.mark.integration

POLL_S = 0.1  # both devices' poll_interval_s in the reused site configs


def _site(tmp_path: Path, text: str) -> Site:
    _, pub = write_keypair(generate_keypair("or-7"), tmp_path / "keys")
    cfg = tmp_path / "site.toml"
    cfg.write_text(text, "utf-8")
    return Site(cfg, tmp_path / "log", pub)


def _t(e: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(e["data"]["at"])


async def test_a_clean_delivery_with_two_devices_on_one_line_raises_no_alarm(
    tmp_path: Path,
) -> None:
    # The shared line's set-up without its slow unit: both answer at once. Twice as fast,
    # with the console's beam-on 4 s of real time after the simulator's start: the plan is
    # selected before the daemon's first reading (the reader's start-up grace is what is
    # exercised) and the beam comes on after the daemon's first reading of the reader even
    # on a loaded machine, or the monitor's interlock is rightly unknown with the beam on
    # (a HIGH alarm: seen with the beam-on 1 s after the start, on a loaded machine).
    devices = tmp_path / "devices.toml"
    text = rtu.DEVICES.replace("reply_delay_ms = 150\n", "")
    text = text.replace("speed = 4.0", "speed = 8.0").replace("start_delay = 1", "start_delay = 32")
    devices.write_text(text, "utf-8")
    sim = await Simulator.start("--devices", str(devices), transport=None)
    try:
        site = _site(tmp_path, rtu.SITE.format(port=sim.device))
        daemon = await Daemon.follow(site)
        try:
            end = await daemon.seen(
                lambda r: r.get("event") == "delivery_terminated", "the delivery's end"
            )
            assert await daemon.stop() == 0
        finally:
            await daemon.ensure_dead()
        sim_end = await sim.until("terminated", within_s=5)
    finally:
        await sim.stop()
    log = rtu.entries(site)
    kinds = [e["type"] for e in log]
    first_reader = kinds.index("applicator_sample")
    raised = [e["data"] for e in log if e["type"] == "alarm_raised"]
    # No alarm at all: the console's first reading opens the delivery (its plan is
    # already selected) before the reader's first turn, and the monitor's interlock is
    # then unknown until that first reading; that is the reader's start, within its
    # bounded grace with the beam off (docs/alarms.md), not an alarm.
    assert [(a["code"], a["message"]) for a in raised] == []
    assert first_reader > 0
    assert "monitoring_gap_started" not in kinds
    assert "device_gap_started" not in kinds
    assert end["status"] == sim_end["termination"] == "NORMAL"
    stand = [e["data"] for e in log if e["type"] == "applicator_sample"]
    assert len(stand) >= 5, len(stand)
    # The reader was believed and ok through the beam: the rules had something to judge.
    assert "applicator_at_beam_on" in kinds
    assert {s["monitor_interlocks"].get("applicator") for s in stand[-3:]} == {"ok"}


async def test_brakes_released_then_a_swap_on_the_reader_only_trip_the_monitor(
    tmp_path: Path,
) -> None:
    devices = tmp_path / "devices.toml"
    # A longer beam than the drift test's so that both actions fall inside it.
    text = tcp.DEVICES.format(speed=tcp.SPEED, seed=5).replace("preset = 1.5", "preset = 6")
    devices.write_text(text, "utf-8")
    sim = await Simulator.start("--devices", str(devices), transport=None)
    try:
        site = _site(
            tmp_path,
            tcp.SITE.format(
                console_port=tcp.serving(sim, "console")["port"],
                stand_port=tcp.serving(sim, "stand")["port"],
            ),
        )
        daemon = await Daemon.follow(site)
        try:
            await daemon.seen(
                lambda r: r.get("event") == "phase" and r.get("dst") == "IRRADIATING",
                "the beam on",
            )
            await daemon.seen(
                lambda r: r.get("event") == "monitor_interlock" and r.get("new") == "ok",
                "the monitor's applicator interlock ok",
            )
            # Only what follows the action (a start-up alarm may precede it).
            mark = len(daemon.lines)
            await sim.ctl("stand", "release_brakes")
            brakes = await daemon.seen(
                lambda r: (
                    r.get("event") == "alarm_raised"
                    and r.get("code") == "monitor_interlock"
                    and any(r is x for x in daemon.lines[mark:])
                ),
                "monitor_interlock raised",
                within_s=10,
            )
            mark = len(daemon.lines)
            await sim.ctl("stand", "engage_brakes")
            await daemon.seen(
                lambda r: r.get("event") == "monitor_interlock" and r.get("new") == "ok"
                and any(r is x for x in daemon.lines[mark:]),
                "the monitor's interlock ok again",
                within_s=10,
            )  # fmt: skip
            await sim.ctl("stand", "swap", "code=BAL45")
            mismatch = await daemon.seen(
                lambda r: (
                    r.get("event") == "alarm_raised" and r.get("code") == "applicator_mismatch"
                ),
                "applicator_mismatch raised",
                within_s=10,
            )
            assert await daemon.stop() == 0
        finally:
            await daemon.ensure_dead()
    finally:
        await sim.stop()
    assert brakes["severity"] == "high", brakes
    assert mismatch["severity"] == "high", mismatch
    log = tcp.entries(site)

    def first_sample(after: int, pred: Any) -> int:
        return next(
            i
            for i, e in enumerate(log)
            if i > after and e["type"] == "applicator_sample" and pred(e["data"])
        )

    def rows(kind: str, **match: str) -> list[int]:
        return [
            i
            for i, e in enumerate(log)
            if e["type"] == kind and all(e["data"].get(k) == v for k, v in match.items())
        ]

    # Brakes: raised on the first reading that shows them released (its events are logged
    # before its sample), within 3 poll periods of the last reading that showed them on.
    released = first_sample(-1, lambda d: d["brakes_engaged"] != "yes")
    before = max(i for i in rows("applicator_sample") if i < released)
    # (Past the last brakes-on reading: a start-up alarm before the reader's first
    # reading, see the clean delivery above, is not this one.)
    raised = [i for i in rows("alarm_raised", code="monitor_interlock") if i > before]
    assert raised, "no monitor_interlock alarm in the log"
    assert raised[0] < released, (raised, released)
    assert "applicator_sample" not in [e["type"] for e in log[raised[0] : released]]
    assert log[raised[0]]["data"]["severity"] == "high"
    latency = (_t(log[raised[0]]) - _t(log[before])).total_seconds()
    assert latency <= 3 * POLL_S, f"brakes alarm {latency:.3f} s after the last brakes-on reading"
    changed = [log[i]["data"] for i in rows("monitor_interlock_changed")]
    tripped = [c for c in changed if c["to"] == "tripped" and "brakes" in c["cause"]]
    assert tripped, changed
    assert "brakes" in tripped[0]["cause"], tripped[0]
    assert tripped[0]["device"] == "stand-1"
    # ... and it clears once the brakes are engaged again.
    engaged = first_sample(released, lambda d: d["brakes_engaged"] == "yes")
    cleared = [i for i in rows("alarm_cleared", code="monitor_interlock") if i > raised[0]]
    assert cleared, "the brakes alarm never cleared"
    assert cleared[0] < engaged, (cleared, engaged)
    assert changed.index(tripped[0]) + 1 < len(changed)
    assert changed[changed.index(tripped[0]) + 1]["to"] == "ok"

    # Mismatch: the reader alone sees another applicator.
    swapped = first_sample(engaged, lambda d: d["applicator"]["serial"] != "SIM-BAL34")
    mism = rows("alarm_raised", code="applicator_mismatch")
    assert mism, "no applicator_mismatch in the log"
    assert mism[0] < swapped, (mism, swapped)
    assert "applicator_sample" not in [e["type"] for e in log[mism[0] : swapped]]
    before = max(i for i in rows("applicator_sample") if i < swapped)
    latency = (_t(log[mism[0]]) - _t(log[before])).total_seconds()
    assert latency <= 3 * POLL_S, f"mismatch alarm {latency:.3f} s after the last same reading"
    trip = [
        log[i]["data"]
        for i in rows("monitor_interlock_changed", to="tripped")
        if cleared[0] < i < swapped
    ]
    assert trip, "the monitor's applicator interlock did not trip on the swap"
    assert "mismatch" in trip[0]["cause"], trip[0]
    assert log[swapped]["data"]["monitor_interlocks"]["applicator"] == "tripped"
    # The console's own interlocks are its own: never changed by the stand or the reader.
    beam_on = next(i for i, e in enumerate(log) if e["type"] == "applicator_at_beam_on")
    assert not [i for i in rows("interlock_changed") if i > beam_on], "the console's changed"
    console = [e["data"]["interlocks"] for e in log[beam_on:] if e["type"] == "sample"]
    assert console, "no console sample after beam-on"
    assert all(set(c.values()) == {"ok"} for c in console), console[-1]
