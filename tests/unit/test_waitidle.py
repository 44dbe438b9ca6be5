"""``iortd wait-idle`` against a real HTTP server on a free loopback port (issue 17 item 4).

The server serves the health endpoint's contract (``GET /status``: ready, phase,
delivery_active, delivery_id, devices, version) from a script of replies, one per request,
the last one repeated; the daemon's real endpoint is built elsewhere (daemon/health*), so
these tests pin what wait-idle reads of it and what it does with everything else.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from iortd.daemon.waitidle import (
    MAX_REPLY_BYTES,
    Endpoint,
    UsageError,
    parse_url,
    wait_idle,
)


def status(*, active: bool, delivery_id: str | None = None, phase: str = "IDLE") -> bytes:
    return json.dumps(
        {
            "ready": True,
            "phase": phase,
            "delivery_active": active,
            "delivery_id": delivery_id,
            "devices": {"source-1": "online"},
            "version": "0.1.0",
        }
    ).encode()


@dataclass
class Script:
    """Replies in order, (HTTP status, body); the last one is repeated."""

    replies: list[tuple[int, bytes]]
    requests: list[str] = field(default_factory=list)

    def next(self, path: str) -> tuple[int, bytes]:
        self.requests.append(path)
        return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        code, body = self.server.script.next(self.path)
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, script: Script) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script = script


Serve = Callable[..., tuple["Endpoint", "Script"]]


@pytest.fixture
def serve() -> Iterator[Serve]:
    servers: list[_Server] = []

    def start(*replies: tuple[int, bytes]) -> tuple[Endpoint, Script]:
        script = Script(list(replies))
        server = _Server(script)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return Endpoint("127.0.0.1", server.server_address[1], "/status"), script

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _free_port_nobody_listens_on() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def run(endpoint: Endpoint, timeout_s: float, interval_s: float = 0.05) -> tuple[int, str, float]:
    out = io.StringIO()
    t0 = time.monotonic()
    code = wait_idle(endpoint, timeout_s, interval_s=interval_s, out=out)
    return code, out.getvalue(), time.monotonic() - t0


def test_idle_daemon_exits_0_at_once(serve: Serve) -> None:
    endpoint, script = serve((200, status(active=False)))
    code, out, took = run(endpoint, 30)
    assert code == 0
    assert "idle: no delivery in progress" in out
    assert script.requests == ["/status"]
    assert took < 5


def test_no_daemon_listening_is_idle() -> None:
    endpoint = Endpoint("127.0.0.1", _free_port_nobody_listens_on(), "/status")
    code, out, _ = run(endpoint, 30)
    assert code == 0
    assert "not running" in out


def test_no_one_listening_while_the_service_runs_is_not_idle() -> None:
    """--expect-running: the maintainer scripts ask only when systemd says the service is
    active; then a refused connection means the state cannot be read (health endpoint off)."""
    endpoint = Endpoint("127.0.0.1", _free_port_nobody_listens_on(), "/status")
    out = io.StringIO()
    assert wait_idle(endpoint, 30, expect_running=True, out=out) == 1
    assert "yet the daemon is running" in out.getvalue()


def test_waits_while_delivering_and_says_why(
    serve: Serve,
) -> None:
    busy = status(active=True, delivery_id="or-1-20261206T070000Z", phase="IRRADIATING")
    endpoint, script = serve((200, busy), (200, busy), (200, busy), (200, status(active=False)))
    code, out, _ = run(endpoint, 30)
    assert code == 0
    assert len(script.requests) == 4
    # Said once (not once per poll), naming the delivery and its phase, then the end.
    said = "waiting: delivery or-1-20261206T070000Z in progress (phase IRRADIATING)"
    assert out.count(said) == 1
    assert out.rstrip().endswith(f"idle: no delivery in progress ({endpoint.url})")


def test_still_delivering_at_the_timeout_exits_1(
    serve: Serve,
) -> None:
    endpoint, _ = serve((200, status(active=True, delivery_id="d-1", phase="INTERRUPTED")))
    code, out, took = run(endpoint, 0.6, interval_s=0.1)
    assert code == 1
    assert "not idle after 0.6 s: delivery d-1 in progress (phase INTERRUPTED)" in out
    assert 0.6 <= took < 5


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ((200, b"<html>hello</html>"), "reply is not JSON"),
        ((200, b"[true]"), "not an object (a list)"),
        ((200, b'{"ready": true}'), "no boolean delivery_active (got None)"),
        ((200, b'{"delivery_active": "false"}'), "no boolean delivery_active (got 'false')"),
        ((200, b'{"delivery_active": 0}'), "no boolean delivery_active (got 0)"),
        ((500, status(active=False)), "HTTP 500"),
        ((404, b"{}"), "HTTP 404"),
        ((200, b" " * (MAX_REPLY_BYTES + 1)), f"larger than {MAX_REPLY_BYTES} bytes"),
        ((200, b"[" * 60_000), "nested too deeply"),
    ],
    ids=["html", "array", "no-key", "string", "int", "500", "404", "huge", "deep"],
)
def test_a_reply_that_cannot_be_read_is_not_idle_at_once(
    serve: Serve, reply: tuple[int, bytes], reason: str
) -> None:
    endpoint, _ = serve(reply)
    code, out, took = run(endpoint, 30)
    assert code == 1
    assert "cannot tell whether a delivery is in progress" in out
    assert reason in out
    assert took < 5  # at once, not after the 30 s timeout


def test_a_daemon_that_accepts_but_never_answers_is_not_idle() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        endpoint = Endpoint("127.0.0.1", listener.getsockname()[1], "/status")
        code, out, took = run(endpoint, 1.0, interval_s=0.2)
    assert code == 1
    assert "no usable answer" in out
    assert "no answer within" in out
    assert took < 1.0 + 1.0 + 2.0  # deadline + the last request's minimum + slack


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1:9108/status",
        "127.0.0.1:9108",
        "http://",
        "http://127.0.0.1:99999/status",
        "http://user:pw@127.0.0.1:9108/status",
        "http://127.0.0.1:9108/status?x=1",
    ],
)
def test_bad_urls_are_usage_errors(url: str) -> None:
    with pytest.raises(UsageError, match="--url"):
        parse_url(url)


def test_url_defaults() -> None:
    assert parse_url("http://127.0.0.1:9108") == Endpoint("127.0.0.1", 9108, "/status")
    assert parse_url("http://[::1]:9/s").url == "http://[::1]:9/s"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iortd.daemon.cli", "wait-idle", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_cli_exit_codes(serve: Serve) -> None:
    idle, _ = serve((200, status(active=False)))
    busy, _ = serve((200, status(active=True, delivery_id="d-2", phase="READY")))
    # A proxy in the environment is never used for the daemon's own loopback endpoint.
    proxy = {"http_proxy": "http://127.0.0.1:9/", "HTTP_PROXY": "http://127.0.0.1:9/"}
    ok = _cli("--url", idle.url, "--timeout", "5", env=proxy)
    assert (ok.returncode, ok.stderr) == (0, "")
    assert "idle: no delivery in progress" in ok.stdout
    still = _cli("--url", busy.url, "--timeout", "0")
    assert still.returncode == 1
    assert "not idle after 0 s: delivery d-2 in progress (phase READY)" in still.stdout
    usage = _cli("--url", idle.url, "--timeout", "-1")
    assert usage.returncode == 2, usage
    assert usage.stderr.startswith("iortd: wait-idle: --timeout must be"), usage.stderr


@pytest.mark.parametrize(("timeout_s", "interval_s"), [(-1, 1), (float("nan"), 1), (1, 0)])
def test_bad_timeouts_are_usage_errors(timeout_s: float, interval_s: float) -> None:
    endpoint = Endpoint("127.0.0.1", _free_port_nobody_listens_on(), "/status")
    with pytest.raises(UsageError, match=r"--timeout|--interval"):
        wait_idle(endpoint, timeout_s, interval_s=interval_s, out=io.StringIO())
