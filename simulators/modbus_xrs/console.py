"""The console's requests and replies, sans-I/O: one request in, one reply out.

:class:`ModbusConsole` answers a request PDU, a Modbus TCP frame (MBAP header) or an RTU
frame (address and CRC) from its register map, with the exception responses of
docs/protocols.md (illegal function, address or value; gateway: no response for another
unit id on TCP). It advances the device once per request, so that one read is one
snapshot: the registers of a reply never mix two instants. No bytes are read or written
here; the servers (tcp.py, rtu.py) move them.
"""

from __future__ import annotations

import struct

from iortd.simulators.device import SimDevice
from iortd.simulators.modbus_xrs.crc import crc_ok, with_crc
from iortd.simulators.modbus_xrs.image import build_image
from iortd.simulators.modbus_xrs.regmap import (
    HOLDING_WINDOW,
    INPUT_WINDOW,
    MAX_COUNT,
    RegisterMap,
)
from iortd.simulators.model import ModelSnapshot

__all__ = ["MAX_MBAP_LENGTH", "MBAP_LEN", "ModbusConsole"]

READ_HOLDING = 0x03
READ_INPUT = 0x04
ILLEGAL_FUNCTION = 0x01
ILLEGAL_ADDRESS = 0x02
ILLEGAL_VALUE = 0x03
GATEWAY_NO_RESPONSE = 0x0B

MBAP_LEN = 7
MAX_MBAP_LENGTH = 254  # unit id + the largest PDU (253 bytes)


def _exception(function: int, code: int) -> bytes:
    return bytes([(function | 0x80) & 0xFF, code])


class ModbusConsole:
    """One simulated console answering Modbus requests from its register map."""

    def __init__(self, device: SimDevice, regmap: RegisterMap, unit_id: int = 1) -> None:
        if not 1 <= unit_id <= 247:
            raise ValueError(f"unit id must be in 1..247, got {unit_id}")
        self.device = device
        self.regmap = regmap
        self.unit_id = unit_id

    @property
    def requests(self) -> int:
        return self.device.requests

    def _tick(self) -> ModelSnapshot:
        self.device.requests += 1
        return self.device.advance()

    def pdu_reply(self, pdu: bytes) -> bytes:
        """The response PDU to a request PDU addressed to this console."""
        snap = self._tick()  # once per request: the whole read is one snapshot
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
        window = INPUT_WINDOW if function == READ_INPUT else HOLDING_WINDOW
        if start < window.start or start + count > window.stop:
            return _exception(function, ILLEGAL_ADDRESS)
        table = "input" if function == READ_INPUT else "holding"
        regs = build_image(self.regmap, snap, self.device.identity(), self.device.scenario_note())
        words = [regs[table].get(a, 0) for a in range(start, start + count)]
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
