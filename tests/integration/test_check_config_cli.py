"""`iortd check-config FILE` as an operator runs it: the installed console script, as a
subprocess, against every broken fixture and the shipped configs.

Contract (docs/architecture.md): exit 0 success, 2 usage or configuration error; an error names
the file, the key or line, and what to do. A broken fixture has exactly one defect, so it
must give exactly one line on stderr and nothing on stdout.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "config"
BROKEN = ROOT / "tests" / "fixtures" / "broken_configs"
TIMEOUT_S = 60

_SCRIPT = Path(sys.executable).with_name("iortd")
IORTD = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "iortd.daemon.cli"]

ERROR_PREFIX = "iortd: config error: "


# fixture -> (key paths the line may name, further words the line must contain).
# An empty key path means the file as a whole; the line must then locate the problem itself.
EXPECTED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "bad_type.toml": (("devices[0].poll_interval_s",), ("valid number",)),
    "unknown_top_level_key.toml": (("log_level",), ("unknown key",)),
    "unknown_device_key.toml": (("devices[0].poll_intervall_s",), ("unknown key",)),
    "unknown_driver_option.toml": (("devices[0].options.start_dealy_s",), ("unknown key",)),
    "negative_dose.toml": (("plan.prescribed_dose_gy",), ("greater than 0",)),
    "zero_poll_interval.toml": (("devices[0].poll_interval_s",), ("0.01",)),
    "speed_out_of_range.toml": (("simulation.speed",), ("0.01",)),
    "missing_site.toml": (("site",), ("missing",)),
    "missing_driver.toml": (
        ("devices[0].driver",),
        ("'modbus-nope'", "installed drivers: modbus-apl, modbus-xrs, serial-xrs, sim"),
    ),
    "unknown_applicator.toml": (("devices[0].options.applicator",), ("'SPH99'", "SPH30")),
    "bad_sim_transport.toml": (("devices[0].transport",), ("in-process",)),
    "bad_slug_room.toml": (("site.room",), ("lower-case slug",)),
    "patient_name_as_treatment_id.toml": (("plan.treatment_id",), ("pseudonymous code",)),
    "password_in_toml.toml": (("mqtt.password",), ("password_file", "password_env")),
    "signing_key_in_toml.toml": (("log.signing_key",), ("signing_key_file",)),
    "missing_ca_file.toml": (("mqtt.ca_file",), ("file not found", "no-such-ca.pem")),
    "bad_mqtt_scheme.toml": (("mqtt.url",), ("mqtts://HOST[:PORT]",)),
    "toml_syntax_error.toml": (("",), ("TOML syntax error", "line 5")),
    "not_utf8.toml": (("",), ("not UTF-8",)),
    "duplicate_device_name.toml": (("devices[1].name", "devices"), ("unique",)),
    "credentials_in_mqtt_url.toml": (("mqtt.url",), ("must not carry credentials",)),
    "credentials_in_option_url.toml": (
        ("devices[0].options.note",),
        ("must not carry credentials",),
    ),
    "log_directory_name_too_long.toml": (("log.directory",), ("path too long",)),
    "nul_in_log_directory.toml": (("log.directory",), ("NUL",)),
    "nested_5000_deep.toml": (("",), ("nested too deeply",)),
    "utf8_bom.toml": (("",), ("byte-order mark", "without a BOM")),
    "profile_is_dev_zero.toml": (("devices[0].options.profile",), ("character device",)),
    "relative_profile_missing.toml": (
        ("devices[0].options.profile",),
        (str(BROKEN / "no-such-dir" / "site-profile.toml"),),
    ),
}

SECRETS = ("hunter2-not-a-real-secret", "MC4CAQAwBQYDK2VwBCIEINOTAREALKEY")


def iortd(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*IORTD, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=TIMEOUT_S,
        check=False,
    )


def _params() -> list[Any]:
    return [pytest.param(name, id=name.removesuffix(".toml")) for name in sorted(EXPECTED)]


def test_every_fixture_is_checked() -> None:
    assert sorted(p.name for p in BROKEN.glob("*.toml")) == sorted(EXPECTED)


@pytest.mark.parametrize("fixture", _params())
def test_broken_config_exits_2_with_one_line_naming_file_and_key(
    fixture: str, tmp_path: Path
) -> None:
    path = BROKEN / fixture
    keys, words = EXPECTED[fixture]
    result = iortd("check-config", str(path), cwd=tmp_path)
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(ERROR_PREFIX), line
    located = [
        f"{ERROR_PREFIX}{path}: {key}: " if key else f"{ERROR_PREFIX}{path}: " for key in keys
    ]
    assert any(line.startswith(prefix) for prefix in located), line
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"
    for secret in SECRETS:
        assert secret not in line


def test_a_relative_path_is_named_as_given() -> None:
    result = iortd("check-config", "bad_type.toml", cwd=BROKEN)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{ERROR_PREFIX}bad_type.toml: devices[0].poll_interval_s: "
        "Input should be a valid number; got '0.1'"
    ]


def test_an_unset_password_variable_is_named(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "IORTD_MQTT_PASSWORD"}
    result = iortd("check-config", str(CONFIG_DIR / "site.example.toml"), cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{ERROR_PREFIX}{CONFIG_DIR / 'site.example.toml'}: mqtt.password_env: "
        "environment variable IORTD_MQTT_PASSWORD is not set"
    ]


@pytest.mark.parametrize("name", ["demo.toml", "site.example.toml"])
def test_shipped_config_exits_0_with_an_ok_line(name: str, tmp_path: Path) -> None:
    path = CONFIG_DIR / name
    # site.example.toml reads the MQTT password from this variable.
    env = {**os.environ, "IORTD_MQTT_PASSWORD": "example"}
    result = iortd("check-config", str(path), cwd=tmp_path, env=env)
    assert result.returncode == 0, result
    assert result.stderr == ""
    line, *notes = result.stdout.splitlines()
    assert line.startswith(f"{path}: OK"), line
    assert hashlib.sha256(path.read_bytes()).hexdigest()[:16] in line
    assert "source-1=sim" in line
    # Neither shipped config names a signing key (the demo makes its own): said, not failed.
    assert notes == [
        "note: log.signing_key_file is not set: `iortd run` will refuse to start "
        "(`iortd demo` makes its own key); create one with: iort-audit keygen --name NAME"
    ]


def test_a_missing_file_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    result = iortd("check-config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"{ERROR_PREFIX}{path}: file not found"]


def test_no_file_argument_is_a_usage_error(tmp_path: Path) -> None:
    result = iortd("check-config", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "usage: iortd check-config" in result.stderr
    assert "FILE" in result.stderr


# Hostile inputs a fixture file cannot hold, made here: (name, how to make it in a
# directory, the path given to iortd, words the one line must contain).
def _fifo_config(d: Path) -> Path:
    os.mkfifo(d / "site.toml")
    return d / "site.toml"


def _fifo_profile(d: Path) -> Path:
    os.mkfifo(d / "profile.toml")
    text = (CONFIG_DIR / "demo.toml").read_text(encoding="utf-8")
    (d / "site.toml").write_text(
        text.replace('profile = "intrabeam"', 'profile = "profile.toml"'), encoding="utf-8"
    )
    return d / "site.toml"


def _socket_config(d: Path) -> Path:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "site.toml"))
    sock.close()  # the socket file stays
    return d / "site.toml"


MADE = {
    "fifo_config": (_fifo_config, "", "FIFO"),
    "dev_zero_config": (lambda _d: Path("/dev/zero"), "", "character device"),
    "config_name_too_long": (lambda d: d / ("a" * 300 + ".toml"), "", "File name too long"),
    "socket_config": (_socket_config, "", "is a socket"),
    "fifo_profile": (_fifo_profile, "devices[0].options.profile", "FIFO"),
}


HOSTILE_FIXTURES = (
    "log_directory_name_too_long",
    "nul_in_log_directory",
    "nested_5000_deep",
    "profile_is_dev_zero",
    "relative_profile_missing",
)


@pytest.mark.parametrize(
    ("command", "name"),
    # The fixtures already go through check-config in the test above.
    [("check-config", n) for n in MADE] + [("run", n) for n in (*MADE, *HOSTILE_FIXTURES)],
)
def test_hostile_input_is_one_line_and_exit_2_without_a_hang(
    name: str, command: str, tmp_path: Path
) -> None:
    """check-config and run alike: one line, exit 2, within the subprocess timeout (a FIFO
    opened for reading without O_NONBLOCK would wait for a writer for ever)."""
    if name in MADE:
        make, key, word = MADE[name]
        path = make(tmp_path)
    else:
        path = BROKEN / f"{name}.toml"
        (key, *_), (word, *_) = EXPECTED[f"{name}.toml"]
    args = (
        ["check-config", str(path)] if command == "check-config" else ["run", "--config", str(path)]
    )
    result = iortd(*args, cwd=tmp_path)
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    prefix = f"{ERROR_PREFIX}{path}: {key}: " if key else f"{ERROR_PREFIX}{path}: "
    assert lines[0].startswith(prefix), lines[0]
    assert word in lines[0], lines[0]
