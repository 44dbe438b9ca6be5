"""A plain ASGI app as a Starlette route endpoint.

Starlette calls a function given to ``Route`` as a request handler and any other callable
as an ASGI app; ``prometheus_client.make_asgi_app`` returns a function, so it has to be
wrapped to be mounted at ``/metrics`` as one route (a ``Mount`` would redirect
``/metrics`` to ``/metrics/``). The daemon's health endpoint and the dashboard both do.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["AsgiEndpoint"]


class AsgiEndpoint:
    """``app`` as an ASGI callable that is not a function (see the module doc)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
