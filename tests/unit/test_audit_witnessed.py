"""``iort-audit verify --witness-key/--quorum`` (audit/witnessed.py) over entries built by
hand: the newest checkpoint with a quorum of valid cosignatures is what counts; a forged
cosignature by a given key, or one of a checkpoint the log does not hold, fails."""

from __future__ import annotations

from typing import Any

import pytest

from iortd.audit.inputs import UsageError
from iortd.audit.witnessed import check_witnessed, load_witness_keys
from iortd.auditlog.cosignature import CosignerKey
from iortd.auditlog.merkle import leaf_hash, root_of
from iortd.auditlog.note import Checkpoint, generate_keypair
from iortd.auditlog.signed_note import split_note

SIGNER = generate_keypair("iortd-or-1")
W1 = CosignerKey.generate("w.test/1")
W2 = CosignerKey.generate("w.test/2")
LEAVES = [leaf_hash(b"%d" % i) for i in range(20)]


def checkpoint(seq: int, size: int) -> dict[str, Any]:
    root = root_of(LEAVES[:size]).hex()
    note = Checkpoint("iortd/s/or-1/00", size, "ab" * 32, ("reason t",), root).signed(SIGNER)
    data = {"note": note, "count": size, "root": root, "tree": "rfc6962", "head": "ab" * 32}
    return {"seq": seq, "type": "checkpoint", "data": data}


def cosigned(seq: int, cp: dict[str, Any], key: CosignerKey, ts: int = 1) -> dict[str, Any]:
    text, _ = split_note(cp["data"]["note"], "checkpoint")
    line = key.cosign(text, ts).rstrip("\n")
    data = {"witness": "w", "size": cp["data"]["count"], "root": cp["data"]["root"]}
    return {"seq": seq, "type": "witness_cosigned", "data": {**data, "cosignature": line}}


def run(entries: list[dict[str, Any]], keys: list[CosignerKey], quorum: int) -> tuple[bool, str]:
    said: list[str] = []
    ok = check_witnessed(entries, [k.verifier for k in keys], quorum, said.append, said.append)
    return ok, "\n".join(said)


def test_the_newest_checkpoint_with_a_quorum_counts() -> None:
    a, b = checkpoint(4, 4), checkpoint(9, 9)
    log = [a, cosigned(5, a, W1), cosigned(6, a, W2), b, cosigned(10, b, W1), checkpoint(11, 11)]
    ok, said = run(log, [W1, W2], 2)
    assert ok, said
    assert "the checkpoint of size 4" in said
    assert "not witnessed yet: entries 4 .. 11 and 2 later checkpoint(s)" in said
    ok, said = run(log, [W1, W2], 1)
    assert ok
    assert "the checkpoint of size 9" in said


def test_no_quorum_fails_naming_the_keys() -> None:
    a = checkpoint(4, 4)
    ok, said = run([a, cosigned(5, a, W1)], [W1, W2], 2)
    assert not ok
    assert "WITNESS: no checkpoint of the log is cosigned by 2 of w.test/1, w.test/2" in said


def test_a_forged_cosignature_by_a_given_key_fails() -> None:
    a, b = checkpoint(4, 4), checkpoint(9, 9)
    forged = cosigned(10, a, W1)  # a's cosignature claimed for b
    forged["data"] |= {"size": 9, "root": b["data"]["root"]}
    ok, said = run([a, cosigned(5, a, W1), b, forged], [W1], 1)
    assert not ok
    assert "WITNESS: entry 10:" in said


def test_a_cosignature_of_a_checkpoint_not_in_the_log_fails() -> None:
    a = checkpoint(4, 4)
    ghost = cosigned(5, checkpoint(0, 7), W1)
    ok, said = run([a, cosigned(5, a, W1), ghost], [W1], 1)
    assert not ok
    assert "names a checkpoint the log does not hold" in said


def test_other_witnesses_are_ignored() -> None:
    a = checkpoint(4, 4)
    same_name = CosignerKey.generate("w.test/1")
    ok, _ = run([a, cosigned(5, a, same_name), cosigned(6, a, W1)], [W1], 1)
    assert ok


def test_usage_errors() -> None:
    with pytest.raises(UsageError, match="--quorum needs --witness-key"):
        load_witness_keys([], 1)
    with pytest.raises(UsageError, match=r"--quorum 3: must be 1 .. 2"):
        load_witness_keys([W1.verifier.text, W2.verifier.text], 3)
    with pytest.raises(UsageError, match="given twice"):
        load_witness_keys([W1.verifier.text, W1.verifier.text], None)
    with pytest.raises(UsageError, match="iort-witness keygen"):
        load_witness_keys([SIGNER.verifier.text], None)


def test_what_was_witnessed_is_what_the_signed_text_says_not_the_entrys_fields() -> None:
    """A rewritten tail may set a checkpoint entry's unsigned ``count``/``root`` to a
    larger checkpoint's and claim a genuine cosignature of the size-4 note for it: the
    witnessed size stays the signed one (4), never the entry's (11)."""
    a, big = checkpoint(4, 4), checkpoint(11, 11)
    stretched = {**a, "data": {**a["data"], "count": 11, "root": big["data"]["root"]}}
    claim = cosigned(5, a, W1)
    claim["data"] = {**claim["data"], "size": 11, "root": big["data"]["root"]}
    ok, said = run([stretched, claim], [W1], 1)
    assert "the checkpoint of size 11" not in said
    assert not ok or "the checkpoint of size 4" in said, said
