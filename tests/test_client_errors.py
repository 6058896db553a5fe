"""Every failure becomes an ims-fhir error that carries the request, response and outcome."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import respx

import ims_fhir
from ims_fhir import FhirClient, RetryPolicy

BASE = "https://fhir.example.org/r4"
NO_RETRY = RetryPolicy(max_retries=0)


def outcome(code: str = "processing", diagnostics: str = "it went wrong") -> dict[str, object]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": code,
                "diagnostics": diagnostics,
                "expression": ["Observation.status"],
            }
        ],
    }


@pytest.fixture
def client() -> Iterator[FhirClient]:
    with FhirClient(BASE, retry=NO_RETRY) as c:
        yield c


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=True, assert_all_mocked=True) as r:
        yield r


@pytest.mark.parametrize(
    ("status", "error"),
    [
        pytest.param(400, ims_fhir.BadRequestError, id="400"),
        pytest.param(401, ims_fhir.AuthenticationError, id="401"),
        pytest.param(403, ims_fhir.PermissionDeniedError, id="403"),
        pytest.param(404, ims_fhir.NotFoundError, id="404"),
        pytest.param(409, ims_fhir.ConflictError, id="409"),
        pytest.param(410, ims_fhir.GoneError, id="410"),
        pytest.param(412, ims_fhir.VersionConflictError, id="412"),
        pytest.param(422, ims_fhir.UnprocessableEntityError, id="422"),
        pytest.param(429, ims_fhir.RateLimitError, id="429"),
        pytest.param(500, ims_fhir.ServerError, id="500"),
        pytest.param(503, ims_fhir.ServerError, id="503"),
        pytest.param(418, ims_fhir.StatusError, id="other-4xx"),
    ],
)
def test_status_maps_to_its_error(
    client: FhirClient, router: respx.MockRouter, status: int, error: type[Exception]
) -> None:
    router.get("/Patient/1").respond(status, json=outcome())
    with pytest.raises(error) as caught:
        client.read("Patient", "1")
    exc = caught.value
    assert type(exc) is error
    assert isinstance(exc, ims_fhir.StatusError)
    assert exc.status_code == status
    assert exc.request is not None and exc.request.url.path == "/r4/Patient/1"
    assert exc.response.status_code == status
    assert exc.outcome == outcome()
    assert "error processing: it went wrong (at Observation.status)" in str(exc)
    assert str(exc).startswith("GET https://fhir.example.org/r4/Patient/1: ")


def test_stale_if_match_409_is_a_version_conflict(
    client: FhirClient, router: respx.MockRouter
) -> None:
    router.put("/Patient/1").respond(409, json=outcome("conflict", "not the current version"))
    patient = {"resourceType": "Patient", "id": "1", "meta": {"versionId": "2"}}
    with pytest.raises(ims_fhir.VersionConflictError, match="not the current version"):
        client.update(patient, if_match=True)
    assert router.calls.last.request.headers["If-Match"] == 'W/"2"'


def test_html_error_page_from_a_proxy_is_still_clear(
    client: FhirClient, router: respx.MockRouter
) -> None:
    router.get("/metadata").respond(502, html="<html><body><h1>502 Bad Gateway</h1></body></html>")
    with pytest.raises(ims_fhir.ServerError) as caught:
        client.capabilities()
    assert caught.value.outcome is None
    assert "502 Bad Gateway: no OperationOutcome (the body is text/html" in str(caught.value)


def test_query_strings_never_appear_in_messages(
    client: FhirClient, router: respx.MockRouter
) -> None:
    router.get("/Patient").respond(500, json=outcome())
    with pytest.raises(ims_fhir.ServerError) as caught:
        list(client.search("Patient", {"identifier": "https://phn|9000000101"}))
    assert "9000000101" not in str(caught.value)


@pytest.mark.parametrize(
    ("side_effect", "error"),
    [
        pytest.param(httpx.ConnectError("refused"), ims_fhir.ConnectError, id="connect"),
        pytest.param(httpx.ReadTimeout("slow"), ims_fhir.TimeoutException, id="read-timeout"),
        pytest.param(httpx.ConnectTimeout("slow"), ims_fhir.TimeoutException, id="connect-timeout"),
        pytest.param(httpx.RemoteProtocolError("reset"), ims_fhir.ProtocolError, id="protocol"),
        pytest.param(httpx.ReadError("reset"), ims_fhir.ProtocolError, id="read-error"),
    ],
)
def test_transport_errors_are_wrapped(
    client: FhirClient, router: respx.MockRouter, side_effect: Exception, error: type[Exception]
) -> None:
    router.get("/Patient/1").mock(side_effect=side_effect)
    with pytest.raises(error) as caught:
        client.read("Patient", "1")
    assert isinstance(caught.value, ims_fhir.TransportError)
    assert caught.value.__cause__ is side_effect


@pytest.mark.parametrize(
    ("response", "message"),
    [
        pytest.param(httpx.Response(200, text="hello"), "response is not JSON", id="not-json"),
        pytest.param(
            # Python's json reads these; they are not JSON, and a copy sent back would carry them.
            httpx.Response(200, text='{"resourceType": "Patient", "id": "1", "x": NaN}'),
            "response is not JSON",
            id="nan",
        ),
        pytest.param(httpx.Response(200, json=[1, 2]), "not a FHIR resource", id="not-a-resource"),
        pytest.param(
            httpx.Response(200, json={"resourceType": "Observation", "status": "final"}),
            "expected Patient, got Observation",
            id="wrong-type",
        ),
        pytest.param(
            httpx.Response(200, json={"resourceType": "Patient", "gender": 42}),
            "invalid Patient resource",
            id="invalid-resource",
        ),
    ],
)
def test_odd_bodies_give_invalid_response_errors(
    client: FhirClient, router: respx.MockRouter, response: httpx.Response, message: str
) -> None:
    router.get("/Patient/1").mock(return_value=response)
    with pytest.raises(ims_fhir.InvalidResponseError, match=message):
        client.read("Patient", "1")


def test_validate_returns_the_outcome_of_an_invalid_resource(
    client: FhirClient, router: respx.MockRouter
) -> None:
    router.post("/Observation/$validate", params={"profile": "https://p"}).respond(
        412, json=outcome()
    )
    result = client.validate({"resourceType": "Observation"}, profile="https://p")
    assert result["issue"][0]["severity"] == "error"


@pytest.mark.parametrize(
    "url",
    ["http://fhir.example.org/r4", "http://10.1.2.3/fhir", "ftp://fhir.example.org"],
)
def test_plain_http_to_a_remote_host_is_refused(url: str) -> None:
    with pytest.raises(ims_fhir.ConfigurationError):
        FhirClient(url)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080/fhir", "http://localhost/fhir", "http://[::1]/fhir"]
)
def test_plain_http_to_loopback_is_allowed(url: str) -> None:
    FhirClient(url).close()


def test_plain_http_to_a_remote_host_with_the_explicit_flag() -> None:
    FhirClient("http://fhir.example.org/r4", allow_insecure_http=True).close()


def test_tls_verification_is_on_by_default() -> None:
    with FhirClient(BASE) as client:
        context = client._http._transport._pool._ssl_context  # type: ignore[attr-defined]
        import ssl

        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname is True
