"""Fault scenarios: the bundled files load, durations parse, and a broken file is a clear
error naming the file, the step and the key."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from iortd.simulators.scenario import ScenarioError, load_scenario, parse_duration

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


def test_steps_come_due_in_time_order_once_each(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        '[[step]]\nat = "5s"\naction = "drop_link"\nduration = "2s"\n'
        '[[step]]\nat = "1s"\naction = "open_door"\n',
        encoding="utf-8",
    )
    scenario = load_scenario(path)
    assert [s.action for s in scenario.due(1.0)] == ["open_door"]
    assert scenario.due(4.9) == []
    assert [s.action for s in scenario.due(5.0)] == ["drop_link"]
    assert scenario.due(100.0) == []
    assert scenario.next_at() is None


def test_a_scenario_carries_the_hash_of_its_file(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    body = b'[[step]]\nat = "1s"\naction = "open_door"\n'
    path.write_bytes(body)
    assert load_scenario(path).sha256 == hashlib.sha256(body).hexdigest()


def test_delay_replies_needs_a_bounded_delay(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        '[[step]]\nat = "1s"\naction = "delay_replies"\nduration = "3s"\ndelay = "90s"\n',
        encoding="utf-8",
    )
    with pytest.raises(ScenarioError, match=r"step\[0\]\.delay: at most 60s"):
        load_scenario(path)
