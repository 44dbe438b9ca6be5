"""Real DICOM peers for the hand-off tests (issue 23): Orthanc and dcmtk's storescp, each
started by the test on free loopback ports with its own configuration and storage, tethered
(kernel/reaper.py: it dies with the test process, however that dies), waited for until it
answers, and stopped by PID. Never the system service the Debian package installs.

Orthanc 1.10 (Debian ``orthanc``): ``Orthanc CONFIG.json``; its REST API on an HTTP port
(``GET /system`` answers once it is up), DICOM on another. Our SCU must be listed in
``DicomModalities`` for Storage Commitment: Orthanc sends its N-EVENT-REPORT to that AE's
host and port on a new association. storescp (Debian ``dcmtk``): ``storescp -aet AET -od
DIR PORT`` writes each instance it receives as ``<modality prefix>.<SOP Instance UID>``.

Neither can be bound to loopback alone (Orthanc 1.10 and storescp 3.6.7 have no option for
it): they listen on every interface for the seconds a test runs, on a random free port.
Orthanc is told to take stores only from the modalities the test lists, from their host.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlscerts import _ca, _leaf, _write_cert, _write_key

from iortd.kernel.reaper import Tether

START_BOUND_S = 30.0  # Orthanc starts in ~0.2 s here; a loaded 2-core machine is slower
STOP_BOUND_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class DicomTls:
    """A CA and two certificates it signed, each good for both TLS client and server (a
    DICOM AE that sends and also listens for Storage Commitment reports uses one
    certificate both ways), for 127.0.0.1 and localhost."""

    ca: Path
    peer_cert: Path
    peer_key: Path
    our_cert: Path
    our_key: Path


def dicom_tls(directory: Path) -> DicomTls:
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ca("iortd DICOM test CA")
    files: list[Path] = []
    for cn in ("dicom-peer", "iortd-or-7"):
        cert, key = _leaf(cn, ca, ca_key, server=True, client=True, days=1)
        files.append(_write_cert(directory / f"{cn}.pem", cert))
        files.append(_write_key(directory / f"{cn}.key", key))
    return DicomTls(_write_cert(directory / "ca.pem", ca), *files)


def _stop(proc: subprocess.Popen[bytes], tether: Tether) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_BOUND_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_BOUND_S)
    tether.close()


def _tail(path: Path) -> str:
    try:
        return "\n".join(path.read_text("utf-8", "replace").splitlines()[-15:])
    except OSError:
        return "(no log)"


@dataclass
class Orthanc:
    base: Path
    aet: str
    dicom_port: int
    http_port: int
    proc: subprocess.Popen[bytes]
    tether: Tether
    log: Path

    @classmethod
    def start(
        cls,
        base: Path,
        *,
        aet: str = "ORTHANC_IT",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        lua: str | None = None,
        tls: DicomTls | None = None,
    ) -> Orthanc:
        """``modalities``: name -> (AE title, host, port) of the SCUs it may answer;
        ``lua``: a Lua script (e.g. a ReceivedInstanceFilter that refuses some stores);
        ``tls``: DICOM over TLS only, with ``peer_cert``, requiring a client certificate
        signed by ``ca`` (Orthanc's DicomTls* options, also for its own associations)."""
        exe = shutil.which("Orthanc")
        if exe is None:
            raise RuntimeError("Orthanc is not installed: apt-get install orthanc (Debian 12)")
        base.mkdir(parents=True, exist_ok=True)
        (base / "db").mkdir(exist_ok=True)
        dicom_port, http_port = free_port(), free_port()
        config: dict[str, Any] = {
            "Name": "iortd-tests",
            "StorageDirectory": str(base / "db"),
            "IndexDirectory": str(base / "db"),
            "HttpPort": http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomPort": dicom_port,
            "DicomAet": aet,
            "DicomCheckCalledAet": True,
            # Orthanc 1.10 has no bind address: its DICOM port listens on every interface
            # while a test runs. Only the modalities listed, from their own host, may
            # store or echo (and its REST API answers loopback only, RemoteAccessAllowed).
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowEcho": False,
            "DicomCheckModalityHost": True,
            # the object form: with TLS, Orthanc opens its own associations to a modality
            # (its commitment reports) over TLS only when the entry says UseDicomTls
            "DicomModalities": {
                k: {"AET": v[0], "Host": v[1], "Port": v[2], "UseDicomTls": tls is not None}
                for k, v in (modalities or {}).items()
            },
            "Plugins": [],
            "StorageCompression": False,
            "ConcurrentJobs": 1,
            "HttpDescribeErrors": True,
        }
        if tls is not None:
            config["DicomTlsEnabled"] = True
            config["DicomTlsCertificate"] = str(tls.peer_cert)
            config["DicomTlsPrivateKey"] = str(tls.peer_key)
            config["DicomTlsTrustedCertificates"] = str(tls.ca)
            config["DicomTlsRemoteCertificateRequired"] = True
        if lua is not None:
            (base / "filter.lua").write_text(lua, "utf-8")
            config["LuaScripts"] = [str(base / "filter.lua")]
        (base / "orthanc.json").write_text(json.dumps(config, indent=2), "utf-8")
        log = base / "orthanc.log"
        tether = Tether("orthanc")
        with log.open("wb") as out:
            proc = subprocess.Popen(
                tether.argv([exe, str(base / "orthanc.json")]),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                pass_fds=tether.pass_fds,
                cwd=base,
            )
        tether.started()
        o = cls(base, aet, dicom_port, http_port, proc, tether, log)
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                o.stop()
                raise RuntimeError(f"Orthanc exited ({proc.returncode}):\n{_tail(log)}")
            with contextlib.suppress(OSError):
                o.rest("/system", timeout=1.0)
                return o
            if time.monotonic() - t0 > START_BOUND_S:
                o.stop()
                raise RuntimeError(
                    f"Orthanc did not answer on port {http_port} within {START_BOUND_S} s:\n"
                    f"{_tail(log)}"
                )
            time.sleep(0.05)  # a bounded poll of its REST API (it has no readiness signal)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def rest(self, path: str, body: Any = None, timeout: float = 10.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url(path), data=data)  # noqa: S310 - our loopback
        with urllib.request.urlopen(req, timeout=timeout) as rsp:  # noqa: S310 - ditto
            raw = rsp.read()
        return raw if path.endswith("/file") else json.loads(raw)

    def instance_id(self, sop_instance_uid: str) -> str | None:
        """Orthanc's id of the instance with that SOP Instance UID, or None."""
        found = self.rest(
            "/tools/find",
            {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}},
        )
        return str(found[0]) if found else None

    def stop(self) -> None:
        # SIGKILL: a graceful stop takes Orthanc 2-3 s, and this instance's database is
        # thrown away with its directory.
        if self.proc.poll() is None:
            self.proc.kill()
        _stop(self.proc, self.tether)


@dataclass
class StoreScp:
    aet: str
    port: int
    out: Path
    proc: subprocess.Popen[bytes]
    tether: Tether
    log: Path

    @classmethod
    def start(cls, base: Path, *, aet: str = "IORT_SCP", extra: tuple[str, ...] = ()) -> StoreScp:
        """``extra``: storescp's own options (``--abort-during``, ``--sleep-during S``)."""
        exe = shutil.which("storescp")
        if exe is None:
            raise RuntimeError("storescp is not installed: apt-get install dcmtk (Debian 12)")
        out = base / "received"
        out.mkdir(parents=True, exist_ok=True)
        port = free_port()
        log = base / "storescp.log"
        tether = Tether("storescp")
        with log.open("wb") as f:
            proc = subprocess.Popen(
                tether.argv([exe, "-aet", aet, *extra, "-od", str(out), str(port)]),
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                pass_fds=tether.pass_fds,
            )
        tether.started()
        scp = cls(aet, port, out, proc, tether, log)
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                scp.stop()
                raise RuntimeError(f"storescp exited ({proc.returncode}):\n{_tail(log)}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=1.0),
            ):
                return scp
            if time.monotonic() - t0 > START_BOUND_S:
                scp.stop()
                raise RuntimeError(f"storescp did not listen within {START_BOUND_S} s")
            time.sleep(0.02)  # a bounded poll of its port (it has no readiness signal)

    def stop(self) -> None:
        _stop(self.proc, self.tether)
