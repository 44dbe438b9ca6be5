"""The ``dicom`` sink plug-in (audit/dicom_sink.py): its factory validates every option
without touching anything, errors naming ``options.KEY``; the sink queues a delivery at
its termination (``when = "termination"``) or only at a physicist's approving sign-off
(``when = "signoff"``), builds it at the next checkpoint, and refuses to start without a
way to record. The network and the log are scripted here; tests/integration/
test_dicom_sink_e2e.py runs it in a daemon against real peers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from iortd.audit.dicom_sink import DicomSink, DicomSinkFactory, missed_triggers
from iortd.auditlog.writer import AuditLog
from iortd.daemon.sinks import (
    DeliveryAmended,
    SinkConfigError,
    SinkContext,
    SinkOptionError,
    SinkSpec,
    Terminated,
)

DEST = {"name": "ois", "ae_title": "OIS_SCP", "host": "127.0.0.1", "port": 11112}


def opts(**kw: Any) -> dict[str, Any]:
    return {"calling_ae": "IORTD_OR7", "destinations": [dict(DEST)], **kw}


@pytest.mark.parametrize(
    ("options", "key", "said"),
    [
        ({"destinations": [DEST]}, "options.calling_ae", "missing"),
        (opts(calling_ae="A" * 17), "options.calling_ae", "AE title"),
        (opts(send=["record", "films"]), "options.send", "record, report"),
        (opts(send=[]), "options.send", "record, report"),
        (opts(when="later"), "options.when", "termination"),
        (opts(colour="blue"), "options.colour", "unknown key"),
        (opts(destinations=[]), "options.destinations", "missing or empty"),
        (
            opts(destinations=[{**DEST, "port": 0}]),
            "options.destinations[0].port",
            "TCP port",
        ),
        (
            opts(destinations=[{**DEST, "commitment": True}]),
            "options.commitment_listen",
            "commitment = true",
        ),
        (opts(commitment_listen="nowhere"), "options.commitment_listen", "HOST:PORT"),
        (opts(alarm_after_s=0), "options.alarm_after_s", "seconds"),
        (opts(retry_initial_s=10, retry_max_s=5), "options.retry_max_s", "retry_initial_s"),
        (opts(protected_store=7), "options.protected_store", "path"),
        (opts(protected_store="/nonexistent/store"), "options.protected_store", "not a folder"),
        (opts(keyring="/nonexistent/keyring.toml"), "options.keyring", "not a file"),
        (
            opts(destinations=[{**DEST, "tls_ca": "ca.pem"}]),
            "options.destinations[0].tls_ca",
            "absolute path",
        ),
    ],
)
def test_options_are_validated_naming_the_key(options: dict[str, Any], key: str, said: str) -> None:
    with pytest.raises(SinkOptionError) as err:
        DicomSinkFactory().validate(options)
    assert err.value.key == key
    assert said in err.value.message


def test_good_options_pass_and_name_their_paths() -> None:
    f = DicomSinkFactory()
    f.validate(
        opts(
            send=["record"],
            when="signoff",
            commitment_listen="127.0.0.1:11113",
            destinations=[{**DEST, "commitment": True}, {**DEST, "name": "pacs", "port": 104}],
            alarm_after_s=600,
        )
    )
    assert f.name == "dicom"
    assert {"protected_store", "keyring", "pubkey", "archive"} <= f.path_options


class FakeWorker:
    def __init__(self) -> None:
        self.queued: list[tuple[str, str]] = []
        self.woken = 0

    async def queue_delivery(self, delivery_id: str, trigger: str) -> None:
        self.queued.append((delivery_id, trigger))

    def wake(self) -> None:
        self.woken += 1


def sink(tmp_path: Path, **kw: Any) -> tuple[DicomSink, FakeWorker]:
    async def record(kind: str, data: Mapping[str, Any]) -> bool:
        return True

    ctx = SinkContext(
        site="s",
        room="or-7",
        simulated=True,
        state_dir=tmp_path / "sinks" / "dicom",
        log_directory=tmp_path,
        record=record,
        notice=lambda s, m: None,
    )
    options = opts(**kw)
    DicomSinkFactory().validate(options)
    s = DicomSinkFactory().create(SinkSpec("dicom", "dicom", options), ctx)
    assert isinstance(s, DicomSink)
    w = FakeWorker()
    s.worker = w  # type: ignore[assignment]
    return s, w


def terminated(did: str) -> Terminated:
    return Terminated(did, None, "", None)  # type: ignore[arg-type]


async def test_at_termination_a_delivery_is_queued_and_built_at_the_checkpoint(
    tmp_path: Path,
) -> None:
    s, w = sink(tmp_path)
    await s.events([terminated("d1")], None)
    assert w.queued == [("d1", "termination")]
    assert w.woken == 0  # its record is not covered by a checkpoint yet
    await s.checkpoint("note")
    assert w.woken == 1
    await s.events([DeliveryAmended("d1", "later dose", None)], None)  # type: ignore[arg-type]
    assert w.queued[-1] == ("d1", "amended")
    await s.signed("d1", "approved")  # not waited for under when = "termination"
    assert len(w.queued) == 2


async def test_with_signoff_only_an_approving_sign_off_queues(tmp_path: Path) -> None:
    s, w = sink(tmp_path, when="signoff")
    await s.events([terminated("d1")], None)
    await s.signed("d1", "reviewed")
    assert w.queued == []
    await s.signed("d1", "approved")
    await s.signed("d1", "approved_with_deviation")
    assert w.queued == [("d1", "signed:approved"), ("d1", "signed:approved_with_deviation")]
    assert w.woken == 2  # a signed delivery is covered already: built now


async def test_no_start_without_a_way_to_record(tmp_path: Path) -> None:
    ctx = SinkContext(site="s", room="r", simulated=False, state_dir=tmp_path / "x")
    s = DicomSinkFactory().create(SinkSpec("dicom", "dicom", opts()), ctx)
    with pytest.raises(SinkConfigError, match="record"):
        await s.start()


async def test_start_opens_the_outbox_and_close_ends_the_worker(tmp_path: Path) -> None:
    async def record(kind: str, data: Mapping[str, Any]) -> bool:
        return True

    ctx = SinkContext(
        site="s",
        room="r",
        simulated=False,
        state_dir=tmp_path / "sinks" / "dicom",
        log_directory=tmp_path,
        record=record,
        notice=lambda s, m: None,
    )
    s = DicomSinkFactory().create(SinkSpec("dicom", "dicom", opts()), ctx)
    await s.start()
    assert (tmp_path / "sinks" / "dicom" / "outbox" / "ois").is_dir()
    task = asyncio.create_task(s.run())
    await s.aclose()
    async with asyncio.timeout(10):
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert task.done()


async def test_a_crash_between_the_record_and_the_outbox_is_caught_up_at_start(
    tmp_path: Path,
) -> None:
    """A termination on the record whose hand-off never reached the sink's own files (a
    SIGKILL right after the entry) is queued at the next start; one handed off already,
    one before the sink was configured and one whose hand-off is pending are not."""
    audit, _ = await AuditLog.open(tmp_path, origin="test/catchup")
    task = asyncio.create_task(audit.run())
    try:
        await audit.append("delivery_terminated", {}, delivery_id="d0", durable=True).committed
        start = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # the sink's first start
        for did in ("d1", "d2"):
            audit.append("delivery_started", {}, delivery_id=did)
            await audit.append("delivery_terminated", {}, delivery_id=did, durable=True).committed
        await audit.append(
            "dicom_handoff", {"delivery_id": "d1", "outcome": "queued"}, durable=True
        ).committed
        await audit.append("delivery_amended", {}, delivery_id="d1", durable=True).committed
        # a retry of d1's first instance after the amendment (the sender's loop ran before
        # the catch-up, or before the kill) handles the instance, not the amendment
        retry = {"delivery_id": "d1", "outcome": "unreachable", "attempt": 3}
        await audit.append("dicom_handoff", retry, durable=True).committed
        signed = {"delivery_id": "d2", "meaning": "approved"}
        await audit.append("delivery_signed", signed, durable=True).committed
    finally:
        await audit.close()
        await task
    assert missed_triggers(tmp_path, start, "termination") == [
        ("d2", "termination"),
        ("d1", "amended"),
    ]
    assert missed_triggers(tmp_path, start, "signoff") == [("d2", "signed:approved")]


async def test_a_simulator_s_deliveries_go_only_where_the_site_says_it_is_a_test(
    tmp_path: Path,
) -> None:
    """A simulated delivery would reach the OIS as a treatment record: with a simulator in
    the config the sink refuses to start unless ``allow_simulated = true``."""

    async def record(kind: str, data: Mapping[str, Any]) -> bool:
        return True

    def context(simulated: bool) -> SinkContext:
        return SinkContext(
            site="s",
            room="r",
            simulated=simulated,
            state_dir=tmp_path / "sinks" / "dicom",
            log_directory=tmp_path,
            record=record,
            notice=lambda s, m: None,
        )

    f = DicomSinkFactory()
    with pytest.raises(SinkConfigError, match="allow_simulated"):
        await f.create(SinkSpec("dicom", "dicom", opts()), context(True)).start()
    await f.create(SinkSpec("dicom", "dicom", opts(allow_simulated=True)), context(True)).start()
    await f.create(SinkSpec("dicom", "dicom", opts()), context(False)).start()
    with pytest.raises(SinkOptionError, match="true or false"):
        f.validate(opts(allow_simulated="yes"))
