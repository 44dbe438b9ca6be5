"""The dashboard's own Prometheus metrics, read from its hub at each scrape.

One ``CollectorRegistry`` per app (never prometheus_client's process-wide default), holding
one collector that reads what the dashboard already keeps: the browser streams open
(viewers), the messages that arrived from the broker and those rejected, by topic kind
(``Rooms.topic_kind``: a name of the contract, ``cmd`` or ``other``, so the series stay
bounded whatever a publisher sends), the rooms held, and the broker connection; with a
login, the live sessions, the logins judged by outcome and the requests its checks refused
by reason (fixed vocabularies: never a holder id, never an address). Names are
``iort_dashboard_...`` and listed in docs/operations.md ("Metrics").
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from iortd.dashboard.hub import Hub
from iortd.dashboard.login import Auth

__all__ = ["DashboardCollector", "build_registry"]


class DashboardCollector(Collector):
    def __init__(self, hub: Hub, auth: Auth | None = None) -> None:
        self.hub = hub
        self.auth = auth

    def collect(self) -> Iterator[Metric]:
        hub, rooms = self.hub, self.hub.rooms
        yield GaugeMetricFamily(
            "iort_dashboard_viewers", "Browser streams open now.", value=hub.subscribers
        )
        yield GaugeMetricFamily("iort_dashboard_rooms", "Rooms held now.", value=len(rooms.rooms))
        yield GaugeMetricFamily(
            "iort_dashboard_broker_connected",
            "1 while the dashboard is connected to its broker.",
            value=float(hub.broker.connected),
        )
        received = CounterMetricFamily(
            "iort_dashboard_received", "Messages that arrived, by topic kind.", labels=["kind"]
        )
        for kind, n in sorted(rooms.received_by_kind.items()):
            received.add_metric([kind], n)
        yield received
        rejected = CounterMetricFamily(
            "iort_dashboard_rejected",
            "Messages rejected (invalid, too large, dashboard busy), by topic kind.",
            labels=["kind"],
        )
        for kind, n in sorted(rooms.rejected_by_kind.items()):
            rejected.add_metric([kind], n)
        yield rejected
        yield CounterMetricFamily(
            "iort_dashboard_accepted", "Messages applied to a room.", value=rooms.accepted
        )
        yield GaugeMetricFamily(
            "iort_dashboard_state_bytes", "Bytes of room state held.", value=rooms.bytes
        )
        if self.auth is not None:
            yield from self._login(self.auth)

    def _login(self, auth: Auth) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "iort_dashboard_sessions", "Login sessions live now.", value=len(auth.book)
        )
        logins = CounterMetricFamily(
            "iort_dashboard_logins", "Login attempts judged, by outcome.", labels=["outcome"]
        )
        for outcome, n in sorted(auth.logins.items()):
            logins.add_metric([outcome], n)
        yield logins
        refused = CounterMetricFamily(
            "iort_dashboard_requests_refused",
            "Requests refused by the login's checks, by reason.",
            labels=["reason"],
        )
        for reason, n in sorted(auth.refused.items()):
            refused.add_metric([reason], n)
        yield refused


def build_registry(hub: Hub, auth: Auth | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(DashboardCollector(hub, auth))
    return registry
