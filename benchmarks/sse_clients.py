"""Dashboard viewers without a browser: N raw HTTP/1.1 readers of ``/events``, one process.

A browser's cost is the browser's; what a viewer costs the *dashboard* is one stream to
keep fed. This process opens ``--clients`` TCP connections to the dashboard, sends each
the request an ``EventSource`` sends (``GET PATH``, ``Accept: text/event-stream``), reads
and discards what comes, counting bytes and ``msg`` events. It uses only the standard
library (``selectors``, blocking nothing), so that its own CPU, which the room-cost
benchmark reports on its own line, stays small and apart from the dashboard's.

    python benchmarks/sse_clients.py --port PORT [--clients N] [--path /events?room=S/R]

Prints ``{"ready": N}`` once every stream has its response headers and first bytes (the
snapshot), runs until SIGTERM or SIGINT, then prints one JSON line of counts (bytes and
``msg`` events over all streams, streams that ended early) and exits 0. A stream that the
dashboard refuses (not 200) or that does not start within ``--within`` seconds: exit 1,
saying which.
"""

from __future__ import annotations

import argparse
import json
import selectors
import signal
import socket
import sys
import time
from types import FrameType

__all__ = ["main"]

CHUNK = 65536
MSG_MARK = b"event: msg\n"


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True, help="the dashboard's port on 127.0.0.1")
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--path", default="/events", help="default /events (the overview)")
    p.add_argument("--within", type=float, default=15.0, help="seconds for every stream to start")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    request = (
        f"GET {args.path} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
        "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
    ).encode()
    sel = selectors.DefaultSelector()
    started: dict[int, bool] = {}
    nbytes = msgs = ended = 0
    tails: dict[int, bytes] = {}
    socks: list[socket.socket] = []
    try:
        for _ in range(args.clients):
            s = socket.create_connection(("127.0.0.1", args.port), timeout=args.within)
            s.sendall(request)
            s.setblocking(False)
            socks.append(s)
            started[s.fileno()] = False
            tails[s.fileno()] = b""
            sel.register(s, selectors.EVENT_READ, len(socks) - 1)
        deadline = time.monotonic() + args.within
        announced = False
        while True:
            if not announced and all(started.values()):
                print(json.dumps({"ready": args.clients}), flush=True)
                announced = True
            if not announced and time.monotonic() > deadline:
                late = sum(1 for v in started.values() if not v)
                print(
                    f"sse_clients: {late} stream(s) not started within {args.within} s",
                    file=sys.stderr,
                )
                return 1
            for key, _ in sel.select(timeout=0.5):
                s = socks[key.data]
                fd = s.fileno()
                try:
                    data = s.recv(CHUNK)
                except BlockingIOError:
                    continue
                if not data:
                    ended += 1
                    sel.unregister(s)
                    started[fd] = True  # counted as ended, not waited for
                    continue
                if not started[fd]:
                    if data[:12] not in (b"HTTP/1.1 200", b"HTTP/1.0 200"):
                        print(f"sse_clients: refused: {data[:80]!r}", file=sys.stderr)
                        return 1
                    started[fd] = True
                nbytes += len(data)
                joined = tails[fd] + data
                msgs += joined.count(MSG_MARK)
                tails[fd] = joined[-(len(MSG_MARK) - 1) :]
    except _Stop:
        pass
    finally:
        for s in socks:
            s.close()
    print(json.dumps({"bytes": nbytes, "msg_events": msgs, "ended": ended}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
