"""A push that is cancelled ends: an app's timeout around it, or Ctrl-C, is not a hang."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import respx

from ims_fhir import AsyncFhirClient, Pusher, ReadRecord, StateStore, read_records

from .conftest import FIXTURES
from .test_cli_errors import CAPABILITIES

BASE = "http://127.0.0.1:9/r4"


async def _never(request: httpx.Request) -> httpx.Response:
    await asyncio.sleep(3600)  # a server that took the request and never answers
    raise AssertionError("unreachable")


def test_a_cancelled_push_ends(tmp_path: Path) -> None:
    records = [
        i.record for i in read_records([FIXTURES / "encounters"]) if isinstance(i, ReadRecord)
    ]
    assert len(records) > 8  # more batches than the queue between reader and workers holds

    async def main() -> float:
        with respx.mock(base_url=BASE, assert_all_called=False) as mock:
            mock.get("/metadata").respond(json=CAPABILITIES)
            mock.get("/Encounter").respond(
                json={"resourceType": "Bundle", "type": "searchset", "total": 0}
            )
            mock.get(path__regex=r"/Provenance/.*").respond(404)
            mock.post("/").mock(side_effect=_never)
            async with AsyncFhirClient(BASE) as client:
                with StateStore(tmp_path / "state.sqlite3") as state:

                    async def push() -> None:
                        async for _ in Pusher(client, state, batch_size=1).push(records):
                            pass

                    start = time.monotonic()
                    try:
                        await asyncio.wait_for(push(), timeout=1)
                    except TimeoutError:
                        pass
                    return time.monotonic() - start

    assert asyncio.run(asyncio.wait_for(main(), timeout=30)) < 10
