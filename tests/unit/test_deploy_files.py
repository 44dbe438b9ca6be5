"""The deploy files agree with each other and with the daemon (issue 17 items 1 and 4).

The unit, the sysusers entry, the site template and the daemon each state part of one
contract: the unit's stop timeout must outlast the daemon's bounded shutdown, the
credential the unit loads must be the one the template names, the user it runs as the one
sysusers creates, and the template must fail ``check-config`` (so that the package never
starts an unconfigured service) only on what a site must fill in.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from iortd.auditlog.note import generate_keypair, write_keypair
from iortd.daemon.app import EXIT_USAGE, SHUTDOWN_TIMEOUT_S
from iortd.daemon.config import ConfigError, load_config
from iortd.drivers.registry import DriverRegistry

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "iortd.service"
SYSUSERS = ROOT / "deploy" / "sysusers.d" / "iortd.conf"
TEMPLATE = ROOT / "deploy" / "iortd.toml"


def unit_values(key: str) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", UNIT.read_text(encoding="utf-8"), re.MULTILINE)


def unit_value(key: str) -> str:
    (value,) = unit_values(key)
    return value


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return float(match[1]) * (60 if match[2] == "min" else 1)


def test_stop_timeout_outlasts_the_daemons_bounded_shutdown() -> None:
    # app.py bounds the whole shutdown by 2 x SHUTDOWN_TIMEOUT_S, then closes the log.
    assert _seconds(unit_value("TimeoutStopSec")) >= 2 * (2 * SHUTDOWN_TIMEOUT_S)
    assert unit_value("KillMode") == "mixed"


def test_restart_policy_covers_the_watchdog_and_spares_config_errors() -> None:
    assert unit_value("Type") == "notify"
    assert unit_value("NotifyAccess") == "main"
    assert unit_value("Restart") == "on-failure"  # includes a watchdog timeout
    assert _seconds(unit_value("WatchdogSec")) > 0
    assert unit_value("RestartPreventExitStatus") == str(EXIT_USAGE)


def test_the_units_credential_is_the_one_the_template_names() -> None:
    name, _, source = unit_value("LoadCredential").partition(":")
    assert (name, source) == ("signing-key", "/etc/iortd/signing.key")
    assert f'signing_key_file = "credential:{name}"' in TEMPLATE.read_text(encoding="utf-8")
    state = unit_value("StateDirectory")
    assert 'directory = "/var/lib/' + state + '/log"' in TEMPLATE.read_text(encoding="utf-8")


def test_the_unit_runs_as_the_user_sysusers_creates() -> None:
    lines = [
        line.split()
        for line in SYSUSERS.read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    ]
    user = unit_value("User")
    assert ["u", user] == lines[0][:2]
    assert lines[0][-1] == "/usr/sbin/nologin"
    assert ["m", user, unit_value("SupplementaryGroups")] in lines
    assert unit_value("Group") == user  # sysusers' u line makes the user's own group


def test_devices_allowed_are_serial_ports_only() -> None:
    assert unit_value("DevicePolicy") == "closed"
    assert sorted(unit_values("DeviceAllow")) == [
        "char-ttyACM rw",
        "char-ttyS rw",
        "char-ttyUSB rw",
    ]


def test_template_fails_check_config_only_on_what_a_site_fills_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = DriverRegistry.from_entry_points()
    creds = tmp_path / "credentials"
    key, _ = write_keypair(generate_keypair("iortd-or-3"), tmp_path / "keys")
    creds.mkdir()
    key.rename(creds / "signing-key")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    text = TEMPLATE.read_text(encoding="utf-8")
    as_shipped = tmp_path / "shipped.toml"
    as_shipped.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as excinfo:
        load_config(as_shipped, registry)
    assert sorted(i.key for i in excinfo.value.issues) == ["devices", "site.id", "site.room"]

    # Filled in: a site and room, and the template's own serial example uncommented.
    filled = text.replace('id = "CHANGE-ME"', 'id = "st-example"')
    filled = filled.replace('room = "CHANGE-ME"', 'room = "or-3"')
    serial = filled.split("# A console on a serial line", 1)[1].split("# A console on Modbus", 1)[0]
    uncommented = "\n".join(line.removeprefix("# ") for line in serial.splitlines()[1:])
    # The log directory is the unit's StateDirectory; here, this test's own directory.
    filled = filled.replace("/var/lib/iortd/log", str(tmp_path / "log"))
    site = tmp_path / "site.toml"
    site.write_text(filled + "\n" + uncommented, encoding="utf-8")
    config = load_config(site, registry).config
    assert config.source.driver == "serial-xrs"
    assert config.log.signing_key_file == creds / "signing-key"
