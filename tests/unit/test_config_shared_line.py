"""Two devices naming one serial port are one shared RS-485 line: allowed for Modbus RTU
drivers at distinct unit ids with the same serial settings, anything else a config error
that names the key (docs/engineers.md, "Two devices on one RS-485 line")."""

from __future__ import annotations

from pathlib import Path

import pytest

from iortd.daemon.config import ConfigError, load_config
from iortd.drivers.registry import DriverRegistry

SITE = """
[site]
id = "test-site"
room = "or-7"
[log]
directory = "log"
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
port = "/dev/ttyIORT0"
baudrate = 38400
[[devices]]
name = "stand-1"
role = "applicator"
driver = "{driver}"
poll_interval_s = 0.1
timeout_s = 0.5
[devices.options]
{options}
[devices.transport]
type = "serial"
port = "{port}"
baudrate = {baud}
{extra}
"""


@pytest.fixture(scope="module")
def registry() -> DriverRegistry:
    return DriverRegistry.from_entry_points()


def _load(tmp_path: Path, registry: DriverRegistry, **kw: object) -> None:
    values: dict[str, object] = {
        "driver": "modbus-apl",
        "options": "unit_id = 2",
        "port": "/dev/ttyIORT0",
        "baud": 38400,
        "extra": "",
    }
    values.update(kw)
    path = tmp_path / "site.toml"
    path.write_text(SITE.format(**values), "utf-8")
    load_config(path, registry=registry)


def test_two_rtu_units_on_one_line_with_the_same_settings_load(
    tmp_path: Path, registry: DriverRegistry
) -> None:
    _load(tmp_path, registry)
    _load(tmp_path, registry, port="/dev/./ttyIORT0")  # the same port, spelt otherwise


@pytest.mark.parametrize(
    ("kw", "key", "says"),
    [
        ({"options": "unit_id = 1"}, "devices[1].options.unit_id", "unit id 1 is already"),
        ({"baud": 19200}, "devices[1].transport.baudrate", "38400"),
        ({"extra": 'parity = "E"'}, "devices[1].transport.parity", "'N'"),
        ({"extra": "stopbits = 2"}, "devices[1].transport.stopbits", "1"),
        (
            {"driver": "serial-xrs", "options": ""},
            "devices[1].driver",
            "only Modbus RTU devices can share",
        ),
    ],
    ids=["same-unit", "baudrate", "parity", "stopbits", "not-modbus"],
)
def test_anything_else_on_one_port_is_a_config_error_naming_the_key(
    tmp_path: Path, registry: DriverRegistry, kw: dict[str, object], key: str, says: str
) -> None:
    with pytest.raises(ConfigError) as excinfo:
        _load(tmp_path, registry, **kw)
    issues = [i for i in excinfo.value.issues if i.key == key]
    assert issues, [str(i) for i in excinfo.value.issues]
    assert says in issues[0].message, issues[0].message
    assert "devices[0]" in issues[0].message  # names the device it shares the port with
