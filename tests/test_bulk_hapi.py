"""Bulk pull against the real HAPI server: push, ``$export``, download, rebuild, compare.

The server is shared with the rest of the suite, so each test exports a Group of its own
patients (``Group/<id>/$export``): the export holds this test's encounters and nothing else,
and its practitioners and clinics (outside the patient compartment) are read by id. The
interruption runs through the project's fault proxy, which forwards the Host header so that
the status URL and the file URLs HAPI writes point back through it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from ims_fhir import (
    AsyncFhirClient,
    Encounter,
    FhirClient,
    StateStore,
    TransportError,
    bulk_pull,
    push,
    synthetic_encounters,
)
from ims_fhir.mapping.identity import Kind, system

from .faultproxy import FaultPlan, FaultProxy
from .strategies import in_namespace

pytestmark = pytest.mark.fhir_servers("h2", "postgres")

N = 12


def _records(namespace: str, seed: int) -> list[Encounter]:
    return [in_namespace(r, namespace) for r in synthetic_encounters(N, seed=seed)]


def _push_and_group(base: str, records: list[Encounter], namespace: str, tmp: Path) -> str:
    """Push the records; return the id of a Group of their patients."""
    with StateStore(tmp / "state.sqlite3") as state:
        results = push(records, base, state, concurrency=2)
    assert Counter(r.action for r in results) == Counter({"created": N})
    with FhirClient(base) as client:
        patients = list(
            client.search(
                "Patient",
                {"identifier": system(namespace, Kind.PATIENT) + "|", "_count": "100"},
                raw=True,
            )
        )
        assert patients
        group = {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [{"entity": {"reference": f"Patient/{p['id']}"}} for p in patients],
        }
        outcome = client.create(group)
    assert outcome.id
    return outcome.id


async def _short(seconds: float) -> None:
    await asyncio.sleep(min(seconds, 0.5))  # HAPI asks for 120 s between polls


async def _bulk(base: str, work: Path, group: str, namespace: str) -> list[Any]:
    async with AsyncFhirClient(base) as client:
        return [
            report
            async for report in bulk_pull(
                client, work, level="group", group=group, namespace=namespace, sleep=_short
            )
        ]


def test_bulk_pull_rebuilds_what_was_pushed(fhir_base_url: str, tmp_path: Path) -> None:
    namespace = f"https://clinic-{uuid.uuid4().hex[:10]}.example/sid"
    records = _records(namespace, seed=20)
    group = _push_and_group(fhir_base_url, records, namespace, tmp_path)

    reports = asyncio.run(_bulk(fhir_base_url, tmp_path / "bulk", group, namespace))

    assert [e for r in reports for e in r.errors] == []
    pulled = [record for report in reports for record in report.records]
    assert sorted(pulled, key=lambda r: r.id) == sorted(records, key=lambda r: r.id)


@pytest.mark.fhir_servers("h2")  # the download, not the database, is under test
def test_an_interrupted_download_resumes_without_fetching_again(
    fhir_base_url: str, tmp_path: Path
) -> None:
    if "127.0.0.1" not in fhir_base_url:
        pytest.skip("the fault proxy stands in front of the local HAPI only")
    namespace = f"https://clinic-{uuid.uuid4().hex[:10]}.example/sid"
    records = _records(namespace, seed=21)
    group = _push_and_group(fhir_base_url, records, namespace, tmp_path)
    seen: Counter[tuple[str, str]] = Counter()
    files_seen: list[str] = []
    broken: set[str] = set()

    def on_request(method: str, path: str, _count: int) -> None:
        seen[method, path.rsplit("/", 1)[-1] if "/Binary/" in path else path] += 1
        if method == "GET" and "/Binary/" in path:
            files_seen.append(path)
            # The third file to be asked for breaks the connection every time: the run stops.
            if len(set(files_seen)) >= 3 and not broken:
                broken.add(path)
            if path in broken:
                raise ConnectionResetError("the network went away")

    work = tmp_path / "bulk"
    with FaultProxy(fhir_base_url, FaultPlan(on_request=on_request, forward_host=True)) as proxy:
        with pytest.raises(TransportError):
            asyncio.run(_bulk(proxy.url, work, group, namespace))
        fetched = sorted(p.name for p in work.glob("0*.ndjson"))
        assert fetched and not any(p.name.endswith(".part") for p in work.glob("*.ndjson"))
        first = seen.copy()
        assert sum(n for (m, p), n in first.items() if p.endswith("/$export")) == 1

        broken.clear()
        files_seen.clear()
        seen.clear()
        reports = asyncio.run(_bulk(proxy.url, work, group, namespace))

    # No new kick-off, no poll; only the files not fetched yet.
    assert not any(p.endswith("$export") or "poll-status" in p for _, p in seen)
    binaries = {p for m, p in seen if m == "GET" and "/" not in p}
    assert len(binaries) == len(list(work.glob("0*.ndjson"))) - len(fetched)
    pulled = [record for report in reports for record in report.records]
    assert [e for r in reports for e in r.errors] == []
    assert sorted(pulled, key=lambda r: r.id) == sorted(records, key=lambda r: r.id)


@pytest.mark.fhir_servers("h2")
def test_the_server_answers_the_export_protocol(fhir_base_url: str) -> None:
    """What bulk_pull relies on, asked of HAPI directly: 202 and a status URL, then 200."""
    response = httpx.get(
        f"{fhir_base_url}/$export",
        params={"_type": "Organization"},
        headers={"Prefer": "respond-async", "Accept": "application/fhir+json"},
    )
    assert response.status_code == 202
    status = response.headers["Content-Location"]
    assert status.startswith(fhir_base_url)
    assert httpx.delete(status).status_code in {202, 200}
