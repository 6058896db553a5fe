"""Bulk pull offline: the Bulk Data protocol as servers get it wrong, on a respx server.

The files served are what ``NdjsonPerType`` writes for synthetic records, so every test can
compare what was rebuilt with what went in. The round trip on a real server is in
``test_bulk_hapi.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import respx
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ims_fhir import (
    AsyncFhirClient,
    BearerAuth,
    BulkProgress,
    ConfigurationError,
    Encounter,
    InvalidResponseError,
    MappingReport,
    NdjsonPerType,
    RetryPolicy,
    ServerError,
    TransportError,
    bulk_pull,
    rebuild_ndjson,
    synthetic_encounters,
)
from ims_fhir.cli.commands import cli
from ims_fhir.mapping.identity import RESOURCE_TYPES
from ims_fhir.mapping.to_fhir import bundle_dict
from ims_fhir.sync.bulk import LOCK_FILE, remove_export
from ims_fhir.sync.pull import ENCOUNTER_TYPES

from .bulk_support import ExportHandler, interrupt_pull, local_server
from .conftest import ENCOUNTER_FILES
from .strategies import encounters

BASE = "https://fhir.example.org/r4"
STATUS = f"{BASE}/bulkstatus/job-1"
N = 9


def _records(count: int = N, seed: int = 4) -> list[Encounter]:
    return list(synthetic_encounters(count, seed=seed))


def _by_id(records: list[Encounter]) -> list[Encounter]:
    return sorted(records, key=lambda r: r.id)


def _files(tmp: Path, records: list[Encounter]) -> dict[str, bytes]:
    """Resource type -> the NDJSON a server would export for ``records``."""
    out = tmp / "server-files"
    with NdjsonPerType(out) as writer:
        for record in records:
            writer.write(record)
    return {p.name.removesuffix(".ndjson"): p.read_bytes() for p in sorted(out.glob("*.ndjson"))}


def _manifest(files: dict[str, bytes], host: str = BASE, **changes: Any) -> dict[str, Any]:
    return {
        "transactionTime": "2026-11-27T05:00:00Z",
        "request": f"{BASE}/$export",
        "requiresAccessToken": True,
        "output": [{"type": t, "url": f"{host}/files/{t}.ndjson"} for t in files],
        "error": [],
    } | changes


class Server:
    """A Bulk Data server on respx: kick-off, status answers in turn, files."""

    def __init__(
        self,
        mock: respx.MockRouter,
        files: dict[str, bytes],
        statuses: list[httpx.Response] | None = None,
        manifest: dict[str, Any] | None = None,
    ) -> None:
        self.kickoff = mock.get(f"{BASE}/$export").respond(
            202, headers={"Content-Location": STATUS}
        )
        done = httpx.Response(200, json=manifest or _manifest(files))
        self.answers = [*(statuses or []), done]
        self.status = mock.get(STATUS).mock(side_effect=self._next)
        self.cancel = mock.delete(STATUS).respond(202)
        self.files = {
            t: mock.get(f"{BASE}/files/{t}.ndjson").respond(200, content=body)
            for t, body in files.items()
        }

    def _next(self, request: httpx.Request) -> httpx.Response:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


class Clock:
    """The waits a pull asks for, taken at once."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


def _run(
    work: Path,
    *,
    clock: Clock | None = None,
    on_progress: Callable[[BulkProgress], None] | None = None,
    retry: RetryPolicy | None = None,
    **options: Any,
) -> list[MappingReport]:
    async def main() -> list[MappingReport]:
        async with AsyncFhirClient(BASE, auth=BearerAuth("secret-token"), retry=retry) as client:
            return [
                report
                async for report in bulk_pull(
                    client, work, sleep=clock or Clock(), on_progress=on_progress, **options
                )
            ]

    return asyncio.run(main())


def _pulled(reports: list[MappingReport]) -> list[Encounter]:
    return _by_id([r for report in reports for r in report.records])


def _errors(reports: list[MappingReport]) -> list[str]:
    return [str(e) for report in reports for e in report.errors]


# -- the protocol ---------------------------------------------------------------------------


def test_kick_off_poll_download_rebuild(tmp_path: Path) -> None:
    records = _records()
    files = _files(tmp_path, records)
    clock = Clock()
    progress: list[BulkProgress] = []
    statuses = [
        httpx.Response(202, headers={"Retry-After": "5", "X-Progress": "10% done\x1b[2J"}),
        httpx.Response(429, headers={"Retry-After": "3"}),
        httpx.Response(202),  # no Retry-After: the pull's own backoff
        httpx.Response(202, headers={"Retry-After": "86400"}),  # bounded by max_poll_wait
    ]
    with respx.mock(assert_all_called=False, assert_all_mocked=True) as mock:
        server = Server(mock, files, statuses)
        reports = _run(
            tmp_path / "work", clock=clock, on_progress=progress.append, max_poll_wait=30
        )
    assert _errors(reports) == []
    assert _pulled(reports) == _by_id(records)
    assert clock.waits == [5, 3, 1.0, 30]
    kick_off = server.kickoff.calls.last.request
    assert kick_off.headers["Prefer"] == "respond-async"
    assert kick_off.url.params["_type"].split(",")[0] == "Encounter"
    assert kick_off.url.params["_typeFilter"].startswith("Encounter?_profile=")
    assert all(route.call_count == 1 for route in server.files.values())
    assert all(
        route.calls.last.request.headers["Authorization"] == "Bearer secret-token"
        for route in server.files.values()
    )
    assert not server.cancel.called
    # X-Progress is passed on without the terminal escape the server slipped in.
    assert any(p.stage == "waiting" and p.message == "10% done[2J" for p in progress)


def test_since_and_namespace_go_into_the_kick_off(tmp_path: Path) -> None:
    with respx.mock(assert_all_called=False) as mock:
        server = Server(mock, {}, manifest=_manifest({}))
        _run(tmp_path, since="2026-11-01", namespace="https://clinic.example/sid")
    params = server.kickoff.calls.last.request.url.params
    assert params["_since"] == "2026-11-01T00:00:00+00:00"
    assert "identifier=https://clinic.example/sid/encounter|" in params["_typeFilter"]


def test_a_group_export_goes_to_the_group(tmp_path: Path) -> None:
    with respx.mock(assert_all_called=False) as mock:
        route = mock.get(f"{BASE}/Group/g1/$export").respond(
            202, headers={"Content-Location": STATUS}
        )
        mock.get(STATUS).respond(200, json=_manifest({}))
        _run(tmp_path, level="group", group="g1")
    types = route.calls.last.request.url.params["_type"].split(",")
    assert "Practitioner" not in types and "Organization" not in types  # not in the compartment


def test_server_errors_mid_poll_are_retried_then_reported(tmp_path: Path) -> None:
    with respx.mock(assert_all_called=False) as mock:
        Server(mock, {}, [httpx.Response(202)] + [httpx.Response(503)] * 10)
        with pytest.raises(ServerError, match="503"):
            _run(tmp_path, retry=RetryPolicy(max_retries=1, initial_delay=0.01))
    # The export is remembered: the next run polls it again rather than starting anew.
    assert json.loads((tmp_path / "export.json").read_text())["status_url"] == STATUS


def _searches(mock: respx.MockRouter, files: dict[str, bytes]) -> None:
    """Answer pull's searches (by ``_id``, by the Encounter a part points at) from ``files``."""
    held = {t: [json.loads(line) for line in body.splitlines()] for t, body in files.items()}

    def search(request: httpx.Request) -> httpx.Response:
        kind = request.url.path.rsplit("/", 1)[-1]
        params = request.url.params
        found = []
        for resource in held.get(kind, []):
            if "_id" in params:
                keep = resource["id"] in params["_id"].split(",")
            else:
                (param,) = (p for p in ("encounter", "target") if p in params)
                value = resource.get(param)
                refs = {r["reference"] for r in (value if isinstance(value, list) else [value])}
                keep = bool(refs & set(params[param].split(",")))
            if keep:
                found.append({"resource": resource})
        return httpx.Response(
            200, json={"resourceType": "Bundle", "type": "searchset", "entry": found}
        )

    mock.get(url__regex=rf"^{BASE}/[A-Z][A-Za-z]+(\?.*)?$").mock(side_effect=search)


def test_since_rebuilds_the_changed_encounters_whole(tmp_path: Path) -> None:
    """An export since a date holds what changed: one finding, say. Its record is rebuilt whole."""
    records = _records()
    files = _files(tmp_path, records)
    changed = records[4]
    observation = next(
        line
        for line in files["Observation"].splitlines()
        if b'"Encounter/' in line
        and json.loads(line)["identifier"][0]["value"].startswith(changed.id + "/")
    )
    export = {"Observation": observation + b"\n"}  # nothing else changed
    with respx.mock(assert_all_called=False) as mock:
        server = Server(mock, export)
        _searches(mock, files)
        reports = _run(tmp_path / "work", since="2026-11-01T00:00:00Z")
    assert server.kickoff.calls.last.request.url.params["_since"] == "2026-11-01T00:00:00+00:00"
    assert _errors(reports) == []
    assert _pulled(reports) == [changed]


def test_what_a_group_export_lacks_is_read_by_id(tmp_path: Path) -> None:
    records = _records()
    files = _files(tmp_path, records)
    exported = {t: b for t, b in files.items() if t not in {"Practitioner", "Organization"}}
    with respx.mock(assert_all_called=False) as mock:
        mock.get(f"{BASE}/Group/g1/$export").respond(202, headers={"Content-Location": STATUS})
        mock.get(STATUS).respond(200, json=_manifest(exported))
        for t, body in exported.items():
            mock.get(f"{BASE}/files/{t}.ndjson").respond(200, content=body)
        _searches(mock, files)
        reports = _run(tmp_path / "work", level="group", group="g1")
    assert _errors(reports) == []
    assert _pulled(reports) == _by_id(records)


# -- what the server must not get away with -------------------------------------------------


def _lying(**changes: Any) -> dict[str, Any]:
    return _manifest({"Patient": b""}) | changes


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        pytest.param(
            _manifest({"Patient": b""}, host="https://files.example.net"),
            "another host",
            id="file-on-another-host",
        ),
        pytest.param(
            _lying(output=[{"type": "MedicationRequest", "url": f"{BASE}/files/x.ndjson"}]),
            "not asked for",
            id="type-not-asked-for",
        ),
        pytest.param(
            {k: v for k, v in _lying().items() if k != "requiresAccessToken"},
            "requiresAccessToken",
            id="no-requiresAccessToken",
        ),
        pytest.param(_lying(output="all of it"), "output is not a list", id="output-not-list"),
        pytest.param(
            _lying(output=[{"type": "Patient", "url": "http://fhir.example.org/r4/f"}]),
            "plain http",
            id="plain-http-file",
        ),
        pytest.param(
            _lying(output=[{"type": "Patient", "url": "file:///etc/passwd"}]),
            "not an http",
            id="not-http",
        ),
        pytest.param([], "not a JSON object", id="not-an-object"),
    ],
)
def test_a_manifest_that_lies_is_refused(tmp_path: Path, manifest: Any, message: str) -> None:
    with respx.mock(assert_all_called=False) as mock:
        server = Server(mock, {}, manifest={})
        server.answers = [httpx.Response(200, json=manifest)]
        with pytest.raises(InvalidResponseError, match=message):
            _run(tmp_path)


def test_the_token_never_goes_to_a_file_host(tmp_path: Path) -> None:
    records = _records(3)
    files = _files(tmp_path, records)
    host = "https://files.example.net/export"
    with respx.mock(assert_all_called=False) as mock:
        Server(mock, {}, manifest=_manifest(files, host=host, requiresAccessToken=False))
        routes = [
            mock.get(f"{host}/files/{t}.ndjson").respond(200, content=body)
            for t, body in files.items()
        ]
        reports = _run(tmp_path / "work", file_hosts=["files.example.net"])
    assert _pulled(reports) == _by_id(records)
    assert all("Authorization" not in r.calls.last.request.headers for r in routes)


def test_a_manifest_asking_for_the_token_on_a_file_host_is_refused(tmp_path: Path) -> None:
    manifest = _manifest({"Patient": b""}, host="https://files.example.net")
    with respx.mock(assert_all_called=False) as mock:
        Server(mock, {}, manifest=manifest)
        with pytest.raises(InvalidResponseError, match="access token"):
            _run(tmp_path, file_hosts=["files.example.net"])


def test_a_status_url_on_another_host_is_not_polled(tmp_path: Path) -> None:
    with respx.mock(assert_all_called=True) as mock:
        mock.get(f"{BASE}/$export").respond(
            202, headers={"Content-Location": "https://evil.example/status"}
        )
        with pytest.raises(InvalidResponseError, match="evil.example"):
            _run(tmp_path)


def test_a_server_without_export_is_named(tmp_path: Path) -> None:
    capabilities = {"resourceType": "CapabilityStatement", "rest": [{"mode": "server"}]}
    with respx.mock(assert_all_called=True) as mock:
        mock.get(f"{BASE}/$export").respond(
            400, json={"resourceType": "OperationOutcome", "issue": []}
        )
        mock.get(f"{BASE}/metadata").respond(200, json=capabilities)
        with pytest.raises(ConfigurationError, match=r"offers no Bulk Data \$export"):
            _run(tmp_path)


async def _chunks(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_file_larger_than_allowed_is_refused(tmp_path: Path, declared: bool) -> None:
    files = _files(tmp_path, _records(3))
    with respx.mock(assert_all_called=False) as mock:
        server = Server(mock, files)
        for t, route in server.files.items():
            body = files[t]
            # A generator has no length: the size is only known by counting what arrives.
            route.side_effect = lambda _request, body=body: httpx.Response(
                200, content=body if declared else _chunks(body[:50], body[50:])
            )
        with pytest.raises(
            InvalidResponseError, match=r"too large \(the limit is 100\)|larger than 100"
        ):
            _run(tmp_path / "work", max_file_bytes=100)
    assert not list((tmp_path / "work").glob("0*"))  # nothing half-written is kept


def test_a_truncated_file_names_the_line_and_the_rest_is_rebuilt(tmp_path: Path) -> None:
    records = _records()
    files = _files(tmp_path, records)
    lines = files["Encounter"].splitlines(keepends=True)
    files["Encounter"] = b"".join(lines[:-1]) + lines[-1][:40]  # cut mid-line, cleanly
    with respx.mock(assert_all_called=False) as mock:
        Server(mock, files)
        reports = _run(tmp_path / "work")
    (error,) = _errors(reports)
    assert f"Encounter.ndjson line {len(lines)}" in error and "invalid JSON" in error
    assert len(_pulled(reports)) == N - 1


def test_a_connection_lost_mid_file_fetches_the_file_again(tmp_path: Path) -> None:
    records = _records()
    files = _files(tmp_path, records)
    with respx.mock(assert_all_called=False) as mock:
        server = Server(mock, files)
        server.files["Observation"].side_effect = [
            httpx.RemoteProtocolError("peer closed connection without sending complete body"),
            httpx.Response(200, content=files["Observation"]),
        ]
        reports = _run(tmp_path / "work")
    assert server.files["Observation"].call_count == 2
    assert _pulled(reports) == _by_id(records)


def test_a_file_gone_from_the_server_says_to_start_again(tmp_path: Path) -> None:
    files = _files(tmp_path, _records(3))
    with respx.mock(assert_all_called=False) as mock:
        server = Server(mock, files)
        server.files["Patient"].return_value = httpx.Response(404)
        with pytest.raises(ConfigurationError, match="no longer has the file.*remove .*export"):
            _run(tmp_path / "work")


# -- interruption and cancellation ----------------------------------------------------------


def test_an_interrupted_download_resumes_where_it_stopped(tmp_path: Path) -> None:
    records = _records()
    files = _files(tmp_path, records)
    work = tmp_path / "work"
    with respx.mock(assert_all_called=False) as mock:
        server = Server(mock, files)
        server.files["Procedure"].side_effect = httpx.ReadError("connection reset")
        with pytest.raises(TransportError):
            _run(work, retry=RetryPolicy(max_retries=1))
        assert not list(work.glob("*.part"))
        assert (server.kickoff.call_count, server.status.call_count) == (1, 1)

        server.files["Procedure"].side_effect = None
        server.files["Procedure"].return_value = httpx.Response(200, content=files["Procedure"])
        before = {t: route.call_count for t, route in server.files.items()}
        reports = _run(work)
    assert (server.kickoff.call_count, server.status.call_count) == (1, 1)
    again = {t for t, route in server.files.items() if route.call_count > before[t]}
    assert again == {"Procedure"}
    assert _pulled(reports) == _by_id(records)


def test_another_export_in_the_work_directory_is_not_mixed_in(tmp_path: Path) -> None:
    with respx.mock(assert_all_called=False) as mock:
        Server(mock, {}, [httpx.Response(503)] * 10)
        with pytest.raises(ServerError):
            _run(tmp_path, retry=RetryPolicy(max_retries=0))
        with pytest.raises(ConfigurationError, match="holds another export"):
            _run(tmp_path, namespace="https://clinic.example/sid")


def test_cancelling_the_pull_cancels_the_export(tmp_path: Path) -> None:
    polled = asyncio.Event()

    async def main() -> None:
        async with AsyncFhirClient(BASE) as client:

            async def poll_sleep(_seconds: float) -> None:
                polled.set()
                await asyncio.sleep(3600)

            async def consume() -> None:
                async for _ in bulk_pull(client, tmp_path, sleep=poll_sleep):
                    pass

            task = asyncio.create_task(consume())
            await polled.wait()
            task.cancel()  # what Ctrl-C does to asyncio.run's task
            with pytest.raises(asyncio.CancelledError):
                await task

    with respx.mock(assert_all_called=False) as mock:
        server = Server(mock, {}, [httpx.Response(202)] * 5)
        asyncio.run(main())
    assert server.cancel.call_count == 1
    assert not (tmp_path / "export.json").exists()


# -- offline: NDJSON per type and back ------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        encounters(),
        max_size=4,
        unique_by=(
            lambda r: r.id,
            lambda r: r.patient.id,
            lambda r: r.practitioner.id,
            lambda r: r.clinic.id,
        ),
    )
)
def test_ndjson_per_type_rebuilds_the_records(records: list[Encounter]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        with NdjsonPerType(directory) as writer:
            for record in records:
                writer.write(record)
        reports = list(rebuild_ndjson(sorted(Path(directory).glob("*.ndjson"))))
    assert _errors(reports) == []
    assert _pulled(reports) == _by_id(records)


def test_shared_resources_are_written_once(tmp_path: Path) -> None:
    records = _records(30)
    with NdjsonPerType(tmp_path) as writer:
        for record in records:
            writer.write(record)
    patients = (tmp_path / "Patient.ndjson").read_text().splitlines()
    assert len(patients) == len({r.patient.id for r in records})
    assert writer.counts["Encounter"] == 30
    assert "urn:uuid:" not in (tmp_path / "Observation.ndjson").read_text()


# -- the command line -----------------------------------------------------------------------


def test_cli_convert_ndjson_per_type_then_bulk_pull(tmp_path: Path) -> None:
    records = _records()
    source = tmp_path / "records.ndjson"
    source.write_text("".join(r.model_dump_json() + "\n" for r in records))
    runner = CliRunner()
    converted = runner.invoke(cli, ["convert", str(source), "--ndjson-per-type", str(tmp_path)])
    assert converted.exit_code == 0, converted.output
    files = {p.stem: p.read_bytes() for p in tmp_path.glob("*.ndjson") if p != source}
    assert set(files) == {
        "Encounter", "Observation", "Procedure", "Provenance", "Patient", "Practitioner",
        "Organization", "Consent",
    }  # fmt: skip
    out = tmp_path / "pulled.ndjson"
    with respx.mock(assert_all_called=False) as mock:
        Server(mock, files)
        result = runner.invoke(
            cli,
            ["pull", "--bulk", "--server", BASE, "--bulk-dir", str(tmp_path / "w"), "-o", str(out)],
        )
    assert result.exit_code == 0, result.output
    pulled = [Encounter.model_validate_json(line) for line in out.read_text().splitlines()]
    assert _by_id(pulled) == _by_id(records)
    # Emptied after a pull without errors: the empty lock file alone stays.
    assert [p.name for p in (tmp_path / "w").iterdir()] == [LOCK_FILE]
    assert (tmp_path / "w" / LOCK_FILE).stat().st_size == 0


def test_cli_says_when_the_server_has_no_export(tmp_path: Path) -> None:
    with respx.mock(assert_all_called=False) as mock:
        mock.get(f"{BASE}/$export").respond(404)
        mock.get(f"{BASE}/metadata").respond(
            200, json={"resourceType": "CapabilityStatement", "rest": []}
        )
        result = CliRunner().invoke(
            cli, ["pull", "--bulk", "--server", BASE, "--bulk-dir", str(tmp_path)]
        )
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "offers no Bulk Data $export" in lines[0]
    assert "Traceback" not in result.output


def test_cli_refuses_bulk_with_a_patient(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["pull", "--bulk", "--server", BASE, "--patient", "1"])
    assert result.exit_code == 2 and "--level group" in result.output


class _Exporting(ExportHandler):
    """A server whose export never finishes; it records the requests it gets."""

    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append(f"GET {self.path.split('?')[0]}")
        if "$export" in self.path:
            self._send(202, Content_Location=f"http://{self.headers['Host']}/fhir/status/1")
        else:
            self._send(202, Retry_After="1")


def test_ctrl_c_cancels_the_export_on_the_server(tmp_path: Path) -> None:
    with local_server(_Exporting) as base:
        returncode, err = interrupt_pull(
            base, tmp_path, lambda: "GET /fhir/status/1" in _Exporting.seen
        )
    assert "DELETE /fhir/status/1" in _Exporting.seen
    assert returncode == 130
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "cancelled the export was cancelled on the server"
    assert not (tmp_path / "export.json").exists()


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--level", "group", "--group", "g1"], id="level"),
        pytest.param(["--file-host", "files.example.net"], id="file-host"),
        pytest.param(["--no-type-filter"], id="no-type-filter"),
    ],
)
def test_cli_bulk_options_need_bulk(args: list[str]) -> None:
    result = CliRunner().invoke(cli, ["pull", "--server", BASE, *args])
    assert result.exit_code == 2 and "only with --bulk" in result.output


@pytest.mark.parametrize(
    "text", ["[]", "{", '{"server": 1}'], ids=["list", "not-json", "no-request"]
)
def test_a_broken_state_file_is_named(tmp_path: Path, text: str) -> None:
    (tmp_path / "export.json").write_text(text)
    with pytest.raises(ConfigurationError, match="export.json"):
        _run(tmp_path)


def test_the_types_a_record_maps_to_are_those_an_export_asks_for() -> None:
    """convert --ndjson-per-type replaces the files of RESOURCE_TYPES; pull exports these."""
    assert set(ENCOUNTER_TYPES) == RESOURCE_TYPES
    kinds = {
        e["resource"]["resourceType"]
        for path in ENCOUNTER_FILES
        for e in bundle_dict(Encounter.model_validate_json(path.read_text()))["entry"]
    }
    assert kinds <= RESOURCE_TYPES


# -- one pull at a time in a work directory ---------------------------------------------------


_HOLDER = """
import sys, filelock
lock = filelock.FileLock(sys.argv[1], timeout=0)
lock.acquire()
print("held", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def _held_by_another_process(work: Path) -> Iterator[subprocess.Popen[str]]:
    """``work``'s lock held by another process (as a pull running in another shell holds it)."""
    work.mkdir(parents=True, exist_ok=True)
    with subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(work / LOCK_FILE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None and process.stdout.readline() == "held\n"
            yield process
        finally:
            process.kill()


def test_a_second_pull_in_the_same_directory_is_refused_and_the_first_goes_on(
    tmp_path: Path,
) -> None:
    records = _records()
    files = _files(tmp_path, records)
    work = tmp_path / "work"

    async def main() -> tuple[list[MappingReport], str]:
        async with AsyncFhirClient(BASE) as client:
            first = bulk_pull(client, work, sleep=Clock())
            reports = [await anext(first)]  # the first pull has its files, mid-rebuild
            with pytest.raises(ConfigurationError) as refused:
                async for _ in bulk_pull(client, work, sleep=Clock()):
                    pass
            reports += [report async for report in first]
            return reports, str(refused.value)

    with respx.mock(assert_all_called=False) as mock:
        server = Server(mock, files)
        reports, message = asyncio.run(main())
        assert server.kickoff.call_count == 1  # the second sent nothing
        assert f"{work} is in use by another bulk pull" in message
        assert _pulled(reports) == _by_id(records)
        # Once the first has ended, the directory is free again.
        assert _pulled(_run(work)) == _by_id(records)


def test_a_pull_in_a_directory_another_process_holds_sends_nothing(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "00001.Encounter.ndjson").parent.mkdir(parents=True)
    (work / "00001.Encounter.ndjson").write_text('{"resourceType": "Encounter"}\n')
    with respx.mock(assert_all_called=False) as mock, _held_by_another_process(work):
        server = Server(mock, _files(tmp_path, _records(2)))
        result = CliRunner().invoke(
            cli, ["pull", "--bulk", "--server", BASE, "--bulk-dir", str(work)]
        )
        assert server.kickoff.call_count == 0
        # The other pull's files are its own: neither read nor removed.
        remove_export(work)
        assert (work / "00001.Encounter.ndjson").exists()
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "is in use by another bulk pull" in lines[0], result.output
    assert "Traceback" not in result.output


def test_a_pull_killed_outright_leaves_the_directory_free(tmp_path: Path) -> None:
    records = _records(3)
    work = tmp_path / "work"
    with _held_by_another_process(work) as holder:
        holder.send_signal(signal.SIGKILL)  # no finally, no release: the kernel frees it
        holder.wait()
        with respx.mock(assert_all_called=False) as mock:
            Server(mock, _files(tmp_path, records))
            assert _pulled(_run(work)) == _by_id(records)


def test_a_pull_left_early_frees_the_directory_and_resumes(tmp_path: Path) -> None:
    records = _records()
    files = _files(tmp_path, records)
    work = tmp_path / "work"

    async def first_batch() -> None:
        async with AsyncFhirClient(BASE) as client:
            pulled = bulk_pull(client, work, sleep=Clock())
            await anext(pulled)
            await pulled.aclose()  # a caller that stops reading

    with respx.mock(assert_all_called=False) as mock:
        server = Server(mock, files)
        asyncio.run(first_batch())
        assert _pulled(_run(work)) == _by_id(records)  # not refused: the lock went with it
        assert server.kickoff.call_count == 1  # and the export was resumed, not started again


def test_remove_files_empties_the_directory_only_after_a_clean_pull_and_under_its_lock(
    tmp_path: Path,
) -> None:
    records = _records()
    files = _files(tmp_path, records)
    work = tmp_path / "work"
    seen_during: list[list[str]] = []

    async def main() -> list[MappingReport]:
        async with AsyncFhirClient(BASE) as client:
            reports = []
            async for report in bulk_pull(client, work, sleep=Clock(), remove_files=True):
                reports.append(report)
                # Still there while records are handed out, and the directory still held.
                seen_during.append(sorted(p.name for p in work.glob("*.ndjson")))
                with pytest.raises(ConfigurationError, match="in use"):
                    async for _ in bulk_pull(client, work, sleep=Clock()):
                        pass
            return reports

    with respx.mock(assert_all_called=False) as mock:
        Server(mock, files)
        reports = asyncio.run(main())
    assert _pulled(reports) == _by_id(records)
    assert all(seen_during) and [p.name for p in work.iterdir()] == [LOCK_FILE]

    # With an error in a batch (a bad line), the files stay for the error naming its line.
    broken = dict(files) | {"Observation": files["Observation"] + b"{not json\n"}
    again = tmp_path / "again"
    with respx.mock(assert_all_called=False) as mock:
        Server(mock, broken)
        reports = _run(again, remove_files=True)
    assert _errors(reports) and sorted(p.name for p in again.glob("*.ndjson"))
