"""A broker fabric for tests and benchmarks: a central Mosquitto and N site Mosquittos,
configured by `iortd.daemon.fabric.write_fabric` (the same files `iortd fabric-config`
writes) and bridged for real over TLS on free loopback ports.

    fabric = start_fabric(tmp_path, {"site-a": ["or-1", "or-2"], "site-b": ["or-1"]})
    try:
        port = fabric.sites["site-a"].port          # a plain 127.0.0.1 listener (same ACL)
        user, pw = fabric.room_login("site-a", "or-1")
        await fabric.wait_bridges_up()
        ...
    finally:
        fabric.stop()

Every broker is a `iortd.daemon.mqtt.broker.Mosquitto` (stopped by PID; ``stop_sync``,
``kill``, ``restart_sync`` work as for any test broker) whose mosquitto.conf is the
generated one: its ``port`` is the generated ``local_port`` listener (plain, 127.0.0.1,
the same accounts and ACL as the TLS ones), so tests and load generators connect without
TLS while the bridges between the tiers run on TLS with client certificates. The TLS
material (a CA, server certificates for 127.0.0.1, a bridge certificate per site with the
common name ``bridge-{site}``) is made here, throw-away.

Accounts: every room has its own (``room_login``; ``mqtt_section`` is a daemon's ``[mqtt]``
body with it); the central broker has ``dashboard`` (role dashboard), ``ingest`` (role
ingest) and ``observer`` (read only), each site an ``observer``: `login` gives any of them
(the central ones also over TLS on ``central_tls_port``, with ``ca``). The bridge timers
default to fast ones for tests (keepalive 2 s, restart 1..2 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
from tlscerts import _ca, _leaf, _write_cert, _write_key

from iortd.daemon.fabric import (
    FabricFiles,
    FabricSpec,
    bridge_state_topic,
    parse_spec,
    write_fabric,
)
from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto

__all__ = ["Fabric", "FabricBroker", "Received", "Tap", "free_ports", "start_fabric"]

CENTRAL_ACCOUNTS = (("dashboard", "dashboard"), ("ingest", "ingest"), ("observer", "observer"))
SITE_ACCOUNTS = (("observer", "observer"),)


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


class FabricBroker(Mosquitto):
    """A `Mosquitto` that runs the fabric's generated config instead of rendering one."""

    def __init__(self, name: str, conf_text: str, port: int, workdir: Path) -> None:
        super().__init__(BrokerOptions(port=port, start_timeout_s=10.0), workdir)
        self.name = name
        self._conf_text = conf_text

    def _render_conf(self, port: int, plain_port: int | None) -> str:
        return self._conf_text


@dataclass
class Fabric:
    root: Path
    spec: FabricSpec
    files: FabricFiles
    central: FabricBroker
    sites: dict[str, FabricBroker]
    ca: Path
    central_tls_port: int  # the central broker's client_port (TLS, passwords)

    def login(self, broker: str, user: str) -> tuple[str, str]:
        """``(user, password)`` of an account of ``broker`` ("central" or a site id)."""
        files = self.files.central if broker == "central" else self.files.sites[broker]
        return user, files.password_of(user)

    def room_login(self, site: str, room: str) -> tuple[str, str]:
        return self.login(site, f"iortd-{site}-{room}")

    def site_url(self, site: str) -> str:
        """``mqtt://127.0.0.1:PORT`` of the site broker's plain local listener."""
        return f"mqtt://127.0.0.1:{self.sites[site].port}"

    def mqtt_section(self, site: str, room: str) -> str:
        """The ``[mqtt]`` table's body for a daemon of ``site``/``room`` on its site
        broker, with the room's generated account (its password file, never the text)."""
        user = f"iortd-{site}-{room}"
        secret = self.files.sites[site].passwords[user]
        return f'url = "{self.site_url(site)}"\nusername = "{user}"\npassword_file = "{secret}"'

    def bridge_state_topic(self, site: str) -> str:
        return bridge_state_topic(self.spec.prefix, site)

    def broker(self, name: str) -> FabricBroker:
        return self.central if name == "central" else self.sites[name]

    async def wait_bridges_up(self, within_s: float = 20.0) -> None:
        """Until the central broker holds ``1`` on every site's bridge-state topic."""
        await self.wait_bridge_states("central", dict.fromkeys(self.sites, "1"), within_s)

    async def wait_bridge_states(
        self, broker: str, want: Mapping[str, str], within_s: float = 20.0
    ) -> None:
        """Until ``broker`` holds the retained bridge state ``want[site]`` for each site
        (read with the broker's observer account, a fresh subscription each poll)."""
        deadline = time.monotonic() + within_s
        seen: dict[str, str] = {}
        while True:
            seen = await self.retained_states(broker, list(want))
            if all(seen.get(s) == v for s, v in want.items()):
                return
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{broker}: bridge states {seen} after {within_s} s, want {dict(want)}"
                )
            await asyncio.sleep(0.2)  # a bounded poll of a retained value, not a guess

    async def retained_states(self, broker: str, sites: Sequence[str]) -> dict[str, str]:
        topics = {self.bridge_state_topic(s): s for s in sites}
        out: dict[str, str] = {}
        b = self.broker(broker)
        if not b.running:
            return out
        try:
            async with (
                asyncio.timeout(5),
                Tap(b.port, self.login(broker, "observer"), list(topics)) as tap,
            ):
                # Retained messages are sent right after each SUBACK; a missing one (no
                # state yet) is waited for only briefly.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        while len({m.topic for m in tap.messages}) < len(topics):
                            tap._changed.clear()
                            await tap._changed.wait()
                for m in tap.messages:
                    out[topics[m.topic]] = m.payload.decode()
        except (aiomqtt.MqttError, TimeoutError):
            return out
        return out

    def stop(self) -> None:
        for b in [*self.sites.values(), self.central]:
            b.stop_sync()


@dataclass(frozen=True, slots=True)
class Received:
    topic: str
    payload: bytes
    retain: bool


class Tap:
    """An MQTT client on one broker that subscribes (each SUBACK awaited: ready means
    subscribed) and collects what arrives; `publish` uses the same connection.

    ``clean=False`` keeps an MQTT 3.1.1 persistent session under ``client_id``, so what
    is published while the tap or its broker is away arrives when it connects again.
    """

    def __init__(
        self,
        port: int,
        login: tuple[str, str],
        topics: Sequence[str] = (),
        *,
        ca: Path | None = None,
        client_id: str | None = None,
        clean: bool = True,
        cert: tuple[Path, Path] | None = None,
    ) -> None:
        self.messages: list[Received] = []
        self._changed = asyncio.Event()
        tls = None
        if ca is not None:
            tls = ssl.create_default_context(cafile=str(ca))
            if cert is not None:
                tls.load_cert_chain(str(cert[0]), str(cert[1]))
        self._client = aiomqtt.Client(
            "127.0.0.1",
            port,
            username=login[0] or None,
            password=login[1] or None,
            identifier=client_id or f"tap-{time.monotonic_ns()}",
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=clean,
            tls_context=tls,
            timeout=10,
        )
        self._topics = topics
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Tap:
        await self._client.__aenter__()
        for t in self._topics:
            await self._client.subscribe(t, qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.__aexit__(None, None, None)

    async def _read(self) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for m in self._client.messages:
                payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                self.messages.append(Received(str(m.topic), payload, m.retain))
                self._changed.set()

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        await self._client.publish(topic, payload, qos=1, retain=retain, timeout=10)

    def on(self, topic: str) -> list[Received]:
        return [m for m in self.messages if m.topic == topic]

    async def wait_for_topic(self, topic: str, within_s: float = 20.0) -> Received:
        """The first message on ``topic`` (so far or to come), whatever it says."""
        try:
            async with asyncio.timeout(within_s):
                while True:
                    for m in self.messages:
                        if m.topic == topic:
                            return m
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            seen = sorted({m.topic for m in self.messages})
            raise AssertionError(f"nothing on {topic} within {within_s} s; seen: {seen}") from None

    async def wait_for(self, topic: str, payload: bytes, within_s: float = 20.0) -> Received:
        """The first message on ``topic`` with ``payload`` (so far or to come)."""
        try:
            async with asyncio.timeout(within_s):
                while True:
                    for m in self.messages:
                        if m.topic == topic and m.payload == payload:
                            return m
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            last = [(m.topic, m.payload[:80]) for m in self.messages[-5:]]
            raise AssertionError(
                f"no {payload!r} on {topic} within {within_s} s; last: {last}"
            ) from None


def start_fabric(
    root: Path,
    sites: Mapping[str, Sequence[str]],
    *,
    bridge: Mapping[str, Any] | None = None,
) -> Fabric:
    """Write a fabric for ``sites`` ({site id: [room, ...]}) under ``root`` and start its
    brokers (the central one first). ``bridge``: `[bridge]` keys of the spec to override."""
    root.mkdir(parents=True, exist_ok=True)
    tls = root / "tls"
    tls.mkdir(exist_ok=True)
    ca, ca_key = _ca("iortd fabric test CA")
    ca_path = _write_cert(tls / "ca.pem", ca)

    def server(name: str) -> tuple[str, str]:
        cert, key = _leaf("localhost", ca, ca_key, server=True)
        return str(_write_cert(tls / f"{name}.pem", cert)), str(
            _write_key(tls / f"{name}.key", key)
        )

    user = getpass.getuser()
    ports = free_ports(3 + 2 * len(sites))
    c_cert, c_key = server("central")
    out = root / "fabric"
    data: dict[str, Any] = {
        "central": {
            "address": "127.0.0.1",
            "bind": "127.0.0.1",
            "bridge_port": ports[0],
            "client_port": ports[1],
            "local_port": ports[2],
            "cafile": str(ca_path),
            "certfile": c_cert,
            "keyfile": c_key,
            "conf_dir": str(out / "central"),
            "persistence_dir": str(out / "central" / "data"),
            "log_file": str(out / "central" / "mosquitto.log"),
            "user": user,
            "accounts": [{"name": n, "role": r} for n, r in CENTRAL_ACCOUNTS],
        },
        "bridge": {"keepalive_s": 2, "restart_timeout_s": [1, 2], **(bridge or {})},
        "sites": [],
    }
    for i, (site, rooms) in enumerate(sites.items()):
        s_cert, s_key = server(f"site-{site}")
        b_cert, b_key = _leaf(f"bridge-{site}", ca, ca_key, server=False)
        d = out / "sites" / site
        data["sites"].append(
            {
                "id": site,
                "bind": "127.0.0.1",
                "port": ports[3 + 2 * i],
                "local_port": ports[4 + 2 * i],
                "cafile": str(ca_path),
                "certfile": s_cert,
                "keyfile": s_key,
                "bridge_certfile": str(_write_cert(tls / f"bridge-{site}.pem", b_cert)),
                "bridge_keyfile": str(_write_key(tls / f"bridge-{site}.key", b_key)),
                "conf_dir": str(d),
                "persistence_dir": str(d / "data"),
                "log_file": str(d / "mosquitto.log"),
                "user": user,
                "rooms": list(rooms),
                "accounts": [{"name": n, "role": r} for n, r in SITE_ACCOUNTS],
            }
        )
    spec = parse_spec(data)
    files = write_fabric(spec, out)
    for b in files.all():
        (b.conf.parent / "data").mkdir(exist_ok=True)

    def broker(name: str, port: int) -> FabricBroker:
        bf = files.central if name == "central" else files.sites[name]
        return FabricBroker(name, bf.conf.read_text(), port, bf.conf.parent)

    central = broker("central", ports[2])
    brokers: dict[str, FabricBroker] = {}
    try:
        central.__enter__()
        for i, site in enumerate(sites):
            brokers[site] = broker(site, ports[4 + 2 * i])
            brokers[site].__enter__()
    except BaseException:
        for started in [*brokers.values(), central]:
            started.kill()
        raise
    return Fabric(root, spec, files, central, brokers, ca_path, ports[1])
