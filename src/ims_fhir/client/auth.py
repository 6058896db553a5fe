"""Authentication for the FHIR client, as ``httpx.Auth`` flows (sync and async alike).

- :class:`BearerAuth`: a fixed token, or a callable returning the current one.
- ``httpx.BasicAuth``: HTTP Basic, as httpx provides it.
- :class:`SmartBackendAuth`: SMART Backend Services (client credentials with a
  ``private_key_jwt`` client assertion signed RS384 or ES384 by joserfc).
- :class:`ClientCredentialsAuth`: OAuth 2.0 client credentials with a client secret (sent with
  HTTP Basic, or in the form), as many API gateways use.

For both, the token endpoint is read from the server's ``.well-known/smart-configuration``
unless given, and must be https (or loopback); the access token is cached until shortly before
it expires, and renewed once when the server answers 401. Discovery and token requests are sent
within the FHIR request's timeouts and deadline, and their answers are small JSON objects,
checked.

Tokens are never logged and never put in an exception message.
"""

from __future__ import annotations

import base64
import json
import math
import os
import stat
import time
import urllib.parse
import uuid
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from .._exceptions import ConfigurationError, InvalidResponseError, describe_request
from .constants import CLIENT_ASSERTION_LIFETIME, MAX_AUTH_RESPONSE_BYTES, TOKEN_REFRESH_MARGIN
from .http import BodyCounter, check_url, limits_for, make_status_error

__all__ = ["BearerAuth", "ClientCredentialsAuth", "SmartBackendAuth"]

_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class BearerAuth(httpx.Auth):
    """``Authorization: Bearer <token>`` with a fixed token or one from a callable."""

    def __init__(self, token: str | Callable[[], str]) -> None:
        """Use ``token``, or call it for each request when it is a callable."""
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Add the header."""
        token = self._token() if callable(self._token) else self._token
        request.headers["Authorization"] = f"Bearer {token}"
        yield request


class TokenAuth(httpx.Auth):
    """An OAuth 2.0 access token from a token endpoint: discovered, cached, renewed on 401.

    The base of :class:`SmartBackendAuth` and :class:`ClientCredentialsAuth`; a subclass says
    how to ask for a token (:meth:`token_request`).
    """

    # httpx would read every response whole, the FHIR one too; the flows below read only the
    # discovery and token answers, within limits, and leave the FHIR one to the client.
    requires_response_body = False
    # The settings that name the token endpoint, for error messages.
    token_url_setting = "token_url"

    def __init__(
        self,
        *,
        scope: str | None,
        token_url: str | None,
        fhir_base_url: str | None,
        allow_insecure_http: bool | None,
        clock: Callable[[], float],
    ) -> None:
        self.scope = scope
        self.token_url = token_url
        self.fhir_base_url = fhir_base_url
        self.allow_insecure_http = allow_insecure_http
        self._clock = clock
        self._token: str | None = None
        self._expires_at = 0.0

    def token_request(self, token_url: str) -> httpx.Request:
        """The request that asks ``token_url`` for an access token."""
        raise NotImplementedError

    def _valid(self) -> bool:
        return self._token is not None and self._clock() < self._expires_at - TOKEN_REFRESH_MARGIN

    def _fetch_token(self) -> Generator[httpx.Request, httpx.Response, None]:
        token_url = self.token_url
        if token_url is None:
            if self.fhir_base_url is None:
                raise ConfigurationError(
                    f"{type(self).__name__} needs token_url or fhir_base_url",
                    setting=self.token_url_setting,
                )
            well_known = self.fhir_base_url.rstrip("/") + "/.well-known/smart-configuration"
            response = yield httpx.Request("GET", well_known, headers=_JSON_ONLY)
            if response.status_code != 200:
                raise make_status_error(response)
            endpoint = _json_object(response, "SMART configuration").get("token_endpoint")
            if not isinstance(endpoint, str) or not endpoint:
                raise InvalidResponseError(
                    f"{describe_request(response.request)}: no token_endpoint",
                    request=response.request,
                    response=response,
                )
            token_url = endpoint
        # The credentials and the token cross here: a token sent in clear is a stolen one.
        check_url(
            token_url,
            allow_insecure_http=bool(self.allow_insecure_http),
            what="the token endpoint",
            setting=self.token_url_setting,
        )
        self.token_url = token_url
        response = yield self.token_request(token_url)
        if response.status_code != 200:
            raise make_status_error(response)
        body = _json_object(response, "token response")
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise InvalidResponseError(
                f"{describe_request(response.request)}: token response without access_token",
                request=response.request,
                response=response,
            )
        self._token = token
        self._expires_at = self._clock() + _lifetime(body.get("expires_in", 300), response)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Get a token when needed, send the request, renew once on 401."""
        if not self._valid():
            yield from self._fetch_token()
        request.headers["Authorization"] = f"Bearer {self._token}"
        response = yield request
        if response.status_code == 401:
            self._token = None
            yield from self._fetch_token()
            request.headers["Authorization"] = f"Bearer {self._token}"
            yield request

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        """Run :meth:`auth_flow`, reading each discovery and token answer within limits."""
        flow = self.auth_flow(request)
        sent = next(flow)
        while True:
            sent.extensions.update(limits_for(request, time.monotonic()))
            response = yield sent
            if sent is not request:
                _limit_body(response)
                response.read()
            try:
                sent = flow.send(response)
            except StopIteration:
                return

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Run :meth:`auth_flow`, reading each discovery and token answer within limits."""
        flow = self.auth_flow(request)
        sent = next(flow)
        while True:
            sent.extensions.update(limits_for(request, time.monotonic()))
            response = yield sent
            if sent is not request:
                _limit_body(response)
                await response.aread()
            try:
                sent = flow.send(response)
            except StopIteration:
                return


class SmartBackendAuth(TokenAuth):
    """SMART Backend Services authorization (client credentials, ``private_key_jwt``)."""

    token_url_setting = "smart_token_url"

    def __init__(
        self,
        client_id: str,
        private_key: RSAKey | ECKey,
        *,
        kid: str,
        algorithm: str = "RS384",
        scope: str = "system/*.read system/*.write",
        token_url: str | None = None,
        fhir_base_url: str | None = None,
        allow_insecure_http: bool | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Authorize as ``client_id`` with a private key registered under ``kid``.

        Args:
            client_id: the client id the authorization server issued.
            private_key: the client's RSA (RS384) or EC P-384 (ES384) private key.
            kid: the key id of the public key registered with the server.
            algorithm: ``RS384`` or ``ES384``.
            scope: the scopes to request.
            token_url: the token endpoint; read from ``.well-known/smart-configuration`` if None.
                Either must be https unless its host is this machine.
            fhir_base_url: the FHIR base URL (set by the client when None).
            allow_insecure_http: allow a plain http token endpoint on another host (set from
                the client's setting when None).
            clock: seconds since the epoch (for tests).
        """
        if algorithm not in {"RS384", "ES384"}:
            raise ConfigurationError(f"unsupported signing algorithm {algorithm!r}")
        if (algorithm == "RS384") != isinstance(private_key, RSAKey):
            raise ConfigurationError(
                f"{algorithm} needs {'an RSA' if algorithm == 'RS384' else 'an EC'} key"
            )
        super().__init__(
            scope=scope,
            token_url=token_url,
            fhir_base_url=fhir_base_url,
            allow_insecure_http=allow_insecure_http,
            clock=clock,
        )
        self.client_id = client_id
        self.kid = kid
        self.algorithm = algorithm
        self._key = private_key

    @classmethod
    def from_key_file(
        cls,
        client_id: str,
        key_file: str | Path,
        *,
        kid: str,
        algorithm: str | None = None,
        scope: str = "system/*.read system/*.write",
        token_url: str | None = None,
        fhir_base_url: str | None = None,
        allow_insecure_http: bool | None = None,
    ) -> SmartBackendAuth:
        """Load the private key from a PEM file; warn when others may read it.

        The algorithm follows the key (RS384 for RSA, ES384 for EC) unless given.
        """
        path = Path(key_file)
        mode = path.stat().st_mode
        if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
            warnings.warn(
                f"private key {path} is readable by other users (mode {stat.filemode(mode)}); "
                "run: chmod 600 " + str(path),
                stacklevel=2,
            )
        data = path.read_bytes()
        key: RSAKey | ECKey
        try:
            key = RSAKey.import_key(data)
        except ValueError:
            key = ECKey.import_key(data)
        return cls(
            client_id,
            key,
            kid=kid,
            algorithm=algorithm or ("RS384" if isinstance(key, RSAKey) else "ES384"),
            scope=scope,
            token_url=token_url,
            fhir_base_url=fhir_base_url,
            allow_insecure_http=allow_insecure_http,
        )

    def client_assertion(self, token_url: str) -> str:
        """Return a signed client assertion for ``token_url`` (valid five minutes at most)."""
        now = int(self._clock())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": token_url,
            "iat": now,
            "exp": now + CLIENT_ASSERTION_LIFETIME,
            "jti": str(uuid.uuid4()),
        }
        header = {"alg": self.algorithm, "kid": self.kid, "typ": "JWT"}
        token: str = jwt.encode(header, claims, self._key, algorithms=[self.algorithm])
        return token

    def token_request(self, token_url: str) -> httpx.Request:
        """A client-credentials grant with a signed client assertion."""
        form = {
            "grant_type": "client_credentials",
            "scope": self.scope or "",
            "client_assertion_type": _ASSERTION_TYPE,
            "client_assertion": self.client_assertion(token_url),
        }
        return httpx.Request("POST", token_url, data=form, headers=_JSON_ONLY)


class ClientCredentialsAuth(TokenAuth):
    """OAuth 2.0 client credentials with a client secret (RFC 6749 section 4.4).

    The secret goes in HTTP Basic (``client_secret_basic``, the default RFC 6749 asks servers to
    support) or, with ``send_secret="form"``, in the form (``client_secret_post``).
    """

    token_url_setting = "oauth_token_url"

    def __init__(
        self,
        client_id: str,
        client_secret: str,
        *,
        token_url: str | None = None,
        scope: str | None = None,
        send_secret: Literal["basic", "form"] = "basic",
        fhir_base_url: str | None = None,
        allow_insecure_http: bool | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Authorize as ``client_id`` with ``client_secret``.

        Args:
            client_id: the client id the authorization server issued.
            client_secret: its secret (never logged, never in an error message).
            token_url: the token endpoint; read from ``.well-known/smart-configuration`` if None.
                Either must be https unless its host is this machine.
            scope: the scopes to request, or None to ask for the client's default.
            send_secret: ``"basic"`` (HTTP Basic) or ``"form"`` (in the request body).
            fhir_base_url: the FHIR base URL (set by the client when None).
            allow_insecure_http: allow a plain http token endpoint on another host (set from
                the client's setting when None).
            clock: seconds since the epoch (for tests).
        """
        if send_secret not in {"basic", "form"}:
            raise ValueError(f"send_secret must be 'basic' or 'form', not {send_secret!r}")
        super().__init__(
            scope=scope,
            token_url=token_url,
            fhir_base_url=fhir_base_url,
            allow_insecure_http=allow_insecure_http,
            clock=clock,
        )
        self.client_id = client_id
        self.send_secret = send_secret
        self._secret = client_secret

    def __repr__(self) -> str:
        return f"ClientCredentialsAuth(client_id={self.client_id!r}, token_url={self.token_url!r})"

    def token_request(self, token_url: str) -> httpx.Request:
        """A client-credentials grant authenticated with the client secret."""
        form = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        headers = dict(_JSON_ONLY)
        if self.send_secret == "form":
            form |= {"client_id": self.client_id, "client_secret": self._secret}
        else:
            # RFC 6749 section 2.3.1: both form-urlencoded before the Basic encoding.
            user, secret = (urllib.parse.quote_plus(v) for v in (self.client_id, self._secret))
            basic = base64.b64encode(f"{user}:{secret}".encode()).decode("ascii")
            headers["Authorization"] = f"Basic {basic}"
        return httpx.Request("POST", token_url, data=form, headers=headers)


# Discovery and token answers are small: not compressed, so no decoding can blow them up.
_JSON_ONLY = {"Accept": "application/json", "Accept-Encoding": "identity"}


def _limit_body(response: httpx.Response) -> None:
    """Make reading ``response`` stop past MAX_AUTH_RESPONSE_BYTES or the request's deadline."""
    coding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if coding != "identity":
        raise InvalidResponseError(
            f"{describe_request(response.request)}: answer encoded as {coding!r} "
            "though identity was asked for",
            request=response.request,
            response=response,
        )
    response.stream = _CountedStream(
        response.stream, BodyCounter(response, MAX_AUTH_RESPONSE_BYTES)
    )


class _CountedStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response stream passing each chunk through a :class:`BodyCounter` as httpx reads it."""

    def __init__(
        self, stream: httpx.SyncByteStream | httpx.AsyncByteStream, counter: BodyCounter
    ) -> None:
        self._stream = stream
        self._counter = counter

    def __iter__(self) -> Iterator[bytes]:
        assert isinstance(self._stream, httpx.SyncByteStream)
        for chunk in self._stream:
            self._counter.add(chunk, time.monotonic())
            yield chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        assert isinstance(self._stream, httpx.AsyncByteStream)
        async for chunk in self._stream:
            self._counter.add(chunk, time.monotonic())
            yield chunk

    def close(self) -> None:
        assert isinstance(self._stream, httpx.SyncByteStream)
        self._stream.close()

    async def aclose(self) -> None:
        assert isinstance(self._stream, httpx.AsyncByteStream)
        await self._stream.aclose()


def _json_object(response: httpx.Response, what: str) -> dict[str, Any]:
    try:
        data = json.loads(response.content)
    except (ValueError, RecursionError) as exc:
        raise InvalidResponseError(
            f"{describe_request(response.request)}: {what} is not JSON",
            request=response.request,
            response=response,
        ) from exc
    if not isinstance(data, dict):
        raise InvalidResponseError(
            f"{describe_request(response.request)}: {what} is not a JSON object",
            request=response.request,
            response=response,
        )
    return data


def _lifetime(value: object, response: httpx.Response) -> float:
    """Return ``expires_in`` in seconds: a finite number of at least 0."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)  # some authorization servers quote the number
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            lifetime = float(value)
        except OverflowError:  # an integer too large for a float
            lifetime = math.inf
        if 0 <= lifetime < math.inf:
            return lifetime
    raise InvalidResponseError(
        f"{describe_request(response.request)}: token response with expires_in "
        "that is not a number of seconds",
        request=response.request,
        response=response,
    )
