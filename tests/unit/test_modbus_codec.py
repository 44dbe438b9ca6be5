"""Modbus framing as the drivers use it (drivers/modbus_codec.py, the one module that
imports pymodbus): golden byte vectors, so that a pymodbus upgrade that changes a single
byte fails here, and every way a reply can be wrong gives a typed error."""

from __future__ import annotations

import pytest

from iortd.drivers.errors import DeviceFault, ProtocolViolation
from iortd.drivers.modbus_codec import (
    Framing,
    ModbusDeviceError,
    Table,
    decode_reply,
    encode_read,
    reply_head_size,
    reply_rest_size,
)

H = bytes.fromhex


def crc16_modbus(data: bytes) -> int:
    """Bitwise, from the specification (the codec's comes from pymodbus's table)."""
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def rtu(hex_body: str) -> str:
    """An RTU frame: the body and its CRC, low byte first."""
    body = H(hex_body)
    return (body + crc16_modbus(body).to_bytes(2, "little")).hex(" ")


def test_the_test_crc_is_crc16_modbus() -> None:
    assert crc16_modbus(b"123456789") == 0x4B37
    assert rtu("01 03 00 00 00 0A") == "01 03 00 00 00 0a c5 cd"


# Requests. The first is the example published with the Modbus RTU CRC (read holding
# registers 0-9 of unit 1); the others are worked by hand from the specification.
GOLDEN_REQUESTS = [
    (Framing.RTU, Table.HOLDING, 0, 10, 1, 0, "01 03 00 00 00 0A C5 CD"),
    (Framing.RTU, Table.INPUT, 0, 40, 1, 0, "01 04 00 00 00 28 F0 14"),
    (Framing.TCP, Table.INPUT, 0, 36, 1, 1, "00 01 00 00 00 06 01 04 00 00 00 24"),
    (Framing.TCP, Table.HOLDING, 100, 72, 7, 0xBEEF, "BE EF 00 00 00 06 07 03 00 64 00 48"),
]


@pytest.mark.parametrize(
    ("framing", "table", "address", "count", "unit", "tid", "wire"), GOLDEN_REQUESTS
)
def test_requests_are_byte_exact(
    framing: Framing, table: Table, address: int, count: int, unit: int, tid: int, wire: str
) -> None:
    assert encode_read(framing, table, address, count, unit=unit, tid=tid) == H(wire)


RTU_REPLY = H(rtu("01 04 06 00 05 FF 83 41 A0"))  # 3 input registers: 5, 0xFF83, 0x41A0
TCP_REPLY = H("00 2A 00 00 00 09 01 04 06 00 05 FF 83 41 A0")


def test_replies_decode_to_their_registers() -> None:
    assert decode_reply(Framing.RTU, RTU_REPLY, Table.INPUT, 0, 3, unit=1) == [5, 0xFF83, 0x41A0]
    assert decode_reply(Framing.TCP, TCP_REPLY, Table.INPUT, 0, 3, unit=1, tid=42) == [
        5,
        0xFF83,
        0x41A0,
    ]


def test_reply_lengths_come_from_the_first_bytes() -> None:
    assert reply_head_size(Framing.RTU) == 3
    assert reply_rest_size(Framing.RTU, RTU_REPLY[:3]) == len(RTU_REPLY) - 3
    assert reply_rest_size(Framing.RTU, H("01 84 02")) == 2  # exception code, then CRC
    assert reply_head_size(Framing.TCP) == 7
    assert reply_rest_size(Framing.TCP, TCP_REPLY[:7]) == len(TCP_REPLY) - 7
    with pytest.raises(ProtocolViolation, match="protocol id 1"):
        reply_rest_size(Framing.TCP, H("00 2A 00 01 00 09 01"))
    with pytest.raises(ProtocolViolation, match="length 600"):
        reply_rest_size(Framing.TCP, H("00 2A 00 00 02 58 01"))
    with pytest.raises(ProtocolViolation, match="unexpected function 0x10"):
        reply_rest_size(Framing.RTU, H("01 10 00"))


@pytest.mark.parametrize(
    ("framing", "wire", "code"),
    [
        (Framing.RTU, rtu("01 84 02"), 2),
        (Framing.TCP, "00 2A 00 00 00 03 01 84 03", 3),
        (Framing.TCP, "00 2A 00 00 00 03 01 84 0B", 11),
    ],
)
def test_exception_responses_are_typed_device_errors(
    framing: Framing, wire: str, code: int
) -> None:
    with pytest.raises(ModbusDeviceError) as excinfo:
        decode_reply(framing, H(wire), Table.INPUT, 0, 3, unit=1, tid=42)
    assert excinfo.value.code == code
    assert isinstance(excinfo.value, DeviceFault)
    assert f"Modbus exception {code:02X}" in str(excinfo.value)
    assert "read input registers 0+3 of unit 1" in str(excinfo.value)


@pytest.mark.parametrize(
    ("framing", "wire", "reason"),
    [
        (Framing.RTU, (H(rtu("01 04 06 00 05 FF 83 41 A0")[:-2]) + b"\x00").hex(), "bad CRC"),
        (Framing.RTU, rtu("02 04 06 00 05 FF 83 41 A0"), "unit 2"),
        (Framing.RTU, rtu("01 03 06 00 05 FF 83 41 A0"), "not a reply"),
        (Framing.RTU, rtu("01 04 04 00 05 FF 83"), "2 registers"),
        (Framing.RTU, rtu("01 83 02"), "another function"),
        (Framing.TCP, "00 2B 00 00 00 09 01 04 06 00 05 FF 83 41 A0", "transaction 43"),
        (Framing.TCP, "00 2A 00 00 00 09 02 04 06 00 05 FF 83 41 A0", "unit 2"),
        (Framing.TCP, "00 2A 00 00 00 09 01 03 06 00 05 FF 83 41 A0", "not a reply"),
        (Framing.TCP, "00 2A 00 00 00 07 01 04 04 00 05 FF 83", "2 registers"),
    ],
)
def test_anything_but_the_reply_is_a_protocol_violation(
    framing: Framing, wire: str, reason: str
) -> None:
    with pytest.raises(ProtocolViolation, match=reason):
        decode_reply(framing, H(wire), Table.INPUT, 0, 3, unit=1, tid=42)


def test_requests_out_of_range_are_refused_before_any_byte_is_sent() -> None:
    for address, count in ((0, 0), (0, 126), (65535, 2), (-1, 1)):
        with pytest.raises(ValueError, match="cannot read"):
            encode_read(Framing.RTU, Table.INPUT, address, count, unit=1)
    with pytest.raises(ValueError, match="out of range"):
        encode_read(Framing.TCP, Table.INPUT, 0, 1, unit=256)
