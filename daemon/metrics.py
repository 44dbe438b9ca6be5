"""The daemon's Prometheus metrics: one registry per daemon, read at each scrape.

Nothing here is global: :func:`build_registry` makes a fresh
``prometheus_client.CollectorRegistry`` (never the library's default ``REGISTRY``, which
is process-wide) holding

* :class:`DaemonCollector`, which reads the running daemon's state when scraped (the device
  loops' progress, the tracker, the audit writer, the sinks' queues, the MQTT sink and its
  outbox, the command intake's counts), so that no figure can drift from what the daemon
  itself acts on;
* the audit writer's commit histogram and byte counter, fed by the writer's ``on_commit``
  observer (auditlog/writer.py);
* the alarms raised and the last checkpoint, counted by :class:`MetricsSink` from what the
  dispatcher tells every sink (after the record).

The names (all ``iortd_``), types, labels and meaning are a contract, listed in
docs/operations.md ("Metrics"); a test keeps that list and this module in step. Labels
are device names, sink names, alarm codes, severities and phases: slugs and enums from
the config and the code, never free text, so the series are bounded.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from iortd.auditlog.command import RejectReason
from iortd.auditlog.retention import RetentionStatus
from iortd.daemon.health import Health
from iortd.daemon.mqtt.sink import MqttSink
from iortd.daemon.sink_queue import QueuedSink
from iortd.daemon.sinks import Sink
from iortd.daemon.tracker import AlarmRaised, DeliverySnapshot, Phase, Severity, TrackerEvent
from iortd.kernel.version import __version__

__all__ = ["COMMIT_BUCKETS", "DaemonCollector", "MetricsSink", "build_registry"]

# From a group commit on a fast SSD (~1 ms) to a failing card (seconds).
# The command intake's counts (daemon/commands.py): accepted, and refused by reason.
CommandCounts = tuple[int, Mapping[str, int]]

COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class MetricsSink(Sink):
    """Counts what only the event stream says: alarms raised (by code) and when the last
    checkpoint was signed. Behind its own queue like any sink: it never delays another."""

    name = "metrics"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.alarms_raised: Counter[str] = Counter()
        self.checkpoints = 0
        self.last_checkpoint: float | None = None

    async def events(
        self, events: Sequence[TrackerEvent], delivery: DeliverySnapshot | None
    ) -> None:
        for ev in events:
            if isinstance(ev, AlarmRaised):
                self.alarms_raised[str(ev.alarm.code)] += 1

    async def checkpoint(self, note: str) -> None:
        self.checkpoints += 1
        self.last_checkpoint = self._clock()


class DaemonCollector(Collector):
    """Reads the daemon's state at each scrape (on the event loop: no locks)."""

    def __init__(
        self,
        health: Health,
        sink: MetricsSink,
        sinks: Sequence[QueuedSink],
        *,
        clock: Callable[[], float] = time.monotonic,
        retention: Callable[[], RetentionStatus | None] = lambda: None,
        commands: Callable[[], CommandCounts | None] = lambda: None,
    ) -> None:
        self.health = health
        self._retention = retention
        self._commands_counts = commands
        self.sink = sink
        self.sinks = list(sinks)
        self._clock = clock
        self._first_seq = health.audit.head[0]  # appends are counted from this run's start
        self._started = clock()

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        yield from self._daemon()
        yield from self._devices(now)
        yield from self._tracker()
        yield from self._audit(now)
        yield from self._storage()
        yield from self._commands()
        yield from self._sinks(now)

    def _daemon(self) -> Iterator[Metric]:
        h = self.health
        info = GaugeMetricFamily("iortd_build_info", "The running iortd.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "iortd_ready", "1 when /readyz would say ready.", value=float(not h.readiness())
        )
        yield GaugeMetricFamily(
            "iortd_alive",
            "1 when every loop and the audit writer make progress (the watchdog's notion).",
            value=float(not h.liveness()),
        )

    def _devices(self, now: float) -> Iterator[Metric]:
        polls = CounterMetricFamily(
            "iortd_device_polls",
            "Reads of the device that returned (a good or a bad reply).",
            labels=["device"],
        )
        errors = CounterMetricFamily(
            "iortd_device_errors",
            "Failed reads and lost links, by kind.",
            labels=["device", "kind"],
        )
        age = GaugeMetricFamily(
            "iortd_device_last_reading_age_seconds",
            "Seconds since the device's last good reading (+Inf: none in this run).",
            labels=["device"],
        )
        online = GaugeMetricFamily(
            "iortd_device_online",
            "1 when the device is identified and read within stale_after_polls periods.",
            labels=["device"],
        )
        overdue = GaugeMetricFamily(
            "iortd_device_loop_overdue_seconds",
            "How far the device's loop is past the bound it announced (0: on time).",
            labels=["device"],
        )
        for d in self.health.devices:
            polls.add_metric([d.name], d.polls)
            for kind in ("protocol_violation", "device_fault", "link_lost"):
                errors.add_metric([d.name, kind], d.errors[kind])
            a = d.age_s(now)
            age.add_metric([d.name], math.inf if a is None else a)
            online.add_metric([d.name], float(self.health.online(d, now)))
            overdue.add_metric([d.name], d.overdue_s(now) if math.isfinite(d.back_by) else 0.0)
        yield from (polls, errors, age, online, overdue)

    def _tracker(self) -> Iterator[Metric]:
        h = self.health
        phase = GaugeMetricFamily(
            "iortd_tracker_phase", "1 for the tracker's current phase.", labels=["phase"]
        )
        for p in Phase:
            phase.add_metric([str(p)], float(h.tracker.phase is p))
        yield phase
        active, _ = h.delivery()
        yield GaugeMetricFamily(
            "iortd_delivery_active",
            "1 from a delivery's selection to its termination.",
            value=float(active),
        )
        standing = GaugeMetricFamily(
            "iortd_alarms_standing", "Alarms standing now, by severity.", labels=["severity"]
        )
        counts = Counter(str(a.severity) for a in h.tracker.alarms)
        for sev in Severity:
            standing.add_metric([str(sev)], counts[str(sev)])
        yield standing
        raised = CounterMetricFamily(
            "iortd_alarms_raised", "Alarms raised in this run, by code.", labels=["code"]
        )
        for code, n in sorted(self.sink.alarms_raised.items()):
            raised.add_metric([code], n)
        yield raised

    def _audit(self, now: float) -> Iterator[Metric]:
        audit = self.health.audit
        head = audit.head[0]
        yield CounterMetricFamily(
            "iortd_audit_appends",
            "Entries appended to the audit log in this run.",
            value=head - self._first_seq,
        )
        yield GaugeMetricFamily(
            "iortd_audit_uncommitted_entries",
            "Entries appended and not yet fsync'd.",
            value=head - audit.committed_seq,
        )
        yield GaugeMetricFamily(
            "iortd_audit_write_failing",
            "1 while writes to the audit log fail (the writer retries).",
            value=float(audit.failing_since is not None),
        )
        yield GaugeMetricFamily(
            "iortd_audit_stalled_seconds",
            "How long entries have waited for a commit without progress (0: none).",
            value=self.health.writer.stalled_s(now),
        )
        yield CounterMetricFamily(
            "iortd_audit_checkpoints",
            "Checkpoints signed in this run.",
            value=self.sink.checkpoints,
        )
        last = self.sink.last_checkpoint
        yield GaugeMetricFamily(
            "iortd_audit_checkpoint_age_seconds",
            "Seconds since the last signed checkpoint (+Inf: none in this run).",
            value=math.inf if last is None else now - last,
        )

    def _storage(self) -> Iterator[Metric]:
        """The disk budget and the archive (``[log.retention]``; absent without it)."""
        st = self._retention()
        if st is None:
            return
        for name, text, value in (
            ("iortd_storage_used_bytes", "Bytes of the audit log's local segments.", st.used_bytes),
            ("iortd_storage_budget_bytes", "The disk budget ([log.retention] budget_mb).",
             st.budget_bytes),
            ("iortd_storage_warn_bytes", "Where the storage warning is raised.", st.warn_bytes),
            ("iortd_storage_local_segments", "Segments kept locally.", st.local_segments),
            ("iortd_storage_unarchived_segments", "Closed segments not yet in the archive.",
             st.unarchived_segments),
            ("iortd_storage_archive_failing", "1 while the archive cannot be written.",
             float(st.last_archive_error is not None)),
        ):  # fmt: skip
            yield GaugeMetricFamily(name, text, value=value)
        level = GaugeMetricFamily(
            "iortd_storage_level", "1 for the current storage level.", labels=["level"]
        )
        for name in ("ok", "warning", "budget_reached"):
            level.add_metric([name], float(st.level == name))
        yield level
        for name, text, value in (
            ("iortd_storage_segments_archived", "Segments copied to the archive in this run.",
             st.archived_total),
            ("iortd_storage_segments_deleted", "Archived segments deleted locally in this run.",
             st.deleted_total),
        ):  # fmt: skip
            yield CounterMetricFamily(name, text, value=value)

    def _commands(self) -> Iterator[Metric]:
        """Signed commands (``[commands] keyring``; absent without it): every refusal is
        counted here, also those only summarised in the log under a flood."""
        got = self._commands_counts()
        if got is None:
            return
        accepted, refused = got
        yield CounterMetricFamily(
            "iortd_commands_accepted", "Signed commands accepted in this run.", value=accepted
        )
        rejected = CounterMetricFamily(
            "iortd_commands_rejected", "Commands refused in this run, by reason.", labels=["reason"]
        )
        for reason in RejectReason:
            rejected.add_metric([reason.value], refused.get(reason.value, 0))
        yield rejected

    def _sinks(self, now: float) -> Iterator[Metric]:
        dropped = CounterMetricFamily(
            "iortd_sink_dropped", "Calls a sink's queue dropped (overflow).", labels=["sink"]
        )
        depth = GaugeMetricFamily(
            "iortd_sink_queue_depth", "Calls waiting in a sink's queue.", labels=["sink"]
        )
        mqtt = None
        for q in self.sinks:
            dropped.add_metric([q.name], q.dropped_total)
            depth.add_metric([q.name], q.pending)
            if isinstance(q.inner, MqttSink):
                mqtt = q.inner
        yield from (dropped, depth)
        if mqtt is None:
            return
        yield GaugeMetricFamily(
            "iortd_mqtt_connected",
            "1 while the MQTT sink is connected to its broker.",
            value=float(mqtt.connected.is_set()),
        )
        yield CounterMetricFamily(
            "iortd_mqtt_incoming_dropped",
            "Messages received (commands, checkpoints) dropped at the full incoming queue.",
            value=mqtt.incoming.dropped,
        )
        try:
            outbox = mqtt.outbox
        except RuntimeError:  # not opened (a sink that failed to start)
            return
        # O(messages waiting): a scrape every few seconds, a bounded outbox.
        waiting = [r for r in outbox.pending if not r.done]
        yield GaugeMetricFamily(
            "iortd_mqtt_outbox_messages",
            "Stream messages in the outbox not yet acknowledged by the broker.",
            value=len(waiting),
        )
        yield GaugeMetricFamily(
            "iortd_mqtt_outbox_bytes", "Bytes of those messages.", value=outbox.pending_bytes
        )
        # A message recovered from an earlier run's outbox counts from this run's start.
        oldest = waiting[0].created_ns / 1e9 if waiting else None
        if oldest is not None and oldest < 0:
            oldest = self._started
        yield GaugeMetricFamily(
            "iortd_mqtt_outbox_oldest_age_seconds",
            "Age of the oldest message not yet acknowledged (0: none waiting).",
            value=0.0 if oldest is None else max(0.0, now - oldest),
        )


def build_registry(
    health: Health,
    sink: MetricsSink,
    sinks: Sequence[QueuedSink],
    retention: Callable[[], RetentionStatus | None] = lambda: None,
    commands: Callable[[], CommandCounts | None] = lambda: None,
) -> CollectorRegistry:
    """A fresh registry for one daemon; wires the audit writer's commit observer.
    ``retention()`` is the retention task's status, ``commands()`` the command intake's
    counts (accepted, refused by reason), each read at each scrape (None: none)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(DaemonCollector(health, sink, sinks, retention=retention, commands=commands))
    commit = Histogram(
        "iortd_audit_commit_duration_seconds",
        "Time to write and fsync one group commit of the audit log.",
        buckets=COMMIT_BUCKETS,
        registry=registry,
    )
    written = PromCounter(
        "iortd_audit_bytes_written",
        "Bytes of entries written and fsync'd to the audit log in this run.",
        registry=registry,
    )

    def committed(entries: int, size: int, t0: float) -> None:
        commit.observe(time.monotonic() - t0)
        written.inc(size)

    health.audit.on_commit = committed
    return registry
