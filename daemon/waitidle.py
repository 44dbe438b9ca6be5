"""``iortd wait-idle``: wait until the running daemon is not following a delivery.

Made for whoever restarts the service: the Debian package's maintainer scripts before an
upgrade restart (packaging/debian/), an admin before ``systemctl restart iortd``. It asks
the daemon's health endpoint (``GET /status``, default ``http://127.0.0.1:9108/status``)
and reads ``delivery_active`` (true from plan selection to termination).

Exit status, and why each is what it is:

- **0, idle**: the reply says ``delivery_active: false``; or the connection is refused,
  which on a loopback port means no daemon is listening (not running), so there is nothing
  a restart could interrupt. With ``--expect-running`` (the caller has just seen the
  service active, as the maintainer scripts have) a refused connection is **1** instead:
  a running daemon whose endpoint is off or elsewhere cannot say it is idle.
- **1, not idle, or cannot tell**: still delivering when ``--timeout`` runs out; a reply that
  is not the contract (not HTTP 200, not a JSON object, no boolean ``delivery_active``,
  larger than :data:`MAX_REPLY_BYTES`); or no answer at all until the timeout (a daemon that
  accepts but does not answer may well be mid-delivery). Fail safe: a restart is never
  advised on a reply that cannot be read.
- **2, usage**: a URL that is not ``http://HOST[:PORT][/PATH]``, a negative or non-finite
  timeout or interval.

Every request is bounded (:data:`REQUEST_TIMEOUT_S`; the last one ends at most
:data:`MIN_REQUEST_TIMEOUT_S` past the deadline); polls are spaced by ``--interval``. No
proxy is ever used (``http_proxy`` in a root shell must not send a loopback question
elsewhere) and redirects are not followed: plain :mod:`http.client`. While it waits it
prints why (the delivery, its phase, the time left) when that changes and every
:data:`REPEAT_EVERY_S`.
"""

from __future__ import annotations

import http.client
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_URL",
    "EXIT_BUSY",
    "EXIT_IDLE",
    "EXIT_USAGE",
    "Endpoint",
    "UsageError",
    "parse_url",
    "wait_idle",
]

DEFAULT_URL = "http://127.0.0.1:9108/status"
EXIT_IDLE = 0
EXIT_BUSY = 1
EXIT_USAGE = 2
REQUEST_TIMEOUT_S = 5.0
# Even a last check just before the deadline gets this long: a loaded host must not turn
# a healthy daemon into "no answer".
MIN_REQUEST_TIMEOUT_S = 1.0
MAX_REPLY_BYTES = 64 * 1024
REPEAT_EVERY_S = 30.0


class UsageError(ValueError):
    """A bad argument; the message says which and what is expected."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    path: str

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.path}"


def parse_url(url: str) -> Endpoint:
    """``http://HOST[:PORT][/PATH]`` (path default ``/status``); UsageError otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"--url {url!r}: {exc}") from None
    if parts.scheme != "http" or not parts.hostname:
        raise UsageError(f"--url {url!r}: expected http://HOST[:PORT][/PATH], e.g. {DEFAULT_URL}")
    if parts.username or parts.password:
        raise UsageError(f"--url: no credentials in the URL (the endpoint needs none): {url!r}")
    if parts.query or parts.fragment:
        raise UsageError(f"--url {url!r}: no query or fragment; the endpoint is a plain path")
    return Endpoint(parts.hostname, port or 80, parts.path or "/status")


class _Refused(Exception):
    pass


class _NoAnswer(Exception):
    pass


class _Malformed(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Status:
    delivery_active: bool
    delivery_id: str | None
    phase: str | None


def _fetch(endpoint: Endpoint, timeout_s: float) -> _Status:
    conn = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=timeout_s)
    try:
        conn.request("GET", endpoint.path, headers={"Accept": "application/json"})
        reply = conn.getresponse()
        body = reply.read(MAX_REPLY_BYTES + 1)
    except ConnectionRefusedError:
        raise _Refused from None
    except TimeoutError:
        raise _NoAnswer(f"no answer within {timeout_s:.1f} s") from None
    except http.client.HTTPException as exc:
        raise _Malformed(f"not an HTTP reply ({type(exc).__name__}: {exc})") from None
    except OSError as exc:
        raise _NoAnswer(exc.strerror or type(exc).__name__) from None
    finally:
        conn.close()
    if reply.status != 200:
        raise _Malformed(f"HTTP {reply.status} {reply.reason}")
    if len(body) > MAX_REPLY_BYTES:
        raise _Malformed(f"reply larger than {MAX_REPLY_BYTES} bytes")
    return _parse(body)


def _parse(body: bytes) -> _Status:
    try:
        data: Any = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Malformed(f"reply is not JSON ({exc})") from None
    except RecursionError:
        raise _Malformed("reply is JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise _Malformed(f"reply is JSON but not an object (a {type(data).__name__})")
    active = data.get("delivery_active")
    if not isinstance(active, bool):
        raise _Malformed(f"reply has no boolean delivery_active (got {active!r:.40})")
    delivery_id = data.get("delivery_id")
    phase = data.get("phase")
    return _Status(
        delivery_active=active,
        delivery_id=delivery_id if isinstance(delivery_id, str) else None,
        phase=phase if isinstance(phase, str) else None,
    )


def _describe(status: _Status) -> str:
    what = f"delivery {status.delivery_id}" if status.delivery_id else "a delivery"
    return f"{what} in progress" + (f" (phase {status.phase})" if status.phase else "")


def wait_idle(
    endpoint: Endpoint,
    timeout_s: float,
    *,
    interval_s: float = 2.0,
    expect_running: bool = False,
    out: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Poll until idle (0) or the timeout (1); 1 at once on a malformed reply, and on a
    refused connection when ``expect_running`` (the caller knows the daemon runs)."""
    if not (math.isfinite(timeout_s) and timeout_s >= 0):
        raise UsageError(f"--timeout must be a number of seconds >= 0; got {timeout_s}")
    if not (math.isfinite(interval_s) and interval_s > 0):
        raise UsageError(f"--interval must be a number of seconds > 0; got {interval_s}")
    out = out or sys.stdout
    deadline = clock() + timeout_s
    said, said_at = "", -math.inf
    while True:
        left = deadline - clock()
        try:
            status = _fetch(endpoint, max(MIN_REQUEST_TIMEOUT_S, min(REQUEST_TIMEOUT_S, left)))
        except _Refused:
            if expect_running:
                print(
                    f"cannot tell whether a delivery is in progress: nothing listens at "
                    f"{endpoint.url}, yet the daemon is running (is [health] listen off, or "
                    "another address?); not idle",
                    file=out,
                )
                return EXIT_BUSY
            print(f"idle: no daemon is listening at {endpoint.url} (not running)", file=out)
            return EXIT_IDLE
        except _Malformed as exc:
            print(
                f"cannot tell whether a delivery is in progress: {endpoint.url}: {exc}; "
                "not idle (restart it only when you know no delivery is running)",
                file=out,
            )
            return EXIT_BUSY
        except _NoAnswer as exc:
            why = f"no usable answer from {endpoint.url} ({exc})"
        else:
            if not status.delivery_active:
                print(f"idle: no delivery in progress ({endpoint.url})", file=out)
                return EXIT_IDLE
            why = _describe(status)
        left = deadline - clock()
        if left <= 0:
            print(f"not idle after {timeout_s:g} s: {why}", file=out)
            return EXIT_BUSY
        if why != said or clock() - said_at >= REPEAT_EVERY_S:
            print(f"waiting: {why}; up to {left:.0f} s more", file=out, flush=True)
            said, said_at = why, clock()
        sleep(min(interval_s, left))
