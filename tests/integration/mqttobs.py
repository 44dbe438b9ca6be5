"""An independent MQTT subscriber for the tests: ``mosquitto_sub`` as a process.

It is not our code and shares nothing with the daemon, so what it receives is what any
consumer would. A persistent session (``-c`` with a fixed id, QoS 1) on a broker with
persistence keeps the messages published while the observer itself was cut off by a
broker restart; ``mosquitto_sub`` reconnects by itself.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker  # type: ignore[import-untyped]


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: dict[str, Any]
    retained: bool
    raw: str

    @property
    def name(self) -> str:
        """The topic's v1 name: status, telemetry, ..., audit/checkpoint."""
        parts = self.topic.split("/")
        return "/".join(parts[4:])


@dataclass
class Observer:
    port: int
    topic: str = "iort/#"
    client_id: str = field(default_factory=lambda: f"obs-{uuid.uuid4().hex[:12]}")
    extra_args: tuple[str, ...] = ()
    # For a broker with a password file: used by mosquitto_sub and by the readiness probe.
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    messages: list[Message] = field(default_factory=list)
    unparsed: list[str] = field(default_factory=list)
    _proc: asyncio.subprocess.Process | None = None
    _reader: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, *, within_s: float = 10) -> Observer:
        exe = shutil.which("mosquitto_sub")
        assert exe is not None, "mosquitto_sub is missing: apt-get install mosquitto-clients"
        self._proc = await asyncio.create_subprocess_exec(
            exe,
            *("-h", "127.0.0.1", "-p", str(self.port), "-q", "1", "-c", "-i", self.client_id),
            *("-t", self.topic, "-t", "probe/#", "-F", "%r %t %p", "-V", "mqttv311"),
            *self._credentials(),
            *self.extra_args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        self._reader = asyncio.create_task(self._read())
        # Ready means subscribed: a probe published now comes back.
        probe = f"probe/{self.client_id}"
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(within_s):
            while not any(m.topic == probe for m in self.messages):
                await loop.run_in_executor(None, self._publish_probe, probe)
                with_timeout = asyncio.wait_for(self._changed.wait(), 0.2)
                self._changed.clear()
                try:
                    await with_timeout
                except TimeoutError:
                    continue
        return self

    def _credentials(self) -> tuple[str, ...]:
        user = () if self.username is None else ("-u", self.username)
        return user + (() if self.password is None else ("-P", self.password))

    def _publish_probe(self, probe: str) -> None:
        subprocess.run(
            [
                *("mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.port)),
                *self._credentials(),
                *("-t", probe, "-m", "{}"),
            ],
            check=False,
            capture_output=True,
            timeout=5,
        )

    async def _read(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        while raw := await self._proc.stdout.readline():
            line = raw.decode("utf-8").rstrip("\n")
            try:
                retained, topic, text = line.split(" ", 2)
                payload = json.loads(text)
            except ValueError:
                self.unparsed.append(line)
                continue
            self.messages.append(Message(topic, payload, retained == "1", text))
            self._changed.set()

    def of(self, name: str) -> list[Message]:
        return [m for m in self.messages if m.name == name]

    async def wait_for(
        self, pred: Callable[[Message], bool], what: str, within_s: float = 20
    ) -> Message:
        """The first message (so far or to come) that satisfies ``pred``."""
        seen = 0
        try:
            async with asyncio.timeout(within_s):
                while True:
                    for m in self.messages[seen:]:
                        if pred(m):
                            return m
                    seen = len(self.messages)
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            last = [f"{m.name} {m.raw[:160]}" for m in self.messages[-5:]]
            raise AssertionError(
                f"observer: no {what} within {within_s} s; last messages: {last}"
            ) from None

    async def stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            await self._proc.wait()
        if self._reader is not None:
            await self._reader


def dedupe(messages: Iterable[Message]) -> list[Message]:
    """Drop a repeated (session, seq) of a topic, as docs/mqtt-topics.md tells consumers
    to (``seq`` counts per topic). The observer's own probes are left out."""
    seen: set[tuple[str, int, int]] = set()
    out = []
    for m in messages:
        if m.topic.startswith("probe/"):
            continue
        key = (m.topic, m.payload["session"], m.payload["seq"])
        if key not in seen:
            seen.add(key)
            out.append(m)
    return out


def current_status(messages: Iterable[Message], topic: str) -> Message | None:
    """The ``status`` a consumer believes, as docs/mqtt-topics.md tells consumers to: the
    highest (session, seq) on ``topic``. A will that arrives late (a half-open connection
    dropped after the next birth) has a lower (session, seq) and never wins."""
    best: Message | None = None
    for m in messages:
        if m.topic != topic:
            continue
        key = (m.payload["session"], m.payload["seq"])
        if best is None or key > (best.payload["session"], best.payload["seq"]):
            best = m
    return best


def validators() -> dict[str, Any]:
    """A JSON Schema validator per topic name, from docs/schemas/v1 (the published
    contract): every message received is checked against them."""
    root = Path(__file__).resolve().parents[2] / "docs" / "schemas" / "v1"
    stems = {
        "status": "status",
        "telemetry": "telemetry",
        "applicator": "applicator",
        "interlocks": "interlocks",
        "delivery": "delivery",
        "events": "events",
        "audit/checkpoint": "checkpoint",
        "alarms": "alarms",
        "skip": "skip",
    }
    return {
        name: Draft202012Validator(
            json.loads((root / f"{stem}.schema.json").read_text("utf-8")),
            format_checker=FormatChecker(),
        )
        for name, stem in stems.items()
    }


def schema_errors(messages: Iterable[Message]) -> list[str]:
    checks = validators()
    out = []
    for m in messages:
        if m.topic.startswith("probe/"):
            continue
        v = checks.get(m.name)
        if v is None:
            out.append(f"{m.topic}: not a v1 topic")
            continue
        errors = [e.message for e in v.iter_errors(m.payload)]
        if (
            not errors
            and m.name == "skip"
            and m.payload["skipped"]["first"] > m.payload["skipped"]["last"]
        ):  # what a JSON Schema cannot say
            errors.append("skipped.first > skipped.last")
        out += [f"{m.topic} seq {m.payload.get('seq')}: {e}" for e in errors]
    return out


def declared(messages: Iterable[Message]) -> list[dict[str, Any]]:
    """The declared seq skips received (``skip``'s ``skipped`` objects), repeats dropped."""
    return [m.payload["skipped"] for m in dedupe(messages) if m.name == "skip"]


def unaccounted(messages: Iterable[Message], name: str) -> list[int]:
    """The seqs of stream ``name`` between its lowest and highest received or declared
    that were neither received nor declared skipped: what a consumer counts as lost
    (docs/mqtt-topics.md, "Rules for consumers")."""
    msgs = list(messages)
    have = {m.payload["seq"] for m in msgs if m.name == name}
    for d in declared(msgs):
        if d["topic"] == name:
            have.update(range(d["first"], d["last"] + 1))
    if not have:
        return []
    return sorted(set(range(min(have), max(have) + 1)) - have)


def contents(messages: Iterable[Message], name: str) -> dict[int, list[tuple[int, str]]]:
    """seq -> the distinct (session, payload without ``historical``) received under it:
    more than one means a seq was reused for other content."""
    out: dict[int, set[tuple[int, str]]] = {}
    for m in messages:
        if m.name == name:
            body = {k: v for k, v in m.payload.items() if k != "historical"}
            out.setdefault(m.payload["seq"], set()).add(
                (m.payload["session"], json.dumps(body, sort_keys=True))
            )
    return {seq: sorted(v) for seq, v in out.items()}
