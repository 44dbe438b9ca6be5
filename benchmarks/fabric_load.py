"""Fabric load and fault: rooms -> site Mosquittos => central Mosquitto -> iort-ingest, with a
central outage and a site broker SIGKILLed in the middle of it (issue 22, item 5).

What runs, all real, all on loopback, every process stopped by PID at the end:

* the fabric: a central Mosquitto and one Mosquitto per site, configured by
  ``iortd fabric-config``'s own code and bridged over TLS (tests/integration/fabricproc.py);
* the rooms: the room-load generator (benchmarks/roomload.py), one process per site (and
  per ``--rooms-per-process``), each room the daemon's real MQTT sink and outbox at
  ``--hz`` (two streams: telemetry and applicator), with its fabric account, holding what
  it publishes for replays and serving signed ``cmd/replay`` requests;
* ``iort-ingest run`` on the central broker (durable session), with its replay-only key.

The fault: after ``--warm-s``, the central broker is stopped (SIGTERM) for ``--outage-s``;
half-way through, the first site's broker is SIGKILLed and started again (its bridge's
queue in memory is lost: Mosquitto's snapshots are periodic). Then the run waits until
the ingest has every seq of every room, received or declared skipped, stops the rooms,
and checks against each room's own outbox what was published.

Figures: lost after repair (goal 0), repeats the ingest saw, repair requests and
repaired messages, time to repair (first noticed to closed), room-to-central latency of
live messages (p50/p99, from the ingest's store), CPU per tier (per 100 rooms) from
``/proc``, and the outbox depth (the largest backlog of unsent messages a room held).

    .venv/bin/python benchmarks/fabric_load.py [--sites 4] [--rooms-per-site 25] [--hz 10]
        [--outage-s 30] [--warm-s 10] [--dir DIR]

The integration test tests/integration/test_fabric_fault.py runs the same scenario at 10
rooms and a 10 s outage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import statistics
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))
sys.path.insert(0, str(HERE))

from fabricproc import Fabric, start_fabric  # noqa: E402 - from tests/integration, on the path

from iortd.auditlog.note import generate_keypair, write_keypair  # noqa: E402
from iortd.daemon.mqtt.outbox import Outbox  # noqa: E402
from iortd.ingest.lines import SeqLine  # noqa: E402
from iortd.ingest.store import unq  # noqa: E402
from iortd.kernel.timefmt import utc_ts  # noqa: E402

__all__ = ["Result", "Scenario", "run"]

BIN = Path(sys.executable).parent
STREAMS = ("telemetry", "applicator", "events")
INGEST_KEY = "ingest-central"


@dataclass(frozen=True)
class Scenario:
    sites: Mapping[str, int]  # site -> rooms
    hz: float = 10.0
    warm_s: float = 3.0
    outage_s: float = 10.0
    rooms_per_process: int = 25
    settle_s: float = 1.0
    retry_s: float = 2.0
    retry_max_s: float = 4.0
    catch_up_s: float = 60.0  # bound on the wait for the ingest to have everything
    # The fabric spec's [bridge] autosave_changes (None: its default). At 100 rooms the
    # default (a snapshot every 100 changes) has the central broker rewrite its whole
    # database 20 times a second, and it stops answering (docs/development.md).
    autosave_changes: int | None = None
    validate: str = "full"  # the ingest's (docs/ingest.md)
    kill_ingest_after_s: float | None = None  # SIGKILL the ingest this long after the return


@dataclass
class Result:
    rooms: int
    published: int = 0
    lost_after_repair: int = 0
    lost_detail: list[str] = field(default_factory=list)
    repeats: int = 0
    requests: int = 0
    repaired: int = 0
    skipped: int = 0
    invalid: int = 0
    repair_s_p50: float | None = None
    repair_s_max: float | None = None
    all_in_s: float = 0.0  # from the central's return to everything accounted
    caught_up_live_s: float | None = None  # to every stream live with no hole (None: never)
    ingest_msgs_per_s: float = 0.0  # what the ingest stored, over the run
    latency_ms_p50: float | None = None
    latency_ms_p99: float | None = None
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core, per tier
    outbox_max_unsent: int = 0
    replays_served: int = 0
    messages_replayed: int = 0


class Child:
    """A process of ours, its stdout read line by line, stopped by PID."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name, self.proc = name, proc
        self.lines: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, name: str, argv: list[str], log: Path) -> Child:
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=err, stdin=asyncio.subprocess.DEVNULL
            )
        return cls(name, proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while raw := await self.proc.stdout.readline():
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(raw))

    async def first_line(self, within_s: float) -> dict[str, Any]:
        async with asyncio.timeout(within_s):
            while not self.lines:
                if self._reader.done():
                    raise AssertionError(f"{self.name} exited (rc {self.proc.returncode})")
                await asyncio.sleep(0.05)  # bounded: the child prints one line when ready
        return self.lines[0]

    async def stop(self, within_s: float = 20.0) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(within_s):
                rc = await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            rc = await self.proc.wait()
        await self._reader
        return rc

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


class Meter:
    """CPU seconds per tier from /proc, across restarts of a tier's processes."""

    def __init__(self) -> None:
        self._base: dict[int, float] = {}
        self._tier: dict[int, str] = {}
        self._banked: dict[str, float] = {}

    def start(self, tier: str, pids: list[int]) -> None:
        self._banked.setdefault(tier, 0.0)
        for pid in pids:
            self._base[pid], self._tier[pid] = _cpu_s(pid), tier

    def lap(self, tier: str, pids: list[int]) -> None:
        """Before ``pids`` stop: bank what they used."""
        for pid in pids:
            self._banked[tier] += _cpu_s(pid) - self._base.pop(pid, 0.0)
            self._tier.pop(pid, None)

    def restart(self, tier: str, pid: int) -> None:
        self._base[pid], self._tier[pid] = 0.0, tier  # a new process: from zero

    def total(self) -> dict[str, float]:
        out = dict(self._banked)
        for pid, tier in self._tier.items():
            out[tier] += _cpu_s(pid) - self._base[pid]
        return out


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rooms_of(s: Scenario) -> dict[str, list[str]]:
    out, k = {}, 0
    for site, n in s.sites.items():
        out[site] = [f"room-{i:03d}" for i in range(k, k + n)]
        k += n
    return out


def accounted(db_path: Path) -> dict[tuple[str, str, str], SeqLine]:
    """The ingest's store as (site, room, topic) -> seqs received or declared."""
    lines: dict[tuple[str, str, str], SeqLine] = {}
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        for site, room, topic, session, seq in db.execute(
            "SELECT site, room, topic, session, seq FROM messages"
        ):
            lines.setdefault((site, room, topic), SeqLine(topic)).received(unq(seq), session)
        for site, room, topic, first, last in db.execute(
            "SELECT site, room, topic, first, last FROM skips"
        ):
            lines.setdefault((site, room, topic), SeqLine(topic)).add(unq(first), unq(last))
    finally:
        db.close()
    return lines


def _ingest_config(root: Path, fabric: Fabric, s: Scenario) -> Path:
    user, password = fabric.login("central", "ingest")
    pw = root / "ingest.password"
    pw.write_text(password + "\n")
    pw.chmod(0o600)
    cfg = root / "ingest.toml"
    cfg.write_text(
        f'name = "ingest"\ndatabase = "ingest.sqlite"\nvalidate = "{s.validate}"\n\n[mqtt]\n'
        f'url = "mqtt://127.0.0.1:{fabric.central.port}"\nusername = "{user}"\n'
        f'password_file = "ingest.password"\nkeepalive_s = 2\nsession_expiry_s = 3600\n\n'
        f'[replay]\nkey_file = "keys/{INGEST_KEY}.key"\nsettle_s = {s.settle_s}\n'
        f"retry_s = {s.retry_s}\nretry_max_s = {s.retry_max_s}\nmax_per_minute = 30\n"
    )
    return cfg


def _keyring(root: Path) -> Path:
    signer = generate_keypair(INGEST_KEY)
    write_keypair(signer, root / "keys")
    ring = root / "rooms-keyring.toml"
    ring.write_text(
        f'[[key]]\nholder = "{INGEST_KEY}"\nname = "Central ingest"\nroles = ["replay"]\n'
        f'public_key = "{signer.verifier.text}"\nvalid_from = "2026-01-01T00:00:00Z"\n'
        'valid_until = "2099-01-01T00:00:00Z"\n'
    )
    return ring


async def _until(what: str, within_s: float, check: Any) -> float:
    """Poll ``check()`` (a bounded poll of a database the service writes) until true."""
    t0 = time.monotonic()
    while not await asyncio.to_thread(check):
        if time.monotonic() - t0 > within_s:
            raise AssertionError(f"{what}: not within {within_s} s")
        await asyncio.sleep(0.5)
    return time.monotonic() - t0


async def run(root: Path, s: Scenario, *, say: Any = lambda _: None) -> Result:
    await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
    layout = rooms_of(s)
    bridge = {} if s.autosave_changes is None else {"autosave_changes": s.autosave_changes}
    fabric = await asyncio.to_thread(start_fabric, root / "fabric", layout, bridge=bridge)
    children: list[Child] = []
    result = Result(rooms=sum(len(r) for r in layout.values()))
    try:
        await fabric.wait_bridges_up()
        ring = _keyring(root)
        ingest_argv = [
            str(BIN / "iort-ingest"), "run", "--config", str(_ingest_config(root, fabric, s))
        ]  # fmt: skip
        ingest = await Child.start("ingest", ingest_argv, root / "ingest.log")
        children.append(ingest)
        db = root / "ingest.sqlite"
        await _until("the ingest's database", 20, db.exists)
        gens: list[Child] = []
        for site, rooms in layout.items():
            creds = root / f"credentials-{site}.json"
            creds.write_text(json.dumps({r: list(fabric.room_login(site, r)) for r in rooms}))
            first = int(rooms[0].removeprefix("room-"))
            for k in range(0, len(rooms), s.rooms_per_process):
                n = min(s.rooms_per_process, len(rooms) - k)
                argv = [
                    sys.executable, str(HERE / "roomload.py"), "--port",
                    str(fabric.sites[site].port), "--dir", str(root / "rooms" / site), "--site",
                    site, "--rooms", str(n), "--first", str(first + k), "--hz", str(s.hz),
                    "--credentials", str(creds), "--keyring", str(ring), "--log-level", "warning",
                    "--stats-s", "0.5",
                ]  # fmt: skip
                g = await Child.start(f"rooms-{site}-{k}", argv, root / f"rooms-{site}-{k}.log")
                gens.append(g)
                children.append(g)
        for g in gens:
            await g.first_line(60)
        say(f"{result.rooms} rooms publishing")
        # CPU seconds of each tier over the run (a broker restarted counts both lives).
        meter = Meter()
        meter.start("rooms", [c.proc.pid for c in gens])
        meter.start("site brokers", [b.pid for b in fabric.sites.values()])
        meter.start("central broker", [fabric.central.pid])
        meter.start("ingest", [ingest.proc.pid])
        t_cpu0 = time.monotonic()
        await asyncio.sleep(s.warm_s)  # the scenario's own timeline: live traffic first

        say(f"central down for {s.outage_s:.0f} s")
        down_wall = time.time()
        meter.lap("central broker", [fabric.central.pid])
        await asyncio.to_thread(fabric.central.stop_sync)
        await asyncio.sleep(s.outage_s / 2)
        first_site = next(iter(fabric.sites.values()))
        say(f"site broker {first_site.name} SIGKILLed and restarted")
        meter.lap("site brokers", [first_site.pid])
        first_site.kill()
        await asyncio.to_thread(first_site.restart_sync)
        meter.restart("site brokers", first_site.pid)
        await asyncio.sleep(s.outage_s / 2)
        await asyncio.to_thread(fabric.central.restart_sync)
        meter.restart("central broker", fabric.central.pid)
        back, back_wall = time.monotonic(), time.time()
        if s.kill_ingest_after_s is not None:
            # The ingest SIGKILLed while it takes in the backlog: what the broker had
            # delivered and it had not stored is gone from both; the rooms still hold it.
            await asyncio.sleep(s.kill_ingest_after_s)
            say("iort-ingest SIGKILLed and started again")
            meter.lap("ingest", [ingest.proc.pid])
            ingest.kill()
            await ingest.proc.wait()
            ingest = await Child.start("ingest-2", ingest_argv, root / "ingest-2.log")
            children.append(ingest)
            meter.restart("ingest", ingest.proc.pid)
        say("central back; waiting for the ingest to have every seq")

        back_ts = utc_ts(datetime.fromtimestamp(back_wall, UTC))

        def caught_up() -> bool:
            # Every stream has a live message made after the central came back (a room
            # publishes in order: its backlog went before it), and no hole below it.
            lines, newest = accounted(db), _newest_ts(db)
            keys = [(site, r, t) for site, rooms in layout.items() for r in rooms
                    for t in ("telemetry", "applicator")]  # fmt: skip
            return all(
                k in lines and lines[k].missing() == 0 and newest.get(k, "") > back_ts for k in keys
            )

        try:
            took = await _until("every room's streams without a hole", s.catch_up_s, caught_up)
            result.caught_up_live_s = round(took, 2)
        except AssertionError:
            say(f"the ingest did not catch up within {s.catch_up_s:.0f} s of live traffic")
        wall = time.monotonic() - t_cpu0
        scale = 100.0 / result.rooms  # % of one core per 100 rooms
        result.cpu = {k: round(100 * v / wall * scale, 2) for k, v in meter.total().items()}
        result.ingest_msgs_per_s = round(_count(db) / wall, 1)
        caught_wall = time.time()
        # Quiet: the rooms stop making readings and stay connected (they still serve
        # replays) until the ingest has no hole and nothing new for a while.
        for g in gens:
            g.proc.send_signal(signal.SIGUSR1)
        seen = {"n": -1, "at": time.monotonic()}

        def settled() -> bool:
            n = _count(db)
            if n != seen["n"]:
                seen["n"], seen["at"] = n, time.monotonic()
                return False
            lines = accounted(db)
            return time.monotonic() - seen["at"] > 3.0 and all(
                line.missing() == 0 for line in lines.values()
            )

        with contextlib.suppress(AssertionError):
            await _until("the ingest settled", s.catch_up_s, settled)
        # Stop the rooms: what they did not publish stays in their outboxes (not lost).
        for g in gens:
            await g.stop()
        for g in gens:
            counts = g.lines[-1] if len(g.lines) > 1 else {}
            result.replays_served += int(counts.get("replays", 0))
            result.messages_replayed += int(counts.get("replayed", 0))
        expected = await asyncio.to_thread(_published, root, layout)
        result.published = sum(len(v) for v in expected.values())

        def all_in() -> bool:
            lines = accounted(db)
            return all(
                (k in lines and all(lines[k].contains(q) for q in want)) or not want
                for k, want in expected.items()
            )

        with contextlib.suppress(AssertionError):
            await _until("everything published, accounted for", 10, all_in)
        result.all_in_s = round(time.monotonic() - back, 2)
        await ingest.stop()
        lines = await asyncio.to_thread(accounted, db)
        for key, want in expected.items():
            miss = [q for q in want if key not in lines or not lines[key].contains(q)]
            if miss:
                result.lost_after_repair += len(miss)
                result.lost_detail.append(f"{'/'.join(key)}: {len(miss)} from seq {miss[0]}")
        _figures(result, db, quiet=(down_wall, caught_wall))
        result.outbox_max_unsent = max(
            (int(x.get("max_room_unsent", 0)) for g in gens for x in g.lines), default=0
        )
        return result
    finally:
        for c in children:
            c.kill()
        await asyncio.to_thread(fabric.stop)


def _count(db_path: Path) -> int:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
    finally:
        db.close()


def _newest_ts(db_path: Path) -> dict[tuple[str, str, str], str]:
    """Per stream, the newest ``ts`` (when made, at the room) of a live message."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT site, room, topic, MAX(ts) FROM messages WHERE historical = 0 "
            "GROUP BY site, room, topic"
        ).fetchall()
    finally:
        db.close()
    return {(a, b, c): str(d) for a, b, c, d in rows}


Seqs = dict[tuple[str, str, str], list[int]]


def _published(
    root: Path, layout: Mapping[str, list[str]]
) -> dict[tuple[str, str, str], list[int]]:
    """Per (site, room, topic): every seq the room handed out and published (its outbox,
    opened after the room stopped: what is still pending there was never published)."""

    async def one(directory: Path) -> tuple[dict[str, int], dict[str, set[int]]]:
        ob = await Outbox.open(directory, 64 * 1024 * 1024)
        unsent: dict[str, set[int]] = {t: set() for t in STREAMS}
        for rec in ob.pending:
            if rec.topic in unsent:
                unsent[rec.topic].add(rec.seq)
        nexts = {t: ob.next_seq(t) for t in STREAMS}
        await ob.close()
        return nexts, unsent

    out: Seqs = {}
    for site, rooms in layout.items():
        for r in rooms:
            nexts, unsent = asyncio.run(one(root / "rooms" / site / r / "mqtt-outbox"))
            for t in STREAMS:
                out[(site, r, t)] = [q for q in range(nexts[t]) if q not in unsent[t]]
    return out


def _figures(result: Result, db_path: Path, quiet: tuple[float, float]) -> None:
    """From the store; latency only of live messages made outside the fault's window
    (``quiet``: from the central's stop to everything caught up), which waited in a queue
    by design."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        counters = dict(db.execute("SELECT name, SUM(value) FROM counters GROUP BY name"))
        result.repeats = int(counters.get("repeats", 0))
        result.requests = int(counters.get("requests", 0))
        result.repaired = int(counters.get("repaired", 0))
        result.skipped = int(counters.get("skipped", 0))
        result.invalid = int(counters.get("invalid", 0))
        took = [b - a for a, b in db.execute("SELECT noticed_at, closed_at FROM repairs")]
        if took:
            result.repair_s_p50 = round(statistics.median(took), 2)
            result.repair_s_max = round(max(took), 2)
        lat = sorted(
            (recv - made) * 1000
            for ts, recv in db.execute(
                "SELECT ts, received_at FROM messages WHERE historical = 0 AND repaired = 0"
            )
            if not quiet[0] <= (made := _epoch(ts)) <= quiet[1]
        )
        if lat:
            result.latency_ms_p50 = round(lat[len(lat) // 2], 2)
            result.latency_ms_p99 = round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2)
    finally:
        db.close()


def _epoch(ts: str) -> float:
    return datetime.fromisoformat(ts[:-1]).replace(tzinfo=UTC).timestamp()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--rooms-per-site", type=int, default=25)
    p.add_argument("--hz", type=float, default=10.0)
    p.add_argument("--outage-s", type=float, default=30.0)
    p.add_argument("--warm-s", type=float, default=10.0)
    p.add_argument("--rooms-per-process", type=int, default=25)
    p.add_argument("--dir", type=Path, default=None, help="work directory (kept)")
    p.add_argument("--autosave-changes", type=int, default=None, help="the fabric's, if set")
    p.add_argument("--validate", choices=["full", "envelope"], default="full", help="ingest's")
    # The ingest's defaults (docs/ingest.md); the integration test asks faster.
    p.add_argument("--settle-s", type=float, default=2.0)
    p.add_argument("--retry-s", type=float, default=5.0)
    p.add_argument("--retry-max-s", type=float, default=60.0)
    args = p.parse_args(argv)
    from machine import print_header, work_dir  # noqa: PLC0415

    root, cleanup = work_dir(args.dir, "iortd-fabric-load-")
    print_header("fabric load and fault: rooms -> sites => central -> iort-ingest")
    s = Scenario(
        sites={f"site-{chr(97 + i)}": args.rooms_per_site for i in range(args.sites)},
        hz=args.hz, warm_s=args.warm_s, outage_s=args.outage_s,
        rooms_per_process=args.rooms_per_process, catch_up_s=max(120.0, 4 * args.outage_s),
        autosave_changes=args.autosave_changes, validate=args.validate,
        settle_s=args.settle_s, retry_s=args.retry_s, retry_max_s=args.retry_max_s,
    )  # fmt: skip
    t0 = time.monotonic()

    def stop(*_: object) -> None:
        raise KeyboardInterrupt  # as Ctrl-C: the run's own clean-up stops every child

    signal.signal(signal.SIGTERM, stop)
    try:
        result = asyncio.run(
            run(root, s, say=lambda m: print(f"  {time.monotonic() - t0:6.1f} s  {m}"))
        )
    finally:
        cleanup()
    print(json.dumps(asdict(result), indent=2))
    return 0 if result.lost_after_repair == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
