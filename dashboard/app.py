"""The web app (Starlette): the pages, their static files and the server-sent events.

Routes:

* ``/`` the overview (``?site=SITE`` one site's rooms; ``&page=N`` pages them);
  ``/room/{site}/{room}`` one room. Both are the same HTML page; its script reads the path.
* ``/events`` (``?room=SITE/ROOM`` to follow one room, ``?site=SITE`` one site's rooms): a
  ``text/event-stream`` that starts with a ``snapshot`` of what the dashboard holds (for
  the overview: summaries, without plots and event lists), then one ``msg`` per MQTT
  message accepted, ``removed`` when a room is aged out or evicted, ``broker`` when the
  dashboard's own MQTT connection changes, and a ``tick`` every second (the stream is
  alive; reject counters and diagnostics).
* ``/api/snapshot`` (``?room=`` / ``?site=``): the same snapshot as JSON, for scripts,
  tests and diagnostics (``diagnostics``: what was rejected, per reason and per room).
* ``/api/session``, and with a login (``--users-dir``, dashboard/login.py) ``POST
  /api/login``, ``POST /api/logout``, ``POST /api/signoff`` (dashboard/signoff.py) and
  ``POST /api/ack`` (dashboard/ack.py), the last two through dashboard/commanding.py;
  with a login, ``/events`` and ``/api/snapshot`` answer 401 to a client that has no
  session and may not see without one, and an open stream ends when its session does.
* ``/metrics``: the dashboard's own Prometheus metrics (dashboard/metrics.py): viewers,
  messages received and rejected per topic kind, rooms, the broker connection.
* ``/static/...``: scripts, styles and fonts, all from this package. Nothing is loaded from
  any other host; the Content-Security-Policy says so to the browser too.

Every request must name an allowed host in its ``Host`` header (Starlette's
``TrustedHostMiddleware``, no ``www.`` redirect; by default the address the dashboard
listens on, ``localhost``, ``127.0.0.1`` and ``[::1]``), else it gets 400 and nothing else:
a page from another origin that a DNS-rebinding attack points at our address cannot read
the snapshot, since its requests carry its own host name.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import make_asgi_app
from starlette.applications import Starlette
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from iortd.dashboard.ack import AckDesk
from iortd.dashboard.commanding import Commander
from iortd.dashboard.hub import CLOSED, Hub
from iortd.dashboard.login import Auth
from iortd.dashboard.metrics import build_registry
from iortd.dashboard.signoff import SignoffDesk
from iortd.kernel.asgi import AsgiEndpoint as _Asgi

__all__ = ["DEFAULT_HOSTS", "SECURITY_HEADERS", "STATIC", "build_app", "host_name"]

STATIC = Path(__file__).resolve().parent / "static"
TICK_S = 1.0
PAGE_SIZE = 48  # room cards per overview page
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "[::1]")
# Only this origin, for everything: a page that tried to reach another host would be
# blocked by the browser, not only by our discipline.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; font-src 'self'; "
        "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _room_param(request: Request) -> str | None:
    room = request.query_params.get("room")
    return room or None


def _site_param(request: Request) -> str | None:
    site = request.query_params.get("site")
    return site or None


def host_name(host: str) -> str:
    """An allowed-host entry as Starlette compares it: lower case, without a port; an IPv6
    literal in brackets (``::1`` and ``[::1]:8080`` give ``[::1]``)."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    if host.count(":") > 1:  # a bare IPv6 literal
        return f"[{host}]"
    return host.split(":", 1)[0]


class _Headers:
    """Adds the security headers to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [
                    (k.encode(), v.encode())
                    for k, v in SECURITY_HEADERS.items()
                    if k.encode() not in names
                ]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def build_app(
    hub: Hub,
    *,
    stale_after_s: float,
    history_points: int,
    allowed_hosts: Sequence[str] = DEFAULT_HOSTS,
    auth: Auth | None = None,
) -> ASGIApp:
    config = {
        "stale_after_s": stale_after_s,
        "history_points": history_points,
        "tick_s": TICK_S,
        "age_out_s": hub.rooms.age_out_s,
        "page_size": PAGE_SIZE,
        "limits": hub.rooms.limits,
    }

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    async def refused(request: Request) -> Response | None:
        if auth is None or await auth.may_view(request):
            return None
        return JSONResponse({"error": "log in to see the rooms"}, status_code=401)

    async def session_info(request: Request) -> Response:
        if auth is None:
            return JSONResponse({"auth": False, "anonymous_view": True, "session": None})
        return await auth.session_info(request)

    async def snapshot(request: Request) -> Response:
        if (no := await refused(request)) is not None:
            return no
        snap = hub.snapshot(_room_param(request), _site_param(request))
        return JSONResponse({"config": config, **snap})

    async def events(request: Request) -> Response:
        if (no := await refused(request)) is not None:
            return no
        only, site = _room_param(request), _site_param(request)
        # Subscribe before the snapshot, in the same step of the loop: nothing accepted
        # between the two can be missed.
        sid = auth.streaming_session(request) if auth is not None else None
        sub = hub.subscribe(only, site)
        first = {"config": config, "only": only, "site": site, **hub.snapshot(only, site)}

        async def stream() -> AsyncIterator[bytes]:
            loop = asyncio.get_running_loop()
            try:
                yield _sse("snapshot", first)
                # A tick every TICK_S, also while messages flow (it carries the reject
                # counters, which no message does).
                next_tick = loop.time() + TICK_S
                while True:
                    try:
                        async with asyncio.timeout(max(0.0, next_tick - loop.time())):
                            item = await sub.next()
                    except TimeoutError:
                        item = None
                    if item is CLOSED:
                        return
                    if item is not None:
                        yield _sse(item.event, item.data)
                    if loop.time() >= next_tick:
                        if sid is not None and auth is not None and not auth.alive(sid):
                            return  # the session ended: so does what it was allowed to see
                        yield _sse("tick", hub.tick(sub))
                        next_tick = loop.time() + TICK_S
            finally:
                hub.unsubscribe(sub)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    commander = Commander(hub)  # the signed commands' answers, for every desk
    app = Starlette(
        routes=[
            Route("/", page),
            Route("/room/{site}/{room}", page),
            Route("/events", events),
            Route("/api/snapshot", snapshot),
            Route("/api/session", session_info),
            *(
                [
                    Route("/api/login", auth.login, methods=["POST"]),
                    Route("/api/logout", auth.action("logout", auth.logout), methods=["POST"]),
                    Route(
                        "/api/signoff",
                        auth.action("signoff", SignoffDesk(hub, auth, commander).signoff),
                        methods=["POST"],
                    ),
                    Route(
                        "/api/ack",
                        auth.action("ack", AckDesk(hub, commander).ack),
                        methods=["POST"],
                    ),
                ]
                if auth is not None
                else []
            ),
            Route("/metrics", _Asgi(make_asgi_app(build_registry(hub, auth)))),
            Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
        ],
    )
    hosts = [host_name(h) for h in allowed_hosts]
    return _Headers(TrustedHostMiddleware(app, allowed_hosts=hosts, www_redirect=False))
