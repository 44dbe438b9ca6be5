"""The MQTT sink: the live stream, with availability and gap-free store-and-forward.

aiomqtt has no reconnect and no offline queue, so this sink owns both:

* :meth:`MqttSink.run` is an explicit connect loop with capped, jittered backoff; every
  change of connection state is logged. A task iterating ``client.messages`` beside the
  publisher notices a dropped link within milliseconds (a QoS 1 publish in flight would
  otherwise wait out its whole timeout).
* Nothing here blocks the daemon: :meth:`sample` and :meth:`events` only build payloads and
  hand them to the :class:`~iortd.daemon.mqtt.outbox.Outbox`, which journals them to disk whether
  or not a broker is there.
* On every (re)connect: ``status`` online; the retained state topics (``interlocks``,
  ``delivery``, ``audit/checkpoint``) republished; then the backlog of ``telemetry`` and
  ``events`` in order, marked ``historical``; then live data. The Last Will is the
  ``status`` offline message, retained; a clean shutdown publishes it itself.
* MQTT v5, so that a publish the broker refuses (an ACL) comes back with a reason code and
  is logged as an error naming the topic, rather than vanishing.
* The client id is unique per audit log: ``iortd-{site}-{room}-{12 hex of SHA-256 of the
  log's origin}`` (:func:`client_id_for`). A broker keeps one session per client id and
  disconnects the older holder when a newer one connects ("Session taken over", MQTT 5
  reason 0x8E), so two daemons of one room with the same id (two log directories, a
  restored host, a copied config) would knock each other off in a loop. The origin holds a
  random part made when the log was created, so the id stays the same across restarts (the
  broker's session and the retained will belong to it) and differs between logs; it holds
  nothing but the site and room slugs and a hash.
* A takeover is detected: the broker's DISCONNECT with reason 0x8E, or, from a broker that
  gives no reason, :data:`SHORT_LIVED_STREAK` connections in a row lost within
  :data:`SHORT_LIVED_S` of connecting. Each is logged (``mqtt_session_taken_over``),
  handed to :attr:`MqttSink.on_takeover` (the daemon records it in the audit log and
  raises a notice on every channel), and the next attempt waits a takeover backoff
  (:data:`TAKEOVER_BACKOFF_INITIAL_S` doubling to :data:`TAKEOVER_BACKOFF_MAX_S`, jittered),
  so that two clients with one id do not fight in a tight loop. A connection that stays up
  :data:`STABLE_AFTER_S` ends the streak.

It is a sink plug-in like any other (:class:`MqttSinkFactory`, entry point ``mqtt``),
configured by the ``[mqtt]`` table and behind its own queue with the ``block`` policy
(see :class:`MqttSink`); ``start`` opens the outbox.

State topics are rate-limited: ``delivery`` at most once per second while only the dose
moves (at once on any event), ``interlocks`` on change.

The retained ``audit/checkpoint`` is the off-host copy auditors verify against, so it is
never overwritten by a log that is behind it. On every connection the sink subscribes to
its own checkpoint topic and holds its checkpoint back (up to ``RETAINED_WAIT_S``) until
the broker's retained one has been seen. One signed by this daemon's key is handed to
``checkpoint_guard`` (the daemon, which has the log): if the log does not contain it —
it covers more entries than the log, or the log's entry at its size has another hash —
this log is a fork (a restored backup, a replaced log), and the sink never publishes a
checkpoint again in this run (the daemon raises the alarm and records it). A retained
note not signed by our key is ignored (anyone with publish rights could put one there)
and is replaced.
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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import paho.mqtt.client as paho
import structlog
from pydantic import ValidationError

from iortd.auditlog.note import Checkpoint, Verifier
from iortd.daemon import __version__
from iortd.daemon.config import MQTT_CREDENTIALS_HINT, MqttConfig, SiteConfig
from iortd.daemon.mqtt.outbox import Outbox, OutboxError, Record
from iortd.daemon.mqtt.payloads import (
    Envelope,
    Payload,
    checkpoint_payload,
    delivery_payload,
    event_payloads,
    interlocks_payload,
    notice_payload,
    status_payload,
    telemetry_payload,
    topic,
)
from iortd.daemon.sinks import (
    Overflow,
    Sample,
    Sink,
    SinkConfigError,
    SinkContext,
    SinkOptionError,
    SinkSpec,
)
from iortd.daemon.tracker import (
    DeliverySnapshot,
    DeliveryStarted,
    InterlockChanged,
    Terminated,
    TrackerEvent,
)
from iortd.kernel.backoff import Backoff
from iortd.kernel.broker import BrokerSettings, parse_broker_url
from iortd.kernel.timefmt import utc_ts
from iortd.kernel.types import Interlock, InterlockState

__all__ = ["MqttSink", "MqttSinkFactory", "client_id_for", "settings_from_config"]

log = structlog.get_logger("iortd.mqtt")
# paho's own log (through aiomqtt): rendered as JSON lines by kernel/logs.py.
_PAHO_LOG = logging.getLogger("iortd.mqtt.paho")

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 10.0
CONNECT_TIMEOUT_S = 10.0
# QoS 1 publishes in flight at once (in order on one connection); below Mosquitto's
# default Receive Maximum (20), which paho 2.2 does not read from the CONNACK.
WINDOW = 16
DELIVERY_MIN_INTERVAL_S = 1.0
FLUSH_AT_CLOSE_S = 2.0
STATE_TOPICS = ("interlocks", "delivery", "audit/checkpoint")
# Session takeover (see the module doc).
SESSION_TAKEN_OVER = 0x8E
SHORT_LIVED_S = 5.0
SHORT_LIVED_STREAK = 3
STABLE_AFTER_S = 30.0
TAKEOVER_BACKOFF_INITIAL_S = 5.0
TAKEOVER_BACKOFF_MAX_S = 60.0
RETAINED_WAIT_S = 1.0  # how long a connection holds our checkpoint for the broker's


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


def _now() -> str:
    return utc_ts(datetime.now(UTC))


@dataclass(slots=True)
class _Cell:
    """The latest state of one retained topic, and what of it the broker has."""

    name: str
    build: Callable[[Envelope], Payload] | None = None
    ts: str = ""
    version: int = 0
    record: Record | None = None  # the message for ``record_version`` (sent or in flight)
    record_version: int = -1
    sent: bool = False  # the broker acknowledged ``record``
    not_before: float = 0.0  # monotonic seconds (rate limit)

    @property
    def dirty(self) -> bool:
        return self.build is not None and (self.record_version != self.version or not self.sent)


class _Closing(Exception):
    """The sink is closing: leave the connection cleanly."""


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first real exception inside (possibly nested) exception groups."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _takeover_reason(exc: BaseException, short_lived: int) -> str | None:
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


def _drop_socket(client: aiomqtt.Client) -> None:
    """Close the connection at the TCP level, without an MQTT DISCONNECT: the broker
    then publishes the Last Will. Private paho API (``_sock_close``), pinned version."""
    inner: Any = client._client
    with contextlib.suppress(Exception):
        sock = inner.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        inner._sock_close()


class _FailConnectOnTransportError(logging.Handler):
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


class MqttSink(Sink):
    name = "mqtt"
    # Its queue (daemon/sink_queue.py): the callbacks below only build payloads and hand
    # them to the outbox, so the queue fills only when the loop itself is starved. Then the
    # dispatcher waits for room (bounded) rather than cut a hole in a stream that promises
    # gap-free replay; the outbox has its own bound (it thins old telemetry, never events).
    queue_size = 10_000
    overflow: Overflow = "block"

    def __init__(
        self,
        settings: BrokerSettings,
        outbox: Outbox | Path,
        *,
        site: str,
        room: str,
        simulated: bool,
        verifier: Verifier | None = None,
        outbox_max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        """``outbox``: an open one, or the directory :meth:`start` opens it in."""
        self.settings = settings
        self.site, self.room = site, room
        self.verifier = verifier  # whose retained checkpoints count (see the module doc)
        # Set by the daemon: why the log does not contain this checkpoint, or None.
        self.checkpoint_guard: Callable[[Checkpoint], Awaitable[str | None]] | None = None
        self._cp_blocked = False
        self._last_note: str | None = None  # ours: its echo needs no check
        self._outbox = outbox if isinstance(outbox, Outbox) else None
        self._outbox_dir = outbox if isinstance(outbox, Path) else None
        self._outbox_max_bytes = outbox_max_bytes
        self._sim = simulated
        self._topics = {
            n: topic(settings.prefix, site, room, n)
            for n in ("status", "telemetry", "interlocks", "delivery", "events", "audit/checkpoint")
        }
        self._cells = {n: _Cell(n) for n in STATE_TOPICS}
        self._interlocks: dict[Interlock, InterlockState] = dict.fromkeys(
            Interlock, InterlockState.UNKNOWN
        )
        self._all_clear = False
        self._current_delivery: str | None = None
        self._tls: ssl.SSLContext | None = None
        self._outage = False  # a connection failed or was lost since the last catch-up
        self._wake = asyncio.Event()
        self._closing = False
        self._close_deadline = 0.0
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self._refused: dict[str, int] = {}
        self._connect_watch: _FailConnectOnTransportError | None = None
        # Told of each session takeover, with the data the audit log records for it
        # (client_id, reason, count in this streak, retry_in_s). Set by the composition
        # root; must not block.
        self.on_takeover: Callable[[dict[str, Any]], None] | None = None
        self.takeovers = 0  # in the current streak
        self._connected_at = 0.0

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def outbox(self) -> Outbox:
        if self._outbox is None:
            raise RuntimeError("the MQTT sink's outbox is opened by start()")
        return self._outbox

    async def start(self) -> None:
        """Open the outbox (inside the log directory, so under its LOCK: one daemon per
        outbox). Refuses the start when it cannot be used."""
        if self._outbox is None and self._outbox_dir is not None:
            try:
                self._outbox = await Outbox.open(self._outbox_dir, self._outbox_max_bytes)
            except OutboxError as exc:
                raise SinkConfigError(f"mqtt outbox: {exc}") from None
        log.info(
            "mqtt_enabled",
            broker=self.settings.url,
            session=self.outbox.session,
            client_id=self.settings.client_id,
        )

    @property
    def session(self) -> int:
        return self.outbox.session

    # ---- the Sink callbacks: build, hand to the outbox, never wait -----------------------

    def _env(self, name: str) -> Envelope:
        return Envelope(self.outbox.next_seq(name), self.outbox.session, _now(), sim=self._sim)

    async def sample(self, sample: Sample) -> None:
        self.outbox.add("telemetry", telemetry_payload(self._env("telemetry"), sample))
        interlocks = {**self._interlocks, **sample.interlocks}
        if interlocks != self._interlocks or sample.all_clear != self._all_clear:
            self._interlocks, self._all_clear = interlocks, sample.all_clear
            self._set_interlocks()
        if sample.delivery is not None:
            self._set_delivery(sample.delivery, urgent=False)
        self._wake.set()

    async def events(
        self, events: Sequence[TrackerEvent], delivery: DeliverySnapshot | None
    ) -> None:
        for payload in event_payloads(lambda: self._env("events"), events, current_delivery=None):
            self.outbox.add("events", payload)
        for ev in events:
            # A notice names the open delivery; after its end it is the room's.
            if isinstance(ev, DeliveryStarted):
                self._current_delivery = ev.delivery_id
            elif isinstance(ev, Terminated):
                self._current_delivery = None
        changed = False
        for ev in events:
            if isinstance(ev, InterlockChanged) and self._interlocks.get(ev.interlock) != ev.new:
                self._interlocks[ev.interlock] = ev.new
                changed = True
        if changed:
            self._all_clear = all(s is InterlockState.OK for s in self._interlocks.values())
            self._set_interlocks()
        if delivery is not None:
            # Any event can change the delivery summary (a gap, a lost link, the end):
            # send it now, not at the rate limit, also when no reading came with it.
            self._set_delivery(delivery, urgent=True)
        self._wake.set()

    async def checkpoint(self, note: str) -> None:
        self._last_note = note
        self._set("audit/checkpoint", lambda env: checkpoint_payload(env, note))
        self._wake.set()

    async def _retained_checkpoint(self, payload: bytes) -> None:
        """A message on our checkpoint topic (the retained one at subscription, or our
        own coming back): if our key signed it, the log must contain it."""
        try:
            note = orjson.loads(payload)["note"]
            if note == self._last_note:  # our own coming back: nothing to check
                if not self._cp_blocked:
                    self._cells["audit/checkpoint"].not_before = 0.0
                return
            cp, signed = Checkpoint.parse_verified(str(note), self.verifier)
        except (ValueError, KeyError, TypeError):
            log.warning("mqtt_retained_checkpoint_unreadable")
            return
        if not signed:
            log.warning("mqtt_retained_checkpoint_not_ours", origin=cp.origin, count=cp.count)
            return
        guard = self.checkpoint_guard
        why = None if guard is None else await guard(cp)
        if why is not None and not self._cp_blocked:
            self._cp_blocked = True
            log.critical("mqtt_checkpoint_not_published", reason=why, broker_count=cp.count)
        if not self._cp_blocked:
            self._cells["audit/checkpoint"].not_before = 0.0  # seen: ours may go out now
            self._wake.set()

    async def notice(self, severity: str, message: str) -> None:
        level = "critical" if severity == "critical" else "info"
        payload = notice_payload(
            self._env("events"), level, message, delivery_id=self._current_delivery
        )
        self.outbox.add("events", payload)
        self._wake.set()

    def _set_interlocks(self) -> None:
        states, clear = dict(self._interlocks), self._all_clear
        self._set("interlocks", lambda env: interlocks_payload(env, states, clear))

    def _set_delivery(self, snap: DeliverySnapshot, *, urgent: bool) -> None:
        self._set("delivery", lambda env: delivery_payload(env, snap))
        if urgent:
            self._cells["delivery"].not_before = 0.0

    def _set(self, name: str, build: Callable[[Envelope], Payload]) -> None:
        cell = self._cells[name]
        cell.build, cell.ts = build, _now()
        cell.version += 1

    # ---- the connection -----------------------------------------------------------------

    async def run(self) -> None:
        """Journal and publish until :meth:`aclose`. Never raises for broker trouble."""
        self._task = asyncio.current_task()
        try:
            async with asyncio.TaskGroup() as tg:
                journal = tg.create_task(self.outbox.run(), name="mqtt-outbox")
                await self._connect_loop()
                await self.outbox.close()
                await journal
        finally:
            if self._connect_watch is not None:
                _PAHO_LOG.removeHandler(self._connect_watch)

    async def _connect_loop(self) -> None:
        s = self.settings
        backoff = Backoff(BACKOFF_INITIAL_S, BACKOFF_MAX_S)
        takeover = Backoff(TAKEOVER_BACKOFF_INITIAL_S, TAKEOVER_BACKOFF_MAX_S, jitter=False)
        short_lived = 0  # connections in a row lost soon after connecting
        attempt = 0
        while not self._closing:
            attempt += 1
            online, will = self._status_records()
            await self.outbox.wait_journaled(will)
            log.info("mqtt_connecting", broker=s.url, attempt=attempt)
            try:
                await self._connection(online, will, time.monotonic_ns())
            except _Closing:
                return
            except aiomqtt.MqttError as exc:
                self._outage = True
                reason = str(exc) or type(exc).__name__
                if self.connected.is_set():
                    self.connected.clear()
                    log.error("mqtt_connection_lost", broker=s.url, reason=reason)  # noqa: TRY400
                    backoff.reset()
                    attempt = 0
                    lived_s = time.monotonic() - self._connected_at
                    if lived_s >= STABLE_AFTER_S:
                        self.takeovers, short_lived = 0, 0
                        takeover.reset()
                    short_lived = short_lived + 1 if lived_s < SHORT_LIVED_S else 0
                    why = _takeover_reason(exc, short_lived)
                    if why is not None:
                        backoff.hold(takeover.next_delay())
                        self._taken_over(why, backoff.step_s)
                else:
                    log.error("mqtt_connect_failed", broker=s.url, reason=reason)  # noqa: TRY400
            except (OSError, ssl.SSLError) as exc:
                self._outage = True
                self.connected.clear()
                log.error("mqtt_connect_failed", broker=s.url, reason=str(exc))  # noqa: TRY400
            except Exception:
                # A bug here must not take the daemon (and its record) down with it.
                self._outage = True
                self.connected.clear()
                log.exception("mqtt_sink_error", broker=s.url)
            if self.closing:
                return
            delay = backoff.next_delay()
            log.info("mqtt_reconnect_wait", delay_s=round(delay, 3))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    while not self._closing:
                        self._wake.clear()
                        await self._wake.wait()

    def _taken_over(self, why: str, backoff: float) -> None:
        self.takeovers += 1
        log.error(
            "mqtt_session_taken_over",
            broker=self.settings.url,
            client_id=self.settings.client_id,
            reason=why,
            count=self.takeovers,
            backoff_s=backoff,
        )
        if self.on_takeover is not None:
            data = {
                "client_id": self.settings.client_id,
                "reason": why,
                "count": self.takeovers,
                "retry_in_s": round(backoff, 3),
            }
            try:
                self.on_takeover(data)
            except Exception:
                log.exception("mqtt_takeover_report_failed")

    def _status_records(self) -> tuple[Record, Record]:
        """``status`` online and the Last Will (offline) for one connection attempt: new
        ones each time, since a broker that got a CONNECT may publish that attempt's will
        however the attempt ends. The will's ``seq`` is the larger, so that a consumer
        keeping the newest takes it over the online message."""
        on = status_payload(self._env("status"), True, __version__, self.site, self.room)
        off = status_payload(self._env("status"), False, __version__, self.site, self.room)
        return self.outbox.add("status", on), self.outbox.add("status", off)

    async def _connection(self, online: Record, will: Record, attempt_ns: int) -> None:
        s = self.settings
        if self._connect_watch is None:
            self._connect_watch = _FailConnectOnTransportError(asyncio.get_running_loop())
            _PAHO_LOG.addHandler(self._connect_watch)
        if self._tls is None and s.tls:
            self._tls = await asyncio.to_thread(s.tls_context)  # loads CA files: not on the loop
        client = aiomqtt.Client(
            s.host,
            s.port,
            logger=_PAHO_LOG,
            identifier=s.client_id,
            username=s.username,
            password=s.password,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=aiomqtt.Will(self._topics["status"], will.body, qos=1, retain=True),
            keepalive=s.keepalive_s,
            timeout=CONNECT_TIMEOUT_S,
            tls_context=self._tls,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            max_inflight_messages=WINDOW,
        )
        client.pending_calls_threshold = WINDOW * 4
        self._watch_refusals(client)
        self._connect_watch.client = client
        try:
            await client.__aenter__()
        except BaseException:
            _drop_socket(client)  # an orphan must not linger (and later fire its will)
            raise
        finally:
            self._connect_watch.client = None
        clean = False
        try:
            self._connected_at = time.monotonic()
            self.connected.set()
            log.info(
                "mqtt_connected",
                broker=s.url,
                session=self.outbox.session,
                backlog=sum(1 for _ in self.outbox.unsent()),
            )
            try:
                async with asyncio.TaskGroup() as tg:
                    watcher = tg.create_task(self._watch_link(client), name="mqtt-link")
                    await self._publish_all(client, online, will, attempt_ns)
                    watcher.cancel()
            except* aiomqtt.MqttError as group:
                raise _first_leaf(group) from None
            clean = True
        finally:
            if clean:
                # DISCONNECT: the broker discards the will (offline is already published
                # and acknowledged). If that fails, the socket still goes.
                try:
                    await client.__aexit__(None, None, None)
                except (aiomqtt.MqttError, OSError):
                    _drop_socket(client)
                except BaseException:
                    _drop_socket(client)
                    raise
            else:
                # Not a clean end (lost link, timeout, cancellation): drop the socket
                # without DISCONNECT, so that the broker publishes the will (offline)
                # rather than keep the retained status online for good. The client is
                # not used again.
                _drop_socket(client)
        self.connected.clear()
        log.info("mqtt_disconnected", broker=s.url, reason="shutdown")
        raise _Closing

    async def _watch_link(self, client: aiomqtt.Client) -> None:
        """Notices a dropped link (a takeover ends this iteration with MqttError from
        MqttCodeError(0x8E)), and reads our checkpoint topic (its retained message)."""
        cp_topic = self._topics["audit/checkpoint"]
        if self.verifier is not None:
            await client.subscribe(cp_topic, qos=1, timeout=CONNECT_TIMEOUT_S)
        async for msg in client.messages:
            if msg.topic.matches(cp_topic) and isinstance(msg.payload, bytes | bytearray):
                await self._retained_checkpoint(bytes(msg.payload))

    def _watch_refusals(self, client: aiomqtt.Client) -> None:
        """aiomqtt drops the PUBACK reason code; an MQTT v5 broker uses it to refuse a
        publish (an ACL). Wrap paho's callback to log it, naming the topic. The message
        is still in paho's ``_out_messages`` during the callback (paho 2.2)."""
        inner: Any = client._client  # private: the only way to the reason code
        original = inner.on_publish

        def on_publish(
            c: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any
        ) -> None:
            if getattr(reason, "is_failure", False):
                msg = c._out_messages.get(mid)
                where = msg.topic if msg is not None else "?"
                count = self._refused.get(where, 0) + 1
                self._refused[where] = count
                if count == 1 or count % 1000 == 0:
                    log.error("mqtt_publish_refused", topic=where, reason=str(reason), count=count)
            original(c, userdata, mid, reason, properties)

        inner.on_publish = on_publish

    async def _publish_all(
        self, client: aiomqtt.Client, online: Record, will: Record, attempt_ns: int
    ) -> None:
        """``attempt_ns``: when this connection attempt began. A stream record from a
        previous run, or made before this attempt after a failed attempt or a lost
        connection, waited out an outage: it is history, and so is everything sent until
        that backlog is drained (what queued behind it is late too). At the first
        connection of a run, what was made during the handshake is only milliseconds
        late: live."""

        def late(rec: Record) -> bool:
            return rec.created_ns < 0 or (self._outage and rec.created_ns < attempt_ns)

        head = next(self.outbox.unsent(), None)
        replaying = head is not None and late(head)
        await self._send(client, online)
        self.outbox.ack(online)
        for cell in self._cells.values():  # the broker may have lost them (restart)
            cell.not_before = 0.0  # the current state now, not at the rate limit
            if cell.name == "audit/checkpoint":
                # Held until the broker's retained one is seen (or the wait is over).
                cell.not_before = time.monotonic() + RETAINED_WAIT_S
                cell.sent = False
                continue
            if cell.record is not None and cell.sent and not cell.dirty:
                await self._send(client, cell.record)
        while True:
            await self._publish_state(client)
            if self._closing and time.monotonic() > self._close_deadline:
                log.warning("mqtt_close_unsent", unsent=sum(1 for _ in self.outbox.unsent()))
                break  # the rest stays in the outbox for the next start
            batch = list(islice(self.outbox.unsent(), WINDOW))
            if batch:
                async with asyncio.TaskGroup() as tg:
                    for rec in batch:
                        old = replaying or late(rec)
                        tg.create_task(self._send_stream(client, rec, historical=old))
                continue
            replaying = self._outage = False  # caught up: live from here
            if self._closing:
                break
            await self._idle()
        # Clean shutdown: the offline status, then DISCONNECT (the broker drops the will).
        await self._send(client, will)
        self.outbox.ack(will)

    async def _idle(self) -> None:
        """Wait for new records, a state change, a due rate limit or the close."""
        now = time.monotonic()
        due = [c.not_before - now for c in self._cells.values() if c.dirty]
        timeout = max(0.0, min(due)) if due else None
        self._wake.clear()
        self.outbox.changed.clear()
        if any(True for _ in self.outbox.unsent()):
            return
        waiters = {
            asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(self.outbox.changed.wait()),
        }
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _publish_state(self, client: aiomqtt.Client) -> None:
        now = time.monotonic()
        for cell in self._cells.values():
            if not cell.dirty or (cell.not_before > now and not self._closing):
                continue
            if cell.name == "audit/checkpoint" and self._cp_blocked:
                continue
            if cell.record_version != cell.version and cell.build is not None:
                env = Envelope(
                    self.outbox.next_seq(cell.name), self.outbox.session, cell.ts, sim=self._sim
                )
                if cell.record is not None and not cell.sent:
                    self.outbox.ack(cell.record)  # superseded before the broker had it
                cell.record = self.outbox.add(cell.name, cell.build(env))
                cell.record_version, cell.sent = cell.version, False
            if cell.record is None:
                continue
            await self.outbox.wait_journaled(cell.record)
            await self._send(client, cell.record)
            self.outbox.ack(cell.record)
            cell.sent = True
            if cell.name == "delivery":
                cell.not_before = now + DELIVERY_MIN_INTERVAL_S

    async def _send_stream(self, client: aiomqtt.Client, rec: Record, *, historical: bool) -> None:
        await self._send(client, rec, historical=historical)
        self.outbox.ack(rec)

    async def _send(self, client: aiomqtt.Client, rec: Record, *, historical: bool = False) -> None:
        # While closing, no PUBACK is awaited past the close deadline (a stuck broker must
        # not hold the shutdown; the will then says offline).
        timeout = None
        if self._closing:
            timeout = max(0.05, self._close_deadline + 0.5 - time.monotonic())
        await client.publish(
            self._topics[rec.topic],
            rec.wire(historical=historical),
            qos=1,
            retain=rec.retained,
            timeout=timeout,
        )

    async def aclose(self) -> None:
        """Flush what the broker can take within a bound, publish offline, disconnect,
        save the outbox. What was not sent stays in the outbox for the next start."""
        self._close_deadline = time.monotonic() + FLUSH_AT_CLOSE_S
        self._closing = True
        self._wake.set()
        self.outbox.changed.set()
        task = self._task
        if task is None:
            if self._outbox is not None:  # never ran (or never started)
                await self._outbox.close()
            return
        done, _ = await asyncio.wait({task}, timeout=FLUSH_AT_CLOSE_S + 1.5)
        if not done:
            log.warning("mqtt_close_timeout", unsent=sum(1 for _ in self.outbox.unsent()))
            task.cancel(msg="mqtt sink: close timed out")
            await asyncio.wait({task})  # its disk work finishes first (see the outbox)
            await self.outbox.close()


class MqttSinkFactory:
    """The MQTT sink as a plug-in (entry point ``mqtt`` of ``iort.sinks``), built like any
    other sink. Its options are the ``[mqtt]`` table, which configures it (one broker
    connection and one outbox per daemon; ``[[sinks]]`` with ``type = "mqtt"`` is
    refused). The context's ``state_dir`` is its outbox directory, ``origin`` gives the
    client id, ``verifier`` says which retained checkpoints are its own."""

    name = "mqtt"

    def validate(self, options: Mapping[str, Any]) -> None:
        try:
            MqttConfig.model_validate(dict(options))
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            key = ".".join(str(p) for p in err["loc"])
            raise SinkOptionError(f"options.{key}", str(err["msg"])) from None

    def create(self, spec: SinkSpec, context: SinkContext) -> MqttSink:
        self.validate(spec.options)
        mqtt = MqttConfig.model_validate(dict(spec.options))
        try:
            # The password is read now: it may have gone since check-config.
            settings = settings_from_config(
                mqtt, SiteConfig(id=context.site, room=context.room), origin=context.origin
            )
        except (OSError, KeyError, ValueError) as exc:
            what = "password_env" if isinstance(exc, KeyError) else "password_file"
            raise SinkConfigError(f"mqtt.{what}: cannot read the password: {exc}") from None
        return MqttSink(
            settings,
            context.state_dir,
            site=context.site,
            room=context.room,
            simulated=context.simulated,
            verifier=context.verifier,
            outbox_max_bytes=mqtt.outbox_max_bytes,
        )
