"""The applicator reader simulator (APL-MB/1) served by `iort-sim serve --kind applicator`:
read by a third-party Modbus master (Debian's `mbpoll`) exactly as docs/protocols.md
documents it, over Modbus TCP, over RTU on a pty, and on one RTU line shared with a source
console at another unit id; then the production `modbus-apl` driver against it over both
framings: identity, a sample, a drift and released brakes driven with `iort-sim ctl`, a
reader link loss (TransportTimeout) and the link back.

The mbpoll helpers are test_sim_modbus_interop.py's, the simulator process simproc.py's."""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from simproc import Simulator
from test_sim_modbus_interop import BIN, REPO, poll, registers, run, text  # XRS-MB/1's helpers

from iortd.drivers.errors import TransportTimeout
from iortd.drivers.interface import DriverContext, DriverSpec
from iortd.drivers.modbus_apl import ModbusAplDriver, ModbusAplFactory
from iortd.kernel.clock import SystemClock
from iortd.kernel.types import ApplicatorReading, ApplicatorState, Tristate

pytestmark = pytest.mark.integration


@pytest.fixture(name="mbpoll")
def mbpoll_path() -> str:
    path = shutil.which("mbpoll")
    if path is None:
        pytest.fail("mbpoll is not installed: run `make test` or `apt-get install -y mbpoll`")
    return path


@pytest.fixture(name="start")
async def start_simulators() -> AsyncIterator[Callable[..., Awaitable[Simulator]]]:
    """``iort-sim serve ARGS``, ready; every one stopped by PID (SIGTERM) at the end."""
    started: list[Simulator] = []

    async def start(*args: str) -> Simulator:
        sim = await Simulator.start(*args, transport=None)
        started.append(sim)
        return sim

    try:
        yield start
    finally:
        for sim in started:
            await sim.stop()
            assert sim.proc.returncode == 0, "iort-sim stops cleanly on SIGTERM"


def serving_of(sim: Simulator, name: str) -> dict[str, Any]:
    return next(r for r in sim.lines if r["event"] == "serving" and r["device_name"] == name)


READER = ("--kind", "applicator", "--applicator", "SPH30", "--uses-left", "17")


async def until_ready(mbpoll: str, serving: dict[str, Any], unit: str = "2") -> None:
    """Read the reader's state register until READY (2), bounded."""
    seen: list[Any] = []
    try:
        async with asyncio.timeout(10):
            while True:
                code, out, err = await poll(
                    mbpoll, serving, "-a", unit, "-t", "3", "-r", "0", "-c", "1"
                )
                state = re.findall(r"^\[0\]:\s+(\d+)", out, re.M)
                seen.append(state or err.strip()[-60:])
                if code == 0 and state == ["2"]:
                    return
    except TimeoutError:
        raise AssertionError(f"the reader never READY within 10 s: {seen[-3:]}") from None


@pytest.mark.parametrize("transport", ["modbus-tcp", "modbus-rtu"])
async def test_mbpoll_reads_the_reader_as_the_protocol_document_says(
    mbpoll: str, start: Callable[..., Awaitable[Simulator]], transport: str
) -> None:
    sim: Simulator = await start("--transport", transport, *READER, "--speed", "10")
    serving = serving_of(sim, "applicator")
    assert (serving["protocol"], serving["kind"], serving["unit_id"]) == (
        "APL-MB/1",
        "applicator",
        2,
    )
    ident = await registers(mbpoll, serving, "-a", "2", "-t", "4", "-r", "100", "-c", "72")
    assert text(ident, 100, 16) == "iortd simulator"
    assert text(ident, 116, 8) == "APL-SIM"
    assert text(ident, 124, 8) == "APL-SIM-0001"
    await until_ready(mbpoll, serving)
    # The worked example of docs/protocols.md: mbpoll -a 2 -t 3 -r 0 -0 -c 26.
    regs = await registers(mbpoll, serving, "-a", "2", "-t", "3", "-r", "0", "-c", "26")
    assert [int(regs[a]) for a in range(7)] == [2, 0, 1, 1, 1, 1, 300]  # READY .. 30.0 mm
    assert text(regs, 7, 8) == "SIM-SPH30"
    assert regs[15] == 17  # uses left
    assert [regs[a] for a in range(16, 20)] == [0, 1, 0, 1]  # seated once, locked once
    assert [regs[a] for a in range(20, 25)] == [0, 0, 0, 0, 0]  # no displacement, no tilt
    assert regs[25] > 0  # heartbeat
    # A 32-bit counter, high word first (mbpoll -B).
    assert await registers(mbpoll, serving, "-a", "2", "-t", "3:int", "-B", "-r", "18") == {18: 1}
    # A drift shows as a signed displacement (0.01 mm) and its magnitude.
    ctl = (str(BIN / "iort-sim"), "ctl", "--control", str(serving["control"]))
    assert (await run(*ctl, "bump", "mm=1.5", "direction=-z"))[0] == 0
    regs = await registers(mbpoll, serving, "-a", "2", "-t", "3", "-r", "20", "-c", "4")
    assert [regs[a] for a in range(20, 24)] == [0, 0, 0x10000 - 150, 150]
    # Exceptions: 02 outside the windows, 01 for a write.
    code, _, err = await poll(mbpoll, serving, "-a", "2", "-t", "3", "-r", "38", "-c", "3")
    assert code != 0
    assert "Illegal data address" in err
    code, _, err = await poll(mbpoll, serving, "-a", "2", "-t", "4", "-r", "100", write="5")
    assert code != 0
    assert "Illegal function" in err


async def test_the_shipped_shared_line_a_console_at_unit_1_and_the_reader_at_unit_2(
    mbpoll: str, start: Callable[..., Awaitable[Simulator]]
) -> None:
    shipped = REPO / "config" / "sim-shared-line.toml"
    sim: Simulator = await start("--devices", str(shipped), "--speed", "10")
    console, stand = serving_of(sim, "or-1"), serving_of(sim, "or-1-stand")
    assert console["device"] == stand["device"], "one pty: one line"
    assert (console["unit_id"], stand["unit_id"]) == (1, 2)
    assert console["line"] == stand["line"] == "or-1-rs485"
    assert console["baudrate"] == stand["baudrate"] == 38400
    assert (console["protocol"], stand["protocol"]) == ("XRS-MB/1", "APL-MB/1")
    await until_ready(mbpoll, stand)
    ours = await registers(mbpoll, stand, "-a", "2", "-t", "4", "-r", "116", "-c", "8")
    theirs = await registers(mbpoll, console, "-a", "1", "-t", "4", "-r", "116", "-c", "8")
    assert text(ours, 116, 8) == "APL-SIM"
    assert text(theirs, 116, 8) != "APL-SIM"
    # Nobody at unit 3: no reply on the line.
    code, _, err = await poll(mbpoll, stand, "-a", "3", "-t", "3", "-r", "0", "-c", "1")
    assert code != 0
    assert "timed out" in err


def driver_for(serving: dict[str, Any]) -> ModbusAplDriver:
    if serving["transport"] == "modbus-tcp":
        transport: dict[str, Any] = {"type": "tcp", "host": "127.0.0.1", "port": serving["port"]}
    else:  # a pty refuses parity; a real line is 8E1
        transport = {"type": "serial", "port": serving["device"], "baudrate": 19200, "parity": "N"}
    spec = DriverSpec("stand", "applicator", 0.1, 0.4, transport, {"unit_id": 2})
    return ModbusAplFactory().create(spec, DriverContext(clock=SystemClock(), seed=0))


async def read_until(
    driver: ModbusAplDriver, ok: Callable[[ApplicatorReading], bool], what: str
) -> ApplicatorReading:
    seen: list[object] = []
    try:
        async with asyncio.timeout(10):
            while True:
                try:
                    reading = await driver.read_applicator()
                except TransportTimeout as exc:
                    seen.append(exc)
                    continue
                seen.append(reading.state)
                if ok(reading):
                    return reading
    except TimeoutError:
        raise AssertionError(f"never {what} within 10 s: {seen[-3:]}") from None


@pytest.mark.parametrize("transport", ["modbus-tcp", "modbus-rtu"])
async def test_the_modbus_apl_driver_reads_the_served_reader(
    start: Callable[..., Awaitable[Simulator]], transport: str
) -> None:
    sim: Simulator = await start("--transport", transport, *READER, "--speed", "8")
    serving = serving_of(sim, "applicator")
    ctl = (str(BIN / "iort-sim"), "ctl", "--control", str(serving["control"]))

    async def status() -> dict[str, Any]:
        code, out, err = await run(*ctl, "status")
        assert code == 0, err
        reply: dict[str, Any] = json.loads(out)
        return reply

    async with driver_for(serving) as driver:
        identity = await driver.identify()
        assert (identity.manufacturer, identity.serial, identity.simulated) == (
            "iortd simulator",
            "APL-SIM-0001",
            True,
        )
        first = await read_until(driver, lambda r: r.state is ApplicatorState.READY, "READY")
        assert first.simulated is True
        assert (first.seated, first.source_locked, first.brakes_engaged) == (Tristate.YES,) * 3
        assert first.applicator is not None
        assert (first.applicator.serial, first.applicator.diameter_mm) == ("SIM-SPH30", 30.0)
        assert first.displacement_mm == (0.0, 0.0, 0.0)
        # Drift for a while, then stop: the displacement read equals the simulator's truth
        # within the register's resolution (0.01 mm: half a step a component).
        assert (await run(*ctl, "drift", "rate=30", "direction=1,1,0"))[0] == 0
        moving = await read_until(
            driver, lambda r: (r.displacement_magnitude_mm or 0) > 0.5, "drifted 0.5 mm"
        )
        assert moving.displacement_mm is not None
        assert (await run(*ctl, "drift", "rate=0"))[0] == 0
        still = await driver.read_applicator()
        truth = (await status())["true_displacement_mm"]
        assert still.displacement_mm is not None
        assert still.displacement_magnitude_mm is not None
        for got, want in zip(still.displacement_mm, truth, strict=True):
            assert abs(got - want) <= 0.005 + 1e-9, (still.displacement_mm, truth)
        assert abs(still.displacement_magnitude_mm - math.hypot(*truth)) <= 0.02
        # Brakes released: seen at the next read.
        assert (await run(*ctl, "release_brakes"))[0] == 0
        released = await driver.read_applicator()
        assert released.brakes_engaged is Tristate.NO
        # The reader's link lost for 8 s of simulated time (1 s real): timeouts, then back.
        assert (await run(*ctl, "drop_link", "duration=8s"))[0] == 0
        with pytest.raises(TransportTimeout):
            await driver.read_applicator()
        back = await read_until(driver, lambda r: True, "answering again")
        assert back.brakes_engaged is Tristate.NO
        assert back.heartbeat is not None
        assert released.heartbeat is not None
        assert back.heartbeat != released.heartbeat
