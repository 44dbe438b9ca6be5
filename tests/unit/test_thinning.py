"""Which readings become audit-log samples (daemon/thinning.py): full rate around a
delivery; when idle, the first, every change that matters, every reading with tracker
events, a heartbeat, and the reading held back before a change. And the ``[log]`` keys
that set it, checked at load with errors naming the key."""

from __future__ import annotations

import asyncio
import contextlib
import io
from pathlib import Path
from typing import Any

import pytest
from test_config import ROOT

from iortd.audit.cli import main as audit_main
from iortd.audit.review import format_entry
from iortd.audit.sampling import policy_findings
from iortd.auditlog.writer import AuditLog
from iortd.daemon.config import ConfigError, load_config
from iortd.daemon.thinning import Deadbands, SamplePolicy, Thinner, policy_of
from iortd.drivers.registry import DriverRegistry

S = 1_000_000_000
POLL = S // 10


def idle(**over: Any) -> tuple[str, dict[str, Any], str | None]:
    data: dict[str, Any] = {
        "device": "source-1",
        "at": "2026-12-01T08:00:00.000000Z",
        "device_mono_ns": 0,
        "state": "STANDBY",
        "dose_rate_gy_min": 0.0,
        "dose_primary_gy": 0.0,
        "dose_secondary_gy": 0.0,
        "preset_gy": 0.0,
        "beam_on_s": 0.0,
        "kv": 0.0,
        "ua": 0.0,
        "interlocks": {"door": "ok"},
        "all_clear": True,
        "simulated": True,
    }
    data.update(over)
    return "sample", data, None


def reader(**over: Any) -> tuple[str, dict[str, Any], str | None]:
    data: dict[str, Any] = {
        "device": "stand-1",
        "state": "READY",
        "seated": "no",
        "brakes_engaged": "yes",
        "heartbeat": 1,
        "displacement_mm": [0.0, 0.0, 0.0],
        "displacement_magnitude_mm": 0.0,
        "tilt_deg": 0.0,
        "monitor_interlocks": {"applicator": "tripped"},
    }
    data.update(over)
    return "applicator_sample", data, None


def run(
    thinner: Thinner,
    readings: list[tuple[str, dict[str, Any], str | None]],
    *,
    start_s: float = 0.0,
    active: bool = False,
) -> list[tuple[int, dict[str, Any]]]:
    """Offer readings 100 ms apart; (index, data) of what is recorded (the index of the
    reading it came from, held back or not: ``device_mono_ns`` carries it)."""
    out = []
    for i, (kind, data, did) in enumerate(readings):
        entry = (kind, {**data, "device_mono_ns": i}, did)
        mono = round(start_s * S) + i * POLL
        for _, got, _ in thinner.offer(entry, mono, active=active, events=False):
            out.append((int(got["device_mono_ns"]), got))
    return out


def test_an_unchanged_idle_room_gets_its_first_sample_and_a_heartbeat_a_minute() -> None:
    t = Thinner(SamplePolicy(idle_interval_s=60, window_s=60))
    got = run(t, [idle() for _ in range(1801)])  # three minutes at 10 Hz
    assert [i for i, _ in got] == [0, 600, 1200, 1800]
    assert [d["kept"] for _, d in got] == ["first", "heartbeat", "heartbeat", "heartbeat"]
    # Each heartbeat counts the readings taken and not recorded since the last sample.
    assert [d["unrecorded"] for _, d in got] == [0, 599, 599, 599]


def test_dose_moving_while_idle_is_never_thinned_and_is_bracketed() -> None:
    """A dose counter that moves while idle (by the smallest amount) is recorded at once,
    after the reading before it (held back, now written) so that the record brackets it
    between two polls."""
    t = Thinner(SamplePolicy())
    readings = [idle() for _ in range(100)] + [idle(dose_primary_gy=0.0001)]
    got = run(t, readings)
    assert [(i, d["kept"]) for i, d in got] == [
        (0, "first"),
        (99, "before_change"),
        (100, "change"),
    ]
    assert got[1][1]["unrecorded"] == 98
    assert got[2][1]["unrecorded"] == 0
    # The timer and the second channel too.
    for key in ("dose_secondary_gy", "beam_on_s"):
        t = Thinner(SamplePolicy())
        got = run(t, [idle(), idle(), idle(**{key: 0.001})])
        assert (got[-1][0], got[-1][1]["kept"]) == (2, "change"), key


@pytest.mark.parametrize(
    ("key", "inside", "beyond"),
    [
        ("kv", 0.4, 0.6),
        ("ua", 0.9, 1.1),
        ("dose_rate_gy_min", 0.009, 0.011),
    ],
)
def test_analog_values_move_within_their_deadband_unrecorded(
    key: str, inside: float, beyond: float
) -> None:
    t = Thinner(SamplePolicy())
    got = run(t, [idle(), idle(**{key: inside}), idle(**{key: -inside}), idle(**{key: beyond})])
    assert [i for i, _ in got] == [0, 2, 3], got  # 2: held, then written before the change
    assert got[-1][1]["kept"] == "change"


def test_a_slow_drift_is_recorded_once_it_leaves_the_deadband_of_the_last_sample() -> None:
    """Compared with the last *recorded* value, not the previous reading: a drift of
    0.01 kV a poll is recorded every ~50 polls, never lost."""
    t = Thinner(SamplePolicy())
    got = run(t, [idle(kv=i * 0.011) for i in range(200)])
    changes = [i for i, d in got if d["kept"] == "change"]
    assert changes[:3] == [46, 92, 138], changes


@pytest.mark.parametrize(
    "over",
    [
        {"state": "OFF"},
        {"interlocks": {"door": "tripped"}},
        {"all_clear": False},
        {"preset_gy": 20.0},
        {"selection": 3},
        {"kv": "nan"},  # what the device said, as text (daemon/entries.py num)
        {"extra": {"rate_deviation": 0.0}},
    ],
)
def test_anything_else_that_changes_is_recorded(over: dict[str, Any]) -> None:
    t = Thinner(SamplePolicy())
    got = run(t, [idle(), idle(), idle(**over)])
    assert (got[-1][0], got[-1][1]["kept"]) == (2, "change"), over


def test_the_readers_counters_and_flags_are_changes_its_heartbeat_is_not() -> None:
    t = Thinner(SamplePolicy())
    readings = [reader(heartbeat=i) for i in range(50)]
    readings += [reader(heartbeat=50, displacement_mm=[0.15, 0.0, 0.0])]  # inside 0.2 mm
    readings += [reader(heartbeat=51, tilt_deg=0.3)]  # beyond 0.2 deg
    readings += [reader(heartbeat=52, tilt_deg=0.3, seated="yes")]
    readings += [reader(heartbeat=53, tilt_deg=0.3, seated="yes", brakes_engaged="no")]
    readings += [
        reader(heartbeat=54, tilt_deg=0.3, seated="yes", brakes_engaged="no", lock_counter=2)
    ]
    got = run(t, readings)
    assert [i for i, _ in got] == [0, 50, 51, 52, 53, 54], got


def test_full_rate_while_active_and_for_the_window_after() -> None:
    t = Thinner(SamplePolicy(idle_interval_s=60, window_s=30))
    assert len(run(t, [idle(state="READY")] * 100, active=True)) == 100
    # 10 s after the last active reading ... 30 s window: every reading until 30 s after it.
    after = run(t, [idle() for _ in range(600)], start_s=10.0)
    # The last active reading was at 9.9 s: the window runs to 39.9 s (reading 299).
    assert [i for i, _ in after] == list(range(300)), [i for i, _ in after][-3:]
    assert "kept" not in after[0][1]
    # The window covers the other streams of the room (the reader) too.
    t2 = Thinner(SamplePolicy(window_s=30))
    t2.offer(idle(state="IRRADIATING"), 0, active=True, events=False)
    assert len(run(t2, [reader() for _ in range(100)])) == 100


def test_readings_with_events_are_recorded_and_a_flush_writes_what_was_held() -> None:
    t = Thinner(SamplePolicy())
    run(t, [idle() for _ in range(10)])
    run(t, [reader() for _ in range(10)], start_s=0.05)
    held = t.flush()
    assert [(d["device"], d["kept"], d["unrecorded"]) for _, d, _ in held] == [
        ("source-1", "before_change", 8),
        ("stand-1", "before_change", 8),
    ]
    assert t.flush() == [], "written once"
    [(_, data, _)] = t.offer(idle(), 2 * S, active=False, events=True)
    assert data["kept"] == "event"


def test_interval_zero_records_every_reading() -> None:
    t = Thinner(SamplePolicy(idle_interval_s=0))
    got = run(t, [idle() for _ in range(100)])
    assert len(got) == 100
    assert all("kept" not in d for _, d in got)


def test_time_going_backwards_is_a_change() -> None:
    t = Thinner(SamplePolicy())
    t.offer(idle(), 10 * S, active=False, events=False)
    assert t.offer(idle(), 9 * S, active=False, events=False), "a reading before the last one"


# ---- the [log] keys --------------------------------------------------------------------


def _site(tmp_path: Path, log_lines: str) -> Path:
    text = (ROOT / "config" / "demo.toml").read_text()
    text = text.replace('directory = "demo-log"', f'directory = "demo-log"\n{log_lines}')
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def registry() -> DriverRegistry:
    return DriverRegistry.from_entry_points()


def test_the_defaults(tmp_path: Path, registry: DriverRegistry) -> None:
    log = load_config(_site(tmp_path, ""), registry).config.log
    assert policy_of(log) == SamplePolicy(60.0, 60.0, Deadbands())
    assert log.model_dump(mode="json")["sample_deadband"] == {
        "kv": 0.5,
        "ua": 1.0,
        "dose_rate_gy_min": 0.01,
        "displacement_mm": 0.2,
        "tilt_deg": 0.2,
        "extra": 0.0,
    }


@pytest.mark.parametrize(
    ("lines", "key", "words"),
    [
        ("idle_sample_interval_s = 0.5", "log.idle_sample_interval_s", "at least 1 second"),
        ("idle_sample_interval_s = 7200", "log.idle_sample_interval_s", "3600"),
        ("idle_sample_interval_s = -1", "log.idle_sample_interval_s", "0"),
        ("sample_window_s = 4000", "log.sample_window_s", "3600"),
        ("sample_window_s = nan", "log.sample_window_s", ""),
        ("[log.sample_deadband]\nkv = -0.1", "log.sample_deadband.kv", "0"),
        (
            "[log.sample_deadband]\ndisplacement_mm = 2.0",
            "log.sample_deadband.displacement_mm",
            "1",
        ),
        ("[log.sample_deadband]\nvolts = 1.0", "log.sample_deadband.volts", ""),
    ],
)
def test_out_of_bounds_keys_are_refused_by_name(
    tmp_path: Path, registry: DriverRegistry, lines: str, key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(_site(tmp_path, lines), registry)
    [issue] = excinfo.value.issues
    assert issue.key == key, str(issue)
    assert words in issue.message, issue.message


def test_zero_is_accepted(tmp_path: Path, registry: DriverRegistry) -> None:
    lines = "idle_sample_interval_s = 0\nsample_window_s = 0"
    log = load_config(_site(tmp_path, lines), registry).config.log
    assert not policy_of(log).thinning


def test_show_says_why_an_idle_sample_was_kept() -> None:
    """``iort-audit show`` prints a thinned sample's reason and the readings it stands
    for; a full-rate sample reads as before (the golden outputs hold it)."""
    kind, data, _ = idle(kept="heartbeat", unrecorded=599)
    line = format_entry({"seq": 7, "ts": "t", "type": kind, "data": data})
    assert line.endswith("[heartbeat, 599 not recorded]"), line
    kind, data, _ = idle()
    assert "not recorded" not in format_entry({"seq": 8, "ts": "t", "type": kind, "data": data})


# ---- verify's check of the samples against the policy ----------------------------------


def _run_log(samples: list[tuple[str, float, dict[str, Any]]]) -> list[dict[str, Any]]:
    """A run's entries: daemon_start (speed 1), config_loaded (60 s heartbeat, 0.1 s poll,
    5 stale polls), then ``(type, seconds, data)`` entries; samples of source-1."""
    config = {
        "log": {"idle_sample_interval_s": 60.0},
        "tolerances": {"stale_after_polls": 5},
        "devices": [{"name": "source-1", "poll_interval_s": 0.1}],
    }
    out: list[dict[str, Any]] = [
        {"seq": 0, "type": "daemon_start", "data": {"clock_speed": 1.0}},
        {"seq": 1, "type": "config_loaded", "data": {"config": config}},
    ]
    for i, (kind, t, data) in enumerate(samples, start=2):
        out.append(
            {
                "seq": i,
                "type": kind,
                "data": {"device": "source-1", "device_mono_ns": round(t * S), **data},
            }
        )
    return out


def test_verify_finds_a_silence_the_policy_does_not_explain() -> None:
    ok = _run_log([("sample", 0, {}), ("sample", 60.1, {"kept": "heartbeat"})])
    assert policy_findings(ok) == []
    # 60 s + (5 stale + 2) polls of 0.1 s = 60.7 s allowed.
    silent = _run_log([("sample", 0, {}), ("sample", 90, {"kept": "heartbeat"})])
    [finding] = policy_findings(silent)
    assert "seq 2..3: no sample of source-1 for 90.0 s and no gap recorded" in finding
    gap = _run_log([("sample", 0, {}), ("monitoring_gap_started", 1, {}), ("sample", 90, {})])
    assert policy_findings(gap) == [], "a recorded gap explains the silence"
    named = _run_log([("sample", 0, {"kept": "change"})])
    named[-1]["delivery_id"] = "or-1-x"
    [finding] = policy_findings(named)
    assert "names delivery or-1-x" in finding
    # A log from before the policy (no idle_sample_interval_s in its config): not checked.
    old = _run_log([("sample", 0, {}), ("sample", 900, {})])
    del old[1]["data"]["config"]["log"]["idle_sample_interval_s"]
    assert policy_findings(old) == []


async def test_verify_prints_the_findings_as_warnings_and_exits_0(tmp_path: Path) -> None:
    log, _ = await AuditLog.open(tmp_path, origin="test/or-1/policy")
    writer = asyncio.create_task(log.run())
    for e in _run_log([("sample", 0, {}), ("sample", 300, {"kept": "heartbeat"})]):
        log.append(e["type"], e["data"])
    await asyncio.wait_for(log.close(), 10)
    await asyncio.wait_for(writer, 10)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = await asyncio.to_thread(audit_main, ["verify", str(tmp_path)])
    assert code == 0, out.getvalue() + err.getvalue()
    assert "INTACT" in out.getvalue()
    assert "warning: samples: seq 3..4: no sample of source-1 for 300.0 s" in err.getvalue()
