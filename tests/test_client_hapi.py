"""Every client operation against the real HAPI server, with the async and the sync client."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import ims_fhir
from ims_fhir import AsyncFhirClient, Encounter, FhirClient, to_fhir_json

from .conftest import ENCOUNTER_FILES

pytestmark = pytest.mark.anyio
SYSTEM = "https://ims-fhir.org/fhir/sid/client-test"


class SyncAsAsync:
    """Runs the sync client behind the async client's interface, so one scenario tests both."""

    def __init__(self, client: FhirClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if name in {"search", "history"}:

            async def pages(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
                for item in method(*args, **kwargs):
                    yield item

            return pages

        async def call(*args: Any, **kwargs: Any) -> Any:
            return method(*args, **kwargs)

        return call


@pytest.fixture(params=["async", "sync"])
async def client(request: pytest.FixtureRequest, fhir_base_url: str) -> AsyncIterator[Any]:
    if request.param == "async":
        async with AsyncFhirClient(fhir_base_url) as c:
            yield c
    else:
        with FhirClient(fhir_base_url) as c:
            yield SyncAsAsync(c)


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex[:12]


def patient(tag: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": SYSTEM, "value": tag}],
        "name": [{"family": "Client", "given": ["Test"]}],
    } | extra


async def test_capabilities(client: Any) -> None:
    statement = await client.capabilities()
    assert statement.fhirVersion == "4.0.1"


async def test_create_read_vread_and_conditional_create(client: Any, tag: str) -> None:
    created = await client.create(patient(tag))
    assert (created.status, created.version) == (201, "1")
    assert created.resource.id == created.id
    again = await client.create(patient(tag), if_none_exist={"identifier": f"{SYSTEM}|{tag}"})
    assert again.status == 200 and again.id == created.id
    read = await client.read("Patient", created.id)
    assert read.identifier[0].value == tag
    version = await client.vread("Patient", created.id, "1")
    assert version.meta.versionId == "1"


async def test_versioned_update_and_stale_version(client: Any, tag: str) -> None:
    created = await client.create(patient(tag))
    current = await client.read("Patient", created.id)
    current.gender = "female"
    updated = await client.update(current, if_match=True)
    assert updated.version == "2"
    current.gender = "male"  # still carries versionId 1: stale
    with pytest.raises(ims_fhir.VersionConflictError):
        await client.update(current, if_match=True)
    assert (await client.read("Patient", created.id)).gender == "female"


async def test_conditional_update_creates_then_updates(client: Any, tag: str) -> None:
    criteria = {"identifier": f"{SYSTEM}|{tag}"}
    first = await client.conditional_update(patient(tag), criteria)
    second = await client.conditional_update(patient(tag, gender="other"), criteria)
    assert (first.status, second.status) == (201, 200)
    assert first.id == second.id and second.version == "2"


async def test_search_pages_lazily_and_raw(client: Any, tag: str) -> None:
    for n in range(5):
        await client.create(patient(f"{tag}-{n}", gender="unknown"))
    params = {"identifier": ",".join(f"{SYSTEM}|{tag}-{n}" for n in range(5)), "_count": "2"}
    found = [r.identifier[0].value async for r in client.search("Patient", params)]
    assert sorted(found) == [f"{tag}-{n}" for n in range(5)]
    raw = [r async for r in client.search("Patient", params, raw=True)]
    assert all(isinstance(r, dict) for r in raw) and len(raw) == 5


async def test_history_instance_and_type(client: Any, tag: str) -> None:
    created = await client.create(patient(tag))
    await client.conditional_update(
        patient(tag, gender="female"), {"identifier": f"{SYSTEM}|{tag}"}
    )
    versions = [r.meta.versionId async for r in client.history("Patient", created.id)]
    assert sorted(versions) == ["1", "2"]
    recent = []
    async for resource in client.history("Patient", since="2000-01-01T00:00:00Z", raw=True):
        recent.append(resource)
        if len(recent) >= 5:  # lazy: stop reading further pages
            break
    assert recent and all(r["resourceType"] == "Patient" for r in recent)


async def test_transaction_of_a_mapped_encounter_is_idempotent(client: Any) -> None:
    record = Encounter.model_validate_json(ENCOUNTER_FILES[4].read_text(encoding="utf-8"))
    data = json.loads(to_fhir_json(record))
    # A unique encounter id per run keeps the test independent of other runs on the server.
    text = json.dumps(data).replace(record.id, f"{record.id}-{uuid.uuid4().hex[:8]}")
    # The Provenance's id is derived from the encounter's identifier: give it its own too, or
    # this bundle would write over the Provenance a push of the fixture writes.
    provenance = next(e for e in data["entry"] if e["resource"]["resourceType"] == "Provenance")
    text = text.replace(provenance["resource"]["id"], str(uuid.uuid4()))
    bundle = json.loads(text)
    first = await client.transaction(bundle)
    assert len(first) == len(bundle["entry"])
    second = await client.transaction(bundle)
    assert {o.status for o in second} == {200}
    assert [o.id for o in second] == [o.id for o in first]
    assert all(o.version == f.version for o, f in zip(second, first, strict=True))


async def test_batch_reports_each_entry(client: Any, tag: str) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": patient(tag), "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "GET", "url": f"Patient/no-such-{tag}"}},
        ],
    }
    outcomes = await client.batch(bundle)
    assert [o.status for o in outcomes] == [201, 404]
    assert outcomes[1].outcome["resourceType"] == "OperationOutcome"


async def test_validate(client: Any, tag: str) -> None:
    good = await client.validate(patient(tag))
    assert not [i for i in good["issue"] if i["severity"] in {"error", "fatal"}]
    bad = await client.validate({"resourceType": "Observation", "id": tag})
    assert [i for i in bad["issue"] if i["severity"] == "error"]


async def test_delete_then_read_is_gone(client: Any, tag: str) -> None:
    created = await client.create(patient(tag))
    await client.delete("Patient", created.id)
    await client.delete("Patient", created.id)  # deleting again is not an error
    with pytest.raises(ims_fhir.GoneError):
        await client.read("Patient", created.id)
    with pytest.raises(ims_fhir.NotFoundError):
        await client.read("Patient", f"missing-{tag}")


def test_iterators_are_lazy_generators(fhir_base_url: str) -> None:
    with FhirClient(fhir_base_url) as c:
        assert isinstance(c.search("Patient"), Iterator)
