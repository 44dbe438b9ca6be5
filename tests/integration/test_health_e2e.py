"""The real `iortd run` under a notify socket of our own (what systemd gives a Type=notify
service), with its health endpoint on a free loopback port:

* READY=1 comes once the run's start is on disk; STATUS= follows the delivery; WATCHDOG=1
  comes at half of WATCHDOG_USEC; STOPPING=1 at SIGTERM; /healthz, /readyz, /status and
  /metrics (parsed with prometheus_client's text parser) move with a short delivery;
* a device offline does not stop the pings; a driver call that never returns (a test
  plug-in that swallows its cancellation: tests/plugins/iortd_wedge_driver.py) does;
* /readyz stays 200 with the broker stopped, and goes 503 when the audit log cannot be
  written: the daemon's file-size limit is lowered below its segment's size with
  prlimit(2), so the next write fails with EFBIG (CPython ignores SIGXFSZ), as a full
  disk would, without root, mounts or a hook in the writer; raised again, it recovers.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import resource
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from daemonproc import Daemon, Site
from prometheus_client.parser import text_string_to_metric_families

from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "tests" / "plugins"


def serve_health(site: Site, text: str | None = None) -> None:
    """The endpoint on a free loopback port (named in the daemon's log), never the
    default one: the test configs turn it off, this turns it on."""
    text = site.config.read_text("utf-8") if text is None else text
    off = '[health]\nlisten = ""'
    assert text.count(off) == 1, text
    site.config.write_text(text.replace(off, '[health]\nlisten = "127.0.0.1:0"'))


@dataclass
class NotifySocket:
    """A notify socket as systemd binds it: every datagram kept with its arrival time."""

    sock: socket.socket
    path: str
    got: list[tuple[float, dict[str, str]]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def pump(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            raw = await loop.sock_recv(self.sock, 4096)
            msg = dict(line.split("=", 1) for line in raw.decode().split("\n") if line)
            self.got.append((time.monotonic(), msg))
            self.changed.set()

    async def wait(
        self,
        pred: Callable[[dict[str, str]], bool],
        what: str,
        within_s: float = 20,
        after: float = 0.0,
    ) -> tuple[float, dict[str, str]]:
        """The first message (so far or to come) matching ``pred`` that arrived after
        ``after`` (monotonic)."""
        checked = 0
        try:
            async with asyncio.timeout(within_s):
                while True:
                    for at, msg in self.got[checked:]:
                        if at > after and pred(msg):
                            return at, msg
                    checked = len(self.got)
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"no {what} within {within_s} s; got {self.got[-6:]}") from None

    def pings(self, after: float = 0.0) -> list[float]:
        return [at for at, m in self.got if m.get("WATCHDOG") == "1" and at > after]


@pytest.fixture
async def notify(tmp_path: Path) -> AsyncIterator[NotifySocket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.setblocking(False)
    ns = NotifySocket(sock, path)
    task = asyncio.create_task(ns.pump())
    try:
        yield ns
    finally:
        task.cancel()
        sock.close()


def env_for(ns: NotifySocket, watchdog_s: float, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "NOTIFY_SOCKET": ns.path,
        "WATCHDOG_USEC": str(round(watchdog_s * 1e6)),
        **extra,
    }


async def http_get(base: str, path: str) -> tuple[int, bytes]:
    """One HTTP/1.0 GET (no chunking: the body ends with the connection), bounded."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def get_json(base: str, path: str) -> tuple[int, dict[str, Any]]:
    status, body = await http_get(base, path)
    doc: dict[str, Any] = json.loads(body)
    return status, doc


async def metrics(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics parsed by prometheus_client's own text parser: sample -> value."""
    status, body = await http_get(base, "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body.decode())
        for s in fam.samples
    }


async def until(
    check: Callable[[], Any], what: str, within_s: float = 10, every_s: float = 0.1
) -> Any:
    """A bounded poll of another process's HTTP state (no event to wait on)."""
    try:
        async with asyncio.timeout(within_s):
            while True:
                got = await check()
                if got:
                    return got
                await asyncio.sleep(every_s)
    except TimeoutError:
        raise AssertionError(f"not {what} within {within_s} s") from None


async def health_url(daemon: Daemon) -> str:
    rec = await daemon.seen(lambda r: r.get("event") == "health_serving", "the health endpoint")
    url: str = rec["url"]
    return url


def on_disk(log_dir: Path, kind: str) -> bool:
    return any(f'"type":"{kind}"' in seg.read_text("utf-8") for seg in log_dir.glob("log-*.jsonl"))


# ---- a delivery, as systemd and a prober see it ----------------------------------------


async def test_notify_status_watchdog_and_metrics_follow_a_delivery(
    make_site: Callable[..., Site], notify: NotifySocket
) -> None:
    site = make_site(speed=200, poll=0.02)
    serve_health(site)
    daemon = await Daemon.follow(site, env=env_for(notify, watchdog_s=1.0))
    try:
        _, ready = await notify.wait(lambda m: m.get("READY") == "1", "READY=1")
        # The start of the run is on disk before systemd hears it is ready.
        assert on_disk(site.log_dir, "daemon_start")
        assert "devices" in ready["STATUS"]
        url = await health_url(daemon)
        assert (await get_json(url, "/healthz")) == (200, {"alive": True})
        assert (await get_json(url, "/readyz")) == (200, {"ready": True})
        before = await metrics(url)

        _, irradiating = await notify.wait(
            lambda m: m.get("STATUS", "").startswith("IRRADIATING, delivery or-7-"),
            "a STATUS= with the beam on",
        )
        status = await until(lambda: _active(url), "a /status with the delivery active", within_s=5)
        assert set(status) == {
            "ready",
            "phase",
            "delivery_active",
            "delivery_id",
            "devices",
            "version",
        }
        assert status["devices"] == {"source-1": "online"}
        assert irradiating["STATUS"].split(", ")[1] == f"delivery {status['delivery_id']}"

        await daemon.seen(lambda r: r.get("event") == "delivery_terminated", "the end")
        await notify.wait(
            lambda m: m.get("STATUS", "").startswith("TERMINATED"), "a STATUS= at the end"
        )
        code, done = await get_json(url, "/status")
        assert code == 200
        assert (done["delivery_active"], done["delivery_id"]) == (False, status["delivery_id"])
        after = await metrics(url)
        dev = (("device", "source-1"),)
        assert after["iortd_device_polls_total", dev] > before["iortd_device_polls_total", dev]
        assert after["iortd_audit_appends_total", ()] > before["iortd_audit_appends_total", ()]
        assert (
            after["iortd_audit_bytes_written_total", ()]
            > before["iortd_audit_bytes_written_total", ()]
        )
        assert after["iortd_audit_commit_duration_seconds_count", ()] > 0
        assert before["iortd_tracker_phase", (("phase", "TERMINATED"),)] == 0
        assert after["iortd_tracker_phase", (("phase", "TERMINATED"),)] == 1
        assert after["iortd_device_online", dev] == 1
        assert after["iortd_ready", ()] == after["iortd_alive", ()] == 1

        # Pings all along, each within the watchdog period (sent at half of it).
        pings = notify.pings()
        assert len(pings) >= 4, notify.got
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 1.0, gaps

        assert await daemon.stop() == 0
        await notify.wait(lambda m: m.get("STOPPING") == "1", "STOPPING=1", within_s=5)
    finally:
        await daemon.ensure_dead()


async def _active(url: str) -> dict[str, Any] | None:
    _, doc = await get_json(url, "/status")
    return doc if doc["delivery_active"] else None


# ---- offline is progress, a wedge is not -------------------------------------------------


def install_wedge_driver(site_dir: Path) -> dict[str, str]:
    dist = site_dir / "iortd_wedge_driver-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: iortd-wedge-driver\nVersion: 0.1\n", encoding="utf-8"
    )
    (dist / "entry_points.txt").write_text(
        "[iort.drivers]\nwedge = iortd_wedge_driver:WedgeDriverFactory\n", encoding="utf-8"
    )
    inherited = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    return {"PYTHONPATH": os.pathsep.join([str(site_dir), str(PLUGINS), *inherited])}


async def test_an_offline_device_keeps_the_pings_a_wedged_loop_stops_them(
    make_site: Callable[..., Site], notify: NotifySocket, tmp_path: Path
) -> None:
    offline, wedge = tmp_path / "offline", tmp_path / "wedge"
    site = make_site(speed=1, poll=0.05)
    text = site.config.read_text("utf-8")
    text = text.replace('driver = "sim"', 'driver = "wedge"').replace(
        "timeout_s = 1.0", "timeout_s = 0.1"
    )
    text += f'offline_file = "{offline}"\nwedge_file = "{wedge}"\n'
    serve_health(site, text)
    env = env_for(notify, watchdog_s=1.0, **install_wedge_driver(tmp_path / "site-packages"))
    daemon = await Daemon.follow(site, env=env)
    try:
        await notify.wait(lambda m: m.get("READY") == "1", "READY=1")
        url = await health_url(daemon)

        # Cable pulled: the loop reconnects with backoff; the daemon is alive throughout.
        offline.touch()
        lost = await daemon.seen(lambda r: r.get("event") == "device_link_lost", "a lost link")
        t_lost = time.monotonic()
        await until(lambda: _pings_after(notify, t_lost, 2), "2 pings while offline", 5)
        assert "offline" in lost["reason"]
        assert len(daemon.events("device_link_lost")) >= 2  # it went on trying
        assert (await get_json(url, "/healthz")) == (200, {"alive": True})
        _, status = await get_json(url, "/status")
        assert status["devices"] == {"source-1": "offline"}
        offline.unlink()
        await until(lambda: _online(url), "the device back online", within_s=10)

        # A driver call that swallows its cancellation: the loop never comes back.
        wedge.touch()
        wedged = await daemon.seen(
            lambda r: r.get("event") == "daemon_not_alive", "the loss of progress", within_s=10
        )
        t_wedged = time.monotonic()
        assert any(r.startswith("device source-1: its loop is") for r in wedged["reasons"])
        code, body = await get_json(url, "/healthz")
        assert code == 503
        assert body["alive"] is False
        assert body["reasons"][0].startswith("device source-1")
        # No ping for 1.5 watchdog periods after the loss: systemd would kill us now. (A
        # ping sent just before the log line may be read just after it: 0.1 s of slack.)
        with pytest.raises(AssertionError, match="no a ping after the wedge"):
            await notify.wait(
                lambda m: m.get("WATCHDOG") == "1",
                "a ping after the wedge",
                within_s=1.5,
                after=t_wedged + 0.1,
            )
    finally:
        if daemon.proc.returncode is None:
            await daemon.kill()  # what systemd does then; a wedged task cannot be stopped


async def _pings_after(ns: NotifySocket, t: float, n: int) -> bool:
    return len(ns.pings(after=t)) >= n


async def _online(url: str) -> bool:
    _, status = await get_json(url, "/status")
    return bool(status["devices"] == {"source-1": "online"})


# ---- readiness: the broker is not a reason, the audit log is -----------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(BrokerOptions(persistence=False), tmp_path / "broker") as b:
        yield b


async def test_readyz_ignores_the_broker_and_follows_the_audit_log(
    make_site: Callable[..., Site], notify: NotifySocket, broker: Mosquitto
) -> None:
    site = make_site(speed=1, poll=0.05, mqtt=f'url = "{broker.url}"\nkeepalive_s = 2')
    serve_health(site)
    daemon = await Daemon.follow(site, env=env_for(notify, watchdog_s=2.0))
    pid = daemon.proc.pid
    try:
        await notify.wait(lambda m: m.get("READY") == "1", "READY=1")
        url = await health_url(daemon)
        await until(lambda: _gauge(url, "iortd_mqtt_connected", 1), "MQTT connected")

        broker.stop_sync()
        await until(lambda: _gauge(url, "iortd_mqtt_connected", 0), "MQTT seen down")
        assert (await get_json(url, "/readyz")) == (200, {"ready": True})

        # The audit log cannot grow: the next commit fails with EFBIG, as on a full disk.
        seg = max(site.log_dir.glob("log-*.jsonl"))
        soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (seg.stat().st_size, hard))
        try:
            _, body = await until(
                lambda: _unready(url), "/readyz 503 with the log failing", within_s=10
            )
            assert any(r.startswith("audit log: writes failing") for r in body["reasons"])
            # Failing and retrying is progress: alive, not ready; the pings go on.
            assert (await get_json(url, "/healthz")) == (200, {"alive": True})
            assert (await metrics(url))["iortd_audit_write_failing", ()] == 1
            # The alarm about it is a stream message for the broker that is away: queued.
            await until(lambda: _outbox_waiting(url), "the alarm waiting in the outbox", 5)
            t_failing = time.monotonic()
            await until(lambda: _pings_after(notify, t_failing, 2), "pings while failing", 5)
        finally:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))
        await until(lambda: _ready(url), "/readyz 200 again once the log is writable")
        assert await daemon.stop() == 0
    finally:
        await daemon.ensure_dead()


async def _outbox_waiting(url: str) -> bool:
    got = await metrics(url)
    return (
        got["iortd_mqtt_outbox_messages", ()] > 0
        and got["iortd_mqtt_outbox_oldest_age_seconds", ()] > 0
    )


async def _gauge(url: str, name: str, value: float) -> bool:
    return (await metrics(url)).get((name, ())) == value


async def _unready(url: str) -> tuple[int, dict[str, Any]] | None:
    code, body = await get_json(url, "/readyz")
    return (code, body) if code == 503 else None


async def _ready(url: str) -> bool:
    return (await get_json(url, "/readyz"))[0] == 200
