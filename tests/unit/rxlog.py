"""Checks against a prescription, in the contract's shape (docs/audit-log.md, issue 18),
added to the hand-written delivery of handlog.py; and the same delivery written as a real
log by the audit-log writer (hash chain, signed checkpoint), for the command-line tests."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

from handlog import DID, Log, interrupted_log

from iortd.auditlog.note import Signer, generate_keypair, write_keypair
from iortd.auditlog.writer import AuditLog

ORIGIN = "iortd/site/or-1/rx0123456789abcd"
RX_SHA = "5e" * 32
ITEMS = (
    "signature",
    "expired",
    "already_delivered",
    "applicator",
    "applicator_reader",
    "dose",
    "time",
)


def prescription(**kw: Any) -> dict[str, Any]:
    """plan.model.prescription_dict's shape."""
    p: dict[str, Any] = {
        "v": 1,
        "treatment_id": "T-0042",
        "plan_id": "P-0042",
        "fraction": 1,
        "fractions": 1,
        "prescribed_dose_gy": 1.0,
        "dose_reference": "depth",
        "depth_mm": 5.0,
        "applicator": {"code": "SPH30", "diameter_mm": 30.0},
        "planned_time_s": 60.0,
        "approved_by": "phys-anna",
        "approved_at": "2026-11-26T08:00:00.000000Z",
        "not_after": "2026-11-27T08:00:00.000000Z",
        "tolerances": {"dose_rel": 0.005, "time_rel": 0.05, "applicator": "exact"},
    }
    p.update(kw)
    return p


def verification(
    outcome: str = "VERIFIED",
    trigger: str = "ready",
    failed: tuple[str, ...] = (),
    overridden: tuple[str, ...] = (),
    *,
    preset_gy: float = 1.0,
    did: str = DID,
    with_prescription: bool = True,
) -> dict[str, Any]:
    """One ``verification`` entry's data, every key of the contract present."""
    p = prescription() if with_prescription else None
    bad = set(failed) | set(overridden)
    checks = [
        {
            "item": item,
            "ok": item not in bad,
            "expected": {"dose": 1.0}.get(item),
            "actual": {"dose": preset_gy}.get(item),
            "detail": f"{item} {'mismatch' if item in bad else 'ok'}",
        }
        for item in ITEMS
    ]
    if not with_prescription:
        checks = [
            {
                "item": "no_prescription",
                "ok": False,
                "expected": None,
                "actual": None,
                "detail": "no prescription in force",
            }
        ]
    return {
        "delivery_id": did,
        "outcome": outcome,
        "trigger": trigger,
        "reasons": list(failed or overridden),
        "overridden": list(overridden),
        "prescription_sha256": RX_SHA if p else None,
        "prescription": p,
        "console": {
            "preset_gy": preset_gy,
            "planned_time_s": 60.0,
            "applicator": {"type": "spherical", "diameter_mm": 30.0, "serial": "A-7"},
        },
        "reader_applicator": None,
        "expected_time_s": 61.2 if p else None,
        "time_basis": {
            "table_source": "commissioning 2026",
            "table_date": "2026-01-15",
            "table_sha256": "7a" * 32,
            "rate_gy_min": 1.0,
            "output_factor": 0.98,
            "factor_measured_on": "2026-11-26",
            "factor_assumed": False,
        }
        if p
        else None,
        "checks": checks,
        "overrides": [
            {
                "item": item,
                "reason": f"{item}: checked by hand against the plan",
                "by": "phys-anna",
                "nonce": f"n-{item}",
            }
            for item in overridden
        ],
    }


def used(did: str = DID) -> dict[str, Any]:
    return {
        "delivery_id": did,
        "prescription_sha256": RX_SHA,
        "treatment_id": "T-0042",
        "plan_id": "P-0042",
        "fraction": 1,
    }


def checked_log(*checks: dict[str, Any], after_beam_on: tuple[dict[str, Any], ...] = ()) -> Log:
    """handlog's interrupted delivery with ``checks`` recorded while READY (before the
    beam came on), prescription_used at beam-on when the last check named a prescription,
    and ``after_beam_on`` checks after it."""
    base = interrupted_log()
    log = Log()
    for e in base.entries:
        d = e["data"]
        if e["type"] == "phase_changed" and d.get("to") == "IRRADIATING" and d["from"] == "READY":
            for c in checks:
                log.add("verification", copy.deepcopy(c))
            log.add(e["type"], d, e.get("delivery_id"))
            last = checks[-1] if checks else None
            if last is not None and last["prescription_sha256"] is not None:
                log.add("prescription_used", used())
            for c in after_beam_on:
                log.add("verification", copy.deepcopy(c))
            continue
        log.add(e["type"], d, e.get("delivery_id"))
    return log


async def _write(directory: Path, log: Log, signer: Signer) -> None:
    alog, _ = await AuditLog.open(directory, origin=ORIGIN, signer=signer)
    task = asyncio.create_task(alog.run())
    try:
        for e in log.entries:
            if e["type"] in ("log_created", "checkpoint"):
                continue  # the writer makes its own
            data = e["data"]
            if e["type"] == "daemon_start":  # the key its checkpoints are checked against
                data = {**data, "verifier_key": signer.verifier.text}
            alog.append(e["type"], data, delivery_id=e.get("delivery_id"), durable=True)
        await alog.checkpoint("delivery_end")
    finally:
        await alog.close()
        await task


def write_real_log(base: Path, log: Log) -> tuple[Path, Path]:
    """(log directory, public key): ``log`` written through the audit-log writer."""
    signer = generate_keypair("or-1")
    _, pub = write_keypair(signer, base / "keys")
    asyncio.run(_write(base / "log", log, signer))
    return base / "log", pub
