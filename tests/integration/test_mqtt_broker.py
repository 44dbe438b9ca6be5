"""The private Mosquitto (daemon/mqtt/broker.py) against a real broker and a real client.

Every test starts its own Mosquitto on free ports in its tmp_path and stops it by PID. No
sleeps: waits are bounded and say what they waited for. Absence of a message is shown by
ordering, not by waiting: a later message from the same publisher arriving first means the
earlier one was not delivered (Mosquitto forwards one client's messages in order).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import socket
import ssl
import subprocess
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode
from tlscerts import CLIENT_CN, TlsFiles, make_tls_files

import iortd.daemon.mqtt.broker as broker_mod
from iortd.daemon.mqtt.broker import (
    MOSQUITTO_INSTALL_HINT,
    BrokerError,
    BrokerOptions,
    Mosquitto,
    TlsOptions,
    find_mosquitto,
)

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
OWN = "iort/v1/test-site/or-7/status"
OTHER = "iort/v1/test-site/or-8/status"
ADMIN = "admin"
ADMIN_PW = "admin-pw"
DEVICE_PW = "or-7-pw"
ACL = f"""\
# anonymous clients (if any were allowed) get nothing
user {CLIENT_CN}
topic readwrite iort/v1/test-site/or-7/#

user {ADMIN}
topic readwrite #
"""


@pytest.fixture(autouse=True, scope="module")
def _mosquitto_installed() -> None:
    if find_mosquitto() is None:
        pytest.fail(f"mosquitto is not installed: {MOSQUITTO_INSTALL_HINT}")


def client(port: int, identifier: str, **kwargs: Any) -> aiomqtt.Client:
    return aiomqtt.Client(
        HOST, port, identifier=identifier, timeout=5, socket_options=NODELAY, **kwargs
    )


async def next_message(c: aiomqtt.Client, what: str, within_s: float = 5) -> aiomqtt.Message:
    try:
        async with asyncio.timeout(within_s):
            return await anext(c.messages)
    except TimeoutError:
        raise AssertionError(f"no message within {within_s} s: expected {what}") from None


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def record_acks(c: aiomqtt.Client) -> list[tuple[str | None, ReasonCode]]:
    """(topic, reason code) of every PUBACK/PUBCOMP, which aiomqtt 2.5.1 drops.

    Wraps paho's on_publish; during the callback a QoS>0 message is still in
    ``_out_messages`` (paho pops it afterwards), a QoS 0 one is already gone.
    """
    acks: list[tuple[str | None, ReasonCode]] = []
    paho = c._client
    original = paho.on_publish
    assert original is not None

    def on_publish(
        client: Any, userdata: Any, mid: int, reason_code: ReasonCode, properties: Any
    ) -> None:
        msg = client._out_messages.get(mid)
        acks.append((None if msg is None else msg.topic, reason_code))
        original(client, userdata, mid, reason_code, properties)  # type: ignore[call-arg]  # aiomqtt registers a VERSION2 callback

    paho.on_publish = on_publish
    return acks


@contextlib.asynccontextmanager
async def paho_leaks_failed_tls_socket() -> AsyncIterator[None]:
    """paho 2.2's ``_ssl_wrap_socket`` does not close the socket when the handshake fails;
    GC closes it later with a ResourceWarning (an error under filterwarnings=error, blamed
    on whichever test happens to run GC). Finalize it here, where it is expected."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        yield
        # The loop's handle that resumed us still holds the failed connect's future (and so
        # its traceback and the socket) until we yield once.
        await asyncio.sleep(0)
        gc.collect()


# -- lifecycle ---------------------------------------------------------------------------


async def test_start_pubsub_stop_restart(tmp_path: Path) -> None:
    broker = await Mosquitto.start(BrokerOptions(), tmp_path / "broker")
    try:
        port, pid = broker.port, broker.pid
        assert broker.url == f"mqtt://{HOST}:{port}"
        assert broker.running
        assert pid_exists(pid)
        assert "set_tcp_nodelay true" in broker.conf_path.read_text()

        async with client(port, "pub") as pub:
            await pub.publish("t/retained", b"r1", qos=1, retain=True)
            async with client(port, "sub") as sub:
                await sub.subscribe("t/#", qos=1)
                msg = await next_message(sub, "the retained message")
                assert (str(msg.topic), msg.payload, msg.qos, msg.retain) == (
                    "t/retained",
                    b"r1",
                    1,
                    True,
                )
                await pub.publish("t/live", b"l1", qos=1)
                msg = await next_message(sub, "the live message")
                assert (str(msg.topic), msg.payload, msg.retain) == ("t/live", b"l1", False)

        assert await broker.stop() == 0
        assert not broker.running
        assert not pid_exists(pid), "the broker's PID is still alive after stop()"
        assert await broker.stop() == 0, "stop() is idempotent"
        with pytest.raises(aiomqtt.MqttError):
            async with client(port, "refused"):
                pass

        await broker.restart()
        assert (broker.port, broker.running) == (port, True)
        assert broker.pid != pid
        async with client(port, "again") as c:
            await c.publish("t/after", b"x", qos=1)
    finally:
        broker.kill()
    assert not broker.running


async def test_async_with_starts_and_stops(tmp_path: Path) -> None:
    async with Mosquitto(BrokerOptions(extra_listener_plain=True), tmp_path) as broker:
        pid, plain = broker.pid, broker.plain_port
        assert plain is not None
        assert plain != broker.port
        for port in (broker.port, plain):
            async with client(port, f"c{port}") as c:
                await c.publish("t", b"x", qos=1)
    assert not pid_exists(pid)


def test_sync_context_manager(tmp_path: Path) -> None:
    with Mosquitto.start_sync(BrokerOptions(), tmp_path) as broker:
        pid = broker.pid
        with socket.create_connection((HOST, broker.port), timeout=1):
            pass
    assert broker.returncode == 0
    assert not pid_exists(pid)


async def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    broker = await Mosquitto.start(BrokerOptions(), tmp_path)
    try:
        os.kill(broker.pid, 19)  # SIGSTOP: SIGTERM stays pending, only SIGKILL ends it
        assert await broker.stop(timeout_s=0.2) == -9
    finally:
        broker.kill()


@pytest.mark.parametrize("persistence", [True, False])
async def test_retained_message_across_restart(tmp_path: Path, persistence: bool) -> None:
    async with Mosquitto(BrokerOptions(persistence=persistence), tmp_path) as broker:
        async with client(broker.port, "pub") as pub:
            await pub.publish("t/state", b"kept", qos=1, retain=True)
        await broker.restart()
        async with client(broker.port, "sub") as sub:
            await sub.subscribe("t/#", qos=1)
            # Retained messages are sent on subscribe, before anything published after it.
            await sub.publish("t/marker", b"m", qos=1)
            first = await next_message(sub, "the retained message or the marker")
    if persistence:
        assert (str(first.topic), first.payload, first.retain) == ("t/state", b"kept", True)
        assert (tmp_path / "mosquitto-data" / "mosquitto.db").is_file()
    else:
        assert str(first.topic) == "t/marker", "a retained message survived without persistence"


def test_fixed_port_in_use_fails_with_log_tail(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(BrokerError) as excinfo:
            Mosquitto.start_sync(BrokerOptions(port=port), tmp_path)
    message = str(excinfo.value)
    assert "exited with code 1" in message
    assert "Address already in use" in message
    assert str(tmp_path / "mosquitto.log") in message


def test_free_port_taken_meanwhile_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = broker_mod._free_ports
    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        taken = holder.getsockname()[1]
        picks = iter([[taken]])
        monkeypatch.setattr(
            broker_mod, "_free_ports", lambda host, n: next(picks, None) or real(host, n)
        )
        with Mosquitto.start_sync(BrokerOptions(), tmp_path) as broker:
            assert broker.port != taken
            assert "Address already in use" in broker.log_path.read_text()


def test_bad_config_fails_with_exit_code_and_log(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-passwd"
    with pytest.raises(BrokerError, match="exited with code") as excinfo:
        Mosquitto.start_sync(BrokerOptions(password_file=missing), tmp_path / "b")
    assert "pwfile" in str(excinfo.value).lower() or "password" in str(excinfo.value).lower()


def test_only_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        BrokerOptions(host="0.0.0.0")  # noqa: S104 - the point of the test


# -- TLS, passwords, ACL -----------------------------------------------------------------


@dataclass(frozen=True)
class Secured:
    broker: Mosquitto
    tls: TlsFiles

    def context(self, cafile: Path | None = None) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(cafile or self.tls.ca))

    def device(self, identifier: str = "or-7", **kwargs: Any) -> aiomqtt.Client:
        kwargs.setdefault("password", DEVICE_PW)
        kwargs.setdefault("tls_context", self.context())
        return client(self.broker.port, identifier, username=CLIENT_CN, **kwargs)

    def admin(self, **kwargs: Any) -> aiomqtt.Client:
        """The observer, on the extra plain listener."""
        port = self.broker.plain_port
        assert port is not None
        return client(port, "admin", username=ADMIN, password=ADMIN_PW, **kwargs)


def make_password_file(path: Path) -> Path:
    exe = shutil.which("mosquitto_passwd")
    if exe is None:
        pytest.fail(f"mosquitto_passwd is not installed: {MOSQUITTO_INSTALL_HINT}")
    subprocess.run([exe, "-b", "-c", str(path), CLIENT_CN, DEVICE_PW], check=True, timeout=10)
    subprocess.run([exe, "-b", str(path), ADMIN, ADMIN_PW], check=True, timeout=10)
    return path


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    """TLS listener with passwords and an ACL, plus a plain listener for the admin."""
    tls = make_tls_files(tmp_path / "tls")
    acl = tmp_path / "acl"
    acl.write_text(ACL)
    options = BrokerOptions(
        tls=TlsOptions(tls.ca, tls.server_cert, tls.server_key),
        password_file=make_password_file(tmp_path / "passwd"),
        acl_file=acl,
        extra_listener_plain=True,
    )
    assert options.anonymous is False
    with Mosquitto(options, tmp_path / "broker") as broker:
        yield Secured(broker, tls)


def test_tls_files(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path)
    for key in (tls.ca_key, tls.server_key, tls.client_key):
        assert key.stat().st_mode & 0o777 == 0o600
    assert tls.other_ca.read_bytes() != tls.ca.read_bytes()


async def test_right_credentials_over_tls(secured: Secured) -> None:
    assert secured.broker.url.startswith("mqtts://")
    async with secured.admin() as admin, secured.device() as dev:
        await admin.subscribe("#", qos=1)
        await dev.publish(OWN, b"ok", qos=1)
        msg = await next_message(admin, f"{OWN} from the device")
        assert (str(msg.topic), msg.payload) == (OWN, b"ok")


@pytest.mark.parametrize(
    ("protocol", "credentials"),
    [
        (aiomqtt.ProtocolVersion.V311, {"password": "wrong"}),
        (aiomqtt.ProtocolVersion.V5, {"password": "wrong"}),
        (aiomqtt.ProtocolVersion.V311, {"username": None, "password": None}),
    ],
    ids=["wrong-password-3.1.1", "wrong-password-5", "anonymous"],
)
async def test_refused_credentials(
    secured: Secured, protocol: aiomqtt.ProtocolVersion, credentials: dict[str, Any]
) -> None:
    kwargs = {"username": CLIENT_CN, "password": DEVICE_PW, **credentials}
    with pytest.raises(MqttConnectError, match="Not authorized"):
        async with client(
            secured.broker.port,
            "intruder",
            protocol=protocol,
            tls_context=secured.context(),
            **kwargs,
        ):
            pass


async def test_unknown_ca(secured: Secured) -> None:
    async with paho_leaks_failed_tls_socket():
        with pytest.raises(aiomqtt.MqttError, match="CERTIFICATE_VERIFY_FAILED"):
            async with secured.device(tls_context=secured.context(secured.tls.other_ca)):
                pass


@pytest.mark.parametrize(
    "protocol",
    [aiomqtt.ProtocolVersion.V5, aiomqtt.ProtocolVersion.V311],
    ids=["mqtt5", "mqtt3.1.1"],
)
async def test_publish_outside_acl(secured: Secured, protocol: aiomqtt.ProtocolVersion) -> None:
    """Mosquitto 2.0.11 drops a publish the ACL denies. MQTT 5 says so in the PUBACK
    (0x87 Not authorized); MQTT 3.1.1 has no way to, so the PUBACK is plain success.
    aiomqtt 2.5.1 returns normally from publish() either way."""
    async with secured.admin() as admin, secured.device(protocol=protocol) as dev:
        await admin.subscribe("#", qos=1)
        acks = record_acks(dev)
        await dev.publish(OTHER, b"denied", qos=1)
        await dev.publish(OWN, b"allowed", qos=1)
        msg = await next_message(admin, f"{OWN} (sent after the denied {OTHER})")
        assert (str(msg.topic), msg.payload) == (OWN, b"allowed"), "the denied publish got through"

    (t1, rc1), (t2, rc2) = acks
    assert (t1, t2) == (OTHER, OWN)
    assert (rc2.value, rc2.getName()) == (0, "Success")
    if protocol is aiomqtt.ProtocolVersion.V5:
        assert (rc1.value, rc1.getName()) == (0x87, "Not authorized")
    else:
        assert rc1.value == 0, "MQTT 3.1.1: the broker acknowledges the dropped publish"


async def test_require_certificate(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    options = BrokerOptions(
        tls=TlsOptions(tls.ca, tls.server_cert, tls.server_key, require_certificate=True)
    )
    async with Mosquitto(options, tmp_path / "broker") as broker:
        with_cert = ssl.create_default_context(cafile=str(tls.ca))
        with_cert.load_cert_chain(tls.client_cert, tls.client_key)
        async with client(broker.port, "with-cert", tls_context=with_cert) as c:
            await c.publish("t", b"x", qos=1)

        # TLS 1.3: the client's handshake completes before the server checks for a
        # certificate; the server's alert only arrives with the CONNACK wait, and aiomqtt
        # 2.5.1 does not fail the connect on it: it waits out `timeout`.
        without = ssl.create_default_context(cafile=str(tls.ca))
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(
                HOST, broker.port, identifier="no-cert", tls_context=without, timeout=1
            ):
                pass
        assert "peer did not return a certificate" in broker.log_path.read_text()
