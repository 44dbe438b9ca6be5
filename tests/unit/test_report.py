"""The report's document and its PDF from a delivery written by hand: what it states, that
its bytes depend on the log only (creation date from the log, invariant document id), and
the NOT VERIFIED stamp. Real deliveries: tests/integration/test_audit_report.py."""

from __future__ import annotations

import dataclasses
import re

from handlog import DID, VERIFIED, Log, at, interrupted_log, record

from iortd.audit.export import events_csv
from iortd.audit.report.content import build_doc
from iortd.audit.report.html_page import html_report
from iortd.audit.report.model import KeyValues, Para, Table, when
from iortd.audit.report.pdf import pdf_report
from iortd.audit.review import collect_deliveries, format_summary


def test_the_document_states_specified_and_delivered_figures() -> None:
    doc = build_doc(record(interrupted_log()))
    assert doc.status_line == "Termination: NORMAL (preset_reached)"
    [dose] = [b for b in doc.blocks if isinstance(b, Table) and b.header[1] == "specified"]
    assert dose.rows[0][:3] == ["Dose, primary channel", "1.000 Gy", "1.000 Gy"]
    assert dose.rows[1][:3] == ["Dose, secondary channel", "1.000 Gy", "1.003 Gy"]
    kv = {k: v for b in doc.blocks if isinstance(b, KeyValues) for k, v in b.rows}
    assert kv["Interruptions"] == "1"
    assert kv["Treatment ID (pseudonymous)"] == "T-0042"
    assert kv["Last entry hash"] == f"{14:064x}"
    assert doc.stamp is None
    assert f"last entry hash {14:064x}" in doc.footer


def test_the_pdf_is_the_same_bytes_each_time_and_dated_from_the_log() -> None:
    rec = record(interrupted_log())
    a, b = pdf_report(rec), pdf_report(record(interrupted_log()))
    assert a == b
    # The log's last delivery entry was appended at 10:00:01.4 (seq 14).
    assert re.search(rb"/CreationDate \(D:20261126100001Z\)", a), a[-600:]


def test_a_log_that_is_not_intact_is_stamped_in_the_html_too() -> None:
    broken = dataclasses.replace(
        VERIFIED,
        intact=False,
        problem="x/log-0.jsonl:7 (seq 6): altered",
        problem_brief="log-0.jsonl:7 (seq 6): altered",
    )
    rec = record(interrupted_log())
    rec.verification = broken
    doc = build_doc(rec)
    assert doc.stamp == "log-0.jsonl:7 (seq 6): altered"
    page = html_report(rec).decode()
    assert page.count("NOT VERIFIED: the audit log is not intact at log-0.jsonl:7 (seq 6)") == 2


def test_a_delivery_still_open_in_the_log_is_reported_in_progress() -> None:
    log = interrupted_log()
    log.entries = [e for e in log.entries if e["type"] != "delivery_terminated"]
    rec = record(log)
    doc = build_doc(rec)
    assert doc.status_line == "Termination: IN PROGRESS (no termination in the log)"
    assert pdf_report(rec).startswith(b"%PDF")


def acked_log() -> Log:
    """The door's alarm raised during the delivery, acknowledged (a signed ack) after its end."""
    log = interrupted_log()
    raised = {
        "at": at(25),
        "code": "interlock_tripped",
        "key": "interlock_tripped:door",
        "message": "interlock door tripped with beam on",
        "severity": "high",
    }
    log.entries.insert(11, {**log.entries[11], "type": "alarm_raised", "data": raised})
    for i, e in enumerate(log.entries):  # renumbered: the table lists seq
        e["seq"], e["hash"] = i, f"{i:064x}"
    log.add(
        "alarm_acknowledged",
        {
            "key": "interlock_tripped:door",
            "code": "interlock_tripped",
            "severity": "high",
            "raised_at": at(25),
            "delivery_id": DID,
            "by": "op-bob",
            "name": "B. Operator, RTT",
            "roles": ["operator"],
            "nonce": "ab" * 16,
            "comment": "door closed, resumed",
        },
    )
    return log


def test_acknowledged_by_names_the_signer_the_time_and_the_comment() -> None:
    log = acked_log()
    ack_ts = log.entries[-1]["ts"]
    doc = build_doc(record(log))
    [events] = [b for b in doc.blocks if isinstance(b, Table) and "acknowledged by" in b.header]
    [row] = [r for r in events.rows if r[2].startswith("alarm HIGH raised")]
    assert row[3] == f"B. Operator, RTT (op-bob), {when(ack_ts)}: door closed, resumed"
    [ack] = [r for r in events.rows if r[2].startswith("alarm acknowledged")]
    assert ack[2] == (
        f"alarm acknowledged: interlock_tripped:door raised {at(25)}, by B. Operator, RTT (op-bob)"
    )
    notes = [b for b in doc.blocks if isinstance(b, Para) and "No alarm acknowledgements" in b.text]
    assert notes == []


def test_an_unacknowledged_alarm_says_none_recorded() -> None:
    log = acked_log()
    log.entries.pop()
    doc = build_doc(record(log))
    [events] = [b for b in doc.blocks if isinstance(b, Table) and "acknowledged by" in b.header]
    [row] = [r for r in events.rows if r[2].startswith("alarm HIGH raised")]
    assert row[3] == "none recorded"


def test_review_lists_the_acknowledgement() -> None:
    log = acked_log()
    [rec] = collect_deliveries(log.entries)
    text = format_summary(rec)
    assert "acknowledged    none recorded" not in text
    ack_ts = log.entries[-1]["ts"]
    assert (
        f"    - {ack_ts}: B. Operator, RTT (op-bob) acknowledged interlock_tripped:door "
        f"raised {at(25)}: door closed, resumed"
    ) in text


def test_the_events_csv_names_who_acknowledged() -> None:
    rows = events_csv(record(acked_log())).decode().splitlines()
    [ack] = [r for r in rows if ",alarm_acknowledged," in r]
    assert ",op-bob," in ack
