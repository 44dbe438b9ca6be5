"""Checkpoints read by C2SP signed-note's rules (auditlog/note.py ``Checkpoint.read`` and
``parse_verified``, through auditlog/signed_note.py), and ``iort-audit verify --checkpoint``
on a copy that a witness cosigned.

C2SP signed-note: a verifier ignores signatures from keys it does not know, whatever their
name (``/`` allowed) or length (a tlog-cosignature is 4 + 8 + 64 bytes), verifies every one
by a key it knows and refuses the note if one of those fails; the text ends at the last blank
line. The cosigned example is c2sp.org/tlog-cosignature's.
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest

from iortd.audit import cli
from iortd.auditlog.note import Checkpoint, NoteError, Signer, generate_keypair, parse_vkey

ORIGIN = "iortd/site/or-1/0123456789abcdef"
HEAD = "ab" * 32
GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden-log"

# c2sp.org/tlog-cosignature, the example of a checkpoint with a cosignature
C2SP_COSIGNED = (
    "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n\n"
    "— example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Z"
    "hcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n"
    "— witness.example.com/w1 jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dlrDJ"
    "sX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA==\n"
)


def cosig_line(name: str = "witness.example/w1", size: int = 76) -> str:
    """A signature line as a C2SP Ed25519 cosigner writes it (key ID, 8-byte timestamp,
    64-byte signature: 76 bytes); its bytes are not checked by a reader who lacks the key."""
    blob = b"\x9a\xbc\xde\xf0" + (1_700_000_000).to_bytes(8, "big") + b"c" * (size - 12)
    return f"— {name} {base64.b64encode(blob).decode()}\n"


def note(signer: Signer) -> str:
    return Checkpoint(ORIGIN, 12, HEAD, ("time t", "reason test")).signed(signer)


def test_a_witness_cosignature_is_ignored_and_listed() -> None:
    signer = generate_keypair("or-1")
    witnessed = note(signer) + cosig_line()
    cp, signed = Checkpoint.parse_verified(witnessed, signer.verifier)
    assert (cp.count, cp.head_hash, signed) == (12, HEAD, True)
    got = Checkpoint.read(witnessed, signer.verifier)
    assert [(s.name, s.size) for s in got.ignored] == [("witness.example/w1", 76)]
    assert got.ignored_summary() == "witness.example/w1 (76 bytes)"
    # bytes, as read from a file or a payload, are read the same
    assert Checkpoint.read(witnessed.encode(), signer.verifier) == got


def test_the_c2sp_cosigned_example_is_read_and_both_signatures_listed() -> None:
    got = Checkpoint.read(C2SP_COSIGNED, None)
    assert (got.checkpoint.origin, got.checkpoint.count, got.signed) == (
        "example.com/behind-the-sofa",
        20852163,
        False,
    )
    assert [(s.name, s.size) for s in got.ignored] == [
        ("example.com/behind-the-sofa", 68),
        ("witness.example.com/w1", 76),
    ]


def test_a_bad_own_signature_is_refused_beside_a_valid_unknown_one() -> None:
    signer, witness = generate_keypair("or-1"), generate_keypair("w1")
    good = note(signer)
    text = good.partition("\n\n")[0] + "\n"
    blob = bytearray(base64.b64decode(good.rstrip("\n").rsplit(" ", 1)[1]))
    blob[20] ^= 0x01
    forged = f"{text}\n— or-1 {base64.b64encode(bytes(blob)).decode()}\n"
    cosigned = forged + witness.sign(text).partition("\n\n")[2]
    with pytest.raises(NoteError, match=r"or-1 .*does not verify"):
        Checkpoint.parse_verified(cosigned, signer.verifier)
    # and a second, bad signature by the own key beside a good one: every one is checked
    with pytest.raises(NoteError, match="does not verify"):
        Checkpoint.parse_verified(good + forged.partition("\n\n")[2], signer.verifier)


def test_only_signatures_by_others_is_not_signed() -> None:
    signer, witness = generate_keypair("or-1"), generate_keypair("w1")
    text = Checkpoint(ORIGIN, 12, HEAD).text
    got = Checkpoint.read(witness.sign(text) + cosig_line(), signer.verifier)
    assert got.signed is False
    assert [s.name for s in got.ignored] == ["w1", "witness.example/w1"]


def test_at_most_100_signatures() -> None:
    signer = generate_keypair("or-1")
    ninety_nine = "".join(cosig_line(f"w.example/{i}") for i in range(99))
    assert Checkpoint.parse_verified(note(signer) + ninety_nine, signer.verifier)[1] is True
    with pytest.raises(NoteError, match="more than 100 signatures"):
        Checkpoint.parse_verified(note(signer) + ninety_nine + cosig_line(), signer.verifier)


@pytest.mark.parametrize("name", ["example.com/foo", "oid/1.3.6.1.4.1", "a/b/c"])
def test_names_with_a_slash_from_other_keys_are_read(name: str) -> None:
    signer = generate_keypair("or-1")
    got = Checkpoint.read(note(signer) + cosig_line(name, 68), signer.verifier)
    assert got.signed is True
    assert [s.name for s in got.ignored] == [name]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("— w.example/1 not*base64=\n", "not base64"),
        ("— w.example/1 AAAAAAA\n", "not base64"),  # no padding
        ("— w.example/1 AAAAAAB=\n", "not base64"),  # stray bits: not the canonical spelling
        ("— w.example/1 AAAA\n", "shorter than 5 bytes"),  # a key ID and no signature
        ("— w.example/1\n", "shorter than 5 bytes"),  # no signature at all
        ("— w+1 AAAAAAA=\n", "key name"),
        ("- w.example/1 AAAAAAA=\n", "does not start with"),
        ("— w.example/1 AAAAAAA=\x7f\x01\n", "control character"),
    ],
)
def test_malformed_signature_lines_refuse_the_note(line: str, why: str) -> None:
    signer = generate_keypair("or-1")
    with pytest.raises(NoteError, match=why):
        Checkpoint.parse_verified(note(signer) + line, signer.verifier)


def test_the_text_ends_at_the_last_blank_line_and_a_checkpoint_has_no_empty_line() -> None:
    signer = generate_keypair("or-1")
    text = Checkpoint(ORIGIN, 12, HEAD, ("time t",)).text
    with pytest.raises(NoteError, match="line 5 is empty"):
        Checkpoint.parse_verified(signer.sign(text + "\nx\n"), signer.verifier)
    with pytest.raises(NoteError, match="UTF-8"):
        Checkpoint.parse_verified(note(signer).encode().replace(b"or-1/", b"or-\xff/"), None)


def test_a_key_named_like_a_url_reads_by_c2sp_rules() -> None:
    v = parse_vkey("example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k")
    assert (v.name, v.key_hash) == ("example.com/foo", 0x530D903A)


# ---- iort-audit verify --checkpoint: a copy a witness cosigned ------------------------------
def _verify(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli.main(["verify", str(GOLDEN / "log"), "--pubkey", str(GOLDEN / "or-9.pub"), *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_verify_reads_a_held_checkpoint_with_a_cosignature(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    held = tmp_path / "checkpoint-witnessed"
    original = (GOLDEN / "log" / "checkpoint").read_text("utf-8")
    held.write_text(original + cosig_line(), "utf-8")
    rc, out, err = _verify(["--checkpoint", str(held)], capsys)
    assert rc == 0, out + err
    assert "checkpoint held elsewhere: covers entries 0..279: consistent" in out
    assert (
        "signatures by keys not given, ignored (not checked): witness.example/w1 (76 bytes)" in out
    )
    # The same copy with its own signature broken is refused, cosignature or not.
    own = original.rstrip("\n").rsplit(" ", 1)[1]
    blob = bytearray(base64.b64decode(own))
    blob[-1] ^= 0x01
    held.write_text(
        original.replace(own, base64.b64encode(bytes(blob)).decode()) + cosig_line(), "utf-8"
    )
    rc, out, err = _verify(["--checkpoint", str(held)], capsys)
    assert rc == 2, out + err
    assert f"--checkpoint {held}: checkpoint: the signature by or-9" in err
    assert "does not verify" in err


def test_verify_reads_the_log_directorys_checkpoint_and_seal_with_a_cosignature(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "log"
    shutil.copytree(GOLDEN / "log", log)
    for name in ("checkpoint", "seal"):
        with (log / name).open("a", encoding="utf-8") as f:
            f.write(cosig_line())
    rc = cli.main(["verify", str(log), "--pubkey", str(GOLDEN / "or-9.pub")])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert "seal: covers entries 0..280: consistent" in out
    assert "checkpoint file: covers entries 0..279: consistent" in out
