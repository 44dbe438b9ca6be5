"""Fault scenarios: the bundled files load, durations parse, and a broken file is a clear
error naming the file, the step and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulators.model import SourceModel
from simulators.profiles import load_profile
from simulators.scenario import ScenarioError, load_scenario, parse_duration

BUNDLED = Path(__file__).resolve().parents[2] / "config" / "scenarios"


@pytest.mark.parametrize(
    ("text", "seconds"), [("45s", 45), ("2m30s", 150), ("1h", 3600), ("0.5s", 0.5)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "2x", "m", "-1s", "1s2m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize("path", sorted(BUNDLED.glob("*.toml")), ids=lambda p: p.stem)
def test_bundled_scenarios_load(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.steps
    assert scenario.description


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ('[[step]]\nat = "soon"\naction = "open_door"\n', "step[0].at"),
        ('[[step]]\nat = "1s"\naction = "explode"\n', "step[0].action"),
        ('[[step]]\nat = "1s"\naction = "garble"\n', "step[0].duration"),
        ('[[step]]\nat = "1s"\naction = "open_door"\ncolour = 1\n', "step[0]: unknown key"),
        ('[[step]]\nat = "1s"\naction = "set_output_factor"\nfactor = 9\n', "step[0].factor"),
        ("steps = 1\n", "unknown key"),
        ("[[step]\n", "not valid TOML"),
    ],
)
def test_broken_scenarios_name_file_step_and_key(tmp_path: Path, body: str, where: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ScenarioError) as excinfo:
        load_scenario(path)
    assert str(path) in str(excinfo.value)
    assert where in str(excinfo.value)


def test_steps_apply_in_time_order_and_link_faults_last_their_duration(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        '[[step]]\nat = "5s"\naction = "drop_link"\nduration = "2s"\n'
        '[[step]]\nat = "1s"\naction = "open_door"\n',
        encoding="utf-8",
    )
    scenario = load_scenario(path)
    model = SourceModel(load_profile("axxent"), seed=0)
    assert [s.action for s in scenario.due(1.0, model)] == ["open_door"]
    assert scenario.due(4.9, model) == []
    assert [s.action for s in scenario.due(5.0, model)] == ["drop_link"]
    assert scenario.link_down(6.9)
    assert not scenario.link_down(7.0)
    assert not scenario.garbled(6.0)
