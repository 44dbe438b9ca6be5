"""DICOM over the network: C-STORE to a site's destinations and Storage Commitment (pynetdicom).

The hand-off to the hospital (issue 23) sends the instances ``audit/dicom_handoff.py`` builds
to one or more DICOM destinations (an oncology information system, a PACS). This module is
the network half and nothing else: it opens associations, sends, asks for commitment and
says what happened; the sink (its outbox, retries, what is recorded) and ``iort-audit send``
decide what to do about it. The conformance statement (docs/dicom-conformance.md) is the
user-facing side of this file: keep them in step. The destinations' configuration
(``Destination``, ``parse_destinations``, AE titles, listen addresses) is in
audit/dicom_config.py, which needs no DICOM library; it is re-exported here.

Contract:

* ``store`` sends a batch over ONE association and returns one ``StoreOutcome`` per dataset,
  in order, never raising for anything the peer or the network does: ``stored`` (status
  0x0000), ``warning`` (0x0001, 0xB000-0xBFFF: the peer kept it, coerced or not), ``failed``
  (a failure status such as 0xA700/0xA900/0xC000, or no accepted presentation context for
  the SOP class), ``refused`` (the association was rejected, with the result, source and
  reason of PS3.8 9.3.4, or an A-ABORT from the peer) and ``unreachable`` (no TCP
  connection, a TLS handshake that failed, a step that timed out, a connection dropped).
  Once the association is gone, the datasets after it are ``unreachable`` with a detail
  starting "not sent:". An abort after the peer received a dataset may still have stored
  it: the same SOP Instance UID sent again is the same instance to the receiver, which is
  what makes a retry safe. ``detail`` names codes and AE titles, never a value of the
  dataset (it holds the real Patient ID): it may be logged and recorded.
* ``request_commitment`` is the Storage Commitment Push Model SCU (PS3.4 J): an N-ACTION
  (action type 1) with a fresh random Transaction UID and the Referenced SOP Sequence, then
  it waits for the N-EVENT-REPORT, on the same association or on a new one that the peer
  opens to our own listener (Orthanc does the latter, proposing the SCP role of the SOP
  class for itself: the listener accepts the context with SCU and SCP role selection). The
  listener runs only for the call; it takes associations only when called by our AE title
  and calling from the destination's AE title, and a report counts only when it carries
  this call's Transaction UID (122 random bits: a third party on the network cannot guess
  it) and only for the instances asked about. Event type 1: all committed; 2: the Failed
  SOP Sequence names the others with their Failure Reason (e.g. 0x0112 no such object).
  An instance the report does not name is neither committed nor failed: it stays pending.
  The requesting association stays open ``SAME_ASSOCIATION_GRACE_S`` after the N-ACTION
  answer, then the listener alone waits. The listener's port is the call's: two calls on
  one port must not overlap (the second fails at once, "cannot listen"); the caller
  serialises them. Whatever a peer sends on it is answered with a status (0x0110
  undecodable, 0x0119 another transaction, 0x0112 another SOP class) and never raises.
* ``echo`` is a C-ECHO (Verification SOP Class) to check the link and the AE titles
  without sending anything: ``ok``, ``failed`` (a non-success status, or no accepted
  context), ``refused``, ``unreachable``, as for a store.
* Timeouts: every step is bounded by the destination's ``timeout_s`` (TCP connect, A-ASSOCIATE,
  each DIMSE exchange, the network idle time); the wait for the report by ``timeout_s`` of
  the call (a host name is resolved by the system, without a bound of ours). All three
  block: the daemon's sink calls them in a thread
  (``asyncio.to_thread``), never on the event loop.
* TLS (PS3.15 B.1, "Basic TLS Secure Transport Connection Profile"): a destination with
  ``tls_ca`` or ``tls_cert`` is reached over TLS, its certificate checked against ``tls_ca``
  (the system's CAs when absent) and its host name; ``tls_cert``/``tls_key`` are our client
  certificate. The commitment listener of such a destination is TLS too, with the same
  certificate, and requires the peer's certificate signed by ``tls_ca`` (which the config
  requires then, with ``tls_cert`` and ``tls_key``).

pynetdicom logs through the standard ``logging`` module (logger ``pynetdicom``); at INFO it
names AE titles, addresses, message ids and statuses, not dataset values.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import ssl
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated names
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
    Verification,
)
from pynetdicom.status import code_to_category
from pynetdicom.transport import AddressInformation, AssociationSocket

from iortd.audit.dicom import IMPLEMENTATION_VERSION, uid_for
from iortd.audit.dicom_config import (
    Destination,
    DestinationError,
    parse_ae_title,
    parse_destinations,
    parse_listen,
)

__all__ = [
    "TRANSFER_SYNTAXES",
    "CommitOutcome",
    "Destination",
    "DestinationError",
    "EchoOutcome",
    "StoreOutcome",
    "echo",
    "parse_ae_title",
    "parse_destinations",
    "parse_listen",
    "request_commitment",
    "store",
]

# Proposed for every SOP class, in this order: Explicit VR Little Endian first (the bytes
# iort-audit export writes), Implicit VR Little Endian (the DICOM default every SCP takes).
TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
IMPLEMENTATION_CLASS_UID = uid_for("implementation", "iortd")
# How long the requesting association stays open after the N-ACTION answer, for a peer that
# reports on it; after that it is released and the listener alone waits.
SAME_ASSOCIATION_GRACE_S = 3.0


@dataclass(frozen=True, slots=True)
class StoreOutcome:
    """One instance's C-STORE. ``outcome``: stored | warning | failed | refused | unreachable."""

    sop_instance_uid: str
    outcome: str
    status: int | None
    detail: str


@dataclass(frozen=True, slots=True)
class CommitOutcome:
    """The answer to one Storage Commitment request.

    ``outcome``: ``reported`` (an N-EVENT-REPORT came: see ``committed`` and ``failed``),
    ``no-report`` (none within the call's timeout: the instances are still pending),
    ``failed`` (the N-ACTION was answered with a failure status, or our listener could not
    be started), ``refused`` (association rejected or aborted), ``unreachable``."""

    transaction_uid: str
    committed: tuple[str, ...]
    failed: tuple[tuple[str, int], ...]
    detail: str
    outcome: str = "reported"


# --- associations --------------------------------------------------------------------------


def _client_tls(dest: Destination) -> tuple[ssl.SSLContext, str] | None:
    if not dest.tls:
        return None
    ctx = ssl.create_default_context(cafile=None if dest.tls_ca is None else str(dest.tls_ca))
    if dest.tls_cert is not None and dest.tls_key is not None:
        ctx.load_cert_chain(str(dest.tls_cert), str(dest.tls_key))
    return ctx, dest.host


def _server_tls(dest: Destination) -> ssl.SSLContext | None:
    if not dest.tls or dest.tls_cert is None or dest.tls_key is None:
        return None
    ctx = ssl.create_default_context(
        ssl.Purpose.CLIENT_AUTH, cafile=None if dest.tls_ca is None else str(dest.tls_ca)
    )
    ctx.load_cert_chain(str(dest.tls_cert), str(dest.tls_key))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _Socket(AssociationSocket):
    """pynetdicom 3.0.4 closes a socket only when its shutdown() succeeds, which it never
    does on a connection that failed: every refused connection leaked a socket (a
    ResourceWarning). Fixed upstream by pydicom/pynetdicom#999 (issue #979), after 3.0.4;
    drop this when the pin moves past it."""

    def _shutdown_socket(self) -> None:
        sock = self.socket
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


class _AE(AE):
    def _create_socket(
        self, assoc: Association, address: AddressInformation, tls_args: Any
    ) -> AssociationSocket:
        sock = _Socket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


def _ae(calling_ae: str, timeout_s: float) -> AE:
    ae = _AE(ae_title=calling_ae)
    # The implementation the peer logs: iortd's, as in the file meta of our instances.
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION
    ae.connection_timeout = timeout_s
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    return ae


def _why_not(assoc: Association, dest: Destination, watch: _Watch) -> tuple[str, str]:
    """(outcome, detail) of an association that was not established."""
    peer = f"{dest.ae_title} at {dest.host}:{dest.port}"
    p = assoc.acceptor.primitive
    if assoc.is_rejected and p is not None:
        return "refused", (
            f"association rejected by {peer}: {p.reason_str.lower()} "
            f"(result {p.result} {p.result_str.lower()}, source {p.result_source} "
            f"{p.source_str.lower()}, reason {p.diagnostic})"
        )
    if assoc.is_aborted and p is not None and p.result == 0:
        return "failed", (
            f"{peer} accepted none of the presentation contexts proposed (its SOP classes "
            "and transfer syntaxes): the association was aborted; the peer must accept them "
            "(docs/dicom-conformance.md)"
        )
    if watch.peer_aborted:
        return "refused", f"association aborted by {peer} (A-ABORT) before it was accepted"
    if not watch.opened:
        return "unreachable", (
            f"no connection to {dest.host}:{dest.port} (refused, unreachable, no answer "
            f"within {dest.timeout_s:g} s, or the TLS handshake failed)"
        )
    return "unreachable", f"no answer to the association request from {peer} within " + (
        f"{dest.timeout_s:g} s"
    )


class _Watch:
    """What happened on one association's connection, from pynetdicom's notifications: was
    a TCP connection made, did the peer send an A-ABORT. (pynetdicom marks its own abort
    after a timeout and a dropped connection as "aborted" too.)"""

    def __init__(self) -> None:
        self.opened = False
        self.peer_aborted = False

    def handlers(self) -> list[Any]:
        return [(evt.EVT_CONN_OPEN, self._open), (evt.EVT_PDU_RECV, self._pdu)]

    def _open(self, _event: Any) -> None:
        self.opened = True

    def _pdu(self, event: Any) -> None:
        if isinstance(getattr(event, "pdu", None), A_ABORT_RQ):
            self.peer_aborted = True


def _associate(
    ae: AE, dest: Destination, watch: _Watch, handlers: list[Any] | None = None
) -> tuple[Association | None, str, str]:
    try:
        tls = _client_tls(dest)
    except (OSError, ssl.SSLError) as exc:
        return None, "unreachable", f"TLS files of destination {dest.name} unusable: {exc}"
    bound = [*(handlers or []), *watch.handlers()]
    try:
        assoc = ae.associate(
            dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls, evt_handlers=bound
        )
    except (OSError, ssl.SSLError) as exc:
        return None, "unreachable", f"no connection to {dest.host}:{dest.port}: {exc}"
    if assoc.is_established:
        return assoc, "", ""
    outcome, detail = _why_not(assoc, dest, watch)
    return None, outcome, detail


def _status_outcome(code: int) -> str:
    category = code_to_category(code)
    if category == "Success":
        return "stored"
    if category == "Warning":
        return "warning"
    return "failed"


def store(calling_ae: str, dest: Destination, datasets: Sequence[Dataset]) -> list[StoreOutcome]:
    """C-STORE ``datasets`` to ``dest`` over one association (blocking; see the module's
    contract). Each dataset needs its SOP Class/Instance UIDs and a file meta with a
    Transfer Syntax UID (what ``handoff_instances`` gives)."""
    uids = [str(ds.get("SOPInstanceUID", "")) for ds in datasets]
    if not datasets:
        return []
    ae = _ae(calling_ae, dest.timeout_s)
    for sop_class in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
        ae.add_requested_context(sop_class, list(TRANSFER_SYNTAXES))
    watch = _Watch()
    try:
        assoc, outcome, detail = _associate(ae, dest, watch)
        if assoc is None:
            return [StoreOutcome(u, outcome, None, detail) for u in uids]
        out: list[StoreOutcome] = []
        try:
            for n, ds in enumerate(datasets):
                one = _store_one(assoc, ds, uids[n], dest, watch)
                out.append(one)
                if one.outcome in ("refused", "unreachable") or not assoc.is_established:
                    # the association is gone: the rest were not sent
                    why = one.detail if one.status is None else "the association ended"
                    out += [
                        StoreOutcome(u, "unreachable", None, f"not sent: {why}")
                        for u in uids[n + 1 :]
                    ]
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        return out
    finally:
        ae.shutdown()


def _lost(dest: Destination, watch: _Watch, elapsed: float) -> tuple[str, str]:
    """(outcome, detail) of an exchange that got no answer."""
    if watch.peer_aborted:
        return "refused", f"association aborted by {dest.ae_title} (A-ABORT) during the exchange"
    if elapsed >= dest.timeout_s * 0.95:
        return "unreachable", (
            f"no answer from {dest.ae_title} within {dest.timeout_s:g} s: the association was "
            "aborted"
        )
    return "unreachable", f"the connection to {dest.ae_title} was lost during the exchange"


def _store_one(
    assoc: Association, ds: Dataset, uid: str, dest: Destination, watch: _Watch
) -> StoreOutcome:
    t0 = time.monotonic()
    try:
        rsp = assoc.send_c_store(ds)
    except ValueError as exc:
        # No accepted presentation context for the SOP class (or a dataset that cannot be
        # encoded in the accepted transfer syntax): nothing went on the wire for it.
        return StoreOutcome(
            uid,
            "failed",
            None,
            f"not sent: {dest.ae_title} accepted no presentation context for SOP class "
            f"{ds.SOPClassUID} ({type(exc).__name__})",
        )
    except AttributeError as exc:
        return StoreOutcome(uid, "failed", None, f"not sent: not a complete instance ({exc})")
    if "Status" not in rsp:
        outcome, detail = _lost(dest, watch, time.monotonic() - t0)
        return StoreOutcome(uid, outcome, None, detail)
    code = int(rsp.Status)
    result = _status_outcome(code)
    text = {"stored": "stored", "warning": "stored with a warning", "failed": "failed"}[result]
    detail = f"C-STORE {text}: status 0x{code:04X}"
    detail += "".join(f" ({m})" for lo, hi, m in _MEANINGS if lo <= code <= hi)
    # The peer's Error Comment is free text that may repeat the Patient ID; what is
    # recorded goes into the audit log and onto MQTT: never copied, said to exist.
    if "ErrorComment" in rsp:
        detail += " [Error Comment withheld]"
    return StoreOutcome(uid, result, code, detail)


# PS3.4 B.2.3: the C-STORE statuses with a standard meaning (low, high, meaning).
_MEANINGS = (
    (0xA700, 0xA7FF, "refused: out of resources"),
    (0xA900, 0xA9FF, "error: data set does not match SOP class"),
    (0xC000, 0xCFFF, "error: cannot understand"),
    *((c, c, m) for c, m in ((0xB000, "coercion"), (0xB006, "elements discarded"))),
)


@dataclass(frozen=True, slots=True)
class EchoOutcome:
    """A C-ECHO: ``outcome`` ok | failed | refused | unreachable, as for a store."""

    outcome: str
    status: int | None
    detail: str


def echo(calling_ae: str, dest: Destination) -> EchoOutcome:
    """C-ECHO (Verification SOP Class, PS3.4 A) to ``dest``: is the link up and are we
    accepted, without sending anything (blocking, every step bounded by ``timeout_s``)."""
    ae = _ae(calling_ae, dest.timeout_s)
    ae.add_requested_context(Verification, list(TRANSFER_SYNTAXES))
    watch = _Watch()
    try:
        assoc, outcome, detail = _associate(ae, dest, watch)
        if assoc is None:
            return EchoOutcome(outcome, None, detail)
        t0 = time.monotonic()
        try:
            rsp = assoc.send_c_echo()
        finally:
            if assoc.is_established:
                assoc.release()
        if "Status" not in rsp:
            outcome, detail = _lost(dest, watch, time.monotonic() - t0)
            return EchoOutcome(outcome, None, detail)
        code = int(rsp.Status)
        ok = code_to_category(code) == "Success"
        peer = f"{dest.ae_title} at {dest.host}:{dest.port}"
        return EchoOutcome(
            "ok" if ok else "failed", code, f"C-ECHO status 0x{code:04X} from {peer}"
        )
    finally:
        ae.shutdown()


# --- storage commitment --------------------------------------------------------------------


def _transaction_uid() -> str:
    return f"2.25.{uuid.uuid4().int}"  # 122 random bits (os.urandom), PS3.5 B.2


def _action_info(transaction_uid: str, refs: Sequence[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


@dataclass(frozen=True, slots=True)
class _Report:
    """An N-EVENT-REPORT of our transaction, read: the instances asked about only."""

    event_type: int
    committed: tuple[str, ...]
    failed: tuple[tuple[str, int], ...]
    where: str


def _uids(info: Dataset, keyword: str) -> list[tuple[str, Any]]:
    """(SOP Instance UID, Failure Reason or None) of each item of a sequence; raises on
    anything that is not a sequence of items with UIDs (a broken report)."""
    out = []
    for item in info.get(keyword) or []:
        uid = item.ReferencedSOPInstanceUID
        if not isinstance(uid, str):
            raise TypeError(f"{keyword}: an item without a SOP Instance UID")
        out.append((uid, item.get("FailureReason")))
    return out


def _read(event_type: int, info: Dataset, asked: frozenset[str], where: str) -> _Report:
    committed: list[str] = []
    failed: list[tuple[str, int]] = []
    for uid, _ in _uids(info, "ReferencedSOPSequence"):
        if uid in asked and uid not in committed:
            committed.append(uid)
    for uid, reason in _uids(info, "FailedSOPSequence"):
        code = 0x0110 if reason is None else int(reason)
        if not 0 <= code <= 0xFFFF:
            raise ValueError("Failure Reason out of range")
        if uid in asked and uid not in committed and all(uid != f for f, _ in failed):
            failed.append((uid, code))
    return _Report(event_type, tuple(committed), tuple(failed), where)


def _make_handler(
    transaction_uid: str, asked: frozenset[str], reports: queue.Queue[_Report], where: str
) -> Any:
    # Runs on pynetdicom's thread for the association: whatever a peer sends, it answers
    # with a status and never raises; only a well-formed report of ours is passed on.
    def on_report(event: Any) -> tuple[int, Dataset | None]:
        req = event.request
        if str(req.AffectedSOPClassUID) != StorageCommitmentPushModel:
            return 0x0112, None  # No such SOP instance (of a class we do not serve)
        try:
            info = event.event_information
            if str(info.get("TransactionUID", "")) != transaction_uid:
                return 0x0119, None  # not a transaction of ours (class-instance conflict)
            report = _read(int(req.EventTypeID or 0), info, asked, where)
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError):
            return 0x0110, None  # processing failure: an undecodable report
        reports.put(report)
        return 0x0000, None

    return on_report


def _outcome(report: _Report, asked: frozenset[str], transaction_uid: str) -> CommitOutcome:
    committed, failed = report.committed, report.failed
    pending = len(asked) - len(committed) - len(failed)
    detail = (
        f"N-EVENT-REPORT event type {report.event_type} ({report.where}): "
        f"{len(committed)} committed, {len(failed)} failed"
    )
    if failed:
        detail += " (" + ", ".join(f"reason 0x{r:04X}" for _, r in failed) + ")"
    if pending:
        detail += f", {pending} not named in the report (still pending)"
    return CommitOutcome(transaction_uid, committed, failed, detail)


def request_commitment(
    calling_ae: str,
    dest: Destination,
    refs: Sequence[tuple[str, str]],
    *,
    listen_host: str,
    listen_port: int,
    timeout_s: float,
) -> CommitOutcome:
    """Ask ``dest`` to commit ``refs`` ((SOP Class UID, SOP Instance UID) pairs) and wait up
    to ``timeout_s`` for its N-EVENT-REPORT, listening on ``listen_host:listen_port`` as
    ``calling_ae`` for a peer that reports on a new association (blocking)."""
    tuid = _transaction_uid()
    if not refs:
        return CommitOutcome(tuid, (), (), "nothing to commit", "reported")
    reports: queue.Queue[_Report] = queue.Queue()
    listener = _ae(calling_ae, dest.timeout_s)
    listener.require_called_aet = True
    listener.require_calling_aet = [dest.ae_title]
    listener.add_supported_context(
        StorageCommitmentPushModel, list(TRANSFER_SYNTAXES), scu_role=True, scp_role=True
    )
    asked = frozenset(uid for _, uid in refs)
    new_assoc = _make_handler(tuid, asked, reports, "on a new association")
    try:
        server = listener.start_server(
            (listen_host, listen_port),
            block=False,
            ssl_context=_server_tls(dest),
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, new_assoc)],
        )
    except (OSError, ssl.SSLError) as exc:
        return CommitOutcome(
            tuid, (), (), f"cannot listen on {listen_host}:{listen_port}: {exc}", "failed"
        )
    try:
        return _commit(calling_ae, dest, refs, tuid, reports, timeout_s)
    finally:
        if server is not None:
            server.shutdown()
        listener.shutdown()


def _commit(
    calling_ae: str,
    dest: Destination,
    refs: Sequence[tuple[str, str]],
    tuid: str,
    reports: queue.Queue[_Report],
    timeout_s: float,
) -> CommitOutcome:
    ae = _ae(calling_ae, dest.timeout_s)
    ae.add_requested_context(StorageCommitmentPushModel, list(TRANSFER_SYNTAXES))
    asked = frozenset(uid for _, uid in refs)
    same = _make_handler(tuid, asked, reports, "on the same association")
    watch = _Watch()
    try:
        assoc, outcome, detail = _associate(ae, dest, watch, [(evt.EVT_N_EVENT_REPORT, same)])
        if assoc is None:
            return CommitOutcome(tuid, (), (), detail, outcome)
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        try:
            status, _ = assoc.send_n_action(
                _action_info(tuid, refs),
                1,
                StorageCommitmentPushModel,
                StorageCommitmentPushModelInstance,
            )
            if "Status" not in status:
                outcome, detail = _lost(dest, watch, time.monotonic() - t0)
                return CommitOutcome(tuid, (), (), f"N-ACTION: {detail}", outcome)
            code = int(status.Status)
            if code_to_category(code) != "Success":
                return CommitOutcome(
                    tuid,
                    (),
                    (),
                    f"N-ACTION refused by {dest.ae_title}: status 0x{code:04X}",
                    "failed",
                )
            with contextlib.suppress(queue.Empty):
                grace = min(SAME_ASSOCIATION_GRACE_S, max(deadline - time.monotonic(), 0.0))
                return _outcome(reports.get(timeout=grace), asked, tuid)
        finally:
            if assoc.is_established:
                assoc.release()
        with contextlib.suppress(queue.Empty):
            return _outcome(reports.get(timeout=max(deadline - time.monotonic(), 0.0)), asked, tuid)
        return CommitOutcome(
            tuid,
            (),
            (),
            f"no N-EVENT-REPORT from {dest.ae_title} within {timeout_s:g} s: still pending",
            "no-report",
        )
    finally:
        ae.shutdown()
