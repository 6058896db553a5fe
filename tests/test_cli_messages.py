"""What the command line says: --since read locally, the progress total, the pull summary."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import click
import pytest
import respx
from click.testing import CliRunner
from rich.console import Console

from ims_fhir import PushResult
from ims_fhir.cli.commands import _progress, cli, parse_since

BASE = "https://fhir.example.org/r4"


@pytest.fixture(autouse=True)
def _default_namespace_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    # BASE is not on this machine and the fixtures name no namespace: these tests are about
    # other things (test_namespaces.py has the namespace ones).
    monkeypatch.setenv("IMS_FHIR_ALLOW_DEFAULT_NAMESPACE", "1")


EMPTY = {"resourceType": "Bundle", "type": "searchset", "entry": []}


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        pytest.param("2026-11-01", "2026-11-01", id="date"),
        pytest.param("2026-11-01T08:00:00Z", "2026-11-01T08:00:00+00:00", id="utc"),
        pytest.param("2026-11-01T08:00:00-05:00", "2026-11-01T08:00:00-05:00", id="offset"),
    ],
)
def test_since_is_sent_as_the_server_reads_it(given: str, sent: str) -> None:
    with respx.mock(assert_all_called=True) as router:
        route = router.get(f"{BASE}/Encounter").respond(json=EMPTY)
        result = CliRunner().invoke(cli, ["pull", "--server", BASE, "--since", given])
    assert result.exit_code == 0, result.output
    assert route.calls.last.request.url.params["_lastUpdated"] == f"ge{sent}"


@pytest.mark.parametrize(
    "given",
    [
        pytest.param("yesterday", id="a-word"),
        pytest.param("2026-11-01T08:00:00", id="no-zone"),
        pytest.param("2026-13-01", id="no-such-month"),
        pytest.param("01/11/2026", id="not-iso"),
    ],
)
def test_a_since_the_server_cannot_read_is_refused_before_sending(given: str) -> None:
    with pytest.raises(click.BadParameter, match="2026-11-01"):
        parse_since(given)
    with respx.mock(assert_all_mocked=True) as router:
        result = CliRunner().invoke(cli, ["pull", "--server", BASE, "--since", given])
        assert not router.calls
    assert result.exit_code == 2 and "--since" in result.stderr


def test_the_progress_bar_shows_the_known_total() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with _progress(console, enabled=True, total=3) as advance:
        for record_id in "abc":
            advance(PushResult(record_id, "created"))
        bar = out.getvalue()
    assert "/3" in bar and "/?" not in bar


def test_the_pull_summary_tells_own_entered_in_error_from_foreign(
    root: Path, tmp_path: Path
) -> None:
    with respx.mock(assert_all_called=True) as router:
        router.get(f"{BASE}/Encounter").respond(json=EMPTY)
        result = CliRunner().invoke(cli, ["pull", "--server", BASE, "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    summary = result.stderr.strip().splitlines()[-1]
    assert "ims-fhir marked entered-in-error" in summary and "not made by ims-fhir" in summary
    assert "(not made by ims-fhir)" not in summary  # the old wording lumped both together


def test_a_failed_write_test_deletes_nothing(tmp_path: Path) -> None:
    from tests.test_cli_errors import CAPABILITIES

    with respx.mock(assert_all_mocked=True, assert_all_called=False) as router:
        router.get(f"{BASE}/metadata").respond(json=CAPABILITIES)
        router.get(f"{BASE}/Encounter").respond(json=EMPTY)
        router.post(url__regex=rf"^{BASE}/\w+/\$validate").respond(
            json={"resourceType": "OperationOutcome", "issue": []}
        )
        router.get(url__regex=rf"^{BASE}/\w+").respond(json=EMPTY)
        transactions = router.post(f"{BASE}/").respond(
            422, json={"resourceType": "OperationOutcome", "issue": []}
        )
        result = CliRunner().invoke(cli, ["check", "--server", BASE, "--write-test"])
    assert "FAILED write" in result.stdout and "nothing was written" in result.stdout
    assert len(transactions.calls) == 1  # the write; no empty transaction of deletes after it
    assert result.exit_code == 1


class _ConflictingPusher:
    """Stands in for the push engine: every encounter conflicts (the server's copy changed)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    async def push(self, records: object) -> AsyncIterator[PushResult]:
        for item in records:  # type: ignore[attr-defined]
            yield PushResult(item.record.id, "conflict", message="Observation changed on server")


def test_a_conflict_says_how_to_resolve_it(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ims_fhir.cli.commands.Pusher", _ConflictingPusher)
    record = root / "fixtures" / "encounters" / "01-lumbar-l5-initial.json"
    result = CliRunner().invoke(
        cli, ["push", str(record), "--server", BASE, "--state", str(tmp_path / "s")]
    )
    assert result.exit_code == 1
    assert "conflict enc-v-0001: Observation changed on server" in result.stderr
    assert "--on-conflict overwrite" in result.stderr
