"""APL-MB/1's reply path under fuzzing, and the two codecs against each other.

1. **The reply path**, Modbus TCP and RTU, exactly as the ``modbus-apl`` driver runs it:
   ``reply_rest_size`` on the head, ``decode_reply`` on head + rest, then
   ``decode_points`` and ``decode_sample``. Inputs (100,000, seeded): valid telemetry
   replies of plausible and of model-made register images, the same with registers set to
   edge and sentinel values (a tilt of 180.01°, half a displacement missing, a magnitude
   off by 3 steps, a fault code in READY, ...), and byte- and field-level mutations of valid
   frames and garbage (the mutators of tests/unit/test_modbus_fuzz.py). The only errors
   allowed are ProtocolViolation and ModbusDeviceError; a frame that decodes must be the
   reply to the request (the Modbus oracle of test_modbus_fuzz.py) and its sample must be
   what :func:`spec_sample` reads from its registers. :func:`spec_sample` is written again
   from docs/protocols.md ("APL-MB/1") in integer arithmetic, without the map file or any
   of the codecs, and says which register images must be refused; so a frame that decodes
   satisfies every documented invariant, and none that the documentation accepts is
   refused.
2. **The driver over ScriptedTransport** (virtual time): late, silent, truncated, corrupt,
   chunked, stale replies, exceptions and closed links, on both framings: every read
   returns the sample of its own reply or raises a driver error, within a bounded time.
3. **Round trip (hypothesis)**: any state the simulator's model reaches through any
   sequence of actions, laid out by the simulator's register image, decodes through the
   driver to itself within the documented resolution (0.01 mm, 0.01°, 0.1 mm diameter).

Reproduce or explore with ``APL_FUZZ_SEED=<seed> [APL_FUZZ_INPUTS=<n per framing>]``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import struct
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_modbus_apl import TELEMETRY
from test_modbus_fuzz import (
    ANY_FAILURE,
    BYTE_MUTATIONS,
    CLEAN,
    CLOSED,
    DEVICE,
    SPEC_EXCEPTION_CODES,
    SUCCESS,
    TIMEOUT,
    VIOLATION,
    DriverReport,
    Failures,
    Plan,
    Req,
    T,
    Valid,
    f_mutate,
    judge_read,
    plan_read,
    rand_garbage,
    spec_exception,
    spec_judge,
    spec_reply,
    spec_request,
)

from iortd.drivers.errors import ProtocolViolation
from iortd.drivers.interface import DriverContext
from iortd.drivers.modbus_apl import (
    ModbusAplDriver,
    decode_points,
    decode_sample,
    load_apl_map,
)
from iortd.drivers.modbus_codec import (
    Framing,
    ModbusDeviceError,
    Table,
    decode_reply,
    reply_head_size,
    reply_rest_size,
)
from iortd.drivers.modbus_map import resolve_map
from iortd.drivers.transport import Expect, ScriptedTransport, ScriptStep
from iortd.kernel.clock import SystemClock
from iortd.kernel.types import ApplicatorIdentity, ApplicatorReading
from iortd.simulators.applicator import (
    FAULT_CODES,
    ApplicatorModel,
    IllegalAction,
    build_image,
    load_register_map,
)

SEED = int(os.environ.get("APL_FUZZ_SEED", "0xA915_EED"), 0)
FUZZ_INPUTS = max(50_000, int(os.environ.get("APL_FUZZ_INPUTS", "50000")))  # per framing
DRIVER_SESSIONS = 250  # per framing, of 1..4 reads each
MAP = load_apl_map(resolve_map("apl-mb1"))
SIM_MAP = load_register_map()
CTX = DriverContext(clock=SystemClock(), seed=0)
T0 = datetime(2026, 12, 6, tzinfo=UTC)
N = 26  # APL-MB/1: input registers 0-25 in one read


def make_rng(seed: int) -> random.Random:
    return random.Random(seed)  # noqa: S311 - reproducible test data, not cryptography


@pytest.fixture(autouse=True)
def _quiet_pymodbus() -> Iterator[None]:
    """pymodbus logs every frame it cannot read: silence it (and its cost) here."""
    logger = logging.getLogger("pymodbus.logging")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    yield
    logger.setLevel(level)


# ---- the documentation, written again ----------------------------------------------------

STATES = {0: "OFF", 1: "SELF_TEST", 2: "READY", 3: "FAULT"}
FAULTS = {0: None, 1: "READER", 2: "POSITION", 3: "TILT", 4: "BRAKE", 5: "INTERNAL"}
FLAGS = {0: "no", 1: "yes"}  # 2 and anything unlisted: unknown
TYPES = {0: None, 1: "spherical", 2: "flat", 3: "needle", 4: "surface", 5: "balloon"}

View = tuple[Any, ...]


def _signed(r: int) -> int:
    return r - 0x10000 if r & 0x8000 else r


def spec_sample(regs: Sequence[int]) -> View | None:
    """What a master must make of input registers 0-25 (docs/protocols.md, APL-MB/1), in
    raw units (0.01 mm, 0.01°, 0.1 mm); None: the reply must be refused."""
    state = STATES.get(regs[0], "UNKNOWN")
    fault = FAULTS.get(regs[1], "UNKNOWN")
    if state == "FAULT" and fault is None:
        return None
    if state in ("OFF", "SELF_TEST", "READY") and fault is not None:
        return None
    flags = tuple(FLAGS.get(r, "unknown") for r in regs[2:5])
    if regs[5] not in TYPES:
        return None
    raw = b"".join(r.to_bytes(2, "big") for r in regs[7:15]).split(b"\0", 1)[0]
    if any(not 0x20 <= b <= 0x7E for b in raw):
        return None
    serial = raw.decode("ascii").strip()
    uses = None if regs[15] == 0xFFFF else regs[15]
    kind = TYPES[regs[5]]
    if kind is None:
        if regs[6] != 0 or serial or uses is not None:
            return None
        applicator = None
    else:
        if not 1 <= regs[6] <= 2000 or not serial:
            return None
        applicator = (kind, regs[6], serial)
    xyz = [None if r == 0x8000 else _signed(r) for r in regs[20:23]]
    m = None if regs[23] == 0xFFFF else regs[23]
    present = [v is not None for v in (*xyz, m)]
    if any(present) and not all(present):
        return None
    displacement = None
    if m is not None:
        x, y, z = (int(v) for v in xyz if v is not None)
        s = x * x + y * y + z * z
        if not max(0, m - 2) ** 2 <= s <= (m + 2) ** 2:  # 0.02 mm, in 0.01 mm steps
            return None
        displacement = (x, y, z, m)
    tilt = None if regs[24] == 0xFFFF else regs[24]
    if tilt is not None and tilt > 18000:
        return None
    return (
        state,
        fault,
        flags,
        applicator,
        uses,
        (regs[16] << 16) | regs[17],
        (regs[18] << 16) | regs[19],
        displacement,
        tilt,
        regs[25],
    )


def view(s: ApplicatorReading) -> View:
    a = s.applicator
    d = s.displacement_mm
    m = s.displacement_magnitude_mm
    return (
        s.state.value,
        None if s.fault is None else s.fault.value,
        (s.seated.value, s.source_locked.value, s.brakes_engaged.value),
        None if a is None else (a.type, round(a.diameter_mm * 10), a.serial),
        s.uses_left,
        s.seat_counter,
        s.lock_counter,
        None if d is None or m is None else (*(round(c * 100) for c in d), round(m * 100)),
        None if s.tilt_deg is None else round(s.tilt_deg * 100),
        s.heartbeat,
    )


# ---- register images -------------------------------------------------------------------


def _text(rng: random.Random, n: int) -> list[int]:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_. /"
    text = "".join(rng.choice(alphabet) for _ in range(n)).encode("ascii").ljust(16, b"\0")
    return [int.from_bytes(text[i : i + 2], "big") for i in range(0, 16, 2)]


def plausible(rng: random.Random) -> list[int]:
    """A register image the documentation accepts (mostly), drawn directly."""
    state = rng.choice((0, 1, 2, 2, 2, 3))
    regs = [state, rng.randint(1, 5) if state == 3 else 0]
    regs += [rng.choice((0, 1, 1, 2)) for _ in range(3)]
    if rng.random() < 0.2:
        regs += [0, 0, *[0] * 8, 0xFFFF]
    else:
        regs += [rng.randint(1, 5), rng.randint(1, 2000), *_text(rng, rng.randint(1, 16))]
        regs.append(rng.choice((0xFFFF, 0, 1, rng.randint(0, 0xFFFE))))
    for _ in range(2):
        c = rng.choice((0, 1, 7, 0xFFFF_FFFF, rng.getrandbits(32)))
        regs += [c >> 16, c & 0xFFFF]
    if rng.random() < 0.15:
        regs += [0x8000, 0x8000, 0x8000, 0xFFFF]
    else:
        big = rng.random() < 0.2
        xyz = [rng.randint(-32767, 32767) if big else rng.randint(-500, 500) for _ in range(3)]
        length = math.sqrt(sum(v * v for v in xyz))
        m = round(length) + rng.choice((0, 0, 0, -1, 1, -2, 2))
        regs += [v & 0xFFFF for v in xyz] + [max(0, m)]
    regs.append(rng.choice((0xFFFF, 0, 18000, rng.randint(0, 18000), rng.randint(0, 300))))
    regs.append(rng.getrandbits(16))
    assert len(regs) == N
    return regs


EDGES = (0, 1, 2, 3, 5, 6, 0x7FFF, 0x8000, 0x8001, 0xFFFE, 0xFFFF, 2000, 2001, 18000, 18001)


def bend(rng: random.Random, regs: list[int]) -> list[int]:
    """Registers set to edge, sentinel or random values: documented-valid or not."""
    out = list(regs)
    for _ in range(rng.choice((1, 1, 2, 3))):
        i = rng.randrange(N)
        pick = rng.random()
        if pick < 0.5:
            out[i] = rng.choice(EDGES)
        elif pick < 0.7:
            out[i] = (out[i] + rng.choice((-3, -2, -1, 1, 2, 3))) & 0xFFFF
        else:
            out[i] = rng.getrandbits(16)
    return out


def model_images(rng: random.Random, n: int) -> list[list[int]]:
    out = []
    identities = [
        ApplicatorIdentity("spherical", 30.0, "APP-0042"),
        ApplicatorIdentity("balloon", 45.5, "BAL-7"),
        ApplicatorIdentity("flat", 200.0, "F" * 16),
    ]
    for i in range(n):
        m = ApplicatorModel(
            seed=i, applicator=rng.choice(identities), uses_left=rng.choice((None, 0, 9))
        )
        for _ in range(rng.randint(1, 6)):
            act = rng.randrange(6)
            try:
                if act == 0:
                    m.process(rng.uniform(0, 120))
                elif act == 1:
                    m.drift(rng.uniform(0, 30), (rng.random(), rng.random(), 1.0))
                elif act == 2:
                    m.bump(rng.uniform(-50, 50), (1.0, rng.random(), rng.random()))
                elif act == 3:
                    m.fault(rng.choice(FAULT_CODES))
                elif act == 4:
                    m.swap(rng.choice(identities))
                else:
                    m.lock()
            except IllegalAction:
                pass
        out.append(list(build_image(m.snapshot(), m.identity, SIM_MAP).input[:N]))
    return out


# ---- 1. the reply path -------------------------------------------------------------------


@dataclass
class Report(Failures):
    seed: int
    inputs: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def summary(self) -> str:
        head = f"seed={self.seed:#x} inputs={self.inputs} outcomes={dict(self.outcomes)}"
        return "\n".join([head, *self.failure_lines()])


def judge(framing: Framing, req: Req, data: bytes, report: Report) -> None:
    """``data`` (the bytes after the request) through the driver's whole reply path."""
    report.inputs += 1
    show = f"{framing.value} {data.hex(' ')}"
    head_size = reply_head_size(framing)
    if len(data) < head_size:
        report.outcomes["short"] += 1  # the driver would time out
        return
    try:
        rest = reply_rest_size(framing, data[:head_size])
    except ProtocolViolation:
        report.outcomes["head refused"] += 1
        return
    except Exception as exc:
        report.fail(f"reply_rest_size crash {type(exc).__name__}", f"{show}: {exc}")
        return
    if len(data) < head_size + rest:
        report.outcomes["incomplete"] += 1
        return
    frame = data[: head_size + rest]
    verdict = spec_judge(framing, req, frame)
    want = spec_sample(verdict[1]) if verdict is not None and verdict[0] == "ok" else None
    try:
        regs = decode_reply(
            framing, frame, req.table, req.address, req.count, unit=req.unit, tid=req.tid
        )
        values, raws = decode_points(MAP, MAP.telemetry, [regs])
        sample = decode_sample(MAP, values, mono_ns=0, utc=T0, simulated=False, raws=raws)
    except ModbusDeviceError as exc:
        if verdict != ("exc", exc.code):
            report.fail("device error for no well-formed exception", f"{show}: {exc}")
        report.outcomes["device error"] += 1
    except ProtocolViolation as exc:
        if verdict is not None and verdict[0] == "ok" and want is not None:
            report.fail("valid reply refused", f"{show}: {exc}")
        elif verdict is not None and verdict[0] == "exc" and verdict[1] in SPEC_EXCEPTION_CODES:
            report.fail("valid exception refused", f"{show}: {exc}")
        report.outcomes["values refused" if verdict is not None else "frame refused"] += 1
    except Exception as exc:
        report.fail(f"crash {type(exc).__name__}", f"{show}: {exc}")
    else:
        if verdict is None or verdict[0] != "ok":
            report.fail("bad frame accepted", f"{show} (oracle: {verdict!r})")
        elif want is None:
            report.fail("values the documentation refuses were accepted", f"{show}: {regs}")
        elif view(sample) != want:
            report.fail("misread", f"{show}: {view(sample)} != {want}")
        else:
            report.outcomes["accepted"] += 1


def fuzz_inputs(rng: random.Random, framing: Framing, count: int) -> Iterator[tuple[Req, bytes]]:
    images = [plausible(rng) for _ in range(1500)] + model_images(rng, 300)
    for _ in range(count):
        unit = rng.choice((2, 2, 2, 1, rng.randint(1, 247)))
        req = Req(Table.INPUT, 0, N, unit, rng.getrandbits(16) if framing is Framing.TCP else 0)
        regs = rng.choice(images)
        pick = rng.random()
        if pick < 0.35:
            yield req, spec_reply(framing, req, bend(rng, regs) if pick < 0.3 else regs)
            continue
        if pick < 0.4:
            yield req, spec_exception(framing, req, rng.choice((*SPEC_EXCEPTION_CODES, 0, 0x7F)))
            continue
        if pick < 0.5:
            yield req, rand_garbage(rng, framing, req)
            continue
        good = spec_reply(framing, req, regs)
        if pick < 0.75:
            data = good
            for _ in range(rng.choice((1, 1, 2))):
                data = rng.choice(BYTE_MUTATIONS)(rng, data) if data else data
            yield req, data
        else:
            pdu = good[7:] if framing is Framing.TCP else good[1:-2]
            yield req, f_mutate(rng, framing, Valid(req, pdu, good))


# no_cover: the full count runs, only coverage.py's tracer is paused for it (it tripled
# this loop's time); the property tests below reach the same code under coverage.
@pytest.mark.no_cover
@pytest.mark.parametrize("framing", [Framing.TCP, Framing.RTU])
def test_fuzz_reply_path(framing: Framing, record_property: Callable[[str, object], None]) -> None:
    seed = SEED ^ (0xA1 if framing is Framing.TCP else 0xA2)
    report = Report(seed)
    started = time.perf_counter()
    for req, data in fuzz_inputs(make_rng(seed), framing, FUZZ_INPUTS):
        judge(framing, req, data, report)
    elapsed = time.perf_counter() - started
    record_property(f"apl_fuzz_{framing.value}_inputs", report.inputs)
    record_property(f"apl_fuzz_{framing.value}_s", round(elapsed, 2))
    summary = report.summary()
    assert not report.failures, summary
    assert report.inputs >= 50_000, summary
    # every way through was taken, many times
    for outcome in ("accepted", "values refused", "frame refused", "device error"):
        assert report.outcomes[outcome] >= 1000, summary


def test_the_oracle_against_hand_worked_registers() -> None:
    want = spec_sample(TELEMETRY)
    assert want is not None
    assert want[7] == (123, -50, 200, 240)
    assert spec_sample([*TELEMETRY[:23], 237, *TELEMETRY[24:]]) is None
    assert spec_sample([*TELEMETRY[:24], 18001, *TELEMETRY[25:]]) is None


# ---- 2. the driver over a scripted device ------------------------------------------------


async def run_session(rng: random.Random, framing: Framing, report: DriverReport) -> None:
    unit = rng.choice((2, 2, 1, 247))
    reads = rng.randint(1, 4)
    script: list[ScriptStep] = []
    plans: list[Plan] = []
    for i in range(reads):
        req = Req(Table.INPUT, 0, N, unit, i + 1)
        regs = plausible(rng) if rng.random() < 0.5 else bend(rng, plausible(rng))
        kind, steps, allowed, code, regs = plan_read(rng, framing, req, regs, i == reads - 1)
        script += [Expect(spec_request(framing, req)), *steps]
        if any(k not in CLEAN for k, *_ in plans):
            allowed = allowed | ANY_FAILURE | ({DEVICE} if SUCCESS in allowed else set())
        plans.append((kind, regs, allowed, code))
        report.scenarios[kind] += 1
    transport = ScriptedTransport(script, timeout_s=T)
    report.sessions += 1
    async with ModbusAplDriver(transport, CTX, MAP, unit=unit, framing=framing, timeout_s=T) as d:
        for i, plan in enumerate(plans):
            where = f"{framing.value} unit={unit} read {i + 1}/{reads} {plan[0]}"
            want = spec_sample(plan[1])
            outcome = await judge_read(
                report, transport, d.read_applicator, view, want, plan, where
            )
            if outcome in (None, CLOSED):
                return


@pytest.mark.parametrize("framing", [Framing.TCP, Framing.RTU])
async def test_fuzz_driver_reads(framing: Framing) -> None:
    seed = SEED ^ (0xD1 if framing is Framing.TCP else 0xD2)
    rng = make_rng(seed)
    report = DriverReport(seed)
    for _ in range(DRIVER_SESSIONS):
        await run_session(rng, framing, report)
    summary = report.summary()
    assert not report.failures, summary
    for outcome in (SUCCESS, TIMEOUT, VIOLATION, DEVICE, CLOSED):
        assert report.outcomes[outcome] >= 10, summary


# ---- 3. the simulator's image through the driver's decoder -------------------------------

vectors3 = st.tuples(*(st.floats(-1, 1) for _ in range(3))).filter(
    lambda v: math.sqrt(sum(c * c for c in v)) > 1e-3
)
vectors2 = st.tuples(st.floats(-1, 1), st.floats(-1, 1)).filter(lambda v: math.hypot(*v) > 1e-3)
identities = st.builds(
    ApplicatorIdentity,
    type=st.sampled_from(("spherical", "flat", "needle", "surface", "balloon")),
    diameter_mm=st.floats(0.1, 200.0),
    serial=st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-./", min_size=1, max_size=16),
)
uses = st.none() | st.integers(0, 0xFFFE)
actions = st.one_of(
    st.tuples(st.just("process"), st.floats(0, 600)),
    st.tuples(st.just("drift"), st.floats(0, 60), vectors3),
    st.tuples(st.just("bump"), st.floats(-400, 400), vectors3),
    st.tuples(st.just("tilt"), st.floats(-200, 200), vectors2),
    st.tuples(st.just("swap"), identities, uses),
    st.tuples(st.just("seat"), identities, uses),
    st.tuples(st.just("fault"), st.sampled_from(FAULT_CODES)),
    st.sampled_from(
        [
            ("release_brakes",),
            ("engage_brakes",),
            ("lock",),
            ("unseat",),
            ("unlatch_source",),
            ("latch_source",),
            ("clear_fault",),
        ]
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    start=st.none() | identities,
    noise=st.sampled_from((0.0, 0.05, 1.0)),
    steps=st.lists(actions, max_size=12),
)
def test_any_model_state_decodes_to_itself(
    seed: int, start: ApplicatorIdentity | None, noise: float, steps: list[tuple[Any, ...]]
) -> None:
    model = ApplicatorModel(seed=seed, applicator=start, noise_mm=noise, noise_deg=noise / 10)
    for name, *args in steps:
        with contextlib.suppress(IllegalAction):
            getattr(model, name)(*args)
    snap = model.snapshot()
    image = build_image(snap, model.identity, SIM_MAP, scenario="hypothesis")
    values, raws = decode_points(MAP, MAP.telemetry, [list(image.input[:N])])
    s = decode_sample(MAP, values, mono_ns=0, utc=T0, simulated=True, raws=raws)
    flag = {True: "yes", False: "no", None: "unknown"}
    assert (s.state.value, None if s.fault is None else s.fault.value) == (snap.state, snap.fault)
    assert (s.seated.value, s.source_locked.value, s.brakes_engaged.value) == (
        flag[snap.seated],
        flag[snap.source_locked],
        flag[snap.brakes_engaged],
    )
    if snap.applicator is None:
        assert (s.applicator, s.uses_left) == (None, None)
    else:
        assert s.applicator is not None
        assert (s.applicator.type, s.applicator.serial) == (
            snap.applicator.type,
            snap.applicator.serial,
        )
        assert abs(s.applicator.diameter_mm - snap.applicator.diameter_mm) <= 0.05 + 1e-9
        assert s.uses_left == snap.uses_left
    assert (s.seat_counter, s.lock_counter, s.heartbeat) == (
        snap.seat_counter,
        snap.lock_counter,
        snap.heartbeat,
    )
    if snap.displacement_mm is None:
        assert (s.displacement_mm, s.displacement_magnitude_mm) == (None, None)
    else:
        assert s.displacement_mm is not None
        assert s.displacement_magnitude_mm is not None
        for got, true in zip(s.displacement_mm, snap.displacement_mm, strict=True):
            assert abs(got - true) <= 0.005 + 1e-9
        length = math.sqrt(sum(c * c for c in snap.displacement_mm))
        assert abs(s.displacement_magnitude_mm - length) <= 0.005 + 1e-9
    if snap.tilt_deg is None:
        assert s.tilt_deg is None
    else:
        assert s.tilt_deg is not None
        assert abs(s.tilt_deg - snap.tilt_deg) <= 0.005 + 1e-9
    ident = build_image(snap, model.identity, SIM_MAP, scenario="hypothesis").holding
    text = b"".join(r.to_bytes(2, "big") for r in ident[40:72]).rstrip(b"\0")
    assert text == b"hypothesis"
    assert struct.pack(">H", image.input[N]) == b"\0\0"  # outside the map: 0


def test_the_simulators_identity_registers_read_as_its_identity() -> None:
    model = ApplicatorModel(seed=3, serial="APL-SIM-0042")
    holding = build_image(
        model.snapshot(), model.identity, SIM_MAP, scenario="drift 0123ab"
    ).holding
    values, _ = decode_points(MAP, MAP.identity, [list(holding[:72])])
    assert {k.removeprefix("identity."): v for k, v in values.items()} == {
        "manufacturer": "iortd simulator",
        "model": "APL-SIM",
        "serial": "APL-SIM-0042",
        "firmware": "1.0",
        "scenario": "drift 0123ab",
    }
