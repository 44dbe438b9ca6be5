"""A tethered private Mosquitto (what `iortd demo` starts): it keeps its own PID and exit
code, survives the thread that started it, and dies with the process that started it,
also on SIGKILL."""

from __future__ import annotations

import os
import pwd
import signal
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
    assert f"iortd reaper: stopped mosquitto (pid {pid}) with SIGTERM: its parent is gone" in log, (
        "the watcher says what it did, in the broker's log"
    )


# A parent that runs Mosquitto, tethered, with a config of its own (argv[1]).
PARENT_OWN_CONF = """
import subprocess, sys
from iortd.daemon.mqtt.broker import find_mosquitto
from iortd.kernel.reaper import Tether
t = Tether("mosquitto")
argv = [str(find_mosquitto()), "-c", sys.argv[1]]
p = subprocess.Popen(
    t.argv(argv), pass_fds=t.pass_fds,
    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
)
t.started()
print(p.pid, flush=True)
sys.stdin.read()
"""


def _mosquitto_uid() -> int | None:
    try:
        return pwd.getpwnam("mosquitto").pw_uid
    except KeyError:
        return None


@pytest.mark.skipif(os.geteuid() != 0, reason="only root's Mosquitto changes user")
@pytest.mark.skipif(_mosquitto_uid() is None, reason="needs the user mosquitto")
def test_a_broker_that_dropped_its_privileges_still_dies_with_its_parent(
    tmp_path: Path,
) -> None:
    """Root's Mosquitto switches to the user ``mosquitto`` (``user`` unset means that),
    which clears a parent-death signal; the tether does not rely on one."""
    port = _free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nlog_dest stderr\n"
        "log_type error\nlog_type warning\npersistence false\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT_OWN_CONF, str(conf)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        start = process_start(pid)
        assert start is not None
        t0 = time.monotonic()
        while not _listening(port):
            assert time.monotonic() - t0 < GONE_BOUND_S, "mosquitto did not start listening"
            time.sleep(0.01)
        assert os.stat(f"/proc/{pid}").st_uid == _mosquitto_uid(), "it changed user"
        parent.kill()
    finally:
        parent.kill()
        parent.communicate(timeout=5)
    t0 = time.monotonic()
    while process_start(pid) == start:
        assert time.monotonic() - t0 < GONE_BOUND_S, f"mosquitto (pid {pid}) outlived its parent"
        time.sleep(0.01)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


# The same parent with a parent-death signal instead of the tether: what the tether is for.
PARENT_PDEATHSIG = """
import ctypes, signal, subprocess, sys
from iortd.daemon.mqtt.broker import find_mosquitto
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
def pdeathsig():
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
p = subprocess.Popen(  # preexec_fn is safe here: this process has one thread
    [str(find_mosquitto()), "-c", sys.argv[1]], preexec_fn=pdeathsig,
    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
)
print(p.pid, flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="only root's Mosquitto changes user")
@pytest.mark.skipif(_mosquitto_uid() is None, reason="needs the user mosquitto")
def test_a_parent_death_signal_alone_is_lost_when_mosquitto_changes_user(
    tmp_path: Path,
) -> None:
    """The premise, checked on this kernel (prctl(2): the setting is cleared when the
    effective user changes): a SIGKILLed parent leaves such a broker running."""
    port = _free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nlog_dest stderr\n")
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT_PDEATHSIG, str(conf)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    pid = start = None
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        start = process_start(pid)
        t0 = time.monotonic()
        while not _listening(port):
            assert time.monotonic() - t0 < GONE_BOUND_S, "mosquitto did not start listening"
            time.sleep(0.01)
        parent.kill()
        parent.communicate(timeout=5)
        # Its parent is gone (the kernel has run the parent's exit by the time wait
        # returns); a surviving broker still answers.
        assert _listening(port)
        assert process_start(pid) == start, "the parent-death signal was not lost after all"
    finally:
        if pid is not None and start is not None and process_start(pid) == start:
            os.kill(pid, signal.SIGKILL)  # first: it may hold the parent's pipes
        parent.kill()
        parent.communicate(timeout=5)
