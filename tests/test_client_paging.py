"""Searches page lazily over next links and stop safely on broken ones."""

from __future__ import annotations

from typing import Any

import pytest
import respx

import ims_fhir
from ims_fhir import AsyncFhirClient, BearerAuth, FhirClient

BASE = "https://fhir.example.org/r4"


def page(ids: list[str], next_url: str | None) -> dict[str, Any]:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": {"resourceType": "Patient", "id": i}} for i in ids],
    }
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


@pytest.mark.parametrize(
    ("second", "third"),
    [
        pytest.param(
            f"{BASE}?_getpages=abc&_offset=2", f"{BASE}?_getpages=abc&_offset=4", id="absolute"
        ),
        pytest.param("?_getpages=abc&_offset=2", "?_getpages=abc&_offset=4", id="relative"),
    ],
)
def test_search_follows_next_links_over_three_pages(second: str, third: str) -> None:
    with respx.mock(assert_all_called=True) as router:
        router.get(f"{BASE}/Patient", params={"name": "x"}).respond(json=page(["1", "2"], second))
        # HAPI's next links point at the base URL itself ("...r4?_getpages=...").
        router.get(host="fhir.example.org", params={"_getpages": "abc", "_offset": "2"}).respond(
            json=page(["3", "4"], third)
        )
        router.get(host="fhir.example.org", params={"_getpages": "abc", "_offset": "4"}).respond(
            json=page(["5"], None)
        )
        with FhirClient(BASE) as client:
            found = client.search("Patient", {"name": "x"})
            assert next(found).id == "1"  # lazy: one page fetched so far
            assert len(router.calls) == 1
            assert [r.id for r in found] == ["2", "3", "4", "5"]
            assert len(router.calls) == 3


@pytest.mark.anyio
async def test_async_search_pages_the_same_way() -> None:
    with respx.mock(assert_all_called=True) as router:
        router.get(f"{BASE}/Patient", params={"p": "2"}).respond(json=page(["2"], None))
        router.get(f"{BASE}/Patient").respond(json=page(["1"], f"{BASE}/Patient?p=2"))
        async with AsyncFhirClient(BASE) as client:
            ids = [r["id"] async for r in client.search("Patient", raw=True)]
    assert ids == ["1", "2"]


def test_a_next_link_to_another_host_is_not_followed_and_gets_no_credentials() -> None:
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as router:
        router.get(f"{BASE}/Patient").respond(
            json=page(["1"], "https://evil.example.net/steal?p=2")
        )
        foreign = router.get(host="evil.example.net").respond(json=page(["x"], None))
        with FhirClient(BASE, auth=BearerAuth("s3cret")) as client:
            with pytest.raises(ims_fhir.InvalidResponseError, match="another host"):
                list(client.search("Patient"))
        assert not foreign.called
        assert all("evil" not in str(call.request.url) for call in router.calls)


def test_a_next_link_looping_back_stops_the_search() -> None:
    with respx.mock() as router:
        router.get(f"{BASE}/Patient", params={"p": "2"}).respond(
            json=page(["2"], f"{BASE}/Patient?p=2")
        )
        router.get(f"{BASE}/Patient").respond(json=page(["1"], f"{BASE}/Patient?p=2"))
        with FhirClient(BASE) as client:
            with pytest.raises(ims_fhir.InvalidResponseError, match="loops back"):
                list(client.search("Patient"))
            assert len(router.calls) == 2


def test_max_pages_bounds_a_search() -> None:
    with respx.mock() as router:
        counter = {"n": 0}

        def endless(request: Any) -> Any:
            counter["n"] += 1
            import httpx

            return httpx.Response(200, json=page([str(counter["n"])], f"{BASE}?p={counter['n']}"))

        router.get(url__startswith=BASE).mock(side_effect=endless)
        with FhirClient(BASE) as client:
            with pytest.raises(ims_fhir.InvalidResponseError, match="after 5 pages"):
                list(client.search("Patient", max_pages=5))
    assert counter["n"] == 5


def test_an_empty_bundle_yields_nothing() -> None:
    with respx.mock() as router:
        router.get(f"{BASE}/Patient").respond(json={"resourceType": "Bundle", "type": "searchset"})
        with FhirClient(BASE) as client:
            assert list(client.search("Patient")) == []
