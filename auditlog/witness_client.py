"""The client side of c2sp.org/tlog-witness ``add-checkpoint``: what the daemon will call to
have a witness cosign each checkpoint.

Here, in the log core, because the daemon and ``iort-witness`` both sit on it and the
daemon must not import the witness's web stack (Starlette, uvicorn); and on nothing but
asyncio streams, because the project has no HTTP client dependency and this exchange is
one small request: ``POST <url>/add-checkpoint`` with ``Content-Length`` and
``Connection: close``, the response read to its end (bounded) and parsed here, sans-I/O
(:func:`request_body`, :func:`parse_response`).

Outcomes, as the specification gives them: :class:`Cosigned` (200: the witness's
signature lines; not checked here, the caller checks them with
auditlog/cosignature.verify_cosignature against the witness keys it trusts and ignores
any other), :class:`Conflict` (409 with ``text/x.tlog.size``: the size the witness last
cosigned for this origin, so the caller sends a proof from there), :class:`Refused` (every
other status, with at most 200 characters of the body, printable, for a log line: 403 bad
or unknown log key, 404 unknown origin, 422 proof or fork, 400 malformed; 429 and 5xx
mean "later"; a 409 without a size is how transparency-dev's witness answers a fork at
the same size, so it is Refused, not Conflict). A witness
that cannot be reached, does not answer within ``timeout`` (one bound for the whole
exchange) or answers with something that is not HTTP raises :class:`WitnessUnavailable`:
the caller keeps the checkpoint and tries again later. No redirect is followed (a 3xx is
Refused) and no request goes anywhere but the URL given.

``https://`` URLs use TLS with the given ``ssl.SSLContext`` (by default the system's
trust store and hostname checking).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

__all__ = [
    "MAX_PROOF_LINES",
    "Conflict",
    "Cosigned",
    "Refused",
    "WitnessUnavailable",
    "parse_response",
    "request_body",
    "submit",
]

MAX_PROOF_LINES: Final = 63  # tlog-witness: "MUST NOT send more than 63"
MAX_RESPONSE: Final = 64 * 1024
SIZE_TYPE: Final = "text/x.tlog.size"


class WitnessUnavailable(Exception):
    """The witness could not be reached or did not answer in time or in HTTP: retry."""


@dataclass(frozen=True, slots=True)
class Cosigned:
    lines: tuple[str, ...]  # "— name base64\n" each, not yet verified


@dataclass(frozen=True, slots=True)
class Conflict:
    size: int  # the size the witness last cosigned for the origin


@dataclass(frozen=True, slots=True)
class Refused:
    status: int
    text: str


Outcome = Cosigned | Conflict | Refused


def request_body(old_size: int, proof: Sequence[bytes], signed_note: str | bytes) -> bytes:
    """``old <size>``, one base64 line per proof hash, a blank line, the signed note."""
    if not 0 <= old_size < 2**64:
        raise ValueError(f"old size {old_size} is not 0 .. 2^64-1")
    if len(proof) > MAX_PROOF_LINES:
        raise ValueError(f"a consistency proof of {len(proof)} hashes; at most 63 are sent")
    note = signed_note.encode() if isinstance(signed_note, str) else signed_note
    lines = [f"old {old_size}\n", *(base64.b64encode(h).decode("ascii") + "\n" for h in proof)]
    return "".join(lines).encode("ascii") + b"\n" + note


def _printable(raw: bytes) -> str:
    text = raw[:200].decode("utf-8", "replace")
    return "".join(c if c.isprintable() else " " for c in text).strip()


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while True:
        line, sep, body = body.partition(b"\r\n")
        if not sep:
            raise WitnessUnavailable("the witness's chunked response is cut short")
        try:
            n = int(line.split(b";", 1)[0], 16)
        except ValueError:
            raise WitnessUnavailable("the witness's chunked response is malformed") from None
        if n == 0:
            return bytes(out)
        if len(body) < n + 2:
            raise WitnessUnavailable("the witness's chunked response is cut short")
        out += body[:n]
        body = body[n + 2 :]


def parse_response(raw: bytes) -> Outcome:
    """A whole HTTP/1.x response (read to the end of the connection) as an outcome."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise WitnessUnavailable("the witness's response has no end of headers")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise WitnessUnavailable(f"not an HTTP response: {_printable(status_line.encode())!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise WitnessUnavailable("the witness's Content-Length is not a number") from None
        if len(body) < length:
            raise WitnessUnavailable("the witness's response is cut short")
        body = body[:length]
    if status == 200:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return Refused(status, "200 with a body that is not UTF-8")
        lines = tuple(text.splitlines(keepends=True))
        if not lines or any(not ln.startswith("\u2014 ") or not ln.endswith("\n") for ln in lines):
            return Refused(status, "200 without signature lines: " + _printable(body))
        return Cosigned(lines)
    if status == 409:
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        size_s = body.decode("ascii", "replace")
        if ctype == SIZE_TYPE and size_s.endswith("\n") and size_s[:-1].isdigit():
            size = int(size_s[:-1])
            if size < 2**64 and str(size) == size_s[:-1]:
                return Conflict(size)
        return Refused(status, "409 without a tree size: " + _printable(body))
    return Refused(status, _printable(body))


async def _exchange(url: str, body: bytes, ssl_context: ssl.SSLContext | None) -> bytes:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"witness URL {url!r}: expected http://HOST[:PORT][/PREFIX]")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"witness URL {url!r}: no query, fragment or credentials")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    context = (ssl_context or ssl.create_default_context()) if tls else None
    path = parts.path.rstrip("/") + "/add-checkpoint"
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host if parts.port is None else f"{host}:{port}"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {netloc}\r\nUser-Agent: iortd\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    try:
        reader, writer = await asyncio.open_connection(parts.hostname, port, ssl=context)
    except OSError as exc:
        raise WitnessUnavailable(f"cannot connect to {netloc}: {exc.strerror or exc}") from exc
    try:
        writer.write(head + body)
        await writer.drain()
        raw = await reader.read(MAX_RESPONSE + 1)
        chunks = [raw]
        total = len(raw)
        while raw and total <= MAX_RESPONSE:
            raw = await reader.read(MAX_RESPONSE + 1 - total)
            chunks.append(raw)
            total += len(raw)
        if total > MAX_RESPONSE:
            raise WitnessUnavailable(f"the response of {netloc} is larger than 64 KiB")
        return b"".join(chunks)
    except (OSError, ssl.SSLError) as exc:
        raise WitnessUnavailable(f"{netloc}: {exc}") from exc
    finally:
        writer.close()
        # Closing a connection that already failed: nothing left to do.
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def submit(
    url: str,
    old_size: int,
    proof: Sequence[bytes],
    signed_note: str | bytes,
    timeout: float,  # noqa: ASYNC109 - the contract's bound for the whole exchange, applied inside
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> Outcome:
    """Ask the witness at ``url`` (its submission prefix) to cosign ``signed_note``,
    proving it extends the checkpoint of ``old_size`` the witness last cosigned.
    ``timeout`` bounds the whole exchange; WitnessUnavailable when it cannot be had."""
    body = request_body(old_size, proof, signed_note)
    try:
        async with asyncio.timeout(timeout):
            raw = await _exchange(url, body, ssl_context)
    except TimeoutError:
        raise WitnessUnavailable(f"no answer from {url} within {timeout:g} s") from None
    return parse_response(raw)
