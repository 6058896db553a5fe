"""A pull's searches for lists of ids stay short enough for any server or proxy.

``rebuild`` searches the parts of a page of encounters (``encounter=Encounter/a,...``) and reads
what they refer to (``_id=a,b,...``); a bulk pull reads up to thousands of ids at once. With
UUID ids, 200 of them were a 7,400-character URL, refused by servers and proxies that stop at
2,000 or 8,000 (HTTP 414). Lists are now searched in parts of at most
:data:`~ims_fhir.sync.pull.MAX_LIST_CHARS`.
"""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import respx
from hypothesis import given
from hypothesis import strategies as st

from ims_fhir import pull_all, synthetic_encounters, to_fhir_json
from ims_fhir.sync.pull import MAX_LIST_CHARS, value_lists

REMOTE = "https://fhir.example.org/r4"
_ID = st.text("abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=64)


@given(st.lists(_ID, max_size=300), st.integers(min_value=64, max_value=3000))
def test_value_lists_keep_every_value_in_order_within_the_limit(
    values: list[str], limit: int
) -> None:
    lists = list(value_lists(values, limit))
    assert [v for joined in lists for v in joined.split(",")] == values
    assert all(len(joined) <= limit for joined in lists)
    # As few as the greedy cut gives: no two neighbours would fit together.
    assert all(len(a) + 1 + len(b) > limit for a, b in zip(lists, lists[1:], strict=False))


def _server_copy(count: int) -> dict[str, list[dict[str, Any]]]:
    """The synthetic encounters as a server holding them under UUID ids would return them."""
    by_type: dict[str, list[dict[str, Any]]] = {}
    seen: set[str] = set()
    for record in synthetic_encounters(count, seed=11):
        bundle = json.loads(to_fhir_json(record))
        ids = {
            e[
                "fullUrl"
            ]: f"{e['resource']['resourceType']}/{uuid.uuid5(uuid.NAMESPACE_URL, e['fullUrl'])}"
            for e in bundle["entry"]
        }

        def literal(node: Any, ids: dict[str, str] = ids) -> Any:
            if isinstance(node, dict):
                return {
                    k: ids.get(v, v) if k == "reference" else literal(v) for k, v in node.items()
                }
            if isinstance(node, list):
                return [literal(v) for v in node]
            return node

        for entry in bundle["entry"]:
            resource = literal(entry["resource"])
            resource["id"] = ids[entry["fullUrl"]].split("/", 1)[1]
            if ids[entry["fullUrl"]] not in seen:  # a shared patient or clinic: held once
                seen.add(ids[entry["fullUrl"]])
                by_type.setdefault(resource["resourceType"], []).append(resource)
    return by_type


def _matches(resource: dict[str, Any], param: str, wanted: set[str]) -> bool:
    if param == "_id":
        return resource["id"] in wanted
    value = resource.get(param)
    refs = value if isinstance(value, list) else [value]
    return any(isinstance(r, dict) and r.get("reference") in wanted for r in refs)


def test_a_pull_of_encounters_with_uuid_ids_sends_no_long_url() -> None:
    by_type = _server_copy(120)
    urls: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        urls.append(str(request.url))
        resource_type = request.url.path.rsplit("/", 1)[-1]
        query = {k: v[0] for k, v in parse_qs(urlsplit(str(request.url)).query).items()}
        found = by_type.get(resource_type, [])
        for param in ("_id", "encounter", "target"):
            if param in query:
                wanted = set(query[param].split(","))
                found = [r for r in found if _matches(r, param, wanted)]
        entries = [{"resource": r} for r in found]
        return httpx.Response(
            200, json={"resourceType": "Bundle", "type": "searchset", "entry": entries}
        )

    with respx.mock() as router:
        router.get(url__startswith=f"{REMOTE}/").mock(side_effect=answer)
        report = pull_all(REMOTE, page_size=200)  # one page: 120 encounters at once
    assert report.errors == [], report.errors[:3]
    assert sorted(r.id for r in report.records) == sorted(
        r.id for r in synthetic_encounters(120, seed=11)
    )
    # Each list in parts: more searches than part types, and none past the limit.
    assert max(len(u) for u in urls) < MAX_LIST_CHARS * 3 + 300  # percent-encoded: ",", "/"
    longest_value = max(len(v[0]) for u in urls for v in parse_qs(urlsplit(u).query).values())
    assert longest_value <= MAX_LIST_CHARS
    assert sum("encounter=" in u for u in urls) >= 2 * 3  # Observation, Procedure, Condition
