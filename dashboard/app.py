"""The web app (Starlette): the pages, their static files and the server-sent events.

Routes:

* ``/`` the overview of every room; ``/room/{site}/{room}`` one room. Both are the same
  HTML page; its script reads the path.
* ``/events`` (``?room=SITE/ROOM`` to follow one room): a ``text/event-stream`` that starts
  with a ``snapshot`` of what the dashboard holds, then one ``msg`` per MQTT message
  accepted, ``broker`` when the dashboard's own MQTT connection changes, and a ``tick``
  every second so that the browser knows the stream itself is alive.
* ``/api/snapshot`` (``?room=``): the same snapshot as JSON, for scripts and tests.
* ``/static/...``: scripts, styles and fonts, all from this package. Nothing is loaded from
  any other host; the Content-Security-Policy says so to the browser too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from dashboard.hub import CLOSED, Hub

__all__ = ["SECURITY_HEADERS", "STATIC", "build_app"]

STATIC = Path(__file__).resolve().parent / "static"
TICK_S = 1.0
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


def build_app(hub: Hub, *, stale_after_s: float, history_points: int) -> ASGIApp:
    config = {
        "stale_after_s": stale_after_s,
        "history_points": history_points,
        "tick_s": TICK_S,
    }

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    async def snapshot(request: Request) -> Response:
        return JSONResponse({"config": config, **hub.snapshot(_room_param(request))})

    async def events(request: Request) -> Response:
        only = _room_param(request)
        # Subscribe before the snapshot, in the same step of the loop: nothing accepted
        # between the two can be missed.
        sub = hub.subscribe(only)
        first = {"config": config, "only": only, **hub.snapshot(only)}

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield _sse("snapshot", first)
                while True:
                    try:
                        async with asyncio.timeout(TICK_S):
                            item = await sub.queue.get()
                    except TimeoutError:
                        yield _sse("tick", {"broker": hub.broker.connected, "t": time.time()})
                        continue
                    if item is CLOSED:
                        return
                    yield _sse(item.event, item.data)
            finally:
                hub.unsubscribe(sub)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/room/{site}/{room}", page),
            Route("/events", events),
            Route("/api/snapshot", snapshot),
            Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
        ],
    )
    return _Headers(app)
