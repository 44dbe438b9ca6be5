"""The simulator's XRS-MB/1 against a standard third-party Modbus master, Debian's
`mbpoll`, over Modbus TCP and over RTU on a pty: what it reads is what docs/protocols.md
says (state code, identity strings, a 32-bit value in the documented word order, the
documented exceptions). Then `iort-sim ctl` end to end, and two consoles from the shipped
devices file (config/sim-two-rooms.toml) in one process.

mbpoll is a second, independent reading of the Modbus specification (neither ours nor
pymodbus): `make test` installs it (Makefile SYSTEM_PACKAGES)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
import tty
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
REPO = Path(__file__).parents[2]
SPEED = "20"  # self-test (10 s) over in 0.5 s; 20 Gy on BAL34 (8 min) takes 24 s


@dataclass
class Simulator:
    proc: asyncio.subprocess.Process
    lines: list[dict[str, Any]] = field(default_factory=list)

    async def until(
        self, event: str, within_s: float, where: Callable[[dict[str, Any]], bool] = bool
    ) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for rec in self.lines:
            if rec["event"] == event and where(rec):
                return rec
        async with asyncio.timeout(within_s):
            while raw := await self.proc.stdout.readline():
                line: dict[str, Any] = json.loads(raw)
                self.lines.append(line)
                if line["event"] == event and where(line):
                    return line
        raise AssertionError(f"iort-sim exited before {event}: {self.lines[-3:]}")

    def serving(self, name: str = "console") -> dict[str, Any]:
        return next(r for r in self.lines if r["event"] == "serving" and r["device_name"] == name)

    @property
    def control(self) -> str:
        return str(self.serving(self.lines[0]["device_name"])["control"])


@pytest.fixture(scope="module")
def mbpoll() -> str:
    path = shutil.which("mbpoll")
    if path is None:
        pytest.fail("mbpoll is not installed: run `make test` or `apt-get install -y mbpoll`")
    return path


@pytest.fixture
async def start() -> AsyncIterator[Callable[..., Any]]:
    started: list[Simulator] = []

    async def run(*args: str) -> Simulator:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "iort-sim"),
            "serve",
            *args,
            stdout=asyncio.subprocess.PIPE,
        )
        sim = Simulator(proc)
        started.append(sim)
        await sim.until("ready", within_s=10)
        return sim

    try:
        yield run
    finally:
        for sim in started:  # stop only the processes this test started, by PID
            if sim.proc.returncode is None:
                sim.proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(sim.proc.wait(), 10)
                except TimeoutError:
                    sim.proc.kill()
                    await sim.proc.wait()
                    raise
            assert sim.proc.returncode == 0, "iort-sim stops cleanly on SIGTERM"
            control = sim.lines[0].get("control") if sim.lines else None
            gone = control is None or not await asyncio.to_thread(os.path.exists, control)
            assert gone, "the control socket is removed on SIGTERM"


async def run(*cmd: str, within_s: float = 10) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(within_s):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def link_args(serving: dict[str, Any]) -> list[str]:
    """mbpoll's options and target for a `serving` line."""
    if serving["transport"] == "modbus-tcp":
        return ["-m", "tcp", "-p", str(serving["port"]), "127.0.0.1"]
    return ["-m", "rtu", "-b", "19200", "-P", "even", serving["device"]]


async def poll(
    mbpoll: str, serving: dict[str, Any], *args: str, write: str | None = None
) -> tuple[int, str, str]:
    """One mbpoll read (or write of ``write``), 0-based addresses, once: `-0 -1`."""
    link = link_args(serving)
    values = [] if write is None else [write]
    return await run(mbpoll, *link[:-1], "-0", "-1", "-o", "1", *args, link[-1], *values)


async def registers(mbpoll: str, serving: dict[str, Any], *args: str) -> dict[int, float]:
    code, out, err = await poll(mbpoll, serving, *args)
    assert code == 0, f"mbpoll {args}: {err or out}"
    return {int(a): float(v) for a, v in re.findall(r"^\[(\d+)\]:\s+(-?[\d.]+)", out, re.M)}


def text(regs: dict[int, float], start: int, count: int) -> str:
    raw = b"".join(int(regs[a]).to_bytes(2, "big") for a in range(start, start + count))
    return raw.rstrip(b"\0").decode("ascii")


async def until_state(mbpoll: str, serving: dict[str, Any], code: int, within_s: float) -> None:
    """Read the state register until it holds ``code`` (bounded)."""
    seen: list[float] = []
    try:
        async with asyncio.timeout(within_s):
            while True:
                regs = await registers(mbpoll, serving, "-t", "3", "-r", "0", "-c", "1")
                seen.append(regs[0])
                if regs[0] == code:
                    return
    except TimeoutError:
        raise AssertionError(f"state register never {code} in {within_s} s: {seen[-5:]}") from None


CONSOLE: tuple[str, ...] = ("--profile", "axxent", "--applicator", "BAL34", "--preset", "20")
CONSOLE += ("--start-delay", "0", "--seed", "5", "--speed", SPEED)


@pytest.mark.parametrize("transport", ["modbus-tcp", "modbus-rtu"])
async def test_mbpoll_reads_what_the_protocol_document_says(
    mbpoll: str, start: Callable[..., Any], transport: str
) -> None:
    sim: Simulator = await start("--transport", transport, *CONSOLE)
    serving = sim.serving()
    assert serving["protocol"] == "XRS-MB/1"
    assert serving["unit_id"] == 1
    # Identity: holding registers 100-171, two ASCII characters a register, NUL-padded.
    ident = await registers(mbpoll, serving, "-t", "4", "-r", "100", "-c", "72")
    assert text(ident, 100, 16) == "iortd simulator"
    assert text(ident, 124, 8) == "SIM-0001"
    assert text(ident, 140, 32) == ""  # no scenario played
    # The state code: 5 IRRADIATING once the self-test is over.
    await until_state(mbpoll, serving, 5, within_s=15)
    block = await registers(mbpoll, serving, "-t", "3", "-r", "0", "-c", "40")
    assert len(block) == 40
    assert block[25] == 5  # applicator.type balloon
    assert block[26] == 350  # 35.0 mm / 0.1
    assert all(block[a] == 0 for a in range(16, 25)), "all interlocks ok"
    # 32-bit values, high word first (mbpoll -B): planned_time 20 Gy / 2.5 Gy/min = 480 s
    # / 0.1 = 4800; preset 20.0 as f32. Without -B mbpoll takes the low word first.
    planned = await registers(mbpoll, serving, "-t", "3:int", "-B", "-r", "12", "-c", "1")
    assert planned == {12: 4800}
    swapped = await registers(mbpoll, serving, "-t", "3:int", "-r", "12", "-c", "1")
    assert swapped == {12: 4800 << 16}
    preset = await registers(mbpoll, serving, "-t", "3:float", "-B", "-r", "8", "-c", "1")
    assert preset == {8: 20.0}
    # Exceptions: 02 outside the window, 01 for a write.
    code, _, err = await poll(mbpoll, serving, "-t", "3", "-r", "38", "-c", "3")
    assert code != 0
    assert "Illegal data address" in err
    code, _, err = await poll(mbpoll, serving, "-t", "4", "-r", "99", "-c", "2")
    assert "Illegal data address" in err
    code, _, err = await poll(mbpoll, serving, "-t", "4", "-r", "100", write="5")
    assert code != 0
    assert "Illegal function" in err
    # Another unit id: 0B over TCP; over RTU another device's frame, so no reply at all.
    code, _, err = await poll(mbpoll, serving, "-a", "2", "-t", "3", "-r", "0", "-c", "1")
    assert code != 0
    if transport == "modbus-tcp":
        assert "Target device failed to respond" in err
    else:
        assert "timed out" in err


async def test_ctl_open_door_shows_in_the_next_read(mbpoll: str, start: Callable[..., Any]) -> None:
    sim: Simulator = await start("--transport", "modbus-tcp", *CONSOLE)
    serving = sim.serving()
    ctl = (str(BIN / "iort-sim"), "ctl", "--control", sim.control)
    await until_state(mbpoll, serving, 5, within_s=15)
    code, out, _ = await run(*ctl, "open_door")
    assert code == 0
    reply = json.loads(out)
    assert reply["ok"] is True
    assert reply["state"] == "INTERRUPTED"
    regs = await registers(mbpoll, serving, "-t", "3", "-r", "0", "-c", "17")
    assert regs[0] == 6, "state INTERRUPTED"
    assert regs[16] == 1, "door interlock tripped"
    event = await sim.until("control", within_s=5)
    assert (event["device_name"], event["action"]) == ("console", "open_door")
    # The console refuses to resume with the door open: exit 1 and the reason.
    code, out, err = await run(*ctl, "resume")
    assert code == 1
    assert json.loads(out)["ok"] is False
    assert "interlocks not clear: door" in err
    assert (await run(*ctl, "close_door"))[0] == 0
    assert (await run(*ctl, "resume"))[0] == 0
    await until_state(mbpoll, serving, 5, within_s=5)
    # A dropped link: mbpoll gets no answer; restored, it reads again.
    assert (await run(*ctl, "drop_link", "duration=10m"))[0] == 0
    code, _, err = await poll(mbpoll, serving, "-t", "3", "-r", "0", "-c", "1")
    assert code != 0
    assert "timed out" in err
    assert (await run(*ctl, "restore_link"))[0] == 0
    status = json.loads((await run(*ctl, "status"))[1])
    assert status["link"]["down"] is False
    assert status["interlocks"]["door"] == "ok"
    # Usage errors: exit 2.
    code, _, err = await run(*ctl[:3], "/nonexistent/control.sock", "status")
    assert code == 2
    assert "cannot reach" in err


async def test_two_consoles_from_the_shipped_devices_file(
    mbpoll: str, start: Callable[..., Any]
) -> None:
    sim: Simulator = await start(
        "--devices", str(REPO / "config" / "sim-two-rooms.toml"), "--speed", SPEED
    )
    ready = await sim.until("ready", within_s=1)
    assert ready["devices"] == ["or-5", "or-6"]
    serial, tcp = sim.serving("or-5"), sim.serving("or-6")
    assert (serial["transport"], serial["protocol"]) == ("serial", "XRS-ASCII/1")
    assert (tcp["transport"], tcp["protocol"]) == ("modbus-tcp", "XRS-MB/1")
    assert serial["control"] == tcp["control"] == ready["control"]
    ident = await registers(mbpoll, tcp, "-t", "4", "-r", "100", "-c", "32")
    assert text(ident, 100, 16) == "iortd simulator"
    assert text(ident, 124, 8) == "SIM-0006"
    # The serial console on its pty, as a terminal program would drive it.
    fd = os.open(serial["device"], os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        tty.setraw(fd)
        os.write(fd, b"$ID*A21B\r\n")
        line = await read_line(fd, within_s=5)
    finally:
        os.close(fd)
    assert line.startswith(b"$ID,iortd simulator,")
    assert b",SIM-0005," in line
    ctl = (str(BIN / "iort-sim"), "ctl", "--control", sim.control)
    listing = json.loads((await run(*ctl, "list"))[1])
    assert [d["device_name"] for d in listing["devices"]] == ["or-5", "or-6"]
    assert listing["devices"][1]["port"] == tcp["port"]
    code, _, err = await run(*ctl, "open_door")
    assert code == 1
    assert "name one (or-5, or-6)" in err
    code, out, _ = await run(*ctl, "--device", "or-6", "status")
    assert code == 0
    assert json.loads(out)["device"] == "or-6"


async def read_line(fd: int, within_s: float) -> bytes:
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    loop.add_reader(fd, readable.set)
    out = b""
    try:
        async with asyncio.timeout(within_s):
            while not out.endswith(b"\n") and len(out) < 256:
                await readable.wait()
                readable.clear()
                try:
                    out += os.read(fd, 256)
                except BlockingIOError:
                    continue
    finally:
        loop.remove_reader(fd)
    return out
