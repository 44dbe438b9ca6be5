"""Signed commands on /metrics: accepted, and refused by reason (every refusal, also those
only summarised in the log), read from the intake at each scrape; nothing without
``[commands] keyring``."""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any, cast

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from iortd.auditlog.command import RejectReason
from iortd.daemon.metrics import DaemonCollector, MetricsSink


class _Commands(Collector):
    def __init__(self, inner: DaemonCollector) -> None:
        self.inner = inner

    def collect(self) -> Any:
        return self.inner._commands()


def scrape(counts: tuple[int, Mapping[str, int]] | None) -> dict[str, float]:
    health = cast(Any, SimpleNamespace(audit=SimpleNamespace(head=(0, ""))))
    collector = DaemonCollector(health, MetricsSink(), [], commands=lambda: counts)
    registry = CollectorRegistry()
    registry.register(_Commands(collector))
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            key = s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items()))
            out[key] = s.value
    return out


def test_the_counts_by_reason() -> None:
    got = scrape((3, {"malformed": 9000, "replayed": 2}))
    assert got["iortd_commands_accepted_total"] == 3
    assert got["iortd_commands_rejected_total{reason=malformed}"] == 9000
    assert got["iortd_commands_rejected_total{reason=replayed}"] == 2
    # Every reason is a series from the start (a rate() needs its zero).
    assert all(f"iortd_commands_rejected_total{{reason={r}}}" in got for r in RejectReason)


def test_nothing_without_a_keyring() -> None:
    assert scrape(None) == {}
