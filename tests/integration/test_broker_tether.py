"""A tethered private Mosquitto (what `iortd demo` starts): it keeps its own PID and exit
code, survives the thread that started it, and dies with the process that started it,
also on SIGKILL."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto, find_mosquitto
from iortd.kernel.reaper import tether_unavailable
from iortd.kernel.scratch import process_start

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_mosquitto() is None, reason="needs mosquitto"),
    pytest.mark.skipif(tether_unavailable() is not None, reason=f"{tether_unavailable()}"),
]

GONE_BOUND_S = 10.0
PARENT = """
import sys
from pathlib import Path
from iortd.daemon.mqtt.broker import BrokerOptions, Mosquitto
b = Mosquitto.start_sync(BrokerOptions(), Path(sys.argv[1]), tethered=True)
print(b.pid, flush=True)
sys.stdin.read()
"""


def _accepts(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        return True


def test_a_tethered_broker_is_mosquitto_itself_and_outlives_its_starting_thread(
    tmp_path: Path,
) -> None:
    started: list[Mosquitto] = []
    thread = threading.Thread(
        target=lambda: started.append(
            Mosquitto.start_sync(BrokerOptions(), tmp_path / "b", tethered=True)
        )
    )
    thread.start()
    thread.join(30)
    [broker] = started
    try:
        # A parent-death signal would have fired when that thread ended; the tether did not.
        assert broker.running
        assert _accepts(broker.port)
        assert broker.tethered
        assert Path(f"/proc/{broker.pid}/exe").resolve().name == "mosquitto"
        old = broker.pid
        broker.restart_sync()
        assert broker.pid != old
        assert broker.tethered
        assert process_start(old) is None
    finally:
        code = broker.stop_sync()
    assert code == 0, "SIGTERM reaches Mosquitto itself, which exits cleanly"
    assert not broker.tethered


def test_sigkill_of_its_parent_stops_the_tethered_broker(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "b")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        start = process_start(pid)
        assert start is not None
        parent.kill()
    finally:
        parent.kill()
        parent.communicate(timeout=5)
    t0 = time.monotonic()
    while process_start(pid) == start:
        assert time.monotonic() - t0 < GONE_BOUND_S, f"mosquitto (pid {pid}) outlived its parent"
        time.sleep(0.01)
    log = (tmp_path / "b" / "mosquitto.log").read_text()
    assert "the parent of mosquitto" in log, "the watcher says what it did, in the broker's log"
