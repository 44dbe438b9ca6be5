"""The disk budget and the archive on /metrics: the retention task's status, read at each
scrape, and nothing at all without ``[log.retention]``."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any, cast

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from iortd.auditlog.retention import RetentionStatus
from iortd.daemon.metrics import DaemonCollector, MetricsSink


class _Storage(Collector):
    """Only the collector's storage families, so that the test needs no running daemon."""

    def __init__(self, inner: DaemonCollector) -> None:
        self.inner = inner

    def collect(self) -> Any:
        return self.inner._storage()


def scrape(status: RetentionStatus | None) -> dict[str, float]:
    health = cast(Any, SimpleNamespace(audit=SimpleNamespace(head=(0, ""))))
    collector = DaemonCollector(health, MetricsSink(), [], retention=lambda: status)
    registry = CollectorRegistry()
    registry.register(_Storage(collector))
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items()))
            out[key] = s.value
    return out


def test_the_storage_figures_follow_the_retention_status() -> None:
    st = RetentionStatus(
        used_bytes=3_000, budget_bytes=4_000, warn_bytes=3_200, local_segments=3,
        unarchived_segments=1, archive_configured=True,
    )  # fmt: skip
    got = scrape(st)
    assert got["iortd_storage_used_bytes"] == 3_000
    assert got["iortd_storage_budget_bytes"] == 4_000
    assert got["iortd_storage_level{level=ok}"] == 1
    assert got["iortd_storage_level{level=warning}"] == 0
    assert got["iortd_storage_archive_failing"] == 0
    later = replace(
        st, used_bytes=4_100, level="budget_reached", last_archive_error="share not mounted",
        archived_total=2, deleted_total=0,
    )  # fmt: skip
    got = scrape(later)
    assert got["iortd_storage_used_bytes"] == 4_100
    assert got["iortd_storage_level{level=budget_reached}"] == 1
    assert got["iortd_storage_level{level=ok}"] == 0
    assert got["iortd_storage_archive_failing"] == 1
    assert got["iortd_storage_segments_archived_total"] == 2


def test_no_storage_figures_without_retention() -> None:
    assert scrape(None) == {}
