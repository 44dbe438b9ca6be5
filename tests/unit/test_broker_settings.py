"""One broker-settings type (iortd.kernel.broker) for the daemon's MQTT sink and the
dashboard: built from the ``[mqtt]`` table and from the command line alike, with the same
URL rules, and a password that no repr, log line or error shows."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from iortd.daemon.config import ConfigError, MqttConfig, SiteConfig, load_config
from iortd.daemon.mqtt.link import client_id_for, settings_from_config
from iortd.dashboard import cli as dashboard_cli
from iortd.dashboard import mqtt as dashboard_mqtt
from iortd.drivers.registry import DriverRegistry
from iortd.kernel.broker import BrokerSettings, BrokerUrlError, parse_broker_url

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cret-Tok"  # noqa: S105 - made up; no error may repeat it
PASSWORD = "hunter2"  # noqa: S105 - made up; no repr may show it


def dashboard_args(*argv: str) -> argparse.Namespace:
    return dashboard_cli._parser().parse_args(argv)


def test_the_daemon_and_the_dashboard_build_one_type(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    mqtt = MqttConfig(url="mqtts://broker.example.org", username="iortd", password_file=pw)
    daemon = settings_from_config(mqtt, SiteConfig(id="site", room="or-1"), origin="site/or-1/x")
    dash = dashboard_cli.settings_from_args(
        dashboard_args(
            "--broker",
            "mqtts://broker.example.org",
            "--username",
            "iortd",
            "--password-file",
            str(pw),
        )
    )
    assert type(daemon) is type(dash) is BrokerSettings
    assert (
        (daemon.host, daemon.port, daemon.tls, daemon.url)
        == (
            dash.host,
            dash.port,
            dash.tls,
            dash.url,
        )
        == ("broker.example.org", 8883, True, "mqtts://broker.example.org:8883")
    )
    assert daemon.password == dash.password == PASSWORD
    assert daemon.client_id == client_id_for("site", "or-1", "site/or-1/x")
    assert dash.client_id is None  # the dashboard makes one per process
    assert PASSWORD not in repr(daemon)
    assert PASSWORD not in repr(dash)


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("mqtt://127.0.0.1", ("127.0.0.1", 1883, False)),
        ("mqtts://h.example:8884/", ("h.example", 8884, True)),
        ("mqtt://[::1]:1883", ("::1", 1883, False)),
        ("mqtt://h:0", None),
        ("mqtt://h:99999", None),
        ("tcp://h:1883", None),
        ("mqtt://h/topic", None),
        ("mqtt://", None),
    ],
)
def test_one_set_of_url_rules(url: str, parsed: tuple[str, int, bool] | None) -> None:
    if parsed is not None:
        assert parse_broker_url(url, credentials_hint="-") == parsed
        MqttConfig(url=url)
        return
    with pytest.raises(BrokerUrlError, match=r"expected mqtt://HOST\[:PORT\] or mqtts://"):
        parse_broker_url(url, credentials_hint="-")
    with pytest.raises(ValueError, match=r"expected mqtt://HOST\[:PORT\] or mqtts://"):
        MqttConfig(url=url)


@pytest.mark.parametrize(
    "url",
    [
        f"mqtt://127.0.0.1:1883/?token={SECRET}",
        f"mqtt://127.0.0.1:1883/#{SECRET}",
        f"mqtt://127.0.0.1:1883/x?{SECRET}",
    ],
)
def test_the_daemon_does_not_repeat_a_urls_query_or_fragment(tmp_path: Path, url: str) -> None:
    """As the dashboard already did: a config error goes to stderr and the journal."""
    with pytest.raises(ConfigError) as excinfo:
        load_config(
            ROOT / "config" / "demo.toml",
            DriverRegistry.from_entry_points(),
            {"mqtt": {"url": url}, "log": {"directory": str(tmp_path / "log")}},
        )
    [issue] = excinfo.value.issues
    assert issue.key == "mqtt.url"
    assert "expected mqtt://HOST[:PORT]" in issue.message
    assert SECRET not in issue.message


def test_credentials_hint_names_where_each_client_takes_them() -> None:
    with pytest.raises(ValueError, match=r"credentials.*mqtt\.username.*mqtt\.password_file"):
        MqttConfig(url="mqtt://u:p@h")
    with pytest.raises(BrokerUrlError, match=r"credentials.*--username.*--password-file"):
        dashboard_mqtt.parse_broker_url("mqtt://u:p@h")
