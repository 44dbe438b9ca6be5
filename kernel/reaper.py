"""Children that die with their parent, even when the parent is killed with SIGKILL.

A process started through a :class:`Tether` is watched by a small **watcher** process that
holds the read end of a pipe (the *lifeline*) whose write end only the parent holds. The
kernel closes the write end when the parent dies, however it dies (SIGKILL, a crash, the
OOM killer); the watcher then reads end-of-file and stops the child: SIGTERM (and SIGCONT,
for a stopped child), SIGKILL after a grace period. A child that ends first ends its
watcher too (the watcher holds a pidfd of the child, so it waits for that very process and
signals no one who merely reuses its PID).

How a child is started: ``[python, -I, -S, reaper.py, --lifeline FD, --name N, --grace S,
--, CMD...]`` (this file run as a script, importing little of the standard library and
nothing else; ``-I`` also keeps this file's folder, which holds ``types.py``, off
``sys.path``). It adds some 50 ms to a child's start (a tethered Mosquitto: median 63-85
ms against 16 ms plain, on a loaded 2-core machine). The **shim** forks the watcher
(twice, so that it is nobody's child but init's and sits in a session of its own, out of
reach of the terminal's Ctrl-C and hang-up), waits until the watcher holds a pidfd of the
shim's PID, and then execs CMD: the command keeps the shim's PID, so ``Popen.pid``,
signals and exit codes are those of the command itself. There is no window: the lifeline
is in the shim from the moment it is forked, so a parent that dies at any point after
``Popen`` is seen by the watcher. The command starts with SIGPIPE and SIGXFSZ at their
defaults and SIGINT ignored only if its parent ignores it, as ``Popen`` would start it.

Why not ``prctl(PR_SET_PDEATHSIG)`` in the child (prctl(2)):

- it fires when the parent *thread* that forked the child exits, not the process
  (``Mosquitto.start`` forks from a worker thread);
- it is cleared when the child changes its credentials: Mosquitto started as root
  calls ``setuid()`` to become the user ``mosquitto`` unless told otherwise, and with
  that the signal is gone;
- it needs ``preexec_fn``, which is unsafe in a process with threads, and it is Linux only.

A pipe's end-of-file has none of these limits. The watcher needs ``pidfd_open`` (Linux
5.3, Python 3.9); without it :func:`tether_unavailable` says why, the child is started
plainly and the caller says so to the user (a SIGKILLed parent then leaves it running).
If the watcher cannot start, the shim says so on stderr and runs the command anyway: a
demo that shows its stream matters more than its tidiness.
"""

from __future__ import annotations

import os
import select
import signal
import sys

# Run as a script, this module imports only what it needs at run time: contextlib, typing
# and collections.abc would treble the shim's start-up (python -X importtime).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import FrameType, TracebackType
    from typing import NoReturn, Self

__all__ = ["DEFAULT_GRACE_S", "Tether", "tether_unavailable", "watch"]

DEFAULT_GRACE_S = 2.0
KILL_WAIT_S = 5.0
# How long the shim waits for its watcher to hold the pidfd before it runs the command
# untethered (a fork and a syscall: milliseconds).
WATCHER_READY_S = 5.0


def tether_unavailable() -> str | None:
    """None when children can be tethered here, else the reason (for a message)."""
    if not hasattr(os, "pidfd_open") or not hasattr(signal, "pidfd_send_signal"):
        return "this system has no pidfd_open (Linux 5.3 or later is needed)"
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError as exc:
        return f"pidfd_open is not available here ({exc.strerror})"
    return None


class Tether:
    """One child's lifeline: wrap its command with :meth:`argv`, pass :attr:`pass_fds` to
    ``Popen``, call :meth:`started` after ``Popen`` and :meth:`close` once the child has
    been stopped. Closing it while the child still runs makes the watcher stop the child
    (that is also what the parent's death does). Where :func:`tether_unavailable` gives a
    reason, :meth:`argv` returns the command unchanged and nothing is watched."""

    def __init__(self, name: str, *, grace_s: float = DEFAULT_GRACE_S) -> None:
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"a tether's name is one word, not {name!r}")
        if not grace_s > 0:
            raise ValueError("grace_s must be positive")
        self.name = name
        self.grace_s = grace_s
        self.unavailable = tether_unavailable()
        self._r: int | None = None
        self._w: int | None = None
        if self.unavailable is None:
            # Both ends close-on-exec: only the shim gets the read end (pass_fds), and no
            # other child ever holds the write end, which would keep the lifeline open.
            self._r, self._w = os.pipe()

    @property
    def active(self) -> bool:
        return self._w is not None

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return () if self._r is None else (self._r,)

    def argv(self, command: Sequence[str]) -> list[str]:
        if self._r is None:
            return list(command)
        return [
            sys.executable,
            "-I",
            "-S",
            os.path.abspath(__file__),
            *("--lifeline", str(self._r), "--name", self.name, "--grace", f"{self.grace_s:g}"),
            "--",
            *command,
        ]

    def started(self) -> None:
        """The child is running (or failed to): this process needs the read end no more."""
        if self._r is not None:
            os.close(self._r)
            self._r = None

    def close(self) -> None:
        """Cut the lifeline (idempotent)."""
        self.started()
        if self._w is not None:
            os.close(self._w)
            self._w = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- the watcher --------------------------------------------------------------------------


class _Stop(Exception):  # SIGTERM to the watcher: stop the child now
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def watch(pidfd: int, lifeline: int, *, grace_s: float, name: str, pid: int) -> str:
    """Wait until the child ends (return ``"exited"``) or the lifeline reads end-of-file
    or this process gets SIGTERM (stop the child; return how: ``"SIGTERM"``, ``"SIGKILL"``
    or ``"lost"`` if it outlived SIGKILL's wait). Blocking: the watcher does nothing else."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(lifeline, select.POLLIN | select.POLLHUP)
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    why = "its parent is gone"
    try:
        while True:
            ready = dict(poller.poll())
            if pidfd in ready:
                return "exited"
            if lifeline in ready and not os.read(lifeline, 512):
                break  # end of file: the parent is gone or let go
    except _Stop:
        why = "its watcher got SIGTERM"
    finally:
        signal.signal(signal.SIGTERM, previous)
    return _stop(pidfd, grace_s=grace_s, name=name, pid=pid, why=why)


def _stop(pidfd: int, *, grace_s: float, name: str, pid: int, why: str) -> str:
    for sig in (signal.SIGTERM, signal.SIGCONT):
        _signal(pidfd, sig)
    if _ended(pidfd, grace_s):
        how = "SIGTERM"
    else:
        _signal(pidfd, signal.SIGKILL)
        how = "SIGKILL" if _ended(pidfd, KILL_WAIT_S) else "lost"
    if how == "lost":
        _say(f"iortd reaper: {name} (pid {pid}) outlived SIGKILL ({why})")
    else:
        _say(f"iortd reaper: stopped {name} (pid {pid}) with {how}: {why}")
    return how


def _ended(pidfd: int, within_s: float) -> bool:
    ready, _, _ = select.select([pidfd], [], [], within_s)
    return bool(ready)


def _signal(pidfd: int, sig: int) -> None:
    try:  # noqa: SIM105 - no contextlib in the shim (start-up time)
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        pass  # it has ended meanwhile


def _say(text: str) -> None:
    try:  # noqa: SIM105 - no contextlib in the shim (start-up time)
        os.write(2, (text + "\n").encode())
    except OSError:
        pass  # best effort: the terminal may be gone with the parent


# -- the shim -----------------------------------------------------------------------------


class _Args:
    __slots__ = ("command", "grace", "lifeline", "name")

    def __init__(self, lifeline: int, name: str, grace: float, command: list[str]) -> None:
        self.lifeline, self.name, self.grace, self.command = lifeline, name, grace, command


_USAGE = "usage: reaper.py --lifeline FD --name NAME [--grace SECONDS] -- COMMAND [ARG...]"


def _parse(argv: Sequence[str]) -> _Args:
    """The shim's arguments, by hand: argparse alone would double its start-up time. A
    usage error exits 2."""
    argv = list(argv)
    if "--" not in argv:
        _usage("no -- before the command")
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    keys, values = options[::2], options[1::2]
    given = dict(zip(keys, values, strict=False))
    unknown = set(keys) - {"--lifeline", "--name", "--grace"}
    if len(keys) != len(values) or unknown or not command:
        _usage(f"got {options} and command {command}")
    try:
        return _Args(
            lifeline=int(given["--lifeline"]),
            name=given["--name"],
            grace=float(given.get("--grace", DEFAULT_GRACE_S)),
            command=command,
        )
    except (KeyError, ValueError) as exc:
        _usage(repr(exc))


def _usage(what: str) -> NoReturn:
    _say(f"{_USAGE}\n({what})")
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    shim = os.getpid()
    ready_r, ready_w = os.pipe()
    first = os.fork()
    if first == 0:  # pragma: no cover - runs in the forked watcher
        os.close(ready_r)
        _become_watcher(shim, ready_w, args)
    os.close(ready_w)
    os.waitpid(first, 0)  # the intermediate exits at once; the watcher is init's
    ready, _, _ = select.select([ready_r], [], [], WATCHER_READY_S)
    if not (ready and os.read(ready_r, 1)):
        _say(f"iortd reaper: no watcher for {args.name}; it will outlive a killed parent")
    os.close(ready_r)
    os.close(args.lifeline)
    # What Popen's restore_signals does for its child: Python ignores these at start-up,
    # and an exec keeps a signal ignored.
    for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    try:
        os.execvp(args.command[0], args.command)  # noqa: S606 - the command we were given
    except OSError as exc:
        _say(f"iortd reaper: cannot run {args.command[0]}: {exc.strerror}")
    return 127


def _become_watcher(shim: int, ready_w: int, args: _Args) -> None:
    code = 0
    try:
        os.setsid()  # out of the terminal's process group: Ctrl-C and hang-up are not ours
        if os.fork() != 0:
            os._exit(0)
        pidfd = os.pidfd_open(shim)
        os.write(ready_w, b"1")
        os.close(ready_w)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)  # stdout may be a pipe the parent reads to its end
        os.close(devnull)
        os.chdir("/")  # hold no directory (a mount point) busy
        watch(pidfd, args.lifeline, grace_s=args.grace, name=args.name, pid=shim)
    except BaseException as exc:  # a forked child must never return into its caller
        _say(f"iortd reaper: watcher of {args.name} failed: {exc!r}")
        code = 1
    os._exit(code)


if __name__ == "__main__":
    # A Ctrl-C in the few milliseconds before the exec ends the shim quietly, as it would
    # the command (and the watcher, in its own session, then finds nothing to stop). A
    # SIGINT the parent ignores (a job a shell started in the background) stays ignored,
    # for the command too, as under Popen.
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(main())
