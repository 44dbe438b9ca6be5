"""``iort-plan send --kind output_factor`` and ``iort-plan override`` (plan/send.py,
plan/override.py): the signed commands they build (verified with the daemon's own checks),
what they refuse before signing, and the override body's validation, one line per error."""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from iortd.auditlog.command import NonceBook, check_command
from iortd.auditlog.keyring import parse_keyring
from iortd.auditlog.note import generate_keypair, write_keypair
from iortd.plan.cli import main
from iortd.plan.doserate import factor_date_problem
from iortd.plan.override import OverrideError, override_body

CURIE = generate_keypair("phys.curie")
RING = parse_keyring(
    (
        f'[[key]]\nholder = "phys.curie"\nname = "Staff"\nroles = ["physicist"]\n'
        f'public_key = "{CURIE.verifier.text}"\nvalid_from = "2026-01-01T00:00:00Z"\n'
        'valid_until = "2099-01-01T00:00:00Z"\n'
    ).encode(),
    Path("keyring.toml"),
)
RX_SHA = "ab" * 32
DELIVERY = "or-3-20261206T081500123456Z"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    key, _ = write_keypair(CURIE, tmp_path / "keys")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    return {"key": key, "inbox": inbox, "dir": tmp_path}


def signing(key: Path, inbox: Path) -> list[str]:
    return [
        *("--key", str(key), "--holder", "phys.curie"),
        *("--site", "site-a", "--room", "or-3", "--inbox", str(inbox)),
    ]


def the_command(inbox: Path) -> tuple[bytes, object]:
    [written] = list(inbox.iterdir())  # one whole file, no hidden leftover
    assert not written.name.startswith(".")
    raw = written.read_bytes()
    cmd = check_command(
        raw, RING, site="site-a", room="or-3", now=datetime.now(UTC), skew_s=60, seen=NonceBook(60)
    )
    written.unlink()
    return raw, cmd


def factor_file(directory: Path, *, by: str = "phys.curie", days_ago: int = 0) -> Path:
    day = (datetime.now(UTC) - timedelta(days=days_ago)).date().isoformat()
    out = directory / "factor.json"
    argv = ["factor", "--value", "1.012", "--measured-by", by, "--machine", "INTRABEAM s/n 1"]
    assert main([*argv, "--measured-on", day, "--out", str(out)]) == 0
    return out


def test_the_output_factor_is_sent_as_a_signed_command(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    factor = factor_file(files["dir"])
    capsys.readouterr()
    argv = ["send", "--kind", "output_factor", str(factor), *signing(files["key"], files["inbox"])]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    _, cmd = the_command(files["inbox"])
    assert cmd.kind == "output_factor"  # type: ignore[attr-defined]
    assert cmd.body == orjson.loads(factor.read_bytes())  # type: ignore[attr-defined]
    sha = hashlib.sha256(factor.read_bytes().rstrip(b"\n")).hexdigest()
    assert f"output factor sha256 {sha} sent into" in out
    assert cmd.nonce in out  # type: ignore[attr-defined]
    assert err == ""


@pytest.mark.parametrize(
    ("by", "days_ago", "said"),
    [
        ("phys-anna", 0, "measured by phys-anna, not by --holder phys.curie"),
        ("phys.curie", 3, "more than 1 day ago"),
        ("phys.curie", -2, "in the future"),
    ],
)
def test_a_factor_the_daemon_would_refuse_is_refused_before_signing(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], by: str, days_ago: int, said: str
) -> None:
    factor = factor_file(files["dir"], by=by, days_ago=days_ago)
    argv = ["send", "--kind", "output_factor", str(factor), *signing(files["key"], files["inbox"])]
    assert main(argv) == 1
    assert said in capsys.readouterr().err
    assert list(files["inbox"].iterdir()) == []


def test_a_file_that_is_not_a_factor_is_refused(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bad = files["dir"] / "factor.json"
    bad.write_text('{"v": 1, "output_factor": 1.2}')
    argv = ["send", "--kind", "output_factor", str(bad), *signing(files["key"], files["inbox"])]
    assert main(argv) == 1
    assert "output factor:" in capsys.readouterr().err
    assert list(files["inbox"].iterdir()) == []


@pytest.mark.parametrize(
    ("now", "measured_on", "reason"),
    [
        ("2026-12-06T12:00:00Z", "2026-12-06", None),
        ("2026-12-06T12:00:00Z", "2026-12-05", None),  # yesterday's is taken (not today's)
        ("2026-12-06T12:00:00Z", "2026-12-04", "too_old"),
        ("2026-12-06T12:00:00Z", "2026-12-07", "measured_in_future"),
        ("2026-12-06T23:58:00Z", "2026-12-07", None),  # within the skew of midnight
        ("2026-12-07T00:02:00Z", "2026-12-05", None),  # within the skew, the other side
        ("2026-12-07T00:06:00Z", "2026-12-05", "too_old"),
    ],
)
def test_the_day_rule_the_sender_and_the_daemon_share(
    now: str, measured_on: str, reason: str | None
) -> None:
    at = datetime.fromisoformat(now.replace("Z", "+00:00"))
    got = factor_date_problem(date.fromisoformat(measured_on), at, timedelta(minutes=5))
    assert (None if got is None else got[0]) == reason


# ---- override -------------------------------------------------------------------------


def test_the_override_body_is_exactly_the_contract() -> None:
    body = override_body(DELIVERY, RX_SHA, ["time", "dose"], "chamber reading confirms output")
    assert body == {
        "delivery_id": DELIVERY,
        "prescription_sha256": RX_SHA,
        "items": ["time", "dose"],
        "reason": "chamber reading confirms output",
    }


@pytest.mark.parametrize(
    ("delivery", "sha", "items", "reason", "said"),
    [
        ("", RX_SHA, ["dose"], "r", "--delivery"),
        ("or 3/x", RX_SHA, ["dose"], "r", "--delivery"),
        ("x" * 129, RX_SHA, ["dose"], "r", "--delivery"),
        (DELIVERY, "AB" * 32, ["dose"], "r", "--prescription: must be 64 lower-case hex"),
        (DELIVERY, "ab" * 31, ["dose"], "r", "--prescription: must be 64 lower-case hex"),
        (DELIVERY, RX_SHA, [], "r", "--item: give at least one"),
        (DELIVERY, RX_SHA, ["dose", "dose"], "r", "--item: dose given twice"),
        (DELIVERY, RX_SHA, ["expired"], "r", "--item: expired cannot be overridden"),
        (DELIVERY, RX_SHA, ["colour"], "r", "--item: colour is not a verification item"),
        (DELIVERY, RX_SHA, ["dose"], "", "--reason: must be 1-300"),
        (DELIVERY, RX_SHA, ["dose"], "   ", "--reason: must be 1-300"),
        (DELIVERY, RX_SHA, ["dose"], "x" * 301, "--reason: must be 1-300"),
        (DELIVERY, RX_SHA, ["dose"], "two\nlines", "--reason: must be 1-300"),
    ],
)
def test_an_override_body_out_of_bounds_is_one_clear_line(
    delivery: str, sha: str, items: list[str], reason: str, said: str
) -> None:
    with pytest.raises(OverrideError) as exc:
        override_body(delivery, sha, items, reason)
    assert said in str(exc.value)
    assert "\n" not in str(exc.value)


def override_argv(files: dict[str, Path], *extra: str) -> list[str]:
    return [
        *("override", "--delivery", DELIVERY, "--prescription", RX_SHA),
        *extra,
        *signing(files["key"], files["inbox"]),
    ]


def test_the_override_is_sent_as_a_signed_command(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = override_argv(
        files, "--item", "dose", "--item", "time", "--reason", "preset checked on the console"
    )
    assert main(argv) == 0
    out, err = capsys.readouterr()
    _, cmd = the_command(files["inbox"])
    assert cmd.kind == "override"  # type: ignore[attr-defined]
    assert cmd.body == {  # type: ignore[attr-defined]
        "delivery_id": DELIVERY,
        "prescription_sha256": RX_SHA,
        "items": ["dose", "time"],
        "reason": "preset checked on the console",
    }
    assert f"override of dose, time for delivery {DELIVERY} sent into" in out
    assert cmd.nonce in out  # type: ignore[attr-defined]
    assert err == ""


def test_an_override_out_of_bounds_is_a_usage_error_and_nothing_is_sent(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(override_argv(files, "--item", "signature", "--reason", "r")) == 2
    err = capsys.readouterr().err
    assert err.startswith("iort-plan: --item: signature cannot be overridden")
    assert err.count("\n") == 1
    assert list(files["inbox"].iterdir()) == []
