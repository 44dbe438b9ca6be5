"""CPU time and memory of a process, from Linux's /proc (proc(5)), for the benchmarks.

* CPU: ``utime`` + ``stime`` of ``/proc/PID/stat`` (fields 14 and 15, in clock ticks,
  ``SC_CLK_TCK``: usually 100 per second, so a 60 s window resolves 0.02 % of a core).
  The fields are counted after the last ``)``: the command name between the parentheses
  may itself hold spaces and parentheses.
* Memory: ``VmRSS`` (resident now) and ``VmHWM`` (the peak resident set) of
  ``/proc/PID/status``, in KiB. Writing ``5`` to ``/proc/PID/clear_refs`` resets the peak
  to the current RSS (Linux 4.0+; allowed for our own processes), so that a window's peak
  is the window's and not the start-up's.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Usage", "cpu_seconds", "measure", "memory_kib", "reset_peak", "usage"]

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, proc: Path = Path("/proc")) -> float:
    """User + system CPU seconds the process has used so far (threads included)."""
    raw = (proc / str(pid) / "stat").read_bytes()
    fields = raw[raw.rindex(b")") + 2 :].split()
    # After the name: field 3 (state) is fields[0], so utime (14) and stime (15) are 11, 12.
    return (int(fields[11]) + int(fields[12])) * TICK_S


def memory_kib(pid: int, proc: Path = Path("/proc")) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB; (0, 0) for a process without them (a zombie)."""
    rss = hwm = 0
    for line in (proc / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return rss, hwm


def reset_peak(pid: int, proc: Path = Path("/proc")) -> bool:
    """Reset VmHWM to the current RSS; False if this kernel or process does not allow it."""
    with contextlib.suppress(OSError):
        (proc / str(pid) / "clear_refs").write_text("5")
        return True
    return False


@dataclass(slots=True)
class Usage:
    """One process over one window: CPU seconds per second of wall time, RSS in MiB."""

    cpu_s_per_s: float
    rss_end_mib: float
    rss_peak_mib: float


def usage(cpu0: float, cpu1: float, wall_s: float, rss_kib: int, peak_kib: int) -> Usage:
    return Usage((cpu1 - cpu0) / wall_s, rss_kib / 1024, max(peak_kib, rss_kib) / 1024)


def _nothing() -> None:
    return None


def measure(
    pids: Mapping[str, int],
    seconds: float,
    check: Callable[[], None] = _nothing,
    *,
    sample_s: float = 0.25,
    roots: Mapping[str, Path] | None = None,
) -> dict[str, Usage]:
    """Each process's use over ``seconds`` of wall time: CPU from the difference of its
    counters at both ends; peak RSS the larger of VmHWM (reset at the start, where the
    kernel allows) and VmRSS sampled every ``sample_s``. ``check`` is called at every
    sample (to stop at once when a process has died, say). ``roots``: where to read a
    name's PID instead of /proc; ``/proc/PID/task`` with the PID itself reads the process's
    main thread alone (in Python, the event loop's), whose RSS is the process's."""
    where = {n: (roots or {}).get(n, Path("/proc")) for n in pids}
    reset = {n: reset_peak(pid, where[n]) for n, pid in pids.items()}
    sampled = {n: memory_kib(pid, where[n])[0] for n, pid in pids.items()}
    t0 = time.monotonic()
    cpu0 = {n: cpu_seconds(pid, where[n]) for n, pid in pids.items()}
    end = t0 + seconds
    while (now := time.monotonic()) < end:
        time.sleep(min(sample_s, end - now))
        check()
        for n, pid in pids.items():
            sampled[n] = max(sampled[n], memory_kib(pid, where[n])[0])
    cpu1 = {n: cpu_seconds(pid, where[n]) for n, pid in pids.items()}
    wall = time.monotonic() - t0
    out = {}
    for n, pid in pids.items():
        rss, hwm = memory_kib(pid, where[n])
        out[n] = usage(cpu0[n], cpu1[n], wall, rss, max(sampled[n], hwm if reset[n] else 0))
    return out
