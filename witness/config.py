"""iort-witness's configuration: one TOML file, all of it checked before anything starts.

::

    [witness]
    listen = "0.0.0.0:7380"            # HOST:PORT ([::]:7380 for IPv6; port 0: any free one)
    key_file = "witness.key"           # iort-witness keygen; mode 0600
    database = "witness.sqlite"        # the state (WAL files beside it)
    request_timeout_s = 10             # optional: reading a request, deciding it
    max_body_bytes = 65536             # optional: larger requests get 413

    [[logs]]                           # one per log witnessed
    origin = "iortd/site-a/or-1/5f0c..."         # the checkpoints' first line
    vkeys = ["iortd-or-1+1a2b3c4d+AbC..."]       # the log's verifier key(s) (NAME.pub)

Relative paths are from the configuration file's folder. Unknown keys, a missing key, a
malformed verifier key or a repeated origin are errors naming the file and the key; the
command then exits 2. Several ``vkeys`` let a log's key be rotated: a checkpoint signed
by any of them is accepted. The key file is read (and its mode checked) here too, so a
witness never starts without the key it would sign with.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from iortd.auditlog.cosignature import CosignerKey, load_cosigner
from iortd.auditlog.note import NoteError, Verifier, parse_vkey

__all__ = ["ConfigError", "WitnessConfig", "load_config", "parse_listen"]

_WITNESS_KEYS: Final = {"listen", "key_file", "database", "request_timeout_s", "max_body_bytes"}
_LOG_KEYS: Final = {"origin", "vkeys"}


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key."""


@dataclass(frozen=True, slots=True)
class WitnessConfig:
    path: Path
    listen: tuple[str, int]
    key: CosignerKey
    key_file: Path
    database: Path
    logs: Mapping[str, tuple[Verifier, ...]]
    request_timeout_s: float = 10.0
    max_body_bytes: int = 64 * 1024


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` with a literal IP address; ValueError if not."""
    host, sep, port_s = text.rpartition(":")
    if not sep or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:7380 or [::1]:7380")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    ipaddress.ip_address(host)  # ValueError for a name: the witness binds an address
    return host, int(port_s)


def _unknown(table: Mapping[str, Any], allowed: set[str], where: str, path: Path) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(
                f"{path}: unknown key {where}{key}; allowed: {', '.join(sorted(allowed))}"
            )


def _logs(raw: object, path: Path) -> dict[str, tuple[Verifier, ...]]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}: [[logs]]: at least one log to witness is needed")
    logs: dict[str, tuple[Verifier, ...]] = {}
    for i, entry in enumerate(raw):
        where = f"logs[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: {where}: expected a table")
        _unknown(entry, _LOG_KEYS, f"{where}.", path)
        origin = entry.get("origin")
        if not isinstance(origin, str) or not origin or not origin.isprintable():
            raise ConfigError(f"{path}: {where}.origin: a non-empty line of text is needed")
        if origin in logs:
            raise ConfigError(f"{path}: {where}.origin {origin!r} is configured twice")
        vkeys = entry.get("vkeys")
        if not isinstance(vkeys, list) or not vkeys or not all(isinstance(v, str) for v in vkeys):
            raise ConfigError(
                f"{path}: {where}.vkeys: a list of the log's verifier keys is needed "
                "(the line of its NAME.pub)"
            )
        keys = []
        for j, text in enumerate(vkeys):
            try:
                keys.append(parse_vkey(text))
            except NoteError as exc:
                raise ConfigError(f"{path}: {where}.vkeys[{j}]: {exc}") from None
        logs[origin] = tuple(keys)
    return logs


def load_config(path: Path) -> WitnessConfig:
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    _unknown(data, {"witness", "logs"}, "", path)
    w = data.get("witness")
    if not isinstance(w, dict):
        raise ConfigError(f"{path}: a [witness] table is needed")
    _unknown(w, _WITNESS_KEYS, "witness.", path)
    for name in ("listen", "key_file", "database"):
        if not isinstance(w.get(name), str) or not w[name]:
            raise ConfigError(f"{path}: witness.{name}: a non-empty string is needed")
    try:
        listen = parse_listen(w["listen"])
    except ValueError as exc:
        raise ConfigError(f"{path}: witness.listen {w['listen']!r}: {exc}") from None
    timeout = w.get("request_timeout_s", 10.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 300:
        raise ConfigError(f"{path}: witness.request_timeout_s: a number of seconds, 0 < s <= 300")
    limit = w.get("max_body_bytes", 64 * 1024)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1024 <= limit <= 1 << 20:
        raise ConfigError(f"{path}: witness.max_body_bytes: an integer, 1024 .. 1048576")
    base = path.parent
    key_file = base / w["key_file"]
    try:
        key = load_cosigner(key_file)
    except NoteError as exc:
        raise ConfigError(f"{path}: witness.key_file: {exc}") from None
    return WitnessConfig(
        path=path,
        listen=listen,
        key=key,
        key_file=key_file,
        database=base / w["database"],
        logs=_logs(data.get("logs"), path),
        request_timeout_s=float(timeout),
        max_body_bytes=limit,
    )
