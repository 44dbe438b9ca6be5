"""Benchmark of what a room costs the host: CPU seconds per second and memory, per process.

Measured in one run, every process our own child (stopped by PID at the end, on Ctrl-C,
on SIGTERM and on any error; tethered with kernel/reaper.py, so that even a SIGKILLed
benchmark leaves none behind), each figure from /proc (benchmarks/procstat.py):

* **floor**: an idle Python (``python -c`` blocked reading a pipe): what any Python
  process costs just by existing (its RSS is the interpreter's), measured in every window;
* **one room, the real thing**: ``iortd run`` (the demo's room: a simulated INTRABEAM-like
  source and the simulated applicator reader/stand, both polled at 10 Hz, speed 1, beam on
  a few seconds after the start; audit log, signed checkpoints and the MQTT outbox on the
  repo's disk), a private Mosquitto on a free loopback port, and ``iort-dashboard``, with
  1 and then 20 viewers following the room's ``/events`` stream. The viewers are raw HTTP
  readers in a process of their own (benchmarks/sse_clients.py), reported on their own
  line, so that the dashboard's figure holds only the dashboard;
* **rooms on one host**: for each count in ``--rooms`` (1, 10, 50), a fresh broker and
  dashboard (with one overview viewer), and that many simulated rooms from the room-load
  generator (benchmarks/roomload.py: the simulators, the real tracker and the daemon's
  real MQTT sink and outbox, one outbox directory and client id per room, at 10 Hz), in
  processes of at most ``--rooms-per-process`` rooms. The generator's figure is per room.
  The generator has no audit log: the first part says what a real daemon costs beside it;
* **real rooms on one host**: for each count in ``--real-rooms`` (default 10), as above but
  with that many real ``iortd run`` processes (one config, key, log and outbox each).

Each window starts after ``--warmup`` seconds (connections made, beam on) and lasts
``--seconds`` (one room) or ``--fleet-seconds`` (rooms); peak RSS is the window's own
(reset at its start). Other work on this machine shows up in every figure: the load
average before and after is printed, and so is the floor. A benchmark, not a test: it
exits 0 whatever the figures and prints PASS/MISS against the issue's goal (the daemon
under 5 % of one core at 10 Hz); 1 if a process failed (its logs are kept and named), 2
without Mosquitto, 130 when interrupted (what was measured so far is printed).

    .venv/bin/python benchmarks/room_cost.py [--seconds 60] [--fleet-seconds 30]
        [--rooms 1,10,50] [--real-rooms 10] [--rooms-per-process 25] [--warmup 5]
        [--skip-one-room] [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from machine import filesystem, print_header, work_dir
from procstat import Usage, measure

from iortd.auditlog.note import generate_keypair, write_keypair
from iortd.daemon.mqtt.broker import (
    MOSQUITTO_INSTALL_HINT,
    BrokerError,
    BrokerOptions,
    Mosquitto,
    find_mosquitto,
)
from iortd.kernel.reaper import Tether

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SITE, ROOM = "bench-site", "or-1"
LOOP_THREAD = "  of which event loop"
GOAL_DAEMON_CPU = 0.05  # the issue: the daemon at 10 Hz under 5 % of one core
START_WITHIN_S = 60.0
STOP_WITHIN_S = 15.0

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
prefix = "iort"
keepalive_s = 5
[tolerances]
stale_after_polls = 5
applicator_displacement_mm = 2.0
applicator_tilt_deg = 2.0
[simulation]
speed = 1.0
seed = 20261206
[[devices]]
name = "source-1"
role = "source"
driver = "sim"
poll_interval_s = 0.1
timeout_s = 1.0
[devices.options]
profile = "intrabeam"
applicator = "SPH30"
preset_gy = 20.0
start_delay_s = 2.0
[[devices]]
name = "stand-1"
role = "applicator"
driver = "sim"
poll_interval_s = 0.1
timeout_s = 1.0
[devices.options]
applicator = "SPH30"
"""


class Failed(Exception):
    """A process did not start or died: the message says which and where its log is."""


class _Interrupted(Exception):
    pass


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted


@dataclass
class Child:
    """A process of ours, tethered; stopped by its Popen (so by PID, and only if ours)."""

    name: str
    proc: subprocess.Popen[bytes]
    tether: Tether | None
    log: Path | None = None

    @classmethod
    def start(
        cls,
        name: str,
        cmd: list[str],
        work: Path,
        *,
        stdin: int | None = None,
        stdout: int | None = None,
    ) -> Child:
        log = work / f"{name}.log"
        tether = Tether(name)
        with log.open("ab") as err:
            proc = subprocess.Popen(  # noqa: S603 - our own command line
                tether.argv(cmd),
                stdin=subprocess.DEVNULL if stdin is None else stdin,
                stdout=subprocess.DEVNULL if stdout is None else stdout,
                stderr=err,
                pass_fds=tether.pass_fds,
                cwd=work,
            )
        tether.started()
        return cls(name, proc, tether, log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise Failed(f"{self.name} exited with code {self.proc.returncode}; see {self.log}")

    def line(self, within_s: float) -> dict[str, Any]:
        """The next JSON line on its stdout (its ready or result line)."""
        out = self.proc.stdout
        assert out is not None
        deadline = time.monotonic() + within_s
        while not select.select([out], [], [], 0.2)[0]:
            self.alive()
            if time.monotonic() > deadline:
                raise Failed(f"{self.name}: no line on stdout within {within_s} s; see {self.log}")
        raw = out.readline()
        if not raw:
            raise Failed(f"{self.name}: stdout closed (exit {self.proc.wait()}); see {self.log}")
        parsed: dict[str, Any] = json.loads(raw)
        return parsed

    def stop(self, sig: int = signal.SIGTERM, within_s: float = STOP_WITHIN_S) -> int:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    return self.proc.wait(timeout=within_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            return self.proc.wait()
        finally:
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None:
                    pipe.close()
            if self.tether is not None:
                self.tether.close()


@dataclass
class Row:
    phase: str
    process: str
    load: str  # clients or rooms
    use: Usage
    per: int = 1  # divide CPU and RSS by this for a per-room figure


@dataclass
class Run:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def wait_for(
    pred: Callable[[], bool], within_s: float, what: str, alive: Callable[[], None]
) -> None:
    deadline = time.monotonic() + within_s
    while not pred():
        alive()
        if time.monotonic() > deadline:
            raise Failed(f"no {what} within {within_s} s")
        time.sleep(0.05)


def logged(path: Path | None, event: str) -> bool:
    return path is not None and f'"event":"{event}"' in path.read_text("utf-8", "replace")


def beam_on(path: Path | None) -> bool:
    """The daemon's operational log says the delivery is irradiating (its ``phase`` line)."""
    if path is None:
        return False
    for raw in path.read_text("utf-8", "replace").splitlines():
        if '"event":"phase"' in raw and "irradiating" in raw.lower():
            return True
    return False


@contextlib.contextmanager
def children() -> Iterator[list[Child]]:
    """Every child started into the list is stopped on the way out, the last first."""
    started: list[Child] = []
    try:
        yield started
    finally:
        for c in reversed(started):
            c.stop()


def start_broker(work: Path) -> Mosquitto:
    return Mosquitto.start_sync(BrokerOptions(), work, tethered=True)


def start_dashboard(work: Path, url: str, kids: list[Child]) -> tuple[Child, int]:
    cmd = [str(BIN / "iort-dashboard"), "--broker", url, "--port", "0", "--log-level", "warning"]
    dash = Child.start("iort-dashboard", cmd, work, stdout=subprocess.PIPE)
    kids.append(dash)
    assert dash.proc.stdout is not None
    deadline = time.monotonic() + START_WITHIN_S
    while not select.select([dash.proc.stdout], [], [], 0.2)[0]:
        dash.alive()
        if time.monotonic() > deadline:
            raise Failed(f"iort-dashboard not serving within {START_WITHIN_S} s; see {dash.log}")
    line = dash.proc.stdout.readline().decode()
    if not line.startswith("iort-dashboard: serving "):
        raise Failed(f"iort-dashboard did not start: {line!r}; see {dash.log}")
    port = int(line.split()[-1].rstrip("/").rsplit(":", 1)[1])
    return dash, port


def start_viewers(work: Path, port: int, clients: int, path: str, kids: list[Child]) -> Child:
    cmd = [sys.executable, str(HERE / "sse_clients.py"), "--port", str(port)]
    viewers = Child.start(
        f"sse-{clients}",
        [*cmd, "--clients", str(clients), "--path", path],
        work,
        stdout=subprocess.PIPE,
    )
    kids.append(viewers)
    viewers.line(START_WITHIN_S)  # {"ready": N}
    return viewers


def start_daemon(d: Path, name: str, site: str, room: str, url: str, kids: list[Child]) -> Child:
    """``iortd run`` for one room: its own key, config and log directory under ``d/name``."""
    home = d / name
    key, _pub = write_keypair(generate_keypair(name), home / "keys")
    cfg = home / "site.toml"
    cfg.write_text(
        SITE_TOML.format(site=site, room=room, log_dir=home / "log", key=key, url=url),
        encoding="utf-8",
    )
    daemon = Child.start(name, [str(BIN / "iortd"), "run", "--config", str(cfg)], d)
    kids.append(daemon)
    return daemon


def real_rooms(args: argparse.Namespace, work: Path, idle: Child, rooms: int, run: Run) -> None:
    """``rooms`` real daemons (one ``iortd run`` each), a fresh broker and dashboard."""
    d = work / f"real-{rooms}"
    d.mkdir()
    with children() as kids:
        broker = start_broker(d / "broker")
        try:
            dash, dport = start_dashboard(d, broker.url, kids)
            daemons = [
                start_daemon(d, f"iortd-{i}", f"real-{rooms}", f"room-{i:03d}", broker.url, kids)
                for i in range(rooms)
            ]

            def alive() -> None:
                for c in kids:
                    c.alive()
                if not broker.running:
                    raise Failed(f"mosquitto exited; see {broker.log_path}")

            for dm in daemons:
                log = dm.log
                wait_for(lambda: beam_on(log), START_WITHIN_S, f"beam-on from {dm.name}", alive)  # noqa: B023 - called at once
            viewers = start_viewers(d, dport, 1, "/events", kids)
            time.sleep(args.warmup)
            procs = {
                "mosquitto": broker.pid,
                "iort-dashboard": dash.pid,
                "sse clients": viewers.pid,
                "idle python": idle.pid,
            }
            procs |= {dm.name: dm.pid for dm in daemons}
            use = measure(procs, args.fleet_seconds, alive)
            failed = []
            for dm in daemons:
                kids.remove(dm)
                if dm.stop() != 0:
                    failed.append(dm.name)
            if failed:
                run.notes.append(f"{', '.join(failed)} did not exit 0 at SIGTERM; see {d}")
            label = f"{rooms} room{'s' if rooms > 1 else ''}"
            total = Usage(
                sum(use[dm.name].cpu_s_per_s for dm in daemons),
                sum(use[dm.name].rss_end_mib for dm in daemons),
                sum(use[dm.name].rss_peak_mib for dm in daemons),
            )
            phase = "rooms, iortd run"
            for name in ("mosquitto", "iort-dashboard", "sse clients", "idle python"):
                run.rows.append(Row(phase, name, label, use[name]))
            run.rows.append(Row(phase, f"iortd run ({rooms} proc)", label, total))
            run.rows.append(Row(phase, "iortd run, per room", label, total, per=rooms))
        finally:
            broker.stop_sync()


def one_room(args: argparse.Namespace, work: Path, idle: Child, run: Run) -> None:
    """The real daemon, broker and dashboard, with 1 and 20 viewers."""
    d = work / "one-room"
    d.mkdir()
    with children() as kids:
        broker = start_broker(d / "broker")
        try:
            daemon = start_daemon(d, "iortd", SITE, ROOM, broker.url, kids)
            dash, dport = start_dashboard(d, broker.url, kids)

            def alive() -> None:
                for c in kids:
                    c.alive()
                if not broker.running:
                    raise Failed(f"mosquitto exited; see {broker.log_path}")

            wait_for(lambda: logged(daemon.log, "mqtt_connected"), START_WITHIN_S,
                     "mqtt_connected from iortd", alive)  # fmt: skip
            wait_for(lambda: beam_on(daemon.log), START_WITHIN_S, "beam-on from iortd", alive)
            time.sleep(args.warmup)
            for n in (1, 20):
                viewers = start_viewers(d, dport, n, f"/events?room={SITE}/{ROOM}", kids)
                alive()
                procs = {
                    "iortd run": daemon.pid,
                    LOOP_THREAD: daemon.pid,
                    "mosquitto": broker.pid,
                    "iort-dashboard": dash.pid,
                    "sse clients": viewers.pid,
                    "idle python": idle.pid,
                }
                task = Path(f"/proc/{daemon.pid}/task")
                use = measure(procs, args.seconds, alive, roots={LOOP_THREAD: task})
                kids.remove(viewers)
                viewers.stop()
                for name, u in use.items():
                    load = f"{n} viewer{'s' if n > 1 else ''}"
                    run.rows.append(Row("1 room, iortd run", name, load, u))
            kids.remove(daemon)
            rc = daemon.stop()
            if rc != 0:
                run.notes.append(f"iortd run exited {rc} at SIGTERM; see {daemon.log}")
        finally:
            broker.stop_sync()


def fleet(args: argparse.Namespace, work: Path, idle: Child, rooms: int, run: Run) -> None:
    """``rooms`` simulated rooms from the room-load generator, a fresh broker and dashboard."""
    d = work / f"rooms-{rooms}"
    d.mkdir()
    with children() as kids:
        broker = start_broker(d / "broker")
        try:
            dash, dport = start_dashboard(d, broker.url, kids)
            gens: list[Child] = []
            per = args.rooms_per_process
            for k in range(math.ceil(rooms / per)):
                n = min(per, rooms - k * per)
                cmd = [sys.executable, str(HERE / "roomload.py"), "--port", str(broker.port),
                       "--dir", str(d / "outboxes"), "--rooms", str(n), "--first", str(k * per),
                       "--site", f"load-{rooms}"]  # fmt: skip
                g = Child.start(f"roomload-{k}", cmd, d, stdout=subprocess.PIPE)
                kids.append(g)
                gens.append(g)
            for g in gens:
                g.line(START_WITHIN_S)  # {"ready": n}: every room connected
            began = time.monotonic()
            viewers = start_viewers(d, dport, 1, "/events", kids)

            def alive() -> None:
                for c in kids:
                    c.alive()
                if not broker.running:
                    raise Failed(f"mosquitto exited; see {broker.log_path}")

            time.sleep(args.warmup)
            procs = {
                "mosquitto": broker.pid,
                "iort-dashboard": dash.pid,
                "sse clients": viewers.pid,
                "idle python": idle.pid,
            }
            procs |= {g.name: g.pid for g in gens}
            use = measure(procs, args.fleet_seconds, alive)
            counts: list[dict[str, Any]] = []
            for g in gens:
                g.proc.send_signal(signal.SIGTERM)
            ran = time.monotonic() - began
            for g in gens:
                counts.append(g.line(STOP_WITHIN_S))
                kids.remove(g)
                g.stop()
            label = f"{rooms} room{'s' if rooms > 1 else ''}"
            gen = Usage(
                sum(use[g.name].cpu_s_per_s for g in gens),
                sum(use[g.name].rss_end_mib for g in gens),
                sum(use[g.name].rss_peak_mib for g in gens),
            )
            phase = "rooms, generator"
            for name in ("mosquitto", "iort-dashboard", "sse clients", "idle python"):
                run.rows.append(Row(phase, name, label, use[name]))
            run.rows.append(Row(phase, f"generator ({len(gens)} proc)", label, gen))
            run.rows.append(Row(phase, "generator, per room", label, gen, per=rooms))
            tel = sum(c["telemetry"] for c in counts)
            late = sum(c["late"] for c in counts)
            unsent = sum(c["unsent"] for c in counts)
            rate = tel / rooms / ran
            run.notes.append(
                f"{label}: {tel} telemetry + {sum(c['applicator'] for c in counts)} applicator "
                f"messages published in {ran:.0f} s ({rate:.2f} Hz per room and device, goal 10), "
                f"{late} late periods, {unsent} unsent at the stop"
            )
        finally:
            broker.stop_sync()


def print_table(run: Run) -> None:
    print()
    print(f"{'phase':<20} {'process':<24} {'load':<11} {'CPU s/s':>8} {'% core':>7} "
          f"{'RSS end':>8} {'peak MiB':>8}")  # fmt: skip
    for r in run.rows:
        u = r.use
        cpu, end, peak = u.cpu_s_per_s / r.per, u.rss_end_mib / r.per, u.rss_peak_mib / r.per
        print(f"{r.phase:<20} {r.process:<24} {r.load:<11} {cpu:8.4f} {cpu * 100:6.2f}% "
              f"{end:8.1f} {peak:8.1f}")  # fmt: skip


def verdict(run: Run) -> None:
    daemon = [r.use.cpu_s_per_s for r in run.rows if r.process == "iortd run"]
    if daemon:
        worst = max(daemon)
        word = "PASS" if worst < GOAL_DAEMON_CPU else "MISS"
        print(f"{word}  iortd run at 10 Hz < {GOAL_DAEMON_CPU:.0%} of one core: "
              f"{worst * 100:.2f} % (worst window)")  # fmt: skip


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="one room's windows (default 60)")
    p.add_argument("--fleet-seconds", type=float, default=30.0, help="each room count's window")
    p.add_argument("--rooms", default="1,10,50", help="room counts, comma-separated ('' = none)")
    p.add_argument("--rooms-per-process", type=int, default=25, metavar="N")
    p.add_argument("--real-rooms", default="10", help="room counts run as real daemons ('' = none)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds before each window")
    p.add_argument("--skip-one-room", action="store_true", help="only the room counts")
    p.add_argument("--dir", type=Path, help="an empty directory to work in (default: temporary)")
    args = p.parse_args(argv)
    try:
        args.room_counts = [int(x) for x in args.rooms.split(",") if x.strip()]
        args.real_counts = [int(x) for x in args.real_rooms.split(",") if x.strip()]
    except ValueError:
        p.error(
            f"--rooms {args.rooms!r} / --real-rooms {args.real_rooms!r}: give counts such as 1,10"
        )
    if any(n < 1 for n in args.room_counts + args.real_counts) or args.rooms_per_process < 1:
        p.error("room counts and --rooms-per-process must be >= 1")
    if min(args.seconds, args.fleet_seconds) <= 0 or args.warmup < 0:
        p.error("--seconds and --fleet-seconds must be > 0, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        mosquitto = find_mosquitto()
    except BrokerError:
        print(MOSQUITTO_INSTALL_HINT, file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    work, cleanup = work_dir(args.dir, "iortd-room-cost-")
    print_header("iortd room cost: CPU and memory per process, one host")
    print(f"  broker     {mosquitto}; disk {filesystem(work)}")
    print(f"  load avg   {loadavg()} (1, 5, 15 min) before; other work on this machine counts")
    run = Run()
    status = 0
    idle_cmd = [sys.executable, "-c", "import sys; sys.stdin.buffer.read()"]
    try:
        with children() as kids:
            idle = Child.start("idle-python", idle_cmd, work, stdin=subprocess.PIPE)
            kids.append(idle)
            if not args.skip_one_room:
                one_room(args, work, idle, run)
            for n in args.real_counts:
                real_rooms(args, work, idle, n, run)
            for n in args.room_counts:
                fleet(args, work, idle, n, run)
    except (Failed, BrokerError) as exc:
        print(f"room_cost: {exc}", file=sys.stderr)
        status = 1
    except (KeyboardInterrupt, _Interrupted):
        print("room_cost: interrupted; every process it started is stopped", file=sys.stderr)
        status = 130
    finally:
        if status == 0:
            cleanup()
        else:
            print(f"room_cost: logs kept in {work}", file=sys.stderr)
    print_table(run)
    for note in run.notes:
        print(f"  {note}")
    print(f"  load avg   {loadavg()} (1, 5, 15 min) after")
    verdict(run)
    return status


if __name__ == "__main__":
    sys.exit(main())
