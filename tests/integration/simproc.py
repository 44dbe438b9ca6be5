"""`iort-sim serve` as a process, for the integration tests: started on its own pty or
port, read as JSON lines (tests wait on what it prints, never on the clock), stopped by
PID. One place for the serial, Modbus, dashboard and report tests."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent

# The [[devices]] table of a daemon reading the serial simulator with serial-xrs.
SERIAL_XRS_DEVICE = """
[[devices]]
name = "console-1"
driver = "serial-xrs"
poll_interval_s = 0.1
timeout_s = 0.5
[devices.transport]
type = "serial"
port = "{port}"
baudrate = 19200
[devices.options]
applicator_every = 5
"""


@dataclass
class Simulator:
    """One ``iort-sim serve`` process. ``device`` is where it serves: the pty path
    (serial, modbus-rtu) or "host:port" (modbus-tcp); ``serving`` its serving line."""

    proc: asyncio.subprocess.Process
    device: str = ""
    lines: list[dict[str, Any]] = field(default_factory=list)
    serving: dict[str, Any] = field(default_factory=dict)

    @classmethod
    async def start(cls, *args: str, transport: str | None = "serial") -> Simulator:
        """Start it and wait until every endpoint is open (``ready``); ``transport=None``
        when ``args`` name a devices file (``--devices``)."""
        chosen = ("--transport", transport) if transport is not None else ()
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "iort-sim"),
            *("serve", *chosen, *args),
            stdout=asyncio.subprocess.PIPE,
        )
        sim = cls(proc)
        try:
            await sim.until("ready", within_s=10)
        except BaseException:
            await sim.stop()
            raise
        s = sim.serving = next(r for r in sim.lines if r["event"] == "serving")
        sim.device = s["device"] if "device" in s else f"{s['host']}:{s['port']}"
        return sim

    async def until(self, event: str, within_s: float) -> dict[str, Any]:
        """The first line of this event, read so far or within ``within_s``."""
        assert self.proc.stdout is not None
        rec: dict[str, Any]
        for rec in self.lines:
            if rec["event"] == event:
                return rec
        async with asyncio.timeout(within_s):
            while raw := await self.proc.stdout.readline():
                rec = json.loads(raw)
                self.lines.append(rec)
                if rec["event"] == event:
                    return rec
        raise AssertionError(f"iort-sim exited before {event}: {self.lines[-3:]}")

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 10 s."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
