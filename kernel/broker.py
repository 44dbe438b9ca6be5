"""One broker-settings type for every MQTT client of iortd: the daemon's MQTT sink (built
from the ``[mqtt]`` table) and the dashboard (built from its command line).

A broker is named by a URL, ``mqtt://HOST[:PORT]`` (plain TCP, port 1883 by default) or
``mqtts://HOST[:PORT]`` (TLS, port 8883; the ports IANA registered for MQTT). A URL never
carries credentials: the user name is a setting of its own, and the password is read from
a file or an environment variable by whoever builds the settings, so that it is never in
a TOML file, a command line (``ps``), or an error message. An error about a URL repeats
it without its query or fragment (where a token may sit) and at most 200 characters of
it: errors go to stderr, which a service manager keeps in its journal.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from iortd.kernel.tls import client_tls_context

__all__ = ["BrokerSettings", "BrokerUrlError", "parse_broker_url", "shown_url"]

EXPECTED = "expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
MQTT_PORT = 1883
MQTTS_PORT = 8883
_SHOWN_MAX = 200
# Userinfo (``user:password@``, also an empty user) in the authority part of a URL.
_USERINFO = re.compile(r"^[^/?#]*//[^/?#]*@")


class BrokerUrlError(ValueError):
    """A broker URL that cannot be used; the message says what is expected."""


def shown_url(url: str) -> str:
    """``url`` as an error may repeat it: without a query or fragment, at most 200
    characters."""
    shown = re.split(r"[?#]", url, maxsplit=1)[0]
    return shown if len(shown) <= _SHOWN_MAX else shown[:_SHOWN_MAX] + "..."


def parse_broker_url(url: str, *, credentials_hint: str) -> tuple[str, int, bool]:
    """``(host, port, tls)`` of a broker URL. ``credentials_hint`` says where the user
    name and password go instead (the config keys, or the command-line options)."""
    if _USERINFO.search(url):
        # Refused before anything else, and never repeated.
        raise BrokerUrlError(
            f"a URL must not carry credentials (user:password@); {credentials_hint}"
        )
    got = f"got {shown_url(url)!r}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BrokerUrlError(f"{EXPECTED}; {exc}; {got}") from None
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or port == 0:
        raise BrokerUrlError(f"{EXPECTED}; {got}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BrokerUrlError(f"{EXPECTED}; {got}")
    tls = parts.scheme == "mqtts"
    return parts.hostname, port or (MQTTS_PORT if tls else MQTT_PORT), tls


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Where and how to connect; the password already read from its file or variable.

    ``client_id``: the MQTT client identifier, when the client needs a stable one (the
    daemon's derives from its audit log, so that two logs never share one); None lets the
    client make its own. ``prefix``: the first level of every topic (``{prefix}/v1/...``).
    """

    host: str
    port: int
    tls: bool
    prefix: str = "iort"
    client_id: str | None = None
    keepalive_s: int = 10
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @property
    def url(self) -> str:
        """The broker's URL, as shown in logs (never with credentials)."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def tls_context(self) -> ssl.SSLContext | None:
        """The client's TLS context (None for plain TCP). Reads files: call off the loop."""
        if not self.tls:
            return None
        return client_tls_context(self.ca_file, self.cert_file, self.key_file)
