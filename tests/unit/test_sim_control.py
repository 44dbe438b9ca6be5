"""The simulator's control channel (simulators/control.py): the request handler, its
refusals, the Unix socket server and the client `iort-sim ctl` uses; and the devices file
of `iort-sim serve --devices` (simulators/serve.py)."""

from __future__ import annotations

import asyncio
import socket
import stat
from pathlib import Path
from typing import Any

import orjson
import pytest
from manualclock import ManualClock

from iortd.simulators.cli import main
from iortd.simulators.control import (
    LINE_LIMIT,
    ControlError,
    ControlHandler,
    ControlServer,
    Served,
    request,
)
from iortd.simulators.device import SimDevice
from iortd.simulators.model import SourceModel
from iortd.simulators.profiles import load_profile
from iortd.simulators.sequence import ClinicalSequence
from iortd.simulators.serve import SpecError, load_devices


def served(name: str, clock: ManualClock) -> Served:
    model = SourceModel(load_profile("axxent"), seed=3)
    seq = ClinicalSequence(model, preset_gy=5.0, applicator_code="BAL34", start_delay_s=0)
    return Served(SimDevice(name, seq, clock), "modbus-tcp", "XRS-MB/1", {"port": 1502})


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def one(clock: ManualClock) -> ControlHandler:
    handler = ControlHandler({"room-1": served("room-1", clock)})
    clock.at(40.0)  # irradiating
    return handler


@pytest.fixture
def two(clock: ManualClock) -> ControlHandler:
    handler = ControlHandler({"room-1": served("room-1", clock), "room-2": served("room-2", clock)})
    clock.at(40.0)  # both irradiating
    return handler


def ask(handler: ControlHandler, line: bytes | str) -> dict[str, Any]:
    raw = line.encode() if isinstance(line, str) else line
    reply = handler.handle_line(raw)
    assert reply.endswith(b"\n")
    assert reply.count(b"\n") == 1
    out: dict[str, Any] = orjson.loads(reply)
    return out


def test_an_action_is_applied_and_reported(one: ControlHandler) -> None:
    seen: list[tuple[str, str, dict[str, Any]]] = []
    device = one.devices["room-1"].device
    device.on_step = lambda step, source: seen.append((step.action, source, dict(step.args)))
    reply = ask(one, '{"action": "open_door"}')  # one device: no need to name it
    assert reply == {
        "ok": True,
        "device": "room-1",
        "action": "open_door",
        "time_s": 40.0,
        "state": "INTERRUPTED",
    }
    reply = ask(one, '{"device": "room-1", "action": "drop_link", "duration": "2m30s"}')
    assert reply["ok"] is True
    assert device.link.down_until == 190.0
    ask(one, '{"action": "delay_replies", "duration": 5, "delay": "0.8s"}')
    assert device.reply_delay_s() == 0.8
    ask(one, '{"action": "restore_link"}')
    assert not device.link_down()
    ask(one, '{"action": "swap_applicator", "code": "BAL45"}')
    ask(one, '{"action": "swap_applicator", "code": null}')
    ask(one, '{"action": "set_output_factor", "factor": 0.8}')
    assert seen == [
        ("open_door", "control", {}),
        ("drop_link", "control", {"duration_s": 150.0}),
        ("delay_replies", "control", {"duration_s": 5.0, "delay_s": 0.8}),
        ("restore_link", "control", {}),
        ("swap_applicator", "control", {"code": "BAL45"}),
        ("swap_applicator", "control", {"code": None}),
        ("set_output_factor", "control", {"factor": 0.8}),
    ]


def test_status_and_list(two: ControlHandler, clock: ManualClock) -> None:
    ask(two, '{"device": "room-2", "action": "garble", "duration": "10s"}')
    clock.at(45.0)
    status = ask(two, '{"device": "room-2", "action": "status"}')
    assert status["ok"] is True
    assert status["device"] == "room-2"
    assert status["state"] == "IRRADIATING"
    assert status["time_s"] == 45.0
    assert status["dose_primary_gy"] > 0
    assert status["interlocks"]["door"] == "ok"
    assert status["applicator"] == {"type": "balloon", "diameter_mm": 35.0, "serial": "SIM-BAL34"}
    assert status["link"] == {
        "down": False,
        "garbled": True,
        "reply_delay_s": 0.0,
        "down_until_s": None,
        "garbled_until_s": 50.0,
    }
    listing = ask(two, '{"action": "list"}')
    assert listing == {
        "ok": True,
        "devices": [
            {
                "device_name": n,
                "transport": "modbus-tcp",
                "protocol": "XRS-MB/1",
                "port": 1502,
            }
            for n in ("room-1", "room-2")
        ],
    }


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"{not json", "not a JSON object"),
        (b"\xff\xfe", "not a JSON object"),
        (b"[1, 2]", "expected a JSON object"),
        (b'"open_door"', "expected a JSON object"),
        (b"{}", "unknown action None"),
        (b'{"action": "explode"}', "unknown action 'explode' (known: close_door, "),
        (b'{"action": 7}', "unknown action 7"),
        (b'{"action": "open_door", "duration": "5s"}', "unknown argument(s) ['duration']"),
        (b'{"action": "drop_link"}', "drop_link: missing 'duration'"),
        (b'{"action": "drop_link", "duration": "soon"}', "expected a duration like '45s'"),
        (b'{"action": "drop_link", "duration": -1}', "must be > 0"),
        (b'{"action": "drop_link", "duration": true}', "must be a duration"),
        (b'{"action": "drop_link", "duration": 1e999}', "not a JSON object"),  # orjson: inf
        (b'{"action": "drop_link", "duration": "48h"}', "at most 86400 s"),
        (b'{"action": "delay_replies", "duration": "5s", "delay": "2m"}', "at most 60 s"),
        (b'{"action": "set_output_factor", "factor": 3}', "in (0, 2]"),
        (b'{"action": "set_output_factor", "factor": "x"}', "must be a number"),
        (b'{"action": "swap_applicator", "code": 5}', "applicator code or null"),
        (b'{"action": "swap_applicator", "code": "SPH99"}', "unknown applicator 'SPH99'"),
        (b'{"action": "resume"}', "resume: refused in state IRRADIATING"),
        (b'{"action": "status", "device": "room-9"}', "no device 'room-9' (devices: room-1)"),
        (b'{"action": "status", "device": 1}', "no device 1"),
    ],
)
def test_a_bad_request_is_refused_with_a_clear_message(
    one: ControlHandler, line: bytes, error: str
) -> None:
    reply = ask(one, line)
    assert reply["ok"] is False
    assert error in reply["error"]


def test_with_several_devices_a_request_must_name_one(two: ControlHandler) -> None:
    reply = ask(two, '{"action": "open_door"}')
    assert reply == {
        "ok": False,
        "error": "this simulator serves several devices: name one (room-1, room-2)",
    }
    assert ask(two, '{"action": "open_door", "device": "room-2"}')["state"] == "INTERRUPTED"
    assert ask(two, '{"action": "status", "device": "room-1"}')["state"] == "IRRADIATING"


def test_an_unexpected_error_is_an_answer_not_a_crash(one: ControlHandler) -> None:
    def boom(action: str, args: object) -> None:
        raise RuntimeError("model exploded")

    one.devices["room-1"].device.apply = boom  # type: ignore[assignment,method-assign]
    reply = ask(one, '{"action": "open_door"}')
    assert reply == {"ok": False, "error": "internal error: RuntimeError: model exploded"}


# ---- the socket ------------------------------------------------------------------------


async def test_the_socket_is_private_answers_each_line_and_is_removed(
    one: ControlHandler,
) -> None:
    server = ControlServer(one)  # a fresh private directory
    await server.start()
    path = server.path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(b'{"action": "status"}\n\n{"action": "nope"}\n')
    async with asyncio.timeout(2):
        first = orjson.loads(await reader.readline())
        second = orjson.loads(await reader.readline())
    assert first["ok"] is True
    assert second["ok"] is False
    # A line over the limit: one refusal, then the connection is closed.
    writer.write(b"{" + b" " * LINE_LIMIT + b"}\n")
    async with asyncio.timeout(2):
        refusal = orjson.loads(await reader.readline())
        assert await reader.read() == b""
    assert refusal == {"ok": False, "error": f"request longer than {LINE_LIMIT} bytes"}
    writer.close()
    await writer.wait_closed()
    # The sync client of `iort-sim ctl`, from a thread (it blocks).
    reply = await asyncio.to_thread(request, path, {"action": "open_door"}, 2.0)
    assert reply["state"] == "INTERRUPTED"
    await server.close()
    assert not path.exists()
    assert not path.parent.exists()


async def test_a_stale_socket_is_replaced_and_a_live_one_is_not(
    one: ControlHandler, tmp_path: Path
) -> None:
    path = Path(tmp_path / "c.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # left behind, as by a simulator killed with SIGKILL
    first = ControlServer(one, path)
    await first.start()
    try:
        with pytest.raises(ControlError, match="in use by another simulator"):
            await ControlServer(one, path).start()
    finally:
        await first.close()
    assert not await asyncio.to_thread(path.exists)
    await asyncio.to_thread(path.write_text, "not a socket", encoding="utf-8")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        await ControlServer(one, path).start()
    with pytest.raises(ControlError, match="longer than 107 bytes"):
        await ControlServer(one, tmp_path / ("x" * 120)).start()


def test_ctl_without_a_simulator_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ctl", "--control", str(tmp_path / "none.sock"), "status"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the simulator's control socket" in err
    assert "is `iort-sim serve` running?" in err
    assert main(["ctl", "status"]) == 2
    assert "ctl needs --control PATH" in capsys.readouterr().err
    assert main(["ctl", "--control", "x", "drop_link", "5s"]) == 2
    assert "expected key=value" in capsys.readouterr().err


# ---- the devices file ------------------------------------------------------------------

GOOD = """
speed = 2.0
[[device]]
name = "or-1"
transport = "serial"
profile = "axxent"
applicator = "BAL34"
[[device]]
name = "or-2"
transport = "modbus-tcp"
applicator = "SPH30"
port = 0
unit_id = 7
scenario = "link-drop-5s"
"""


def test_the_devices_file(tmp_path: Path) -> None:
    path = tmp_path / "rooms.toml"
    path.write_text(GOOD, encoding="utf-8")
    specs, speed = load_devices(path)
    assert speed == 2.0
    assert [(s.name, s.transport, s.unit_id) for s in specs] == [
        ("or-1", "serial", 1),
        ("or-2", "modbus-tcp", 7),
    ]
    assert specs[0].regmap is None
    assert specs[1].regmap is not None
    assert specs[1].scenario is not None
    assert specs[1].scenario.name == "link-drop-5s"


def test_the_shipped_two_room_example_is_valid() -> None:
    path = Path(__file__).parents[2] / "config" / "sim-two-rooms.toml"
    specs, _ = load_devices(path)
    assert len(specs) == 2
    assert len({s.transport for s in specs}) == 2


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("speed = 1\n", "expected at least one [[device]] table"),
        ("rooms = 1\n[[device]]\n", "unknown key(s) ['rooms']"),
        ("speed = 0\n[[device]]\n", "speed: expected a number in (0, 1000]"),
        ("[[device]]\ntransport = 'serial'\n", "device[0].name: expected a non-empty string"),
        ("[[device]]\nname = 'a b'\n", "device[0].name: use letters"),
        ("[[device]]\nname = 'a'\ntransport = 'usb'\n", "device[0].transport: expected one of"),
        (
            "[[device]]\nname = 'a'\ntransport = 'serial'\napplicator = 'SPH99'\n",
            "device[0].applicator: unknown applicator 'SPH99'",
        ),
        (
            "[[device]]\nname = 'a'\ntransport = 'serial'\napplicator = 'SPH30'\nport = 5\n",
            "device[0].port: only for transport modbus-tcp (this is serial)",
        ),
        (
            "[[device]]\nname = 'a'\ntransport = 'modbus-rtu'\napplicator = 'SPH30'\n"
            "unit_id = 300\n",
            "device[0].unit_id: expected an integer in 1..247",
        ),
        (
            "[[device]]\nname = 'a'\ntransport = 'modbus-tcp'\napplicator = 'SPH30'\npreset = -1\n",
            "device[0].preset: must be > 0",
        ),
        (
            "[[device]]\nname = 'a'\ntransport = 'modbus-tcp'\napplicator = 'SPH30'\n"
            "colour = 'red'\n",
            "device[0]: unknown key(s) ['colour']",
        ),
        (
            "[[device]]\nname = 'a'\ntransport = 'serial'\napplicator = 'SPH30'\n"
            "scenario = 'nope'\n",
            "device[0].scenario:",
        ),
        (
            "[[device]]\nname = 'a'\ntransport = 'modbus-tcp'\napplicator = 'SPH30'\n"
            "map = 'nowhere.toml'\n",
            "device[0].map: {dir}/nowhere.toml: cannot read",  # from the file's directory
        ),
        (
            "[[device]]\nname = 'a'\ntransport = 'serial'\napplicator = 'SPH30'\n"
            "[[device]]\nname = 'a'\ntransport = 'serial'\napplicator = 'SPH30'\n",
            "device[1].name: 'a' is used by an earlier device",
        ),
        (
            "[[device]]\nname = 'a'\ntransport = 'modbus-tcp'\napplicator = 'SPH30'\nport = 1502\n"
            "[[device]]\nname = 'b'\ntransport = 'modbus-tcp'\napplicator = 'SPH30'\nport = 1502\n",
            "device[1].port: 1502 is used by 'a'",
        ),
        ("[[device]\n", "not valid TOML"),
        ("\ufeffspeed = 1\n[[device]]\n", "byte-order mark"),
    ],
)
def test_a_bad_devices_file_names_file_device_and_key(
    tmp_path: Path, text: str, error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "rooms.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SpecError) as excinfo:
        load_devices(path)
    assert str(excinfo.value).startswith(str(path))
    error = error.replace("{dir}", str(tmp_path))
    assert error in str(excinfo.value)
    assert main(["serve", "--devices", str(path)]) == 2  # the command says it and exits 2
    assert error in capsys.readouterr().err


def test_serve_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--transport", "serial"]) == 2
    assert "serve needs --transport and --applicator" in capsys.readouterr().err
    path = tmp_path / "rooms.toml"
    path.write_text(GOOD, encoding="utf-8")
    assert main(["serve", "--devices", str(path), "--applicator", "SPH30"]) == 2
    assert "not --applicator" in capsys.readouterr().err
    assert main(["serve", "--transport", "serial", "--applicator", "SPH30", "--port", "5"]) == 2
    assert "--port: only for transport modbus-tcp" in capsys.readouterr().err
    assert main(["serve", "--transport", "serial", "--applicator", "SPH30", "--speed", "0"]) == 2
    assert "--speed must be in (0, 1000]" in capsys.readouterr().err


def test_relative_paths_in_a_devices_file_resolve_from_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in the site config: ``profile``, ``map`` and ``scenario`` paths are relative to
    the devices file, not to wherever ``iort-sim`` was started."""
    root = Path(__file__).parents[2] / "config"
    sub = tmp_path / "rooms"
    sub.mkdir()
    (sub / "prof.toml").write_bytes((root / "profiles" / "axxent.toml").read_bytes())
    (sub / "map.toml").write_bytes((root / "maps" / "xrs-mb1.toml").read_bytes())
    (sub / "scen.toml").write_bytes((root / "scenarios" / "link-drop-5s.toml").read_bytes())
    path = sub / "rooms.toml"
    path.write_text(
        "[[device]]\nname = 'a'\ntransport = 'modbus-tcp'\napplicator = 'BAL34'\n"
        "profile = 'prof.toml'\nmap = 'map.toml'\nscenario = 'scen.toml'\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)  # not the file's directory
    (spec,) = load_devices(path)[0]
    assert spec.profile.name == load_profile(sub / "prof.toml").name
    assert spec.scenario is not None
    assert spec.scenario.name == "scen"
    assert spec.regmap is not None
    # A built-in name and a bundled scenario stay what they were.
    path.write_text(
        "[[device]]\nname = 'a'\ntransport = 'serial'\napplicator = 'SPH30'\n"
        "profile = 'intrabeam'\nscenario = 'link-drop-5s'\n",
        encoding="utf-8",
    )
    (spec,) = load_devices(path)[0]
    assert spec.scenario is not None
    assert spec.scenario.name == "link-drop-5s"
