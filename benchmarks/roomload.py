"""Room-load generator: simulated rooms publishing through the daemon's real MQTT code.

Each room here is what a daemon's live stream is made of, without the rest of the daemon:

* a source console and an applicator reader/stand, the in-process simulators the ``sim``
  driver uses (simulators/driver.py: ``SimDriver``, ``SimApplicatorDriver``), read every
  ``period`` seconds (10 Hz by default) on an absolute schedule, as a device loop does;
* the real delivery tracker (daemon/tracker), fed each reading, and ticked every period,
  whose view makes the ``Sample`` / ``ApplicatorSample`` the daemon would hand its sinks
  (the same construction as daemon/service.py);
* the real MQTT sink and outbox (daemon/mqtt/sink.py, outbox.py), one per room with its
  own outbox directory and client id: every sample published at QoS 1 from memory within
  a durable block of seqs and journaled in group commits, every event journaled before it
  is published, replayed after an outage, and so on, exactly as in ``iortd run``.

What is *not* here: the audit log, the health endpoint, the sink queue and the
per-device tasks of the composition root. Of the command intake, only replay requests
are taken, with ``--keyring``: each ``cmd/replay`` is judged by the real checks
(auditlog/command.py: signature, role, room, expiry, nonce) and served by the sink
(``MqttSink.serve_replay``, daemon/mqtt/replay.py: the outbox's held messages again,
historical; the rest declared on ``skip``), as the daemon does, without the audit log's
record of it; acknowledged messages are held ``--retention-s`` for that. A room here
therefore costs less CPU than a real ``iortd run``; the room-cost benchmark runs one real
daemon beside it to show by how much. The broker and the dashboard see the same traffic either way.

Used by benchmarks/room_cost.py as a separate process (its CPU is measured apart from
the broker's), and meant to be reused to load a broker or a bridge fabric:

    .venv/bin/python benchmarks/roomload.py --port PORT --dir DIR --rooms N [--first K]
        [--site SITE] [--hz 10] [--profile intrabeam] [--credentials FILE]
        [--keyring FILE] [--retention-s 600]

``--credentials``: a JSON file ``{"room-000": ["user", "password"], ...}`` (a broker with
per-room accounts, such as a fabric's site broker; ``iortd fabric-config``).

It prints one JSON line ``{"ready": N}`` on stdout once every room is connected, runs
until SIGTERM or SIGINT (SIGUSR1 first stops the readings and keeps the rooms connected,
answering replay requests), closes every sink as the daemon does, and prints one JSON line
of counts (readings taken, telemetry and applicator messages handed to the sinks,
messages still unsent, late ticks) before it exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
import structlog

from iortd.auditlog.command import CommandRejected, NonceBook, check_command
from iortd.auditlog.keyring import Keyring, load_keyring
from iortd.daemon.mqtt.link import client_id_for
from iortd.daemon.mqtt.replay import ReplayRange, ReplayRefused, parse_range
from iortd.daemon.mqtt.sink import MqttSink
from iortd.daemon.sinks import ApplicatorSample, Sample
from iortd.daemon.tracker import DeliveryTracker, TrackerSettings
from iortd.drivers.interface import DriverContext
from iortd.kernel.broker import BrokerSettings
from iortd.kernel.clock import SystemClock
from iortd.kernel.logs import configure_logging
from iortd.simulators.driver import SimApplicatorDriver, SimDriver, SimOptions

__all__ = ["Counts", "Room", "run_rooms"]

log = structlog.get_logger("roomload")

CONNECT_WITHIN_S = 30.0
CLOSE_WITHIN_S = 10.0
APPLICATOR = "SPH30"  # the intrabeam profile's, as in config/demo.toml


@dataclass(slots=True)
class Counts:
    readings: int = 0
    telemetry: int = 0
    applicator: int = 0
    events: int = 0
    late: int = 0  # periods whose reading began more than one period late
    unsent: int = 0
    replays: int = 0  # replay requests served
    replayed: int = 0  # messages sent again for them
    replay_refused: int = 0


@dataclass
class Room:
    """One simulated room: two devices, the tracker, the MQTT sink with its outbox."""

    index: int
    sink: MqttSink
    source: SimDriver
    reader: SimApplicatorDriver
    tracker: DeliveryTracker
    counts: Counts = field(default_factory=Counts)

    @classmethod
    def build(
        cls,
        index: int,
        port: int,
        directory: Path,
        *,
        site: str,
        profile: str,
        seed: int,
        login: tuple[str, str] | None = None,
        retention_s: float = 600.0,
    ) -> Room:
        room = f"room-{index:03d}"
        clock = SystemClock()
        ctx = DriverContext(clock=clock, seed=seed + index)
        # Each room starts its beam a little later than the one before, so that the rooms'
        # events (self-test, arming, beam-on) do not all land in the same period.
        opts = SimOptions(
            profile=profile,
            applicator=APPLICATOR,
            preset_gy=20.0,
            start_delay_s=2.0 + (index % 10) * 0.3,
            serial=f"SIM-LOAD-{index:03d}",
        )
        settings = BrokerSettings(
            host="127.0.0.1",
            port=port,
            tls=False,
            client_id=client_id_for(site, room, f"roomload-{directory.name}-{index}"),
            keepalive_s=10,
            username=None if login is None else login[0],
            password=None if login is None else login[1],
        )
        sink = MqttSink(
            settings, directory / room / "mqtt-outbox", site=site, room=room, simulated=True,
            replay_retention_s=retention_s,
        )  # fmt: skip
        tracker = DeliveryTracker(
            TrackerSettings(
                stale_after_s=0.5,
                delivery_id_prefix=room,
                applicator_displacement_mm=2.0,
                applicator_tilt_deg=2.0,
            ),
            ("stand-1",),
        )
        return cls(index, sink, SimDriver(opts, ctx), SimApplicatorDriver(opts, ctx), tracker)

    async def poll(self, period_s: float, stop: asyncio.Event) -> None:
        """Read both devices every period until ``stop``, as two device loops would."""
        loop = asyncio.get_running_loop()
        clock = SystemClock()
        next_at = loop.time()
        while not stop.is_set():
            if loop.time() - next_at > period_s:
                self.counts.late += 1
                next_at = loop.time()
            reading = await self.source.read()
            events = self.tracker.on_reading(reading)
            await self.sink.sample(
                Sample(
                    device="source-1",
                    reading=reading,
                    delivery=self.tracker.snapshot(reading.mono_ns),
                    interlocks=dict(self.tracker.interlocks),
                    all_clear=self.tracker.all_clear,
                )
            )
            app = await self.reader.read_applicator()
            events += self.tracker.on_applicator("stand-1", app)
            view = self.tracker.applicator_view
            snap = self.tracker.snapshot(app.mono_ns)
            open_id = snap.delivery_id if snap is not None and snap.termination is None else None
            await self.sink.applicator(
                ApplicatorSample(
                    device="stand-1",
                    reading=app,
                    delivery_id=open_id,
                    displacement_from_beam_on_mm=None
                    if view is None
                    else view.displacement_from_beam_on_mm,
                    peak_displacement_mm=None if view is None else view.peak_displacement_mm,
                )
            )
            events += self.tracker.on_tick(clock.monotonic_ns(), clock.utc())
            if events:
                await self.sink.events(events, self.tracker.snapshot())
                self.counts.events += len(events)
            self.counts.readings += 2
            self.counts.telemetry += 1
            self.counts.applicator += 1
            next_at += period_s
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_at - loop.time())):
                    await stop.wait()


class ReplayIntake:
    """``cmd/replay`` for one generated room: the daemon's checks, then its sink serves it
    (daemon/commands.py and daemon/replay.py without the audit log). Never raises."""

    def __init__(self, room: Room, keyring: Keyring) -> None:
        self.room, self.keyring = room, keyring
        self.seen = NonceBook(60.0)
        self.tasks: set[asyncio.Task[None]] = set()

    def __call__(self, kind: str, raw: bytes, retained: bool) -> None:
        sink, counts = self.room.sink, self.room.counts
        if retained or kind != "replay":
            counts.replay_refused += 1
            return
        try:
            now = datetime.now(UTC)
            cmd = check_command(raw, self.keyring, site=sink.site, room=sink.room, now=now,
                                skew_s=60.0, seen=self.seen)  # fmt: skip
            self.seen.add(cmd.nonce, cmd.expires_at)
            rng = parse_range(cmd.body)
            sink.replay.admit()
        except (CommandRejected, ReplayRefused) as exc:
            counts.replay_refused += 1
            log.warning("roomload_replay_refused", room=sink.room, reason=str(exc)[:120])
            return
        task = asyncio.get_running_loop().create_task(self._serve(rng))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, rng: ReplayRange) -> None:
        try:
            served = await self.room.sink.serve_replay(rng)
        except ReplayRefused as exc:
            self.room.counts.replay_refused += 1
            log.warning("roomload_replay_refused", room=self.room.sink.room, reason=exc.reason)
            return
        self.room.counts.replays += 1
        self.room.counts.replayed += served.served
        log.info("roomload_replay_served", room=self.room.sink.room, **rng.fields(),
                 served=served.served, skipped=served.skipped_seqs)  # fmt: skip


async def run_rooms(
    rooms: list[Room],
    period_s: float,
    stop: asyncio.Event,
    ready: asyncio.Event,
    quiet: asyncio.Event | None = None,
) -> Counts:
    """Connect every room's sink, set ``ready``, poll at ``period_s`` until ``quiet`` (the
    sinks stay connected: they still answer replay requests) or ``stop``, close the sinks
    at ``stop`` (bounded, as the daemon's shutdown) and return the summed counts."""
    quiet = quiet or stop
    async with contextlib.AsyncExitStack() as stack:
        for r in rooms:
            await stack.enter_async_context(r.source)
            await stack.enter_async_context(r.reader)
            await r.sink.start()
        async with asyncio.TaskGroup() as tg:
            for r in rooms:
                tg.create_task(r.sink.run(), name=f"mqtt-{r.index}")
            async with asyncio.timeout(CONNECT_WITHIN_S):
                for r in rooms:
                    await r.sink.connected.wait()
            ready.set()
            pollers = [
                tg.create_task(_staggered(r, i * period_s / len(rooms), period_s, quiet))
                for i, r in enumerate(rooms)
            ]
            await stop.wait()
            quiet.set()
            await asyncio.gather(*pollers)
            total = Counts()
            for r in rooms:
                total.unsent += sum(1 for _ in r.sink.outbox.unsent())
            async with asyncio.timeout(CLOSE_WITHIN_S):
                await asyncio.gather(*(r.sink.aclose() for r in rooms))
    for r in rooms:
        names = ("readings", "telemetry", "applicator", "events", "late", "replays", "replayed",
                 "replay_refused")  # fmt: skip
        for name in names:
            setattr(total, name, getattr(total, name) + getattr(r.counts, name))
    return total


async def _staggered(room: Room, offset_s: float, period_s: float, stop: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(offset_s):
            await stop.wait()
    await room.poll(period_s, stop)


async def _main(args: argparse.Namespace) -> int:
    stop, ready, quiet = asyncio.Event(), asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # SIGUSR1: stop making readings, stay connected (serve replays) until SIGTERM.
    loop.add_signal_handler(signal.SIGUSR1, quiet.set)
    logins: dict[str, list[str]] = {}
    if args.credentials is not None:
        logins = orjson.loads(args.credentials.read_bytes())
    rooms = []
    for i in range(args.first, args.first + args.rooms):
        login = logins.get(f"room-{i:03d}")
        rooms.append(
            Room.build(i, args.port, args.dir, site=args.site, profile=args.profile,
                       seed=args.seed, login=None if login is None else (login[0], login[1]),
                       retention_s=args.retention_s)
        )  # fmt: skip
    if args.keyring is not None:
        keyring = load_keyring(args.keyring)
        for r in rooms:
            r.sink.on_command = ReplayIntake(r, keyring)

    async def announce() -> None:
        await ready.wait()
        sys.stdout.buffer.write(orjson.dumps({"ready": len(rooms)}) + b"\n")
        sys.stdout.flush()

    async def stats() -> None:
        # The outbox depth, now and then: messages made and not yet acknowledged.
        await ready.wait()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(args.stats_s):
                    await stop.wait()
            per_room = [sum(1 for _ in r.sink.outbox.unsent()) for r in rooms]
            line = {"unsent": sum(per_room), "max_room_unsent": max(per_room)}
            sys.stdout.buffer.write(orjson.dumps(line) + b"\n")
            sys.stdout.flush()

    announcer = asyncio.create_task(announce())
    reporter = asyncio.create_task(stats()) if args.stats_s > 0 else None
    counts = await run_rooms(rooms, 1.0 / args.hz, stop, ready, quiet)
    await announcer
    if reporter is not None:
        await reporter
    out = {k: getattr(counts, k) for k in Counts.__slots__}
    sys.stdout.buffer.write(orjson.dumps(out) + b"\n")
    sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True, help="the broker's port on 127.0.0.1")
    p.add_argument("--dir", type=Path, required=True, help="outboxes go in DIR/room-NNN/")
    p.add_argument("--rooms", type=int, default=1)
    p.add_argument("--first", type=int, default=0, help="index of the first room (names)")
    p.add_argument("--site", default="load-site")
    p.add_argument("--hz", type=float, default=10.0, help="readings per device per second")
    p.add_argument("--profile", default="intrabeam")
    p.add_argument("--seed", type=int, default=20261206)
    p.add_argument("--credentials", type=Path, help="JSON {room: [user, password]}")
    p.add_argument("--keyring", type=Path, help="take replay requests signed by its keys")
    p.add_argument("--retention-s", type=float, default=600.0, help="held for replays")
    p.add_argument("--stats-s", type=float, default=0.0, help="print the outbox depth so often")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    if args.rooms < 1 or not 0 < args.hz <= 1000:
        p.error("--rooms must be >= 1 and --hz in (0, 1000]")
    configure_logging(args.log_level, json=True)  # stderr, as the daemon's: stdout is ours
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
