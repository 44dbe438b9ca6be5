"""Discovery of sinks through the ``iort.sinks`` entry-point group, and building the
sinks a site config names in its ``[[sinks]]`` tables.

The lookup is the kernel's (:mod:`iortd.kernel.plugins`, shared with drivers); this module
says how a sink's errors read, and builds and starts the configured sinks in file order,
each wrapped in its own queue (:mod:`iortd.daemon.sink_queue`), and the MQTT sink the
same way, from the ``[mqtt]`` table. The options were
validated by each factory when the config was loaded (:mod:`iortd.daemon.config`), so a
problem here is a plug-in that accepted what it cannot use, or a start that failed: both
name the table (``sinks[i]``) and refuse the start.

The built-in MQTT sink is a plug-in too (entry point ``mqtt``, built through this
registry), but it is configured by the ``[mqtt]`` table (one broker connection and one
outbox per daemon, in ``mqtt-outbox/`` as always): ``[[sinks]]`` with ``type = "mqtt"`` is
refused, naming ``[mqtt]``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any, Protocol

from iortd.auditlog.note import Verifier
from iortd.daemon.sink_queue import DEFAULT_TIMEOUT_S, QueuedSink, queued
from iortd.daemon.sinks import (
    Overflow,
    Recorder,
    SinkConfigError,
    SinkContext,
    SinkFactory,
    SinkSpec,
    UnknownSinkError,
)
from iortd.kernel.plugins import PluginRegistry

__all__ = [
    "BUILT_IN_NAMES",
    "CONFIGURED_BY_SECTION",
    "ENTRY_POINT_GROUP",
    "SinkRegistry",
    "SinkTable",
    "open_sinks",
]

ENTRY_POINT_GROUP = "iort.sinks"
# Names the daemon's own sinks use in logs and in the audit log: a [[sinks]] table may not
# take them.
# metrics: daemon/metrics.py; alarms: daemon/alarm_acks.py (the alarm ledger)
BUILT_IN_NAMES = frozenset({"oplog", "console", "mqtt", "metrics", "alarms"})
# Sink types configured by a table of their own, not by [[sinks]].
CONFIGURED_BY_SECTION = {"mqtt": "[mqtt]"}
SINKS_DIR = "sinks"
MQTT_OUTBOX_DIR = "mqtt-outbox"


class SinkTable(Protocol):
    """One validated ``[[sinks]]`` table (``iortd.daemon.config.SinkConfig``)."""

    @property
    def type(self) -> str: ...
    @property
    def name(self) -> str | None: ...
    @property
    def queue_size(self) -> int: ...
    @property
    def overflow(self) -> Overflow: ...
    @property
    def timeout_s(self) -> float: ...
    @property
    def options(self) -> Mapping[str, Any]: ...


class SinkRegistry(PluginRegistry[SinkFactory]):
    group = ENTRY_POINT_GROUP

    @classmethod
    def from_entry_points(cls) -> SinkRegistry:
        return cls(cls._entry_points())

    @classmethod
    def of(cls, factories: Iterable[SinkFactory]) -> SinkRegistry:
        return cls({f.name: f for f in factories})

    def unknown(self, name: str) -> Exception:
        return UnknownSinkError(name, self.names())

    def failed_to_load(self, name: str, entry: EntryPoint, exc: Exception) -> Exception:
        return SinkConfigError(
            f"sink {name!r} is installed but failed to load ({entry.value}): {exc}"
        )


def state_dir(log_directory: Path, name: str) -> Path:
    """Where sink ``name`` may keep files of its own: under the log directory (and so
    under its lock). The MQTT sink keeps its outbox where it always has."""
    if name == "mqtt":
        return log_directory / MQTT_OUTBOX_DIR
    return log_directory / SINKS_DIR / name


async def open_sinks(
    tables: Sequence[SinkTable],
    registry: SinkRegistry,
    *,
    mqtt: Mapping[str, Any] | None,
    site: str,
    room: str,
    simulated: bool,
    log_directory: Path,
    origin: str,
    verifier: Verifier | None,
    config_hash: str = "",
    record: Callable[[str], Recorder] | None = None,
    notice: Callable[[str, str], None] | None = None,
) -> list[QueuedSink]:
    """Build and start the configured sinks, each behind its own queue: the ``[[sinks]]``
    tables in file order, then the MQTT sink (``mqtt``: the ``[mqtt]`` table's options,
    None when it is off), through the same registry. ``record`` (given a sink's type, its
    ``SinkContext.record``) and ``notice`` are lent to each. Raises SinkConfigError naming
    the table, after closing those already started, when a factory or a start fails."""
    todo: list[tuple[str | None, str, str, Mapping[str, Any], SinkTable | None]] = [
        (f"sinks[{i}]", t.name or t.type, t.type, t.options, t) for i, t in enumerate(tables)
    ]
    if mqtt is not None:
        # Its own messages name its keys (mqtt.password_file, mqtt outbox).
        todo.append((None, "mqtt", "mqtt", mqtt, None))
    opened: list[QueuedSink] = []
    try:
        for where, name, kind, options, table in todo:
            timeout_s = DEFAULT_TIMEOUT_S if table is None else table.timeout_s
            label = f"{where} ({name}): " if where is not None else ""
            try:
                sink = registry.get(kind).create(
                    SinkSpec(name=name, type=kind, options=options),
                    SinkContext(
                        site=site,
                        room=room,
                        simulated=simulated,
                        state_dir=state_dir(log_directory, name),
                        origin=origin,
                        verifier=verifier,
                        config_hash=config_hash,
                        log_directory=log_directory,
                        record=None if record is None else record(kind),
                        notice=notice,
                    ),
                )
                sink.name = name
                async with asyncio.timeout(timeout_s):
                    await sink.start()
            except TimeoutError:
                raise SinkConfigError(
                    f"{label}did not start within timeout_s = {timeout_s} s"
                ) from None
            except SinkConfigError as exc:
                raise SinkConfigError(f"{label}{exc}") from None
            except Exception as exc:
                raise SinkConfigError(f"{label}cannot start: {exc}") from exc
            if table is None:
                opened.append(queued(sink))  # its class says its queue (the MQTT sink's)
            else:
                opened.append(
                    QueuedSink(
                        sink,
                        queue_size=table.queue_size,
                        overflow=table.overflow,
                        timeout_s=table.timeout_s,
                    )
                )
    except BaseException:
        for q in reversed(opened):
            await q.aclose()
        raise
    return opened
