from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ims_fhir._package import build_package

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
ENCOUNTER_FILES = sorted((FIXTURES / "encounters").glob("*.json"))
INVALID_FILES = sorted((FIXTURES / "invalid").glob("*.json"))
HAPI_DIR = ROOT / "tests" / "hapi"
HAPI_LOG = HAPI_DIR / "target" / "pytest-server.log"


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def fhir_base_url() -> Iterator[str]:
    """A real FHIR R4 server: FHIR_BASE_URL if set, else the HAPI JPA server of tests/hapi.

    The HAPI server is started once per test run and stopped at the end; its log is attached
    to the report of any test using it that fails.
    """
    configured = os.environ.get("FHIR_BASE_URL")
    if configured:
        yield configured.rstrip("/")
        return
    HAPI_LOG.parent.mkdir(parents=True, exist_ok=True)
    launcher_log = HAPI_LOG.with_suffix(".launcher.log")
    # The server installs the project's FHIR package and validates every incoming resource
    # against the profiles in its meta.profile, as a regional health record would.
    package = build_package(HAPI_DIR / "target" / "ims-fhir-package.tgz")
    server_options = ["--", f"--ims.package={package}", "--ims.validate-requests=true"]
    with launcher_log.open("w") as stderr:
        process = subprocess.Popen(
            [str(HAPI_DIR / "run"), "--log", str(HAPI_LOG), *server_options],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert process.stdout is not None
    base = process.stdout.readline().strip()
    if not base.startswith("http://127.0.0.1:"):
        process.kill()
        process.wait()
        process.stdout.close()
        pytest.fail(
            "the HAPI test server did not start:\n"
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
    if report.failed and "fhir_base_url" in getattr(item, "fixturenames", ()) and HAPI_LOG.exists():
        lines = HAPI_LOG.read_text(errors="replace").splitlines()[-200:]
        report.sections.append(("HAPI server log (last 200 lines)", "\n".join(lines)))
