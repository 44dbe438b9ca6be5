"""Nothing left behind (issue 17 item 5): `iortd demo` SIGKILLed at ten moments leaves no
broker, no dashboard and no watcher running, and the next start reclaims its temporary
directory, never a live demo's.

Two waves of five demos run at once, all in one private ``TMPDIR``; each demo is killed at
its own moment: as soon as its scratch directory exists (start-up, before the broker), at
the broker's line (the dashboard is starting), at the dashboard's line, mid-delivery, and
during the linger (stdin and stdout on a real pty, so the demo believes it is at a
terminal). Before each kill the test records the demo's descendants (``/proc/PID/task/*/
children``, with their start times, so a reused PID is not mistaken for a survivor) and
what their command lines mention (the scratch directory, the broker's URL); after it, a
bounded poll waits until none of them is running. The second wave's starts reclaim the
first wave's directories while their peers are alive (and each live demo's directory is
still there and locked when it is killed); one more start reclaims the second wave's.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

IORTD = str(Path(sys.executable).parent / "iortd")
MOMENTS = ("scratch", "broker", "dashboard", "delivery", "linger")
START_BOUND_S = 40.0  # a loaded 2-core machine: five demos importing at once
GONE_BOUND_S = 10.0
# The demo's console lines that mark each moment (daemon/demo.py, daemon/console.py).
LINE_FOR = {
    "broker": re.compile(r"Mosquitto \(pid (\d+)\) on (\S+),"),
    "dashboard": re.compile(r"live dashboard: (\S+) \(pid (\d+)\)"),
    "delivery": re.compile(r"IRRADIATING"),
    "linger": re.compile(r"Press Enter"),
}


@dataclass
class Killed:
    moment: str
    pid: int
    scratch: list[Path]
    children: dict[int, int] = field(default_factory=dict)  # pid -> start time
    marks: list[str] = field(default_factory=list)  # strings their command lines carry
    output: list[str] = field(default_factory=list)
    locked: bool = False  # its scratch directory was locked by its live owner

    def announced(self) -> dict[str, int]:
        """The children's PIDs the demo printed before it was killed."""
        text = "".join(self.output)
        found = {}
        if m := LINE_FOR["broker"].search(text):
            found["broker"] = int(m[1])
        if m := LINE_FOR["dashboard"].search(text):
            found["dashboard"] = int(m[2])
        return found


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


def _running(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] == start and st[0] not in ("Z", "X")


def _descendants(pid: int) -> dict[int, int]:
    found: dict[int, int] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    st = _stat(int(child))
                    if st is not None:
                        found[int(child)] = st[1]
                        todo.append(int(child))
    return found


def _mentioning(marks: list[str]) -> list[str]:
    """Running processes whose command line mentions any of ``marks``."""
    hits = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        st = _stat(int(entry.name))
        if st is None or st[0] in ("Z", "X"):
            continue
        if any(m in cmd for m in marks):
            hits.append(f"{entry.name}: {cmd.strip()}")
    return hits


def _scratch_of(tmp: Path, pid: int) -> list[Path]:
    return sorted(tmp.glob(f"iortd-demo-{pid}-*"))


def _locked_by_a_live_owner(directory: Path) -> bool:
    try:
        fd = os.open(directory / "owner.lock", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


async def _lines(stream: asyncio.StreamReader, sink: list[str]) -> None:
    with contextlib.suppress(OSError):
        while raw := await stream.readline():
            sink.append(raw.decode("utf-8", "replace"))


async def _pty_reader(master: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(master, "rb", 0)
    )
    return reader, transport


async def _demo_killed_at(
    moment: str, n: int, base: Path, env: dict[str, str], registry: list[Killed]
) -> Killed:
    tmp = Path(env["TMPDIR"])
    env = {**env, "XDG_DATA_HOME": str(base / f"xdg-{n}")}
    argv = [IORTD, "demo", "--speed", "3000", "--duration", "30"]
    argv += ["--log-dir", str(base / f"log-{n}")]
    master = slave = -1
    if moment == "linger":
        master, slave = os.openpty()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=slave, stdout=slave, stderr=asyncio.subprocess.PIPE, env=env
        )
        os.close(slave)
        out, transport = await _pty_reader(master)
    else:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        assert proc.stdout is not None
        out, transport = proc.stdout, None
    killed = Killed(moment, proc.pid, [])
    registry.append(killed)
    reading = asyncio.create_task(_lines(out, killed.output))
    try:
        deadline = time.monotonic() + START_BOUND_S
        while True:
            assert proc.returncode is None, f"demo ({moment}) ended early: {killed.output}"
            assert time.monotonic() < deadline, (
                f"demo ({moment}) did not reach its moment in {START_BOUND_S} s: {killed.output}"
            )
            text = "".join(killed.output)
            if moment == "scratch":
                if _scratch_of(tmp, proc.pid):
                    break
            elif LINE_FOR[moment].search(text):
                break
            await asyncio.sleep(0.01)
        killed.children = _descendants(proc.pid)
        killed.scratch = _scratch_of(tmp, proc.pid)
        killed.locked = bool(killed.scratch) and all(map(_locked_by_a_live_owner, killed.scratch))
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        # Not to the end of the output: a surviving child would hold the pipe open.
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        if transport is not None:
            transport.close()
    text = "".join(killed.output)
    if m := LINE_FOR["broker"].search(text):
        killed.marks.append(m[2] + " ")  # the broker's URL on the dashboard's command line
    killed.marks += [str(d) for d in killed.scratch]
    return killed


async def _wave(
    base: Path, env: dict[str, str], first: int, registry: list[Killed]
) -> list[Killed]:
    runs = [_demo_killed_at(m, first + i, base, env, registry) for i, m in enumerate(MOMENTS)]
    return list(await asyncio.gather(*runs))


async def _nothing_running(killed: list[Killed]) -> None:
    deadline = time.monotonic() + GONE_BOUND_S
    while True:
        left = {
            k.moment: [p for p, s in k.children.items() if _running(p, s)] + _mentioning(k.marks)
            for k in killed
        }
        left = {m: v for m, v in left.items() if v}
        if not left:
            return
        assert time.monotonic() < deadline, (
            f"left running {GONE_BOUND_S} s after SIGKILL of the demo: {left}"
        )
        await asyncio.sleep(0.05)


async def test_sigkill_of_the_demo_ten_times_leaves_nothing_behind(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    registry: list[Killed] = []
    try:
        await _ten_kills_and_a_clean_start(tmp_path, env, registry)
    finally:
        for k in registry:  # whatever a failure left behind, by PID and start time
            for pid, start in k.children.items():
                if _running(pid, start):
                    os.kill(pid, signal.SIGKILL)
    print(f"10 kills and one clean start: {time.monotonic() - started:.1f} s")  # noqa: T201


async def _ten_kills_and_a_clean_start(
    tmp_path: Path, env: dict[str, str], registry: list[Killed]
) -> None:
    tmp = Path(env["TMPDIR"])
    first = await _wave(tmp_path, env, 0, registry)
    await _nothing_running(first)
    for k in first:
        assert k.scratch, f"demo ({k.moment}) made no scratch directory: {k.output}"
        # The children the demo announced were among those recorded (the check is not empty).
        assert set(k.announced().values()) <= set(k.children), (k.announced(), k.children)
        if k.moment != "scratch":
            assert k.locked, f"demo ({k.moment}): its directory was not locked while it lived"
    # SIGKILL leaves them (a peer that started after a kill may have reclaimed one already).
    leftovers = [d for k in first for d in k.scratch if d.exists()]
    assert leftovers, "SIGKILL left no scratch directory: what is the next start to reclaim?"

    second = await _wave(tmp_path, env, len(MOMENTS), registry)
    await _nothing_running(second)
    assert not [d for d in leftovers if d.exists()], "the next starts reclaim dead demos' dirs"
    for k in second:
        assert k.scratch, f"a live demo's directory was taken from it ({k.moment}): {k.output}"
        assert set(k.announced().values()) <= set(k.children), (k.announced(), k.children)
        if k.moment != "scratch":
            assert k.locked, f"demo ({k.moment}): its directory was not locked while it lived"

    last = await asyncio.create_subprocess_exec(
        *(IORTD, "demo", "--speed", "3000", "--no-dashboard", "--duration", "0.5"),
        *("--log-dir", str(tmp_path / "log-last")),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**env, "XDG_DATA_HOME": str(tmp_path / "xdg-last")},
    )
    out, _ = await asyncio.wait_for(last.communicate(), 60)
    assert last.returncode == 0, out.decode()
    assert not _entries(tmp), f"left in TMPDIR: {_entries(tmp)}"


def _entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_a_live_demos_lock_is_visible(tmp_path: Path) -> None:
    """The helper the big test leans on: a held flock reads as a live owner."""
    d = tmp_path / "iortd-demo-1-1-x"
    d.mkdir()
    fd = os.open(d / "owner.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # flock locks belong to the open file description: a second open conflicts.
        assert _locked_by_a_live_owner(d)
    finally:
        os.close(fd)
    assert not _locked_by_a_live_owner(d)
