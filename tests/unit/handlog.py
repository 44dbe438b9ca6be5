"""A delivery written by hand, entry by entry as the daemon writes them, for the unit
tests of reports and exports (test_export_dicom.py, test_report.py)."""

from __future__ import annotations

from typing import Any

from iortd.audit.record import DeliveryRecord, Verification, _collect

DID = "or-1-20261126T100000000000Z"
VERIFIED = Verification(
    intact=True,
    problem=None,
    problem_brief=None,
    entries=100,
    files=("log-0000000000000000-20261126.jsonl",),
    origin="iortd/site/or-1/abcdef0123456789",
    head_seq=99,
    head_hash="ab" * 32,
    checkpoints=2,
    signed_through=99,
    key="the key recorded in the log",
)


def at(s: float) -> str:
    m, sec = divmod(s, 60)
    return f"2026-11-26T10:{int(m):02d}:{sec:09.6f}Z"


class Log:
    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def add(self, kind: str, data: dict[str, Any], did: str | None = DID) -> None:
        seq = len(self.entries)
        e: dict[str, Any] = {
            "seq": seq,
            "ts": at(seq / 10),
            "type": kind,
            "data": data,
            "hash": f"{seq:064x}",
        }
        if did:
            e["delivery_id"] = did
        self.entries.append(e)

    def sample(self, t: float, state: str, p: float, s: float, beam: float, rate: float) -> None:
        self.add(
            "sample",
            {
                "at": at(t),
                "state": state,
                "dose_primary_gy": p,
                "dose_secondary_gy": s,
                "beam_on_s": beam,
                "dose_rate_gy_min": rate,
                "preset_gy": 1.0,
                "simulated": True,
            },
        )


def interrupted_log(status: str = "NORMAL", extra_segment: bool = False) -> Log:
    """1 Gy at 1 Gy/min: 0.4 Gy, the door opens, resumed, 0.6 Gy more."""
    log = Log()
    log.add("log_created", {"origin": VERIFIED.origin}, None)
    log.add("daemon_start", {"software_version": "0.1.0", "clock_speed": 1.0}, None)
    log.add(
        "config_loaded",
        {
            "file": "site.toml",
            "sha256": "cd" * 32,
            "config": {
                "plan": {"treatment_id": "T-0042", "plan_id": "P-0042", "fraction": 1},
                "site": {"id": "site", "room": "or-1"},
            },
        },
        None,
    )
    log.add(
        "device_identified",
        {"device": "console-1", "manufacturer": "M", "model": "X-50", "serial": "S-1"},
        None,
    )
    log.add("delivery_started", {"at": at(0), "preset_gy": 1.0, "joined_in_progress": False})
    log.add(
        "phase_changed", {"at": at(1), "from": "READY", "to": "IRRADIATING", "cause": "beam on"}
    )
    log.sample(1, "IRRADIATING", 0.0, 0.0, 0.0, 1.0)
    log.sample(13, "IRRADIATING", 0.2, 0.201, 12.0, 1.0)
    log.sample(25, "INTERRUPTED", 0.4, 0.402, 24.0, 0.0)
    log.add(
        "phase_changed",
        {
            "at": at(25),
            "from": "IRRADIATING",
            "to": "INTERRUPTED",
            "cause": "interrupted: interlock door",
        },
    )
    log.add("interlock_changed", {"at": at(25), "interlock": "door", "from": "ok", "to": "tripped"})
    log.add(
        "phase_changed",
        {"at": at(40), "from": "INTERRUPTED", "to": "IRRADIATING", "cause": "resumed"},
    )
    log.sample(40, "IRRADIATING", 0.4, 0.402, 24.0, 1.0)
    log.sample(76, "TERMINATED", 1.0, 1.003, 60.0, 0.0)
    segments = [
        {"kind": "beam", "start_gy": 0.0, "end_gy": 0.4},
        {"kind": "beam", "start_gy": 0.4, "end_gy": 1.0},
    ]
    if extra_segment:
        segments.append({"kind": "beam_off", "start_gy": 1.0, "end_gy": 1.01})
    log.add(
        "delivery_terminated",
        {
            "status": status,
            "reason": "preset_reached",
            "summary": {
                "preset_gy": 1.0,
                "delivered_primary_gy": segments[-1]["end_gy"],
                "delivered_secondary_gy": 1.003,
                "beam_on_s": 60.0,
                "planned_time_s": 60.0,
                "expected_rate_gy_min": 1.0,
                "applicator": {"type": "spherical", "diameter_mm": 30.0, "serial": "A-7"},
                "segments": segments,
                "interruptions": [{"cause": "interlock door", "dose_at_start_gy": 0.4}],
                "gaps": [],
            },
        },
    )
    log.add("checkpoint", {"note": "x"}, None)
    return log


def record(log: Log) -> DeliveryRecord:
    return _collect(log.entries, DID, VERIFIED)
