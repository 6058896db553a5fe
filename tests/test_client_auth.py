"""Authentication: bearer, basic and SMART Backend Services."""

from __future__ import annotations

import base64
import gzip
import os
import warnings
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import pytest
import respx
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

import ims_fhir
from ims_fhir import BearerAuth, FhirClient, RetryPolicy, SmartBackendAuth
from ims_fhir.client.constants import TOKEN_REFRESH_MARGIN

BASE = "https://fhir.example.org/r4"
TOKEN_URL = "https://auth.example.org/token"
PATIENT = {"resourceType": "Patient", "id": "1"}


def test_bearer_token_fixed_and_from_a_callable() -> None:
    tokens = iter(["t1", "t2"])
    with respx.mock(base_url=BASE) as router:
        route = router.get("/Patient/1").respond(json=PATIENT)
        with FhirClient(BASE, auth=BearerAuth("fixed")) as client:
            client.read("Patient", "1")
        assert route.calls.last.request.headers["Authorization"] == "Bearer fixed"
        with FhirClient(BASE, auth=BearerAuth(lambda: next(tokens))) as client:
            client.read("Patient", "1")
            client.read("Patient", "1")
        assert [c.request.headers["Authorization"] for c in route.calls][-2:] == [
            "Bearer t1",
            "Bearer t2",
        ]


def test_basic_auth() -> None:
    with respx.mock(base_url=BASE) as router:
        route = router.get("/Patient/1").respond(json=PATIENT)
        with FhirClient(BASE, auth=httpx.BasicAuth("clinic", "pw")) as client:
            client.read("Patient", "1")
    expected = "Basic " + base64.b64encode(b"clinic:pw").decode()
    assert route.calls.last.request.headers["Authorization"] == expected


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def rsa_key() -> RSAKey:
    return RSAKey.generate_key(2048)


def smart_routes(router: respx.MockRouter, tokens: list[str], lifetime: int = 300) -> respx.Route:
    router.get(f"{BASE}/.well-known/smart-configuration").respond(
        json={"token_endpoint": TOKEN_URL, "grant_types_supported": ["client_credentials"]}
    )
    return router.post(TOKEN_URL).mock(
        side_effect=[
            httpx.Response(
                200, json={"access_token": t, "expires_in": lifetime, "token_type": "bearer"}
            )
            for t in tokens
        ]
    )


def form(request: httpx.Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(request.content.decode()).items()}


def test_smart_backend_services_flow_and_assertion_claims(rsa_key: RSAKey) -> None:
    clock = Clock()
    auth = SmartBackendAuth("ims-clinic", rsa_key, kid="key-1", clock=clock)
    with respx.mock() as router:
        token_route = smart_routes(router, ["tok-1"])
        api = router.get(f"{BASE}/Patient/1").respond(json=PATIENT)
        with FhirClient(BASE, auth=auth) as client:
            client.read("Patient", "1")
            client.read("Patient", "1")
        assert token_route.call_count == 1, "the token is cached"
        assert [c.request.headers["Authorization"] for c in api.calls] == ["Bearer tok-1"] * 2
        sent = form(token_route.calls.last.request)
    assert sent["grant_type"] == "client_credentials"
    assert sent["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    token = jwt.decode(sent["client_assertion"], rsa_key, algorithms=["RS384"])
    assert token.header == {"alg": "RS384", "kid": "key-1", "typ": "JWT"}
    claims = token.claims
    assert claims["iss"] == claims["sub"] == "ims-clinic"
    assert claims["aud"] == TOKEN_URL
    assert 0 < claims["exp"] - clock.now <= 300
    assert claims["jti"]


def test_assertions_have_unique_jti(rsa_key: RSAKey) -> None:
    auth = SmartBackendAuth("c", rsa_key, kid="k")
    ids = {
        jwt.decode(auth.client_assertion(TOKEN_URL), rsa_key, algorithms=["RS384"]).claims["jti"]
        for _ in range(50)
    }
    assert len(ids) == 50


def test_token_is_renewed_shortly_before_expiry(rsa_key: RSAKey) -> None:
    clock = Clock()
    auth = SmartBackendAuth("c", rsa_key, kid="k", token_url=TOKEN_URL, clock=clock)
    with respx.mock() as router:
        token_route = router.post(TOKEN_URL).mock(
            side_effect=[
                httpx.Response(200, json={"access_token": "a", "expires_in": 300}),
                httpx.Response(200, json={"access_token": "b", "expires_in": 300}),
            ]
        )
        api = router.get(f"{BASE}/Patient/1").respond(json=PATIENT)
        with FhirClient(BASE, auth=auth) as client:
            client.read("Patient", "1")
            clock.now += 250  # within the refresh margin of the 300 s lifetime
            client.read("Patient", "1")
        assert token_route.call_count == 2
        assert [c.request.headers["Authorization"] for c in api.calls] == ["Bearer a", "Bearer b"]


def test_token_refreshed_once_after_401(rsa_key: RSAKey) -> None:
    auth = SmartBackendAuth("c", rsa_key, kid="k", token_url=TOKEN_URL)
    with respx.mock() as router:
        router.post(TOKEN_URL).mock(
            side_effect=[
                httpx.Response(200, json={"access_token": "revoked", "expires_in": 3600}),
                httpx.Response(200, json={"access_token": "fresh", "expires_in": 3600}),
            ]
        )
        api = router.get(f"{BASE}/Patient/1").mock(
            side_effect=[httpx.Response(401), httpx.Response(200, json=PATIENT)]
        )
        with FhirClient(BASE, auth=auth) as client:
            assert client.read("Patient", "1").id == "1"
        assert [c.request.headers["Authorization"] for c in api.calls] == [
            "Bearer revoked",
            "Bearer fresh",
        ]


def test_a_second_401_is_an_authentication_error(rsa_key: RSAKey) -> None:
    auth = SmartBackendAuth("c", rsa_key, kid="k", token_url=TOKEN_URL)
    with respx.mock() as router:
        router.post(TOKEN_URL).respond(json={"access_token": "tok-secret", "expires_in": 3600})
        api = router.get(f"{BASE}/Patient/1").respond(401)
        with FhirClient(BASE, auth=auth, retry=RetryPolicy(max_retries=0)) as client:
            with pytest.raises(ims_fhir.AuthenticationError) as caught:
                client.read("Patient", "1")
        assert api.call_count == 2
    assert "tok-secret" not in str(caught.value)


def test_token_endpoint_refusal_is_reported(rsa_key: RSAKey) -> None:
    auth = SmartBackendAuth("c", rsa_key, kid="k", token_url=TOKEN_URL)
    with respx.mock() as router:
        router.post(TOKEN_URL).respond(400, json={"error": "invalid_client"})
        with FhirClient(BASE, auth=auth) as client:
            with pytest.raises(ims_fhir.BadRequestError, match="auth.example.org/token"):
                client.read("Patient", "1")


def test_es384_keys_sign_es384() -> None:
    key = ECKey.generate_key("P-384")
    auth = SmartBackendAuth("c", key, kid="ec", algorithm="ES384")
    assertion = auth.client_assertion(TOKEN_URL)
    assert jwt.decode(assertion, key, algorithms=["ES384"]).header["alg"] == "ES384"
    with pytest.raises(ims_fhir.ConfigurationError):
        SmartBackendAuth("c", key, kid="ec", algorithm="RS384")


@pytest.mark.parametrize(("mode", "warns"), [(0o600, False), (0o644, True), (0o640, True)])
def test_key_file_readable_by_others_gives_a_warning(
    tmp_path: Path, rsa_key: RSAKey, mode: int, warns: bool
) -> None:
    key_file = tmp_path / "client.pem"
    key_file.write_bytes(rsa_key.as_pem(private=True))
    os.chmod(key_file, mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auth = SmartBackendAuth.from_key_file("c", key_file, kid="k")
    assert auth.algorithm == "RS384"
    assert bool([w for w in caught if "readable by other users" in str(w.message)]) is warns


def test_nothing_secret_is_logged(rsa_key: RSAKey, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    auth = SmartBackendAuth("c", rsa_key, kid="k", token_url=TOKEN_URL)
    with respx.mock() as router:
        router.post(TOKEN_URL).respond(json={"access_token": "SECRET-TOKEN", "expires_in": 3600})
        router.get(f"{BASE}/Patient", params={"identifier": "x|9000000101"}).mock(
            side_effect=[
                httpx.Response(503),
                httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset"}),
            ]
        )
        with FhirClient(BASE, auth=auth, retry=RetryPolicy(initial_delay=0)) as client:
            list(client.search("Patient", {"identifier": "x|9000000101"}))
    text = caplog.text
    assert "Patient" in text  # something was logged
    for secret in ("SECRET-TOKEN", "Bearer", "9000000101", "client_assertion"):
        assert secret not in text


# -- what a SMART server may answer ------------------------------------------------------------


def test_a_plain_http_token_endpoint_from_discovery_is_refused_before_any_request(
    rsa_key: RSAKey,
) -> None:
    auth = SmartBackendAuth("c", rsa_key, kid="k")
    with respx.mock(assert_all_called=False) as router:
        router.get(f"{BASE}/.well-known/smart-configuration").respond(
            json={"token_endpoint": "http://evil.example/token"}
        )
        stolen = router.post("http://evil.example/token").respond(json={"access_token": "t"})
        api = router.get(f"{BASE}/Patient/1").respond(json=PATIENT)
        with FhirClient(BASE, auth=auth) as client:
            with pytest.raises(
                ims_fhir.ConfigurationError, match="http://evil.example/token.*allow_insecure_http"
            ):
                client.read("Patient", "1")
        assert not stolen.called and not api.called
    assert auth.token_url is None


@pytest.mark.parametrize(
    ("token_url", "allow_insecure_http", "allowed"),
    [
        pytest.param("https://auth.example.org/token", False, True, id="https"),
        pytest.param("http://auth.example.org/token", False, False, id="http-refused"),
        pytest.param("http://auth.example.org/token", True, True, id="http-when-allowed"),
        pytest.param("http://127.0.0.1:9/token", False, True, id="http-to-loopback"),
        pytest.param("ftp://auth.example.org/token", True, False, id="not-http"),
    ],
)
def test_a_configured_token_url_follows_the_clients_https_rule(
    rsa_key: RSAKey, token_url: str, allow_insecure_http: bool, allowed: bool
) -> None:
    auth = SmartBackendAuth("c", rsa_key, kid="k", token_url=token_url)
    with respx.mock(assert_all_called=False) as router:
        token = router.post(token_url).respond(json={"access_token": "t", "expires_in": 300})
        router.get(f"{BASE}/Patient/1").respond(json=PATIENT)
        with FhirClient(BASE, auth=auth, allow_insecure_http=allow_insecure_http) as client:
            if allowed:
                client.read("Patient", "1")
            else:
                with pytest.raises(ims_fhir.ConfigurationError, match=token_url):
                    client.read("Patient", "1")
        assert token.called is allowed


def token_response(body: object) -> httpx.Response:
    return httpx.Response(200, json=body)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        pytest.param(token_response(["not", "an", "object"]), "not a JSON object", id="list"),
        pytest.param(httpx.Response(200, text="<html>"), "not JSON", id="html"),
        pytest.param(token_response({"expires_in": 300}), "without access_token", id="none"),
        pytest.param(token_response({"access_token": 7}), "without access_token", id="number"),
        pytest.param(token_response({"access_token": ""}), "without access_token", id="empty"),
        pytest.param(
            token_response({"access_token": "t", "expires_in": "soon"}), "expires_in", id="word"
        ),
        pytest.param(
            token_response({"access_token": "t", "expires_in": -5}), "expires_in", id="negative"
        ),
        pytest.param(
            token_response({"access_token": "t", "expires_in": True}), "expires_in", id="bool"
        ),
        pytest.param(
            token_response({"access_token": "t", "expires_in": None}), "expires_in", id="null"
        ),
        pytest.param(
            httpx.Response(200, content=b'{"access_token": "t", "expires_in": NaN}'),
            "expires_in",
            id="nan",
        ),
        pytest.param(
            httpx.Response(200, content=b'{"access_token": "t", "expires_in": 1e400}'),
            "expires_in",
            id="infinite",
        ),
        pytest.param(
            httpx.Response(200, content=b'{"access_token": "' + b"x" * 2_000_000 + b'"}'),
            "too large",
            id="oversized",
        ),
        pytest.param(
            httpx.Response(200, content=iter([b'{"access_token": "', b"x" * 2_000_000, b'"}'])),
            "larger than 1048576 bytes",
            id="oversized-chunked",
        ),
        pytest.param(
            httpx.Response(
                200,
                headers={"Content-Encoding": "gzip"},
                content=gzip.compress(b'{"access_token": "t"}'),
            ),
            "'gzip'",
            id="compressed",
        ),
    ],
)
def test_an_ill_formed_token_response_is_an_invalid_response(
    rsa_key: RSAKey, answer: httpx.Response, message: str
) -> None:
    auth = SmartBackendAuth("c", rsa_key, kid="k", token_url=TOKEN_URL)
    with respx.mock(assert_all_called=False) as router:
        router.post(TOKEN_URL).mock(return_value=answer)
        api = router.get(f"{BASE}/Patient/1").respond(json=PATIENT)
        with FhirClient(BASE, auth=auth, retry=RetryPolicy(max_retries=0)) as client:
            with pytest.raises(ims_fhir.InvalidResponseError, match=message) as caught:
                client.read("Patient", "1")
        assert not api.called
    assert "POST https://auth.example.org/token" in str(caught.value)


@pytest.mark.parametrize(
    ("expires_in", "lifetime"),
    [
        pytest.param(3600, 3600.0, id="integer"),
        pytest.param(299.5, 299.5, id="float"),
        pytest.param("3600", 3600.0, id="quoted"),
        pytest.param(0, 0.0, id="zero"),
    ],
)
def test_expires_in_sets_the_tokens_lifetime(
    rsa_key: RSAKey, expires_in: object, lifetime: float
) -> None:
    clock = Clock()
    auth = SmartBackendAuth("c", rsa_key, kid="k", token_url=TOKEN_URL, clock=clock)
    with respx.mock() as router:
        token = router.post(TOKEN_URL).respond(json={"access_token": "t", "expires_in": expires_in})
        router.get(f"{BASE}/Patient/1").respond(json=PATIENT)
        with FhirClient(BASE, auth=auth) as client:
            client.read("Patient", "1")
            clock.now += lifetime - TOKEN_REFRESH_MARGIN - 1
            client.read("Patient", "1")
            assert token.call_count == 1, "still valid"
            clock.now += 2
            client.read("Patient", "1")
            assert token.call_count == 2, "renewed"
    assert token.calls.last.request.headers["Accept-Encoding"] == "identity"


@pytest.mark.parametrize(
    "document",
    [
        pytest.param({"grant_types_supported": ["client_credentials"]}, id="missing"),
        pytest.param({"token_endpoint": ["https://auth.example.org/token"]}, id="a-list"),
        pytest.param({"token_endpoint": ""}, id="empty"),
    ],
)
def test_discovery_without_a_token_endpoint_string_is_an_invalid_response(
    rsa_key: RSAKey, document: dict[str, object]
) -> None:
    auth = SmartBackendAuth("c", rsa_key, kid="k")
    with respx.mock() as router:
        router.get(f"{BASE}/.well-known/smart-configuration").respond(json=document)
        with FhirClient(BASE, auth=auth) as client:
            with pytest.raises(ims_fhir.InvalidResponseError, match="no token_endpoint"):
                client.read("Patient", "1")


def test_an_oversized_discovery_document_is_refused(rsa_key: RSAKey) -> None:
    auth = SmartBackendAuth("c", rsa_key, kid="k")
    big = {"token_endpoint": TOKEN_URL, "padding": "x" * 2_000_000}
    with respx.mock() as router:
        router.get(f"{BASE}/.well-known/smart-configuration").respond(json=big)
        with FhirClient(BASE, auth=auth) as client:
            with pytest.raises(ims_fhir.InvalidResponseError, match="too large"):
                client.read("Patient", "1")
