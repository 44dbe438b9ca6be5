"""The ``applicator`` topic (issue 16, B2c): its payload, its schema, and its path through
the MQTT sink's outbox (journaled like telemetry, its own ``seq``, thinned like telemetry).

The schema-wide checks every topic gets (validation of a run, envelope, closed objects,
enums equal to the Python enums, documented examples, no identifying keys) are in
test_mqtt_payloads.py, whose topic table includes this one.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from structlog.testing import capture_logs

from iortd.daemon.mqtt.outbox import Outbox, Record
from iortd.daemon.mqtt.payloads import TOPICS, Envelope, applicator_payload, topic
from iortd.daemon.mqtt.sink import MqttSink
from iortd.daemon.sinks import ApplicatorSample
from iortd.kernel.broker import BrokerSettings
from iortd.kernel.types import (
    ApplicatorFault,
    ApplicatorIdentity,
    ApplicatorReading,
    ApplicatorState,
    Tristate,
)

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "docs/schemas/v1/applicator.schema.json"
SCHEMA: dict[str, Any] = json.loads(SCHEMA_FILE.read_text("utf-8"))
VALIDATOR = Draft202012Validator(SCHEMA)
T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
TIMEOUT_S = 5.0


def env(seq: int = 0, *, sim: bool = False) -> Envelope:
    return Envelope.at(seq, 2, T0, sim=sim)


def reading(**kw: Any) -> ApplicatorReading:
    base: dict[str, Any] = {
        "mono_ns": 1,
        "utc": T0,
        "applicator": ApplicatorIdentity("spherical", 40.0, "APP-0042"),
        "simulated": False,
        "state": ApplicatorState.READY,
        "seated": Tristate.YES,
        "source_locked": Tristate.YES,
        "brakes_engaged": Tristate.NO,
        "uses_left": 17,
        "seat_counter": 3,
        "lock_counter": 5,
        "heartbeat": 812,
        "displacement_mm": (0.3, -0.4, 0.0),
        "displacement_magnitude_mm": 0.5,
        "tilt_deg": 0.12,
    }
    base.update(kw)
    return ApplicatorReading(**base)


def sample(r: ApplicatorReading | None = None, **kw: Any) -> ApplicatorSample:
    base: dict[str, Any] = {
        "device": "stand",
        "reading": reading() if r is None else r,
        "delivery_id": "or-1-20261126T100000000000Z",
        "displacement_from_beam_on_mm": 0.2,
        "peak_displacement_mm": 0.6,
    }
    base.update(kw)
    return ApplicatorSample(**base)


def wire(p: dict[str, Any]) -> Any:
    return json.loads(json.dumps(p, allow_nan=False))


def valid(p: dict[str, Any]) -> bool:
    return bool(VALIDATOR.is_valid(wire(p)))


def test_a_reading_maps_field_by_field() -> None:
    p = applicator_payload(env(7), sample())
    assert valid(p)
    assert p["seq"] == 7
    assert p["session"] == 2
    assert p["historical"] is False
    assert p["device"] == "stand"
    assert p["at"] == "2026-11-26T10:00:00.000000Z"
    assert p["delivery_id"] == "or-1-20261126T100000000000Z"
    assert p["applicator"] == {"type": "spherical", "diameter_mm": 40.0, "serial": "APP-0042"}
    assert p["uses_left"] == 17
    assert (p["state"], p["fault"]) == ("READY", None)
    assert (p["seated"], p["source_locked"], p["brakes_engaged"]) == ("yes", "yes", "no")
    assert p["displacement_mm"] == {"x": 0.3, "y": -0.4, "z": 0.0}
    assert p["displacement_magnitude_mm"] == 0.5
    assert p["displacement_from_beam_on_mm"] == 0.2
    assert p["peak_displacement_mm"] == 0.6
    assert p["tilt_deg"] == 0.12
    assert (p["lock_counter"], p["seat_counter"], p["heartbeat"]) == (5, 3, 812)
    assert "tolerance_mm" not in p  # ApplicatorSample carries none yet


def test_a_reading_that_says_nothing_is_all_unknown_never_ok() -> None:
    bare = ApplicatorReading(mono_ns=1, utc=T0, applicator=None, simulated=True)
    p = applicator_payload(env(), sample(bare, delivery_id=None, peak_displacement_mm=None))
    assert valid(p)
    assert p["sim"] is True
    assert p["state"] == "UNKNOWN"
    assert (p["seated"], p["source_locked"], p["brakes_engaged"]) == ("unknown",) * 3
    assert p["applicator"] is None
    assert p["displacement_mm"] is None
    assert p["displacement_magnitude_mm"] is None
    assert p["tilt_deg"] is None
    assert p["delivery_id"] is None
    assert p["peak_displacement_mm"] is None


def test_a_fault_is_named() -> None:
    p = applicator_payload(
        env(), sample(reading(state=ApplicatorState.FAULT, fault=ApplicatorFault.BRAKE))
    )
    assert valid(p)
    assert (p["state"], p["fault"]) == ("FAULT", "BRAKE")


def test_non_finite_is_text_and_implausible_is_null() -> None:
    r = reading(
        displacement_mm=(float("nan"), 1e9, -0.1),
        displacement_magnitude_mm=float("inf"),
        tilt_deg=400.0,
    )
    p = applicator_payload(env(), sample(r, peak_displacement_mm=-1.0))
    assert valid(p)
    assert p["displacement_mm"] == {"x": "nan", "y": None, "z": -0.1}
    assert p["displacement_magnitude_mm"] == "inf"
    assert p["tilt_deg"] is None
    assert p["peak_displacement_mm"] is None


def test_a_tolerance_is_sent_when_the_sample_has_one() -> None:
    @dataclass(frozen=True, slots=True)
    class WithTolerance(ApplicatorSample):
        tolerance_mm: float = 2.0

    p = applicator_payload(env(), WithTolerance("stand", reading(), None, None, None))
    assert valid(p)
    assert p["tolerance_mm"] == 2.0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("seated", True),
        ("seated", "YES"),
        ("brakes_engaged", None),
        ("state", "IRRADIATING"),
        ("fault", "BRAKES"),
        ("displacement_magnitude_mm", -0.01),
        ("displacement_magnitude_mm", 1e6),
        ("tilt_deg", 181),
        ("tolerance_mm", -1),
        ("tolerance_mm", "2"),
        ("lock_counter", -1),
        ("uses_left", 1.5),
        ("displacement_mm", {"x": 0, "y": 0}),
        ("displacement_mm", {"x": 0, "y": 0, "z": 0, "w": 0}),
        ("applicator", {"type": "flat", "diameter_mm": 30, "serial": "S", "patient": "x"}),
        ("applicator", {"type": "flat", "diameter_mm": 30, "serial": "S" * 65}),
        ("device", ""),
    ],
)
def test_the_schema_rejects(key: str, value: Any) -> None:
    p = wire(applicator_payload(env(), sample()))
    p[key] = value
    assert not VALIDATOR.is_valid(p)


def test_every_number_in_the_schema_is_bounded() -> None:
    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            kinds = node.get("type")  # a str or list; a dict is a property named "type"
            kinds = kinds if isinstance(kinds, list) else [kinds] if isinstance(kinds, str) else []
            if {"number", "integer"} & set(kinds):
                assert "minimum" in node, where
                assert "maximum" in node, where
            for k, v in node.items():
                walk(v, f"{where}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}/{i}")

    walk(SCHEMA, "")


def test_the_topic_is_a_stream_like_telemetry() -> None:
    assert TOPICS["applicator"] == TOPICS["telemetry"]
    assert topic("iort", "h", "or-1", "applicator") == "iort/v1/h/or-1/applicator"


finite_or_not = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))
tristates = st.sampled_from(list(Tristate))
counts = st.one_of(st.none(), st.integers(-(2**70), 2**70))


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.builds(
        ApplicatorReading,
        mono_ns=st.integers(0, 2**62),
        utc=st.just(T0),
        applicator=st.one_of(
            st.none(),
            st.builds(
                ApplicatorIdentity,
                type=st.sampled_from(["spherical", "flat", "needle"]),
                diameter_mm=st.floats(allow_nan=True, allow_infinity=True),
                serial=st.from_regex(r"\A[A-Z0-9-]{0,16}\Z"),
            ),
        ),
        simulated=st.booleans(),
        state=st.sampled_from(list(ApplicatorState)),
        fault=st.one_of(st.none(), st.sampled_from(list(ApplicatorFault))),
        seated=tristates,
        source_locked=tristates,
        brakes_engaged=tristates,
        uses_left=counts,
        seat_counter=counts,
        lock_counter=counts,
        heartbeat=counts,
        displacement_mm=st.one_of(
            st.none(), st.tuples(finite_or_not, finite_or_not, finite_or_not)
        ),
        displacement_magnitude_mm=finite_or_not,
        tilt_deg=finite_or_not,
    ),
    finite_or_not,
    finite_or_not,
)
def test_any_reading_gives_a_valid_payload(
    r: ApplicatorReading, from_beam_on: float | None, peak: float | None
) -> None:
    # A reading may hold None in the tuple where the type says float: a driver bug must
    # still give a valid message (the component unknown), never a broken stream.
    s = sample(r, displacement_from_beam_on_mm=from_beam_on, peak_displacement_mm=peak)
    assert valid(applicator_payload(env(), s))


# ---- through the sink and the outbox -----------------------------------------------------


async def _journaled(ob: Outbox, rec: Record) -> None:
    try:
        async with asyncio.timeout(TIMEOUT_S):
            await ob.wait_journaled(rec)
    except TimeoutError:
        pytest.fail(f"record n={rec.n} ({rec.topic} seq {rec.seq}) not journaled in time")


async def test_the_sink_journals_applicator_messages_with_their_own_seq(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "mqtt-outbox", 1024 * 1024)
    run = asyncio.create_task(ob.run())
    try:
        sink = MqttSink(
            BrokerSettings("127.0.0.1", 1883, tls=False, client_id="iortd-s-r-0"),
            ob,
            site="hospital-a",
            room="or-1",
            simulated=True,
        )
        await sink.applicator(sample())
        await sink.applicator(sample())
        recs = [r for r in ob.pending if r.topic == "applicator"]
        assert [r.seq for r in recs] == [0, 1]
        assert not recs[0].retained
        body = json.loads(recs[1].wire(historical=False))
        assert VALIDATOR.is_valid(body)
        assert body["sim"] is True  # the sink's simulated flag is ORed in
        await _journaled(ob, recs[-1])
        assert sink._topics["applicator"] == "iort/v1/hospital-a/or-1/applicator"
    finally:
        async with asyncio.timeout(TIMEOUT_S):
            await ob.close()
            await run


async def test_the_outbox_thins_applicator_samples_each_topic_every_second(
    tmp_path: Path,
) -> None:
    """Samples of both streams are thinned, each every second one of its own topic (a
    shared alternation would drop one stream whole when the two interleave); events
    never."""
    ob = await Outbox.open(tmp_path / "mqtt-outbox", 200_000)
    run = asyncio.create_task(ob.run())
    try:
        recs: list[Record] = []
        with capture_logs() as logs:
            for i in range(20_000):
                name = ("telemetry", "applicator", "events")[i % 3]
                e = Envelope(seq=ob.next_seq(name), session=ob.session, ts=env().ts)
                recs.append(ob.add(name, {**e.fields(), "x": "y" * 40}))
                if ob.thinned:
                    break
                if i % 100 == 99:
                    await _journaled(ob, recs[-1])
            else:
                pytest.fail("never thinned")
        by = {n: [r for r in recs if r.topic == n] for n in ("telemetry", "applicator")}
        for name, rs in by.items():
            dropped = [r for r in rs if r.done]
            assert dropped, name
            assert dropped == rs[0 : 2 * len(dropped) : 2], name
        assert not any(r.done for r in recs if r.topic == "events")
        [warning] = [e for e in logs if e["event"] == "mqtt_outbox_thinned"]
        assert warning["applicator_samples"] == sum(r.done for r in by["applicator"])
        assert warning["dropped_samples"] == ob.thinned
    finally:
        async with asyncio.timeout(TIMEOUT_S):
            await ob.close()
            await run


async def test_an_outbox_from_before_the_topic_opens_and_starts_it_at_0(tmp_path: Path) -> None:
    """An upgrade: state.json written by a daemon that had no applicator topic."""
    d = tmp_path / "mqtt-outbox"
    ob = await Outbox.open(d, 1024 * 1024)
    run = asyncio.create_task(ob.run())
    for _ in range(3):
        ob.next_seq("telemetry")
    async with asyncio.timeout(TIMEOUT_S):
        await ob.close()
        await run
    state = json.loads((d / "state.json").read_text("utf-8"))
    del state["next_seq"]["applicator"]
    (d / "state.json").write_text(json.dumps(state), "utf-8")
    ob2 = await Outbox.open(d, 1024 * 1024)
    run2 = asyncio.create_task(ob2.run())
    try:
        assert ob2.next_seq("applicator") == 0
        assert ob2.next_seq("telemetry") == 3
    finally:
        async with asyncio.timeout(TIMEOUT_S):
            await ob2.close()
            await run2
