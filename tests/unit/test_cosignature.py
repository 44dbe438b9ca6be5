"""Witness cosignatures: c2sp.org/tlog-cosignature, cosignature/v1, Ed25519
(auditlog/cosignature.py).

Vectors from elsewhere: the example cosigned checkpoint of c2sp.org/tlog-cosignature (its
witness line's timestamp is the one its signed-message example shows), and
transparency-dev/witness's ``witness/witness_test.go`` (the witness signer key ``wSK`` and
its Ed25519 verifier key ``wPK``, which transparency-dev/formats'
``NewSignerForCosignatureV1`` reads as a cosigner key). The signed message is rebuilt here
from the specification's text and checked with ``cryptography`` directly, not through the
module under test.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from iortd.auditlog.cosignature import (
    ALG_COSIGNATURE_V1,
    CosignatureError,
    CosignerKey,
    CosignerVerifier,
    cosigned_message,
    load_cosigner,
    verified_cosignatures,
    verify_cosignature,
    write_cosigner,
)
from iortd.auditlog.merkle import EMPTY_ROOT
from iortd.auditlog.note import NoteError, parse_vkey
from iortd.auditlog.signed_note import open_note
from iortd.auditlog.tlog_checkpoint import CheckpointBody

# c2sp.org/tlog-cosignature, the example at the top
SPEC_BODY = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
SPEC_COSIG = (
    "— witness.example.com/w1 jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dlrD"
    "JsX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA==\n"
)
SPEC_TIME = 1679315147  # "time 1679315147" in the specification's signed-message example
# transparency-dev/witness witness/witness_test.go
GO_WSK = "PRIVATE+KEY+witness+f13a86db+AaLa/dfyBhyo/m0Z7WCi98ENVZWtrP8pxgRNrx7tIWiA"
GO_WPK = "witness+f13a86db+AdYV1Ztajd9BvyjP2HgpwrqYL6TjOwIjGMOq8Bu42xbN"


def test_the_specification_example_has_the_v1_shape() -> None:
    raw = base64.b64decode(SPEC_COSIG.split(" ")[2])
    assert len(raw) == 4 + 8 + 64
    assert int.from_bytes(raw[4:12], "big") == SPEC_TIME


def test_the_go_reference_key_reads_as_a_cosigner_with_a_type_4_key_id() -> None:
    key = CosignerKey.parse(GO_WSK)
    pub = parse_vkey(GO_WPK).public_key.public_bytes_raw()
    want_id = int.from_bytes(hashlib.sha256(b"witness\n" + bytes([0x04]) + pub).digest()[:4], "big")
    v = key.verifier
    assert v.name == "witness"
    assert v.key_id == want_id != 0xF13A86DB  # not the plain Ed25519 key's ID
    assert v.public_bytes == pub
    assert v.text == f"witness+{want_id:08x}+" + base64.b64encode(b"\x04" + pub).decode()
    assert CosignerVerifier.parse(v.text) == v
    # The private key file keeps the plain Ed25519 form (iort-audit keygen's, Go's).
    assert key.text == GO_WSK


def test_the_signed_message_and_line_follow_the_specification() -> None:
    key = CosignerKey.parse(GO_WSK)
    line = key.cosign(SPEC_BODY, SPEC_TIME)
    assert line.startswith("— witness ")
    assert line.endswith("\n")
    raw = base64.b64decode(line[len("— witness ") :].strip(), validate=True)
    assert int.from_bytes(raw[:4], "big") == key.verifier.key_id
    assert int.from_bytes(raw[4:12], "big") == SPEC_TIME
    message = f"cosignature/v1\ntime {SPEC_TIME}\n{SPEC_BODY}".encode()
    assert cosigned_message(SPEC_BODY, SPEC_TIME) == message
    Ed25519PublicKey.from_public_bytes(key.verifier.public_bytes).verify(raw[12:], message)
    # Deterministic (Ed25519): the same key, time and body give the same line.
    assert key.cosign(SPEC_BODY, SPEC_TIME) == line
    assert verify_cosignature(key.verifier.text, SPEC_BODY, line) == SPEC_TIME


def test_a_cosigned_note_opens_through_the_signed_note_reader() -> None:
    key = CosignerKey.parse(GO_WSK)
    note = SPEC_BODY + "\n" + key.cosign(SPEC_BODY, SPEC_TIME)
    opened = open_note(note, [key.verifier])
    assert opened.verified == (key.verifier,)


def test_verify_refuses_what_is_not_this_witness_cosignature() -> None:
    key = CosignerKey.parse(GO_WSK)
    body = CheckpointBody("iortd/s/r/00", 3, EMPTY_ROOT[::-1])
    line = key.cosign(body.text, 1_800_000_000)
    assert verify_cosignature(key.verifier, body, line) == 1_800_000_000
    other = CheckpointBody("iortd/s/r/00", 3, EMPTY_ROOT)
    with pytest.raises(CosignatureError, match="does not verify"):
        verify_cosignature(key.verifier, other, line)
    raw = bytearray(base64.b64decode(line.split(" ")[2]))
    raw[11] ^= 1  # the timestamp is signed too
    forged = f"— witness {base64.b64encode(bytes(raw)).decode()}\n"
    with pytest.raises(CosignatureError, match="does not verify"):
        verify_cosignature(key.verifier, body, forged)
    stranger = CosignerKey.generate("witness")
    with pytest.raises(CosignatureError, match="key ID"):
        verify_cosignature(stranger.verifier, body, line)
    with pytest.raises(CosignatureError, match="name"):
        verify_cosignature(key.verifier, body, line.replace("witness", "witnesz", 1))
    plain = key.verifier.key_id.to_bytes(4, "big") + bytes(64)  # an Ed25519 note signature
    with pytest.raises(CosignatureError, match="76 bytes"):
        verify_cosignature(key.verifier, body, f"— witness {base64.b64encode(plain).decode()}")
    zero = key.cosign(body.text, 0)
    with pytest.raises(CosignatureError, match="timestamp"):
        verify_cosignature(key.verifier, body, zero)


def test_a_plain_ed25519_vkey_is_not_taken_for_a_cosigner_key() -> None:
    with pytest.raises(NoteError, match="0x04"):
        CosignerVerifier.parse(GO_WPK)


def test_a_name_may_be_a_schemaless_url(tmp_path: Path) -> None:
    key = CosignerKey.generate("witness.example.org/iort-1")
    path = tmp_path / "w.key"
    write_cosigner(key, path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_cosigner(path).verifier == key.verifier
    assert (tmp_path / "w.pub").read_text("ascii") == key.verifier.text + "\n"
    path.chmod(0o640)
    with pytest.raises(NoteError, match="chmod 600"):
        load_cosigner(path)
    assert ALG_COSIGNATURE_V1 == 0x04


def test_a_witness_answer_keeps_only_the_trusted_verified_lines() -> None:
    """tlog-witness: the client MUST ignore cosignatures from unknown keys; a line by a
    trusted witness that does not verify is an error, not a cosignature."""
    ours, theirs = CosignerKey.generate("w.example/1"), CosignerKey.generate("w.example/2")
    body = CheckpointBody("iortd/s/r/00", 7, EMPTY_ROOT[::-1])
    good = ours.cosign(body.text, 1_800_000_000)
    unknown = theirs.cosign(body.text, 1_800_000_000)
    answer = [unknown, good, good]
    assert verified_cosignatures(body, answer, [ours.verifier]) == (good,)
    assert verified_cosignatures(body, [unknown], [ours.verifier]) == ()
    stale = ours.cosign(CheckpointBody("iortd/s/r/00", 6, EMPTY_ROOT).text, 1_800_000_000)
    with pytest.raises(CosignatureError, match="does not verify"):
        verified_cosignatures(body, [stale], [ours.verifier])
