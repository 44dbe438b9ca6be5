"""The DICOM destinations of a ``type = "dicom"`` sink (audit/dicom_config.py): every error
names the key path and what to do; what passes is a typed Destination."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from iortd.audit.dicom_config import (
    Destination,
    DestinationError,
    parse_ae_title,
    parse_destinations,
    parse_listen,
)

WHERE = "sinks[1].options"


def one(**over: Any) -> dict[str, Any]:
    table: dict[str, Any] = {"name": "ois", "ae_title": "OIS_SCP", "host": "10.0.0.5", "port": 104}
    table.update(over)
    return {"destinations": [table]}


def test_a_minimal_destination_takes_the_defaults() -> None:
    (d,) = parse_destinations(one(), WHERE)
    assert d == Destination("ois", "OIS_SCP", "10.0.0.5", 104)
    assert d.timeout_s == 30.0
    assert not d.commitment
    assert not d.tls


def test_tls_files_are_resolved_against_the_config_directory(tmp_path: Path) -> None:
    for name in ("ca.pem", "me.pem", "me.key"):
        (tmp_path / name).write_text("x")
    opts = one(tls_ca="ca.pem", tls_cert="me.pem", tls_key="me.key", commitment=True)
    (d,) = parse_destinations(opts, WHERE, base=tmp_path)
    assert (d.tls_ca, d.tls_cert, d.tls_key) == (
        tmp_path / "ca.pem",
        tmp_path / "me.pem",
        tmp_path / "me.key",
    )
    assert d.tls


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, f"{WHERE}.destinations: missing or empty"),
        ({"destinations": []}, f"{WHERE}.destinations: missing or empty"),
        ({"destinations": ["ois"]}, f"{WHERE}.destinations[0]: must be a table"),
        (one(colour="red"), f"{WHERE}.destinations[0].colour: unknown key"),
        (one(port=0), f"{WHERE}.destinations[0].port: 0 is not a TCP port"),
        (one(port=True), f"{WHERE}.destinations[0].port"),
        (one(port="104"), f"{WHERE}.destinations[0].port"),
        (one(ae_title="A" * 17), f"{WHERE}.destinations[0].ae_title: 'AAAAAAAAAAAAAAAAA' is not"),
        (one(ae_title="OIS\\SCP"), f"{WHERE}.destinations[0].ae_title"),
        (one(ae_title="   "), f"{WHERE}.destinations[0].ae_title"),
        (one(ae_title="ÖIS"), f"{WHERE}.destinations[0].ae_title"),
        (one(host="10.0.0.5; rm"), f"{WHERE}.destinations[0].host"),
        (one(name="OIS main"), f"{WHERE}.destinations[0].name"),
        (one(timeout_s=0), f"{WHERE}.destinations[0].timeout_s"),
        (one(timeout_s=float("nan")), f"{WHERE}.destinations[0].timeout_s"),
        (one(timeout_s=601), f"{WHERE}.destinations[0].timeout_s"),
        (one(commitment="yes"), f"{WHERE}.destinations[0].commitment: must be true or false"),
        (one(tls_ca="/nonexistent/ca.pem"), f"{WHERE}.destinations[0].tls_ca: /nonexistent"),
    ],
)
def test_each_bad_value_is_named_by_its_key_path(options: dict[str, Any], message: str) -> None:
    with pytest.raises(DestinationError) as caught:
        parse_destinations(options, WHERE)
    assert str(caught.value).startswith(message), str(caught.value)


def test_missing_keys_and_duplicate_names() -> None:
    for key in ("name", "ae_title", "host", "port"):
        table = one()["destinations"][0]
        del table[key]
        with pytest.raises(DestinationError, match=rf"destinations\[0\]\.{key}: missing"):
            parse_destinations({"destinations": [table]}, WHERE)
    twice = {"destinations": [one()["destinations"][0], one(port=11112)["destinations"][0]]}
    with pytest.raises(DestinationError, match=r"destinations\[1\]\.name: 'ois' is used twice"):
        parse_destinations(twice, WHERE)


def test_client_certificate_and_key_come_together(tmp_path: Path) -> None:
    (tmp_path / "me.pem").write_text("x")
    (tmp_path / "ca.pem").write_text("x")
    with pytest.raises(DestinationError, match=r"\.tls_key: missing; tls_cert and tls_key"):
        parse_destinations(one(tls_cert="me.pem"), WHERE, base=tmp_path)
    # TLS with commitment: the peer reports to our listener over TLS, which needs our cert
    with pytest.raises(DestinationError, match=r"\.tls_cert: needed with TLS and commitment"):
        parse_destinations(one(tls_ca="ca.pem", commitment=True), WHERE, base=tmp_path)
    # ... and the CA that signs the peer's certificate: the system's CAs would let any
    # holder of a public certificate report to the listener
    (tmp_path / "me.key").write_text("x")
    with pytest.raises(DestinationError, match=r"\.tls_ca: needed with TLS and commitment"):
        parse_destinations(
            one(tls_cert="me.pem", tls_key="me.key", commitment=True), WHERE, base=tmp_path
        )


def test_ae_titles_and_listen_addresses() -> None:
    assert parse_ae_title(" IORTD_OR7 ", "x") == "IORTD_OR7"
    with pytest.raises(DestinationError, match="x: must be a string"):
        parse_ae_title(7, "x")
    assert parse_listen("127.0.0.1:11113", "y") == ("127.0.0.1", 11113)
    assert parse_listen("[::1]:104", "y") == ("::1", 104)
    assert parse_listen("or7-host.example:104", "y") == ("or7-host.example", 104)
    for bad in ("127.0.0.1", "127.0.0.1:0", ":104", "a b:104", "127.0.0.1:70000"):
        with pytest.raises(DestinationError, match=r"y: .* is not HOST:PORT"):
            parse_listen(bad, "y")
