"""The simulated console's side of XRS-MB/1 (docs/protocols.md): Modbus TCP and RTU.

Written apart from the host's side (drivers/modbus_*.py) and without pymodbus, on purpose:
two independent readings of the specification, so that a mistake in one shows up as a
failure against the other rather than hiding in shared code. Only data is shared: the
register map ``config/maps/xrs-mb1.toml``, which this package parses with its own code.

Layers, from the bottom, one module each:

* ``crc``, ``regmap`` and ``image``: pure functions (:func:`crc16_modbus`, the map file
  read by :func:`load_map`, a model snapshot laid out in registers by :func:`build_image`);
* ``console``: :class:`ModbusConsole`, sans-I/O, one request in, one reply out (PDU, MBAP
  frame or RTU frame), advancing the device once per request so that one read is one
  snapshot;
* ``faults``: the link faults of :class:`iortd.simulators.device.SimDevice` (dropped,
  garbled, slow) and the ordered, delayed sending of replies, shared by both servers;
* ``tcp``: :class:`ModbusTcpServer`, the console on a TCP port;
* ``rtu``: :class:`RtuFramer`, which finds RTU request frames in a byte stream (sans-I/O),
  and :class:`RtuPtyConsole`, the console on a pseudo-terminal with the time the bytes
  would take on a real line (:func:`line_time_s`).

Import from ``iortd.simulators.modbus_xrs``; the modules are its layout.
"""

from iortd.simulators.modbus_xrs.console import ModbusConsole, ModbusSlave
from iortd.simulators.modbus_xrs.crc import crc16_modbus
from iortd.simulators.modbus_xrs.image import build_image
from iortd.simulators.modbus_xrs.regmap import (
    HOLDING_WINDOW,
    INPUT_WINDOW,
    MapError,
    Point,
    RegisterMap,
    default_map_path,
    load_map,
)
from iortd.simulators.modbus_xrs.rtu import RtuFramer, RtuPtyConsole, line_time_s
from iortd.simulators.modbus_xrs.tcp import ModbusTcpServer

__all__ = [
    "HOLDING_WINDOW",
    "INPUT_WINDOW",
    "MapError",
    "ModbusConsole",
    "ModbusSlave",
    "ModbusTcpServer",
    "Point",
    "RegisterMap",
    "RtuFramer",
    "RtuPtyConsole",
    "build_image",
    "crc16_modbus",
    "default_map_path",
    "line_time_s",
    "load_map",
]
