"""Signed commands over a real Mosquitto into a real `iortd run` (sim driver).

* a signed ``ping`` (the documented no-op) is accepted, recorded and answered on ``events``;
* the abuse test: 10⁴ malformed, unsigned, forged, expired, early, foreign, unknown-signer,
  wrong-role, wrong-topic, unhandled, oversized and replayed commands (also across a
  restart of the daemon, and a retained one replayed by the broker at the resubscription)
  change nothing, and the counts by reason in the log are exactly what was sent (and on
  ``/metrics`` for the run after the restart); the ``events`` topic is rate-limited;
* config/mosquitto/acl.example, verbatim: the commands user may publish a command, the
  room's daemon and the dashboard may not.

Paced without sleeps: every batch of the flood ends with a signed ping, and the next batch
goes once the daemon logged that ping accepted (so the broker's queue for the daemon never
holds more than one batch: Mosquitto drops beyond ``max_queued_messages``, 1000).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest
from daemonproc import Daemon, Site
from mqttobs import Observer

from iortd.auditlog.canonical import canonical
from iortd.auditlog.command import MAX_COMMAND_BYTES, sign_command
from iortd.auditlog.note import Signer, generate_keypair
from iortd.auditlog.writer import segment_paths
from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ACL_EXAMPLE = ROOT / "config" / "mosquitto" / "acl.example"
BIN = Path(sys.executable).parent
CMD = "iort/v1/test-site/or-7/cmd/"
EVENTS = "iort/v1/test-site/or-7/events"
PHYS = generate_keypair("phys-anna")
OPER = generate_keypair("op-bob")
SVC = generate_keypair("svc-sam")  # a service key: it may only ping
FORGER = generate_keypair("phys-anna")  # the holder's name, another key
BATCH = 500


def keyring(path: Path) -> Path:
    rows = [
        ("phys-anna", PHYS, "physicist"),
        ("op-bob", OPER, "operator"),
        ("svc-sam", SVC, "service"),
    ]
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


@pytest.fixture
def site(make_site: Callable[..., Site], broker: Mosquitto, tmp_path: Path) -> Site:
    s = make_site(speed=300, mqtt=f'url = "{broker.url}"\nkeepalive_s = 2')
    ring = keyring(tmp_path / "keyring.toml")
    s.config.write_text(s.config.read_text().replace('listen = ""', 'listen = "127.0.0.1:0"'))
    with s.config.open("a") as f:
        f.write(f'\n[commands]\nkeyring = "{ring}"\nmax_per_minute = 60\n')
        # No check before beam-on: its override then has no handler (no_handler below).
        f.write("\n[verification]\nenabled = false\n")
    return s


def signed(
    kind: str = "ping",
    *,
    signer: Signer = PHYS,
    holder: str = "phys-anna",
    room: str = "or-7",
    now: datetime | None = None,
    ttl_s: float = 300,
) -> bytes:
    obj = sign_command(
        kind,
        {"n": 1},
        signer=signer,
        holder=holder,
        site="test-site",
        room=room,
        ttl_s=ttl_s,
        now=now,
    )
    return orjson.dumps(obj)


def forged() -> bytes:
    obj = {k: v for k, v in orjson.loads(signed()).items() if k != "sig"}
    sig = FORGER.private_key.sign(canonical(obj))
    return orjson.dumps({**obj, "sig": base64.b64encode(sig).decode()})


def unsigned() -> bytes:
    return orjson.dumps({**orjson.loads(signed()), "sig": ""})


def junk(i: int) -> bytes:
    return [b"", b"\x00\xff" * 10, b"{not json", b"[" * 5000, os.urandom(64)][i % 5]


def the_flood(accepted_ping: bytes) -> tuple[list[tuple[str, bytes]], Counter[str]]:
    """(topic kind, payload) for each abusive command, and the counts expected by reason."""
    now = datetime.now(UTC)
    plan: list[tuple[str, int, Callable[[int], bytes]]] = [
        ("malformed", 2800, junk),
        ("bad_signature", 1500, lambda i: unsigned() if i % 2 else forged()),
        ("expired", 800, lambda i: signed(now=now - timedelta(hours=1), ttl_s=60)),
        ("not_yet_valid", 400, lambda i: signed(now=now + timedelta(hours=1))),
        ("wrong_room", 400, lambda i: signed(room="or-8")),
        ("unknown_signer", 400, lambda i: signed(holder="nobody")),
        ("role_not_allowed", 400, lambda i: signed("signoff", signer=OPER, holder="op-bob")),
        ("unknown_version", 300, lambda i: orjson.dumps({**orjson.loads(signed()), "v": 2})),
        ("oversized", 300, lambda i: b"{" + b" " * MAX_COMMAND_BYTES + b"}"),
        ("no_handler", 300, lambda i: signed("override")),
        ("replayed", 2000, lambda i: accepted_ping),
    ]
    flood: list[tuple[str, bytes]] = []
    for reason, n, make in plan:
        # The unhandled override goes to its own topic (on cmd/ping it is wrong_topic).
        kind = "override" if reason == "no_handler" else "ping"
        flood += [(kind, make(i)) for i in range(n)]
    # A valid ping on another kind's topic: the ACL per topic must mean what it says.
    flood += [("prescription", signed()) for _ in range(100)]
    expected = Counter({reason: n for reason, n, _ in plan})
    expected["wrong_topic"] = 100
    flood.sort(key=lambda x: hash(x[1]))  # interleaved, not reason by reason
    return flood, expected


def accepted(nonce: str) -> Callable[[dict[str, Any]], bool]:
    return lambda r: r.get("event") == "command_accepted" and r.get("nonce") == nonce


async def _publish(port: int, items: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=f"cmd-flood-{os.getpid()}",
        # Without TCP_NODELAY concurrent QoS 1 publishes stall on Nagle (PUBACKs held).
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    ) as client:
        client.pending_calls_threshold = 4 * BATCH
        await asyncio.gather(*(client.publish(CMD + k, p, qos=1) for k, p in items))


def publish(port: int, items: list[tuple[str, bytes]]) -> None:
    """Every item published and acknowledged by the broker (so in its queue for the daemon,
    in order), from a thread with a loop of its own: the test's loop runs in asyncio debug
    mode, which records a traceback per future and made the flood ten times slower."""
    asyncio.run(_publish(port, items), debug=False)


async def publish_paced(port: int, daemon: Daemon, flood: list[tuple[str, bytes]]) -> list[str]:
    """Publish in batches, each closed by a fresh ping the daemon must accept before the
    next batch goes. Returns the nonces of those pings."""
    markers: list[str] = []
    for start in range(0, len(flood), BATCH):
        marker = signed()
        nonce: str = orjson.loads(marker)["nonce"]
        await asyncio.to_thread(publish, port, [*flood[start : start + BATCH], ("ping", marker)])
        await daemon.seen(accepted(nonce), f"the batch marker {nonce} accepted")
        markers.append(nonce)
    return markers


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - our own loopback URL
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("iortd_commands_"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def log_entries(directory: Path) -> list[dict[str, Any]]:
    return [
        orjson.loads(line)
        for path in segment_paths(directory)
        for line in path.read_bytes().splitlines()
    ]


def refusals(entries: list[dict[str, Any]]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for e in entries:
        if e["type"] == "command_rejected":
            counts[e["data"]["reason"]] += 1
        elif e["type"] == "command_rejected_summary":
            counts.update(e["data"]["counts"])
    return counts


async def subscribed(daemon: Daemon) -> None:
    await daemon.seen(
        lambda r: r.get("event") == "mqtt_command_subscribed", "the cmd/# subscription"
    )


async def test_a_ping_is_accepted_and_a_flood_of_abuse_changes_nothing(
    site: Site, broker: Mosquitto
) -> None:
    first_ping = signed()
    obs = await Observer(broker.port, topic=EVENTS).start()
    daemon = await Daemon.follow(site)
    try:
        await subscribed(daemon)
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="cmd-test") as client:
            await client.publish(CMD + "ping", first_ping, qos=1)
            # Answered with the fields a sender matches on (daemon/answers.py).
            nonce = orjson.loads(first_ping)["nonce"]
            answer = {"kind": "ping", "nonce": nonce, "sha256": None, "outcome": "done"}
            await obs.wait_for(
                lambda m: (
                    m.payload.get("command") == {**answer, "reason": None}
                    and "ping from phys-anna accepted" in m.payload.get("message", "")
                ),
                "the ping answered on events, with its command fields",
            )
            flood, expected = the_flood(first_ping)
            # A retained command: delivered live now (judged as a replay), and replayed by
            # the broker at the next subscription (refused as retained, never judged).
            await client.publish(CMD + "ping", first_ping, qos=1, retain=True)
            expected["replayed"] += 1
            markers = await publish_paced(broker.port, daemon, flood)
            assert await daemon.stop() == 0

            # Across a restart: the nonces come back from the log.
            daemon = await Daemon.follow(site)
            await subscribed(daemon)
            expected["retained"] += 1
            replays = [("ping", first_ping)] * 300
            expected["replayed"] += 300
            # Clearing the retained one is an empty message, delivered live: malformed.
            expected["malformed"] += 1
            await client.publish(CMD + "ping", b"", qos=1, retain=True)
            markers += await publish_paced(broker.port, daemon, replays)
            # /metrics counts this run's refusals, every one, by reason.
            url = await daemon.seen(lambda r: r.get("event") == "health_serving", "health")
            metrics = await asyncio.to_thread(scrape, url["url"] + "/metrics")
            assert metrics['iortd_commands_rejected_total{reason="replayed"}'] == 300
            assert metrics['iortd_commands_rejected_total{reason="retained"}'] == 1
            assert metrics["iortd_commands_accepted_total"] == len(replays) // BATCH + 1
        assert await daemon.stop() == 0
    finally:
        await daemon.ensure_dead()
        await obs.stop()

    entries = log_entries(site.log_dir)
    assert sum(expected.values()) >= 10_000
    assert refusals(entries) == expected
    accepted = [e["data"]["nonce"] for e in entries if e["type"] == "command_accepted"]
    assert accepted == [orjson.loads(first_ping)["nonce"], *markers]  # and nothing else
    assert [e["type"] for e in entries].count("keyring_loaded") == 2
    text = "\n".join(json.dumps(e) for e in entries)
    assert "not json" not in text  # never a payload in the log
    # events: refusals one by one up to the limit, then summaries; not one per message.
    refused_on_events = [
        m for m in obs.messages if "command refused" in m.payload.get("message", "")
    ]
    assert 0 < len(refused_on_events) <= 4 * 60


async def test_the_acl_example_lets_only_the_commands_user_publish_commands(
    tmp_path: Path,
) -> None:
    exe, pub = shutil.which("mosquitto_passwd"), shutil.which("mosquitto_pub")
    assert exe is not None, "mosquitto_passwd missing: apt-get install mosquitto-clients"
    assert pub is not None
    users = {
        "iort-commands-hospital-a": "cmd-Pw-0a1b",
        "iortd-hospital-a-or-1": "or1-Pw-77e1",
        "dashboard": "dash-Pw-19bb",
    }
    passwd = tmp_path / "passwd"
    for i, (user, pw) in enumerate(users.items()):
        create = ["-c"] if i == 0 else []
        await asyncio.to_thread(
            subprocess.run, [exe, "-b", *create, str(passwd), user, pw], check=True, timeout=10
        )
    options = BrokerOptions(password_file=passwd, acl_file=ACL_EXAMPLE)
    with Mosquitto(options, tmp_path / "broker") as broker:

        def publish(user: str, topic: str) -> str:
            p = subprocess.run(
                [
                    *(pub, "-h", "127.0.0.1", "-p", str(broker.port), "-V", "5", "-q", "1"),
                    *("-u", user, "-P", users[user], "-t", topic, "-m", "{}"),
                ],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
            return p.stdout + p.stderr

        room = "iort/v1/hospital-a/or-1/"
        assert publish("iort-commands-hospital-a", room + "cmd/prescription") == ""
        assert publish("iort-commands-hospital-a", room + "cmd/ping") == ""
        assert publish("iort-commands-hospital-a", room + "cmd/output_factor") == ""
        assert publish("iort-commands-hospital-a", room + "cmd/override") == ""
        # the dashboard sends its physicists' sign-offs (dashboard/signoff.py) and its
        # operators' and physicists' alarm acknowledgements (dashboard/ack.py), nothing else
        assert publish("dashboard", room + "cmd/signoff") == ""
        assert publish("dashboard", room + "cmd/ack") == ""
        for user, topic in (
            ("iortd-hospital-a-or-1", room + "cmd/prescription"),  # the daemon only reads
            ("dashboard", room + "cmd/ping"),
            ("dashboard", room + "cmd/prescription"),
            ("dashboard", room + "delivery"),
            ("iort-commands-hospital-a", room + "cmd/replay"),  # not a kind it sends
            ("iort-commands-hospital-a", room + "interlocks"),  # not the room's data
            ("iort-commands-hospital-a", "iort/v1/hospital-b/or-1/cmd/prescription"),
        ):
            assert "Not authorized" in publish(user, topic), (user, topic)


async def test_an_acl_without_read_on_cmd_leaves_the_stream_alone(
    make_site: Callable[..., Site], tmp_path: Path
) -> None:
    """The daemon's broker user may publish its room but not read ``cmd/#``. Mosquitto 2.0
    grants such a subscription and applies the ACL at delivery (nothing arrives on it), so
    the daemon cannot see the refusal; what matters is that the live stream goes on. The
    refusal paths the daemon can see (a failure code, a timeout) are unit-tested
    (tests/unit/test_mqtt_commands.py)."""
    exe = shutil.which("mosquitto_passwd")
    assert exe is not None, "mosquitto_passwd missing: apt-get install mosquitto-clients"
    passwd = tmp_path / "passwd"
    users = {"room": "room-Pw-1", "admin": "admin-Pw-2"}
    for i, (user, pw) in enumerate(users.items()):
        create = ["-c"] if i == 0 else []
        await asyncio.to_thread(
            subprocess.run, [exe, "-b", *create, str(passwd), user, pw], check=True, timeout=10
        )
    acl = tmp_path / "acl"
    acl.write_text(
        "user room\ntopic write iort/v1/test-site/or-7/#\n"
        "topic read iort/v1/test-site/or-7/audit/checkpoint\n\nuser admin\ntopic readwrite #\n"
    )
    pw_file = tmp_path / "room.pw"
    pw_file.write_text(users["room"] + "\n")
    pw_file.chmod(0o600)
    options = BrokerOptions(password_file=passwd, acl_file=acl)
    with Mosquitto(options, tmp_path / "broker") as broker:
        mqtt = f'url = "{broker.url}"\nusername = "room"\npassword_file = "{pw_file}"'
        s = make_site(speed=300, mqtt=mqtt)
        ring = keyring(tmp_path / "keyring.toml")
        with s.config.open("a") as f:
            f.write(f'\n[commands]\nkeyring = "{ring}"\n')
        obs = Observer(broker.port, topic="iort/v1/test-site/or-7/#", username="admin")
        obs.password = users["admin"]
        await obs.start()
        daemon = await Daemon.follow(s)
        try:
            await subscribed(daemon)
            seen = len(obs.of("telemetry"))
            await obs.wait_for(
                lambda m: m.name == "telemetry" and len(obs.of("telemetry")) > seen + 5,
                "telemetry going on after the cmd/# subscription",
            )
            assert daemon.events("mqtt_connection_lost") == []
            assert await daemon.stop() == 0
        finally:
            await daemon.ensure_dead()
            await obs.stop()
