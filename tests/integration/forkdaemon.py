"""`iortd run` forked from a process that has already imported the daemon, for tests that
start it many times (test_audit_crash: fifty SIGKILLs).

Each start of the console script spends most of its time before ``main()``: the
interpreter, then the imports (pydantic, cryptography, structlog, the config models; about
0.4 s on the CI machine, more on a loaded one), which is most of a crash-test cycle and
nothing a crash test checks. Here one server process imports ``iortd.daemon.cli`` once and
forks a child per start that calls ``main(["run", ...])``: the same code from ``main`` on,
in a process of its own with its own pid, that writes the log, is killed by SIGKILL and
leaves its files like any other. Its stderr (the operational log) goes to a FIFO the test
reads; the server reaps it and reports its exit status. Tests about starting the daemon
(the console script, its imports, its exit codes) start it with
``Daemon.start`` (daemonproc.py).

The server has no threads (it forks) and owns no event loop; a child resets what it
inherited from the server (signal dispositions, stdin/stdout) before calling ``main``.
What children share that separate starts would not: the string hash seed (sets of
strings iterate in the same order in each) and the module-level ``random`` state, which
iortd does not use (its generators are ``random.Random`` instances made at run time).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from daemonproc import Daemon, Site

SERVER = r"""
import json, os, select, signal, sys
from iortd.daemon.cli import main  # the imports a console-script start would make

def child(argv, stderr):
    try:
        fd = os.open(stderr, os.O_WRONLY)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.close(null)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)

wake_r, wake_w = os.pipe()
os.set_blocking(wake_w, False)
signal.set_wakeup_fd(wake_w)
signal.signal(signal.SIGCHLD, lambda *_: None)
live = set()
stdin = sys.stdin.buffer
print(json.dumps({"ready": os.getpid()}), flush=True)
while True:
    ready, _, _ = select.select([stdin, wake_r], [], [])
    if wake_r in ready:
        os.read(wake_r, 4096)
        for pid in list(live):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                live.discard(pid)
                rc = os.waitstatus_to_exitcode(status)
                print(json.dumps({"exited": pid, "rc": rc}), flush=True)
    if stdin in ready:
        line = stdin.readline()
        if not line:
            break
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.close(wake_r)
            os.close(wake_w)
            child(req["argv"], req["stderr"])
        live.add(pid)
        print(json.dumps({"pid": pid}), flush=True)
for pid in live:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
"""


class ForkedProc:
    """A forked daemon, with the part of asyncio.subprocess.Process that Daemon uses."""

    def __init__(self, pid: int, stderr: asyncio.StreamReader, exited: asyncio.Future[int]):
        self.pid = pid
        self.stderr: asyncio.StreamReader | None = stderr
        self._exited = exited

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited.done() else None

    def send_signal(self, sig: int) -> None:
        if not self._exited.done():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)


class ForkServer:
    """The server process; :meth:`start_daemon` forks one ``iortd run`` from it, with its
    stderr through a FIFO made in ``fifo_dir`` (an existing directory)."""

    def __init__(self, proc: asyncio.subprocess.Process, fifo_dir: Path) -> None:
        self.proc = proc
        self._fifo_dir = fifo_dir
        self._n = 0
        self._spawned: asyncio.Queue[int] = asyncio.Queue()
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._reader = asyncio.create_task(self._read())
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls, fifo_dir: Path) -> ForkServer:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SERVER, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            first = json.loads(await proc.stdout.readline() or b"{}")
        assert "ready" in first, "the fork server did not start"
        return cls(proc, fifo_dir)

    def _exit_of(self, pid: int) -> asyncio.Future[int]:
        return self._exits.setdefault(pid, asyncio.get_running_loop().create_future())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while raw := await self.proc.stdout.readline():
            msg: dict[str, Any] = json.loads(raw)
            if "pid" in msg:
                self._spawned.put_nowait(msg["pid"])
            elif "exited" in msg:
                fut = self._exit_of(msg["exited"])
                if not fut.done():
                    fut.set_result(msg["rc"])

    async def start_daemon(self, site: Site) -> Daemon:
        """``iortd run --config SITE``, forked; read it as :meth:`Daemon.start`'s."""
        assert self.proc.stdin is not None
        async with self._lock:
            self._n += 1
            fifo = self._fifo_dir / f"stderr-{self._n}"
            os.mkfifo(fifo, 0o600)
            # Opening a FIFO to read waits for its writer (the child): in a thread, so
            # that EOF means the child has gone, not that it has not come yet.
            opening = asyncio.create_task(asyncio.to_thread(os.open, fifo, os.O_RDONLY))
            argv = ["run", "--config", str(site.config)]
            self.proc.stdin.write(json.dumps({"argv": argv, "stderr": str(fifo)}).encode() + b"\n")
            try:
                async with asyncio.timeout(10):
                    await self.proc.stdin.drain()
                    pid = await self._spawned.get()
                    fd = await opening
            except TimeoutError:
                # Release the thread: a writer of our own lets its open return.
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                os.close(await opening)
                raise AssertionError("a forked iortd did not open its stderr within 10 s") from None
            reader = asyncio.StreamReader(limit=2**20)
            await asyncio.get_running_loop().connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0)
            )
        return Daemon(ForkedProc(pid, reader, self._exit_of(pid)))

    async def stop(self) -> None:
        """Close its stdin: it kills and reaps what is left, then exits."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            async with asyncio.timeout(15):
                await self.proc.wait()
                await self._reader
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
