"""Accounts' passwords: generated, kept in secret files, hashed into Mosquitto's password
files. Never in a config's text, a command line or a log.

Each account (a room's daemon, a consumer) gets a random password (192 bits, URL-safe text)
in ``secrets/{broker}/{account}.password`` (mode 0600), the file its daemon's
``[mqtt] password_file`` or a dashboard's ``--password-file`` names. A password file that
exists already is kept: generating again does not lock every room out. The broker's
``passwd`` holds only Mosquitto's PBKDF2-SHA512 form (``$7$iterations$salt$hash``, as
``mosquitto_passwd`` writes it); an existing line that still matches its password is kept
byte for byte, so the same spec and secrets give the same files.

The hash is stretched by 1,000 iterations, not more: the passwords are random 192-bit
tokens, so stretching adds nothing against guessing while every iteration costs the
broker CPU on each connect.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from iortd.kernel.durable import fsync_dir, write_all
from iortd.kernel.files import FileReadError, read_small_file

__all__ = ["ITERATIONS", "PasswordError", "hash_line", "load_or_make_password", "matches"]

ITERATIONS = 1000
_SALT_BYTES = 12
_PASSWORD_RE = re.compile(r"^[A-Za-z0-9_-]{16,200}$")
_LINE_RE = re.compile(
    r"^(?P<user>[^:\s]+):\$7\$(?P<it>\d{1,7})\$(?P<salt>[A-Za-z0-9+/=]+)\$(?P<hash>[A-Za-z0-9+/=]+)$"
)


class PasswordError(Exception):
    """A secret file that cannot be used; the message names it and says what to do."""


def load_or_make_password(path: Path, *, create: bool = True) -> str | None:
    """The password in ``path``; a new one written there (0600) if there is none and
    ``create``; None if there is none and not ``create``."""
    try:
        text = read_small_file(path, 4096, expected="a password file").decode("ascii").strip()
    except FileReadError as exc:
        if not exc.missing:
            raise PasswordError(f"{path}: {exc.reason}") from None
        if not create:
            return None
        return _make(path)
    except UnicodeDecodeError:
        raise PasswordError(f"{path}: not ASCII text; delete it to have a new one made") from None
    if not _PASSWORD_RE.fullmatch(text):
        raise PasswordError(
            f"{path}: expected 16 to 200 characters of A-Z, a-z, 0-9, '-' and '_'; "
            "delete it to have a new one made"
        )
    return text


def _make(path: Path) -> str:
    """A new password in ``path``, all or nothing: written to a temporary file (0600,
    fsync'd), then linked into place, which fails rather than replace a file that
    appeared meanwhile (then that one is used). A crash leaves no half-written secret."""
    password = secrets.token_urlsafe(24)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600)
    try:
        write_all(fd, (password + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        tmp.unlink()
        text = load_or_make_password(path, create=False)
        if text is None:  # pragma: no cover - removed again in between
            raise PasswordError(f"{path}: appeared and vanished while being made") from None
        return text
    tmp.unlink()
    fsync_dir(path.parent)
    return password


def _digest(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)


def hash_line(user: str, password: str) -> str:
    """A new ``user:$7$...`` line for Mosquitto's password_file (a fresh salt)."""
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = _digest(password, salt, ITERATIONS)
    b64 = base64.b64encode
    return f"{user}:$7${ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


def matches(line: str, user: str, password: str) -> bool:
    """Whether ``line`` is ``user``'s password_file line for ``password``."""
    m = _LINE_RE.fullmatch(line.strip())
    if m is None or m["user"] != user:
        return False
    try:
        salt = base64.b64decode(m["salt"], validate=True)
        want = base64.b64decode(m["hash"], validate=True)
    except ValueError:
        return False
    iterations = int(m["it"])
    if not 1 <= iterations <= 1_000_000:
        return False
    return hmac.compare_digest(_digest(password, salt, iterations), want)
