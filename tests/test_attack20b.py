"""Second attack on the Bulk Data pull (issue 20): what the review fixes of f5c4cb0 left open.

Each test states what should hold and fails today. The respx server and helpers are those of
``test_bulk.py``.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import signal
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path
from typing import ClassVar

import pytest
import respx
from click.testing import CliRunner

from ims_fhir import InvalidResponseError, rebuild_ndjson
from ims_fhir.cli.commands import cli

from .bulk_support import ExportHandler, interrupt_pull, local_server
from .test_bulk import BASE, Server, _by_id, _errors, _files, _manifest, _pulled, _records, _run

FILE_HOST = "files.example.net"


def test_a_finished_export_on_a_file_host_not_named_yet_is_resumed(tmp_path: Path) -> None:
    """Naming the file host, as the error says, must fetch the finished export, not a new one.

    A manifest listing files on a host not given with ``file_hosts`` is refused with "name
    the host as a file host if the server keeps its files there". Before f5c4cb0 the next
    run with ``file_hosts`` resumed the finished export (``file_hosts`` is not part of the
    remembered request). Now any ``InvalidResponseError`` of the manifest calls
    ``remove_export``: the export the server spent hours on is forgotten (and never
    cancelled there), and following the advice kicks off a whole new export.
    """
    records = _records(3)
    files = _files(tmp_path, records)
    manifest = _manifest(files, host=f"https://{FILE_HOST}", requiresAccessToken=False)
    work = tmp_path / "work"
    with respx.mock(assert_all_called=False) as mock:
        server = Server(mock, files, manifest=manifest)
        for t, body in files.items():
            mock.get(f"https://{FILE_HOST}/files/{t}.ndjson").respond(200, content=body)
        with pytest.raises(InvalidResponseError, match="file host"):
            _run(work)
        reports = _run(work, file_hosts=[FILE_HOST])
    assert _pulled(reports) == _by_id(records)
    assert server.kickoff.call_count == 1, "the finished export was forgotten: exported again"


def test_a_count_written_as_a_whole_json_number_is_taken(tmp_path: Path) -> None:
    """A manifest ``count`` of ``3.0`` is a count of 3: the export must be used.

    The Bulk Data IG gives ``count`` as "a JSON number"; ``3.0`` is one (a Java server
    serialising a double writes it so). ``check_manifest`` accepts only a Python ``int``:
    the whole manifest is refused as unusable, and the finished export is forgotten
    (``remove_export``), so every pull fails the same way after a full export each time.
    """
    records = _records(3)
    files = _files(tmp_path, records)
    manifest = _manifest(files)
    for item in manifest["output"]:
        item["count"] = float(len(files[item["type"]].splitlines()))
    with respx.mock(assert_all_called=False) as mock:
        Server(mock, files, manifest=manifest)
        reports = _run(tmp_path / "work")
    assert _errors(reports) == []
    assert _pulled(reports) == _by_id(records)


def test_every_conflicting_copy_is_reported_or_counted(tmp_path: Path) -> None:
    """Past 1000 conflicting resources, the rest must still be said (at least counted).

    f5c4cb0 made two different copies of a Patient a warning, and capped bad lines and
    error-file issues at 1000 "the rest counted". The conflicts are capped at 1000 too, but
    the 1001st and later are dropped without a word: those patients' records are rebuilt
    from an arbitrary copy silently - the first review's finding, again, past the cap.
    """
    first = [{"resourceType": "Patient", "id": f"p{n:04d}", "gender": "male"} for n in range(1001)]
    second = [p | {"gender": "female"} for p in first]
    path = tmp_path / "Patient.ndjson"
    path.write_text("".join(json.dumps(p) + "\n" for p in [*first, *second]))
    reports = list(rebuild_ndjson([path]))
    said = [str(w) for report in reports for w in [*report.warnings, *report.errors]]
    assert len([s for s in said if "p0" in s]) == 1000  # the first 1000, one by one
    assert any("p1000" in s or "more" in s for s in said), (
        "the 1001st conflicting Patient is resolved silently"
    )


@pytest.mark.parametrize("name", ["Encounter", "Patient"])
def test_convert_ndjson_per_type_never_deletes_its_own_input(tmp_path: Path, name: str) -> None:
    """``convert DIR/<Type>.ndjson --ndjson-per-type DIR`` must not destroy the input.

    f5c4cb0 made ``NdjsonPerType`` unlink every ``<Type>.ndjson`` of the nine record types
    when it is created - before ``read_records`` (a lazy generator) has read a line. IMS
    records kept as ``Encounter.ndjson`` (a natural name for an export of encounters),
    converted into the directory they are in (as ``test_cli_convert_ndjson_per_type_then_
    bulk_pull`` does with ``records.ndjson``), are deleted unread: the user's only copy of
    the clinic's records is gone, and the command reports nothing converted. It should refuse
    (an input among the files it replaces) or read it first.
    """
    records = _records(3)
    source = tmp_path / f"{name}.ndjson"
    text = "".join(r.model_dump_json() + "\n" for r in records)
    source.write_text(text)
    result = CliRunner().invoke(cli, ["convert", str(source), "--ndjson-per-type", str(tmp_path)])
    assert source.is_file(), f"the input {source.name} was deleted unread: {result.output}"
    assert source.read_text() == text


def _peak_bytes(directory: Path, files: int) -> int:
    """The peak memory of rebuilding ``files`` files of 1,100 bad lines each."""
    directory.mkdir()
    paths = []
    for n in range(files):
        path = directory / f"{n:05d}.Encounter.ndjson"
        path.write_bytes(b"[]\n" * 1100)
        paths.append(path)
    tracemalloc.start()
    try:
        for report in rebuild_ndjson(paths):
            del report
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_many_files_of_bad_lines_are_read_in_bounded_memory(tmp_path: Path) -> None:
    """Memory stays flat however many files of bad lines an export lists.

    f5c4cb0 bounds the errors kept at 1,000 *per file*, then collects those of every file
    in one list, yielded as one report (``bulk_pull``'s ``report.errors += index.load(...)``,
    and the same for error files' issues). A manifest may list 100,000 files: a hostile
    server serving 100,000 files of 1,001 lines of ``[]`` (3 KB each, 300 MB in all) makes
    the pull hold 100 million ``MappingError`` - the first review's memory finding, reached
    with many small files instead of one large one. Here 40 files take about ten times
    what 4 take.
    """
    small = _peak_bytes(tmp_path / "small", 4)
    large = _peak_bytes(tmp_path / "large", 40)
    assert large < 3 * small, f"{small // 2**20} MiB for 4 files, {large // 2**20} MiB for 40"


class _SlowKickOff(ExportHandler):
    """A server that takes its time to answer the kick-off (it has received it)."""

    seen: ClassVar[list[str]] = []
    release = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append(f"GET {self.path.split('?')[0]}")
        self.release.wait(60)
        with contextlib.suppress(OSError):  # the client is gone by now
            self._send(503)


def test_ctrl_c_during_the_kick_off_does_not_claim_the_export_was_cancelled(
    tmp_path: Path,
) -> None:
    """Ctrl-C before the kick-off is answered: no DELETE goes out, so do not say it did.

    f5c4cb0 made the CLI say "pull stopped" when Ctrl-C comes while indexing or rebuilding,
    and "the export was cancelled on the server" at every other stage. During the kick-off
    (a server can take seconds to answer it; it has the request and may be exporting)
    ``cancel`` has no status URL and returns without a word to the server, yet the user is
    told the export was cancelled there: it may run on, holding the patients' data.
    """
    with local_server(_SlowKickOff, before_close=_SlowKickOff.release.set) as base:
        returncode, err = interrupt_pull(
            base,
            tmp_path / "work",
            lambda: "GET /fhir/$export" in _SlowKickOff.seen,
            settle=0.2,
        )
    assert returncode == 130, err
    deleted = any(s.startswith("DELETE") for s in _SlowKickOff.seen)
    claimed = "the export was cancelled on the server" in err
    assert deleted or not claimed, f"no DELETE was sent, yet: {err.strip()[-120:]}"


def test_an_error_file_cut_short_is_reported(tmp_path: Path) -> None:
    """An error file holding fewer issues than its ``count`` must not pass as whole either.

    f5c4cb0 checks ``count`` in ``_fetch`` for every file, error files included: one cut
    short is fetched again up to the retry limit, then kept - but only *output* files are
    reported as short (``download`` zips ``output`` alone). The server's word that resources
    could not be exported (whose encounters are therefore missing) is lost without a trace:
    the first review's "a file cut short passes as whole", through the error files.
    """
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "processing", "diagnostics": "lost one"}],
    }
    manifest = _manifest({})
    manifest["error"] = [
        {"type": "OperationOutcome", "url": f"{BASE}/files/errors.ndjson", "count": 2}
    ]
    with respx.mock(assert_all_called=False) as mock:
        Server(mock, {}, manifest=manifest)
        route = mock.get(f"{BASE}/files/errors.ndjson").respond(200, json=outcome)
        reports = _run(tmp_path / "work")
    assert route.call_count > 1  # seen as cut short, fetched again
    errors = _errors(reports)
    assert any("lost one" in e for e in errors)
    assert any("error-00000.ndjson" in e and "lost one" not in e for e in errors), (
        f"an error file with 1 of its 2 issues, kept without a word: {errors}"
    )


_KILLED = """
import sys, time
from ims_fhir import rebuild_ndjson
for report in rebuild_ndjson(sys.argv[1:]):
    print("rebuilding", flush=True)
    time.sleep(60)
"""


def test_a_killed_rebuild_leaves_no_hidden_copy_of_the_patients(tmp_path: Path) -> None:
    """After ``rebuild_ndjson`` is killed (SIGTERM), the next run leaves no index behind.

    The index is a copy of every resource of the files: patients' names, birth dates,
    findings. Before f5c4cb0 it was ``index.sqlite3`` beside the files: a run killed by
    SIGTERM (a job's time limit; Python runs no ``finally`` then) left it, visible, and the
    next run replaced and removed it. Now each run makes a hidden ``.ims-fhir-index-*``
    beside the user's files: every killed run leaves another copy of the patients' data,
    which no later run ever removes and ``ls`` does not show.
    """
    files = _files(tmp_path, _records(3))
    data = tmp_path / "data"
    data.mkdir()
    paths = []
    for kind, body in files.items():
        (data / f"{kind}.ndjson").write_bytes(body)
        paths.append(str(data / f"{kind}.ndjson"))
    paths.append(str(data / "Encounter.ndjson"))  # an Encounter twice: a first report
    for _ in range(2):
        with subprocess.Popen(
            [sys.executable, "-c", _KILLED, *paths], stdout=subprocess.PIPE, text=True
        ) as process:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "rebuilding"
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    list(rebuild_ndjson(paths))  # a run that completes
    left = sorted(p.name for p in data.iterdir() if p.suffix != ".ndjson")
    assert left == [], f"copies of the patients' data left in {data}: {left}"


class _FlakyFile(ExportHandler):
    """An export whose one file first fails with a 503 whose OperationOutcome holds escapes."""

    body: ClassVar[bytes] = b""
    failed: ClassVar[list[str]] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?")[0]
        base = f"http://{self.headers['Host']}/fhir"
        if path == "/fhir/$export":
            self._send(202, Content_Location=f"{base}/status/1")
        elif path == "/fhir/status/1":
            manifest = _manifest({"Patient": b""}, host=base, requiresAccessToken=False)
            self._send(200, json.dumps(manifest).encode(), Content_Type="application/json")
        elif not self.failed:
            self.failed.append(path)
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [
                    {"severity": "error", "code": "transient", "diagnostics": "x\x1b[2J\x1b[8m"}
                ],
            }
            self._send(
                503,
                json.dumps(outcome).encode(),
                Content_Type="application/fhir+json",
                Retry_After="0",
            )
        else:
            self._send(200, self.body, Content_Type="application/fhir+ndjson")


def test_a_retried_download_cannot_write_to_the_terminal(tmp_path: Path) -> None:
    """The server's words in the "fetching the file again" warning reach stderr escape-free.

    f5c4cb0 strips control characters from the one-line error, X-Progress and the error
    files' diagnostics. A file download that fails and is retried is logged (WARNING, shown
    by the CLI's ``logging.basicConfig`` on stderr) with the exception's text, which holds
    the OperationOutcome's diagnostics as the server wrote them: ESC sequences clear the
    screen or hide text - the first review's finding, through the log.
    """
    _FlakyFile.body = _files(tmp_path, _records(1))["Patient"]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyFile)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}/fhir"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "ims_fhir", "pull", "--bulk", "--server", base,
             "--bulk-dir", str(tmp_path / "work"), "-o", str(tmp_path / "out.ndjson")],
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert _FlakyFile.failed, result.stderr
    assert "x[2J" in result.stderr.replace("\x1b", ""), result.stderr  # the warning is there
    assert "\x1b" not in result.stderr, repr(result.stderr)


def test_the_summary_counts_every_bad_line_not_the_messages(tmp_path: Path) -> None:
    """``pull --bulk``'s last line must count the problems, not the messages kept of them.

    f5c4cb0 keeps 1,000 bad-line errors a file and adds one "and N more lines that cannot be
    used". The CLI counts ``len(report.errors)`` into "N encounters could not be mapped":
    an export with 1,500 lines that cannot be used is summed up as 1,001, one with 100,000
    as 1,001 too - the extent of the damage, the one number a nightly job's log keeps, is
    lost to the cap.
    """
    manifest = _manifest({"Encounter": b""})
    runner = CliRunner()
    with respx.mock(assert_all_called=False) as mock:
        Server(mock, {"Encounter": b"[]\n" * 1500}, manifest=manifest)
        result = runner.invoke(
            cli, ["pull", "--bulk", "--server", BASE, "--bulk-dir", str(tmp_path / "w")]
        )
    assert result.exit_code == 1, result.output
    assert "and 500 more lines" in result.output
    last = result.output.strip().splitlines()[-1]
    assert "1500" in last.replace(",", ""), last
