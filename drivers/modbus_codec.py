"""Modbus framing for the drivers: the one module that imports pymodbus.

pymodbus (pinned exactly in pyproject.toml) renames and moves its API between minor
releases, so everything the drivers use of it is here, behind four plain functions, and
the bytes they produce and accept are locked by golden vectors
(tests/unit/test_modbus_codec.py): a pymodbus upgrade that changes anything fails there,
not in a delivery.

Only pymodbus's sans-I/O parts are used: its PDU classes and its TCP (MBAP) and RTU
framers, for encoding requests, checking CRCs and decoding replies. Its client is not:
the bytes travel over drivers.transport (the same seam, timeouts and exclusive serial
open as every other driver), and reconnection is the daemon's own loop. That keeps a late
reply from ever being matched to the next request (RTU has no transaction id; the driver
resynchronises instead) and leaves no half-connected client behind after a reconnect.

Reading a reply off a byte stream needs its length before its end: :func:`reply_head_size`
and :func:`reply_rest_size` give it from the first bytes, so a transport can read exactly
one frame, and :func:`decode_reply` then checks and decodes that frame.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from pymodbus.exceptions import ModbusException as _PymodbusError
from pymodbus.framer import FramerRTU, FramerSocket
from pymodbus.pdu import DecodePDU, ExceptionResponse
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadHoldingRegistersResponse,
    ReadInputRegistersRequest,
    ReadInputRegistersResponse,
)

from iortd.drivers.errors import DeviceFault, ProtocolViolation

__all__ = [
    "EXCEPTION_NAMES",
    "MAX_READ",
    "Framing",
    "ModbusDeviceError",
    "Table",
    "decode_reply",
    "encode_read",
    "reply_head_size",
    "reply_rest_size",
]

MAX_READ: Final = 125  # registers per read request (Modbus Application Protocol 6.3/6.4)
_MAX_PDU: Final = 253

EXCEPTION_NAMES: Final = {
    0x01: "Illegal Function",
    0x02: "Illegal Data Address",
    0x03: "Illegal Data Value",
    0x04: "Server Device Failure",
    0x05: "Acknowledge",
    0x06: "Server Device Busy",
    0x08: "Memory Parity Error",
    0x0A: "Gateway Path Unavailable",
    0x0B: "Gateway Target Device Failed to Respond",
}


class Framing(enum.StrEnum):
    TCP = "tcp"  # MBAP header (Modbus TCP)
    RTU = "rtu"  # address + PDU + CRC-16 (serial lines, or RTU over a TCP gateway)


class Table(enum.StrEnum):
    INPUT = "input"  # input registers, function 04
    HOLDING = "holding"  # holding registers, function 03


_FUNCTION: Final = {Table.INPUT: 0x04, Table.HOLDING: 0x03}


class ModbusDeviceError(DeviceFault):
    """The device answered a Modbus exception response."""

    def __init__(self, code: int, function: int, request: str) -> None:
        self.code = code
        self.function = function
        name = EXCEPTION_NAMES.get(code, "unknown exception")
        super().__init__(f"Modbus exception {code:02X} ({name}) to {request}")


@dataclass(frozen=True, slots=True)
class _Read:
    table: Table
    address: int
    count: int
    unit: int
    tid: int

    def __str__(self) -> str:
        return f"read {self.table} registers {self.address}+{self.count} of unit {self.unit}"


def _framer(framing: Framing) -> FramerRTU | FramerSocket:
    decoder = DecodePDU(False)  # the client's side: decode replies
    return FramerSocket(decoder) if framing is Framing.TCP else FramerRTU(decoder)


def encode_read(
    framing: Framing, table: Table, address: int, count: int, *, unit: int, tid: int = 0
) -> bytes:
    """A read request's frame (``tid`` is used by TCP framing only)."""
    if not 0 <= address <= 0xFFFF or not 1 <= count <= MAX_READ or address + count > 0x10000:
        raise ValueError(f"cannot read {count} registers at {address}")
    if not 0 <= unit <= 255 or not 0 <= tid <= 0xFFFF:
        raise ValueError(f"unit {unit} / transaction {tid} out of range")
    cls = ReadInputRegistersRequest if table is Table.INPUT else ReadHoldingRegistersRequest
    pdu = cls(address=address, count=count, dev_id=unit, transaction_id=tid)
    return _framer(framing).buildFrame(pdu)


def reply_head_size(framing: Framing) -> int:
    """Bytes to read first: enough to know the reply's length (MBAP header with the unit
    id; or RTU address, function code and byte count / exception code)."""
    return 7 if framing is Framing.TCP else 3


def reply_rest_size(framing: Framing, head: bytes) -> int:
    """How many bytes of the reply follow ``head``. Raises ProtocolViolation when the
    head cannot start a reply (wrong protocol id, impossible length)."""
    if len(head) != reply_head_size(framing):
        raise ValueError("head has the wrong size")
    if framing is Framing.TCP:
        protocol, length = int.from_bytes(head[2:4], "big"), int.from_bytes(head[4:6], "big")
        if protocol != 0:
            raise ProtocolViolation(f"MBAP protocol id {protocol}, not 0: {head.hex(' ')}")
        if not 3 <= length <= _MAX_PDU + 1:
            raise ProtocolViolation(f"MBAP length {length} out of range: {head.hex(' ')}")
        return length - 1
    function = head[1]
    if function & 0x80:
        return 2  # exception code already in head[2]; then the CRC
    if function in (0x03, 0x04):
        return head[2] + 2  # byte count, then the CRC
    raise ProtocolViolation(f"RTU reply with unexpected function {function:#04x}: {head.hex(' ')}")


def _check_shape(framing: Framing, frame: bytes, request: _Read) -> None:
    """Exactly one frame, as long as its own header says, before pymodbus sees it: its
    RTU framer hunts for a frame inside the bytes and its TCP framer stretches a short
    MBAP length, and either would let extra bytes pass."""
    if framing is Framing.TCP:
        if len(frame) < 9 or int.from_bytes(frame[4:6], "big") != len(frame) - 6:
            raise ProtocolViolation(f"MBAP length does not match the reply: {frame.hex(' ')}")
        pdu = frame[7:]
    else:
        if len(frame) < 5:
            raise ProtocolViolation(f"RTU reply too short: {frame.hex(' ')}")
        pdu = frame[1:-2]
    function = pdu[0]
    if function not in (0x03, 0x04, 0x83, 0x84):
        raise ProtocolViolation(f"function {function:#04x} in reply to {request}: {frame.hex(' ')}")
    expected = 2 if function & 0x80 else 2 + pdu[1]
    if len(pdu) != expected:
        raise ProtocolViolation(f"not one whole reply to {request}: {frame.hex(' ')}")


def decode_reply(
    framing: Framing,
    frame: bytes,
    table: Table,
    address: int,
    count: int,
    *,
    unit: int,
    tid: int = 0,
) -> list[int]:
    """The register values a read reply carries. Raises ModbusDeviceError for an exception
    response, ProtocolViolation for anything else that is not the reply to this request
    (bad CRC, another unit or transaction, another function, wrong count)."""
    request = _Read(table, address, count, unit, tid)
    _check_shape(framing, frame, request)
    used, unit_got, tid_got, pdu_bytes = _framer(framing).decode(frame)
    if used != len(frame) or not pdu_bytes:
        what = "bad CRC or incomplete frame" if framing is Framing.RTU else "incomplete frame"
        raise ProtocolViolation(f"{what} in reply to {request}: {frame.hex(' ')}")
    if unit_got != unit:
        raise ProtocolViolation(f"reply from unit {unit_got} to {request}: {frame.hex(' ')}")
    if framing is Framing.TCP and tid_got != tid:
        raise ProtocolViolation(f"reply to transaction {tid_got}, not {tid}: {frame.hex(' ')}")
    try:
        pdu = DecodePDU(False).decode(pdu_bytes)
    except (_PymodbusError, ValueError, IndexError, KeyError) as exc:
        raise ProtocolViolation(f"undecodable reply to {request}: {frame.hex(' ')}") from exc
    function = _FUNCTION[table]
    if isinstance(pdu, ExceptionResponse):
        if pdu.function_code != function | 0x80 or len(pdu_bytes) != 2:
            raise ProtocolViolation(f"exception for another function: {frame.hex(' ')}")
        raise ModbusDeviceError(pdu.exception_code, function, str(request))
    expected = ReadInputRegistersResponse if table is Table.INPUT else ReadHoldingRegistersResponse
    if pdu is None or type(pdu) is not expected:
        raise ProtocolViolation(f"not a reply to {request}: {frame.hex(' ')}")
    registers = list(pdu.registers)
    if len(registers) != count or pdu_bytes[1] != 2 * count or len(pdu_bytes) != 2 + 2 * count:
        raise ProtocolViolation(
            f"{len(registers)} registers in reply to {request}: {frame.hex(' ')}"
        )
    return registers
