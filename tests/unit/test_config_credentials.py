"""``credential:NAME``: secret files handed over by systemd's LoadCredential= (issue 17).

The config names the credential; load_config resolves it against $CREDENTIALS_DIRECTORY of
the process (as systemd sets it under the unit), and every way it cannot be used is one
issue naming the key and what to do.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from iortd.auditlog.note import generate_keypair, write_keypair
from iortd.daemon.check import check_config
from iortd.daemon.config import ConfigError, load_config
from iortd.drivers.registry import DriverRegistry

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "config" / "demo.toml"


@pytest.fixture
def registry() -> DriverRegistry:
    return DriverRegistry.from_entry_points()


def _site(tmp_path: Path, log_keys: str, mqtt_keys: str = "") -> Path:
    demo = DEMO.read_text(encoding="utf-8")
    text = demo.split("# The applicator reader and positioning stand", 1)[0]
    text = text.replace("[log]\n", f"[log]\n{log_keys}\n", 1)
    text = text.replace("[mqtt]\n", f"[mqtt]\n{mqtt_keys}\n", 1)
    path = tmp_path / "etc" / "site.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _credentials_dir(tmp_path: Path, name: str = "signing-key") -> Path:
    """What systemd makes of LoadCredential=NAME:FILE: a directory with the file as NAME."""
    directory = tmp_path / "run-credentials"
    key, _ = write_keypair(generate_keypair("or-1"), tmp_path / "keygen")
    directory.mkdir()
    key.rename(directory / name)
    return directory


def test_signing_key_from_a_credential_resolves_against_credentials_directory(
    tmp_path: Path, registry: DriverRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = _credentials_dir(tmp_path)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = _site(tmp_path, 'signing_key_file = "credential:signing-key"')
    assert load_config(cfg, registry).config.log.signing_key_file == creds / "signing-key"


def test_credential_without_credentials_directory_names_the_key_and_the_unit_line(
    tmp_path: Path, registry: DriverRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    cfg = _site(tmp_path, 'signing_key_file = "credential:signing-key"')
    with pytest.raises(ConfigError) as excinfo:
        load_config(cfg, registry)
    (issue,) = excinfo.value.issues
    assert issue.key == "log.signing_key_file"
    assert "$CREDENTIALS_DIRECTORY is not set" in issue.message
    assert "LoadCredential=signing-key:FILE" in issue.message


def test_a_missing_credential_file_is_file_not_found(
    tmp_path: Path, registry: DriverRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = _credentials_dir(tmp_path, name="another")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = _site(tmp_path, 'signing_key_file = "credential:signing-key"')
    with pytest.raises(ConfigError) as excinfo:
        load_config(cfg, registry)
    (issue,) = excinfo.value.issues
    assert issue.key == "log.signing_key_file"
    assert f"file not found: {creds / 'signing-key'}" in issue.message


@pytest.mark.parametrize("value", ["credential:", "credential:../etc/shadow", "credential:a b"])
def test_a_bad_credential_name_is_refused_by_the_model(
    tmp_path: Path, registry: DriverRegistry, value: str
) -> None:
    cfg = _site(tmp_path, f'signing_key_file = "{value}"')
    with pytest.raises(ConfigError) as excinfo:
        load_config(cfg, registry)
    (issue,) = excinfo.value.issues
    assert issue.key == "log.signing_key_file"
    assert "systemd credential name" in issue.message


def test_mqtt_password_from_a_credential_is_checked_like_a_file(
    tmp_path: Path, registry: DriverRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("secret\n", encoding="utf-8")
    (creds / "mqtt-password").chmod(0o644)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = _site(tmp_path, "", 'username = "iortd"\npassword_file = "credential:mqtt-password"')
    with pytest.raises(ConfigError) as excinfo:
        load_config(cfg, registry)
    (issue,) = excinfo.value.issues
    assert issue.key == "mqtt.password_file"
    assert "chmod 600" in issue.message
    (creds / "mqtt-password").chmod(0o400)  # what systemd gives the service
    config = load_config(cfg, registry).config
    assert config.mqtt.password_file == creds / "mqtt-password"


def test_relative_credentials_directory_is_refused(
    tmp_path: Path, registry: DriverRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "relative/dir")
    cfg = _site(tmp_path, 'signing_key_file = "credential:signing-key"')
    with pytest.raises(ConfigError) as excinfo:
        load_config(cfg, registry)
    (issue,) = excinfo.value.issues
    assert issue.key == "log.signing_key_file"
    assert "absolute path" in issue.message


def test_check_config_and_run_accept_the_credential(tmp_path: Path) -> None:
    """The real command line: check-config passes with the credential given as systemd
    gives it, and fails with exit 2 and the key's name without it."""
    creds = _credentials_dir(tmp_path)
    cfg = _site(tmp_path, 'signing_key_file = "credential:signing-key"')
    cmd = [sys.executable, "-m", "iortd.daemon.cli", "check-config", str(cfg)]
    env = {"PATH": "/usr/bin:/bin", "CREDENTIALS_DIRECTORY": str(creds)}
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    del env["CREDENTIALS_DIRECTORY"]
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2
    assert "log.signing_key_file" in bad.stderr
    assert "iortd check-config --credential signing-key:FILE CONFIG" in bad.stderr


def test_check_config_given_the_units_credential_lines(tmp_path: Path) -> None:
    """``--credential NAME:FILE``: the check of a config the unit will run, by hand or in
    the package's postinst, with the same NAME:FILE as the unit's LoadCredential=."""
    creds = _credentials_dir(tmp_path)
    key = creds / "signing-key"
    cfg = _site(tmp_path, 'signing_key_file = "credential:signing-key"')
    env = {"PATH": "/usr/bin:/bin"}

    def check(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "iortd.daemon.cli", "check-config", *args, str(cfg)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)

    ok = check("--credential", f"signing-key:{key}")
    assert (ok.returncode, ok.stderr) == (0, "")
    key.chmod(0o644)
    loose = check("--credential", f"signing-key:{key}")
    assert loose.returncode == 2
    assert "log.signing_key_file" in loose.stderr
    assert "chmod 600" in loose.stderr
    for spec, says in (
        (f"signing-key:{tmp_path / 'nope.key'}", "file not found"),
        ("signing-key", "expected NAME:FILE"),
        (f"../x:{key}", "systemd credential name"),
    ):
        usage = check("--credential", spec)
        assert usage.returncode == 2, usage
        assert usage.stderr.startswith(f"iortd: --credential {spec}: "), usage.stderr
        assert says in usage.stderr


def test_check_config_credential_restores_a_credentials_directory_it_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In process, as a caller with its own environment (not through cli.main, which
    configures logging): ``--credential`` sets its private $CREDENTIALS_DIRECTORY for
    the check and puts back the one it found (d422d73)."""
    creds = _credentials_dir(tmp_path)
    cfg = _site(tmp_path, 'signing_key_file = "credential:signing-key"')
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/iortd.service")
    spec = f"signing-key:{creds / 'signing-key'}"
    code = check_config(argparse.Namespace(file=cfg, credential=[spec]))
    assert code == 0, capsys.readouterr()
    assert os.environ.get("CREDENTIALS_DIRECTORY") == "/run/credentials/iortd.service"
