"""`iort-dashboard` as a user runs it, without a browser: its usage errors, what it
serves (nothing that names another host), a clean bounded stop with a browser stream
open, and its place in `iortd demo`."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tty
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from dashproc import Dashboard

from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
DASH = str(BIN / "iort-dashboard")
STATIC = Path(__file__).resolve().parents[2] / "dashboard" / "static"
# A URL with a scheme, or a protocol-relative one ("//host/...") in a string or url().
URL_RE = re.compile(r"https?://|[\"'(]\s*//", re.IGNORECASE)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DASH, *args], capture_output=True, text=True, timeout=30, check=False, env=env
    )


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(BrokerOptions(), tmp_path / "broker") as b:
        yield b


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--broker", "http://127.0.0.1:1883"), "--broker: expected mqtt://HOST[:PORT]"),
        (("--broker", "mqtt://"), "--broker: expected"),
        (("--broker", "mqtt://h", "--stale-after", "0"), "--stale-after: must be > 0"),
        (("--broker", "mqtt://h", "--ca-file", "/etc/hostname"), "--ca-file: only with TLS"),
        (("--broker", "mqtt://h", "--password-env", "IORT_NOPE_UNSET"), "IORT_NOPE_UNSET"),
        (("--broker", "mqtt://h", "--host", "localhost"), "--host: expected an IP address"),
        (("--broker", "mqtt://h", "--allowed-host", "http://x"), "--allowed-host: 'http://x'"),
        (("--broker", "mqtt://h", "--allowed-host", "a*.b"), "--allowed-host: 'a*.b'"),
        (("--broker", "mqtt://h", "--max-payload-kib", "0"), "--max-payload-kib: must be"),
        (("--broker", "mqtt://h", "--max-state-mib", "1"), "--max-state-mib: too small"),
        (("--broker", "mqtt://h", "--age-out", "0"), "--age-out: must be > 0"),
    ],
)
def test_usage_errors_exit_2_and_name_the_option(args: tuple[str, ...], message: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "IORT_NOPE_UNSET"}
    p = run(*args, env=env)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr
    assert p.stdout == "", "nothing is served"


def test_a_password_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    pw.chmod(0o644)
    p = run("--broker", "mqtt://127.0.0.1", "--username", "u", "--password-file", str(pw))
    assert p.returncode == 2
    assert "readable by others" in p.stderr
    assert "secret" not in p.stderr + p.stdout


def test_a_port_in_use_is_a_usage_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        p = run("--broker", "mqtt://127.0.0.1", "--port", str(port))
    assert p.returncode == 2
    assert f"127.0.0.1:{port} is already in use" in p.stderr


def _get(url: str) -> tuple[int, dict[str, str], str]:
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - our own http:// server
        return r.status, dict(r.headers), r.read().decode("utf-8")


def test_the_shipped_page_names_no_other_host() -> None:
    """Scripts, styles and the page itself: no http(s):// at all (fonts are local files).
    The only SVG file (the icon) may hold its XML namespace, which is a name, not a host
    to fetch from."""
    texts = [p for p in STATIC.rglob("*") if p.suffix in {".html", ".css", ".js"}]
    assert {p.name for p in texts} >= {"index.html", "style.css", "app.js"}
    for p in texts:
        assert not URL_RE.search(p.read_text("utf-8")), f"{p.name} names a host"
    for p in STATIC.rglob("*.svg"):
        rest = p.read_text("utf-8").replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert not URL_RE.search(rest), f"{p.name} names a host"
    assert (STATIC / "fonts" / "OFL.txt").is_file(), "the font's licence ships with it"


async def test_what_is_served_is_local_and_a_stop_with_a_stream_open_is_clean(
    tmp_path: Path, broker: Mosquitto
) -> None:
    dash = await Dashboard.start(broker.url, tmp_path / "dash.log")
    try:
        for path in ("", "room/a/b", "static/app.js", "static/style.css"):
            status, headers, body = await asyncio.to_thread(_get, dash.url + path)
            assert status == 200
            assert "default-src 'none'" in headers["content-security-policy"]
            assert not URL_RE.search(body), f"/{path} names a host"
        status, _, body = await asyncio.to_thread(_get, dash.url + "api/snapshot")
        assert status == 200
        assert '"rooms":{}' in body
        # DNS rebinding: a page of another origin whose name now points here sends its
        # own name as Host; the real process refuses it (400) and serves no snapshot.
        for path in ("api/snapshot", "events", ""):
            reader, writer = await asyncio.open_connection("127.0.0.1", dash.port)
            writer.write(f"GET /{path} HTTP/1.1\r\nHost: evil.example:{dash.port}\r\n\r\n".encode())
            await writer.drain()
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 400 "), head
                assert b"default-src 'none'" in head
            writer.close()
        # A browser's event stream is open when the stop is asked for: it is ended, and
        # the process exits 0 within the bound.
        reader, writer = await asyncio.open_connection("127.0.0.1", dash.port)
        writer.write(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{dash.port}\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(5):
            while b"event: snapshot" not in await reader.readline():
                pass
        dash.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(6):
            await reader.read()  # EOF: the server ended the stream
            assert await dash.proc.wait() == 0
        writer.close()
    finally:
        await dash.kill()
    events = [r["event"] for r in dash.log_records()]
    assert "mqtt_connected" in events
    assert events[-1] == "dashboard_stopped"


async def stop_demo(demo: asyncio.subprocess.Process) -> None:
    """After a failure: SIGTERM first, so that the demo stops its broker and dashboard by
    PID as it would; SIGKILL only if it does not end within its bound."""
    if demo.returncode is None:
        demo.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(demo.wait(), 15)
        except TimeoutError:
            demo.kill()
            await demo.wait()


async def test_the_demo_serves_the_dashboard_and_stops_it(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data-home")}
    demo = await asyncio.create_subprocess_exec(
        str(BIN / "iortd"),
        *("demo", "--speed", "300", "--log-dir", str(tmp_path / "log")),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert demo.stdout is not None
        seen: list[str] = []
        async with asyncio.timeout(20):
            while m := (await demo.stdout.readline()).decode():
                seen.append(m)
                if found := re.search(r"live dashboard: (http://\S+) \(pid (\d+)\)", m):
                    break
        assert found, f"no dashboard URL printed: {seen}"
        url, pid = found[1], int(found[2])
        status, _, body = await asyncio.to_thread(_get, url)
        assert status == 200
        assert "IORT delivery dashboard" in body
        _, err = await asyncio.wait_for(demo.communicate(), 60)
        assert demo.returncode == 0, err.decode()
    finally:
        await stop_demo(demo)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped by PID with the demo


async def test_at_a_terminal_the_demo_keeps_the_dashboard_up_until_enter(
    tmp_path: Path,
) -> None:
    """Run from a terminal (a real pty here), the demo leaves the dashboard up after the
    delivery so that the user can look at it; Enter (or Ctrl-C) then stops it by PID."""
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data-home")}
    master, slave = os.openpty()
    tty.setraw(slave)
    demo = await asyncio.create_subprocess_exec(
        str(BIN / "iortd"),
        *("demo", "--speed", "600", "--log-dir", str(tmp_path / "log")),
        stdin=slave,
        stdout=slave,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
    )
    os.close(slave)
    loop = asyncio.get_running_loop()
    text = ""
    try:
        async with asyncio.timeout(60):
            while "Press Enter" not in text:
                try:
                    chunk = await loop.run_in_executor(None, os.read, master, 4096)
                except OSError:  # EIO: the demo closed the terminal (it exited)
                    break
                text += chunk.decode(errors="replace")
        assert "Press Enter" in text, f"the demo did not wait at the terminal: {text[-400:]}"
        found = re.search(r"live dashboard: (http://\S+) \(pid (\d+)\)", text)
        assert found, text[-400:]
        url, pid = found[1], int(found[2])
        assert demo.returncode is None, "still running after the delivery"
        status, _, _ = await asyncio.to_thread(_get, url)
        assert status == 200, "the dashboard is still served"
        os.write(master, b"\n")  # Enter (the pty is raw, so a newline itself)
        assert await asyncio.wait_for(demo.wait(), 20) == 0
    finally:
        await stop_demo(demo)
        os.close(master)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped by PID with the demo
