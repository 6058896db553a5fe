#!/usr/bin/env python3
"""ims-fhir benchmarks: mapping, push, re-push, pull and memory, each beside its baseline.

    bench/run            # full sizes; writes bench/RESULTS.md and bench/results.json
    bench/run --quick    # tiny sizes (the test suite runs this as a smoke test)
    bench/run --profile  # also profile one push with pyinstrument (bench/profile-push.txt)
    bench/run --bulk-only --bulk 2000   # only the bulk rows (RESULTS-bulk.md, results-bulk.json)

Every number comes with the baseline measured in the same run, and the ratio between the two.
The encounters are deterministic (ims_fhir.synthetic_encounters, seeded). A local HAPI FHIR JPA
server (tests/hapi, its database on disk) is started unless FHIR_BASE_URL names one. Pushes
start after a warm-up push, and ims-fhir and the limit take turns going first, round by round.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import orjson
from fhir.resources.R4B.bundle import Bundle
from pyinstrument import Profiler

from ims_fhir import (
    AsyncFhirClient,
    BulkProgress,
    Encounter,
    FhirClient,
    Pusher,
    StateStore,
    bulk_pull,
    from_fhir,
    pull,
    synthetic_encounters,
    to_fhir_json,
)
from ims_fhir.mapping.identity import Kind, identifier_query, system
from ims_fhir.mapping.to_fhir import transaction_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from instant import InstantServer  # noqa: E402  (bench/ is not a package)

ROOT = Path(__file__).resolve().parents[1]
BATCH, CONCURRENCY = 10, 4
JSON = dict[str, Any]
LATENCY = 0.02  # seconds per request for the slow-link push: a regional server over a WAN
PULL_LIMIT = 1000  # encounters pulled back for the pull measurement
INSTANT = "https://instant.invalid/fhir"  # the in-process server of the client-CPU rows


@dataclass(frozen=True)
class Sizes:
    map: int  # encounters mapped each way
    map_runs: int
    push: list[int]  # encounters per push measurement
    peer: list[int]  # the push sizes the peer runs at too
    warmup: int  # encounters pushed before measuring
    latency: int  # encounters pushed over the slow link
    convert: tuple[int, int]  # encounters converted: small, large
    dry: tuple[int, int]  # encounters in push --dry-run: small, large
    one_bundle: tuple[int, int]  # encounters in one Bundle mapped back: small, large
    cpu: int  # encounters pushed through the instant server for the client-CPU rows
    incremental: int  # encounters on the server for the nightly-sync row (1 % changed)
    bulk: int  # encounters pulled page by page and with pull --bulk
    bulk_memory: tuple[int, int]  # encounters rebuilt from NDJSON per type: small, large


SIZES = {
    "quick": Sizes(
        20, 3, [20], [20], 10, 10, (50, 500), (100, 1000), (10, 200), 20, 20, 20, (100, 1000)
    ),
    "full": Sizes(
        300,
        5,
        [1000, 10000],
        [1000],
        1000,
        200,
        (10000, 100000),
        (10000, 100000),
        (100, 10000),
        1000,
        2000,
        10000,
        (10000, 100000),
    ),
}


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = next(
        (
            line.split()[1]
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        "0",
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(int(mem) / 1024 / 1024, 1),
        "python": platform.python_version(),
        "system": platform.platform(),
    }


def namespaced(records: list[Encounter], who: str, namespace: str = "") -> list[Encounter]:
    """The records under a fresh namespace (or ``namespace``): every push writes new resources."""
    namespace = namespace or f"https://bench-{who}-{uuid.uuid4().hex[:8]}.example/sid"
    return [
        r.model_copy(update={"clinic": r.clinic.model_copy(update={"namespace": namespace})})
        for r in records
    ]


def timed(func: Callable[[], Any]) -> float:
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


# -- 1. mapping ------------------------------------------------------------------------------


def streamed(func: Callable[[Any], Any], items: list[Any]) -> Callable[[], None]:
    """``func`` over ``items``, each result dropped at once, as ``convert`` and ``pull`` do.

    Keeping the results alive (a list of them) would make each case pay for the cyclic garbage
    collector walking every tree built so far: it tripled ``json.loads`` of 300 Bundles
    (0.6 ms against 0.17 ms each), a floor that flattered whatever was compared with it.
    """

    def run() -> None:
        for item in items:
            func(item)

    return run


def rebuild(node: Any) -> Any:
    """The same JSON tree in new dicts and lists: the least work that builds a Bundle's dicts."""
    if isinstance(node, dict):
        return {key: rebuild(value) for key, value in node.items()}
    if isinstance(node, list):
        return [rebuild(value) for value in node]
    return node


def as_served(text: str) -> str:
    """A Bundle as a server returns it: ids assigned, references literal, ``meta`` added.

    What ``pull`` and a bulk rebuild map back: every reference is read through what it points
    at, none is the ``urn:uuid`` the record's forward mapping writes.
    """
    bundle = json.loads(text)
    ids: dict[str, str] = {}
    for n, entry in enumerate(bundle["entry"]):
        resource = entry["resource"]
        resource["id"] = f"b{n}"
        resource["meta"] = {"versionId": "1", "lastUpdated": "2026-11-27T10:00:00Z"}
        ids[entry["fullUrl"]] = f"{resource['resourceType']}/b{n}"
    served = json.dumps(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [
                {"fullUrl": f"{INSTANT}/{ids[e['fullUrl']]}", "resource": e["resource"]}
                for e in bundle["entry"]
            ],
        }
    )
    for full_url, reference in ids.items():
        served = served.replace(json.dumps(full_url), json.dumps(reference))
    return served


def bench_mapping(size: int, runs: int) -> dict[str, Any]:
    """Forward and reverse mapping, one core, each beside its floor, rounds alternating.

    Forward: ``to_fhir_json`` (the record checked, the Bundle's dicts built and written by
    orjson) against the floor "build the same dicts and orjson.dumps them" (a generic rebuild of
    the finished dict tree: no mapping at all), and against ``validate=True`` (the same plus
    fhir.resources validation: what every Bundle cost before issue 15).
    Reverse: ``from_fhir`` of Bundle JSON against its floor, ``json.loads`` of the same text
    (reading it at all), and against fhir.resources parsing it into models (what a developer
    without ims-fhir would do first); and of the same Bundles as a server returns them.
    """
    records = list(synthetic_encounters(size, seed=1))
    texts = [to_fhir_json(r) for r in records]
    dicts = [json.loads(t) for t in texts]
    served = [as_served(t) for t in texts]
    for text in (texts[0], served[0]):
        report = from_fhir(text)
        assert len(report.records) == 1 and not report.errors, report.errors[:1]
    cases: dict[str, Callable[[], Any]] = {
        "forward": streamed(to_fhir_json, records),
        "floor_forward": streamed(lambda d: orjson.dumps(rebuild(d)), dicts),
        "validated_forward": streamed(lambda r: to_fhir_json(r, validate=True), records),
        "reverse": streamed(from_fhir, texts),
        "floor_reverse": streamed(json.loads, texts),
        "served_reverse": streamed(from_fhir, served),
        "floor_served_reverse": streamed(json.loads, served),
        "models_reverse": streamed(Bundle.model_validate_json, texts),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for n in range(runs):  # each round in another order
        for name in names[n % len(names) :] + names[: n % len(names)]:
            times[name].append(timed(cases[name]))
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "encounters": size,
        "runs": runs,
        **{f"{name}_per_s": size / med[name] for name in cases},
        "forward_ratio": med["forward"] / med["floor_forward"],
        "validated_over_fast": med["validated_forward"] / med["forward"],
        "reverse_ratio": med["reverse"] / med["floor_reverse"],
        "served_reverse_ratio": med["served_reverse"] / med["floor_served_reverse"],
        "reverse_over_models": med["reverse"] / med["models_reverse"],
    }


def bench_one_bundle(sizes: tuple[int, int], rounds: int = 3) -> dict[str, Any]:
    """Reverse mapping of one Bundle of many encounters: time per encounter, large vs small.

    One Bundle holding every resource of many encounters is what a server export, or
    ``convert`` of loose resources, gives the reverse mapping.

    The baseline is the same mapping of a small Bundle, run in the same rounds in alternating
    order; linear time means the same time per encounter (ratio ~1). The small Bundle is mapped
    as many times as it takes to hold as many encounters as the large one.
    """
    small, large = sizes

    def bundle(n: int) -> dict[str, Any]:
        entries: list[Any] = []
        for record in synthetic_encounters(n, seed=n):
            entries += json.loads(to_fhir_json(record))["entry"]
        return {"resourceType": "Bundle", "type": "collection", "entry": entries}

    bundles = {small: bundle(small), large: bundle(large)}
    per_encounter: dict[int, list[float]] = {small: [], large: []}
    for n in range(rounds):
        for size in (small, large) if n % 2 == 0 else (large, small):
            repeat = large // small if size == small else 1
            report = from_fhir(bundles[size])
            assert len(report.records) == size and not report.errors, report.errors[:3]
            seconds = timed(
                lambda size=size, repeat=repeat: [  # type: ignore[misc]
                    from_fhir(bundles[size]) for _ in range(repeat)
                ]
            )
            per_encounter[size].append(seconds / (size * repeat))
    med = statistics.median
    return {
        "small": small,
        "large": large,
        "rounds": rounds,
        "small_per_s": 1 / med(per_encounter[small]),
        "large_per_s": 1 / med(per_encounter[large]),
        "ratio": med(per_encounter[large]) / med(per_encounter[small]),
        "round_ratios": [
            a / b for a, b in zip(per_encounter[large], per_encounter[small], strict=True)
        ],
    }


# -- 2. the push client's own CPU ---------------------------------------------------------------


def changed(record: Encounter) -> Encounter:
    """The edit a clinic makes: the first pain score corrected, else the visit ended later."""
    if record.pain:
        first = record.pain[0]
        pain = [first.model_copy(update={"nrs": (first.nrs + 3) % 11}), *record.pain[1:]]
        return record.model_copy(update={"pain": pain})
    return record.model_copy(update={"end": record.end + dt.timedelta(minutes=5)})


async def _ours_cpu(server: InstantServer, records: list[Encounter], state: StateStore) -> float:
    """Client CPU seconds of one push through the instant server (its own time taken out)."""
    async with AsyncFhirClient(INSTANT, transport=server.transport) as client:
        pusher = Pusher(client, state, batch_size=BATCH, concurrency=CONCURRENCY)
        served, cpu = server.seconds, time.process_time()
        actions = Counter([r.action async for r in pusher.push(records)])
        spent = time.process_time() - cpu - (server.seconds - served)
    if not set(actions) <= {"created", "updated", "entered-in-error"}:
        raise SystemExit(f"the client-CPU push did not write every encounter: {dict(actions)}")
    return spent


async def _loop_cpu(server: InstantServer, records: list[Encounter]) -> float:
    """The floor: a hand-written loop mapping each batch, writing it with orjson and posting it."""
    async with httpx.AsyncClient(transport=server.transport) as http:
        served, cpu = server.seconds, time.process_time()
        for start in range(0, len(records), BATCH):
            body = transaction_json(records[start : start + BATCH]).encode()
            answer = await http.post(
                INSTANT, content=body, headers={"Content-Type": "application/fhir+json"}
            )
            answer.raise_for_status()
        return time.process_time() - cpu - (server.seconds - served)


def bench_client_cpu(size: int, rounds: int, workdir: Path) -> dict[str, Any]:
    """The push client's CPU per encounter, against a server that answers at once.

    bench/instant.py answers in the same process; the time it spends is taken out. ims-fhir
    pushes ``size`` new encounters, then the same encounters each edited (reads, plans and
    updates), into a fresh state; the floor maps the same batches with ``transaction_json`` and
    posts them with a bare httpx client. Rounds alternate which goes first.
    """
    records = list(synthetic_encounters(size, seed=7))
    edited = [changed(r) for r in records]
    times: dict[str, list[float]] = {"create": [], "update": [], "loop": []}
    for number in range(rounds):
        for which in ("ours", "loop") if number % 2 == 0 else ("loop", "ours"):
            if which == "loop":
                times["loop"].append(asyncio.run(_loop_cpu(InstantServer(), records)))
                continue
            server = InstantServer()
            with StateStore(workdir / f"cpu-{size}-{number}.sqlite3") as state:
                times["create"].append(asyncio.run(_ours_cpu(server, records, state)))
                times["update"].append(asyncio.run(_ours_cpu(server, edited, state)))
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "encounters": size,
        "rounds": rounds,
        "batch_size": BATCH,
        "concurrency": CONCURRENCY,
        **{f"{name}_ms": 1000 * med[name] / size for name in times},
        "create_over_loop": med["create"] / med["loop"],
        "update_over_create": med["update"] / med["create"],
        "round_ratios": [c / lo for c, lo in zip(times["create"], times["loop"], strict=True)],
    }


# -- 3-5. push, re-push, pull ------------------------------------------------------------------


class Counting(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.methods: Counter[str] = Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.methods[request.method] += 1
        return await super().handle_async_request(request)


async def push_ours(
    base: str, records: list[Encounter], state: StateStore, profiler: Profiler | None = None
) -> dict[str, Any]:
    """Push with ims-fhir; wall time, client CPU time, actions and requests by method."""
    transport = Counting()
    async with AsyncFhirClient(base, transport=transport, timeout=300) as client:
        pusher = Pusher(client, state, batch_size=BATCH, concurrency=CONCURRENCY)
        if profiler is not None:
            profiler.start()
        cpu, start = time.process_time(), time.perf_counter()
        actions = Counter([r.action async for r in pusher.push(records)])
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        if profiler is not None:
            profiler.stop()
    return {"s": seconds, "cpu_s": cpu, "actions": actions, "methods": transport.methods}


def prebuilt(records: list[Encounter], *, creates: bool = True) -> tuple[JSON, list[JSON]]:
    """The transactions the limit and the peer post, built before their clocks start.

    A prelude creating every shared resource (clinics, patients, practitioners) in one
    transaction, which only a loop that knows every record in advance can do: concurrent
    transactions that each conditionally create the same patient race, and the server refuses
    all but one. (ims-fhir streams its input: it creates each shared resource in the first
    transaction that needs it and holds back the others that need it until that one is done.)
    Then one transaction per ``BATCH`` encounters, as ``transaction_json`` maps them, each
    resource that has an identifier written as ims-fhir writes it on a first push: a conditional
    create (``ifNoneExist``), which never replaces what is there. With ``creates=False`` they
    stay the mapping's conditional updates (``PUT Type?identifier=``), which replace whatever
    holds the identifier: less work for HAPI (it keeps a row per conditional create to enforce
    its uniqueness) but another, unsafe job.
    """
    bundles = [
        orjson.loads(transaction_json(records[i : i + BATCH]))
        for i in range(0, len(records), BATCH)
    ]
    shared = {
        e["fullUrl"]: e for b in bundles for e in b["entry"] if e["request"]["method"] == "POST"
    }
    if creates:
        for bundle in bundles:
            for entry in bundle["entry"]:
                request, resource = entry["request"], entry["resource"]
                if request["method"] == "PUT" and "?" in request["url"]:
                    identifier = resource["identifier"][0]
                    entry["request"] = {
                        "method": "POST",
                        "url": resource["resourceType"],
                        "ifNoneExist": identifier_query(identifier["system"], identifier["value"]),
                    }
    prelude = {"resourceType": "Bundle", "type": "transaction", "entry": list(shared.values())}
    return prelude, bundles


async def push_limit(base: str, records: list[Encounter], *, creates: bool = True) -> float:
    """The limit: the pre-built transactions (see ``prebuilt``) posted by a bare httpx loop.

    ims-fhir's resources also carry their sync signature in ``meta`` (an extension) and each
    first push looks for what is on the server first (a batch of reads); the limit does neither.
    """
    prelude, bundles = prebuilt(records, creates=creates)
    bodies = [orjson.dumps(b) for b in bundles]
    async with httpx.AsyncClient(timeout=300) as http:

        async def post(body: bytes) -> None:
            answer = await http.post(
                base, content=body, headers={"Content-Type": "application/fhir+json"}
            )
            answer.raise_for_status()

        start = time.perf_counter()
        await post(orjson.dumps(prelude))
        await _workers(bodies, post)
        return time.perf_counter() - start


async def push_peer(base: str, records: list[Encounter]) -> float:
    """The peer: fhirpy in its best mode for the job, as a developer without ims-fhir writes it.

    Its async client posts the mapping's transactions (conditional updates; mapping outside its
    clock), the same number at a time; what it re-posts is written again whether it changed or
    not, and what a record no longer holds stays on the server.
    """
    from fhirpy import AsyncFHIRClient

    prelude, bundles = prebuilt(records, creates=False)
    client = AsyncFHIRClient(base)

    async def post(bundle: JSON) -> None:
        await client.execute("", method="post", data=bundle)

    start = time.perf_counter()
    await post(prelude)
    await _workers(bundles, post)
    return time.perf_counter() - start


async def _workers(items: list[Any], post: Callable[[Any], Any]) -> None:
    """Post ``items`` with ``CONCURRENCY`` requests in flight."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def worker() -> None:
        while not queue.empty():
            await post(queue.get_nowait())

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def pull_rate(base: str) -> tuple[int, float]:
    async with AsyncFhirClient(base, timeout=300) as client:
        start = time.perf_counter()
        count = 0
        async for report in pull(client, page_size=50):
            count += len(report.records)
            if count >= PULL_LIMIT:
                break
        return count, time.perf_counter() - start


def warm_up(base: str, size: int, workdir: Path) -> None:
    """Push a few hundred encounters both ways first: a cold JVM runs the first ones slowly."""
    records = list(synthetic_encounters(size, seed=0))
    with StateStore(workdir / "state-warmup.sqlite3") as state:
        asyncio.run(push_ours(base, namespaced(records, "warmup"), state))
    asyncio.run(push_limit(base, namespaced(records, "warmup")))


def bench_push(base: str, size: int, rounds: int, peer: bool, workdir: Path) -> dict[str, Any]:
    """Ours against the limit (and the peer), ``rounds`` times, rotating which goes first.

    The server slows as its database grows, so each round's ratio compares neighbouring pushes,
    and rotating the order cancels the drift.
    """
    records = list(synthetic_encounters(size, seed=size))
    out: dict[str, Any] = {
        "encounters": size,
        "batch_size": BATCH,
        "concurrency": CONCURRENCY,
        "rounds": [],
    }
    names = ["ours", "limit", "updates", "peer"] if peer else ["ours", "limit"]
    for number in range(rounds):
        round_: dict[str, Any] = {}
        for which in names[number % len(names) :] + names[: number % len(names)]:
            if which == "limit":
                round_["limit_s"] = asyncio.run(push_limit(base, namespaced(records, "limit")))
                continue
            if which == "updates":
                round_["updates_s"] = asyncio.run(
                    push_limit(base, namespaced(records, "updates"), creates=False)
                )
                continue
            if which == "peer":
                round_["peer_s"] = asyncio.run(push_peer(base, namespaced(records, "peer")))
                continue
            with StateStore(workdir / f"state-{size}-{number}.sqlite3") as state:
                ours = namespaced(records, "ours")
                first = asyncio.run(push_ours(base, ours, state))
                round_ |= {"ours_s": first["s"], "ours_cpu_s": first["cpu_s"]}
                if number == 0:
                    again = asyncio.run(push_ours(base, ours, state))
                    out |= {
                        "ours_actions": dict(first["actions"]),
                        "ours_requests": dict(first["methods"]),
                        "repush_s": again["s"],
                        "repush_of_s": first["s"],
                        "repush_fraction": again["s"] / first["s"],
                        "repush_requests": sum(again["methods"].values()),
                        "repush_writes": sum(v for k, v in again["methods"].items() if k != "GET"),
                        "repush_actions": dict(again["actions"]),
                    }
        round_["ours_over_limit"] = round_["limit_s"] / round_["ours_s"]
        if peer:
            round_["ours_over_peer"] = round_["peer_s"] / round_["ours_s"]
            round_["ours_over_updates"] = round_["updates_s"] / round_["ours_s"]
        out["rounds"].append(round_)
        print(f"push {size}, round {number + 1}/{rounds}:", json.dumps(round_), flush=True)
    return summarize_push(out)


def summarize_push(out: dict[str, Any]) -> dict[str, Any]:
    """Totals over the rounds: with the order alternating, the server's drift cancels out."""
    size, rounds = out["encounters"], out["rounds"]
    ours_s = sum(r["ours_s"] for r in rounds) / len(rounds)
    limit_s = sum(r["limit_s"] for r in rounds) / len(rounds)
    out |= {
        "ours_s": ours_s,
        "ours_per_s": size / ours_s,
        "ours_cpu_share": sum(r["ours_cpu_s"] for r in rounds) / sum(r["ours_s"] for r in rounds),
        "limit_s": limit_s,
        "limit_per_s": size / limit_s,
        "ours_over_limit": limit_s / ours_s,
    }
    if "peer_s" in rounds[0]:
        peer_s = sum(r["peer_s"] for r in rounds) / len(rounds)
        out |= {
            "peer_s": peer_s,
            "peer_per_s": size / peer_s,
            "ours_over_peer": peer_s / ours_s,
            "limit_over_peer": peer_s / limit_s,
        }
        updates_s = sum(r["updates_s"] for r in rounds) / len(rounds)
        out |= {"updates_per_s": size / updates_s, "ours_over_updates": updates_s / ours_s}
    return out


@contextmanager
def slow_link(base: str, latency: float) -> Iterator[str]:
    """The server behind tests/faultproxy.py adding ``latency`` to every request (its own process)."""
    code = (
        "import sys; from tests.faultproxy import FaultPlan, FaultProxy\n"
        "with FaultProxy(sys.argv[1], FaultPlan(latency=float(sys.argv[2]))) as proxy:\n"
        "    print(proxy.url, flush=True); sys.stdin.read()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, base, str(latency)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdin is not None
    try:
        yield process.stdout.readline().strip()
    finally:
        process.stdin.close()
        process.wait(timeout=60)
        process.stdout.close()


def removed(record: Encounter) -> Encounter:
    """The other change a clinic makes: the last finding, needled site or pain score removed."""
    update: dict[str, Any] = {}
    if record.assessment and len(record.assessment.findings) > 1:
        findings = record.assessment.findings[:-1]
        update["assessment"] = record.assessment.model_copy(update={"findings": findings})
    elif record.treatment and len(record.treatment.sites) > 1:
        update["treatment"] = record.treatment.model_copy(
            update={"sites": record.treatment.sites[:-1]}
        )
    elif len(record.pain) > 1:
        update["pain"] = record.pain[:-1]
    return record.model_copy(update=update) if update else changed(record)


def bench_incremental(
    base: str, size: int, share: float, workdir: Path, rounds: int = 4
) -> dict[str, Any]:
    """The nightly sync: ``size`` encounters on the server, ``share`` of them changed since.

    Half the changed ones edited, half with a part removed. ims-fhir pushes all ``size`` again
    (its state skips the unchanged ones, reads and updates the changed ones, retires what was
    removed); the fhirpy script re-posts everything (what a developer without ims-fhir does:
    its conditional updates rewrite every resource, and what a record no longer holds stays on
    the server); the limit posts the changed encounters alone. Each loaded its own copy first,
    untimed. ims-fhir and the limit run ``rounds`` nights, each changing another ``share`` of
    the encounters, in alternating order; the peer's re-post of everything runs once (it takes
    minutes, and its ratio is far from the target either way).
    """
    records = list(synthetic_encounters(size, seed=size + 7))
    step = max(1, round(1 / share))
    who = {name: namespaced(records, name) for name in ("ours", "peer", "limit")}
    nights: list[tuple[list[Encounter], list[int]]] = []
    current = list(records)
    for night in range(rounds):
        picked = list(range(night % step, size, step))
        current = list(current)
        for n, index in enumerate(picked):
            before = current[index]
            current[index] = changed(before) if n % 2 == 0 else removed(before)
        nights.append((current, picked))
    renamed = [
        {
            name: namespaced(after, name, loaded[0].clinic.namespace or "")
            for name, loaded in who.items()
        }
        for after, _ in nights
    ]
    ours_s: list[float] = []
    limit_s: list[float] = []
    actions: Counter[str] = Counter()
    methods: Counter[str] = Counter()
    with StateStore(workdir / f"state-incremental-{size}.sqlite3") as state:
        asyncio.run(push_ours(base, who["ours"], state))
        asyncio.run(push_peer(base, who["peer"]))
        asyncio.run(push_limit(base, who["limit"], creates=False))
        peer_s = asyncio.run(push_peer(base, renamed[0]["peer"]))
        for night, (_, picked) in enumerate(nights):
            changed_only = [renamed[night]["limit"][i] for i in picked]
            for which in ("ours", "limit") if night % 2 == 0 else ("limit", "ours"):
                if which == "ours":
                    ours = asyncio.run(push_ours(base, renamed[night]["ours"], state))
                    ours_s.append(ours["s"])
                    actions.update(ours["actions"])
                    methods.update(ours["methods"])
                else:
                    limit_s.append(asyncio.run(push_limit(base, changed_only, creates=False)))
    med = statistics.median
    return {
        "encounters": size,
        "changed": len(nights[0][1]),
        "rounds": rounds,
        "batch_size": BATCH,
        "concurrency": CONCURRENCY,
        "ours_s": med(ours_s),
        "ours_actions": dict(actions),
        "ours_requests": dict(methods),
        "peer_s": peer_s,
        "limit_s": med(limit_s),
        "ours_over_peer": peer_s / med(ours_s),
        "ours_over_limit": med(ours_s) / med(limit_s),
        "round_ratios": [o / lim for o, lim in zip(ours_s, limit_s, strict=True)],
    }


def bench_latency(base: str, size: int, latency: float, workdir: Path) -> dict[str, Any]:
    """Ours, the limit and the peer over a link with ``latency`` per request, like a WAN."""
    records = list(synthetic_encounters(size, seed=size + 1))
    with slow_link(base, latency) as url, StateStore(workdir / "state-latency.sqlite3") as state:
        ours = asyncio.run(push_ours(url, namespaced(records, "ours"), state))["s"]
        limit = asyncio.run(push_limit(url, namespaced(records, "limit")))
        peer = asyncio.run(push_peer(url, namespaced(records, "peer")))
    return {
        "encounters": size,
        "latency_ms": latency * 1000,
        "ours_per_s": size / ours,
        "limit_per_s": size / limit,
        "peer_per_s": size / peer,
        "ours_over_limit": limit / ours,
        "ours_over_peer": peer / ours,
    }


# -- 4b. bulk pull ----------------------------------------------------------------------------


def group_of_patients(base: str, namespace: str) -> str:
    """A Group of the namespace's patients: what a Bulk Data server exports for a cohort."""
    with FhirClient(base, timeout=300) as client:
        patients = client.search(
            "Patient",
            {"identifier": system(namespace, Kind.PATIENT) + "|", "_count": "500"},
            raw=True,
        )
        members = [{"entity": {"reference": f"Patient/{p['id']}"}} for p in patients]
        outcome = client.create(
            {"resourceType": "Group", "type": "person", "actual": True, "member": members}
        )
    assert outcome.id
    return outcome.id


async def pull_paged(base: str, namespace: str) -> tuple[int, float]:
    async with AsyncFhirClient(base, timeout=300) as client:
        start = time.perf_counter()
        count = 0
        async for report in pull(client, namespace=namespace, page_size=50):
            count += len(report.records)
        return count, time.perf_counter() - start


async def pull_bulk(
    base: str, namespace: str, group: str | None, work: Path
) -> tuple[int, float, float]:
    """Encounters, seconds in all, seconds until the manifest came (the server's export).

    A Group export with ``group``, else a system-level one (``$export``; every IMS encounter on
    the server is exported, the namespace's are kept).
    """

    async def poll_sleep(seconds: float) -> None:
        await asyncio.sleep(min(seconds, 1.0))  # HAPI asks for 120 s whatever the job

    exported: list[float] = []

    def progress(step: BulkProgress) -> None:
        if step.stage == "downloading" and not exported:
            exported.append(time.perf_counter())

    async with AsyncFhirClient(base, timeout=300) as client:
        start = time.perf_counter()
        count = 0
        async for report in bulk_pull(
            client,
            work,
            level="system" if group is None else "group",
            group=group,
            namespace=namespace,
            sleep=poll_sleep,
            on_progress=progress,
        ):
            count += len(report.records)
        return count, time.perf_counter() - start, exported[0] - start


def bench_bulk(base: str, size: int, workdir: Path) -> dict[str, Any]:
    """The same encounters pulled page by page and with Bulk Data $export (a Group of them)."""
    records = namespaced(list(synthetic_encounters(size, seed=77_000 + size)), "bulk")
    namespace = str(records[0].clinic.namespace)
    with StateStore(workdir / "state-bulk.sqlite3") as state:
        pushed = asyncio.run(push_ours(base, records, state))
    group = group_of_patients(base, namespace)
    paged_n, paged_s = asyncio.run(pull_paged(base, namespace))
    bulk_n, bulk_s, export_s = asyncio.run(pull_bulk(base, namespace, group, workdir / "bulk"))
    system_n, system_s, system_export_s = asyncio.run(
        pull_bulk(base, namespace, None, workdir / "bulk-system")
    )
    assert paged_n == bulk_n == system_n == size, (paged_n, bulk_n, system_n, size)
    return {
        "encounters": size,
        "push_s": pushed["s"],
        "paged_s": paged_s,
        "bulk_s": bulk_s,
        "bulk_export_s": export_s,
        "bulk_client_s": bulk_s - export_s,
        "bulk_client_per_s": size / (bulk_s - export_s),
        "paged_per_s": size / paged_s,
        "bulk_per_s": size / bulk_s,
        "bulk_over_paged": paged_s / bulk_s,
        "system_s": system_s,
        "system_export_s": system_export_s,
        "system_client_s": system_s - system_export_s,
        "system_per_s": size / system_s,
        "system_over_paged": paged_s / system_s,
    }


_REBUILD = """
import sys
from pathlib import Path
from ims_fhir import rebuild_ndjson
files = sorted(Path(sys.argv[1]).glob("*.ndjson"))
count = sum(len(r.records) for r in rebuild_ndjson(files, index_dir=sys.argv[2]))
assert count == int(sys.argv[3]), count
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(hwm, file=sys.stderr)
"""


def bench_bulk_memory(sizes: tuple[int, int], workdir: Path) -> dict[str, Any]:
    """Peak RSS of the bulk rebuild, from NDJSON per type (convert --ndjson-per-type), offline."""
    out: dict[str, Any] = {}
    for count in sizes:
        source = workdir / f"enc-{count}.ndjson"
        if not source.exists():
            write_ndjson(source, count)
        files = workdir / f"per-type-{count}"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "ims_fhir",
                "convert",
                str(source),
                "--ndjson-per-type",
                str(files),
            ],
            check=True,
            capture_output=True,
        )
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c", _REBUILD, str(files), str(workdir), str(count)],
            capture_output=True,
            text=True,
            check=True,
        )
        out[f"{count}_s"] = time.perf_counter() - start
        out[str(count)] = int(result.stderr.strip().splitlines()[-1])
    small, large = sizes
    out["ratio"] = out[str(large)] / out[str(small)]
    out["large_per_s"] = large / out[f"{large}_s"]
    return out


# -- 5. memory ---------------------------------------------------------------------------------


def peak_rss_kib(args: list[str]) -> int:
    """Peak resident memory (KiB) of the CLI run in a fresh process.

    Read from the process's own VmHWM: ru_maxrss would carry over the parent's peak, which
    Linux keeps across exec.
    """
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['ims-fhir', *{args!r}]\n"
        "try:\n    runpy.run_module('ims_fhir', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "print(hwm, file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return int(result.stderr.strip().splitlines()[-1])


def write_ndjson(path: Path, count: int) -> None:
    with path.open("w", encoding="utf-8") as out:
        for record in synthetic_encounters(count, seed=7):
            out.write(record.model_dump_json() + "\n")


def bench_memory(sizes: dict[str, tuple[int, int]], workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (small, large) in sizes.items():
        rss = {}
        for count in (small, large):
            source = workdir / f"enc-{count}.ndjson"
            if not source.exists():
                write_ndjson(source, count)
            if name == "convert":
                args = ["convert", str(source), "-o", os.devnull]
            else:
                args = [
                    "push",
                    str(source),
                    "--server",
                    "http://127.0.0.1:9/fhir",
                    "--dry-run",
                    "--state",
                    str(workdir / f"dry-{count}.sqlite3"),
                ]
            start = time.perf_counter()
            rss[count] = peak_rss_kib(args)
            out[f"{name}_{count}_s"] = time.perf_counter() - start
        out[name] = {str(k): v for k, v in rss.items()}
        out[f"{name}_ratio"] = rss[large] / rss[small]
    return out


def bench_repush(sizes: tuple[int, int], workdir: Path) -> dict[str, Any]:
    """A re-push of unchanged encounters: peak RSS large vs small, and its first result.

    bench/repush.py, in fresh processes: the first push goes through the instant server, the
    re-push to a port nothing listens on (one request would fail it: nothing is sent).
    """
    out: dict[str, Any] = {}
    for count in sizes:
        state = workdir / f"repush-{count}.sqlite3"
        for mode in ("first", "again"):
            result = subprocess.run(
                [sys.executable, str(ROOT / "bench" / "repush.py"), mode, str(count), str(state)],
                capture_output=True,
                text=True,
                check=True,
            )
            out[f"{mode}_{count}"] = json.loads(result.stdout.strip().splitlines()[-1])
        again = out[f"again_{count}"]
        if again["actions"] != {"unchanged": count}:
            raise SystemExit(f"the re-push of {count} did not find all unchanged: {again}")
    small, large = sizes
    out["ratio"] = out[f"again_{large}"]["peak_rss_kib"] / out[f"again_{small}"]["peak_rss_kib"]
    return out


# -- running -----------------------------------------------------------------------------------


@contextmanager
def server() -> Iterator[str]:
    if os.environ.get("FHIR_BASE_URL"):
        yield os.environ["FHIR_BASE_URL"].rstrip("/")
        return
    # Its database on disk, not in the heap: tens of thousands of encounters would fill a
    # heap, and a server spending its time collecting garbage measures nothing of ours.
    here = Path(tempfile.mkdtemp(prefix="ims-fhir-bench-"))
    log = here / "server.log"
    process = subprocess.Popen(
        [
            str(ROOT / "tests" / "hapi" / "run"),
            "--log",
            str(log),
            "--",
            f"--ims.h2-url=jdbc:h2:file:{here / 'db'}",
            # Batch2 advances a Bulk Data export once per pass: once a minute on stock HAPI,
            # which alone takes an export 3-4 minutes (see RESULTS.md).
            "--ims.batch2-maintenance-ms=2000",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"IMS_FHIR_HAPI_XMX": os.environ.get("IMS_FHIR_HAPI_XMX", "2g")},
    )
    assert process.stdout is not None
    base = process.stdout.readline().strip()
    if not base:
        raise SystemExit(f"the HAPI server did not start; see {log}")
    try:
        yield base
    finally:
        process.terminate()
        process.wait(timeout=60)
        process.stdout.close()
        for path in here.glob("db*"):
            path.unlink()


def bulk_rows(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if "bulk" in results:
        b = results["bulk"]
        lines.append(
            f"| pull --bulk vs paged pull, the same {b['encounters']:,} encounters (a Group export of their patients; Batch2 maintenance every 2 s), enc/s | {b['bulk_per_s']:.1f} ({b['bulk_s']:.1f} s) | {b['paged_per_s']:.1f} ({b['paged_s']:.1f} s, pull, page size 50) | {b['bulk_over_paged']:.2f}x the speed | >= 10x at 10,000 |"
        )
        lines.append(
            f"| of which: HAPI's export (kick-off to manifest) / ims-fhir's part (download, index, rebuild), s | {b['bulk_export_s']:.1f} / {b['bulk_client_s']:.1f} ({b['bulk_client_per_s']:.0f} enc/s) | {b['paged_s']:.1f} (paged pull) | ims-fhir's part: {b['paged_s'] / b['bulk_client_s']:.1f}x faster than a paged pull | |"
        )
        if "system_s" in b:
            lines.append(
                f"| pull --bulk --level system (every IMS encounter on the server exported, the warm-up's too; the {b['encounters']:,} kept by namespace), enc/s | {b['system_per_s']:.1f} ({b['system_s']:.1f} s: export {b['system_export_s']:.1f} s, ims-fhir {b['system_client_s']:.1f} s) | {b['paged_per_s']:.1f} ({b['paged_s']:.1f} s, paged pull) | {b['system_over_paged']:.2f}x the speed | >= 10x at 10,000 |"
            )
    if "bulk_memory" in results:
        bm = results["bulk_memory"]
        small, large = (k for k in bm if k.isdigit())
        lines.append(
            f"| peak RSS, bulk rebuild from NDJSON per type (offline): {int(large):,} vs {int(small):,} encounters | {bm[large] / 1024:.0f} MiB ({bm['large_per_s']:.0f} enc/s) | {bm[small] / 1024:.0f} MiB | {bm['ratio']:.2f}x | flat (~1x) |"
        )
    return lines


def table(results: dict[str, Any]) -> str:
    lines = [
        f"Measured {results['date']} on {results['machine']['cpu']} ({results['machine']['cores']} cores, "
        f"{results['machine']['memory_gib']} GiB), Python {results['machine']['python']}; mode `{results['mode']}`.",
        "",
        "| measure | ims-fhir | baseline | ratio | target |",
        "|---|---|---|---|---|",
        *cpu_rows(results),
    ]
    lines += server_rows(results)
    lines += memory_rows(results)
    return "\n".join(lines) + "\n"


def cpu_rows(results: dict[str, Any]) -> list[str]:
    """The rows measured on one core without a server: mapping each way, the client's CPU."""
    m = results["mapping"]
    lines = [
        f"| mapping forward, one core ({m['encounters']} encounters, {m['runs']} rounds, order rotating): to_fhir_json, enc/s | {m['forward_per_s']:.0f} | {m['floor_forward_per_s']:.0f} (floor: the same dicts rebuilt + orjson.dumps) | {m['forward_ratio']:.2f}x the time | >= 1,500 enc/s; <= 2x |",
        f"| mapping forward with validate=True (+ fhir.resources models), enc/s | {m['validated_forward_per_s']:.0f} | {m['forward_per_s']:.0f} (to_fhir_json) | {m['validated_over_fast']:.1f}x the time | |",
        f"| mapping reverse (Bundle JSON -> record, each encounter checked against its record mapped forward again), enc/s | {m['reverse_per_s']:.0f} | {m['floor_reverse_per_s']:.0f} (floor: json.loads of the same text) | {m['reverse_ratio']:.1f}x the time | |",
        f"| mapping reverse against fhir.resources parsing the same Bundles into models, enc/s | {m['reverse_per_s']:.0f} | {m['models_reverse_per_s']:.0f} (fhir.resources parse) | {m['reverse_over_models']:.2f}x the time | <= 1.5x |",
    ]
    if "served_reverse_per_s" in m:
        lines.append(
            f"| mapping reverse of the same Bundles as a server returns them (ids assigned, references literal, meta), enc/s | {m['served_reverse_per_s']:.0f} | {m['floor_served_reverse_per_s']:.0f} (floor: json.loads of the same text) | {m['served_reverse_ratio']:.1f}x the time | |"
        )
    ob = results["one_bundle"]
    spread = ", ".join(f"{r:.2f}" for r in ob["round_ratios"])
    lines.append(
        f"| mapping reverse, one Bundle of {ob['large']:,} encounters ({ob['rounds']} rounds, alternating), enc/s | {ob['large_per_s']:.0f} | {ob['small_per_s']:.0f} (the same, {ob['small']} encounters per Bundle) | {ob['ratio']:.2f}x the time per encounter (rounds: {spread}) | <= 1.2x |"
    )
    if "client_cpu" in results:
        c = results["client_cpu"]
        spread = ", ".join(f"{r:.2f}" for r in c["round_ratios"])
        config = f"{c['encounters']:,} encounters, batch {c['batch_size']}, concurrency {c['concurrency']}, {c['rounds']} rounds, alternating"
        lines += [
            f"| push client CPU per new encounter, against an instant in-process server ({config}), ms | {c['create_ms']:.2f} | {c['loop_ms']:.2f} (floor: a hand-written loop, transaction_json + httpx post) | {c['create_over_loop']:.2f}x (rounds: {spread}) | <= 1.5x |",
            f"| push client CPU per changed encounter (the same, each edited: read back, compared, updated), ms | {c['update_ms']:.2f} | {c['create_ms']:.2f} (a new encounter) | {c['update_over_create']:.2f}x | <= 2x |",
        ]
    return lines


def server_rows(results: dict[str, Any]) -> list[str]:
    """The rows measured against the benchmark's HAPI (none in an offline run)."""
    lines: list[str] = []
    for p in results.get("push", []):
        n = p["encounters"]
        spread = ", ".join(f"{r['ours_over_limit']:.2f}" for r in p["rounds"])
        lines.append(
            f"| push {n} encounters (batch {p['batch_size']}, concurrency {p['concurrency']}, {len(p['rounds'])} rounds, alternating), enc/s | {p['ours_per_s']:.1f} | {p['limit_per_s']:.1f} (bare httpx posting the same requests, pre-built: conditional creates) | {p['ours_over_limit']:.2f} of the limit (rounds: {spread}) | >= 0.9 |"
        )
        if "updates_per_s" in p:
            lines.append(
                f"| push {n} encounters vs bare httpx posting conditional updates instead (replacing whatever holds an identifier: another, unsafe job), enc/s | {p['ours_per_s']:.1f} | {p['updates_per_s']:.1f} | {p['ours_over_updates']:.2f} of its speed | |"
            )
        if "peer_per_s" in p:
            peer_spread = ", ".join(f"{r['ours_over_peer']:.2f}" for r in p["rounds"])
            lines.append(
                f"| push {n} new encounters vs fhirpy (its async client posting the same pre-built transactions, batch {p['batch_size']}, concurrency {p['concurrency']}, in the same {len(p['rounds'])} rounds), enc/s | {p['ours_per_s']:.1f} | {p['peer_per_s']:.1f} (fhirpy) | {p['ours_over_peer']:.2f}x its speed (the limit: {p['limit_over_peer']:.2f}x; rounds: {peer_spread}) | |"
            )
        lines.append(
            f"| client CPU while pushing {n} | {100 * p['ours_cpu_share']:.0f} % of one core | | | |"
        )
        lines.append(
            f"| re-push {n} unchanged | {p['repush_writes']} writes, {p['repush_s']:.2f} s | first push {p['repush_of_s']:.1f} s | {100 * p['repush_fraction']:.1f} % of the time | 0 writes, <= 5 % |"
        )
    if "incremental" in results:
        lines.append(nightly_row(results["incremental"]))
    if "latency" in results:
        lat = results["latency"]
        lines.append(
            f"| push {lat['encounters']} encounters over a link adding {lat['latency_ms']:.0f} ms per request, enc/s | {lat['ours_per_s']:.1f} | {lat['limit_per_s']:.1f} (limit); {lat['peer_per_s']:.1f} (fhirpy) | {lat['ours_over_limit']:.2f} of the limit; {lat['ours_over_peer']:.1f}x fhirpy | |"
        )
    if "pull" in results:
        pr = results["pull"]
        lines.append(f"| pull, enc/s | {pr['per_s']:.1f} ({pr['encounters']} encounters) | | | |")
    return lines + bulk_rows(results)


def memory_rows(results: dict[str, Any]) -> list[str]:
    """The rows of speed and peak memory at scale, in fresh processes."""
    lines: list[str] = []
    mem = results["memory"]
    small, large = list(mem["convert"])
    lines.append(
        f"| convert (the CLI, end to end: read, check, map, write), {int(large):,} encounters, enc/s | {int(large) / mem[f'convert_{large}_s']:.0f} | | | |"
    )
    for name, label in (("convert", "convert"), ("dry", "push --dry-run")):
        small, large = list(mem[name])
        lines.append(
            f"| peak RSS, {label}: {int(large):,} vs {int(small):,} encounters | {mem[name][large] / 1024:.0f} MiB | {mem[name][small] / 1024:.0f} MiB | {mem[f'{name}_ratio']:.2f}x | flat (~1x) |"
        )
    if "repush" in results:
        rp = results["repush"]
        small, large = sorted(int(k.split("_")[1]) for k in rp if k.startswith("again_"))
        big, little = rp[f"again_{large}"], rp[f"again_{small}"]
        config = f"batch {BATCH}, concurrency {CONCURRENCY}; the state from a first push through the instant server; nothing sent"
        lines.append(
            f"| peak RSS, re-push of unchanged encounters ({config}): {large:,} vs {small:,} | {big['peak_rss_kib'] / 1024:.0f} MiB ({big['s']:.1f} s) | {little['peak_rss_kib'] / 1024:.0f} MiB ({little['s']:.1f} s) | {rp['ratio']:.2f}x | <= 1.05x |"
        )
        lines.append(
            f"| re-push of {large:,} unchanged: first result after, s | {big['first_result_s']:.3f} | | | <= 1 s |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench", help="where to write the results"
    )
    parser.add_argument(
        "--push", type=int, nargs="+", metavar="N", help="push sizes (default: 1000 10000)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        metavar="R",
        help="push rounds per size (default: 4 up to 2,000 encounters, else 2; --quick: 1)",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="only what needs no server: mapping and memory (RESULTS-offline.md)",
    )
    parser.add_argument(
        "--bulk", type=int, metavar="N", help="encounters of the bulk pull row (default: 10000)"
    )
    parser.add_argument(
        "--bulk-memory",
        type=int,
        nargs=2,
        metavar=("SMALL", "LARGE"),
        help="encounters of the bulk rebuild memory row (default: 10000 100000; with "
        "--bulk-only, 0 0 leaves it out)",
    )
    parser.add_argument(
        "--bulk-only",
        action="store_true",
        help="only the bulk rows: pull --bulk vs pull, rebuild memory (RESULTS-bulk.md)",
    )
    parser.add_argument(
        "--nightly-only",
        type=int,
        metavar="N",
        help="only the nightly-sync row, N encounters on the server (RESULTS-nightly.md)",
    )
    parser.add_argument(
        "--cpu-only",
        action="store_true",
        help="only the rows of one core without a server: mapping each way, the push "
        "client's CPU (RESULTS-cpu.md; a few minutes)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile one more push of the first size with pyinstrument (profile-push.txt)",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on the way out
    mode = "quick" if args.quick else "full"
    sizes = SIZES[mode]
    if args.push:
        sizes = replace(sizes, push=args.push)
    if args.bulk:
        sizes = replace(sizes, bulk=args.bulk)
    if args.bulk_memory:
        sizes = replace(sizes, bulk_memory=tuple(args.bulk_memory))
    if args.bulk_only:
        return bulk_only(args, sizes)
    if args.nightly_only:
        return nightly_only(args, sizes, args.nightly_only)
    if args.cpu_only:
        return cpu_only(args, sizes)
    results: dict[str, Any] = {
        "mode": mode + (", offline" if args.offline else ""),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        measure_cpu(args, sizes, results, workdir)
        if not args.offline:
            with server() as base:
                measure_server(args, sizes, results, base, workdir)
        results["memory"] = bench_memory({"convert": sizes.convert, "dry": sizes.dry}, workdir)
        print("memory", json.dumps(results["memory"]), flush=True)
        results["bulk_memory"] = bench_bulk_memory(sizes.bulk_memory, workdir)
        print("bulk_memory", json.dumps(results["bulk_memory"]), flush=True)
        results["repush"] = bench_repush(sizes.dry, workdir)
        print("repush", json.dumps(results["repush"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = ("" if mode == "full" else "-quick") + ("-offline" if args.offline else "")
    (args.out / f"results{suffix}.json").write_text(
        json.dumps(results, indent=2) + "\n", encoding="utf-8"
    )
    (args.out / f"RESULTS{suffix}.md").write_text(
        "# Benchmark results\n\n" + table(results), encoding="utf-8"
    )
    print(table(results))
    return 0


def bulk_only(args: argparse.Namespace, sizes: Sizes) -> int:
    """The bulk rows alone, written to RESULTS-bulk.md and results-bulk.json."""
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if not args.offline:
            with server() as base:
                warm_up(base, sizes.warmup, workdir)
                results["bulk"] = bench_bulk(base, sizes.bulk, workdir)
                print("bulk", json.dumps(results["bulk"]), flush=True)
        if min(sizes.bulk_memory) > 0:  # --bulk-memory 0 0 leaves the row out
            results["bulk_memory"] = bench_bulk_memory(sizes.bulk_memory, workdir)
            print("bulk_memory", json.dumps(results["bulk_memory"]), flush=True)
    return write_part(args, "bulk", "bulk", "bench/run --bulk-only", results, bulk_rows(results))


def write_part(
    args: argparse.Namespace,
    name: str,
    title: str,
    command: str,
    results: dict[str, Any],
    rows: list[str],
) -> int:
    """One part's rows alone, written to RESULTS-<name>.md and results-<name>.json."""
    m = results["machine"]
    text = (
        f"Measured {results['date']} on {m['cpu']} ({m['cores']} cores, {m['memory_gib']} GiB), "
        f"Python {m['python']}; {command}.\n\n"
        "| measure | ims-fhir | baseline | ratio | target |\n|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"results-{name}.json").write_text(json.dumps(results, indent=2) + "\n", "utf-8")
    (args.out / f"RESULTS-{name}.md").write_text(f"# Benchmark results: {title}\n\n{text}", "utf-8")
    print(text)
    return 0


def measure_cpu(
    args: argparse.Namespace, sizes: Sizes, results: dict[str, Any], workdir: Path
) -> None:
    """The rows of one core without a server: mapping each way, the push client's CPU."""
    results["mapping"] = bench_mapping(sizes.map, sizes.map_runs)
    print("mapping", json.dumps(results["mapping"]), flush=True)
    results["one_bundle"] = bench_one_bundle(sizes.one_bundle)
    print("one_bundle", json.dumps(results["one_bundle"]), flush=True)
    results["client_cpu"] = bench_client_cpu(sizes.cpu, 2 if args.quick else 4, workdir)
    print("client_cpu", json.dumps(results["client_cpu"]), flush=True)


def cpu_only(args: argparse.Namespace, sizes: Sizes) -> int:
    """The mapping and client-CPU rows alone, written to RESULTS-cpu.md and results-cpu.json."""
    mode = "quick" if args.quick else "full"
    results: dict[str, Any] = {
        "mode": f"{mode}, cpu only",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        measure_cpu(args, sizes, results, Path(tmp))
    quick = " --quick" if args.quick else ""
    name = "cpu-quick" if args.quick else "cpu"
    command = f"bench/run --cpu-only{quick}"
    return write_part(args, name, "one core", command, results, cpu_rows(results))


def _spread(inc: dict[str, Any]) -> str:
    ratios = inc.get("round_ratios")
    return f" (nights: {', '.join(f'{r:.2f}' for r in ratios)})" if ratios else ""


def nightly_row(inc: dict[str, Any]) -> str:
    """The nightly-sync row of the table."""
    return f"| nightly sync: {inc['encounters']:,} encounters on the server, {inc['changed']} changed (half edited, half a part removed; batch {inc['batch_size']}, concurrency {inc['concurrency']}, {inc.get('rounds', 1)} nights, alternating; the peer once), s | {inc['ours_s']:.1f} | {inc['peer_s']:.1f} (fhirpy re-posting all {inc['encounters']:,}); {inc['limit_s']:.1f} (bare httpx, the {inc['changed']} changed alone) | {inc['ours_over_peer']:.0f}x faster than fhirpy; {inc['ours_over_limit']:.2f}x the limit's time{_spread(inc)} | >= 50x; <= 1.2x |"


def nightly_only(args: argparse.Namespace, sizes: Sizes, size: int) -> int:
    """The nightly-sync row alone, written to RESULTS-nightly.md and results-nightly.json."""
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        with server() as base:
            warm_up(base, sizes.warmup, workdir)
            results["incremental"] = bench_incremental(base, size, 0.01, workdir)
            print("incremental", json.dumps(results["incremental"]), flush=True)
    inc = results["incremental"]
    command = (
        f"bench/run --nightly-only {size}. ims-fhir's requests: {inc['ours_requests']}; its "
        f"results: {inc['ours_actions']}"
    )
    return write_part(args, "nightly", "nightly sync", command, results, [nightly_row(inc)])


def measure_server(
    args: argparse.Namespace, sizes: Sizes, results: dict[str, Any], base: str, workdir: Path
) -> None:
    """The rows that need the server: push, re-push, the slow link, pull."""
    warm_up(base, sizes.warmup, workdir)
    results["push"] = []
    for n in sizes.push:
        rounds = args.rounds or (1 if args.quick else 4 if n <= 2000 else 2)
        results["push"].append(bench_push(base, n, rounds, n in sizes.peer, workdir))
    print("push", json.dumps(results["push"]), flush=True)
    if args.profile:  # an extra push, apart from the measured ones
        records = list(synthetic_encounters(sizes.push[0], seed=sizes.push[0]))
        profiler = Profiler(async_mode="enabled")
        with StateStore(workdir / "state-profile.sqlite3") as state:
            asyncio.run(push_ours(base, namespaced(records, "profile"), state, profiler))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile-push.txt").write_text(
            profiler.output_text(unicode=False, color=False), "utf-8"
        )
    results["incremental"] = bench_incremental(base, sizes.incremental, 0.01, workdir)
    print("incremental", json.dumps(results["incremental"]), flush=True)
    results["latency"] = bench_latency(base, sizes.latency, LATENCY, workdir)
    print("latency", json.dumps(results["latency"]), flush=True)
    count, seconds = asyncio.run(pull_rate(base))
    results["pull"] = {"encounters": count, "seconds": seconds, "per_s": count / seconds}
    results["bulk"] = bench_bulk(base, sizes.bulk, workdir)
    print("bulk", json.dumps(results["bulk"]), flush=True)


if __name__ == "__main__":
    sys.exit(main())
