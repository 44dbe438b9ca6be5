"""Gap repair in the real daemon (issue 22): a signed ``cmd/replay`` over a real Mosquitto
to ``iortd run`` with the simulator, watched by an independent ``mosquitto_sub``.

One story, two runs of the daemon on one outbox: the first run keeps nothing it has
acknowledged (``replay_retention_s = 0``); the second holds it. Then:

* a range of the second session is sent again as it was (same session, seq and data,
  ``historical: true``), on its own topic;
* a range of the first session, no longer held, is declared on ``skip`` (``not_held``),
  validated against the published schema;
* requests beyond ``replay_max_per_minute`` are refused ``rate_limited``; a key without the
  role is refused before anything is served, and the replay-only key cannot ping;
* the audit log records who asked for what and what was served or skipped, and still
  verifies.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from daemonproc import Daemon, Site
from mqttobs import Message, Observer, schema_errors

from iortd.auditlog.command import sign_command
from iortd.auditlog.note import generate_keypair
from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
ROOM = "iort/v1/test-site/or-7/"
INGEST = generate_keypair("ingest-central")  # role replay: replay-only
OPER = generate_keypair("op-bob")


def keyring(path: Path) -> Path:
    rows = [("ingest-central", INGEST, "replay"), ("op-bob", OPER, "operator")]
    path.write_text(
        "".join(
            f'[[key]]\nholder = "{h}"\nname = "Staff {h}"\nroles = ["{r}"]\n'
            f'public_key = "{k.verifier.text}"\nvalid_from = "2026-01-01T00:00:00Z"\n'
            'valid_until = "2099-01-01T00:00:00Z"\n\n'
            for h, k, r in rows
        )
    )
    return path


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(BrokerOptions(), tmp_path / "broker") as b:
        yield b


def configure(site: Site, template: str, port: int, ring: Path, retention_s: float) -> None:
    text, rest = template.split("[mqtt]", maxsplit=1)[0], template.split("[simulation]")[1]
    mqtt = (
        f'[mqtt]\nurl = "mqtt://127.0.0.1:{port}"\nkeepalive_s = 2\n'
        f"replay_retention_s = {retention_s}\nreplay_max_per_minute = 4\n"
        # The smallest bound: 128 KiB segments, so that run 1's first one is acknowledged
        # whole (and, held 0 s, deleted) while it runs.
        "outbox_max_bytes = 1048576\n"
    )
    site.config.write_text(
        f'{text}{mqtt}[simulation]{rest}\n[commands]\nkeyring = "{ring}"\n'
        "\n[verification]\nenabled = false\n"
    )


def request(body: dict[str, Any], *, kind: str = "replay", key: Any = INGEST) -> bytes:
    holder = "ingest-central" if key is INGEST else "op-bob"
    cmd = sign_command(
        kind, body, signer=key, holder=holder, site="test-site", room="or-7", ttl_s=60
    )
    return orjson.dumps(cmd)


def publish(port: int, kind: str, raw: bytes) -> None:
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1",
         "-t", ROOM + "cmd/" + kind, "-s"],
        input=raw, check=True, timeout=10, capture_output=True,
    )  # fmt: skip


def entries(site: Site, type_: str) -> list[dict[str, Any]]:
    out = []
    for seg in sorted(site.log_dir.glob("*.jsonl")):
        for line in seg.read_bytes().splitlines():
            e = orjson.loads(line)
            if e["type"] == type_:
                out.append(e)
    return out


def refusal_of(sha: str) -> Callable[[Message], bool]:
    return lambda m: m.name == "events" and (m.payload.get("command") or {}).get("sha256") == sha


def answer(nonce: str) -> Callable[[Message], bool]:
    return lambda m: m.name == "events" and (m.payload.get("command") or {}).get("nonce") == nonce


async def test_replay_serves_what_is_held_and_declares_the_rest(
    make_site: Callable[..., Site], broker: Mosquitto, tmp_path: Path
) -> None:
    site = make_site(speed=300, poll=0.01, mqtt="enabled = false")
    template = site.config.read_text()
    ring = keyring(tmp_path / "keyring.toml")
    obs = await Observer(broker.port, topic=ROOM + "#").start()
    try:
        # Run 1: session 1, nothing held once acknowledged; its first segment (~200
        # samples) is gone once a second one has begun.
        configure(site, template, broker.port, ring, retention_s=0)
        d1 = await Daemon.follow(site)
        try:
            await obs.wait_for(
                lambda m: m.name == "telemetry" and m.payload["seq"] >= 400, "400 samples"
            )
        finally:
            assert await d1.stop() == 0
        # Run 2: session 2, holding what it acknowledges.
        configure(site, template, broker.port, ring, retention_s=600)
        d2 = await Daemon.follow(site)
        try:
            await d2.seen(lambda r: r.get("event") == "mqtt_connected", "run 2 connected")
            live = await obs.wait_for(
                lambda m: m.name == "telemetry" and m.payload["session"] == 2
                and not m.payload["historical"] and m.payload["seq"] >= 60 + first_seq(obs),
                "60 live samples of session 2",
            )  # fmt: skip
            s2_first = first_seq(obs)
            want = range(s2_first + 5, s2_first + 25)
            raw = request({"topic": "telemetry", "session": 2, "first": want[0],
                           "last": want[-1]})  # fmt: skip
            nonce = orjson.loads(raw)["nonce"]
            await asyncio.to_thread(publish, broker.port, "replay", raw)
            await obs.wait_for(answer(nonce), "the replay's answer")
            again = await wait_count(obs, lambda m: m.name == "telemetry"
                                     and m.payload["historical"] and m.payload["session"] == 2,
                                     len(want))  # fmt: skip
            assert [m.payload["seq"] for m in again] == list(want)
            originals = {m.payload["seq"]: m.payload for m in obs.of("telemetry")
                         if not m.payload["historical"] and m.payload["session"] == 2}  # fmt: skip
            for m in again:  # the same message, marked historical
                assert {**m.payload, "historical": False} == originals[m.payload["seq"]]
            assert live.payload["seq"] > want[-1]

            # Session 1 is no longer held: declared, not served.
            raw = request({"topic": "telemetry", "session": 1, "first": 3, "last": 12})
            await asyncio.to_thread(publish, broker.port, "replay", raw)
            skip = await obs.wait_for(lambda m: m.name == "skip", "a skip declaration")
            assert skip.payload["skipped"] == {
                "topic": "telemetry", "session": 1, "first": 3, "last": 12,
                "reason": "not_held",
            }  # fmt: skip
            assert skip.payload["session"] == 2
            assert not [m for m in obs.of("telemetry") if m.payload["session"] == 1
                        and m.payload["historical"] and 3 <= m.payload["seq"] <= 12]  # fmt: skip

            # Refusals: the operator's key has no replay role; the replay key cannot ping;
            # beyond 4 requests a minute, rate_limited.
            for kind, raw in (
                ("replay", request({"topic": "events", "session": 2, "first": 0, "last": 0},
                                   key=OPER)),
                ("ping", request({}, kind="ping")),
            ):  # fmt: skip
                sha = hashlib.sha256(raw).hexdigest()
                await asyncio.to_thread(publish, broker.port, kind, raw)
                refusal = await obs.wait_for(refusal_of(sha), f"the refusal of a {kind}")
                assert refusal.payload["command"]["reason"] == "role_not_allowed"
            nonces = []
            for i in range(3):
                raw = request({"topic": "events", "session": 2, "first": i, "last": i})
                nonces.append(orjson.loads(raw)["nonce"])
                await asyncio.to_thread(publish, broker.port, "replay", raw)
            answers = [await obs.wait_for(answer(n), f"answer {n}") for n in nonces]
            assert [a.payload["command"]["outcome"] for a in answers] == [
                "done", "done", "refused",
            ]  # fmt: skip
            assert answers[2].payload["command"]["reason"] == "rate_limited"
        finally:
            assert await d2.stop() == 0
        assert schema_errors(m for m in obs.messages if not m.name.startswith("cmd/")) == []
    finally:
        await obs.stop()

    served = entries(site, "replay_served")
    assert [(e["data"]["session"], e["data"]["served"], e["data"]["skipped"]) for e in served][
        :2
    ] == [(2, 20, 0), (1, 0, 10)]
    assert served[0]["data"]["signer"] == "ingest-central"
    refused = entries(site, "replay_refused")
    assert [e["data"]["reason"] for e in refused] == ["rate_limited"]
    accepted = [e for e in entries(site, "command_accepted") if e["data"]["kind"] == "replay"]
    assert accepted[0]["data"]["body"] == {
        "topic": "telemetry", "session": 2, "first": want[0], "last": want[-1],
    }  # fmt: skip
    verify = await asyncio.to_thread(audit_verify, site)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def audit_verify(site: Site) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN / "iort-audit", "verify", site.log_dir, "--pubkey", site.pubkey],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def first_seq(obs: Observer) -> int:
    s2 = [m.payload["seq"] for m in obs.of("telemetry") if m.payload["session"] == 2]
    return min(s2, default=10**9)


async def wait_count(obs: Observer, pred: Callable[[Message], bool], n: int) -> list[Message]:
    def enough(_: Message) -> bool:
        return len(seen()) >= n

    def seen() -> list[Message]:
        return sorted((m for m in obs.messages if pred(m)), key=lambda m: m.payload["seq"])

    await obs.wait_for(enough, f"{n} replayed messages")
    return seen()
