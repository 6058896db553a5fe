"""What real deployments need: a CA bundle, extra headers, OAuth2 client secrets, your own client.

The TLS endpoint here is a small HTTPS server with a certificate from a CA made for the test (a
regional test server's own CA): it shows what TLS verification does, not how a FHIR server
behaves.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import http.server
import ipaddress
import json
import logging
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import respx
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient

import ims_fhir
from ims_fhir import AsyncFhirClient, ClientCredentialsAuth, FhirClient
from ims_fhir.cli.commands import cli

BASE = "https://fhir.example.org/r4"
TOKEN_URL = "https://auth.example.org/token"
CAPABILITIES = {
    "resourceType": "CapabilityStatement",
    "status": "active",
    "date": "2026-01-01",
    "kind": "instance",
    "format": ["json"],
    "fhirVersion": "4.0.1",
}


# -- a CA of its own ----------------------------------------------------------------------------


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A CA certificate, and a server certificate for 127.0.0.1 it signed, with its key."""
    folder = tmp_path_factory.mktemp("tls")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("ims-fhir test regional CA"))
        .issuer_name(_name("ims-fhir test regional CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "server.pem", folder / "key.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_file, cert_file, key_file


class _Metadata(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        body = json.dumps(CAPABILITIES).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module")
def https_base(tls_files: tuple[Path, Path, Path]) -> Iterator[str]:
    _, cert_file, key_file = tls_files
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metadata)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/r4"
    finally:
        server.shutdown()
        server.server_close()


def test_a_ca_bundle_adds_trust_in_a_servers_own_ca(
    https_base: str, tls_files: tuple[Path, Path, Path]
) -> None:
    ca_file = tls_files[0]
    with FhirClient(https_base, ca_bundle=ca_file) as client:
        assert client.capabilities().fhirVersion == "4.0.1"


def test_without_the_ca_bundle_the_certificate_is_refused(https_base: str) -> None:
    no_retry = ims_fhir.RetryPolicy(max_retries=0)
    with FhirClient(https_base, retry=no_retry) as client:
        with pytest.raises(ims_fhir.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            client.capabilities()


def test_a_ca_bundle_keeps_the_usual_roots_and_verification() -> None:
    context = ims_fhir.client.http.tls_context(None)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] > 10  # the usual roots are still trusted


def test_the_cli_takes_a_ca_bundle_and_names_it_when_it_is_missing(
    https_base: str, tls_files: tuple[Path, Path, Path]
) -> None:
    ok = CliRunner().invoke(cli, ["validate", "--help"])  # the flag is documented where a server is
    assert "--ca-bundle" in ok.stdout
    result = CliRunner().invoke(cli, ["pull", "--server", https_base, "--since", "2026-01-01"])
    assert result.exit_code == 2
    assert "--ca-bundle" in result.stderr and "IMS_FHIR_CA_BUNDLE" in result.stderr


# -- headers -----------------------------------------------------------------------------------


def test_extra_headers_are_sent_and_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with respx.mock(assert_all_called=True) as router:
        route = router.get(f"{BASE}/metadata").respond(json=CAPABILITIES)
        with FhirClient(BASE, headers={"X-Api-Key": "gateway-s3cret"}) as client:
            client.capabilities()
    assert route.calls.last.request.headers["X-Api-Key"] == "gateway-s3cret"
    assert "gateway-s3cret" not in caplog.text


@pytest.mark.parametrize(
    ("args", "env", "config"),
    [
        pytest.param(
            ["--header", "X-Api-Key: k1", "--header", "X-Tenant: a b"], {}, "", id="flags"
        ),
        pytest.param([], {"IMS_FHIR_HEADER": "X-Api-Key: k1\nX-Tenant: a b"}, "", id="env"),
        pytest.param([], {}, 'header = ["X-Api-Key: k1", "X-Tenant: a b"]', id="config"),
    ],
)
def test_the_cli_sends_headers_from_flags_env_or_config(
    tmp_path: Path, args: list[str], env: dict[str, str], config: str
) -> None:
    config_file = tmp_path / "c.toml"
    config_file.write_text(config + "\n", encoding="utf-8")
    with respx.mock() as router:
        route = router.get(f"{BASE}/metadata").respond(json=CAPABILITIES)
        result = CliRunner().invoke(
            cli, ["-v", "--config", str(config_file), "check", "--server", BASE, *args], env=env
        )
    request = route.calls.last.request
    assert (request.headers["X-Api-Key"], request.headers["X-Tenant"]) == ("k1", "a b")
    assert "k1" not in result.output


# -- OAuth2 client credentials with a secret ---------------------------------------------------


@pytest.mark.parametrize("send_secret", ["basic", "form"])
def test_client_credentials_get_a_token_and_renew_it_once_on_401(send_secret: str) -> None:
    auth = ClientCredentialsAuth(
        "clinic app",
        "s3cret:+/",
        token_url=TOKEN_URL,
        scope="system/*.read",
        send_secret=send_secret,  # type: ignore[arg-type]
    )
    tokens = iter(["t1", "t2"])
    with respx.mock(assert_all_called=True) as router:
        token = router.post(TOKEN_URL).mock(
            side_effect=lambda request: httpx.Response(
                200, json={"access_token": next(tokens), "expires_in": 300}
            )
        )
        answers = iter(
            [
                httpx.Response(200, json=CAPABILITIES),
                httpx.Response(401),
                httpx.Response(200, json=CAPABILITIES),
            ]
        )
        metadata = router.get(f"{BASE}/metadata").mock(side_effect=lambda r: next(answers))
        with FhirClient(BASE, auth=auth) as client:
            client.capabilities()
            client.capabilities()  # 401: a new token, the request once more
    assert [c.request.headers["Authorization"] for c in metadata.calls] == [
        "Bearer t1",
        "Bearer t1",
        "Bearer t2",
    ]
    sent = token.calls.last.request
    form = dict(x.split("=", 1) for x in sent.content.decode().split("&"))
    assert form["grant_type"] == "client_credentials" and form["scope"] == "system%2F%2A.read"
    if send_secret == "basic":
        user, secret = base64.b64decode(sent.headers["Authorization"][6:]).decode().split(":")
        assert (user, secret) == ("clinic+app", "s3cret%3A%2B%2F")  # form-encoded, RFC 6749
        assert "client_secret" not in form
    else:
        assert form["client_secret"] == "s3cret%3A%2B%2F" and "Authorization" not in sent.headers
    assert "s3cret" not in repr(auth)


def test_client_credentials_refuse_a_plain_http_token_endpoint() -> None:
    auth = ClientCredentialsAuth("c", "s", token_url="http://auth.example.org/token")
    with respx.mock(assert_all_called=False), FhirClient(BASE, auth=auth) as client:
        with pytest.raises(ims_fhir.ConfigurationError, match="plain http"):
            client.capabilities()


def test_the_cli_takes_oauth_client_credentials_from_the_environment() -> None:
    env = {
        "IMS_FHIR_OAUTH_CLIENT_ID": "clinic",
        "IMS_FHIR_OAUTH_CLIENT_SECRET": "s3cret",
        "IMS_FHIR_OAUTH_TOKEN_URL": TOKEN_URL,
    }
    with respx.mock() as router:
        router.post(TOKEN_URL).respond(json={"access_token": "tok", "expires_in": 60})
        route = router.get(f"{BASE}/metadata").respond(json=CAPABILITIES)
        result = CliRunner().invoke(cli, ["-v", "check", "--server", BASE], env=env)
    assert route.calls.last.request.headers["Authorization"] == "Bearer tok"
    assert "s3cret" not in result.output and "tok" not in result.output.replace("token", "")


# -- your own httpx client ---------------------------------------------------------------------


def test_your_own_httpx_client_is_used_and_left_open() -> None:
    seen: list[httpx.Request] = []
    own = httpx.Client(event_hooks={"request": [seen.append]})
    with respx.mock(assert_all_called=True) as router:
        router.get(f"{BASE}/metadata").respond(json=CAPABILITIES)
        with FhirClient(BASE, http_client=own, headers={"X-Api-Key": "k"}) as client:
            client.capabilities()
    assert [str(r.url) for r in seen] == [f"{BASE}/metadata"]
    assert seen[0].headers["X-Api-Key"] == "k"
    assert not own.is_closed
    own.close()


def test_your_own_client_excludes_the_settings_it_holds() -> None:
    with pytest.raises(ValueError, match="ca_bundle"):
        FhirClient(BASE, http_client=httpx.Client(), ca_bundle="ca.pem")


# -- typed search, push in an event loop, blocking pull ----------------------------------------


def test_search_by_model_class_yields_only_that_type() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"resource": {"resourceType": "Patient", "id": "p"}, "search": {"mode": "include"}},
            {
                "resource": {
                    "resourceType": "Observation",
                    "id": "o",
                    "status": "final",
                    "code": {"text": "x"},
                },
                "search": {"mode": "match"},
            },
        ],
    }
    with respx.mock() as router, FhirClient(BASE) as client:
        router.get(f"{BASE}/Observation").respond(json=bundle)
        found = list(client.search(Observation, {"_include": "Observation:subject"}))
        everything = list(client.search("Observation", {"_include": "Observation:subject"}))
    assert [type(r) for r in found] == [Observation]
    assert {type(r) for r in everything} == {Observation, Patient}


def test_push_works_inside_a_running_event_loop(root: Path, tmp_path: Path) -> None:
    record = ims_fhir.Encounter.model_validate_json(
        (root / "fixtures" / "encounters" / "01-lumbar-l5-initial.json").read_text("utf-8")
    )

    async def inside_a_loop() -> list[ims_fhir.PushResult]:
        with ims_fhir.StateStore(tmp_path / "s.sqlite3") as state:
            return ims_fhir.push([record], BASE, state, dry_run=True)

    with respx.mock(assert_all_mocked=True) as router:
        results = asyncio.run(inside_a_loop())
        assert not router.calls
    assert [(r.record_id, r.action) for r in results] == [(record.id, "would-create")]


def test_pull_all_gathers_every_page_in_one_report() -> None:
    empty = {"resourceType": "Bundle", "type": "searchset", "entry": []}
    with respx.mock(assert_all_called=True) as router:
        router.get(f"{BASE}/Encounter").respond(json=empty)
        report = ims_fhir.pull_all(BASE, since="2026-01-01")
    assert (report.records, report.skipped, report.errors) == ([], [], [])


def test_an_async_client_takes_your_own_async_client() -> None:
    async def run() -> str:
        async with httpx.AsyncClient() as own:
            async with AsyncFhirClient(BASE, http_client=own) as client:
                statement = await client.capabilities()
            assert not own.is_closed
            return str(statement.fhirVersion)

    with respx.mock() as router:
        router.get(f"{BASE}/metadata").respond(json=CAPABILITIES)
        assert asyncio.run(run()) == "4.0.1"
