"""The sync engine against a real server whose answers vary the ways FHIR R4 allows, or break.

For every variant of ``tests/variants.py`` and every kind of push (first push, edit, removal,
retraction), with four transactions in flight: the push either succeeds or refuses clearly, the
server never holds anything but the old or the new version of each encounter (no wrong write,
nothing half-written), and a re-run through an honest connection converges on exactly the
records pushed, after which another push sends nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections import Counter
from collections.abc import Callable
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
    UnsafeServerError,
    from_fhir,
    push,
    synthetic_encounters,
)

from .strategies import in_namespace
from .test_sync_hapi import TYPES, identifiers_unique, server_counts
from .variants import VARIANTS, VariantTransport

pytestmark = pytest.mark.fhir_servers("h2", "postgres")

OK = {"created", "updated", "unchanged", "entered-in-error"}


def records_for(namespace: str, count: int = 6, seed: int = 5) -> list[Encounter]:
    records = []
    for record in synthetic_encounters(count, seed=seed):
        records.append(in_namespace(record, namespace).model_copy(update={"retracted": False}))
    return records


def edit(record: Encounter) -> Encounter:
    """A changed pain score, or a later end where the record has no pain score."""
    if record.pain:
        first = record.pain[0]
        pain = [first.model_copy(update={"nrs": (first.nrs + 3) % 11}), *record.pain[1:]]
        return record.model_copy(update={"pain": pain})
    return record.model_copy(update={"end": record.end + dt.timedelta(minutes=5)})


def remove(record: Encounter) -> Encounter:
    """The last finding, needled site and pain score gone from the record."""
    update: dict[str, Any] = {}
    if record.assessment and len(record.assessment.findings) > 1:
        update["assessment"] = record.assessment.model_copy(
            update={"findings": record.assessment.findings[:-1]}
        )
    if record.treatment and len(record.treatment.sites) > 1:
        update["treatment"] = record.treatment.model_copy(
            update={"sites": record.treatment.sites[:-1]}
        )
    if len(record.pain) > 1:
        update["pain"] = record.pain[:-1]
    return record.model_copy(update=update)


def retract(record: Encounter) -> Encounter:
    return record.model_copy(update={"retracted": True})


PHASES: dict[str, Callable[[Encounter], Encounter] | None] = {
    "first-push": None,
    "edit": edit,
    "removal": remove,
    "retraction": retract,
}


def server_records(client: FhirClient, namespace: str) -> dict[str, Encounter]:
    """What the server holds for ``namespace``, mapped back (independently of ``pull``)."""
    resources = [
        resource
        for resource_type in TYPES
        for resource in client.search(
            resource_type, {"_source": namespace, "_count": "500"}, raw=True
        )
    ]
    report = from_fhir(resources)
    assert not report.errors, report.errors[:3]
    return {record.id: record for record in report.records}


def push_through(
    base: str, records: list[Encounter], state: StateStore, transport: httpx.AsyncBaseTransport
) -> list[PushResult]:
    return push(
        records,
        base,
        state,
        concurrency=4,
        client_options={"transport": transport, "timeout": 30.0},
    )


@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_push_through_a_variant_server(
    fhir_base_url: str, tmp_path: Path, variant: str, phase: str
) -> None:
    namespace = f"https://var-{uuid.uuid4().hex[:10]}.example/sid"
    before = records_for(namespace)
    change = PHASES[phase]
    with StateStore(tmp_path / "state.sqlite3") as state, FhirClient(fhir_base_url) as client:
        if change is None:
            after, old = before, {}
        else:
            assert {
                r.action
                for r in push_through(fhir_base_url, before, state, httpx.AsyncHTTPTransport())
            } <= OK
            old = {r.id: r for r in before}
            # Every other record changes; the others stay as they were.
            after = [change(r) if n % 2 == 0 else r for n, r in enumerate(before)]
        transport = VariantTransport(variant)
        try:
            results = push_through(fhir_base_url, after, state, transport)
        except UnsafeServerError as refused:
            assert variant == "failed-entry-200", refused
            assert "not atomic" in str(refused)
        else:
            assert variant != "failed-entry-200" or not transport.changed, results
            actions = Counter(r.action for r in results)
            assert set(actions) <= OK | {"failed"}, [r for r in results if r.action not in OK]
            if variant in {"no-etag", "no-versions", "drop-meta", "pile-up-signatures"}:
                assert set(actions) <= OK, [r.message for r in results if r.action not in OK]
        # Whatever happened, each encounter on the server is its old or its new version.
        held = server_records(client, namespace)
        new = {r.id: r for r in after}
        for record_id, record in held.items():
            assert record in (old.get(record_id), new[record_id]), record_id
        assert identifiers_unique(client, namespace)

        # A re-run through an honest connection converges, and then there is nothing to do.
        again = push_through(fhir_base_url, after, state, httpx.AsyncHTTPTransport())
        assert {r.action for r in again} <= OK, [r.message for r in again if r.action not in OK]
        assert server_records(client, namespace) == new
        assert identifiers_unique(client, namespace)
        final = push_through(fhir_base_url, after, state, httpx.AsyncHTTPTransport())
        assert {r.action for r in final} == {"unchanged"}


def test_a_conflict_found_through_a_variant_server_is_reported_not_overwritten(
    fhir_base_url: str, tmp_path: Path
) -> None:
    """Without versions or signatures to go by, someone else's edit is still recognised."""
    namespace = f"https://var-{uuid.uuid4().hex[:10]}.example/sid"
    records = records_for(namespace, count=2)
    with StateStore(tmp_path / "state.sqlite3") as state, FhirClient(fhir_base_url) as client:
        push_through(fhir_base_url, records, state, VariantTransport("no-versions"))
        encounter = next(
            iter(client.search("Encounter", {"_source": namespace, "_count": "1"}, raw=True))
        )
        encounter["status"] = "cancelled"
        client.update(encounter)
        changed = [edit(r) for r in records]
        results = push_through(fhir_base_url, changed, state, VariantTransport("no-versions"))
        mine = next(r for r in results if r.action == "conflict")
        assert "changed on the server" in (mine.message or "")
        assert client.read("Encounter", encounter["id"]).status == "cancelled"


def test_a_lost_state_file_never_overwrites_an_edit_made_on_the_server(
    fhir_base_url: str, tmp_path: Path
) -> None:
    namespace = f"https://lost-{uuid.uuid4().hex[:10]}.example/sid"
    records = records_for(namespace, count=3)
    with StateStore(tmp_path / "first.sqlite3") as state:
        push_through(fhir_base_url, records, state, httpx.AsyncHTTPTransport())
    with FhirClient(fhir_base_url) as client:
        target = next(iter(client.search("Observation", {"_source": namespace}, raw=True)))
        target["status"] = "amended"
        client.update(target)
        changed = [edit(r) for r in records]
        with StateStore(tmp_path / "new.sqlite3") as fresh:
            results = push_through(fhir_base_url, changed, fresh, httpx.AsyncHTTPTransport())
        assert Counter(r.action for r in results)["conflict"] == 1
        assert client.read("Observation", target["id"]).status == "amended"


@pytest.mark.parametrize("variant", ["honest", "drop-meta", "pile-up-signatures"])
def test_a_lost_state_file_takes_a_copy_as_ims_fhirs_only_by_the_signature_it_kept(
    fhir_base_url: str, tmp_path: Path, variant: str
) -> None:
    """With the state file lost, a server copy is ims-fhir's own write only if its meta carries
    exactly one sync signature, the one of its content. A server that keeps it: the edits go
    through. One that drops meta extensions or piles up earlier signatures: each edit is a
    conflict, and the server keeps what it held (never an overwrite on a guess)."""
    namespace = f"https://lost-{uuid.uuid4().hex[:10]}.example/sid"
    records = records_for(namespace, count=3)
    with StateStore(tmp_path / "first.sqlite3") as state:
        first = push_through(fhir_base_url, records, state, httpx.AsyncHTTPTransport())
        assert {r.action for r in first} <= OK
    changed = [edit(r) for r in records]
    transport = httpx.AsyncHTTPTransport() if variant == "honest" else VariantTransport(variant)
    with StateStore(tmp_path / "new.sqlite3") as fresh, FhirClient(fhir_base_url) as client:
        results = push_through(fhir_base_url, changed, fresh, transport)
        actions = Counter(r.action for r in results)
        held = server_records(client, namespace)
    if variant == "honest":
        assert set(actions) == {"updated"}, [r.message for r in results]
        assert held == {r.id: r for r in changed}
    else:
        assert set(actions) == {"conflict"}, [r.message for r in results]
        assert held == {r.id: r for r in records}


def test_a_state_file_restored_from_a_backup_takes_later_writes_as_ims_fhirs(
    fhir_base_url: str, tmp_path: Path
) -> None:
    """A state file restored from a backup (or another machine's) misses ims-fhir's later
    writes: their sync signature shows them as its own, so the next edit goes through."""
    namespace = f"https://backup-{uuid.uuid4().hex[:10]}.example/sid"
    records = records_for(namespace, count=3)
    live, backup = tmp_path / "state.sqlite3", tmp_path / "backup.sqlite3"
    honest = httpx.AsyncHTTPTransport
    with StateStore(live) as state:
        assert {r.action for r in push_through(fhir_base_url, records, state, honest())} <= OK
    backup.write_bytes(live.read_bytes())
    second = [edit(r) for r in records]
    with StateStore(live) as state:
        assert {r.action for r in push_through(fhir_base_url, second, state, honest())} <= OK
    third = [edit(r) for r in second]
    with StateStore(backup) as old, FhirClient(fhir_base_url) as client:
        results = push_through(fhir_base_url, third, old, honest())
        assert {r.action for r in results} == {"updated"}, [r.message for r in results]
        assert server_records(client, namespace) == {r.id: r for r in third}


def test_verify_recreates_what_was_deleted_on_the_server(
    fhir_base_url: str, tmp_path: Path
) -> None:
    namespace = f"https://verify-{uuid.uuid4().hex[:10]}.example/sid"
    records = records_for(namespace, count=2)
    with StateStore(tmp_path / "state.sqlite3") as state, FhirClient(fhir_base_url) as client:
        push_through(fhir_base_url, records, state, httpx.AsyncHTTPTransport())
        expected = server_records(client, namespace)
        # The one resource nothing refers to (the server refuses to delete the others).
        victim = next(iter(client.search("Provenance", {"_source": namespace}, raw=True)))
        client.delete("Provenance", victim["id"])
        assert server_counts(client, namespace)["Provenance"] == 1
        plain = push_through(fhir_base_url, records, state, httpx.AsyncHTTPTransport())
        assert {r.action for r in plain} == {"unchanged"}  # the state alone cannot know

        async def verify() -> list[PushResult]:
            async with AsyncFhirClient(fhir_base_url) as async_client:
                pusher = Pusher(async_client, state, verify=True)
                return [r async for r in pusher.push(records)]

        results = asyncio.run(verify())
        assert Counter(r.action for r in results) == Counter({"updated": 1, "unchanged": 1})
        assert server_records(client, namespace) == expected
        assert server_counts(client, namespace)["Provenance"] == 2
