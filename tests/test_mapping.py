from __future__ import annotations

import copy
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ims_fhir import Encounter, from_fhir, to_fhir, to_fhir_json, to_transaction

from .conftest import ENCOUNTER_FILES, FIXTURES
from .strategies import encounters

GOLDEN = FIXTURES / "fhir"
GOLDEN_NAMES = [
    "01-lumbar-l5-initial",
    "05-cervical-c5-c6-initial",
    "09-thoracic-t5-initial",
    "14-lumbosacral-estim",
    "17-lumbosacral-retracted",
    "11-thoracic-assessment-consent-refused",
]


def _record(path: Path) -> Encounter:
    return Encounter.model_validate_json(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", ENCOUNTER_FILES, ids=lambda p: p.stem)
def test_every_fixture_round_trips(path: Path) -> None:
    record = _record(path)
    report = from_fhir(to_fhir(record))
    assert report.errors == []
    assert report.skipped == []
    assert report.records == [record]


@pytest.mark.parametrize("path", ENCOUNTER_FILES, ids=lambda p: p.stem)
def test_mapping_twice_gives_the_same_bytes(path: Path) -> None:
    record = _record(path)
    assert to_fhir_json(record) == to_fhir_json(_record(path))


@pytest.mark.parametrize("path", ENCOUNTER_FILES, ids=lambda p: p.stem)
def test_every_resource_validates_as_its_r4b_model(path: Path) -> None:
    bundle = json.loads(to_fhir_json(_record(path)))
    assert bundle["type"] == "transaction"
    for entry in bundle["entry"]:
        resource = entry["resource"]
        model = get_fhir_model_class(resource["resourceType"])
        model.model_validate(resource)
        assert resource["meta"]["profile"][0].startswith("https://ims-fhir.org/fhir/")
        assert resource["text"]["status"] == "generated"
        if resource["resourceType"] != "Provenance":
            assert entry["request"]["method"] in {"PUT", "POST"}
            assert "identifier=" in (entry["request"].get("ifNoneExist") or entry["request"]["url"])


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_golden_files(name: str) -> None:
    produced = json.dumps(
        json.loads(to_fhir_json(_record(FIXTURES / "encounters" / f"{name}.json"))),
        indent=2,
        ensure_ascii=False,
    )
    golden = GOLDEN / f"{name}.bundle.json"
    if os.environ.get("IMS_FHIR_UPDATE_GOLDEN"):
        golden.write_text(produced + "\n", encoding="utf-8")
    assert golden.read_text(encoding="utf-8") == produced + "\n"


def _as_server_returns(bundle: dict[str, Any], seed: int, absolute: bool) -> dict[str, Any]:
    """Do to a transaction what a FHIR server does, then return it as a searchset."""
    rng = random.Random(seed)
    bundle = copy.deepcopy(bundle)
    base = "https://fhir.example.org/r4"
    new_ids: dict[str, str] = {}
    for n, entry in enumerate(bundle["entry"]):
        resource = entry["resource"]
        resource["id"] = resource.get("id") or str(1000 + n)
        new_ids[entry["fullUrl"]] = f"{resource['resourceType']}/{resource['id']}"
        resource["meta"] |= {"versionId": "3", "lastUpdated": "2026-11-26T02:00:00.000+00:00"}
        resource["meta"]["tag"] = [{"system": "https://example.org/tags", "code": "imported"}]
        resource["text"] = {
            "status": "generated",
            "div": '<div xmlns="http://www.w3.org/1999/xhtml">rewritten by server</div>',
        }

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "reference" and value in new_ids:
                    value = f"{base}/{new_ids[value]}" if absolute else new_ids[value]
                out[key] = rewrite(value)
            if "coding" in out and isinstance(out["coding"], list):
                out["coding"].append(
                    {"system": "http://example.org/terminology-service", "code": "extra"}
                )
            return out
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        return node

    entries = [
        {
            "fullUrl": f"{base}/{new_ids[e['fullUrl']]}",
            "resource": rewrite(e["resource"]),
            "search": {"mode": "match"},
        }
        for e in bundle["entry"]
    ]
    rng.shuffle(entries)
    return {"resourceType": "Bundle", "type": "searchset", "entry": entries}


@pytest.mark.parametrize("absolute", [False, True], ids=["relative-refs", "absolute-refs"])
@pytest.mark.parametrize("path", ENCOUNTER_FILES, ids=lambda p: p.stem)
def test_round_trip_survives_what_servers_do(path: Path, absolute: bool) -> None:
    record = _record(path)
    served = _as_server_returns(
        json.loads(to_fhir_json(record)), seed=len(path.name), absolute=absolute
    )
    report = from_fhir(served)
    assert report.errors == []
    assert report.records == [record]


def test_a_plain_list_of_fetched_resources_round_trips() -> None:
    record = _record(ENCOUNTER_FILES[0])
    served = _as_server_returns(json.loads(to_fhir_json(record)), seed=3, absolute=False)
    resources = [entry["resource"] for entry in served["entry"]]
    assert from_fhir(resources).records == [record]


def test_many_encounters_in_one_transaction_round_trip() -> None:
    records = [_record(p) for p in ENCOUNTER_FILES]
    bundle = to_transaction(records)
    urls = [e.fullUrl for e in bundle.entry or []]
    assert len(urls) == len(set(urls)), "shared resources are listed once"
    report = from_fhir(bundle)
    assert report.errors == []
    assert sorted(report.records, key=lambda r: r.id) == sorted(records, key=lambda r: r.id)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=encounters())
def test_generated_records_round_trip(record: Encounter) -> None:
    report = from_fhir(to_fhir(record))
    assert report.errors == []
    assert report.records == [record]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=encounters())
def test_generated_records_round_trip_through_a_server(record: Encounter) -> None:
    served = _as_server_returns(json.loads(to_fhir_json(record)), seed=7, absolute=True)
    assert from_fhir(served).records == [record]


def test_retracted_record_is_entered_in_error_everywhere() -> None:
    record = _record(FIXTURES / "encounters" / "17-lumbosacral-retracted.json")
    for entry in json.loads(to_fhir_json(record))["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] in {"Encounter", "Observation", "Procedure", "Consent"}:
            assert resource["status"] == "entered-in-error", resource["resourceType"]


def test_a_part_removed_before_a_retraction_is_not_part_of_the_retracted_record() -> None:
    """On the server, a finding removed earlier is entered in error like everything of a record
    retracted later: the Provenance, which names what the record holds, tells them apart."""
    record = _record(FIXTURES / "encounters" / "01-lumbar-l5-initial.json")
    assert record.assessment is not None and len(record.assessment.findings) > 1
    kept = record.assessment.model_copy(update={"findings": record.assessment.findings[:-1]})
    retracted = record.model_copy(update={"assessment": kept, "retracted": True})
    removed_id = record.assessment.findings[-1].id
    removed = next(
        entry
        for entry in json.loads(to_fhir_json(record))["entry"]
        if entry["resource"]
        .get("identifier", [{}])[0]
        .get("value", "")
        .endswith(f"/finding/{removed_id}")
    )
    removed["resource"]["status"] = "entered-in-error"
    bundle = json.loads(to_fhir_json(retracted))
    bundle["entry"].append(removed)
    report = from_fhir(bundle)
    assert not report.errors, report.errors
    assert report.records == [retracted]


@pytest.mark.parametrize("kind", ["health-card", "other"])
def test_a_registered_health_number_system_is_typed_jhn_whatever_the_kind(kind: str) -> None:
    record = _record(ENCOUNTER_FILES[0])
    system = "https://fhir.infoway-inforoute.ca/NamingSystem/ca-bc-patient-healthcare-id"
    patient = record.patient.model_dump() | {
        "identifiers": [{"system": system, "value": "9123456789", "kind": kind}]
    }
    record = Encounter.model_validate(record.model_dump() | {"patient": patient})
    assert record.patient.identifiers[0].kind == "health-card"  # what the type will read back as
    bundle = json.loads(to_fhir_json(record))
    (patient_resource,) = [
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"
    ]
    (ident,) = [i for i in patient_resource["identifier"] if i["system"] == system]
    assert [(c["system"], c["code"]) for c in ident["type"]["coding"]] == [
        ("http://terminology.hl7.org/CodeSystem/v2-0203", "JHN")
    ]
    assert from_fhir(bundle).records == [record]


def test_an_other_identifier_in_an_unknown_system_stays_untyped() -> None:
    record = _record(ENCOUNTER_FILES[0])
    system = "https://fhir.example.ca/sid/ab-phn"  # not registered: a stand-in
    patient = record.patient.model_dump() | {
        "identifiers": [{"system": system, "value": "1", "kind": "other"}]
    }
    record = Encounter.model_validate(record.model_dump() | {"patient": patient})
    assert record.patient.identifiers[0].kind == "other"
    bundle = json.loads(to_fhir_json(record))
    idents = [
        i
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Patient"
        for i in e["resource"]["identifier"]
        if i["system"] == system
    ]
    assert idents and "type" not in idents[0]
    assert from_fhir(bundle).records == [record]


def test_when_the_record_was_made_is_the_provenance_recorded_time() -> None:
    import datetime as dt

    from pydantic import ValidationError

    path = FIXTURES / "encounters" / "05-cervical-c5-c6-initial.json"
    record = Encounter.model_validate_json(path.read_text(encoding="utf-8"))
    assert record.recorded is not None and record.recorded > record.end
    bundle = json.loads(to_fhir_json(record))
    (provenance,) = [
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Provenance"
    ]
    assert provenance["recorded"] == "2026-03-02T17:25:00-05:00"
    assert provenance["occurredPeriod"]["end"] == "2026-03-02T15:00:00-05:00"
    assert from_fhir(bundle).records == [record]
    # Not given: the encounter's end stands for it, and reads back as not given.
    data = json.loads(path.read_text(encoding="utf-8"))
    data["recorded"] = "2026-03-02T20:00:00Z"  # the end, in another offset
    assert Encounter.model_validate(data).recorded is None
    data["recorded"] = (record.start - dt.timedelta(seconds=1)).isoformat()
    with pytest.raises(ValidationError, match="before the encounter starts"):
        Encounter.model_validate(data)


@settings(max_examples=300, deadline=None)
@given(system=st.text(), value=st.text())
def test_full_urls_are_uuid5_of_the_identifier(system: str, value: str) -> None:
    import uuid

    from ims_fhir.mapping.identity import full_url, identifier_token, search_escape

    name = f"{system}|{value}"
    try:
        expected = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, name)}"
    except UnicodeEncodeError:  # a lone surrogate: no UUID either way
        with pytest.raises(UnicodeEncodeError):
            full_url(system, value)
        return
    assert full_url(system, value) == expected
    from urllib.parse import quote

    token = f"{quote(search_escape(system), safe=':/')}|{quote(search_escape(value), safe='')}"
    assert identifier_token(system, value) == token
