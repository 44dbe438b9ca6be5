"""Register maps: the bundled XRS-MB/1 map decodes hand-worked register images to the
documented values (golden vectors), every type and option of the format decodes as
specified, and a broken map is an error naming the file, the point and the key."""

# ruff: noqa: E501 - the broken-map cases read best one per line
from __future__ import annotations

import math
from pathlib import Path
from types import MappingProxyType

import pytest

from iortd.drivers.errors import ProtocolViolation
from iortd.drivers.modbus_codec import Table
from iortd.drivers.modbus_map import (
    XRS_MB1,
    Block,
    MapError,
    PointKind,
    Vocabulary,
    load_map,
    resolve_map,
)

BUNDLED = Path(__file__).resolve().parents[2] / "config" / "maps" / "xrs-mb1.toml"

# Input registers 0-35 of a console irradiating, worked by hand from docs/protocols.md.
TELEMETRY = [
    5,  # 0 state IRRADIATING
    0,  # 1 termination: none yet
    0x0000, 0x2208,  # 2-3 dose rate 8712 x 0.0001 = 0.8712 Gy/min
    0x000E, 0xB61B,  # 4-5 primary 964123 x 0.00001 = 9.64123 Gy
    0x000E, 0xB51F,  # 6-7 secondary 963871 x 0.00001 = 9.63871 Gy
    0x41A0, 0x0000,  # 8-9 preset f32 20.0 Gy
    0x0001, 0x1A78,  # 10-11 beam-on 72312 x 0.01 = 723.12 s
    0x0000, 0x35E8,  # 12-13 planned 13800 x 0.1 = 1380.0 s
    5000,  # 14 kV 50.00
    4010,  # 15 uA 40.10
    0, 0, 0, 0, 0, 0, 0, 0, 1,  # 16-24 interlocks: backup timer tripped
    1,  # 25 applicator spherical
    300,  # 26 diameter 30.0 mm
    0x4150, 0x502D, 0x3030, 0x3432, 0, 0, 0, 0,  # 27-34 "APP-0042"
    0xFF83,  # 35 rate deviation -125 x 0.01 = -1.25 %
    0x0000, 0x0007,  # 36-37 selection counter 7
]  # fmt: skip


def text_registers(text: str, length: int) -> list[int]:
    raw = text.encode("ascii").ljust(2 * length, b"\0")
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, 2 * length, 2)]


def test_the_bundled_map_reads_in_one_telemetry_and_one_identity_request() -> None:
    m = load_map(resolve_map("xrs-mb1"))
    assert Path(m.path).read_bytes() == BUNDLED.read_bytes()
    assert [(b.table, b.address, b.count) for b in m.telemetry] == [(Table.INPUT, 0, 38)]
    assert [(b.table, b.address, b.count) for b in m.identity] == [(Table.HOLDING, 100, 72)]


def test_the_bundled_map_decodes_the_documented_values() -> None:
    m = load_map(BUNDLED)
    v = m.decode(m.telemetry, [TELEMETRY])
    assert v["state"] == "IRRADIATING"
    assert v["termination"] == "NONE"
    assert v["dose_rate"] == pytest.approx(0.8712, abs=1e-12)
    assert v["dose_primary"] == pytest.approx(9.64123, abs=1e-12)
    assert v["dose_secondary"] == pytest.approx(9.63871, abs=1e-12)
    assert v["preset"] == 20.0
    assert v["beam_on_time"] == pytest.approx(723.12, abs=1e-9)
    assert v["selection"] == 7
    assert v["planned_time"] == pytest.approx(1380.0, abs=1e-9)
    assert (v["kv"], v["ua"]) == (pytest.approx(50.0), pytest.approx(40.1))
    assert [v[f"interlock.{n}"] for n in ("door", "cooling", "backup_timer")] == [
        "ok",
        "ok",
        "tripped",
    ]
    assert (v["applicator.type"], v["applicator.diameter"]) == ("spherical", pytest.approx(30.0))
    assert v["applicator.serial"] == "APP-0042"
    assert v["extra.rate_deviation"] == pytest.approx(-1.25)


def test_no_planned_time_and_unlisted_codes_read_as_missing_and_unknown() -> None:
    m = load_map(BUNDLED)
    regs = list(TELEMETRY)
    regs[12:14] = [0xFFFF, 0xFFFF]
    regs[0] = 42  # not in the state table
    regs[16] = 7  # not in the interlock table
    v = m.decode(m.telemetry, [regs])
    assert v["planned_time"] is None
    assert v["state"] == "UNKNOWN"
    assert v["interlock.door"] == "UNKNOWN"


def test_identity_strings() -> None:
    m = load_map(BUNDLED)
    regs = (
        text_registers("iortd simulator", 16)
        + text_registers("XRS-50", 8)
        + text_registers("SIM-0001", 8)
        + text_registers("1.0", 8)
        + text_registers("link-drop-5s 3fa9c2d1e0b4", 32)
    )
    v = m.decode(m.identity, [regs])
    assert v["identity.manufacturer"] == "iortd simulator"
    assert v["identity.serial"] == "SIM-0001"
    assert v["identity.scenario"] == "link-drop-5s 3fa9c2d1e0b4"
    regs[0] = 0x0107  # a control character
    with pytest.raises(ProtocolViolation, match=r"identity\.manufacturer: not printable"):
        m.decode(m.identity, [regs])


EVERY_TYPE = """
format = "iortd-register-map/1"
name = "every-type"
word_order = "little"
[values.state]
1 = "READY"
[values.bits]
0 = "ok"
1 = "tripped"
[[point]]
name = "state"
table = "holding"
address = 10
type = "u32"
values = "state"
word_order = "big"
[[point]]
name = "dose_rate"
table = "holding"
address = 0
type = "f32"
unit = "cGy/min"
[[point]]
name = "dose_primary"
table = "holding"
address = 2
type = "i32"
scale = 0.001
unit = "mGy"
[[point]]
name = "dose_secondary"
table = "holding"
address = 4
type = "u32"
unit = "cGy"
[[point]]
name = "preset"
table = "holding"
address = 6
type = "i16"
scale = 0.1
unit = "Gy"
[[point]]
name = "beam_on_time"
table = "holding"
address = 7
type = "u16"
unit = "min"
[[point]]
name = "kv"
table = "holding"
address = 8
type = "u16"
unit = "V"
[[point]]
name = "ua"
table = "input"
address = 0
type = "u16"
scale = 0.001
unit = "mA"
[[point]]
name = "interlock.door"
table = "holding"
address = 9
type = "u16"
bit = 0
values = "bits"
[[point]]
name = "interlock.cooling"
table = "holding"
address = 9
type = "u16"
bit = 15
values = "bits"
"""


def test_every_type_word_order_bit_and_unit_decodes_as_specified(tmp_path: Path) -> None:
    path = tmp_path / "every.toml"
    path.write_text(EVERY_TYPE, encoding="utf-8")
    m = load_map(path)
    assert [(b.table, b.address, b.count) for b in m.telemetry] == [
        (Table.INPUT, 0, 1),
        (Table.HOLDING, 0, 12),
    ]
    holding = [
        0x0000, 0x4120,  # 0-1 f32 10.0 cGy/min, little word order -> 0.1 Gy/min
        0xFF38, 0xFFFF,  # 2-3 i32 -200, little -> -200 x 0.001 mGy = -0.0002 Gy
        0x0002, 0x0000,  # 4-5 u32 2 cGy, little -> 0.02 Gy
        0xFFF6,  # 6 i16 -10 x 0.1 = -1.0 Gy
        3,  # 7 u16 3 min -> 180 s
        50000,  # 8 u16 50000 V -> 50 kV
        0x8000,  # 9 bit 0 clear (door ok), bit 15 set (cooling tripped)
        0x0000, 0x0001,  # 10-11 u32 big -> 1 READY
    ]  # fmt: skip
    v = m.decode(m.telemetry, [[40], holding])
    assert v["dose_rate"] == pytest.approx(0.1)
    assert v["dose_primary"] == pytest.approx(-0.0002)
    assert v["dose_secondary"] == pytest.approx(0.02)
    assert v["preset"] == pytest.approx(-1.0)
    assert v["beam_on_time"] == 180.0
    assert v["kv"] == pytest.approx(50.0)
    assert v["ua"] == pytest.approx(40.0)
    assert (v["interlock.door"], v["interlock.cooling"]) == ("ok", "tripped")
    assert v["state"] == "READY"
    holding[0:2] = [0x0000, 0x7FC0]  # NaN
    with pytest.raises(ProtocolViolation, match="dose_rate: not a finite number"):
        m.decode(m.telemetry, [[40], holding])
    assert not math.isnan(0.0)


def test_a_block_of_the_wrong_size_is_refused() -> None:
    m = load_map(BUNDLED)
    with pytest.raises(ProtocolViolation, match="37 registers for a block of 38"):
        m.decode(m.telemetry, [TELEMETRY[:-1]])
    block = Block(Table.INPUT, 0, 1, (m.points["state"],))
    with pytest.raises(ProtocolViolation, match="not 16 bits"):
        m.decode([block], [[70000]])


def _broken(tmp_path: Path, old: str, new: str) -> str:
    text = BUNDLED.read_text(encoding="utf-8")
    assert old in text, old
    path = tmp_path / "broken.toml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(MapError) as excinfo:
        load_map(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: "), message
    return message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('format = "iortd-register-map/1"', 'format = "v2"', "format: expected"),
        ('name = "xrs-mb1"', 'name = "XRS MB1"', "name: expected lower-case"),
        ('word_order = "big"  ', 'word_order = "middle"  ', "word_order: expected 'big'"),
        ('name = "preset"', 'name = "presett"', "point[5] (presett).name: unknown point name"),
        ('name = "interlock.door"', 'name = "interlock.cooling"', "point[15].name: 'interlock.cooling' is mapped twice"),
        ('address = 8\ntype = "f32"', 'address = 8\ntype = "f64"', "(preset).type: expected one of"),
        ('type = "f32"\nunit = "Gy"', 'type = "f32"\nunit = "Sv"', "(preset).unit: expected one of Gy"),
        ('type = "f32"\nunit = "Gy"', 'type = "f32"\nunit = "Gy"\nfoo = 1', "(preset).foo: unknown key"),
        ('address = 14\n', 'address = 13\n', "(kv).address: input register 13 is already part of planned_time"),
        ('values = "state"', 'values = "states"', "(state).values: expected the name of a [values] table"),
        ('9 = "EMERGENCY_STOP"', '9 = "ESTOP"', "(state).values: table 'state' means 'ESTOP'"),
        ('2 = "unknown"', '2 = "maybe"', "table 'interlock' means 'maybe'"),
        ('table = "input"\naddress = 4', 'table = "coil"\naddress = 4', "(dose_primary).table: expected 'input' or 'holding'"),
        ("length = 8                    # registers", "length = 0  # registers", "(applicator.serial).length: expected an integer 1..125"),
        ("missing = 4294967295", "missing = -1", "(planned_time).missing: expected an integer"),
        ('address = 10\ntype = "u32"\nscale = 0.01', 'address = 10\ntype = "u32"\nscale = 0\n', "(beam_on_time).scale: expected a non-zero number"),
        ('type = "u16"\nscale = 0.01\nunit = "kV"', 'type = "u16"\nbit = 3\nscale = 0.01\nunit = "kV"', "(kv).bit: only for an interlock"),
        ('1 = "tripped"', '1 = "tripped"\n01 = "ok"', "values.interlock.01: raw value 1 is listed twice"),
        ('1 = "tripped"', '1 = "unknown"', "table 'interlock' must say which raw value is ok and tripped"),
        ('5 = "balloon"', '5 = "   "', "values.applicator_type.5: expected a word"),
        ('scale = 0.01\nunit = "kV"', 'scale = -0.01\nunit = "kV"', "(kv).scale: kv is never negative"),
    ],
)  # fmt: skip
def test_a_broken_map_names_the_file_point_and_key(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert expected in _broken(tmp_path, old, new)


def test_a_map_without_a_required_point_says_which(tmp_path: Path) -> None:
    text = BUNDLED.read_text(encoding="utf-8")
    start = text.index('[[point]]\nname = "ua"')
    end = text.index("[[point]]", start + 5)
    path = tmp_path / "no-ua.toml"
    path.write_text(text[:start] + text[end:], encoding="utf-8")
    with pytest.raises(MapError, match=r"point: required point\(s\) missing: ua"):
        load_map(path)


def test_a_missing_or_unreadable_map_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MapError, match="no such register map"):
        load_map(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("format = [", encoding="utf-8")
    with pytest.raises(MapError, match="not valid TOML"):
        load_map(bad)


def test_a_map_with_an_applicator_type_but_no_diameter_says_so(tmp_path: Path) -> None:
    text = BUNDLED.read_text(encoding="utf-8")
    start = text.index('[[point]]\nname = "applicator.diameter"')
    end = text.index("[[point]]", start + 5)
    path = tmp_path / "no-diameter.toml"
    path.write_text(text[:start] + text[end:], encoding="utf-8")
    with pytest.raises(MapError, match=r"applicator\.type is mapped without applicator\.diameter"):
        load_map(path)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("bit = 15", "bit = 0", "(interlock.cooling).bit: bit 0 of holding register 9 is already interlock.door"),
        ('1 = "tripped"', '1 = "tripped"\n2 = "unknown"', "a bit's value table lists exactly the raw values 0 and 1"),
        ('type = "u32"\nvalues = "state"\nword_order = "big"', 'type = "u16"\nbit = 1\nvalues = "state"', "(state).bit: only for an interlock"),
        ("address = 9\ntype = \"u16\"\nbit = 0", "address = 8\ntype = \"u16\"\nbit = 0", "holding register 8 is already part of kv"),
    ],
)  # fmt: skip
def test_bit_points_are_checked(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in EVERY_TYPE, old
    path = tmp_path / "bits.toml"
    path.write_text(EVERY_TYPE.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(MapError) as excinfo:
        load_map(path)
    assert expected in str(excinfo.value)


def test_a_value_that_scales_out_of_range_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.toml"
    path.write_text(
        BUNDLED.read_text(encoding="utf-8").replace(
            'scale = 0.01\nunit = "%"', 'scale = 1e308\nunit = "%"'
        ),
        encoding="utf-8",
    )
    m = load_map(path)
    with pytest.raises(ProtocolViolation, match=r"extra\.rate_deviation: -inf after scaling"):
        m.decode(m.telemetry, [TELEMETRY])


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (
            'name = "selection"                # the console\'s selection counter (optional point)\ntable = "input"\naddress = 36\ntype = "u32"',
            'name = "selection"\ntable = "input"\naddress = 36\ntype = "f32"',
        ),
        ('address = 36\ntype = "u32"', 'address = 36\ntype = "u32"\nscale = 0.1'),
        ('address = 36\ntype = "u32"', 'address = 36\ntype = "u32"\nunit = "s"'),
    ],
)
def test_the_selection_counter_is_an_unscaled_integer(tmp_path: Path, old: str, new: str) -> None:
    assert "selection is a counter" in _broken(tmp_path, old, new)


def test_a_map_without_the_selection_counter_reads_none(tmp_path: Path) -> None:
    """It is optional: a console that keeps none has no such point (docs/protocols.md)."""
    text = BUNDLED.read_text(encoding="utf-8")
    head, _, rest = text.partition('[[point]]\nname = "selection"')
    path = tmp_path / "no-counter.toml"
    path.write_text(head + rest[rest.index("[[point]]") :], encoding="utf-8")
    m = load_map(path)
    assert "selection" not in m.points
    assert "selection" not in m.decode(m.telemetry, [TELEMETRY[:36]])
    bundled = load_map(BUNDLED)
    missing = [*TELEMETRY[:36], 0xFFFF, 0xFFFF]  # the map's "missing": no counter kept
    assert bundled.decode(bundled.telemetry, [missing])["selection"] is None


# ---- the vocabulary: what a map may name is data ---------------------------------------

TOY = Vocabulary(
    name="TOY/1",
    points=MappingProxyType(
        {
            "count": PointKind(counter=True, required=True),
            "level": PointKind(
                units=MappingProxyType({"m": 1.0, "cm": 0.01}),
                missing="required",
                table=Table.INPUT,
            ),
            "alarm": PointKind(
                enumerated=True,
                meanings=frozenset({"on", "off"}),
                must_mean=frozenset({"on", "off"}),
                bit=True,
            ),
            "offset": PointKind(
                types=frozenset({"i16"}),
                units=MappingProxyType({"m": 1.0}),
                signed=True,
                needs=("level",),
            ),
        }
    ),
    extra=PointKind(missing="allowed"),
    listed_in="the toy's manual",
    bit_for="an alarm (a flag of a status word)",
)
TOY_MAP = """
format = "iortd-register-map/1"
name = "toy"
[values.alarm]
0 = "off"
1 = "on"
[[point]]
name = "level"
table = "input"
address = 0
type = "u16"
scale = 0.5
unit = "cm"
missing = 65535
[[point]]
name = "alarm"
table = "input"
address = 1
type = "u16"
bit = 3
values = "alarm"
[[point]]
name = "offset"
table = "input"
address = 2
type = "i16"
unit = "m"
[[point]]
name = "count"
table = "holding"
address = 0
type = "u32"
"""


def test_a_map_is_checked_against_the_vocabulary_it_is_loaded_with(tmp_path: Path) -> None:
    path = tmp_path / "toy.toml"
    path.write_text(TOY_MAP, encoding="utf-8")
    m = load_map(path, TOY)
    v = m.decode(m.telemetry, [[4, 0b1000, 0xFFFE], [0, 7]])
    assert (v["level"], v["alarm"], v["offset"], v["count"]) == (0.02, "on", -2.0, 7)
    assert m.decode(m.telemetry[:1], [[0xFFFF, 0, 0]])["level"] is None
    with pytest.raises(
        MapError,
        match=r"point\[0\] \(level\)\.name: unknown point name \(docs/protocols\.md lists them\)",
    ):
        load_map(path)  # the default is XRS-MB/1's
    with pytest.raises(
        MapError,
        match=r"point\[0\] \(state\)\.name: unknown point name \(the toy's manual lists them\)",
    ):
        load_map(BUNDLED, TOY)
    assert load_map(BUNDLED, XRS_MB1) == load_map(BUNDLED)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('name = "count"', 'name = "extra.count"', "point: required point(s) missing: count"),
        ("missing = 65535\n", "", "point[0] (level).missing: required: the register contents that mean 'not available'"),
        ('table = "input"\naddress = 0', 'table = "holding"\naddress = 10', "point[0] (level).table: level is read from the input registers"),
        ('type = "i16"', 'type = "i32"', "point[2] (offset).type: expected i16; got 'i32'"),
        ('unit = "m"', 'unit = "m"\nscale = -1', "point[2] (offset).scale: offset takes its sign from the device: the scale must be > 0"),
        ('scale = 0.5', 'scale = -0.5', "point[0] (level).scale: level is never negative: the scale must be > 0"),
        ('name = "level"', 'name = "extra.level"', "point: offset is mapped without level"),
        ('1 = "on"', '1 = "off"\n2 = "unknown"', "point[1] (alarm).values: table 'alarm' must say which raw value is off and on"),
        ('missing = 65535', 'missing = 65535\nbit = 1', "point[0] (level).bit: only for an alarm (a flag of a status word)"),
        ('type = "u32"', 'type = "u32"\nscale = 2', "point[3] (count).type: count is a counter: u16 or u32, no scale, no unit"),
    ],
)  # fmt: skip
def test_a_vocabularys_rules_name_the_point_and_the_key(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert old in TOY_MAP, old
    path = tmp_path / "toy.toml"
    path.write_text(TOY_MAP.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(MapError) as excinfo:
        load_map(path, TOY)
    assert str(excinfo.value).startswith(f"{path}: {expected}")
