"""Limits of one request: bodies read and decoded within a cap.

The servers here are real sockets on 127.0.0.1 misbehaving the ways servers were seen to: a
chunked body that never ends, ``gzip, gzip`` that inflates a few kilobytes to gigabytes. Every
test runs both clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import json
import threading
import tracemalloc
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import pytest

import ims_fhir
from ims_fhir import AsyncFhirClient, FhirClient, RetryPolicy
from ims_fhir import _constants as constants
from ims_fhir._http import decode_body

NO_RETRY = RetryPolicy(max_retries=0)
PATIENT = {"resourceType": "Patient", "id": "1"}
MiB = 1024 * 1024


# -- a misbehaving server ----------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]


Handler = Callable[[Request, asyncio.StreamWriter], Awaitable[None]]


class LocalServer:
    """An HTTP/1.1 server on 127.0.0.1, in a thread of its own, answering with ``handler``.

    Each connection serves one request (``Connection: close``). The server stops when the
    ``with`` block ends, or by itself after LIFETIME seconds; every handler loop is bounded.
    """

    LIFETIME = 60.0

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def __enter__(self) -> LocalServer:
        self._thread.start()
        assert self._ready.wait(10), "the local server did not start"
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.LIFETIME)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *fields = head.decode("latin-1").split("\r\n")
            method, path, _ = line.split(" ", 2)
            headers = {}
            for field in filter(None, fields):
                name, _, value = field.partition(":")
                headers[name.strip().lower()] = value.strip()
            await reader.readexactly(int(headers.get("content-length", "0")))
            request = Request(method, path, headers)
            self.requests.append(request)
            await self.handler(request, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client gave up, as it should
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def head(headers: dict[str, str]) -> bytes:
    lines = ["HTTP/1.1 200 OK", "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def answer(writer: asyncio.StreamWriter, body: bytes, **headers: str) -> None:
    fields = {"Content-Type": "application/fhir+json", "Content-Length": str(len(body))}
    fields.update({k.replace("_", "-"): v for k, v in headers.items()})
    writer.write(head(fields) + body)
    await writer.drain()


def endless_chunked(size: int, pause: float, chunks: int) -> Handler:
    """A chunked body of JSON whitespace, ``size`` bytes every ``pause`` s, ``chunks`` times."""

    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        fields = {"Content-Type": "application/fhir+json", "Transfer-Encoding": "chunked"}
        writer.write(head(fields))
        for _ in range(chunks):
            writer.write(b"%x\r\n%s\r\n" % (size, b" " * size))
            await writer.drain()
            await asyncio.sleep(pause)

    return handler


@functools.cache
def gzip_gzip_bomb() -> bytes:
    """A few kilobytes that ``gzip, gzip`` inflates to 1.06 GiB of zeros.

    The inner layer is 17 copies of one 64 MiB gzip member (members may follow one another);
    the outer layer compresses those copies down to almost nothing.
    """
    member = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    inner = member.compress(bytes(64 * MiB)) + member.flush()
    return gzip.compress(inner * 17, 9)


def read_patient(kind: str, base: str, **options: Any) -> Any:
    """``read("Patient", "1")`` with the sync or the async client."""
    if kind == "sync":
        with FhirClient(base, **options) as client:
            return client.read("Patient", "1")

    async def read() -> Any:
        async with AsyncFhirClient(base, **options) as client:
            return await client.read("Patient", "1")

    return asyncio.run(read())


@pytest.fixture(params=["async", "sync"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- decoding within the cap -------------------------------------------------------------------


def test_an_endless_chunked_body_stops_at_the_size_cap(kind: str) -> None:
    with LocalServer(endless_chunked(64 * 1024, pause=0.0, chunks=1000)) as server:
        with pytest.raises(ims_fhir.InvalidResponseError, match=f"larger than {MiB} bytes"):
            read_patient(kind, server.url, max_response_bytes=MiB, retry=NO_RETRY)


def test_a_gzip_gzip_bomb_is_refused_in_little_memory(kind: str) -> None:
    bomb = gzip_gzip_bomb()
    assert len(bomb) < 64 * 1024

    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        await answer(writer, bomb, Content_Encoding="gzip, gzip")

    with LocalServer(handler) as server:
        tracemalloc.start()
        try:
            with pytest.raises(ims_fhir.InvalidResponseError, match="once decoded"):
                read_patient(kind, server.url, max_response_bytes=16 * MiB, retry=NO_RETRY)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 64 * MiB


def test_a_gzip_response_still_parses_and_only_gzip_and_deflate_are_asked_for(kind: str) -> None:
    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        await answer(writer, gzip.compress(json.dumps(PATIENT).encode()), Content_Encoding="gzip")

    with LocalServer(handler) as server:
        assert read_patient(kind, server.url).id == "1"
    assert server.requests[0].headers["accept-encoding"] == "gzip, deflate"


# -- the I/O-free parts, as tables -------------------------------------------------------------

REQUEST = httpx.Request("GET", "https://fhir.example.org/r4/Patient/1")
BODY = json.dumps(PATIENT).encode()


def deflate(data: bytes, wbits: int) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return compressor.compress(data) + compressor.flush()


def zeros_gzipped(size: int) -> bytes:
    return gzip.compress(bytes(size), 9)


@pytest.mark.parametrize(
    ("coding", "raw", "expected"),
    [
        pytest.param(None, BODY, BODY, id="none"),
        pytest.param("identity", BODY, BODY, id="identity"),
        pytest.param("gzip", gzip.compress(BODY), BODY, id="gzip"),
        pytest.param("x-gzip", gzip.compress(BODY), BODY, id="x-gzip"),
        pytest.param("GZip", gzip.compress(BODY), BODY, id="case-insensitive"),
        pytest.param("deflate", deflate(BODY, zlib.MAX_WBITS), BODY, id="deflate-zlib"),
        pytest.param("deflate", deflate(BODY, -zlib.MAX_WBITS), BODY, id="deflate-raw"),
        pytest.param("gzip, gzip", gzip.compress(gzip.compress(BODY)), BODY, id="gzip-gzip"),
        pytest.param(
            "deflate, gzip",
            gzip.compress(deflate(BODY, zlib.MAX_WBITS)),
            BODY,
            id="undone-last-first",
        ),
        pytest.param(
            "gzip", gzip.compress(BODY[:10]) + gzip.compress(BODY[10:]), BODY, id="gzip-members"
        ),
        pytest.param("gzip", b"", b"", id="empty"),
        pytest.param("gzip", zeros_gzipped(MiB), bytes(MiB), id="exactly-the-cap"),
    ],
)
def test_decode_body(coding: str | None, raw: bytes, expected: bytes) -> None:
    headers = httpx.Headers({"Content-Encoding": coding} if coding else {})
    assert decode_body(raw, headers, max_bytes=MiB, request=REQUEST) == expected


@pytest.mark.parametrize(
    ("coding", "raw", "message"),
    [
        pytest.param("gzip", zeros_gzipped(MiB + 1), "larger than", id="one-byte-over"),
        pytest.param("gzip", zeros_gzipped(16 * MiB), "larger than", id="bomb"),
        pytest.param(
            "gzip, gzip", gzip.compress(zeros_gzipped(16 * MiB)), "larger than", id="bomb-gzip-gzip"
        ),
        pytest.param("gzip", gzip.compress(BODY)[:-9], "truncated", id="truncated"),
        pytest.param("gzip", b"\x1f\x8b\x08garbage", "corrupt", id="corrupt"),
        pytest.param("gzip", gzip.compress(BODY) + b"junk", "corrupt", id="trailing-junk"),
        pytest.param("deflate", b"not deflate at all", "corrupt", id="corrupt-deflate"),
        pytest.param("br", BODY, "'br'", id="brotli"),
        pytest.param("zstd", BODY, "'zstd'", id="zstd"),
        pytest.param("gzip, compress", BODY, "'compress'", id="compress-last"),
    ],
)
def test_decode_body_refuses(coding: str, raw: bytes, message: str) -> None:
    headers = httpx.Headers({"Content-Encoding": coding})
    with pytest.raises(ims_fhir.InvalidResponseError, match=message) as caught:
        decode_body(raw, headers, max_bytes=MiB, request=REQUEST)
    assert caught.value.request is REQUEST
    assert "GET https://fhir.example.org/r4/Patient/1" in str(caught.value)


def test_the_defaults_are_named_constants() -> None:
    with FhirClient("https://fhir.example.org/r4") as client:
        assert client.max_response_bytes == constants.MAX_RESPONSE_BYTES
