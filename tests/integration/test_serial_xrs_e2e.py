"""End to end over a real pty: `iort-sim serve --transport serial` answers XRS-ASCII/1 on
a pseudo-terminal, `iortd run` polls it with the production `serial-xrs` driver through a
whole delivery, and the tracker's result matches the simulator's ground truth; then the
bundled fault scenarios (config/scenarios) run against the same path.

Every run (the clean delivery and each scenario) is a simulator and a daemon of its own,
on its own pty and log, sharing nothing; they wait in real time, so the module runs them
all at once (:func:`run_scenarios`) and each test reads its own run's result. The console
self-tests for 2 s instead of the built-in 10 s, and each bundled scenario is played 8 s
earlier to match (simproc.fast_console): the same faults at the same moment of the
delivery."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from daemonproc import Daemon, Site
from simproc import SERIAL_XRS_DEVICE, Simulator, fast_console

from iortd.auditlog.note import generate_keypair, write_keypair

pytestmark = pytest.mark.integration

PRESET_GY = 0.3  # Axxent-like BAL34 at 2.5 Gy/min: about 7 s of beam at speed 1

SITE = (
    """
[site]
id = "test-site"
room = "or-5"
[log]
directory = "log"
signing_key_file = "keys/or-5.key"
[health]
listen = ""
[mqtt]
enabled = false
[tolerances]
stale_after_polls = 5
"""
    + SERIAL_XRS_DEVICE
)


async def start_simulator(
    directory: Path, scenario: str | None, *, preset_gy: float, transport: str
) -> Simulator:
    """The Axxent-like console with a short self-test, playing the bundled ``scenario``
    moved earlier to match (simproc.fast_console); its clock starts at the first poll."""
    return await Simulator.start(
        *fast_console(directory, scenario),
        *("--applicator", "BAL34", "--preset", str(preset_gy)),
        *("--start-delay", "1", "--seed", "5"),
        transport=transport,
    )


def site_for(tmp_path: Path, port: str) -> Site:
    _, pub = write_keypair(generate_keypair("or-5"), tmp_path / "keys")
    cfg = tmp_path / "site.toml"
    cfg.write_text(SITE.format(port=port), encoding="utf-8")
    return Site(cfg, tmp_path / "log", pub)


async def run_scenario(
    tmp_path: Path,
    name: str | None,
    preset_gy: float,
    *,
    transport: str = "serial",
    make_site: Callable[[Path, Simulator], Site] | None = None,
) -> tuple[Daemon, dict[str, Any], dict[str, Any], Site, dict[str, Any]]:
    """The daemon through one delivery of the simulator playing scenario ``name`` (None: a
    clean delivery, no scenario) over ``transport``: the daemon, its delivery_terminated
    record, the simulator's ground truth, the site (``make_site`` writes the daemon's
    config for the simulator), the simulator's serving line."""
    sim = await start_simulator(tmp_path / "sim", name, preset_gy=preset_gy, transport=transport)
    try:
        site = (make_site or (lambda p, s: site_for(p, s.device)))(tmp_path, sim)
        daemon = await Daemon.follow(site)
        try:
            end = await daemon.seen(
                lambda r: r.get("event") == "delivery_terminated",
                f"the delivery's end ({name} over {transport})",
                within_s=90,
            )
            assert await daemon.stop() == 0
        finally:
            await daemon.ensure_dead()
        truth = await sim.until("terminated", within_s=5)
        if name is not None:
            assert any(r["event"] == "scenario_step" for r in sim.lines), "the scenario ran"
    finally:
        await sim.stop()
    return daemon, end, truth, site, sim.serving


@dataclass
class ScenarioRun:
    daemon: Daemon
    end: dict[str, Any]
    truth: dict[str, Any]
    site: Site
    serving: dict[str, Any]  # the simulator's serving line


async def run_scenarios(
    base: Path,
    plan: dict[str, tuple[str, str | None, float]],
    make_site: Callable[[Path, Simulator], Site] | None = None,
) -> dict[str, ScenarioRun | BaseException]:
    """Every run of ``plan`` (key -> transport, scenario or None, preset) at the same time: each is
    a simulator and a daemon of its own, waiting in real time, so together they take
    about as long as the longest. A run that fails keeps its exception, for its test."""
    keys = list(plan)
    for key in keys:
        (base / key).mkdir()
    results = await asyncio.gather(
        *(
            run_scenario(
                base / key, plan[key][1], plan[key][2], transport=plan[key][0], make_site=make_site
            )
            for key in keys
        ),
        return_exceptions=True,
    )
    return {
        key: r if isinstance(r, BaseException) else ScenarioRun(*r)
        for key, r in zip(keys, results, strict=True)
    }


def scenario(runs: dict[str, ScenarioRun | BaseException], key: str) -> ScenarioRun:
    run = runs[key]
    if isinstance(run, BaseException):
        raise run
    return run


SCENARIOS: dict[str, tuple[str, str | None, float]] = {
    "whole": ("serial", None, PRESET_GY),  # a clean delivery
    "door": ("serial", "door-mid-delivery", 0.5),
    "link-drop": ("serial", "link-drop-5s", 0.5),
    "garbled": ("serial", "garbled-10s", 0.6),
    "applicator": ("serial", "applicator-swap", 0.5),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ScenarioRun | BaseException]:
    return asyncio.run(run_scenarios(tmp_path_factory.mktemp("serial-scenarios"), SCENARIOS))


def audit_types(site: Site) -> list[str]:
    out = []
    for seg in sorted(site.log_dir.glob("log-*.jsonl")):
        out += [json.loads(line)["type"] for line in seg.read_text("utf-8").splitlines()]
    return out


def test_a_whole_delivery_over_a_pty_matches_the_simulators_ground_truth(
    runs: dict[str, ScenarioRun | BaseException],
) -> None:
    r = scenario(runs, "whole")
    daemon, end, truth = r.daemon, r.end, r.truth
    ident = next(r for r in daemon.lines if r.get("event") == "device_identified")
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
    alarms = [r for r in daemon.lines if r.get("event") == "alarm_raised"]
    assert alarms == [], "a clean delivery raises no alarm (communication is the host's own)"


def test_door_opened_mid_delivery_is_an_interruption_and_the_delivery_resumes(
    runs: dict[str, ScenarioRun | BaseException],
) -> None:
    r = scenario(runs, "door")
    daemon, end, truth = r.daemon, r.end, r.truth
    assert end["status"] == truth["termination"] == "NORMAL"
    assert end["interruptions"] == 1
    assert end["delivered_primary_gy"] == pytest.approx(truth["dose_primary_gy"], rel=0.005)
    doors = [r for r in daemon.lines if r.get("event") == "interlock" and r["interlock"] == "door"]
    states = [d["new"] for d in doors]
    assert "tripped" in states, "the open door tripped its interlock"
    assert "ok" in states[states.index("tripped") + 1 :], "and closing it cleared it"


def test_a_link_dropped_for_5s_is_a_gap_with_unknown_interlocks_and_a_reconnect(
    runs: dict[str, ScenarioRun | BaseException],
) -> None:
    r = scenario(runs, "link-drop")
    daemon, end, truth, site = r.daemon, r.end, r.truth, r.site
    lost = [r for r in daemon.lines if r.get("event") == "device_link_lost"]
    assert lost, "the link loss was seen"
    gaps = [r for r in daemon.lines if r.get("event") == "monitoring_gap_started"]
    assert gaps, "a monitoring gap was opened"
    unknown = [
        r
        for r in daemon.lines
        if r.get("event") == "interlock" and r["new"] == "unknown" and r["old"] == "ok"
    ]
    assert unknown, "interlocks went unknown (counted as tripped)"
    alarms = [r for r in daemon.lines if r.get("event") == "alarm_raised"]
    assert any(a["severity"] == "high" for a in alarms)
    connected = [r for r in daemon.lines if r.get("event") == "device_connected"]
    assert len(connected) >= 2, "the driver reconnected"
    assert "monitoring_gap_started" in audit_types(site), "the gap is in the audit log"
    # The console went on delivering; the tracker followed it to the end afterwards.
    assert end["delivered_primary_gy"] == pytest.approx(truth["dose_primary_gy"], rel=0.005)
    assert end["gaps"] >= 1


def test_garbled_replies_for_10s_are_counted_and_no_wrong_value_is_accepted(
    runs: dict[str, ScenarioRun | BaseException],
) -> None:
    r = scenario(runs, "garbled")
    daemon, end, truth = r.daemon, r.end, r.truth
    # A garbled reply to a poll is counted (protocol_violation); one to the identify of a
    # reconnection, or a run of them, is a lost link with the frame error as its reason.
    violations = [r for r in daemon.lines if r.get("event") == "protocol_violation"]
    lost = [r for r in daemon.lines if r.get("event") == "device_link_lost"]
    framing = violations + [r for r in lost if "ProtocolViolation" in r["reason"]]
    assert framing, "garbled frames were seen as such, naming the frame"
    assert len(violations) + len(lost) >= 3, "every bad exchange is counted"
    assert daemon.proc.returncode == 0, "no crash"
    # Nothing garbled got through: the dose followed is the console's, exactly.
    assert end["delivered_primary_gy"] == pytest.approx(truth["dose_primary_gy"], rel=0.005)
    assert end["delivered_secondary_gy"] == pytest.approx(truth["dose_secondary_gy"], rel=0.005)
    assert end["preset_gy"] == pytest.approx(0.6)


def test_an_applicator_swapped_mid_delivery_trips_the_applicator_interlock(
    runs: dict[str, ScenarioRun | BaseException],
) -> None:
    r = scenario(runs, "applicator")
    daemon, end, truth = r.daemon, r.end, r.truth
    assert end["status"] == truth["termination"] == "MACHINE"
    tripped = [
        r
        for r in daemon.lines
        if r.get("event") == "interlock"
        and r["interlock"] == "applicator"
        and r["new"] == "tripped"
    ]
    assert tripped, "the applicator interlock tripped"
