"""Syncing to a regional health record (issue 17), against the real HAPI of the tests.

The region holds its patients (by health number) and practitioners (by licence) before any
clinic pushes; several clinics, two of them with the same clinic id, push encounters for some
of the same people. What must hold: no duplicate Patient or Practitioner (counted by
identifier on the server), an ambiguous match fails cleanly with nothing written, a name change
reaches only what ims-fhir created for that clinic, and an older encounter never reverts a
newer name.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ims_fhir import Encounter, FhirClient, StateStore, from_fhir, push, synthetic_encounters

pytestmark = pytest.mark.fhir_servers("h2", "postgres")

JHN = "https://fhir.example.ca/sid/bc-phn"  # a test system: the region's health numbers
LICENCE = "https://fhir.example.ca/sid/cpt-bc"
JHN_TYPE = {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "JHN"}
LN_TYPE = {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "LN"}


class Region:
    """A regional record on the test server: its people registered before any clinic pushes."""

    def __init__(self, client: FhirClient) -> None:
        self.client = client
        self.tag = uuid.uuid4().hex[:8]  # numbers unique to this test (the server is shared)

    def number(self, n: int) -> str:
        return f"9{self.tag}{n:03d}"

    def register_patient(self, n: int, family: str, given: str) -> str:
        created = self.client.create(
            {
                "resourceType": "Patient",
                "identifier": [
                    {"type": {"coding": [JHN_TYPE]}, "system": JHN, "value": self.number(n)}
                ],
                "name": [{"family": family, "given": [given]}],
                "gender": "female",
                "birthDate": "1970-03-04",
            }
        )
        return str(created.id)

    def register_practitioner(self, n: int) -> str:
        created = self.client.create(
            {
                "resourceType": "Practitioner",
                "identifier": [
                    {"type": {"coding": [LN_TYPE]}, "system": LICENCE, "value": self.number(n)}
                ],
                "name": [{"family": "Registered", "given": ["Rita"]}],
            }
        )
        return str(created.id)

    def holding(self, resource_type: str, system: str, value: str) -> list[dict[str, Any]]:
        return list(
            self.client.search(
                resource_type, {"identifier": f"{system}|{value}", "_count": "50"}, raw=True
            )
        )


@pytest.fixture
def region(fhir_base_url: str) -> Iterator[Region]:
    with FhirClient(fhir_base_url) as client:
        yield Region(client)


def encounter(
    region: Region,
    namespace: str,
    n: int,
    *,
    patient: int,
    family: str = "Moana",
    given: str = "Aroha",
    licence: int | None = None,
    day: int = 0,
) -> Encounter:
    """An encounter of the clinic at ``namespace`` for the region's patient number ``patient``."""
    (base,) = synthetic_encounters(1, seed=61)
    start = dt.datetime(2026, 3, 2, 9, tzinfo=dt.UTC) + dt.timedelta(days=day)
    practitioner: dict[str, Any] = {"id": "pr-1", "name": {"family": "Physio", "given": ["Pat"]}}
    if licence is not None:
        practitioner["licence"] = {
            "system": LICENCE,
            "value": region.number(licence),
            "kind": "licence",
        }
    data = base.model_dump(mode="json") | {
        "id": f"enc-{n}",
        "clinic": {"id": "clinic-0", "name": "Clinic zero", "namespace": namespace},
        "patient": {
            "id": f"pt-{patient}",  # clinic-local, the same number in both clinics
            "identifiers": [
                {"system": JHN, "value": region.number(patient), "kind": "health-card"}
            ],
            "name": {"family": family, "given": [given]},
            "birth_date": "1970-03-04",
            "sex": "female",
        },
        "practitioner": practitioner,
        "start": start.isoformat(),
        "end": (start + dt.timedelta(minutes=30)).isoformat(),
        "retracted": False,
    }
    record = Encounter.model_validate(data)
    if record.treatment is not None and record.treatment.consent is not None:
        consent = record.treatment.consent.model_copy(update={"at": record.start})
        record = record.model_copy(
            update={"treatment": record.treatment.model_copy(update={"consent": consent})}
        )
    return record


def clinic() -> str:
    return f"https://clinic-{uuid.uuid4().hex[:10]}.example/sid"


def names(resources: list[dict[str, Any]]) -> list[str]:
    return [r["name"][0]["family"] for r in resources]


def test_two_clinics_with_one_clinic_id_share_the_regions_people_without_duplicates(
    fhir_base_url: str, region: Region, tmp_path: Path
) -> None:
    registered = region.register_patient(1, "Moana", "Aroha")
    region.register_practitioner(50)
    one, two = clinic(), clinic()
    first = [
        encounter(region, one, 1, patient=1, licence=50),  # the region's patient
        encounter(region, one, 2, patient=2, licence=50),  # a patient new to the region
    ]
    second = [
        encounter(region, two, 1, patient=1, licence=50),  # the same ids as clinic one's
        encounter(region, two, 2, patient=2, licence=50),
    ]
    with StateStore(tmp_path / "one.sqlite3") as state:
        results = push(first, fhir_base_url, state)
    assert [r.action for r in results] == ["created", "created"], results
    with StateStore(tmp_path / "two.sqlite3") as state:
        results = push(second, fhir_base_url, state)
    assert [r.action for r in results] == ["created", "created"], results

    # One Patient per health number, one Practitioner per licence: nothing duplicated.
    held = region.holding("Patient", JHN, region.number(1))
    assert [p["id"] for p in held] == [registered]
    assert len(region.holding("Patient", JHN, region.number(2))) == 1
    assert len(region.holding("Practitioner", LICENCE, region.number(50))) == 1
    # The region's patient is left as the region wrote it: no clinic identifier added.
    assert [i["system"] for i in held[0]["identifier"]] == [JHN]
    # Each clinic's encounters are its own, and refer to the one patient.
    for namespace in (one, two):
        (found,) = region.holding("Encounter", f"{namespace}/encounter", "enc-1")
        assert found["subject"]["reference"] == f"Patient/{registered}"
        assert found["subject"]["identifier"]["system"] == f"{namespace}/patient"


def test_an_encounter_for_the_region_patient_pulls_back_as_the_clinic_knows_it(
    fhir_base_url: str, region: Region, tmp_path: Path
) -> None:
    registered = region.register_patient(1, "Moana", "Aroha")
    namespace = clinic()
    record = encounter(region, namespace, 1, patient=1)
    with StateStore(tmp_path / "state.sqlite3") as state:
        (result,) = push([record], fhir_base_url, state)
    assert result.action == "created", result
    (held,) = region.holding("Encounter", f"{namespace}/encounter", "enc-1")
    resources = [held]
    for resource_type, param in [
        ("Observation", "encounter"),
        ("Procedure", "encounter"),
        ("Condition", "encounter"),
        ("Provenance", "target"),
    ]:
        resources += region.client.search(
            resource_type, {param: f"Encounter/{held['id']}"}, raw=True
        )
    resources.append(region.client.read("Patient", registered).model_dump(mode="json"))
    for reference in (held["participant"][0]["individual"], held["serviceProvider"]):
        resource_type, resource_id = reference["reference"].split("/")[-2:]
        resources.append(region.client.read(resource_type, resource_id).model_dump(mode="json"))
    consents = [
        e["valueReference"]["reference"]
        for r in resources
        if r["resourceType"] == "Procedure"
        for e in r.get("extension", [])
        if e["url"].endswith("session-consent")
    ]
    for reference in consents:
        resources.append(
            region.client.read("Consent", reference.split("/")[-1]).model_dump(mode="json")
        )
    report = from_fhir(resources)
    assert not report.errors, report.errors
    (back,) = report.records
    # The patient as the clinic knows it (its number, from the encounter's reference), with
    # what the region holds of them: equal to the record pushed.
    assert back == record


def test_an_ambiguous_patient_fails_and_nothing_is_written(
    fhir_base_url: str, region: Region, tmp_path: Path
) -> None:
    region.register_patient(7, "Twin", "A")
    region.register_patient(7, "Twin", "B")  # the region holds the number twice
    namespace = clinic()
    records = [
        encounter(region, namespace, 1, patient=7),
        encounter(region, namespace, 2, patient=8),
    ]
    with StateStore(tmp_path / "state.sqlite3") as state:
        results = push(records, fhir_base_url, state)
    failed, created = results
    assert failed.action == "failed", failed
    assert "ambiguous patient" in (failed.message or "")
    assert created.action == "created", created  # the others go on
    assert region.holding("Encounter", f"{namespace}/encounter", "enc-1") == []
    assert len(region.holding("Patient", JHN, region.number(7))) == 2  # none added


def test_without_creating_patients_an_unknown_patient_fails_the_encounter(
    fhir_base_url: str, region: Region, tmp_path: Path
) -> None:
    region.register_patient(1, "Moana", "Aroha")
    namespace = clinic()
    records = [
        encounter(region, namespace, 1, patient=1),
        encounter(region, namespace, 2, patient=2),
    ]
    with StateStore(tmp_path / "state.sqlite3") as state:
        known, unknown = push(records, fhir_base_url, state, create_patients=False)
    assert known.action == "created", known
    assert unknown.action == "failed", unknown
    assert "no Patient on the server matches" in (unknown.message or "")
    assert region.holding("Patient", JHN, region.number(2)) == []
    assert region.holding("Encounter", f"{namespace}/encounter", "enc-2") == []


def test_names_follow_the_clinic_only_where_ims_fhir_created_the_patient(
    fhir_base_url: str, region: Region, tmp_path: Path
) -> None:
    region.register_patient(1, "Moana", "Aroha")
    one, two = clinic(), clinic()
    state_one = StateStore(tmp_path / "one.sqlite3")
    state_two = StateStore(tmp_path / "two.sqlite3")
    with state_one, state_two:
        # Clinic one creates patient 2 (new to the region), then corrects its name.
        push([encounter(region, one, 1, patient=2, family="Smyth")], fhir_base_url, state_one)
        (result,) = push(
            [encounter(region, one, 2, patient=2, family="Smith", day=7)], fhir_base_url, state_one
        )
        assert result.action == "created", result
        assert names(region.holding("Patient", JHN, region.number(2))) == ["Smith"]

        # Clinic two knows patient 2 by another name: reported, not written (not its own).
        (result,) = push(
            [encounter(region, two, 1, patient=2, family="Smithers", day=14)],
            fhir_base_url,
            state_two,
        )
        assert result.action == "created", result
        assert any("differs from the clinic's record in name" in n for n in result.notes)
        assert names(region.holding("Patient", JHN, region.number(2))) == ["Smith"]

        # The region's own patient is never renamed by a clinic.
        (result,) = push(
            [encounter(region, one, 3, patient=1, family="Renamed", day=21)],
            fhir_base_url,
            state_one,
        )
        assert result.action == "created", result
        assert result.notes, result
        assert names(region.holding("Patient", JHN, region.number(1))) == ["Moana"]


def test_an_older_encounter_never_reverts_a_newer_name(
    fhir_base_url: str, region: Region, tmp_path: Path
) -> None:
    namespace = clinic()
    old = encounter(region, namespace, 1, patient=3, family="Before")
    new = encounter(region, namespace, 2, patient=3, family="After", day=7)
    with StateStore(tmp_path / "state.sqlite3") as state:
        push([old], fhir_base_url, state)
        push([new], fhir_base_url, state)
        assert names(region.holding("Patient", JHN, region.number(3))) == ["After"]
        # The older encounter changes (a pain score corrected) and is pushed again: its
        # clinical content goes, its older name does not.
        pain = [p.model_copy(update={"nrs": (p.nrs + 1) % 11}) for p in old.pain]
        (result,) = push([old.model_copy(update={"pain": pain})], fhir_base_url, state)
        assert result.action == "updated", result
        assert names(region.holding("Patient", JHN, region.number(3))) == ["After"]
    # Another machine of the clinic, with no state, pushes the older encounter: the same.
    with StateStore(tmp_path / "other.sqlite3") as state:
        (result,) = push([old], fhir_base_url, state)
        assert result.action in {"created", "updated"}, result
    (held,) = region.holding("Patient", JHN, region.number(3))
    assert names([held]) == ["After"]
    assert held["meta"]["versionId"] == "2"  # created, renamed once, never written again


def test_a_duplicate_made_on_the_server_later_is_never_written_to_or_added_to(
    fhir_base_url: str, region: Region, tmp_path: Path
) -> None:
    """The state knows the practitioner; then the region registers the licence once more.

    Either outcome is safe, and which one depends on the server: the encounter fails as
    ambiguous (a server that searches the conditional create's match URL again answers 412 for
    two matches) or it refers to the practitioner ims-fhir created (HAPI remembers the match URL
    of a conditional create that created a resource, for a while, and answers with that one).
    Never a third practitioner, never the region's newcomer, never a server error.
    """
    namespace = clinic()
    with StateStore(tmp_path / "state.sqlite3") as state:
        (first,) = push(
            [encounter(region, namespace, 1, patient=1, licence=60)], fhir_base_url, state
        )
        assert first.action == "created", first
        (ours,) = region.holding("Practitioner", LICENCE, region.number(60))
        newcomer = region.register_practitioner(60)  # now two carry the licence
        (second,) = push(
            [encounter(region, namespace, 2, patient=1, licence=60, day=7)], fhir_base_url, state
        )
    assert len(region.holding("Practitioner", LICENCE, region.number(60))) == 2
    written = region.holding("Encounter", f"{namespace}/encounter", "enc-2")
    if second.action == "failed":
        assert "ambiguous practitioner" in (second.message or ""), second.message
        assert written == []
    else:
        assert second.action == "created", second
        (held,) = written
        individual = held["participant"][0]["individual"]["reference"]
        assert individual == f"Practitioner/{ours['id']}" != f"Practitioner/{newcomer}"


def test_the_clinic_is_found_by_its_registered_identifier(
    fhir_base_url: str, region: Region, tmp_path: Path
) -> None:
    facility = "https://fhir.example.ca/sid/facility"
    registered = region.client.create(
        {
            "resourceType": "Organization",
            "identifier": [{"system": facility, "value": region.number(90)}],
            "name": "Clinic zero",
        }
    )
    namespace = clinic()
    record = encounter(region, namespace, 1, patient=1)
    data = record.model_dump(mode="json")
    data["clinic"]["identifiers"] = [{"system": facility, "value": region.number(90)}]
    record = Encounter.model_validate(data)
    with StateStore(tmp_path / "state.sqlite3") as state:
        (result,) = push([record], fhir_base_url, state)
    assert result.action == "created", result
    assert [o["id"] for o in region.holding("Organization", facility, region.number(90))] == [
        str(registered.id)
    ]
    (held,) = region.holding("Encounter", f"{namespace}/encounter", "enc-1")
    assert held["serviceProvider"]["reference"] == f"Organization/{registered.id}"
