"""sd_notify over a real AF_UNIX datagram socket bound by the test (path and abstract), and
nothing at all without ``$NOTIFY_SOCKET``."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from iortd.kernel.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()


def fields(raw: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in raw.decode().split("\n"))


def test_messages_reach_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    try:
        assert n.enabled
        assert n.watchdog_s == 4.0
        assert n.ready("IDLE, no delivery")
        assert fields(sock.recv(4096)) == {"READY": "1", "STATUS": "IDLE, no delivery"}
        assert n.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert n.stopping("stopping")
        assert fields(sock.recv(4096)) == {"STOPPING": "1", "STATUS": "stopping"}
    finally:
        n.close()


def test_an_abstract_socket_is_named_with_an_at_sign() -> None:
    name = f"iortd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
    try:
        assert n.status("READY, delivery or-7-x")
        assert sock.recv(4096) == b"STATUS=READY, delivery or-7-x"
        assert n.watchdog_s is None  # no WATCHDOG_USEC: no watchdog
    finally:
        n.close()
        sock.close()


def test_without_a_socket_nothing_is_sent_and_nothing_fails() -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    assert not n.ready("x")
    assert not n.watchdog()
    assert n.watchdog_s is None
    n.close()


def test_a_status_cannot_inject_another_field(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    try:
        n.status("line one\nREADY=1")
        assert fields(sock.recv(4096)) == {"STATUS": "line one READY=1"}
    finally:
        n.close()


def test_a_watchdog_meant_for_another_process_is_not_ours(tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "s"), "WATCHDOG_USEC": "2000000"}
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_s == 2.0
    assert Notifier.from_env({**env, "WATCHDOG_PID": "1"}).watchdog_s is None
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "0"}).watchdog_s is None
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "soon"}).watchdog_s is None


def test_a_socket_that_is_gone_is_a_false_return_never_an_error(tmp_path: Path) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    try:
        assert n.enabled
        assert not n.watchdog()
        assert not n.watchdog()  # again: still no exception
    finally:
        n.close()


def test_a_vsock_address_is_refused_and_notification_stays_off() -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234", "WATCHDOG_USEC": "1000000"})
    assert not n.enabled
    assert n.watchdog_s is None
    assert not n.ready("x")
