"""The broker fabric: a Mosquitto per site bridged to a central Mosquitto, configured from
one small spec (FABRIC.toml) by ``iortd fabric-config`` (cli.py) or by `write_fabric`.

The spec (spec.py) lists the sites and their rooms, the central broker, the TLS material's
paths and the figures the queues are sized from; render.py turns it into each broker's
mosquitto.conf and ACL (and says why each setting); secrets.py makes the accounts'
passwords and the brokers' password files. Output, under the out directory:

    central/mosquitto.conf, central/acl, central/passwd
    sites/{site}/mosquitto.conf, sites/{site}/acl, sites/{site}/passwd
    secrets/central/{account}.password          (0700 directory, 0600 files)
    secrets/{site}/{account}.password           (a room's is iortd-{site}-{room}.password)

The same spec and secrets give the same bytes: `plan` is pure apart from reading what is
there, so ``--check`` compares a deployment with its spec. The bridge is a transport, not
the guarantee: no-loss is the rooms' outboxes and replay (docs/fabric.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from iortd.kernel.durable import write_atomic
from iortd.kernel.files import FileReadError, read_small_file

from .render import (
    BRIDGE_STATE,
    QueueLimits,
    bridge_state_topic,
    bridge_user,
    central_acl,
    central_conf,
    central_limits,
    room_user,
    site_acl,
    site_conf,
    site_limits,
)
from .secrets import PasswordError, hash_line, load_or_make_password, matches
from .spec import FabricSpec, Role, SpecError, SpecIssue, load_spec, parse_spec

__all__ = [
    "BRIDGE_STATE",
    "BrokerFiles",
    "FabricFiles",
    "FabricSpec",
    "PasswordError",
    "QueueLimits",
    "Role",
    "SpecError",
    "SpecIssue",
    "bridge_state_topic",
    "bridge_user",
    "check_fabric",
    "load_spec",
    "parse_spec",
    "plan",
    "room_user",
    "write_fabric",
]

_MAX_PASSWD_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class BrokerFiles:
    """One broker's generated files; ``passwords`` maps each user name to its secret file."""

    name: str
    conf: Path
    acl: Path
    passwd: Path
    limits: QueueLimits
    passwords: Mapping[str, Path] = field(default_factory=dict)

    def password_of(self, user: str) -> str:
        """The password of ``user`` (tests and tools reading their own secret file)."""
        return self.passwords[user].read_text("ascii").strip()


@dataclass(frozen=True, slots=True)
class FabricFiles:
    root: Path
    central: BrokerFiles
    sites: Mapping[str, BrokerFiles]

    def all(self) -> list[BrokerFiles]:
        return [self.central, *self.sites.values()]


def _users(spec: FabricSpec) -> dict[str, list[str]]:
    """Password-file users per broker (``central`` or a site id), in file order."""
    out = {"central": [a.name for a in spec.central.accounts]}
    for s in spec.sites:
        out[s.id] = [room_user(s.id, r) for r in s.rooms] + [a.name for a in s.accounts]
    return out


def _layout(spec: FabricSpec, root: Path) -> FabricFiles:
    users = _users(spec)

    def broker(name: str, d: Path, limits: QueueLimits) -> BrokerFiles:
        secrets = root / "secrets" / name
        pw = {u: secrets / f"{u}.password" for u in users[name]}
        return BrokerFiles(name, d / "mosquitto.conf", d / "acl", d / "passwd", limits, pw)

    central = broker("central", root / "central", central_limits(spec))
    sites = {s.id: broker(s.id, root / "sites" / s.id, site_limits(spec, s)) for s in spec.sites}
    return FabricFiles(root, central, sites)


def _passwd_text(files: BrokerFiles, create: bool) -> tuple[str, list[Path]]:
    """The password file's text, and the secret files that are missing (not ``create``)."""
    old: dict[str, str] = {}
    try:
        text = read_small_file(files.passwd, _MAX_PASSWD_BYTES).decode("utf-8", "replace")
    except FileReadError:
        text = ""
    for kept in text.splitlines():
        user, sep, _ = kept.partition(":")
        if sep:
            old[user] = kept
    lines: list[str] = []
    missing: list[Path] = []
    for user, secret in files.passwords.items():
        password = load_or_make_password(secret, create=create)
        if password is None:
            missing.append(secret)
            continue
        line = old.get(user)
        lines.append(
            line
            if line is not None and matches(line, user, password)
            else hash_line(user, password)
        )
    return "".join(f"{line}\n" for line in lines), missing


def plan(
    spec: FabricSpec, out_dir: Path, *, create_secrets: bool
) -> tuple[FabricFiles, dict[Path, bytes], list[Path]]:
    """Every generated file's bytes (secrets are made, if ``create_secrets``, but not
    listed), and the secret files that are missing."""
    files = _layout(spec, out_dir)
    texts: dict[Path, bytes] = {
        files.central.conf: central_conf(spec).encode(),
        files.central.acl: central_acl(spec).encode(),
    }
    for s in spec.sites:
        f = files.sites[s.id]
        texts[f.conf] = site_conf(spec, s).encode()
        texts[f.acl] = site_acl(spec, s).encode()
    missing: list[Path] = []
    for b in files.all():
        text, lost = _passwd_text(b, create_secrets)
        texts[b.passwd] = text.encode()
        missing += lost
    return files, texts, missing


def write_fabric(spec: FabricSpec, out_dir: Path) -> FabricFiles:
    """Write every broker's files under ``out_dir`` (made if needed); keep existing
    passwords. Raises PasswordError for a secret file that cannot be used, OSError for a
    file that cannot be written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "secrets").mkdir(mode=0o700, exist_ok=True)
    os.chmod(out_dir / "secrets", 0o700)
    files, texts, _ = plan(spec, out_dir, create_secrets=True)
    for path, data in texts.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if _current(path) != data:
            write_atomic(path, data)
        # The password file holds hashes only, but nobody else needs to read it.
        os.chmod(path, 0o640 if path.name == "passwd" else 0o644)
    return files


def check_fabric(spec: FabricSpec, out_dir: Path) -> list[str]:
    """What differs between ``out_dir`` and what `write_fabric` would write (nothing is
    written): one line per file, empty when they agree."""
    _, texts, missing = plan(spec, out_dir, create_secrets=False)
    out = [f"{p}: secret file missing" for p in missing]
    for path, data in texts.items():
        current = _current(path)
        if current is None:
            out.append(f"{path}: missing")
        elif current != data:
            out.append(f"{path}: differs from the spec")
    return out


def _current(path: Path) -> bytes | None:
    try:
        return read_small_file(path, _MAX_PASSWD_BYTES)
    except FileReadError:
        return None
