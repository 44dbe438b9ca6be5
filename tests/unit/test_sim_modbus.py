"""The simulator's side of XRS-MB/1 (simulators/modbus_xrs/): the register image of a
known snapshot, every exception of docs/protocols.md, RTU framing and CRC, and the link
faults over TCP and RTU.

Checked against docs/protocols.md by hand (golden values), never against the host's
driver: the two sides are independent readings of the specification (an interop test
with a third-party master, mbpoll, is in tests/integration/test_sim_modbus_interop.py).
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import struct
import tty
from pathlib import Path
from types import MappingProxyType

import pytest
from manualclock import ManualClock

from iortd.kernel.types import (
    ApplicatorIdentity,
    DeviceIdentity,
    DeviceState,
    Interlock,
    InterlockState,
    TerminationStatus,
)
from iortd.simulators import modbus_xrs
from iortd.simulators.device import SimDevice
from iortd.simulators.modbus_xrs import (
    MapError,
    ModbusConsole,
    ModbusTcpServer,
    RtuFramer,
    RtuPtyConsole,
    build_image,
    crc16_modbus,
    default_map_path,
    line_time_s,
    load_map,
)
from iortd.simulators.model import ModelSnapshot, SourceModel
from iortd.simulators.profiles import load_profile
from iortd.simulators.sequence import ClinicalSequence

MAP = load_map(default_map_path())
IDENT = DeviceIdentity("iortd simulator", "XRS-50", "SIM-0042", "sim-1.0", simulated=True)


def snapshot(**changes: object) -> ModelSnapshot:
    locks = dict.fromkeys(Interlock, InterlockState.OK)
    locks[Interlock.DOOR] = InterlockState.TRIPPED
    del locks[Interlock.COOLING]  # a console that cannot tell: unknown
    fields: dict[str, object] = {
        "time_s": 100.0,
        "state": DeviceState.IRRADIATING,
        "termination": None,
        "termination_reason": None,
        "dose_rate_gy_min": 2.75,
        "dose_primary_gy": 9.64123,
        "dose_secondary_gy": 9.63871,
        "preset_gy": 20.0,
        "beam_on_s": 723.14,
        "backup_timer_limit_s": 528.0,
        "kv": 50.02,
        "ua": 299.87,
        "interlocks": MappingProxyType(locks),
        "applicator": ApplicatorIdentity("balloon", 35.0, "APP-0042"),
        "plan_applicator_code": "BAL34",
        "expected_rate_gy_min": 2.5,
    }
    fields.update(changes)
    return ModelSnapshot(**fields)  # type: ignore[arg-type]


def text_regs(text: str, n: int) -> list[int]:
    raw = text.encode("ascii").ljust(2 * n, b"\0")
    return [raw[i] << 8 | raw[i + 1] for i in range(0, 2 * n, 2)]


def regs(image: dict[str, dict[int, int]], table: str, start: int, n: int) -> list[int]:
    return [image[table].get(a, 0) for a in range(start, start + n)]


# ---- register image ------------------------------------------------------------------


def test_the_image_of_a_known_snapshot_is_what_the_register_table_says() -> None:
    image = build_image(MAP, snapshot(), IDENT, "door-mid-delivery 0123456789ab")
    assert regs(image, "input", 0, 36) == [
        5,  # state IRRADIATING
        0,  # termination: none yet
        0x0000, 27500,  # dose_rate 2.75 Gy/min / 0.0001
        0x000E, 0xB61B,  # dose_primary 9.64123 Gy / 0.00001 = 964123, high word first
        0x000E, 0xB51F,  # dose_secondary 963871
        0x41A0, 0x0000,  # preset 20.0 as f32
        0x0001, 0x1A7A,  # beam_on_time 723.14 s / 0.01 = 72314
        0x0000, 4800,  # planned_time 20 Gy / 2.5 Gy/min = 480 s / 0.1
        5002,  # kv 50.02 / 0.01
        29987,  # ua 299.87 / 0.01
        1, 0, 0, 0, 0, 2, 0, 0, 0,  # interlocks: door tripped, cooling unknown
        5,  # applicator.type balloon
        350,  # diameter 35.0 mm / 0.1
        *text_regs("APP-0042", 8),
        1000,  # extra.rate_deviation +10.00 % / 0.01
    ]  # fmt: skip
    assert regs(image, "input", 36, 4) == [0, 0, 0, 0]
    assert regs(image, "holding", 100, 72) == [
        *text_regs("iortd simulator", 16),
        *text_regs("XRS-50", 8),
        *text_regs("SIM-0042", 8),
        *text_regs("sim-1.0", 8),
        *text_regs("door-mid-delivery 0123456789ab", 32),
    ]


@pytest.mark.parametrize(
    ("changes", "address", "expected"),
    [
        ({"state": DeviceState.UNKNOWN}, 0, [8]),  # no code for UNKNOWN: FAULT's
        ({"state": DeviceState.EMERGENCY_STOP}, 0, [9]),
        ({"termination": TerminationStatus.MACHINE}, 1, [3]),
        ({"termination": TerminationStatus.UNKNOWN}, 1, [4]),
        ({"applicator": None}, 25, [0, 0, *[0] * 8]),  # none attached
        ({"applicator": ApplicatorIdentity("cone", 3.0, "X")}, 25, [0xFFFF, 30]),  # no code
        ({"expected_rate_gy_min": None}, 12, [0xFFFF, 0xFFFF]),  # planned: missing
        ({"expected_rate_gy_min": None}, 35, [0]),
        ({"state": DeviceState.INTERRUPTED}, 35, [0]),  # deviation only while irradiating
        ({"dose_rate_gy_min": 2.25}, 35, [(-1000) & 0xFFFF]),  # -10 %, two's complement
        ({"dose_rate_gy_min": 0.0}, 35, [(-10000) & 0xFFFF]),
        ({"dose_rate_gy_min": 100.0}, 35, [0x7FFF]),  # clamped to i16
        ({"dose_primary_gy": -1.0}, 4, [0, 0]),  # clamped to u32
        ({"dose_primary_gy": 1e9}, 4, [0xFFFF, 0xFFFF]),
        ({"kv": 1000.0}, 14, [0xFFFF]),  # clamped to u16
        ({"applicator": ApplicatorIdentity("flat", 4.0, "A\x01\xe9B")}, 27, text_regs("A??B", 2)),
    ],
)
def test_value_tables_missing_values_and_clamping(
    changes: dict[str, object], address: int, expected: list[int]
) -> None:
    image = build_image(MAP, snapshot(**changes), IDENT)
    assert regs(image, "input", address, len(expected)) == expected


def test_identity_strings_are_cut_to_their_registers() -> None:
    long = DeviceIdentity("m" * 40, "x", "s", "f", simulated=True)
    image = build_image(MAP, snapshot(), long)
    assert regs(image, "holding", 100, 16) == text_regs("m" * 32, 16)
    assert image["holding"][116] == ord("x") << 8


def test_a_map_with_little_word_order_bits_and_other_units(tmp_path: Path) -> None:
    path = tmp_path / "other.toml"
    path.write_text(
        'format = "iortd-register-map/1"\nname = "other"\nword_order = "little"\n'
        '[values.state]\n5 = "IRRADIATING"\n'
        '[[point]]\nname = "state"\ntable = "input"\naddress = 0\ntype = "u16"\n'
        'values = "state"\n'
        '[[point]]\nname = "dose_primary"\ntable = "input"\naddress = 2\ntype = "u32"\n'
        'unit = "cGy"\n'
        '[[point]]\nname = "dose_rate"\ntable = "input"\naddress = 4\ntype = "i32"\n'
        'unit = "mGy/s"\nword_order = "big"\n'
        '[[point]]\nname = "planned_time"\ntable = "input"\naddress = 7\ntype = "i16"\n'
        "missing = 32768\n"
        '[[point]]\nname = "interlock.door"\ntable = "input"\naddress = 6\ntype = "u16"\n'
        'bit = 3\nvalues = "interlock"\n'
        '[[point]]\nname = "interlock.kv"\ntable = "input"\naddress = 6\ntype = "u16"\n'
        'bit = 4\nvalues = "interlock"\n'
        '[values.interlock]\n0 = "ok"\n1 = "tripped"\n',
        encoding="utf-8",
    )
    snap = snapshot(dose_primary_gy=700.0, expected_rate_gy_min=None)
    image = build_image(load_map(path), snap, IDENT)
    # 70000 cGy, low word first; 2.75 Gy/min = 45.83 mGy/s -> 46, high word first; door
    # tripped in bit 3, kV ok in bit 4; no planned time: the i16 sentinel 0x8000
    assert regs(image, "input", 0, 8) == [5, 0, 70000 & 0xFFFF, 1, 0, 46, 1 << 3, 0x8000]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('format = "nope"\n', "key 'format'"),
        ('format = "iortd-register-map/1"\nbogus = 1\n', "unknown key"),
        (
            'format = "iortd-register-map/1"\n[[point]]\nname = "kv"\ntable = "input"\n'
            'address = 39\ntype = "u32"\n',
            "outside the input window 0..39",
        ),
        (
            'format = "iortd-register-map/1"\n[[point]]\nname = "kv"\ntable = "input"\n'
            'address = 1\ntype = "u16"\n[[point]]\nname = "ua"\ntable = "input"\n'
            'address = 0\ntype = "u32"\n',
            "overlaps 'kv'",
        ),
        (
            'format = "iortd-register-map/1"\n[[point]]\nname = "state"\ntable = "input"\n'
            'address = 0\ntype = "u16"\nvalues = "nope"\n',
            "no value table 'nope'",
        ),
        (
            'format = "iortd-register-map/1"\n[[point]]\nname = "kv"\ntable = "input"\n'
            'address = 0\ntype = "u16"\nunit = "furlong"\n',
            "point[0] (kv).unit",
        ),
    ],
)
def test_a_bad_map_is_refused_naming_the_key(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(MapError, match=re.escape(message)):
        load_map(path)


# ---- requests, replies, exceptions ---------------------------------------------------


def make_device(seed: int = 1) -> tuple[SimDevice, ManualClock]:
    clock = ManualClock()
    model = SourceModel(load_profile("axxent"), seed=seed, serial="SIM-0042")
    seq = ClinicalSequence(model, preset_gy=5.0, applicator_code="BAL34", start_delay_s=0)
    return SimDevice("room-1", seq, clock), clock


@pytest.fixture
def console() -> ModbusConsole:
    device, clock = make_device()
    clock.at(40.0)  # irradiating
    return ModbusConsole(device, MAP, unit_id=1)


def read(function: int, start: int, count: int) -> bytes:
    return struct.pack(">BHH", function, start, count)


def test_a_read_is_one_snapshot_and_counts_as_one_request(console: ModbusConsole) -> None:
    reply = console.pdu_reply(read(4, 0, 40))
    assert reply[:2] == bytes([4, 80])
    assert struct.unpack(">40H", reply[2:])[0] == 5  # IRRADIATING
    assert console.requests == 1
    assert console.device.time_s == 40.0
    reply = console.pdu_reply(read(3, 100, 72))
    assert reply[:2] == bytes([3, 144])
    assert reply[2:17] == b"iortd simulator"
    assert console.requests == 2


@pytest.mark.parametrize(
    ("pdu", "reply"),
    [
        (read(4, 0, 40), None),
        (read(4, 39, 1), None),
        (read(3, 100, 72), None),
        (read(3, 171, 1), None),
        (read(4, 38, 3), bytes([0x84, 0x02])),  # past the input window
        (read(4, 100, 1), bytes([0x84, 0x02])),  # holding addresses through 04
        (read(3, 0, 1), bytes([0x83, 0x02])),  # input addresses through 03
        (read(3, 99, 2), bytes([0x83, 0x02])),
        (read(3, 171, 2), bytes([0x83, 0x02])),
        (read(3, 0xFFFF, 125), bytes([0x83, 0x02])),
        (read(4, 0, 0), bytes([0x84, 0x03])),  # count 0
        (read(3, 100, 126), bytes([0x83, 0x03])),  # count over 125 (before the address)
        (read(4, 0, 40) + b"\0", bytes([0x84, 0x03])),  # malformed request
        (bytes([0x06, 0, 100, 0, 5]), bytes([0x86, 0x01])),  # write single register
        (bytes([0x10, 0, 100, 0, 1, 2, 0, 5]), bytes([0x90, 0x01])),  # write multiple
        (bytes([0x01, 0, 0, 0, 1]), bytes([0x81, 0x01])),  # coils
        (bytes([0x2B, 0x0E, 1, 0]), bytes([0xAB, 0x01])),  # device identification
        (b"", bytes([0x80, 0x01])),
    ],
)
def test_every_exception_of_the_specification(
    console: ModbusConsole, pdu: bytes, reply: bytes | None
) -> None:
    got = console.pdu_reply(pdu)
    if reply is None:
        assert got[:2] == bytes([pdu[0], 2 * struct.unpack(">H", pdu[3:5])[0]])
    else:
        assert got == reply


def test_tcp_echoes_the_transaction_and_answers_another_unit_with_0b(
    console: ModbusConsole,
) -> None:
    reply = console.tcp_reply(struct.pack(">HHHB", 0xBEEF, 0, 6, 1) + read(4, 0, 2))
    assert reply == struct.pack(">HHHB", 0xBEEF, 0, 7, 1) + bytes([4, 4, 0, 5, 0, 0])
    reply = console.tcp_reply(struct.pack(">HHHB", 7, 0, 6, 9) + read(4, 0, 2))
    assert reply == struct.pack(">HHHB", 7, 0, 3, 9) + bytes([0x84, 0x0B])


def rtu(*body: int) -> bytes:
    frame = bytes(body)
    return frame + crc16_modbus(frame).to_bytes(2, "little")


def test_crc16_modbus_check_value_and_byte_order() -> None:
    assert crc16_modbus(b"123456789") == 0x4B37
    # A well-known request: read 1 holding register at 0 from unit 1 = 01 03 00 00 00 01 84 0A
    assert rtu(1, 3, 0, 0, 0, 1) == bytes.fromhex("010300000001840a")


def test_rtu_replies_only_to_its_address_with_a_good_crc(console: ModbusConsole) -> None:
    reply = console.rtu_reply(rtu(1, 4, 0, 0, 0, 1))
    assert reply == rtu(1, 4, 2, 0, 5)
    assert console.rtu_reply(rtu(1, 6, 0, 100, 0, 5)) == rtu(1, 0x86, 1)
    bad = bytearray(rtu(1, 4, 0, 0, 0, 1))
    bad[-1] ^= 0x01
    assert console.rtu_reply(bytes(bad)) is None  # bad CRC: not answered
    assert console.rtu_reply(rtu(2, 4, 0, 0, 0, 1)) is None  # another device's
    assert console.rtu_reply(rtu(0, 4, 0, 0, 0, 1)) is None  # broadcast: reads need a reply


def test_the_rtu_framer_finds_frames_in_pieces_and_after_noise() -> None:
    framer = RtuFramer()
    frame = rtu(1, 4, 0, 0, 0, 40)
    assert framer.feed(frame[:3]) == []
    assert framer.feed(frame[3:]) == [frame]
    assert framer.feed(b"\x07\x04\x99" + frame) == [frame]  # noise, then resynchronised
    assert framer.dropped == 3
    write = rtu(1, 0x10, 0, 100, 0, 2, 4, 0, 1, 0, 2)
    assert framer.feed(write + frame) == [write, frame]
    odd = rtu(1, 0x2B, 0x0E, 1, 0)  # a function of unknown length: whole buffer, good CRC
    assert framer.feed(odd) == [odd]
    assert framer.feed(b"\x01\x41\x42") == []  # unknown function, no good CRC: wait
    assert framer.pending == 3
    assert framer.idle() == []  # the line went quiet: noise dropped
    assert framer.pending == 0
    assert framer.feed(b"\x55\x66") == []
    assert framer.feed(frame) == [frame]  # noise of an unknown function: dropped at once
    assert framer.pending == 0


def test_line_time_of_the_rtu_model() -> None:
    # A 40-register read: 8-byte request, 85-byte reply, 11 bits a character.
    assert line_time_s(8 + 85, 19200) == pytest.approx(93 * 11 / 19200)
    assert line_time_s(93, 19200) == pytest.approx(0.0533, abs=1e-4)
    assert line_time_s(93, 0) == 0.0


def test_the_codec_is_independent_of_the_driver_and_of_pymodbus() -> None:
    # Every module of the package, and the driver's modules by their namespaced names.
    modules = sorted(Path(modbus_xrs.__file__).parent.glob("*.py"))
    assert len(modules) > 1, "simulators/modbus_xrs/ should be a package of several modules"
    imported = set()
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
    assert not [m for m in imported if m.startswith(("pymodbus", "iortd.drivers.modbus"))]
    assert imported & {"iortd.kernel.types"}  # types are shared; codecs are not


# ---- over TCP ------------------------------------------------------------------------


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, frame: bytes
) -> bytes:
    writer.write(frame)
    await writer.drain()
    async with asyncio.timeout(2):
        header = await reader.readexactly(7)
        _, _, length, _ = struct.unpack(">HHHB", header)
        return header + await reader.readexactly(length - 1)


def mbap(tid: int, pdu: bytes, unit: int = 1) -> bytes:
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


async def test_tcp_server_serves_several_clients_and_drops_a_garbage_header(
    console: ModbusConsole,
) -> None:
    server = ModbusTcpServer(console)
    await server.start()
    try:
        a = await asyncio.open_connection("127.0.0.1", server.port)
        b = await asyncio.open_connection("127.0.0.1", server.port)
        reply = await exchange(*a, mbap(1, read(4, 0, 1)))
        assert reply == mbap(1, bytes([4, 2, 0, 5]))
        # Two requests in one segment, the second split across two writes.
        both = mbap(2, read(4, 0, 1)) + mbap(3, read(3, 100, 1))
        b[1].write(both[:15])
        await b[1].drain()
        assert await exchange(*b, both[15:]) == mbap(2, bytes([4, 2, 0, 5]))
        async with asyncio.timeout(2):
            assert await b[0].readexactly(11) == mbap(3, bytes([3, 2]) + b"io")
        # Not Modbus (protocol id 0x4854 = "HT"): that connection is closed, b is not.
        a[1].write(b"GET / HTTP/1.0\r\n\r\n")
        async with asyncio.timeout(2):
            assert await a[0].read() == b""
        assert server.bad_headers == 1
        assert await exchange(*b, mbap(4, read(4, 0, 1))) == mbap(4, bytes([4, 2, 0, 5]))
        for _, w in (a, b):
            w.close()
    finally:
        await server.close()
    assert server.connections == set()


async def test_tcp_link_faults_drop_garble_and_delay(console: ModbusConsole) -> None:
    server = ModbusTcpServer(console, seed=3)
    await server.start()
    device = console.device
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        good = mbap(9, bytes([4, 2, 0, 5]))
        device.apply("drop_link", {"duration_s": 10.0})
        writer.write(mbap(9, read(4, 0, 1)))
        with pytest.raises(TimeoutError):  # the cable is pulled: nothing, ever
            async with asyncio.timeout(0.2):
                await reader.read(1)
        assert not writer.is_closing()  # the socket stays open
        device.apply("restore_link", {})
        device.apply("garble", {"duration_s": 10.0})
        seen = []
        for tid in range(20):
            writer.write(mbap(tid, read(4, 0, 1)))
            await writer.drain()
            async with asyncio.timeout(2):
                seen.append(await reader.read(300))
        assert all(s != mbap(t, bytes([4, 2, 0, 5])) for t, s in enumerate(seen))
        headers = [s[:4] == struct.pack(">HH", t, 0) for t, s in enumerate(seen)]
        assert any(headers), "sometimes a plausible MBAP header around noise"
        assert not all(headers), "sometimes a broken header"
        writer.close()
        device.apply("restore_link", {})
        device.apply("delay_replies", {"duration_s": 10.0, "delay_s": 0.3})
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await exchange(reader, writer, mbap(9, read(4, 0, 1))) == good
        assert loop.time() - t0 >= 0.29
        writer.close()
    finally:
        await server.close()


# ---- over RTU on a pty -----------------------------------------------------------------


async def read_pty(fd: int, n: int, within_s: float) -> bytes:
    """Read exactly n bytes from a non-blocking fd, within a deadline."""
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


@pytest.fixture
async def rtu_line(console: ModbusConsole) -> tuple[RtuPtyConsole, int]:  # type: ignore[misc]
    pty = RtuPtyConsole(console, baudrate=19200, seed=1)
    pty.start()
    fd = os.open(pty.device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(fd)
    try:
        yield pty, fd
    finally:
        os.close(fd)
        await pty.close()


async def test_rtu_on_a_pty_answers_in_the_modelled_line_time(
    rtu_line: tuple[RtuPtyConsole, int],
) -> None:
    pty, fd = rtu_line
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    os.write(fd, b"\xff" + rtu(2, 4, 0, 0, 0, 1) + rtu(1, 4, 0, 0, 0, 40))  # noise, other unit
    reply = await read_pty(fd, 85, within_s=2)
    elapsed = loop.time() - t0
    assert reply[:5] == bytes([1, 4, 80, 0, 5])
    assert crc16_modbus(reply[:-2]) == int.from_bytes(reply[-2:], "little")
    assert elapsed >= 93 * 11 / 19200 * 0.95  # (8 + 85 bytes) x 11 bits at 19200 baud
    os.write(fd, rtu(1, 6, 0, 100, 0, 5))
    assert await read_pty(fd, 5, within_s=2) == rtu(1, 0x86, 1)
    assert pty.console.requests == 2  # the other unit's frame is not ours


async def test_rtu_link_faults_and_no_reply_after_close(
    rtu_line: tuple[RtuPtyConsole, int],
) -> None:
    pty, fd = rtu_line
    device = pty.console.device
    request = rtu(1, 4, 0, 0, 0, 1)
    device.apply("drop_link", {"duration_s": 10.0})
    os.write(fd, request)
    with pytest.raises(TimeoutError):
        await read_pty(fd, 1, within_s=0.2)
    device.apply("restore_link", {})
    device.apply("garble", {"duration_s": 10.0})
    os.write(fd, request)
    noise = await read_pty(fd, 1, within_s=2)
    assert noise
    device.apply("restore_link", {})
    device.apply("delay_replies", {"duration_s": 10.0, "delay_s": 5.0})
    pty._frames([request])  # as if read from the line: the reply is now held back 5 s
    sender = pty._sender  # the pending timer is what close() must cancel
    assert sender is not None
    assert len(sender._pending) == 1
    await pty.close()
    assert sender._pending == set()
