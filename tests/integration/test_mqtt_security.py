"""The daemon against a secured broker: `iortd run` as a process, a Mosquitto of the test's
own with TLS, a password file and an ACL, and an independent ``mosquitto_sub`` observer
(the ``admin`` user, on the broker's extra plain listener: same passwords and ACL).

* right credentials (password from a 0600 file or from the environment, optionally a
  client certificate): the daemon connects and its stream arrives;
* a wrong password or an unknown CA: a clear error, retried with backoff, no crash, no
  password in the log, and the monitoring and its audit log go on;
* a room outside the ACL: every publish is refused by the broker, the daemon says so,
  and nothing of it reaches a subscriber;
* a password file readable by others is a configuration error.

No sleeps: waits are bounded and say what they waited for. Absence of a message is shown
by ordering: a marker published after the refusal arrives with nothing refused before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from daemonproc import Daemon, Site
from mqttobs import Message, Observer
from tlscerts import CLIENT_CN, TlsFiles, make_tls_files

from iortd.daemon.mqtt.broker import (
    MOSQUITTO_INSTALL_HINT,
    BrokerOptions,
    Mosquitto,
    TlsOptions,
    find_mosquitto,
)
from iortd.daemon.mqtt.link import BACKOFF_INITIAL_S, BACKOFF_MAX_S

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
SPEED = 300
POLL_S = 0.05
OWN = "iort/v1/test-site/or-7/"
FOREIGN = "iort/v1/test-site/or-8/"
ADMIN = "admin"
ADMIN_PW = "admin-Pw-4f1c"
DEVICE_PW = "or7-Secret-9b2e7d"
WRONG_PW = "or7-Wrong-51ac03"
PW_ENV = "IORTD_TEST_MQTT_PW"
ACL = f"""\
# anonymous clients (none are allowed) get nothing
user {CLIENT_CN}
topic readwrite {OWN}#

user {ADMIN}
topic readwrite #
"""


@pytest.fixture(autouse=True, scope="module")
def _mosquitto_installed() -> None:
    missing = [
        name
        for name in ("mosquitto_passwd", "mosquitto_sub", "mosquitto_pub")
        if shutil.which(name) is None
    ]
    if find_mosquitto() is None or missing:
        pytest.fail(f"mosquitto or {missing} not installed: {MOSQUITTO_INSTALL_HINT}")


@dataclass(frozen=True)
class Secured:
    broker: Mosquitto
    tls: TlsFiles
    dir: Path

    @property
    def plain_port(self) -> int:
        port = self.broker.plain_port
        assert port is not None
        return port


def make_password_file(path: Path) -> Path:
    exe = shutil.which("mosquitto_passwd")
    assert exe is not None
    subprocess.run([exe, "-b", "-c", str(path), CLIENT_CN, DEVICE_PW], check=True, timeout=10)
    subprocess.run([exe, "-b", str(path), ADMIN, ADMIN_PW], check=True, timeout=10)
    return path


@pytest.fixture
def secured(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Secured]:
    """TLS listener (client certificate required if parametrized with True) with
    passwords and an ACL, plus a plain listener for the observer."""
    require_certificate = bool(getattr(request, "param", False))
    tls = make_tls_files(tmp_path / "tls")
    acl = tmp_path / "acl"
    acl.write_text(ACL)
    options = BrokerOptions(
        tls=TlsOptions(
            tls.ca, tls.server_cert, tls.server_key, require_certificate=require_certificate
        ),
        password_file=make_password_file(tmp_path / "passwd"),
        acl_file=acl,
        extra_listener_plain=True,
    )
    assert options.anonymous is False
    with Mosquitto(options, tmp_path / "broker") as broker:
        yield Secured(broker, tls, tmp_path)


@contextlib.asynccontextmanager
async def observing(port: int, topic: str) -> AsyncIterator[Observer]:
    obs = Observer(port, topic=topic, username=ADMIN, password=ADMIN_PW)
    try:
        yield await obs.start()
    finally:
        await obs.stop()


@pytest.fixture
async def observer(secured: Secured) -> AsyncIterator[Observer]:
    """``admin`` subscribed to everything (``#``), from before the daemon starts."""
    async with observing(secured.plain_port, "#") as obs:
        yield obs


NON_JSON = "(not a JSON line)"


class TolerantDaemon(Daemon):
    """Keeps reading when a stderr line is not JSON: records it as
    ``{"event": NON_JSON, "raw": ...}``, so that a test can say so rather than lose the
    reader."""

    async def _read_all(self) -> None:
        assert self.proc.stderr is not None
        while raw := await self.proc.stderr.readline():
            try:
                rec = json.loads(raw)
            except ValueError:
                rec = {"event": NON_JSON, "raw": raw.decode("utf-8", "replace").rstrip("\n")}
            self.lines.append(rec)
            self._changed.set()
        self._changed.set()


def non_json(d: Daemon) -> list[str]:
    return [r["raw"] for r in d.events(NON_JSON)]


@contextlib.asynccontextmanager
async def running(
    site: Site, env: dict[str, str] | None = None, *, json_only: bool = True
) -> AsyncIterator[Daemon]:
    """`iortd run`, killed if still running at the end. ``json_only``: every line it
    wrote to stderr must be a JSON log record (the operational log's format)."""
    d = await TolerantDaemon.follow(site, env=env)
    try:
        yield d
    finally:
        await d.ensure_dead()
        async with asyncio.timeout(5):
            await d.drain()
    if json_only:
        assert non_json(d) == [], "iortd wrote non-JSON lines to stderr"


def secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.chmod(path, mode)  # the umask does not apply to chmod
    return path


def mqtt_section(secured: Secured, **keys: Path | str) -> str:
    """The [mqtt] body: the TLS listener as the daemon's user, trusting the test CA
    unless ``ca_file`` says otherwise."""
    values: dict[str, Path | str] = {
        "url": secured.broker.url,
        "username": CLIENT_CN,
        "ca_file": secured.tls.ca,
        **keys,
    }
    lines = [f"{k} = {json.dumps(str(v))}" for k, v in values.items()]
    return "\n".join(["keepalive_s = 2", *lines])


def event(name: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda r: r.get("event") == name and all(r.get(k) == v for k, v in fields.items())


def status(online: bool, room: str = "or-7") -> Callable[[Message], bool]:
    topic = f"iort/v1/test-site/{room}/status"
    return lambda m: m.topic == topic and m.payload.get("online") is online


def mqtt_story(d: Daemon) -> list[str]:
    """The connect loop's log records, in order."""
    names = ("mqtt_connecting", "mqtt_connect_failed", "mqtt_reconnect_wait", "mqtt_connected")
    return [r["event"] for r in d.lines if r.get("event") in names]


def assert_no_secret(d: Daemon, site: Site, *secrets: str) -> None:
    """Neither the operational log nor anything in the log directory (audit log,
    outbox) holds a password."""
    text = "\n".join(json.dumps(r) for r in d.lines)
    for s in secrets:
        assert s not in text, "a password appears in the daemon's log"
    for f in site.log_dir.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for s in secrets:
                assert s.encode() not in data, f"a password appears in {f}"


def assert_config_loaded_has_no_credentials(site: Site, *secrets: str) -> None:
    """The ``config_loaded`` entry (the whole config, kept for ever in the signed log) names
    where the password comes from, never the password, and the broker URL has no userinfo."""
    (entry,) = [
        e
        for f in sorted(site.log_dir.glob("*.jsonl"))
        for line in f.read_text(encoding="utf-8").splitlines()
        if (e := json.loads(line))["type"] == "config_loaded"
    ]
    mqtt = entry["data"]["config"]["mqtt"]
    assert "password" not in mqtt
    assert "@" not in mqtt["url"], mqtt["url"]
    assert mqtt["password_file"] is not None or mqtt["password_env"] is not None
    text = json.dumps(entry)
    for s in secrets:
        assert s not in text, "a password appears in config_loaded"


def verify(site: Site) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "iort-audit"), "verify", str(site.log_dir), "--pubkey", str(site.pubkey)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def publish_marker(port: int) -> str:
    """Publish a marker as ``admin`` (mosquitto_pub, QoS 1); returns its topic."""
    topic = f"marker/{uuid.uuid4().hex[:12]}"
    proc = await asyncio.create_subprocess_exec(
        *("mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1"),
        *("-u", ADMIN, "-P", ADMIN_PW, "-t", topic, "-m", "{}"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(10):
        _, err = await proc.communicate()
    assert proc.returncode == 0, f"mosquitto_pub of the marker failed: {err.decode()}"
    return topic


async def assert_refused_and_retried(d: Daemon, reason_has: str, *, failures: int) -> None:
    """``failures`` failed connects, each with a clear reason, and between them waits
    within the growing backoff bounds; the daemon never connected."""
    await d.seen(
        lambda _: len(d.events("mqtt_connect_failed")) >= failures,
        f"{failures} mqtt_connect_failed",
        within_s=15,
    )
    failed = d.events("mqtt_connect_failed")[:failures]
    for rec in failed:
        assert reason_has in rec["reason"], rec
        assert rec["level"] == "error", rec
    story = mqtt_story(d)
    expected = ["mqtt_connecting", "mqtt_connect_failed", "mqtt_reconnect_wait"] * failures
    assert story[: len(expected) - 1] == expected[:-1], story
    assert "mqtt_connected" not in story
    delays = [r["delay_s"] for r in d.events("mqtt_reconnect_wait")[: failures - 1]]
    for i, delay in enumerate(delays):
        high = min(BACKOFF_INITIAL_S * 2**i, BACKOFF_MAX_S)
        assert high / 2 - 0.001 <= delay <= high + 0.001, f"wait {i}: {delay} s, {delays}"
    assert delays[-1] >= delays[0], f"the backoff did not grow: {delays}"


# -- right credentials ---------------------------------------------------------------------


async def test_right_credentials_over_tls(
    make_site: Callable[..., Site], secured: Secured, observer: Observer
) -> None:
    pw = secret_file(secured.dir / "mqtt.pw", DEVICE_PW)
    site = make_site(speed=SPEED, poll=POLL_S, mqtt=mqtt_section(secured, password_file=pw))
    async with running(site) as d:
        connected = await d.seen(event("mqtt_connected"), "mqtt_connected")
        assert connected["broker"] == secured.broker.url
        assert connected["broker"].startswith("mqtts://")
        online = await observer.wait_for(status(True), "status online from or-7")
        telemetry = await observer.wait_for(
            lambda m: m.topic == OWN + "telemetry", "telemetry from or-7"
        )
        assert telemetry.payload["session"] == online.payload["session"]
        # Retained: a subscriber arriving now is given it.
        async with observing(secured.plain_port, online.topic) as late:
            got = await late.wait_for(lambda m: m.topic == online.topic, "the retained status")
            assert got.retained
            assert got.payload["online"] is True
        assert await d.stop() == 0
    offline = await observer.wait_for(status(False), "status offline after SIGTERM")
    assert offline.payload["seq"] > online.payload["seq"]
    assert d.events("mqtt_connect_failed") == []
    assert d.events("mqtt_publish_refused") == []
    assert not [m for m in observer.messages if m.topic.startswith("iort/") and OWN not in m.topic]
    assert_no_secret(d, site, DEVICE_PW)
    assert_config_loaded_has_no_credentials(site, DEVICE_PW)


async def test_password_from_environment(
    make_site: Callable[..., Site], secured: Secured, observer: Observer
) -> None:
    site = make_site(speed=SPEED, poll=POLL_S, mqtt=mqtt_section(secured, password_env=PW_ENV))
    assert DEVICE_PW not in site.config.read_text()
    async with running(site, env={**os.environ, PW_ENV: DEVICE_PW}) as d:
        await d.seen(event("mqtt_connected"), "mqtt_connected")
        await observer.wait_for(status(True), "status online from or-7")
        assert await d.stop() == 0
    assert d.events("mqtt_connect_failed") == []
    assert_no_secret(d, site, DEVICE_PW)
    assert_config_loaded_has_no_credentials(site, DEVICE_PW)


@pytest.mark.parametrize("secured", [True], indirect=True, ids=["require-certificate"])
async def test_client_certificate(
    make_site: Callable[..., Site], secured: Secured, observer: Observer
) -> None:
    pw = secret_file(secured.dir / "mqtt.pw", DEVICE_PW)
    mqtt = mqtt_section(
        secured,
        password_file=pw,
        cert_file=secured.tls.client_cert,
        key_file=secured.tls.client_key,
    )
    site = make_site(speed=SPEED, poll=POLL_S, mqtt=mqtt)
    async with running(site) as d:
        await d.seen(event("mqtt_connected"), "mqtt_connected with a client certificate")
        await observer.wait_for(status(True), "status online from or-7")
        await observer.wait_for(lambda m: m.topic == OWN + "telemetry", "telemetry from or-7")
        assert await d.stop() == 0
    await observer.wait_for(status(False), "status offline after SIGTERM")
    assert d.events("mqtt_connect_failed") == []
    # The broker did ask for a certificate: its listener says so.
    assert "require_certificate true" in secured.broker.conf_path.read_text()


# -- refused ------------------------------------------------------------------------------


@pytest.mark.parametrize("secured", [True], indirect=True, ids=["require-certificate"])
async def test_missing_client_certificate_keeps_the_log_json(
    make_site: Callable[..., Site], secured: Secured
) -> None:
    pw = secret_file(secured.dir / "mqtt.pw", DEVICE_PW)
    site = make_site(speed=SPEED, poll=POLL_S, mqtt=mqtt_section(secured, password_file=pw))
    async with running(site) as d:
        await d.seen(
            lambda r: r.get("event") in ("mqtt_connect_failed", NON_JSON),
            "mqtt_connect_failed (or a non-JSON line)",
            within_s=15,
        )
        assert non_json(d) == [], "iortd wrote non-JSON lines to stderr"


@pytest.mark.parametrize("secured", [True], indirect=True, ids=["require-certificate"])
async def test_missing_client_certificate_is_a_prompt_clear_error(
    make_site: Callable[..., Site], secured: Secured
) -> None:
    pw = secret_file(secured.dir / "mqtt.pw", DEVICE_PW)
    site = make_site(speed=SPEED, poll=POLL_S, mqtt=mqtt_section(secured, password_file=pw))
    async with running(site, json_only=False) as d:
        # The broker refuses within milliseconds; a clear error says why, well before
        # the connect timeout.
        first = await d.seen(event("mqtt_connect_failed"), "mqtt_connect_failed", within_s=5)
        assert "certificate" in first["reason"].lower(), first
        await assert_refused_and_retried(d, "certificate", failures=2)
        assert d.proc.returncode is None, "iortd exited"
        assert await d.stop() == 0


async def test_wrong_password_is_retried_with_backoff_not_a_crash(
    make_site: Callable[..., Site], secured: Secured
) -> None:
    pw = secret_file(secured.dir / "mqtt.pw", WRONG_PW)
    site = make_site(speed=SPEED, poll=POLL_S, mqtt=mqtt_section(secured, password_file=pw))
    async with running(site) as d:
        await assert_refused_and_retried(d, "Not authorized", failures=3)
        # Monitoring is not held up by the broker: the whole delivery is recorded.
        end = await d.seen(event("delivery_terminated"), "the delivery's end", within_s=15)
        assert end["status"] == "NORMAL"
        await d.seen(
            lambda _: len(d.events("mqtt_connect_failed")) >= 4, "a fourth attempt", within_s=15
        )
        assert d.proc.returncode is None, "iortd exited"
        assert await d.stop() == 0
    assert d.events("mqtt_connected") == []
    assert [r for r in d.lines if r.get("level") == "critical"] == []
    assert_no_secret(d, site, WRONG_PW, DEVICE_PW)
    v = verify(site)
    assert v.returncode == 0, v.stdout + v.stderr


async def test_unknown_ca_is_retried_not_a_crash(
    make_site: Callable[..., Site], secured: Secured
) -> None:
    pw = secret_file(secured.dir / "mqtt.pw", DEVICE_PW)
    mqtt = mqtt_section(secured, password_file=pw, ca_file=secured.tls.other_ca)
    site = make_site(speed=SPEED, poll=POLL_S, mqtt=mqtt)
    async with running(site) as d:
        await assert_refused_and_retried(d, "CERTIFICATE_VERIFY_FAILED", failures=3)
        assert d.proc.returncode is None, "iortd exited"
        assert await d.stop() == 0
    assert d.events("mqtt_connected") == []
    assert_no_secret(d, site, DEVICE_PW)


# -- the ACL ------------------------------------------------------------------------------


async def test_cannot_publish_outside_its_room(
    make_site: Callable[..., Site], secured: Secured, observer: Observer
) -> None:
    pw = secret_file(secured.dir / "mqtt.pw", DEVICE_PW)
    site = make_site(speed=SPEED, poll=POLL_S, mqtt=mqtt_section(secured, password_file=pw))
    text = site.config.read_text()
    assert text.count('room = "or-7"') == 1
    site.config.write_text(text.replace('room = "or-7"', 'room = "or-8"'))
    async with running(site) as d:
        await d.seen(event("mqtt_connected"), "mqtt_connected (the ACL allows the connection)")
        refused = await d.seen(event("mqtt_publish_refused"), "mqtt_publish_refused")
        assert refused["topic"].startswith(FOREIGN), refused
        assert "Not authorized" in refused["reason"], refused
        assert refused["level"] == "error"
        # The refused publish came before the marker; had the broker delivered it, the
        # observer would have it before the marker.
        marker = await publish_marker(secured.plain_port)
        await observer.wait_for(lambda m: m.topic == marker, "the marker")
        assert not [m.topic for m in observer.messages if m.topic.startswith(FOREIGN)]
        # The daemon goes on: the delivery is monitored to its end, the stream is
        # refused topic after topic.
        await d.seen(event("delivery_terminated"), "the delivery's end", within_s=15)
        await d.seen(
            event("mqtt_publish_refused", topic=FOREIGN + "telemetry"),
            "telemetry refused",
        )
        assert d.proc.returncode is None, "iortd exited"
        assert await d.stop() == 0
    # Not even the offline status at shutdown got through.
    marker = await publish_marker(secured.plain_port)
    await observer.wait_for(lambda m: m.topic == marker, "the marker after shutdown")
    assert not [m.topic for m in observer.messages if m.topic.startswith("iort/")]
    assert d.events("mqtt_connect_failed") == []


# -- configuration ------------------------------------------------------------------------


def test_password_file_readable_by_others_is_a_config_error(
    make_site: Callable[..., Site], tmp_path: Path
) -> None:
    pw = secret_file(tmp_path / "mqtt.pw", DEVICE_PW, mode=0o644)
    site = make_site(mqtt=f'url = "mqtts://127.0.0.1:8883"\npassword_file = "{pw}"')
    r = subprocess.run(
        [str(BIN / "iortd"), "check-config", str(site.config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "mqtt.password_file" in r.stderr
    assert "0644" in r.stderr
    assert DEVICE_PW not in r.stdout + r.stderr
