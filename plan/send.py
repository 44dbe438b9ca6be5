"""``iort-plan send``: a prescription or the day's output factor, signed by the physicist
whose document it is, to the room; and the one way every ``iort-plan`` command is sent.

    iort-plan send [--kind prescription|output_factor] FILE --key KEYFILE --holder ID
                  --site S --room R
                  (--broker URL [--username U] [--password-file F] [--tls]
                   [--ca-file F] [--cert-file F --key-file F] [--prefix P] | --inbox DIR)
                  [--ttl S]

The file is read and checked with its strict parser first, and what the daemon would refuse
is refused here (the daemon refuses it too):

* ``prescription`` (the default; plan/model.py): one that has expired, or whose
  ``approved_by`` is not ``--holder`` (daemon/prescriptions.py);
* ``output_factor`` (plan/doserate.py, what ``iort-plan factor`` writes): one whose
  ``measured_by`` is not ``--holder``, or measured on a day that has not begun or more than a
  day ago (:func:`~iortd.plan.doserate.factor_date_problem`; daemon/output_factor.py).

The key that signs must be the document's physicist's. The key (``iort-audit keygen``, mode
0600) must be the holder's: its name is the holder id. The command is an envelope of that
kind (auditlog/command.py, :func:`~iortd.auditlog.command.sign_command`) whose body is the
document's canonical JSON form, valid for ``--ttl`` seconds (default 600, at most 24 h).

**Shared by every sender** (this module's :func:`add_signing_arguments` and
:func:`send_command`; ``iort-plan override`` in plan/override.py uses them): the flags, the
checks of site, room, TTL and key, the signing, and the delivery. It goes either to the
broker, published once to ``{prefix}/v1/{site}/{room}/cmd/{kind}`` at QoS 1, never
retained, and acknowledged (PUBACK) within :data:`PUBACK_TIMEOUT_S` (an MQTT v5 PUBACK with
a failure reason, e.g. an ACL's "Not authorized", is a refusal), or into the daemon's inbox
directory as ``{kind}-{nonce}.json``, written atomically (a hidden ``.NAME`` fsync'd, then
renamed, and the directory fsync'd: the daemon never reads half a file; docs/commands.md).

Output: one line on stdout naming what was sent (a document's SHA-256, which the log's
``*_received`` entry will show) and the command's nonce (the log's ``command_accepted``);
nothing identifying (a prescription has no patient data by construction), never the key or
the password. Exit status: 0 sent (acknowledged by the broker, or in the inbox); 1 refused:
a document that is not valid or that the daemon would refuse, a broker that refused or did
not acknowledge; 2 usage: a flag, a key or password file that cannot be used, a broker URL
that cannot be used.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import secrets
import socket
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from iortd.auditlog.command import MAX_TTL_S, sign_command
from iortd.auditlog.note import KeyFileError, load_signer
from iortd.kernel.broker import BrokerSettings, BrokerUrlError, parse_broker_url
from iortd.kernel.files import FileReadError, read_small_file
from iortd.kernel.timefmt import utc_ts
from iortd.plan.doserate import (
    DoseRateError,
    factor_date_problem,
    output_factor_bytes,
    parse_output_factor,
)
from iortd.plan.model import (
    PrescriptionError,
    parse_prescription,
    prescription_bytes,
    prescription_dict,
)

__all__ = [
    "PUBACK_TIMEOUT_S",
    "Outgoing",
    "SendFailed",
    "add_parser",
    "add_signing_arguments",
    "send",
    "send_command",
]

PUBACK_TIMEOUT_S = 10.0  # connect, publish and the broker's acknowledgement, each
DEFAULT_TTL_S = 600.0
# A factor dated today by the physicist's machine is today on the daemon's, give or take
# this (the daemon uses its own [commands] clock_skew_s).
FACTOR_SKEW = timedelta(minutes=5)
_ROOM_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # as auditlog/command.py checks site/room
CREDENTIALS = "give the user with --username and the password with --password-file"


class SendFailed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A command to sign: its kind, its body, and what the printed line says it is."""

    kind: str
    body: Mapping[str, Any]
    said: str


def add_parser(sub: Any) -> None:
    s = sub.add_parser(
        "send", help="sign a prescription or the day's output factor and send it to the room"
    )
    s.add_argument("document", type=Path, metavar="FILE", help="RX.json or the factor's JSON")
    s.add_argument(
        "--kind",
        choices=tuple(_PREPARE),
        default="prescription",
        help="what FILE is (default prescription; output_factor: `iort-plan factor`'s)",
    )
    add_signing_arguments(s)


def add_signing_arguments(s: argparse.ArgumentParser) -> None:
    """The key, the room and the way to it: every sending subcommand's flags."""
    s.add_argument("--key", type=Path, required=True, help="the holder's private key (0600)")
    s.add_argument("--holder", required=True, help="your keyring holder id")
    s.add_argument("--site", required=True, help="the daemon's [site] id")
    s.add_argument("--room", required=True, help="the daemon's [site] room")
    s.add_argument("--ttl", type=float, default=DEFAULT_TTL_S, help="seconds (default 600)")
    to = s.add_mutually_exclusive_group(required=True)
    to.add_argument("--broker", metavar="URL", help="mqtt://HOST[:PORT] or mqtts://")
    to.add_argument("--inbox", type=Path, metavar="DIR", help="the daemon's [commands] inbox")
    s.add_argument("--prefix", default="iort", help="topic prefix, as the daemon's [mqtt]")
    s.add_argument("--username", help="broker user name")
    s.add_argument("--password-file", type=Path, metavar="FILE", help="its password (0600)")
    s.add_argument("--tls", action="store_true", help="TLS to the broker (as mqtts://)")
    s.add_argument("--ca-file", type=Path, metavar="FILE", help="the broker's CA")
    s.add_argument("--cert-file", type=Path, metavar="FILE", help="client certificate (TLS)")
    s.add_argument("--key-file", type=Path, metavar="FILE", help="its key")


def _usage(msg: str) -> SendFailed:
    return SendFailed(2, msg)


def _refused(msg: str) -> SendFailed:
    return SendFailed(1, msg)


def _password(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise _usage(
                f"--password-file: {path} is readable by others ({mode:04o}); chmod 600 it"
            )
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise _usage(f"--password-file: cannot read {path}: {exc.strerror}") from None


def _settings(args: argparse.Namespace) -> BrokerSettings:
    try:
        host, port, tls = parse_broker_url(args.broker, credentials_hint=CREDENTIALS)
    except BrokerUrlError as exc:
        raise _usage(f"--broker: {exc}") from None
    if args.tls and not tls:
        tls, port = True, (8883 if port == 1883 else port)
    for flag in ("ca_file", "cert_file", "key_file"):
        path: Path | None = getattr(args, flag)
        if path is not None and not tls:
            raise _usage(f"--{flag.replace('_', '-')}: only with TLS (mqtts:// or --tls)")
    if (args.cert_file is None) != (args.key_file is None):
        raise _usage("--cert-file and --key-file go together (a client certificate)")
    if not args.prefix or any(c in args.prefix for c in "/+#"):
        raise _usage(f"--prefix: {args.prefix!r} must be non-empty, without '/', '+', '#'")
    return BrokerSettings(
        host=host,
        port=port,
        tls=tls,
        prefix=args.prefix,
        username=args.username,
        password=_password(args.password_file),
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
    )


def _flags(args: argparse.Namespace) -> None:
    for flag, value in (("--site", args.site), ("--room", args.room)):
        if not _ROOM_RE.fullmatch(value):
            raise _usage(f"{flag}: {value[:64]!r} is not a site/room id (a-z, 0-9, '-')")
    if not 0 < args.ttl <= MAX_TTL_S:
        raise _usage(f"--ttl: must be more than 0 and at most {MAX_TTL_S:.0f} s")


def _document(path: Path, expected: str) -> bytes:
    try:
        return read_small_file(path, 64 * 1024, expected=expected)
    except FileReadError as exc:
        raise _usage(f"{path}: {exc.reason}") from None


def _prescription(args: argparse.Namespace, now: datetime) -> Outgoing:
    """A prescription the daemon would take: valid, not expired, approved by the holder."""
    path: Path = args.document
    raw = _document(path, "a prescription (JSON)")
    try:
        p = parse_prescription(raw)
    except PrescriptionError as exc:
        raise _refused(f"{path}: {exc}") from None
    if p.expired(now):
        raise _refused(f"{path}: expired at {utc_ts(p.not_after)}; approve a new one")
    if p.approved_by != args.holder:
        raise _refused(
            f"{path}: approved by {p.approved_by}, not by --holder {args.holder}: "
            "the approving physicist's key must sign it"
        )
    sha = hashlib.sha256(prescription_bytes(p)).hexdigest()
    return Outgoing("prescription", prescription_dict(p), f"prescription sha256 {sha}")


def _output_factor(args: argparse.Namespace, now: datetime) -> Outgoing:
    """The day's output factor the daemon would take: valid, measured by the holder, today
    or yesterday (UTC)."""
    path: Path = args.document
    raw = _document(path, "an output factor (JSON)")
    try:
        f = parse_output_factor(raw.rstrip(b"\r\n"))
    except DoseRateError as exc:
        raise _refused(f"{path}: {exc}") from None
    if f.measured_by != args.holder:
        raise _refused(
            f"{path}: measured by {f.measured_by}, not by --holder {args.holder}: the key "
            "of the physicist who measured it must sign it"
        )
    problem = factor_date_problem(f.measured_on, now, FACTOR_SKEW)
    if problem is not None:
        raise _refused(f"{path}: {problem[1]}")
    canon = output_factor_bytes(f.value, f.measured_on, f.measured_by, f.machine)
    sha = hashlib.sha256(canon).hexdigest()
    return Outgoing("output_factor", orjson.loads(canon), f"output factor sha256 {sha}")


_PREPARE: Mapping[str, Callable[[argparse.Namespace, datetime], Outgoing]] = {
    "prescription": _prescription,
    "output_factor": _output_factor,
}


def sign(args: argparse.Namespace, out: Outgoing, now: datetime) -> tuple[bytes, str]:
    """The signed command's bytes and its nonce; a key that is not ``--holder``'s is usage."""
    try:
        signer = load_signer(args.key)
    except KeyFileError as exc:
        raise _usage(f"--key: {exc}") from None
    if signer.name != args.holder:
        raise _usage(f"--key: the key is {signer.name}'s, not --holder {args.holder}'s")
    try:
        env = sign_command(
            out.kind,
            dict(out.body),
            signer=signer,
            holder=args.holder,
            site=args.site,
            room=args.room,
            ttl_s=args.ttl,
            now=now,
        )
    except ValueError as exc:
        raise _usage(str(exc)) from None
    return orjson.dumps(env), str(env["nonce"])


async def publish(s: BrokerSettings, topic: str, payload: bytes) -> None:
    """Publish once at QoS 1, not retained, and wait for the broker's PUBACK; a PUBACK with
    a failure reason (MQTT v5) is a refusal."""
    import aiomqtt  # noqa: PLC0415 - only for --broker: `iort-plan new` starts fast

    tls = await asyncio.to_thread(s.tls_context)
    refused: list[str] = []
    client = aiomqtt.Client(
        s.host,
        s.port,
        identifier=f"iort-plan-{secrets.token_hex(6)}",
        username=s.username,
        password=s.password,
        protocol=aiomqtt.ProtocolVersion.V5,
        timeout=PUBACK_TIMEOUT_S,
        tls_context=tls,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )
    inner: Any = client._client  # private: aiomqtt drops the PUBACK's reason code
    original = inner.on_publish

    def on_publish(c: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if getattr(reason, "is_failure", False):
            refused.append(str(reason))
        original(c, userdata, mid, reason, properties)

    inner.on_publish = on_publish
    try:
        async with asyncio.timeout(3 * PUBACK_TIMEOUT_S):
            async with client:
                await client.publish(topic, payload, qos=1, retain=False)
    except (aiomqtt.MqttError, TimeoutError, OSError) as exc:
        raise _refused(f"{s.url}: not sent or not acknowledged: {exc}") from None
    if refused:
        raise _refused(f"{s.url}: the broker refused the publish on {topic}: {refused[0]}")


def into_inbox(inbox: Path, name: str, payload: bytes) -> Path:
    """Written as ``.NAME`` (new, not through a link), fsync'd, renamed to NAME, and the
    directory fsync'd: the daemon reads only whole files (it skips hidden ones)."""
    if not inbox.is_dir() or inbox.is_symlink():
        raise _usage(f"--inbox: {inbox} is not a directory")
    tmp, final = inbox / f".{name}", inbox / name
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
        try:
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        dfd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise _usage(f"--inbox: cannot write into {inbox}: {exc.strerror}") from None
    return final


def send_command(
    args: argparse.Namespace, prepare: Callable[[argparse.Namespace, datetime], Outgoing]
) -> str:
    """Check the flags, ``prepare`` the command (which refuses what the daemon would), sign
    it and send it; the line to print. Raises SendFailed."""
    settings = _settings(args) if args.broker is not None else None
    _flags(args)
    now = datetime.now(UTC)
    out = prepare(args, now)
    payload, nonce = sign(args, out, now)
    if settings is None:
        into_inbox(args.inbox, f"{out.kind}-{nonce}.json", payload)
        where = f"into {args.inbox}"
    else:
        topic = f"{settings.prefix}/v1/{args.site}/{args.room}/cmd/{out.kind}"
        asyncio.run(publish(settings, topic, payload))
        where = f"to {settings.url}, acknowledged"
    return f"{out.said} sent {where} (command nonce {nonce})"


def send(args: argparse.Namespace) -> str:
    """``iort-plan send``: the line to print. Raises SendFailed."""
    return send_command(args, _PREPARE[args.kind])
