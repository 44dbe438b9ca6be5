"""Benchmark of the drivers' poll cycles against the bare round trip of the same request
with the underlying library, in one run (issue 5 item 7).

Three simulators are started (``iort-sim serve``, Axxent-like console, BAL34, preset
20 Gy, start delay 600 s so the model stays put while we measure), one per transport:

- **serial-xrs over a pty** (XRS-ASCII/1). (1) iortd: the ``serial-xrs`` driver
  (drivers/serial_xrs.py over drivers/transport/'s SerialTransport,
  pyserial-asyncio-fast), ``applicator_every = 10``; one cycle is one ``await
  driver.read()``: an ST exchange, plus an AP exchange on every 10th read. (2) baseline:
  pyserial, ``serial.Serial(port, 19200, timeout=1)``, blocking, ``write(b"$ST*5C92\r\n")``
  then ``readline()``. pyserial's readline reads one byte at a time (a select() and a
  read() per byte) while the transport takes whatever the pty has in one read, so the
  "bare" round trip can be the slower one: the overhead then comes out negative.
- **modbus-xrs over Modbus TCP** (XRS-MB/1). (1) iortd: the ``modbus-xrs`` driver with the
  bundled map; one cycle is one ``await driver.read()``: one request for input registers
  0-37 and the decoding of all its points into a reading. (2) baseline: pymodbus's own
  client, ``AsyncModbusTcpClient`` (retries 0, no reconnect), ``read_input_registers(0,
  count=38, device_id=1)``: the same request, registers only, no decoding.
- **modbus-xrs over Modbus RTU on a pty**: as TCP, with ``AsyncModbusSerialClient``
  (RTU framer) as the baseline. The simulator's line-time model is off (``--baudrate 0``)
  so that both sides measure software, not a modelled wire.

Same number of cycles for each (``--cycles``, after ``--warmup`` unmeasured ones);
p50/p90/p99/max per cycle in ms and cycles/s; overhead = driver p50 - bare p50 (and the
ratio). A pty ignores the baud rate (docs/dependencies.md): on a real 19200-baud line each
exchange would also take its bytes' time on the wire; that figure is printed as a
reference. There is no pass/miss goal in the issue for this item: the figures say how
much of a poll cycle is iortd's own work and how it compares with the wire time. A
benchmark, not a test: it exits 0 whatever the figures.

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

import pymodbus
import serial
from machine import print_header
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.framer import FramerType

from iortd.drivers.interface import DriverContext, DriverSpec
from iortd.drivers.modbus_xrs import ModbusXrsFactory
from iortd.drivers.serial_xrs import SerialXrsFactory
from iortd.drivers.xrs_ascii import Command, encode_request
from iortd.kernel.clock import SystemClock

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CYCLES = 2_000
DEFAULT_WARMUP = 50
APPLICATOR_EVERY = 10
BAUD = 19_200
BITS_PER_BYTE = 10  # 8N1: start bit, 8 data bits, stop bit
REQUEST = encode_request(Command.STATUS)  # b"$ST*5C92\r\n"
SIM_ARGS = (
    "serve",
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


def sim_command(transport: str) -> list[str]:
    exe = Path(sys.executable).with_name("iort-sim")
    if not exe.exists():
        exe = REPO / ".venv" / "bin" / "iort-sim"
    extra = ["--baudrate", "0"] if transport == "modbus-rtu" else []
    return [str(exe), *SIM_ARGS, "--transport", transport, *extra]


def start_sim(transport: str) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    """Start the simulator and return it with its "serving" line; its later stdout lines
    are read (and dropped) by a thread so that the pipe never fills."""
    proc = subprocess.Popen(  # noqa: S603 - our simulator, our command line
        sim_command(transport),
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


def _wait_serving(proc: subprocess.Popen[bytes]) -> dict[str, object]:
    assert proc.stdout is not None
    found: list[dict[str, object]] = []

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if event.get("event") == "serving":
                found.append(event)
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


# ---- Modbus: the driver and pymodbus's client ------------------------------------------

MODBUS_COUNT = 38  # input registers 0-37: the map's telemetry block, one request


def modbus_transport(serving: dict[str, object]) -> dict[str, object]:
    if serving["transport"] == "modbus-tcp":
        return {"type": "tcp", "host": serving["host"], "port": serving["port"]}
    return {"type": "serial", "port": serving["device"], "baudrate": BAUD}


async def modbus_driver_cycles(
    serving: dict[str, object], n: int, warmup: int
) -> tuple[Cycles, str, str]:
    spec = DriverSpec(
        name="bench-mb",
        role="source",
        poll_interval_s=0.1,
        timeout_s=1.0,
        transport=modbus_transport(serving),
        options={"map": "xrs-mb1", "unit_id": 1},
    )
    driver = ModbusXrsFactory().create(spec, DriverContext(clock=SystemClock(), seed=0))
    times: list[float] = []
    async with driver:
        ident = await driver.identify()
        for _ in range(warmup):
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


async def modbus_bare_cycles(serving: dict[str, object], n: int, warmup: int) -> Cycles:
    client: AsyncModbusTcpClient | AsyncModbusSerialClient
    if serving["transport"] == "modbus-tcp":
        client = AsyncModbusTcpClient(
            str(serving["host"]),
            port=int(str(serving["port"])),
            timeout=1,
            retries=0,
            reconnect_delay=0,
        )
    else:
        client = AsyncModbusSerialClient(
            str(serving["device"]),
            framer=FramerType.RTU,
            baudrate=BAUD,
            timeout=1,
            retries=0,
            reconnect_delay=0,
        )
    if not await client.connect():
        raise RuntimeError(f"pymodbus could not connect to {serving}")
    times: list[float] = []
    try:
        for _ in range(warmup):
            await client.read_input_registers(0, count=MODBUS_COUNT, device_id=1)
        perf = time.perf_counter
        t0 = perf()
        for _ in range(n):
            t = perf()
            rr = await client.read_input_registers(0, count=MODBUS_COUNT, device_id=1)
            times.append((perf() - t) * 1e3)
        t1 = perf()
    finally:
        client.close()
    if rr.isError() or len(rr.registers) != MODBUS_COUNT:
        raise RuntimeError(f"unexpected reply from the simulator: {rr}")
    return Cycles(times, t1 - t0)


# ---- the run ----------------------------------------------------------------------------

HEAD = f"  {'measurement':<46} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7} {'cycles/s':>9}"


def row(what: str, times: list[float], rate: float | None) -> None:
    figs = " ".join(f"{pct(times, q):7.3f}" for q in (0.5, 0.9, 0.99))
    r = f"{rate:9,.0f}" if rate is not None else f"{'':9}"
    print(f"  {what:<46} {figs} {max(times):7.3f} {r}".rstrip())


def table_head() -> None:
    print(HEAD + "   (ms)")
    print(f"  {'-' * 46} {'-' * 7} {'-' * 7} {'-' * 7} {'-' * 7} {'-' * 9}")


def overhead(what: str, drv: list[float], bare: list[float]) -> None:
    d50, b50 = pct(drv, 0.5), pct(bare, 0.5)
    print(f"  {what:<46} {(d50 - b50) * 1e3:7.0f} us   {d50 / b50:.2f}x")


def serial_section(args: argparse.Namespace) -> None:
    proc, serving = start_sim("serial")
    device = str(serving["device"])
    try:
        print(f"  simulator  pid {proc.pid}, --transport serial, pty {device}")
        sys.stdout.flush()
        drv, who, state = asyncio.run(driver_cycles(device, args.cycles, args.warmup))
        bare, reply_len = bare_cycles(device, args.cycles, args.warmup)
    finally:
        code = end_process(proc)
    print(f"  device     {who}, state {state} at the end; simulator exit code {code}")
    print()
    st_only = [t for i, t in enumerate(drv.times_ms) if i % APPLICATOR_EVERY]
    with_ap = [t for i, t in enumerate(drv.times_ms) if i % APPLICATOR_EVERY == 0]
    table_head()
    row(f"(1) driver.read(), all cycles (AP 1 in {APPLICATOR_EVERY})", drv.times_ms, drv.per_s)
    row("    ST-only cycles", st_only, None)
    row("    cycles with ST + AP", with_ap, None)
    row("(2) baseline: pyserial write + readline, ST", bare.times_ms, bare.per_s)
    print()
    print("  overhead (p50 against p50)")
    overhead("driver, all cycles - bare", drv.times_ms, bare.times_ms)
    overhead("driver, ST-only cycles - bare", st_only, bare.times_ms)
    print()
    d50 = pct(drv.times_ms, 0.5)
    wire_ms = (len(REQUEST) + reply_len) * BITS_PER_BYTE / BAUD * 1e3
    print(f"  reference: a pty ignores the baud rate; at {BAUD} baud 8N1 the ST exchange")
    print(
        f"  ({len(REQUEST)} + {reply_len} bytes) would add {wire_ms:.2f} ms on the wire "
        f"per cycle, {wire_ms / d50:,.0f}x the driver's p50 here"
    )
    if d50 < pct(bare.times_ms, 0.5):
        print("  note: pyserial's readline() reads byte by byte (a select + read each);")
        print("  the driver reads the pty in chunks, hence a negative overhead")


def modbus_section(transport: str, args: argparse.Namespace) -> None:
    proc, serving = start_sim(transport)
    where = serving.get("device") or f"{serving['host']}:{serving['port']}"
    try:
        print(f"  simulator  pid {proc.pid}, --transport {transport}, {where}")
        sys.stdout.flush()
        drv, who, state = asyncio.run(modbus_driver_cycles(serving, args.cycles, args.warmup))
        bare = asyncio.run(modbus_bare_cycles(serving, args.cycles, args.warmup))
    finally:
        code = end_process(proc)
    print(f"  device     {who}, state {state} at the end; simulator exit code {code}")
    print()
    client = "AsyncModbusTcpClient" if transport == "modbus-tcp" else "AsyncModbusSerialClient"
    table_head()
    row("(1) driver.read(): 1 request + 28 points", drv.times_ms, drv.per_s)
    row(f"(2) baseline: pymodbus {client}", bare.times_ms, bare.per_s)
    print()
    print("  overhead (p50 against p50)")
    overhead("driver - bare", drv.times_ms, bare.times_ms)
    if transport == "modbus-rtu":
        request, reply = 8, 5 + 2 * MODBUS_COUNT
        wire_ms = (request + reply) * 11 / BAUD * 1e3  # 8E1: 11 bits a byte
        print()
        print(f"  reference: at {BAUD} baud 8E1 this exchange ({request} + {reply} bytes) takes")
        print(f"  {wire_ms:.1f} ms on the wire, plus 3.5-character gaps, per cycle")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--cycles", type=int, default=DEFAULT_CYCLES, help="measured cycles each")
    ap.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="unmeasured cycles first")
    args = ap.parse_args(argv)
    if args.cycles < 1 or args.warmup < 0:
        ap.error("--cycles must be at least 1 and --warmup at least 0")

    started = time.perf_counter()
    print_header("iortd poll-cycle benchmark (serial-xrs over a pty; modbus-xrs over TCP and RTU)")
    print(f"  pyserial   {serial.__version__}; pymodbus {pymodbus.__version__}")
    print(f"  cycles     {args.cycles} measured each, after {args.warmup} warm-up")
    print()
    print("serial-xrs, XRS-ASCII/1 over a pty")
    serial_section(args)
    print()
    print("modbus-xrs, XRS-MB/1 over Modbus TCP (loopback)")
    modbus_section("modbus-tcp", args)
    print()
    print("modbus-xrs, XRS-MB/1 over Modbus RTU on a pty (line-time model off)")
    modbus_section("modbus-rtu", args)
    print()
    print(f"  total time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
