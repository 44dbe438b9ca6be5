"""A device's Modbus requests and replies, sans-I/O: one request in, one reply out.

:class:`ModbusSlave` answers a request PDU, a Modbus TCP frame (MBAP header) or an RTU
frame (address and CRC) from a register image, with the exception responses of
docs/protocols.md (illegal function, address or value; gateway: no response for another
unit id on TCP). It advances the device once per request (:meth:`ModbusSlave._tick`), so
that one read is one snapshot: the registers of a reply never mix two instants. What is
device-specific is small: the readable windows, the tick and the image of the last tick;
:class:`ModbusConsole` is XRS-MB/1's (a console's register map), and
simulators/apl_device.py has APL-MB/1's. Every slave has a ``device``
(faults.ServedDevice: its link faults and reply delay, which the servers consult). No
bytes are read or written here; the servers (tcp.py, rtu.py) move them.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from iortd.simulators.device import SimDevice
from iortd.simulators.modbus_xrs.crc import crc_ok, with_crc
from iortd.simulators.modbus_xrs.faults import ServedDevice
from iortd.simulators.modbus_xrs.image import build_image
from iortd.simulators.modbus_xrs.regmap import (
    HOLDING_WINDOW,
    INPUT_WINDOW,
    MAX_COUNT,
    RegisterMap,
)
from iortd.simulators.model import ModelSnapshot

__all__ = ["MAX_MBAP_LENGTH", "MBAP_LEN", "ImageError", "ModbusConsole", "ModbusSlave"]

READ_HOLDING = 0x03
READ_INPUT = 0x04
ILLEGAL_FUNCTION = 0x01
ILLEGAL_ADDRESS = 0x02
ILLEGAL_VALUE = 0x03
SERVER_DEVICE_FAILURE = 0x04
GATEWAY_NO_RESPONSE = 0x0B

MBAP_LEN = 7
MAX_MBAP_LENGTH = 254  # unit id + the largest PDU (253 bytes)


def _exception(function: int, code: int) -> bytes:
    return bytes([(function | 0x80) & 0xFF, code])


class ImageError(Exception):
    """The device's state cannot be laid out in its registers (e.g. a value its map has no
    code for): that read is answered with exception 04, the device goes on."""


class ModbusSlave:
    """One simulated Modbus device answering requests from its register image.

    A subclass says what is device-specific: :attr:`input_window` and
    :attr:`holding_window` (a read touching any other register: exception 02),
    :meth:`_tick` (advance the device once and count the request) and :meth:`_registers`
    (one table of the image of the last tick; registers absent read 0; ImageError: that
    read is answered with exception 04, SERVER DEVICE FAILURE)."""

    input_window: range = INPUT_WINDOW
    holding_window: range = HOLDING_WINDOW

    def __init__(self, device: ServedDevice, unit_id: int = 1) -> None:
        if not 1 <= unit_id <= 247:
            raise ValueError(f"unit id must be in 1..247, got {unit_id}")
        self.device = device
        self.unit_id = unit_id

    @property
    def requests(self) -> int:
        return self.device.requests

    def _tick(self) -> None:
        raise NotImplementedError

    def _registers(self, table: str) -> Mapping[int, int]:
        raise NotImplementedError

    def pdu_reply(self, pdu: bytes) -> bytes:
        """The response PDU to a request PDU addressed to this device."""
        self._tick()  # once per request: the whole read is one snapshot
        if not pdu:
            return _exception(0, ILLEGAL_FUNCTION)
        function = pdu[0]
        if function not in (READ_HOLDING, READ_INPUT):
            return _exception(function, ILLEGAL_FUNCTION)
        if len(pdu) != 5:
            return _exception(function, ILLEGAL_VALUE)
        start, count = struct.unpack(">HH", pdu[1:5])
        if not 1 <= count <= MAX_COUNT:
            return _exception(function, ILLEGAL_VALUE)
        window = self.input_window if function == READ_INPUT else self.holding_window
        if start < window.start or start + count > window.stop:
            return _exception(function, ILLEGAL_ADDRESS)
        try:
            regs = self._registers("input" if function == READ_INPUT else "holding")
        except ImageError:
            return _exception(function, SERVER_DEVICE_FAILURE)
        words = [regs.get(a, 0) for a in range(start, start + count)]
        return bytes([function, 2 * count]) + struct.pack(f">{count}H", *words)

    def tcp_reply(self, adu: bytes) -> bytes:
        """The reply frame to one complete MBAP frame (header already checked)."""
        tid, _, _, unit = struct.unpack(">HHHB", adu[:MBAP_LEN])
        pdu = adu[MBAP_LEN:]
        if unit != self.unit_id:
            self._tick()
            reply = _exception(pdu[0] if pdu else 0, GATEWAY_NO_RESPONSE)
        else:
            reply = self.pdu_reply(pdu)
        return struct.pack(">HHHB", tid, 0, len(reply) + 1, unit) + reply

    def rtu_reply(self, frame: bytes) -> bytes | None:
        """The reply to one RTU frame (``None``: not answered: another address, a
        broadcast, or a bad CRC)."""
        if len(frame) < 4 or not crc_ok(frame):
            return None
        if frame[0] != self.unit_id:
            return None
        return with_crc(bytes([self.unit_id]) + self.pdu_reply(frame[1:-2]))


class ModbusConsole(ModbusSlave):
    """One simulated console (XRS-MB/1) answering Modbus requests from its register map."""

    def __init__(self, device: SimDevice, regmap: RegisterMap, unit_id: int = 1) -> None:
        super().__init__(device, unit_id)
        self.device: SimDevice = device
        self.regmap = regmap
        self._snap: ModelSnapshot | None = None

    def _tick(self) -> None:
        self.device.requests += 1
        self._snap = self.device.advance()

    def _registers(self, table: str) -> Mapping[int, int]:
        snap = self._snap if self._snap is not None else self.device.advance()
        regs = build_image(self.regmap, snap, self.device.identity(), self.device.scenario_note())
        return regs[table]
