"""The watchdog's notion of progress, readiness and the status document, by hand: a device
loop's announced bounds, the audit writer's committed head, and ``[health] listen``."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any, Self, cast

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from iortd.auditlog.writer import AuditLog
from iortd.daemon.config import (
    ConfigError,
    DeviceConfig,
    LoadedConfig,
    load_config,
    tracker_settings,
)
from iortd.daemon.device_loop import DeviceLoop, Reading
from iortd.daemon.health import WRITER_STALL_S, Health, WriterWatch
from iortd.daemon.health_http import HealthServer, build_app
from iortd.daemon.progress import WEDGE_GRACE_S, DeviceProgress
from iortd.daemon.tracker import DeliveryTracker
from iortd.drivers.interface import DriverContext, DriverSpec, Role
from iortd.drivers.registry import DriverRegistry
from iortd.kernel.clock import SystemClock
from iortd.kernel.types import Capability, DeviceIdentity, SourceReading
from iortd.kernel.version import __version__

SITE = """
[site]
id = "test-site"
room = "or-7"
[log]
directory = "log"
[tolerances]
stale_after_polls = 5
[[devices]]
name = "source-1"
driver = "sim"
poll_interval_s = 0.1
[devices.options]
profile = "axxent"
applicator = "BAL34"
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeAudit:
    """What Health reads of the writer: its head, committed head and failure state."""

    def __init__(self) -> None:
        self.seq = 10
        self.committed_seq = 10
        self.failing_since: float | None = None
        self.on_failure: Callable[[OSError], None] | None = None
        self.failure_watchers: list[Callable[[OSError], None]] = []

    def report(self, exc: OSError) -> None:
        """A failed attempt, told as the writer tells it: its owner, then the watchers."""
        for told in (self.on_failure, *self.failure_watchers):
            if told is not None:
                told(exc)

    @property
    def head(self) -> tuple[int, str]:
        return self.seq, "h"


def load(tmp_path: Path, extra: str = "") -> LoadedConfig:
    path = tmp_path / "site.toml"
    path.write_text(SITE + extra, encoding="utf-8")
    return load_config(path, DriverRegistry.from_entry_points())


def health_for(tmp_path: Path, clock: Clock) -> tuple[Health, FakeAudit, DeviceProgress]:
    loaded = load(tmp_path)
    audit = FakeAudit()
    tracker = DeliveryTracker(tracker_settings(loaded.config, 1.0))
    dev = DeviceProgress("source-1", clock=clock)
    h = Health(loaded.config, cast(AuditLog, audit), tracker, [dev], clock=clock)
    return h, audit, dev


# ---- a device loop ------------------------------------------------------------------------


def test_a_loop_is_wedged_only_past_its_announced_bound_plus_the_grace() -> None:
    clock = Clock()
    dev = DeviceProgress("d", clock=clock)
    dev.expect(4.0)  # a driver call bounded by 4 s
    clock.now += 4.0 + WEDGE_GRACE_S - 0.1
    assert not dev.wedged()
    clock.now += 0.2
    assert dev.wedged()
    assert dev.overdue_s() == pytest.approx(WEDGE_GRACE_S + 0.1)


def test_an_offline_device_backing_off_is_not_wedged() -> None:
    clock = Clock()
    dev = DeviceProgress("d", clock=clock)
    for _ in range(20):  # connect fails, back off 10 s, again: the loop iterates
        dev.expect(0.8)
        clock.now += 0.8
        dev.lost()
        dev.expect(10.0)
        clock.now += 10.0
        assert not dev.wedged()
    assert dev.errors["link_lost"] == 20
    assert dev.last_reading is None


def test_counts_and_the_end_of_the_loop() -> None:
    clock = Clock()
    dev = DeviceProgress("d", clock=clock)
    dev.polled()
    dev.polled("protocol_violation")
    clock.now += 3
    assert (dev.polls, dev.errors["protocol_violation"]) == (2, 1)
    assert dev.age_s() == 3
    dev.ended()
    clock.now += 1e6
    assert not dev.wedged()
    assert math.isinf(dev.back_by)


# ---- the audit writer -------------------------------------------------------------------


def test_an_idle_writer_is_fine_however_long() -> None:
    clock, audit = Clock(), FakeAudit()
    w = WriterWatch(cast(AuditLog, audit), clock=clock)
    clock.now += 3600
    assert w.stuck() is None


def test_a_writer_whose_head_moves_is_fine_a_still_one_with_entries_waiting_is_stuck() -> None:
    clock, audit = Clock(), FakeAudit()
    w = WriterWatch(cast(AuditLog, audit), clock=clock)
    for _ in range(100):  # busy: entries wait, commits follow
        audit.seq += 5
        clock.now += 1
        audit.committed_seq += 5
        assert w.stuck() is None
    audit.seq += 3  # then a commit that never returns
    w.stuck()
    clock.now += WRITER_STALL_S + 0.5
    why = w.stuck()
    assert why is not None
    assert "3 entries waiting" in why


def test_a_failing_writer_that_retries_is_alive() -> None:
    """A full disk: the writer retries with backoff and says so each time (not stuck); a
    wedge is when it stops saying anything."""
    clock, audit = Clock(), FakeAudit()
    w = WriterWatch(cast(AuditLog, audit), clock=clock)
    audit.seq += 4
    for _ in range(20):
        clock.now += 2.0  # the writer's backoff cap
        w.failed()
        assert w.stuck() is None
    clock.now += WRITER_STALL_S + 1
    assert w.stuck() is not None


# ---- readiness and status ----------------------------------------------------------------


def test_ready_only_once_started_and_the_start_is_on_disk(tmp_path: Path) -> None:
    clock = Clock()
    h, audit, _ = health_for(tmp_path, clock)
    assert h.readiness() == ["starting"]
    audit.seq += 2  # daemon_start, config_loaded: appended, not yet committed
    h.mark_started()
    assert h.readiness() == ["starting: the start of this run is not on disk yet"]
    audit.committed_seq = audit.seq
    assert h.readiness() == []
    h.stopping = True
    assert h.readiness() == ["stopping"]


def test_a_failing_audit_log_makes_it_unready_but_not_dead(tmp_path: Path) -> None:
    clock = Clock()
    h, audit, dev = health_for(tmp_path, clock)
    dev.ended()  # only the writer here
    h.mark_started()
    audit.failing_since = 0.0
    audit.seq += 1
    for _ in range(10):  # the writer retries and reports each failed attempt
        clock.now += 2.0
        audit.report(OSError(28, "No space left on device"))
        assert h.liveness() == []
        assert any("audit log: writes failing" in r for r in h.readiness())


def test_health_watches_the_writers_failures_beside_its_owner(tmp_path: Path) -> None:
    """Health subscribes (``failure_watchers``); the owner's ``on_failure`` (the service's
    alarm) is left as it was, also when it is set after Health is built."""
    loaded = load(tmp_path)
    audit = FakeAudit()
    tracker = DeliveryTracker(tracker_settings(loaded.config, 1.0))
    Health(loaded.config, cast(AuditLog, audit), tracker, [])
    assert audit.on_failure is None
    told: list[OSError] = []
    audit.on_failure = told.append
    audit.report(OSError(5, "EIO"))
    assert len(told) == 1
    assert len(audit.failure_watchers) == 1


def test_a_wedged_loop_is_a_liveness_reason_naming_the_device(tmp_path: Path) -> None:
    clock = Clock()
    h, _, dev = health_for(tmp_path, clock)
    dev.expect(0.4)
    clock.now += 0.4 + WEDGE_GRACE_S + 1
    (why,) = h.liveness()
    assert why.startswith("device source-1: its loop is")


def test_status_is_exactly_the_documented_document(tmp_path: Path) -> None:
    clock = Clock()
    h, _, dev = health_for(tmp_path, clock)
    h.mark_started()
    status: dict[str, Any] = h.status()
    assert status == {
        "ready": True,
        "phase": "IDLE",
        "delivery_active": False,
        "delivery_id": None,
        "devices": {"source-1": "offline"},
        "version": __version__,
    }
    dev.connected = True
    dev.polled()
    assert h.status()["devices"] == {"source-1": "online"}
    clock.now += 0.1 * 5 + 0.01  # stale_after_polls poll periods without a reading
    assert h.status()["devices"] == {"source-1": "offline"}
    assert h.status_line() == "IDLE, no delivery, devices 0/1 online"


# ---- [health] listen ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("127.0.0.1:9108", ("127.0.0.1", 9108)),
        ("[::1]:9200", ("::1", 9200)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),  # noqa: S104 - a value under test, not a bind
        ("", None),
    ],
)
def test_listen_values(tmp_path: Path, listen: str, address: tuple[str, int] | None) -> None:
    loaded = load(tmp_path, f'[health]\nlisten = "{listen}"\n')
    assert loaded.config.health.address == address


def test_listen_defaults_to_loopback(tmp_path: Path) -> None:
    assert load(tmp_path).config.health.address == ("127.0.0.1", 9108)


@pytest.mark.parametrize(
    ("listen", "says"),
    [
        ("localhost:9108", "expected IP:PORT with an IP address"),
        ("127.0.0.1", "expected IP:PORT"),
        ("127.0.0.1:99999", "port number 0-65535"),
        ("::1:9108", "IPv6 address in brackets"),
    ],
)
def test_a_bad_listen_is_one_issue_naming_the_key(tmp_path: Path, listen: str, says: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path, f'[health]\nlisten = "{listen}"\n')
    (issue,) = excinfo.value.issues
    assert issue.key == "health.listen"
    assert says in str(issue)


def test_an_unknown_health_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path, "[health]\nport = 9108\n")
    (issue,) = excinfo.value.issues
    assert issue.key == "health.port"


# ---- the endpoint, in process --------------------------------------------------------------


async def asgi_get(app: Any, path: str, host: str = "127.0.0.1:9108") -> tuple[int, Any]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", host.encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 9108),
    }
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    async with asyncio.timeout(5):
        await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return sent[0]["status"], body


async def test_the_endpoints_answer_503_with_reasons_and_refuse_other_hosts(
    tmp_path: Path,
) -> None:
    clock = Clock()
    h, _, dev = health_for(tmp_path, clock)
    app = build_app(h, CollectorRegistry())
    code, body = await asgi_get(app, "/readyz")
    assert (code, json.loads(body)) == (503, {"ready": False, "reasons": ["starting"]})
    h.mark_started()
    assert await asgi_get(app, "/readyz") == (200, b'{"ready":true}')
    dev.expect(0.4)
    clock.now += 10
    code, body = await asgi_get(app, "/healthz")
    assert code == 503
    assert json.loads(body)["reasons"][0].startswith("device source-1")
    assert (await asgi_get(app, "/status", host="rebound.example"))[0] == 400
    assert (await asgi_get(app, "/status", host="localhost:9108"))[0] == 200


async def test_a_port_in_use_is_logged_and_the_daemon_goes_on(tmp_path: Path) -> None:
    clock = Clock()
    h, _, _ = health_for(tmp_path, clock)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with capture_logs() as logs:
            server = HealthServer.bind(h, CollectorRegistry(), taken.getsockname())
        assert server.url is None
        await server.serve()  # returns at once: nothing to serve
        (line,) = [r for r in logs if r["event"] == "health_unavailable"]
        assert line["log_level"] == "error"
        assert line["error"] == "in use"
    finally:
        taken.close()


def test_the_metrics_sink_name_is_reserved(tmp_path: Path) -> None:
    """Two sinks named alike would be two series with one label in /metrics."""
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path, '[[sinks]]\ntype = "recorder"\nname = "metrics"\n')
    found = {i.key: str(i) for i in excinfo.value.issues}
    assert "is the name of a built-in sink" in found["sinks[0].name"]


# ---- the device loop announces its bounds ---------------------------------------------------


class HangingRead:
    """Connects and identifies; every read waits (and honours its cancellation)."""

    capabilities = frozenset({Capability.READ_TELEMETRY})

    def __init__(self, reading: asyncio.Event) -> None:
        self._reading = reading

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def identify(self) -> DeviceIdentity:
        return DeviceIdentity("test", "hanging", "H-1", "0", simulated=True)

    async def read(self) -> SourceReading:
        self._reading.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


class HangingFactory:
    name = "hanging"
    roles: frozenset[Role] = frozenset({"source"})
    simulated = True

    def __init__(self) -> None:
        self.reading = asyncio.Event()

    def validate(self, options: Mapping[str, Any], transport: Mapping[str, Any]) -> None:
        return None

    def create(self, spec: DriverSpec, context: DriverContext) -> HangingRead:
        return HangingRead(self.reading)


class StopAtLoss:
    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop

    def identified(self, device: str, identity: DeviceIdentity) -> None:
        return None

    def reading(self, device: DeviceConfig, reading: Reading) -> bool:
        return False

    def link_lost(self, device: DeviceConfig, reason: str) -> None:
        self.stop.set()


async def test_a_loop_announces_each_calls_bound_and_counts_the_lost_link() -> None:
    stop = asyncio.Event()
    dev = DeviceConfig(name="source-1", driver="hanging", timeout_s=0.05)
    factory = HangingFactory()
    progress = DeviceProgress("source-1")
    loop = DeviceLoop(
        dev,
        factory,
        DriverContext(clock=SystemClock(), seed=0),
        StopAtLoss(stop),
        bad_reads_limit=3,
        progress=progress,
    )
    task = asyncio.create_task(loop.run(stop))
    async with asyncio.timeout(5):
        await factory.reading.wait()
        # Inside the read: back by the call's bound (4 x timeout_s), connected, not wedged.
        ahead = progress.back_by - time.monotonic()
        assert 0 < ahead <= 4 * 0.05
        assert (progress.connected, progress.wedged()) == (True, False)
        await task
    assert (progress.errors["link_lost"], progress.connected) == (1, False)
    assert math.isinf(progress.back_by)  # the loop ended: nothing more to wait for
