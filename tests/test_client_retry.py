"""Retries: which failures, which requests, how long; the policy as a table."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import respx

import ims_fhir
from ims_fhir import FhirClient, RetryPolicy
from ims_fhir.client import constants
from ims_fhir.client.http import Call, parse_retry_after

BASE = "https://fhir.example.org/r4"
NOW = dt.datetime(2026, 11, 26, 12, 0, 0, tzinfo=dt.UTC)
GET = Call("GET", "Patient/1")
PUT = Call("PUT", "Patient/1", body=b"{}")
POST_CREATE = Call("POST", "Patient", body=b"{}", retry_safe=False)
POLICY = RetryPolicy(jitter=0.0)


def response(status: int, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after else {}
    return httpx.Response(status, headers=headers, request=httpx.Request("GET", BASE))


@pytest.mark.parametrize(
    ("call", "attempt", "failure", "expected"),
    [
        pytest.param(GET, 1, response(503), 0.5, id="503-first-retry"),
        pytest.param(GET, 2, response(503), 1.0, id="503-doubles"),
        pytest.param(GET, 4, response(502), 4.0, id="502-fourth"),
        pytest.param(GET, 5, response(504), None, id="retries-exhausted"),
        pytest.param(GET, 1, response(408), 0.5, id="408"),
        pytest.param(GET, 1, response(429, "7"), 7.0, id="429-retry-after-seconds"),
        pytest.param(
            GET, 1, response(503, "Thu, 26 Nov 2026 12:00:30 GMT"), 30.0, id="retry-after-http-date"
        ),
        pytest.param(GET, 1, response(503, "120"), None, id="retry-after-above-cap"),
        pytest.param(GET, 1, response(503, "soon"), 0.5, id="retry-after-unparseable"),
        pytest.param(GET, 1, response(500), None, id="500-not-retried"),
        pytest.param(GET, 1, response(400), None, id="400-not-retried"),
        pytest.param(PUT, 1, response(503), 0.5, id="put-is-idempotent"),
        pytest.param(POST_CREATE, 1, response(503), None, id="plain-create-not-retried"),
        pytest.param(GET, 1, httpx.ReadTimeout("t"), 0.5, id="timeout"),
        pytest.param(GET, 1, httpx.RemoteProtocolError("r"), 0.5, id="reset"),
        pytest.param(POST_CREATE, 1, httpx.ConnectError("c"), 0.5, id="never-sent-create-retried"),
        pytest.param(POST_CREATE, 1, httpx.ReadTimeout("t"), None, id="maybe-sent-create-not"),
    ],
)
def test_retry_policy_table(call: Call, attempt: int, failure: Any, expected: float | None) -> None:
    if isinstance(failure, httpx.Response):
        delay = POLICY.delay(call, attempt, response=failure, now=NOW)
    else:
        delay = POLICY.delay(call, attempt, error=failure, now=NOW)
    assert delay == expected


def test_backoff_is_capped_and_jittered() -> None:
    policy = RetryPolicy(max_retries=20)
    assert policy.backoff(20, rng=lambda: 0.5) == constants.MAX_RETRY_DELAY
    low, high = policy.backoff(2, rng=lambda: 0.0), policy.backoff(2, rng=lambda: 1.0)
    assert low == pytest.approx(1.0 * (1 - constants.RETRY_JITTER))
    assert high == pytest.approx(1.0 * (1 + constants.RETRY_JITTER))


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param("0", 0.0, id="zero"),
        pytest.param("12", 12.0, id="seconds"),
        pytest.param("Thu, 26 Nov 2026 12:01:00 GMT", 60.0, id="http-date"),
        pytest.param("Thu, 26 Nov 2026 11:59:00 GMT", 0.0, id="http-date-in-the-past"),
        pytest.param("-3", None, id="negative"),
        pytest.param("", None, id="empty"),
        pytest.param(None, None, id="absent"),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


def test_the_defaults_are_named_constants() -> None:
    policy = RetryPolicy()
    assert policy.max_retries == constants.DEFAULT_MAX_RETRIES
    assert policy.max_retry_after == constants.MAX_RETRY_AFTER
    assert policy.statuses == frozenset({408, 429, 502, 503, 504})


class FakeClock:
    def __init__(self) -> None:
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    def monotonic(self) -> float:
        return time.monotonic()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock()
    monkeypatch.setattr("ims_fhir.client.blocking.time", fake)
    yield fake


def test_client_retries_then_succeeds_honouring_retry_after(clock: FakeClock) -> None:
    with respx.mock(base_url=BASE, assert_all_called=True) as router:
        route = router.get("/Patient/1").mock(
            side_effect=[
                httpx.Response(429, headers={"Retry-After": "3"}),
                httpx.Response(503),
                httpx.Response(200, json={"resourceType": "Patient", "id": "1"}),
            ]
        )
        with FhirClient(BASE, retry=RetryPolicy(jitter=0.0)) as client:
            assert client.read("Patient", "1").id == "1"
    assert route.call_count == 3
    assert clock.slept == [3.0, 1.0]


def test_client_gives_up_after_max_retries(clock: FakeClock) -> None:
    with respx.mock(base_url=BASE) as router:
        route = router.get("/Patient/1").respond(503)
        with FhirClient(BASE, retry=RetryPolicy(max_retries=2, jitter=0.0)) as client:
            with pytest.raises(ims_fhir.ServerError):
                client.read("Patient", "1")
    assert route.call_count == 3
    assert clock.slept == [0.5, 1.0]


def test_plain_create_is_not_repeated_after_a_lost_response(clock: FakeClock) -> None:
    with respx.mock(base_url=BASE) as router:
        route = router.post("/Patient").mock(side_effect=httpx.ReadTimeout("lost"))
        with FhirClient(BASE) as client:
            with pytest.raises(ims_fhir.TimeoutException):
                client.create({"resourceType": "Patient"})
    assert route.call_count == 1


def test_conditional_transactions_are_retried_but_plain_posts_are_not(clock: FakeClock) -> None:
    conditional = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {"resourceType": "Patient"},
                "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=a|b"},
            },
            {
                "resource": {"resourceType": "Patient"},
                "request": {"method": "PUT", "url": "Patient?identifier=a|c"},
            },
        ],
    }
    plain = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {"resourceType": "Patient"},
                "request": {"method": "POST", "url": "Patient"},
            }
        ],
    }
    answer = {"resourceType": "Bundle", "type": "transaction-response", "entry": []}
    with respx.mock(base_url=BASE) as router:
        route = router.post("/").mock(
            side_effect=[httpx.Response(503), httpx.Response(200, json=answer)]
        )
        with FhirClient(BASE) as client:
            assert client.transaction(conditional) == []
        assert route.call_count == 2
        route.reset()
        route.mock(side_effect=[httpx.Response(503)])
        with FhirClient(BASE) as client:
            with pytest.raises(ims_fhir.ServerError):
                client.transaction(plain)
        assert route.call_count == 1
