"""Clinic namespaces: checked wherever they enter, required for a server not on this machine,
example identifier systems named before a remote push, and pull narrowed to one clinic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from click.testing import CliRunner, Result
from hypothesis import given
from hypothesis import strategies as st

from ims_fhir import Clinic, Encounter, to_fhir_json
from ims_fhir.cli.commands import cli
from ims_fhir.mapping.identity import default_namespace, is_example_system
from ims_fhir.record.model import check_namespace
from ims_fhir.sync.pull import OTHER_CLINIC, pull_all

from .conftest import ENCOUNTER_FILES
from .test_mapping import _as_server_returns

REMOTE = "https://fhir.example.org/r4"
LOCAL = "http://127.0.0.1:9/fhir"  # nothing listens: a dry run sends nothing
NO_NAMESPACE = next(
    p
    for p in ENCOUNTER_FILES
    if Encounter.model_validate_json(p.read_text()).clinic.namespace is None
)
OWN_NAMESPACE = next(
    p for p in ENCOUNTER_FILES if Encounter.model_validate_json(p.read_text()).clinic.namespace
)


def _push(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, config: Path | None = None
) -> Result:
    state = str(tmp_path / "state.sqlite3")
    head = ["--config", str(config)] if config else []
    return CliRunner().invoke(cli, [*head, "push", *args, "--state", state], env=env)


# -- a namespace is checked wherever it enters ----------------------------------------------------

BAD = [
    pytest.param("not a url", id="not-a-url"),
    pytest.param("ftp://clinic.example.ca/sid", id="not-http"),
    pytest.param("https:///sid", id="no-host"),
    pytest.param("https://clinic.example.ca/sid?x=1", id="query"),
    pytest.param("https://clinic.example.ca/sid#x", id="fragment"),
    pytest.param("https://clinic.example.ca/sid/", id="trailing-slash"),
    pytest.param("", id="empty"),
]


@pytest.mark.parametrize("value", BAD)
def test_a_bad_namespace_is_refused_by_the_record_model(value: str) -> None:
    with pytest.raises(ValueError):
        Clinic(id="c1", name="Clinic", namespace=value)


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("where", ["flag", "env", "config"])
def test_a_bad_namespace_is_one_line_exit_2_naming_where_it_was_set(
    tmp_path: Path, value: str, where: str
) -> None:
    args: list[str] = ["--server", LOCAL, "--dry-run", str(NO_NAMESPACE)]
    env: dict[str, str] = {}
    config = tmp_path / "config.toml"
    config.write_text("")
    if where == "flag":
        args += ["--namespace", value]
    elif where == "env":
        env["IMS_FHIR_NAMESPACE"] = value
    else:
        config.write_text(f"namespace = {json.dumps(value)}\n")
    result = _push(tmp_path, *args, env=env, config=config)
    if value == "" and where == "env":
        assert result.exit_code == 0  # click reads an empty variable as not set
        return
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    named = {"flag": "from --namespace", "env": "from IMS_FHIR_NAMESPACE", "config": str(config)}
    assert named[where] in line and "--namespace" in line and "Traceback" not in line


@given(st.text(max_size=40))
def test_check_namespace_accepts_only_what_identifier_systems_can_be_built_on(text: str) -> None:
    value = f"https://clinic.example.ca/{text}"
    try:
        check_namespace(value)
    except ValueError:
        return
    parsed = httpx.URL(value + "/patient")
    assert parsed.host == "clinic.example.ca" and parsed.path.endswith("/patient")
    assert not parsed.query and not parsed.fragment


# -- a server not on this machine needs the clinic's own namespace ------------------------------


def test_a_remote_push_without_a_namespace_is_refused_before_anything_is_sent(
    tmp_path: Path,
) -> None:
    with respx.mock(assert_all_mocked=True) as router:
        result = _push(tmp_path, "--server", REMOTE, str(NO_NAMESPACE))
        assert not router.calls
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert "names no identifier namespace" in line and "same clinic id" in line
    assert "--namespace" in line and "--allow-default-namespace" in line


@pytest.mark.parametrize(
    "how",
    [
        pytest.param(["--namespace", "https://clinic.example.ca/fhir/sid"], id="namespace"),
        pytest.param(["--allow-default-namespace"], id="opt-in-flag"),
        pytest.param({"IMS_FHIR_ALLOW_DEFAULT_NAMESPACE": "1"}, id="opt-in-env"),
        pytest.param("allow_default_namespace = true\n", id="opt-in-config"),
    ],
)
def test_a_remote_push_takes_a_namespace_or_the_opt_in(tmp_path: Path, how: Any) -> None:
    config = tmp_path / "config.toml"
    config.write_text(how if isinstance(how, str) else "")
    flags = how if isinstance(how, list) else []
    env = how if isinstance(how, dict) else None
    result = _push(
        tmp_path,
        "--server",
        REMOTE,
        "--dry-run",
        *flags,
        str(NO_NAMESPACE),
        env=env,
        config=config,
    )
    assert result.exit_code == 0, result.output
    assert "1 would-create" in result.output


def test_records_naming_their_own_namespace_need_no_flag(tmp_path: Path) -> None:
    result = _push(tmp_path, "--server", REMOTE, "--dry-run", str(OWN_NAMESPACE))
    assert result.exit_code == 0, result.output


def test_a_loopback_server_needs_nothing_and_warns_of_nothing(tmp_path: Path) -> None:
    fixtures = str(NO_NAMESPACE.parent)
    result = _push(tmp_path, "--server", LOCAL, "--dry-run", fixtures)
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr


def test_example_identifier_systems_are_named_once_before_a_remote_push(tmp_path: Path) -> None:
    fixtures = str(NO_NAMESPACE.parent)
    result = _push(tmp_path, "--server", REMOTE, "--dry-run", "--allow-default-namespace", fixtures)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning")]
    named = [line.split()[3] for line in warnings]
    assert len(named) == len(set(named))  # one line per system
    assert "https://fhir.example.ca/sid/bc-phn" in named
    assert "https://standards.example.nz/sid/nhi" in named
    assert "https://plateau-physio.example.ca/fhir/sid" in named  # a namespace is one too
    assert not any(default_namespace("") in n for n in named)


@pytest.mark.parametrize(
    ("system", "example"),
    [
        pytest.param("https://example.org/sid/phn", True, id="example.org"),
        pytest.param("https://clinic.example/sid", True, id="dot-example"),
        pytest.param("https://fhir.example.ca/sid/bc-phn", True, id="example.ca"),
        pytest.param("https://standards.example.nz/sid/nhi", True, id="example.nz"),
        pytest.param("http://localhost/sid", True, id="localhost"),
        pytest.param("https://clinic.test/sid", True, id="dot-test"),
        pytest.param("https://examples.org/sid", False, id="examples-is-a-real-name"),
        pytest.param(
            "https://fhir.infoway-inforoute.ca/NamingSystem/ca-on-patient-hcn", False, id="infoway"
        ),
        pytest.param("https://standards.digital.health.nz/ns/nhi-id", False, id="nhi"),
        pytest.param("urn:oid:2.16.840.1.113883.4.1", False, id="oid"),
    ],
)
def test_example_domains(system: str, example: bool) -> None:
    assert is_example_system(system) is example


# -- pull narrowed to one clinic -----------------------------------------------------------------


def _served(*paths: Path) -> dict[str, list[dict[str, Any]]]:
    """What a server holds for these fixtures, by resource type (ids unique across them)."""
    by_type: dict[str, list[dict[str, Any]]] = {}
    for n, path in enumerate(paths):
        record = Encounter.model_validate_json(path.read_text())
        bundle = json.loads(to_fhir_json(record))
        for i, entry in enumerate(bundle["entry"]):
            entry["resource"].setdefault("id", f"s{n}-{i}")
        for entry in _as_server_returns(bundle, seed=n, absolute=False)["entry"]:
            by_type.setdefault(entry["resource"]["resourceType"], []).append(entry["resource"])
    return by_type


def _serve(router: respx.MockRouter, by_type: dict[str, list[dict[str, Any]]]) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        resource_type = request.url.path.rsplit("/", 1)[-1]
        found = by_type.get(resource_type, [])
        entries = [{"resource": r} for r in found]
        return httpx.Response(
            200, json={"resourceType": "Bundle", "type": "searchset", "entry": entries}
        )

    router.get(url__startswith=f"{REMOTE}/").mock(side_effect=answer)


TWO_CLINICS = (OWN_NAMESPACE, NO_NAMESPACE)


def test_pull_by_namespace_searches_by_the_identifier_system_and_checks_each_record() -> None:
    own = Encounter.model_validate_json(OWN_NAMESPACE.read_text())
    assert own.clinic.namespace is not None
    with respx.mock(assert_all_called=True) as router:
        _serve(router, _served(*TWO_CLINICS))  # a server that ignores the search: sends both
        report = pull_all(REMOTE, namespace=own.clinic.namespace)
        sent = next(c.request for c in router.calls if c.request.url.path.endswith("/Encounter"))
    assert sent.url.params["identifier"] == f"{own.clinic.namespace}/encounter|"
    assert report.errors == []
    assert report.records == [own]
    (other,) = [s for s in report.skipped if s.reason.startswith(OTHER_CLINIC)]
    assert "namespace https://ims-fhir.org/fhir/sid/" in other.reason


def test_pull_by_clinic_keeps_that_clinics_records_only() -> None:
    plain = Encounter.model_validate_json(NO_NAMESPACE.read_text())
    with respx.mock(assert_all_called=True) as router:
        _serve(router, _served(*TWO_CLINICS))
        report = pull_all(REMOTE, clinic=plain.clinic.id)
        sent = next(c.request for c in router.calls if c.request.url.path.endswith("/Encounter"))
    assert "identifier" not in sent.url.params  # any namespace: nothing to search by
    assert report.records == [plain]
    assert sum(s.reason.startswith(OTHER_CLINIC) for s in report.skipped) == 1


def test_pull_without_a_filter_keeps_every_clinic() -> None:
    with respx.mock(assert_all_called=True) as router:
        _serve(router, _served(*TWO_CLINICS))
        report = pull_all(REMOTE)
    assert len(report.records) == 2
    assert not any(s.reason.startswith(OTHER_CLINIC) for s in report.skipped)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        pytest.param(["--namespace", "not a url"], "--namespace", id="namespace"),
        pytest.param(["--namespace", ""], "--namespace", id="empty-namespace"),
        pytest.param(["--clinic", "no such/clinic"], "--clinic", id="clinic"),
        pytest.param(["--clinic", ""], "--clinic", id="empty-clinic"),
    ],
)
def test_a_pull_filter_that_cannot_be_one_is_refused_before_sending(
    args: list[str], named: str
) -> None:
    with respx.mock(assert_all_mocked=True) as router:
        result = CliRunner().invoke(cli, ["pull", "--server", REMOTE, *args])
        assert not router.calls
    assert result.exit_code == 2, result.output
    assert named in result.stderr and "Traceback" not in result.output


def test_the_cli_pull_by_clinic_writes_that_clinics_records_and_counts_the_rest(
    tmp_path: Path,
) -> None:
    plain = Encounter.model_validate_json(NO_NAMESPACE.read_text())
    out = tmp_path / "records.ndjson"
    with respx.mock() as router:
        _serve(router, _served(*TWO_CLINICS))
        result = CliRunner().invoke(
            cli, ["pull", "--server", REMOTE, "--clinic", plain.clinic.id, "-o", str(out)]
        )
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert [Encounter.model_validate_json(line) for line in lines] == [plain]
    assert "1 encounters of other clinics" in result.stderr


def test_a_configured_namespace_does_not_narrow_a_pull(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('namespace = "https://nobody.example.ca/sid"\n')
    with respx.mock() as router:
        _serve(router, _served(*TWO_CLINICS))
        result = CliRunner().invoke(
            cli, ["--config", str(config), "pull", "--server", REMOTE, "-o", str(tmp_path / "o")]
        )
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "o").read_text().splitlines()) == 2


def _broken(by_type: dict[str, list[dict[str, Any]]], namespace: str) -> str:
    """Break the Encounter of the clinic with ``namespace`` (no period); return its name."""
    (encounter,) = [
        e
        for e in by_type["Encounter"]
        if any(i["system"] == f"{namespace}/encounter" for i in e["identifier"])
    ]
    del encounter["period"]
    return f"Encounter/{encounter['id']}"


def test_a_pull_for_one_clinic_counts_another_clinics_unmappable_encounter_without_showing_it(
    tmp_path: Path,
) -> None:
    own = Encounter.model_validate_json(OWN_NAMESPACE.read_text())
    plain = Encounter.model_validate_json(NO_NAMESPACE.read_text())
    assert own.clinic.namespace is not None
    by_type = _served(*TWO_CLINICS)  # a server that ignores the search: sends both
    other = _broken(by_type, default_namespace(plain.clinic.id))
    with respx.mock() as router:
        _serve(router, by_type)
        report = pull_all(REMOTE, namespace=own.clinic.namespace)
        out = tmp_path / "records.ndjson"
        result = CliRunner().invoke(
            cli,
            ["pull", "--server", REMOTE, "--namespace", own.clinic.namespace, "-o", str(out)],
        )
    assert report.records == [own] and report.errors == []
    (skipped,) = [s for s in report.skipped if s.reason.startswith(OTHER_CLINIC)]
    assert skipped.resource == other and "could not be mapped" in skipped.reason
    assert "period" not in skipped.reason  # what is wrong with it is the other clinic's to see
    # Not this clinic's failure: exit 0, and nothing of the other record on the terminal.
    assert result.exit_code == 0, result.output
    assert "unmappable" not in result.output and "period" not in result.output
    assert "1 encounters of other clinics" in result.stderr
    assert [Encounter.model_validate_json(line) for line in out.read_text().splitlines()] == [own]


def test_a_pull_for_one_clinic_still_fails_on_its_own_unmappable_encounter() -> None:
    own = Encounter.model_validate_json(OWN_NAMESPACE.read_text())
    assert own.clinic.namespace is not None
    by_type = _served(*TWO_CLINICS)
    mine = _broken(by_type, own.clinic.namespace)
    with respx.mock() as router:
        _serve(router, by_type)
        report = pull_all(REMOTE, namespace=own.clinic.namespace)
        result = CliRunner().invoke(
            cli, ["pull", "--server", REMOTE, "--namespace", own.clinic.namespace, "-o", "-"]
        )
    (error,) = report.errors
    assert error.resource == mine and "period" in str(error)
    assert own.clinic.namespace in error.namespaces
    assert result.exit_code == 1 and "period" in result.stderr, result.output


def test_a_pull_by_clinic_id_alone_lists_every_error() -> None:
    """An error names no clinic id (the record was not rebuilt): none is left out unseen."""
    plain = Encounter.model_validate_json(NO_NAMESPACE.read_text())
    own = Encounter.model_validate_json(OWN_NAMESPACE.read_text())
    assert own.clinic.namespace is not None
    by_type = _served(*TWO_CLINICS)
    other = _broken(by_type, own.clinic.namespace)
    with respx.mock() as router:
        _serve(router, by_type)
        report = pull_all(REMOTE, clinic=plain.clinic.id)
    assert report.records == [plain]
    assert [e.resource for e in report.errors] == [other]
