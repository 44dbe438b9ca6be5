"""TrackerSettings is the single source of every tolerance default; the config derives.

The config's ``[tolerances]`` table declares its own bounds but takes every default from
the tracker's settings, and ``tracker_settings`` (in daemon/config/model.py) turns a validated
config into the settings the tracker runs with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from iortd.daemon.config import ConfigError, Tolerances, load_config, tracker_settings
from iortd.daemon.tracker import TrackerSettings
from iortd.daemon.tracker.settings import STALE_AFTER_POLLS
from iortd.drivers.registry import DriverRegistry

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "config" / "demo.toml"


@pytest.fixture(scope="module")
def registry() -> DriverRegistry:
    return DriverRegistry.from_entry_points()


def _config(tmp_path: Path, registry: DriverRegistry, tolerances: str) -> Path:
    # The demo's source alone: its applicator reader (which needs tolerances with no
    # default) and the reader's tolerances cut off.
    demo = DEMO.read_text("utf-8").split("# The applicator reader and positioning stand")[0]
    demo = "".join(ln for ln in demo.splitlines(True) if not ln.startswith("applicator_"))
    text = demo.replace("[tolerances]\nstale_after_polls = 5\n", f"[tolerances]\n{tolerances}\n")
    path = tmp_path / "site.toml"
    path.write_text(text, "utf-8")
    return path


def test_every_numeric_tolerance_default_is_the_tracker_settings_own() -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(TrackerSettings)}
    config = Tolerances()
    shared = set(Tolerances.model_fields) - {"stale_after_polls"}
    assert shared <= set(defaults), "every [tolerances] key but stale_after_polls is a setting"
    for key in sorted(shared):
        assert getattr(config, key) == defaults[key], key
    assert config.stale_after_polls == STALE_AFTER_POLLS
    # and the tracker's numeric tolerances are all in the config (nothing only in code)
    numeric = {
        n
        for n, d in defaults.items()
        # (None: a tolerance with no default, required with the device it is for)
        if (isinstance(d, float) or d is None)
        # (derived by the daemon from the devices' poll periods and timeouts, not set)
        and n not in ("stale_after_s", "expected_rate_gy_min", "applicator_first_reading_s")
    }
    assert numeric == shared


def test_an_empty_tolerances_table_gives_the_tracker_its_defaults(
    tmp_path: Path, registry: DriverRegistry
) -> None:
    loaded = load_config(_config(tmp_path, registry, ""), registry)
    got = tracker_settings(loaded.config, clock_speed=60.0)
    src = loaded.config.source
    assert got == TrackerSettings(
        stale_after_s=STALE_AFTER_POLLS * src.poll_interval_s * 60.0,
        delivery_id_prefix=loaded.config.site.room,
    )


def test_the_kv_band_is_configured_under_tolerances(
    tmp_path: Path, registry: DriverRegistry
) -> None:
    loaded = load_config(
        _config(tmp_path, registry, "nominal_kv = 40.0\nkv_tolerance_kv = 2.5"), registry
    )
    got = tracker_settings(loaded.config, clock_speed=1.0)
    assert (got.nominal_kv, got.kv_tolerance_kv) == (40.0, 2.5)


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("kv_tolerance_kv = 0.0", "tolerances.kv_tolerance_kv"),
        ("nominal_kv = -50.0", "tolerances.nominal_kv"),
        ("nominal_kv = 600.0", "tolerances.nominal_kv"),
    ],
)
def test_a_bad_kv_setting_names_its_key(
    tmp_path: Path, registry: DriverRegistry, line: str, key: str
) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(_config(tmp_path, registry, line), registry)
    assert [i.key for i in excinfo.value.issues] == [key]
