"""The TLS context of an MQTT client (the daemon's sink and the dashboard alike)."""

from __future__ import annotations

import ssl
from pathlib import Path

__all__ = ["client_tls_context"]


def client_tls_context(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> ssl.SSLContext:
    """Verify the broker against ``ca_file`` (the system's CAs when None) and present a
    client certificate when both its files are given. Reads files: call off the loop."""
    ctx = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
    if cert_file is not None and key_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx
