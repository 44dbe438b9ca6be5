"""Profile loading: the built-in data and the strict validation of profile files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from iortd.simulators.profiles import (
    ApplicatorSpec,
    Profile,
    ProfileError,
    available_profiles,
    load_profile,
)

VALID = """\
name = "tiny"
manufacturer = "test"
model = "tiny source"
firmware = "0"
nominal_kv = 50.0
nominal_ua = 40
kv_tolerance_rel = 0.05
ua_tolerance_rel = 0.05
output_noise_rel_sd = 0.009
output_drift_rel_per_30min = -0.009
secondary_noise_rel_sd = 0.005
monitor_stop_accuracy_rel = 0.005
backup_timer_margin_rel = 0.1
dose_channel_tolerance_rel = 0.05
dose_rate_tolerance_rel = 0.1
self_test_s = 1.0

[applicators.A1]
type = "spherical"
diameter_mm = 30.0
surface_dose_rate_gy_min = 1.0
"""


def write(tmp_path: Path, text: str, name: str = "profile.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str) -> tuple[Path, ProfileError]:
    path = write(tmp_path, text)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    return path, info.value


# --- built-in profiles --------------------------------------------------------------------


def test_builtin_profiles_are_listed() -> None:
    names = available_profiles()
    assert names == sorted(names)
    assert {"intrabeam", "axxent"} <= set(names)


@pytest.mark.parametrize("name", available_profiles())
def test_every_builtin_profile_loads(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.nominal_kv == 50.0  # docs/domain.md: 50 kV for both source classes
    assert profile.applicators
    for code, spec in profile.applicators.items():
        assert spec.code == code
        assert spec.surface_dose_rate_gy_min > 0


def test_intrabeam_applicators_and_published_rates() -> None:
    profile = load_profile("intrabeam")
    assert profile.nominal_ua == 40.0
    diameters = sorted(spec.diameter_mm for spec in profile.applicators.values())
    assert diameters == [15.0, 20.0, 25.0, 30.0, 35.0, 40.0, 45.0, 50.0]
    assert all(spec.type == "spherical" for spec in profile.applicators.values())
    by_diameter = {spec.diameter_mm: spec for spec in profile.applicators.values()}
    # PMC5879442 Table 1: 20 Gy in 23 / 25 / 44 min for 3 / 4 / 5 cm, to full precision.
    assert by_diameter[30.0].surface_dose_rate_gy_min == 20 / 23
    assert by_diameter[40.0].surface_dose_rate_gy_min == 20 / 25
    assert by_diameter[50.0].surface_dose_rate_gy_min == 20 / 44
    assert profile.output_noise_rel_sd == 0.009
    assert profile.output_drift_rel_per_30min == -0.009
    assert profile.monitor_stop_accuracy_rel == 0.005


def test_axxent_balloons_deliver_20_gy_in_8_to_11_minutes() -> None:
    profile = load_profile("axxent")
    assert profile.nominal_ua == 300.0
    assert profile.output_noise_rel_sd == 0.009
    assert len(profile.applicators) >= 3
    for spec in profile.applicators.values():
        assert spec.type == "balloon"
        assert 8.0 <= 20.0 / spec.surface_dose_rate_gy_min <= 11.0 + 1e-9


def test_profile_is_frozen_and_its_applicators_read_only() -> None:
    profile = load_profile("intrabeam")
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.nominal_kv = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        profile.applicators["X"] = ApplicatorSpec("X", "flat", 1.0, 1.0)  # type: ignore[index]


def test_load_by_path_and_secondary_gain_defaults_to_one(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path, VALID))
    assert isinstance(profile, Profile)
    assert profile.secondary_gain == 1.0
    assert profile.nominal_ua == 40.0
    assert isinstance(profile.nominal_ua, float)
    assert profile.applicators["A1"] == ApplicatorSpec("A1", "spherical", 30.0, 1.0)


def test_load_by_str_path(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace('name = "tiny"', 'name = "other"'))
    assert load_profile(str(path)).name == "other"


# --- errors name the file, the key and what was expected -----------------------------------


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path, err = load_error(tmp_path, VALID.replace("self_test_s", "self_tset_s"))
    message = str(err)
    assert str(path) in message
    assert "self_tset_s" in message
    assert "unknown key" in message
    assert "self_test_s" in message  # the expected keys are listed
    assert err.key == "self_tset_s"


def test_unknown_applicator_key(tmp_path: Path) -> None:
    path, err = load_error(tmp_path, VALID + 'colour = "blue"\n')
    assert str(path) in str(err)
    assert err.key == "applicators.A1.colour"
    assert "applicators.A1.colour" in str(err)


def test_wrong_type(tmp_path: Path) -> None:
    path, err = load_error(tmp_path, VALID.replace("nominal_kv = 50.0", 'nominal_kv = "50"'))
    assert str(path) in str(err)
    assert err.key == "nominal_kv"
    assert "expected a positive number" in str(err)
    assert "'50'" in str(err)


def test_boolean_is_not_a_number(tmp_path: Path) -> None:
    _, err = load_error(tmp_path, VALID.replace("self_test_s = 1.0", "self_test_s = true"))
    assert err.key == "self_test_s"


@pytest.mark.parametrize("rate", ["0.0", "-1.5", "nan", "inf"])
def test_non_positive_or_non_finite_rate(tmp_path: Path, rate: str) -> None:
    text = VALID.replace("surface_dose_rate_gy_min = 1.0", f"surface_dose_rate_gy_min = {rate}")
    path, err = load_error(tmp_path, text)
    assert str(path) in str(err)
    assert err.key == "applicators.A1.surface_dose_rate_gy_min"
    assert err.expected == "a positive number"
    assert "expected a positive number" in str(err)


def test_tolerance_must_be_a_fraction(tmp_path: Path) -> None:
    _, err = load_error(tmp_path, VALID.replace("kv_tolerance_rel = 0.05", "kv_tolerance_rel = 5"))
    assert err.key == "kv_tolerance_rel"
    assert "fraction" in str(err)


def test_missing_key(tmp_path: Path) -> None:
    path, err = load_error(tmp_path, VALID.replace("nominal_ua = 40\n", ""))
    assert str(path) in str(err)
    assert err.key == "nominal_ua"
    assert "missing" in str(err)


def test_missing_and_empty_applicators(tmp_path: Path) -> None:
    head = VALID.split("[applicators.A1]", maxsplit=1)[0]
    _, err = load_error(tmp_path, head)
    assert err.key == "applicators"
    _, err = load_error(tmp_path, head + "applicators = {}\n")
    assert err.key == "applicators"
    _, err = load_error(tmp_path, head + "applicators = { A1 = 3 }\n")
    assert err.key == "applicators.A1"


def test_empty_string(tmp_path: Path) -> None:
    _, err = load_error(tmp_path, VALID.replace('firmware = "0"', 'firmware = ""'))
    assert err.key == "firmware"
    assert "non-empty string" in str(err)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path, err = load_error(tmp_path, VALID + "this is not toml\n")
    assert str(path) in str(err)
    assert "TOML" in str(err)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ProfileError, match=r"absent\.toml"):
        load_profile(path)


def test_unknown_builtin_name_lists_the_builtins() -> None:
    with pytest.raises(ProfileError, match="intrabeam") as info:
        load_profile("no-such-source")
    assert isinstance(info.value, ValueError)
    assert "no-such-source" in str(info.value)
