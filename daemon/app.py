"""The composition root: the one place that builds and runs everything of ``iortd run``.

:class:`App` opens what the run holds in one ``contextlib.AsyncExitStack``, in this order,
so that it is closed in the reverse order on every path (a clean stop, a start-up that
fails half-way, a crash of any task):

1. the **audit log**, opened and recovered before any device is touched, and closed last
   (flushed and fsync'd; a close that cannot write raises OSError after keeping what was
   pending in the spill directory);
2. the **sinks** (:func:`_open_sinks`: the operational log, the caller's own, the alarm
   ledger's (daemon/alarm_acks.py: rebuilt from the log before any sink runs, it feeds the
   MQTT sink's retained ``alarms`` topic and judges ``ack`` commands), the ``[[sinks]]``
   plug-ins and the MQTT sink with its outbox when the config enables it), each behind
   its own bounded queue, lent ``record`` (daemon/sink_records.py: closed before
   ``daemon_stop``), closed all at once, each within ``SHUTDOWN_TIMEOUT_S``;

then builds the :class:`~iortd.daemon.service.Service` (tracker, record, dispatcher), the
daemon's :class:`~iortd.daemon.health.Health` and metrics registry (daemon/metrics.py; its
counting sink is one of the caller's own) and binds the health endpoint
(daemon/health_http.py, ``[health] listen``), and runs everything in **one**
``asyncio.TaskGroup``: the audit writer, each sink's own work, the dispatcher and the
notices, the health endpoint, then one :class:`~iortd.daemon.device_loop.DeviceLoop` per
configured device, the stale-data watchdog, the checkpoint task, the systemd supervisor
(``READY=1`` once the loops are started and the run's start is on disk, ``STATUS=``,
``WATCHDOG=1``: daemon/health.py; ``STOPPING=1`` when the stop comes: kernel/sdnotify.py),
with ``[commands] keyring`` the command intake (daemon/commands.py: the keyring loaded and
the nonces rebuilt from the log before any sink runs, ``keyring_loaded`` recorded after the
start, then its task: accepted commands handled, refusals summarised, the inbox read;
the device loops start once what waited in the inbox is handled, within ``FIRST_READ_S``;
the sign-off's handler and its record-watching sink: daemon/signoff.py) and,
with ``[log.retention]``, the retention task (auditlog/retention.py: the disk budget and
the archive, woken by every segment roll; ``App.retention.status()`` is its state for
health and metrics). Devices that name one serial port share one line (an RS-485 bus):
:func:`_shared_lines` builds one :class:`~iortd.drivers.transport.shared.SharedLine` per
such port, owning its one transport, and each device's driver gets a view of it in its
context (turns round-robin).

A signal (or the end of ``--duration``, or the end of the delivery under
``stop_after_delivery``) only sets ``stop``. Shutdown is ordered and bounded: ``STOPPING=1``
and ``/readyz`` says so; the device loops, the watchdog, the checkpoint task, the
supervisor and the retention task end; ``daemon_stop`` and a final checkpoint are written
(bounded); the dispatcher drains (bounded); the notices stop; the health endpoint stops
(bounded); the sinks close (each bounded); the audit log closes last. The whole shutdown is
bounded by twice ``SHUTDOWN_TIMEOUT_S`` from the stop: what has not finished then is
cancelled, with a reason, and the exit stack still closes the log (which spills what it
cannot write).

A stop that comes while the log is being opened (a large recovery) does not tear through
the recovery: the run ends once the log is open, before any device is touched.

:func:`serve` is what the commands call: it turns SIGINT and SIGTERM into ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from iortd.auditlog.keyring import KeyringError
from iortd.auditlog.note import Signer
from iortd.auditlog.retention import RetentionManager, RetentionSettings
from iortd.auditlog.writer import (
    DEFAULT_SPILL_DIR,
    AuditLog,
    LogDamaged,
    LogInUse,
    LogRolledBack,
    LogUnusable,
    RecoveryReport,
    new_origin,
)
from iortd.daemon import alarm_acks, signoff
from iortd.daemon.commands import CommandIntake, open_intake
from iortd.daemon.config import Config, ConfigError, DeviceConfig, LoadedConfig, load_config
from iortd.daemon.config.model import RetentionConfig
from iortd.daemon.device_loop import DeviceLoop
from iortd.daemon.handlers import Handlers, VerificationTableError
from iortd.daemon.health import Health, supervise
from iortd.daemon.metrics import MetricsSink, build_registry
from iortd.daemon.progress import DeviceProgress
from iortd.daemon.service import RunResult, Service
from iortd.daemon.sink_queue import QueuedSink, SinkLike, queued
from iortd.daemon.sink_records import SinkRecorder
from iortd.daemon.sink_registry import SinkRegistry, open_sinks
from iortd.daemon.sinks import OperationalLogSink, Sink, SinkConfigError
from iortd.daemon.tracker import DeliveryTracker
from iortd.daemon.witnessing import WitnessSubmitter, open_submitter
from iortd.drivers.interface import DriverContext
from iortd.drivers.registry import DriverRegistry
from iortd.drivers.transport import transport_from_config
from iortd.drivers.transport.config import serial_line
from iortd.drivers.transport.shared import SharedLine
from iortd.kernel.clock import Clock, ScaledClock, SystemClock
from iortd.kernel.sdnotify import Notifier

if TYPE_CHECKING:
    from iortd.daemon.health_http import HealthServer

__all__ = [
    "EXIT_BAD",
    "EXIT_OK",
    "EXIT_USAGE",
    "SHUTDOWN_TIMEOUT_S",
    "App",
    "RunResult",
    "StartError",
    "clock_for",
    "load_or_report",
    "run_to_exit",
    "serve",
    "usage_error",
]

log = structlog.get_logger("iortd")

EXIT_OK = 0
EXIT_BAD = 1
EXIT_USAGE = 2
SHUTDOWN_TIMEOUT_S = 5.0
HEALTH_STOP_S = 2.0
FIRST_READ_S = 5.0  # the inbox's first read, before the devices (a bound, not a wait)


class StartError(Exception):
    """Something the config names cannot be used at start (the log directory, the MQTT
    password, the outbox); the message names the key and why."""


def clock_for(loaded: LoadedConfig) -> Clock:
    speed = loaded.config.simulation.speed
    return SystemClock() if speed == 1.0 else ScaledClock(speed)


class App:
    """One run of the daemon over a loaded (validated) config.

    ``sinks`` are the caller's own (the demo's console view), told after the operational
    log and before the MQTT sink. ``signer`` signs the log's checkpoints (None: none are
    signed). ``broker_url`` replaces the config's (the demo's private broker).
    ``notifier`` talks to systemd (by default from ``$NOTIFY_SOCKET``: none, nothing sent).
    """

    def __init__(
        self,
        loaded: LoadedConfig,
        registry: DriverRegistry,
        clock: Clock,
        sinks: Sequence[SinkLike] = (),
        *,
        signer: Signer | None = None,
        accept_rollback: bool = False,
        broker_url: str | None = None,
        stop_after_delivery: bool = False,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = loaded.config
        self.loaded = loaded
        self._registry = registry
        self._clock = clock
        self._sinks = list(sinks)
        self._signer = signer
        self._accept_rollback = accept_rollback
        self._broker_url = broker_url
        self._stop_after_delivery = stop_after_delivery
        self._service: Service | None = None
        self._notifier = notifier or Notifier.from_env()
        self.health: Health | None = None
        # The retention task, when [log.retention] is set; status() for health/metrics.
        self.retention: RetentionManager | None = None
        self._intake: CommandIntake | None = None
        self.handlers = Handlers()  # of the command kinds (daemon/handlers.py)
        # The alarm ledger, the retained alarms and the ack command (daemon/alarm_acks.py).
        self.alarms: alarm_acks.AlarmAcks | None = None
        self.witness: WitnessSubmitter | None = None  # with [[witness]] (witnessing.py)
        self._recorder: SinkRecorder | None = None  # sinks' entries (sink_records.py)

    @property
    def tracker(self) -> DeliveryTracker:
        """The running service's tracker (once :meth:`run` has opened the log)."""
        if self._service is None:
            raise RuntimeError("the daemon is not running yet")
        return self._service.tracker

    async def run(self, stop: asyncio.Event, *, duration_s: float | None = None) -> RunResult:
        """Run until ``stop`` (or ``duration_s`` real seconds after the start); then shut
        down in order, within bounds (see the module doc)."""
        c = self.config
        # The journal's first line, before anything is read back from the log (recovery,
        # the command handlers' and the alarm ledger's rebuilds log their own lines).
        log.info(
            "daemon_starting",
            config=str(self.loaded.path),
            config_sha256=self.loaded.sha256,
            site=c.site.id,
            room=c.site.room,
            speed=self._clock.speed,
        )
        async with contextlib.AsyncExitStack() as stack:
            audit, recovery = await self._open_log()
            stack.push_async_callback(audit.close)  # last, on every path
            if stop.is_set():
                return RunResult()
            sinks_stack = await stack.enter_async_context(contextlib.AsyncExitStack())
            counting = MetricsSink()
            acks = self.alarms = alarm_acks.AlarmAcks(audit, notice=self._notice)
            watch = [signoff.RecordWatch(c.log.directory)] if c.commands.keyring else []
            own: list[SinkLike] = [*self._sinks, counting, alarm_acks.LedgerSink(acks), *watch]
            self.witness = await open_submitter(c.witness, audit, self._notice)
            if self.witness is not None:  # told each checkpoint once it is in the log
                own.append(self.witness)
            recorder = self._recorder = SinkRecorder(audit)  # SinkContext.record
            sinks = await _open_sinks(
                c,
                sinks_stack,
                own,
                registry=self._registry,
                origin=audit.origin,
                signer=self._signer,
                broker_url=self._broker_url,
                config_hash=self.loaded.sha256,
                recorder=recorder,
                notice=self._notice,
            )
            recorder.connect(sinks)
            for w in watch:
                w.connect(sinks)
            service = self._service = Service(
                self.loaded,
                self._clock,
                sinks,
                audit,
                recovery,
                stop_after_delivery=self._stop_after_delivery,
            )
            await alarm_acks.rebuild(acks, c.log.directory, service.notice, recovery.vouched_count)
            for s in sinks:  # the retained alarms topic, from now on
                if hasattr(inner := getattr(s, "inner", s), "set_alarms"):
                    acks.on_change(inner.set_alarms)
                if self.witness is not None and hasattr(inner, "checkpoint_cosigned"):
                    self.witness.on_cosigned.append(inner.checkpoint_cosigned)
            try:
                self._intake = await open_intake(c, audit, service.notice, sinks)
            except KeyringError as exc:
                raise StartError(f"commands.keyring: {exc}") from None
            if self._intake is not None:  # each kind's handler (daemon/handlers.py)
                try:
                    await self.handlers.install(c, self._intake, audit, service, recovery, acks)
                except VerificationTableError as exc:
                    raise StartError(f"verification.doserate_table: {exc}") from None
                if (signoffs := self.handlers.signoffs) is not None:  # Sink.signed
                    signoffs.on_signed = [s.signed for s in sinks]
            progress = {d.name: DeviceProgress(d.name) for d in c.devices}
            health = self.health = Health(c, audit, service.tracker, list(progress.values()))
            registry = build_registry(
                health,
                counting,
                sinks,
                lambda: None if self.retention is None else self.retention.status(),
                self._command_counts,
            )
            server = None
            if c.health.address is not None:
                # Imported only when served: uvicorn and Starlette cost ~0.1 s at start.
                from iortd.daemon.health_http import HealthServer  # noqa: PLC0415

                server = HealthServer.bind(
                    health, registry, c.health.address, c.health.allowed_hosts
                )
                stack.callback(server.close)
            stack.callback(self._notifier.close)
            main = self._main(service, audit, sinks, sinks_stack, stop, progress, server)
            return await _until_stopped(main, stop, duration_s)

    def _notice(self, severity: str, message: str) -> None:
        if self._service is not None:
            self._service.notice(severity, message)

    def _command_counts(self) -> tuple[int, dict[str, int]] | None:
        """For /metrics: the intake's accepted count and refusals by reason."""
        i = self._intake
        return None if i is None else (i.accepted, dict(i.counts))

    async def _open_log(self) -> tuple[AuditLog, RecoveryReport]:
        c = self.config
        try:
            return await AuditLog.open(
                c.log.directory,
                origin=new_origin(c.site.id, c.site.room),
                group_commit_s=c.log.group_commit_ms / 1000,
                rotate_max_bytes=c.log.rotate_max_bytes,
                signer=self._signer,
                accept_rollback=self._accept_rollback,
                spill_dir=DEFAULT_SPILL_DIR,
            )
        except OSError as exc:
            raise StartError(
                f"log.directory: cannot use {c.log.directory}: {exc.strerror or exc}"
            ) from None

    async def _main(
        self,
        service: Service,
        audit: AuditLog,
        sinks: Sequence[QueuedSink],
        sinks_stack: contextlib.AsyncExitStack,
        stop: asyncio.Event,
        progress: dict[str, DeviceProgress],
        server: HealthServer | None,
    ) -> RunResult:
        c = self.config
        health, notifier = self.health, self._notifier
        if health is None:
            raise RuntimeError("run() builds the health model before _main()")
        async with asyncio.TaskGroup() as tg:
            tg.create_task(audit.run(), name="audit-writer")
            for sink in sinks:
                tg.create_task(sink.run(), name=f"sink:{sink.name}")
            dispatcher = tg.create_task(service.dispatch(), name="dispatcher")
            notices = tg.create_task(service.notify(), name="notices")
            web = None if server is None else tg.create_task(server.serve(), name="health")
            until_stop: list[asyncio.Task[Any]] = []
            service.record_start()
            if self._intake is not None:  # signed commands in (daemon/commands.py)
                self._intake.record_loaded()
                self.handlers.resume(tg)  # what a crash left accepted but unhandled
                cmd = c.commands
                intake = self._intake.run(stop, cmd.inbox, cmd.inbox_poll_s)
                until_stop.append(tg.create_task(intake, name="commands"))
                try:
                    async with asyncio.timeout(FIRST_READ_S):
                        await self._intake.first_read.wait()
                except TimeoutError:  # the devices start regardless; the inbox goes on
                    log.warning("inbox_first_read_slow", bound_s=FIRST_READ_S)
            lines = _shared_lines(c.devices, self._clock.monotonic_ns)
            until_stop += [
                tg.create_task(
                    self._device_loop(dev, service, lines, progress[dev.name]).run(stop),
                    name=f"device:{dev.name}",
                )
                for dev in c.devices
            ]
            until_stop.append(tg.create_task(service.watchdog(stop), name="watchdog"))
            until_stop.append(tg.create_task(service.checkpoints(stop), name="checkpoints"))
            if c.log.retention is not None:
                self.retention = _retention(c.log.retention, audit, service)
                until_stop.append(tg.create_task(self.retention.run(stop), name="retention"))
            until_stop.append(tg.create_task(supervise(notifier, health, stop), name="systemd"))
            health.mark_started()  # the supervisor sends READY=1 once the start is on disk
            await stop.wait()
            health.stopping = True
            if self.witness is not None:  # nothing recorded after the stop (witnessing.py)
                await self.witness.aclose()
            notifier.stopping("stopping: recording the stop and closing the audit log")
            service.wake_checkpoints()  # the checkpoint task sees the stop
            await asyncio.wait(until_stop)
            if self._recorder is not None:  # no sink's entry after daemon_stop
                self._recorder.close()
            await service.record_stop(SHUTDOWN_TIMEOUT_S)
            await service.drain(dispatcher, SHUTDOWN_TIMEOUT_S)
            notices.cancel(msg="shutdown")
            if server is not None and web is not None:
                await server.stop(web, HEALTH_STOP_S)
            await sinks_stack.aclose()  # each within its bound, in reverse order
            await audit.close()  # last of all: everything pending is written and fsync'd
        log.info("daemon_stopped", deliveries=len(service.result.terminated))
        return service.result

    def _device_loop(
        self,
        dev: DeviceConfig,
        service: Service,
        lines: dict[str, SharedLine],
        progress: DeviceProgress,
    ) -> DeviceLoop:
        line = lines.get(dev.name)
        # On a shared line each exchange may first wait for one exchange of every other
        # device on it: the loop's safety bound grows by their timeouts. The same round,
        # plus the settling after another's timeout (up to two line timeouts), bounds each
        # wait the device's staleness pauses by (daemon/service.py).
        others = [
            d.timeout_s for d in self.config.devices if d is not dev and lines.get(d.name) is line
        ]
        view = None
        if line is not None:
            line_timeout = max([dev.timeout_s, *others])
            cap_s = (sum(others) + 2 * line_timeout) * self._clock.speed
            view = line.view(dev.name, wait_cap_ns=round(cap_s * 1e9))
            if dev.role == "source":
                service.source_shares_a_line(view.waited_ns)
        context = DriverContext(
            clock=self._clock,
            seed=self.config.simulation.seed,
            heard=service.heard(dev),
            shared_line=view,
        )
        return DeviceLoop(
            dev,
            self._registry.get(dev.driver),
            context,
            service,
            bad_reads_limit=self.config.tolerances.stale_after_polls,
            line_wait_s=sum(others) if line else 0.0,
            progress=progress,
        )


def _retention(r: RetentionConfig, audit: AuditLog, service: Service) -> RetentionManager:
    """The retention task over ``[log.retention]``, woken by every segment roll."""
    mgr = RetentionManager(
        audit,
        RetentionSettings(
            budget_bytes=r.budget_mb * 1024 * 1024,
            warn_fraction=r.warn_fraction,
            keep_fraction=r.keep_fraction,
            archive_dir=r.archive_dir,
            archive_mount_required=r.archive_mount_required,
            interval_s=r.interval_s,
        ),
        notice=service.notice,
    )
    audit.on_rotate = mgr.wake_threadsafe
    return mgr


def _shared_lines(
    devices: Sequence[DeviceConfig], now_ns: Callable[[], int]
) -> dict[str, SharedLine]:
    """One :class:`SharedLine` per serial port that several devices name (the config
    check allowed it: Modbus RTU, distinct units, the same settings), by device name. The
    line's transport is bounded by the longest of its devices' timeouts; each exchange
    keeps its own device's timeout."""
    ports: dict[str, list[DeviceConfig]] = {}
    for dev in devices:
        line = serial_line(dev.transport) if dev.transport else None
        if line is not None:
            ports.setdefault(line[0], []).append(dev)
    lines: dict[str, SharedLine] = {}
    for members in ports.values():
        if len(members) < 2:
            continue
        timeout_s = max(d.timeout_s for d in members)
        shared = SharedLine(
            transport_from_config(members[0].transport, timeout_s=timeout_s), now_ns=now_ns
        )
        lines.update((d.name, shared) for d in members)
    return lines


async def _open_sinks(
    c: Config,
    stack: contextlib.AsyncExitStack,
    own: Sequence[SinkLike],
    *,
    registry: DriverRegistry,
    origin: str,
    signer: Signer | None,
    broker_url: str | None,
    config_hash: str = "",
    recorder: SinkRecorder | None = None,
    notice: Callable[[str, str], None] | None = None,
) -> list[QueuedSink]:
    """Every sink of the run, each behind its own queue (:mod:`iortd.daemon.sink_queue`),
    in the order they are told: the operational log, the caller's own, the ``[[sinks]]``
    tables in file order, then the MQTT sink (with its outbox) when ``[mqtt]`` enables it;
    the plug-ins are built by their factories from the ``iort.sinks`` entry points
    (:func:`iortd.daemon.sink_registry.open_sinks`). ``stack`` closes them all at once,
    each within ``SHUTDOWN_TIMEOUT_S``."""
    sinks: list[QueuedSink] = [queued(OperationalLogSink()), *(queued(s) for s in own)]
    stack.push_async_callback(_close_sinks, sinks)  # the list grows below: all are closed
    mqtt = None
    if c.mqtt.enabled:
        mqtt = {**c.mqtt.model_dump(exclude={"enabled"}), "url": broker_url or c.mqtt.url}
    try:
        sinks += await open_sinks(
            c.sinks,
            SinkRegistry.from_entry_points(),
            mqtt=mqtt,
            site=c.site.id,
            room=c.site.room,
            # "sim": true on every message when any device is a simulator.
            simulated=any(registry.get(d.driver).simulated for d in c.devices),
            log_directory=c.log.directory,
            origin=origin,
            verifier=None if signer is None else signer.verifier,
            config_hash=config_hash,
            record=None if recorder is None else recorder.for_sink,
            notice=notice,
        )
    except SinkConfigError as exc:
        raise StartError(str(exc)) from None
    return sinks


async def _close_sinks(sinks: Sequence[QueuedSink]) -> None:
    """All at once, each within its bound: one sink's drain does not add to the next one's
    before the audit log closes. A sink's close never raises (its queue logs a failure)."""
    async with asyncio.TaskGroup() as tg:
        for sink in reversed(sinks):
            tg.create_task(_close_sink(sink), name=f"close:{sink.name}")


async def _close_sink(sink: Sink) -> None:
    try:
        async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
            await sink.aclose()
    except TimeoutError:
        # Expected, not a crash: no traceback, just which sink overran its bound.
        log.error("sink_close_timeout", sink=sink.name, timeout_s=SHUTDOWN_TIMEOUT_S)  # noqa: TRY400


async def _until_stopped(
    main: Coroutine[Any, Any, RunResult], stop: asyncio.Event, duration_s: float | None
) -> RunResult:
    task = asyncio.create_task(main, name="daemon")
    try:
        waiter = asyncio.create_task(stop.wait(), name="stop")
        await asyncio.wait({task, waiter}, timeout=duration_s, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stop.set()
        # Shutdown is bounded: whatever has not finished in time is cancelled, with a reason.
        done, _ = await asyncio.wait({task}, timeout=SHUTDOWN_TIMEOUT_S * 2)
        if not done:
            log.error("shutdown_timeout", timeout_s=SHUTDOWN_TIMEOUT_S * 2)
            task.cancel(msg="shutdown timed out")
        return await task
    finally:
        if not task.done():
            task.cancel(msg="shutdown")
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def serve(app: App, *, duration_s: float | None = None) -> RunResult:
    """Run ``app`` with SIGINT and SIGTERM as the stop, from the very start: a signal while
    a large log is being recovered must not tear through the recovery."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await app.run(stop, duration_s=duration_s)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


# ---- the commands' entry: what can go wrong at start, as an exit status ---------------


def load_or_report(
    path: Path, overrides: dict[str, dict[str, Any]] | None = None
) -> LoadedConfig | None:
    """The config, validated; None after printing each issue (file, key, what to do)."""
    try:
        return load_config(path, DriverRegistry.from_entry_points(), overrides)
    except ConfigError as exc:
        for issue in exc.issues:
            print(f"iortd: config error: {issue}", file=sys.stderr)  # noqa: T201 - CLI output
        return None


def usage_error(message: str) -> int:
    print(f"iortd: {message}", file=sys.stderr)  # noqa: T201 - CLI output
    return EXIT_USAGE


def run_to_exit(app: App, *, duration_s: float | None = None) -> RunResult | int:
    """Run the daemon (:func:`serve`); an exit status instead when the audit log or what
    the config names cannot be used."""
    path = app.loaded.path
    try:
        return asyncio.run(serve(app, duration_s=duration_s))
    except LogInUse as exc:
        return usage_error(str(exc))
    except LogRolledBack as exc:
        return usage_error(f"audit log: {exc}")
    except StartError as exc:
        return usage_error(f"config error: {path}: {exc}")
    except LogUnusable as exc:
        # A FIFO, a device or a link put in the log directory: refused before any reading.
        return usage_error(f"audit log: {exc}")
    except LogDamaged as exc:
        print(f"iortd: audit log: {exc}", file=sys.stderr)  # noqa: T201 - CLI output
        return EXIT_BAD
    except OSError as exc:
        # The final flush failed (disk still failing at shutdown): say so, loudly.
        print(  # noqa: T201 - CLI output
            f"iortd: audit log: entries could not be written at shutdown: {exc}; they are "
            f"kept in {DEFAULT_SPILL_DIR} (see the operational log) and restored, marked "
            "unvouched, by the next start",
            file=sys.stderr,
        )
        return EXIT_BAD
