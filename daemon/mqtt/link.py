"""The MQTT sink's broker connection: who it is, how it connects, and what it notices.

aiomqtt has no reconnect, so the sink (:mod:`iortd.daemon.mqtt.sink`) runs its own connect
loop; this module holds the machinery that loop uses, none of which knows what is
published:

* The settings from the ``[mqtt]`` table (:func:`settings_from_config`; the settings
  themselves are :class:`~iortd.kernel.broker.BrokerSettings`), the connect loop's capped,
  jittered backoff (:data:`BACKOFF_INITIAL_S` to :data:`BACKOFF_MAX_S`, the default of
  ``[mqtt] reconnect_max_s``), and the client
  (:func:`new_client`): MQTT v5, so that a publish the broker refuses (an ACL) comes back
  with a reason code, which :func:`watch_refusals` logs naming the topic rather than let it
  vanish.
* The client id is unique per audit log: ``iortd-{site}-{room}-{12 hex of SHA-256 of the
  log's origin}`` (:func:`client_id_for`). A broker keeps one session per client id and
  disconnects the older holder when a newer one connects ("Session taken over", MQTT 5
  reason 0x8E), so two daemons of one room with the same id (two log directories, a
  restored host, a copied config) would knock each other off in a loop. The origin holds a
  random part made when the log was created, so the id stays the same across restarts (the
  broker's session and the retained will belong to it) and differs between logs; it holds
  nothing but the site and room slugs and a hash.
* A takeover is detected (:class:`Takeovers`): the broker's DISCONNECT with reason 0x8E,
  or, from a broker that gives no reason, :data:`SHORT_LIVED_STREAK` connections in a row
  lost within :data:`SHORT_LIVED_S` of connecting. Each is logged
  (``mqtt_session_taken_over``), handed to ``on_takeover`` (the daemon records it in the
  audit log and raises a notice on every channel), and the next attempt waits a takeover
  backoff (:data:`TAKEOVER_BACKOFF_INITIAL_S` doubling to :data:`TAKEOVER_BACKOFF_MAX_S`,
  jittered), so that two clients with one id do not fight in a tight loop. A connection
  that stays up :data:`STABLE_AFTER_S` ends the streak.
* What a publisher with rights on ``cmd/#`` (or on the checkpoint topic) can make the
  daemon hold is bounded twice. On CONNECT the client asks for an MQTT 5 Maximum Packet
  Size of :data:`INCOMING_MAX_PACKET_BYTES`: the broker must then discard, not send, a
  larger packet (MQTT 5.0 section 3.1.2.11.4), so a 1 MiB "command" is never even read by
  paho; the broker says so in its own log, not to us. The messages received and not yet
  handled wait in a queue of at most :data:`INCOMING_MAX_MESSAGES` messages and
  :data:`INCOMING_MAX_BYTES` of payload (aiomqtt's is unbounded by default; the count is
  above Mosquitto's default ``max_queued_messages``, 1000, so a burst the broker would
  hold for us fits): beyond it the newest are dropped, counted in
  :class:`IncomingDrops` (``iortd_mqtt_incoming_dropped`` on ``/metrics``) and logged
  (``mqtt_incoming_dropped``: the first at once, then at most one line per
  :data:`DROP_LOG_EVERY_S` with the count). A dropped command is a command not acted on,
  as one the broker dropped would be; its sender sees no answer on ``events``.
* paho reports some failures only in its log or its callbacks, which aiomqtt does not
  pass on: :class:`FailConnectOnTransportError` fails a pending connect at once with paho's
  words, :func:`watch_refusals` reads the PUBACK reason code, :func:`drop_socket` ends a
  connection without DISCONNECT (so the broker publishes the Last Will). These use private
  paho/aiomqtt API of the pinned versions (tests/integration/test_mqtt_security.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from iortd.daemon.config import MQTT_CREDENTIALS_HINT, MqttConfig, SiteConfig
from iortd.kernel.backoff import Backoff
from iortd.kernel.broker import BrokerSettings, parse_broker_url

__all__ = [
    "BACKOFF_INITIAL_S",
    "BACKOFF_MAX_S",
    "CONNECT_TIMEOUT_S",
    "DROP_LOG_EVERY_S",
    "INCOMING_MAX_BYTES",
    "INCOMING_MAX_MESSAGES",
    "INCOMING_MAX_PACKET_BYTES",
    "PAHO_LOG",
    "SHORT_LIVED_S",
    "SHORT_LIVED_STREAK",
    "STABLE_AFTER_S",
    "TAKEOVER_BACKOFF_INITIAL_S",
    "TAKEOVER_BACKOFF_MAX_S",
    "WINDOW",
    "FailConnectOnTransportError",
    "IncomingDrops",
    "Takeovers",
    "client_id_for",
    "drop_socket",
    "first_leaf",
    "new_client",
    "settings_from_config",
    "takeover_reason",
    "watch_refusals",
]

log = structlog.get_logger("iortd.mqtt")
# paho's own log (through aiomqtt): rendered as JSON lines by kernel/logs.py.
PAHO_LOG = logging.getLogger("iortd.mqtt.paho")

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 10.0
CONNECT_TIMEOUT_S = 10.0
# QoS 1 publishes in flight at once (in order on one connection); below Mosquitto's
# default Receive Maximum (20), which paho 2.2 does not read from the CONNACK.
WINDOW = 16
# The largest packet the broker may send us (MQTT 5 Maximum Packet Size, on CONNECT): a
# command is at most 16 KiB (auditlog/command.py), a checkpoint a few hundred bytes; the
# rest is room for the topic and the properties.
INCOMING_MAX_PACKET_BYTES = 64 * 1024
# Messages received and not yet handled (commands, checkpoints); beyond it, dropped.
INCOMING_MAX_MESSAGES = 1024
INCOMING_MAX_BYTES = 8 * 1024 * 1024  # their payloads together
DROP_LOG_EVERY_S = 10.0
# Session takeover (see the module doc).
SESSION_TAKEN_OVER = 0x8E
SHORT_LIVED_S = 5.0
SHORT_LIVED_STREAK = 3
STABLE_AFTER_S = 30.0
TAKEOVER_BACKOFF_INITIAL_S = 5.0
TAKEOVER_BACKOFF_MAX_S = 60.0


def client_id_for(site: str, room: str, origin: str) -> str:
    """The MQTT client id of the daemon writing the log ``origin``: unique per log."""
    digest = hashlib.sha256(origin.encode("utf-8")).hexdigest()[:12]
    return f"iortd-{site}-{room}-{digest}"


def settings_from_config(
    mqtt: MqttConfig, site: SiteConfig, *, origin: str, url: str | None = None
) -> BrokerSettings:
    """The config's broker, or ``url`` instead (``iortd demo --broker``, the embedded
    broker). Reads the password from its file or environment variable (load_config has
    checked that they exist). ``origin`` is the audit log's: the client id derives from it."""
    # load_config has checked the config's URL; one given on the command line is checked
    # here, with the same rules (iortd.kernel.broker).
    host, port, tls = parse_broker_url(url or mqtt.url, credentials_hint=MQTT_CREDENTIALS_HINT)
    password = None
    if mqtt.password_file is not None:
        password = mqtt.password_file.read_text(encoding="utf-8").rstrip("\r\n")
    elif mqtt.password_env is not None:
        password = os.environ[mqtt.password_env]
    return BrokerSettings(
        host=host,
        port=port,
        tls=tls,
        prefix=mqtt.prefix,
        client_id=client_id_for(site.id, site.room, origin),
        keepalive_s=mqtt.keepalive_s,
        username=mqtt.username,
        password=password,
        ca_file=mqtt.ca_file,
        cert_file=mqtt.cert_file,
        key_file=mqtt.key_file,
    )


class IncomingDrops:
    """Messages received on the link and those dropped because the incoming queue was
    full, over the run (every connection's client counts here); the drops logged,
    rate-limited (see the module doc)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.arrived = 0
        self.dropped = 0
        self._logged_at: float | None = None
        self._unlogged = 0

    def drop(self, topic: str) -> None:
        self.dropped += 1
        self._unlogged += 1
        now = self._clock()
        if self._logged_at is None or now - self._logged_at >= DROP_LOG_EVERY_S:
            log.error(
                "mqtt_incoming_dropped",
                topic=topic[:200],
                dropped=self._unlogged,
                dropped_total=self.dropped,
                queue_max=INCOMING_MAX_MESSAGES,
                queue_max_bytes=INCOMING_MAX_BYTES,
            )
            self._logged_at, self._unlogged = now, 0

    def queue_type(self) -> type[asyncio.Queue[aiomqtt.Message]]:
        """aiomqtt's incoming queue class: bounded (by its ``maxsize``), counting here."""
        drops = self

        class Incoming(asyncio.Queue[aiomqtt.Message]):
            bytes = 0  # payload bytes waiting

            def put_nowait(self, item: aiomqtt.Message) -> None:
                drops.arrived += 1
                if self.full() or self.bytes + _size(item) > INCOMING_MAX_BYTES:
                    # Not QueueFull: aiomqtt would log a line per message.
                    drops.drop(item.topic.value)
                    return
                super().put_nowait(item)

            def _put(self, item: aiomqtt.Message) -> None:
                self.bytes += _size(item)
                super()._put(item)

            def _get(self) -> aiomqtt.Message:
                item: aiomqtt.Message = super()._get()
                self.bytes -= _size(item)
                return item

        return Incoming


def _size(m: aiomqtt.Message) -> int:
    p = m.payload
    return len(p) if isinstance(p, bytes | bytearray | str) else 0


def connect_properties() -> Properties:
    """CONNECT's properties: the Maximum Packet Size the broker may send us."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: untyped
    props.MaximumPacketSize = INCOMING_MAX_PACKET_BYTES
    return props


def new_client(
    s: BrokerSettings,
    *,
    will: aiomqtt.Will,
    tls: ssl.SSLContext | None,
    drops: IncomingDrops,
) -> aiomqtt.Client:
    """A client for one connection attempt (not connected yet), with that attempt's will;
    what it receives is bounded (see the module doc) and its drops counted in ``drops``."""
    client = aiomqtt.Client(
        s.host,
        s.port,
        logger=PAHO_LOG,
        identifier=s.client_id,
        username=s.username,
        password=s.password,
        protocol=aiomqtt.ProtocolVersion.V5,
        will=will,
        keepalive=s.keepalive_s,
        timeout=CONNECT_TIMEOUT_S,
        tls_context=tls,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        max_inflight_messages=WINDOW,
        queue_type=drops.queue_type(),
        max_queued_incoming_messages=INCOMING_MAX_MESSAGES,
        properties=connect_properties(),
    )
    client.pending_calls_threshold = WINDOW * 4
    return client


def first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first real exception inside (possibly nested) exception groups."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def takeover_reason(exc: BaseException, short_lived: int) -> str | None:
    """Why a lost connection looks like another client holding our id, or None."""
    seen: BaseException | None = exc
    while seen is not None:
        rc = getattr(seen, "rc", None)
        if (
            isinstance(seen, aiomqtt.MqttCodeError)
            and getattr(rc, "value", rc) == SESSION_TAKEN_OVER
        ):
            return (
                "the broker says the session was taken over (MQTT reason 0x8E): another "
                "client connected with this daemon's client id"
            )
        seen = seen.__cause__ or seen.__context__
    if short_lived >= SHORT_LIVED_STREAK:
        return (
            f"{short_lived} connections in a row lost within {SHORT_LIVED_S:g} s of "
            "connecting: another client may be using this daemon's client id"
        )
    return None


class Takeovers:
    """The streak of lost connections that look like a session takeover, and its backoff
    (see the module doc). Told of each connection lost after it was up."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        # Told of each session takeover, with the data the audit log records for it
        # (client_id, reason, count in this streak, retry_in_s). Must not block.
        self.on_takeover: Callable[[dict[str, Any]], None] | None = None
        self.count = 0  # in the current streak
        self._short_lived = 0  # connections in a row lost soon after connecting
        self._backoff = Backoff(TAKEOVER_BACKOFF_INITIAL_S, TAKEOVER_BACKOFF_MAX_S, jitter=False)

    def lost(self, exc: BaseException, lived_s: float, backoff: Backoff) -> None:
        """A connection that was up ``lived_s`` was lost with ``exc``; on a takeover,
        ``backoff`` (the connect loop's, just reset) holds for the takeover backoff."""
        if lived_s >= STABLE_AFTER_S:
            self.count, self._short_lived = 0, 0
            self._backoff.reset()
        self._short_lived = self._short_lived + 1 if lived_s < SHORT_LIVED_S else 0
        why = takeover_reason(exc, self._short_lived)
        if why is not None:
            backoff.hold(self._backoff.next_delay())
            self._taken_over(why, backoff.step_s)

    def _taken_over(self, why: str, backoff: float) -> None:
        self.count += 1
        log.error(
            "mqtt_session_taken_over",
            broker=self.settings.url,
            client_id=self.settings.client_id,
            reason=why,
            count=self.count,
            backoff_s=backoff,
        )
        if self.on_takeover is not None:
            data = {
                "client_id": self.settings.client_id,
                "reason": why,
                "count": self.count,
                "retry_in_s": round(backoff, 3),
            }
            try:
                self.on_takeover(data)
            except Exception:
                log.exception("mqtt_takeover_report_failed")


def drop_socket(client: aiomqtt.Client) -> None:
    """Close the connection at the TCP level, without an MQTT DISCONNECT: the broker
    then publishes the Last Will. Private paho API (``_sock_close``), pinned version."""
    inner: Any = client._client
    with contextlib.suppress(Exception):
        sock = inner.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        inner._sock_close()


class FailConnectOnTransportError(logging.Handler):
    """paho reports a transport failure during the handshake (e.g. the broker demands a
    client certificate: TLSV13_ALERT_CERTIFICATE_REQUIRED) only in its log, and aiomqtt
    2.5 ignores a disconnect before CONNACK, so the connect would wait out its whole
    timeout and then say only "timed out". This handler fails the pending connect at once
    with paho's own words. It touches aiomqtt's private ``_connected`` future (tested
    against the pinned aiomqtt in tests/integration/test_mqtt_security.py)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(level=logging.ERROR)
        self._loop = loop
        self.client: aiomqtt.Client | None = None

    def emit(self, record: logging.LogRecord) -> None:
        client, message = self.client, record.getMessage()
        if client is not None:
            self._loop.call_soon_threadsafe(self._fail, client, message)

    def _fail(self, client: aiomqtt.Client, message: str) -> None:
        if client is not self.client:
            return  # that attempt is over (or was another client's)
        pending: asyncio.Future[None] = client._connected  # private: see the class doc
        if not pending.done():
            pending.set_exception(aiomqtt.MqttError(f"transport error: {message}"))


def watch_refusals(client: aiomqtt.Client, refused: dict[str, int]) -> None:
    """aiomqtt drops the PUBACK reason code; an MQTT v5 broker uses it to refuse a
    publish (an ACL). Wrap paho's callback to log it, naming the topic, and count the
    refusals per topic in ``refused``. The message is still in paho's ``_out_messages``
    during the callback (paho 2.2)."""
    inner: Any = client._client  # private: the only way to the reason code
    original = inner.on_publish

    def on_publish(c: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if getattr(reason, "is_failure", False):
            msg = c._out_messages.get(mid)
            where = msg.topic if msg is not None else "?"
            count = refused.get(where, 0) + 1
            refused[where] = count
            if count == 1 or count % 1000 == 0:
                log.error("mqtt_publish_refused", topic=where, reason=str(reason), count=count)
        original(c, userdata, mid, reason, properties)

    inner.on_publish = on_publish
