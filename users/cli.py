"""``iort-users``: user accounts, their passwords and signing keys (docs/accounts.md).

    iort-users init HOLDER --name NAME [--role ROLE ...]            --dir DIR
    iort-users add HOLDER --name NAME --role ROLE [--role ...] [--valid-until TS]
                          --admin ADMIN                             --dir DIR
    iort-users disable HOLDER --reason TEXT --admin ADMIN           --dir DIR
    iort-users enable HOLDER --admin ADMIN                          --dir DIR
    iort-users roles HOLDER --role ROLE [--role ...] --admin ADMIN  --dir DIR
    iort-users reset HOLDER --admin ADMIN                           --dir DIR
    iort-users passwd HOLDER                                        --dir DIR
    iort-users list                                                 --dir DIR
    iort-users check                                                --dir DIR
    iort-users keyring --out PATH                                   --dir DIR

Passwords are read from the terminal without echo (a new one twice), or, for automation,
from the file descriptor ``--password-fd N``: one password a line, in the order the prompts
would ask them (``add``: the admin's, then the new user's temporary one; ``reset``: the
admin's, then the temporary one; ``passwd``: the old, then the new). Never from the command
line or the environment: both are visible to other users of the host (``ps``,
``/proc/PID/environ``) and end up in shell histories.

Every change is recorded (record.py) and rewrites ``DIR/keyring.toml``; ``keyring --out``
copies it to where the daemon reads it, only from a store the record vouches for (``list``
warns about one it does not). Without ``--password-fd`` and without a terminal, no password
is read at all (getpass would fall back to reading it with echo).

Exit status: 0 done; 1 refused (a wrong password, an unknown user, a password the rules
refuse, a store that does not check); 2 usage (a flag, a directory that cannot be used).
Output never holds a password, a hash or a key.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from iortd.auditlog.keyring import HOLDER_RE, ROLES, KeyringError, parse_utc
from iortd.auditlog.note import NoteError, Verifier
from iortd.users.api import load_checked_store
from iortd.users.changes import Refused, Session, open_session
from iortd.users.kdf import DEFAULT_COST, MIN_COST, Cost, hash_cost, sealed_cost
from iortd.users.keyring import keyring_bytes, write_keyring
from iortd.users.record import RecordError, check_record
from iortd.users.store import KEYRING_FILE, RECORD_DIR, StoreError, load_store

__all__ = ["main"]

EXIT_OK, EXIT_BAD, EXIT_USAGE = 0, 1, 2
MAX_FD_BYTES = 64 * 1024


def _out(msg: str) -> None:
    print(msg)  # noqa: T201 - CLI output


def _err(msg: str) -> None:
    print(f"iort-users: {msg}", file=sys.stderr)  # noqa: T201 - CLI output


class _Usage(Exception):
    pass


class Passwords:
    """The passwords of one run: from ``--password-fd`` (one a line) or the terminal."""

    def __init__(self, fd: int | None) -> None:
        self._lines: list[str] | None = None
        self._fd = fd

    def _next(self, what: str) -> str:
        if self._lines is None and self._fd is not None:
            data = b""
            try:
                while chunk := os.read(self._fd, 4096):
                    data += chunk
                    if len(data) > MAX_FD_BYTES:
                        raise _Usage(f"--password-fd {self._fd}: more than {MAX_FD_BYTES} bytes")
            except OSError as exc:
                raise _Usage(f"--password-fd {self._fd}: cannot read: {exc.strerror}") from None
            try:
                self._lines = data.decode("utf-8").splitlines()[::-1]
            except UnicodeDecodeError:
                raise _Usage(f"--password-fd {self._fd}: not UTF-8") from None
        if not self._lines:  # (None only without --password-fd, never called then)
            raise _Usage(f"--password-fd {self._fd}: no line for {what}")
        return self._lines.pop()

    @staticmethod
    def _terminal() -> None:
        """getpass falls back to reading stdin *with echo* when there is no terminal (a
        cron job, a pipe): refuse instead, before anything is prompted."""
        try:
            os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC))
        except OSError:
            raise _Usage(
                "no terminal to read a password from without echo; give --password-fd N"
            ) from None

    def old(self, what: str) -> str:
        if self._fd is not None:
            return self._next(what)
        self._terminal()
        return getpass.getpass(f"{what}: ")

    def new(self, what: str) -> str:
        if self._fd is not None:
            return self._next(what)
        self._terminal()
        first = getpass.getpass(f"{what}: ")
        if getpass.getpass(f"{what} (again): ") != first:
            raise _Usage("the two entries differ; nothing is changed")
        return first


def _holder(text: str) -> str:
    if not HOLDER_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: an id of a-z, 0-9, '.', '_', '-' (at most 64, starting with a letter "
            "or digit), e.g. phys-anna"
        )
    return text


def _name(text: str) -> str:
    if not (0 < len(text) <= 200 and text.isprintable()):
        raise argparse.ArgumentTypeError("the printed name: 1-200 printable characters")
    return text


def _reason(text: str) -> str:
    if not (0 < len(text) <= 200 and text.isprintable()):
        raise argparse.ArgumentTypeError(
            "one line of 1-200 printable characters (it is recorded: never a patient's data)"
        )
    return text


def _utc(text: str) -> str:
    try:
        parse_utc(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", type=Path, required=True, metavar="DIR", help="the store")
    common.add_argument(
        "--password-fd", type=int, metavar="N", help="read passwords from this descriptor"
    )
    p = argparse.ArgumentParser(prog="iort-users", description="user accounts of iortd")
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name: str, what: str, *, admin: bool = True, holder: bool = True) -> Any:
        c = sub.add_parser(name, help=what, parents=[common])
        if holder:
            c.add_argument("holder", type=_holder, metavar="HOLDER")
        if admin:
            c.add_argument("--admin", type=_holder, required=True, metavar="ADMIN")
        return c

    roles = sorted(ROLES)
    c = cmd("init", "create the store and its first admin (you)", admin=False)
    c.add_argument("--name", type=_name, required=True)
    c.add_argument("--role", action="append", choices=roles, dest="roles", default=[])
    c = cmd("add", "add a user with a temporary password")
    c.add_argument("--name", type=_name, required=True)
    c.add_argument("--role", action="append", choices=roles, dest="roles", required=True)
    c.add_argument("--valid-until", type=_utc, metavar="TS", help="RFC 3339 UTC, with Z")
    c = cmd("disable", "disable a user (their keys stop signing now)")
    c.add_argument("--reason", type=_reason, required=True)
    cmd("enable", "enable a disabled user again")
    c = cmd("roles", "change a user's roles")
    c.add_argument("--role", action="append", choices=roles, dest="roles", required=True)
    cmd("reset", "a forgotten password: a temporary one, the old key retired")
    cmd("passwd", "change your own password", admin=False)
    cmd("list", "the users (never a hash or a key)", admin=False, holder=False)
    cmd("check", "the record, the store and the keyring agree", admin=False, holder=False)
    c = cmd("keyring", "write the keyring to PATH", admin=False, holder=False)
    c.add_argument("--out", type=Path, required=True, metavar="PATH")
    return p


def main(argv: Sequence[str] | None = None, *, cost: Cost = DEFAULT_COST) -> int:
    """``cost`` is for the test suite only (kdf.TEST_COST): the console script never sets it."""
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args, cost)
    except _Usage as exc:
        _err(str(exc))
        return EXIT_USAGE
    except (StoreError, RecordError) as exc:
        _err(str(exc))
        return EXIT_USAGE
    except Refused as exc:
        for line in str(exc).splitlines():
            _err(line)
        return EXIT_BAD
    except KeyboardInterrupt:
        _err("interrupted; nothing is changed")
        return EXIT_USAGE


def _change(args: argparse.Namespace, cost: Cost, act: Callable[[Session, Passwords], str]) -> int:
    pw = Passwords(args.password_fd)
    session = open_session(args.dir, cost=cost, create=args.command == "init")
    try:
        for note in session.notes:
            _err(note)
        _out(act(session, pw))
    finally:
        session.close()
    return EXIT_OK


def _init(args: argparse.Namespace, cost: Cost) -> int:
    def act(s: Session, pw: Passwords) -> str:
        s.init(args.holder, args.name, set(args.roles), pw.new(f"password for {args.holder}"))
        return f"{args.dir}: created with admin {args.holder}; keyring {args.dir / KEYRING_FILE}"

    return _change(args, cost, act)


def _add(args: argparse.Namespace, cost: Cost) -> int:
    if args.valid_until and parse_utc(args.valid_until) <= datetime.now(UTC):
        raise _Usage(f"--valid-until {args.valid_until}: in the past; the account would never work")

    def act(s: Session, pw: Passwords) -> str:
        admin = s.admin(args.admin, pw.old(f"password of {args.admin}"))
        temp = pw.new(f"temporary password for {args.holder}")
        s.add(admin, args.holder, args.name, set(args.roles), args.valid_until, temp)
        return (
            f"added {args.holder} ({','.join(sorted(set(args.roles)))}); they sign nothing "
            f"until they choose their own password: iort-users passwd {args.holder}"
        )

    return _change(args, cost, act)


def _state(args: argparse.Namespace, cost: Cost) -> int:
    enable = args.command == "enable"

    def act(s: Session, pw: Passwords) -> str:
        admin = s.admin(args.admin, pw.old(f"password of {args.admin}"))
        s.set_state(admin, args.holder, enable=enable, reason=getattr(args, "reason", "enabled"))
        return f"{args.holder} {'enabled' if enable else 'disabled'}; keyring rewritten"

    return _change(args, cost, act)


def _roles(args: argparse.Namespace, cost: Cost) -> int:
    def act(s: Session, pw: Passwords) -> str:
        admin = s.admin(args.admin, pw.old(f"password of {args.admin}"))
        s.set_roles(admin, args.holder, set(args.roles))
        return f"{args.holder}: roles {','.join(sorted(set(args.roles)))} from now on"

    return _change(args, cost, act)


def _reset(args: argparse.Namespace, cost: Cost) -> int:
    def act(s: Session, pw: Passwords) -> str:
        admin = s.admin(args.admin, pw.old(f"password of {args.admin}"))
        s.reset(admin, args.holder, pw.new(f"temporary password for {args.holder}"))
        return (
            f"{args.holder}: temporary password set, old key retired (it still verifies what "
            f"it signed); they choose their own with iort-users passwd {args.holder}"
        )

    return _change(args, cost, act)


def _passwd(args: argparse.Namespace, cost: Cost) -> int:
    def act(s: Session, pw: Passwords) -> str:
        old = pw.old(f"current password of {args.holder}")
        made = s.passwd(args.holder, old, pw.new(f"new password for {args.holder}"))
        key = "a new signing key was made for you" if made else "the same signing key"
        return f"{args.holder}: password changed; {key}"

    return _change(args, cost, act)


def _list(args: argparse.Namespace, cost: Cost) -> int:
    store = load_store(args.dir)
    try:
        load_checked_store(args.dir)
    except StoreError as exc:
        _err(f"warning: the store does not check ({exc}); run iort-users check")
    now = datetime.now(UTC)
    _out(f"# {store.path} sha256 {store.sha256 or '(empty)'}")
    _out("holder\tname\troles\tstate\taccount end\tpassword\tsigning key")
    for holder in sorted(store.users):
        u = store.users[holder]
        state = f"{u.state} since {u.state_at} by {u.state_by}"
        if u.valid_until and parse_utc(u.valid_until) <= now:
            state += " (account ended)"
        password = "temporary (set by an admin)" if u.must_change else f"own, {u.password_set_at}"
        key = u.current_key
        signing = f"{Verifier.parse(key.public_key).key_hash:08x} v{key.version}" if key else "none"
        _out(
            f"{holder}\t{u.name}\t{','.join(u.roles)}\t{state}\t{u.valid_until or '-'}\t"
            f"{password}\t{signing}"
        )
    return EXIT_OK


def _check(args: argparse.Namespace, cost: Cost) -> int:
    store = load_store(args.dir)
    state = check_record(args.dir / RECORD_DIR)
    problems = list(state.problems)
    if not state.problems and store.sha256 != state.store_sha256:
        problems.append(
            f"{store.path}: its SHA-256 {store.sha256[:16] or '(none)'}… is not the one the "
            f"record's last entry names ({state.store_sha256[:16] or 'none'}…): changed "
            "behind iort-users' back, or restored without its record"
        )
    try:
        text, _ = keyring_bytes(store)
        on_disk = (args.dir / KEYRING_FILE).read_bytes() if store.users else text
        if on_disk != text:
            problems.append(f"{args.dir / KEYRING_FILE}: not the keyring the store gives")
    except (KeyringError, OSError) as exc:
        problems.append(f"{args.dir / KEYRING_FILE}: {exc}")
    for u in store.users.values():
        c = hash_cost(u.password_hash)
        if c is None or not c.at_least(MIN_COST):
            _err(f"warning: {u.holder}: password hash below the minimum cost; passwd renews it")
        for k in u.keys:
            if k.sealed is not None and not sealed_cost(k.sealed).at_least(MIN_COST):
                _err(f"warning: {u.holder}: key v{k.version} sealed below the minimum cost")
    for p in problems:
        _out(f"PROBLEM: {p}")
    if problems:
        return EXIT_BAD
    _out(
        f"OK: {len(store.users)} user(s), {state.changes} recorded change(s); the store is "
        f"the one the record names (sha256 {store.sha256 or '(empty)'})"
    )
    return EXIT_OK


def _keyring(args: argparse.Namespace, cost: Cost) -> int:
    load_store(args.dir)  # a directory or file that cannot be used: exit 2
    try:
        store = load_checked_store(args.dir)
    except StoreError as exc:  # the record does not vouch for it: never hand it on
        raise Refused(f"{exc}; the keyring is not written") from None
    try:
        text, ring = keyring_bytes(store)
    except KeyringError as exc:
        raise Refused(str(exc)) from None
    try:
        write_keyring(args.out, text)
    except OSError as exc:
        raise _Usage(f"--out {args.out}: cannot write: {exc.strerror}") from None
    except NoteError as exc:  # pragma: no cover - keyring_bytes parsed it already
        raise Refused(str(exc)) from None
    _out(f"{args.out}: {len(ring.entries)} key window(s); sha256 {ring.sha256}; restart iortd")
    return EXIT_OK


_COMMANDS: dict[str, Callable[[argparse.Namespace, Cost], int]] = {
    "init": _init,
    "add": _add,
    "disable": _state,
    "enable": _state,
    "roles": _roles,
    "reset": _reset,
    "passwd": _passwd,
    "list": _list,
    "check": _check,
    "keyring": _keyring,
}
