"""The fabric spec (FABRIC.toml): which sites and rooms there are, where the central broker
is, and the few figures the bridge queues are sized from. Pydantic models, strict, frozen;
an unknown key is an error, and every error names its key.

Identifiers become topic levels, user names and file names, so they are lower-case slugs;
a leading ``_`` is reserved for the fabric's own topics (``_bridge``, ``_ingest``). No
password has a key: accounts' passwords are generated into secret files by the writer
(secrets.py), and the bridges authenticate by client certificate.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from iortd.kernel.files import FileReadError, read_small_file

__all__ = [
    "Account",
    "BridgeSizing",
    "Central",
    "FabricSpec",
    "Role",
    "Site",
    "SpecError",
    "SpecIssue",
    "load_spec",
    "parse_spec",
]

MAX_SPEC_BYTES = 1024 * 1024
_SLUG = r"^[a-z0-9][a-z0-9-]{0,62}$"
Slug = Annotated[str, Field(pattern=_SLUG)]
# A path written into mosquitto.conf: no quoting exists there, so no whitespace at all.
_CONF_PATH = r"^/[^\s\x00]*$"
ConfPath = Annotated[str, Field(pattern=_CONF_PATH, max_length=4095)]
Port = Annotated[int, Field(ge=1, le=65535)]
_HOST = r"^[A-Za-z0-9][A-Za-z0-9.:-]{0,252}$"
Host = Annotated[str, Field(pattern=_HOST)]

# Rooms' (iortd-{site}-{room}) and bridges' (bridge-{site}) user names.
_RESERVED_USERS = ("iortd-", "bridge-")

_MEANING = {
    _SLUG: "a lower-case slug (a-z, 0-9 and '-', at most 63 characters)",
    _CONF_PATH: "an absolute path without spaces (mosquitto.conf cannot quote)",
    _HOST: "a host name or IP address",
}


class Role(StrEnum):
    """What an account may do; the ACL lines of each are in render.py."""

    DASHBOARD = "dashboard"  # read every room in scope; send sign-offs and acknowledgements
    COMMANDS = "commands"  # send the physicists' commands (iort-plan send); read events
    INGEST = "ingest"  # read every room; send replay requests; its own online state
    OBSERVER = "observer"  # read only


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Account(_Model):
    """A consumer's broker account (not a room's: rooms get theirs from ``rooms``)."""

    name: Slug
    role: Role = Field(strict=False)


class BridgeSizing(_Model):
    """The figures the queue limits and the bridge timers come from (docs/fabric.md)."""

    # How long a site must ride out a central outage (or a WAN cut) without the broker
    # dropping anything: the site's queue for its bridge holds this much.
    outage_s: int = Field(default=3600, ge=60, le=7 * 86400)
    # Messages per second one room publishes at most while delivering (10 Hz telemetry
    # plus the state topics and events), and a message's size on the wire at most.
    room_msgs_per_s: float = Field(default=15.0, gt=0, le=10_000)
    message_bytes: int = Field(default=1024, ge=128, le=1024 * 1024)
    # How long a durable consumer at the centre (iort-ingest) may be away.
    consumer_outage_s: int = Field(default=3600, ge=60, le=7 * 86400)
    keepalive_s: int = Field(default=5, ge=2, le=600)
    restart_timeout_s: tuple[int, int] = Field(default=(1, 10), strict=False)
    # Persistence snapshots after this many changes (autosave_on_changes true).
    autosave_changes: int = Field(default=100, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _restart(self) -> Self:
        base, cap = self.restart_timeout_s
        if not 1 <= base <= cap <= 3600:
            raise ValueError("restart_timeout_s: [base, cap] with 1 <= base <= cap <= 3600 seconds")
        return self


class _Broker(_Model):
    bind: Host = "0.0.0.0"  # noqa: S104 - a broker serves the network; the spec says which
    persistence_dir: ConfPath = "/var/lib/mosquitto/"
    # Where the generated acl and passwd files will be installed on the broker's host.
    conf_dir: ConfPath = "/etc/mosquitto/iortd"
    # A plain listener on 127.0.0.1 for tools on the broker's own host (same accounts).
    local_port: Port | None = None
    # The user Mosquitto drops to when started as root; it must own persistence_dir.
    user: Slug = "mosquitto"
    # None logs to stderr (the journal under systemd).
    log_file: ConfPath | None = None
    cafile: ConfPath
    certfile: ConfPath
    keyfile: ConfPath
    accounts: tuple[Account, ...] = Field(default=(), strict=False)

    @model_validator(mode="after")
    def _unique_accounts(self) -> Self:
        names = [a.name for a in self.accounts]
        for n in names:
            if n.startswith(_RESERVED_USERS):
                raise ValueError(
                    f"accounts: name {n!r}: names starting with "
                    f"{' or '.join(repr(r) for r in _RESERVED_USERS)} are the rooms' and "
                    "bridges' own; choose another"
                )
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"accounts: name {dup[0]!r} given twice")
        return self


class Central(_Broker):
    """The central broker: a TLS listener for the sites' bridges (client certificates)
    and a TLS listener for consumers (passwords)."""

    # The name the sites connect to: it must be in the central certificate.
    address: Host
    bridge_port: Port = 8884
    client_port: Port = 8883

    @model_validator(mode="after")
    def _ports(self) -> Self:
        ports = [self.bridge_port, self.client_port, self.local_port]
        if len({p for p in ports if p is not None}) != len([p for p in ports if p is not None]):
            raise ValueError("bridge_port, client_port and local_port must all differ")
        return self


class Site(_Broker):
    """A site broker: its rooms' daemons and site consumers connect to ``port``; its
    bridge connects to the central broker with ``bridge_certfile`` (whose common name must
    be ``bridge-{id}``: the central broker takes it as the bridge's user name)."""

    id: Slug
    port: Port = 8883
    bridge_certfile: ConfPath
    bridge_keyfile: ConfPath
    rooms: tuple[Slug, ...] = Field(min_length=1, strict=False)

    @model_validator(mode="after")
    def _unique_rooms(self) -> Self:
        if self.local_port == self.port:
            raise ValueError("port and local_port must differ")
        if dup := sorted({r for r in self.rooms if self.rooms.count(r) > 1}):
            raise ValueError(f"rooms: {dup[0]!r} given twice")
        return self


class FabricSpec(_Model):
    prefix: Slug = "iort"
    central: Central
    bridge: BridgeSizing = BridgeSizing()
    sites: tuple[Site, ...] = Field(min_length=1, strict=False)

    @model_validator(mode="after")
    def _unique_sites(self) -> Self:
        ids = [s.id for s in self.sites]
        if dup := sorted({i for i in ids if ids.count(i) > 1}):
            raise ValueError(f"sites: id {dup[0]!r} given twice")
        return self

    @property
    def room_count(self) -> int:
        return sum(len(s.rooms) for s in self.sites)


class SpecIssue(tuple[str, str]):
    """``(key, message)``: ``key`` is the dotted path into the TOML (``sites[1].rooms``)."""

    __slots__ = ()

    @property
    def key(self) -> str:
        return self[0]

    @property
    def message(self) -> str:
        return self[1]


class SpecError(Exception):
    """The spec cannot be used; ``issues`` name each key and what is wrong with it."""

    def __init__(self, path: Path | None, issues: Sequence[SpecIssue]) -> None:
        self.path = path
        self.issues = tuple(issues)
        where = str(path) if path is not None else "fabric spec"
        super().__init__(
            "\n".join(f"{where}: {i.key + ': ' if i.key else ''}{i.message}" for i in issues)
        )


def load_spec(path: Path) -> FabricSpec:
    """Read and validate FABRIC.toml; raise SpecError naming every problem."""
    try:
        raw = read_small_file(path, MAX_SPEC_BYTES, expected="a TOML file")
    except FileReadError as exc:
        raise SpecError(path, [SpecIssue(("", exc.reason))]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise SpecError(path, [SpecIssue(("", "not UTF-8 text; save it as UTF-8"))]) from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(path, [SpecIssue(("", f"TOML syntax error: {exc}"))]) from None
    return parse_spec(data, path)


def parse_spec(data: Mapping[str, Any], path: Path | None = None) -> FabricSpec:
    for section in ("central", *(f"sites[{i}]" for i in range(len(data.get("sites", ()))))):
        table = _table(data, section)
        for key in ("password", "password_file", "remote_password"):
            if isinstance(table, dict) and key in table:
                msg = (
                    "no password goes in the spec: accounts' passwords are generated into "
                    "secret files beside the configs, bridges log in with their certificate"
                )
                raise SpecError(path, [SpecIssue((f"{section}.{key}", msg))])
    try:
        return FabricSpec.model_validate(data)
    except ValidationError as exc:
        issues = [
            SpecIssue((_key_path(e["loc"]), _describe(e))) for e in exc.errors(include_url=False)
        ]
        raise SpecError(path, issues) from None


def _table(data: Mapping[str, Any], section: str) -> object:
    if section.startswith("sites["):
        sites = data.get("sites")
        index = int(section[6:-1])
        return sites[index] if isinstance(sites, list) else None
    return data.get(section)


def _key_path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = part
        elif part.startswith(("function-after", "function-", "tuple[")):
            continue  # pydantic's validator frames, not keys
        else:
            out += f".{part}"
    return out


def _describe(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key (check its spelling against config/fabric/fabric.example.toml)"
    if kind == "missing":
        return "required key is missing"
    if kind == "string_pattern_mismatch":
        pattern = str(err.get("ctx", {}).get("pattern", ""))
        return f"expected {_MEANING.get(pattern, pattern)}; got {err['input']!r}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    got = err.get("input")
    if kind != "value_error" and not isinstance(got, dict | list):
        shown = repr(got)
        return f"{msg}; got {shown if len(shown) <= 80 else shown[:80] + '...'}"
    return msg
