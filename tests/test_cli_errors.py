"""No traceback, ever: every command over a matrix of bad paths, bad settings and broken servers.

Each case must end with exit 1 (records failed) or 2 (setup), and a setup problem must be one
line that starts with ``error``. The servers are respx routes answering what a real server cannot
be made to answer on demand (refusals, HTML, a missing $validate, unknown profiles); nothing here
claims how a real FHIR server behaves.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import respx
from click.testing import CliRunner, Result

from ims_fhir.cli.commands import cli

BASE = "https://fhir.example.org/r4"


@pytest.fixture(autouse=True)
def _default_namespace_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    # BASE is not on this machine and the fixtures name no namespace: these tests are about
    # other mistakes (test_namespaces.py has the namespace ones).
    monkeypatch.setenv("IMS_FHIR_ALLOW_DEFAULT_NAMESPACE", "1")


ROOT = Path(__file__).resolve().parents[1]
RECORD = str(ROOT / "fixtures" / "encounters" / "01-lumbar-l5-initial.json")
BAD_RECORD = str(ROOT / "fixtures" / "invalid" / "nrs-above-10.json")

CAPABILITIES = {
    "resourceType": "CapabilityStatement",
    "fhirVersion": "4.0.1",
    "rest": [
        {
            "mode": "server",
            "interaction": [{"code": "transaction"}],
            "operation": [{"name": "validate"}],
        }
    ],
}


def _unknown_profile(request: httpx.Request) -> httpx.Response:
    profile = request.url.params.get("profile", "")
    return httpx.Response(
        200,
        json={
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "error",
                    "code": "processing",
                    "diagnostics": f"Profile reference '{profile}' has not been checked because "
                    "it is unknown",
                }
            ],
        },
    )


Route = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]

# Broken servers: what each answers, by path (a regex on the URL path after the base).
SERVERS: dict[str, dict[str, Route]] = {
    "tls-unknown-ca": {
        ".*": httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    },
    "401": {"metadata": httpx.Response(401), ".*": httpx.Response(401)},
    "403": {"metadata": httpx.Response(403), ".*": httpx.Response(403)},
    "404-wrong-base": {".*": httpx.Response(404, text="<html>Not Found</html>")},
    "500": {".*": httpx.Response(500, text="boom")},
    "html-page": {".*": httpx.Response(200, text="<html>a web page</html>")},
    "not-a-capability-statement": {
        ".*": httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset"})
    },
    "no-$validate": {
        "metadata": httpx.Response(200, json=CAPABILITIES),
        r".*\$validate": httpx.Response(404, json={"resourceType": "OperationOutcome"}),
        ".*": httpx.Response(404),
    },
    "profiles-not-installed": {
        "metadata": httpx.Response(200, json=CAPABILITIES),
        r".*\$validate": _unknown_profile,
        ".*": httpx.Response(404),
    },
    # JSON of the right type with the wrong shapes inside (issue 18 review).
    "odd-shapes": {
        "metadata": httpx.Response(
            200, json={"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1", "rest": "x"}
        ),
        ".*": httpx.Response(
            200,
            json={
                "resourceType": "Bundle",
                "type": "searchset",
                "link": [None, 1, "next"],
                "entry": ["x", {"resource": 1}],
            },
        ),
    },
}

# The commands that talk to a server, as the user types them (the server comes from --server
# or, for validate, its own --server).
SERVER_COMMANDS = {
    "push": ["push", RECORD, "--server", BASE, "--state", "{tmp}/s.sqlite3"],
    "pull": ["pull", "--server", BASE, "-o", "{tmp}/out.ndjson"],
    "check": ["check", "--server", BASE],
    "check-write-test": ["check", "--server", BASE, "--write-test"],
    "validate-server": ["validate", RECORD, "--server", BASE],
}


# Where a broken server is not a setup problem (exit 2) but an answer: the check reports what is
# MISSING, the push reports the encounter it could not write, the pull finds nothing. Every
# other pair must exit 2.
NOT_SETUP_PROBLEMS = {
    ("check", "no-$validate"): 1,
    ("check", "profiles-not-installed"): 1,
    ("check-write-test", "no-$validate"): 1,
    ("check-write-test", "profiles-not-installed"): 1,
    ("push", "500"): 1,  # a 500 may pass: the encounter fails, the next one is tried
    ("push", "no-$validate"): 1,  # the transaction is refused (404)
    ("push", "profiles-not-installed"): 1,
    ("pull", "not-a-capability-statement"): 0,  # pull reads no metadata: an empty searchset
    # Odd shapes inside: the check reports what is missing, the push the encounter the answer
    # failed, the pull the entries that hold no resource.
    ("check", "odd-shapes"): 1,
    ("check-write-test", "odd-shapes"): 1,
    ("push", "odd-shapes"): 1,
    ("pull", "odd-shapes"): 1,
}


@dataclass
class Case:
    args: list[str]
    files: dict[str, str | bytes] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    server: dict[str, Route] | None = None
    exit_codes: frozenset[int] = frozenset({2})
    names: tuple[str, ...] = ()  # what the message must name


def _bad_setups() -> dict[str, Case]:
    push = ["push", RECORD, "--server", BASE, "--state", "{tmp}/s.sqlite3", "--dry-run"]
    check = ["check", "--server", BASE]
    return {
        "state-in-missing-folder": Case(
            ["push", RECORD, "--server", BASE, "--state", "/proc/nope/state.sqlite3"],
            names=("/proc/nope",),
        ),
        "state-is-a-text-file": Case(
            [*push[:4], "--state", "{tmp}/notes.txt", "--dry-run"],
            files={"notes.txt": "just some notes\n"},
            names=("notes.txt", "--state"),
        ),
        "state-is-a-folder": Case([*push[:4], "--state", "{tmp}", "--dry-run"], names=("--state",)),
        "state-is-binary-junk": Case(
            [*push[:4], "--state", "{tmp}/junk", "--dry-run"],
            files={"junk": bytes(range(256)) * 64},
            names=("junk",),
        ),
        "pull-output-in-missing-folder": Case(
            ["pull", "--server", BASE, "-o", "/nonexist/dir/out.ndjson"],
            names=("/nonexist/dir", "-o"),
        ),
        "pull-output-is-a-folder": Case(
            ["pull", "--server", BASE, "-o", "{tmp}"], names=("folder",)
        ),
        "convert-output-in-missing-folder": Case(
            ["convert", RECORD, "-o", "/nonexist/x.ndjson"], names=("/nonexist",)
        ),
        "convert-fhir-output-in-missing-folder": Case(
            ["convert", "--from", "fhir", RECORD, "-o", "/nonexist/x.ndjson"],
            names=("/nonexist",),
        ),
        "package-output-under-a-file": Case(
            ["package", "-o", "{tmp}/notes.txt/p.tgz"],
            files={"notes.txt": "a file, not a folder"},
            names=("notes.txt",),
        ),
        "config-missing": Case(["--config", "{tmp}/none.toml", *check], names=("none.toml",)),
        "config-not-toml": Case(
            ["--config", "{tmp}/c.toml", *check],
            files={"c.toml": "server: https://x\n"},
            names=("c.toml",),
        ),
        "config-not-utf8": Case(
            ["--config", "{tmp}/c.toml", *check],
            files={"c.toml": b"server = '\xff'\n"},
            names=("c.toml",),
        ),
        "config-is-a-folder": Case(["--config", "{tmp}", *check], names=()),
        "config-unknown-key": Case(
            ["--config", "{tmp}/c.toml", *check],
            files={"c.toml": 'sever = "https://x"\n'},
            names=("sever",),
        ),
        "config-wrong-type": Case(
            ["--config", "{tmp}/c.toml", *push],
            files={"c.toml": 'batch_size = "ten"\n'},
            names=("batch",),
        ),
        "config-header-not-a-name-and-value": Case(
            ["--config", "{tmp}/c.toml", *check],
            files={"c.toml": 'header = "X-Api-Key"\n'},
            names=("header",),
        ),
        "no-server": Case(["check"], names=("--server", "IMS_FHIR_SERVER", "server")),
        "no-server-pull": Case(["pull"], names=("--server", "IMS_FHIR_SERVER")),
        "not-a-url": Case(["check", "--server", "fhir.example.org"], names=("--server",)),
        "plain-http": Case(
            ["check", "--server", "http://fhir.example.org/r4"],
            names=("--allow-insecure-http", "IMS_FHIR_ALLOW_INSECURE_HTTP"),
        ),
        "two-auth-modes": Case([*check, "--token", "t", "--basic-user", "u"], names=("--",)),
        "smart-key-missing": Case(
            [*check, "--smart-client-id", "c", "--smart-kid", "k", "--smart-key-file", "/no/key"],
            names=("/no/key", "--smart-key-file"),
        ),
        "smart-key-not-a-key": Case(
            [*check, "--smart-client-id", "c", "--smart-kid", "k", "--smart-key-file", "{tmp}/k"],
            files={"k": "not a key"},
            names=("--smart-key-file",),
        ),
        "smart-kid-missing": Case(
            [*check, "--smart-client-id", "c", "--smart-key-file", "{tmp}/k"],
            files={"k": "not a key"},
            names=("--smart-kid",),
        ),
        "oauth-secret-missing": Case(
            [*check, "--oauth-client-id", "c"], names=("--oauth-client-secret",)
        ),
        "ca-bundle-missing": Case([*check, "--ca-bundle", "/no/ca.pem"], names=("/no/ca.pem",)),
        "ca-bundle-not-pem": Case(
            [*check, "--ca-bundle", "{tmp}/ca.pem"],
            files={"ca.pem": "not a certificate"},
            names=("ca.pem", "--ca-bundle"),
        ),
        "header-without-colon": Case([*check, "--header", "X-Api-Key"], names=("Name: value",)),
        "header-authorization": Case(
            [*check, "--header", "Authorization: Bearer x"], names=("Authorization",)
        ),
        "since-yesterday": Case(["pull", "--server", BASE, "--since", "yesterday"]),
        # An unset variable in a script must not pull every patient's encounters.
        "patient-empty": Case(["pull", "--server", BASE, "--patient", ""], names=("--patient",)),
        "patient-not-an-id": Case(["pull", "--server", BASE, "--patient", "Patient/a b"]),
        "since-without-zone": Case(["pull", "--server", BASE, "--since", "2026-11-01T08:00:00"]),
        "batch-size-zero": Case([*push, "--batch-size", "0"]),
        "timeout-zero": Case([*check, "--timeout", "0"]),
        "timeout-nan": Case([*check, "--timeout", "nan"]),
        "timeout-nan-env": Case(check, env={"IMS_FHIR_TIMEOUT": "nan"}),
        "header-not-ascii": Case([*check, "--header", "X-Key: café"], names=("X-Key",)),
        "header-name-not-ascii": Case([*check, "--header", "X-Ké: v"]),
        # What TOML can hold that a setting cannot take (issue 18 review).
        **{
            f"config-{key}-{kind}": Case(
                ["--config", "{tmp}/c.toml", *push],
                files={"c.toml": f"{key} = {value}\n"},
                names=(key,),
            )
            for key, kind, value in [
                ("timeout", "date", "1979-05-27"),
                ("timeout", "nan", "nan"),
                ("batch_size", "list", "[1]"),
                ("concurrency", "table", "{a=1}"),
                ("batch_size", "float", "1.5"),
                ("ca_bundle", "number", "5"),
                ("state", "datetime", "1979-05-27T07:32:00Z"),
                ("allow_insecure_http", "number", "2"),
                ("token", "list", '["a", "b"]'),
                ("header", "table-in-list", '["X-A: 1", {a=1}]'),
            ]
        },
        "input-missing": Case(
            ["validate", "/no/such/records.json"], exit_codes=frozenset({1}), names=()
        ),
        "input-invalid": Case(["validate", BAD_RECORD], exit_codes=frozenset({1})),
        "push-input-missing": Case(
            ["push", "/no/such.json", "--server", BASE, "--state", "{tmp}/s", "--dry-run"],
            exit_codes=frozenset({1}),
        ),
    }


def _cases() -> list[pytest.param]:  # type: ignore[valid-type]
    params = [pytest.param(case, id=name) for name, case in _bad_setups().items()]
    for (server, routes), (command, args) in itertools.product(
        SERVERS.items(), SERVER_COMMANDS.items()
    ):
        exit_code = NOT_SETUP_PROBLEMS.get((command, server), 2)
        case = Case(list(args), server=routes, exit_codes=frozenset({exit_code}))
        params.append(pytest.param(case, id=f"{command}-{server}"))
    return params


def _invoke(case: Case, tmp_path: Path) -> Result:
    for name, content in case.files.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        path.chmod(0o600)  # a private key readable by others warns: not what is tested here
    args = [a.replace("{tmp}", str(tmp_path)) for a in case.args]
    env = {"IMS_FHIR_CONFIG": str(tmp_path / "absent-default.toml"), **case.env}
    if "--config" not in args:
        # Never the developer's own config file; an explicit empty one.
        (tmp_path / "absent-default.toml").write_text("", encoding="utf-8")
    with respx.mock(assert_all_called=False) as router:
        for path, answer in (case.server or {}).items():
            route = router.route(url__regex=rf"^{BASE}/{path}")
            if isinstance(answer, Exception):
                route.side_effect = answer
            elif callable(answer):
                route.side_effect = answer
            else:
                route.return_value = answer
        router.route().respond(599)  # anything else: never reaches the network
        return CliRunner().invoke(cli, args, env=env)


@pytest.mark.parametrize("case", _cases())
def test_no_traceback_one_line_and_the_right_exit_code(case: Case, tmp_path: Path) -> None:
    result = _invoke(case, tmp_path)
    output = result.stdout + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}\n{output}"
    )
    assert "Traceback" not in output, output
    assert result.exit_code in case.exit_codes, output
    if result.exit_code == 2 and not result.stderr.startswith("Usage:"):
        errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
        assert len(errors) == 1, result.stderr
        for name in case.names:
            assert name in errors[0], errors[0]


def test_the_matrix_covers_every_command_that_talks_to_a_server() -> None:
    commands = {args[0] for args in SERVER_COMMANDS.values()}
    assert commands == {"push", "pull", "check", "validate"}


def test_a_server_that_is_down_is_one_line(tmp_path: Path) -> None:
    # A port nothing listens on (connections refused), retried like any connect error.
    result = CliRunner().invoke(cli, ["check", "--server", "http://127.0.0.1:9/r4"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "cannot connect" in errors[0], result.stderr
    assert "--server" in errors[0]


def test_validate_ignores_the_push_server_of_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'server = "{BASE}"\ntoken = "t"\n', encoding="utf-8")
    with respx.mock(assert_all_mocked=True) as router:
        result = CliRunner().invoke(cli, ["--config", str(config), "validate", RECORD])
        assert not router.calls
    assert result.exit_code == 0, result.output
    assert "1 valid, 0 invalid" in result.stdout


def test_validate_server_of_the_config_file_sends_the_credentials(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'validate_server = "{BASE}"\ntoken = "s3cret"\n', encoding="utf-8")
    with respx.mock(assert_all_mocked=True) as router:
        route = router.post(url__regex=rf"^{BASE}/\w+/\$validate").respond(
            json={"resourceType": "OperationOutcome", "issue": []}
        )
        result = CliRunner().invoke(cli, ["--config", str(config), "validate", RECORD])
    assert result.exit_code == 0, result.output
    assert route.calls and all(
        c.request.headers["Authorization"] == "Bearer s3cret" for c in route.calls
    )
    assert "s3cret" not in result.output


def test_profiles_not_installed_is_one_line_naming_the_package(tmp_path: Path) -> None:
    case = Case(list(SERVER_COMMANDS["validate-server"]), server=SERVERS["profiles-not-installed"])
    result = _invoke(case, tmp_path)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "ims-fhir package" in result.stderr


def test_check_says_the_profiles_are_missing(tmp_path: Path) -> None:
    case = Case(["check", "--server", BASE], server=SERVERS["profiles-not-installed"])
    result = _invoke(case, tmp_path)
    assert "MISSING ims-fhir profiles for $validate" in result.stdout
    assert "ims-fhir package" in result.stdout
    assert "can take IMS encounters" not in result.stdout
    assert result.exit_code == 1


def test_json_reports_use_snake_case_keys_only(root: Path, tmp_path: Path) -> None:
    def keys(value: object) -> set[str]:
        if isinstance(value, dict):
            return set(value) | {k for v in value.values() for k in keys(v)}
        if isinstance(value, list):
            return {k for v in value for k in keys(v)}
        return set()

    push = CliRunner().invoke(
        cli,
        [
            "push",
            str(root / "fixtures" / "encounters"),
            BAD_RECORD,
            "--server",
            BASE,
            "--state",
            str(tmp_path / "s"),
            "--dry-run",
            "--json",
        ],
    )
    validate = CliRunner().invoke(cli, ["validate", "--json", BAD_RECORD, RECORD])
    for result in (push, validate):
        report = json.loads(result.stdout)
        assert all(k.replace("_", "").isalpha() and k.islower() for k in keys(report)), keys(report)
    assert json.loads(push.stdout)["results"][0]["record_id"]
    assert json.loads(validate.stdout)["errors"][0]["record_id"] == "bad-nrs-above-10"


def test_dry_run_says_would_write(root: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        ["push", RECORD, "--server", BASE, "--state", str(tmp_path / "s"), "--dry-run"],
    )
    assert result.exit_code == 0, result.output
    assert "would write" in result.stdout and "resources written" not in result.stdout
    assert "0 created" not in result.stdout


P = "https://ims-fhir.org/fhir/StructureDefinition/ims-patient"


@pytest.mark.parametrize(
    ("diagnostics", "unknown"),
    [
        pytest.param(
            f"Profile reference '{P}' has not been checked because it is unknown", True, id="hapi"
        ),
        pytest.param(f"Unable to locate profile {P}", True, id="hl7-validator"),
        pytest.param(f"Unable to resolve reference to profile '{P}'", True, id="firely"),
        pytest.param(
            f"Unknown code 'x' in the CodeSystem 'https://ims-fhir.org/cs' (from {P})",
            False,
            id="unknown-code-found-by-the-profile",
        ),
        pytest.param(
            "Profile reference 'https://other.example/sd' has not been checked because it is "
            "unknown",
            False,
            id="another-profile",
        ),
        pytest.param("", False, id="no-diagnostics"),
    ],
)
def test_an_unknown_profile_is_told_from_other_issues(diagnostics: str, unknown: bool) -> None:
    from ims_fhir.cli.commands import unknown_profile

    outcome = {"issue": [{"severity": "error", "diagnostics": diagnostics}]}
    assert unknown_profile(outcome, P) is unknown
