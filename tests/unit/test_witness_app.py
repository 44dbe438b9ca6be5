"""The witness's web app (witness/app.py) driven as ASGI, without a socket: the bounds on a
request's body (size, time), a failing state, and what the operational log says."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from iortd.auditlog.cosignature import CosignerKey
from iortd.auditlog.merkle import leaf_hash, root_of
from iortd.auditlog.note import Signer, generate_keypair
from iortd.auditlog.tlog_checkpoint import CheckpointBody, sign_checkpoint
from iortd.auditlog.witness_client import request_body
from iortd.witness.app import build_app
from iortd.witness.core import Witness
from iortd.witness.store import Store

ORIGIN = "iortd/site-a/or-1/5f0c"
ALLOWED_LOG_KEYS = {"event", "log_level", "origin", "size", "outcome", "status", "error"}


class Exchange:
    def __init__(self, chunks: Sequence[bytes], *, then_wait: bool = False) -> None:
        self.chunks = list(chunks)
        self.then_wait = then_wait
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body = b""

    async def receive(self) -> dict[str, Any]:
        if self.chunks:
            chunk = self.chunks.pop(0)
            more = bool(self.chunks) or self.then_wait
            return {"type": "http.request", "body": chunk, "more_body": more}
        await asyncio.Event().wait()  # a client that stops sending
        raise AssertionError("unreachable")

    async def send(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = dict(message["headers"])
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")


def scope(method: str, path: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": list(headers), "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 7380),
    }  # fmt: skip


@pytest.fixture(autouse=True)
def _logs_captured() -> Iterator[None]:
    """The app logs through structlog's global configuration: captured here, so that no
    stream another test configured is written to."""
    with capture_logs():
        yield


@pytest.fixture
def log_key() -> Signer:
    return generate_keypair("iortd-or-1")


@pytest.fixture
def witness(tmp_path: Path, log_key: Signer) -> Iterator[Witness]:
    store = Store.open(tmp_path / "w.sqlite")
    key = CosignerKey.generate("witness.example.org/w1")
    yield Witness(key, {ORIGIN: [log_key.verifier]}, store, clock=lambda: 1_800_000_000)
    store.close()  # closing twice is harmless


async def run(witness: Witness, ex: Exchange, method: str = "POST",
              path: str = "/add-checkpoint", headers: Sequence[tuple[bytes, bytes]] = (),
              timeout_s: float = 5.0, limit: int = 4096) -> Exchange:  # fmt: skip
    app = build_app(witness, request_timeout_s=timeout_s, max_body_bytes=limit)
    async with asyncio.timeout(10):
        await app(scope(method, path, headers), ex.receive, ex.send)
    return ex


def checkpoint(log_key: Signer, size: int) -> bytes:
    lv = [leaf_hash(bytes([i])) for i in range(size)]
    return request_body(0, [], sign_checkpoint(CheckpointBody(ORIGIN, size, root_of(lv)), log_key))


async def test_a_cosignature_and_its_log_line(witness: Witness, log_key: Signer) -> None:
    with capture_logs() as logs:
        ex = await run(witness, Exchange([checkpoint(log_key, 3)]))
    assert ex.status == 200
    assert ex.body.startswith("— witness.example.org/w1 ".encode())
    assert [(x["event"], x["outcome"], x["origin"], x["size"]) for x in logs] == [
        ("checkpoint", "cosigned", ORIGIN, 3)
    ]
    assert set(logs[0]) <= ALLOWED_LOG_KEYS


async def test_a_body_that_does_not_arrive_is_408(witness: Witness) -> None:
    ex = await run(witness, Exchange([b"old 0\n"], then_wait=True), timeout_s=0.2)
    assert ex.status == 408


async def test_too_large_by_header_or_by_stream_is_413(witness: Witness) -> None:
    by_header = await run(witness, Exchange([]), headers=[(b"content-length", b"5000")])
    assert by_header.status == 413
    streamed = await run(witness, Exchange([b"x" * 3000, b"x" * 3000]))
    assert streamed.status == 413


async def test_only_post_and_the_monitoring_get(witness: Witness) -> None:
    assert (await run(witness, Exchange([b""]), method="GET")).status == 405
    assert (await run(witness, Exchange([b""]), method="GET", path="/metrics")).status == 404


async def test_a_failing_state_is_500_without_the_request_in_the_log(
    witness: Witness, log_key: Signer
) -> None:
    witness.store.close()  # every query now raises sqlite3.ProgrammingError
    with capture_logs() as logs:
        ex = await run(witness, Exchange([checkpoint(log_key, 3)]))
    assert ex.status == 500
    assert [(x["outcome"], x["error"]) for x in logs] == [("state_error", "ProgrammingError")]
    assert set(logs[0]) <= ALLOWED_LOG_KEYS
