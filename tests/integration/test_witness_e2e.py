"""`iort-witness` as a real process on a free loopback port, spoken to by the client the
daemon will use (auditlog/witness_client.submit) over real HTTP: accept, extend, rollback,
fork, SIGKILL between two submissions and a restart on the same state.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from iortd.auditlog.cosignature import CosignerVerifier, verify_cosignature
from iortd.auditlog.merkle import consistency_proof, leaf_hash, root_of
from iortd.auditlog.note import Signer, generate_keypair
from iortd.auditlog.signed_note import open_note
from iortd.auditlog.tlog_checkpoint import CheckpointBody, sign_checkpoint
from iortd.auditlog.witness_client import Conflict, Cosigned, Refused, request_body, submit
from iortd.witness.store import Store

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
ORIGIN = "iortd/test-site/or-7/0a1b2c3d"
TIMEOUT_S = 5.0
# What the witness's operational log may say about a request (docs/witness.md).
LOG_KEYS = {"event", "level", "timestamp", "origin", "size", "outcome", "status"}


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    url: str


async def serve(config: Path, err: Path, within_s: float = 15) -> Served:
    with err.open("ab") as stderr:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "iort-witness"), "serve", "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=stderr,
        )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(within_s):
            line = (await proc.stdout.readline()).decode()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"iort-witness not serving within {within_s} s; see {err}") from None
    assert line.startswith("iort-witness: serving "), f"{line!r}; see {err}"
    return Served(proc, line.split()[2])


async def raw_http(url: str, method: str, path: str, body: bytes = b"") -> tuple[int, str, bytes]:
    """A plain HTTP/1.1 exchange over asyncio streams (the project has no HTTP client):
    status, Content-Type exactly as sent, body."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    async with asyncio.timeout(TIMEOUT_S):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        raw = await reader.read()
        writer.close()
        await writer.wait_closed()
    head, _, payload = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    ctype = next(
        (x.split(":", 1)[1].strip() for x in lines if x.lower().startswith("content-type:")), ""
    )
    return int(lines[0].split(" ")[1]), ctype, payload


async def get(url: str, path: str) -> tuple[int, bytes]:
    status, _, payload = await raw_http(url, "GET", path)
    return status, payload


def leaves(n: int, tag: str = "") -> list[bytes]:
    return [leaf_hash(f"entry {i}{tag if i >= 4 else ''}".encode()) for i in range(n)]


def note(signer: Signer, lv: list[bytes], size: int) -> str:
    return sign_checkpoint(CheckpointBody(ORIGIN, size, root_of(lv[:size])), signer)


def body(lv: list[bytes], size: int) -> CheckpointBody:
    return CheckpointBody(ORIGIN, size, root_of(lv[:size]))


async def test_witness_serves_refuses_and_survives_sigkill(tmp_path: Path) -> None:
    keygen = await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "iort-witness"), "keygen", "witness.test/w1", "--out", str(tmp_path / "w.key")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert keygen.returncode == 0, keygen.stderr
    vkey = (tmp_path / "w.pub").read_text("ascii").strip()
    assert vkey in keygen.stdout
    log_key = generate_keypair("iortd-or-7")
    config = tmp_path / "witness.toml"
    config.write_text(
        f'[witness]\nlisten = "127.0.0.1:0"\nkey_file = "w.key"\ndatabase = "state.sqlite"\n'
        "max_body_bytes = 4096\n"
        f'[[logs]]\norigin = "{ORIGIN}"\nvkeys = ["{log_key.verifier.text}"]\n',
        "utf-8",
    )
    err = tmp_path / "witness.log"
    lv, forked = leaves(40), leaves(40, " forked")

    w = await serve(config, err)
    try:
        got = await submit(w.url, 0, [], note(log_key, lv, 5), TIMEOUT_S)
        assert isinstance(got, Cosigned), got
        verify_cosignature(vkey, body(lv, 5), got.lines[0])
        got = await submit(w.url, 5, consistency_proof(lv, 5, 9), note(log_key, lv, 9), TIMEOUT_S)
        assert isinstance(got, Cosigned), got
        verify_cosignature(vkey, body(lv, 9), got.lines[0])
        # Rollback: a smaller checkpoint from what the log thinks the witness holds.
        assert await submit(w.url, 5, [], note(log_key, lv, 5), TIMEOUT_S) == Conflict(9)
        # The 409's Content-Type exactly as the specification says (Go's client compares it).
        stale = request_body(5, [], note(log_key, lv, 5))
        assert await raw_http(w.url, "POST", "/add-checkpoint", stale) == (
            409,
            "text/x.tlog.size",
            b"9\n",
        )
        # Fork: the same size, other entries.
        got = await submit(w.url, 9, [], note(log_key, forked, 9), TIMEOUT_S)
        assert isinstance(got, Refused)
        assert got.status == 422
        # Not a log the witness knows; not its key.
        other = sign_checkpoint(CheckpointBody("elsewhere/x", 1, lv[0]), log_key)
        assert (await submit(w.url, 0, [], other, TIMEOUT_S)) == Refused(404, "unknown log origin")
        stranger = note(generate_keypair("iortd-or-7"), lv, 12)
        got = await submit(w.url, 9, consistency_proof(lv, 9, 12), stranger, TIMEOUT_S)
        assert isinstance(got, Refused)
        assert got.status == 403
        too_big = "x" * 6000  # above max_body_bytes, within any socket buffer
        got = await submit(w.url, 9, [], note(log_key, lv, 12) + too_big, TIMEOUT_S)
        assert isinstance(got, Refused)
        assert got.status == 413
    finally:
        w.proc.send_signal(signal.SIGKILL)
        await w.proc.wait()

    w = await serve(config, err)
    try:
        # State survived: the witness still holds 9, and still refuses the fork.
        assert await submit(w.url, 0, [], note(log_key, lv, 12), TIMEOUT_S) == Conflict(9)
        got = await submit(w.url, 9, [], note(log_key, forked, 9), TIMEOUT_S)
        assert isinstance(got, Refused)
        assert got.status == 422
        got = await submit(w.url, 9, consistency_proof(lv, 9, 12), note(log_key, lv, 12), TIMEOUT_S)
        assert isinstance(got, Cosigned), got
        verify_cosignature(vkey, body(lv, 12), got.lines[0])
        # The monitoring API: the last checkpoint cosigned, log signature and cosignature.
        where = f"/{hashlib.sha256(ORIGIN.encode()).hexdigest()}/checkpoint"
        code, served = await get(w.url, where)
        assert code == 200
        witness_key = CosignerVerifier.parse(vkey)
        assert open_note(served, [witness_key]).text == body(lv, 12).text
        assert open_note(served, [log_key.verifier]).text == body(lv, 12).text
        assert (await get(w.url, f"/{'0' * 64}/checkpoint"))[0] == 404
        assert (await get(w.url, "/add-checkpoint"))[0] == 405
        status = await asyncio.to_thread(
            subprocess.run,
            [str(BIN / "iort-witness"), "status", "--config", str(config)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        # Exit 1: the witness holds evidence of a fork.
        assert status.returncode == 1, status.stderr
        assert f"{ORIGIN}: size 12" in status.stdout
        assert "FORK: the log signed 1 checkpoint(s)" in status.stdout
    finally:
        w.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await w.proc.wait() == 0

    store = Store.open(tmp_path / "state.sqlite", readonly=True)
    history = store.history(ORIGIN)
    store.close()
    assert [h.size for h in history] == [5, 9, 12]
    roots = {h.size: h.root for h in history}
    assert roots == {n: root_of(lv[:n]) for n in (5, 9, 12)}  # never the forked root
    for line in err.read_text("utf-8").splitlines():
        record = json.loads(line)
        if record.get("event") == "checkpoint":
            assert set(record) <= LOG_KEYS, record
