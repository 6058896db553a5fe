#!/usr/bin/env python3
"""ims-fhir benchmarks: mapping, push, re-push, pull and memory, each beside its baseline.

    bench/run            # full sizes; writes bench/RESULTS.md and bench/results.json
    bench/run --quick    # tiny sizes (the test suite runs this as a smoke test)
    bench/run --profile  # also profile one push with pyinstrument (bench/profile-push.txt)

Every number comes with the baseline measured in the same run, and the ratio between the two.
The encounters are deterministic (ims_fhir.synthetic_encounters, seeded). A local HAPI FHIR JPA
server (tests/hapi, its database on disk) is started unless FHIR_BASE_URL names one. Pushes
start after a warm-up push, and ims-fhir and the limit take turns going first, round by round.
"""

from __future__ import annotations

import argparse
import asyncio
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
    Encounter,
    Pusher,
    StateStore,
    from_fhir,
    pull,
    synthetic_encounters,
    to_fhir_json,
    to_transaction,
)

ROOT = Path(__file__).resolve().parents[1]
BATCH, CONCURRENCY = 10, 4
LATENCY = 0.02  # seconds per request for the slow-link push: a regional server over a WAN
PULL_LIMIT = 1000  # encounters pulled back for the pull measurement


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


SIZES = {
    "quick": Sizes(20, 3, [20], [20], 10, 10, (50, 500), (100, 1000), (10, 200)),
    "full": Sizes(
        300, 5, [1000, 10000], [1000], 300, 200, (10000, 100000), (10000, 100000), (100, 10000)
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


def namespaced(records: list[Encounter], who: str) -> list[Encounter]:
    """The records under a fresh namespace: every push writes new resources."""
    namespace = f"https://bench-{who}-{uuid.uuid4().hex[:8]}.example/sid"
    return [
        r.model_copy(update={"clinic": r.clinic.model_copy(update={"namespace": namespace})})
        for r in records
    ]


def timed(func: Callable[[], Any]) -> float:
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


# -- 1. mapping ------------------------------------------------------------------------------


def rebuild(node: Any) -> Any:
    """The same JSON tree in new dicts and lists: the least work that builds a Bundle's dicts."""
    if isinstance(node, dict):
        return {key: rebuild(value) for key, value in node.items()}
    if isinstance(node, list):
        return [rebuild(value) for value in node]
    return node


def bench_mapping(size: int, runs: int) -> dict[str, Any]:
    """Forward and reverse mapping, one core, each beside its floor, rounds alternating.

    Forward: ``to_fhir_json`` (the record checked, the Bundle's dicts built and written by
    orjson) against the floor "build the same dicts and orjson.dumps them" (a generic rebuild of
    the finished dict tree: no mapping at all), and against ``validate=True`` (the same plus
    fhir.resources validation: what every Bundle cost before issue 15).
    Reverse: ``from_fhir`` of Bundle JSON against fhir.resources merely parsing it.
    """
    records = list(synthetic_encounters(size, seed=1))
    texts = [to_fhir_json(r) for r in records]
    dicts = [json.loads(t) for t in texts]
    cases: dict[str, Callable[[], Any]] = {
        "forward": lambda: [to_fhir_json(r) for r in records],
        "floor_forward": lambda: [orjson.dumps(rebuild(d)) for d in dicts],
        "validated_forward": lambda: [to_fhir_json(r, validate=True) for r in records],
        "reverse": lambda: [from_fhir(t) for t in texts],
        "floor_reverse": lambda: [Bundle.model_validate_json(t) for t in texts],
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


# -- 2-4. push, re-push, pull ------------------------------------------------------------------


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


async def push_limit(base: str, records: list[Encounter]) -> float:
    """The limit: the same transactions, pre-built, posted by a bare httpx loop.

    Its shared resources (clinics, patients, practitioners) are all created up front in one
    transaction, which only a loop that knows every record in advance can do: concurrent
    transactions that each conditionally create the same patient race, and the server refuses
    all but one. (ims-fhir streams its input: it creates each shared resource in the first
    transaction that needs it and holds back the others that need it until that one is done.)
    ims-fhir's resources also carry a sync ``meta.tag`` these do not, which favours the limit.
    """
    bundles = [
        json.loads(to_transaction(records[i : i + BATCH]).model_dump_json())
        for i in range(0, len(records), BATCH)
    ]
    shared = {
        e["fullUrl"]: e for b in bundles for e in b["entry"] if e["request"]["method"] == "POST"
    }
    prelude = json.dumps(
        {"resourceType": "Bundle", "type": "transaction", "entry": list(shared.values())}
    ).encode()
    bodies = [json.dumps(b).encode() for b in bundles]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    async with httpx.AsyncClient(timeout=300) as http:

        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                response = await http.post(
                    base, content=body, headers={"Content-Type": "application/fhir+json"}
                )
                response.raise_for_status()

        start = time.perf_counter()
        first = await http.post(
            base, content=prelude, headers={"Content-Type": "application/fhir+json"}
        )
        first.raise_for_status()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return time.perf_counter() - start


async def push_peer(base: str, records: list[Encounter]) -> float:
    """The peer: an idiomatic fhirpy script, one conditional create or update per resource."""
    from fhirpy import AsyncFHIRClient

    client = AsyncFHIRClient(base)
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def one(record: Encounter) -> None:
        async with semaphore:
            ids: dict[str, str] = {}
            entries = json.loads(to_fhir_json(record))["entry"]
            # One request per resource: referenced resources must exist first.
            entries.sort(
                key=lambda e: _WRITE_ORDER.index(
                    e["resource"]["meta"]["profile"][0].rsplit("/", 1)[-1]
                )
            )
            for entry in entries:
                resource = _resolve(entry["resource"], ids)
                kind = resource["resourceType"]
                if kind == "Provenance":
                    saved = client.resource(kind, **resource)
                    await saved.save()
                else:
                    ident = resource["identifier"][0]
                    search = client.resources(kind).search(
                        identifier=f"{ident['system']}|{ident['value']}"
                    )
                    if entry["request"]["method"] == "POST":
                        saved, _ = await search.get_or_create(client.resource(kind, **resource))
                    else:
                        saved, _ = await search.update(client.resource(kind, **resource))
                ids[entry["fullUrl"]] = f"{kind}/{saved.id}"

    start = time.perf_counter()
    await asyncio.gather(*(one(r) for r in records))
    return time.perf_counter() - start


_WRITE_ORDER = [
    "ims-organization",
    "ims-patient",
    "ims-practitioner",
    "ims-encounter",
    "ims-consent",
    "ims-finding",
    "ims-assessment-panel",
    "ims-diagnosis",
    "ims-session",
    "ims-needled-site",
    "ims-pain-score",
    "ims-provenance",
]


def _resolve(node: Any, ids: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {
            k: (ids.get(v, v) if k == "reference" else _resolve(v, ids)) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_resolve(item, ids) for item in node]
    return node


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
    """Ours against the limit, ``rounds`` times, alternating which goes first.

    The server slows as its database grows, so each round's ratio compares two neighbouring
    pushes, and alternating the order (ours first, then the limit first) cancels the drift.
    """
    records = list(synthetic_encounters(size, seed=size))
    out: dict[str, Any] = {
        "encounters": size,
        "batch_size": BATCH,
        "concurrency": CONCURRENCY,
        "rounds": [],
    }
    for number in range(rounds):
        round_: dict[str, Any] = {}
        for which in ("ours", "limit") if number % 2 == 0 else ("limit", "ours"):
            if which == "limit":
                round_["limit_s"] = asyncio.run(push_limit(base, namespaced(records, "limit")))
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
        out["rounds"].append(round_)
        print(f"push {size}, round {number + 1}/{rounds}:", json.dumps(round_), flush=True)
        if peer and number == 0:  # once, between rounds: it is slow, and far off either way
            peer_s = asyncio.run(push_peer(base, namespaced(records, "peer")))
            out |= {"peer_s": peer_s, "peer_per_s": size / peer_s}
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
    if "peer_s" in out:
        out |= {
            "ours_over_peer": out["peer_s"] / ours_s,
            "limit_over_peer": out["peer_s"] / limit_s,
        }
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


def table(results: dict[str, Any]) -> str:
    m, lines = results["mapping"], []
    lines += [
        f"Measured {results['date']} on {results['machine']['cpu']} ({results['machine']['cores']} cores, "
        f"{results['machine']['memory_gib']} GiB), Python {results['machine']['python']}; mode `{results['mode']}`.",
        "",
        "| measure | ims-fhir | baseline | ratio | target |",
        "|---|---|---|---|---|",
        f"| mapping forward, one core ({m['encounters']} encounters, {m['runs']} rounds, order rotating): to_fhir_json, enc/s | {m['forward_per_s']:.0f} | {m['floor_forward_per_s']:.0f} (floor: the same dicts rebuilt + orjson.dumps) | {m['forward_ratio']:.2f}x the time | >= 1,500 enc/s; <= 2x |",
        f"| mapping forward with validate=True (+ fhir.resources models), enc/s | {m['validated_forward_per_s']:.0f} | {m['forward_per_s']:.0f} (to_fhir_json) | {m['validated_over_fast']:.1f}x the time | |",
        f"| mapping reverse (Bundle JSON -> record), enc/s | {m['reverse_per_s']:.0f} | {m['floor_reverse_per_s']:.0f} (fhir.resources parse) | {m['reverse_ratio']:.2f}x the time | <= 1.5x |",
    ]
    ob = results["one_bundle"]
    spread = ", ".join(f"{r:.2f}" for r in ob["round_ratios"])
    lines.append(
        f"| mapping reverse, one Bundle of {ob['large']:,} encounters ({ob['rounds']} rounds, alternating), enc/s | {ob['large_per_s']:.0f} | {ob['small_per_s']:.0f} (the same, {ob['small']} encounters per Bundle) | {ob['ratio']:.2f}x the time per encounter (rounds: {spread}) | <= 1.2x |"
    )
    for p in results.get("push", []):
        n = p["encounters"]
        spread = ", ".join(f"{r['ours_over_limit']:.2f}" for r in p["rounds"])
        lines.append(
            f"| push {n} encounters, enc/s ({len(p['rounds'])} rounds) | {p['ours_per_s']:.1f} | {p['limit_per_s']:.1f} (bare httpx, same transactions) | {p['ours_over_limit']:.2f} of the limit (rounds: {spread}) | >= 0.9 |"
        )
        if "peer_per_s" in p:
            lines.append(
                f"| push {n} encounters vs fhirpy, enc/s | {p['ours_per_s']:.1f} | {p['peer_per_s']:.1f} (fhirpy, a request per resource) | {p['ours_over_peer']:.1f}x faster (the limit: {p['limit_over_peer']:.1f}x) | >= 5x |"
            )
        lines.append(
            f"| client CPU while pushing {n} | {100 * p['ours_cpu_share']:.0f} % of one core | | | |"
        )
        lines.append(
            f"| re-push {n} unchanged | {p['repush_writes']} writes, {p['repush_s']:.2f} s | first push {p['repush_of_s']:.1f} s | {100 * p['repush_fraction']:.1f} % of the time | 0 writes, <= 5 % |"
        )
    if "latency" in results:
        lat = results["latency"]
        lines.append(
            f"| push {lat['encounters']} encounters over a link adding {lat['latency_ms']:.0f} ms per request, enc/s | {lat['ours_per_s']:.1f} | {lat['limit_per_s']:.1f} (limit); {lat['peer_per_s']:.1f} (fhirpy) | {lat['ours_over_limit']:.2f} of the limit; {lat['ours_over_peer']:.1f}x fhirpy | |"
        )
    if "pull" in results:
        pr = results["pull"]
        lines.append(f"| pull, enc/s | {pr['per_s']:.1f} ({pr['encounters']} encounters) | | | |")
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
    return "\n".join(lines) + "\n"


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
        help="push rounds per size (default: 3 up to 2,000 encounters, else 2; --quick: 1)",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="only what needs no server: mapping and memory (RESULTS-offline.md)",
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
    results: dict[str, Any] = {
        "mode": mode,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        results["mapping"] = bench_mapping(sizes.map, sizes.map_runs)
        print("mapping", json.dumps(results["mapping"]), flush=True)
        results["one_bundle"] = bench_one_bundle(sizes.one_bundle)
        print("one_bundle", json.dumps(results["one_bundle"]), flush=True)
        if not args.offline:
            with server() as base:
                measure_server(args, sizes, results, base, workdir)
        results["memory"] = bench_memory({"convert": sizes.convert, "dry": sizes.dry}, workdir)
        print("memory", json.dumps(results["memory"]), flush=True)
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


def measure_server(
    args: argparse.Namespace, sizes: Sizes, results: dict[str, Any], base: str, workdir: Path
) -> None:
    """The rows that need the server: push, re-push, the slow link, pull."""
    warm_up(base, sizes.warmup, workdir)
    results["push"] = []
    for n in sizes.push:
        rounds = args.rounds or (1 if args.quick else 3 if n <= 2000 else 2)
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
    results["latency"] = bench_latency(base, sizes.latency, LATENCY, workdir)
    print("latency", json.dumps(results["latency"]), flush=True)
    count, seconds = asyncio.run(pull_rate(base))
    results["pull"] = {"encounters": count, "seconds": seconds, "per_s": count / seconds}


if __name__ == "__main__":
    sys.exit(main())
