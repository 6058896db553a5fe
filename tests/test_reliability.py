"""Faults, crashes and hostile input: nothing lost, nothing duplicated, nothing leaked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import pytest
import respx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ims_fhir
from ims_fhir import (
    BearerAuth,
    FhirClient,
    ReadRecord,
    RecordError,
    RetryPolicy,
    StateStore,
    push,
    read_records,
    synthetic_encounters,
)

from .conftest import ENCOUNTER_FILES, INVALID_FILES, ROOT
from .faultproxy import FaultPlan, FaultProxy
from .test_sync_hapi import (
    expected_counts,
    fixtures,
    identifiers_unique,
    server_counts,
    with_namespace,
)

pytestmark = pytest.mark.fhir_servers("h2", "postgres")


def _namespace() -> str:
    return f"https://rel-{uuid.uuid4().hex[:10]}.example/sid"


# -- faults on the wire ------------------------------------------------------------------------


@pytest.mark.slow
def test_push_through_a_proxy_failing_10_percent_of_requests(
    fhir_base_url: str, tmp_path: Path
) -> None:
    namespace = _namespace()
    records = with_namespace(list(synthetic_encounters(1000, seed=9)), namespace)
    plan = FaultPlan.uniform(0.10, seed=3, stall_seconds=12.0, retry_after="1")
    options = {"timeout": 10.0, "retry": RetryPolicy(max_retries=6, initial_delay=0.2)}
    with FaultProxy(fhir_base_url, plan) as proxy, StateStore(tmp_path / "state.sqlite3") as state:
        results = push(
            records, proxy.url, state, batch_size=2, concurrency=4, client_options=options
        )
        assert {r.action for r in results} <= {"created", "entered-in-error"}, [
            r for r in results if r.action not in {"created", "entered-in-error"}
        ][:3]
        assert set(plan.rates) and all(proxy.faults[f] > 0 for f in plan.rates), proxy.faults
        again = push(records, proxy.url, state, client_options=options)
        assert {r.action for r in again} == {"unchanged"}
        state_counts = state.counts(proxy.url.rstrip("/"))
    with FhirClient(fhir_base_url) as client:
        assert server_counts(client, namespace) == expected_counts(records)
        assert identifiers_unique(client, namespace)
    assert state_counts == expected_counts(records)


# -- crashes -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_at_five_points_then_rerun(fhir_base_url: str, tmp_path: Path) -> None:
    namespace = _namespace()
    records = with_namespace(list(synthetic_encounters(120, seed=11)), namespace)
    source = tmp_path / "encounters.ndjson"
    source.write_text("".join(r.model_dump_json() + "\n" for r in records), encoding="utf-8")
    state_file = tmp_path / "state.sqlite3"
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    # (when, which POST): "response" kills after the server committed a transaction but before
    # the client hears of it, i.e. between its success and the state store's update.
    kill_points = [
        ("response", 2),
        ("request", 3),
        ("response", 1),
        ("request", 1),
        ("response", 4),
    ]
    current: dict[str, Any] = {}

    def maybe_kill(event: str, method: str, count: int) -> None:
        if method != "POST" or current.get("done") or "pid" not in current:
            return
        current["posts_" + event] = current.get("posts_" + event, 0) + 1
        when, which = current["plan"]
        if event == when and current["posts_" + event] == which:
            current["done"] = True
            os.kill(current["pid"], signal.SIGKILL)

    plan = FaultPlan(
        on_request=lambda m, p, c: maybe_kill("request", m, c),
        on_response=lambda m, p, c, s: maybe_kill("response", m, c),
    )
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
            "5",
            "--concurrency",
            "2",
            "--json",
        ]
        killed = 0
        for point in kill_points:
            current.clear()
            current["plan"] = point
            process = subprocess.Popen(
                command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            current["pid"] = process.pid
            process.wait(timeout=600)
            killed += process.returncode == -signal.SIGKILL
            # The killed push's other request (concurrency 2) may still reach the server; its
            # hooks must not count as the next run's POSTs.
            proxy.wait_idle()
        assert killed == len(kill_points)
        current.clear()
        current["plan"] = ("never", 0)
        finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        assert finished.returncode == 0, finished.stderr[-3000:]
        again = json.loads(subprocess.run(command, env=env, capture_output=True, text=True).stdout)
    assert again["resources_written"] == 0 and set(again["summary"]) >= {"unchanged"}
    assert again["summary"]["unchanged"] == len(records)
    with FhirClient(fhir_base_url) as client:
        assert server_counts(client, namespace) == expected_counts(records)
        assert identifiers_unique(client, namespace)
    with StateStore(state_file) as state:
        assert state.counts(proxy.url.rstrip("/")) == expected_counts(records)


# -- hostile input -----------------------------------------------------------------------------

GOOD = json.dumps(json.loads(ENCOUNTER_FILES[0].read_text(encoding="utf-8")))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    junk=st.lists(
        json_values.map(json.dumps) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
        min_size=1,
        max_size=5,
    )
)
def test_random_input_never_crashes_and_keeps_the_good_records(
    tmp_path: Path, junk: list[str]
) -> None:
    target = tmp_path / f"{uuid.uuid4().hex}.ndjson"
    lines = [GOOD, *(j.replace("\n", " ") for j in junk), GOOD]
    target.write_bytes(("\n".join(lines) + "\n").encode("utf-8", errors="surrogateescape"))
    items = list(read_records([target]))
    good = [i for i in items if isinstance(i, ReadRecord)]
    bad = [i for i in items if isinstance(i, RecordError)]
    assert len(good) >= 2 and good[0].location.line == 1 and good[-1].location.line == len(lines)
    assert all(e.location.line and e.issues and e.issues[0].reason for e in bad)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        pytest.param("[" * 100_000 + "]" * 100_000, "nested", id="deep-nesting"),
        pytest.param(
            json.dumps({"id": "x" * 5_000_000}), "should match pattern", id="huge-string-field"
        ),
        pytest.param(GOOD.replace('"nrs": 7', '"nrs": "seven"'), "valid integer", id="wrong-type"),
        pytest.param('{"id": "\\ud800"}', "", id="lone-surrogate"),
    ],
)
def test_hostile_lines_give_clear_errors(tmp_path: Path, line: str, reason: str) -> None:
    target = tmp_path / "hostile.ndjson"
    target.write_text(GOOD + "\n" + line + "\n" + GOOD + "\n", encoding="utf-8")
    items = list(read_records([target]))
    assert [type(i).__name__ for i in items] == ["ReadRecord", "RecordError", "ReadRecord"]
    assert reason in str(items[1])


def test_invalid_utf8_is_reported(tmp_path: Path) -> None:
    target = tmp_path / "latin1.ndjson"
    target.write_bytes(GOOD.encode() + b"\n" + b'{"id": "caf\xe9"}\n' + GOOD.encode() + b"\n")
    items = list(read_records([target]))
    assert "not UTF-8" in str(items[1]) and isinstance(items[2], ReadRecord)


@pytest.mark.slow
def test_a_100_mb_line_is_skipped_in_bounded_memory(tmp_path: Path) -> None:
    target = tmp_path / "huge.ndjson"
    with target.open("wb") as out:
        out.write(GOOD.encode() + b"\n")
        out.write(b'{"id": "' + b"x" * (100 * 1024 * 1024) + b'"}\n')
        out.write(GOOD.encode() + b"\n")
    tracemalloc.start()
    items = list(read_records([target]))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [type(i).__name__ for i in items] == ["ReadRecord", "RecordError", "ReadRecord"]
    assert "longer than" in str(items[1]) and items[1].location.line == 2
    assert peak < 40 * 1024 * 1024, f"peak {peak / 1e6:.0f} MB"


@pytest.mark.parametrize("path", INVALID_FILES, ids=lambda p: p.stem)
def test_invalid_fixtures_are_never_written(path: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ims_fhir.cli.commands import cli

    result = CliRunner().invoke(
        cli,
        [
            "push",
            str(path),
            str(ENCOUNTER_FILES[0]),
            "--server",
            "https://fhir.example.org/r4",
            "--allow-default-namespace",  # the fixtures name no namespace
            "--state",
            str(tmp_path / "s.sqlite3"),
            "--dry-run",
            "--json",
        ],
    )
    report = json.loads(result.stdout)
    assert result.exit_code == 1
    assert report["summary"]["would_create"] == 1  # only the good record would be written
    assert len(report["invalid"]) == 1 and report["invalid"][0]["file"] == str(path)


# -- broken servers ----------------------------------------------------------------------------


def test_a_huge_response_is_refused_not_loaded() -> None:
    base = "https://fhir.example.org/r4"
    with respx.mock() as router:
        router.get(f"{base}/Patient/1").respond(
            200,
            content=b'{"resourceType": "Patient", "text": "' + b"x" * 50_000 + b'"}',
            headers={"Content-Type": "application/fhir+json"},
        )
        with FhirClient(base, max_response_bytes=10_000) as client:
            with pytest.raises(ims_fhir.InvalidResponseError, match="larger than|too large"):
                client.read("Patient", "1")


def test_a_stalled_server_times_out_instead_of_hanging(fhir_base_url: str) -> None:
    plan = FaultPlan({"stall": 1.0}, stall_seconds=5.0)
    with FaultProxy(fhir_base_url, plan) as proxy:
        with FhirClient(
            proxy.url, timeout=0.5, retry=RetryPolicy(max_retries=1, initial_delay=0)
        ) as client:
            with pytest.raises(ims_fhir.TimeoutException):
                client.capabilities()


# -- secrets and patient data never reach the logs ---------------------------------------------


def test_logs_hold_no_token_and_no_patient_data(
    fhir_base_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    records = with_namespace(fixtures()[:6], _namespace())
    token = "tok-" + uuid.uuid4().hex
    with StateStore(tmp_path / "state.sqlite3") as state:
        push(records, fhir_base_url, state, client_options={"auth": BearerAuth(token)})
        changed = [records[0].model_copy(update={"pain": records[0].pain[:1]}), *records[1:]]
        push(changed, fhir_base_url, state, client_options={"auth": BearerAuth(token)})
    import asyncio

    from ims_fhir import AsyncFhirClient, pull

    async def pull_some() -> int:
        async with AsyncFhirClient(fhir_base_url, auth=BearerAuth(token)) as client:
            count = 0
            async for report in pull(client, page_size=20):
                count += len(report.records)
                break
            return count

    assert asyncio.run(pull_some()) > 0
    text = caplog.text
    assert text, "something was logged at DEBUG"
    secrets = [token, "Bearer", "Authorization"]
    for record in records:
        patient = record.patient
        secrets += [patient.name.family, *patient.name.given, patient.birth_date.isoformat()]
        secrets += [i.value for i in patient.identifiers]
    leaked = [s for s in secrets if s in text]
    assert not leaked, leaked
