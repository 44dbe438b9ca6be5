"""The report's section "Prescription and verification" (issue 18), from the record.

The outcome of the governing check (audit/rxcheck.py) in large type, the reasons in words,
the overrides (who, why, when), and the table prescribed | console (at the check) |
delivered; then every item the check judged and every check of the delivery in order. A
delivery without a check says so in one line and gets no invented outcome.

People are named by their keyring holder id (staff, never patients); with
``iort-audit report --keyring FILE`` by their printed name too, and a holder who held no
physicist key valid when they approved the prescription or signed the override is marked
and said in red (the daemon checked the signature; this checks the keyring the auditor
trusts). Nothing here reads anything but the record and that keyring.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from iortd.audit.applicator import applicator_side
from iortd.audit.record import DeliveryRecord
from iortd.audit.report.model import Block, Heading, KeyValues, Para, Table, gy, number, secs, when
from iortd.audit.rxcheck import PrescriptionCheck, listed
from iortd.auditlog.keyring import Keyring

__all__ = ["OUTCOME_WORDS", "REASON_WORDS", "outcome_words", "rx_blocks"]

OUTCOME_WORDS = {
    "VERIFIED": "VERIFIED",
    "NOT_VERIFIED": "NOT VERIFIED",
    "VERIFIED_OVR": "VERIFIED WITH OVERRIDE",
    None: "NOT CHECKED",
}

# Each item a check judges, in words (the vocabulary of kernel/types.py VerificationItem).
REASON_WORDS = {
    "no_prescription": "no prescription was in force for this delivery",
    "signature": "the prescription's signature is not valid, or not from an enrolled "
    "physicist's key valid at the time",
    "expired": "the prescription had expired",
    "already_delivered": "the prescription had already been used for an earlier delivery",
    "applicator": "the console's applicator is not the prescribed one",
    "applicator_reader": "the applicator reader's applicator is not the prescribed one",
    "dose": "the console's preset dose differs from the prescribed dose beyond the tolerance",
    "time": "the console's planned time differs from the independently expected time beyond "
    "the tolerance",
    "time_unchecked": "the planned time could not be checked independently (no commissioned "
    "dose-rate table or output factor for the applicator)",
}

NOT_CHECKED_LINE = (
    "Not checked against a prescription: the log holds no verification entry for this "
    "delivery (verification is off at the site, or no check was made)."
)


def outcome_words(outcome: str | None) -> str:
    return OUTCOME_WORDS.get(outcome, "NOT CHECKED")


def _parse(ts: Any) -> datetime | None:
    if not isinstance(ts, str):
        return None
    try:
        t = datetime.fromisoformat(ts)
    except ValueError:
        return None
    return t if t.tzinfo is not None else None


def _person(holder: Any, keyring: Keyring | None, at: Any, problems: list[str]) -> str:
    """The holder id, with the printed name from the keyring; with a keyring, a holder
    who held no physicist key valid at ``at`` is marked, and said in ``problems``."""
    h = str(holder) if holder is not None else "—"
    if keyring is None:
        return h
    entries = keyring.of(h)
    when_ = _parse(at)
    ok = when_ is not None and any("physicist" in e.roles and e.valid_at(when_) for e in entries)
    if not ok:
        problems.append(
            f"{h} held no physicist key valid at {at} in the keyring given "
            f"({keyring.path.name}, SHA-256 {keyring.sha256[:16]}...)"
        )
    name = f"{entries[0].name} ({h})" if entries else h
    return name if ok else f"{name} [NOT ENROLLED AS PHYSICIST THEN]"


def _app(a: Any) -> str:
    if not isinstance(a, dict):
        return "—"
    serial = f", s/n {a.get('serial')}" if a.get("serial") else ""
    return f"{a.get('type', '—')} {a.get('diameter_mm', '—')} mm{serial}"


def _rx_app(p: Mapping[str, Any]) -> str:
    a = p.get("applicator")
    if not isinstance(a, dict):
        return "—"
    return f"{a.get('code', '—')} {a.get('diameter_mm', '—')} mm"


def _dose_ref(p: Mapping[str, Any]) -> str:
    if p.get("dose_reference") == "depth":
        return f" at {p.get('depth_mm')} mm depth in water"
    if p.get("dose_reference") == "surface":
        return " at the applicator surface"
    return ""


def _json(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_json(x)}" for k, x in sorted(v.items()))
    if isinstance(v, list):
        return ", ".join(_json(x) for x in v)
    return str(v)


def _override_times(pc: PrescriptionCheck) -> dict[str, tuple[Any, str]]:
    """nonce -> (ts, shown) of the first check that recorded that override."""
    out: dict[str, tuple[Any, str]] = {}
    for e in pc.checks:
        d = e.get("data")
        for o in listed(d, "overrides"):
            if isinstance(o, dict) and isinstance(o.get("nonce"), str):
                out.setdefault(o["nonce"], (e.get("ts"), when(e.get("ts"))))
    return out


def rx_blocks(rec: DeliveryRecord, keyring: Keyring | None = None) -> list[Block]:
    pc = rec.prescription_check
    problems: list[str] = []
    out: list[Block] = [Heading("Prescription and verification")]
    out.append(Para(outcome_words(pc.outcome), "outcome"))
    if pc.governing is None:
        out.append(Para(NOT_CHECKED_LINE))
        if pc.checks:
            seqs = ", ".join(str(e.get("seq")) for e in pc.checks)
            out.append(
                Para(
                    f"The verification entries at seq {seqs} are malformed (no outcome of the "
                    "vocabulary): they are not counted as a check.",
                    "warn",
                )
            )
        return out
    d, p, g = pc.data, pc.prescription, pc.governing
    reasons = [str(r) for r in listed(d, "reasons")]
    if pc.outcome == "VERIFIED_OVR":
        lead = "Overridden by a physicist: "
    elif reasons:
        lead = "Not verified: "
    else:
        lead = ""
    if reasons:
        out.append(Para(lead + "; ".join(REASON_WORDS.get(r, r) for r in reasons) + ".", "warn"))
    if pc.after_beam_on:
        out.append(
            Para(
                "Checked only at or after beam-on: no check was made before the beam came on, "
                "so the delivery was not verified before irradiation (trigger "
                f"{d.get('trigger')}).",
                "warn",
            )
        )
    console: dict[str, Any] = d["console"] if isinstance(d.get("console"), dict) else {}
    reader = d.get("reader_applicator")
    basis: dict[str, Any] | None = (
        d["time_basis"] if isinstance(d.get("time_basis"), dict) else None
    )
    used_data = pc.used[0].get("data") if pc.used else None
    used: dict[str, Any] = used_data if isinstance(used_data, dict) else {}
    s = rec.summary
    summary_app = s.get("applicator")
    fraction = (
        f"{p.get('fraction')} of {p.get('fractions')}" if p.get("fraction") is not None else "—"
    )
    rows = [
        ["Treatment ID", str(p.get("treatment_id", "—")), "—", str(used.get("treatment_id", "—"))],
        ["Plan ID", str(p.get("plan_id", "—")), "—", str(used.get("plan_id", "—"))],
        ["Fraction", fraction, "—", str(used.get("fraction", "—"))],
        [
            "Dose",
            gy(p.get("prescribed_dose_gy")) + _dose_ref(p),
            "preset " + gy(console.get("preset_gy")),
            gy(rec.delivered_primary_gy) + " (primary channel)",
        ],
        ["Applicator", _rx_app(p), _app(console.get("applicator")), _app(summary_app)],
    ]
    if reader is not None or rec.applicator_samples:
        side = applicator_side(rec)
        rows.append(
            [
                "Applicator (reader)",
                _rx_app(p),
                _app(reader),
                _app(side.identity if side is not None else None) + " at beam-on",
            ]
        )
    rows += [
        [
            "Treatment time",
            secs(p.get("planned_time_s")) + " planned",
            secs(console.get("planned_time_s")) + " planned",
            secs(s.get("beam_on_s", rec._last("beam_on_s"))) + " beam-on",
        ],
        ["Expected time (independent)", secs(d.get("expected_time_s")), "—", "—"],
    ]
    out.append(
        Table(
            ["", "prescribed", "console (at the check)", "delivered"],
            rows,
            [0.22, 0.26, 0.26, 0.26],
        )
    )
    if basis is not None:
        factor = number(basis.get("output_factor"))
        basis_text = (
            f"dose-rate table {basis.get('table_source')} of {basis.get('table_date')} "
            f"(SHA-256 {basis.get('table_sha256')}), {number(basis.get('rate_gy_min')) or 0:.4g} "
            f"Gy/min x output factor {factor if factor is not None else '—'}"
            + (
                " (ASSUMED: no QA factor was entered)"
                if basis.get("factor_assumed")
                else f" (measured {basis.get('factor_measured_on')})"
            )
        )
    else:
        basis_text = "none: the expected time could not be computed"
    tol: dict[str, Any] = p["tolerances"] if isinstance(p.get("tolerances"), dict) else {}
    out.append(
        KeyValues(
            [
                (
                    "Governing check",
                    f"seq {g.get('seq')}, {when(g.get('ts'))}, trigger {d.get('trigger')}",
                ),
                ("Prescription SHA-256", str(d.get("prescription_sha256") or "—")),
                (
                    "Approved by",
                    f"{_person(p.get('approved_by'), keyring, p.get('approved_at'), problems)} "
                    f"at {p.get('approved_at', '—')}; "
                    f"valid until {p.get('not_after', '—')}"
                    if p
                    else "—",
                ),
                (
                    "Tolerances",
                    f"dose {_json(tol.get('dose_rel'))} (relative), time "
                    f"{_json(tol.get('time_rel'))} (relative), applicator exact"
                    if tol
                    else "—",
                ),
                ("Expected-time basis", basis_text),
                (
                    "Prescription used",
                    f"yes: recorded at seq {pc.used[0].get('seq')} (it is already delivered "
                    "for any later delivery)"
                    if pc.used
                    else "no prescription_used entry for this delivery",
                ),
            ]
        )
    )
    overrides = [o for o in listed(d, "overrides") if isinstance(o, dict)]
    if overrides:
        times = _override_times(pc)
        rows_o = []
        for o in overrides:
            ts, shown = times.get(str(o.get("nonce")), (None, "—"))
            by = _person(o.get("by"), keyring, ts, problems)
            rows_o.append([str(o.get("item")), by, str(o.get("reason")), shown])
        out.append(
            Table(["overridden item", "by", "reason", "time"], rows_o, [0.18, 0.26, 0.36, 0.20])
        )
    used_sha = used.get("prescription_sha256")
    if pc.used and used_sha != d.get("prescription_sha256"):
        out.append(
            Para(
                f"The prescription recorded as used ({str(used_sha)[:16]}...) is not the one "
                f"the governing check named ({str(d.get('prescription_sha256'))[:16]}...).",
                "warn",
            )
        )
    if problems:
        out.append(Para("Keyring: " + "; ".join(problems) + ".", "warn"))
    checks = [c for c in listed(d, "checks") if isinstance(c, dict)]
    if checks:
        out.append(
            Table(
                ["item", "result", "expected", "actual", "detail"],
                [
                    [
                        str(c.get("item")),
                        "ok" if c.get("ok") is True else "FAILED",
                        _json(c.get("expected")),
                        _json(c.get("actual")),
                        str(c.get("detail") or ""),
                    ]
                    for c in checks
                ],
                [0.16, 0.09, 0.22, 0.22, 0.31],
            )
        )
    if len(pc.checks) > 1:
        out.append(
            Table(
                ["seq", "time", "trigger", "outcome", "reasons"],
                [
                    [
                        str(e.get("seq")),
                        when(e.get("ts")),
                        str(_data(e).get("trigger")),
                        str(_data(e).get("outcome")),
                        ", ".join(str(r) for r in listed(_data(e), "reasons")) or "—",
                    ]
                    for e in pc.checks
                ],
                [0.08, 0.27, 0.14, 0.17, 0.34],
            )
        )
        out.append(
            Para(
                "Every check of this delivery, in order; the governing one is the last made "
                "before the beam first came on.",
                "note",
            )
        )
    return out


def _data(e: Mapping[str, Any]) -> dict[str, Any]:
    d = e.get("data")
    return d if isinstance(d, dict) else {}
