"""A sink plug-in for the tests, found the way a third-party one is: through the
``iort.sinks`` entry-point group of an installed distribution (the tests make a
``*.dist-info`` directory for it on ``PYTHONPATH``; see tests/integration/test_sink_plugin.py).

It imports only the public sink API (docs/engineers.md, "Writing a sink") and writes one
JSON line per callback to the file its ``path`` option names, with the monotonic time of
receipt; ``delay_s`` makes every sample and events callback that much slower.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from iortd.daemon.sinks import (
    DeliverySnapshot,
    Sample,
    Sink,
    SinkContext,
    SinkOptionError,
    SinkSpec,
    TrackerEvent,
)
from iortd.kernel.types import DeviceIdentity

OPTIONS = frozenset({"path", "delay_s"})


class RecorderSink(Sink):
    def __init__(self, name: str, path: Path, delay_s: float, *, simulated: bool) -> None:
        self.name = name
        self._path = path
        self._delay_s = delay_s
        self._simulated = simulated

    async def _write(self, cb: str, **data: Any) -> None:
        line = json.dumps({"cb": cb, "t": time.monotonic(), **data}) + "\n"
        await asyncio.to_thread(self._append, line)

    def _append(self, line: str) -> None:
        with self._path.open("a", encoding="utf-8") as f:
            f.write(line)

    async def start(self) -> None:
        await self._write("start", simulated=self._simulated)

    async def started(self, device: str, identity: DeviceIdentity) -> None:
        await self._write("started", device=device, serial=identity.serial)

    async def sample(self, sample: Sample) -> None:
        await asyncio.sleep(self._delay_s)
        await self._write("sample", at=sample.reading.utc.isoformat())

    async def events(
        self, events: Sequence[TrackerEvent], delivery: DeliverySnapshot | None
    ) -> None:
        await asyncio.sleep(self._delay_s)
        await self._write("events", kinds=[type(e).__name__ for e in events])

    async def checkpoint(self, note: str) -> None:
        await self._write("checkpoint", count=int(note.split("\n")[1]))

    async def aclose(self) -> None:
        await self._write("close")


class RecorderFactory:
    name = "recorder"
    path_options = frozenset({"path"})  # a relative one is taken from the config's folder

    def validate(self, options: Mapping[str, Any]) -> None:
        for key in options:
            if key not in OPTIONS:
                raise SinkOptionError(f"options.{key}", f"unknown key (known: {sorted(OPTIONS)})")
        path = options.get("path")
        if not isinstance(path, str) or not Path(path).is_absolute():
            raise SinkOptionError("options.path", "required: a file path")
        delay = options.get("delay_s", 0.0)
        if not isinstance(delay, int | float) or isinstance(delay, bool) or not 0 <= delay <= 60:
            raise SinkOptionError("options.delay_s", f"expected 0..60 seconds; got {delay!r}")

    def create(self, spec: SinkSpec, context: SinkContext) -> RecorderSink:
        return RecorderSink(
            spec.name,
            Path(spec.options["path"]),
            float(spec.options.get("delay_s", 0.0)),
            simulated=context.simulated,
        )
