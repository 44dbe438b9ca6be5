"""The add-checkpoint client (auditlog/witness_client.py): the request it writes, the
responses it reads (tlog-witness's 200, 409 and the rest, chunked or not), and a witness
that is down, silent or not speaking HTTP, against scripted asyncio servers on loopback.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from iortd.auditlog.witness_client import (
    Conflict,
    Cosigned,
    Refused,
    WitnessUnavailable,
    parse_response,
    request_body,
    submit,
)

NOTE = (
    "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    "\n— x AAAA\n"
)
COSIG = "— witness.example/w1 CMp+6LWBU0anHGH5aNDTJkH/gj79sG+T6+iP2ThYN5k=\n"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[str]:
    writers: list[asyncio.StreamWriter] = []

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await handler(reader, writer)

    srv = await asyncio.start_server(tracked, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/prefix"
    finally:
        srv.close()
        for w in writers:  # a connection the handler left open (the silent witness's)
            w.close()
        await srv.wait_closed()


def answering(response: bytes, seen: list[bytes]) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(h.split(b":")[1])
            for h in head.split(b"\r\n")
            if h.lower().startswith(b"content-length")
        )
        seen.append(head + await reader.readexactly(length))
        writer.write(response)
        await writer.drain()
        writer.close()

    return handle


def test_the_request_body_is_the_specification_s() -> None:
    proof = [b"\x00" * 32, b"\xff" * 32]
    got = request_body(20852014, proof, NOTE)
    b64 = [base64.b64encode(h).decode() for h in proof]
    assert got == f"old 20852014\n{b64[0]}\n{b64[1]}\n\n{NOTE}".encode()
    with pytest.raises(ValueError, match="63"):
        request_body(1, [b"\x00" * 32] * 64, NOTE)
    with pytest.raises(ValueError, match="old size"):
        request_body(-1, [], NOTE)


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(COSIG.encode()) + COSIG.encode(),
         Cosigned((COSIG,))),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\n" + COSIG.encode()[:5]
         + b"\r\n%x\r\n" % (len(COSIG.encode()) - 5) + COSIG.encode()[5:] + b"\r\n0\r\n\r\n",
         Cosigned((COSIG,))),
        (b"HTTP/1.1 409 Conflict\r\ncontent-type: text/x.tlog.size\r\n\r\n20852014\n",
         Conflict(20852014)),
        (b"HTTP/1.1 409 Conflict\r\ncontent-type: text/plain\r\n\r\n12\n",
         Refused(409, "409 without a tree size: 12")),
        (b"HTTP/1.1 409 Conflict\r\ncontent-type: text/x.tlog.size\r\n\r\n012\n",
         Refused(409, "409 without a tree size: 012")),
        (b"HTTP/1.1 422 Unprocessable Entity\r\ncontent-length: 9\r\n\r\nbad proof\n",
         Refused(422, "bad proof")),
        (b"HTTP/1.1 200 OK\r\n\r\nnot a signature\n",
         Refused(200, "200 without signature lines: not a signature")),
        (b"HTTP/1.1 302 Found\r\nlocation: http://elsewhere/\r\n\r\n", Refused(302, "")),
        (b"HTTP/1.1 403 Forbidden\r\n\r\n\x1b[31mred\x00", Refused(403, "[31mred")),
    ],
)  # fmt: skip
def test_responses(raw: bytes, want: object) -> None:
    assert parse_response(raw) == want


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"SSH-2.0-OpenSSH\r\n",
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\nshort",
    ],
)
def test_what_is_not_an_answer_is_unavailable(raw: bytes) -> None:
    with pytest.raises(WitnessUnavailable):
        parse_response(raw)


async def test_submit_posts_to_the_prefix_and_reads_the_cosignature() -> None:
    seen: list[bytes] = []
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n" + COSIG.encode()
    async with server(answering(reply, seen)) as url:
        got = await submit(url + "/", 5, [b"\x01" * 32], NOTE, 5.0)
    assert got == Cosigned((COSIG,))
    head, _, body = seen[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /prefix/add-checkpoint HTTP/1.1\r\n")
    assert b"\r\nConnection: close" in head
    assert body == request_body(5, [b"\x01" * 32], NOTE)


async def test_a_silent_witness_is_unavailable_within_the_timeout() -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 20)  # reads, never answers; server() closes it at the end

    async with server(hang) as url:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(WitnessUnavailable, match=r"within 0\.3 s"):
            await submit(url, 0, [], NOTE, 0.3)
        assert loop.time() - start < 5


async def test_a_witness_that_is_down_is_unavailable() -> None:
    async with server(answering(b"", [])) as url:
        pass  # closed: nobody listens on that port now
    with pytest.raises(WitnessUnavailable, match="cannot connect"):
        await submit(url, 0, [], NOTE, 5.0)


async def test_an_oversized_answer_is_unavailable() -> None:
    reply = b"HTTP/1.1 200 OK\r\n\r\n" + COSIG.encode() * 2000
    async with server(answering(reply, [])) as url:
        with pytest.raises(WitnessUnavailable, match="64 KiB"):
            await submit(url, 0, [], NOTE, 5.0)


@pytest.mark.parametrize("url", ["ftp://w/", "http:///x", "http://w/?q=1", "http://u:p@w/"])
async def test_urls_that_are_not_a_witness_prefix(url: str) -> None:
    with pytest.raises(ValueError, match="witness URL"):
        await submit(url, 0, [], NOTE, 1.0)
