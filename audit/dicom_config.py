"""The configuration of DICOM destinations (issue 23): AE titles, listen addresses and the
``[[sinks.options.destinations]]`` tables of a ``type = "dicom"`` sink.

Pure validation, no DICOM library: the sink's factory validates a site's config with it
before anything is started, and audit/dicom_net.py (which re-exports all of it) uses the
``Destination`` it gives. Every error names the key path (``where.destinations[i].KEY``)
and what to do; the values checked are AE titles, host names and file paths, never
patient data.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_TIMEOUT_S",
    "Destination",
    "DestinationError",
    "parse_ae_title",
    "parse_destinations",
    "parse_listen",
]

MAX_TIMEOUT_S = 600.0
_KEYS = frozenset(
    {"name", "ae_title", "host", "port", "tls_ca", "tls_cert", "tls_key", "commitment", "timeout_s"}
)
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


class DestinationError(ValueError):
    """A destination table (or an AE title, a listen address) that cannot be used; the
    message names the key path (``where.destinations[i].KEY``) and what to do."""


@dataclass(frozen=True, slots=True)
class Destination:
    """One ``[[sinks.options.destinations]]`` table of a ``type = "dicom"`` sink."""

    name: str
    ae_title: str
    host: str
    port: int
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    commitment: bool = False
    timeout_s: float = 30.0

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None


def parse_ae_title(value: Any, where: str) -> str:
    """An AE title (PS3.5 6.2, VR AE): 1-16 characters of printable ASCII without a
    backslash, not only spaces; leading and trailing spaces are not significant and are
    removed."""
    if not isinstance(value, str):
        raise DestinationError(f'{where}: must be a string (an AE title such as "IORTD_OR7")')
    text = value.strip(" ")
    if not text or len(value) > 16 or not all(" " <= c <= "~" and c != "\\" for c in value):
        raise DestinationError(
            f"{where}: {value!r} is not an AE title: 1 to 16 characters of printable ASCII, "
            "no backslash (PS3.5 6.2)"
        )
    return text


def parse_listen(value: Any, where: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) of a listener, port 1-65535."""
    if not isinstance(value, str):
        raise DestinationError(f'{where}: must be a string such as "127.0.0.1:11113"')
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not _host_ok(host):
        raise DestinationError(
            f"{where}: {value!r} is not HOST:PORT (an address or name, a port 1-65535; "
            "[::1]:11113 for IPv6)"
        )
    return host, int(port)


def _host_ok(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return bool(_HOST.fullmatch(host))
    return True


def _path(value: Any, where: str, base: Path | None) -> Path:
    if not isinstance(value, str) or not value or "\x00" in value:
        raise DestinationError(f"{where}: must be the path of a file (a non-empty string)")
    path = Path(value)
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        raise DestinationError(f"{where}: {path} is not a readable file (give its path)")
    return path


def _one(item: Any, at: str, base: Path | None) -> Destination:
    if not isinstance(item, Mapping):
        raise DestinationError(f"{at}: must be a table ([[...destinations]] with name, ...)")
    unknown = sorted(set(item) - _KEYS)
    if unknown:
        raise DestinationError(
            f"{at}.{unknown[0]}: unknown key (known: {', '.join(sorted(_KEYS))})"
        )
    for needed in ("name", "ae_title", "host", "port"):
        if needed not in item:
            raise DestinationError(f"{at}.{needed}: missing (each destination needs it)")
    name = item["name"]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise DestinationError(
            f"{at}.name: {name!r} is not a name: 1-32 of a-z 0-9 _ -, starting with a letter "
            "or digit (it names the destination in records and on the command line)"
        )
    host = item["host"]
    if not isinstance(host, str) or not _host_ok(host):
        raise DestinationError(f"{at}.host: {host!r} is not a host name or IP address")
    port = item["port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise DestinationError(f"{at}.port: {port!r} is not a TCP port (1-65535; 104 or 11112)")
    timeout = item.get("timeout_s", 30.0)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or not 0 < timeout <= MAX_TIMEOUT_S
    ):
        raise DestinationError(
            f"{at}.timeout_s: {timeout!r} must be a number of seconds in (0, 600]"
        )
    commitment = item.get("commitment", False)
    if not isinstance(commitment, bool):
        raise DestinationError(f"{at}.commitment: must be true or false")
    ca, cert, key = (
        _path(item[k], f"{at}.{k}", base) if k in item else None
        for k in ("tls_ca", "tls_cert", "tls_key")
    )
    if (cert is None) != (key is None):
        raise DestinationError(
            f"{at}.{'tls_key' if key is None else 'tls_cert'}: missing; tls_cert and tls_key "
            "come together (our client certificate and its key)"
        )
    dest = Destination(
        name=name,
        ae_title=parse_ae_title(item["ae_title"], f"{at}.ae_title"),
        host=host,
        port=port,
        tls_ca=ca,
        tls_cert=cert,
        tls_key=key,
        commitment=commitment,
        timeout_s=float(timeout),
    )
    if dest.tls and dest.commitment and cert is None:
        raise DestinationError(
            f"{at}.tls_cert: needed with TLS and commitment = true: the peer sends its "
            "N-EVENT-REPORT to our listener over TLS, which needs our certificate and key"
        )
    if dest.tls and dest.commitment and ca is None:
        raise DestinationError(
            f"{at}.tls_ca: needed with TLS and commitment = true: our listener takes the "
            "peer's N-EVENT-REPORT only with a certificate signed by this CA (the system's "
            "CAs would let any holder of a public certificate in)"
        )
    return dest


def parse_destinations(
    options: Mapping[str, Any], where: str, *, base: Path | None = None
) -> tuple[Destination, ...]:
    """The ``destinations`` of a dicom sink's ``options`` (at least one, names unique).

    ``where`` is the key path of the options (``sinks[0].options``): errors name
    ``where.destinations[i].KEY``. ``base``: the directory relative TLS file paths are
    resolved against (the config file's). Raises DestinationError."""
    raw = options.get("destinations")
    if not isinstance(raw, Sequence) or isinstance(raw, str | bytes) or not raw:
        raise DestinationError(
            f"{where}.destinations: missing or empty; add at least one "
            "[[...options.destinations]] table (name, ae_title, host, port)"
        )
    out = tuple(_one(item, f"{where}.destinations[{i}]", base) for i, item in enumerate(raw))
    seen: set[str] = set()
    for i, d in enumerate(out):
        if d.name in seen:
            raise DestinationError(f"{where}.destinations[{i}].name: {d.name!r} is used twice")
        seen.add(d.name)
    return out
