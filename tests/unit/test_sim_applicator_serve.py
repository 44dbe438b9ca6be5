"""The applicator reader served (issue 16, part B1): the APL-MB/1 device behind the Modbus
servers (simulators/apl_device.py), its actions from the control channel and from
scenarios, the devices-file keys (``kind``, ``line``, ``reply_delay_ms``), one RTU line
shared by a console and a reader with the line time modelled, and the in-process ``sim``
driver in the applicator role."""

from __future__ import annotations

import asyncio
import math
import os
import struct
import tty
from pathlib import Path
from typing import Any

import orjson
import pytest
from manualclock import ManualClock

from iortd.drivers.interface import ApplicatorDriver, DriverContext, DriverSpec
from iortd.kernel.types import ApplicatorIdentity, ApplicatorState, Tristate
from iortd.simulators.apl_actions import parse_apl_step
from iortd.simulators.apl_device import CATCH_UP_REFRESHES, ApplicatorConsole, ApplicatorDevice
from iortd.simulators.applicator import load_register_map
from iortd.simulators.cli import main
from iortd.simulators.control import ControlHandler, Served
from iortd.simulators.device import ActionError, SimDevice
from iortd.simulators.driver import SimApplicatorDriver, SimDriverFactory
from iortd.simulators.modbus_xrs import (
    ModbusConsole,
    RtuPtyConsole,
    crc16_modbus,
    default_map_path,
    load_map,
)
from iortd.simulators.model import SourceModel
from iortd.simulators.profiles import load_profile
from iortd.simulators.scenario import ScenarioError, load_scenario
from iortd.simulators.sequence import ClinicalSequence
from iortd.simulators.serve import SpecError, build_device, load_devices

SCENARIOS = Path(__file__).parents[2] / "config" / "scenarios"
APL_MAP = load_register_map()


def reader(clock: ManualClock, **kw: Any) -> ApplicatorDevice:
    profile = load_profile("intrabeam")
    return ApplicatorDevice.build("stand-1", profile, "SPH30", clock, seed=4, **kw)


def read(function: int, start: int, count: int) -> bytes:
    return struct.pack(">BHH", function, start, count)


def words(reply: bytes) -> tuple[int, ...]:
    return struct.unpack(f">{reply[1] // 2}H", reply[2:])


def i16(w: int) -> int:
    return w - 0x10000 if w >= 0x8000 else w


# ---- the device and its console ------------------------------------------------------


def test_the_reader_serves_its_registers_and_refreshes_at_least_every_100_ms() -> None:
    clock = ManualClock()
    console = ApplicatorConsole(reader(clock), APL_MAP, unit_id=2)
    clock.at(2.0)  # self-test (1 s) over
    regs = words(console.pdu_reply(read(4, 0, 26)))
    assert regs[0] == 2  # READY
    assert regs[2:5] == (1, 1, 1)  # seated, latched, braked
    assert regs[5:7] == (1, 300)  # spherical, 30.0 mm
    assert regs[19] == 1  # locked once, by the self-test
    assert regs[25] >= 20, "2 s of simulated time: at least 20 refreshes"
    ident = console.pdu_reply(read(3, 100, 72))
    assert ident[2:17] == b"iortd simulator"
    assert console.pdu_reply(read(4, 38, 3)) == bytes([0x84, 2])  # outside 0-39
    assert console.pdu_reply(read(3, 99, 2)) == bytes([0x83, 2])
    assert console.requests == 4


def test_actions_reach_the_model_and_show_in_the_registers() -> None:
    clock = ManualClock()
    device = reader(clock)
    console = ApplicatorConsole(device, APL_MAP, unit_id=2)
    clock.at(2.0)
    device.apply("drift", parse_apl_step("drift", {"rate": 6.0, "direction": "-z"}))
    clock.at(32.0)  # 30 s at 6 mm/min: 3 mm down
    regs = words(console.pdu_reply(read(4, 0, 26)))
    assert i16(regs[22]) == -300
    assert regs[23] == 300
    device.apply("release_brakes", {})
    device.apply("bump", parse_apl_step("bump", {"mm": 4, "direction": "1,0,0"}))
    regs = words(console.pdu_reply(read(4, 0, 26)))
    assert regs[4] == 0  # brakes released
    assert regs[20] == 400
    device.apply("lock", {})  # re-lock: the reference moves, the counter counts
    regs = words(console.pdu_reply(read(4, 0, 26)))
    assert regs[4] == 1
    assert regs[19] == 2
    assert (regs[20], regs[22]) == (0, 0)
    device.apply("unseat", {})
    regs = words(console.pdu_reply(read(4, 0, 26)))
    assert (regs[2], regs[5]) == (0, 0)
    device.apply("seat", parse_apl_step("seat", {"code": "SPH40"}))
    regs = words(console.pdu_reply(read(4, 0, 26)))
    assert (regs[2], regs[6]) == (1, 400)
    device.apply("swap", parse_apl_step("swap", {"code": "SPH30"}))
    regs = words(console.pdu_reply(read(4, 0, 26)))
    assert regs[6] == 300
    assert regs[17] == 3  # seated at start, seat, swap
    device.apply("tilt", parse_apl_step("tilt", {"deg": 1.5}))
    assert words(console.pdu_reply(read(4, 24, 1))) == (150,)
    device.apply("fault", parse_apl_step("fault", {"code": "POSITION"}))
    regs = words(console.pdu_reply(read(4, 0, 26)))
    assert (regs[0], regs[1], regs[20]) == (3, 2, 0x8000)
    device.apply("clear_fault", {})
    assert words(console.pdu_reply(read(4, 0, 2))) == (2, 0)


def test_a_refused_action_names_itself_and_the_model_is_unchanged() -> None:
    clock = ManualClock()
    device = reader(clock)
    clock.at(2.0)
    with pytest.raises(ActionError, match="seat: an applicator is already seated"):
        device.apply("seat", {})
    with pytest.raises(ActionError, match=r"swap: unknown applicator 'XYZ'"):
        device.apply("swap", {"code": "XYZ"})


@pytest.mark.parametrize(
    ("action", "raw", "message"),
    [
        ("drift", {}, "drift: missing 'rate'"),
        ("drift", {"rate": -1}, "drift: 'rate' must be a number of mm/min in 0..1000"),
        ("drift", {"rate": 1, "direction": "w"}, "drift: 'direction'"),
        ("drift", {"rate": 1, "direction": "0,0,0"}, "drift: 'direction'"),
        ("bump", {"mm": "3"}, "bump: 'mm' must be a number"),
        ("bump", {"mm": 400}, "bump: 'mm' must be"),
        ("tilt", {"deg": 1, "direction": "1,0,0"}, "tilt: 'direction'"),
        ("lock", {"now": True}, "lock: unknown argument(s) ['now'] (takes: no arguments)"),
        ("swap", {}, "swap: missing 'code'"),
        ("fault", {"code": "SMOKE"}, "fault: 'code' must be one of"),
        ("drop_link", {"duration": "soon"}, "drop_link: 'duration'"),
        ("levitate", {}, "unknown action 'levitate'"),
    ],
)
def test_bad_arguments_are_refused_naming_action_and_key(
    action: str, raw: dict[str, Any], message: str
) -> None:
    with pytest.raises(
        ValueError,
        match=message.replace("(", r"\(")
        .replace(")", r"\)")
        .replace("[", r"\[")
        .replace("]", r"\]"),
    ):
        parse_apl_step(action, raw)


def test_link_loss_and_reply_delay() -> None:
    clock = ManualClock()
    device = reader(clock, reply_delay_s=0.15)
    clock.at(2.0)
    assert device.reply_delay_s() == 0.15
    device.apply("drop_link", parse_apl_step("drop_link", {"duration": "10s"}))
    assert device.link_down()
    clock.at(12.5)
    device.advance()  # the servers ask after the request's tick
    assert not device.link_down()


# ---- the control channel -------------------------------------------------------------


def test_control_channel_drives_a_reader_beside_a_console() -> None:
    clock = ManualClock()
    model = SourceModel(load_profile("intrabeam"), seed=3)
    seq = ClinicalSequence(model, preset_gy=5.0, applicator_code="SPH30", start_delay_s=0)
    source = Served(SimDevice("room-1", seq, clock), "modbus-rtu", "XRS-MB/1")
    stand = Served(reader(clock), "modbus-rtu", "APL-MB/1")
    handler = ControlHandler({"room-1": source, "stand-1": stand})
    clock.at(2.0)

    def ask(req: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = orjson.loads(handler.handle_line(orjson.dumps(req)))
        return reply

    ok = ask({"device": "stand-1", "action": "drift", "rate": 1.2, "direction": "x"})
    assert ok["ok"] is True, ok
    assert ok["state"] == "READY"
    bad = ask({"device": "stand-1", "action": "drift", "rate": "fast"})
    assert bad == {
        "ok": False,
        "error": "drift: 'rate' must be a number of mm/min in 0..1000, got 'fast'",
    }
    refused = ask({"device": "stand-1", "action": "open_door"})
    assert "unknown action 'open_door'" in refused["error"]
    assert "release_brakes" in refused["error"]
    clock.at(62.0)
    status = ask({"device": "stand-1", "action": "status"})
    assert status["ok"] is True
    assert status["brakes_engaged"] is True
    assert status["applicator"] == {"type": "spherical", "diameter_mm": 30.0, "serial": "SIM-SPH30"}
    assert math.isclose(status["true_displacement_mm"][0], 1.2, abs_tol=1e-9)
    # the source's applicator is changed apart from the reader's
    assert ask({"device": "room-1", "action": "swap_applicator", "code": "SPH40"})["ok"]
    assert ask({"device": "stand-1", "action": "status"})["applicator"]["diameter_mm"] == 30.0


# ---- scenarios -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["stand-drift", "brakes-released"])
def test_the_shipped_applicator_scenarios_load(name: str) -> None:
    scenario = load_scenario(SCENARIOS / f"{name}.toml", kind="applicator")
    assert scenario.steps


def test_a_scenario_step_for_the_wrong_kind_is_refused_naming_file_step_and_key(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.toml"
    body = '[[step]]\nat = "5s"\naction = "drift"\nrate = "x"\n'
    path.write_text(f'kind = "applicator"\n{body}', encoding="utf-8")
    with pytest.raises(ScenarioError, match=r"s.toml: step\[0\]: drift: 'rate'"):
        load_scenario(path)
    with pytest.raises(ScenarioError, match="for a device of kind 'applicator', not 'source'"):
        load_scenario(path, kind="source")
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ScenarioError, match=r"step\[0\].action: unknown action 'drift'"):
        load_scenario(path)


def test_scenario_steps_act_at_their_time() -> None:
    clock = ManualClock()
    scenario = load_scenario(SCENARIOS / "brakes-released.toml", kind="applicator")
    device = reader(clock, scenario=scenario)
    console = ApplicatorConsole(device, APL_MAP, unit_id=2)
    at = scenario.steps[0].at_s
    clock.at(at + 0.05)
    assert words(console.pdu_reply(read(4, 4, 1))) == (0,)  # released


# ---- the devices file ----------------------------------------------------------------


def test_devices_file_with_a_reader_beside_a_console_on_one_shared_line(tmp_path: Path) -> None:
    path = tmp_path / "room.toml"
    path.write_text(
        '[[device]]\nname = "console"\ntransport = "modbus-rtu"\napplicator = "SPH30"\n'
        'line = "rs485"\nbaudrate = 38400\n'
        '[[device]]\nname = "stand"\nkind = "applicator"\ntransport = "modbus-rtu"\n'
        'applicator = "SPH30"\nline = "rs485"\nbaudrate = 38400\nreply_delay_ms = 150\n'
        'scenario = "stand-drift"\n',
        encoding="utf-8",
    )
    specs, _ = load_devices(path)
    assert [(s.kind, s.unit_id, s.line) for s in specs] == [
        ("source", 1, "rs485"),
        ("applicator", 2, "rs485"),
    ]
    assert specs[1].reply_delay_s == 0.15


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('kind = "stand"\ntransport = "modbus-tcp"', "device[0].kind: expected one of"),
        ('kind = "applicator"\ntransport = "serial"', "device[0].transport: an applicator"),
        ('kind = "applicator"\ntransport = "modbus-tcp"\npreset = 5', "device[0].preset: only"),
        ('transport = "modbus-tcp"\nline = "a"', "device[0].line: only for transport modbus-rtu"),
        (
            'kind = "applicator"\ntransport = "modbus-tcp"\nscenario = "door-mid-delivery"',
            "device[0].scenario:",
        ),
    ],
)
def test_devices_file_refusals_name_the_key(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "room.toml"
    path.write_text(f'[[device]]\nname = "d"\napplicator = "SPH30"\n{body}\n', encoding="utf-8")
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_devices(path)


def test_devices_on_one_line_must_agree(tmp_path: Path) -> None:
    path = tmp_path / "room.toml"
    line = 'transport = "modbus-rtu"\napplicator = "SPH30"\nline = "a"\n'
    path.write_text(
        f'[[device]]\nname = "c"\n{line}baudrate = 19200\n'
        f'[[device]]\nname = "s"\nkind = "applicator"\n{line}baudrate = 38400\n'
        f'[[device]]\nname = "t"\nkind = "applicator"\n{line}baudrate = 19200\n',
        encoding="utf-8",
    )
    with pytest.raises(SpecError, match=r"device\[1\].baudrate: 38400, but line 'a' runs at 19200"):
        load_devices(path)


# ---- one shared RTU line ---------------------------------------------------------------


def rtu(*body: int) -> bytes:
    frame = bytes(body)
    return frame + crc16_modbus(frame).to_bytes(2, "little")


async def read_pty(fd: int, n: int, within_s: float) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    ready = asyncio.Event()
    loop.add_reader(fd, ready.set)
    try:
        async with asyncio.timeout(within_s):
            while len(out) < n:
                await ready.wait()
                ready.clear()
                try:
                    out += os.read(fd, n - len(out))
                except BlockingIOError:
                    continue
    finally:
        loop.remove_reader(fd)
    return bytes(out)


@pytest.mark.parametrize("baudrate", [19200, 38400])
async def test_one_rtu_line_two_units_line_time_and_one_slow_unit(baudrate: int) -> None:
    clock = ManualClock()
    model = SourceModel(load_profile("intrabeam"), seed=3)
    seq = ClinicalSequence(model, preset_gy=5.0, applicator_code="SPH30", start_delay_s=0)
    source = SimDevice("room-1", seq, clock)
    console = ModbusConsole(source, load_map(default_map_path()), unit_id=1)
    stand = reader(clock)
    line = RtuPtyConsole(
        console, others=[ApplicatorConsole(stand, APL_MAP, unit_id=2)], baudrate=baudrate
    )
    line.start()
    fd = os.open(line.device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(fd)
    loop = asyncio.get_running_loop()
    try:
        clock.at(2.0)
        measured = {}
        for unit, function, count in ((1, 4, 38), (2, 4, 26)):
            t0 = loop.time()
            os.write(fd, rtu(unit, function, 0, 0, 0, count))
            reply = await read_pty(fd, 5 + 2 * count, within_s=2)
            measured[unit] = loop.time() - t0
            assert reply[0] == unit
            assert crc16_modbus(reply[:-2]) == int.from_bytes(reply[-2:], "little")
        computed = {1: (8 + 81) * 11 / baudrate, 2: (8 + 57) * 11 / baudrate}
        print(f"line time at {baudrate} baud: measured {measured}, computed {computed}")  # noqa: T201
        for unit in (1, 2):
            assert measured[unit] >= computed[unit] * 0.95
            assert measured[unit] < computed[unit] + 1.0, "bounded on a loaded machine"
        # A unit nobody serves on this line: no answer.
        os.write(fd, rtu(3, 4, 0, 0, 0, 1))
        with pytest.raises(TimeoutError):
            await read_pty(fd, 1, within_s=0.2)
        # The reader slow by 150 ms: its replies wait, the console's do not.
        stand.reply_delay_base_s = 0.15
        t0 = loop.time()
        os.write(fd, rtu(2, 4, 0, 0, 0, 1))
        assert (await read_pty(fd, 7, within_s=2))[0] == 2
        assert loop.time() - t0 >= 0.15
        t0 = loop.time()
        os.write(fd, rtu(1, 4, 0, 0, 0, 1))
        assert (await read_pty(fd, 7, within_s=2))[0] == 1
        assert loop.time() - t0 < 0.15 + computed[1], "the console is not held by the reader"
    finally:
        os.close(fd)
        await line.close()


# ---- the in-process sim driver as an applicator ----------------------------------------


async def test_the_sim_driver_plays_the_applicator_role() -> None:
    factory = SimDriverFactory()
    assert "applicator" in factory.roles
    options = {"applicator": "SPH30", "seed": 2}
    factory.validate(options, {})
    clock = ManualClock()
    spec = DriverSpec("stand", "applicator", 0.1, 0.5, {}, options)
    driver = factory.create(spec, DriverContext(clock=clock, seed=1))
    assert isinstance(driver, SimApplicatorDriver)
    assert isinstance(driver, ApplicatorDriver), "what the daemon's device loop checks"
    async with driver:
        clock.at(0.5)
        first = await driver.read_applicator()
        assert first.state is ApplicatorState.SELF_TEST
        clock.at(2.0)
        reading = await driver.read_applicator()
        assert reading.simulated is True
        assert reading.state is ApplicatorState.READY
        assert reading.seated is Tristate.YES
        assert reading.brakes_engaged is Tristate.YES
        assert reading.applicator is not None
        assert reading.applicator.serial == "SIM-SPH30"
        assert reading.displacement_mm == (0.0, 0.0, 0.0)
        assert reading.displacement_magnitude_mm == 0.0
        assert reading.lock_counter == 1
        assert reading.heartbeat is not None
        assert reading.heartbeat >= 15
        driver.model.drift(6.0, (0.0, 1.0, 0.0))
        clock.at(12.0)
        moved = await driver.read_applicator()
        assert moved.displacement_mm is not None
        assert math.isclose(moved.displacement_mm[1], 1.0, abs_tol=1e-9)


# ---- the command line and the entry point ----------------------------------------------


def test_serve_flags_for_a_reader_are_checked_like_the_file_keys(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "--kind", "applicator", "--transport", "serial"]) == 2
    assert "--transport: an applicator reader speaks APL-MB/1" in capsys.readouterr().err
    assert (
        main(["serve", "--kind", "applicator", "--transport", "modbus-tcp", "--preset", "5"]) == 2
    )
    assert "--preset: only for kind source" in capsys.readouterr().err
    assert (
        main(
            [
                "serve",
                "--transport",
                "modbus-tcp",
                "--applicator",
                "SPH30",
                "--reply-delay-ms",
                "-1",
            ]
        )
        == 2
    )
    assert "--reply-delay-ms: must be >= 0" in capsys.readouterr().err


def test_modbus_apl_is_an_installed_driver() -> None:
    from importlib.metadata import entry_points  # noqa: PLC0415

    from iortd.drivers.modbus_apl import ModbusAplFactory  # noqa: PLC0415

    found = {e.name: e for e in entry_points(group="iort.drivers")}
    assert "modbus-apl" in found
    assert found["modbus-apl"].load() is ModbusAplFactory


def test_reply_delay_ms_reaches_a_console_and_a_reader(tmp_path: Path) -> None:
    path = tmp_path / "room.toml"
    path.write_text(
        '[[device]]\nname = "c"\ntransport = "modbus-tcp"\napplicator = "SPH30"\n'
        "reply_delay_ms = 150\n"
        '[[device]]\nname = "s"\nkind = "applicator"\ntransport = "modbus-tcp"\n'
        "reply_delay_ms = 40\n",
        encoding="utf-8",
    )
    specs, _ = load_devices(path)
    clock = ManualClock()
    built = [build_device(spec, clock, lambda *_a, **_k: None) for spec in specs]
    assert [d.reply_delay_s() for d in built] == [0.15, 0.04]
    assert isinstance(built[1], ApplicatorDevice)
    assert built[1].model.snapshot().applicator is None, "no applicator key: none seated"


def test_a_reader_whose_applicator_type_the_map_cannot_name_is_refused(tmp_path: Path) -> None:
    profile = tmp_path / "odd.toml"
    base = (Path(__file__).parents[2] / "config" / "profiles" / "intrabeam.toml").read_text()
    profile.write_text(base.replace('type = "spherical"', 'type = "conical"'), encoding="utf-8")
    path = tmp_path / "room.toml"
    path.write_text(
        f'[[device]]\nname = "s"\nkind = "applicator"\ntransport = "modbus-tcp"\n'
        f'profile = "{profile}"\napplicator = "SPH30"\n',
        encoding="utf-8",
    )
    with pytest.raises(SpecError, match=r"device\[0\].applicator: type 'conical'"):
        load_devices(path)


def test_an_image_the_map_cannot_encode_is_a_device_failure_not_a_crash() -> None:
    clock = ManualClock()
    device = reader(clock)
    console = ApplicatorConsole(device, APL_MAP, unit_id=2)
    clock.at(2.0)
    device.model.swap(ApplicatorIdentity("conical", 30.0, "X-1"))
    assert console.pdu_reply(read(4, 0, 26)) == bytes([0x84, 4])  # SERVER DEVICE FAILURE
    device.apply("swap", parse_apl_step("swap", {"code": "SPH40"}))
    assert words(console.pdu_reply(read(4, 6, 1))) == (400,)  # and it goes on


def test_a_reader_action_without_a_device_says_which_devices_are_readers() -> None:
    clock = ManualClock()
    model = SourceModel(load_profile("intrabeam"), seed=3)
    seq = ClinicalSequence(model, preset_gy=5.0, applicator_code="SPH30", start_delay_s=0)
    handler = ControlHandler(
        {
            "room-1": Served(SimDevice("room-1", seq, clock), "modbus-tcp", "XRS-MB/1"),
            "stand-1": Served(reader(clock), "modbus-tcp", "APL-MB/1"),
        }
    )
    reply = orjson.loads(handler.handle_line(b'{"action": "release_brakes"}'))
    assert reply == {
        "ok": False,
        "error": "release_brakes is an applicator reader's action: name the device "
        "(readers: stand-1)",
    }


def test_a_long_unpolled_gap_is_caught_up_in_bounded_work() -> None:
    clock = ManualClock()
    device = reader(clock)
    clock.at(2.0)
    device.apply("drift", parse_apl_step("drift", {"rate": 0.01, "direction": "x"}))
    before = device.advance().heartbeat
    clock.at(2.0 + 10 * 3600)  # ten hours nobody asked (360,000 refresh periods)
    snap = device.advance()
    assert snap.displacement_mm is not None
    assert math.isclose(snap.displacement_mm[0], 6.0, abs_tol=1e-6)  # 600 min x 0.01
    assert 0 < (snap.heartbeat - before) % 0x10000 <= CATCH_UP_REFRESHES + 1
