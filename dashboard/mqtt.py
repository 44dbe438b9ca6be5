"""The dashboard's one MQTT connection: subscribe to ``{prefix}/v1/#`` and feed the rooms.

While connected it also offers the hub a ``publish`` (QoS 1, never retained) for the one
kind of thing the dashboard sends: signed commands (a physicist's sign-off, an operator's
or physicist's alarm acknowledgement; dashboard/commanding.py); without a connection there
is none, and nothing is sent or queued.

aiomqtt has no reconnect, so this is an explicit loop with capped, jittered backoff; every
change of connection state is logged and pushed to the browsers, which show every room as
offline while the dashboard itself has no broker (never frozen values as live).

Every message goes through `iortd.dashboard.state.Rooms.receive` (size, JSON, schema, seq); what
is rejected is counted there and logged here, rate-limited (`RejectLog`): the first of each
(room, reason) at once, then at most one summary line per ``REJECT_LOG_EVERY_S`` with the
count, so a flood of bad messages cannot flood the operational log.

On CONNECT the dashboard asks for an MQTT 5 Maximum Packet Size (`connect_properties`):
its payload limit plus ``PACKET_OVERHEAD`` (a PUBLISH's header, a topic of up to 64 KiB,
its properties). The broker must discard, not send, a larger packet (MQTT 5.0, section
3.1.2.11.4), so a 10 MB "telemetry" is never read into memory here; it is in the broker's
log, not in the dashboard's counts. A payload between the limit and that size still
arrives and is rejected as "payload too large", as below.

Between paho and us, aiomqtt keeps received messages in a queue that is unbounded by
default. Here it is `incoming_queue`: **one bounded queue per room, served in turn**
(issue 13: one room can never stop another from updating). Validation costs about
0.25 ms a message (docs/dashboard.md), so a single publisher of *valid* messages can
outrun it; in one shared FIFO its backlog then delayed every other room by seconds, and
once the byte bound was reached every room's messages were dropped. Now:

* a payload larger than the dashboard's limit is counted as rejected and never queued
  (paho has read it, and drops it when the callback returns), and a topic the dashboard
  passes over (the commands, ``cmd/...``) is counted as ignored and not queued
  either, so a flood of them under a room's name cannot use up that room's queue;
* each message is charged its payload plus ``MESSAGE_OVERHEAD`` (so that empty payloads
  are not free); a room may have at most ``ROOM_MESSAGES`` messages and ``ROOM_BYTES``
  waiting, all rooms together at most ``INCOMING_BYTES``. A message beyond its room's
  bounds is dropped; when all together are full, the room holding most (tracked as of
  its last push) drops its oldest, unless that is the newcomer's own room or holds no
  more than it, and then the newcomer is dropped. Either is counted under the room that
  lost it (``dropped: dashboard busy``, shown as the room's other rejects are) and in
  total (``dropped_busy``);
* the consumer takes one message from each room that has any, in turn (round robin). So
  a room's messages wait behind at most one message of each other busy room, however
  deep their backlogs: a flooding room delays and drops only its own messages.

The room of a message is its topic's ``{site}/{room}`` (`Rooms.room_of`); every topic that
names no room shares one turn. Limit: a publisher that floods under many room names gets
a turn for each, so the rooms' latency grows with the number of *busy* rooms (about
0.25 ms each); once 16 such rooms (``INCOMING_BYTES`` / ``ROOM_BYTES``) fill the total, a
quiet room's message still gets in, at the heaviest room's expense. Only the broker's
ACL (docs/dashboard.md) stops a publisher from using many names.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from functools import partial

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from iortd.dashboard.hub import Hub
from iortd.dashboard.state import Rejected, Rooms
from iortd.kernel.backoff import Backoff
from iortd.kernel.broker import BrokerSettings, BrokerUrlError
from iortd.kernel.broker import parse_broker_url as _parse_broker_url

__all__ = ["BrokerSettings", "RejectLog", "UrlError", "consume", "parse_broker_url"]

log = structlog.get_logger("iort_dashboard.mqtt")
_PAHO_LOG = logging.getLogger("iort_dashboard.paho")

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 10.0
TIMEOUT_S = 10.0  # connect and subscribe
KEEPALIVE_S = 5  # a dead link is noticed within 1.5 x this
REJECT_LOG_EVERY_S = 10.0
INCOMING_BYTES = 64 * 1024 * 1024  # received, not yet handled, all messages together
ROOM_BYTES = 4 * 1024 * 1024  # ... of one room
ROOM_MESSAGES = 4096  # ... of one room (about 2 s of validation)
MESSAGE_OVERHEAD = 512  # charged per waiting message on top of its payload
PACKET_OVERHEAD = 70 * 1024  # beyond the payload limit: fixed header, topic, properties
BUSY = "dropped: dashboard busy"
REJECT_LOG_KINDS = 1024  # (room, reason) pairs logged at first sight, then only summaries


# Broker URLs follow the rules every MQTT client of iortd shares (iortd.kernel.broker).
UrlError = BrokerUrlError
CREDENTIALS_HINT = (
    "give the user with --username and the password with --password-file or --password-env"
)


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """``(host, port, tls)`` of ``mqtt://HOST[:PORT]`` or ``mqtts://HOST[:PORT]``, as the
    daemon's ``[mqtt] url``."""
    return _parse_broker_url(url, credentials_hint=CREDENTIALS_HINT)


def connect_properties(max_payload_bytes: int) -> Properties:
    """CONNECT's properties: the Maximum Packet Size the broker may send us."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: untyped
    props.MaximumPacketSize = max_payload_bytes + PACKET_OVERHEAD
    return props


class RejectLog:
    """Rate-limited logging of rejected messages (no payload is ever logged)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: set[tuple[str, str]] = set()
        self._last = -REJECT_LOG_EVERY_S
        self.suppressed = 0

    def __call__(self, topic: str, exc: Rejected, total: int) -> bool:
        """Log ``exc`` if due; whether it was logged."""
        kind = (exc.room or "", exc.reason)
        now = self._clock()
        first = kind not in self._seen and len(self._seen) < REJECT_LOG_KINDS
        if not first and now - self._last < REJECT_LOG_EVERY_S:
            self.suppressed += 1
            return False
        self._seen.add(kind)
        self._last = now
        log.warning(
            "mqtt_message_rejected",
            topic=topic[:200],
            room=exc.room,
            reason=exc.reason,  # bounded, and never a value from the payload
            rejected_total=total,
            not_logged_since_last=self.suppressed,
        )
        self.suppressed = 0
        return True


def _size(m: aiomqtt.Message) -> int:
    p = m.payload
    return len(p) if isinstance(p, bytes | bytearray | str) else 0


class FairQueue:
    """Messages waiting, per room, and the rooms with any in turn order (the storage of
    `incoming_queue`'s queue)."""

    def __init__(self) -> None:
        self.rooms: dict[str, deque[tuple[aiomqtt.Message, int]]] = {}
        self.room_bytes: dict[str, int] = {}
        self.turns: deque[str] = deque()  # rooms with a message waiting, next first
        # The room holding most bytes, as of its last push (cheap, and close enough: it
        # is reset to the next busy room when it empties).
        self.heaviest: str | None = None
        self.bytes = 0
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[aiomqtt.Message]:
        for waiting in self.rooms.values():
            for item, _ in waiting:
                yield item

    def admits(self, key: str, cost: int, *, room_bytes: int, room_n: int) -> bool:
        """Whether ``key``'s own bounds leave room for one more message of ``cost``."""
        waiting = self.rooms.get(key)
        return waiting is None or (
            len(waiting) < room_n and self.room_bytes[key] + cost <= room_bytes
        )

    def make_way(self, key: str, cost: int) -> tuple[str, aiomqtt.Message] | None:
        """Drop the oldest message of the heaviest room, if that is another room holding
        more than ``key`` would with ``cost`` more (and it keeps one message); the room
        and the message dropped, or None (then the newcomer is the one to drop)."""
        h = self.heaviest
        if h is None or h == key or len(self.rooms[h]) <= 1:
            return None
        if self.room_bytes[h] <= self.room_bytes.get(key, 0) + cost:
            return None
        item, dropped = self.rooms[h].popleft()
        self.room_bytes[h] -= dropped
        self.bytes -= dropped
        self.count -= 1
        return h, item

    def push(self, key: str, item: aiomqtt.Message, cost: int) -> None:
        waiting = self.rooms.get(key)
        if waiting is None:
            waiting = self.rooms[key] = deque()
            self.room_bytes[key] = 0
            self.turns.append(key)
        waiting.append((item, cost))
        self.room_bytes[key] += cost
        if self.heaviest is None or self.room_bytes[key] > self.room_bytes[self.heaviest]:
            self.heaviest = key
        self.bytes += cost
        self.count += 1

    def pop(self) -> aiomqtt.Message:
        key = self.turns.popleft()
        waiting = self.rooms[key]
        item, cost = waiting.popleft()
        if waiting:
            self.turns.append(key)
            self.room_bytes[key] -= cost
        else:
            del self.rooms[key], self.room_bytes[key]
            if key == self.heaviest:
                self.heaviest = self.turns[0] if self.turns else None
        self.bytes -= cost
        self.count -= 1
        return item


def incoming_queue(
    rooms: Rooms,
    on_reject: Callable[[str, Rejected], object],
    max_bytes: int = INCOMING_BYTES,
    *,
    room_bytes: int = ROOM_BYTES,
    room_messages: int = ROOM_MESSAGES,
) -> type[asyncio.Queue[aiomqtt.Message]]:
    """aiomqtt's incoming message queue class: per room, bounded, served in turn (see the
    module notes)."""

    def busy(topic: str, key: str) -> None:
        rooms.dropped_busy += 1
        exc = Rejected(BUSY, "incoming queue full", room=key)
        rooms.refuse(topic, exc)
        on_reject(topic, exc)

    class Incoming(asyncio.Queue[aiomqtt.Message]):
        _queue: FairQueue  # asyncio.Queue's storage, replaced in _init
        _next: tuple[str, int] = ("", 0)  # the room and cost of the message being put

        def _init(self, maxsize: int) -> None:
            self._queue = FairQueue()

        @property
        def bytes(self) -> int:
            return self._queue.bytes

        def put_nowait(self, item: aiomqtt.Message) -> None:
            size = _size(item)
            topic = item.topic.value
            rooms.arrived(topic)
            if size > rooms.max_payload_bytes:
                exc = Rejected(
                    "payload too large",
                    f"payload of {size} bytes is too large (limit {rooms.max_payload_bytes})",
                )
                rooms.refuse(topic, exc)
                on_reject(topic, exc)
                return
            if rooms.not_shown(topic):  # passed over anyway: takes no place in a queue
                rooms.ignored += 1
                return
            key = rooms.room_of(topic)
            cost = size + MESSAGE_OVERHEAD
            fits = self._queue.admits(key, cost, room_bytes=room_bytes, room_n=room_messages)
            while fits and self._queue.bytes + cost > max_bytes:
                # All rooms together are full: the heaviest room makes way, or nobody.
                made = self._queue.make_way(key, cost)
                if made is None:
                    fits = False
                else:
                    busy(made[1].topic.value, made[0])
            if not fits:
                busy(topic, key)
                return
            self._next = (key, cost)
            super().put_nowait(item)

        def _put(self, item: aiomqtt.Message) -> None:
            key, cost = self._next
            self._queue.push(key, item, cost)

        def _get(self) -> aiomqtt.Message:
            return self._queue.pop()

    return Incoming


async def _publish(client: aiomqtt.Client, topic: str, payload: bytes) -> None:
    await client.publish(topic, payload, qos=1, retain=False, timeout=TIMEOUT_S)


async def consume(settings: BrokerSettings, hub: Hub) -> None:
    """Run until cancelled: connect, subscribe, apply every message; reconnect on loss."""
    backoff = Backoff(BACKOFF_INITIAL_S, BACKOFF_MAX_S)
    tls = await asyncio.to_thread(settings.tls_context) if settings.tls else None
    identifier = settings.client_id or f"iort-dashboard-{uuid.uuid4().hex[:12]}"
    reject_log = RejectLog()
    queue_type = incoming_queue(
        hub.rooms, lambda topic, exc: reject_log(topic, exc, hub.rooms.rejected)
    )
    while True:
        log.info("mqtt_connecting", broker=settings.url)
        connected = False
        try:
            client = aiomqtt.Client(
                settings.host,
                settings.port,
                logger=_PAHO_LOG,
                identifier=identifier,
                username=settings.username,
                password=settings.password,
                protocol=aiomqtt.ProtocolVersion.V5,
                keepalive=settings.keepalive_s,
                timeout=TIMEOUT_S,
                queue_type=queue_type,
                tls_context=tls,
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                properties=connect_properties(hub.rooms.max_payload_bytes),
            )
            async with client:
                await client.subscribe(f"{settings.prefix}/v1/#", qos=1, timeout=TIMEOUT_S)
                hub.publish = partial(_publish, client)  # the signed commands the page sends
                connected = True
                backoff.reset()
                log.info("mqtt_connected", broker=settings.url)
                hub.set_broker(True, "connected")
                # Bounded by the keep-alive: a dead link raises MqttError within 1.5 x it.
                async for message in client.messages:
                    payload = message.payload
                    raw = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
                    try:
                        acc = hub.rooms.receive(
                            message.topic.value,
                            raw,
                            time.monotonic(),
                            retained=bool(message.retain),
                            wall=time.time(),
                        )
                    except Rejected as exc:
                        reject_log(message.topic.value, exc, hub.rooms.rejected)
                        continue
                    if acc is not None:
                        hub.message(acc)
                    for site, up in hub.rooms.links.take_changes():
                        # A site's bridge to this (central) broker: dashboard/links.py.
                        log.info("site_link_up" if up else "site_link_down", site=site)
            hub.set_broker(False, "the connection ended")
        except aiomqtt.MqttError as exc:
            reason = str(exc) or type(exc).__name__
            event = "mqtt_connection_lost" if connected else "mqtt_connect_failed"
            log.error(event, broker=settings.url, reason=reason)  # noqa: TRY400
            hub.set_broker(False, reason)
        except (OSError, ssl.SSLError) as exc:
            log.error("mqtt_connect_failed", broker=settings.url, reason=str(exc))  # noqa: TRY400
            hub.set_broker(False, str(exc))
        except Exception as exc:
            # A bug here must not leave the page showing a frozen stream as live.
            log.exception("mqtt_consumer_error", broker=settings.url)
            hub.set_broker(False, f"internal error: {type(exc).__name__}")
        hub.publish = None  # nothing is sent while there is no connection
        delay = backoff.next_delay()
        log.info("mqtt_reconnect_wait", delay_s=round(delay, 3))
        await asyncio.sleep(delay)
