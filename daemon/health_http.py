"""The health endpoint: ``/healthz``, ``/readyz``, ``/status`` and ``/metrics`` over HTTP.

Served by uvicorn with a Starlette app, the two libraries the dashboard already uses (no
new web stack on the bedside host), inside the daemon's own event loop and TaskGroup: the
answers read the running daemon's state directly (daemon/health.py, daemon/metrics.py),
and an event loop that is blocked answers nothing, which is what a prober must see.
``/metrics`` is ``prometheus_client``'s own ASGI app on the daemon's registry, so content
negotiation (the text format, OpenMetrics, gzip) is the library's.

* ``GET /healthz``: 200 ``{"alive": true}`` when every loop and the audit writer make
  progress, else 503 ``{"alive": false, "reasons": [...]}``.
* ``GET /readyz``: 200 ``{"ready": true}`` when ready, else 503 ``{"ready": false,
  "reasons": [...]}``. MQTT is never a reason.
* ``GET /status``: ``{"ready", "phase", "delivery_active", "delivery_id", "devices",
  "version"}`` (docs/operations.md).
* ``GET /metrics``: Prometheus exposition.

Bound to loopback by default (``[health] listen``); every request must name an allowed
host (the listen address, the loopback names and ``[health] allowed_hosts``) in its
``Host`` header, so a web page that DNS rebinding points at this port cannot read it.
Read-only: nothing here changes the daemon. No patient data: device names, phases and the
delivery id (room and time) only.

The listening socket is bound when the server is built, after the audit log is open and
before any device is touched. A port that cannot be bound does not stop the daemon (the
record matters more than its monitoring): it is an error in the operational log,
``health_unavailable``, and the endpoint is absent, which any prober reports; the same
for a server that fails while running (``health_failed``). Shutdown:
:meth:`HealthServer.stop` asks uvicorn to exit and waits for it within a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
from collections.abc import Generator, Sequence
from typing import Any

import structlog
import uvicorn
from prometheus_client import make_asgi_app
from prometheus_client.registry import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from iortd.daemon.health import Health
from iortd.kernel.asgi import AsgiEndpoint

__all__ = ["LOOPBACK_HOSTS", "HealthServer", "build_app"]

log = structlog.get_logger("iortd")

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
NO_STORE = {"cache-control": "no-store"}


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def build_app(
    health: Health, registry: CollectorRegistry, allowed_hosts: Sequence[str] = LOOPBACK_HOSTS
) -> ASGIApp:
    async def healthz(request: Request) -> Response:
        why = health.liveness()
        body: dict[str, Any] = {"alive": not why}
        if why:
            body["reasons"] = why
        return JSONResponse(body, status_code=503 if why else 200, headers=NO_STORE)

    async def readyz(request: Request) -> Response:
        why = health.readiness()
        body: dict[str, Any] = {"ready": not why}
        if why:
            body["reasons"] = why
        return JSONResponse(body, status_code=503 if why else 200, headers=NO_STORE)

    async def status(request: Request) -> Response:
        return JSONResponse(health.status(), headers=NO_STORE)

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/status", status),
            Route("/metrics", AsgiEndpoint(make_asgi_app(registry))),
        ]
    )
    return TrustedHostMiddleware(app, allowed_hosts=list(allowed_hosts), www_redirect=False)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the composition root owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HealthServer:
    """The endpoint's socket and server; :meth:`bind` first, then :meth:`serve` as a
    task of the daemon's TaskGroup, :meth:`stop` in the ordered shutdown."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._sock: socket.socket | None = None
        self._server: _Server | None = None
        self.url: str | None = None

    @classmethod
    def bind(
        cls,
        health: Health,
        registry: CollectorRegistry,
        address: tuple[str, int],
        extra_hosts: Sequence[str] = (),
    ) -> HealthServer:
        """Bind ``address`` (a port that cannot be bound is logged, never raised)."""
        host, port = address
        hosts = [*LOOPBACK_HOSTS, *extra_hosts]
        if not ipaddress.ip_address(host).is_unspecified:
            hosts.append(_host(host))
        self = cls(build_app(health, registry, hosts))
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
        except OSError as exc:
            sock.close()
            why = "in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            log.error(  # noqa: TRY400 - expected, not a crash: no traceback
                "health_unavailable",
                listen=f"{_host(host)}:{port}",
                error=why,
                remedy="free the port or set [health] listen to another address (or '')",
            )
            return self
        sock.setblocking(False)
        sock.set_inheritable(False)
        self._sock = sock
        bound_host, bound_port = sock.getsockname()[:2]
        self.url = f"http://{_host(bound_host)}:{bound_port}"
        return self

    async def serve(self) -> None:
        if self._sock is None:
            return
        config = uvicorn.Config(
            self._app,
            log_config=None,
            access_log=False,
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=1,
            timeout_keep_alive=5,
            limit_concurrency=32,
        )
        self._server = _Server(config)
        log.info("health_serving", url=self.url)
        try:
            await self._server.serve(sockets=[self._sock])
        except Exception:
            # The monitor goes on without its endpoint (probers see it gone).
            log.exception("health_failed", url=self.url)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def stop(self, task: asyncio.Task[None], timeout_s: float) -> None:
        """Ask the server to exit; cancel it when it has not within ``timeout_s``."""
        if self._server is not None:
            self._server.should_exit = True
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if not done:
            log.error("health_stop_timeout", timeout_s=timeout_s)
            task.cancel(msg="shutdown: the health endpoint did not stop in time")
        self.close()
