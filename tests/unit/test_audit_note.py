"""Ed25519 keys and signed checkpoints (auditlog/note.py).

The formats are golang.org/x/mod/sumdb/note's and C2SP tlog-checkpoint's; the reference
vectors below are the PeterNeumann key and note from Go's note_test.go, so byte equality
with them means Go-ecosystem tools read our keys and signatures.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from pathlib import Path

import pytest

from iortd.auditlog.note import (
    Checkpoint,
    KeyFileError,
    NoteError,
    Signer,
    Verifier,
    generate_keypair,
    load_signer,
    load_verifier,
    write_keypair,
)

# golang.org/x/mod/sumdb/note, note_test.go
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_NOTE = (
    GO_TEXT + "\n\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FF"
    "YC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)

HEAD = hashlib.sha256(b"head").hexdigest()


def keypair_with_plus(name: str) -> Signer:
    """A fresh key whose signer and verifier base64 both contain '+' (about half do)."""
    for _ in range(1000):
        s = generate_keypair(name)
        if "+" in s.text.split("+", 4)[4] and "+" in s.verifier.text.split("+", 2)[2]:
            return s
    raise AssertionError("no key with '+' in its base64 in 1000 tries")


def checkpoint_note(signer: Signer, count: int = 12, head: str = HEAD) -> str:
    cp = Checkpoint("iortd/site/room/0123456789abcdef", count, head, ("time t", "reason test"))
    return cp.signed(signer)


# ---- keys --------------------------------------------------------------------------------


def test_go_reference_keys_parse_and_sign_byte_for_byte() -> None:
    signer = Signer.parse(GO_SKEY)
    verifier = Verifier.parse(GO_VKEY)
    assert (signer.name, signer.key_hash) == ("PeterNeumann", 0xC74F20A3)
    assert signer.text == GO_SKEY, "the signer key text round-trips ('+' in its base64)"
    assert verifier.text == GO_VKEY
    assert signer.verifier.text == GO_VKEY
    assert signer.sign(GO_TEXT) == GO_NOTE


def test_keygen_sign_verify_round_trip() -> None:
    signer = generate_keypair("iortd-or-3")
    again = Signer.parse(signer.text)
    verifier = Verifier.parse(signer.verifier.text)
    assert again.text == signer.text
    assert verifier.text == signer.verifier.text == again.verifier.text
    note = again.sign("hello\n")
    text, _, sig_line = note.partition("\n\n")
    assert text + "\n" == "hello\n"
    assert sig_line.startswith("\u2014 iortd-or-3 ")
    blob = base64.b64decode(sig_line.split(" ")[2])
    assert int.from_bytes(blob[:4], "big") == signer.key_hash
    assert verifier.verify("hello\n", blob[4:])
    assert not verifier.verify("hello!\n", blob[4:])


def test_key_texts_have_the_note_formats() -> None:
    signer = generate_keypair("iortd-demo")
    b64 = r"[A-Za-z0-9+/]{44}"  # 33 bytes: 0x01 then the key, no padding
    assert re.fullmatch(rf"PRIVATE\+KEY\+iortd-demo\+[0-9a-f]{{8}}\+{b64}", signer.text)
    assert re.fullmatch(rf"iortd-demo\+[0-9a-f]{{8}}\+{b64}", signer.verifier.text)
    raw_pub = base64.b64decode(signer.verifier.text.split("+", 2)[2])
    raw_seed = base64.b64decode(signer.text.split("+", 4)[4])
    assert raw_pub[0] == raw_seed[0] == 0x01
    # key hash: first 4 bytes of SHA-256(name || "\n" || 0x01 || public key), big-endian
    digest = hashlib.sha256(b"iortd-demo\n" + raw_pub).digest()
    assert signer.verifier.text.split("+")[1] == digest[:4].hex()


def test_keys_whose_base64_contains_plus_parse() -> None:
    signer = keypair_with_plus("k")
    assert Signer.parse(signer.text).text == signer.text
    assert Verifier.parse(signer.verifier.text).text == signer.verifier.text
    # and with surrounding whitespace, as read from a file
    assert Verifier.parse(f"  {signer.verifier.text}\n").text == signer.verifier.text


def _swap_hash(text: str, index: int) -> str:
    parts = text.split("+")
    parts[index] = f"{(int(parts[index], 16) ^ 1):08x}"
    return "+".join(parts)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda v: "Other" + v[v.index("+") :],  # another name: key hash no longer matches
        lambda v: _swap_hash(v, 1),  # the hash changed
        lambda v: v.split("+", 1)[1],  # name missing
        lambda v: v.rsplit("+", 1)[0],  # key missing
        lambda v: v[:-4],  # key truncated
        lambda v: v[:-2] + "!!",  # not base64
        lambda v: v.replace("+", "+0", 1),  # 9-digit hash
        lambda v: v.split("+")[0] + "+zzzzzzzz+" + v.split("+", 2)[2],  # hash not hex
        lambda v: "",
    ],
)
def test_mangled_verifier_keys_are_refused(mangle: object) -> None:
    text = keypair_with_plus("iortd-test").verifier.text
    bad = mangle(text)  # type: ignore[operator]
    assert bad != text
    with pytest.raises(KeyFileError):
        Verifier.parse(bad)


@pytest.mark.parametrize("name", ["iortd demo", ""])
def test_a_key_file_with_a_bad_name_is_a_key_file_error_naming_the_file(
    tmp_path: Path, name: str
) -> None:
    good = generate_keypair("iortd-demo")
    pub = tmp_path / "bad.pub"
    pub.write_text(name + good.verifier.text[len("iortd-demo") :] + "\n", encoding="ascii")
    key = tmp_path / "bad.key"
    key.write_text(good.text.replace("iortd-demo", name) + "\n", encoding="ascii")
    key.chmod(0o600)
    with pytest.raises(KeyFileError, match=re.escape(str(pub))):
        load_verifier(pub)
    with pytest.raises(KeyFileError, match=re.escape(str(key))):
        load_signer(key)


def test_a_verifier_key_for_another_algorithm_is_refused() -> None:
    v = generate_keypair("k").verifier
    raw = bytearray(base64.b64decode(v.text.split("+", 2)[2]))
    raw[0] = 0x02
    with pytest.raises(KeyFileError, match="not an Ed25519"):
        Verifier.parse(f"k+{v.key_hash:08x}+{base64.b64encode(bytes(raw)).decode()}")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda s: s.replace("PRIVATE+KEY+iortd-test", "PRIVATE+KEY+iortd-other"),
        lambda s: _swap_hash(s, 3),
        lambda s: s.replace("PRIVATE+KEY+", "PUBLIC+KEY+"),
        lambda s: s.replace("PRIVATE+KEY+", ""),
        lambda s: s[:-4],
        lambda s: s.rsplit("+", 1)[0],
    ],
)
def test_mangled_signer_keys_are_refused(mangle: object) -> None:
    text = keypair_with_plus("iortd-test").text
    bad = mangle(text)  # type: ignore[operator]
    assert bad != text
    with pytest.raises(KeyFileError):
        Signer.parse(bad)


@pytest.mark.parametrize("name", ["", "a+b", "a b", "a\tb", "a\nb", "caf\u0000"])
def test_key_names_must_be_printable_without_plus_or_spaces(name: str) -> None:
    with pytest.raises(NoteError, match="key name"):
        generate_keypair(name)


def test_sign_refuses_text_without_final_newline() -> None:
    with pytest.raises(NoteError, match="newline"):
        generate_keypair("k").sign("no newline")


# ---- checkpoints -------------------------------------------------------------------------


def test_checkpoint_text_is_the_c2sp_body() -> None:
    cp = Checkpoint("origin/x", 12, HEAD, ("time t", "reason r"))
    head_b64 = base64.b64encode(bytes.fromhex(HEAD)).decode()
    assert cp.text == f"origin/x\n12\n{head_b64}\ntime t\nreason r\n"


def test_checkpoint_signed_by_the_verifier_parses_as_signed() -> None:
    signer = keypair_with_plus("iortd-demo")
    note = checkpoint_note(signer, count=33)
    cp, signed = Checkpoint.parse_verified(note, signer.verifier)
    assert signed is True
    assert cp == Checkpoint("iortd/site/room/0123456789abcdef", 33, HEAD, ("time t", "reason test"))
    # the verifier read back from its text works the same
    assert Checkpoint.parse_verified(note, Verifier.parse(signer.verifier.text))[1] is True


def test_checkpoint_without_verifier_parses_unsigned() -> None:
    note = checkpoint_note(generate_keypair("k"))
    cp, signed = Checkpoint.parse_verified(note, None)
    assert (cp.count, cp.head_hash, signed) == (12, HEAD, False)


@pytest.mark.parametrize("other_name", ["iortd-other", "iortd-demo"])
def test_checkpoint_signed_by_another_key_is_not_signed_not_an_error(other_name: str) -> None:
    """Another key, whatever its name: False (the verifier did not sign), no exception."""
    mine, other = generate_keypair("iortd-demo"), generate_keypair(other_name)
    assert mine.key_hash != other.key_hash
    cp, signed = Checkpoint.parse_verified(checkpoint_note(other), mine.verifier)
    assert signed is False
    assert cp.count == 12


def test_checkpoint_with_two_signatures_is_signed_by_either() -> None:
    a, b = generate_keypair("a"), generate_keypair("b")
    note = checkpoint_note(a)
    note += b.sign(Checkpoint.parse_verified(note, None)[0].text).partition("\n\n")[2]
    assert Checkpoint.parse_verified(note, a.verifier)[1] is True
    assert Checkpoint.parse_verified(note, b.verifier)[1] is True


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("\n12\n", "\n13\n"),  # count
        ("reason test", "reason tesT"),  # an extension line
        ("iortd/site", "iortd/sitE"),  # origin
    ],
)
def test_altered_checkpoint_text_does_not_verify(old: str, new: str) -> None:
    signer = generate_keypair("iortd-demo")
    note = checkpoint_note(signer)
    assert old in note
    with pytest.raises(NoteError, match="does not verify"):
        Checkpoint.parse_verified(note.replace(old, new, 1), signer.verifier)


def test_altered_head_does_not_verify() -> None:
    signer = generate_keypair("iortd-demo")
    note = checkpoint_note(signer)
    other = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    head_b64 = base64.b64encode(bytes.fromhex(HEAD)).decode()
    with pytest.raises(NoteError, match="does not verify"):
        Checkpoint.parse_verified(note.replace(head_b64, other), signer.verifier)


def _good_note() -> str:
    return checkpoint_note(generate_keypair("iortd-demo"))


def _sig_blob(note: str) -> str:
    return note.rstrip("\n").rsplit(" ", 1)[1]


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda n: n.replace("\n\n", "\n"), "no blank line"),
        (lambda n: n.replace("\n12\n", "\ntwelve\n"), "bad count"),
        (lambda n: n.replace("\n12\n", "\n-1\n"), "bad count"),
        (lambda n: n.replace("\n12\n", "\n012\n"), "bad count"),
        (lambda n: n.replace("\n12\n", "\n 12\n"), "bad count"),
        (lambda n: n.split("\n", 1)[1], "bad count"),  # no origin: the count line is the hash
        (lambda n: "x\n12\n\n" + n.partition("\n\n")[2], "needs origin, count and head"),
        (lambda n: n.replace(base64.b64encode(bytes.fromhex(HEAD)).decode(), "!!!!"), "bad"),
        (lambda n: n.replace(base64.b64encode(bytes.fromhex(HEAD)).decode(), "AAAA"), "bad"),
        (lambda n: n.partition("\n\n")[0] + "\n\n", "no signature"),
        (lambda n: n.replace("\u2014 ", "- "), "signature line 1 does not start with"),
        (lambda n: n.replace(_sig_blob(n), "not*base64"), "not base64"),
        (lambda n: n.replace(_sig_blob(n), "AAAA"), "shorter than 5 bytes"),
        (lambda n: n + "\u2014 w1 AAAAAAA=\n" * 100, "more than 100 signatures"),
    ],
)
def test_malformed_notes_raise_note_error(make: object, why: str) -> None:
    good = _good_note()
    bad = make(good)  # type: ignore[operator]
    assert bad != good
    with pytest.raises(NoteError, match=why):
        Checkpoint.parse_verified(bad, None)


def test_a_signature_with_the_right_key_id_but_wrong_bytes_raises() -> None:
    signer = generate_keypair("iortd-demo")
    note = checkpoint_note(signer)
    blob = bytearray(base64.b64decode(_sig_blob(note)))
    blob[10] ^= 0xFF
    forged = note.replace(_sig_blob(note), base64.b64encode(bytes(blob)).decode())
    with pytest.raises(NoteError, match=r"iortd-demo \([0-9a-f]{8}\) does not verify"):
        Checkpoint.parse_verified(forged, signer.verifier)


def test_a_signature_of_another_length_by_the_own_name_and_key_id_is_refused() -> None:
    """Not an unknown key's: name and key ID are the verifier's, so it must verify."""
    signer = generate_keypair("iortd-demo")
    note = checkpoint_note(signer)
    short = base64.b64encode(base64.b64decode(_sig_blob(note))[:-6]).decode()
    with pytest.raises(NoteError, match="does not verify"):
        Checkpoint.parse_verified(note.replace(_sig_blob(note), short), signer.verifier)


# ---- key files ---------------------------------------------------------------------------


def test_write_keypair_makes_a_0600_key_and_a_readable_pub(tmp_path: Path) -> None:
    signer = generate_keypair("iortd-or-3")
    key, pub = write_keypair(signer, tmp_path / "keys")
    assert key == tmp_path / "keys" / "iortd-or-3.key"
    assert pub == tmp_path / "keys" / "iortd-or-3.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text(encoding="ascii") == signer.text + "\n"
    assert pub.read_text(encoding="ascii") == signer.verifier.text + "\n"
    assert load_signer(key).text == signer.text
    assert load_verifier(pub).text == signer.verifier.text


def test_write_keypair_never_overwrites_a_key(tmp_path: Path) -> None:
    first = generate_keypair("k")
    key, pub = write_keypair(first, tmp_path)
    with pytest.raises(FileExistsError):
        write_keypair(generate_keypair("k"), tmp_path)
    assert key.read_text(encoding="ascii") == first.text + "\n"
    assert pub.read_text(encoding="ascii") == first.verifier.text + "\n"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o610, 0o601])
def test_load_signer_refuses_a_key_others_can_access(tmp_path: Path, mode: int) -> None:
    key, _ = write_keypair(generate_keypair("k"), tmp_path)
    os.chmod(key, mode)
    with pytest.raises(KeyFileError) as err:
        load_signer(key)
    msg = str(err.value)
    assert str(key) in msg
    assert f"chmod 600 {key}" in msg
    assert f"{mode:04o}" in msg


def test_load_signer_accepts_0400(tmp_path: Path) -> None:
    signer = generate_keypair("k")
    key, _ = write_keypair(signer, tmp_path)
    os.chmod(key, 0o400)
    assert load_signer(key).text == signer.text


def test_load_signer_names_a_missing_or_malformed_file(tmp_path: Path) -> None:
    missing = tmp_path / "none.key"
    with pytest.raises(KeyFileError, match=re.escape(str(missing))):
        load_signer(missing)
    bad = tmp_path / "bad.key"
    bad.write_text("PRIVATE+KEY+x+00000000+AAAA\n", encoding="ascii")
    bad.chmod(0o600)
    with pytest.raises(KeyFileError, match=re.escape(str(bad))):
        load_signer(bad)


def test_load_verifier_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "none.pub"
    with pytest.raises(KeyFileError, match=re.escape(str(missing))):
        load_verifier(missing)
    bad = tmp_path / "bad.pub"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(KeyFileError, match=re.escape(str(bad))):
        load_verifier(bad)
