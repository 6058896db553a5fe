"""Limits of one request: a deadline over the whole attempt, and bodies decoded within a cap.

The servers here are real sockets on 127.0.0.1 misbehaving the ways servers were seen to: a body
trickled a byte at a time, a chunked body that never ends, ``gzip, gzip`` that inflates a few
kilobytes to gigabytes. Every test runs both clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import json
import re
import threading
import time
import tracemalloc
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import pytest
from joserfc.jwk import RSAKey

import ims_fhir
from ims_fhir import AsyncFhirClient, FhirClient, RetryPolicy, SmartBackendAuth
from ims_fhir.client import constants
from ims_fhir.client.http import (
    DEADLINE,
    Deadline,
    decode_body,
    limits_for,
    translate_transport_error,
)

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


async def trickle(request: Request, writer: asyncio.StreamWriter) -> None:
    """Headers, then one byte of body every 0.2 s (for at most 20 s)."""
    writer.write(head({"Content-Type": "application/fhir+json", "Content-Length": "1000"}))
    for _ in range(100):
        writer.write(b" ")
        await writer.drain()
        await asyncio.sleep(0.2)


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


# -- the deadline ------------------------------------------------------------------------------


def test_a_trickled_body_stops_at_the_deadline_not_never(kind: str) -> None:
    with LocalServer(trickle) as server:
        started = time.monotonic()
        with pytest.raises(
            ims_fhir.TimeoutException, match=r"within the 1\.5 s deadline"
        ) as caught:
            read_patient(kind, server.url, timeout=5.0, deadline=1.5, retry=NO_RETRY)
        elapsed = time.monotonic() - started
    assert 1.5 <= elapsed < 4.0
    assert len(server.requests) == 1
    assert "GET http://127.0.0.1" in str(caught.value)


def test_each_retry_gets_a_deadline_of_its_own(kind: str) -> None:
    retry = RetryPolicy(max_retries=1, initial_delay=0.0, jitter=0.0)
    with LocalServer(trickle) as server:
        started = time.monotonic()
        with pytest.raises(ims_fhir.TimeoutException):
            read_patient(kind, server.url, timeout=5.0, deadline=0.5, retry=retry)
        elapsed = time.monotonic() - started
    assert len(server.requests) == 2
    assert 1.0 <= elapsed < 3.5


def test_an_endless_chunked_body_stops_at_the_deadline(kind: str) -> None:
    with LocalServer(endless_chunked(1024, pause=0.05, chunks=400)) as server:
        started = time.monotonic()
        with pytest.raises(ims_fhir.TimeoutException, match="deadline"):
            read_patient(kind, server.url, timeout=5.0, deadline=1.0, retry=NO_RETRY)
        assert time.monotonic() - started < 3.5


def test_an_endless_chunked_body_stops_at_the_size_cap(kind: str) -> None:
    with LocalServer(endless_chunked(64 * 1024, pause=0.0, chunks=1000)) as server:
        with pytest.raises(ims_fhir.InvalidResponseError, match=f"larger than {MiB} bytes"):
            read_patient(kind, server.url, max_response_bytes=MiB, retry=NO_RETRY)


def test_no_deadline_waits_for_a_slow_but_complete_answer(kind: str) -> None:
    async def slow(request: Request, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.3)
        await answer(writer, json.dumps(PATIENT).encode())

    with LocalServer(slow) as server:
        assert read_patient(kind, server.url, deadline=None).id == "1"


# -- decoding within the cap -------------------------------------------------------------------


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


# -- SMART requests share the attempt's bounds -------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> RSAKey:
    return RSAKey.generate_key(2048)


def test_a_trickling_token_endpoint_stops_at_the_deadline(kind: str, rsa_key: RSAKey) -> None:
    with LocalServer(trickle) as server:
        auth = SmartBackendAuth("c", rsa_key, kid="k", token_url=f"{server.url}/token")
        started = time.monotonic()
        with pytest.raises(ims_fhir.TimeoutException, match=r"POST .*/token.*1\.5 s deadline"):
            read_patient(kind, server.url, auth=auth, timeout=5.0, deadline=1.5, retry=NO_RETRY)
        assert time.monotonic() - started < 4.0
    assert [r.path for r in server.requests] == ["/fhir/token"]


def test_a_silent_token_endpoint_times_out_like_any_request(kind: str, rsa_key: RSAKey) -> None:
    async def silent(request: Request, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(20)

    with LocalServer(silent) as server:
        auth = SmartBackendAuth("c", rsa_key, kid="k", token_url=f"{server.url}/token")
        started = time.monotonic()
        with pytest.raises(ims_fhir.TimeoutException, match="ReadTimeout"):
            read_patient(kind, server.url, auth=auth, timeout=0.5, deadline=None, retry=NO_RETRY)
        assert time.monotonic() - started < 3.0


def test_with_smart_the_fhir_answer_is_still_decoded_within_the_cap(
    kind: str, rsa_key: RSAKey
) -> None:
    bomb = gzip_gzip_bomb()

    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        if request.path.endswith("/token"):
            await answer(writer, b'{"access_token": "t", "expires_in": 300}')
        else:
            await answer(writer, bomb, Content_Encoding="gzip, gzip")

    with LocalServer(handler) as server:
        auth = SmartBackendAuth("c", rsa_key, kid="k", token_url=f"{server.url}/token")
        tracemalloc.start()
        try:
            with pytest.raises(ims_fhir.InvalidResponseError, match="once decoded"):
                read_patient(kind, server.url, auth=auth, max_response_bytes=16 * MiB)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 64 * MiB
    assert server.requests[1].headers["authorization"] == "Bearer t"


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


TIMEOUT = {"connect": 10.0, "read": 60.0, "write": 60.0, "pool": None}


@pytest.mark.parametrize(
    ("left", "expected"),
    [
        pytest.param(
            300.0, {"connect": 10.0, "read": 60.0, "write": 60.0, "pool": 300.0}, id="ample"
        ),
        pytest.param(1.5, {"connect": 1.5, "read": 1.5, "write": 1.5, "pool": 1.5}, id="short"),
        pytest.param(
            -2.0, {"connect": 0.001, "read": 0.001, "write": 0.001, "pool": 0.001}, id="passed"
        ),
    ],
)
def test_a_deadline_cuts_every_wait_to_the_time_left(
    left: float, expected: dict[str, float]
) -> None:
    deadline = Deadline(300.0, expires=100.0 + left)
    assert deadline.extensions(TIMEOUT, now=100.0) == {"timeout": expected, DEADLINE: deadline}


def test_a_deadline_is_checked_against_the_clock() -> None:
    deadline = Deadline.start(1.5, now=100.0)
    assert deadline is not None and Deadline.start(None, now=100.0) is None
    deadline.check(REQUEST, now=101.4)
    with pytest.raises(httpx.ReadTimeout, match=r"1\.5 s deadline"):
        deadline.check(REQUEST, now=101.5)


def test_requests_sent_for_another_get_its_limits() -> None:
    deadline = Deadline(2.0, expires=102.0)
    fhir = httpx.Request("GET", "https://fhir.example.org/r4/Patient/1")
    fhir.extensions = deadline.extensions(TIMEOUT, now=100.0)
    assert limits_for(fhir, now=101.0)["timeout"]["read"] == 1.0
    assert limits_for(fhir, now=101.0)[DEADLINE] is deadline
    plain = httpx.Request("GET", "https://fhir.example.org/r4", extensions={"timeout": TIMEOUT})
    assert limits_for(plain, now=101.0) == {"timeout": TIMEOUT}
    assert limits_for(httpx.Request("GET", "https://x.example"), now=0.0) == {}


@pytest.mark.parametrize(
    ("now", "message"),
    [
        pytest.param(101.0, r"timed out \(ReadTimeout\)", id="before-the-deadline"),
        pytest.param(
            102.5, r"timed out \(no complete answer within the 2 s deadline\)", id="after"
        ),
    ],
)
def test_a_timeout_names_the_deadline_once_it_has_passed(now: float, message: str) -> None:
    request = httpx.Request("GET", "https://fhir.example.org/r4/Patient/1")
    request.extensions = Deadline(2.0, expires=102.0).extensions(TIMEOUT, now=100.0)
    error = translate_transport_error(httpx.ReadTimeout("t", request=request), request, now)
    assert isinstance(error, ims_fhir.TimeoutException)
    assert str(error).startswith("GET https://fhir.example.org/r4/Patient/1: ")
    assert error.request is request
    assert re.search(message, str(error))


@pytest.mark.parametrize("deadline", [0.0, -1.0, float("nan")])
def test_a_deadline_must_be_positive(deadline: float) -> None:
    with pytest.raises(ValueError, match="deadline"):
        FhirClient("https://fhir.example.org/r4", deadline=deadline)


def test_the_defaults_are_named_constants() -> None:
    with FhirClient("https://fhir.example.org/r4") as client:
        assert client.deadline == constants.DEFAULT_DEADLINE == 300.0
        assert client.max_response_bytes == constants.MAX_RESPONSE_BYTES
