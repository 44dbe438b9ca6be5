"""The witness over HTTP: Starlette routes under uvicorn, as the dashboard and the daemon's
health endpoint serve (no other web stack).

* ``POST /add-checkpoint``: c2sp.org/tlog-witness; the decision is witness/core.py's, made
  in a worker thread (SQLite blocks). The body is read with a bound on its size
  (``max_body_bytes``: 413 beyond it, by ``Content-Length`` before reading or while
  reading) and on the time to read it and decide (``request_timeout_s``: 408 for a body
  that does not arrive, 503 for a decision that does not finish: not cosigned, the client
  tries again; a decision that finishes after that is in the state all the same, and the
  client's next request gets 409 and resubmits).
* ``GET /<hex SHA-256 of the origin>/checkpoint``: tlog-witness's monitoring API, the last
  checkpoint cosigned for that origin with the log's verified signatures and the
  cosignature; 404 if none.

Nothing else is served, and nothing is fetched from anywhere: the witness only answers.
One operational log line per request (``checkpoint``): origin (only a configured one),
size, outcome, status; never the note, the proof or the client's text.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Generator

import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from iortd.witness.core import TEXT, Reply, Witness

__all__ = ["UvicornServer", "build_app"]

log = structlog.get_logger("iort-witness")


class UvicornServer(uvicorn.Server):
    """uvicorn without its own signal handling: the command owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise _TooLarge
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > limit:
            raise _TooLarge
    return bytes(chunks)


def build_app(witness: Witness, *, request_timeout_s: float, max_body_bytes: int) -> Starlette:
    async def add_checkpoint(request: Request) -> Response:
        try:
            async with asyncio.timeout(request_timeout_s):
                body = await _read_body(request, max_body_bytes)
        except _TooLarge:
            log.info("checkpoint", outcome="too_large", status=413)
            return PlainTextResponse("request body too large\n", 413)
        except TimeoutError:
            log.info("checkpoint", outcome="read_timeout", status=408)
            return PlainTextResponse("request body not received in time\n", 408)
        except ClientDisconnect:
            return PlainTextResponse("", 400)
        try:
            async with asyncio.timeout(request_timeout_s):
                reply: Reply = await asyncio.to_thread(witness.add_checkpoint, body)
        except TimeoutError:
            log.error("checkpoint", outcome="decision_timeout", status=503)  # noqa: TRY400 - expected
            return PlainTextResponse("not decided in time; try again\n", 503)
        except Exception as exc:  # the state file failed: not cosigned, said as a 500
            # No traceback: its frames would hold the request's text (docs/witness.md).
            log.error(  # noqa: TRY400 - see above
                "checkpoint", outcome="state_error", status=500, error=type(exc).__name__
            )
            return PlainTextResponse("the witness's state failed; not cosigned\n", 500)
        fields: dict[str, object] = {"outcome": reply.outcome, "status": reply.status}
        if reply.origin is not None:
            fields["origin"] = reply.origin
        if reply.size is not None:
            fields["size"] = reply.size
        if reply.outcome in ("fork", "bad_proof", "bad_empty_root"):
            log.warning("checkpoint", **fields)
        else:
            log.info("checkpoint", **fields)
        # The Content-Type as a header, not media_type: Starlette would append
        # "; charset=utf-8" to a text/ type, and tlog-witness's 409 must be exactly
        # text/x.tlog.size (transparency-dev's Go client compares it as a string).
        return Response(reply.body, reply.status, headers={"content-type": reply.content_type})

    async def checkpoint(request: Request) -> Response:
        wanted = request.path_params["origin_hash"]
        for origin in witness.logs:
            if hashlib.sha256(origin.encode()).hexdigest() == wanted:
                async with asyncio.timeout(request_timeout_s):
                    latest = await asyncio.to_thread(witness.store.latest, origin)
                if latest is not None:
                    return Response(latest.checkpoint.encode(), 200, media_type=TEXT)
                break
        return PlainTextResponse("no checkpoint cosigned for that origin\n", 404)

    return Starlette(
        routes=[
            Route("/add-checkpoint", add_checkpoint, methods=["POST"]),
            Route("/{origin_hash:str}/checkpoint", checkpoint, methods=["GET"]),
        ]
    )
