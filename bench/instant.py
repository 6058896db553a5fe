"""An instant in-process FHIR server for measuring the push client's own CPU (bench only).

A benchmark of client cost needs a server that costs nothing to wait for: this one answers in
the same process through ``httpx.MockTransport``. It keeps resources in dicts and does what a
push asks of a server: ``metadata``, the ``_summary=count`` search of the preflight, batches of
reads by id and searches by ``identifier``, and transactions of conditional creates and updates
by id, with ``urn:uuid`` references made literal, locations with versions and etags. It checks
nothing a real server checks and is never used to test correctness (the tests run a real HAPI).
The time it spends answering is counted in ``seconds`` so that the benchmark can take it out of
the process's CPU time.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson

JSON = dict[str, Any]

_CAPABILITIES = {
    "resourceType": "CapabilityStatement",
    "status": "active",
    "kind": "instance",
    "fhirVersion": "4.0.1",
    "format": ["json"],
    "rest": [{"mode": "server", "interaction": [{"code": "transaction"}, {"code": "batch"}]}],
}


class InstantServer:
    """A FHIR server in memory; ``transport`` is what an httpx client is given."""

    def __init__(self) -> None:
        # Kept as JSON text: a first push of 100,000 encounters (bench/repush.py) stays a few GiB.
        self.resources: dict[tuple[str, str], bytes] = {}
        self.versions: dict[tuple[str, str], int] = {}
        self.by_identifier: dict[tuple[str, str], str] = {}
        self.next_id = 0
        self.seconds = 0.0  # CPU time spent answering
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        start = time.process_time()
        try:
            return self._handle(request)
        finally:
            self.seconds += time.process_time() - start

    def _handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.rstrip("/").rsplit("/fhir", 1)[-1].strip("/")
        if request.method == "GET" and path == "metadata":
            return _json(_CAPABILITIES)
        if request.method == "GET" and "/" not in path:
            return _json({"resourceType": "Bundle", "type": "searchset", "total": 0})
        if request.method == "POST" and not path:
            bundle = orjson.loads(request.content)
            if bundle.get("type") == "batch":
                return _json(self.batch(bundle))
            return _json(self.transaction(bundle))
        return httpx.Response(404, json={"resourceType": "OperationOutcome", "issue": []})

    def batch(self, bundle: JSON) -> JSON:
        entries = []
        for entry in bundle["entry"]:
            url = entry["request"]["url"]
            if "?" in url:
                resource_type, _, query = url.partition("?")
                tokens = parse_qs(query)["identifier"][0].split(",")
                found = [
                    {
                        "resource": orjson.loads(
                            self.resources[(resource_type, self.by_identifier[key])]
                        )
                    }
                    for token in tokens
                    if (key := (resource_type, token.replace("\\", ""))) in self.by_identifier
                ]
                result = {"resourceType": "Bundle", "type": "searchset", "entry": found}
                entries.append({"resource": result, "response": {"status": "200 OK"}})
                continue
            resource_type, _, resource_id = url.partition("/")
            resource = self.resources.get((resource_type, resource_id))
            if resource is None:
                entries.append({"response": {"status": "404 Not Found"}})
            else:
                entries.append(
                    {"resource": orjson.loads(resource), "response": {"status": "200 OK"}}
                )
        return {"resourceType": "Bundle", "type": "batch-response", "entry": entries}

    def transaction(self, bundle: JSON) -> JSON:
        ids: dict[str, str] = {}
        answers: list[tuple[int, str, str]] = []
        for entry in bundle["entry"]:
            resource, request = entry["resource"], entry["request"]
            resource_type = resource["resourceType"]
            existing = None
            if request["method"] == "POST":
                condition = request.get("ifNoneExist", "")
                token = parse_qs(condition).get("identifier", [""])[0].replace("\\", "")
                existing = self.by_identifier.get((resource_type, token))
                resource_id = existing or self._new_id()
            else:
                resource_id = urlsplit(request["url"]).path.partition("/")[2]
            ids[entry.get("fullUrl", "")] = f"{resource_type}/{resource_id}"
            answers.append((200 if existing else 201, resource_type, resource_id))
        out = []
        for entry, (status, resource_type, resource_id) in zip(
            bundle["entry"], answers, strict=True
        ):
            key = (resource_type, resource_id)
            if status == 201 or entry["request"]["method"] == "PUT":
                resource = _literal(entry["resource"], ids)
                version = self.versions.get(key, 0) + 1
                resource["id"] = resource_id
                resource["meta"] = dict(resource.get("meta") or {}) | {"versionId": str(version)}
                self.resources[key] = orjson.dumps(resource)
                self.versions[key] = version
                for identifier in resource.get("identifier") or []:
                    token = f"{identifier.get('system')}|{identifier.get('value')}"
                    self.by_identifier[(resource_type, token)] = resource_id
            version = self.versions[key]
            out.append(
                {
                    "response": {
                        "status": "201 Created" if status == 201 else "200 OK",
                        "location": f"{resource_type}/{resource_id}/_history/{version}",
                        "etag": f'W/"{version}"',
                    }
                }
            )
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": out}

    def _new_id(self) -> str:
        self.next_id += 1
        return str(self.next_id)


def _literal(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {
            k: ids.get(v, v) if k == "reference" and isinstance(v, str) else _literal(v, ids)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_literal(v, ids) for v in value]
    return value


def _json(data: JSON) -> httpx.Response:
    return httpx.Response(
        200, content=orjson.dumps(data), headers={"Content-Type": "application/fhir+json"}
    )
