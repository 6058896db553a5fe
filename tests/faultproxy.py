"""A fault-injecting HTTP proxy on loopback: the project's own tool for reliability tests.

It sits between ims-fhir and the real FHIR server and, at configurable rates, answers 503 or
429 with ``Retry-After``, resets the connection before the request reaches the server, resets it
after the server has processed the request (so the response is lost), stalls past the client's
timeout, or truncates the response body. It can also call a hook on each request and response,
which the crash tests use to ``kill -9`` a push at an exact point. With ``latency`` it delays
every request, like a network between a clinic and a regional server (the benchmarks use that).

HTTP/1.1 only, one request per connection (it answers ``Connection: close``); enough for httpx.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

FAULTS = ("503", "429", "reset-before", "reset-after", "stall", "truncate")


@dataclass
class FaultPlan:
    """How often each fault happens (0..1 each, checked in FAULTS order), and hooks."""

    rates: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    stall_seconds: float = 5.0
    retry_after: str = "1"
    latency: float = 0.0  # seconds each request waits before it is forwarded: a network's RTT
    on_request: Callable[[str, str, int], None] | None = None  # (method, path, count)
    on_response: Callable[[str, str, int, int], None] | None = None  # (..., status)
    # Rewrites a response body: (method, path with query, body) -> body. A server's lies.
    rewrite: Callable[[str, str, bytes], bytes] | None = None
    # Send the client's Host on, as reverse proxies do, so the server's paging links point
    # back through the proxy.
    forward_host: bool = False

    @classmethod
    def uniform(cls, rate: float, seed: int = 0, **kwargs: object) -> FaultPlan:
        """Every fault at ``rate / len(FAULTS)``: ``rate`` of requests see some fault."""
        return cls({f: rate / len(FAULTS) for f in FAULTS}, seed, **kwargs)  # type: ignore[arg-type]


class FaultProxy:
    """Run with ``with FaultProxy(upstream, plan) as proxy: proxy.url ...``."""

    def __init__(self, upstream: str, plan: FaultPlan) -> None:
        self.upstream = upstream.rstrip("/")
        self.plan = plan
        self.faults: Counter[str] = Counter()
        self.requests = 0
        self.in_flight = 0  # connections being served (a killed client's may outlive it)
        self._rng = random.Random(plan.seed)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        """The proxied FHIR base URL."""
        path = httpx.URL(self.upstream).path
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_idle(self, timeout: float = 120.0) -> None:
        """Wait until no connection is being served: a killed client's last request may still
        be on its way to the server, and its hooks would otherwise fire during the next run."""
        deadline = time.monotonic() + timeout
        while self.in_flight:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.in_flight} proxied requests still open")
            time.sleep(0.05)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _shutdown(self) -> None:
        """Cancel connections still open (a stall in progress) and close them."""
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._server.close()
        await self._server.wait_closed()
        await self._client.aclose()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._client = httpx.AsyncClient(timeout=300)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def _pick(self) -> str | None:
        roll = self._rng.random()
        edge = 0.0
        for fault in FAULTS:
            edge += self.plan.rates.get(fault, 0.0)
            if roll < edge:
                return fault
        return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.in_flight += 1
        try:
            await self._serve(reader, writer)
        except (asyncio.CancelledError, ConnectionError, httpx.HTTPError):
            pass
        finally:
            if not writer.is_closing():
                writer.transport.abort()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass
            self.in_flight -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = [tuple(line.split(": ", 1)) for line in lines[1:] if ": " in line]
        length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
        body = await reader.readexactly(length) if length else b""
        self.requests += 1
        count = self.requests
        path = target.split("?", 1)[0]
        if self.plan.on_request:
            self.plan.on_request(method, path, count)
        fault = self._pick()
        if fault:
            self.faults[fault] += 1
        if fault in {"503", "429"}:
            message = f"HTTP/1.1 {fault} Busy\r\nRetry-After: {self.plan.retry_after}\r\n"
            writer.write((message + "Content-Length: 0\r\nConnection: close\r\n\r\n").encode())
            await writer.drain()
            writer.close()
            return
        if fault == "reset-before":
            writer.transport.abort()
            return
        if fault == "stall":
            await asyncio.sleep(self.plan.stall_seconds)
            writer.transport.abort()
            return
        if self.plan.latency:
            await asyncio.sleep(self.plan.latency)
        dropped = {"connection", "content-length"} | (set() if self.plan.forward_host else {"host"})
        forwarded = {k: v for k, v in headers if k.lower() not in dropped}
        upstream = await self._client.request(
            method,
            self.upstream + target[len(httpx.URL(self.upstream).path) :],
            headers=forwarded,
            content=body,
        )
        if self.plan.on_response:
            self.plan.on_response(method, path, count, upstream.status_code)
        if fault == "reset-after":
            writer.transport.abort()
            return
        content = upstream.content
        if self.plan.rewrite:
            content = self.plan.rewrite(method, target, content)
        reply = [f"HTTP/1.1 {upstream.status_code} {upstream.reason_phrase}"]
        for key, value in upstream.headers.items():
            if key.lower() not in {
                "content-length",
                "transfer-encoding",
                "connection",
                "content-encoding",
            }:
                reply.append(f"{key}: {value}")
        reply += [f"Content-Length: {len(content)}", "Connection: close", "", ""]
        writer.write("\r\n".join(reply).encode("latin-1"))
        writer.write(content[: len(content) // 2] if fault == "truncate" else content)
        try:
            await writer.drain()
        finally:
            if fault == "truncate":
                writer.transport.abort()
            else:
                writer.close()
