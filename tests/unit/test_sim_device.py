"""The simulator core every protocol adapter shares: faults from a scenario and from the
control channel do the same thing, link faults last their duration, and the console names
the scenario it plays."""

from __future__ import annotations

from pathlib import Path

import pytest
from manualclock import ManualClock

from iortd.kernel.types import DeviceState, Interlock, InterlockState
from iortd.simulators.device import ActionError, SimDevice
from iortd.simulators.model import SourceModel
from iortd.simulators.profiles import load_profile
from iortd.simulators.scenario import Step, load_scenario
from iortd.simulators.sequence import ClinicalSequence


def make(tmp_path: Path, script: str | None = None) -> tuple[SimDevice, ManualClock]:
    clock = ManualClock()
    model = SourceModel(load_profile("axxent"), seed=3)
    seq = ClinicalSequence(model, preset_gy=5.0, applicator_code="BAL34", start_delay_s=0)
    scenario = None
    if script is not None:
        path = tmp_path / "faults.toml"
        path.write_text(script, encoding="utf-8")
        scenario = load_scenario(path)
    return SimDevice("room-1", seq, clock, scenario), clock


def test_link_faults_from_a_scenario_last_their_duration(tmp_path: Path) -> None:
    device, clock = make(
        tmp_path,
        '[[step]]\nat = "5s"\naction = "drop_link"\nduration = "2s"\n'
        '[[step]]\nat = "10s"\naction = "garble"\nduration = "1s"\n'
        '[[step]]\nat = "12s"\naction = "delay_replies"\nduration = "3s"\ndelay = "0.4s"\n',
    )
    seen: list[tuple[float, str, str]] = []
    device.on_step = lambda step, source: seen.append((step.at_s, step.action, source))
    expected = [
        (4.9, False, False, 0.0),
        (5.0, True, False, 0.0),
        (6.9, True, False, 0.0),
        (7.0, False, False, 0.0),
        (10.5, False, True, 0.0),
        (11.0, False, False, 0.0),
        (13.0, False, False, 0.4),
        (15.0, False, False, 0.0),
    ]
    for t, down, garbled, delay in expected:
        clock.at(t)
        device.advance()
        assert (device.link_down(), device.garbled(), device.reply_delay_s()) == (
            down,
            garbled,
            delay,
        ), f"at {t} s"
    assert seen == [
        (5.0, "drop_link", "scenario"),
        (10.0, "garble", "scenario"),
        (12.0, "delay_replies", "scenario"),
    ]


def test_a_control_action_acts_at_once_and_is_reported(tmp_path: Path) -> None:
    device, clock = make(tmp_path)
    seen: list[tuple[str, str]] = []
    device.on_step = lambda step, source: seen.append((step.action, source))
    clock.at(40.0)
    snap = device.advance()
    assert snap.state is DeviceState.IRRADIATING
    snap = device.apply("open_door", {})
    assert snap.state is DeviceState.INTERRUPTED
    assert snap.interlocks[Interlock.DOOR] is InterlockState.TRIPPED
    device.apply("drop_link", {"duration_s": 5.0})
    assert device.link_down()
    device.apply("restore_link", {})
    assert not device.link_down()
    assert seen == [("open_door", "control"), ("drop_link", "control"), ("restore_link", "control")]


def test_a_control_action_the_console_refuses_is_an_error(tmp_path: Path) -> None:
    device, clock = make(tmp_path)
    clock.at(40.0)
    device.advance()
    with pytest.raises(ActionError, match="resume: refused in state IRRADIATING"):
        device.apply("resume", {})
    with pytest.raises(ActionError, match="unknown action 'explode'"):
        device.apply("explode", {})
    with pytest.raises(ActionError, match="unknown applicator 'SPH99'"):
        device.apply("swap_applicator", {"code": "SPH99"})


def test_a_scripted_step_the_console_refuses_is_skipped_like_a_real_console(
    tmp_path: Path,
) -> None:
    device, clock = make(tmp_path, '[[step]]\nat = "1s"\naction = "resume"\n')
    clock.at(2.0)
    assert device.advance().state is not DeviceState.FAULT
    assert device.scenario is not None
    assert device.scenario.next_at() is None


def test_the_console_names_its_scenario_by_name_and_hash(tmp_path: Path) -> None:
    device, _ = make(tmp_path, '[[step]]\nat = "1s"\naction = "open_door"\n')
    assert device.scenario is not None
    assert device.scenario_note() == f"faults {device.scenario.sha256[:12]}"
    plain, _ = make(tmp_path)
    assert plain.scenario_note() == ""
    assert Step(0.0, "x").args == {}


@pytest.mark.parametrize("hold", [False, True])
def test_a_held_console_starts_its_clock_and_scenario_at_the_first_request(
    tmp_path: Path, hold: bool
) -> None:
    path = tmp_path / "faults.toml"
    path.write_text('[[step]]\nat = "5s"\naction = "drop_link"\nduration = "2s"\n', "utf-8")
    clock = ManualClock()
    model = SourceModel(load_profile("axxent"), seed=3)
    seq = ClinicalSequence(model, preset_gy=5.0, applicator_code="BAL34", start_delay_s=0)
    device = SimDevice("room-1", seq, clock, load_scenario(path), hold=hold)
    clock.at(8.0)  # the monitor is slow to start: its first request comes 8 s late
    device.advance()
    if hold:
        # Nothing has happened yet: the scenario's 5 s are counted from this request.
        assert device.time_s == 0.0
        assert not device.link_down()
        clock.at(13.0)
        device.advance()
        assert device.time_s == pytest.approx(5.0)
        assert device.link_down()
    else:
        assert device.time_s == pytest.approx(8.0)
        assert not device.link_down()  # the drop came and went before anyone asked
