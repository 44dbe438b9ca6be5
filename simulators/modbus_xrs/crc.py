"""CRC-16/MODBUS, the simulator's own: table-driven, written from the specification.

The check value and the byte order on the wire (low byte first) are in
:func:`crc16_modbus`'s docstring; tests/unit/test_sim_modbus.py locks them by hand, never
against the driver's codec (the two sides are independent readings).
"""

from __future__ import annotations

__all__ = ["crc16_modbus", "crc_ok", "with_crc"]


def _crc_table() -> tuple[int, ...]:
    out = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xA001 if c & 1 else c >> 1
        out.append(c)
    return tuple(out)


_CRC_TABLE = _crc_table()


def crc16_modbus(data: bytes) -> int:
    """CRC-16/MODBUS (reflected polynomial 0xA001, initial 0xFFFF), table-driven.
    Check value: ``crc16_modbus(b"123456789") == 0x4B37``. On the wire: low byte first."""
    crc = 0xFFFF
    for b in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ b) & 0xFF]
    return crc


def crc_ok(frame: bytes | bytearray) -> bool:
    """The frame ends in the CRC (low byte first) of the bytes before it."""
    return crc16_modbus(bytes(frame[:-2])) == int.from_bytes(frame[-2:], "little")


def with_crc(frame: bytes) -> bytes:
    """The frame followed by its CRC, low byte first."""
    return frame + crc16_modbus(frame).to_bytes(2, "little")
