"""The composition root in-process: real sim driver, scripted failing drivers, shutdown."""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

from iortd.auditlog import segment_writer
from iortd.auditlog.writer import AuditLog
from iortd.daemon import app
from iortd.daemon.app import App
from iortd.daemon.config import LoadedConfig, load_config
from iortd.daemon.entries import event_entry
from iortd.daemon.sinks import ApplicatorSample, Sample
from iortd.daemon.tracker import (
    AlarmRaised,
    DeliverySnapshot,
    DeviceGapStarted,
    MonitoringGapEnded,
    MonitoringGapStarted,
    TrackerEvent,
)
from iortd.drivers.errors import DeviceFault, TransportClosed
from iortd.drivers.interface import DriverContext, DriverSpec, Role
from iortd.drivers.registry import DriverRegistry
from iortd.kernel.clock import ScaledClock
from iortd.kernel.types import (
    ApplicatorReading,
    Capability,
    DeviceIdentity,
    DeviceState,
    Interlock,
    InterlockState,
    SourceReading,
    TerminationStatus,
)
from iortd.simulators.driver import SimApplicatorDriver, SimDriverFactory

pytestmark = pytest.mark.integration

CONFIG = """
[site]
id = "test-site"
room = "or-9"
[log]
directory = "log"
[health]
listen = ""
[mqtt]
enabled = false
[simulation]
speed = {speed}
seed = 7
[tolerances]
stale_after_polls = 3
[[devices]]
name = "source-1"
driver = "{driver}"
poll_interval_s = 0.02
timeout_s = 0.2
[devices.options]
{options}
"""


def write_config(tmp_path: Path, *, driver: str, speed: float, options: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(CONFIG.format(driver=driver, speed=speed, options=options))
    return path


class RecordingSink:
    name = "recorder"

    def __init__(self, on_event: Callable[[TrackerEvent], None] | None = None) -> None:
        self.samples: list[Sample] = []
        self.applicator_samples: list[ApplicatorSample] = []
        self.seen: list[TrackerEvent] = []
        self.closed = False
        self.checkpoints: list[str] = []
        self.notices: list[tuple[str, str]] = []
        self._on_event = on_event
        self.changed = asyncio.Event()

    async def started(self, device: str, identity: DeviceIdentity) -> None:
        self.identity = identity

    async def sample(self, sample: Sample) -> None:
        self.samples.append(sample)
        self.changed.set()

    async def applicator(self, sample: ApplicatorSample) -> None:
        self.applicator_samples.append(sample)
        self.changed.set()

    async def events(
        self, events: Sequence[TrackerEvent], delivery: DeliverySnapshot | None
    ) -> None:
        self.seen.extend(events)
        for ev in events:
            if self._on_event:
                self._on_event(ev)
        self.changed.set()

    async def checkpoint(self, note: str) -> None:
        self.checkpoints.append(note)

    async def notice(self, severity: str, message: str) -> None:
        self.notices.append((severity, message))
        self.changed.set()

    async def run(self) -> None:
        return None

    async def aclose(self) -> None:
        self.closed = True

    async def wait_for(self, pred: Callable[[], bool], what: str, timeout_s: float = 10) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                while not pred():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}") from None


async def test_sim_delivery_runs_to_normal_termination(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        driver="sim",
        speed=1200,
        options='profile = "intrabeam"\napplicator = "SPH40"\nstart_delay_s = 5.0',
    )
    registry = DriverRegistry.from_entry_points()
    loaded = load_config(path, registry)
    sink = RecordingSink()
    daemon = App(loaded, registry, ScaledClock(1200), [sink], stop_after_delivery=True)
    stop = asyncio.Event()
    async with asyncio.timeout(30):
        result = await daemon.run(stop)
    (end,) = result.terminated
    assert end.status is TerminationStatus.NORMAL
    assert end.summary.delivered_primary_gy == pytest.approx(20.0, rel=0.005)
    # 20 Gy at 0.8 Gy/min: 25 min of beam-on in simulated time, within 2 %.
    assert end.summary.beam_on_s == pytest.approx(1500, rel=0.02)
    assert end.summary.simulated
    assert all(s.reading.simulated for s in sink.samples)
    assert sink.identity.simulated
    assert sink.closed, "sinks are closed at shutdown"
    delivered = [s.delivery.delivered_primary_gy for s in sink.samples if s.delivery]
    assert delivered == sorted(delivered), "delivered dose never decreases"


# ---- scripted drivers: the daemon's handling of a device that fails ---------------------


class Script:
    """What the scripted console does: a list of behaviours, one per read()."""

    def __init__(self, steps: list[str]) -> None:
        self.steps = steps
        self.connects = 0
        self.connected_at: list[float] = []  # loop time of each connection
        self.connected = asyncio.Event()  # set at each connection
        self.reads = 0
        self.t0 = datetime.now(UTC)


class ScriptedDriver:
    capabilities = frozenset({Capability.READ_TELEMETRY})

    def __init__(self, script: Script, context: DriverContext) -> None:
        self._s = script
        self._clock = context.clock

    async def __aenter__(self) -> Self:
        self._s.connects += 1
        self._s.connected_at.append(asyncio.get_running_loop().time())
        self._s.connected.set()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def identify(self) -> DeviceIdentity:
        return DeviceIdentity("test", "scripted", "S-1", "0", simulated=True)

    async def read(self) -> SourceReading:
        i = self._s.reads
        self._s.reads += 1
        step = self._s.steps[min(i, len(self._s.steps) - 1)]
        if step == "hang":
            await asyncio.Event().wait()  # never answers; the daemon's timeout must cut it
        if step == "drop":
            raise TransportClosed("cable pulled")
        if step == "fault":
            raise DeviceFault("Modbus exception 06 (Server Device Busy)")
        dose = min(i * 0.01, 20.0)
        return SourceReading(
            mono_ns=self._clock.monotonic_ns(),
            utc=self._clock.utc(),
            state=DeviceState.IRRADIATING,
            dose_rate_gy_min=0.8,
            dose_primary_gy=dose,
            dose_secondary_gy=dose,
            preset_gy=20.0,
            beam_on_s=i * 0.02,
            kv=50.0,
            ua=40.0,
            interlocks=dict.fromkeys(Interlock, InterlockState.OK),
            planned_time_s=1500.0,
            simulated=True,
        )


class ScriptedFactory:
    name = "scripted"
    roles: frozenset[Role] = frozenset({"source"})
    simulated = True

    def __init__(self, script: Script) -> None:
        self.script = script

    def validate(self, options: Mapping[str, Any], transport: Mapping[str, Any]) -> None:
        return None

    def create(self, spec: DriverSpec, context: DriverContext) -> ScriptedDriver:
        return ScriptedDriver(self.script, context)


def scripted(tmp_path: Path, steps: list[str]) -> tuple[LoadedConfig, DriverRegistry, Script]:
    script = Script(steps)
    registry = DriverRegistry.of([ScriptedFactory(script), SimDriverFactory()])
    path = write_config(tmp_path, driver="scripted", speed=1.0, options="")
    return load_config(path, registry), registry, script


@pytest.mark.parametrize("failure", ["hang", "drop"])
async def test_a_device_that_stops_answering_makes_interlocks_unknown_then_recovers(
    tmp_path: Path, failure: str
) -> None:
    steps = ["ok"] * 5 + [failure] + ["ok"] * 1000
    loaded, registry, script = scripted(tmp_path, steps)
    sink = RecordingSink()
    daemon = App(loaded, registry, ScaledClock(1.0), [sink])
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(daemon.run(stop))
        await sink.wait_for(
            lambda: any(isinstance(e, MonitoringGapStarted) for e in sink.seen), "a gap"
        )
        # Fail safe at once: nothing known about the interlocks while the link is down.
        assert not daemon.tracker.all_clear
        assert daemon.tracker.interlocks[Interlock.DOOR] is InterlockState.UNKNOWN
        assert any(
            isinstance(e, AlarmRaised) and e.alarm.key == "interlock_unknown:door"
            for e in sink.seen
        )
        await sink.wait_for(
            lambda: any(isinstance(e, MonitoringGapEnded) for e in sink.seen), "gap end"
        )
        assert daemon.tracker.all_clear
        stop.set()
    result = task.result()
    assert result.link_losses >= 1
    assert script.connects >= 2, "the driver was reconnected"
    # The outage's gap, closed. (A machine loaded enough to stall the loop past the stale
    # bound adds a gap of its own: honest, and closed too.)
    gaps = daemon.tracker.snapshot().gaps
    assert gaps
    for gap in gaps:
        assert gap.end_mono_ns is not None
        assert gap.end_mono_ns > gap.start_mono_ns


async def test_one_error_reply_is_a_skipped_poll_not_a_lost_link(tmp_path: Path) -> None:
    loaded, registry, script = scripted(tmp_path, ["ok"] * 3 + ["fault"] + ["ok"] * 1000)
    sink = RecordingSink()
    daemon = App(loaded, registry, ScaledClock(1.0), [sink])
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(daemon.run(stop))
        await sink.wait_for(lambda: len(sink.samples) >= 8, "readings after the error reply")
        stop.set()
    assert task.result().link_losses == 0
    assert script.connects == 1
    assert not any(isinstance(e, MonitoringGapStarted) for e in sink.seen)


async def test_a_device_that_fails_every_read_is_backed_off_not_hammered(
    tmp_path: Path,
) -> None:
    """It connects and identifies, then answers every read with an error: the reconnect
    backoff grows as if it could not connect at all (a good reading resets it, not a
    connection)."""
    loaded, registry, script = scripted(tmp_path, ["fault"])
    daemon = App(loaded, registry, ScaledClock(1.0), [RecordingSink()])
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(daemon.run(stop))
        async with asyncio.timeout(20):
            while script.connects < 5:
                script.connected.clear()
                await script.connected.wait()
        stop.set()
    assert task.result().link_losses >= 4
    t = script.connected_at
    gaps = [b - a for a, b in itertools.pairwise(t)]
    # Backoff from 0.2 s doubling (jittered between half and whole): the 4th wait is at
    # least 0.8 s, the 1st at most 0.2 s (plus the three failed polls each time).
    assert gaps[3] > gaps[0] + 0.4, f"reconnect intervals did not grow: {gaps}"


async def test_shutdown_is_bounded_even_while_a_read_hangs(tmp_path: Path) -> None:
    loaded, registry, _ = scripted(tmp_path, ["ok", "hang"])
    sink = RecordingSink()
    daemon = App(loaded, registry, ScaledClock(1.0), [sink])
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    await sink.wait_for(lambda: len(sink.samples) >= 1, "first sample")
    stop.set()
    async with asyncio.timeout(2.0):
        await task
    assert sink.closed


async def test_other_sinks_hear_events_only_once_they_are_on_disk(tmp_path: Path) -> None:
    """The record comes first: when a sink is told of an event, the audit log has already
    fsync'd it. Checked by reading the file at that moment."""
    loaded, registry, _ = scripted(tmp_path, ["ok"] * 3 + ["drop"] + ["ok"] * 1000)
    on_disk_when_heard: list[bool] = []

    def check(ev: TrackerEvent) -> None:
        kinds = [
            json.loads(line)["type"]
            for f in sorted((tmp_path / "log").glob("log-*.jsonl"))
            for line in f.read_text().splitlines()
        ]
        on_disk_when_heard.append(event_entry(ev, None)[0] in kinds)

    sink = RecordingSink(on_event=check)
    daemon = App(loaded, registry, ScaledClock(1.0), [sink])
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    await sink.wait_for(
        lambda: any(isinstance(e, MonitoringGapEnded) for e in sink.seen), "gap end"
    )
    stop.set()
    await task
    assert on_disk_when_heard
    assert all(on_disk_when_heard)
    entries = [
        json.loads(line)
        for f in sorted((tmp_path / "log").glob("log-*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    kinds = [e["type"] for e in entries]
    assert kinds[:4] == ["log_created", "daemon_start", "config_loaded", "device_identified"]
    assert kinds[-1] == "daemon_stop"
    assert "monitoring_gap_started" in kinds
    assert "monitoring_gap_ended" in kinds
    assert kinds.count("sample") == len(sink.samples), "every sample shown is in the record"


class BrokenSink(RecordingSink):
    name = "broken"

    async def sample(self, sample: Sample) -> None:
        raise RuntimeError("display crashed")


async def test_a_failing_later_sink_does_not_stop_the_daemon_or_the_record(
    tmp_path: Path,
) -> None:
    loaded, registry, _ = scripted(tmp_path, ["ok"] * 1000)
    record, broken = RecordingSink(), BrokenSink()
    daemon = App(loaded, registry, ScaledClock(1.0), [record, broken])
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    await record.wait_for(lambda: len(record.samples) >= 10, "ten samples in the record")
    stop.set()
    await task
    assert broken.closed


async def test_while_the_audit_disk_fails_events_still_reach_the_display(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Record first, but a display frozen with the door open is worse: while the log
    cannot be written, sinks are told at once that nothing is being recorded, and they
    still hear events. Shutdown stays bounded, and says the flush failed."""

    def disk_full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    loaded, registry, _ = scripted(tmp_path, ["ok"] * 5 + ["drop"] + ["ok"] * 1000)
    monkeypatch.setattr(segment_writer, "write_all", disk_full)
    monkeypatch.setattr(app, "SHUTDOWN_TIMEOUT_S", 0.5)
    monkeypatch.setattr(app, "DEFAULT_SPILL_DIR", tmp_path / "spill")  # not the host's
    sink = RecordingSink()
    daemon = App(loaded, registry, ScaledClock(1.0), [sink])
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    await sink.wait_for(lambda: any(s == "critical" for s, _ in sink.notices), "the alarm")
    assert "NOT yet recorded" in sink.notices[0][1]
    await sink.wait_for(
        lambda: any(isinstance(e, MonitoringGapEnded) for e in sink.seen), "events, unrecorded"
    )
    stop.set()
    with pytest.raises(OSError, match="No space left"):
        async with asyncio.timeout(10):
            await task


# ---- the composition root: one loop per device, the record required, every path closed --

TWO_DEVICES = """
[site]
id = "test-site"
room = "or-9"
[log]
directory = "log"
[health]
listen = ""
[mqtt]
enabled = false
[tolerances]
# 1 s of silence (not 60 ms): a loaded CI worker must not make the source look stale
stale_after_polls = 50
applicator_displacement_mm = 2.0
applicator_tilt_deg = 2.0
[[devices]]
name = "source-1"
driver = "scripted"
poll_interval_s = 0.02
timeout_s = 0.2
[[devices]]
name = "reader-1"
role = "applicator"
driver = "scripted"
poll_interval_s = 0.02
timeout_s = 0.2
"""


class ScriptedReader(ScriptedDriver):
    """An applicator reader: the same script steps, read with read_applicator()."""

    async def identify(self) -> DeviceIdentity:
        return DeviceIdentity("test", "reader", "R-1", "0", simulated=True)

    async def read_applicator(self) -> ApplicatorReading:
        i = self._s.reads
        self._s.reads += 1
        step = self._s.steps[min(i, len(self._s.steps) - 1)]
        if step == "drop":
            raise TransportClosed("reader cable pulled")
        return ApplicatorReading(
            mono_ns=self._clock.monotonic_ns(),
            utc=self._clock.utc(),
            applicator=None,
            simulated=True,
        )


class TwoRoleFactory(ScriptedFactory):
    roles: frozenset[Role] = frozenset({"source", "applicator"})

    def __init__(self, script: Script, reader: Script) -> None:
        super().__init__(script)
        self.reader = reader

    def create(self, spec: DriverSpec, context: DriverContext) -> ScriptedDriver:
        if spec.role == "applicator":
            return ScriptedReader(self.reader, context)
        return ScriptedDriver(self.script, context)


async def wait_connects(script: Script, n: int, what: str, timeout_s: float = 10) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while script.connects < n:
                script.connected.clear()
                await script.connected.wait()
    except TimeoutError:
        raise AssertionError(
            f"timed out after {timeout_s} s waiting for {what} ({script.connects} connections)"
        ) from None


async def test_every_configured_device_has_its_own_loop_and_one_does_not_disturb_another(
    tmp_path: Path,
) -> None:
    """Two devices, two loops: the applicator reader is connected, identified (in the
    record) and polled beside the source; its lost link is counted and it is reconnected
    on its own, while the source's readings, interlocks and record go on undisturbed (no
    gap of the source: the reader's own gap names it)."""
    source, reader = Script(["ok"] * 10_000), Script(["ok"] * 3 + ["drop"] + ["ok"] * 10_000)
    registry = DriverRegistry.of([TwoRoleFactory(source, reader), SimDriverFactory()])
    (tmp_path / "site.toml").write_text(TWO_DEVICES)
    loaded = load_config(tmp_path / "site.toml", registry)
    sink = RecordingSink()
    daemon = App(loaded, registry, ScaledClock(1.0), [sink])
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(daemon.run(stop))
        await wait_connects(reader, 2, "the applicator reader to be reconnected after its drop")
        await sink.wait_for(lambda: len(sink.samples) >= 10, "the source's samples")
        assert daemon.tracker.all_clear, "the reader's lost link touched the source's interlocks"
        stop.set()
    result = task.result()
    assert result.link_losses == 1
    assert source.connects == 1, "the source was reconnected because of the reader"
    assert reader.reads >= 4
    assert not any(isinstance(e, MonitoringGapStarted) for e in sink.seen)
    assert [e.device for e in sink.seen if isinstance(e, DeviceGapStarted)] == ["reader-1"]
    assert {s.device for s in sink.samples} == {"source-1"}
    identified = [
        json.loads(line)["data"]["device"]
        for f in sorted((tmp_path / "log").glob("log-*.jsonl"))
        for line in f.read_text().splitlines()
        if json.loads(line)["type"] == "device_identified"
    ]
    assert sorted(set(identified)) == ["reader-1", "source-1"], identified


class Bug(Exception):
    pass


class BuggyDriver(ScriptedDriver):
    async def read(self) -> SourceReading:
        if self._s.reads >= 3:
            raise Bug("a plug-in's bug")
        return await super().read()


class BuggyFactory(ScriptedFactory):
    def create(self, spec: DriverSpec, context: DriverContext) -> ScriptedDriver:
        return BuggyDriver(self.script, context)


async def test_a_crash_still_closes_every_sink_and_then_the_log(tmp_path: Path) -> None:
    """A task that dies of an unexpected error (a driver's bug) ends the run with that
    error; on the way out every sink is closed and then the log (its lock released, what
    was observed on disk), as at a clean stop."""
    script = Script(["ok"] * 1000)
    registry = DriverRegistry.of([BuggyFactory(script), SimDriverFactory()])
    loaded = load_config(write_config(tmp_path, driver="scripted", speed=1.0, options=""), registry)
    sink = RecordingSink()
    with pytest.raises(ExceptionGroup) as raised:
        async with asyncio.timeout(10):
            await App(loaded, registry, ScaledClock(1.0), [sink]).run(asyncio.Event())
    assert raised.group_contains(Bug)
    assert sink.closed, "a sink was left open by the crash"
    log, _ = await AuditLog.open(tmp_path / "log", origin="test/or-9/x")  # not LogInUse
    await log.close()
    kinds = [
        json.loads(line)["type"]
        for f in sorted((tmp_path / "log").glob("log-*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    assert kinds.count("sample") == 3, kinds
    assert "daemon_stop" not in kinds, "a crash is not a clean stop"


# ---- the applicator reader beside the source (issue 16) ----------------------------------

SIM_ROOM = """
[site]
id = "test-site"
room = "or-9"
[log]
directory = "log"
[health]
listen = ""
[mqtt]
enabled = false
[simulation]
speed = 30
seed = 7
[tolerances]
stale_after_polls = 5
applicator_displacement_mm = 2.0
applicator_tilt_deg = 2.0
[[devices]]
name = "source-1"
driver = "sim"
poll_interval_s = 0.02
[devices.options]
applicator = "SPH30"
start_delay_s = 2.0
[[devices]]
name = "stand-1"
role = "applicator"
driver = "sim"
poll_interval_s = 0.02
[devices.options]
applicator = "SPH30"
"""


class CapturingSimFactory(SimDriverFactory):
    """The sim driver, keeping the reader it builds (to move its stand in-process)."""

    def __init__(self) -> None:
        self.reader: SimApplicatorDriver | None = None

    def create(self, spec: DriverSpec, context: DriverContext) -> Any:
        driver = super().create(spec, context)
        if isinstance(driver, SimApplicatorDriver):
            self.reader = driver
        return driver


async def test_a_bump_past_tolerance_mid_beam_is_alarmed_at_once_with_the_true_magnitude(
    tmp_path: Path,
) -> None:
    """The in-process sim source and reader: a clean beam-on with the monitor's applicator
    interlock ok and no alarm; then the stand is bumped 3 mm (tolerance 2 mm) mid-beam:
    ``applicator_displaced`` within 3 of the reader's polls, its magnitude within 0.1 mm of
    the simulator's truth, recorded log-first as applicator samples."""
    (tmp_path / "site.toml").write_text(SIM_ROOM)
    factory = CapturingSimFactory()
    registry = DriverRegistry.of([factory])
    loaded = load_config(tmp_path / "site.toml", registry)
    sink = RecordingSink()
    clock = ScaledClock(30)
    daemon = App(loaded, registry, clock, [sink])
    stop = asyncio.Event()

    def beam_and_reader_ok() -> bool:
        if not sink.applicator_samples:
            return False  # (the daemon's tracker exists once it runs)
        t = daemon.tracker
        mon = t.monitor_interlocks.get(Interlock.APPLICATOR)
        view = t.applicator_view
        return (
            t.phase.value == "IRRADIATING"
            and mon is InterlockState.OK
            and view is not None
            and view.displacement_from_beam_on_mm is not None
        )

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(daemon.run(stop))
        await sink.wait_for(beam_and_reader_ok, "the beam on with the reader ok")
        assert not [e for e in sink.seen if isinstance(e, AlarmRaised)], "a clean start"
        assert factory.reader is not None
        factory.reader.model.bump(3.0, (1.0, 0.0, 0.0))
        truth = factory.reader.model.true_displacement_mm
        assert truth is not None
        bumped_ns = clock.monotonic_ns()

        def displaced() -> list[AlarmRaised]:
            return [
                e
                for e in sink.seen
                if isinstance(e, AlarmRaised) and e.alarm.code.value == "applicator_displaced"
            ]

        await sink.wait_for(lambda: bool(displaced()), "applicator_displaced")
        # The reader's polls after the bump up to the one that raised it (by their own
        # time stamps: a dispatcher slowed by a loaded machine does not count).
        raised_ns = displaced()[0].alarm.raised_mono_ns
        polls = sum(bumped_ns < a.reading.mono_ns <= raised_ns for a in sink.applicator_samples)
        stop.set()
    task.result()
    assert 1 <= polls <= 3, f"raised after {polls} polls of the reader"
    true_mag = sum(c * c for c in truth) ** 0.5
    peak = sink.applicator_samples[-1].peak_displacement_mm
    assert peak is not None
    assert abs(peak - true_mag) < 0.1, (peak, true_mag)
    assert "applicator displaced 3.0" in displaced()[0].alarm.message
    kinds = [
        json.loads(line)["type"]
        for f in sorted((tmp_path / "log").glob("log-*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    assert "applicator_sample" in kinds
    assert "applicator_at_beam_on" in kinds
    assert kinds.index("applicator_at_beam_on") < kinds.index("alarm_raised")
