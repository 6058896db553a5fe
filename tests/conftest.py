from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ims_fhir.mapping.package import build_package

from .pgcluster import INSTALL_HINT, PgCluster, find_bindir

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
ENCOUNTER_FILES = sorted((FIXTURES / "encounters").glob("*.json"))
INVALID_FILES = sorted((FIXTURES / "invalid").glob("*.json"))
HAPI_DIR = ROOT / "tests" / "hapi"
# The HAPI test server in its two configurations: the database it stores into.
FHIR_SERVERS = ("h2", "postgres")
_started: set[str] = set()  # the servers this run started: only their logs are current


def hapi_log(server: str) -> Path:
    """The log of the HAPI test server backed by SERVER (one of FHIR_SERVERS)."""
    suffix = "" if server == "h2" else f"-{server}"
    return HAPI_DIR / "target" / f"pytest-server{suffix}.log"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "fhir_servers(*names): run the module's tests that take fhir_base_url on each named "
        "HAPI configuration (h2, postgres)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("fhir_servers")
    if marker is not None and "fhir_base_url" in metafunc.fixturenames:
        metafunc.parametrize("fhir_base_url", marker.args or FHIR_SERVERS, indirect=True)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def fhir_base_url(request: pytest.FixtureRequest) -> str:
    """A real FHIR R4 server: FHIR_BASE_URL if set, else the HAPI JPA server of tests/hapi.

    Backed by H2 unless the test is parametrized (``pytest.mark.fhir_servers``) with another
    configuration. Each HAPI server is started once per test run, when a test first needs it,
    and stopped at the end; its log is attached to the report of any test using it that fails.
    """
    server: str = getattr(request, "param", "h2")
    configured = os.environ.get("FHIR_BASE_URL")
    if configured:
        if server != "h2":
            pytest.skip(f"FHIR_BASE_URL names the server under test; no {server} HAPI is started")
        return configured.rstrip("/")
    base: str = request.getfixturevalue(f"hapi_{server}")
    return base


@pytest.fixture(scope="session")
def ims_package() -> Path:
    """The project's FHIR package, which every test server installs."""
    return build_package(HAPI_DIR / "target" / "ims-fhir-package.tgz")


@pytest.fixture(scope="session")
def hapi_h2(ims_package: Path) -> Iterator[str]:
    """The HAPI test server on an in-memory H2 database (its base URL)."""
    with _hapi_server("h2", ims_package, []) as base:
        yield base


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A throw-away PostgreSQL cluster with the database ``hapi``, removed at the end."""
    bindir = find_bindir()
    if bindir is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    with PgCluster(bindir) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def hapi_postgres(ims_package: Path, pg_cluster: PgCluster) -> Iterator[str]:
    """The HAPI test server on PostgreSQL (its base URL)."""
    options = [
        "--ims.db=postgres",
        f"--ims.jdbc-url={pg_cluster.jdbc_url}",
        f"--ims.db-user={pg_cluster.user}",
        f"--ims.db-password={pg_cluster.password}",
    ]
    with _hapi_server("postgres", ims_package, options) as base:
        yield base


@contextlib.contextmanager
def _hapi_server(server: str, package: Path, options: list[str]) -> Iterator[str]:
    log = hapi_log(server)
    log.parent.mkdir(parents=True, exist_ok=True)
    _started.add(server)
    launcher_log = log.with_suffix(".launcher.log")
    # The server installs the project's FHIR package and validates every incoming resource
    # against the profiles in its meta.profile, as a regional health record would.
    # Batch2 moves a Bulk Data export one step per maintenance pass: once a minute by default,
    # every two seconds here, so an export takes seconds rather than minutes.
    server_options = [
        "--",
        f"--ims.package={package}",
        "--ims.validate-requests=true",
        "--ims.batch2-maintenance-ms=2000",
        *options,
    ]
    with launcher_log.open("w") as stderr:
        process = subprocess.Popen(
            [str(HAPI_DIR / "run"), "--log", str(log), *server_options],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            # The suite writes thousands of encounters to an in-memory database: with 1 GiB
            # the server ends up collecting garbage more than answering.
            env=os.environ | {"IMS_FHIR_HAPI_XMX": os.environ.get("IMS_FHIR_HAPI_XMX", "2g")},
        )
    assert process.stdout is not None
    base = process.stdout.readline().strip()
    if not base.startswith("http://127.0.0.1:"):
        process.kill()
        process.wait()
        process.stdout.close()
        pytest.fail(
            f"the HAPI test server ({server}) did not start:\n"
            + launcher_log.read_text(errors="replace")[-5000:]
        )
    try:
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if not report.failed or "fhir_base_url" not in getattr(item, "fixturenames", ()):
        return
    callspec = getattr(item, "callspec", None)
    server = callspec.params.get("fhir_base_url", "h2") if callspec else "h2"
    log = hapi_log(server)
    if server in _started and log.exists():
        lines = log.read_text(errors="replace").splitlines()[-200:]
        report.sections.append((f"HAPI server log, {server} (last 200 lines)", "\n".join(lines)))
