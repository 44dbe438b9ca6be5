"""The real daemon as a process whose operational log (JSON lines on stderr) is read as
it runs; tests wait on what it logs, never on the clock."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


@dataclass
class Site:
    config: Path
    log_dir: Path
    pubkey: Path


@dataclass
class Daemon:
    """`iortd run` as a process; ``lines`` are its operational-log records so far."""

    proc: asyncio.subprocess.Process
    lines: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    async def start(cls, site: Site) -> Daemon:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "iortd"),
            "run",
            "--config",
            str(site.config),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], what: str, within_s: float = 20
    ) -> dict[str, Any]:
        """Read log lines until one satisfies ``pred``; fail clearly after ``within_s``."""
        assert self.proc.stderr is not None
        for line in self.lines:
            if pred(line):
                return line
        try:
            async with asyncio.timeout(within_s):
                while True:
                    raw = await self.proc.stderr.readline()
                    if not raw:
                        raise AssertionError(
                            f"iortd exited while waiting for {what}: {self.lines[-5:]}"
                        )
                    rec = json.loads(raw)
                    self.lines.append(rec)
                    if pred(rec):
                        return rec
        except TimeoutError:
            raise AssertionError(f"timed out after {within_s} s waiting for {what}") from None

    async def drain(self) -> None:
        assert self.proc.stderr is not None
        rest = await self.proc.stderr.read()
        self.lines += [json.loads(x) for x in rest.decode().splitlines() if x.strip()]

    async def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        async with asyncio.timeout(10):
            await self.drain()
            await self.proc.wait()

    async def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            await self.drain()
            return await self.proc.wait()

    async def ensure_dead(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
