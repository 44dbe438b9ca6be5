"""kernel/reaper.py: a tethered child dies with its parent, also on SIGKILL, also when the
child changed its user (which clears a parent-death signal), and never because of a PID
that was merely reused.

The watcher's loop (:func:`watch`) is tested in this process against real children; the
shim end to end with a real parent process that the test SIGKILLs.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from iortd.kernel import reaper
from iortd.kernel.reaper import Tether, tether_unavailable, watch
from iortd.kernel.scratch import process_start

pytestmark = pytest.mark.skipif(
    tether_unavailable() is not None, reason=f"no tethering here: {tether_unavailable()}"
)

GONE_BOUND_S = 10.0
# A parent that tethers its command, says the command's PID and then waits to be killed.
PARENT = """
import subprocess, sys
from iortd.kernel.reaper import Tether
t = Tether("probe", grace_s=float(sys.argv[1]))
p = subprocess.Popen(t.argv(sys.argv[2:]), pass_fds=t.pass_fds)
t.started()
print(p.pid, flush=True)
sys.stdin.read()
"""


def _gone(pid: int, start: int) -> bool:
    return process_start(pid) != start


def _wait_gone(pid: int, start: int, what: str) -> float:
    t0 = time.monotonic()
    while not _gone(pid, start):
        assert time.monotonic() - t0 < GONE_BOUND_S, f"{what} (pid {pid}) still running"
        time.sleep(0.01)
    return time.monotonic() - t0


def _wait_exec(pid: int, program: bytes) -> None:
    """Until the shim has handed its PID over to the command (its watcher is up by then)."""
    t0 = time.monotonic()
    while Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] != program:
        assert time.monotonic() - t0 < GONE_BOUND_S, f"the shim (pid {pid}) did not exec"
        time.sleep(0.01)


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=5)  # reaps it and closes its pipes


def _spawn(procs: list[subprocess.Popen[bytes]], *argv: str) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    procs.append(p)
    return p


def test_the_watcher_returns_when_the_child_ends_first(
    children: list[subprocess.Popen[bytes]],
) -> None:
    child = _spawn(children, "true")
    pidfd = os.pidfd_open(child.pid)
    r, w = os.pipe()
    try:
        assert watch(pidfd, r, grace_s=1, name="probe", pid=child.pid) == "exited"
        assert child.wait(5) == 0
    finally:
        for fd in (pidfd, r, w):
            os.close(fd)


def test_a_closed_lifeline_stops_the_child_with_sigterm(
    children: list[subprocess.Popen[bytes]], capfd: pytest.CaptureFixture[str]
) -> None:
    child = _spawn(children, "sleep", "60")
    pidfd = os.pidfd_open(child.pid)
    r, w = os.pipe()
    os.close(w)  # what the kernel does when the parent dies
    try:
        assert watch(pidfd, r, grace_s=5, name="probe", pid=child.pid) == "SIGTERM"
    finally:
        os.close(pidfd)
        os.close(r)
    assert child.wait(5) == -signal.SIGTERM
    assert f"stopped probe (pid {child.pid}) with SIGTERM: its parent is gone" in (
        capfd.readouterr().err
    )


def test_a_child_that_ignores_sigterm_gets_sigkill_after_the_grace(
    children: list[subprocess.Popen[bytes]],
) -> None:
    code = (
        "import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print(1, flush=True); sys.stdin.read()"
    )
    child = _spawn(children, sys.executable, "-c", code)
    assert child.stdout is not None
    assert child.stdout.readline() == b"1\n"  # SIGTERM is ignored from here on
    pidfd = os.pidfd_open(child.pid)
    r, w = os.pipe()
    os.close(w)
    t0 = time.monotonic()
    try:
        assert watch(pidfd, r, grace_s=0.2, name="probe", pid=child.pid) == "SIGKILL"
    finally:
        os.close(pidfd)
        os.close(r)
    assert 0.2 <= time.monotonic() - t0 < 5
    assert child.wait(5) == -signal.SIGKILL


def test_a_stopped_child_is_continued_so_that_sigterm_reaches_it(
    children: list[subprocess.Popen[bytes]],
) -> None:
    child = _spawn(children, "sleep", "60")
    os.kill(child.pid, signal.SIGSTOP)
    pidfd = os.pidfd_open(child.pid)
    r, w = os.pipe()
    os.close(w)
    try:
        assert watch(pidfd, r, grace_s=5, name="probe", pid=child.pid) == "SIGTERM"
    finally:
        os.close(pidfd)
        os.close(r)
    assert child.wait(5) == -signal.SIGTERM


def _tethered_by_a_parent(
    procs: list[subprocess.Popen[bytes]], grace_s: float, *command: str
) -> tuple[subprocess.Popen[bytes], int, int]:
    parent = _spawn(procs, sys.executable, "-c", PARENT, str(grace_s), *command)
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    start = process_start(pid)
    assert start is not None, "the tethered command is running"
    return parent, pid, start


def test_sigkill_of_the_parent_stops_the_tethered_child(
    children: list[subprocess.Popen[bytes]],
) -> None:
    parent, pid, start = _tethered_by_a_parent(children, 2, "sleep", "60")
    _wait_exec(pid, b"sleep")  # the command keeps the shim's PID: Popen.pid is its own
    parent.kill()
    parent.wait(5)
    took = _wait_gone(pid, start, "the tethered sleep")
    assert took < GONE_BOUND_S


def test_a_parent_that_dies_before_the_command_starts_leaves_nothing(
    children: list[subprocess.Popen[bytes]],
) -> None:
    """No window: killed as soon as Popen returned (the shim may not have exec'd yet)."""
    parent, pid, start = _tethered_by_a_parent(children, 2, "sleep", "60")
    parent.kill()
    parent.wait(5)
    _wait_gone(pid, start, "the shim or its command")


@pytest.mark.skipif(os.geteuid() != 0, reason="changing user needs root")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_a_child_that_changed_its_user_still_dies_with_its_parent(
    children: list[subprocess.Popen[bytes]],
) -> None:
    """What Mosquitto does when started as root (setuid to its own user), and what clears
    a parent-death signal (prctl(2)): the tether does not depend on it."""
    nobody = "65534"
    parent, pid, start = _tethered_by_a_parent(
        children,
        2,
        "setpriv",
        f"--reuid={nobody}",
        f"--regid={nobody}",
        "--clear-groups",
        "sleep",
        "60",
    )
    t0 = time.monotonic()
    while os.stat(f"/proc/{pid}").st_uid != int(nobody):
        assert time.monotonic() - t0 < GONE_BOUND_S, "setpriv did not change user"
        time.sleep(0.01)
    parent.kill()
    parent.wait(5)
    _wait_gone(pid, start, "the child running as nobody")


def test_closing_the_tether_stops_a_child_still_running(
    children: list[subprocess.Popen[bytes]],
) -> None:
    tether = Tether("probe", grace_s=2)
    child = subprocess.Popen(tether.argv(["sleep", "60"]), pass_fds=tether.pass_fds)
    children.append(child)
    tether.started()
    start = process_start(child.pid)
    assert start is not None
    _wait_exec(child.pid, b"sleep")
    tether.close()
    tether.close()  # idempotent
    assert child.wait(GONE_BOUND_S) == -signal.SIGTERM


def _ignored_signals(pid: int) -> set[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask & (1 << (n - 1))}
    raise AssertionError("no SigIgn in /proc/PID/status")


@pytest.mark.parametrize(
    "sigint", [signal.default_int_handler, signal.SIG_IGN], ids=["sigint-handled", "sigint-ignored"]
)
def test_the_command_gets_the_signal_dispositions_popen_would_give_it(
    children: list[subprocess.Popen[bytes]], sigint: signal.Handlers | Callable[..., object]
) -> None:
    """Python ignores SIGPIPE and SIGXFSZ and an exec keeps what is ignored; Popen
    restores them for its child, and so must the shim (a broker that ignores SIGPIPE is
    not the broker the user runs). A SIGINT its parent ignores (a job a shell started in
    the background, a pytest-xdist worker) stays ignored, as it would under Popen."""
    previous = signal.signal(signal.SIGINT, sigint)
    try:
        with Tether("probe") as tether:
            child = subprocess.Popen(tether.argv(["sleep", "60"]), pass_fds=tether.pass_fds)
            children.append(child)
            tether.started()
            _wait_exec(child.pid, b"sleep")
            plain = _spawn(children, "sleep", "60")
            assert _ignored_signals(child.pid) == _ignored_signals(plain.pid)
            assert signal.SIGPIPE not in _ignored_signals(child.pid)
            assert (signal.SIGINT in _ignored_signals(child.pid)) == (sigint is signal.SIG_IGN)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigterm_to_the_watcher_stops_the_child_at_once(
    children: list[subprocess.Popen[bytes]],
) -> None:
    name = f"probe-{os.getpid()}-{time.monotonic_ns()}"  # finds this test's watcher in /proc
    with Tether(name) as tether:
        child = subprocess.Popen(
            tether.argv(["sleep", "60"]), pass_fds=tether.pass_fds, stderr=subprocess.PIPE
        )
        children.append(child)
        tether.started()
        _wait_exec(child.pid, b"sleep")
        [watcher] = [
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit()
            and int(p.name) != child.pid
            and f"--name\0{name}\0".encode() in _cmdline(p)
        ]
        assert os.getsid(watcher) != os.getsid(0), "the watcher has a session of its own"
        os.kill(watcher, signal.SIGTERM)
        assert child.wait(GONE_BOUND_S) == -signal.SIGTERM
        assert child.stderr is not None
        assert b"its watcher got SIGTERM" in child.stderr.read()


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_a_missing_command_exits_127_and_says_so(
    children: list[subprocess.Popen[bytes]],
) -> None:
    tether = Tether("probe")
    with tether:
        child = subprocess.Popen(
            tether.argv(["/nonexistent/iortd-no-such-command"]),
            pass_fds=tether.pass_fds,
            stderr=subprocess.PIPE,
        )
        children.append(child)
        tether.started()
        _, err = child.communicate(timeout=GONE_BOUND_S)
    assert child.returncode == 127
    assert b"cannot run /nonexistent/iortd-no-such-command" in err


def test_a_tether_name_is_one_word_and_the_grace_positive() -> None:
    with pytest.raises(ValueError, match="one word"):
        Tether("two words")
    with pytest.raises(ValueError, match="grace_s"):
        Tether("probe", grace_s=0)


def test_without_pidfd_the_command_runs_plainly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "pidfd_open")
    reason = tether_unavailable()
    assert reason is not None
    assert "pidfd_open" in reason
    tether = Tether("probe")
    assert not tether.active
    assert tether.argv(["sleep", "1"]) == ["sleep", "1"]
    assert tether.pass_fds == ()
    tether.close()


@pytest.mark.parametrize(
    "args",
    [
        ["--lifeline", "3", "--name", "x"],  # no -- and no command
        ["--lifeline", "3", "--name", "x", "--"],  # no command
        ["--lifeline", "three", "--name", "x", "--", "true"],
        ["--name", "x", "--", "true"],  # no lifeline
        ["--lifeline", "3", "--name", "x", "--colour", "red", "--", "true"],
    ],
)
def test_the_shim_refuses_bad_arguments_with_exit_2(args: list[str]) -> None:
    p = subprocess.run(
        [sys.executable, "-I", "-S", reaper.__file__, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert p.returncode == 2
    assert "usage: reaper.py --lifeline FD --name NAME" in p.stderr
