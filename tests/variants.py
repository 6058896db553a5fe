"""A spec-variant layer in front of a real FHIR server: what FHIR R4 allows, and what breaks.

``VariantTransport`` is an httpx transport that forwards every request to the real server and
then changes the answer the way another server, or a hostile network, would: answers without
``etag`` or versions, the sync signature in ``meta`` dropped or piling up, a transaction
answered 200 with a failed entry, entries reordered, another request's answer, an answer lost
after the server committed, a 500 after commit. Which requests it changes is deterministic
(every ``every``-th transaction, from the first), so a test is the same on every run.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

SIGNATURE_URL = "https://ims-fhir.org/fhir/StructureDefinition/sync-signature"

VARIANTS = [
    "no-etag",  # no etag, no _history in locations (both optional in R4)
    "no-versions",  # and no meta.versionId in what is read: versions unknown
    "drop-meta",  # the server keeps no meta extension (and so no sync signature)
    "pile-up-signatures",  # the server merges meta: earlier sync signatures beside the newest
    "failed-entry-200",  # a transaction answered 200 with one failed entry (not atomic)
    "reorder",  # transaction-response entries in reverse order
    "other-body",  # a transaction answered with an earlier transaction's answer
    "lost-after-commit",  # the connection breaks after the server committed
    "500-after-commit",  # a 500 after the server committed
]


class VariantTransport(httpx.AsyncBaseTransport):
    """Forward to the real server, then answer as ``variant`` says."""

    def __init__(self, variant: str, *, every: int = 2) -> None:
        self.variant = variant
        self.every = every
        self.inner = httpx.AsyncHTTPTransport()
        self.transactions = 0
        self.changed = 0
        self._earlier: bytes | None = None

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        kind = _bundle_type(request)
        response = await self.inner.handle_async_request(request)
        body = await response.aread()
        headers = [
            (k, v)
            for k, v in response.headers.multi_items()
            if k.lower() not in {"content-encoding", "content-length", "transfer-encoding"}
        ]
        hit = False
        if kind == "transaction" and response.status_code == 200:
            self.transactions += 1
            hit = (self.transactions - 1) % self.every == 0
        new_body, new_status, headers = self._change(kind, hit, response.status_code, body, headers)
        if kind == "transaction" and response.status_code == 200:
            self._earlier = body
        return httpx.Response(new_status, headers=headers, content=new_body, request=request)

    def _change(
        self, kind: str | None, hit: bool, status: int, body: bytes, headers: list[Any]
    ) -> tuple[bytes, int, list[Any]]:
        variant = self.variant
        if variant in {"no-etag", "no-versions"}:
            headers = [(k, v) for k, v in headers if k.lower() != "etag"]
            return (
                _edit(body, lambda d: _strip_versions(d, variant == "no-versions")),
                status,
                headers,
            )
        if variant == "drop-meta":
            return _edit(body, lambda d: _walk_meta(d, _drop_meta_extensions)), status, headers
        if variant == "pile-up-signatures":
            return _edit(body, lambda d: _walk_meta(d, _add_signatures)), status, headers
        if not hit:
            return body, status, headers
        self.changed += 1
        if variant == "failed-entry-200":

            def fail_one(data: dict[str, Any]) -> None:
                entries = data.get("entry") or []
                if entries:
                    entries[len(entries) // 2]["response"] = {"status": "400 Bad Request"}

            return _edit(body, fail_one), status, headers
        if variant == "reorder":
            return _edit(body, lambda d: d.get("entry", []).reverse()), status, headers
        if variant == "other-body":
            return (self._earlier or body), status, headers
        if variant == "lost-after-commit":
            raise httpx.ReadError("connection lost after the server committed")
        if variant == "500-after-commit":
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "exception", "diagnostics": "boom"}],
            }
            return json.dumps(outcome).encode(), 500, headers
        raise AssertionError(variant)


def _bundle_type(request: httpx.Request) -> str | None:
    if request.method != "POST" or not request.content.startswith(b"{"):
        return None
    try:
        data = json.loads(request.content)
    except ValueError:
        return None
    if data.get("resourceType") != "Bundle":
        return None
    kind = data.get("type")
    return str(kind) if kind else None


def _edit(body: bytes, change: Any) -> bytes:
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if isinstance(data, dict):
        change(data)
    return json.dumps(data).encode()


def _resources(data: Any) -> list[dict[str, Any]]:
    """Every resource in a response: itself, and those of its (nested) Bundle entries."""
    found = []
    if isinstance(data, dict) and isinstance(data.get("resourceType"), str):
        found.append(data)
        for entry in data.get("entry") or []:
            if isinstance(entry, dict):
                found += _resources(entry.get("resource"))
    return found


def _strip_versions(data: dict[str, Any], versions_too: bool) -> None:
    for entry in data.get("entry") or []:
        answer = entry.get("response") if isinstance(entry, dict) else None
        if isinstance(answer, dict):
            answer.pop("etag", None)
            location = answer.get("location")
            if isinstance(location, str) and "/_history/" in location:
                answer["location"] = location.split("/_history/")[0]
    if versions_too:
        for resource in _resources(data):
            if isinstance(resource.get("meta"), dict):
                resource["meta"].pop("versionId", None)


def _walk_meta(data: dict[str, Any], change: Any) -> None:
    for resource in _resources(data):
        if resource.get("resourceType") != "Bundle":
            change(resource.setdefault("meta", {}))


def _drop_meta_extensions(meta: dict[str, Any]) -> None:
    meta.pop("extension", None)


def _add_signatures(meta: dict[str, Any]) -> None:
    meta["extension"] = (meta.get("extension") or []) + [
        {"url": SIGNATURE_URL, "valueString": f"{n:032x}"} for n in range(3)
    ]
