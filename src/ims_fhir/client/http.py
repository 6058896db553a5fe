"""The I/O-free half of the FHIR client: building requests, reading responses, retry policy.

:class:`~ims_fhir.AsyncFhirClient` and :class:`~ims_fhir.FhirClient` only send what this module
builds and hand back what it parses, so the two cannot drift apart.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import ipaddress
import json
import logging
import os
import random
import ssl
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

import certifi
import httpx
import orjson
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource

from .._exceptions import (
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    ConflictError,
    ConnectError,
    GoneError,
    InvalidResponseError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    RateLimitError,
    ServerError,
    StatusError,
    TimeoutException,
    TransportError,
    UnprocessableEntityError,
    VersionConflictError,
    describe_request,
)
from .constants import (
    DEFAULT_MAX_RETRIES,
    FHIR_JSON,
    INITIAL_RETRY_DELAY,
    MAX_RETRY_AFTER,
    MAX_RETRY_DELAY,
    RETRY_JITTER,
    RETRY_STATUSES,
)

__all__ = ["Call", "ClientOptions", "Outcome", "RetryPolicy"]

logger = logging.getLogger("ims_fhir.client")

JSON = dict[str, Any]
ResourceType = str | type[Resource]
Sink = Callable[[bytes], object]
"""Where a download's chunks go, one at a time (a file's ``write``)."""

_SAFE_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE"})

ACCEPT_ENCODING = "gzip, deflate"
"""The codings asked for: exactly those :func:`decode_body` undoes (httpx would add br, zstd)."""


class RedactQueryFilter(logging.Filter):
    """Strip query strings from the URLs httpx logs: searches carry patient identifiers."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's URL arguments; never drop the record."""
        if isinstance(record.args, tuple):
            record.args = tuple(
                arg.copy_with(query=None) if isinstance(arg, httpx.URL) and arg.query else arg
                for arg in record.args
            )
        return True


_REDACT = RedactQueryFilter()


def install_log_redaction() -> None:
    """Attach the redacting filter to httpx's logger (once)."""
    httpx_logger = logging.getLogger("httpx")
    if _REDACT not in httpx_logger.filters:
        httpx_logger.addFilter(_REDACT)


class ClientOptions(TypedDict, total=False):
    """Settings of the client that :func:`~ims_fhir.push` and ``pull_all`` make.

    The keyword arguments of :class:`~ims_fhir.AsyncFhirClient` of the same names.
    """

    auth: httpx.Auth | None
    timeout: httpx.Timeout | float
    deadline: float | None
    retry: RetryPolicy | None
    verify: bool | ssl.SSLContext
    ca_bundle: str | os.PathLike[str] | None
    allow_insecure_http: bool
    max_connections: int
    max_response_bytes: int
    headers: Mapping[str, str] | None
    transport: httpx.AsyncBaseTransport | None
    http_client: httpx.AsyncClient | None


# -- results ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one write, or of one entry of a transaction or batch."""

    status: int
    location: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    resource: Resource | None = None
    outcome: JSON | None = None

    @property
    def id(self) -> str | None:
        """The resource id from ``location`` (``Type/id/_history/n``)."""
        parts = _location_parts(self.location)
        return parts[1] if parts else None

    @property
    def version(self) -> str | None:
        """The version from ``etag`` (``W/"3"``) or ``location``."""
        if self.etag:
            return self.etag.removeprefix("W/").strip('"')
        parts = _location_parts(self.location)
        return parts[2] if parts else None


def _location_parts(location: str | None) -> tuple[str, str, str | None] | None:
    if not location:
        return None
    parts = location.rstrip("/").split("/")
    if "_history" in parts:
        at = parts.index("_history")
        if at >= 2 and at + 1 < len(parts):
            return parts[at - 2], parts[at - 1], parts[at + 1]
    if len(parts) >= 2:
        return parts[-2], parts[-1], None
    return None


# -- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """One FHIR interaction to send: the request and whether repeating it is safe."""

    method: str
    url: str
    params: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    retry_safe: bool = True

    def build(
        self,
        client: httpx.Client | httpx.AsyncClient,
        base_url: httpx.URL,
        timeout: httpx.Timeout,
        deadline: Deadline | None = None,
        now: float = 0.0,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Request:
        """Build the httpx request on ``client`` for the server at ``base_url``.

        The URL is made absolute here rather than by the client's ``base_url``, so a client the
        caller made (without one) works too; ``headers`` are added to every request. With a
        ``deadline`` (started at ``now``), each of the ``timeout`` waits is cut to it.
        """
        all_headers = {
            "Accept": FHIR_JSON,
            "Accept-Encoding": ACCEPT_ENCODING,
            **(headers or {}),
            **self.headers,
        }
        if self.body is not None:
            all_headers["Content-Type"] = f"{FHIR_JSON}; charset=utf-8"
        return client.build_request(
            self.method,
            merge_url(base_url, self.url),
            params=self.params,
            headers=all_headers,
            content=self.body,
            timeout=timeout,
            extensions=deadline.extensions(timeout.as_dict(), now) if deadline else None,
        )


def merge_url(base_url: httpx.URL, url: str) -> httpx.URL:
    """``url`` relative to ``base_url`` (which ends with ``/``), as httpx's ``base_url`` does."""
    merged = httpx.URL(url)
    if merged.is_relative_url:
        return base_url.copy_with(raw_path=base_url.raw_path + merged.raw_path.lstrip(b"/"))
    return merged


def tls_context(ca_bundle: str | os.PathLike[str] | None) -> ssl.SSLContext:
    """A verifying TLS context trusting the usual roots, and the CAs in ``ca_bundle`` too.

    The bundle adds trust (a regional server's own CA); it never turns verification off.
    """
    context = ssl.create_default_context(cafile=certifi.where())
    if ca_bundle is not None:
        try:
            context.load_verify_locations(cafile=os.fspath(ca_bundle))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(
                f"CA bundle {os.fspath(ca_bundle)}: {exc.strerror or exc}",
                setting="ca_bundle",
                fix="give a PEM file of CA certificates",
            ) from exc
    return context


# -- limits of one attempt ----------------------------------------------------------------------

DEADLINE = "ims_fhir.deadline"
"""The request extension holding the attempt's :class:`Deadline` (httpx passes it along)."""

# A zero socket timeout means "do not block" (an OSError), not "time is up": never go below this.
_SHORTEST_WAIT = 0.001


@dataclass(frozen=True, slots=True)
class Deadline:
    """The time one attempt may take in all: connect, send, headers and the whole body.

    httpx's timeouts bound each wait (one read), so a server trickling bytes never trips them.
    A deadline cuts every timeout to the time left, and is checked between body chunks; so an
    attempt ends at most one (shortened) wait after its deadline. Headers are the exception:
    httpcore reads them with no check in between, so trickled headers are noticed only once
    complete (httpcore allows 100 KiB of them).
    """

    seconds: float
    expires: float
    """The ``time.monotonic()`` reading at which it passes."""

    @classmethod
    def start(cls, seconds: float | None, now: float) -> Deadline | None:
        """Start a deadline of ``seconds`` at ``now`` (None: no deadline)."""
        return None if seconds is None else cls(seconds, now + seconds)

    def extensions(self, timeout: Mapping[str, float | None], now: float) -> dict[str, Any]:
        """Request extensions: ``timeout`` with each wait cut to the time left, and this."""
        left = max(self.expires - now, _SHORTEST_WAIT)
        waits = {
            phase: left if wait is None else min(wait, left) for phase, wait in timeout.items()
        }
        return {"timeout": waits, DEADLINE: self}

    def check(self, request: httpx.Request, now: float) -> None:
        """Raise ``httpx.ReadTimeout`` once passed (handled, and retried, as any timeout)."""
        if now >= self.expires:
            raise httpx.ReadTimeout(
                f"no complete answer within the {self.seconds:g} s deadline", request=request
            )


def deadline_of(request: httpx.Request) -> Deadline | None:
    """Return the deadline a request is sent under, if any."""
    deadline = request.extensions.get(DEADLINE)
    return deadline if isinstance(deadline, Deadline) else None


def limits_for(request: httpx.Request, now: float) -> dict[str, Any]:
    """Return the timeout and deadline extensions for a request sent on behalf of ``request``.

    httpx sends the requests of an auth flow (SMART discovery and token) with no timeout at all
    unless they carry one; given ``request``'s, cut to what is left of its deadline, they stay
    within the attempt's bounds.
    """
    timeout = request.extensions.get("timeout")
    deadline = deadline_of(request)
    if deadline is not None:
        return deadline.extensions(timeout or {}, now)
    return {} if timeout is None else {"timeout": timeout}


class BodyCounter:
    """Counts a response body's bytes, as sent, against a size cap and the request's deadline.

    The clients read the body in chunks and call :meth:`add` for each, so neither a huge body
    nor a trickling one is read to its end.
    """

    def __init__(self, response: httpx.Response, max_bytes: int) -> None:
        """Start counting; a declared ``Content-Length`` over ``max_bytes`` fails at once."""
        self.request = response.request
        self.max_bytes = max_bytes
        self.size = 0
        self.deadline = deadline_of(self.request)
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise InvalidResponseError(
                f"{describe_request(self.request)}: response of {declared} bytes is too large "
                f"(the limit is {max_bytes})",
                request=self.request,
            )

    def add(self, chunk: bytes, now: float) -> None:
        """Count ``chunk``, received at ``now``; raise past the cap or the deadline."""
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise InvalidResponseError(
                f"{describe_request(self.request)}: response larger than {self.max_bytes} bytes",
                request=self.request,
            )
        if self.deadline is not None:
            self.deadline.check(self.request, now)


# -- content codings ----------------------------------------------------------------------------

_WBITS = {
    "gzip": (16 + zlib.MAX_WBITS,),
    "x-gzip": (16 + zlib.MAX_WBITS,),  # an alias recipients must accept (RFC 9110 8.4.1.3)
    "deflate": (zlib.MAX_WBITS, -zlib.MAX_WBITS),  # zlib-wrapped as specified, or raw as sent
}


def decode_body(
    raw: bytes, headers: httpx.Headers, *, max_bytes: int, request: httpx.Request
) -> bytes:
    """Undo a body's ``Content-Encoding``, holding at most ``max_bytes`` of any layer.

    httpx inflates a whole network chunk in one call, so a few kilobytes of ``gzip, gzip`` grow
    to gigabytes before any size check; here each layer stops one byte past the cap. Codings are
    listed in the order they were applied, so they are undone last first.
    """
    body = raw
    for coding in reversed(headers.get_list("Content-Encoding", split_commas=True)):
        coding = coding.strip().lower()
        if coding in {"", "identity"}:
            continue
        if coding not in _WBITS:
            raise InvalidResponseError(
                f"{describe_request(request)}: response encoded as {coding!r}, which ims-fhir "
                f"does not decode (it asks for {ACCEPT_ENCODING})",
                request=request,
            )
        body = _inflate(body, coding, max_bytes, request)
    return body


def _inflate(data: bytes, coding: str, max_bytes: int, request: httpx.Request) -> bytes:
    where = describe_request(request)
    parts: list[bytes] = []
    size = 0
    while data:  # gzip members may follow one another
        error: zlib.error | None = None
        for wbits in _WBITS[coding]:
            inflater = zlib.decompressobj(wbits)
            try:
                # Stop one byte past the cap (max_length is never 0, which would mean no limit).
                part = inflater.decompress(data, max_bytes - size + 1)
                break
            except zlib.error as exc:
                error = exc
        else:
            raise InvalidResponseError(
                f"{where}: corrupt {coding} body ({error})", request=request
            ) from error
        size += len(part)
        if size > max_bytes:
            raise InvalidResponseError(
                f"{where}: response larger than {max_bytes} bytes once decoded ({coding})",
                request=request,
            )
        if not inflater.eof:
            raise InvalidResponseError(f"{where}: truncated {coding} body", request=request)
        parts.append(part)
        data = inflater.unused_data
    return b"".join(parts)


def type_name(resource_type: ResourceType) -> str:
    """Return the FHIR type name of a type given as a string or a model class."""
    if isinstance(resource_type, str):
        return resource_type
    return str(resource_type.get_resource_type())


def _body(resource: Resource | Mapping[str, Any]) -> bytes:
    if isinstance(resource, Resource):
        text: str = resource.model_dump_json()
        return text.encode("utf-8")
    return json_bytes(resource)


def json_bytes(value: Any) -> bytes:
    """A request body: compact JSON in UTF-8, by orjson (the standard library where it refuses)."""
    try:
        return orjson.dumps(value)
    except (orjson.JSONEncodeError, TypeError):
        # A lone surrogate or an integer beyond 64 bits: written by json, escaped to ASCII (a
        # server refuses what it cannot take, with an answer the caller reports).
        return json.dumps(value, separators=(",", ":")).encode("ascii")


def _type_of(resource: Resource | Mapping[str, Any]) -> str:
    if isinstance(resource, Resource):
        return str(resource.get_resource_type())
    return str(resource["resourceType"])


def _id_of(resource: Resource | Mapping[str, Any]) -> str | None:
    value = resource.id if isinstance(resource, Resource) else resource.get("id")
    return str(value) if value else None


def _version_of(resource: Resource | Mapping[str, Any]) -> str | None:
    if isinstance(resource, Resource):
        return resource.meta.versionId if resource.meta and resource.meta.versionId else None
    return (resource.get("meta") or {}).get("versionId")


def criteria_query(criteria: str | Mapping[str, str]) -> str:
    """Return search criteria as a query string (``identifier=system|value``)."""
    if isinstance(criteria, str):
        return criteria.lstrip("?")
    return str(httpx.QueryParams(dict(criteria)))


def capabilities_call() -> Call:
    """``GET metadata``."""
    return Call("GET", "metadata")


def read_call(resource_type: ResourceType, resource_id: str) -> Call:
    """``GET Type/id``."""
    return Call("GET", f"{type_name(resource_type)}/{resource_id}")


def vread_call(resource_type: ResourceType, resource_id: str, version: str) -> Call:
    """``GET Type/id/_history/version``."""
    return Call("GET", f"{type_name(resource_type)}/{resource_id}/_history/{version}")


def create_call(
    resource: Resource | Mapping[str, Any], if_none_exist: str | Mapping[str, str] | None
) -> Call:
    """``POST Type``, conditional with ``If-None-Exist`` when criteria are given."""
    headers = {"Prefer": "return=representation"}
    if if_none_exist is not None:
        headers["If-None-Exist"] = criteria_query(if_none_exist)
    # A plain create repeated after a lost response would create a duplicate.
    return Call(
        "POST",
        _type_of(resource),
        headers=headers,
        body=_body(resource),
        retry_safe=if_none_exist is not None,
    )


def update_call(resource: Resource | Mapping[str, Any], if_match: bool | str) -> Call:
    """``PUT Type/id``, with ``If-Match`` (from the resource's version, or as given)."""
    resource_id = _id_of(resource)
    if resource_id is None:
        raise ConfigurationError("update needs a resource with an id; use conditional_update")
    headers = {"Prefer": "return=representation"}
    if if_match:
        version = if_match if isinstance(if_match, str) else _version_of(resource)
        if version is None:
            raise ConfigurationError("if_match=True needs the resource's meta.versionId")
        headers["If-Match"] = version if version.startswith("W/") else f'W/"{version}"'
    return Call("PUT", f"{_type_of(resource)}/{resource_id}", headers=headers, body=_body(resource))


def conditional_update_call(
    resource: Resource | Mapping[str, Any], criteria: str | Mapping[str, str]
) -> Call:
    """``PUT Type?criteria``."""
    url = f"{_type_of(resource)}?{criteria_query(criteria)}"
    return Call("PUT", url, headers={"Prefer": "return=representation"}, body=_body(resource))


def delete_call(resource_type: ResourceType, resource_id: str) -> Call:
    """``DELETE Type/id``."""
    return Call("DELETE", f"{type_name(resource_type)}/{resource_id}")


def search_call(resource_type: ResourceType | None, params: Mapping[str, Any] | None) -> Call:
    """``GET Type?params`` (or a system-wide search when the type is None).

    Asks for fresh results: some servers (HAPI) otherwise answer a repeated search from a
    cache for a minute, and a pull right after a push would miss what was just written.
    """
    path = type_name(resource_type) if resource_type else ""
    return Call("GET", path, params=params, headers={"Cache-Control": "no-cache"})


def history_call(
    resource_type: ResourceType | None, resource_id: str | None, since: str | dt.datetime | None
) -> Call:
    """``GET [Type[/id]]/_history``."""
    if resource_id is not None and resource_type is None:
        raise ConfigurationError("history of one resource needs its type")
    path = "/".join(
        p for p in (type_name(resource_type) if resource_type else "", resource_id) if p
    )
    params = None
    if since is not None:
        params = {"_since": since.isoformat() if isinstance(since, dt.datetime) else since}
    return Call("GET", f"{path}/_history" if path else "_history", params=params)


def bundle_call(bundle: Resource | Mapping[str, Any], kind: str) -> Call:
    """``POST [base]`` with a transaction or batch Bundle."""
    data = json.loads(bundle.model_dump_json()) if isinstance(bundle, Resource) else bundle
    if data.get("resourceType") != "Bundle" or data.get("type") != kind:
        raise ConfigurationError(f"expected a Bundle of type {kind!r}")
    return Call("POST", "", body=_body(data), retry_safe=entries_repeatable(data))


def entries_repeatable(bundle: Mapping[str, Any]) -> bool:
    """A transaction may be retried when every entry is idempotent or conditional."""
    for entry in bundle.get("entry") or []:
        request = entry.get("request") or {}
        method = str(request.get("method", "")).upper()
        if method in _SAFE_METHODS:
            continue
        if method == "POST" and request.get("ifNoneExist"):
            continue
        return False
    return True


def validate_call(resource: Resource | Mapping[str, Any], profile: str | None) -> Call:
    """``POST Type/$validate`` (with a profile when given)."""
    params = {"profile": profile} if profile else None
    return Call("POST", f"{_type_of(resource)}/$validate", params=params, body=_body(resource))


# -- base URL and security ----------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Tell whether ``host`` is this machine."""
    if host.lower() in {"localhost", "localhost."}:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(
    url: str, *, allow_insecure_http: bool, what: str = "", setting: str = "server"
) -> httpx.URL:
    """Validate a URL to send to; plain http is allowed only to loopback or when asked.

    Args:
        url: the URL.
        allow_insecure_http: allow plain http to a host other than this machine.
        what: what the URL is for (``"the SMART token endpoint"``), named in the error.
        setting: the setting that gave the URL, named by the error.
    """
    checked = httpx.URL(url)
    if checked.scheme not in {"http", "https"} or not checked.host:
        raise ConfigurationError(
            f"not an http(s) URL: {what + ' ' if what else ''}{url!r}", setting=setting
        )
    if checked.scheme == "http" and not is_loopback(checked.host) and not allow_insecure_http:
        raise ConfigurationError(
            f"refusing plain http to {checked.host}"
            + (f" for {what} {url}" if what else "")
            + ": health data and the credentials to it must travel over https",
            setting="allow_insecure_http",
            fix="use https, or pass allow_insecure_http=True only for a test server on a "
            "trusted network",
        )
    return checked


def check_base_url(base_url: str, *, allow_insecure_http: bool) -> httpx.URL:
    """Validate the server's base URL; plain http is allowed only to loopback or when asked."""
    check_url(base_url, allow_insecure_http=allow_insecure_http)
    return httpx.URL(base_url.rstrip("/") + "/")


def same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    """Tell whether two URLs share scheme, host and port."""
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


# -- responses ----------------------------------------------------------------------------------


def _not_json(constant: str) -> Any:
    """``NaN`` and ``Infinity`` are not JSON (RFC 8259) and not FHIR: refuse them."""
    raise ValueError(f"{constant} is not a JSON number")


def read_json(response: httpx.Response) -> JSON:
    """Return the response body as a JSON object, or raise InvalidResponseError."""
    try:
        data = json.loads(response.content, parse_constant=_not_json)
    except (ValueError, RecursionError) as exc:
        raise InvalidResponseError(
            f"{describe_request(response.request)}: {response.status_code} response is not JSON "
            f"(content-type {response.headers.get('content-type', 'none')!r})",
            request=response.request,
            response=response,
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
        raise InvalidResponseError(
            f"{describe_request(response.request)}: response is not a FHIR resource",
            request=response.request,
            response=response,
        )
    return data


def to_model(data: JSON, response: httpx.Response | None = None) -> Resource:
    """Parse FHIR JSON into its fhir.resources R4B model."""
    try:
        model = get_fhir_model_class(data["resourceType"])
        resource: Resource = model.model_validate(data)
    except (KeyError, ValueError) as exc:
        raise InvalidResponseError(
            f"{describe_request(response.request if response else None)}: "
            f"invalid {data.get('resourceType')} resource: {str(exc).splitlines()[0]}",
            request=response.request if response else None,
            response=response,
        ) from exc
    return resource


def expect_resource(response: httpx.Response, resource_type: str | None = None) -> JSON:
    """Return the body as FHIR JSON, checking its resourceType when one is expected."""
    data = read_json(response)
    if resource_type and data["resourceType"] != resource_type:
        raise InvalidResponseError(
            f"{describe_request(response.request)}: expected {resource_type}, "
            f"got {data['resourceType']}",
            request=response.request,
            response=response,
        )
    return data


def write_outcome(response: httpx.Response) -> Outcome:
    """Read the answer to a create or an update."""
    resource = None
    if response.content.strip():
        data = read_json(response)
        if data["resourceType"] != "OperationOutcome":
            resource = to_model(data, response)
    return Outcome(
        status=response.status_code,
        location=response.headers.get("Location") or response.headers.get("Content-Location"),
        etag=response.headers.get("ETag"),
        last_modified=response.headers.get("Last-Modified"),
        resource=resource,
    )


def bundle_outcomes(response: httpx.Response, kind: str) -> list[Outcome]:
    """Read each entry's outcome from a transaction-response or batch-response."""
    data = expect_resource(response, "Bundle")
    if data.get("type") != f"{kind}-response":
        raise InvalidResponseError(
            f"{describe_request(response.request)}: expected a {kind}-response Bundle",
            request=response.request,
            response=response,
        )
    outcomes = []
    entries = data.get("entry") or []
    for entry in entries if isinstance(entries, list) else [entries]:
        if not isinstance(entry, dict):
            raise InvalidResponseError(
                f"{describe_request(response.request)}: an entry that is not an object",
                request=response.request,
                response=response,
            )
        answer = entry.get("response")
        answer = answer if isinstance(answer, dict) else {}
        status_text = str(answer.get("status", ""))
        try:
            status = int(status_text.split()[0])
        except (ValueError, IndexError) as exc:
            raise InvalidResponseError(
                f"{describe_request(response.request)}: entry status {status_text!r}",
                request=response.request,
                response=response,
            ) from exc
        resource = entry.get("resource")
        outcomes.append(
            Outcome(
                status=status,
                location=_text(answer.get("location")),
                etag=_text(answer.get("etag")),
                last_modified=_text(answer.get("lastModified")),
                resource=to_model(resource, response) if isinstance(resource, dict) else None,
                outcome=answer.get("outcome") if isinstance(answer.get("outcome"), dict) else None,
            )
        )
    return outcomes


def objects(value: Any) -> list[JSON]:
    """The objects of a JSON array from a server; anything else there is not looked at."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def next_link(bundle: JSON) -> str | None:
    """Return the ``next`` link of a Bundle, if any."""
    for link in objects(bundle.get("link")):
        if link.get("relation") == "next" and isinstance(link.get("url"), str) and link["url"]:
            return str(link["url"])
    return None


def outcome_message(outcome: JSON | None) -> str:
    """Summarise an OperationOutcome: severity, code, diagnostics and expression per issue."""
    parts = []
    for issue in objects((outcome if isinstance(outcome, dict) else {}).get("issue")):
        text = f"{issue.get('severity', '?')} {issue.get('code', '?')}"
        details = issue.get("details")
        detail = issue.get("diagnostics") or (
            details.get("text") if isinstance(details, dict) else None
        )
        if detail:
            text += f": {detail}"
        where = issue.get("expression") or issue.get("location")
        if isinstance(where, list) and where:
            text += f" (at {', '.join(str(w) for w in where)})"
        parts.append(text)
    return "; ".join(parts)


_STATUS_ERRORS: dict[int, type[StatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    410: GoneError,
    412: VersionConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def make_status_error(response: httpx.Response) -> StatusError:
    """Map an error response to its exception: the one place where statuses become classes."""
    request = response.request
    outcome = None
    try:
        data = json.loads(response.content)
        if isinstance(data, dict) and data.get("resourceType") == "OperationOutcome":
            outcome = data
    except (ValueError, RecursionError):
        pass
    status = response.status_code
    cls = _STATUS_ERRORS.get(status) or (ServerError if status >= 500 else StatusError)
    if cls is ConflictError and request.headers.get("If-Match"):
        cls = VersionConflictError  # a stale If-Match: 409 from servers that do not say 412
    detail = outcome_message(outcome)
    if not detail:
        kind = response.headers.get("content-type", "no content-type").split(";")[0]
        detail = f"no OperationOutcome (the body is {kind}, {len(response.content)} bytes)"
    reason = response.reason_phrase or ""
    message = f"{describe_request(request)}: {status} {reason}".rstrip() + f": {detail}"
    return cls(message, request=request, response=response, outcome=outcome)


def translate_transport_error(
    exc: httpx.TransportError, request: httpx.Request, now: float | None = None
) -> TransportError:
    """Wrap an httpx transport error in the ims-fhir tree (the caller raises it from exc).

    ``now`` is when the failure was seen (``time.monotonic()``): a timeout once the request's
    deadline has passed is reported as the deadline, whichever wait ran out.
    """
    where = describe_request(request)
    try:
        failed: httpx.Request | None = exc.request  # an auth flow's own (SMART token), maybe
    except RuntimeError:  # raised by httpx when the exception carries no request
        failed = None
    if failed is not None and failed is not request:
        where += f" (while sending {describe_request(failed)})"
    if isinstance(exc, httpx.TimeoutException):
        deadline = deadline_of(request)
        if deadline is not None and now is not None and now >= deadline.expires:
            why = f"no complete answer within the {deadline.seconds:g} s deadline"
        else:
            why = type(exc).__name__
        return TimeoutException(f"{where}: timed out ({why})", request=request)
    if isinstance(exc, httpx.ConnectError):
        return ConnectError(f"{where}: cannot connect ({exc})", request=request)
    return ProtocolError(f"{where}: {type(exc).__name__}: {exc}", request=request)


# -- retries ------------------------------------------------------------------------------------


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Return the seconds a ``Retry-After`` header asks for (delta-seconds or HTTP-date)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    now = now or dt.datetime.now(dt.UTC)
    return max(0.0, (when - now).total_seconds())


def _is_certificate_error(error: BaseException) -> bool:
    """Tell a TLS verification failure (permanent) from a connection that failed (transient)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(
            seen
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter, honouring ``Retry-After``.

    Only requests that are safe to repeat are retried, after a connect error, a timeout, a
    broken connection or a status in ``statuses``. A request that never reached the server
    (the connection could not be made) is retried whatever its method.
    """

    max_retries: int = DEFAULT_MAX_RETRIES
    initial_delay: float = INITIAL_RETRY_DELAY
    max_delay: float = MAX_RETRY_DELAY
    max_retry_after: float = MAX_RETRY_AFTER
    jitter: float = RETRY_JITTER
    statuses: frozenset[int] = RETRY_STATUSES

    def backoff(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based), jitter included."""
        base: float = min(self.max_delay, self.initial_delay * 2.0 ** (attempt - 1))
        return max(0.0, base * (1 + self.jitter * (2 * rng() - 1)))

    def delay(
        self,
        call: Call,
        attempt: int,
        *,
        response: httpx.Response | None = None,
        error: httpx.TransportError | None = None,
        now: dt.datetime | None = None,
        rng: Callable[[], float] = random.random,
    ) -> float | None:
        """Seconds to wait before retrying, or None when the failure must be raised."""
        if attempt > self.max_retries:
            return None
        if error is not None:
            if _is_certificate_error(error):
                return None  # a certificate does not get better by asking again
            never_sent = isinstance(error, httpx.ConnectError | httpx.ConnectTimeout)
            return self.backoff(attempt, rng) if (call.retry_safe or never_sent) else None
        if response is None or response.status_code not in self.statuses or not call.retry_safe:
            return None
        asked = parse_retry_after(response.headers.get("Retry-After"), now)
        if asked is None:
            return self.backoff(attempt, rng)
        if asked > self.max_retry_after:
            return None
        return asked
