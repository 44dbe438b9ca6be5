"""The simulated applicator reader and stand (simulators/applicator.py): the model's
physics and actions by hand, and its register image against hand-worked registers."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from iortd.kernel.types import ApplicatorIdentity
from iortd.simulators.applicator import (
    HOLDING_WINDOW,
    INPUT_WINDOW,
    ApplicatorModel,
    IllegalAction,
    MapError,
    build_image,
    load_register_map,
)

SPHERE30 = ApplicatorIdentity(type="spherical", diameter_mm=30.0, serial="APP-0042")
BALLOON = ApplicatorIdentity(type="balloon", diameter_mm=45.0, serial="BAL-0007")


def ready() -> ApplicatorModel:
    m = ApplicatorModel(seed=1, applicator=SPHERE30, uses_left=17)
    m.process(m.self_test_s)
    assert m.snapshot().state == "READY"
    return m


def test_self_test_then_ready_locked_at_the_start() -> None:
    m = ApplicatorModel(seed=1, applicator=SPHERE30)
    s = m.snapshot()
    assert (s.state, s.fault, s.lock_counter, s.displacement_mm) == ("SELF_TEST", None, 0, None)
    m.process(m.self_test_s / 2)
    assert m.snapshot().state == "SELF_TEST"
    m.process(m.self_test_s / 2)
    s = m.snapshot()
    assert (s.state, s.seated, s.source_locked, s.brakes_engaged) == ("READY", True, True, True)
    assert (s.seat_counter, s.lock_counter) == (1, 1)
    assert s.displacement_mm == (0.0, 0.0, 0.0)
    assert s.tilt_deg == 0.0


def test_drift_rate_is_exact_over_time() -> None:
    m = ready()
    m.drift(5.0, (3.0, 4.0, 0.0))  # 5 mm/min along (0.6, 0.8, 0)
    for _ in range(600):
        m.process(0.1)  # 60 s
    d = m.snapshot().displacement_mm
    assert d is not None
    assert d == pytest.approx((3.0, 4.0, 0.0), abs=1e-9)
    assert math.dist(d, (0, 0, 0)) == pytest.approx(5.0, abs=1e-9)
    m.drift(0.0, (1.0, 0.0, 0.0))
    m.process(3600.0)
    assert m.snapshot().displacement_mm == pytest.approx((3.0, 4.0, 0.0), abs=1e-9)


def test_a_bump_is_a_step() -> None:
    m = ready()
    m.bump(2.5, (0.0, 0.0, -1.0))
    assert m.snapshot().displacement_mm == pytest.approx((0.0, 0.0, -2.5))
    m.tilt(1.5, (0.0, 1.0))
    assert m.snapshot().tilt_deg == pytest.approx(1.5)


def test_relock_zeroes_the_reference_and_counts() -> None:
    m = ready()
    m.drift(6.0, (1.0, 0.0, 0.0))
    m.process(30.0)
    m.tilt(0.4, (1.0, 0.0))
    m.release_brakes()
    assert m.snapshot().brakes_engaged is False
    assert m.snapshot().displacement_mm == pytest.approx((3.0, 0.0, 0.0))
    m.lock()
    s = m.snapshot()
    assert (s.lock_counter, s.brakes_engaged, s.displacement_mm, s.tilt_deg) == (
        2,
        True,
        (0.0, 0.0, 0.0),
        0.0,
    )
    m.process(10.0)  # the drift goes on from the new reference
    assert m.snapshot().displacement_mm == pytest.approx((1.0, 0.0, 0.0))


def test_swap_unseat_and_reseat() -> None:
    m = ready()
    m.swap(BALLOON, uses_left=None)
    s = m.snapshot()
    assert (s.applicator, s.uses_left, s.seat_counter, s.seated, s.source_locked) == (
        BALLOON,
        None,
        2,
        True,
        True,
    )
    m.unseat()
    s = m.snapshot()
    assert (s.applicator, s.seated, s.source_locked, s.seat_counter) == (None, False, False, 2)
    m.seat()
    s = m.snapshot()
    assert (s.applicator, s.seated, s.source_locked, s.seat_counter) == (BALLOON, True, True, 3)
    m.unlatch_source()
    assert m.snapshot().source_locked is False


def test_faults_make_their_values_unavailable() -> None:
    m = ready()
    m.reader_fault()
    s = m.snapshot()
    assert (s.state, s.fault, s.applicator, s.uses_left) == ("FAULT", "READER", None, None)
    m.clear_fault()
    assert m.snapshot().applicator == SPHERE30
    m.fault("POSITION")
    assert m.snapshot().displacement_mm is None
    m.fault("TILT")  # the latest fault is the one reported
    s = m.snapshot()
    assert (s.fault, s.tilt_deg) == ("TILT", None)
    m.fault("BRAKE")
    assert m.snapshot().brakes_engaged is None
    with pytest.raises(IllegalAction, match="fault code 'SMOKE'"):
        m.fault("SMOKE")
    m.clear_fault()
    assert m.snapshot().state == "READY"


def test_out_of_range_is_a_position_fault_not_a_wrapped_value() -> None:
    m = ready()
    m.bump(400.0, (1.0, 0.0, 0.0))
    s = m.snapshot()
    assert (s.state, s.fault, s.displacement_mm) == ("FAULT", "POSITION", None)
    m.lock()
    assert m.snapshot().state == "READY"


def test_bad_arguments_are_refused() -> None:
    m = ready()
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="dt"):
            m.process(bad)
    with pytest.raises(ValueError, match="direction"):
        m.drift(1.0, (0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="rate"):
        m.drift(math.nan, (1.0, 0.0, 0.0))
    with pytest.raises(IllegalAction, match="seated"):
        m.seat()


def test_seeded_noise_is_reproducible() -> None:
    a, b, c = (ApplicatorModel(seed=s, applicator=SPHERE30, noise_mm=0.05) for s in (7, 7, 8))
    for m in (a, b, c):
        m.process(5.0)
        m.process(0.1)
    assert a.snapshot() == b.snapshot()
    assert a.snapshot().displacement_mm != c.snapshot().displacement_mm


def test_the_heartbeat_counts_measurement_refreshes() -> None:
    m = ready()
    h = m.snapshot().heartbeat
    m.process(0.1)
    m.process(0.0)
    assert m.snapshot().heartbeat == (h + 1) & 0xFFFF


# ---- the register image -----------------------------------------------------------------


def test_the_image_is_the_documented_registers() -> None:
    regmap = load_register_map()
    m = ready()
    m.bump(1.23, (1.0, 0.0, 0.0))
    m.bump(0.5, (0.0, -1.0, 0.0))
    m.bump(2.0, (0.0, 0.0, 1.0))
    m.tilt(0.35, (1.0, 0.0))
    image = build_image(m.snapshot(), m.identity, regmap)
    assert len(image.input) == len(INPUT_WINDOW)
    assert len(image.holding) == len(HOLDING_WINDOW)
    regs = image.input
    assert regs[0:7] == (2, 0, 1, 1, 1, 1, 300)
    assert bytes(b for r in regs[7:15] for b in r.to_bytes(2, "big")) == b"APP-0042" + b"\0" * 8
    assert regs[15:20] == (17, 0, 1, 0, 1)
    assert regs[20:26] == (123, 0xFFCE, 200, 240, 35, m.snapshot().heartbeat)
    assert regs[26:] == (0,) * 14
    text = bytes(b for r in image.holding[:16] for b in r.to_bytes(2, "big"))
    assert text.rstrip(b"\0") == b"iortd simulator"


def test_the_image_of_unavailable_values_uses_the_sentinels() -> None:
    regmap = load_register_map()
    m = ApplicatorModel(seed=1, applicator=None)
    regs = build_image(m.snapshot(), m.identity, regmap).input
    assert regs[0:7] == (1, 0, 0, 0, 1, 0, 0)  # self-test, nothing seated
    assert regs[15] == 0xFFFF
    assert regs[20:25] == (0x8000, 0x8000, 0x8000, 0xFFFF, 0xFFFF)


def test_a_map_the_simulator_cannot_serve_is_refused(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parents[2] / "config" / "maps" / "apl-mb1.toml").read_text()
    bad = tmp_path / "apl.toml"
    bad.write_text(text.replace("address = 25", "address = 40"))
    with pytest.raises(MapError, match=r"point\[16\] \(heartbeat\): registers 40\+1 outside"):
        load_register_map(bad)
    bad.write_text(text.replace('name = "tilt"', 'name = "extra.tilt"'))
    with pytest.raises(MapError, match="not a point the applicator simulator serves"):
        load_register_map(bad)


def test_the_image_never_wraps_a_value() -> None:
    regmap = load_register_map()
    m = ready()
    snap = m.snapshot()
    wide = dataclasses.replace(snap, displacement_mm=(327.68, 0.0, 0.0))
    with pytest.raises(ValueError, match=r"displacement\.x: 327\.68 does not fit i16"):
        build_image(wide, m.identity, regmap)
    sentinel = dataclasses.replace(snap, displacement_mm=(-327.68, 0.0, 0.0))
    with pytest.raises(ValueError, match="does not fit"):
        build_image(sentinel, m.identity, regmap)
