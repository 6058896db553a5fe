"""How shared resources are found on a server (sync/matching.py), offline.

The policies against the real HAPI are in test_regional_hapi.py; here, the parts a server cannot
be made to do on demand: a master patient index's answers (``Patient/$match``), lies included.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
import respx
from hypothesis import given
from hypothesis import strategies as st

from ims_fhir import AsyncFhirClient, Encounter, Pusher, StateStore, synthetic_encounters
from ims_fhir.sync.matching import (
    SYNC_SNAPSHOT_URL,
    demographic_differences,
    mark_snapshot,
    match_keys,
    match_query,
    mpi_candidates,
    snapshot_of,
)

from .test_cli_errors import CAPABILITIES

BASE = "http://127.0.0.1:9/r4"
V2 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def _patient(*identifiers: dict[str, Any]) -> dict[str, Any]:
    local = {"system": "https://c.example/sid/patient", "value": "pt-1"}
    return {"resourceType": "Patient", "identifier": [local, *identifiers]}


def _typed(code: str, system: str, value: str) -> dict[str, Any]:
    return {"type": {"coding": [{"system": V2, "code": code}]}, "system": system, "value": value}


# -- keys and queries --------------------------------------------------------------------------


def test_a_patient_is_found_by_health_number_first_then_the_clinic_identifier() -> None:
    patient = _patient(
        {"system": "https://other.example/mrn", "value": "x"},  # untyped: not the person's
        _typed("JHN", "https://jhn.example/bc", "9001"),
    )
    assert match_keys(patient, "identifier") == [
        "https://jhn.example/bc|9001",
        "https://c.example/sid/patient|pt-1",
    ]
    assert match_keys(patient, "mpi") == match_keys(patient, "identifier")
    assert match_keys(patient, "create") == ["https://c.example/sid/patient|pt-1"]


def test_a_practitioner_is_found_by_licence_not_by_a_health_number() -> None:
    practitioner = _patient(
        _typed("JHN", "https://jhn.example/bc", "1"), _typed("LN", "https://ln.example", "2")
    ) | {"resourceType": "Practitioner"}
    assert match_keys(practitioner, "identifier") == [
        "https://ln.example|2",
        "https://c.example/sid/patient|pt-1",
    ]


@given(
    st.lists(
        st.tuples(
            st.text(min_size=1).filter(lambda s: "|" not in s),
            st.text(min_size=1).filter(lambda s: "|" not in s),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_a_match_query_names_exactly_its_keys(pairs: list[tuple[str, str]]) -> None:
    """Whatever the systems and values hold, the OR query parses back to them (R4 escaping)."""
    query = match_query([f"{s}|{v}" for s, v in pairs])
    assert query.startswith("identifier=")
    text = unquote(query.removeprefix("identifier="))
    tokens = _split(text, ",", keep_escapes=True)  # as a server splits an OR list
    assert [tuple(_split(t, "|", keep_escapes=False)) for t in tokens] == pairs


def _split(text: str, separator: str, *, keep_escapes: bool) -> list[str]:
    """``text`` split on each ``separator`` no backslash escapes (R4 search.html#escaping)."""
    parts, part, escaped = [], "", False
    for char in text:
        if escaped:
            part += char
            escaped = False
        elif char == "\\":
            part += char if keep_escapes else ""
            escaped = True
        elif char == separator:
            parts.append(part)
            part = ""
        else:
            part += char
    return [*parts, part]


# -- snapshots and differences -------------------------------------------------------------------


def test_a_snapshot_is_read_only_when_there_is_exactly_one_with_a_time_zone() -> None:
    resource: dict[str, Any] = {"meta": {"source": "x"}}
    when = dt.datetime(2026, 3, 2, 9, tzinfo=dt.UTC)
    mark_snapshot(resource, when)
    assert resource["meta"]["source"] == "x"
    assert snapshot_of(resource) == when
    twice = {"meta": {"extension": resource["meta"]["extension"] * 2}}
    assert snapshot_of(twice) is None
    for value in ("yesterday", "2026-03-02T09:00:00", 5):
        lie = {"meta": {"extension": [{"url": SYNC_SNAPSHOT_URL, "valueDateTime": value}]}}
        assert snapshot_of(lie) is None
    assert snapshot_of({"meta": "not an object"}) is None


def test_demographic_differences_name_fields_never_values() -> None:
    wanted = {
        "resourceType": "Patient",
        "name": [{"family": "Ngata", "given": ["Hemi"]}],
        "birthDate": "1941-02-02",
        "gender": "male",
    }
    same = wanted | {"name": [{"family": " NGATA ", "given": ["hemi"], "use": "official"}]}
    assert demographic_differences(wanted, same) == []
    other = wanted | {"birthDate": "1941-02-03", "name": [{"family": "Ngatai"}]}
    assert demographic_differences(wanted, other) == ["name", "birthDate"]


# -- $match answers ------------------------------------------------------------------------------


def _candidate(pid: str, score: Any) -> dict[str, Any]:
    return {"resource": {"resourceType": "Patient", "id": pid}, "search": {"score": score}}


def test_match_candidates_are_those_at_or_above_the_threshold() -> None:
    answer = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            _candidate("a", 0.99),
            _candidate("b", 0.95),
            _candidate("c", 0.5),
            {"resource": {"resourceType": "OperationOutcome"}},
        ],
    }
    assert [p["id"] for p in mpi_candidates("S", answer, 0.95)] == ["a", "b"]


@pytest.mark.parametrize(
    "answer",
    [
        {"resourceType": "OperationOutcome"},
        {"resourceType": "Bundle", "type": "batch-response", "entry": []},
        {"resourceType": "Bundle", "type": "searchset", "entry": [_candidate("a", None)]},
        {"resourceType": "Bundle", "type": "searchset", "entry": [_candidate("a", True)]},
        {"resourceType": "Bundle", "type": "searchset", "entry": [_candidate("a", 7)]},
        {"resourceType": "Bundle", "type": "searchset", "entry": [_candidate("", 1)]},
        {"resourceType": "Bundle", "type": "searchset", "entry": ["x"]},
    ],
)
def test_a_match_answer_that_is_not_one_is_refused(answer: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"Patient/\$match"):
        mpi_candidates("S", answer, 0.9)


# -- the mpi policy end to end, with a server's answers by respx ------------------------------


class _Server:
    """Answers a push as an empty FHIR server would, with a given ``$match`` answer."""

    def __init__(self, match: httpx.Response) -> None:
        self.match = match
        self.transactions: list[dict[str, Any]] = []
        self.matched: list[dict[str, Any]] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.path.endswith("/Patient/$match"):
            self.matched.append(body)
            return self.match
        entries = body["entry"]
        if body["type"] == "batch":  # reads and searches: nothing there
            answers = [
                {"response": {"status": "404"}}
                if "?" not in e["request"]["url"]
                else {
                    "response": {"status": "200"},
                    "resource": {"resourceType": "Bundle", "type": "searchset", "entry": []},
                }
                for e in entries
            ]
        else:
            self.transactions.append(body)
            answers = []
            for n, e in enumerate(entries):
                kind = e["resource"]["resourceType"]
                where = e["request"]["url"].split("?")[0]
                rid = where.split("/")[1] if "/" in where else f"new-{n}"
                answers.append(
                    {"response": {"status": "201", "location": f"{kind}/{rid}/_history/1"}}
                )
        kind = "batch-response" if body["type"] == "batch" else "transaction-response"
        return httpx.Response(200, json={"resourceType": "Bundle", "type": kind, "entry": answers})


def _push(tmp_path: Path, server: _Server, records: list[Encounter], **options: Any) -> list[Any]:
    return push_to_fake(tmp_path, server.handle, records, **({"match": "mpi"} | options))


def push_to_fake(
    tmp_path: Path,
    handle: Callable[[httpx.Request], httpx.Response],
    records: list[Encounter],
    **options: Any,
) -> list[Any]:
    """Push ``records`` to a fake server whose POSTs ``handle`` answers (respx)."""

    async def main() -> list[Any]:
        with respx.mock(base_url=BASE, assert_all_called=False) as mock:
            mock.get("/metadata").respond(json=CAPABILITIES)
            mock.get("/Encounter").respond(json={"resourceType": "Bundle", "type": "searchset"})
            mock.post(path__regex=r".*").mock(side_effect=handle)
            async with AsyncFhirClient(BASE) as client:
                with StateStore(tmp_path / "state.sqlite3") as state:
                    pusher = Pusher(client, state, **options)
                    return [r async for r in pusher.push(records)]

    return asyncio.run(main())


def _match_answer(*entries: dict[str, Any]) -> httpx.Response:
    return httpx.Response(
        200, json={"resourceType": "Bundle", "type": "searchset", "entry": list(entries)}
    )


def _record() -> Encounter:
    (record,) = synthetic_encounters(1, seed=3)
    return record.model_copy(update={"retracted": False})


def test_the_patient_the_index_is_sure_of_is_referred_to_and_not_written(tmp_path: Path) -> None:
    region = {"resourceType": "Patient", "id": "mpi-7", "name": [{"family": "Ngata"}]}
    server = _Server(_match_answer({"resource": region, "search": {"score": 0.98}}))
    (result,) = _push(tmp_path, server, [_record()])
    assert result.action == "created", result
    (sent,) = server.transactions
    kinds = [e["resource"]["resourceType"] for e in sent["entry"]]
    assert "Patient" not in kinds
    encounter = next(
        e["resource"] for e in sent["entry"] if e["resource"]["resourceType"] == "Encounter"
    )
    assert encounter["subject"]["reference"] == "Patient/mpi-7"
    # The index was asked about the patient as mapped, with every candidate graded.
    (asked,) = server.matched
    params = {p["name"]: p for p in asked["parameter"]}
    assert params["resource"]["resource"]["resourceType"] == "Patient"
    assert params["onlyCertainMatches"]["valueBoolean"] is False
    assert any("differs from the clinic's record" in n for n in result.notes)


def test_two_patients_the_index_is_sure_of_fail_the_encounter(tmp_path: Path) -> None:
    server = _Server(_match_answer(_candidate("a", 0.99), _candidate("b", 0.97)))
    (result,) = _push(tmp_path, server, [_record()])
    assert result.action == "failed"
    assert "ambiguous patient" in (result.message or "")
    assert server.transactions == []


def test_no_candidate_above_the_threshold_creates_the_patient(tmp_path: Path) -> None:
    server = _Server(_match_answer(_candidate("maybe", 0.6)))
    (result,) = _push(tmp_path, server, [_record()], match_threshold=0.9)
    assert result.action == "created", result
    (sent,) = server.transactions
    patient = next(e for e in sent["entry"] if e["resource"]["resourceType"] == "Patient")
    assert patient["request"]["method"] == "POST"
    assert "ifNoneExist" in patient["request"]


def test_no_candidate_and_no_creating_patients_fails_the_encounter(tmp_path: Path) -> None:
    server = _Server(_match_answer())
    (result,) = _push(tmp_path, server, [_record()], create_patients=False)
    assert result.action == "failed"
    assert "not created" in (result.message or "")
    assert server.transactions == []


@pytest.mark.parametrize("status", [400, 404, 501])
def test_a_server_without_match_stops_the_push_with_one_clear_error(
    tmp_path: Path, status: int
) -> None:
    from ims_fhir import UnsafeServerError

    server = _Server(httpx.Response(status, json={"resourceType": "OperationOutcome"}))
    with pytest.raises(UnsafeServerError, match=r"Patient/\$match"):
        _push(tmp_path, server, [_record()])
    assert server.transactions == []


def test_a_match_answer_that_lies_fails_the_encounter_and_writes_nothing(tmp_path: Path) -> None:
    server = _Server(_match_answer(_candidate("a", "certain")))
    (result,) = _push(tmp_path, server, [_record()])
    assert result.action == "failed"
    assert "score" in (result.message or "")
    assert server.transactions == []
