"""Proof bundles (issue 20, item 2): ``iort-audit prove`` / ``verify-bundle`` over a tree log
the writer makes here, and the range proof against an independent recursive RFC 6962 root.

Every tampering a bundle can suffer is tried: an entry's byte, a proof hash, a note line,
the signature, a dropped entry, a moved range; each must fail naming what.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import random
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from iortd.audit.bundle import BundleError, check_bundle, make_bundle
from iortd.audit.cli import main
from iortd.auditlog.cosignature import CosignerKey
from iortd.auditlog.merkle import ProofError, consistency_proof, inclusion_proof
from iortd.auditlog.merkle_log import leaf_hashes
from iortd.auditlog.note import Signer, generate_keypair, write_keypair
from iortd.auditlog.range_proof import (
    consistency_intervals,
    range_intervals,
    root_from_range,
    subtree_roots,
)
from iortd.auditlog.verify import collect_files
from iortd.auditlog.writer import AuditLog
from iortd.daemon import recovery
from iortd.kernel.timefmt import utc_ts

ORIGIN = "iortd/test-site/or-9/00112233aabbccdd"
DID = "or9-20261206T100000Z"


def mth(leaves: list[bytes]) -> bytes:
    """RFC 6962 §2.1 MTH over leaf hashes, recursively (not merkle.py's code)."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 8, 13, 32, 33])
def test_range_proof_gives_the_rfc6962_root_for_every_range(size: int) -> None:
    leaves = [hashlib.sha256(bytes([i])).digest() for i in range(size)]
    root = mth(leaves)
    for lo in range(size):
        for hi in range(lo + 1, size + 1):
            ivs = range_intervals(lo, hi, size)
            roots = subtree_roots(iter(leaves), ivs)
            proof = [roots[iv] for iv in ivs]
            assert len(proof) <= 2 * size.bit_length()
            assert root_from_range(leaves[lo:hi], lo, size, proof) == root
            if proof:
                with pytest.raises(ProofError):
                    root_from_range(leaves[lo:hi], lo, size, proof[:-1])


async def write_log(directory: Path, signer: Signer) -> None:
    """Entries before, the delivery (with a checkpoint inside it), entries after, and
    two checkpoints after it: a delivery-end one and an interval one."""
    log, _ = await AuditLog.open(directory, origin=ORIGIN, signer=signer, group_commit_s=0.01)
    task = asyncio.create_task(log.run())
    try:
        log.append("daemon_start", {"verifier_key": signer.verifier.text}, durable=True)
        for i in range(20):
            log.append("sample", {"dose_primary_gy": i * 0.5})
        await log.checkpoint("interval")  # the held (older) checkpoint
        log.append("delivery_started", {"preset_gy": 20.0}, delivery_id=DID)
        for i in range(9):
            log.append("sample", {"dose_primary_gy": i * 0.5}, delivery_id=DID)
        await log.checkpoint("interval")
        log.append("delivery_terminated", {"status": "NORMAL"}, delivery_id=DID)
        await log.checkpoint("delivery_end")
        for i in range(6):
            e = log.append("sample", {"dose_primary_gy": i * 0.1})
        await e.committed
        await log.checkpoint("interval")
    finally:
        await asyncio.wait_for(log.close(), 10)
        await asyncio.wait_for(task, 10)


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Signer]:
    d = tmp_path_factory.mktemp("log")
    signer = generate_keypair("or-9")
    asyncio.run(write_log(d / "log", signer))
    write_keypair(signer, d / "keys")
    return d, signer


def bundle_of(logged: tuple[Path, Signer], **kw: Any) -> dict[str, Any]:
    d, signer = logged
    return make_bundle(collect_files([d / "log"]), DID, pubkey=signer.verifier, **kw)


def check(b: dict[str, Any], signer: Signer, **kw: Any) -> str:
    """'' when it verifies, else the error."""
    try:
        check_bundle(json.dumps(b).encode(), signer.verifier, **kw)
    except BundleError as exc:
        return str(exc)
    return ""


def test_a_bundle_from_a_writer_log_verifies_and_shows_both_neighbours(
    logged: tuple[Path, Signer],
) -> None:
    b = bundle_of(logged)
    assert check(b, logged[1]) == ""
    assert b["start"] == b["first_seq"] - 1
    # The delivery-end checkpoint's tree ends at the range: the later one is taken.
    assert b["tree_size"] > b["last_seq"] + 1
    assert len(b["entries"]) == b["last_seq"] - b["first_seq"] + 3


def flip(text: str, at: int) -> str:
    c = "0" if text[at] != "0" else "1"
    return text[:at] + c + text[at + 1 :]


def test_every_tampering_fails_naming_what(logged: tuple[Path, Signer]) -> None:
    signer = logged[1]
    b = bundle_of(logged)
    cases: dict[str, tuple[dict[str, Any], str]] = {}
    for i in (0, 3, len(b["entries"]) - 1):
        t = json.loads(json.dumps(b))
        line = t["entries"][i]
        t["entries"][i] = line.replace('"ts":"2', '"ts":"3', 1)
        assert t["entries"][i] != line
        cases[f"entry {i}"] = (t, f"entry seq {b['start'] + i}")
    for i in range(len(b["range_proof"])):
        t = json.loads(json.dumps(b))
        raw = bytearray(base64.b64decode(t["range_proof"][i]))
        raw[5] ^= 1
        t["range_proof"][i] = base64.b64encode(bytes(raw)).decode()
        cases[f"proof hash {i}"] = (t, "range proof")
    lines = b["checkpoint"].split("\n")
    for i in range(4):  # origin, size, root, head
        t = json.loads(json.dumps(b))
        lines2 = list(lines)
        lines2[i] = flip(lines2[i], 5) if i != 1 else str(int(lines2[i]) + 1)
        t["checkpoint"] = "\n".join(lines2)
        cases[f"note line {i + 1}"] = (t, "checkpoint note")
    t = json.loads(json.dumps(b))
    sig = lines[-2]
    t["checkpoint"] = b["checkpoint"].replace(
        sig, sig[:-6] + ("AAAAA=" if sig[-6] != "A" else "BBBBB=")
    )
    cases["signature"] = (t, "checkpoint note")
    t = json.loads(json.dumps(b))
    del t["entries"][4]
    cases["dropped entry"] = (t, "dropped")
    t = json.loads(json.dumps(b))
    t["first_seq"] += 1
    cases["range moved in"] = (t, "")
    t = json.loads(json.dumps(b))
    t["start"] += 1
    t["first_seq"] += 1
    t["last_seq"] += 1
    cases["range shifted"] = (t, "")
    for what, (t, names) in cases.items():
        got = check(t, signer)
        assert got, f"{what}: the bundle still verified"
        assert names in got, f"{what}: {got!r} does not name {names!r}"


def test_a_range_that_leaves_out_an_entry_of_the_delivery_fails(
    logged: tuple[Path, Signer],
) -> None:
    """Claiming the delivery ends early, with an honest proof: at the checkpoint inside
    it (which names no delivery), and at the sample before that checkpoint (whose
    neighbour, the checkpoint, names none either: the range must end with the delivery's
    end, else the neighbour test alone would pass)."""
    d, signer = logged
    b = bundle_of(logged)
    files = collect_files([d / "log"])

    def reproved(t: dict[str, Any]) -> dict[str, Any]:
        ivs = range_intervals(t["start"], t["start"] + len(t["entries"]), b["tree_size"])
        roots = subtree_roots(leaf_hashes(files, 0, b["tree_size"]), ivs)
        t["range_proof"] = [base64.b64encode(roots[iv]).decode() for iv in ivs]
        return t

    for cut, names in ((1, "does not name the delivery"), (2, "does not end")):
        short = make_bundle(files, DID, pubkey=signer.verifier)
        short["last_seq"] -= cut
        short["entries"] = short["entries"][: len(short["entries"]) - cut]
        got = check(reproved(short), signer)
        assert names in got, got
    # The start moved in by one: the new neighbour (the delivery's first entry) names it.
    late = make_bundle(files, DID, pubkey=signer.verifier)
    late["start"] += 1
    late["first_seq"] += 1
    late["entries"] = late["entries"][1:]
    got = check(reproved(late), signer)
    assert f"entry seq {b['first_seq']}: names the delivery: the range starts earlier" in got


def test_consistency_from_a_held_checkpoint_verifies_and_a_forged_one_fails(
    logged: tuple[Path, Signer],
) -> None:
    d, signer = logged
    notes = [
        orjson.loads(ln)["data"]["note"]
        for p in collect_files([d / "log"])
        for ln in p.read_bytes().splitlines()
        if ln.endswith(b'"type":"checkpoint"}')
    ]
    b = bundle_of(logged, held=notes[0])
    assert check(b, signer) == ""
    assert b["consistency"]["proof"]
    t = json.loads(json.dumps(b))
    raw = bytearray(base64.b64decode(t["consistency"]["proof"][0]))
    raw[0] ^= 1
    t["consistency"]["proof"][0] = base64.b64encode(bytes(raw)).decode()
    assert "consistency proof" in check(t, signer)
    # A fork: an older checkpoint of the same origin and size with another root, signed.
    body = notes[0].split("\n\n")[0].split("\n")
    body[2] = base64.b64encode(b"\x07" * 32).decode()
    t = json.loads(json.dumps(b))
    t["consistency"]["checkpoint"] = signer.sign("\n".join(body) + "\n")
    assert "consistency proof" in check(t, signer)


def test_witness_cosignatures_and_quorum(logged: tuple[Path, Signer]) -> None:
    signer = logged[1]
    w1, w2 = CosignerKey.generate("w.example/1"), CosignerKey.generate("w.example/2")
    b = bundle_of(logged)
    text = b["checkpoint"].split("\n\n")[0] + "\n"
    cosigned = b["checkpoint"] + w1.cosign(text, 1_800_000_000)
    b2 = bundle_of(logged, cosigned=cosigned)
    assert check(b2, signer, witnesses=[w1.verifier]) == ""
    assert "1 valid cosignature" in check(b2, signer, witnesses=[w1.verifier, w2.verifier])
    assert check(b2, signer, witnesses=[w1.verifier, w2.verifier], quorum=1) == ""
    bad = b2["checkpoint"].replace(w1.cosign(text, 1_800_000_000), w1.cosign(text, 1_800_000_001))
    t = dict(b2, checkpoint=bad.replace(text, text, 1))
    sig_line = w1.cosign(text, 1_800_000_000)
    forged = sig_line[:-10] + ("A" if sig_line[-10] != "A" else "B") + sig_line[-9:]
    t = dict(b2, checkpoint=b["checkpoint"] + forged)
    assert "cosignature" in check(t, signer, witnesses=[w1.verifier])


def test_cli_prove_and_verify_bundle(
    logged: tuple[Path, Signer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d, _ = logged
    pub, out = d / "keys" / "or-9.pub", tmp_path / "b.json"
    rc = main(["prove", str(d / "log"), "--delivery", DID, "--pubkey", str(pub), "--out", str(out)])
    assert rc == 0, capsys.readouterr()
    assert main(["verify-bundle", str(out), "--pubkey", str(pub)]) == 0
    assert "VERIFIED" in capsys.readouterr().out
    b = json.loads(out.read_text())
    b["entries"][2] = b["entries"][2].replace('"dose_primary_gy":', '"dose_primary_gy":9', 1)
    out.write_text(json.dumps(b))
    assert main(["verify-bundle", str(out), "--pubkey", str(pub)]) == 1
    assert f"entry seq {b['start'] + 2}" in capsys.readouterr().out
    assert main(["prove", str(d / "log"), "--delivery", "nope", "--out", str(out)]) == 1
    rc = main(
        ["prove", str(d / "log"), "--delivery", DID, "--checkpoint-size", "3", "--out", str(out)]
    )
    assert rc == 2
    assert "--checkpoint-size 3" in capsys.readouterr().err


async def crash_after_delivery(directory: Path, signer: Signer) -> None:
    """A delivery ends; the next start's recovery finds its tail unvouched (as after a
    crash before the seal: test_audit_restart.py pretends it the same way) and records it
    in a recovery entry after the range; then checkpoints cover it."""
    log, _ = await AuditLog.open(directory, origin=ORIGIN, signer=signer, group_commit_s=0.01)
    task = asyncio.create_task(log.run())
    log.append("daemon_start", {"verifier_key": signer.verifier.text}, durable=True)
    log.append("delivery_started", {"preset_gy": 20.0}, delivery_id=DID)
    log.append("sample", {"dose_primary_gy": 1.0}, delivery_id=DID)
    await log.checkpoint("interval")
    for i in range(3):
        log.append("sample", {"dose_primary_gy": 2.0 + i}, delivery_id=DID)
    await log.append("delivery_terminated", {"status": "NORMAL"}, delivery_id=DID).committed
    await asyncio.wait_for(log.close(), 10)
    await asyncio.wait_for(task, 10)
    log, rep = await AuditLog.open(directory, origin=ORIGIN, signer=signer, group_commit_s=0.01)
    rep = dataclasses.replace(rep, previous_stop="crash", vouched_count=4)
    task = asyncio.create_task(log.run())
    try:
        recovery.record_recovery(log, rep, utc_ts(datetime.now(UTC)))
        await log.append("sample", {"dose_primary_gy": 0.0}).committed
        await log.checkpoint("start")
    finally:
        await asyncio.wait_for(log.close(), 10)
        await asyncio.wait_for(task, 10)


def test_a_bundle_over_unvouched_entries_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    signer = generate_keypair("or-9")
    asyncio.run(crash_after_delivery(tmp_path / "log", signer))
    pub = write_keypair(signer, tmp_path / "keys")[1]
    b = make_bundle(collect_files([tmp_path / "log"]), DID, pubkey=signer.verifier)
    assert b["recoveries"], "the recovery entry after the range is in the bundle"
    out = tmp_path / "b.json"
    out.write_text(json.dumps(b))
    assert main(["verify-bundle", str(out), "--pubkey", str(pub)]) == 1
    assert "UNVOUCHED: entries seq" in capsys.readouterr().out
    t = json.loads(json.dumps(b))
    t["recoveries"][0]["entry"] = t["recoveries"][0]["entry"].replace('"ts":"2', '"ts":"3', 1)
    assert f"entry seq {b['recoveries'][0]['seq']}" in check(t, signer)
    t = json.loads(json.dumps(b))
    t["recoveries"][0]["proof"] = t["range_proof"]
    assert "recoveries[0]" in check(t, signer)


def test_a_mangled_bundle_is_refused_with_a_bundle_error_never_a_crash(
    logged: tuple[Path, Signer],
) -> None:
    """Whatever a bundle's bytes are, verify-bundle answers with a named refusal."""
    signer = logged[1]
    raw = json.dumps(bundle_of(logged)).encode()
    rng = random.Random(20)  # noqa: S311 - test data, not crypto
    for _ in range(400):
        b = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        with contextlib.suppress(BundleError):
            check_bundle(bytes(b), signer.verifier)
    shapes: list[Any] = [[], 1, None, {"data": []}, "x"]
    for key in ("entries", "range_proof", "recoveries", "consistency", "checkpoint", "start"):
        for shape in shapes:
            if key == "recoveries" and shape == []:
                continue  # the usual value
            t = dict(bundle_of(logged), **{key: shape})
            assert check(t, signer), f"{key}={shape!r} verified"
    t = bundle_of(logged)
    t["recoveries"] = [{"seq": t["start"], "entry": t["entries"][0], "proof": []}]
    assert check(t, signer)
    t["entries"][1] = "[" + t["entries"][1][1:-1] + "]"
    assert "entry seq" in check(t, signer)


def test_one_leaf_range_proof_is_the_rfc6962_path_and_consistency_intervals_the_proof() -> None:
    """Against merkle.py's PATH and PROOF (themselves checked on transparency-dev's
    probes, test_merkle.py): the same hashes (the range proof orders them left to
    right, PATH from the leaf up)."""
    for size in (1, 2, 6, 7, 8, 21, 64, 65):
        leaves = [hashlib.sha256(b"x%d" % i).digest() for i in range(size)]
        for i in range(size):
            ivs = range_intervals(i, i + 1, size)
            roots = subtree_roots(iter(leaves), ivs)
            path = inclusion_proof(leaves, i, size)
            assert sorted(roots[iv] for iv in ivs) == sorted(path)
        for old in range(size + 1):
            ivs = consistency_intervals(old, size)
            roots = subtree_roots(iter(leaves), ivs)
            assert [roots[iv] for iv in ivs] == consistency_proof(leaves, old, size)


def test_cli_cosigned_held_checkpoint_and_witness_keys(
    logged: tuple[Path, Signer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d, _ = logged
    pub, out = d / "keys" / "or-9.pub", tmp_path / "b.json"
    b = bundle_of(logged)
    notes = [
        orjson.loads(ln)["data"]["note"]
        for p in collect_files([d / "log"])
        for ln in p.read_bytes().splitlines()
        if ln.endswith(b'"type":"checkpoint"}')
    ]
    w = CosignerKey.generate("w.example/1")
    (tmp_path / "w.vkey").write_text(w.verifier.text + "\n")
    text = b["checkpoint"].split("\n\n")[0] + "\n"
    payload = {"note": b["checkpoint"] + w.cosign(text, 1_800_000_000)}
    (tmp_path / "cosigned.json").write_bytes(orjson.dumps(payload))
    (tmp_path / "held").write_text(notes[0])
    args = ["prove", str(d / "log"), "--delivery", DID, "--pubkey", str(pub), "--out", str(out)]
    args += ["--cosigned", str(tmp_path / "cosigned.json")]
    args += ["--from-checkpoint", str(tmp_path / "held")]
    assert main(args) == 0, capsys.readouterr()
    vb = ["verify-bundle", str(out), "--pubkey", str(pub)]
    assert main([*vb, "--witness-key", str(tmp_path / "w.vkey")]) == 0
    said = capsys.readouterr().out
    assert "cosigned by w.example/1" in said
    assert "extends the held checkpoint of size" in said
    w2 = CosignerKey.generate("w.example/2")
    (tmp_path / "w2.vkey").write_text(w2.verifier.text + "\n")
    two = [
        *vb,
        "--witness-key",
        str(tmp_path / "w.vkey"),
        "--witness-key",
        str(tmp_path / "w2.vkey"),
    ]
    assert main(two) == 1
    assert "1 valid cosignature(s)" in capsys.readouterr().out
    assert main([*two, "--quorum", "1"]) == 0
    assert main([*two, "--quorum", "3"]) == 2
    (tmp_path / "bad.vkey").write_text("not a key\n")
    assert main([*vb, "--witness-key", str(tmp_path / "bad.vkey")]) == 2
    assert "--witness-key" in capsys.readouterr().err


async def write_rotated(directory: Path, signer: Signer) -> None:
    log, _ = await AuditLog.open(
        directory, origin=ORIGIN, signer=signer, group_commit_s=0.01, rotate_max_bytes=2048
    )
    task = asyncio.create_task(log.run())
    try:
        log.append("daemon_start", {"verifier_key": signer.verifier.text}, durable=True)
        for i in range(30):
            await log.append("sample", {"dose_primary_gy": i * 0.5}).committed
        log.append("delivery_started", {"preset_gy": 20.0}, delivery_id=DID)
        log.append("sample", {"dose_primary_gy": 1.0}, delivery_id=DID)
        await log.append("delivery_terminated", {"status": "NORMAL"}, delivery_id=DID).committed
        await log.append("sample", {"dose_primary_gy": 0.0}).committed
        await log.checkpoint("interval")
    finally:
        await asyncio.wait_for(log.close(), 10)
        await asyncio.wait_for(task, 10)


def test_prove_reads_the_archive_with_the_log_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Retention moved the oldest segments away: the leaves before the delivery are in the
    archive, and prove needs them (--archive), as verify does."""
    signer = generate_keypair("or-9")
    asyncio.run(write_rotated(tmp_path / "log", signer))
    segs = collect_files([tmp_path / "log"])
    assert len(segs) > 2
    (tmp_path / "archive").mkdir()
    for seg in segs[:2]:
        seg.rename(tmp_path / "archive" / seg.name)
    pub = write_keypair(signer, tmp_path / "keys")[1]
    out = tmp_path / "b.json"
    args = ["prove", str(tmp_path / "log"), "--delivery", DID, "--pubkey", str(pub)]
    args += ["--out", str(out)]
    assert main(args) == 1
    assert "give the archive too" in capsys.readouterr().err
    assert main([*args, "--archive", str(tmp_path / "archive")]) == 0
    assert main(["verify-bundle", str(out), "--pubkey", str(pub)]) == 0


def test_prove_refuses_an_altered_log_naming_it(
    logged: tuple[Path, Signer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A log whose bytes no longer give the signed root (or are not even UTF-8 JSON) is
    reported (exit 1), never bundled."""
    d, _ = logged
    b = bundle_of(logged)
    pub = d / "keys" / "or-9.pub"
    for bad in (b'"ts":"3', b'"ts":"\xff'):
        shutil.copytree(d / "log", tmp_path / "log", dirs_exist_ok=True)
        [seg] = collect_files([tmp_path / "log"])
        lines = seg.read_bytes().split(b"\n")
        for i in (b["start"], b["first_seq"] + 2):
            lines[i] = lines[i].replace(b'"ts":"2', bad, 1)
        seg.write_bytes(b"\n".join(lines))
        out = tmp_path / "b.json"
        args = ["prove", str(tmp_path / "log"), "--delivery", DID, "--pubkey", str(pub)]
        assert main([*args, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"iort-audit: {DID}: "), err
        assert "entry seq" in err or "cannot be read" in err, err
        assert not out.exists()
