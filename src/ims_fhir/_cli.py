"""The ``ims-fhir`` command line: a thin layer over the library.

Exit codes: 0 when everything succeeded, 1 when some records failed or conflicted, 2 for usage
or configuration errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ._async_client import AsyncFhirClient
from ._check import check_capabilities
from ._config import auth_from, load_config
from ._convert import detect_input, read_fhir
from ._exceptions import ConfigurationError, FhirError, RecordError, StateError
from ._package import PACKAGE_NAME, build_package, package_resources
from ._pull import DEFAULT_PAGE_SIZE, pull
from ._reader import ReadRecord, read_records
from ._record import Encounter
from ._schema import record_json_schema_text
from ._state import StateStore, default_state_path
from ._sync import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    FATAL_ERRORS,
    Pusher,
    PushResult,
    PushSummary,
)
from ._synthetic import synthetic_encounter
from ._to_fhir import to_fhir_json, to_transaction
from ._version import __version__

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2

F = TypeVar("F", bound=Callable[..., Any])


def _stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _load_config(ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    try:
        settings = load_config(value)
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc)) from exc
    if settings:
        group = ctx.command
        assert isinstance(group, click.Group)
        ctx.default_map = {name: dict(settings) for name in group.commands}
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ims-fhir")
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="IMS_FHIR_CONFIG",
    callback=_load_config,
    is_eager=True,
    expose_value=False,
    help="TOML settings file (flags and environment variables take precedence).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log each request (never bodies or tokens).")
def cli(verbose: bool) -> None:
    """Move IMS (intramuscular stimulation) encounters between clinic systems and FHIR R4."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)


def server_options(func: F) -> F:
    """The options every command that talks to a server takes."""
    options = [
        click.option("--server", envvar="IMS_FHIR_SERVER", required=True, help="FHIR base URL."),
        click.option("--token", envvar="IMS_FHIR_TOKEN", help="Bearer token (prefer the env var)."),
        click.option("--basic-user", envvar="IMS_FHIR_BASIC_USER", help="HTTP Basic user."),
        click.option(
            "--basic-password", envvar="IMS_FHIR_BASIC_PASSWORD", help="HTTP Basic password."
        ),
        click.option(
            "--smart-client-id", envvar="IMS_FHIR_SMART_CLIENT_ID", help="SMART client id."
        ),
        click.option(
            "--smart-key-file",
            envvar="IMS_FHIR_SMART_KEY_FILE",
            type=click.Path(exists=True, dir_okay=False),
            help="SMART private key (PEM, RS384 or ES384).",
        ),
        click.option("--smart-kid", envvar="IMS_FHIR_SMART_KID", help="SMART key id."),
        click.option(
            "--smart-token-url", envvar="IMS_FHIR_SMART_TOKEN_URL", help="Token endpoint."
        ),
        click.option("--smart-scope", envvar="IMS_FHIR_SMART_SCOPE", help="Scopes to request."),
        click.option(
            "--allow-insecure-http",
            is_flag=True,
            envvar="IMS_FHIR_ALLOW_INSECURE_HTTP",
            help="Allow plain http to a host other than this machine.",
        ),
        click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _client(options: dict[str, Any]) -> AsyncFhirClient:
    try:
        return AsyncFhirClient(
            options["server"],
            auth=auth_from(options),
            timeout=options["timeout"],
            allow_insecure_http=bool(options["allow_insecure_http"]),
        )
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from exc


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except StateError:
        raise
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from exc


@cli.command()
def schema() -> None:
    """Print the JSON Schema of an IMS encounter record."""
    click.echo(record_json_schema_text(), nl=False)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
@click.option(
    "--server",
    envvar="IMS_FHIR_VALIDATE_SERVER",
    help="Also run $validate on this server for every resource mapped from the records, "
    "against its profile.",
)
@click.option("--allow-insecure-http", is_flag=True, help="Allow plain http to a remote host.")
def validate(
    paths: Sequence[Path], as_json: bool, server: str | None, allow_insecure_http: bool
) -> None:
    """Check IMS records in PATHS (files or directories) and report every bad one.

    Without --server, records are checked clinically and mapped to FHIR. With --server, every
    resource mapped from them is also validated by the server against the profile named in
    its meta.profile, and each issue is reported with resource, element path and message.
    """
    good = 0
    errors: list[RecordError] = []
    records: list[Encounter] = []
    for item in read_records(paths):
        if isinstance(item, RecordError):
            errors.append(item)
            if not as_json:
                _stderr().print(f"[red]invalid[/red] {escape(str(item))}")
        else:
            good += 1
            if server:
                records.append(item.record)
    server_issues: list[dict[str, Any]] = []
    if server:
        options = {"server": server, "timeout": 60.0, "allow_insecure_http": allow_insecure_http}
        server_issues = _run(_server_validate(_client(options), records))
        for issue in server_issues:
            if not as_json:
                _stderr().print(
                    f"[red]{issue['severity']}[/red] {issue['record']} {issue['resource']} "
                    f"{issue['path']}: {escape(issue['message'])}"
                )
    failed = errors or any(i["severity"] in {"error", "fatal"} for i in server_issues)
    if as_json:
        report = {
            "valid": good,
            "invalid": len(errors),
            "errors": [_error_json(e) for e in errors],
            "server_issues": server_issues,
        }
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        line = f"{good} valid, {len(errors)} invalid"
        if server:
            count = sum(1 for i in server_issues if i["severity"] in {"error", "fatal"})
            line += f"; {count} errors from $validate on {server}"
        click.echo(line)
    sys.exit(EXIT_SOME_FAILED if failed else EXIT_OK)


async def _server_validate(
    client: AsyncFhirClient, records: list[Encounter]
) -> list[dict[str, Any]]:
    issues = []
    async with client:
        for record in records:
            for entry in json.loads(to_fhir_json(record))["entry"]:
                resource = entry["resource"]
                profile = resource["meta"]["profile"][0]
                outcome = await client.validate(resource, profile=profile)
                label = f"{resource['resourceType']} ({profile.rsplit('/', 1)[-1]})"
                for issue in outcome.get("issue") or []:
                    if issue.get("severity") not in {"error", "fatal", "warning"}:
                        continue
                    where = issue.get("expression") or issue.get("location") or ["?"]
                    issues.append(
                        {
                            "record": record.id,
                            "resource": label,
                            "severity": issue["severity"],
                            "path": where[0],
                            "message": issue.get("diagnostics") or "",
                        }
                    )
    return [i for i in issues if i["severity"] != "warning"] + [
        i for i in issues if i["severity"] == "warning"
    ]


@cli.command()
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path(f"{PACKAGE_NAME}-{__version__}.tgz"),
    show_default=True,
    help="Where to write the package.",
)
def package(output: Path) -> None:
    """Build the FHIR NPM package of the project's profiles and terminology."""
    path = build_package(output)
    click.echo(f"{path} ({len(package_resources())} resources)")


def _error_json(error: RecordError) -> dict[str, Any]:
    return {
        "file": error.location.file,
        "line": error.location.line,
        "index": error.location.index,
        "record": error.location.record_id,
        "issues": [{"path": i.path, "reason": i.reason} for i in error.issues],
    }


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write here instead of stdout.",
)
@click.option("--single", is_flag=True, help="IMS in: write one transaction Bundle, not NDJSON.")
@click.option(
    "--from",
    "source",
    type=click.Choice(["auto", "ims", "fhir"]),
    default="auto",
    show_default=True,
    help="What the inputs hold.",
)
def convert(paths: Sequence[Path], output: Path | None, single: bool, source: str) -> None:
    """Convert IMS records to FHIR transaction Bundles (NDJSON), or FHIR back to IMS records.

    IMS records in: one Bundle per encounter, one per line (or one Bundle with --single).
    FHIR Bundles or NDJSON of resources in: one IMS record per line. Bad input is reported on
    stderr with its file, record and field; the rest is converted. Exit code 1 if any failed.
    """
    kind = detect_input(paths) if source == "auto" else source
    err = _stderr()
    failed = converted = 0
    with click.open_file(str(output) if output else "-", "w", encoding="utf-8") as out:
        if kind == "ims":
            good = []
            for item in read_records(paths):
                if isinstance(item, RecordError):
                    failed += 1
                    err.print(f"[red]invalid[/red] {escape(str(item))}")
                elif single:
                    good.append(item.record)
                else:
                    out.write(to_fhir_json(item.record) + "\n")
                    converted += 1
            if single:
                out.write(to_transaction(good).model_dump_json() + "\n")
                converted = len(good)
        else:
            for result in read_fhir(paths):
                if isinstance(result, RecordError):
                    failed += 1
                    err.print(f"[red]invalid[/red] {escape(str(result))}")
                    continue
                for record in result.records:
                    out.write(record.model_dump_json(exclude_defaults=True) + "\n")
                    converted += 1
                for error in result.errors:
                    failed += 1
                    err.print(f"[red]unmappable[/red] {escape(str(error))}")
                for skipped in result.skipped:
                    err.print(f"[yellow]skipped[/yellow] {skipped.resource}: {skipped.reason}")
    err.print(f"{converted} converted, {failed} failed")
    sys.exit(EXIT_SOME_FAILED if failed else EXIT_OK)


def _with_namespace(record: Encounter, namespace: str | None) -> Encounter:
    if namespace is None or record.clinic.namespace is not None:
        return record
    return record.model_copy(
        update={"clinic": record.clinic.model_copy(update={"namespace": namespace})}
    )


def _fatal(err: Console, exc: BaseException) -> None:
    """Report an error that stops the whole run (setup, server, state): one line, exit 2."""
    err.print(f"[red]error[/red] {escape(str(exc))}")
    sys.exit(EXIT_USAGE)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@server_options
@click.option(
    "--state",
    envvar="IMS_FHIR_STATE",
    type=click.Path(dir_okay=False, path_type=Path),
    default=default_state_path,
    show_default="the user's data directory",
    help="SQLite state file.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 500),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Encounters per transaction.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=DEFAULT_CONCURRENCY,
    show_default=True,
    help="Transactions in flight.",
)
@click.option(
    "--on-conflict",
    type=click.Choice(["report", "overwrite"]),
    default="report",
    show_default=True,
    help="What to do when the server's copy changed since the last push.",
)
@click.option(
    "--namespace",
    envvar="IMS_FHIR_NAMESPACE",
    help="Identifier namespace for clinics whose records name none.",
)
@click.option("--dry-run", is_flag=True, help="Show what would be written; send nothing.")
@click.option(
    "--verify",
    is_flag=True,
    help="Check every encounter against the server, unchanged ones too: re-create what was "
    "deleted there, report what was changed there, and rebuild the state from the server.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def push(paths: Sequence[Path], **options: Any) -> None:
    """Push IMS encounters in PATHS to a FHIR server: idempotent, incremental, resumable."""
    err = _stderr()
    summary = PushSummary()
    results: list[PushResult] = []
    invalid: list[RecordError] = []

    def records() -> Iterator[ReadRecord]:
        for item in read_records(paths):
            if isinstance(item, RecordError):
                invalid.append(item)
                err.print(f"[red]invalid[/red] {escape(str(item))}")
            else:
                record = _with_namespace(item.record, options["namespace"])
                yield ReadRecord(item.location, record)

    async def run() -> None:
        async with _client(options) as client:
            with StateStore(options["state"]) as state:
                pusher = Pusher(
                    client,
                    state,
                    batch_size=options["batch_size"],
                    concurrency=options["concurrency"],
                    on_conflict=options["on_conflict"],
                    dry_run=options["dry_run"],
                    verify=options["verify"],
                )
                with _progress(err, enabled=err.is_terminal and not options["as_json"]) as advance:
                    async for result in pusher.push(records()):
                        summary.add(result)
                        if options["as_json"]:
                            results.append(result)
                        advance(result)
                        if result.action in {"failed", "conflict"}:
                            err.print(
                                f"[red]{result.action}[/red] {result.record_id}: "
                                f"{escape(result.message or '')}"
                            )
                        elif not err.is_terminal and not options["as_json"]:
                            err.print(f"{result.action} {result.record_id}")

    try:
        _run(run())
    except FATAL_ERRORS as exc:
        _fatal(err, exc)
    except FhirError as exc:
        err.print(f"[red]error[/red] {escape(str(exc))}")
        sys.exit(EXIT_SOME_FAILED)
    for _ in invalid:
        summary.add(PushResult("", "failed"))
    _report(summary, results, invalid, options["as_json"])
    sys.exit(EXIT_OK if summary.ok else EXIT_SOME_FAILED)


class _progress:  # noqa: N801 - a context manager used like a function
    """A progress bar on a terminal, nothing otherwise."""

    def __init__(self, console: Console, *, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = Progress(
            TextColumn("pushing"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[last]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )

    def __enter__(self) -> Callable[[PushResult], None]:
        if not self.enabled:
            return lambda result: None
        self.bar.start()
        task = self.bar.add_task("push", total=None, last="")

        def advance(result: PushResult) -> None:
            self.bar.update(task, advance=1, last=f"{result.action} {result.record_id}")

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.stop()


_COLUMNS = ("created", "updated", "unchanged", "entered-in-error", "conflict", "failed")


def _report(
    summary: PushSummary, results: list[PushResult], invalid: list[RecordError], as_json: bool
) -> None:
    counts = {name: summary.counts.get(name, 0) for name in _COLUMNS}
    for name in ("would-create", "would-update"):
        if summary.counts.get(name):
            counts[name] = summary.counts[name]
    if as_json:
        report = {
            "summary": counts,
            "resources_written": summary.resources_written,
            "resources_entered_in_error": summary.resources_retired,
            "results": [
                {
                    "record": r.record_id,
                    "action": r.action,
                    "written": r.written,
                    "entered_in_error": r.retired,
                    "message": r.message,
                }
                for r in results
            ],
            "invalid": [_error_json(e) for e in invalid],
        }
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
        return
    parts = [f"{value} {name}" for name, value in counts.items()]
    click.echo(
        ", ".join(parts) + f" ({summary.resources_written} resources written, "
        f"{summary.resources_retired} marked entered-in-error)"
    )


@cli.command(name="pull")
@server_options
@click.option("--patient", help="Only this patient's encounters (server id, e.g. Patient/123).")
@click.option("--since", help="Only encounters changed at or after this instant (ISO 8601).")
@click.option(
    "--page-size", type=click.IntRange(1, 500), default=DEFAULT_PAGE_SIZE, show_default=True
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="NDJSON file (default stdout).",
)
def pull_command(**options: Any) -> None:
    """Fetch IMS encounters from a FHIR server and write them as IMS records (NDJSON)."""
    err = _stderr()
    totals = {"records": 0, "skipped": 0, "unmappable": 0}

    async def run() -> None:
        async with _client(options) as client:
            output = options["output"]
            with click.open_file(str(output) if output else "-", "w", encoding="utf-8") as out:
                async for report in pull(
                    client,
                    patient=options["patient"],
                    since=options["since"],
                    page_size=options["page_size"],
                ):
                    for record in report.records:
                        out.write(record.model_dump_json(exclude_defaults=True) + "\n")
                    totals["records"] += len(report.records)
                    totals["skipped"] += len(report.skipped)
                    totals["unmappable"] += len(report.errors)
                    for error in report.errors:
                        err.print(f"[red]unmappable[/red] {escape(str(error))}")

    try:
        _run(run())
    except FhirError as exc:
        err.print(f"[red]error[/red] {escape(str(exc))}")
        sys.exit(EXIT_SOME_FAILED)
    err.print(
        f"{totals['records']} records pulled, {totals['skipped']} resources skipped "
        f"(not made by ims-fhir), {totals['unmappable']} encounters could not be mapped"
    )
    sys.exit(EXIT_SOME_FAILED if totals["unmappable"] else EXIT_OK)


@cli.command()
@server_options
@click.option(
    "--write-test", is_flag=True, help="Push a synthetic encounter, pull it, compare, delete it."
)
def check(**options: Any) -> None:
    """Tell whether a FHIR server supports what push and pull need."""
    ok = True

    async def run() -> None:
        nonlocal ok
        async with _client(options) as client:
            statement = await client.request_json("GET", "metadata")
            for item in check_capabilities(statement):
                mark = "ok  " if item.ok else "MISSING"
                click.echo(
                    f"{mark} {item.name}{': ' + item.detail if item.detail and not item.ok else ''}"
                )
                ok &= item.ok
            if options["write_test"]:
                ok &= await _write_test(client)

    try:
        _run(run())
    except FhirError as exc:
        _stderr().print(f"[red]error[/red] {escape(str(exc))}")
        sys.exit(EXIT_SOME_FAILED)
    click.echo(
        "the server can take IMS encounters" if ok else "the server lacks what is marked MISSING"
    )
    sys.exit(EXIT_OK if ok else EXIT_SOME_FAILED)


async def _write_test(client: AsyncFhirClient) -> bool:
    """Push a synthetic encounter, pull it back, compare, and delete what was written."""
    record = synthetic_encounter()
    server = str(client.base_url).rstrip("/")
    with StateStore(":memory:") as state:
        (result,) = [r async for r in Pusher(client, state).push([record])]
        pushed = result.action == "created"
        click.echo(
            f"{'ok  ' if pushed else 'FAILED'} write: {result.action} {result.message or ''}"
        )
        written = state.all_resources(server)
        patient = next((r for r in written if r.resource_type == "Patient"), None)
        back: list[Encounter] = []
        if patient is not None:
            back = [
                r
                async for report in pull(client, patient=f"Patient/{patient.resource_id}")
                for r in report.records
            ]
        same = back == [record]
        click.echo(
            f"{'ok  ' if same else 'FAILED'} read back: {'identical' if same else 'differs'}"
        )
        # One transaction: the resources refer to each other, and a server keeping referential
        # integrity lets them go together.
        deletes = [
            {"request": {"method": "DELETE", "url": f"{r.resource_type}/{r.resource_id}"}}
            for r in written
        ]
        await client.transaction(
            {"resourceType": "Bundle", "type": "transaction", "entry": deletes}
        )
        click.echo(f"ok   removed the {len(written)} resources written")
        return pushed and same


def main() -> None:
    """Run the command line (the ``ims-fhir`` console script)."""
    cli()
