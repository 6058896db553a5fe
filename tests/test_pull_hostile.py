"""Pull through a proxy that corrupts one entry of one page: every other encounter is written.

The server is the real HAPI; the proxy (tests/faultproxy.py) rewrites one answer the way a
broken server or middlebox would: a number too large for a float, an array turned into a
string, an entry that is not a resource.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ims_fhir import (
    AsyncFhirClient,
    Encounter,
    MappingReport,
    StateStore,
    pull,
    push,
    synthetic_encounters,
)

from .faultproxy import FaultPlan, FaultProxy
from .strategies import in_namespace

pytestmark = pytest.mark.fhir_servers("h2")

HUGE = "__1e400__"
PAGE = 2


def _records(namespace: str) -> list[Encounter]:
    return [in_namespace(r, namespace) for r in synthetic_encounters(6, seed=3)]


def _pain_nrs(body: dict[str, Any]) -> bool:
    for entry in body.get("entry") or []:
        quantity = entry["resource"].get("valueQuantity")
        if quantity and "/pain/" in json.dumps(entry["resource"].get("identifier")):
            quantity["value"] = HUGE
            return True
    return False


def _component_string(body: dict[str, Any]) -> bool:
    for entry in body.get("entry") or []:
        if entry["resource"].get("component"):
            entry["resource"]["component"] = "a string"
            return True
    return False


def _entry_string(body: dict[str, Any]) -> bool:
    if body.get("entry"):
        body["entry"][0] = "not an entry"
        return True
    return False


class Corrupt:
    """Rewrites the first answer to ``path`` (from the ``nth`` on) that ``change`` can break."""

    def __init__(self, path: str, nth: int, change: Callable[[dict[str, Any]], bool]) -> None:
        self.path, self.nth, self.change = path, nth, change
        self.seen = 0
        self.done = False
        self.lock = threading.Lock()

    def __call__(self, method: str, target: str, body: bytes) -> bytes:
        with self.lock:
            name = target.split("?")[0].rstrip("/").split("/")[-1]
            if self.done or method != "GET" or name != self.path:
                return body
            self.seen += 1
            if self.seen < self.nth:
                return body
            data = json.loads(body)
            if not self.change(data):
                return body
            self.done = True
            return json.dumps(data).replace(f'"{HUGE}"', "1e400").encode()


@pytest.mark.parametrize(
    ("path", "nth", "change", "reason"),
    [
        pytest.param("Observation", 2, _pain_nrs, "number out of range", id="pain-1e400"),
        pytest.param(
            "Observation", 2, _component_string, "expected an array", id="component-string"
        ),
        pytest.param("Procedure", 2, _entry_string, "", id="part-entry-string"),
        # HAPI's next pages are /fhir?_getpages=...: the first page is the Encounter search.
        pytest.param("Encounter", 1, _entry_string, "no resource", id="encounter-entry-string"),
    ],
)
def test_one_corrupt_entry_loses_one_encounter_and_no_other(
    fhir_base_url: str, tmp_path: Path, path: str, nth: int, change: Any, reason: str
) -> None:
    namespace = f"https://clinic-{uuid.uuid4().hex[:10]}.example/sid"
    records = _records(namespace)
    since = dt.datetime.now(dt.UTC)  # the server's clock is this machine's
    with StateStore(tmp_path / "state.sqlite3") as state:
        results = push(records, fhir_base_url, state)
    assert all(r.action in ("created", "entered-in-error") for r in results), results
    corrupt = Corrupt(path, nth, change)

    async def run(base: str) -> list[MappingReport]:
        async with AsyncFhirClient(base) as client:
            return [r async for r in pull(client, since=since, page_size=PAGE)]

    with FaultProxy(fhir_base_url, FaultPlan(rewrite=corrupt, forward_host=True)) as proxy:
        reports = asyncio.run(run(proxy.url))
    assert corrupt.done, "the proxy found nothing to corrupt"
    pulled = [r for report in reports for r in report.records if r.clinic.namespace == namespace]
    errors = [e for report in reports for e in report.errors]
    assert len(errors) == 1, errors
    assert reason in errors[0].reason, errors[0]
    # Every encounter but the one the corrupt entry belonged to is pulled, as pushed.
    assert len(pulled) == len(records) - 1
    expected = {r.id: r for r in records}
    for record in pulled:
        assert record == expected[record.id]
