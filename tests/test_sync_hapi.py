"""Push and pull against the real HAPI server: the scenario of the sync issue, step by step."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ims_fhir import (
    AsyncFhirClient,
    Encounter,
    FhirClient,
    Pusher,
    PushResult,
    StateStore,
    pull,
    push,
    synthetic_encounters,
    to_fhir_json,
)

from .conftest import ENCOUNTER_FILES, ROOT
from .strategies import in_namespace

pytestmark = pytest.mark.fhir_servers("h2", "postgres")

TYPES = [
    "Organization",
    "Patient",
    "Practitioner",
    "Encounter",
    "Observation",
    "Condition",
    "Procedure",
    "Consent",
    "Provenance",
]


class CountingTransport(httpx.AsyncHTTPTransport):
    """Counts requests by method, to prove that a re-push writes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.methods: Counter[str] = Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.methods[request.method] += 1
        return await super().handle_async_request(request)


def with_namespace(records: list[Encounter], namespace: str) -> list[Encounter]:
    return [in_namespace(r, namespace) for r in records]


def fixtures() -> list[Encounter]:
    return [Encounter.model_validate_json(p.read_text(encoding="utf-8")) for p in ENCOUNTER_FILES]


def expected_counts(records: list[Encounter]) -> dict[str, int]:
    seen: dict[str, str] = {}
    for record in records:
        for entry in json.loads(to_fhir_json(record))["entry"]:
            seen[entry["fullUrl"]] = entry["resource"]["resourceType"]
    return dict(Counter(seen.values()))


def server_counts(client: FhirClient, namespace: str) -> dict[str, int]:
    counts = {}
    for resource_type in TYPES:
        found = client.request_json(
            "GET",
            resource_type,
            params={"_source": namespace, "_summary": "count"},
            headers={"Cache-Control": "no-cache"},  # HAPI caches repeated searches
        )
        if found.get("total"):
            counts[resource_type] = found["total"]
    return counts


def identifiers_unique(client: FhirClient, namespace: str) -> bool:
    values = [
        ident["value"]
        for resource_type in TYPES
        for resource in client.search(
            resource_type, {"_source": namespace, "_count": "200"}, raw=True
        )
        for ident in resource.get("identifier", [])[:1]
    ]
    return len(values) == len(set(values))


@pytest.fixture
def namespace() -> str:
    return f"https://clinic-{uuid.uuid4().hex[:10]}.example/sid"


@pytest.fixture
def sync_client(fhir_base_url: str) -> Iterator[FhirClient]:
    with FhirClient(fhir_base_url) as client:
        yield client


def run_push(
    base: str, records: list[Encounter], state: StateStore, **options: Any
) -> tuple[Counter[str], Counter[str]]:
    transport = CountingTransport()
    results = push(records, base, state, client_options={"transport": transport}, **options)
    return Counter(r.action for r in results), transport.methods


def test_push_repush_change_retire_pull_and_conflict(
    fhir_base_url: str, sync_client: FhirClient, namespace: str, tmp_path: Path
) -> None:
    records = with_namespace(fixtures(), namespace)
    with StateStore(tmp_path / "state.sqlite3") as state:
        # 1. Push all fixtures: the server holds exactly the expected resources.
        actions, _ = run_push(fhir_base_url, records, state, concurrency=4)
        assert actions == Counter({"created": 25, "entered-in-error": 1})
        assert server_counts(sync_client, namespace) == expected_counts(records)
        assert identifiers_unique(sync_client, namespace)
        assert state.counts(fhir_base_url) == expected_counts(records)

        # 2. Push again: nothing to do, and not one request.
        actions, methods = run_push(fhir_base_url, records, state)
        assert actions == Counter({"unchanged": 26})
        assert sum(methods.values()) == 0

        # 3. Change one record: only its resources get a new version.
        before = {r.identifier: r.version for r in state.all_resources(fhir_base_url)}
        changed = records[0].model_copy(
            update={
                "pain": [records[0].pain[0].model_copy(update={"nrs": 9}), *records[0].pain[1:]]
            }
        )
        records[0] = changed
        actions, methods = run_push(fhir_base_url, records, state)
        assert actions == Counter({"updated": 1, "unchanged": 25})
        assert methods["POST"] == 2  # one batch of reads, one transaction
        after = {r.identifier: r.version for r in state.all_resources(fhir_base_url)}
        bumped = {k for k in after if after[k] != before.get(k)}
        assert bumped and all(changed.id in k or k.startswith("Provenance/") for k in bumped)
        assert all(after[k] == before[k] for k in after if k not in bumped)

        # 4. Remove a finding: its Observation becomes entered-in-error.
        gone = changed.assessment.findings[2]
        assessment = changed.assessment.model_copy(
            update={"findings": [f for f in changed.assessment.findings if f.id != gone.id]}
        )
        records[0] = changed.model_copy(update={"assessment": assessment})
        actions, _ = run_push(fhir_base_url, records, state)
        assert actions["updated"] == 1
        (observation,) = sync_client.search(
            "Observation", {"identifier": f"{namespace}/observation|{changed.id}/finding/{gone.id}"}
        )
        assert observation.status == "entered-in-error"

        # 5. Pull: the records on the server equal the inputs.
        pulled = [
            r
            for report in _pull_all(fhir_base_url)
            for r in report.records
            if r.clinic.namespace == namespace
        ]
        assert sorted(pulled, key=lambda r: r.id) == sorted(records, key=lambda r: r.id)

        # 6. Someone edits a resource on the server: reported, not overwritten.
        target = sync_client.search(
            "Observation", {"identifier": f"{namespace}/observation|{records[1].id}/pain/p1"}
        )
        edited = next(iter(target))
        edited.status = "amended"
        sync_client.update(edited)
        records[1] = records[1].model_copy(
            update={
                "pain": [records[1].pain[0].model_copy(update={"nrs": 1}), *records[1].pain[1:]]
            }
        )
        actions, _ = run_push(fhir_base_url, records, state)
        assert actions["conflict"] == 1
        assert sync_client.read("Observation", edited.id).status == "amended"
        actions, _ = run_push(fhir_base_url, records, state, on_conflict="overwrite")
        assert actions["updated"] == 1
        overwritten = sync_client.read("Observation", edited.id)
        assert overwritten.status == "final" and overwritten.valueQuantity.value == 1


def _pull_all(base: str) -> list[Any]:
    async def run() -> list[Any]:
        async with AsyncFhirClient(base) as client:
            return [report async for report in pull(client, page_size=100)]

    return asyncio.run(run())


def test_retracting_a_pushed_record_marks_everything_entered_in_error(
    fhir_base_url: str, sync_client: FhirClient, namespace: str, tmp_path: Path
) -> None:
    (record,) = with_namespace(fixtures()[:1], namespace)
    with StateStore(tmp_path / "state.sqlite3") as state:
        run_push(fhir_base_url, [record], state)
        actions, _ = run_push(fhir_base_url, [record.model_copy(update={"retracted": True})], state)
    assert actions == Counter({"entered-in-error": 1})
    statuses = {
        r["status"]
        for t in ("Observation", "Procedure", "Consent", "Encounter")
        for r in sync_client.search(t, {"_source": namespace}, raw=True)
    }
    assert statuses == {"entered-in-error"}


def break_record(pusher: Pusher, record_id: str) -> None:
    """Make the pusher send ``record_id`` referring to a Patient the server lacks: refused."""
    original = pusher._prepare

    def broken(record: Encounter) -> Any:
        key, item = original(record)
        if item is not None and record.id == record_id:
            item.entries[0]["resource"]["subject"] = {"reference": "Patient/does-not-exist"}
        return key, item

    pusher._prepare = broken  # type: ignore[method-assign]


def push_all(pusher: Pusher, records: list[Encounter]) -> list[PushResult]:
    async def run() -> list[PushResult]:
        async with pusher.client:
            return [r async for r in pusher.push(records)]

    return asyncio.run(run())


def test_a_rejected_record_is_reported_and_the_rest_are_written(
    fhir_base_url: str, namespace: str, tmp_path: Path
) -> None:
    records = with_namespace(fixtures()[:3], namespace)
    with StateStore(tmp_path / "state.sqlite3") as state:
        pusher = Pusher(AsyncFhirClient(fhir_base_url), state, batch_size=3)
        break_record(pusher, records[1].id)
        results = {r.record_id: r for r in push_all(pusher, records)}
    assert results[records[1].id].action == "failed"
    assert "does-not-exist" in (results[records[1].id].message or "")
    assert {results[r.id].action for r in (records[0], records[2])} == {"created"}


def test_concurrent_transactions_share_new_patients_without_racing(
    fhir_base_url: str, sync_client: FhirClient, namespace: str, tmp_path: Path
) -> None:
    """Twelve encounters of two new patients, one per transaction, four in flight at once.

    The first transaction to need a patient creates it; the others wait for it. The very first
    one is refused by the server, so a waiting transaction must create the patient instead.
    """
    records = with_namespace(list(synthetic_encounters(12, seed=7, patients=2)), namespace)
    records = [r.model_copy(update={"retracted": False}) for r in records]
    with StateStore(tmp_path / "state.sqlite3") as state:
        pusher = Pusher(AsyncFhirClient(fhir_base_url), state, batch_size=1, concurrency=4)
        break_record(pusher, records[0].id)
        original_claim = pusher._claim_shared
        claims: list[tuple[str, list[str]]] = []

        async def recorded(batch: list[Any]) -> list[str]:
            keys = await original_claim(batch)
            claims.append((batch[0].record.id, keys))
            return keys

        pusher._claim_shared = recorded  # type: ignore[method-assign]
        results = {r.record_id: r.action for r in push_all(pusher, records)}
    assert results.pop(records[0].id) == "failed"
    assert set(results.values()) == {"created"}
    # Each shared resource was claimed by one transaction at a time; the refused first
    # transaction's claim on its patient passed to another one.
    patient = next(k for k in claims[0][1] if records[0].patient.id in k)
    claimants = [record_id for record_id, keys in claims if patient in keys]
    assert claimants[0] == records[0].id and len(claimants) == 2
    assert not pusher._creating
    counts = server_counts(sync_client, namespace)
    assert (counts["Patient"], counts["Organization"]) == (2, 2)
    assert identifiers_unique(sync_client, namespace)


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_push_then_rerun(
    fhir_base_url: str, sync_client: FhirClient, namespace: str, tmp_path: Path
) -> None:
    records = with_namespace(list(synthetic_encounters(200, seed=42)), namespace)
    source = tmp_path / "encounters.ndjson"
    source.write_text("".join(r.model_dump_json() + "\n" for r in records), encoding="utf-8")
    state_file = tmp_path / "state.sqlite3"
    command = [
        sys.executable,
        "-m",
        "ims_fhir",
        "push",
        str(source),
        "--server",
        fhir_base_url,
        "--state",
        str(state_file),
        "--concurrency",
        "4",
        "--batch-size",
        "5",
    ]
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    kills = 0
    for delay in (1.5, 2.5):  # two kills at different points
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(delay)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            kills += 1
        process.wait()
    assert kills >= 1, "the push finished before it could be killed: make the input larger"
    finished = subprocess.run(command + ["--json"], env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    again = json.loads(
        subprocess.run(command + ["--json"], env=env, capture_output=True, text=True).stdout
    )
    assert again["summary"]["unchanged"] == 200 and again["resources_written"] == 0
    assert server_counts(sync_client, namespace) == expected_counts(records)
    assert identifiers_unique(sync_client, namespace)
    with StateStore(state_file) as state:
        assert state.counts(fhir_base_url) == expected_counts(records)
