"""The synchronous FHIR client.

Generated from ``asynchronous.py`` by ``scripts/unasync.py``: edit that file, then run
``python scripts/unasync.py``. A test fails when this file is stale.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import ssl
import time
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import httpx
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.resource import Resource

from .._exceptions import InvalidResponseError, describe_request
from .auth import TokenAuth
from .constants import DEFAULT_DEADLINE, DEFAULT_TIMEOUT, MAX_PAGES, MAX_RESPONSE_BYTES
from .http import (
    JSON,
    BodyCounter,
    Call,
    Deadline,
    Outcome,
    ResourceType,
    RetryPolicy,
    Sink,
    bundle_call,
    bundle_outcomes,
    capabilities_call,
    check_base_url,
    conditional_update_call,
    create_call,
    decode_body,
    delete_call,
    expect_resource,
    history_call,
    install_log_redaction,
    json_bytes,
    make_status_error,
    next_link,
    read_call,
    read_json,
    same_origin,
    search_call,
    tls_context,
    to_model,
    translate_transport_error,
    type_name,
    update_call,
    validate_call,
    vread_call,
    write_outcome,
)

__all__ = ["FhirClient"]

R = TypeVar("R", bound=Resource)

logger = logging.getLogger("ims_fhir.client")


class FhirClient:
    """A FHIR R4 REST client over one pooled ``httpx.Client``.

    Typed in and out with fhir.resources R4B models (plain JSON dicts are accepted as input, and
    ``search``/``history`` yield dicts with ``raw=True``). Retries requests that are safe to
    repeat, follows ``next`` links lazily, and turns every failure into an
    :class:`~ims_fhir.FhirError`.

    Args:
        base_url: the server's FHIR base URL, e.g. ``https://fhir.example.org/r4``.
        auth: an ``httpx.Auth`` (:class:`~ims_fhir.BearerAuth`, ``httpx.BasicAuth``,
            :class:`~ims_fhir.SmartBackendAuth`), or None.
        timeout: an ``httpx.Timeout`` or seconds, for each wait (one read, one write); on by
            default.
        deadline: seconds each attempt may take in all (connect, send, headers, whole body,
            SMART token requests included), or None for no limit; a retry gets its own.
        retry: the retry policy (``RetryPolicy(max_retries=0)`` turns retries off).
        verify: TLS verification (on by default): True, or an ``ssl.SSLContext`` of your own.
        ca_bundle: a PEM file of CA certificates to trust besides the usual roots (a regional
            server with its own CA); verification stays on.
        allow_insecure_http: allow plain ``http://`` to a host other than this machine (also
            for a SMART or OAuth token endpoint).
        max_connections: the connection pool's size.
        max_response_bytes: the largest response body read, as sent and once decoded.
        transport: an httpx transport (tests, proxies); None for the default.
        headers: headers sent with every request (an API gateway's key, say); never logged.
        http_client: your own ``httpx.Client`` (proxies, event hooks, limits), used as it
            is and left open by :meth:`close`; its TLS settings, pool and transport are used,
            so ``verify``, ``ca_bundle``, ``max_connections`` and ``transport`` cannot be given
            with it. ``auth``, ``timeout``, ``deadline``, retries and ``headers`` still apply.
    """

    def __init__(
        self,
        base_url: str,
        *,
        auth: httpx.Auth | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        deadline: float | None = DEFAULT_DEADLINE,
        retry: RetryPolicy | None = None,
        verify: bool | ssl.SSLContext = True,
        ca_bundle: str | os.PathLike[str] | None = None,
        allow_insecure_http: bool = False,
        max_connections: int = 20,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        transport: httpx.BaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        """Create the client; nothing is sent until the first call."""
        if deadline is not None and not deadline > 0:
            raise ValueError(f"deadline must be a positive number of seconds or None: {deadline}")
        if max_response_bytes < 1:
            raise ValueError(f"max_response_bytes must be positive: {max_response_bytes}")
        if ca_bundle is not None and verify is not True:
            raise ValueError("give verify (an SSLContext) or ca_bundle, not both")
        self.base_url = check_base_url(base_url, allow_insecure_http=allow_insecure_http)
        if isinstance(auth, TokenAuth):
            if auth.fhir_base_url is None:
                auth.fhir_base_url = str(self.base_url)
            if auth.allow_insecure_http is None:
                auth.allow_insecure_http = allow_insecure_http
        self.deadline = deadline
        self.max_response_bytes = max_response_bytes
        self.retry = retry or RetryPolicy()
        self._auth = auth
        self._timeout = httpx.Timeout(timeout)
        self._headers = dict(headers or {})
        install_log_redaction()
        if http_client is not None:
            given = {
                "verify": verify is not True,
                "ca_bundle": ca_bundle is not None,
                "max_connections": max_connections != 20,
                "transport": transport is not None,
            }
            clashing = [name for name, present in given.items() if present]
            if clashing:
                raise ValueError(
                    f"{', '.join(clashing)} cannot be given with http_client: set them on it"
                )
            self._http = http_client
            self._owns_http = False
            return
        self._http = httpx.Client(
            timeout=self._timeout,
            verify=tls_context(ca_bundle) if ca_bundle is not None else verify,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=max_connections),
            transport=transport,
        )
        self._owns_http = True

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool (not that of an ``http_client`` you gave)."""
        if self._owns_http:
            self._http.close()

    # -- sending ---------------------------------------------------------------------------

    def _send(self, call: Call, *, ok: frozenset[int] = frozenset()) -> httpx.Response:
        """Send ``call`` with retries; return a successful response or raise."""
        attempt = 0
        while True:
            attempt += 1
            started = time.monotonic()
            request = call.build(
                self._http,
                self.base_url,
                self._timeout,
                Deadline.start(self.deadline, started),
                started,
                self._headers,
            )
            try:
                response = self._http.send(
                    request,
                    stream=True,
                    auth=self._auth or httpx.USE_CLIENT_DEFAULT,
                    follow_redirects=False,
                )
                try:
                    body = self._read_body(response)
                finally:
                    response.close()
            except httpx.TransportError as exc:
                wait = self.retry.delay(call, attempt, error=exc)
                logger.warning(
                    "%s failed (%s), attempt %d%s",
                    describe_request(request),
                    type(exc).__name__,
                    attempt,
                    f", retrying in {wait:.2f} s" if wait is not None else "",
                )
                if wait is None:
                    raise translate_transport_error(exc, request, time.monotonic()) from exc
                time.sleep(wait)
                continue
            response = httpx.Response(
                response.status_code,
                headers=_decoded_headers(response),
                content=body,
                request=response.request,
                extensions=response.extensions,
            )
            logger.debug(
                "%s -> %d (%.3f s)",
                describe_request(request),
                response.status_code,
                time.monotonic() - started,
            )
            if response.is_success or response.status_code in ok:
                return response
            wait = self.retry.delay(call, attempt, response=response)
            if wait is None:
                raise make_status_error(response)
            logger.warning(
                "%s -> %d, retrying in %.2f s",
                describe_request(request),
                response.status_code,
                wait,
            )
            time.sleep(wait)

    def _read_body(self, response: httpx.Response) -> bytes:
        """Read the body as sent within the size cap and the deadline, then decode it."""
        counter = BodyCounter(response, self.max_response_bytes)
        if response.is_stream_consumed:
            # An auth that reads responses (requires_response_body) had httpx read and decode it.
            counter.add(response.content, time.monotonic())
            return response.content
        chunks = []
        for chunk in response.iter_raw():
            counter.add(chunk, time.monotonic())
            chunks.append(chunk)
        return decode_body(
            b"".join(chunks),
            response.headers,
            max_bytes=self.max_response_bytes,
            request=response.request,
        )

    def send(self, call: Call, *, ok: frozenset[int] = frozenset()) -> httpx.Response:
        """Send ``call`` with retries; the answer with its body read (within the limits).

        For operations this client has no method for (the Bulk Data ``$export`` kick-off and
        status): a success, or a status in ``ok``, is returned with its headers; any other
        status raises its :class:`~ims_fhir.StatusError`.
        """
        return self._send(call, ok=ok)

    def download(
        self,
        url: str,
        sink: Sink,
        *,
        credentials: bool,
        accept: str,
        max_bytes: int,
    ) -> int:
        """GET ``url`` once and hand its body to ``sink`` chunk by chunk, as it arrives.

        For files too large to hold (Bulk Data NDJSON): nothing is kept here. The body is asked
        for unencoded (``Accept-Encoding: identity``) and one encoded anyway is refused, so
        what ``sink`` gets is what is counted against ``max_bytes``. ``credentials=False``
        sends neither the auth nor the extra headers: for a file on another host. No retries
        and no deadline (a large file takes what it takes; each read still times out): the
        caller decides whether to start the file again. Returns the bytes received.

        Raises:
            StatusError: an error status (its body read within the response limit).
            InvalidResponseError: an encoded body, or one larger than ``max_bytes``.
            TransportError: the connection failed or timed out.
        """
        headers = {"Accept": accept, "Accept-Encoding": "identity"}
        if credentials:
            headers |= self._headers
        request = self._http.build_request("GET", url, headers=headers, timeout=self._timeout)
        auth = (self._auth or httpx.USE_CLIENT_DEFAULT) if credentials else None
        try:
            response = self._http.send(request, stream=True, auth=auth, follow_redirects=False)
            try:
                if not response.is_success:
                    body = self._read_body(response)
                    raise make_status_error(
                        httpx.Response(
                            response.status_code,
                            headers=_decoded_headers(response),
                            content=body,
                            request=response.request,
                        )
                    )
                encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
                if encoding not in {"", "identity"}:
                    raise InvalidResponseError(
                        f"{describe_request(request)}: file sent encoded as {encoding!r} "
                        "though asked for unencoded",
                        request=request,
                    )
                counter = BodyCounter(response, max_bytes)
                for chunk in response.iter_raw():
                    counter.add(chunk, time.monotonic())
                    sink(chunk)
                return counter.size
            finally:
                response.close()
        except httpx.TransportError as exc:
            raise translate_transport_error(exc, request, time.monotonic()) from exc

    # -- operations ------------------------------------------------------------------------

    def request_json(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: JSON | None = None,
        retry_safe: bool | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> JSON:
        """Send any request (relative to the base URL) and return the FHIR JSON answer."""
        body = json_bytes(json_body) if json_body is not None else None
        safe = (
            method.upper() in {"GET", "HEAD", "PUT", "DELETE"} if retry_safe is None else retry_safe
        )
        call = Call(method.upper(), url, params, dict(headers or {}), body, safe)
        response = self._send(call)
        return read_json(response)

    def capabilities(self) -> CapabilityStatement:
        """Read the server's CapabilityStatement (``GET metadata``)."""
        response = self._send(capabilities_call())
        resource = to_model(expect_resource(response, "CapabilityStatement"), response)
        assert isinstance(resource, CapabilityStatement)
        return resource

    @overload
    def read(self, resource_type: type[R], resource_id: str) -> R: ...

    @overload
    def read(self, resource_type: str, resource_id: str) -> Resource: ...

    def read(self, resource_type: ResourceType, resource_id: str) -> Resource:
        """Read the current version of a resource (typed as the model class when given one)."""
        response = self._send(read_call(resource_type, resource_id))
        return to_model(expect_resource(response, type_name(resource_type)), response)

    def vread(self, resource_type: ResourceType, resource_id: str, version: str) -> Resource:
        """Read one version of a resource."""
        response = self._send(vread_call(resource_type, resource_id, version))
        return to_model(expect_resource(response, type_name(resource_type)), response)

    def create(
        self,
        resource: Resource | Mapping[str, Any],
        *,
        if_none_exist: str | Mapping[str, str] | None = None,
    ) -> Outcome:
        """Create a resource; with ``if_none_exist`` criteria, only if no match exists."""
        return write_outcome(self._send(create_call(resource, if_none_exist)))

    def update(
        self, resource: Resource | Mapping[str, Any], *, if_match: bool | str = False
    ) -> Outcome:
        """Update (or create at a client-chosen id) a resource.

        Args:
            resource: the resource, with its id.
            if_match: True to send ``If-Match`` with the resource's ``meta.versionId``, or the
                version (``"3"`` or ``'W/"3"'``) to send; a stale version raises
                :class:`~ims_fhir.VersionConflictError`.
        """
        return write_outcome(self._send(update_call(resource, if_match)))

    def conditional_update(
        self, resource: Resource | Mapping[str, Any], criteria: str | Mapping[str, str]
    ) -> Outcome:
        """Create or update the one resource matching ``criteria`` (``PUT Type?criteria``)."""
        return write_outcome(self._send(conditional_update_call(resource, criteria)))

    def delete(self, resource_type: ResourceType, resource_id: str) -> None:
        """Delete a resource (deleting one already gone is not an error)."""
        self._send(delete_call(resource_type, resource_id), ok=frozenset({404, 410}))

    @overload
    def search(
        self,
        resource_type: type[R],
        params: Mapping[str, Any] | None = ...,
        *,
        raw: Literal[False] = ...,
        max_pages: int = ...,
    ) -> Iterator[R]: ...

    @overload
    def search(
        self,
        resource_type: str | None,
        params: Mapping[str, Any] | None = ...,
        *,
        raw: Literal[False] = ...,
        max_pages: int = ...,
    ) -> Iterator[Resource]: ...

    @overload
    def search(
        self,
        resource_type: ResourceType | None,
        params: Mapping[str, Any] | None = ...,
        *,
        raw: Literal[True],
        max_pages: int = ...,
    ) -> Iterator[JSON]: ...

    def search(
        self,
        resource_type: ResourceType | None,
        params: Mapping[str, Any] | None = None,
        *,
        raw: bool = False,
        max_pages: int = MAX_PAGES,
    ) -> Iterator[Any]:
        """Search lazily: yield every matching (and included) resource over all pages.

        Given a model class (``Observation``), yield only resources of that type, typed as it
        (included resources of other types are left out: search by name for them). ``next``
        links are followed whether absolute or relative; one pointing at another host, or back
        at a page already read, stops the search with an InvalidResponseError, so credentials
        never leave for another host and paging cannot loop.
        """
        only = (
            None
            if raw or resource_type is None or isinstance(resource_type, str)
            else resource_type
        )
        return self._pages(
            search_call(resource_type, params), raw=raw, max_pages=max_pages, only=only
        )

    def history(
        self,
        resource_type: ResourceType | None = None,
        resource_id: str | None = None,
        *,
        since: str | dt.datetime | None = None,
        raw: bool = False,
        max_pages: int = MAX_PAGES,
    ) -> Iterator[Any]:
        """Yield the versions in a history (system, type or instance), newest first."""
        call = history_call(resource_type, resource_id, since)
        return self._pages(call, raw=raw, max_pages=max_pages)

    def _pages(
        self, call: Call, *, raw: bool, max_pages: int, only: type[Resource] | None = None
    ) -> Iterator[Any]:
        for bundle, response in self._bundles(call, max_pages=max_pages):
            entries = bundle.get("entry")
            for entry in entries if isinstance(entries, list) else []:
                # An entry without a resource (or not an object at all) holds nothing to yield.
                resource = entry.get("resource") if isinstance(entry, dict) else None
                if not isinstance(resource, dict):
                    continue
                if raw:
                    yield resource
                    continue
                model = to_model(resource, response)
                if only is None or isinstance(model, only):
                    yield model

    def pages(
        self,
        resource_type: ResourceType | None,
        params: Mapping[str, Any] | None = None,
        *,
        max_pages: int = MAX_PAGES,
    ) -> Iterator[JSON]:
        """Search lazily, yielding each page's Bundle (JSON) with its matches and includes."""
        return self._page_bundles(search_call(resource_type, params), max_pages)

    def _page_bundles(self, call: Call, max_pages: int) -> Iterator[JSON]:
        for bundle, _ in self._bundles(call, max_pages=max_pages):
            yield bundle

    def _bundles(self, call: Call, *, max_pages: int) -> Iterator[tuple[JSON, httpx.Response]]:
        seen: set[str] = set()
        pages = 0
        current: Call | None = call
        while current is not None:
            pages += 1
            if pages > max_pages:
                raise InvalidResponseError(f"search stopped after {max_pages} pages")
            response = self._send(current)
            bundle = expect_resource(response, "Bundle")
            yield bundle, response
            link = next_link(bundle)
            current = None
            if link is not None:
                url = self.base_url.join(link)
                if not same_origin(url, self.base_url):
                    raise InvalidResponseError(
                        f"{describe_request(response.request)}: next link points to another "
                        f"host ({url.host}); not followed",
                        request=response.request,
                        response=response,
                    )
                key = str(url)
                if key in seen or key == str(response.request.url):
                    raise InvalidResponseError(
                        f"{describe_request(response.request)}: next link loops back to a page "
                        "already read",
                        request=response.request,
                        response=response,
                    )
                seen.add(key)
                current = Call("GET", key)

    def transaction(self, bundle: Bundle | Mapping[str, Any]) -> list[Outcome]:
        """Post a transaction Bundle; all entries succeed or none do. Returns each outcome."""
        response = self._send(bundle_call(bundle, "transaction"))
        return bundle_outcomes(response, "transaction")

    def batch(self, bundle: Bundle | Mapping[str, Any]) -> list[Outcome]:
        """Post a batch Bundle; each entry succeeds or fails on its own. Returns each outcome."""
        response = self._send(bundle_call(bundle, "batch"))
        return bundle_outcomes(response, "batch")

    def validate(
        self, resource: Resource | Mapping[str, Any], *, profile: str | None = None
    ) -> JSON:
        """Run ``$validate`` and return the OperationOutcome (errors do not raise)."""
        response = self._send(validate_call(resource, profile), ok=frozenset({400, 412, 422}))
        return expect_resource(response, "OperationOutcome")


def _decoded_headers(response: httpx.Response) -> list[tuple[str, str]]:
    """The headers for a response rebuilt around its decoded body (not to be decoded again)."""
    return [
        (k, v)
        for k, v in response.headers.multi_items()
        if k.lower() not in {"content-encoding", "content-length", "transfer-encoding"}
    ]
