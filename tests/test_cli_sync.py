"""The push/pull/check command line without a server: configuration, dry runs, exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from click.testing import CliRunner

from ims_fhir import StateStore, check_capabilities
from ims_fhir.cli.commands import cli
from ims_fhir.sync.capabilities import needs

BASE = "https://fhir.example.org/r4"


@pytest.fixture(autouse=True)
def _default_namespace_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    # BASE is not on this machine and the fixtures name no namespace: these tests are about
    # other things (test_namespaces.py has the namespace ones).
    monkeypatch.setenv("IMS_FHIR_ALLOW_DEFAULT_NAMESPACE", "1")


def test_dry_run_sends_nothing_and_says_what_would_be_written(root: Path, tmp_path: Path) -> None:
    with respx.mock(assert_all_mocked=True) as router:
        result = CliRunner().invoke(
            cli,
            [
                "push",
                str(root / "fixtures" / "encounters"),
                "--server",
                BASE,
                "--state",
                str(tmp_path / "s.sqlite3"),
                "--dry-run",
                "--json",
            ],
        )
        assert not router.calls
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["summary"]["would_create"] == 26
    assert report["resources_written"] > 26 * 5


def test_invalid_records_fail_the_push_but_not_the_others(root: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "push",
            str(root / "fixtures" / "encounters" / "01-lumbar-l5-initial.json"),
            str(root / "fixtures" / "invalid" / "nrs-above-10.json"),
            "--server",
            BASE,
            "--state",
            str(tmp_path / "s.sqlite3"),
            "--dry-run",
            "--json",
        ],
    )
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["summary"]["would_create"] == 1
    assert report["invalid"][0]["issues"][0]["path"] == "pain[0].nrs"


@pytest.mark.parametrize(
    ("args", "env", "config", "expected"),
    [
        pytest.param(
            ["--server", "https://flag.example/r4"],
            {"IMS_FHIR_SERVER": "https://env.example/r4"},
            'server = "https://file.example/r4"',
            "flag.example",
            id="flag-wins",
        ),
        pytest.param(
            [],
            {"IMS_FHIR_SERVER": "https://env.example/r4"},
            'server = "https://file.example/r4"',
            "env.example",
            id="env-beats-file",
        ),
        pytest.param([], {}, 'server = "https://file.example/r4"', "file.example", id="file"),
    ],
)
def test_settings_precedence(
    tmp_path: Path, args: list[str], env: dict[str, str], config: str, expected: str
) -> None:
    config_file = tmp_path / "config.toml"
    config_file.write_text(config + "\n", encoding="utf-8")
    with respx.mock() as router:
        route = router.get(url__regex=r"https://.*/r4/metadata").respond(500)
        result = CliRunner().invoke(cli, ["--config", str(config_file), "check", *args], env=env)
        assert route.calls.last.request.url.host == expected
    assert result.exit_code == 2  # a server error is a setup problem, not a failed record


def test_unknown_setting_in_the_config_file_is_a_usage_error(tmp_path: Path) -> None:
    config_file = tmp_path / "config.toml"
    config_file.write_text('sever = "typo"\n', encoding="utf-8")
    result = CliRunner().invoke(cli, ["--config", str(config_file), "check"])
    assert result.exit_code == 2
    assert "unknown settings sever" in result.output


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["check", "--server", "http://fhir.example.org/r4"], id="plain-http"),
        pytest.param(
            ["check", "--server", BASE, "--token", "t", "--basic-user", "u"], id="two-auth-modes"
        ),
        pytest.param(["check"], id="no-server"),
        pytest.param(
            ["push", "x.json", "--server", BASE, "--batch-size", "0"], id="bad-batch-size"
        ),
    ],
)
def test_usage_and_configuration_errors_exit_2(args: list[str]) -> None:
    assert CliRunner().invoke(cli, args).exit_code == 2


def test_token_from_the_environment_is_sent(tmp_path: Path) -> None:
    with respx.mock() as router:
        route = router.get(f"{BASE}/metadata").respond(json=_statement())
        validate = router.post(f"{BASE}/Patient/$validate").respond(
            json={"resourceType": "OperationOutcome", "issue": []}
        )
        result = CliRunner().invoke(
            cli, ["check", "--server", BASE], env={"IMS_FHIR_TOKEN": "s3cret"}
        )
    assert route.calls.last.request.headers["Authorization"] == "Bearer s3cret"
    assert validate.calls.last.request.headers["Authorization"] == "Bearer s3cret"
    assert "s3cret" not in result.output
    assert result.exit_code == 0, result.output


def _statement(**changes: Any) -> dict[str, Any]:
    def resource(name: str) -> dict[str, Any]:
        return {
            "type": name,
            "interaction": [{"code": c} for c in ("read", "create", "update", "search-type")],
            "conditionalCreate": True,
            "conditionalUpdate": True,
            # What push and pull search by, from the one list of them.
            "searchParam": [{"name": n} for n in sorted(needs()[name][1])],
            "operation": [{"name": "validate"}],
        }

    statement = {
        "resourceType": "CapabilityStatement",
        "fhirVersion": "4.0.1",
        "rest": [
            {
                "mode": "server",
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
                "resource": [
                    resource(t)
                    for t in (
                        "Patient",
                        "Practitioner",
                        "Organization",
                        "Encounter",
                        "Observation",
                        "Condition",
                        "Procedure",
                        "Consent",
                        "Provenance",
                    )
                ],
            }
        ],
    }
    return statement | changes


def test_check_capabilities_accepts_a_complete_server() -> None:
    assert all(c.ok for c in check_capabilities(_statement()))


@pytest.mark.parametrize(
    ("change", "failing"),
    [
        pytest.param({"fhirVersion": "5.0.0"}, "FHIR 4.0.x", id="r5"),
        pytest.param(
            {"rest": [{"mode": "server", "resource": []}]}, "transactions", id="no-transactions"
        ),
    ],
)
def test_check_capabilities_names_what_is_missing(change: dict[str, Any], failing: str) -> None:
    checks = {c.name: c for c in check_capabilities(_statement(**change))}
    assert not checks[failing].ok


@pytest.mark.parametrize(
    ("resource_type", "param"),
    [
        pytest.param("Encounter", "subject", id="pull-one-patient"),
        pytest.param("Observation", "encounter", id="pull-an-encounters-observations"),
        pytest.param("Provenance", "target", id="pull-an-encounters-provenance"),
        pytest.param("Patient", "identifier", id="push-conditional-create"),
    ],
)
def test_check_capabilities_names_a_missing_search_param(resource_type: str, param: str) -> None:
    statement = _statement()
    (resource,) = [r for r in statement["rest"][0]["resource"] if r["type"] == resource_type]
    resource["searchParam"] = [p for p in resource["searchParam"] if p["name"] != param]
    (check,) = [c for c in check_capabilities(statement) if c.name == resource_type]
    assert not check.ok and f"search parameter {param}" in check.detail


def test_check_capabilities_lists_missing_conditional_update() -> None:
    statement = _statement()
    statement["rest"][0]["resource"][4]["conditionalUpdate"] = False
    (observation,) = [c for c in check_capabilities(statement) if c.name == "Observation"]
    assert not observation.ok and "conditional update" in observation.detail


def test_state_store_round_trip(tmp_path: Path) -> None:
    from ims_fhir.sync.state import ResourceState

    path = tmp_path / "state.sqlite3"
    with StateStore(path) as state:
        state.mark_pending("s", [("enc", "h1")])
        assert state.record("s", "enc").pending_hash == "h1"  # type: ignore[union-attr]
        state.commit_written(
            "s", [("enc", "h1")], [ResourceState("a|1", "Observation", "7", "2", "enc")]
        )
    with StateStore(path) as state:  # survives reopening
        record = state.record("s", "enc")
        assert record is not None and (record.content_hash, record.pending_hash) == ("h1", None)
        assert state.resources("s", "enc")["a|1"].version == "2"
        assert state.record("other-server", "enc") is None
        assert state.counts("s") == {"Observation": 1}


# -- fail fast: one clear line and exit 2, not one failure per encounter -------------------------

CAPABILITIES = {
    "resourceType": "CapabilityStatement",
    "status": "active",
    "date": "2026-01-01",
    "kind": "instance",
    "fhirVersion": "4.0.1",
    "format": ["json"],
    "rest": [{"mode": "server", "interaction": [{"code": "transaction"}]}],
}


def _push(root: Path, tmp_path: Path, *extra: str) -> Any:
    return CliRunner().invoke(
        cli,
        [
            "push",
            str(root / "fixtures" / "encounters"),
            "--server",
            BASE,
            "--state",
            str(tmp_path / "s.sqlite3"),
            *extra,
        ],
    )


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        pytest.param(
            {"metadata": httpx.Response(404, text="<html>Not Found</html>")},
            "no FHIR server at this base URL",
            id="wrong-base-path",
        ),
        pytest.param(
            {"metadata": httpx.Response(200, text="<html>a web page</html>")},
            "not a FHIR server",
            id="not-fhir",
        ),
        pytest.param(
            {"metadata": httpx.Response(200, json=CAPABILITIES | {"fhirVersion": "5.0.0"})},
            "speaks FHIR 5.0.0",
            id="not-r4",
        ),
        pytest.param(
            {
                "metadata": httpx.Response(
                    200,
                    json=CAPABILITIES
                    | {"rest": [{"mode": "server", "interaction": [{"code": "batch"}]}]},
                )
            },
            "does not support transactions",
            id="no-transactions",
        ),
        pytest.param(
            {
                "metadata": httpx.Response(
                    200,
                    json=CAPABILITIES
                    | {
                        "rest": [
                            {
                                "mode": "server",
                                "interaction": [{"code": "transaction"}],
                                "resource": [{"type": "Observation", "conditionalCreate": False}],
                            }
                        ]
                    },
                )
            },
            "conditional create for Observation",
            id="no-conditional-create",
        ),
        pytest.param(
            {"metadata": httpx.Response(200, json=CAPABILITIES), "Encounter": httpx.Response(401)},
            "401",
            id="unauthorized",
        ),
        pytest.param(
            {"metadata": httpx.Response(403)},
            "403",
            id="forbidden",
        ),
        pytest.param(
            {
                "metadata": httpx.ConnectError(
                    "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"
                )
            },
            "CERTIFICATE_VERIFY_FAILED",
            id="tls",
        ),
    ],
)
def test_a_server_that_cannot_take_the_push_stops_it_at_once(
    root: Path, tmp_path: Path, routes: dict[str, Any], expected: str
) -> None:
    with respx.mock(assert_all_mocked=True) as router:
        for path, answer in routes.items():
            route = router.get(f"{BASE}/{path}")
            if isinstance(answer, Exception):
                route.side_effect = answer
            else:
                route.return_value = answer
        result = _push(root, tmp_path)
        sent = len(router.calls)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert sent <= 5  # the preflight and its retries, never a request per encounter


def test_a_state_file_problem_is_one_line_and_exit_2(root: Path, tmp_path: Path) -> None:
    bad = tmp_path / "s.sqlite3"
    bad.write_text("name,value\n" * 100)
    with respx.mock(assert_all_mocked=True) as router:
        result = _push(root, tmp_path)
        assert not router.calls
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "not an ims-fhir state file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_same_encounter_twice_in_one_push_is_refused_naming_both_files(
    root: Path, tmp_path: Path
) -> None:
    one = root / "fixtures" / "encounters" / "01-lumbar-l5-initial.json"
    copy = tmp_path / "copy.json"
    copy.write_text(one.read_text(encoding="utf-8"), encoding="utf-8")
    result = CliRunner().invoke(
        cli,
        [
            "push",
            str(one),
            str(copy),
            "--server",
            BASE,
            "--state",
            str(tmp_path / "s.sqlite3"),
            "--dry-run",
            "--json",
        ],
    )
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    (failed,) = [r for r in report["results"] if r["action"] == "failed"]
    assert "twice" in failed["message"]
    assert "01-lumbar-l5-initial.json" in failed["message"] and "copy.json" in failed["message"]
