"""Recovery of change pushes: ``kill -9`` at every point, and lost answers at random.

First pushes were covered before (``test_reliability.py``); these push *changes* — edits,
removals, retractions, re-additions — and break the push while it writes them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ims_fhir import Encounter, FhirClient, StateStore, push

from .conftest import ROOT
from .faultproxy import FaultPlan, FaultProxy
from .test_sync_hapi import identifiers_unique
from .test_sync_variants import OK, edit, records_for, remove, retract, server_records

pytestmark = pytest.mark.fhir_servers("h2", "postgres")


def changed(records: list[Encounter]) -> list[Encounter]:
    """Edits, removals and retractions, a quarter of the records each; the rest unchanged."""
    change: list[Callable[[Encounter], Encounter]] = [edit, remove, retract, lambda r: r]
    return [change[n % 4](r) for n, r in enumerate(records)]


def ndjson(path: Path, records: list[Encounter]) -> Path:
    path.write_text("".join(r.model_dump_json() + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.slow
def test_kill_9_at_every_point_of_a_change_push_then_rerun(
    fhir_base_url: str, tmp_path: Path
) -> None:
    namespace = f"https://kill-{uuid.uuid4().hex[:10]}.example/sid"
    before = records_for(namespace, count=40, seed=21)
    after = changed(before)
    state_file = tmp_path / "state.sqlite3"
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    # Each POST of the change push is a batch of reads or a transaction; "request" kills before
    # the server sees it, "response" after the server answered (committed) but before the
    # client hears of it. The kills move along the push as each run gets further.
    kill_points = [(when, which) for which in (1, 2, 3) for when in ("request", "response")]
    current: dict[str, Any] = {}

    def maybe_kill(event: str, method: str, count: int) -> None:
        # Only requests of the process now running count: a killed process's requests still in
        # flight through the proxy answer later, and must not kill (or count for) the next one.
        if method != "POST" or current.get("done") or count < current.get("first", 0):
            return
        current[event] = current.get(event, 0) + 1
        when, which = current["plan"]
        if event == when and current[event] == which:
            current["done"] = True
            os.kill(current["pid"], signal.SIGKILL)

    plan = FaultPlan(
        on_request=lambda m, p, c: maybe_kill("request", m, c),
        on_response=lambda m, p, c, s: maybe_kill("response", m, c),
    )
    source = ndjson(tmp_path / "changed.ndjson", after)
    with FaultProxy(fhir_base_url, plan) as proxy:
        command = [
            sys.executable,
            "-m",
            "ims_fhir",
            "push",
            str(source),
            "--server",
            proxy.url,
            "--state",
            str(state_file),
            "--batch-size",
            "2",
            "--concurrency",
            "2",
            "--json",
        ]
        current["plan"] = ("never", 0)
        with StateStore(state_file) as state:
            assert {r.action for r in push(before, proxy.url, state)} <= OK
        killed = 0
        for point in kill_points:
            current.clear()
            current["first"] = proxy.requests + 1 + 10**9  # nothing counts until the pid is set
            current["plan"] = point
            process = subprocess.Popen(
                command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            current["pid"] = process.pid
            current["first"] = proxy.requests + 1
            process.wait(timeout=600)
            killed += process.returncode == -signal.SIGKILL
            proxy.wait_idle()
        assert killed == len(kill_points)
        current.clear()
        current["plan"] = ("never", 0)
        finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        assert finished.returncode == 0, finished.stderr[-3000:]
        report = json.loads(finished.stdout)
        assert not report["summary"]["conflict"] and not report["summary"]["failed"]
        again = json.loads(subprocess.run(command, env=env, capture_output=True, text=True).stdout)
    assert again["summary"]["unchanged"] == len(after) and again["resources_written"] == 0
    with FhirClient(fhir_base_url) as client:
        assert server_records(client, namespace) == {r.id: r for r in after}
        assert identifiers_unique(client, namespace)


class LossyTransport(httpx.AsyncBaseTransport):
    """Forwards to the server; loses the answer to some POSTs after the server committed."""

    def __init__(self, seed: int, rate: float) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.random = random.Random(seed)
        self.rate = rate
        self.lost = 0

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        await response.aread()
        if request.method == "POST" and self.random.random() < self.rate:
            self.lost += 1
            raise httpx.ReadError("answer lost after the server committed")
        return response


def _readd(base: Encounter) -> Callable[[Encounter], Encounter]:
    def readd(record: Encounter) -> Encounter:
        return record.model_copy(
            update={"assessment": base.assessment, "treatment": base.treatment, "pain": base.pain}
        )

    return readd


def _unretract(record: Encounter) -> Encounter:
    return record.model_copy(update={"retracted": False})


OPERATIONS = ["edit", "remove", "retract", "re-add", "un-retract"]


@pytest.mark.slow
@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(OPERATIONS), st.integers(0, 1), st.integers(0, 2**16)),
        min_size=2,
        max_size=5,
    ),
    rate=st.sampled_from([0.2, 0.4]),
)
def test_random_changes_pushed_with_lost_answers_end_in_the_last_version(
    fhir_base_url: str, tmp_path_factory: pytest.TempPathFactory, steps: list[Any], rate: float
) -> None:
    namespace = f"https://prop-{uuid.uuid4().hex[:10]}.example/sid"
    base = records_for(namespace, count=2, seed=33)
    versions = list(base)
    state_file = tmp_path_factory.mktemp("prop") / "state.sqlite3"
    options = {"timeout": 30.0}
    with StateStore(state_file) as state, FhirClient(fhir_base_url) as client:
        assert {r.action for r in push(versions, fhir_base_url, state)} <= OK
        for operation, which, seed in steps:
            change: dict[str, Callable[[Encounter], Encounter]] = {
                "edit": edit,
                "remove": remove,
                "retract": retract,
                "re-add": _readd(base[which]),
                "un-retract": _unretract,
            }
            versions[which] = change[operation](versions[which])
            transport = LossyTransport(seed, rate)
            results = push(
                versions,
                fhir_base_url,
                state,
                concurrency=2,
                client_options=options | {"transport": transport},
            )
            # Lost answers may leave an encounter failed for now, never in conflict with
            # itself and never wrongly written.
            assert {r.action for r in results} <= OK | {"failed"}, [
                r.message for r in results if r.action not in OK
            ]
        final = push(versions, fhir_base_url, state)
        assert {r.action for r in final} <= OK
        assert server_records(client, namespace) == {r.id: r for r in versions}
        assert identifiers_unique(client, namespace)
