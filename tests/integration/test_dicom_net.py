"""audit/dicom_net.py against peers written here with pynetdicom (in this process, real
sockets on free loopback ports), for what Orthanc and storescp cannot be made to do: every
C-STORE status class, a peer that accepts no context, TLS both ways, a commitment report on
the same association, and reports a third party or a broken peer could send.
The real servers: tests/integration/test_dicom_peers.py."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dicompeers import free_port
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import N_ACTION_RSP
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    EncapsulatedPDFStorage,
    RTBeamsTreatmentRecordStorage,
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from tlscerts import TlsFiles, make_tls_files

from iortd.audit.dicom_handoff import encapsulated_pdf, handoff_instances
from iortd.audit.dicom_net import Destination, echo, request_commitment, store

pytestmark = pytest.mark.integration

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "golden-log"
DELIVERY = "or-5-20261206T035245018711Z"
CALLING = "IORTD_NET"
PEER = "PEER_SCP"
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


@pytest.fixture(scope="module")
def instances() -> list[Dataset]:
    """The golden log's record, and a stand-in PDF beside it (rendering the real report
    takes a second and changes nothing on the wire)."""
    (record,) = handoff_instances(
        FIXTURE / "log", DELIVERY, what=["record"], store_dir=None, keyring=None
    )
    return [record, encapsulated_pdf(record, b"%PDF-1.4 stand-in\n", DELIVERY)]


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


Handlers = list[Any]  # pynetdicom's (event, handler) pairs


class Peer:
    """A pynetdicom SCP on a free loopback port, stopped at the end of the test."""

    def __init__(
        self,
        handlers: Handlers,
        *,
        classes: tuple[str, ...] = (RTBeamsTreatmentRecordStorage, EncapsulatedPDFStorage),
        ssl_context: ssl.SSLContext | None = None,
        syntaxes: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian),
    ) -> None:
        self.ae = AE(ae_title=PEER)
        for c in classes:
            self.ae.add_supported_context(c, list(syntaxes))
        self.port = free_port()
        server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=handlers, ssl_context=ssl_context
        )
        assert isinstance(server, ThreadedAssociationServer)
        self.server = server

    def dest(self, **over: Any) -> Destination:
        fields: dict[str, Any] = {
            "name": "peer",
            "ae_title": PEER,
            "host": "127.0.0.1",
            "port": self.port,
            "timeout_s": 10.0,
        }
        fields.update(over)
        return Destination(**fields)

    def stop(self) -> None:
        self.server.shutdown()
        self.ae.shutdown()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    started: list[Peer] = []
    yield started
    for p in started:
        p.stop()


def _status(code: int, comment: str | None = None) -> Callable[[Any], Dataset]:
    def handle(_event: Any) -> Dataset:
        rsp = Dataset()
        rsp.Status = code
        if comment is not None:
            # a peer need not keep to the VR: no validation on this side
            rsp.add(DataElement(0x00000902, "LO", comment, validation_mode=config.IGNORE))
        return rsp

    return handle


STATUSES = [
    (0x0000, "stored"),
    (0xB000, "warning"),  # coercion of data elements
    (0x0001, "warning"),  # Orthanc-style "elements discarded"
    (0xA700, "failed"),  # out of resources
    (0xA900, "failed"),  # data set does not match SOP class
    (0xC000, "failed"),  # cannot understand
]


def test_each_status_class_is_mapped_with_its_code(
    peers: list[Peer], instances: list[Dataset]
) -> None:
    answer: list[int] = []

    def handle(_event: Any) -> Dataset:
        rsp = _status(answer[0], "no room here " + "x" * 51)(_event)
        return rsp

    peer = Peer([(evt.EVT_C_STORE, handle)])
    peers.append(peer)
    for code, outcome in STATUSES:
        answer[:] = [code]
        result = store(CALLING, peer.dest(), instances)
        assert [(o.outcome, o.status) for o in result] == [(outcome, code)] * 2, hex(code)
        assert f"status 0x{code:04X}" in result[0].detail
        # the peer's Error Comment is free text that may repeat patient data: what is
        # recorded (audit log, MQTT) says that there was one, never what it said
        assert "no room here" not in result[0].detail
        assert result[0].detail.endswith("[Error Comment withheld]")
        assert result[0].detail.isprintable()
        assert len(result[0].detail) < 120


def test_a_class_the_peer_does_not_accept_is_failed_and_the_others_go(
    peers: list[Peer], instances: list[Dataset]
) -> None:
    peer = Peer([(evt.EVT_C_STORE, _status(0))], classes=(RTBeamsTreatmentRecordStorage,))
    peers.append(peer)
    record, report = store(CALLING, peer.dest(), instances)
    assert (record.outcome, record.status) == ("stored", 0)
    assert (report.outcome, report.status) == ("failed", None)
    assert "accepted no presentation context for SOP class 1.2.840.10008.5.1.4.1.1.104.1" in (
        report.detail
    )
    # none at all: the association is aborted by us, and nothing is sent
    only_pdf = Peer([(evt.EVT_C_STORE, _status(0))], classes=(EncapsulatedPDFStorage,))
    peers.append(only_pdf)
    (o,) = store(CALLING, only_pdf.dest(), instances[:1])
    assert o.outcome == "failed"
    assert "accepted none of the presentation contexts" in o.detail


def test_a_peer_that_takes_only_implicit_vr_gets_the_same_dataset(
    peers: list[Peer], instances: list[Dataset]
) -> None:
    """The instances are Explicit VR Little Endian; a peer that accepts only the DICOM
    default (Implicit VR Little Endian) gets them re-encoded, the same datasets."""
    got: list[tuple[str, Dataset]] = []

    def keep(event: Any) -> int:
        got.append((str(event.context.transfer_syntax), event.dataset))
        return 0x0000

    peer = Peer([(evt.EVT_C_STORE, keep)], syntaxes=(ImplicitVRLittleEndian,))
    peers.append(peer)
    assert [o.outcome for o in store(CALLING, peer.dest(), instances)] == ["stored", "stored"]
    assert [ts for ts, _ in got] == [ImplicitVRLittleEndian] * 2
    for (_, received), sent in zip(got, instances, strict=True):
        plain = Dataset(sent)
        plain.file_meta = None  # type: ignore[assignment]
        assert received == plain


def _server_tls(tls: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca))
    ctx.load_cert_chain(str(tls.server_cert), str(tls.server_key))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def test_tls_with_client_certificates(
    peers: list[Peer], instances: list[Dataset], tls: TlsFiles
) -> None:
    seen: list[str] = []

    def handle(event: Any) -> int:
        cert = event.assoc.dul.socket.socket.getpeercert()
        seen.append(dict(x[0] for x in cert["subject"])["commonName"])
        return 0x0000

    peer = Peer([(evt.EVT_C_STORE, handle)], ssl_context=_server_tls(tls))
    peers.append(peer)
    dest = peer.dest(tls_ca=tls.ca, tls_cert=tls.client_cert, tls_key=tls.client_key)
    assert [o.outcome for o in store(CALLING, dest, instances)] == ["stored", "stored"]
    assert seen == ["iortd-or-7", "iortd-or-7"], "our client certificate was presented"
    # a peer whose certificate another CA signed: no association, nothing sent
    wrong = peer.dest(tls_ca=tls.other_ca, tls_cert=tls.client_cert, tls_key=tls.client_key)
    result = store(CALLING, wrong, instances)
    assert [o.outcome for o in result] == ["unreachable", "unreachable"]
    # plain DICOM to a TLS port: no association either, within the bound
    t0 = time.monotonic()
    result = store(CALLING, peer.dest(timeout_s=1.0), instances)
    assert [o.outcome for o in result] == ["unreachable", "unreachable"]
    assert time.monotonic() - t0 < 10.0


def _report(event_type: int, tuid: str, ok: list[str], bad: list[tuple[str, int]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = tuid
    items = []
    for uid in ok:
        item = Dataset()
        item.ReferencedSOPClassUID = RTBeamsTreatmentRecordStorage
        item.ReferencedSOPInstanceUID = uid
        items.append(item)
    ds.ReferencedSOPSequence = items
    failed = []
    for uid, reason in bad:
        item = Dataset()
        item.ReferencedSOPClassUID = RTBeamsTreatmentRecordStorage
        item.ReferencedSOPInstanceUID = uid
        item.FailureReason = reason
        failed.append(item)
    if failed:
        ds.FailedSOPSequence = failed
    return ds


def _commitment_peer(reply: Callable[[Any, Dataset], None]) -> Handlers:
    """An N-ACTION handler that answers success and, once that response has gone out on the
    wire (PS3.4 J: the report follows the N-ACTION response), calls ``reply(assoc,
    action)`` from another thread."""
    answered = threading.Event()  # our N-ACTION-RSP was handed to the transport
    on_wire = threading.Event()  # ... and the PDU after that was sent: it went out

    def on_action(event: Any) -> tuple[int, None]:
        action, assoc = event.action_information, event.assoc

        def later() -> None:
            if on_wire.wait(timeout=10.0):
                reply(assoc, action)

        threading.Thread(target=later, daemon=True).start()
        return 0x0000, None

    def on_dimse_sent(event: Any) -> None:
        if isinstance(event.message, N_ACTION_RSP):
            answered.set()

    def on_pdu_sent(_event: Any) -> None:
        if answered.is_set():
            on_wire.set()

    return [
        (evt.EVT_N_ACTION, on_action),
        (evt.EVT_DIMSE_SENT, on_dimse_sent),
        (evt.EVT_PDU_SENT, on_pdu_sent),
    ]


def _send_report(assoc: Any, event_type: int, info: Dataset) -> int:
    """Send an N-EVENT-REPORT; the status we answered (-1: no answer)."""
    status, _ = assoc.send_n_event_report(
        info, event_type, StorageCommitmentPushModel, StorageCommitmentPushModelInstance
    )
    return int(status.Status) if "Status" in status else -1


REFS = [
    (RTBeamsTreatmentRecordStorage, "2.25.11"),
    (RTBeamsTreatmentRecordStorage, "2.25.22"),
    (RTBeamsTreatmentRecordStorage, "2.25.33"),
]


def test_a_report_on_the_same_association(peers: list[Peer]) -> None:
    def reply(assoc: Any, action: Dataset) -> None:
        info = _report(2, action.TransactionUID, ["2.25.11", "2.25.99"], [("2.25.22", 0x0112)])
        _send_report(assoc, 2, info)

    peer = Peer(_commitment_peer(reply), classes=(StorageCommitmentPushModel,))
    peers.append(peer)
    c = request_commitment(
        CALLING,
        peer.dest(),
        REFS,
        listen_host="127.0.0.1",
        listen_port=free_port(),
        timeout_s=10.0,
    )
    assert c.outcome == "reported", c
    assert "on the same association" in c.detail
    # 2.25.99 was not asked about: ignored; 2.25.33 not named: still pending
    assert c.committed == ("2.25.11",)
    assert c.failed == (("2.25.22", 0x0112),)
    assert "1 not named in the report (still pending)" in c.detail


def test_reports_that_do_not_count(peers: list[Peer]) -> None:
    """Another transaction's report, and one whose sequences are broken, are answered with
    a failure status and ignored; the call ends at its bound with nothing committed, and
    never raises for what a peer sent."""

    answers: list[int] = []

    def reply(assoc: Any, action: Dataset) -> None:
        other = _report(1, "2.25.4242", [u for _, u in REFS], [])
        answers.append(_send_report(assoc, 1, other))
        broken = Dataset()
        broken.TransactionUID = action.TransactionUID
        broken.FailedSOPSequence = [Dataset()]
        broken.FailedSOPSequence[0].ReferencedSOPInstanceUID = "2.25.11"
        broken.FailedSOPSequence[0].add_new(0x00081197, "LO", "not a number")
        answers.append(_send_report(assoc, 2, broken))

    peer = Peer(_commitment_peer(reply), classes=(StorageCommitmentPushModel,))
    peers.append(peer)
    t0 = time.monotonic()
    c = request_commitment(
        CALLING,
        peer.dest(),
        REFS,
        listen_host="127.0.0.1",
        listen_port=free_port(),
        timeout_s=2.0,
    )
    took = time.monotonic() - t0
    assert c.outcome == "no-report", c
    assert (c.committed, c.failed) == ((), ())
    assert 1.5 < took < 10.0, f"{took:.1f} s for a 2 s bound"
    # both reached us, and were answered: not ours (0x0119), undecodable (0x0110)
    assert answers == [0x0119, 0x0110]


def test_the_listener_takes_only_the_destinations_ae_and_our_transaction(
    peers: list[Peer],
) -> None:
    """A report on a new association (as Orthanc sends it), from the destination's AE
    title: counted; the same from another AE title: the association is refused."""
    listen = free_port()

    def reply_from(ae_title: str) -> Callable[[Any, Dataset], None]:
        def reply(_assoc: Any, action: Dataset) -> None:
            ae = AE(ae_title=ae_title)
            ae.add_requested_context(StorageCommitmentPushModel, SYNTAXES)
            from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation  # noqa: PLC0415

            role = SCP_SCU_RoleSelectionNegotiation()
            role.sop_class_uid = StorageCommitmentPushModel
            role.scu_role = False
            role.scp_role = True
            assoc = ae.associate("127.0.0.1", listen, ae_title=CALLING, ext_neg=[role])
            if assoc.is_established:
                info = _report(1, action.TransactionUID, [u for _, u in REFS], [])
                assoc.send_n_event_report(
                    info, 1, StorageCommitmentPushModel, StorageCommitmentPushModelInstance
                )
                assoc.release()
            ae.shutdown()

        return reply

    good = Peer(_commitment_peer(reply_from(PEER)), classes=(StorageCommitmentPushModel,))
    peers.append(good)
    c = request_commitment(
        CALLING, good.dest(), REFS, listen_host="127.0.0.1", listen_port=listen, timeout_s=10.0
    )
    assert (c.outcome, set(c.committed)) == ("reported", {u for _, u in REFS}), c
    assert "on a new association" in c.detail
    forger = Peer(_commitment_peer(reply_from("FORGER")), classes=(StorageCommitmentPushModel,))
    peers.append(forger)
    c = request_commitment(
        CALLING, forger.dest(), REFS, listen_host="127.0.0.1", listen_port=listen, timeout_s=1.0
    )
    assert (c.outcome, c.committed) == ("no-report", ()), c


def test_a_listener_port_in_use_fails_at_once(peers: list[Peer]) -> None:
    peer = Peer([], classes=(StorageCommitmentPushModel,))
    peers.append(peer)
    c = request_commitment(
        CALLING,
        peer.dest(),
        REFS,
        listen_host="127.0.0.1",
        listen_port=peer.port,
        timeout_s=10.0,
    )
    assert c.outcome == "failed"
    assert f"cannot listen on 127.0.0.1:{peer.port}" in c.detail


def test_echo_checks_the_link_without_sending_anything(peers: list[Peer]) -> None:
    """C-ECHO (Verification SOP Class): what hospital IT runs before the first delivery."""
    peer = Peer([], classes=(Verification,))
    peers.append(peer)
    ok = echo(CALLING, peer.dest())
    assert (ok.outcome, ok.status) == ("ok", 0), ok
    assert "C-ECHO status 0x0000" in ok.detail
    refused = echo(CALLING, peer.dest(ae_title="NOT_PEER"))
    assert refused.outcome == "ok", "pynetdicom's SCP takes any called AE title by default"
    peer.ae.require_called_aet = True
    refused = echo(CALLING, peer.dest(ae_title="NOT_PEER"))
    assert (refused.outcome, refused.status) == ("refused", None), refused
    assert "reason 7" in refused.detail
    gone = echo(CALLING, Destination("gone", PEER, "127.0.0.1", free_port(), timeout_s=5.0))
    assert gone.outcome == "unreachable"
