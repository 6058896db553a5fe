"""Errors raised by ims-fhir.

The tree::

    ImsFhirError
    ├── RecordError                a record that cannot be read or fails clinical validation
    ├── MappingError               FHIR resources that cannot be mapped back to a record
    ├── ConfigurationError         settings that cannot work (e.g. plain http to a remote host)
    │   └── StateError             the state file cannot be used (unreadable, corrupt, locked)
    └── FhirError                  talking to a FHIR server went wrong
        ├── TransportError         no usable response (wraps the httpx exception as __cause__)
        │   ├── ConnectError
        │   ├── TimeoutException
        │   └── ProtocolError
        ├── InvalidResponseError   a response that is not the FHIR it should be
        ├── UnsafeServerError      the server cannot do what a safe push needs: the push stops
        └── StatusError            the server answered with an error status
            ├── BadRequestError            400
            ├── AuthenticationError        401
            ├── PermissionDeniedError      403
            ├── NotFoundError              404
            ├── ConflictError              409 (and 412: see VersionConflictError)
            │   └── VersionConflictError   412, or 409 on a versioned update
            ├── GoneError                  410
            ├── UnprocessableEntityError   422
            ├── RateLimitError             429
            └── ServerError                5xx

Each error carries what a caller needs to act on it: a :class:`RecordError` names the file, the
line or index, the record id when known, and each field path with its reason; a
:class:`MappingError` names the resource and the element path; a :class:`StatusError` has the
request, the response and the parsed OperationOutcome, and its message lists the outcome's
issues. Messages never contain request or response bodies, tokens or query strings (which can
hold patient identifiers).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "ConflictError",
    "ConnectError",
    "FhirError",
    "FieldIssue",
    "GoneError",
    "ImsFhirError",
    "InvalidResponseError",
    "MappingError",
    "NotFoundError",
    "PermissionDeniedError",
    "ProtocolError",
    "RateLimitError",
    "RecordError",
    "RecordLocation",
    "ServerError",
    "StateError",
    "StatusError",
    "TimeoutException",
    "TransportError",
    "UnprocessableEntityError",
    "UnsafeServerError",
    "VersionConflictError",
]


class ImsFhirError(Exception):
    """Base class of every error ims-fhir raises on purpose."""


@dataclass(frozen=True, slots=True)
class RecordLocation:
    """Where a record was read from."""

    file: str
    line: int | None = None
    index: int | None = None
    record_id: str | None = None

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
        if self.index is not None:
            where += f" [{self.index}]"
        if self.record_id is not None:
            where += f" record {self.record_id!r}"
        return where


@dataclass(frozen=True, slots=True)
class FieldIssue:
    """One problem with one field of a record."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class RecordError(ImsFhirError):
    """A record that could not be read or is not clinically valid."""

    def __init__(self, location: RecordLocation, issues: list[FieldIssue]) -> None:
        """Create the error from where the record came from and what is wrong with it."""
        self.location = location
        self.issues = issues
        super().__init__(f"{location}: " + "; ".join(str(issue) for issue in issues))


class MappingError(ImsFhirError):
    """FHIR content that cannot be mapped to an IMS record."""

    def __init__(
        self,
        resource: str,
        path: str,
        reason: str,
        *,
        count: int = 1,
        namespaces: Iterable[str] = (),
    ) -> None:
        """Create the error naming the resource (``Type/id``) and the element path.

        ``count``: how many problems it stands for (one that sums up the rest of many bad
        lines, "and 500 more", stands for 500). ``namespaces``: every identifier namespace the
        encounter it is about carries, on itself or on its parts (empty where none is known): a
        pull for one clinic leaves out an error none of whose namespaces is the clinic's.
        """
        self.resource = resource
        self.path = path
        self.reason = reason
        self.count = count
        self.namespaces = frozenset(namespaces)
        super().__init__(f"{resource}: {path}: {reason}")


class ConfigurationError(ImsFhirError):
    """Settings that cannot work, found before anything is sent.

    ``setting`` names the setting at fault (``"allow_insecure_http"``) when one is, so the
    command line can name its flag, environment variable and config key; ``reason`` is the
    message without ``fix``, what a library caller can do about it.
    """

    def __init__(self, reason: str, *, setting: str | None = None, fix: str | None = None) -> None:
        """Create the error: what is wrong, the setting at fault and how to fix it in code."""
        self.reason = reason
        self.setting = setting
        self.fix = fix
        super().__init__(f"{reason}; {fix}" if fix else reason)


class StateError(ConfigurationError):
    """The sync state file cannot be used: unreadable, not a state file, read-only or locked."""


def clip(text: str, limit: int = 120) -> str:
    """At most ``limit`` characters of a value quoted in an error: a line, never the whole input."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_request(request: httpx.Request | None) -> str:
    """Return ``METHOD scheme://host/path`` without the query (it may hold identifiers)."""
    if request is None:
        return "request"
    url = request.url
    return f"{request.method} {url.scheme}://{url.netloc.decode('ascii')}{url.path}"


class FhirError(ImsFhirError):
    """Talking to a FHIR server went wrong."""

    def __init__(self, message: str, *, request: httpx.Request | None = None) -> None:
        """Create the error with the request it concerns."""
        self.request = request
        super().__init__(message)


class TransportError(FhirError):
    """The request got no usable response; ``__cause__`` is the httpx exception."""


class ConnectError(TransportError):
    """The server could not be reached."""


class TimeoutException(TransportError):
    """The server did not answer in time."""


class ProtocolError(TransportError):
    """The connection broke or the HTTP exchange was malformed."""


class InvalidResponseError(FhirError):
    """A response that is not the FHIR content it should be (not JSON, wrong type, ...)."""

    def __init__(
        self,
        message: str,
        *,
        request: httpx.Request | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        """Create the error with the request and the offending response."""
        self.response = response
        super().__init__(message, request=request)


class UnsafeServerError(FhirError):
    """The server cannot do what a safe push needs; the push stops rather than write unsafely.

    For example: it is not a FHIR R4 server, it does not support transactions, or it answered a
    transaction with success while some of its entries failed (transactions not atomic).
    """


class StatusError(FhirError):
    """The server answered with an error status."""

    def __init__(
        self,
        message: str,
        *,
        request: httpx.Request,
        response: httpx.Response,
        outcome: dict[str, Any] | None,
    ) -> None:
        """Create the error with the request, the response and the parsed OperationOutcome."""
        self.response = response
        self.status_code = response.status_code
        self.outcome = outcome
        super().__init__(message, request=request)

    @property
    def issues(self) -> list[dict[str, Any]]:
        """The OperationOutcome's issues (empty when the body was not an OperationOutcome)."""
        return list((self.outcome or {}).get("issue") or [])


class BadRequestError(StatusError):
    """400: the server refused the request as malformed or invalid."""


class AuthenticationError(StatusError):
    """401: credentials missing, wrong or expired."""


class PermissionDeniedError(StatusError):
    """403: the credentials do not allow this."""


class NotFoundError(StatusError):
    """404: no such resource or endpoint."""


class ConflictError(StatusError):
    """409: the request conflicts with the server's state."""


class VersionConflictError(ConflictError):
    """412 (or a 409 on a versioned update): the resource changed since the version sent."""


class GoneError(StatusError):
    """410: the resource was deleted."""


class UnprocessableEntityError(StatusError):
    """422: the resource violates the server's rules or profiles."""


class RateLimitError(StatusError):
    """429: too many requests."""


class ServerError(StatusError):
    """5xx: the server failed."""
