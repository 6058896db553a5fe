"""Attacks on the sync engine by a reviewer who did not write it; each failed before its fix.

Search-special characters in identifier systems, a correction on the server that puts back an
older ims-fhir version (its sync signature too), a server that pages below ``_count``, and a server
that rewrites numbers (13.0 as 13).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from ims_fhir import Encounter, FhirClient, PushResult, StateStore, push

from .test_sync_variants import OK, edit, records_for, server_records

pytestmark = pytest.mark.fhir_servers("h2", "postgres")


def ns(tag: str = "atk", suffix: str = "") -> str:
    return f"https://{tag}-{uuid.uuid4().hex[:10]}.example{suffix}/sid"


def push_via(
    base: str,
    records: list[Encounter],
    state: StateStore,
    transport: httpx.AsyncBaseTransport | None = None,
    **options: Any,
) -> list[PushResult]:
    return push(
        records,
        base,
        state,
        client_options={"transport": transport or httpx.AsyncHTTPTransport(), "timeout": 30.0},
        **options,
    )


def count(client: FhirClient, resource_type: str, system: str, value: str) -> int:
    found = client.request_json(
        "GET",
        resource_type,
        params={"identifier": f"{system}|{value}", "_summary": "count"},
        headers={"Cache-Control": "no-cache"},
    )
    return int(found.get("total") or 0)


def all_of(client: FhirClient, resource_type: str, namespace: str) -> list[dict[str, Any]]:
    return list(client.search(resource_type, {"_source": namespace, "_count": "200"}, raw=True))


# -- 1. identifier systems with search-special characters ------------------------------------


@pytest.mark.parametrize("special", [",", "|"])
def test_namespace_with_a_search_special_character_can_be_pushed(
    fhir_base_url: str, tmp_path: Path, special: str
) -> None:
    """A clinic namespace may hold ',' or '|' (the record schema allows any non-space).

    Two encounters of one patient pushed one after the other must share one Patient.
    """
    namespace = f"https://sp-{uuid.uuid4().hex[:10]}.example/a{special}b/sid"
    first, second = records_for(namespace, count=2)
    second = second.model_copy(update={"patient": first.patient})
    with StateStore(tmp_path / "s.sqlite3") as state, FhirClient(fhir_base_url) as client:
        one = push_via(fhir_base_url, [first], state)
        two = push_via(fhir_base_url, [second], state)
        system = f"{namespace}/patient"
        escaped = "".join("\\" + c if c in "\\,$|" else c for c in system)
        found = client.request_json(
            "GET",
            "Patient",
            params={"identifier": f"{escaped}|{first.patient.id}", "_summary": "count"},
            headers={"Cache-Control": "no-cache"},
        )
        assert found.get("total") == 1, [(r.action, r.message) for r in one + two]
        assert {r.action for r in one + two} <= OK, [r.message for r in one + two]


# -- 2. a revert to an earlier write of ims-fhir's, signature and all, looks like "ours" --------


@pytest.mark.parametrize("meta", ["plain-put", "old-meta-copied"])
def test_a_server_side_revert_to_an_older_pushed_version_is_not_overwritten(
    fhir_base_url: str, tmp_path: Path, meta: str
) -> None:
    """ims-fhir writes A, then B. Someone on the server puts the resource back to A (a
    correction), by a plain PUT or by copying version 1 whole, its meta and so A's sync
    signature too. The next ims-fhir edit C must be a conflict, not overwrite the correction."""
    namespace = ns("revert")
    records = [r for r in records_for(namespace, count=6) if r.pain][:1]
    assert records
    with StateStore(tmp_path / "s.sqlite3") as state, FhirClient(fhir_base_url) as client:
        assert {r.action for r in push_via(fhir_base_url, records, state)} <= OK
        v2 = [edit(r) for r in records]
        assert {r.action for r in push_via(fhir_base_url, v2, state)} <= OK
        changed = [
            o for o in all_of(client, "Observation", namespace) if o["meta"]["versionId"] == "2"
        ]
        assert changed
        target = changed[0]
        old = client.request_json("GET", f"Observation/{target['id']}/_history/1")
        if meta == "plain-put":
            old["meta"] = {"source": target["meta"].get("source")}
        else:
            old["meta"] = {k: v for k, v in old["meta"].items() if k in {"source", "extension"}}
            assert old["meta"]["extension"], old["meta"]  # A's signature, as written
        client.request_json("PUT", f"Observation/{target['id']}", json_body=old)
        reverted = client.request_json("GET", f"Observation/{target['id']}")
        assert reverted["meta"]["versionId"] == "3"

        v3 = [edit(r) for r in v2]
        results = push_via(fhir_base_url, v3, state)
        now = client.request_json(
            "GET", f"Observation/{target['id']}", headers={"Cache-Control": "no-cache"}
        )
        assert now["meta"]["versionId"] == "3", (
            [(r.action, r.message) for r in results],
            reverted["meta"],
        )
        assert {r.action for r in results} == {"conflict"}


# -- 3. a server that pages search results at fewer than _count -------------------------------


class PageCap(httpx.AsyncBaseTransport):
    """A server whose page size is at most ``cap`` (R4: the server may return fewer than
    ``_count`` and link to the next page). Rewrites the ``_count`` of searches in batches."""

    def __init__(self, cap: int = 3) -> None:
        self.cap = cap
        self.inner = httpx.AsyncHTTPTransport()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.content.startswith(b"{"):
            data = json.loads(request.content)
            if data.get("type") == "batch":
                for entry in data.get("entry", []):
                    url = entry["request"]["url"]
                    if "_count=" in url:
                        head, _, _ = url.rpartition("_count=")
                        entry["request"]["url"] = f"{head}_count={self.cap}"
                body = json.dumps(data).encode()
                headers = [
                    (k, v)
                    for k, v in request.headers.multi_items()
                    if k.lower() != "content-length"
                ]
                request = httpx.Request(request.method, request.url, headers=headers, content=body)
        return await self.inner.handle_async_request(request)


def test_a_server_with_a_small_page_size_does_not_block_pushes_for_ever(
    fhir_base_url: str, tmp_path: Path
) -> None:
    """With a lost state file every encounter is looked up by identifier first; a server that
    pages at 3 results must not make those encounters fail on every push."""
    namespace = ns("page")
    records = records_for(namespace, count=3)
    with StateStore(tmp_path / "first.sqlite3") as state:
        assert {r.action for r in push_via(fhir_base_url, records, state)} <= OK
    with StateStore(tmp_path / "lost.sqlite3") as fresh:
        for _ in range(2):
            results = push_via(fhir_base_url, records, fresh, PageCap(3))
            assert {r.action for r in results} <= OK, [r.message for r in results]


# -- 5. a server that stores numbers as JSON numbers (13.0 -> 13, as JavaScript servers do) ----


def _js_number(text: str) -> Any:
    value = float(text)
    return int(value) if value.is_integer() else value


class JsNumbers(httpx.AsyncBaseTransport):
    """Answers as a server that keeps JSON numbers as numbers (a Node.js server such as
    Medplum): ``13.0`` comes back as ``13``. The value is the same decimal; only its JSON text
    differs. ``lose`` transactions (1-based) lose their answer after the server committed."""

    def __init__(self, lose: set[int] | None = None) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.lose = lose or set()
        self.transactions = 0

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        is_tx = request.content.startswith(b"{") and (
            json.loads(request.content).get("type") == "transaction"
        )
        response = await self.inner.handle_async_request(request)
        body = await response.aread()
        if is_tx:
            self.transactions += 1
            if self.transactions in self.lose:
                raise httpx.ReadError("connection lost after the server committed")
        try:
            data = json.loads(body, parse_float=_js_number)
        except ValueError:
            data = None
        if data is not None:
            body = json.dumps(data).encode()
        headers = [
            (k, v)
            for k, v in response.headers.multi_items()
            if k.lower() not in {"content-encoding", "content-length", "transfer-encoding"}
        ]
        return httpx.Response(response.status_code, headers=headers, content=body, request=request)


def test_a_lost_answer_on_a_server_that_normalises_numbers_recovers(
    fhir_base_url: str, tmp_path: Path
) -> None:
    namespace = ns("jsnum")
    records = records_for(namespace, count=2)
    with StateStore(tmp_path / "s.sqlite3") as state, FhirClient(fhir_base_url) as client:
        first = push_via(fhir_base_url, records, state, JsNumbers(lose={1}), concurrency=1)
        again = push_via(fhir_base_url, records, state, JsNumbers())
        assert {r.action for r in again} <= OK, [(r.action, r.message) for r in first + again]
        assert set(server_records(client, namespace)) == {r.id for r in records}


def test_a_lost_state_file_on_a_server_that_normalises_numbers_is_not_a_conflict(
    fhir_base_url: str, tmp_path: Path
) -> None:
    namespace = ns("jsnum-lost")
    records = records_for(namespace, count=2)
    with StateStore(tmp_path / "first.sqlite3") as state:
        assert {r.action for r in push_via(fhir_base_url, records, state, JsNumbers())} <= OK
    with StateStore(tmp_path / "new.sqlite3") as fresh:
        results = push_via(fhir_base_url, records, fresh, JsNumbers())
        assert {r.action for r in results} <= OK, [(r.action, r.message) for r in results]
