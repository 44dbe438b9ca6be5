"""sd_notify without a library: readiness, status, watchdog and stopping for systemd.

The protocol (``sd_notify(3)``, "Notes"): one datagram of newline-separated ``KEY=VALUE``
lines to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``; a name starting with ``@`` is
in the abstract namespace (the ``@`` stands for a NUL byte). ``$WATCHDOG_USEC`` is the
watchdog period the service manager expects ``WATCHDOG=1`` within (send it at half of it);
``$WATCHDOG_PID``, when set, names the one process that is meant to send it.
https://www.freedesktop.org/software/systemd/man/latest/sd_notify.html

Rules kept here:

* Without ``$NOTIFY_SOCKET`` nothing happens and nothing is an error: the daemon run by
  hand, in a test or under another supervisor behaves the same.
* Sending never blocks and never raises: the socket is non-blocking, and a full or gone
  socket (the manager restarting, a socket path that vanished) is one logged warning per
  kind of failure, not a crash of the monitor. A notify socket is a convenience for the
  service manager; the record does not depend on it.
* A value never carries a newline (it would inject another ``KEY=``): it is replaced.
* Only ``unix`` sockets: a ``vsock:`` address (systemd 253+, for virtual machines) is
  refused with one warning and notification stays off.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

__all__ = ["Notifier"]

log = structlog.get_logger("iortd")

# A status line is for people (``systemctl status``): keep it short.
STATUS_MAX = 200


class Notifier:
    """Where sd_notify messages go; a no-op when the environment names no socket."""

    def __init__(self, address: str | bytes | None, watchdog_s: float | None) -> None:
        self.address = address
        self.watchdog_s = watchdog_s  # the period systemd expects a ping within, if any
        self._sock: socket.socket | None = None
        self._warned: set[str] = set()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """From ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``."""
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address: str | bytes | None = None
        if raw.startswith("@"):
            address = b"\0" + raw[1:].encode()
        elif raw.startswith("/"):
            address = raw
        elif raw:
            log.warning("sd_notify_unsupported", notify_socket=raw[:100], why="only unix sockets")
        return cls(address, _watchdog_s(env) if address is not None else None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str) -> bool:
        """Send one message (``send(READY="1", STATUS="...")``); True when it was sent."""
        if self.address is None:
            return False
        body = "\n".join(f"{k}={_one_line(v)}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(body, self.address)
        except OSError as exc:
            kind = type(exc).__name__
            if kind not in self._warned:  # once per kind: a ping every few seconds
                self._warned.add(kind)
                log.warning("sd_notify_failed", error=str(exc), what=",".join(fields))
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY="1", STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG="1")

    def stopping(self, status: str) -> bool:
        return self.send(STOPPING="1", STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")[:STATUS_MAX]


def _watchdog_s(env: Mapping[str, str]) -> float | None:
    """The watchdog period in seconds, if it is meant for this process."""
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (a parent that forked us)
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None
