"""Samples checked against the policy that wrote them (docs/operations.md, "How much the
audit log grows"): a silence the policy does not explain.

While the room is idle the daemon records each device's samples sparsely, but at least a
heartbeat every ``[log] idle_sample_interval_s``; a device it stops hearing gets gap
entries of its own. So, within one run (from a ``daemon_start`` to the next), two
consecutive samples of one device further apart than the interval plus the stale-data
bound (``stale_after_polls`` polls) and two polls of slack, with no gap of monitoring or
of that device, no clock step and no stop in between, are not what the policy writes: the
daemon stalled, or something stopped it without a record. A thinned sample (one with
``kept``) that names a delivery is not either: around a delivery every reading is kept.

``verify`` prints these as warnings: the chain is intact, and nothing here makes it less
so; they say where to look. Runs whose ``config_loaded`` has no
``idle_sample_interval_s`` (logs written before the policy) or sets it to 0 (every
reading recorded) are not checked. Times are the samples' ``device_mono_ns``, on the
daemon's clock (simulated time under a speed factor, as the interval is).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["policy_findings"]

# Entries after which a silence is explained, for every device of the room ...
_ROOM_BREAKS = frozenset(
    {
        "monitoring_gap_started",
        "monitoring_gap_ended",
        "monitoring_gap",
        "clock_step",
        "recovery",
        "daemon_stop",
        "daemon_start",
    }
)
# ... or for the device they name.
_DEVICE_BREAKS = frozenset({"device_gap_started", "device_gap_ended", "device_identified"})
_SAMPLES = frozenset({"sample", "applicator_sample"})
_SLACK_POLLS = 2


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


class _Run:
    """The policy of one run, from its ``config_loaded`` and ``daemon_start``."""

    def __init__(self, speed: float) -> None:
        self.speed = speed
        self.interval_s: float | None = None
        self.polls: dict[str, float] = {}
        self.stale_polls = 0.0

    def configure(self, config: Mapping[str, Any]) -> None:
        log = config.get("log")
        tol = config.get("tolerances")
        devices = config.get("devices")
        self.interval_s = (
            _num(log.get("idle_sample_interval_s")) if isinstance(log, Mapping) else None
        )
        self.stale_polls = (
            (_num(tol.get("stale_after_polls")) or 0.0) if isinstance(tol, Mapping) else 0.0
        )
        self.polls = {}
        for dev in devices if isinstance(devices, list) else []:
            if isinstance(dev, Mapping) and (p := _num(dev.get("poll_interval_s"))) is not None:
                self.polls[str(dev.get("name"))] = p

    def bound_s(self, device: str) -> float | None:
        """The longest silence the policy allows for ``device``; None: not checked."""
        if not self.interval_s:
            return None
        poll = self.polls.get(device, max(self.polls.values(), default=1.0)) * self.speed
        return self.interval_s + (self.stale_polls + _SLACK_POLLS) * poll


def policy_findings(entries: Iterable[Mapping[str, Any]]) -> list[str]:
    """What the samples say against their policy, one line each (module docstring)."""
    out: list[str] = []
    run = _Run(1.0)
    last: dict[tuple[str, str], tuple[int, Any]] = {}  # (kind, device) -> (mono, seq)
    for e in entries:
        kind, seq = e.get("type"), e.get("seq")
        d = e.get("data")
        if not isinstance(d, Mapping):
            continue
        if kind == "daemon_start":
            run = _Run(_num(d.get("clock_speed")) or 1.0)
        if kind == "config_loaded" and isinstance(d.get("config"), Mapping):
            run.configure(d["config"])
        if kind in _ROOM_BREAKS:
            last.clear()
        elif kind in _DEVICE_BREAKS:
            device = str(d.get("device"))
            for k in [k for k in last if k[1] == device]:
                del last[k]
        if kind not in _SAMPLES:
            continue
        device, mono = str(d.get("device")), d.get("device_mono_ns")
        if "kept" in d and e.get("delivery_id") is not None:
            out.append(
                f"seq {seq}: a {kind} of {device} kept while idle ({d.get('kept')}) names "
                f"delivery {e.get('delivery_id')}: around a delivery every reading is kept"
            )
        if not isinstance(mono, int) or isinstance(mono, bool):
            continue
        bound = run.bound_s(device)
        prev = last.get((str(kind), device))
        if bound is not None and prev is not None:
            silence = (mono - prev[0]) / 1e9
            if silence > bound:
                out.append(
                    f"seq {prev[1]}..{seq}: no {kind} of {device} for {silence:.1f} s and no "
                    f"gap recorded; the policy writes one at least every "
                    f"{run.interval_s:g} s (allowed {bound:.1f} s with the stale bound)"
                )
        last[(str(kind), device)] = (mono, seq)
    return out
