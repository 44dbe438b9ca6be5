"""A private Mosquitto broker, started and stopped by this process.

`iortd demo` embeds one so that the MQTT stream can be shown without a site broker, and the
integration tests and benchmarks run against one so that they exercise a real broker rather
than a fake. The broker is always ours: it listens on 127.0.0.1 only, on a port picked free
at start, with a configuration file generated into a working directory we own, and it is
stopped by the PID we started. Nothing here looks for, signals or configures a system
broker (no service manager, no pid file, no ``pkill``).

With ``tethered=True`` (what ``iortd demo`` asks for) the broker also dies with this process
when it is killed outright (SIGKILL, a crash): it is started through the kernel's tether
(kernel/reaper.py), whose watcher stops it when this process's end of a pipe closes. The
broker keeps its PID (the tether's shim execs Mosquitto), so `pid`, signals and exit
codes are Mosquitto's own. A parent-death signal would not do: it is tied to the thread
that forked the broker (`start` forks from a worker thread), and it is cleared when
Mosquitto changes user (as root, whenever its ``user`` is not root). The tests' brokers
are left untethered: they are stopped by their fixtures, and the shim adds some 50 ms to
every start.

The core is synchronous (`subprocess.Popen`; Mosquitto is listening within ~10 ms of its
exec), so a plain pytest fixture can use it directly; the ``async`` methods run the same
code in a worker thread so that the event loop is never blocked. An instance is not
thread-safe: one caller at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import getpass
import ipaddress
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from iortd.kernel.reaper import Tether

__all__ = [
    "MOSQUITTO_INSTALL_HINT",
    "BrokerError",
    "BrokerOptions",
    "Mosquitto",
    "TlsOptions",
    "find_mosquitto",
]

MOSQUITTO_INSTALL_HINT = "sudo apt-get install -y mosquitto mosquitto-clients"

# A non-root PATH often lacks the sbin directories where distributions install brokers.
_SBIN_CANDIDATES = (Path("/usr/sbin/mosquitto"), Path("/usr/local/sbin/mosquitto"))
# One start plus this many retries on a fresh port when another process took ours between
# our probe and Mosquitto's bind.
_PORT_RETRIES = 3
_POLL_S = 0.01
_LOG_TAIL_LINES = 20
# Logged (log_type information) after every listener is open, just before the main loop.
_RUNNING = re.compile(r"^\S+ mosquitto version \S+ running$", re.MULTILINE)


def find_mosquitto() -> Path | None:
    """The Mosquitto executable on PATH or in the usual sbin directories, or None."""
    found = shutil.which("mosquitto")
    if found is not None:
        return Path(found)
    for candidate in _SBIN_CANDIDATES:
        if candidate.is_file():
            return candidate
    return None


class BrokerError(RuntimeError):
    """The private broker could not be started (or restarted); the message says why."""


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """TLS on the main listener. With ``require_certificate`` clients must present a
    certificate signed by ``cafile``."""

    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False


@dataclass(frozen=True, slots=True)
class BrokerOptions:
    """What the generated mosquitto.conf says.

    ``port=0`` picks a free port. ``allow_anonymous=None`` means: anonymous clients are
    allowed unless a password file is given. ``extra_listener_plain`` opens a second,
    plain listener (same authentication and ACL) on another free port, for an observer
    that should not need the TLS material. ``persistence_dir`` defaults to a directory in
    the working directory, so that `Mosquitto.restart` reloads the same database.
    """

    host: str = "127.0.0.1"
    port: int = 0
    persistence: bool = False
    persistence_dir: Path | None = None
    tls: TlsOptions | None = None
    password_file: Path | None = None
    acl_file: Path | None = None
    allow_anonymous: bool | None = None
    extra_listener_plain: bool = False
    start_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        # A private broker must not be reachable from the network.
        try:
            loopback = ipaddress.IPv4Address(self.host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"host must be an IPv4 loopback address, not {self.host!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        if self.start_timeout_s <= 0:
            raise ValueError("start_timeout_s must be positive")

    @property
    def anonymous(self) -> bool:
        if self.allow_anonymous is None:
            return self.password_file is None
        return self.allow_anonymous


class Mosquitto:
    """One private Mosquitto process.

    ``Mosquitto(options, workdir)`` only prepares; start with ``await Mosquitto.start(...)``
    / ``Mosquitto.start_sync(...)`` or by entering it (``async with`` / ``with``), which
    also stops it on exit. `stop` and `kill` are idempotent; `restart` starts the same
    configuration on the same port(s).
    """

    def __init__(
        self,
        options: BrokerOptions,
        workdir: Path,
        *,
        executable: Path | None = None,
        tethered: bool = False,
    ) -> None:
        self._options = options
        self._workdir = workdir.resolve()
        self._executable = executable
        self._tethered = tethered
        self._tether: Tether | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._plain_port: int | None = None

    # -- construction -------------------------------------------------------------------

    @classmethod
    def start_sync(
        cls,
        options: BrokerOptions,
        workdir: Path,
        *,
        executable: Path | None = None,
        tethered: bool = False,
    ) -> Mosquitto:
        broker = cls(options, workdir, executable=executable, tethered=tethered)
        broker._launch()
        return broker

    @classmethod
    async def start(
        cls,
        options: BrokerOptions,
        workdir: Path,
        *,
        executable: Path | None = None,
        tethered: bool = False,
    ) -> Mosquitto:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(
            None,
            functools.partial(
                cls.start_sync, options, workdir, executable=executable, tethered=tethered
            ),
        )
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The thread cannot be interrupted: stop whatever it starts, or it would leak.
            fut.add_done_callback(_kill_started)
            raise

    # -- properties ---------------------------------------------------------------------

    @property
    def options(self) -> BrokerOptions:
        return self._options

    @property
    def host(self) -> str:
        return self._options.host

    @property
    def port(self) -> int:
        if self._port is None:
            raise BrokerError("the broker has not been started")
        return self._port

    @property
    def plain_port(self) -> int | None:
        """The extra plain listener's port, if ``extra_listener_plain``."""
        if self._port is None:
            raise BrokerError("the broker has not been started")
        return self._plain_port

    @property
    def url(self) -> str:
        scheme = "mqtts" if self._options.tls is not None else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """PID of the current (or last) process."""
        if self._proc is None:
            raise BrokerError("the broker has not been started")
        return self._proc.pid

    @property
    def tethered(self) -> bool:
        """Whether the current process dies with this one even on SIGKILL (False where
        the system cannot tether: see kernel/reaper.py's ``tether_unavailable``)."""
        return self._tether is not None and self._tether.active

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    @property
    def workdir(self) -> Path:
        return self._workdir

    @property
    def conf_path(self) -> Path:
        return self._workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self._workdir / "mosquitto.log"

    # -- lifecycle (sync) ---------------------------------------------------------------

    def stop_sync(self, timeout_s: float = 5.0) -> int | None:
        """SIGTERM (Mosquitto saves its persistence database), then SIGKILL after
        ``timeout_s``. Returns the exit code, or None if never started."""
        proc = self._proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                proc.terminate()  # Popen signals only a PID it has not reaped yet
                try:
                    return proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
            return proc.wait()
        finally:
            self._untether()

    def restart_sync(self, timeout_s: float = 5.0) -> None:
        """Stop if running, then start the same configuration on the same port(s)."""
        self.stop_sync(timeout_s)
        if self._port is None:
            self._launch()
        else:
            self._spawn_checked(self._port, self._plain_port)

    def kill(self) -> None:
        """SIGKILL and reap, best effort and quick: for finalizers and error paths."""
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=2)
        self._untether()  # if it still runs (not reaped in time), its watcher stops it

    def _untether(self) -> None:
        if self._tether is not None:
            self._tether.close()
            self._tether = None

    def __enter__(self) -> Self:
        if self._port is None:
            self._launch()
        elif not self.running:
            self.restart_sync()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_sync()

    # -- lifecycle (async) --------------------------------------------------------------

    async def stop(self, timeout_s: float = 5.0) -> int | None:
        return await asyncio.to_thread(self.stop_sync, timeout_s)

    async def restart(self, timeout_s: float = 5.0) -> None:
        await asyncio.to_thread(self.restart_sync, timeout_s)

    async def __aenter__(self) -> Self:
        if not self.running:
            await asyncio.to_thread(self.__enter__)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.returncode}"
        where = f"{self.host}:{self._port}" if self._port is not None else "not started"
        return f"<Mosquitto {where} {state}>"

    # -- internals ----------------------------------------------------------------------

    def _launch(self) -> None:
        """First start: fixed port(s) as configured, or free ones with retries."""
        want_plain = self._options.extra_listener_plain
        if self._options.port != 0:
            plain = _free_ports(self.host, 1)[0] if want_plain else None
            self._spawn_checked(self._options.port, plain)
            return
        for attempt in range(_PORT_RETRIES + 1):
            ports = _free_ports(self.host, 2 if want_plain else 1)
            plain = ports[1] if want_plain else None
            try:
                self._spawn_checked(ports[0], plain)
            except _PortTaken:
                if attempt == _PORT_RETRIES:
                    raise
            else:
                return

    def _spawn_checked(self, port: int, plain_port: int | None) -> None:
        exe = self._executable or find_mosquitto()
        if exe is None:
            raise BrokerError(f"mosquitto not found; install it with: {MOSQUITTO_INSTALL_HINT}")
        self._workdir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self._render_conf(port, plain_port))
        log_from = self.log_path.stat().st_size if self.log_path.exists() else 0
        # Messages Mosquitto prints before it opens its log file (a bad option) go to the
        # same file, appended.
        self._untether()  # the previous process's, if any (a restart)
        tether = Tether("mosquitto") if self._tethered else None
        argv = [str(exe), "-c", str(self.conf_path)]
        try:
            with self.log_path.open("ab") as early_log:
                proc = subprocess.Popen(  # noqa: S603 - our executable, our generated config
                    argv if tether is None else tether.argv(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=early_log,
                    stderr=early_log,
                    pass_fds=() if tether is None else tether.pass_fds,
                )
        except BaseException:
            if tether is not None:
                tether.close()
            raise
        if tether is not None:
            tether.started()
        self._proc, self._port, self._plain_port, self._tether = proc, port, plain_port, tether
        try:
            self._wait_running(proc, log_from)
        except BaseException:
            self.kill()  # never leave a half-started broker behind (timeout, Ctrl-C, ...)
            raise

    def _wait_running(self, proc: subprocess.Popen[bytes], log_from: int) -> None:
        # Ready when Mosquitto says so: it logs "running" once every listener is bound and
        # exits if one cannot be. (A TCP probe alone is fooled by whoever else holds the
        # port, and shows up in the log as a failed TLS handshake.)
        deadline = time.monotonic() + self._options.start_timeout_s
        while True:
            code = proc.poll()
            if code is not None:
                tail = self._log_tail(log_from)
                if "Address already in use" in tail:
                    raise _PortTaken(self._failure(f"exited with code {code}", tail))
                raise BrokerError(self._failure(f"exited with code {code}", tail))
            if _RUNNING.search(self._log_since(log_from)):
                return
            if time.monotonic() >= deadline:
                raise BrokerError(
                    self._failure(
                        f"not running after {self._options.start_timeout_s} s (killed)",
                        self._log_tail(log_from),
                    )
                )
            time.sleep(_POLL_S)

    def _failure(self, what: str, tail: str) -> str:
        return (
            f"mosquitto on {self.host}:{self._port} {what}; config {self.conf_path};"
            f" end of {self.log_path}:\n{tail}"
        )

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"

    def _log_tail(self, offset: int) -> str:
        lines = self._log_since(offset).splitlines()[-_LOG_TAIL_LINES:]
        return "\n".join(lines) if lines else "(log empty)"

    def _render_conf(self, port: int, plain_port: int | None) -> str:
        o = self._options
        lines = [
            "# Generated by iortd for a private broker; rewritten at every start.",
            "per_listener_settings false",
            # Only consulted when started as root: keep our identity rather than switching
            # to the 'mosquitto' user, which could not write into our working directory.
            f"user {_conf_value(getpass.getuser())}",
            f"log_dest file {_conf_path(self.log_path)}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "connection_messages true",
            # Without it concurrent QoS 1 publishes stall on Nagle (PUBACKs held ~40 ms).
            "set_tcp_nodelay true",
            f"allow_anonymous {'true' if o.anonymous else 'false'}",
        ]
        if o.persistence:
            data = o.persistence_dir or self._workdir / "mosquitto-data"
            data.mkdir(parents=True, exist_ok=True)
            lines += [
                "persistence true",
                f"persistence_location {_conf_path(data)}/",
                "persistence_file mosquitto.db",
            ]
        else:
            lines.append("persistence false")
        if o.password_file is not None:
            lines.append(f"password_file {_conf_path(o.password_file)}")
        if o.acl_file is not None:
            lines.append(f"acl_file {_conf_path(o.acl_file)}")
        lines += ["", f"listener {port} {o.host}"]
        if o.tls is not None:
            lines += [
                f"cafile {_conf_path(o.tls.cafile)}",
                f"certfile {_conf_path(o.tls.certfile)}",
                f"keyfile {_conf_path(o.tls.keyfile)}",
                f"require_certificate {'true' if o.tls.require_certificate else 'false'}",
            ]
        if plain_port is not None:
            lines += ["", f"listener {plain_port} {o.host}"]
        return "\n".join(lines) + "\n"


class _PortTaken(BrokerError):
    pass


def _kill_started(fut: asyncio.Future[Mosquitto]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().kill()


def _free_ports(host: str, n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (all probes open at once)."""
    with contextlib.ExitStack() as stack:
        socks = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)
        ]
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]


def _conf_value(value: str) -> str:
    # mosquitto.conf has no quoting: a value ends at whitespace or a newline.
    if not value or any(c.isspace() for c in value):
        raise BrokerError(f"cannot write {value!r} into mosquitto.conf (empty or whitespace)")
    return value


def _conf_path(path: Path) -> str:
    return _conf_value(str(path.resolve()))
