"""The MQTT sink: the live stream, with availability and gap-free store-and-forward.

aiomqtt has no reconnect and no offline queue, so this sink owns both; it is cut in four:
this module (the connect loop and the publishing order), :mod:`~iortd.daemon.mqtt.link`
(client id, settings, the client, takeover detection, what paho tells only its log),
:mod:`~iortd.daemon.mqtt.retained` (the retained state topics and the guard on the
checkpoint), :mod:`~iortd.daemon.mqtt.outbox` (the journal).

* :meth:`MqttSink.run` is an explicit connect loop with capped, jittered backoff; every
  change of connection state is logged. A task iterating ``client.messages`` beside the
  publisher notices a dropped link within milliseconds (a QoS 1 publish in flight would
  otherwise wait out its whole timeout), and reads the retained checkpoint.
* Nothing here blocks the daemon: :meth:`sample`, :meth:`applicator` and :meth:`events`
  only build payloads and hand them to the :class:`~iortd.daemon.mqtt.outbox.Outbox`,
  which journals them to disk whether or not a broker is there, or update the
  :class:`~iortd.daemon.mqtt.retained.RetainedState`.
* On every (re)connect: ``status`` online; the retained state topics (``interlocks``,
  ``delivery``, ``alarms``, ``audit/checkpoint``) republished; then the backlog of the streams
  (``telemetry``, ``applicator``, ``events``, ``skip``) in order within each topic, marked
  ``historical``; then live data, each message as soon as the outbox lets it out (a sample
  at once, an event once journaled: see the outbox). The Last Will is the
  ``status`` offline message, retained; a clean shutdown publishes it itself.
* :meth:`MqttSink.serve_replay`: a replay request (:mod:`~iortd.daemon.mqtt.replay`).
* A lost connection that looks like another client holding our client id (a session
  takeover: see :mod:`~iortd.daemon.mqtt.link`) is handed to :attr:`MqttSink.on_takeover`
  (the daemon records it in the audit log) and the next attempt waits the takeover backoff.

It is a sink plug-in like any other (:class:`~iortd.daemon.mqtt.factory.MqttSinkFactory`,
entry point ``mqtt``), configured by the ``[mqtt]`` table and behind its own queue with the
``block`` policy (see :class:`MqttSink`); ``start`` opens the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import aiomqtt
import structlog

from iortd.auditlog.note import Checkpoint, Verifier
from iortd.daemon import __version__
from iortd.daemon.mqtt.birth import BirthGuard, subscribe_own_status
from iortd.daemon.mqtt.link import (
    BACKOFF_INITIAL_S,
    BACKOFF_MAX_S,
    CONNECT_TIMEOUT_S,
    PAHO_LOG,
    WINDOW,
    FailConnectOnTransportError,
    IncomingDrops,
    Takeovers,
    drop_socket,
    first_leaf,
    new_client,
    watch_refusals,
)
from iortd.daemon.mqtt.outbox import Outbox, OutboxError, Record
from iortd.daemon.mqtt.payloads import (
    TOPICS,
    Envelope,
    applicator_payload,
    event_payloads,
    notice_payload,
    report_payload,
    status_payload,
    telemetry_payload,
    topic,
)
from iortd.daemon.mqtt.replay import ReplayRange, ReplayServer, Served
from iortd.daemon.mqtt.retained import RetainedState
from iortd.daemon.sinks import ApplicatorSample, Overflow, Sample, Sink, SinkConfigError
from iortd.daemon.tracker import DeliverySnapshot, DeliveryStarted, Terminated, TrackerEvent
from iortd.kernel.backoff import Backoff
from iortd.kernel.broker import BrokerSettings
from iortd.kernel.timefmt import utc_ts

__all__ = ["MqttSink"]

log = structlog.get_logger("iortd.mqtt")

FLUSH_AT_CLOSE_S = 2.0


def _now() -> str:
    return utc_ts(datetime.now(UTC))


class _Closing(Exception):
    """The sink is closing: leave the connection cleanly."""


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
        reconnect_max_s: float = BACKOFF_MAX_S,
        replay_retention_s: float = 0.0,
        replay_rate: float = 200.0,
        replay_max_per_minute: int = 30,
        config_hash: str | None = None,
        origin: str | None = None,
    ) -> None:
        """``outbox``: an open one, or the directory :meth:`start` opens it in;
        ``reconnect_max_s``: the reconnect backoff's cap (``[mqtt] reconnect_max_s``);
        ``replay_*``: the ``[mqtt]`` keys (daemon/mqtt/replay.py); ``config_hash`` and
        ``origin``: what the birth says (daemon/mqtt/birth.py)."""
        self.settings = settings
        self._wake = asyncio.Event()
        self.site, self.room = site, room
        self._state = RetainedState(now=_now, simulated=simulated, verifier=verifier)
        self._takeovers = Takeovers(settings)
        self._outbox = outbox if isinstance(outbox, Outbox) else None
        if self._outbox is not None:
            self._outbox.changed = self._wake  # see start()
        self._outbox_dir = outbox if isinstance(outbox, Path) else None
        self._outbox_max_bytes = outbox_max_bytes
        self.reconnect_max_s = reconnect_max_s
        self.replay = ReplayServer(
            replay_rate, replay_max_per_minute, self._wake.set, replay_retention_s
        )
        self._sim = simulated
        self._topics = {n: topic(settings.prefix, site, room, n) for n in TOPICS}
        self._current_delivery: str | None = None
        self._tls: ssl.SSLContext | None = None
        self._outage = False  # a connection failed or was lost since the last catch-up
        self._closing = False
        self._close_deadline = 0.0
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self._refused: dict[str, int] = {}
        # Messages received (commands, checkpoints) and dropped at the full incoming queue.
        self.incoming = IncomingDrops()
        self._connect_watch: FailConnectOnTransportError | None = None
        self._connected_at = 0.0
        # Set by the composition root when [commands] is on: each message on cmd/# (its
        # kind, the topic's last level; its bytes; its retain flag) goes to the intake.
        self.on_command: Callable[[str, bytes, bool], None] | None = None
        self._cmd_prefix = self._topics["status"].removesuffix("status") + "cmd/"
        self._birth_says = {"config_hash": config_hash, "origin": origin}
        self.births = BirthGuard()
        self._birth: Record | None = None

    # Set by the composition root (daemon/service.py), held by the parts that use them.

    @property
    def verifier(self) -> Verifier | None:
        """Whose retained checkpoints count (see daemon/mqtt/retained.py)."""
        return self._state.verifier

    @property
    def checkpoint_guard(self) -> Callable[[Checkpoint], Awaitable[str | None]] | None:
        """Set by the daemon: why the log does not contain this checkpoint, or None."""
        return self._state.checkpoint_guard

    @checkpoint_guard.setter
    def checkpoint_guard(self, guard: Callable[[Checkpoint], Awaitable[str | None]] | None) -> None:
        self._state.checkpoint_guard = guard

    @property
    def on_takeover(self) -> Callable[[dict[str, Any]], None] | None:
        """Told of each session takeover, with the data the audit log records for it
        (client_id, reason, count in this streak, retry_in_s); must not block."""
        return self._takeovers.on_takeover

    @on_takeover.setter
    def on_takeover(self, report: Callable[[dict[str, Any]], None] | None) -> None:
        self._takeovers.on_takeover = report

    @property
    def takeovers(self) -> int:
        """Session takeovers in the current streak."""
        return self._takeovers.count

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
                self._outbox = await Outbox.open(
                    self._outbox_dir, self._outbox_max_bytes, retention_s=self.replay.retention_s
                )
            except OutboxError as exc:
                raise SinkConfigError(f"mqtt outbox: {exc}") from None
        # Records becoming publishable wake the publisher as our own wake does: one event,
        # so that waiting for either costs no task per sample (_idle).
        self.outbox.changed = self._wake
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
        seq = self.replay.handed[name] = self.outbox.next_seq(name)
        return Envelope(seq, self.outbox.session, _now(), sim=self._sim)

    async def serve_replay(self, rng: ReplayRange) -> Served:
        """What the outbox holds of ``rng`` again, the rest ``not_held`` (replay.py)."""
        return await self.replay.serve(self.outbox, rng, lambda: self._env("skip"))

    async def sample(self, sample: Sample) -> None:
        self.outbox.add("telemetry", telemetry_payload(self._env("telemetry"), sample))
        self._state.reading(sample.interlocks, sample.all_clear, sample.delivery)
        self._wake.set()

    async def applicator(self, sample: ApplicatorSample) -> None:
        # A stream like telemetry: journaled, replayed, thinned with it (outbox.py).
        self.outbox.add("applicator", applicator_payload(self._env("applicator"), sample))
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
        self._state.events(events, delivery)
        self._wake.set()

    def set_alarms(self, items: Sequence[Mapping[str, Any]], omitted: int) -> None:
        """The room's alarms (daemon/alarm_acks.py's ``on_change``): the retained ``alarms``
        topic, sent at its rate limit. Never waits."""
        self._state.alarms(items, omitted)
        self._wake.set()

    async def checkpoint(self, note: str) -> None:
        self._state.checkpoint(note)
        self._wake.set()

    def checkpoint_cosigned(self, note: str, line: str) -> None:
        """A witness cosigned ``note`` (daemon/witnessing.py's ``on_cosigned``): the
        retained checkpoint carries the line from now, if it is still the latest."""
        self._state.cosigned(note, line)
        self._wake.set()

    def delivery_record(self, delivery_id: str, record: Mapping[str, Any]) -> None:
        """``delivery.record`` from now (daemon/signoff.py): what a sign-off signs."""
        self._state.delivery_record(delivery_id, record)
        self._wake.set()

    async def notice(self, severity: str, message: str) -> None:
        level = "critical" if severity == "critical" else "info"
        payload = notice_payload(
            self._env("events"),
            level,
            str(message),
            delivery_id=self._current_delivery,
            command=getattr(message, "command", None),  # a command's answer (daemon/answers.py)
        )
        self.outbox.add("events", payload)
        self._wake.set()

    async def report(self, kind: str, data: Mapping[str, Any]) -> None:
        """A sink's recorded entry (daemon/sink_records.py), e.g. a DICOM hand-off attempt:
        on ``events``, journaled and replayed like the tracker's events."""
        payload = report_payload(self._env("events"), kind, data)
        if payload is not None:
            self.outbox.add("events", payload)
            self._wake.set()

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
                PAHO_LOG.removeHandler(self._connect_watch)

    async def _connect_loop(self) -> None:
        s = self.settings
        backoff = Backoff(BACKOFF_INITIAL_S, self.reconnect_max_s)
        attempt = 0
        while not self._closing:
            attempt += 1
            online, will = self._status_records()
            await self.outbox.wait_publishable(will)
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
                    self._takeovers.lost(exc, time.monotonic() - self._connected_at, backoff)
                else:
                    reason = _tls_hint(s, reason)
                    log.error("mqtt_connect_failed", broker=s.url, reason=reason)  # noqa: TRY400
            except (OSError, ssl.SSLError) as exc:
                self._outage = True
                self.connected.clear()
                reason = _tls_hint(s, str(exc))
                log.error("mqtt_connect_failed", broker=s.url, reason=reason)  # noqa: TRY400
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

    def _status_records(self) -> tuple[Record, Record]:
        """``status`` online and the Last Will (offline) for one connection attempt: new
        ones each time, since a broker that got a CONNECT may publish that attempt's will
        however the attempt ends. The will's ``seq`` is the larger, so that a consumer
        keeping the newest takes it over the online message."""
        on = status_payload(
            self._env("status"), True, __version__, self.site, self.room, **self._birth_says
        )
        off = status_payload(
            self._env("status"), False, __version__, self.site, self.room, **self._birth_says
        )
        return self.outbox.add("status", on), self.outbox.add("status", off)

    async def _connection(self, online: Record, will: Record, attempt_ns: int) -> None:
        s = self.settings
        if self._connect_watch is None:
            self._connect_watch = FailConnectOnTransportError(asyncio.get_running_loop())
            PAHO_LOG.addHandler(self._connect_watch)
        if self._tls is None and s.tls:
            self._tls = await asyncio.to_thread(s.tls_context)  # loads CA files: not on the loop
        will_msg = aiomqtt.Will(self._topics["status"], will.body, qos=1, retain=True)
        client = new_client(s, will=will_msg, tls=self._tls, drops=self.incoming)
        watch_refusals(client, self._refused)
        self._connect_watch.client = client
        try:
            await client.__aenter__()
        except BaseException:
            drop_socket(client)  # an orphan must not linger (and later fire its will)
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
                raise first_leaf(group) from None
            clean = True
        finally:
            self._birth = None  # nothing to defend on a connection that is gone
            self.births.dead()
            if clean:
                # DISCONNECT: the broker discards the will (offline is already published
                # and acknowledged). If that fails, the socket still goes.
                try:
                    await client.__aexit__(None, None, None)
                except (aiomqtt.MqttError, OSError):
                    drop_socket(client)
                except BaseException:
                    drop_socket(client)
                    raise
            else:
                # Not a clean end (lost link, timeout, cancellation): drop the socket
                # without DISCONNECT, so that the broker publishes the will (offline)
                # rather than keep the retained status online for good. The client is
                # not used again.
                drop_socket(client)
        self.connected.clear()
        log.info("mqtt_disconnected", broker=s.url, reason="shutdown")
        raise _Closing

    async def _watch_link(self, client: aiomqtt.Client) -> None:
        """Notices a dropped link (a takeover ends this iteration with MqttError from
        MqttCodeError(0x8E)), and reads our checkpoint topic (its retained message)."""
        cp_topic = self._topics["audit/checkpoint"]
        if self._state.verifier is not None:
            await client.subscribe(cp_topic, qos=1, timeout=CONNECT_TIMEOUT_S)
        if self.on_command is not None:
            await self._subscribe_commands(client)
        await subscribe_own_status(client, self._topics["status"], CONNECT_TIMEOUT_S)
        async for msg in client.messages:
            if self.on_command is not None and msg.topic.value.startswith(self._cmd_prefix):
                self._command(msg)
            elif msg.topic.value == self._topics["status"]:
                await self._status_seen(client, msg)
            elif (
                msg.topic.matches(cp_topic)
                and isinstance(msg.payload, bytes | bytearray)
                and await self._state.retained_checkpoint(bytes(msg.payload))
            ):
                self._wake.set()  # ours may go out now

    async def _subscribe_commands(self, client: aiomqtt.Client) -> None:
        """``cmd/#`` at QoS 1. A refusal (the broker's ACL) or a timeout is logged and the
        link goes on publishing: commands are the lesser loss than the live stream."""
        try:
            granted = await client.subscribe(
                self._cmd_prefix + "#", qos=1, timeout=CONNECT_TIMEOUT_S
            )
        except aiomqtt.MqttError as exc:
            log.error("mqtt_command_subscribe_failed", reason=str(exc))  # noqa: TRY400
            return
        codes = [g if isinstance(g, int) else int(g.value) for g in granted]
        if any(c >= 0x80 for c in codes):
            log.error("mqtt_command_subscribe_refused", codes=codes, topic=self._cmd_prefix + "#")
        else:
            log.info("mqtt_command_subscribed", topic=self._cmd_prefix + "#")

    async def _status_seen(self, client: aiomqtt.Client, msg: aiomqtt.Message) -> None:
        birth = self._birth
        if birth is not None and self.births.answer(msg.payload, birth.session, birth.seq):
            await self._send(client, birth)

    def _command(self, msg: aiomqtt.Message) -> None:
        payload = msg.payload if isinstance(msg.payload, bytes | bytearray) else b""
        kind = msg.topic.value.removeprefix(self._cmd_prefix)
        try:
            if self.on_command is not None:
                self.on_command(kind, bytes(payload), bool(msg.retain))
        except Exception:  # one bad command must not end the link for everyone
            log.exception("mqtt_command_failed")

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
        self._birth = online
        self.births.born(session=online.session, seq=online.seq)
        await self._state.reconnected(lambda rec: self._send(client, rec))
        while True:
            await self._state.publish(
                self.outbox, lambda rec: self._send(client, rec), closing=lambda: self._closing
            )
            if self._closing and time.monotonic() > self._close_deadline:
                log.warning("mqtt_close_unsent", unsent=sum(1 for _ in self.outbox.unsent()))
                break  # the rest stays in the outbox for the next start
            if not self._closing and await self.replay.send(WINDOW, partial(self._send, client)):
                continue  # a replay's, at its rate, between the live batches
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
        self._birth = None
        self.births.dead()
        await self._send(client, will)
        self.outbox.ack(will)

    async def _idle(self) -> None:
        """Wait for new records, a state change, a due rate limit or the close."""
        now = time.monotonic()
        timeout = self._state.next_due(now)
        timeout = self.replay.sooner(timeout)
        self._wake.clear()  # also the outbox's ``changed`` (start()): one wait, no tasks
        if any(True for _ in self.outbox.unsent()):
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

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


def _tls_hint(s: BrokerSettings, reason: str) -> str:
    """A TLS connection the broker closed during the handshake, without a client
    certificate configured, is most often a broker that requires one; which error the
    client sees (the broker's alert, or only the closed socket) depends on timing, so the
    likely cause is said either way."""
    if not s.tls or s.cert_file is not None or "certificate" in reason.lower():
        return reason
    if "EOF" in reason or "reset" in reason.lower() or "closed" in reason.lower():
        return (
            f"{reason} (no client certificate is configured: if the broker requires one, "
            "set [mqtt] cert_file and key_file)"
        )
    return reason
