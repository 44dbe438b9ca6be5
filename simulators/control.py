"""The simulator's control channel: faults and questions at run time (``iort-sim ctl``).

``iort-sim serve`` listens on a Unix domain socket (mode 0600) and speaks one JSON object
per line, each request answered by one reply line:

    {"device": "room-1", "action": "open_door"}
    {"ok": true, "device": "room-1", "action": "open_door", "time_s": 31.2, "state": "INTERRUPTED"}
    {"action": "drop_link", "duration": "5s"}          # "device" may be left out with one
    {"ok": false, "error": "drop_link: missing 'duration' (e.g. \\"5s\\")"}

Actions: everything a scenario step can do (``open_door``, ``close_door``,
``press_estop``, ``release_estop``, ``resume``, ``swap_applicator`` [``code``],
``set_output_factor`` ``factor``, ``drop_link`` ``duration``, ``garble`` ``duration``,
``delay_replies`` ``duration`` ``delay``), ``restore_link``, and two questions:
``status`` (one device: state, time, doses, interlocks, link) and ``list`` (the devices
and where each is served). A fault goes through :meth:`SimDevice.apply`, as a scenario
step does, so both do the same thing. A request to an applicator reader (a device of kind
``applicator``) takes the reader's actions instead (simulators/apl_actions.py: ``drift``
``rate`` [``direction``], ``bump`` ``mm``, ``release_brakes``, ``swap`` ``code``, ...),
through :meth:`ApplicatorDevice.apply`, and its ``status`` tells the reader's state.

:class:`ControlHandler` is sans-I/O (a line in, a line out); :class:`ControlServer` puts
it on the socket; :func:`request` is the client ``iort-sim ctl`` uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from iortd.simulators.apl_actions import APL_ACTIONS, parse_apl_step
from iortd.simulators.apl_device import ApplicatorDevice
from iortd.simulators.device import ActionError, SimDevice
from iortd.simulators.durations import checked_duration

__all__ = [
    "LINE_LIMIT",
    "ControlError",
    "ControlHandler",
    "ControlServer",
    "Served",
    "request",
]

LINE_LIMIT = 4096  # bytes of one request line, newline included
MAX_DURATION_S = 24 * 3600.0
MAX_DELAY_S = 60.0  # as in scenarios
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path minus the terminating NUL (Linux)

# The arguments each action takes (required ones marked True).
_ARGS: Mapping[str, Mapping[str, bool]] = {
    "open_door": {},
    "close_door": {},
    "press_estop": {},
    "release_estop": {},
    "resume": {},
    "restore_link": {},
    "swap_applicator": {"code": False},
    "set_output_factor": {"factor": True},
    "drop_link": {"duration": True},
    "garble": {"duration": True},
    "delay_replies": {"duration": True, "delay": True},
    "status": {},
    "list": {},
}
ACTIONS = frozenset(_ARGS)


class ControlError(Exception):
    """The control socket cannot be set up, or a request cannot be sent; the message says
    what to do."""


class BadRequest(ValueError):
    """A request the handler refuses; the message goes back to the client."""


@dataclass
class Served:
    """One device of the process and where it is served (for ``list``)."""

    device: SimDevice | ApplicatorDevice
    transport: str
    protocol: str
    endpoint: dict[str, object] = field(default_factory=dict)


class ControlHandler:
    """Requests in, replies out, for the devices of one ``iort-sim`` process."""

    def __init__(self, devices: Mapping[str, Served]) -> None:
        self.devices = devices

    def handle_line(self, line: bytes) -> bytes:
        """One request line (JSON) -> one reply line (JSON, newline-terminated)."""
        try:
            req = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            reply: dict[str, Any] = {"ok": False, "error": f"not a JSON object: {exc}"}
        else:
            reply = self.handle(req)
        return orjson.dumps(reply) + b"\n"

    def handle(self, req: object) -> dict[str, Any]:
        try:
            return self._handle(req)
        except (BadRequest, ActionError) as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bad request must never stop the simulator
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}

    def _handle(self, req: object) -> dict[str, Any]:
        if not isinstance(req, dict):
            raise BadRequest('expected a JSON object like {"action": "status"}')
        target = self._peek(req.get("device"))
        if target is not None and isinstance(target[1].device, ApplicatorDevice):
            return self._handle_reader(req, target[0], target[1].device)
        action = req.get("action")
        readers = [n for n, s in self.devices.items() if isinstance(s.device, ApplicatorDevice)]
        if readers and action in APL_ACTIONS and action not in ACTIONS:
            raise BadRequest(
                f"{action} is an applicator reader's action: name the device "
                f"(readers: {', '.join(readers)})"
            )
        if not isinstance(action, str) or action not in ACTIONS:
            known = ", ".join(sorted(ACTIONS))
            raise BadRequest(f"unknown action {action!r} (known: {known})")
        spec = _ARGS[action]
        if unknown := set(req) - {"action", "device"} - set(spec):
            takes = ", ".join(sorted(spec)) or "no arguments"
            raise BadRequest(f"{action}: unknown argument(s) {sorted(unknown)} (takes: {takes})")
        for key, required in spec.items():
            if required and key not in req:
                raise BadRequest(f"{action}: missing {key!r}")
        if action == "list":
            return {"ok": True, "devices": [self._describe(n, s) for n, s in self.devices.items()]}
        name, served = self._device(req.get("device"))
        device = served.device
        if not isinstance(device, SimDevice):  # pragma: no cover - _peek sent readers away
            raise BadRequest(f"{action}: not an action of device {name!r}")
        if action == "status":
            return {"ok": True, "device": name, **self._status(device)}
        args: dict[str, Any] = {}
        if "duration" in req:
            args["duration_s"] = checked_duration(
                action, "duration", req["duration"], MAX_DURATION_S, BadRequest
            )
        if "delay" in req:
            args["delay_s"] = checked_duration(
                action, "delay", req["delay"], MAX_DELAY_S, BadRequest
            )
        if "factor" in req:
            factor = req["factor"]
            if isinstance(factor, bool) or not isinstance(factor, int | float):
                raise BadRequest(f"{action}: 'factor' must be a number in (0, 2], got {factor!r}")
            if not 0 < factor <= 2:
                raise BadRequest(f"{action}: 'factor' must be in (0, 2], got {factor!r}")
            args["factor"] = float(factor)
        if "code" in req:
            code = req["code"]
            if code is not None and not isinstance(code, str):
                raise BadRequest(f"{action}: 'code' must be an applicator code or null")
            args["code"] = code
        snap = device.apply(action, args)
        return {
            "ok": True,
            "device": name,
            "action": action,
            "time_s": round(device.time_s, 3),
            "state": snap.state.value,
        }

    def _handle_reader(
        self, req: dict[str, Any], name: str, device: ApplicatorDevice
    ) -> dict[str, Any]:
        """A request to an applicator reader: its own actions (apl_actions.py)."""
        action = req.get("action")
        if action == "list":
            return {"ok": True, "devices": [self._describe(n, s) for n, s in self.devices.items()]}
        if not isinstance(action, str) or action not in {*APL_ACTIONS, "status"}:
            known = ", ".join(sorted({*APL_ACTIONS, "status", "list"}))
            raise BadRequest(
                f"unknown action {action!r} for applicator reader {name!r} (known: {known})"
            )
        given = {k: v for k, v in req.items() if k not in ("action", "device")}
        if action == "status":
            if given:
                raise BadRequest(f"status: unknown argument(s) {sorted(given)} (takes: none)")
            return {"ok": True, "device": name, **self._reader_status(device)}
        try:
            args = parse_apl_step(action, given)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        snap = device.apply(action, args)
        return {
            "ok": True,
            "device": name,
            "action": action,
            "time_s": round(device.time_s, 3),
            "state": snap.state,
        }

    @staticmethod
    def _reader_status(device: ApplicatorDevice) -> dict[str, Any]:
        snap = device.advance()
        app = snap.applicator
        link = device.link
        return {
            "time_s": round(device.time_s, 3),
            "state": snap.state,
            "fault": snap.fault,
            "seated": snap.seated,
            "source_locked": snap.source_locked,
            "brakes_engaged": snap.brakes_engaged,
            "applicator": (
                None
                if app is None
                else {"type": app.type, "diameter_mm": app.diameter_mm, "serial": app.serial}
            ),
            "uses_left": snap.uses_left,
            "seat_counter": snap.seat_counter,
            "lock_counter": snap.lock_counter,
            "displacement_mm": snap.displacement_mm,
            "true_displacement_mm": device.model.true_displacement_mm,
            "tilt_deg": snap.tilt_deg,
            "heartbeat": snap.heartbeat,
            "link": {
                "down": device.link_down(),
                "garbled": device.garbled(),
                "reply_delay_s": device.reply_delay_s(),
                "down_until_s": link.down_until if device.link_down() else None,
                "garbled_until_s": link.garbled_until if device.garbled() else None,
            },
            "requests": device.requests,
        }

    def _peek(self, name: object) -> tuple[str, Served] | None:
        """The device a request names (or the only one), if there is one; no error."""
        if name is None and len(self.devices) == 1:
            return next(iter(self.devices.items()))
        if isinstance(name, str) and name in self.devices:
            return name, self.devices[name]
        return None

    def _device(self, name: object) -> tuple[str, Served]:
        if name is None:
            if len(self.devices) == 1:
                return next(iter(self.devices.items()))
            names = ", ".join(self.devices)
            raise BadRequest(f"this simulator serves several devices: name one ({names})")
        if not isinstance(name, str) or name not in self.devices:
            names = ", ".join(self.devices)
            raise BadRequest(f"no device {name!r} (devices: {names})")
        return name, self.devices[name]

    @staticmethod
    def _describe(name: str, served: Served) -> dict[str, Any]:
        return {
            "device_name": name,
            "transport": served.transport,
            "protocol": served.protocol,
            **served.endpoint,
        }

    @staticmethod
    def _status(device: SimDevice) -> dict[str, Any]:
        snap = device.advance()
        app = snap.applicator
        link = device.link
        return {
            "time_s": round(device.time_s, 3),
            "state": snap.state.value,
            "termination": snap.termination.value if snap.termination is not None else None,
            "dose_rate_gy_min": snap.dose_rate_gy_min,
            "dose_primary_gy": snap.dose_primary_gy,
            "dose_secondary_gy": snap.dose_secondary_gy,
            "preset_gy": snap.preset_gy,
            "beam_on_s": snap.beam_on_s,
            "kv": snap.kv,
            "ua": snap.ua,
            "interlocks": {str(k): str(v) for k, v in snap.interlocks.items()},
            "applicator": (
                None
                if app is None
                else {"type": app.type, "diameter_mm": app.diameter_mm, "serial": app.serial}
            ),
            "link": {
                "down": device.link_down(),
                "garbled": device.garbled(),
                "reply_delay_s": device.reply_delay_s(),
                "down_until_s": link.down_until if device.link_down() else None,
                "garbled_until_s": link.garbled_until if device.garbled() else None,
            },
            "requests": device.requests,
        }


class _ControlConnection(asyncio.Protocol):
    def __init__(self, server: ControlServer) -> None:
        self._server = server
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, asyncio.Transport):  # pragma: no cover - streams only
            raise TypeError(f"expected a stream transport, got {transport!r}")
        self._transport = transport
        self._server.connections.add(self)
        self._server.idle.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        if not self._server.connections:
            self._server.idle.set()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        t = self._transport
        if t is None or t.is_closing():
            return
        self._buf += data
        while (nl := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[: nl + 1])
            del self._buf[: nl + 1]
            if len(line) > LINE_LIMIT:
                self._refuse(t, f"request longer than {LINE_LIMIT} bytes")
                return
            if line.strip():
                t.write(self._server.handler.handle_line(line))
        if len(self._buf) >= LINE_LIMIT:
            self._refuse(t, f"request longer than {LINE_LIMIT} bytes")
        elif t.get_write_buffer_size() > 16 * LINE_LIMIT:
            t.abort()  # asks and never reads the answers

    @staticmethod
    def _refuse(t: asyncio.Transport, error: str) -> None:
        t.write(orjson.dumps({"ok": False, "error": error}) + b"\n")
        t.close()


class ControlServer:
    """The control channel on a Unix domain socket (mode 0600). ``path=None``: a fresh
    path in a new private temporary directory, removed again by :meth:`close`."""

    def __init__(self, handler: ControlHandler, path: Path | None = None) -> None:
        self.handler = handler
        self._own_dir: Path | None = None
        if path is None:
            self._own_dir = Path(tempfile.mkdtemp(prefix="iort-sim-"))
            path = self._own_dir / "control.sock"
        self.path = path
        self.connections: set[_ControlConnection] = set()
        self.idle = asyncio.Event()  # set while no client is connected
        self.idle.set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        path = self.path
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            raise ControlError(
                f"control socket path {str(path)!r} is longer than {_SUN_PATH_MAX} bytes; "
                "choose a shorter --control path"
            )
        if path.exists() or path.is_symlink():
            self._clear_stale(path)
        old_umask = os.umask(0o177)  # born 0600: no window in which others may connect
        try:
            self._server = await asyncio.get_running_loop().create_unix_server(
                lambda: _ControlConnection(self), str(path)
            )
        except OSError as exc:
            raise ControlError(f"cannot listen on control socket {str(path)!r}: {exc}") from None
        finally:
            os.umask(old_umask)
        path.chmod(0o600)

    @staticmethod
    def _clear_stale(path: Path) -> None:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ControlError(f"{str(path)!r} exists and is not a socket; choose another path")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # left behind by a simulator that was killed
                return
        raise ControlError(f"control socket {str(path)!r} is in use by another simulator")

    async def close(self, timeout_s: float = 2.0) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self.connections):
                conn.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self.idle.wait()  # every connection_lost has run
                    await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None


def request(path: Path, req: Mapping[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
    """Send one request to a simulator's control socket and return its reply.
    Raises ControlError when the simulator cannot be reached or answers nonsense."""
    line = orjson.dumps(dict(req)) + b"\n"
    if len(line) > LINE_LIMIT:
        raise ControlError(f"request longer than {LINE_LIMIT} bytes")
    buf = bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
            sock.sendall(line)
            while b"\n" not in buf and len(buf) < 1 << 20:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except TimeoutError:
            raise ControlError(f"{path}: no reply within {timeout_s:g} s") from None
        except OSError as exc:
            raise ControlError(
                f"cannot reach the simulator's control socket {str(path)!r}: {exc.strerror or exc}"
                " (is `iort-sim serve` running? its 'serving' line names the path)"
            ) from None
    try:
        reply = orjson.loads(bytes(buf).partition(b"\n")[0])
    except orjson.JSONDecodeError:
        raise ControlError(
            f"{path}: the simulator's reply is not JSON: {bytes(buf)[:200]!r}"
        ) from None
    if not isinstance(reply, dict):
        raise ControlError(f"{path}: the simulator's reply is not a JSON object: {reply!r}")
    return reply
