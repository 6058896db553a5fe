"""Attacks on issue 17 (regional records): shared resources found by policy, demographics
ownership, snapshots, Reference.identifier and pull.

Written by an independent attacker of the change; each finding was fixed and its test kept.
Tests against a real server take ``fhir_base_url`` (the tests' HAPI); the others fake a server
with respx.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from ims_fhir import Encounter, FhirClient, StateStore, pull_all, push
from ims_fhir.sync.matching import SYNC_SNAPSHOT_URL

from .test_matching import _candidate, _match_answer, _record, push_to_fake
from .test_matching import _push as _mpi_push
from .test_matching import _Server as _MpiServer
from .test_regional_hapi import JHN, JHN_TYPE, Region, clinic, encounter, names

BASE = "http://127.0.0.1:9/r4"


@pytest.fixture
def region(fhir_base_url: str) -> Any:
    with FhirClient(fhir_base_url) as client:
        yield Region(client)


def _patients(region: Region, n: int) -> list[dict[str, Any]]:
    return region.holding("Patient", JHN, region.number(n))


# -- batches -----------------------------------------------------------------------------------


def test_a_batch_of_two_encounters_of_a_new_patient_leaves_the_newer_name(
    fhir_base_url: str, region: Region, tmp_path: Path
) -> None:
    namespace = clinic()
    old = encounter(region, namespace, 1, patient=1, family="Before")
    new = encounter(region, namespace, 2, patient=1, family="After", day=7)
    with StateStore(tmp_path / "state.sqlite3") as state:
        results = push([old, new], fhir_base_url, state, batch_size=2)
        assert [r.action for r in results] == ["created", "created"], results
        # Pushing again changes nothing: the name stays whatever the batch wrote.
        again = push([old, new], fhir_base_url, state, batch_size=2)
        assert [r.action for r in again] == ["unchanged", "unchanged"]
    assert names(_patients(region, 1)) == ["After"]


def test_a_batch_with_the_newer_encounter_first_leaves_the_newer_name(
    fhir_base_url: str, region: Region, tmp_path: Path
) -> None:
    namespace = clinic()
    old = encounter(region, namespace, 1, patient=1, family="Before")
    new = encounter(region, namespace, 2, patient=1, family="After", day=7)
    with StateStore(tmp_path / "state.sqlite3") as state:
        results = push([new, old], fhir_base_url, state, batch_size=2)
    assert [r.action for r in results] == ["created", "created"], results
    assert names(_patients(region, 1)) == ["After"]


def test_a_batch_renaming_an_owned_patient_writes_the_newer_name(
    fhir_base_url: str, region: Region, tmp_path: Path
) -> None:
    namespace = clinic()
    first = encounter(region, namespace, 1, patient=1, family="First")
    old = encounter(region, namespace, 2, patient=1, family="Before", day=3)
    new = encounter(region, namespace, 3, patient=1, family="After", day=7)
    with StateStore(tmp_path / "state.sqlite3") as state:
        push([first], fhir_base_url, state)
        results = push([new, old], fhir_base_url, state, batch_size=2)
    assert [r.action for r in results] == ["created", "created"], results
    assert names(_patients(region, 1)) == ["After"]


# -- snapshots -----------------------------------------------------------------------------------


def test_a_far_future_snapshot_never_silently_freezes_demographics(
    fhir_base_url: str, region: Region, tmp_path: Path
) -> None:
    namespace = clinic()
    with StateStore(tmp_path / "state.sqlite3") as state:
        push([encounter(region, namespace, 1, patient=1, family="Smyth")], fhir_base_url, state)
        (held,) = _patients(region, 1)
        # Only meta changes: the content (and so its signature and mark) stays ims-fhir's.
        for ext in held["meta"]["extension"]:
            if ext["url"] == SYNC_SNAPSHOT_URL:
                ext["valueDateTime"] = "2099-01-01T00:00:00Z"
        region.client.update(held)
        (result,) = push(
            [encounter(region, namespace, 2, patient=1, family="Smith", day=7)],
            fhir_base_url,
            state,
        )
    assert result.action == "created", result
    renamed = names(_patients(region, 1)) == ["Smith"]
    assert renamed or result.notes, "the correction was dropped without a word"


def test_a_mistyped_future_date_does_not_freeze_the_patient(
    fhir_base_url: str, region: Region, tmp_path: Path
) -> None:
    namespace = clinic()
    typo = encounter(region, namespace, 1, patient=1, family="Smyth", day=365 * 36)
    with StateStore(tmp_path / "state.sqlite3") as state:
        (first,) = push([typo], fhir_base_url, state)
        assert first.action == "created", first
        push([typo.model_copy(update={"retracted": True})], fhir_base_url, state)
        (result,) = push(
            [encounter(region, namespace, 2, patient=1, family="Smith", day=7)],
            fhir_base_url,
            state,
        )
    assert result.action == "created", result
    renamed = names(_patients(region, 1)) == ["Smith"]
    assert renamed or result.notes, "the correction was dropped without a word"


# -- retractions ---------------------------------------------------------------------------------


def test_a_retracted_encounter_does_not_rename_the_patient(
    fhir_base_url: str, region: Region, tmp_path: Path
) -> None:
    namespace = clinic()
    with StateStore(tmp_path / "state.sqlite3") as state:
        push([encounter(region, namespace, 1, patient=1, family="Right")], fhir_base_url, state)
        wrong = encounter(region, namespace, 2, patient=1, family="Wrong", day=7)
        (result,) = push([wrong.model_copy(update={"retracted": True})], fhir_base_url, state)
    assert result.action == "entered-in-error", result
    assert names(_patients(region, 1)) == ["Right"]


# -- strong identifiers changing under an owned resource ----------------------------------------


def test_a_corrected_health_number_never_duplicates_the_regions_patient(
    fhir_base_url: str, region: Region, tmp_path: Path
) -> None:
    namespace = clinic()
    region.register_patient(2, "Moana", "Aroha")  # the region holds the right number
    typo = encounter(region, namespace, 1, patient=1)  # clinic typed number 1 for patient 2
    with StateStore(tmp_path / "state.sqlite3") as state:
        (first,) = push([typo], fhir_base_url, state)
        assert first.action == "created", first
        corrected = encounter(region, namespace, 2, patient=1, day=7)
        identifiers = [{"system": JHN, "value": region.number(2), "kind": "health-card"}]
        fixed = corrected.model_copy(
            update={"patient": corrected.patient.model_copy(update={"identifiers": []})}
        )
        fixed = Encounter.model_validate(
            fixed.model_dump(mode="json")
            | {"patient": fixed.patient.model_dump(mode="json") | {"identifiers": identifiers}}
        )
        (second,) = push([fixed], fhir_base_url, state)
    held = _patients(region, 2)
    assert len(held) == 1, (second, [p["id"] for p in held])


# -- racing clinics ----------------------------------------------------------------------------


def test_two_clinics_racing_on_a_new_patient_never_make_two(
    fhir_base_url: str, region: Region, tmp_path: Path
) -> None:
    namespaces = [clinic() for _ in range(4)]
    rounds = 6

    def one(namespace: str, n: int) -> str:
        record = encounter(region, namespace, n, patient=n)
        with StateStore(tmp_path / f"{namespace.split('//')[1][:17]}-{n}.sqlite3") as state:
            (result,) = push([record], fhir_base_url, state)
        return result.action

    duplicated = []
    with concurrent.futures.ThreadPoolExecutor(len(namespaces)) as pool:
        for n in range(rounds):
            actions = list(pool.map(one, namespaces, [n] * len(namespaces)))
            held = _patients(region, n)
            if len(held) != 1:
                duplicated.append((n, len(held), actions))
    assert duplicated == []


# -- identifiers with search's special characters ---------------------------------------------


@pytest.mark.parametrize(
    "suffix",
    [
        "a,b",
        "a\\b",
        "a$b",
    ],
)
def test_a_health_number_with_search_characters_finds_the_regions_patient(
    fhir_base_url: str, region: Region, tmp_path: Path, suffix: str
) -> None:
    value = region.number(1) + suffix
    created = region.client.create(
        {
            "resourceType": "Patient",
            "identifier": [{"type": {"coding": [JHN_TYPE]}, "system": JHN, "value": value}],
            "name": [{"family": "Moana", "given": ["Aroha"]}],
            "gender": "female",
            "birthDate": "1970-03-04",
        }
    )
    namespace = clinic()
    record = encounter(region, namespace, 1, patient=1)
    data = record.model_dump(mode="json")
    data["patient"]["identifiers"] = [{"system": JHN, "value": value, "kind": "health-card"}]
    record = Encounter.model_validate(data)
    with StateStore(tmp_path / "state.sqlite3") as state:
        (result,) = push([record], fhir_base_url, state)
        assert result.action == "created", result
        # Another machine of the clinic, with no state: still the one patient.
        with StateStore(tmp_path / "other.sqlite3") as other:
            push([Encounter.model_validate(data | {"id": "enc-2"})], fhir_base_url, other)
    from ims_fhir.mapping.identity import search_escape

    held = list(
        region.client.search(
            "Patient", {"identifier": f"{JHN}|{search_escape(value)}", "_count": "50"}, raw=True
        )
    )
    # Each found by its whole value (the server's token search, escaped).
    held = [p for p in held if any(i.get("value") == value for i in p.get("identifier", []))]
    assert [p["id"] for p in held] == [str(created.id)]


# -- two health numbers, two patients ----------------------------------------------------------


def test_two_health_numbers_naming_two_patients_fail_as_ambiguous(
    fhir_base_url: str, region: Region, tmp_path: Path
) -> None:
    region.register_patient(1, "One", "A")
    region.register_patient(2, "Two", "B")
    namespace = clinic()
    record = encounter(region, namespace, 1, patient=1)
    data = record.model_dump(mode="json")
    data["patient"]["identifiers"] = [
        {"system": JHN, "value": region.number(1), "kind": "health-card"},
        {"system": JHN + "-2", "value": region.number(2), "kind": "health-card"},
    ]
    # The second number in a second system the region also registered patient 2 under.
    region.client.create(
        {
            "resourceType": "Patient",
            "identifier": [
                {"type": {"coding": [JHN_TYPE]}, "system": JHN + "-2", "value": region.number(2)}
            ],
            "name": [{"family": "Two", "given": ["B"]}],
        }
    )
    with StateStore(tmp_path / "state.sqlite3") as state:
        (result,) = push([Encounter.model_validate(data)], fhir_base_url, state)
    assert result.action == "failed", result
    assert "ambiguous patient" in (result.message or "")
    assert region.holding("Encounter", f"{namespace}/encounter", "enc-1") == []


# -- pull of encounters whose patient the clinic knows under two numbers ------------------------


def test_one_person_twice_in_the_clinics_records_fails_clearly_and_writes_nothing(
    fhir_base_url: str, region: Region, tmp_path: Path
) -> None:
    """pt-7 has pt-1's health number: the server's patient is pt-1, so pt-7's visit stops."""
    namespace = clinic()
    one = encounter(region, namespace, 1, patient=1)
    data = encounter(region, namespace, 2, patient=7, day=7).model_dump(mode="json")
    data["patient"]["identifiers"] = [
        {"system": JHN, "value": region.number(1), "kind": "health-card"}
    ]
    seven = Encounter.model_validate(data)
    with StateStore(tmp_path / "state.sqlite3") as state:
        results = push([one, seven], fhir_base_url, state)
    assert [r.action for r in results] == ["created", "failed"], results
    assert "one person twice" in (results[1].message or "")
    assert len(_patients(region, 1)) == 1
    report = pull_all(fhir_base_url, namespace=namespace)
    assert not report.errors, report.errors
    assert sorted(r.id for r in report.records) == ["enc-1"]


def test_a_tampered_reference_identifier_is_refused_on_pull(
    fhir_base_url: str, region: Region, tmp_path: Path
) -> None:
    """An Encounter of a clinic-created patient whose Reference.identifier names another number."""
    namespace = clinic()
    with StateStore(tmp_path / "state.sqlite3") as state:
        push([encounter(region, namespace, 1, patient=1)], fhir_base_url, state)
    (held,) = region.holding("Encounter", f"{namespace}/encounter", "enc-1")
    held["subject"]["identifier"]["value"] = "pt-999"
    region.client.update(held)
    report = pull_all(fhir_base_url, namespace=namespace)
    assert [r.id for r in report.records] == []
    assert report.errors


# -- a patient the state knows, gone from the server, with --no-create-patient -----------------


class _Fake:
    """A server that holds nothing and answers every conditional create with 201 (created)."""

    def __init__(self, search: dict[str, Any] | None = None) -> None:
        self.search = search or {"resourceType": "Bundle", "type": "searchset", "entry": []}
        self.transactions: list[dict[str, Any]] = []
        self.batches: list[dict[str, Any]] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        entries = body["entry"]
        if body["type"] == "batch":
            self.batches.append(body)
            answers = [
                {"response": {"status": "404"}}
                if "?" not in e["request"]["url"]
                else {"response": {"status": "200"}, "resource": self.search}
                for e in entries
            ]
            kind = "batch-response"
        else:
            self.transactions.append(body)
            answers = []
            for n, e in enumerate(entries):
                where = e["request"]["url"].split("?")[0]
                rid = where.split("/")[1] if "/" in where else f"new-{len(self.transactions)}-{n}"
                answers.append(
                    {
                        "response": {
                            "status": "201",
                            "location": f"{e['resource']['resourceType']}/{rid}/_history/1",
                        }
                    }
                )
            kind = "transaction-response"
        return httpx.Response(200, json={"resourceType": "Bundle", "type": kind, "entry": answers})


def _fake_push(
    tmp_path: Path, server: _Fake, records: list[Encounter], **options: Any
) -> list[Any]:
    return push_to_fake(tmp_path, server.handle, records, **options)


def _two_visits() -> tuple[Encounter, Encounter]:
    first = _record()
    second = first.model_copy(
        update={
            "id": first.id + "-b",
            "start": first.start + dt.timedelta(days=7),
            "end": first.end + dt.timedelta(days=7),
        }
    )
    if second.treatment is not None and second.treatment.consent is not None:
        consent = second.treatment.consent.model_copy(update={"at": second.start})
        second = second.model_copy(
            update={"treatment": second.treatment.model_copy(update={"consent": consent})}
        )
    return first, Encounter.model_validate(second.model_dump(mode="json"))


def test_no_create_patient_never_creates_one_the_state_remembers(tmp_path: Path) -> None:
    first, second = _two_visits()
    server = _Fake()
    (created,) = _fake_push(tmp_path, server, [first])
    assert created.action == "created", created
    # The server has since lost the patient: every conditional create creates (201).
    (result,) = _fake_push(tmp_path, server, [second], create_patients=False)
    sent = server.transactions[-1] if len(server.transactions) > 1 else {"entry": []}
    kinds = [e["resource"]["resourceType"] for e in sent["entry"]]
    assert result.action == "failed" or "Patient" not in kinds, (result, kinds)


# -- a search answer that lies ------------------------------------------------------------------


@pytest.mark.parametrize(
    "liar",
    [
        # A Patient without the identifiers searched for.
        {"resourceType": "Patient", "id": "other", "identifier": [{"system": "x", "value": "1"}]},
        # Another type carrying the patient's own identifier.
        "practitioner",
    ],
)
def test_a_search_answer_that_lies_is_not_taken_as_the_patient(tmp_path: Path, liar: Any) -> None:
    record = _record()
    if liar == "practitioner":
        from ims_fhir.mapping.identity import default_namespace

        ns = record.clinic.namespace or default_namespace(record.clinic.id)
        liar = {
            "resourceType": "Practitioner",
            "id": "other",
            "identifier": [{"system": f"{ns}/patient", "value": record.patient.id}],
        }
    search = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": liar}]}
    server = _Fake(search)
    (result,) = _fake_push(tmp_path, server, [record])
    assert result.action == "created", result
    (sent,) = server.transactions
    encounter = next(
        e["resource"] for e in sent["entry"] if e["resource"]["resourceType"] == "Encounter"
    )
    assert "other" not in encounter["subject"]["reference"]
    patient = next(e for e in sent["entry"] if e["resource"]["resourceType"] == "Patient")
    assert patient["request"]["method"] == "POST"


# -- $match answers --------------------------------------------------------------------------


def test_a_match_answer_naming_one_patient_twice_is_not_ambiguous(tmp_path: Path) -> None:
    server = _MpiServer(_match_answer(_candidate("mpi-7", 0.99), _candidate("mpi-7", 0.97)))
    (result,) = _mpi_push(tmp_path, server, [_record()])
    assert result.action == "created", result


def test_a_match_answer_of_another_type_is_not_taken_as_the_patient(tmp_path: Path) -> None:
    other = {
        "resource": {"resourceType": "Practitioner", "id": "pr-1"},
        "search": {"score": 1.0},
    }
    server = _MpiServer(_match_answer(other))
    (result,) = _mpi_push(tmp_path, server, [_record()], create_patients=False)
    assert result.action == "failed", result
    assert server.transactions == []


def test_mpi_notes_never_carry_patient_values(tmp_path: Path) -> None:
    record = _record()
    region = {
        "resourceType": "Patient",
        "id": "mpi-7",
        "name": [{"family": "Zzyzx", "given": ["Quux"]}],
        "birthDate": "1901-01-01",
        "gender": "other",
    }
    server = _MpiServer(_match_answer({"resource": region, "search": {"score": 0.99}}))
    (result,) = _mpi_push(tmp_path, server, [record])
    text = " ".join(result.notes) + (result.message or "")
    for value in (
        "Zzyzx",
        "Quux",
        "1901",
        record.patient.name.family,
        *record.patient.name.given,
        str(record.patient.birth_date),
    ):
        assert value not in text
    assert result.notes


def test_a_health_number_holding_a_bar_is_refused_where_it_enters() -> None:
    """FHIR search reads '|' as system|value: such a value could never be matched safely."""
    from pydantic import ValidationError

    from ims_fhir.record.model import Identifier

    with pytest.raises(ValidationError):
        Identifier(system="https://jhn.example/x", value="12|34")


# -- pull of a patient another clinic created ---------------------------------------------------


def test_a_patient_another_clinic_created_pulls_back_as_this_clinic_knows_it(
    fhir_base_url: str, region: Region, tmp_path: Path
) -> None:
    one, two = clinic(), clinic()
    with StateStore(tmp_path / "one.sqlite3") as state:
        push([encounter(region, one, 1, patient=2)], fhir_base_url, state)
    mine = encounter(region, two, 1, patient=2)
    with StateStore(tmp_path / "two.sqlite3") as state:
        (result,) = push([mine], fhir_base_url, state)
    assert result.action == "created", result
    report = pull_all(fhir_base_url, namespace=two)
    assert not report.errors, report.errors
    (back,) = report.records
    # As the clinic knows the patient, with what else the server's copy carries: the number
    # clinic one gave them (an identifier of another system, kept, not dropped).
    others = [i for i in back.patient.identifiers if i.system == f"{one}/patient"]
    assert [i.value for i in others] == ["pt-2"]
    rest = [i for i in back.patient.identifiers if i not in others]
    assert back.patient.model_copy(update={"identifiers": rest}) == mine.patient
