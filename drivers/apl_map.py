"""Register maps of an applicator reader and stand: the vocabulary of APL-MB/1's points.

A map is in the format of drivers/modbus_map.py (``iortd-register-map/1``, docs/protocols.md,
"Register maps"), loaded, checked and decoded there; what differs from a source console's
is the point names (docs/protocols.md, APL-MB/1, "Its register map"), which
:data:`APL_MB1` lists as data. Beyond the console's: the displacement and the tilt must have
a ``missing`` value (a device that cannot measure must never report "no movement"), a flag
may be one ``bit`` of a status word, and the identity is read from the holding registers,
everything else from the input registers.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import MappingProxyType
from typing import Final

from iortd.drivers.modbus_codec import Table
from iortd.drivers.modbus_map import STRING, PointKind, RegisterMap, Vocabulary, load_map
from iortd.kernel.types import ApplicatorFault, ApplicatorState

__all__ = ["APL_MB1", "load_apl_map"]

_IN = Table.INPUT
_UNSIGNED: Final = frozenset({"u16", "u32", "f32"})
_MM: Final = MappingProxyType({"mm": 1.0, "cm": 10.0})
_FLAG = PointKind(
    enumerated=True,
    meanings=frozenset({"yes", "no", "unknown"}),
    must_mean=frozenset({"yes", "no"}),
    bit=True,
    required=True,
    table=_IN,
)
_COUNTER = PointKind(counter=True, required=True, table=_IN)
_COMPONENT = PointKind(
    types=frozenset({"i16", "i32", "f32"}),
    units=_MM,
    missing="required",
    required=True,
    signed=True,
    table=_IN,
)
APL_MB1: Final = Vocabulary(
    name="APL-MB/1",
    points=MappingProxyType(
        {
            "state": PointKind(
                enumerated=True,
                meanings=frozenset(s.value for s in ApplicatorState) - {"UNKNOWN"},
                must_mean=frozenset({"READY", "FAULT"}),
                required=True,
                table=_IN,
            ),
            "fault": PointKind(
                enumerated=True,
                meanings=frozenset({"NONE", *(f.value for f in ApplicatorFault)}) - {"UNKNOWN"},
                must_mean=frozenset({"NONE"}),
                required=True,
                table=_IN,
            ),
            "seated": _FLAG,
            "source_locked": _FLAG,
            "brakes_engaged": _FLAG,
            # Free text (the applicator's type), or NONE.
            "applicator.type": PointKind(
                enumerated=True, must_mean=frozenset({"NONE"}), required=True, table=_IN
            ),
            "applicator.diameter": PointKind(types=_UNSIGNED, units=_MM, required=True, table=_IN),
            "applicator.serial": PointKind(types=STRING, required=True, table=_IN),
            "applicator.uses_left": PointKind(counter=True, missing="allowed", table=_IN),
            "seat_counter": _COUNTER,
            "lock_counter": _COUNTER,
            "displacement.x": _COMPONENT,
            "displacement.y": _COMPONENT,
            "displacement.z": _COMPONENT,
            "displacement.magnitude": PointKind(
                types=_UNSIGNED, units=_MM, missing="required", required=True, table=_IN
            ),
            "tilt": PointKind(
                types=_UNSIGNED,
                units=MappingProxyType({"deg": 1.0, "mrad": 180.0 / math.pi / 1000.0}),
                missing="required",
                required=True,
                table=_IN,
            ),
            "heartbeat": _COUNTER,
            **{
                f"identity.{k}": PointKind(types=STRING, table=Table.HOLDING)
                for k in ("manufacturer", "model", "serial", "firmware", "scenario")
            },
        }
    ),
    extra=PointKind(missing="allowed", table=_IN),
    listed_in="docs/protocols.md, APL-MB/1,",
    bit_for="a flag: seated, source_locked, brakes_engaged (one bit of a status word)",
)


def load_apl_map(path: Path) -> RegisterMap:
    """An applicator register map, checked completely; every problem names the file, the
    point and the key (docs/protocols.md, "Register maps" and "APL-MB/1")."""
    return load_map(path, APL_MB1)
