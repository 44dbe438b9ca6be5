"""``iort-ingest run``: the central consumer that keeps every room's streams and repairs
their gaps (issue 22).

* **Durable MQTT session** (MQTT v5, ``clean_start`` false, ``session_expiry_s``): while
  the ingest is away the broker queues its QoS 1 messages. Subscribed at QoS 1 to
  ``{prefix}/v1/+/+/{telemetry,applicator,events,skip,status}``.
* **Checked, per room**: a message on a topic whose site or room is not a slug, larger
  than :data:`MAX_PAYLOAD`, not JSON or not valid against its published schema
  (ingest/validate.py) is counted against that room (``invalid``) and dropped; nothing
  one room sends can stop or skew another's bookkeeping (each message is handled in its
  own ``try``).
* **Tracked** (ingest/lines.py): per (room, topic) every seq received or declared on
  ``skip``; a repeated (session, seq) is counted (``repeats``) and stored once.
* **Repaired**: a gap open ``settle_s`` is asked for with a signed ``cmd/replay`` (the
  ingest's replay-only key, auditlog/command.py), again while it stays open, at most
  ``max_per_minute`` requests per room; not while the ingest is still taking in a backlog
  of that room (:meth:`Ingest.draining`: what looks missing may still be queued for it),
  and not again while it is taking in any room's backlog (an answer waits behind it).
  A message that fills a known gap is ``repaired``; a closed gap's time from noticed to
  closed is kept (``repairs``).
* **Stored** (ingest/store.py) in batches every :data:`FLUSH_S` in a worker thread. The
  broker has the message acknowledged before it is stored: a crash in between leaves a
  gap, which is repaired like any other once newer messages show it.
* **Online state**: ``{prefix}/v1/_ingest/{name}/status`` retained, ``online: true`` at
  each connection and ``online: false`` as the Last Will and at a clean stop.
* **Reconnection**: our own loop, capped jittered backoff (kernel/backoff.py), each state
  change logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import orjson
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from iortd.auditlog.command import sign_command
from iortd.auditlog.note import Signer
from iortd.ingest.config import IngestConfig
from iortd.ingest.lines import Gap, GapPolicy, Request, SeqLine
from iortd.ingest.store import Message, Skip, Store
from iortd.ingest.validate import Validators
from iortd.kernel.backoff import Backoff
from iortd.kernel.broker import BrokerSettings, parse_broker_url
from iortd.kernel.timefmt import utc_ts
from iortd.kernel.version import __version__

__all__ = ["Ingest", "Stats", "settings_of"]

log = structlog.get_logger("iortd.ingest")

STREAMS = ("telemetry", "applicator", "events")
READ = (*STREAMS, "skip", "status")
FLUSH_S = 0.2
TICK_S = 0.25
STATS_S = 10.0
IO_TIMEOUT_S = 10.0
SETUP_TIMEOUT_S = 60.0
BASE_LAG_S = 60.0  # the least lag of the last minute is a room's usual one
BEHIND_MARGIN_S = 2.0
MAX_PAYLOAD = 64 * 1024
_SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


@dataclass
class Stats:
    received: int = 0
    repeats: int = 0
    repaired: int = 0
    skipped: int = 0  # seqs newly accounted for by a declaration
    invalid: int = 0
    requests: int = 0
    latency_s: deque[float] = field(default_factory=lambda: deque(maxlen=200_000))
    repair_s: list[float] = field(default_factory=list)


def settings_of(cfg: IngestConfig) -> BrokerSettings:
    m = cfg.mqtt
    host, port, tls = parse_broker_url(m.url, credentials_hint="use mqtt.username")
    password = None
    if m.password_file is not None:
        password = m.password_file.read_text("utf-8").rstrip("\n")
    return BrokerSettings(
        host=host, port=port, tls=tls, prefix=m.prefix, client_id=f"iort-ingest-{cfg.name}",
        keepalive_s=m.keepalive_s, username=m.username, password=password,
        ca_file=m.ca_file, cert_file=m.cert_file, key_file=m.key_file,
    )  # fmt: skip


class Ingest:
    def __init__(
        self,
        cfg: IngestConfig,
        store: Store,
        signer: Signer,
        *,
        settings: BrokerSettings | None = None,
        wall: Any = time.time,
        mono: Any = time.monotonic,
    ) -> None:
        self.cfg, self.store, self.signer = cfg, store, signer
        self.settings = settings or settings_of(cfg)
        r = cfg.replay
        self.policy = GapPolicy(r.settle_s, r.retry_s, r.retry_max_s)
        self.validators = Validators(bodies=cfg.validate_ == "full")
        self._wall, self._mono = wall, mono
        self.lines: dict[tuple[str, str, str], SeqLine] = {}
        self.stats = Stats()
        self.rooms: set[tuple[str, str]] = set()
        self._asked: dict[tuple[str, str], deque[float]] = {}
        self._base_lag: dict[tuple[str, str], tuple[float, float]] = {}
        self._behind: dict[tuple[str, str], tuple[float, float]] = {}
        self._status_session: dict[tuple[str, str], int] = {}
        self._msgs: list[Message] = []
        self._skips: list[Skip] = []
        self._counters: Counter[tuple[str, str, str]] = Counter()
        self._requests: list[tuple[str, str, str, int, int, int, str, float]] = []
        self._repairs: list[tuple[str, str, str, int, int, float, float, int]] = []
        self._status: list[tuple[str, str, int, bool, bytes, float]] = []
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.status_topic = f"{self.settings.prefix}/v1/_ingest/{cfg.name}/status"
        self._prefix = f"{self.settings.prefix}/v1/"

    # ---- start: the lines from the store ---------------------------------------------

    def rebuild(self) -> int:
        """Blocking (a worker thread at start): every line from what is stored."""
        n = 0
        for site, room, topic, session, seq in self.store.seqs():
            self._line(site, room, topic).received(seq, session)
            n += 1
        for site, room, topic, first, last in self.store.declared():
            self._line(site, room, topic).add(first, last)
        now = self._mono()
        for line in self.lines.values():
            line.reconcile(now, self.policy)
        return n

    def _line(self, site: str, room: str, topic: str) -> SeqLine:
        key = (site, room, topic)
        line = self.lines.get(key)
        if line is None:
            line = self.lines[key] = SeqLine(topic)
            self.rooms.add((site, room))
        return line

    # ---- messages in ------------------------------------------------------------------

    def on_message(self, topic: str, raw: bytes) -> None:
        """One message; never raises (one room's message must not stop the others)."""
        parts = topic.removeprefix(self._prefix).split("/")
        if not topic.startswith(self._prefix) or len(parts) != 3:
            return
        site, room, name = parts
        if name not in READ or not (_SLUG.fullmatch(site) and _SLUG.fullmatch(room)):
            return  # not a room's topic (our own status, another tool's)
        try:
            self._message(site, room, name, raw)
        except Exception:
            self._invalid(site, room, "error")
            log.exception("ingest_message_failed", site=site, room=room, topic=name)

    def _invalid(self, site: str, room: str, why: str) -> None:
        self.stats.invalid += 1
        self._counters[(site, room, "invalid")] += 1
        if self.stats.invalid <= 100 or self.stats.invalid % 1000 == 0:
            log.warning("ingest_invalid", site=site, room=room, reason=why)

    def _message(self, site: str, room: str, name: str, raw: bytes) -> None:
        if len(raw) > MAX_PAYLOAD:
            self._invalid(site, room, "oversized")
            return
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self._invalid(site, room, "not JSON")
            return
        problem = self.validators.problem(name, payload)
        if problem is not None:
            self._invalid(site, room, problem)
            return
        now = self._wall()
        session, seq = payload["session"], payload["seq"]
        if name == "status":
            key = (site, room)
            if session >= self._status_session.get(key, 0):  # an older session's will: ignored
                self._status_session[key] = session
                self._status.append((site, room, session, payload["online"], raw, now))
            return
        if name == "skip":
            d = payload["skipped"]
            line = self._line(site, room, d["topic"])
            new = line.add(d["first"], d["last"])
            self.stats.skipped += new
            self._counters[(site, room, "skipped")] += new
            self._skips.append(
                Skip(site, room, session, seq, d["topic"], d["session"], d["first"], d["last"],
                     d["reason"], now)
            )  # fmt: skip
            return
        line = self._line(site, room, name)
        repaired = line.in_gap(seq) is not None and not line.contains(seq)
        if line.received(seq, session):
            self.stats.received += 1
            self._counters[(site, room, "received")] += 1
            if repaired:
                self.stats.repaired += 1
                self._counters[(site, room, "repaired")] += 1
        else:
            self.stats.repeats += 1
            self._counters[(site, room, "repeats")] += 1
        if not payload["historical"]:
            with contextlib.suppress(ValueError):
                made = datetime.fromisoformat(payload["ts"][:-1]).replace(tzinfo=UTC)
                self._lag(site, room, now - made.timestamp())
        self._msgs.append(
            Message(site, room, name, session, seq, payload["ts"], payload["historical"],
                    repaired, now, raw)
        )  # fmt: skip

    def _lag(self, site: str, room: str, lag: float) -> None:
        """How late the room's live messages arrive, against the least seen lately (so a
        clock offset between the room and here cancels out); when the room was last heard."""
        self.stats.latency_s.append(lag)
        key = (site, room)
        mono = self._mono()
        base, since = self._base_lag.get(key, (lag, mono))
        if lag <= base or mono - since > BASE_LAG_S:
            base, since = lag, mono
        self._base_lag[key] = (base, since)
        self._behind[key] = (lag - base, mono)

    def draining(self, site: str, room: str, now: float) -> bool:
        """Still taking in a backlog of this room's (its live messages arrive more than
        ``settle_s`` later than usual, and it was heard from within ``settle_s``): a hole
        now may be what is still queued for us, not lost. Asked for once it is drained."""
        behind, at = self._behind.get((site, room), (0.0, -1e9))
        return behind > self.policy.settle_s + BEHIND_MARGIN_S and now - at < self.policy.settle_s

    # ---- gaps: replay requests ------------------------------------------------------

    def due_requests(self) -> list[tuple[str, str, Request]]:
        """Reconcile every line; the requests to send now (rate-limited per room)."""
        now = self._mono()
        out: list[tuple[str, str, Request]] = []
        # Behind on any room: what a room sends again waits behind that backlog here, so
        # asking again now would only bring it twice.
        retries = not any(self.draining(site, room, now) for site, room in self._behind)
        for (site, room, topic), line in self.lines.items():
            for g in line.reconcile(now, self.policy):
                self._closed(site, room, topic, g, now)
            if not line.gaps or self.draining(site, room, now):
                continue
            asked = self._asked.setdefault((site, room), deque())
            while asked and now - asked[0] >= 60.0:
                asked.popleft()
            budget = self.cfg.replay.max_per_minute - len(asked)
            if budget <= 0:
                continue
            for req in line.due(now, self.policy, budget, retries=retries):
                asked.append(now)
                out.append((site, room, req))
        return out

    def _closed(self, site: str, room: str, topic: str, g: Gap, now: float) -> None:
        if g.attempts == 0:
            return  # closed by itself (late or reordered): not a repair
        self.stats.repair_s.append(now - g.noticed)
        self._repairs.append(
            (site, room, topic, g.first, g.last, self._wall() - (now - g.noticed), self._wall(),
             g.attempts)
        )  # fmt: skip

    def request_bytes(self, site: str, room: str, req: Request) -> tuple[str, bytes, str]:
        body = {"topic": req.topic, "session": req.session, "first": req.first, "last": req.last}
        cmd = sign_command(
            "replay", body, signer=self.signer, holder=self.signer.name, site=site, room=room,
            ttl_s=self.cfg.replay.ttl_s,
        )  # fmt: skip
        topic = f"{self._prefix}{site}/{room}/cmd/replay"
        return topic, orjson.dumps(cmd), str(cmd["nonce"])

    # ---- the store ----------------------------------------------------------------------

    async def flush(self) -> None:
        batch = (self._msgs, self._skips, dict(self._counters), self._requests,
                 self._repairs, self._status)  # fmt: skip
        if not any(batch):
            return
        self._msgs, self._skips, self._requests, self._repairs, self._status = [], [], [], [], []
        self._counters = Counter()
        try:
            await asyncio.to_thread(self.store.write, *batch)
        except Exception as exc:
            # Not stored: what the lines account for is in memory only; a restart shows it
            # as gaps again, which the rooms repair. Said loudly, once per failure.
            log.critical("ingest_store_failed", error=str(exc), messages=len(batch[0]))

    # ---- the connection -----------------------------------------------------------------

    def _status_bytes(self, online: bool) -> bytes:
        return orjson.dumps(
            {"schema": "iort/v1", "name": self.cfg.name, "online": online,
             "ts": utc_ts(datetime.now(UTC)), "software_version": __version__}
        )  # fmt: skip

    def _client_for(self, tls: ssl.SSLContext | None) -> aiomqtt.Client:
        s = self.settings
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.cfg.mqtt.session_expiry_s
        return aiomqtt.Client(
            s.host, s.port, identifier=s.client_id, username=s.username, password=s.password,
            protocol=aiomqtt.ProtocolVersion.V5, clean_start=False, properties=props,
            will=aiomqtt.Will(self.status_topic, self._status_bytes(False), qos=1, retain=True),
            keepalive=s.keepalive_s, timeout=IO_TIMEOUT_S, tls_context=tls,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )  # fmt: skip

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``: connect (again and again), read, flush, ask."""
        async with asyncio.TaskGroup() as tg:
            ticker = tg.create_task(self._ticker(stop), name="ingest-ticker")
            await self._connect_loop(stop)
            await ticker
        await self.flush()

    async def _connect_loop(self, stop: asyncio.Event) -> None:
        s = self.settings
        backoff = Backoff(0.5, 10.0)
        tls = await asyncio.to_thread(s.tls_context)
        while not stop.is_set():
            log.info("ingest_connecting", broker=s.url)
            try:
                await self._connection(stop, tls)
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                self._client = None
                log.error("ingest_connection_lost", broker=s.url, reason=str(exc))  # noqa: TRY400
            else:
                return
            delay = backoff.next_delay()
            log.info("ingest_reconnect_wait", delay_s=round(delay, 3))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()

    async def _connection(self, stop: asyncio.Event, tls: ssl.SSLContext | None) -> None:
        client = self._client_for(tls)
        async with client:
            # Read at once: a durable session's backlog arrives before the answers to what
            # is sent below, which therefore get a long bound (SETUP_TIMEOUT_S).
            reader = asyncio.ensure_future(self._read(client))
            stopper = asyncio.ensure_future(stop.wait())
            try:
                online = self._status_bytes(True)
                await client.publish(
                    self.status_topic, online, qos=1, retain=True, timeout=SETUP_TIMEOUT_S
                )
                for name in READ:
                    topic = f"{self._prefix}+/+/{name}"
                    await client.subscribe(topic, qos=1, timeout=SETUP_TIMEOUT_S)
                self._client = client
                self.connected.set()
                log.info("ingest_connected", broker=self.settings.url, rooms=len(self.rooms))
                done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._client = None
                self.connected.clear()
                stopper.cancel()
                if not reader.done():
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reader
            if reader in done:  # the link ended it: its error (or it ended for no reason)
                reader.result()
                raise aiomqtt.MqttError("the broker ended the message stream")
            await client.publish(
                self.status_topic, self._status_bytes(False), qos=1, retain=True, timeout=2.0
            )
        log.info("ingest_disconnected", reason="stop")

    async def _read(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            payload = msg.payload if isinstance(msg.payload, bytes | bytearray) else b""
            self.on_message(msg.topic.value, bytes(payload))

    async def _ticker(self, stop: asyncio.Event) -> None:
        last_flush = last_stats = self._mono()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    await stop.wait()
            now = self._mono()
            if now - last_flush >= FLUSH_S:
                last_flush = now
                await self.flush()
            client = self._client
            if client is not None:
                for site, room, req in self.due_requests():
                    topic, raw, nonce = self.request_bytes(site, room, req)
                    try:
                        await client.publish(topic, raw, qos=1, timeout=IO_TIMEOUT_S)
                    except aiomqtt.MqttError as exc:
                        log.warning("ingest_request_not_sent", reason=str(exc))
                        break
                    self.stats.requests += 1
                    self._counters[(site, room, "requests")] += 1
                    self._requests.append(
                        (site, room, req.topic, req.session, req.first, req.last, nonce,
                         self._wall())
                    )  # fmt: skip
                    log.info("ingest_replay_requested", site=site, room=room, nonce=nonce,
                             topic=req.topic, session=req.session, first=req.first,
                             last=req.last)  # fmt: skip
            if now - last_stats >= STATS_S:
                last_stats = now
                log.info("ingest_stats", **self.summary())

    def summary(self) -> dict[str, Any]:
        st = self.stats
        missing = sum(line.missing() for line in self.lines.values())
        return {
            "rooms": len(self.rooms), "received": st.received, "repeats": st.repeats,
            "repaired": st.repaired, "skipped": st.skipped, "invalid": st.invalid,
            "requests": st.requests, "missing": missing,
            "open_gaps": sum(len(line.gaps) for line in self.lines.values()),
        }  # fmt: skip
