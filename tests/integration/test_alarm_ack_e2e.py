"""A signed ``ack`` over a real Mosquitto into a real ``iortd run`` (sim driver), end to end.

The site's dose-channel tolerance is set below what the simulated console's two channels
agree to, so the delivery raises ``dose_channel_disagreement``, which stands after the
delivery's end until the next one (docs/alarms.md). An operator's signed ``ack`` naming
that raising gives ``alarm_acknowledged`` in the log, the retained ``alarms`` topic shows
it acknowledged by the operator's printed name, and ``iort-audit report`` says who
acknowledged it and when. After a restart of the daemon (with the next delivery far off)
the retained state it publishes, rebuilt from the log, is the same.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest
from daemonproc import Daemon, Site
from mqttobs import Message, Observer, schema_errors

from iortd.auditlog.command import sign_command
from iortd.auditlog.note import generate_keypair
from iortd.auditlog.writer import segment_paths
from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
ROOM = "iort/v1/test-site/or-7/"
OPER = generate_keypair("op-bob")
KEY = "dose_channel_disagreement"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(BrokerOptions(), tmp_path / "broker") as b:
        yield b


@pytest.fixture
def site(make_site: Callable[..., Site], broker: Mosquitto, tmp_path: Path) -> Site:
    s = make_site(speed=300, mqtt=f'url = "{broker.url}"\nkeepalive_s = 2')
    ring = tmp_path / "keyring.toml"
    ring.write_text(
        f'[[key]]\nholder = "op-bob"\nname = "B. Operator, RTT"\nroles = ["operator"]\n'
        f'public_key = "{OPER.verifier.text}"\nvalid_from = "2026-01-01T00:00:00Z"\n'
        'valid_until = "2099-01-01T00:00:00Z"\n'
    )
    text = s.config.read_text().replace(
        "stale_after_polls = 5\n",
        "stale_after_polls = 5\ndose_channel_rel = 0.0001\ndose_channel_abs_gy = 0.0\n",
    )
    s.config.write_text(text + f'\n[commands]\nkeyring = "{ring}"\n')
    return s


def ours(m: Message) -> bool:
    return m.name == "alarms" and any(a["key"] == KEY for a in m.payload["alarms"])


def item(m: Message) -> dict[str, Any]:
    found: dict[str, Any] = next(a for a in m.payload["alarms"] if a["key"] == KEY)
    return found


def entries(directory: Path, kind: str) -> list[dict[str, Any]]:
    return [
        e
        for path in segment_paths(directory)
        for line in path.read_bytes().splitlines()
        if (e := orjson.loads(line))["type"] == kind
    ]


async def test_a_signed_ack_is_recorded_shown_reported_and_survives_a_restart(
    site: Site, broker: Mosquitto, tmp_path: Path
) -> None:
    obs = await Observer(broker.port, topic=ROOM + "#").start()
    daemon = await Daemon.follow(site)
    try:
        await daemon.seen(lambda r: r.get("event") == "mqtt_command_subscribed", "cmd/#")
        raised = item(await obs.wait_for(ours, "the alarm on the retained alarms topic"))
        assert raised["acknowledged"] is None
        await obs.wait_for(
            lambda m: m.name == "events" and m.payload["kind"] == "delivery_terminated",
            "the delivery's end",
        )
        body = {
            "alarm_key": KEY,
            "raised_at": raised["raised_at"],
            "delivery_id": raised["delivery_id"],
            "comment": "channels checked against the console",
        }
        env = sign_command(
            "ack", body, signer=OPER, holder="op-bob", site="test-site", room="or-7", ttl_s=120
        )
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="ack-test") as client:
            await client.publish(ROOM + "cmd/ack", orjson.dumps(env), qos=1)
        acked = await obs.wait_for(
            lambda m: ours(m) and item(m)["acknowledged"] is not None, "the acknowledgement"
        )
        who = item(acked)["acknowledged"]
        assert (who["by"], who["name"]) == ("op-bob", "B. Operator, RTT")
        assert item(acked)["cleared_at"] is None  # acknowledged, still standing
        assert await daemon.stop() == 0
        before = obs.of("alarms")[-1].payload

        (e,) = entries(site.log_dir, "alarm_acknowledged")
        assert e["delivery_id"] == raised["delivery_id"]
        assert e["data"]["nonce"] == env["nonce"]
        assert e["data"]["comment"] == body["comment"]
        assert e["ts"] == who["at"]

        out = tmp_path / "report.html"
        proc = await _run(
            "iort-audit", "report", str(site.log_dir), "--delivery", raised["delivery_id"],
            "--pubkey", str(site.pubkey), "--out", str(out),
        )  # fmt: skip
        assert proc == 0
        page = out.read_text("utf-8")
        at = datetime.fromisoformat(who["at"])
        assert f"B. Operator, RTT (op-bob), {at:%Y-%m-%d %H:%M:%S}" in page
        assert "channels checked against the console" in page

        # The next delivery far off: the restarted daemon's state is the log's.
        site.config.write_text(
            site.config.read_text().replace("start_delay_s = 5.0", "start_delay_s = 3600.0")
        )
        session = before["session"]
        daemon = await Daemon.follow(site)
        again = await obs.wait_for(
            lambda m: m.name == "alarms" and m.payload["session"] > session,
            "the alarms of the restarted daemon",
        )
        assert again.payload["alarms"] == before["alarms"]
        assert again.retained is False  # live, not the broker's old copy
        assert schema_errors(m for m in obs.messages if "/cmd/" not in m.topic) == []
        assert await daemon.stop() == 0
    finally:
        await daemon.ensure_dead()
        await obs.stop()


async def _run(*argv: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / argv[0]), *argv[1:], stdout=asyncio.subprocess.DEVNULL
    )
    async with asyncio.timeout(60):
        return await proc.wait()
