"""Topic schema v1 (daemon/mqtt/payloads.py) against its JSON Schemas (docs/schemas/v1).

Every builder's output validates against the schema of its topic, for hand-made data, for
a real tracker run and for hypothesis-generated (hostile) readings, snapshots and events;
the schemas reject what a consumer must not accept; the schemas' enums are the Python
enums, so the two cannot drift; the examples in docs/mqtt-topics.md validate too; and no
payload or schema key looks like patient data.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import typing
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker  # type: ignore[import-untyped]
from test_verification import check as verify
from test_verification import inputs

from iortd.auditlog.cosignature import CosignerKey, verify_cosignature
from iortd.auditlog.note import Checkpoint, generate_keypair
from iortd.auditlog.signed_note import split_note
from iortd.daemon.alarm_ledger import Ack, AlarmLedger
from iortd.daemon.answers import OUTCOMES, answered
from iortd.daemon.entries import summary_data
from iortd.daemon.mqtt.payloads import (
    EVENT_KINDS,
    EVENTS_TOPIC_KINDS,
    NOTICE_KIND,
    NOTICE_SEVERITIES,
    REPORT_FIELDS,
    SCHEMA,
    SEQ_MAX,
    SKIP_REASONS,
    SKIPPABLE_TOPICS,
    TOPICS,
    Envelope,
    alarms_payload,
    applicator_payload,
    checkpoint_payload,
    delivery_payload,
    event_payloads,
    interlocks_payload,
    notice_payload,
    skip_payload,
    status_payload,
    telemetry_payload,
    topic,
)
from iortd.daemon.sinks import HANDOFF_OUTCOMES, HANDOFF_WHAT, ApplicatorSample, Sample
from iortd.daemon.tracker import (
    Alarm,
    AlarmCleared,
    AlarmCode,
    AlarmRaised,
    ApplicatorAtBeamOn,
    ApplicatorRelocked,
    DeliveryAmended,
    DeliverySnapshot,
    DeliveryStarted,
    DeliveryTracker,
    DeviceGapEnded,
    DeviceGapStarted,
    Gap,
    InterlockChanged,
    Interruption,
    MonitoringGapEnded,
    MonitoringGapStarted,
    MonitorInterlockChanged,
    Phase,
    PhaseChanged,
    Segment,
    Severity,
    Terminated,
    TrackerEvent,
    TrackerSettings,
    VerificationChecked,
)
from iortd.daemon.verification import public_object
from iortd.kernel.types import (
    ApplicatorFault,
    ApplicatorIdentity,
    ApplicatorReading,
    ApplicatorState,
    DeviceState,
    Interlock,
    InterlockState,
    SourceReading,
    TerminationStatus,
    Tristate,
    VerificationItem,
    VerificationOutcome,
    VerificationTrigger,
)

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR = ROOT / "docs" / "schemas" / "v1"
DOC = ROOT / "docs" / "mqtt-topics.md"
NS = 1_000_000_000
T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
ALL_OK: Mapping[Interlock, InterlockState] = dict.fromkeys(Interlock, InterlockState.OK)

# Topic name -> schema file stem.
SCHEMA_OF = {
    "status": "status",
    "telemetry": "telemetry",
    "applicator": "applicator",
    "interlocks": "interlocks",
    "delivery": "delivery",
    "events": "events",
    "audit/checkpoint": "checkpoint",
    "alarms": "alarms",
    "skip": "skip",
}
# A payload key matching this could carry patient data. Keys that match but are known not
# to (documented in docs/mqtt-topics.md, "No patient data") go in SAFE_KEYS, per topic's
# schema stem: the alarms topic's acknowledged.name is the acknowledging staff member's
# printed name from the keyring. software_version, site, room, device and delivery_id do
# not match.
IDENTIFYING = re.compile(r"patient|name|birth|mrn|address", re.IGNORECASE)
SAFE_KEYS: Mapping[str, frozenset[str]] = {"alarms": frozenset({"name"})}


# ---- schemas and validation ----------------------------------------------------------------


def _format_checker() -> FormatChecker:
    """Draft 2020-12 format checking, with a date-time checker of our own when jsonschema's
    optional rfc3339-validator is not installed (then the built-in one is absent)."""
    checker = FormatChecker()
    if "date-time" not in checker.checkers:

        @checker.checks("date-time", raises=ValueError)  # type: ignore[untyped-decorator]
        def _date_time(value: object) -> bool:
            if not isinstance(value, str):
                return True
            if not re.fullmatch(
                r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", value
            ):
                return False
            datetime.fromisoformat(value.replace("z", "Z").replace("Z", "+00:00"))
            return True

    return checker


FORMATS = _format_checker()


def load_schema(stem: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMA_DIR / f"{stem}.schema.json").read_text("utf-8"))
    return schema


SCHEMAS = {stem: load_schema(stem) for stem in SCHEMA_OF.values()}
VALIDATORS = {
    stem: Draft202012Validator(schema, format_checker=FORMATS) for stem, schema in SCHEMAS.items()
}


def on_the_wire(payload: Mapping[str, Any]) -> Any:
    """What a subscriber receives: strict JSON (no NaN) as UTF-8, parsed back."""
    raw = json.dumps(payload, allow_nan=False, ensure_ascii=False).encode("utf-8")
    return json.loads(raw)


def check(stem: str, payload: Mapping[str, Any]) -> None:
    VALIDATORS[stem].validate(on_the_wire(payload))


def rejects(stem: str, payload: Any) -> bool:
    return not VALIDATORS[stem].is_valid(payload)


def keys(node: Any) -> Iterator[str]:
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield k
            yield from keys(v)
    elif isinstance(node, list):
        for v in node:
            yield from keys(v)


def schema_property_names(node: Any) -> Iterator[str]:
    if isinstance(node, Mapping):
        props = node.get("properties")
        if isinstance(props, Mapping):
            yield from props
        for v in node.values():
            yield from schema_property_names(v)
    elif isinstance(node, list):
        for v in node:
            yield from schema_property_names(v)


def enums(node: Any) -> Iterator[list[Any]]:
    if isinstance(node, Mapping):
        if "enum" in node:
            yield node["enum"]
        for v in node.values():
            yield from enums(v)
    elif isinstance(node, list):
        for v in node:
            yield from enums(v)


# ---- data ----------------------------------------------------------------------------------


def env(seq: int = 0, *, sim: bool = False, historical: bool = False) -> Envelope:
    return Envelope.at(seq, 3, T0 + timedelta(microseconds=123_456), sim=sim, historical=historical)


def counter(start: int = 0, **kw: bool) -> typing.Callable[[], Envelope]:
    n = iter(range(start, start + 1_000_000))
    return lambda: env(next(n), **kw)


def reading(**kw: Any) -> SourceReading:
    base: dict[str, Any] = {
        "mono_ns": 100 * NS,
        "utc": T0,
        "state": DeviceState.IRRADIATING,
        "dose_rate_gy_min": 0.8,
        "dose_primary_gy": 4.0,
        "dose_secondary_gy": 4.01,
        "preset_gy": 20.0,
        "beam_on_s": 300.0,
        "kv": 50.0,
        "ua": 40.0,
        "interlocks": ALL_OK,
    }
    base.update(kw)
    return SourceReading(**base)


APPLICATOR = ApplicatorIdentity("spherical", 40.0, "APP-0042")


def apl_reading(**kw: Any) -> ApplicatorReading:
    base: dict[str, Any] = {
        "mono_ns": 100 * NS,
        "utc": T0,
        "applicator": APPLICATOR,
        "simulated": False,
        "state": ApplicatorState.READY,
        "seated": Tristate.YES,
        "source_locked": Tristate.YES,
        "brakes_engaged": Tristate.YES,
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


def apl_sample(r: ApplicatorReading | None = None, **kw: Any) -> ApplicatorSample:
    base: dict[str, Any] = {
        "device": "stand",
        "reading": apl_reading() if r is None else r,
        "delivery_id": "or-1-20261126T100000000000Z",
        "displacement_from_beam_on_mm": 0.2,
        "peak_displacement_mm": 0.6,
    }
    base.update(kw)
    return ApplicatorSample(**base)


def snapshot(**kw: Any) -> DeliverySnapshot:
    gap = Gap("link lost: timeout", 10 * NS, T0, 12 * NS, T0 + timedelta(seconds=2))
    base: dict[str, Any] = {
        "delivery_id": "or-1-20261126T100000000000Z",
        "phase": Phase.IRRADIATING,
        "joined_in_progress": False,
        "preset_gy": 20.0,
        "delivered_primary_gy": 4.0,
        "delivered_secondary_gy": 4.01,
        "remaining_gy": 16.0,
        "dose_rate_gy_min": 0.8,
        "expected_rate_gy_min": 0.8,
        "planned_time_s": 1500.0,
        "backup_timer_limit_s": 1650.0,
        "beam_on_s": 300.0,
        "elapsed_s": 320.0,
        "estimated_remaining_s": 1200.0,
        "applicator": APPLICATOR,
        "segments": (Segment("beam", 0.0, 4.0, 0, None),),
        "interruptions": (Interruption("interlock door", 5 * NS, 0.1, 9 * NS),),
        "gaps": (gap,),
        "termination": None,
        "termination_reason": None,
        "started_utc": T0 - timedelta(minutes=6),
        "simulated": False,
    }
    base.update(kw)
    return DeliverySnapshot(**base)


def sample(r: SourceReading | None = None, d: DeliverySnapshot | None = None) -> Sample:
    return Sample("source", r or reading(), d, ALL_OK, True)


def note(count: int = 12) -> str:
    head = hashlib.sha256(b"entry").hexdigest()
    cp = Checkpoint("iortd/hospital-a/or-1/0123456789abcdef", count, head, ("time t",))
    return cp.signed(generate_keypair("iortd-test"))


VERIFICATION = {
    "outcome": "NOT_VERIFIED", "at": "2026-11-26T10:00:00.000000Z", "trigger": "ready",
    "reasons": ["dose"], "overridden": [], "prescription_sha256": "ab" * 32,
    "treatment_id": "T-2026-0042", "plan_id": "IORT-P1", "prescribed_dose_gy": 20.0,
    "applicator_code": "SPH30", "expected_time_s": 1380.0, "planned_time_s": 1380.0,
    "preset_gy": 20.5,
}  # fmt: skip


def every_event(d: str = "or-1-20261126T100000000000Z") -> list[TrackerEvent]:
    """One of each tracker event, as the tracker would emit them."""
    alarm = Alarm(
        AlarmCode.INTERLOCK_TRIPPED,
        "interlock_tripped:door",
        Severity.HIGH,
        "interlock door tripped with beam on",
        NS,
        T0,
    )
    open_gap = Gap("no reading for 3.2 s (bound 3.0 s)", NS, T0)
    closed_gap = Gap(open_gap.cause, NS, T0, 5 * NS, T0 + timedelta(seconds=4))
    done = snapshot(
        phase=Phase.TERMINATED,
        delivered_primary_gy=20.0,
        remaining_gy=0.0,
        termination=TerminationStatus.NORMAL,
        termination_reason="preset reached",
        estimated_remaining_s=0.0,
    )
    return [
        DeliveryStarted(d, NS, T0, 20.0, False),
        PhaseChanged(d, Phase.IDLE, Phase.PREPARATORY, "plan selected", NS, T0),
        InterlockChanged(Interlock.DOOR, InterlockState.OK, InterlockState.TRIPPED, NS, T0),
        AlarmRaised(d, alarm),
        AlarmCleared(d, alarm, 2 * NS, T0 + timedelta(seconds=1)),
        MonitoringGapStarted(d, open_gap),
        MonitoringGapEnded(d, closed_gap),
        # The applicator reader's (issue 16).
        MonitorInterlockChanged(
            "stand-1", Interlock.APPLICATOR, InterlockState.OK, InterlockState.TRIPPED,
            "stand brakes engaged: no with the beam on", NS, T0, d,
        ),
        DeviceGapStarted("stand-1", d, Gap("link lost: timeout", NS, T0)),
        DeviceGapEnded("stand-1", d, closed_gap),
        ApplicatorRelocked("stand-1", d, 3, 4, 0.4, NS, T0),
        ApplicatorAtBeamOn(
            "stand-1", d, ApplicatorIdentity("spherical", 30.0, "SIM-SPH30"), 0.1, 0.0, NS, T0
        ),
        # Verification before beam-on (issue 18): the MQTT object of one check.
        VerificationChecked(d, {"delivery_id": d}, VERIFICATION, NS, T0),
        PhaseChanged(d, Phase.IRRADIATING, Phase.TERMINATED, "terminated NORMAL", NS, T0),
        Terminated(d, TerminationStatus.NORMAL, "preset reached", done),
        DeliveryAmended(d, "0.1000 Gy more was given after closing", done),
    ]  # fmt: skip


# A real run: selection, beam, an interruption by the door, a monitoring gap, resumption,
# a normal end; the console fed by hand as a driver would.


def tracker_run() -> tuple[list[Sample], list[list[TrackerEvent]]]:
    tracker = DeliveryTracker(
        TrackerSettings(stale_after_s=100.0, rate_settle_s=5.0, delivery_id_prefix="or-1")
    )
    samples: list[Sample] = []
    batches: list[list[TrackerEvent]] = []
    t = 0
    dose = 0.0
    beam = 0.0

    def feed(state: DeviceState, dt: int = 60, rate: float = 0.0, **kw: Any) -> None:
        nonlocal t, dose, beam
        t += dt
        if state is DeviceState.IRRADIATING:
            dose = min(dose + rate * dt / 60, 20.0)
            beam += dt
        r = reading(
            mono_ns=t * NS,
            utc=T0 + timedelta(seconds=t),
            state=state,
            dose_rate_gy_min=rate,
            dose_primary_gy=dose,
            dose_secondary_gy=dose,
            beam_on_s=beam,
            planned_time_s=1500.0,
            applicator=APPLICATOR,
            simulated=True,
            **kw,
        )
        batches.append(tracker.on_reading(r))
        samples.append(
            Sample("source", r, tracker.snapshot(), tracker.interlocks, tracker.all_clear)
        )

    feed(DeviceState.STANDBY)
    feed(DeviceState.PREPARATORY)
    feed(DeviceState.READY)
    for _ in range(10):
        feed(DeviceState.IRRADIATING, rate=0.8)
    door = {**ALL_OK, Interlock.DOOR: InterlockState.TRIPPED}
    feed(DeviceState.INTERRUPTED, interlocks=door)
    feed(DeviceState.INTERRUPTED)
    t += 200
    batches.append(tracker.on_tick(t * NS, T0 + timedelta(seconds=t)))
    for _ in range(16):
        feed(DeviceState.IRRADIATING, rate=0.8)
    feed(
        DeviceState.TERMINATED,
        termination=TerminationStatus.NORMAL,
        termination_reason="preset reached",
    )
    feed(DeviceState.STANDBY)
    return samples, batches


RUN_SAMPLES, RUN_BATCHES = tracker_run()


def run_payloads() -> dict[str, list[dict[str, Any]]]:
    """Every message the run would publish, per topic."""
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in TOPICS}
    seqs = {name: counter() for name in TOPICS}
    out["status"].append(status_payload(seqs["status"](), True, "0.1.0", "hospital-a", "or-1"))
    out["delivery"].append(delivery_payload(seqs["delivery"](), None))
    # The alarms topic: the ledger (daemon/alarm_ledger.py) told the run's events, each
    # standing raising acknowledged as it is raised (so both shapes of an item are sent).
    ledger = AlarmLedger()
    out["alarms"].append(alarms_payload(seqs["alarms"](), ledger.view(), 0))
    for batch, s in zip(RUN_BATCHES, RUN_SAMPLES, strict=False):
        ledger.events(batch)
        for r in ledger.shown():
            if r.standing and r.ack is None:
                ledger.acknowledged(r.key, r.raised_at, Ack("op-bob", "B. Operator", r.raised_at))
        out["alarms"].append(alarms_payload(seqs["alarms"](), ledger.view(), ledger.omitted))
        current = s.delivery.delivery_id if s.delivery is not None else None
        out["events"] += event_payloads(seqs["events"], batch, current_delivery=current)
        out["telemetry"].append(telemetry_payload(seqs["telemetry"](), s))
        out["applicator"].append(
            applicator_payload(
                seqs["applicator"](),
                apl_sample(
                    apl_reading(utc=s.reading.utc, simulated=s.reading.simulated),
                    delivery_id=None if s.delivery is None else s.delivery.delivery_id,
                ),
            )
        )
        out["interlocks"].append(
            interlocks_payload(seqs["interlocks"](), s.interlocks, s.all_clear)
        )
        out["delivery"].append(delivery_payload(seqs["delivery"](), s.delivery))
    out["events"] += event_payloads(seqs["events"], every_event())
    out["audit/checkpoint"].append(checkpoint_payload(seqs["audit/checkpoint"](), note()))
    out["status"].append(status_payload(seqs["status"](), False, "0.1.0", "hospital-a", "or-1"))
    # After a crash: the rest of the previous run's reserved block of telemetry.
    out["skip"].append(
        skip_payload(
            seqs["skip"](),
            of_topic="telemetry",
            of_session=2,
            first=7,
            last=999,
            reason="unpublished",
        )
    )
    return out


RUN = run_payloads()


# ---- every builder validates ---------------------------------------------------------------


def test_the_schemas_are_valid_draft_2020_12() -> None:
    for stem, schema in SCHEMAS.items():
        Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema", stem


def test_the_tracker_run_covers_every_topic_and_event_kind() -> None:
    assert all(RUN[name] for name in TOPICS)
    assert {p["kind"] for p in RUN["events"]} == set(EVENT_KINDS)
    kinds_from_tracker = {p["kind"] for p in RUN["events"][: -len(every_event())]}
    assert {
        "delivery_started",
        "phase_changed",
        "interlock_changed",
        "alarm_raised",
        "monitoring_gap_started",
        "monitoring_gap_ended",
        "delivery_terminated",
    } <= kinds_from_tracker


@pytest.mark.parametrize("name", list(TOPICS))
def test_every_message_of_a_run_validates(name: str) -> None:
    for payload in RUN[name]:
        check(SCHEMA_OF[name], payload)
        assert payload["schema"] == SCHEMA


@pytest.mark.parametrize("name", list(TOPICS))
def test_seq_counts_per_topic(name: str) -> None:
    assert [p["seq"] for p in RUN[name]] == list(range(len(RUN[name])))
    assert {p["session"] for p in RUN[name]} == {3}


def test_status_online_and_offline() -> None:
    online = status_payload(env(), True, "0.1.0", "hospital-a", "or-1")
    offline = status_payload(env(1, sim=True), False, "0.1.0", "hospital-a", "or-1")
    check("status", online)
    check("status", offline)
    assert online["online"] is True
    assert offline["online"] is False
    assert offline["sim"] is True
    assert rejects("status", {**online, "site": "Hospital A/or"})


def test_envelope_fields() -> None:
    p = status_payload(env(7, historical=True), True, "0.1.0", "hospital-a", "or-1")
    assert {k: p[k] for k in ("schema", "session", "seq", "ts", "sim", "historical")} == {
        "schema": "iort/v1",
        "session": 3,
        "seq": 7,
        "ts": "2026-11-26T10:00:00.123456Z",
        "sim": False,
        "historical": True,
    }
    e = Envelope.at(0, 1, datetime(2026, 11, 26, 11, 0, tzinfo=timezone(timedelta(hours=1))))
    assert e.ts == "2026-11-26T10:00:00.000000Z"


@pytest.mark.parametrize(
    "kw",
    [
        {"seq": -1},
        {"seq": 2**64},
        {"seq": True},
        {"session": 0},
        {"ts": "2026-11-26T10:00:00Z"},
        {"ts": "2026-11-26T10:00:00.123456+00:00"},
        {"ts": "2026-13-26T10:00:00.123456Z"},
    ],
)
def test_envelope_refuses_what_the_schema_refuses(kw: dict[str, Any]) -> None:
    base: dict[str, Any] = {"seq": 0, "session": 1, "ts": "2026-11-26T10:00:00.123456Z"}
    with pytest.raises(ValueError, match=next(iter(kw))):
        Envelope(**{**base, **kw})
    payload = {**status_payload(env(), True, "0.1.0", "a", "b"), **kw}
    assert rejects("status", payload)


def test_envelope_refuses_a_naive_time() -> None:
    with pytest.raises(ValueError, match="naive"):
        Envelope.at(0, 1, datetime(2026, 11, 26))  # noqa: DTZ001


def test_envelope_seq_is_64_bit() -> None:
    top = 2**64 - 1
    p = status_payload(Envelope(top, top, "2026-11-26T10:00:00.123456Z"), True, "0.1.0", "a", "b")
    check("status", p)


def test_telemetry_during_a_delivery_and_without_one() -> None:
    during = telemetry_payload(env(), sample(d=snapshot()))
    idle = telemetry_payload(env(), sample(reading(state=DeviceState.STANDBY)))
    check("telemetry", during)
    check("telemetry", idle)
    assert during["delivery_id"] == "or-1-20261126T100000000000Z"
    assert during["phase"] == "IRRADIATING"
    assert during["remaining_gy"] == 16.0
    assert during["at"] == "2026-11-26T10:00:00.000000Z"
    assert idle["delivery_id"] is None
    assert idle["phase"] is None
    assert idle["remaining_gy"] is None
    assert idle["estimated_remaining_s"] is None


def test_telemetry_keeps_non_finite_readings_as_text() -> None:
    p = telemetry_payload(
        env(), sample(reading(kv=math.nan, ua=math.inf, dose_rate_gy_min=-math.inf))
    )
    check("telemetry", p)
    assert (p["kv"], p["ua"], p["dose_rate_gy_min"]) == ("nan", "inf", "-inf")


def test_sim_is_set_when_any_data_came_from_a_simulator() -> None:
    assert telemetry_payload(env(), sample(reading(simulated=True)))["sim"] is True
    assert telemetry_payload(env(), sample(d=snapshot(simulated=True)))["sim"] is True
    assert telemetry_payload(env(), sample())["sim"] is False
    assert telemetry_payload(env(sim=True), sample())["sim"] is True
    assert delivery_payload(env(), snapshot(simulated=True))["sim"] is True
    done = every_event()[-2]
    assert isinstance(done, Terminated)
    sim_done = Terminated(done.delivery_id, done.status, done.reason, snapshot(simulated=True))
    assert event_payloads(counter(), [sim_done])[0]["sim"] is True
    assert all(p["sim"] for p in RUN["telemetry"])  # the run's readings are simulated


def test_interlocks_lists_every_interlock_and_missing_ones_are_unknown() -> None:
    p = interlocks_payload(env(), {Interlock.DOOR: InterlockState.OK}, True)
    check("interlocks", p)
    assert list(p["interlocks"]) == [il.value for il in Interlock]
    assert p["interlocks"]["door"] == "ok"
    assert all(v == "unknown" for k, v in p["interlocks"].items() if k != "door")
    assert p["all_clear"] is False  # fail-safe: unknown counts as tripped
    ok = interlocks_payload(env(), ALL_OK, True)
    assert ok["all_clear"] is True
    assert interlocks_payload(env(), ALL_OK, False)["all_clear"] is False


def test_delivery_none_is_valid_and_distinguishable() -> None:
    none = delivery_payload(env(), None)
    some = delivery_payload(env(), snapshot())
    check("delivery", none)
    check("delivery", some)
    assert "delivery" in none
    assert none["delivery"] is None
    assert some["delivery"] is not None
    assert some["delivery"]["delivery_id"] == "or-1-20261126T100000000000Z"
    # An empty object or a missing key is not "no delivery yet": the schema says so.
    assert rejects("delivery", {**none, "delivery": {}})
    assert rejects("delivery", {k: v for k, v in none.items() if k != "delivery"})


def test_delivery_carries_the_summary_the_audit_log_records() -> None:
    s = snapshot(
        applicator=None,
        expected_rate_gy_min=None,
        planned_time_s=None,
        backup_timer_limit_s=None,
        estimated_remaining_s=None,
    )
    p = delivery_payload(env(), s)
    check("delivery", p)
    d = p["delivery"]
    assert {k: d[k] for k in summary_data(s)} == summary_data(s)


def test_events_map_each_tracker_event() -> None:
    evs = every_event()
    ps = event_payloads(counter(5), evs, current_delivery="or-1-20261126T100000000000Z")
    for p in ps:
        check("events", p)
    assert [p["seq"] for p in ps] == list(range(5, 5 + len(evs)))
    by_kind = {p["kind"]: p for p in ps}
    assert by_kind["phase_changed"]["from"] == "IRRADIATING"  # the last one
    assert by_kind["interlock_changed"]["delivery_id"] == "or-1-20261126T100000000000Z"
    assert by_kind["interlock_changed"]["to"] == "tripped"
    raised = by_kind["alarm_raised"]
    assert (raised["code"], raised["key"], raised["severity"]) == (
        "interlock_tripped",
        "interlock_tripped:door",
        "high",
    )
    assert raised["message"] == "interlock door tripped with beam on"
    assert by_kind["alarm_cleared"]["at"] == "2026-11-26T10:00:01.000000Z"
    assert by_kind["monitoring_gap_started"]["at"] == by_kind["monitoring_gap_started"]["start"]
    assert by_kind["monitoring_gap_started"]["end"] is None
    assert by_kind["monitoring_gap_ended"]["at"] == "2026-11-26T10:00:04.000000Z"
    assert by_kind["monitoring_gap_ended"]["duration_s"] == 4.0
    term = by_kind["delivery_terminated"]
    assert (term["status"], term["reason"]) == ("NORMAL", "preset reached")
    assert term["at"] == by_kind["phase_changed"]["at"]  # the phase change that closed it
    assert term["summary"]["termination"] == "NORMAL"
    assert by_kind["delivery_amended"]["reason"].startswith("0.1000 Gy more")


def test_an_end_with_nothing_before_it_has_no_time() -> None:
    p = event_payloads(counter(), every_event()[-1:])[0]
    check("events", p)
    assert p["at"] is None


def test_interlock_change_outside_a_delivery_has_no_delivery() -> None:
    ev = InterlockChanged(Interlock.COOLING, InterlockState.OK, InterlockState.UNKNOWN, NS, T0)
    p = event_payloads(counter(), [ev])[0]
    check("events", p)
    assert p["delivery_id"] is None


def test_checkpoint_payload_parses_the_note() -> None:
    n = note(4711)
    p = checkpoint_payload(env(), n)
    check("checkpoint", p)
    assert p["origin"] == "iortd/hospital-a/or-1/0123456789abcdef"
    assert p["count"] == 4711
    assert p["head"] == hashlib.sha256(b"entry").hexdigest()
    assert p["note"] == n


def test_checkpoint_payload_carries_the_cosignatures() -> None:
    """Issue 20: the witnesses' lines appended to the note (C2SP) and listed; the note
    still opens with the log's key and with each witness's key."""
    n = note(4711)
    text, _ = split_note(n, "checkpoint")
    w1, w2 = CosignerKey.generate("w.test/1"), CosignerKey.generate("w.test/2")
    lines = [w1.cosign(text, 1_700_000_000), w2.cosign(text, 1_700_000_001).rstrip("\n")]
    p = checkpoint_payload(env(), n, lines)
    check("checkpoint", p)
    assert p["cosignatures"] == [line.rstrip("\n") for line in lines]
    assert p["note"] == n + "".join(line.rstrip("\n") + "\n" for line in lines)
    for w in (w1, w2):
        assert verify_cosignature(w.verifier, text, p["cosignatures"][0 if w is w1 else 1])
    assert "cosignatures" not in checkpoint_payload(env(), n)
    assert rejects("checkpoint", {**p, "cosignatures": []})
    assert rejects("checkpoint", {**p, "cosignatures": ["not a line"]})


@pytest.mark.parametrize("bad", ["", "origin\n12\n", "origin\nx\nAAAA\n\n\u2014 k AAAA\n"])
def test_checkpoint_payload_refuses_a_malformed_note(bad: str) -> None:
    with pytest.raises(ValueError, match="checkpoint"):
        checkpoint_payload(env(), bad)


# ---- topics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TOPICS))
def test_topic_names(name: str) -> None:
    assert topic("iort", "hospital-a", "or-1", name) == f"iort/v1/hospital-a/or-1/{name}"


def test_topic_tree_qos_and_retain() -> None:
    assert list(TOPICS) == list(SCHEMA_OF)
    assert topic("x", "s", "r", "audit/checkpoint") == "x/v1/s/r/audit/checkpoint"
    retained = {n for n, spec in TOPICS.items() if spec.retain}
    assert retained == {"status", "interlocks", "delivery", "audit/checkpoint", "alarms"}
    assert TOPICS["telemetry"].qos == 1
    assert TOPICS["events"].qos == 1


@pytest.mark.parametrize("name", ["", "foo", "audit", "checkpoint", "status/", "#", "+", "Status"])
def test_topic_refuses_unknown_names(name: str) -> None:
    with pytest.raises(ValueError, match="unknown topic name"):
        topic("iort", "hospital-a", "or-1", name)


@pytest.mark.parametrize(
    ("prefix", "site", "room"),
    [("", "s", "r"), ("iort", "", "r"), ("iort", "a/b", "r"), ("iort", "s", "#"), ("i+", "s", "r")],
)
def test_topic_refuses_segments_that_are_not_one_level(prefix: str, site: str, room: str) -> None:
    with pytest.raises(ValueError, match="topic"):
        topic(prefix, site, room, "status")


# ---- the schemas reject ----------------------------------------------------------------------


def first(name: str) -> dict[str, Any]:
    return dict(on_the_wire(RUN[name][-1]))


@pytest.mark.parametrize("name", list(TOPICS))
def test_schemas_reject_an_extra_field(name: str) -> None:
    assert rejects(SCHEMA_OF[name], {**first(name), "extra": 1})


@pytest.mark.parametrize("name", list(TOPICS))
@pytest.mark.parametrize("field", ["seq", "session", "ts", "sim", "historical", "schema"])
def test_schemas_reject_a_missing_envelope_field(name: str, field: str) -> None:
    p = first(name)
    del p[field]
    assert rejects(SCHEMA_OF[name], p)


def test_schemas_reject_extra_fields_nested() -> None:
    d = first("delivery")
    d["delivery"] = {**d["delivery"], "patient": "x"}
    assert rejects("delivery", d)
    il = first("interlocks")
    il["interlocks"] = {**il["interlocks"], "shutter": "ok"}
    assert rejects("interlocks", il)
    for p in RUN["events"]:
        assert rejects("events", {**on_the_wire(p), "extra": 1}), p["kind"]
    term = on_the_wire(next(p for p in RUN["events"] if p["kind"] == "delivery_terminated"))
    term["summary"]["extra"] = 1
    assert rejects("events", term)


def test_schemas_reject_a_missing_interlock() -> None:
    il = first("interlocks")
    del il["interlocks"]["door"]
    assert rejects("interlocks", il)


@pytest.mark.parametrize(
    ("name", "path", "value"),
    [
        ("telemetry", ("state",), "ON"),
        ("telemetry", ("phase",), "Irradiating"),
        ("telemetry", ("kv",), "NaN"),
        ("telemetry", ("kv",), None),
        ("telemetry", ("at",), "2026-11-26 10:00:00"),
        ("interlocks", ("interlocks", "door"), "clear"),
        ("delivery", ("delivery", "termination"), "ABORTED"),
        ("delivery", ("delivery", "phase"), "DONE"),
        ("status", ("schema",), "iort/v2"),
        ("status", ("seq",), 1.5),
        ("status", ("seq",), "1"),
    ],
)
def test_schemas_reject_a_wrong_value(name: str, path: tuple[str, ...], value: Any) -> None:
    p = first(name)
    node = p
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    assert rejects(SCHEMA_OF[name], p)


@pytest.mark.parametrize(
    ("kind", "key", "value"),
    [
        ("", "kind", "delivery_paused"),
        ("alarm_raised", "severity", "critical"),
        ("alarm_raised", "code", "door_open"),
        ("phase_changed", "to", "ON"),
        ("interlock_changed", "interlock", "shutter"),
        ("interlock_changed", "to", "clear"),
        ("delivery_terminated", "status", "ABORTED"),
        ("delivery_started", "delivery_id", None),
    ],
)
def test_events_schema_rejects_a_wrong_value(kind: str, key: str, value: Any) -> None:
    base = next(p for p in RUN["events"] if p["kind"] == (kind or "phase_changed"))
    assert not rejects("events", on_the_wire(base))
    assert rejects("events", {**on_the_wire(base), key: value})


def test_events_schema_rejects_fields_of_another_kind() -> None:
    cleared = on_the_wire(next(p for p in RUN["events"] if p["kind"] == "alarm_cleared"))
    assert rejects("events", {**cleared, "severity": "high", "message": "m"})
    assert rejects("events", {**cleared, "kind": "alarm_raised"})


# ---- enums cannot drift ---------------------------------------------------------------------


def defs(stem: str, name: str) -> Any:
    return SCHEMAS[stem]["$defs"][name]


def values(e: type[Any]) -> set[str]:
    return {m.value for m in e}


@pytest.mark.parametrize(
    ("stems", "name", "enum"),
    [
        (["telemetry"], "device_state", DeviceState),
        (["applicator"], "applicator_state", ApplicatorState),
        (["applicator"], "applicator_fault", ApplicatorFault),
        (["applicator"], "tristate", Tristate),
        (["telemetry", "delivery", "events"], "phase", Phase),
        (["delivery", "events"], "termination", TerminationStatus),
        (["interlocks", "events"], "interlock_state", InterlockState),
        (["events"], "interlock", Interlock),
        (["events"], "severity", Severity),
        (["events"], "alarm_code", AlarmCode),
    ],
)
def test_schema_enums_equal_the_python_enums(stems: list[str], name: str, enum: type[Any]) -> None:
    for stem in stems:
        listed = defs(stem, name)["enum"]
        assert len(listed) == len(set(listed))
        assert set(listed) == values(enum), (stem, name)


def test_interlocks_schema_names_every_interlock() -> None:
    il = SCHEMAS["interlocks"]["properties"]["interlocks"]
    assert set(il["properties"]) == values(Interlock)
    assert set(il["required"]) == values(Interlock)
    assert il["additionalProperties"] is False


def test_event_kinds_equal_the_tracker_events_and_the_notice() -> None:
    schema = SCHEMAS["events"]
    assert set(schema["properties"]["kind"]["enum"]) == set(EVENTS_TOPIC_KINDS)
    branch_kinds = [b["properties"]["kind"]["const"] for b in schema["oneOf"]]
    assert sorted(branch_kinds) == sorted(EVENTS_TOPIC_KINDS)
    # and the entries sinks record (daemon/sink_records.py), e.g. dicom_handoff
    assert set(EVENTS_TOPIC_KINDS) - set(EVENT_KINDS) == {NOTICE_KIND, *REPORT_FIELDS}
    # one kind per tracker event class, and the builder maps every class
    assert len(typing.get_args(TrackerEvent)) == len(EVENT_KINDS)
    assert {type(ev) for ev in every_event()} == set(typing.get_args(TrackerEvent))


def test_every_enum_in_the_schemas_is_a_python_enum() -> None:
    known = [
        values(e)
        for e in (
            DeviceState,
            Phase,
            TerminationStatus,
            InterlockState,
            Interlock,
            Severity,
            AlarmCode,
            ApplicatorState,
            ApplicatorFault,
            Tristate,
            VerificationOutcome,
            VerificationItem,
            VerificationTrigger,
        )
    ]
    known += [set(EVENTS_TOPIC_KINDS), {"nan", "inf", "-inf"}, set(NOTICE_SEVERITIES)]
    known += [set(OUTCOMES), set(HANDOFF_OUTCOMES), set(HANDOFF_WHAT)]
    known += [set(OUTCOMES), set(SKIPPABLE_TOPICS), set(SKIP_REASONS)]
    for stem, schema in SCHEMAS.items():
        for listed in enums(schema):
            assert set(listed) in known, (stem, listed)


def test_every_object_is_closed() -> None:
    """Every object schema with properties forbids others (the events root closes each
    branch instead)."""

    def walk(node: Any, where: str) -> None:
        if isinstance(node, Mapping):
            if "properties" in node and where != "events:/":
                assert node.get("additionalProperties") is False, where
            for k, v in node.items():
                walk(v, f"{where}{k}/")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}{i}/")

    for stem, schema in SCHEMAS.items():
        walk(schema, f"{stem}:/")


# ---- no patient data ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TOPICS))
def test_no_payload_key_looks_identifying(name: str) -> None:
    for payload in RUN[name]:
        safe = SAFE_KEYS.get(SCHEMA_OF[name], frozenset())
        bad = {k for k in keys(payload) if IDENTIFYING.search(k) and k not in safe}
        assert not bad, (name, bad)


def test_no_schema_allows_an_identifying_key() -> None:
    for stem, schema in SCHEMAS.items():
        safe = SAFE_KEYS.get(stem, frozenset())
        bad = {k for k in schema_property_names(schema) if IDENTIFYING.search(k) and k not in safe}
        assert not bad, (stem, bad)


def test_the_pattern_catches_what_it_should() -> None:
    for k in ("patient_id", "PatientName", "name", "date_of_birth", "mrn", "home_address"):
        assert IDENTIFYING.search(k)


# ---- the documentation ------------------------------------------------------------------------

SECTION = re.compile(r"^#### `([a-z/]+)`\n(.*?)(?=^#{1,4} |\Z)", re.MULTILINE | re.DOTALL)
JSON_BLOCK = re.compile(r"^```json\n(.*?)\n```", re.MULTILINE | re.DOTALL)


def test_the_documented_examples_validate() -> None:
    """docs/mqtt-topics.md has a section per topic; every JSON example in it validates."""
    text = DOC.read_text("utf-8")
    sections = {m.group(1): m.group(2) for m in SECTION.finditer(text)}
    assert set(sections) == set(TOPICS)
    for name, body in sections.items():
        examples = [json.loads(b) for b in JSON_BLOCK.findall(body)]
        assert examples, name
        for payload in examples:
            VALIDATORS[SCHEMA_OF[name]].validate(payload)
    # The guarantees the sink gives are documented beside the payloads.
    assert "## Delivery guarantees" in text


# ---- hypothesis: generated data still validates ------------------------------------------------

any_float = st.floats(allow_nan=True, allow_infinity=True)
maybe_float = st.one_of(st.none(), any_float)
# hypothesis takes naive bounds and attaches the timezone itself
times = st.datetimes(
    min_value=datetime(2000, 1, 1),  # noqa: DTZ001
    max_value=datetime(2100, 1, 1),  # noqa: DTZ001
    timezones=st.just(UTC),
)
texts = st.text(max_size=40)
interlock_maps = st.dictionaries(
    st.sampled_from(list(Interlock)), st.sampled_from(list(InterlockState))
)
delivery_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,40}\Z")
envelopes = st.builds(
    Envelope.at,
    seq=st.integers(0, 2**64 - 1),
    session=st.integers(1, 2**64 - 1),
    when=times,
    sim=st.booleans(),
    historical=st.booleans(),
)
readings = st.builds(
    SourceReading,
    mono_ns=st.integers(0, 2**62),
    utc=times,
    state=st.sampled_from(list(DeviceState)),
    dose_rate_gy_min=any_float,
    dose_primary_gy=any_float,
    dose_secondary_gy=any_float,
    preset_gy=any_float,
    beam_on_s=any_float,
    kv=any_float,
    ua=any_float,
    interlocks=interlock_maps,
    simulated=st.booleans(),
)


@st.composite
def gaps(draw: st.DrawFn) -> Gap:
    start = draw(st.integers(0, 2**50))
    end = draw(st.one_of(st.none(), st.integers(start, start + 2**40)))
    start_utc = draw(times)
    return Gap(draw(texts), start, start_utc, end, None if end is None else draw(times))


snapshots = st.builds(
    DeliverySnapshot,
    delivery_id=delivery_ids,
    phase=st.sampled_from(list(Phase)),
    joined_in_progress=st.booleans(),
    preset_gy=any_float,
    delivered_primary_gy=any_float,
    delivered_secondary_gy=any_float,
    remaining_gy=any_float,
    dose_rate_gy_min=any_float,
    expected_rate_gy_min=maybe_float,
    planned_time_s=maybe_float,
    backup_timer_limit_s=maybe_float,
    beam_on_s=any_float,
    elapsed_s=any_float,
    estimated_remaining_s=maybe_float,
    applicator=st.one_of(st.none(), st.builds(ApplicatorIdentity, texts, any_float, texts)),
    segments=st.lists(
        st.builds(
            Segment,
            st.sampled_from(["beam", "beam_off", "unmonitored"]),
            any_float,
            any_float,
            st.integers(0, 2**50),
            st.one_of(st.none(), st.integers(0, 2**50)),
        ),
        max_size=3,
    ).map(tuple),
    interruptions=st.lists(
        st.builds(
            Interruption,
            texts,
            st.integers(0, 2**50),
            any_float,
            st.one_of(st.none(), st.integers(2**50, 2**51)),
        ),
        max_size=3,
    ).map(tuple),
    gaps=st.lists(gaps(), max_size=3).map(tuple),
    termination=st.one_of(st.none(), st.sampled_from(list(TerminationStatus))),
    termination_reason=st.one_of(st.none(), texts),
    started_utc=times,
    simulated=st.booleans(),
)
alarms = st.builds(
    Alarm,
    st.sampled_from(list(AlarmCode)),
    texts,
    st.sampled_from(list(Severity)),
    texts,
    st.integers(0, 2**50),
    times,
)
maybe_id = st.one_of(st.none(), delivery_ids)
events = st.one_of(
    st.builds(DeliveryStarted, delivery_ids, st.integers(0), times, any_float, st.booleans()),
    st.builds(
        PhaseChanged,
        maybe_id,
        st.sampled_from(list(Phase)),
        st.sampled_from(list(Phase)),
        texts,
        st.integers(0),
        times,
    ),
    st.builds(
        InterlockChanged,
        st.sampled_from(list(Interlock)),
        st.sampled_from(list(InterlockState)),
        st.sampled_from(list(InterlockState)),
        st.integers(0),
        times,
    ),
    st.builds(AlarmRaised, maybe_id, alarms),
    st.builds(AlarmCleared, maybe_id, alarms, st.integers(0), times),
    st.builds(MonitoringGapStarted, maybe_id, gaps()),
    st.builds(MonitoringGapEnded, maybe_id, gaps()),
    st.builds(Terminated, delivery_ids, st.sampled_from(list(TerminationStatus)), texts, snapshots),
    st.builds(DeliveryAmended, delivery_ids, texts, snapshots),
)


@given(e=envelopes, r=readings, d=st.one_of(st.none(), snapshots))
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_generated_samples_validate(
    e: Envelope, r: SourceReading, d: DeliverySnapshot | None
) -> None:
    s = Sample(
        "source", r, d, r.interlocks, all(v is InterlockState.OK for v in r.interlocks.values())
    )
    check("telemetry", telemetry_payload(e, s))
    check("interlocks", interlocks_payload(e, s.interlocks, s.all_clear))


@given(e=envelopes, d=st.one_of(st.none(), snapshots))
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_generated_snapshots_validate(e: Envelope, d: DeliverySnapshot | None) -> None:
    p = delivery_payload(e, d)
    check("delivery", p)
    assert (p["delivery"] is None) == (d is None)


@given(evs=st.lists(events, max_size=8), cur=maybe_id, historical=st.booleans())
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_generated_events_validate(
    evs: list[TrackerEvent], cur: str | None, historical: bool
) -> None:
    ps = event_payloads(counter(historical=historical), evs, current_delivery=cur)
    assert len(ps) == len(evs)
    for p in ps:
        check("events", p)
        assert p["historical"] is historical


@given(e=envelopes, version=st.text(min_size=1, max_size=20), online=st.booleans())
def test_generated_status_validates(e: Envelope, version: str, online: bool) -> None:
    check("status", status_payload(e, online, version, "hospital-a", "or-1"))


@given(e=envelopes, count=st.integers(0, 2**63), head=st.binary(min_size=32, max_size=32))
@settings(max_examples=20, deadline=None)
def test_generated_checkpoints_validate(e: Envelope, count: int, head: bytes) -> None:
    n = Checkpoint("iortd/a/b/0123", count, head.hex()).signed(SIGNER)
    p = checkpoint_payload(e, n)
    check("checkpoint", p)
    assert (p["count"], p["head"]) == (count, head.hex())


SIGNER = generate_keypair("iortd-test")


# A tracker driven by arbitrary console input (as in test_tracker_properties): whatever it
# emits, the stream's payloads stay valid.
steps = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=120, allow_nan=False),
        st.sampled_from(list(DeviceState)),
        st.one_of(
            st.floats(min_value=0, max_value=25, allow_nan=False),
            st.sampled_from([math.nan, math.inf, -1.0]),
        ),
        st.floats(min_value=0, max_value=3, allow_nan=False),
        interlock_maps,
        st.one_of(st.none(), st.sampled_from(list(TerminationStatus))),
        st.booleans(),
    ),
    max_size=25,
)


@given(script=steps)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_tracker_fed_anything_publishes_valid_payloads(script: list[Any]) -> None:
    tracker = DeliveryTracker(TrackerSettings(stale_after_s=30.0))
    seqs = {name: counter() for name in ("telemetry", "interlocks", "delivery", "events")}
    t = 0.0
    for dt, state, dose, rate, ils, term, tick in script:
        t += dt
        mono, utc = int(t * NS), T0 + timedelta(seconds=t)
        if tick:
            evs = tracker.on_tick(mono, utc)
        else:
            r = reading(
                mono_ns=mono,
                utc=utc,
                state=state,
                dose_primary_gy=dose,
                dose_secondary_gy=dose,
                dose_rate_gy_min=rate,
                interlocks=ils,
                termination=term,
                simulated=True,
            )
            evs = tracker.on_reading(r)
            s = Sample("source", r, tracker.snapshot(), tracker.interlocks, tracker.all_clear)
            check("telemetry", telemetry_payload(seqs["telemetry"](), s))
            check("interlocks", interlocks_payload(seqs["interlocks"](), s.interlocks, s.all_clear))
        snap = tracker.snapshot()
        cur = snap.delivery_id if snap is not None else None
        for p in event_payloads(seqs["events"], evs, current_delivery=cur):
            check("events", p)
            assert not {k for k in keys(p) if IDENTIFYING.search(k)}
        check("delivery", delivery_payload(seqs["delivery"](), snap))


@pytest.mark.parametrize("severity", ["critical", "info"])
def test_a_notice_validates_and_names_its_severity(severity: str) -> None:
    env = Envelope(3, 2, "2026-11-26T10:00:00.000000Z", sim=True)
    payload = notice_payload(env, severity, "audit log cannot be written", delivery_id="or-1-x")
    VALIDATORS["events"].validate(on_the_wire(payload))
    assert payload["kind"] == NOTICE_KIND
    assert payload["at"] == payload["ts"]
    assert payload["sim"] is True


def test_a_notice_that_answers_a_command_carries_its_fields_closed() -> None:
    """What a sender matches on (daemon/answers.py): never the words."""
    env = Envelope(3, 2, "2026-11-26T10:00:00.000000Z")
    plain = notice_payload(env, "info", "audit log writable again")
    assert "command" not in plain  # an older dashboard's schema still takes it
    VALIDATORS["events"].validate(on_the_wire(plain))
    said = answered("ok [nonce x]", "done", kind="signoff", nonce="ab" * 16)
    p = notice_payload(env, "info", said, command=said.command)
    VALIDATORS["events"].validate(on_the_wire(p))
    assert p["command"] == {
        "kind": "signoff", "nonce": "ab" * 16, "sha256": None, "outcome": "done", "reason": None,
    }  # fmt: skip
    refused = answered("no", "refused", sha256="cd" * 32, reason="not a word!")
    p = notice_payload(env, "info", refused, command=refused.command)
    VALIDATORS["events"].validate(on_the_wire(p))
    assert p["command"]["reason"] == "other"  # only fixed words reach the field
    for bad in ({"extra": 1}, {"outcome": "recorded"}, {"nonce": "sign-off recorded"}):
        assert rejects("events", {**p, "command": {**p["command"], **bad}}), bad


def test_a_notice_refuses_an_unknown_severity() -> None:
    env = Envelope(0, 1, "2026-11-26T10:00:00.000000Z")
    with pytest.raises(ValueError, match="severity"):
        notice_payload(env, "warning", "x")


def test_a_record_that_may_continue_an_earlier_one_names_it_on_the_wire() -> None:
    """After a restart the daemon could not be sure of (issue 14): the link is explicit."""
    ev = DeliveryStarted(
        "or-1-20261126T101000000000Z",
        NS,
        T0,
        20.0,
        True,
        continues="or-1-20261126T100000000000Z",
        continues_reason="the selection counter is known on one side only",
    )
    (p,) = event_payloads(counter(), [ev])
    check("events", p)
    assert p["continues"] == "or-1-20261126T100000000000Z"
    assert p["continues_reason"].startswith("the selection counter")
    (plain,) = event_payloads(counter(), [DeliveryStarted("or-1-x", NS, T0, 20.0, False)])
    assert "continues" not in plain


def test_a_delivery_with_its_verification_validates_every_outcome() -> None:
    """delivery.verification carries the MQTT object of daemon/verification.py."""
    for inp in (inputs(), inputs(prescription=None, sha256=None), inputs(already_delivered=True)):
        obj = public_object(verify(inp), T0)
        p = delivery_payload(env(), snapshot(verification=obj))
        check("delivery", p)
        assert p["delivery"]["verification"] == obj
        [ev] = event_payloads(env, [VerificationChecked("or-1-x", verify(inp), obj, NS, T0)])
        check("events", ev)


def test_the_alarms_topic_of_a_run_lists_raisings_with_their_acknowledgement() -> None:
    items = [i for p in RUN["alarms"] for i in p["alarms"]]
    assert items, "the tracker run raises alarms"
    assert all(i["acknowledged"] is not None for i in items if i["cleared_at"] is None)
    assert RUN["alarms"][0]["alarms"] == []  # before anything: an empty list, not null


def test_an_ended_delivery_carries_the_record_a_sign_off_signs() -> None:
    """Once a signed checkpoint covers an ended delivery, ``delivery.record`` says what a
    physicist's sign-off binds to (auditlog/signoff.py); before that it is absent."""
    rec = {
        "first_seq": 12,
        "last_seq": 80,
        "entries_sha256": "ab" * 32,
        "checkpoint": {"size": 82, "hash": "cd" * 32},
    }
    p = delivery_payload(env(), snapshot(), rec)
    check("delivery", p)
    assert p["delivery"]["record"] == rec
    assert "record" not in delivery_payload(env(), snapshot())["delivery"]
    assert rejects("delivery", {**p, "delivery": {**p["delivery"], "record": {"first_seq": 1}}})
    bad_hash = {**rec, "entries_sha256": "xyz"}
    assert rejects("delivery", {**p, "delivery": {**p["delivery"], "record": bad_hash}})


# ---- the declared seq skip -----------------------------------------------------------------


def test_a_skip_names_the_topic_session_range_and_reason() -> None:
    p = skip_payload(env(5), of_topic="events", of_session=2, first=10, last=10, reason="not_held")
    check("skip", p)
    assert p["skipped"] == {
        "topic": "events",
        "session": 2,
        "first": 10,
        "last": 10,
        "reason": "not_held",
    }
    top = skip_payload(
        env(6),
        of_topic="applicator",
        of_session=SEQ_MAX,
        first=0,
        last=SEQ_MAX,
        reason="thinned",
    )
    check("skip", top)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"of_topic": "skip"}, "of_topic"),
        ({"of_topic": "status"}, "of_topic"),
        ({"first": 5, "last": 4}, "first"),
        ({"first": -1}, "first"),
        ({"last": SEQ_MAX + 1}, "last"),
        ({"of_session": 0}, "of_session"),
        ({"reason": "lost"}, "reason"),
        ({"first": True}, "first"),
    ],
)
def test_a_skip_the_contract_does_not_allow_is_refused(kwargs: dict[str, Any], why: str) -> None:
    args: dict[str, Any] = {
        "of_topic": "telemetry",
        "of_session": 1,
        "first": 0,
        "last": 0,
        "reason": "unpublished",
    }
    with pytest.raises((ValueError, TypeError), match=why):
        skip_payload(env(), **{**args, **kwargs})


@pytest.mark.parametrize(
    "change",
    [
        {"topic": "skip"},
        {"topic": "status"},
        {"reason": "lost"},
        {"first": -1},
        {"last": SEQ_MAX + 1},
        {"session": 0},
        {"extra": 1},
    ],
)
def test_the_skip_schema_refuses_what_the_builder_never_sends(change: dict[str, Any]) -> None:
    p = skip_payload(
        env(), of_topic="telemetry", of_session=1, first=0, last=3, reason="unpublished"
    )
    p["skipped"] = {**p["skipped"], **change}
    assert rejects("skip", on_the_wire(p))
    missing = skip_payload(
        env(), of_topic="telemetry", of_session=1, first=0, last=3, reason="unpublished"
    )
    del missing["skipped"]["reason"]
    assert rejects("skip", on_the_wire(missing))
