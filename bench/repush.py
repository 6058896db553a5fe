"""A re-push of unchanged encounters at scale: its memory and its first progress (bench only).

Run by ``bench.py`` in two processes per size, so that each measures one thing:

- ``first N STATE``: push ``N`` synthetic encounters through the instant in-process server
  (``instant.py``) into a new state store; prints the actions counted.
- ``again N STATE``: push the same ``N`` encounters again with that state, to a server that
  cannot be reached (port 9 on this machine): a single request fails the run, so a clean run
  proves that nothing was sent. Prints the seconds to the first result, the seconds in all, the
  actions counted and the process's peak RSS (KiB, its VmHWM; the interpreter and imports
  included, as in the other memory rows).

The records are generated as they are pushed (``synthetic_encounters`` is a generator), so
neither process holds them all.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

from instant import InstantServer

from ims_fhir import AsyncFhirClient, Pusher, StateStore, synthetic_encounters

URL = "http://127.0.0.1:9/fhir"  # discard: nothing listens (the state is keyed by this URL)
BATCH, CONCURRENCY = 10, 4


async def first(count: int, state_path: Path) -> dict[str, object]:
    server = InstantServer()
    with StateStore(state_path) as state:
        async with AsyncFhirClient(URL, transport=server.transport) as client:
            pusher = Pusher(client, state, batch_size=BATCH, concurrency=CONCURRENCY)
            actions = Counter([r.action async for r in pusher.push(synthetic_encounters(count))])
    return {"actions": dict(actions)}


async def again(count: int, state_path: Path) -> dict[str, object]:
    actions: Counter[str] = Counter()
    first_result = None
    with StateStore(state_path) as state:
        async with AsyncFhirClient(URL) as client:
            pusher = Pusher(client, state, batch_size=BATCH, concurrency=CONCURRENCY)
            start = time.perf_counter()
            async for result in pusher.push(synthetic_encounters(count)):
                if first_result is None:
                    first_result = time.perf_counter() - start
                actions[result.action] += 1
            seconds = time.perf_counter() - start
    return {
        "first_result_s": first_result,
        "s": seconds,
        "actions": dict(actions),
        "peak_rss_kib": _peak_rss_kib(),
    }


def _peak_rss_kib() -> int:
    """This process's own peak (VmHWM), in KiB.

    ru_maxrss would carry over the parent's peak, which Linux keeps across exec (bench.py's
    process holds gigabytes by then).
    """
    with open("/proc/self/status", encoding="ascii") as status:
        line = next(line for line in status if line.startswith("VmHWM"))
    return int(line.split()[1])


def main() -> None:
    mode, count, state_path = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    run = {"first": first, "again": again}[mode]
    print(json.dumps(asyncio.run(run(count, state_path))))


if __name__ == "__main__":
    main()
