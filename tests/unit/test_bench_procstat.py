"""The room-cost benchmark's /proc readings (benchmarks/procstat.py) and its process
bookkeeping (benchmarks/room_cost.py): figures from the right fields, and no process of
its own left behind when a phase fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import procstat  # noqa: E402 - from the benchmarks folder, put on the path above
import room_cost  # noqa: E402

# A /proc/PID/stat line whose command name holds spaces and parentheses (a process may
# name itself so): utime 250 and stime 50 ticks are fields 14 and 15.
STAT = b"4242 (a) b (c) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 3 0 77 1\n"


def test_cpu_seconds_counts_fields_after_the_last_parenthesis(tmp_path: Path) -> None:
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "stat").write_bytes(STAT)
    assert procstat.cpu_seconds(4242, tmp_path) == pytest.approx(300 * procstat.TICK_S)


def test_memory_reads_rss_and_peak(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "status").write_text("Name:\tx\nVmHWM:\t  20480 kB\nVmRSS:\t  10240 kB\n")
    assert procstat.memory_kib(7, tmp_path) == (10240, 20480)
    use = procstat.usage(1.0, 1.5, 10.0, 10240, 20480)
    assert (use.cpu_s_per_s, use.rss_end_mib, use.rss_peak_mib) == (0.05, 10.0, 20.0)


def test_measure_sees_a_busy_process_and_an_idle_one() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.buffer.read()"], stdin=subprocess.PIPE
    )
    try:
        use = procstat.measure({"busy": busy.pid, "idle": idle.pid}, 0.5, sample_s=0.1)
    finally:
        for p in (busy, idle):
            p.kill()
            p.wait()
        assert idle.stdin is not None
        idle.stdin.close()
    # The spinning process gets what the machine leaves it (a tenth of a core or less when
    # other suites share the two cores): judged against the idle one, not against a core.
    assert use["busy"].cpu_s_per_s > 0.02
    assert use["idle"].cpu_s_per_s < use["busy"].cpu_s_per_s / 5
    assert 1 < use["idle"].rss_end_mib <= use["idle"].rss_peak_mib < 100


def test_a_failed_phase_stops_every_child_it_started(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import sys; sys.stdin.buffer.read()"]
    started: list[room_cost.Child] = []

    def phase() -> None:
        with room_cost.children() as kids:
            for name in ("first", "second"):
                kids.append(room_cost.Child.start(name, cmd, tmp_path, stdin=subprocess.PIPE))
            started.extend(kids)
            raise room_cost.Failed("a phase failed")

    with pytest.raises(room_cost.Failed):
        phase()
    assert [c.proc.returncode for c in started] == [-15, -15]  # SIGTERM, by their Popen
    assert all(c.tether is not None and not c.tether.active for c in started)


def test_measure_reads_the_main_thread_apart_from_the_process() -> None:
    # The main thread blocks on a pipe while a second thread spins: the process is busy,
    # its main (event loop) thread is not.
    code = (
        "import sys, threading\n"
        "threading.Thread(target=lambda: [0 for _ in iter(int, 1)], daemon=True).start()\n"
        "sys.stdin.buffer.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        task = Path(f"/proc/{proc.pid}/task")
        use = procstat.measure(
            {"all": proc.pid, "main": proc.pid}, 0.5, sample_s=0.1, roots={"main": task}
        )
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdin is not None
        proc.stdin.close()
    assert use["all"].cpu_s_per_s > 0.02  # what a loaded machine leaves the spinner
    assert use["main"].cpu_s_per_s < use["all"].cpu_s_per_s / 5
    assert use["main"].rss_end_mib == pytest.approx(use["all"].rss_end_mib, rel=0.2)
