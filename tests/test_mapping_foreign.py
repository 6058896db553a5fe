"""The reverse mapping on data it did not make: skipped and reported, never a crash."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ims_fhir import Encounter, MappingError, from_fhir, to_fhir_json

from .conftest import FIXTURES

LUMBAR = FIXTURES / "encounters" / "01-lumbar-l5-initial.json"


def _bundle(name: str = "01-lumbar-l5-initial") -> tuple[Encounter, dict[str, Any]]:
    path = FIXTURES / "encounters" / f"{name}.json"
    record = Encounter.model_validate_json(path.read_text(encoding="utf-8"))
    return record, json.loads(to_fhir_json(record))


def _find(bundle: dict[str, Any], predicate: Any) -> dict[str, Any]:
    return next(e["resource"] for e in bundle["entry"] if predicate(e["resource"]))


def _identifier(resource: dict[str, Any]) -> str:
    return str(resource["identifier"][0]["value"])


def test_foreign_resources_are_skipped_and_reported() -> None:
    record, bundle = _bundle()
    bundle["entry"].append(
        {
            "fullUrl": "urn:uuid:00000000-0000-0000-0000-000000000001",
            "resource": {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "valueQuantity": {"value": 72, "unit": "/min"},
            },
        }
    )
    bundle["entry"].append(
        {"resource": {"resourceType": "Encounter", "id": "foreign", "status": "finished"}}
    )
    report = from_fhir(bundle)
    assert report.records == [record]
    assert [s.reason for s in report.skipped] == [
        "not made by ims-fhir (no ims-fhir identifier)",
        "not made by ims-fhir (no ims-fhir identifier)",
    ]
    assert report.skipped[1].resource == "Encounter/foreign"


@pytest.mark.parametrize(
    ("mutate", "resource_type", "path", "reason"),
    [
        pytest.param(
            lambda b: _find(b, lambda r: _identifier(r).endswith("/finding/f1"))["code"].update(
                coding=[{"system": "http://snomed.info/sct", "code": "22253000"}]
            ),
            "Observation",
            "Observation.code",
            "no coding of a known sign",
            id="unknown-sign-code",
        ),
        pytest.param(
            lambda b: b["entry"].remove(
                next(e for e in b["entry"] if _identifier(e["resource"]).endswith("/finding/f3"))
            ),
            "Provenance",
            "Provenance.target[6]",
            "names a resource not in the input",
            id="missing-member",
        ),
        pytest.param(
            lambda b: _find(b, lambda r: _identifier(r).endswith("/site/s1")).pop("bodySite"),
            "Procedure",
            "Procedure.bodySite",
            "missing (the record's treatment.sites[].muscle)",
            id="site-without-muscle",
        ),
        pytest.param(
            lambda b: _find(b, lambda r: _identifier(r).endswith("/finding/f2")).pop(
                "valueBoolean"
            ),
            "Observation",
            "Observation.valueBoolean",
            "missing (the record's assessment.findings[].present)",
            id="finding-without-value",
        ),
        pytest.param(
            lambda b: _find(b, lambda r: _identifier(r).endswith("/pain/p1"))[
                "valueQuantity"
            ].update(value=11),
            "Encounter",
            "pain.0.nrs",
            "less than or equal to 10",
            id="nrs-out-of-range",
        ),
        pytest.param(
            lambda b: _find(b, lambda r: r["resourceType"] == "Encounter").pop("period"),
            "Encounter",
            "Encounter.period",
            "missing",
            id="encounter-without-period",
        ),
    ],
)
def test_unmappable_resources_give_a_mapping_error(
    mutate: Any, resource_type: str, path: str, reason: str
) -> None:
    _, bundle = _bundle()
    mutate(bundle)
    report = from_fhir(bundle)
    assert report.records == []
    (error,) = report.errors
    assert isinstance(error, MappingError)
    assert error.resource.startswith(f"{resource_type}/")
    assert error.path == path
    assert reason in error.reason


def test_one_broken_encounter_does_not_stop_the_others() -> None:
    good, good_bundle = _bundle("05-cervical-c5-c6-initial")
    _, bad_bundle = _bundle()
    _find(bad_bundle, lambda r: r["resourceType"] == "Encounter")["type"] = []
    merged = {"resourceType": "Bundle", "type": "collection"}
    merged["entry"] = bad_bundle["entry"] + good_bundle["entry"]
    report = from_fhir(merged)
    assert report.records == [good]
    assert [e.path for e in report.errors] == ["Encounter.type"]


def test_r4_unilateral_laterality_codes_are_accepted() -> None:
    record, bundle = _bundle()
    finding = _find(bundle, lambda r: _identifier(r).endswith("/finding/f2"))
    laterality = finding["bodySite"]["extension"][0]["valueCodeableConcept"]
    laterality["coding"] = [{"system": "http://snomed.info/sct", "code": "419161000"}]
    assert from_fhir(bundle).records == [record]


def test_empty_and_unrelated_input() -> None:
    assert from_fhir({"resourceType": "Bundle", "type": "searchset"}).records == []
    report = from_fhir([{"resourceType": "Patient", "id": "x"}])
    assert report.records == [] and report.skipped[0].resource == "Patient/x"
    assert [str(e) for e in from_fhir(42).errors] == [
        "<input>: <input>: not a FHIR resource or Bundle"
    ]
    with pytest.raises(TypeError):
        from_fhir(object())
