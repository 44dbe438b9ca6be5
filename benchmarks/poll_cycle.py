"""Benchmark of the serial-xrs driver's poll cycle against a bare pyserial round trip.

Issue 5 item 7, serial part only: the Modbus driver does not exist yet, so its poll cycle
is not measured here.

Measured in one run, against one simulator process (``iort-sim serve --transport serial
--profile axxent --applicator BAL34 --preset 20 --start-delay 600``, so that the model
stays in READY/SELF_TEST while we measure), over the pty it serves:

1. iortd: the ``serial-xrs`` driver (drivers/serial_xrs.py over drivers/transport.py's
   SerialTransport, pyserial-asyncio-fast), built by its factory with
   ``applicator_every = 10`` and entered with ``async with``; one cycle is one
   ``await driver.read()``: an ST exchange, plus an AP exchange on every 10th read (so
   the percentiles are also given for the ST-only cycles);
2. baseline: the bare round trip of the same request with the underlying library:
   pyserial, ``serial.Serial(port, 19200, timeout=1)``, blocking, in the same process,
   ``write(b"$ST*5C92\\r\\n")`` then ``readline()`` of the reply. Note that pyserial's
   readline (io.IOBase's) reads one byte at a time, a select() and a read() per byte,
   while the driver's transport takes whatever the pty has in one read: the "bare"
   round trip can be the slower one, and the overhead then comes out negative.

Same number of cycles for both (``--cycles``, after ``--warmup`` unmeasured ones);
p50/p90/p99/max per cycle in ms and cycles/s; overhead = driver p50 - bare p50 (and the
ratio). A pty ignores the baud rate (LIBRARIES.md): on a real 19200-baud line each
exchange would also take ~(request + reply bytes) * 10 / 19200 s on the wire; that
figure is printed for the ST exchange as a reference. There is no pass/miss goal in the
issue for this item: the figures say how much of a poll cycle is iortd's own work and
how it compares with the wire time. A benchmark, not a test: it exits 0 whatever the
figures.

    .venv/bin/python benchmarks/poll_cycle.py [--cycles N] [--warmup W]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import serial
from machine import print_header

from drivers.clock import SystemClock
from drivers.interface import DriverContext, DriverSpec
from drivers.serial_xrs import SerialXrsFactory
from drivers.xrs_ascii import Command, encode_request

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CYCLES = 2_000
DEFAULT_WARMUP = 50
APPLICATOR_EVERY = 10
BAUD = 19_200
BITS_PER_BYTE = 10  # 8N1: start bit, 8 data bits, stop bit
REQUEST = encode_request(Command.STATUS)  # b"$ST*5C92\r\n"
SIM_ARGS = (
    "serve",
    "--transport",
    "serial",
    "--profile",
    "axxent",
    "--applicator",
    "BAL34",
    "--preset",
    "20",
    "--start-delay",
    "600",
)
SERVING_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0


# ---- small helpers ----------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass(slots=True)
class Cycles:
    times_ms: list[float]
    seconds: float  # wall time of the whole measured loop

    @property
    def per_s(self) -> float:
        return len(self.times_ms) / self.seconds


# ---- the simulator ----------------------------------------------------------------------


def sim_command() -> list[str]:
    exe = Path(sys.executable).with_name("iort-sim")
    if not exe.exists():
        exe = REPO / ".venv" / "bin" / "iort-sim"
    return [str(exe), *SIM_ARGS]


def start_sim() -> tuple[subprocess.Popen[bytes], str]:
    """Start the simulator and return it with the pty path from its "serving" line; its
    later stdout lines are read (and dropped) by a thread so that the pipe never fills."""
    proc = subprocess.Popen(  # noqa: S603 - our simulator, our command line
        sim_command(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        device = _wait_serving(proc)
    except BaseException:
        end_process(proc)
        raise
    assert proc.stdout is not None
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, device


def _wait_serving(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    found: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if event.get("event") == "serving":
                found.append(str(event["device"]))
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(SERVING_TIMEOUT_S)
    if not found:
        raise RuntimeError(
            f"iort-sim did not report serving within {SERVING_TIMEOUT_S:g} s "
            f"(exit code {proc.poll()})"
        )
    return found[0]


def end_process(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM the process we started (by its Popen, so only if not yet reaped), then
    kill it if it has not exited within STOP_TIMEOUT_S."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


# ---- (1) the driver ---------------------------------------------------------------------


async def driver_cycles(device: str, n: int, warmup: int) -> tuple[Cycles, str, str]:
    spec = DriverSpec(
        name="bench-xrs",
        role="source",
        poll_interval_s=0.1,
        timeout_s=1.0,
        transport={"type": "serial", "port": device},
        options={"applicator_every": APPLICATOR_EVERY},
    )
    driver = SerialXrsFactory().create(spec, DriverContext(clock=SystemClock(), seed=0))
    times: list[float] = []
    async with driver:
        ident = await driver.identify()
        # Whole multiples of APPLICATOR_EVERY reads (the first read asks AP too), so that
        # measured cycle i sends AP exactly when i % APPLICATOR_EVERY == 0.
        for _ in range(-(-warmup // APPLICATOR_EVERY) * APPLICATOR_EVERY):
            await driver.read()
        perf = time.perf_counter
        t0 = perf()
        for _ in range(n):
            t = perf()
            reading = await driver.read()
            times.append((perf() - t) * 1e3)
        t1 = perf()
    who = f"{ident.manufacturer} {ident.model} ({'simulated' if ident.simulated else 'real'})"
    return Cycles(times, t1 - t0), who, reading.state.value


# ---- (2) the baseline -------------------------------------------------------------------


def bare_cycles(device: str, n: int, warmup: int) -> tuple[Cycles, int]:
    times: list[float] = []
    with serial.Serial(device, BAUD, timeout=1) as port:
        port.reset_input_buffer()
        reply = b""
        for _ in range(warmup):
            port.write(REQUEST)
            reply = port.readline()
        perf = time.perf_counter
        t0 = perf()
        for _ in range(n):
            t = perf()
            port.write(REQUEST)
            reply = port.readline()
            times.append((perf() - t) * 1e3)
        t1 = perf()
    if not reply.startswith(b"$ST,") or not reply.endswith(b"\r\n"):
        raise RuntimeError(f"unexpected ST reply from the simulator: {reply!r}")
    return Cycles(times, t1 - t0), len(reply)


# ---- the run ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--cycles", type=int, default=DEFAULT_CYCLES, help="measured cycles each")
    ap.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="unmeasured cycles first")
    args = ap.parse_args(argv)
    if args.cycles < 1 or args.warmup < 0:
        ap.error("--cycles must be at least 1 and --warmup at least 0")

    started = time.perf_counter()
    print_header("iortd serial poll-cycle benchmark (serial-xrs; Modbus: no driver yet)")
    print(f"  pyserial   {serial.__version__}")
    sys.stdout.flush()

    proc, device = start_sim()
    try:
        print(f"  simulator  pid {proc.pid}, {' '.join(SIM_ARGS)}")
        print(f"  pty        {device}")
        sys.stdout.flush()
        drv, who, state = asyncio.run(driver_cycles(device, args.cycles, args.warmup))
        bare, reply_len = bare_cycles(device, args.cycles, args.warmup)
    finally:
        code = end_process(proc)
    print(f"  device     {who}, state {state} at the end")
    print(f"  cycles     {args.cycles} measured each, after {args.warmup} warm-up")
    print(f"  simulator  stopped, exit code {code}")
    print()

    st_only = [t for i, t in enumerate(drv.times_ms) if i % APPLICATOR_EVERY]
    with_ap = [t for i, t in enumerate(drv.times_ms) if i % APPLICATOR_EVERY == 0]
    head = f"  {'measurement':<44} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7} {'cycles/s':>9}"
    print(head + "   (ms)")
    print(f"  {'-' * 44} {'-' * 7} {'-' * 7} {'-' * 7} {'-' * 7} {'-' * 9}")

    def row(what: str, times: list[float], rate: float | None) -> None:
        figs = " ".join(f"{pct(times, q):7.3f}" for q in (0.5, 0.9, 0.99))
        r = f"{rate:9,.0f}" if rate is not None else f"{'':9}"
        print(f"  {what:<44} {figs} {max(times):7.3f} {r}".rstrip())

    row(f"(1) driver.read(), all cycles (AP 1 in {APPLICATOR_EVERY})", drv.times_ms, drv.per_s)
    row("    ST-only cycles", st_only, None)
    row("    cycles with ST + AP", with_ap, None)
    row("(2) baseline: pyserial write + readline, ST", bare.times_ms, bare.per_s)
    print()
    d50, s50, b50 = pct(drv.times_ms, 0.5), pct(st_only, 0.5), pct(bare.times_ms, 0.5)
    print("  overhead (p50 against p50)")
    print(f"  {'driver, all cycles - bare':<44} {(d50 - b50) * 1e3:7.0f} us   {d50 / b50:.2f}x")
    print(f"  {'driver, ST-only cycles - bare':<44} {(s50 - b50) * 1e3:7.0f} us   {s50 / b50:.2f}x")
    print()
    wire_ms = (len(REQUEST) + reply_len) * BITS_PER_BYTE / BAUD * 1e3
    print(f"  reference: a pty ignores the baud rate; at {BAUD} baud 8N1 the ST exchange")
    print(
        f"  ({len(REQUEST)} + {reply_len} bytes) would add {wire_ms:.2f} ms on the wire "
        f"per cycle, {wire_ms / d50:,.0f}x the driver's p50 here"
    )
    if d50 < b50:
        print("  note: pyserial's readline() reads byte by byte (a select + read each);")
        print("  the driver reads the pty in chunks, hence a negative overhead")
    print()
    print(f"  total time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
