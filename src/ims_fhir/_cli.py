"""The ``ims-fhir`` command line: a thin layer over the library."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from ._convert import detect_input, read_fhir
from ._exceptions import RecordError
from ._reader import read_records
from ._schema import record_json_schema_text
from ._to_fhir import to_fhir_json, to_transaction
from ._version import __version__

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2


def _stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ims-fhir")
def cli() -> None:
    """Move IMS (intramuscular stimulation) encounters between clinic systems and FHIR R4."""


@cli.command()
def schema() -> None:
    """Print the JSON Schema of an IMS encounter record."""
    click.echo(record_json_schema_text(), nl=False)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
def validate(paths: Sequence[Path], as_json: bool) -> None:
    """Check IMS records in PATHS (files or directories) and report every bad one."""
    good = 0
    errors: list[RecordError] = []
    for item in read_records(paths):
        if isinstance(item, RecordError):
            errors.append(item)
            if not as_json:
                _stderr().print(f"[red]invalid[/red] {escape(str(item))}")
        else:
            good += 1
    if as_json:
        report = {
            "valid": good,
            "invalid": len(errors),
            "errors": [
                {
                    "file": e.location.file,
                    "line": e.location.line,
                    "index": e.location.index,
                    "record": e.location.record_id,
                    "issues": [{"path": i.path, "reason": i.reason} for i in e.issues],
                }
                for e in errors
            ],
        }
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        click.echo(f"{good} valid, {len(errors)} invalid")
    sys.exit(EXIT_SOME_FAILED if errors else EXIT_OK)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write here, not stdout.",
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


def main() -> None:
    """Run the command line (the ``ims-fhir`` console script)."""
    cli()
