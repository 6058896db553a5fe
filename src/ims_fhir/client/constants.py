"""Limits of the FHIR client, in one place. Each is a default that callers can change."""

from __future__ import annotations

import httpx

DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
"""Seconds: 60 to read a response (large transactions take a while), 10 to connect.

Each bounds one wait (one read, one write), not the whole exchange: see DEFAULT_DEADLINE.
"""

DEFAULT_DEADLINE = 300.0
"""Seconds one attempt may take in all: connect, send, headers and the whole body.

Without it a server sending a byte every few seconds holds a request for ever, since no single
read times out. A retry starts a new attempt with a deadline of its own.
"""

DEFAULT_MAX_RETRIES = 4
"""Retries after the first attempt, for requests that are safe to repeat."""

INITIAL_RETRY_DELAY = 0.5
"""Seconds before the first retry; doubled for each later one."""

MAX_RETRY_DELAY = 8.0
"""Seconds: the longest computed backoff between two attempts."""

MAX_RETRY_AFTER = 60.0
"""Seconds: the longest ``Retry-After`` honoured; a server asking for more is not retried."""

RETRY_JITTER = 0.25
"""Fraction of the delay added or removed at random, so clients do not retry in step."""

RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
"""Statuses that mean "try again later"."""

MAX_PAGES = 10_000
"""Pages a search follows before it stops with an error (a guard against endless paging)."""

MAX_RESPONSE_BYTES = 256 * 1024 * 1024
"""The largest response body read into memory, counted as sent and again after each decoding."""

MAX_AUTH_RESPONSE_BYTES = 1024 * 1024
"""The largest SMART discovery or token response read: each is a small JSON object."""

TOKEN_REFRESH_MARGIN = 60.0
"""Seconds before an access token's expiry at which it is renewed."""

CLIENT_ASSERTION_LIFETIME = 300
"""Seconds a SMART client assertion is valid (the specification allows at most five minutes)."""

FHIR_JSON = "application/fhir+json"
