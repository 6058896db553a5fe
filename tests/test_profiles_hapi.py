"""The project's profiles, enforced by HAPI's validator: every fixture passes, broken data fails."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import ims_fhir
from ims_fhir import Encounter, FhirClient, to_fhir_json

from .conftest import ENCOUNTER_FILES, FIXTURES

JSON = dict[str, Any]


@pytest.fixture(scope="module")
def client(fhir_base_url: str) -> Iterator[FhirClient]:
    with FhirClient(fhir_base_url) as c:
        yield c


def resources(path: Any) -> list[JSON]:
    record = Encounter.model_validate_json(path.read_text(encoding="utf-8"))
    return [entry["resource"] for entry in json.loads(to_fhir_json(record))["entry"]]


def errors(outcome: JSON) -> list[JSON]:
    return [i for i in outcome.get("issue", []) if i["severity"] in {"error", "fatal"}]


def test_the_server_installed_the_package(client: FhirClient) -> None:
    found = client.request_json(
        "GET",
        "StructureDefinition",
        params={"url": "https://ims-fhir.org/fhir/StructureDefinition/ims-finding"},
    )
    assert found["total"] == 1


@pytest.mark.parametrize("path", ENCOUNTER_FILES, ids=lambda p: p.stem)
def test_every_resource_of_every_fixture_validates_with_zero_errors(
    client: FhirClient, path: Any
) -> None:
    for resource in resources(path):
        outcome = client.validate(resource, profile=resource["meta"]["profile"][0])
        assert errors(outcome) == [], (resource["resourceType"], errors(outcome))


def _find(items: list[JSON], profile: str) -> JSON:
    return copy.deepcopy(next(r for r in items if r["meta"]["profile"][0].endswith(profile)))


def _drop_laterality(site: JSON) -> JSON:
    site["bodySite"][0].pop("extension")
    return site


def _nrs_11(pain: JSON) -> JSON:
    pain["valueQuantity"]["value"] = 11
    return pain


def _unknown_sign(finding: JSON) -> JSON:
    finding["code"] = {
        "coding": [
            {"system": "https://ims-fhir.org/fhir/CodeSystem/ims-local", "code": "itchiness"}
        ]
    }
    return finding


def _no_muscle(site: JSON) -> JSON:
    site.pop("bodySite")
    return site


def _wrong_system(pain: JSON) -> JSON:
    pain["code"]["coding"][0]["system"] = "http://loinc.example.org"
    return pain


BROKEN: list[Any] = [
    pytest.param(
        "ims-needled-site", _drop_laterality, "Procedure.bodySite", id="laterality-missing"
    ),
    pytest.param("ims-pain-score", _nrs_11, "Observation", id="nrs-11"),
    pytest.param("ims-finding", _unknown_sign, "Observation.code", id="unknown-sign-code"),
    pytest.param("ims-needled-site", _no_muscle, "Procedure.bodySite", id="site-without-muscle"),
    pytest.param("ims-pain-score", _wrong_system, "Observation.code", id="wrong-code-system"),
]


@pytest.mark.parametrize(("profile", "breaker", "element"), BROKEN)
def test_broken_resources_are_rejected_naming_the_element(
    client: FhirClient, profile: str, breaker: Callable[[JSON], JSON], element: str
) -> None:
    resource = breaker(
        _find(resources(FIXTURES / "encounters" / "01-lumbar-l5-initial.json"), profile)
    )
    found = errors(client.validate(resource, profile=resource["meta"]["profile"][0]))
    assert found, f"{profile} broken this way should not validate"
    # The element is named in the issue's expression, or (for a missing element, reported at
    # its parent) in its message.
    where = [f"{i.get('expression') or i.get('location')} {i.get('diagnostics')}" for i in found]
    assert any(element in w for w in where), where
    # And the server itself refuses to store it (request validation against meta.profile).
    resource.pop("id", None)
    resource["identifier"][0]["value"] += "-broken"
    with pytest.raises(ims_fhir.UnprocessableEntityError) as caught:
        client.create(resource)
    assert any(
        element in f"{i.get('expression') or i.get('location')} {i.get('diagnostics')}"
        for i in caught.value.issues
    )


def test_validate_command_reports_server_issues(fhir_base_url: str) -> None:
    from click.testing import CliRunner

    from ims_fhir.cli.commands import cli

    result = CliRunner().invoke(
        cli, ["validate", "--json", "--server", fhir_base_url, str(ENCOUNTER_FILES[0])]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["valid"] == 1
    assert not [i for i in report["server_issues"] if i["severity"] == "error"]
