"""What the daemon says when a TLS broker closes the handshake (daemon/mqtt/sink.py).

A broker that requires a client certificate the daemon does not send ends the handshake;
whether the client then reads the broker's alert ("certificate required") or only a
closed socket ("EOF occurred in violation of protocol") depends on timing (seen in a CI
run on a loaded machine). The journal line must name the likely cause either way.
"""

from __future__ import annotations

from pathlib import Path

from iortd.daemon.mqtt.sink import _tls_hint
from iortd.kernel.broker import BrokerSettings

EOF_ = "transport error: failed to receive on socket: EOF occurred in violation of protocol"


def test_a_closed_tls_handshake_without_a_client_certificate_names_the_likely_cause() -> None:
    said = _tls_hint(BrokerSettings("127.0.0.1", 8883, tls=True), EOF_)
    assert said.startswith(EOF_)
    assert "client certificate" in said
    assert "cert_file" in said


def test_the_hint_only_where_it_applies() -> None:
    with_cert = BrokerSettings(
        "127.0.0.1", 8883, tls=True, cert_file=Path("c.pem"), key_file=Path("k.pem")
    )
    assert _tls_hint(with_cert, EOF_) == EOF_
    assert _tls_hint(BrokerSettings("127.0.0.1", 1883, tls=False), EOF_) == EOF_
    alert = "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required"
    assert _tls_hint(BrokerSettings("127.0.0.1", 8883, tls=True), alert) == alert
    refused = "[Errno 111] Connection refused"
    assert _tls_hint(BrokerSettings("127.0.0.1", 8883, tls=True), refused) == refused
