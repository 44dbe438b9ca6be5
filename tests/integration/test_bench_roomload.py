"""The room-load generator (benchmarks/roomload.py) through a real Mosquitto: each room
publishes the daemon's own telemetry and applicator messages (real sink, real outbox,
one outbox and client id per room), gap-free, at its rate; and the dashboard viewers
(benchmarks/sse_clients.py) read a real ``text/event-stream``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aiomqtt
import orjson
import pytest

from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import roomload  # noqa: E402 - from the benchmarks folder, put on the path above


async def test_rooms_publish_the_daemons_stream_gap_free(tmp_path: Path) -> None:
    with Mosquitto(BrokerOptions(), tmp_path / "broker") as broker:
        got: dict[str, list[dict[str, object]]] = defaultdict(list)
        sub = aiomqtt.Client("127.0.0.1", broker.port, identifier="roomload-test")
        async with sub:
            await sub.subscribe("iort/v1/load-site/+/+", qos=1)

            arrived = asyncio.Event()

            async def collect() -> None:
                async for m in sub.messages:
                    assert isinstance(m.payload, bytes)
                    got[m.topic.value].append(orjson.loads(m.payload))
                    arrived.set()

            collector = asyncio.create_task(collect())
            rooms = [
                roomload.Room.build(
                    i, broker.port, tmp_path / "out", site="load-site", profile="intrabeam", seed=1
                )
                for i in range(2)
            ]
            stop, ready = asyncio.Event(), asyncio.Event()
            loop = asyncio.get_running_loop()
            ready_at: list[float] = []
            ready_cb = asyncio.create_task(ready.wait())
            ready_cb.add_done_callback(lambda _: ready_at.append(loop.time()))
            ready_cb.add_done_callback(lambda _: loop.call_later(0.6, stop.set))
            async with asyncio.timeout(20):
                counts = await roomload.run_rooms(rooms, 0.05, stop, ready)
                # Everything made reaches the broker: what was in flight at the stop is
                # flushed by the sinks' close, as in the daemon.
                while sum(
                    len(v) for k, v in got.items() if k.endswith(("/telemetry", "/applicator"))
                ) < (counts.telemetry + counts.applicator):
                    arrived.clear()
                    await arrived.wait()
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
    for r in ("room-000", "room-001"):
        tel = got[f"iort/v1/load-site/{r}/telemetry"]
        app = got[f"iort/v1/load-site/{r}/applicator"]
        # 0.6 s at 20 Hz: about 12 readings a device; a loaded machine may start late.
        assert len(tel) >= 5, (r, len(tel))
        assert len(app) >= 5, (r, len(app))
        seqs = [int(str(m["seq"])) for m in tel]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "telemetry seq not gap-free"
        assert all(m["sim"] is True for m in tel + app)
        assert {"device", "state", "dose_primary_gy", "kv"} <= tel[-1].keys()
        assert got[f"iort/v1/load-site/{r}/status"], "no status message"
        assert (tmp_path / "out" / r / "mqtt-outbox" / "state.json").exists()


class _Sse(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # as the dashboard's server answers

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        for i in range(3):
            self.wfile.write(b'event: msg\ndata: {"i": %d}\n\n' % i)
        self.wfile.flush()
        self.server.done.wait(10)  # type: ignore[attr-defined]
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the viewers hang up at the end: a broken pipe here is expected


@pytest.fixture
def sse_server() -> Iterator[int]:
    srv = _Server(("127.0.0.1", 0), _Sse)
    srv.done = threading.Event()  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.done.set()  # type: ignore[attr-defined]
        srv.shutdown()
        srv.server_close()


def test_viewers_read_every_stream_and_count_its_messages(sse_server: int) -> None:
    cmd = [sys.executable, str(BENCH / "sse_clients.py"), "--port", str(sse_server)]
    proc = subprocess.Popen(
        [*cmd, "--clients", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first, "sse_clients ended before all streams started"
        assert json.loads(first) == {"ready": 4}
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    counts = json.loads(out.splitlines()[-1])
    assert counts["ended"] == 0
    assert counts["msg_events"] in range(4, 13)  # 3 per stream, all but the first maybe later
