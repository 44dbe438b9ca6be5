"""The hand-off to the hospital against real DICOM servers (issue 23): Orthanc 1.10 and dcmtk's
storescp (tests/integration/dicompeers.py starts them on free loopback ports, one Orthanc for
the module). The instances are those of the committed golden log (audit/dicom_handoff.py)
with a protected-store entry, so the real Patient ID travels, as it would at a site.

- the RT Beams Treatment Record and the Encapsulated PDF arrive; the dataset Orthanc gives
  back over REST equals the one sent (file meta aside) and its metadata names our calling
  AE title;
- Storage Commitment with Orthanc (which reports on a new association to our listener):
  committed; an instance it does not hold: failed, reason 0x0112;
- a wrong called AE title: refused, with the reason; a store the peer refuses (a Lua
  filter): failed, with its status; nobody listening: unreachable;
- storescp receives both files, byte for byte the dataset sent;
- ``iort-audit send`` from a site config: exit 0 with commitment, no patient data printed;
  a tampered log sends nothing (exit 1).
"""

from __future__ import annotations

import io
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from dicompeers import Orthanc, StoreScp, dicom_tls, free_port
from pydicom.dataset import Dataset

from iortd.audit import cli
from iortd.audit.dicom_handoff import handoff_instances
from iortd.audit.dicom_net import Destination, request_commitment, store
from iortd.plan.store import HandOff, save_hand_off

pytestmark = pytest.mark.integration

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "golden-log"
DELIVERY = "or-5-20261206T035245018711Z"
PATIENT_ID = "MRN-5550123"
PLAN_UID = "1.2.826.0.1.3680043.8.498.5550123001"
CALLING = "IORTD_IT"
# The pseudonymous record (no protected store): other UIDs than the hand-off's, and the
# treatment id as Patient ID (even length: Orthanc compares the padded value).
REFUSED_PATIENT = "T-RPT-0002"
# Orthanc refuses what this filter returns false for: the "rejected store" of the issue.
LUA = f"""
function ReceivedInstanceFilter(dicom, origin, info)
  return dicom.PatientID ~= '{REFUSED_PATIENT}'
end
"""


def _store_dir(base: Path, patient_id: str) -> Path:
    store_dir = base / f"protected-{patient_id}"
    save_hand_off(
        store_dir,
        HandOff("T-RPT-0002", "P-RPT-0002", patient_id, PLAN_UID),
        "2026-12-06T03:00:00Z",
    )
    return store_dir


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dicom")


@pytest.fixture(scope="module")
def listen_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def orthanc(base: Path, listen_port: int) -> Iterator[Orthanc]:
    o = Orthanc.start(
        base / "orthanc", modalities={"iortd": (CALLING, "127.0.0.1", listen_port)}, lua=LUA
    )
    yield o
    o.stop()


@pytest.fixture(scope="module")
def instances(base: Path) -> list[Dataset]:
    return handoff_instances(
        FIXTURE / "log",
        DELIVERY,
        what=["record", "report"],
        store_dir=_store_dir(base, PATIENT_ID),
        keyring=None,
        pubkey=FIXTURE / "or-9.pub",
    )


def _dest(o: Orthanc, **over: object) -> Destination:
    fields: dict[str, object] = {
        "name": "pacs",
        "ae_title": o.aet,
        "host": "127.0.0.1",
        "port": o.dicom_port,
        "timeout_s": 20.0,
    }
    fields.update(over)
    return Destination(**fields)  # type: ignore[arg-type]


def _without_meta(ds: Dataset) -> Dataset:
    copy = Dataset(ds)
    copy.file_meta = None  # type: ignore[assignment]
    return copy


def test_record_and_pdf_arrive_equal_and_named_by_our_ae_title(
    orthanc: Orthanc, instances: list[Dataset]
) -> None:
    outcomes = store(CALLING, _dest(orthanc), instances)
    assert [o.outcome for o in outcomes] == ["stored", "stored"], outcomes
    assert [o.status for o in outcomes] == [0, 0]
    assert [o.sop_instance_uid for o in outcomes] == [ds.SOPInstanceUID for ds in instances]
    for sent in instances:
        oid = orthanc.instance_id(sent.SOPInstanceUID)
        assert oid is not None, f"{sent.SOPInstanceUID} not in Orthanc"
        back = pydicom.dcmread(io.BytesIO(orthanc.rest(f"/instances/{oid}/file")))
        assert _without_meta(back) == _without_meta(sent)
        meta = orthanc.rest(f"/instances/{oid}/metadata?expand")
        assert meta["RemoteAET"] == CALLING
        assert meta["CalledAET"] == orthanc.aet
        assert meta["SopClassUid"] == sent.SOPClassUID
        assert back.PatientID == PATIENT_ID, "the protected store's Patient ID travelled"
    # a resend is the same instances: Orthanc still holds one of each
    again = store(CALLING, _dest(orthanc), instances)
    assert [o.outcome for o in again] == ["stored", "stored"]
    found = orthanc.rest("/tools/find", {"Level": "Instance", "Query": {"PatientID": PATIENT_ID}})
    assert len(found) == 2


def test_storage_commitment_round_trip(
    orthanc: Orthanc, instances: list[Dataset], listen_port: int
) -> None:
    assert [o.outcome for o in store(CALLING, _dest(orthanc), instances)] == ["stored"] * 2
    refs = [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in instances]
    t0 = time.monotonic()
    c = request_commitment(
        CALLING,
        _dest(orthanc, commitment=True),
        refs,
        listen_host="127.0.0.1",
        listen_port=listen_port,
        timeout_s=20.0,
    )
    took = time.monotonic() - t0
    assert c.outcome == "reported", c
    assert set(c.committed) == {uid for _, uid in refs}
    assert c.failed == ()
    assert "on a new association" in c.detail, "Orthanc reports on an association of its own"
    assert took < 15.0, f"the report took {took:.1f} s"
    unknown = "2.25.1234567890123456789"
    c2 = request_commitment(
        CALLING,
        _dest(orthanc, commitment=True),
        [*refs, (refs[0][0], unknown)],
        listen_host="127.0.0.1",
        listen_port=listen_port,
        timeout_s=20.0,
    )
    assert c2.outcome == "reported", c2
    assert c2.failed == ((unknown, 0x0112),), "no such object instance"
    assert set(c2.committed) == {uid for _, uid in refs}
    assert c2.transaction_uid != c.transaction_uid
    assert "reason 0x0112" in c2.detail


def test_wrong_called_ae_title_is_refused_with_the_reason(
    orthanc: Orthanc, instances: list[Dataset]
) -> None:
    outcomes = store(CALLING, _dest(orthanc, ae_title="NOT_ORTHANC"), instances)
    assert [o.outcome for o in outcomes] == ["refused", "refused"]
    assert outcomes[0].status is None
    assert "called ae title not recognised" in outcomes[0].detail
    assert "reason 7" in outcomes[0].detail
    assert PATIENT_ID not in outcomes[0].detail


def test_a_store_orthanc_filters_out_is_caught_by_commitment_only(
    orthanc: Orthanc, listen_port: int
) -> None:
    """Orthanc 1.10 answers a C-STORE its ReceivedInstanceFilter refuses with 0x0000 and
    keeps nothing: "stored" is the peer's word; only Storage Commitment finds it missing."""
    refused = handoff_instances(
        FIXTURE / "log",
        DELIVERY,
        what=["record"],
        store_dir=None,
        keyring=None,
    )
    assert refused[0].PatientID == REFUSED_PATIENT
    (o,) = store(CALLING, _dest(orthanc), refused)
    assert (o.outcome, o.status) == ("stored", 0), o
    uid = str(refused[0].SOPInstanceUID)
    assert orthanc.instance_id(uid) is None, "Orthanc did keep it after all"
    c = request_commitment(
        CALLING,
        _dest(orthanc, commitment=True),
        [(str(refused[0].SOPClassUID), uid)],
        listen_host="127.0.0.1",
        listen_port=listen_port,
        timeout_s=20.0,
    )
    assert (c.outcome, c.committed, c.failed) == ("reported", (), ((uid, 0x0112),)), c


def test_tls_both_ways_with_orthanc(base: Path, instances: list[Dataset]) -> None:
    """Orthanc with DICOM TLS requiring client certificates: the instances go over TLS, and
    its commitment report comes back over TLS to our listener (our certificate serves both
    ways); plain DICOM to its TLS port gets no association."""
    tls = dicom_tls(base / "tls")
    listen = free_port()
    o = Orthanc.start(
        base / "orthanc-tls", modalities={"iortd": (CALLING, "127.0.0.1", listen)}, tls=tls
    )
    try:
        dest = _dest(o, tls_ca=tls.ca, tls_cert=tls.our_cert, tls_key=tls.our_key)
        assert [x.outcome for x in store(CALLING, dest, instances)] == ["stored", "stored"]
        c = request_commitment(
            CALLING,
            dest,
            [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in instances],
            listen_host="127.0.0.1",
            listen_port=listen,
            timeout_s=20.0,
        )
        assert (c.outcome, len(c.committed)) == ("reported", 2), c
        plain = store(CALLING, _dest(o, timeout_s=2.0), instances)
        assert [x.outcome for x in plain] == ["unreachable", "unreachable"]
    finally:
        o.stop()


def test_nobody_listening_is_unreachable(instances: list[Dataset]) -> None:
    dest = Destination("gone", "NOBODY", "127.0.0.1", free_port(), timeout_s=5.0)
    outcomes = store(CALLING, dest, instances)
    assert [o.outcome for o in outcomes] == ["unreachable", "unreachable"]
    assert "no connection to 127.0.0.1" in outcomes[0].detail


def test_storescp_receives_both_files(base: Path, instances: list[Dataset]) -> None:
    scp = StoreScp.start(base / "storescp")
    try:
        dest = Destination("scp", scp.aet, "127.0.0.1", scp.port, timeout_s=20.0)
        outcomes = store(CALLING, dest, instances)
    finally:
        scp.stop()
    assert [o.outcome for o in outcomes] == ["stored", "stored"], outcomes
    names = {p.name for p in scp.out.iterdir()}
    record, report = instances
    assert names == {f"RTb.{record.SOPInstanceUID}", f"PDF.{report.SOPInstanceUID}"}
    for sent, prefix in ((record, "RTb"), (report, "PDF")):
        got = pydicom.dcmread(scp.out / f"{prefix}.{sent.SOPInstanceUID}")
        assert _without_meta(got) == _without_meta(sent)


def test_an_abort_and_a_silent_peer(base: Path, instances: list[Dataset]) -> None:
    """storescp --abort-during sends an A-ABORT while it receives the first dataset:
    refused, the second not sent; --sleep-during: no answer within the destination's
    timeout, unreachable, and store returns within that bound."""
    aborting = StoreScp.start(base / "aborting", extra=("--abort-during",))
    silent = StoreScp.start(base / "silent", extra=("--sleep-during", "30"))
    try:
        dest = Destination("scp", "IORT_SCP", "127.0.0.1", aborting.port, timeout_s=20.0)
        first, second = store(CALLING, dest, instances)
        assert (first.outcome, first.status) == ("refused", None), first
        assert "A-ABORT" in first.detail
        assert second.outcome == "unreachable"
        assert second.detail.startswith("not sent:")
        dest = Destination("scp", "IORT_SCP", "127.0.0.1", silent.port, timeout_s=1.0)
        t0 = time.monotonic()
        first, second = store(CALLING, dest, instances)
        took = time.monotonic() - t0
    finally:
        aborting.stop()
        silent.stop()
    assert first.outcome == "unreachable", first
    assert "no answer from IORT_SCP within 1 s" in first.detail
    assert second.detail.startswith("not sent:")
    assert took < 10.0, f"store took {took:.1f} s with a 1 s timeout"


def _site(base: Path, orthanc: Orthanc, listen_port: int, log: Path) -> Path:
    site = base / "site.toml"
    site.write_text(
        f"""
[site]
id = "report-site"
room = "or-9"
[log]
directory = "{log}"
[[sinks]]
type = "dicom"
[sinks.options]
calling_ae = "{CALLING}"
send = ["record", "report"]
when = "termination"
protected_store = "{_store_dir(base, PATIENT_ID)}"
commitment_listen = "127.0.0.1:{listen_port}"
[[sinks.options.destinations]]
name = "pacs"
ae_title = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
commitment = true
timeout_s = 20
""",
        "utf-8",
    )
    return site


def test_iort_audit_send_with_commitment(
    orthanc: Orthanc, base: Path, listen_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    site = _site(base, orthanc, listen_port, FIXTURE / "log")
    argv = ["send", "--delivery", DELIVERY, "--to", "pacs", "--config", str(site)]
    rc = cli.main([*argv, "--pubkey", str(FIXTURE / "or-9.pub")])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert out.count("STORED ") == 2, out
    assert out.count("COMMITTED ") == 2, out
    assert "RT Beams Treatment Record" in out
    assert "Encapsulated PDF" in out
    assert PATIENT_ID not in out + err
    assert PLAN_UID not in out + err


def test_iort_audit_send_refuses_a_tampered_log(
    orthanc: Orthanc, base: Path, listen_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    log = base / "tampered-log"
    shutil.copytree(FIXTURE / "log", log)
    seg = sorted(log.glob("*.jsonl"))[0]
    seg.write_bytes(seg.read_bytes().replace(b'"dose_primary_gy":0.1', b'"dose_primary_gy":0.2', 1))
    site = _site(base, orthanc, listen_port, log)
    before = orthanc.rest("/statistics")["CountInstances"]
    rc = cli.main(["send", "--delivery", DELIVERY, "--to", "pacs", "--config", str(site)])
    out, err = capsys.readouterr()
    assert rc == 1, out + err
    assert "not intact" in err
    assert "sending" not in out
    assert orthanc.rest("/statistics")["CountInstances"] == before
