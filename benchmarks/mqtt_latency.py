"""Benchmark of the live MQTT stream's latency: simulator sample to independent subscriber.

Measured in one run, through one private Mosquitto on loopback (daemon/mqtt/broker.py:
127.0.0.1, set_tcp_nodelay, no persistence), with one independent subscriber process per
measurement (``mosquitto_sub -F '%U ...'``, which stamps each message with the wall clock
when it receives it; or, with ``--subscriber aiomqtt`` or when mosquitto_sub is missing, a
small aiomqtt subscriber in its own process), QoS 1 subscriptions:

1. baseline: a bare aiomqtt publisher (QoS 1, MQTT v5, TCP_NODELAY, each publish awaited)
   sending a payload the size of a telemetry message that holds its own send time, paced
   at 10 Hz and at 100 Hz; latency = receipt wall time - send time;
2. iortd: the real daemon, ``iortd run --config ...`` as its own process (sim driver,
   profile axxent, speed 1, so that a sample's ``at`` is the wall time at which the
   simulator produced it; audit log, signed checkpoints and the MQTT outbox on the repo's
   disk), polling at 10 Hz and at 100 Hz; latency = receipt wall time - ``at`` of each
   ``telemetry`` message, split at ``ts`` (when the MQTT sink built the message) into
   "sample -> message built" and "built -> received". Lost and repeated ``seq`` counted
   (a ``seq`` declared on the ``skip`` topic counts as accounted for, not lost). The
   ``events`` of the same run are measured the same way, apart: an event is recorded in
   the audit log (fsync) and journaled in the outbox (fsync) before it is published,
   where a sample goes out from memory (daemon/mqtt/outbox.py);
3. both again at 100 Hz with a concurrent disk writer that this benchmark starts on the
   same filesystem (its own process: 1 MiB written and fsync'd, in a loop), the shape of
   a backup or a log shipper beside the daemon.

The first ``--warmup`` seconds of each measurement (from its first live message) are left
out, and so are messages marked ``historical`` (the backlog from before the daemon had
connected). The simulated source ends its self-test 10 s after the daemon starts and is
armed (READY); its beam starts ``--start-delay`` seconds later, so that by default the
window holds the self-test, arming, the beam start and irradiation: the events these raise
are in the path (an event waits for the audit log's fsync before any sink hears of it, and
the samples queued behind it wait too).

Goals (issue 21): iortd's samples' p99 at 100 Hz at most 2 ms above the bare round
trip's p99 at 100 Hz, on a quiet machine, and at most 5 ms above it with the disk writer
running (the baseline measured with the writer too), no seq lost or repeated. A
benchmark, not a test: it exits 0 whatever the figures and prints PASS/MISS.

    .venv/bin/python benchmarks/mqtt_latency.py [--seconds S] [--subscriber KIND] [--dir DIR]
        [--no-disk-writer | --only-disk-writer]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
from machine import filesystem, print_header, work_dir

from iortd.auditlog.note import generate_keypair, write_keypair
from iortd.daemon.mqtt.broker import (
    MOSQUITTO_INSTALL_HINT,
    BrokerError,
    BrokerOptions,
    Mosquitto,
    find_mosquitto,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SECONDS = 20.0  # measured per path and rate, after the warm-up
DEFAULT_WARMUP_S = 1.0
DEFAULT_START_DELAY_S = 2.0  # READY ~10 s (self-test) after the start, beam on 2 s later
# (phase, rate): quiet at 10 and 100 Hz, then 100 Hz beside the disk writer.
PHASES = (("quiet", 10), ("quiet", 100), ("disk", 100))
GOAL_P99_ABOVE_BASELINE_MS = {"quiet": 2.0, "disk": 5.0}
DISK_WRITER_CHUNK = 1024 * 1024
TAIL_S = 0.5  # publishing goes on this long after the window; then the subscriber waits
DRAIN_S = 0.5  # for the last messages before it is stopped
READY_TOPIC = "bench/ready"
BASELINE_TOPIC = "bench/baseline"
SITE, ROOM, PREFIX = "bench-site", "or-1", "iort"
TELEMETRY_TOPIC = f"{PREFIX}/v1/{SITE}/{ROOM}/telemetry"
EVENTS_TOPIC = f"{PREFIX}/v1/{SITE}/{ROOM}/events"
SKIP_TOPIC = f"{PREFIX}/v1/{SITE}/{ROOM}/skip"
# The baseline's payload is padded to this size: about a telemetry message's (the table
# prints both sizes as received).
BASELINE_BYTES = 400
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

SITE_TOML = """\
[site]
id = "{site}"
room = "{room}"
[log]
directory = "{log_dir}"
signing_key_file = "{key}"
[health]
listen = ""
[mqtt]
enabled = true
url = "{url}"
prefix = "{prefix}"
[simulation]
speed = 1.0
seed = 7
[[devices]]
name = "source-1"
role = "source"
driver = "sim"
poll_interval_s = {poll}
timeout_s = 1.0
[devices.options]
profile = "axxent"
applicator = "BAL34"
start_delay_s = {start_delay}
"""

# The aiomqtt subscriber: its own process, one line per message, written and flushed when
# the message comes out of the client: "<unix seconds>.<nanoseconds> <topic> <payload>",
# the same as mosquitto_sub -F '%U %t %p'.
AIOMQTT_SUBSCRIBER = """\
import asyncio, signal, socket, sys, time
import aiomqtt

async def main(port, ident, out, topics):
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    client = aiomqtt.Client(
        "127.0.0.1", port, identifier=ident, protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )
    with open(out, "wb") as f:
        async def consume():
            async for m in client.messages:
                ns = time.time_ns()
                t = m.topic.value.encode()
                f.write(b"%d.%09d %s %s\\n" % (ns // 10**9, ns % 10**9, t, m.payload))
                f.flush()
        async with client:
            for t in topics:
                await client.subscribe(t, qos=1)
            task = asyncio.create_task(consume())
            await stop.wait()
            task.cancel()

asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]))
"""


# ---- small helpers ----------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ts_ns(text: str) -> int:
    """RFC 3339 UTC (``...T10:00:00.123456Z``) -> integer nanoseconds since the epoch."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (dt - EPOCH) // timedelta(microseconds=1) * 1000


def recv_ns(stamp: bytes) -> int:
    sec, _, frac = stamp.partition(b".")
    return int(sec) * 1_000_000_000 + int(frac.ljust(9, b"0")[:9])


def wait_until(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout_s} s")
        time.sleep(0.01)


def end_process(proc: subprocess.Popen[bytes], sig: int, timeout_s: float) -> int:
    """Signal a process we started (by its Popen, so only if not yet reaped), then kill
    it if it has not exited within ``timeout_s``."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text("utf-8", "replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({path}: {exc})"


# ---- the independent subscriber ---------------------------------------------------------


class Subscriber:
    """One subscriber process writing ``<receipt time> <topic> <payload>`` lines to a file.
    Ready once the retained message on READY_TOPIC (subscribed after ``topic``) is in."""

    def __init__(self, kind: str, port: int, topics: tuple[str, ...], out: Path) -> None:
        self.kind, self.port, self.topics, self.out = kind, port, topics, out
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Subscriber:
        ident = f"bench-sub-{os.getpid()}-{self.out.parent.name}"
        if self.kind == "mosquitto_sub":
            exe = shutil.which("mosquitto_sub") or "mosquitto_sub"
            cmd = [
                *(exe, "-h", "127.0.0.1", "-p", str(self.port), "-i", ident, "-q", "1"),
                *(x for t in self.topics for x in ("-t", t)),
                *("-V", "mqttv5", "-t", READY_TOPIC, "-F", "%U %t %p"),
            ]
        else:
            cmd = [sys.executable, "-c", AIOMQTT_SUBSCRIBER, str(self.port), ident, str(self.out)]
            cmd += [*self.topics, READY_TOPIC]
        with self.out.open("wb") as f:
            self.proc = subprocess.Popen(  # noqa: S603 - our command line
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=f if self.kind == "mosquitto_sub" else subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=REPO,
            )
        try:
            wait_until(lambda: self.has(READY_TOPIC), 10, f"{self.kind} subscription")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def has(self, topic: str) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.kind} exited with code {self.proc.returncode}")
        try:
            return f" {topic} ".encode() in self.out.read_bytes()
        except FileNotFoundError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc, signal.SIGINT, 5)

    def messages(self, topic: str) -> list[tuple[int, dict[str, Any], int]]:
        """(receipt ns, payload, bytes) for every message on ``topic``, in order of
        receipt."""
        want = topic.encode()
        out = []
        for line in self.out.read_bytes().splitlines():
            stamp, got, payload = line.split(b" ", 2)
            if got == want:
                out.append((recv_ns(stamp), orjson.loads(payload), len(payload)))
        return out


# ---- the measurements -------------------------------------------------------------------


@dataclass(slots=True)
class Result:
    path: str
    rate: int
    phase: str = "quiet"
    latencies_ms: list[float] = field(default_factory=list)
    built_ms: list[float] = field(default_factory=list)  # sample -> message built (iortd)
    wire_ms: list[float] = field(default_factory=list)  # message built -> received (iortd)
    nbytes: list[int] = field(default_factory=list)
    received: int = 0  # all messages, the warm-up included
    lost: int = 0  # seq gaps
    repeated: int = 0
    historical: int = 0
    window_s: float = 0.0
    worst: list[tuple[float, float]] = field(default_factory=list)  # (ms, s into window)
    states: list[tuple[float, str]] = field(default_factory=list)  # (s into window, state)


def windowed(first_ns: int, warmup_s: float, seconds: float, at_ns: int) -> float | None:
    """Seconds into the measurement window, or None if outside it."""
    offset = (at_ns - first_ns) / 1e9 - warmup_s
    return offset if 0 <= offset < seconds else None


def account_seq(
    res: Result,
    seqs: list[int],
    expect_first: int | None = None,
    declared: set[int] | frozenset[int] = frozenset(),
) -> None:
    """Repeats, and seqs missing between the first and the last (``declared``: seqs a
    ``skip`` message accounted for, not lost)."""
    unique = set(seqs)
    res.repeated = len(seqs) - len(unique)
    if unique:
        lo = min(unique) if expect_first is None else expect_first
        have = unique | {s for s in declared if lo <= s <= max(unique)}
        res.lost = (max(unique) - lo + 1) - len(have)


async def publish_paced(port: int, rate: int, total_s: float, topic: str) -> int:
    """The bare round trip's publisher: QoS 1, each publish awaited, paced like the
    daemon's poll loop (absolute schedule, no catch-up burst). Returns how many it sent."""
    client = aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=f"bench-pub-{os.getpid()}-{rate}",
        protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=NODELAY,
    )
    pad = b"x" * BASELINE_BYTES
    loop = asyncio.get_running_loop()
    sent = 0
    async with client:
        period = 1.0 / rate
        next_at = loop.time()
        end = next_at + total_s
        while loop.time() < end:
            now = time.time_ns()
            head = b'{"seq":%d,"sent_ns":%d,"pad":"' % (sent, now)
            payload = head + pad[: max(0, BASELINE_BYTES - len(head) - 2)] + b'"}'
            await client.publish(topic, payload, qos=1)
            sent += 1
            next_at += period
            delay = next_at - loop.time()
            if delay < 0:
                next_at = loop.time()
                delay = 0
            await asyncio.sleep(delay)
    return sent


async def publish_ready(port: int) -> None:
    client = aiomqtt.Client(
        "127.0.0.1", port, identifier=f"bench-ready-{os.getpid()}", socket_options=NODELAY
    )
    async with client:
        await client.publish(READY_TOPIC, b"ready", qos=1, retain=True)


def run_baseline(
    work: Path, port: int, sub_kind: str, rate: int, phase: str, seconds: float, warmup_s: float
) -> Result:
    d = work / f"baseline-{phase}-{rate}hz"
    d.mkdir()
    topic = f"{BASELINE_TOPIC}/{phase}/{rate}"
    res = Result("bare aiomqtt", rate, phase, window_s=seconds)
    with Subscriber(sub_kind, port, (topic,), d / "received.txt") as sub:
        sent = asyncio.run(publish_paced(port, rate, warmup_s + seconds + TAIL_S, topic))
        time.sleep(DRAIN_S)
    msgs = sub.messages(topic)
    res.received = len(msgs)
    if not msgs:
        return res
    first = min(p["sent_ns"] for _, p, _ in msgs)
    for rx, p, size in msgs:
        off = windowed(first, warmup_s, seconds, p["sent_ns"])
        if off is None:
            continue
        lat = (rx - p["sent_ns"]) / 1e6
        res.latencies_ms.append(lat)
        res.worst.append((lat, off))
        res.nbytes.append(size)
    account_seq(res, [p["seq"] for _, p, _ in msgs], expect_first=0)
    res.lost += max(0, sent - 1 - max(p["seq"] for _, p, _ in msgs))  # lost at the end
    return res


def write_site(d: Path, url: str, rate: int, start_delay_s: float) -> Path:
    key, _pub = write_keypair(generate_keypair("bench"), d / "keys")
    cfg = d / "site.toml"
    cfg.write_text(
        SITE_TOML.format(
            site=SITE,
            room=ROOM,
            prefix=PREFIX,
            log_dir=d / "log",
            key=key,
            url=url,
            poll=1.0 / rate,
            start_delay=start_delay_s,
        )
    )
    return cfg


def measure(
    res: Result,
    msgs: list[tuple[int, dict[str, Any], int]],
    first: int,
    warmup_s: float,
    seconds: float,
) -> None:
    """Latency of each live message in the window: receipt - ``at``, split at ``ts``."""
    state = None
    for rx, p, size in msgs:
        if p.get("historical") or p.get("at") is None:
            continue
        at = ts_ns(p["at"])
        if "state" in p and p["state"] != state:
            state = p["state"]
            res.states.append(((at - first) / 1e9 - warmup_s, state))
        off = windowed(first, warmup_s, seconds, at)
        if off is None:
            continue
        built = ts_ns(p["ts"])
        lat = (rx - at) / 1e6
        res.latencies_ms.append(lat)
        res.built_ms.append((built - at) / 1e6)
        res.wire_ms.append((rx - built) / 1e6)
        res.worst.append((lat, off))
        res.nbytes.append(size)


def run_iortd(
    work: Path,
    port: int,
    url: str,
    sub_kind: str,
    rate: int,
    phase: str,
    args: argparse.Namespace,
) -> tuple[Result, Result]:
    """The daemon at ``rate``: its samples' and its events' latency."""
    seconds, warmup_s = args.seconds, args.warmup
    d = work / f"iortd-{phase}-{rate}hz"
    d.mkdir()
    cfg = write_site(d, url, rate, args.start_delay)
    res = Result("iortd", rate, phase, window_s=seconds)
    ev = Result("iortd events", rate, phase, window_s=seconds)
    daemon_log = d / "iortd.log"
    topics = (TELEMETRY_TOPIC, EVENTS_TOPIC, SKIP_TOPIC)
    with Subscriber(sub_kind, port, topics, d / "received.txt") as sub:
        with daemon_log.open("wb") as logf:
            proc = subprocess.Popen(  # noqa: S603 - our daemon, our config
                [sys.executable, "-m", "iortd.daemon.cli", "run", "--config", str(cfg)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                cwd=REPO,
            )
        try:

            def live() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"iortd exited with code {proc.returncode}; end of {daemon_log}:\n"
                        + tail(daemon_log)
                    )
                return sub.has(TELEMETRY_TOPIC)

            wait_until(live, 30, "telemetry from iortd")
            time.sleep(warmup_s + seconds + TAIL_S)
        finally:
            code = end_process(proc, signal.SIGTERM, 20)
        if code != 0:
            print(
                f"  note: iortd exited with code {code}; end of {daemon_log}:\n{tail(daemon_log)}"
            )
        time.sleep(DRAIN_S)
    msgs = sub.messages(TELEMETRY_TOPIC)
    res.received = len(msgs)
    live_msgs = [m for m in msgs if not m[1].get("historical")]
    res.historical = len(msgs) - len(live_msgs)
    if not live_msgs:
        return res, ev
    first = ts_ns(live_msgs[0][1]["at"])
    measure(res, live_msgs, first, warmup_s, seconds)
    events = sub.messages(EVENTS_TOPIC)
    ev.received = len(events)
    measure(ev, events, first, warmup_s, seconds)
    ev.states = []
    sessions = {p["session"] for _, p, _ in msgs}
    skipped = [
        p["skipped"] for _, p, _ in sub.messages(SKIP_TOPIC) if p["skipped"]["topic"] == "telemetry"
    ]
    declared = {s for k in skipped for s in range(k["first"], k["last"] + 1)}
    account_seq(res, [p["seq"] for _, p, _ in msgs], declared=declared)
    account_seq(ev, [p["seq"] for _, p, _ in events])
    if len(sessions) != 1:
        print(f"  note: iortd {rate} Hz: {len(sessions)} sessions seen: {sorted(sessions)}")
    return res, ev


DISK_WRITER = """\
import os, sys, time
path, chunk = sys.argv[1], int(sys.argv[2])
data = os.urandom(chunk)
n, t0 = 0, time.monotonic()
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
try:
    while True:
        os.pwrite(fd, data, 0)  # 1 MiB over the same place: new data, no growth
        os.fsync(fd)
        n += 1
        if n % 16 == 0:  # replaced whole, so that a reader never sees it empty
            with open(path + ".rate.tmp", "w") as f:
                f.write(f"{n * chunk / (time.monotonic() - t0) / 1e6:.1f}")
            os.replace(path + ".rate.tmp", path + ".rate")
finally:
    os.close(fd)
"""


class DiskWriter:
    """A process writing and fsyncing 1 MiB in a loop on the benchmark's filesystem."""

    def __init__(self, work: Path) -> None:
        self.path = work / "disk-writer.bin"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> DiskWriter:
        self.proc = subprocess.Popen(  # noqa: S603 - our own script
            [sys.executable, "-c", DISK_WRITER, str(self.path), str(DISK_WRITER_CHUNK)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        rate = Path(f"{self.path}.rate")
        wait_until(rate.exists, 30, "the disk writer's first 16 MiB")
        return self

    def rate(self) -> str:
        try:
            return Path(f"{self.path}.rate").read_text() + " MB/s"
        except OSError:
            return "unknown"

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            end_process(self.proc, signal.SIGTERM, 5)
        for leftover in (self.path, Path(f"{self.path}.rate"), Path(f"{self.path}.rate.tmp")):
            leftover.unlink(missing_ok=True)


# ---- the machine ------------------------------------------------------------------------


def mosquitto_version(exe: Path) -> str:
    try:
        out = subprocess.run(  # noqa: S603 - the broker we run
            [str(exe), "-h"], capture_output=True, timeout=5, check=False
        ).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    first = out.splitlines()[0] if out else "unknown"
    return first.removeprefix("mosquitto version ").strip()


# ---- the run ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument(
        "--seconds", type=float, default=DEFAULT_SECONDS, help="measured per path and rate"
    )
    ap.add_argument(
        "--warmup", type=float, default=DEFAULT_WARMUP_S, help="left out at the start (s)"
    )
    ap.add_argument(
        "--start-delay",
        type=float,
        default=DEFAULT_START_DELAY_S,
        help="the sim's start_delay_s: beam on this long after arming (10 s self-test)",
    )
    ap.add_argument(
        "--subscriber",
        choices=("auto", "mosquitto_sub", "aiomqtt"),
        default="auto",
        help="the independent subscriber (auto: mosquitto_sub if installed)",
    )
    ap.add_argument(
        "--no-disk-writer", action="store_true", help="leave out the phase beside the disk writer"
    )
    ap.add_argument(
        "--only-disk-writer", action="store_true", help="only the phase beside the disk writer"
    )
    ap.add_argument("--dir", type=Path, help="work here and keep the files (empty or new)")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or args.start_delay < 0:
        ap.error("--seconds must be positive, --warmup and --start-delay not negative")
    exe = find_mosquitto()
    if exe is None:
        print(f"mosquitto not found; install it with: {MOSQUITTO_INSTALL_HINT}", file=sys.stderr)
        return 2
    sub_kind = args.subscriber
    if sub_kind == "auto":
        sub_kind = "mosquitto_sub" if shutil.which("mosquitto_sub") else "aiomqtt"
    elif sub_kind == "mosquitto_sub" and not shutil.which("mosquitto_sub"):
        ap.error(f"mosquitto_sub not found; install it with: {MOSQUITTO_INSTALL_HINT}")

    work, cleanup = work_dir(args.dir, "iortd-mqtt-bench-")
    broker: Mosquitto | None = None
    try:
        try:
            broker = Mosquitto.start_sync(BrokerOptions(), work / "broker", executable=exe)
        except BrokerError as exc:
            print(f"the private Mosquitto did not start: {exc}", file=sys.stderr)
            return 2
        return run(work, broker, exe, sub_kind, args)
    finally:
        if broker is not None:
            broker.stop_sync()
        cleanup()


def _line(r: Result) -> str:
    lat = r.latencies_ms
    size = round(sum(r.nbytes) / len(r.nbytes))
    return (
        f"  {r.phase:<6} {r.path:<13} {r.rate:>3} Hz {len(lat):>5} {size:>5} {r.lost:>4}"
        f" {r.repeated:>3}  {pct(lat, 0.5):>6.2f} {pct(lat, 0.9):>6.2f} {pct(lat, 0.99):>6.2f}"
        f" {max(lat):>7.2f}"
    )


def run(work: Path, broker: Mosquitto, exe: Path, sub_kind: str, args: argparse.Namespace) -> int:
    started = time.perf_counter()
    seconds, warmup = args.seconds, args.warmup
    print_header("iortd MQTT latency benchmark")
    print(f"  load avg   {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
    print(f"  broker     mosquitto {mosquitto_version(exe)} on {broker.url} (pid {broker.pid})")
    print(f"  subscriber {sub_kind}, own process, QoS 1")
    print(f"  dir        {work} ({filesystem(work)})")
    print(
        f"  window     {seconds:g} s per measurement after {warmup:g} s warm-up; "
        f"sim start_delay_s {args.start_delay:g}"
    )
    sys.stdout.flush()

    asyncio.run(publish_ready(broker.port))
    results: list[Result] = []
    writer_rate = ""
    for phase, rate in PHASES:  # each baseline right before the daemon, in the same phase
        if (phase == "disk" and args.no_disk_writer) or (phase != "disk" and args.only_disk_writer):
            continue
        with DiskWriter(work) if phase == "disk" else contextlib.nullcontext() as writer:
            results.append(run_baseline(work, broker.port, sub_kind, rate, phase, seconds, warmup))
            res, ev = run_iortd(work, broker.port, broker.url, sub_kind, rate, phase, args)
            results += [res, ev]
            if isinstance(writer, DiskWriter):
                writer_rate = writer.rate()
    if writer_rate:
        print(
            f"  disk writer {DISK_WRITER_CHUNK // 1024} KiB write + fsync in a loop: {writer_rate}"
        )

    # ---- report
    print()
    head = (
        f"  {'phase':<6} {'path':<13} {'rate':>6} {'n':>5} {'bytes':>5} {'lost':>4} {'rep':>3}"
        f"  {'p50':>6} {'p90':>6} {'p99':>6} {'max':>7}  ms"
    )
    print(head)
    print(f"  {'-' * (len(head) - 2)}")
    for r in results:
        if not r.latencies_ms:
            print(f"  {r.phase:<6} {r.path:<13} {r.rate:>3} Hz  no messages in the window")
            continue
        print(_line(r))
    print()
    print("  iortd, split at ts (the MQTT sink built the message)    p50 / p90 / p99 / max ms")
    for r in results:
        if not r.path.startswith("iortd") or not r.latencies_ms:
            continue
        what_of = "samples" if r.path == "iortd" else "events"
        for what, v in (("sample -> built", r.built_ms), ("built -> received", r.wire_ms)):
            print(
                f"    {r.phase:<6} {what_of:<7} {r.rate:>3} Hz {what:<18}"
                f" {pct(v, 0.5):>6.2f} / {pct(v, 0.9):>6.2f} / {pct(v, 0.99):>6.2f}"
                f" / {max(v):>7.2f}"
            )
    print()
    print("  received in the window, rate achieved, worst five (ms @ s into the window)")
    for r in results:
        if not r.latencies_ms:
            continue
        worst = sorted(r.worst, reverse=True)[:5]
        where = ", ".join(f"{ms:.1f}@{off:.1f}" for ms, off in worst)
        extra = f", {r.historical} historical" if r.historical else ""
        achieved = len(r.latencies_ms) / r.window_s
        print(
            f"    {r.phase:<6} {r.path:<13} {r.rate:>3} Hz {achieved:>6.1f}/s"
            f" of {r.received} received{extra}; worst {where}"
        )
        if r.states:
            seen = ", ".join(f"{st}@{off:.1f}" for off, st in r.states)
            print(f"      device state (s into the window): {seen}")
    print()
    print("  goals (issue 21)")
    by = {(r.phase, r.path, r.rate): r for r in results}
    for phase, goal in GOAL_P99_ABOVE_BASELINE_MS.items():
        base, ours = by.get((phase, "bare aiomqtt", 100)), by.get((phase, "iortd", 100))
        if base is None or ours is None:
            continue
        if base.latencies_ms and ours.latencies_ms:
            b99, o99 = pct(base.latencies_ms, 0.99), pct(ours.latencies_ms, 0.99)
            diff = o99 - b99
            print(
                f"  {'PASS' if diff <= goal else 'MISS'}  {phase}: iortd samples p99 @100 Hz -"
                f" bare p99 @100 Hz <= {goal:g} ms: {o99:.2f} - {b99:.2f} = {diff:+.2f} ms"
            )
        else:
            print(f"  MISS  {phase}: no messages at 100 Hz on one of the paths")
    lost = sum(r.lost + r.repeated for r in results if r.path.startswith("iortd"))
    print(
        f"  {'PASS' if lost == 0 else 'MISS'}  iortd telemetry and events: no seq lost or "
        "repeated (declared skips count as accounted for)"
    )
    print()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"  total time {time.perf_counter() - started:.1f} s; load avg at the end {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
