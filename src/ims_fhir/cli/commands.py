"""The ``ims-fhir`` command line: a thin layer over the library.

Exit codes: 0 when everything succeeded, 1 when some records failed or conflicted, 2 for usage,
configuration, file, state or server errors. Nothing a user can cause (a path, a state file, a
setting, a server's answer) ends in a traceback: :class:`_Cli` turns each into one line naming
the thing and the fix (:func:`error_message`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import json
import logging
import math
import os
import re
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import httpx
from click.core import ParameterSource
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .._exceptions import (
    AuthenticationError,
    ConfigurationError,
    ConnectError,
    FhirError,
    ImsFhirError,
    InvalidResponseError,
    NotFoundError,
    PermissionDeniedError,
    RecordError,
    ServerError,
    StateError,
    TimeoutException,
    UnsafeServerError,
)
from .._version import __version__
from ..client.asynchronous import AsyncFhirClient
from ..client.http import is_loopback
from ..mapping.convert import NdjsonPerType, detect_input, read_fhir
from ..mapping.from_fhir import MappingReport
from ..mapping.identity import RESOURCE_TYPES, default_namespace, example_systems
from ..mapping.package import PACKAGE_NAME, build_package, package_resources
from ..mapping.to_fhir import bundle_dict, bundle_json, transaction_json
from ..record.model import Encounter, check_namespace
from ..record.reader import ReadRecord, read_records
from ..record.schema import record_json_schema_text
from ..record.synthetic import synthetic_encounter
from ..sync.bulk import (
    DEFAULT_BULK_CONCURRENCY,
    MAX_POLL_WAIT,
    BulkProgress,
    bulk_pull,
    export_request,
)
from ..sync.capabilities import Check, check_capabilities
from ..sync.matching import DEFAULT_MATCH_THRESHOLD, MATCH_POLICIES
from ..sync.pull import (
    DEFAULT_PAGE_SIZE,
    OTHER_CLINIC,
    check_clinic_filter,
    patient_reference,
    pull,
)
from ..sync.push import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    Pusher,
    PushResult,
    PushSummary,
)
from ..sync.state import ResourceState, StateStore, default_state_path
from .config import SETTINGS, auth_from, default_config_path, load_config, where_to_set

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2

F = TypeVar("F", bound=Callable[..., Any])


def _stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


_CONFIG = "ims_fhir.config"  # where the config file is, in the context's meta


def _load_config(ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    try:
        settings = load_config(value)
    except ConfigurationError as exc:
        _fatal(_stderr(), error_message(exc))
    if settings:
        group = ctx.command
        assert isinstance(group, click.Group)
        # Each command gets only the settings it has a flag for: a server in the file must not
        # turn the offline validate into one that calls it.
        ctx.default_map = {
            name: {k: v for k, v in settings.items() if k in {p.name for p in command.params}}
            for name, command in group.commands.items()
        }
    ctx.meta[_CONFIG] = value or default_config_path()
    return value


class _Cli(click.Group):
    """The command group: an error a user can cause is one line and exit 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # The reader went away (``| head``): nothing left to tell anyone.
            # (Python's advice: point stdout at devnull, so the exit flush cannot fail again.)
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_USAGE)
        except (ImsFhirError, OSError, sqlite3.Error) as exc:
            _fatal(_stderr(), error_message(exc))


# What to do about a setting at fault, when there is more to say than "set it".
_SETTING_FIXES = {
    "allow_insecure_http": "use https, or for a test server on a trusted network pass {where}",
    "namespace": "give the base URI of the clinic's identifier systems with {where}",
    "server": "pass {where}",
    "validate_server": "pass {where}",
}


def error_message(exc: BaseException) -> str:
    """The one line to show for ``exc``: what went wrong, on what, and what to do."""
    if isinstance(exc, StateError):
        return str(exc)
    if isinstance(exc, ConfigurationError):
        if exc.setting in SETTINGS:
            template = _SETTING_FIXES.get(exc.setting, "set {where}")
            ctx = click.get_current_context(silent=True)
            config = ctx.find_root().meta.get(_CONFIG) if ctx else None
            return f"{exc.reason}; {template.format(where=where_to_set(exc.setting))}" + (
                f" ({config})" if config and exc.setting in {"server", "validate_server"} else ""
            )
        return str(exc)
    if isinstance(exc, UnsafeServerError):
        return str(exc)  # it says what to do already
    if isinstance(exc, FhirError):
        return f"{exc}; {_server_fix(exc)}"
    if isinstance(exc, OSError):
        return _os_message(exc)
    if isinstance(exc, sqlite3.Error):
        return f"state file: {exc}; pass another --state, or move the file aside"
    return str(exc)


def _server_fix(exc: FhirError) -> str:
    text = str(exc)
    ctx = click.get_current_context(silent=True)
    # validate has a server of its own: its flag is --server too, its variable and key not.
    command = ctx.find_root().invoked_subcommand if ctx else None
    server = "validate_server" if command == "validate" else "server"
    if isinstance(exc, ConnectError) and "CERTIFICATE_VERIFY_FAILED" in text:
        return (
            "if the server's certificate comes from a CA of its own, pass the CA's PEM file "
            f"with {where_to_set('ca_bundle')}"
        )
    if isinstance(exc, ConnectError):
        return f"check the server URL ({where_to_set(server)}) and that the server is up"
    if isinstance(exc, TimeoutException):
        return f"try again later, or allow more time with {where_to_set('timeout')}"
    if isinstance(exc, AuthenticationError):
        return (
            "check the credentials: --token, --basic-user/--basic-password, --smart-* or "
            "--oauth-* (or their IMS_FHIR_* variables or config keys)"
        )
    if isinstance(exc, PermissionDeniedError):
        return "the credentials are refused this: ask the server's operator for access"
    if isinstance(exc, NotFoundError):
        return f"check the server URL's path, e.g. .../fhir or .../r4 ({where_to_set(server)})"
    if isinstance(exc, ServerError):
        return "the server failed: try again later, or tell its operator"
    if isinstance(exc, InvalidResponseError):
        return (
            f"check the server URL ({where_to_set(server)}): `ims-fhir check` tells whether "
            "a FHIR R4 server answers there"
        )
    return "`ims-fhir check` tells what the server supports"


def _os_message(exc: OSError) -> str:
    name = exc.filename if exc.filename is not None else "a file"
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOENT:
        parent = Path(str(name)).parent
        fix = (
            f"the folder {parent} does not exist: create it or choose another path"
            if not parent.exists()
            else "check the path"
        )
    elif exc.errno in {errno.EACCES, errno.EPERM, errno.EROFS}:
        fix = "check its permissions, or choose another path"
    elif exc.errno == errno.EISDIR:
        fix = "it is a folder: name a file"
    elif exc.errno in {errno.EEXIST, errno.ENOTDIR}:
        fix = "a file stands where a folder is needed: choose another path"
    elif exc.errno == errno.ENOSPC:
        fix = "free some disk space"
    else:
        fix = "check the path, or choose another"
    return f"{name}: {reason}; {fix}"


def _output_file(_ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    """Check that ``-o FILE`` can be written before any work is done."""
    if value is None or str(value) == "-":
        return value
    parent = value.parent
    if value.is_dir():
        raise ConfigurationError(f"{value} is a folder", fix="name a file to write, with -o")
    if not parent.is_dir():
        raise ConfigurationError(
            f"cannot write {value}: the folder {parent} does not exist",
            fix="create it, or name another file with -o",
        )
    # Opened only once there is something to write (pull): refused now, not after the work.
    if not os.access(value if value.exists() else parent, os.W_OK):
        raise ConfigurationError(
            f"cannot write {value}: permission denied", fix="name a file you can write, with -o"
        )
    return value


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
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


# An HTTP field name (RFC 9110 token).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class _Seconds(click.FloatRange):
    """A number of seconds above 0; ``nan`` is not one (FloatRange lets it through)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return seconds


_SECONDS = _Seconds(min=0, min_open=True)


def _headers(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[tuple[str, str], ...]:
    """``Name: value`` strings to header pairs; IMS_FHIR_HEADER holds one header per line."""
    env = os.environ.get(SETTINGS["header"].env or "")
    source = ctx.get_parameter_source(param.name or "")
    if env and source in {None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP}:
        value = tuple(line for line in env.splitlines() if line.strip())
    pairs = []
    for item in value:
        name, sep, text = str(item).partition(":")
        name = name.strip()
        if not sep or not _TOKEN.fullmatch(name):
            raise click.BadParameter(f"expected 'Name: value', e.g. 'X-Api-Key: ...', not {name!r}")
        if not text.strip().isascii() or not text.strip().isprintable():
            # HTTP/1.1 header values are ASCII (RFC 9110); the value itself is never shown.
            raise click.BadParameter(f"the value of {name} is not printable ASCII")
        if name.lower() in {"authorization", "host", "content-type", "content-length"}:
            raise click.BadParameter(f"{name} is set by ims-fhir; use the authentication options")
        pairs.append((name, text.strip()))
    return tuple(pairs)


def _option(key: str, *decls: str, **attrs: Any) -> Callable[[F], F]:
    """A click option for setting ``key``, with the flag and variable of the settings table."""
    setting = SETTINGS[key]
    return click.option(setting.flag, *decls, key, envvar=setting.env, **attrs)


def connection_options(func: F) -> F:
    """The options of a connection to a server, but for the server itself."""
    options = [
        _option("token", help="Bearer token (prefer the env var)."),
        _option("basic_user", help="HTTP Basic user."),
        _option("basic_password", help="HTTP Basic password."),
        _option("smart_client_id", help="SMART backend services: client id."),
        _option(
            "smart_key_file",
            type=click.Path(dir_okay=False),
            help="SMART private key (PEM, RS384 or ES384).",
        ),
        _option("smart_kid", help="SMART key id."),
        _option("smart_token_url", help="SMART token endpoint (default: discovered)."),
        _option("smart_scope", help="SMART scopes to request."),
        _option("oauth_client_id", help="OAuth2 client credentials: client id."),
        _option("oauth_client_secret", help="OAuth2 client secret (prefer the env var)."),
        _option("oauth_token_url", help="OAuth2 token endpoint (default: discovered)."),
        _option("oauth_scope", help="OAuth2 scopes to request."),
        _option(
            "ca_bundle",
            type=click.Path(dir_okay=False),
            help="PEM file of CA certificates to trust besides the usual ones.",
        ),
        click.option(
            "--header",
            "header",
            multiple=True,
            callback=_headers,
            help="Extra header for every request, e.g. 'X-Api-Key: ...' (repeatable).",
        ),
        _option(
            "allow_insecure_http",
            is_flag=True,
            help="Allow plain http to a host other than this machine.",
        ),
        _option(
            "timeout",
            type=_SECONDS,
            default=60.0,
            show_default=True,
            help="Seconds to wait for each read.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def server_options(func: F) -> F:
    """The options every command that talks to a server takes."""
    return _option("server", help="FHIR base URL.")(connection_options(func))


def _client(options: dict[str, Any], server_key: str = "server") -> AsyncFhirClient:
    server = options.get(server_key)
    if not server:
        raise ConfigurationError("no FHIR server given", setting=server_key)
    headers = dict(options.get("header") or ())
    return AsyncFhirClient(
        server,
        auth=auth_from(options),
        timeout=options["timeout"],
        allow_insecure_http=bool(options["allow_insecure_http"]),
        ca_bundle=options.get("ca_bundle"),
        headers=headers,
    )


@cli.command()
def schema() -> None:
    """Print the JSON Schema of an IMS encounter record."""
    click.echo(record_json_schema_text(), nl=False)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
@_option(
    "validate_server",
    help="Also run $validate on this server for every resource mapped from the records, "
    "against its profile.",
)
@connection_options
def validate(paths: Sequence[Path], as_json: bool, **options: Any) -> None:
    """Check IMS records in PATHS (files or directories) and report every bad one.

    Without --server, records are checked clinically and mapped to FHIR, offline. With
    --server, every resource mapped from them is also validated by the server against the
    profile named in its meta.profile, and each issue is reported with resource, element path
    and message.
    """
    server = options["validate_server"]
    good = 0
    errors: list[RecordError] = []
    records: list[Encounter] = []
    for item in read_records(paths, on_skip=_say_skipped):
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
        server_issues = asyncio.run(_server_validate(_client(options, "validate_server"), records))
        for issue in server_issues:
            if not as_json:
                _stderr().print(
                    f"[red]{issue['severity']}[/red] {issue['record_id']} {issue['resource']} "
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


# How validators say they do not know the profile asked for (HAPI and the HL7 validator: "Profile
# reference '...' has not been checked because it is unknown", "Unable to locate profile ...";
# Firely: "Unable to resolve reference to profile ..."). Only a message naming the profile and
# saying it is unknown counts: an unknown code or value set found *by* the profile does not.
_UNKNOWN_PROFILE = re.compile(
    r"has not been checked because it is unknown"
    r"|unable to (?:locate|find|resolve)[^.]*profile"
    r"|profile[^.]*(?:not found|is unknown|could not be resolved|cannot be resolved)"
    r"|unknown profile",
    re.IGNORECASE,
)


def unknown_profile(outcome: dict[str, Any], profile: str) -> bool:
    """True when a $validate answer says the server does not know ``profile``."""
    url = profile.split("|")[0]
    return any(
        url in str(issue.get("diagnostics") or "")
        and _UNKNOWN_PROFILE.search(str(issue.get("diagnostics") or ""))
        for issue in outcome.get("issue") or []
        if isinstance(issue, dict)
    )


def _no_profiles(server: str) -> ConfigurationError:
    return ConfigurationError(
        f"{server} does not know ims-fhir's profiles",
        fix="install the FHIR package there: build it with `ims-fhir package` and load it as "
        "an implementation guide (README: Profiles and the FHIR package)",
    )


async def _server_validate(
    client: AsyncFhirClient, records: list[Encounter]
) -> list[dict[str, Any]]:
    issues = []
    server = str(client.base_url).rstrip("/")
    async with client:
        for record in records:
            for entry in bundle_dict(record, checked=True)["entry"]:
                resource = entry["resource"]
                profile = resource["meta"]["profile"][0]
                try:
                    outcome = await client.validate(resource, profile=profile)
                except NotFoundError as exc:
                    raise ConfigurationError(
                        f"{server} has no $validate for {resource['resourceType']} "
                        f"({exc.status_code})",
                        fix="check the server URL, or use a server that supports $validate, "
                        "or validate without --server",
                    ) from exc
                if unknown_profile(outcome, profile):
                    # Every resource would fail the same way: one line says what to do.
                    raise _no_profiles(server)
                label = f"{resource['resourceType']} ({profile.rsplit('/', 1)[-1]})"
                for issue in outcome.get("issue") or []:
                    if issue.get("severity") not in {"error", "fatal", "warning"}:
                        continue
                    where = issue.get("expression") or issue.get("location") or ["?"]
                    issues.append(
                        {
                            "record_id": record.id,
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


def _model_issues(error: ValidationError) -> str:
    """A model validation error's paths and reasons, never the values (they hold patient data)."""
    issues = [".".join(map(str, e["loc"])) + ": " + e["msg"] for e in error.errors()]
    more = f" (and {len(issues) - 3} more)" if len(issues) > 3 else ""
    return escape("; ".join(issues[:3]) + more)


def _error_json(error: RecordError) -> dict[str, Any]:
    return {
        "file": error.location.file,
        "line": error.location.line,
        "index": error.location.index,
        "record_id": error.location.record_id,
        "issues": [{"path": i.path, "reason": i.reason} for i in error.issues],
    }


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    callback=_output_file,
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
@click.option(
    "--validate",
    is_flag=True,
    help="IMS in: also check each Bundle against the FHIR R4 models (about 20x slower).",
)
@click.option(
    "--ndjson-per-type",
    "per_type",
    type=click.Path(file_okay=False, path_type=Path),
    help="IMS in: write DIR/<Type>.ndjson, one resource a line (the Bulk Data format that "
    "$import and bulk loaders take), not Bundles.",
)
def convert(
    paths: Sequence[Path],
    output: Path | None,
    single: bool,
    source: str,
    validate: bool,
    per_type: Path | None,
) -> None:
    """Convert IMS records to FHIR transaction Bundles (NDJSON), or FHIR back to IMS records.

    IMS records in: one Bundle per encounter, one per line (or one Bundle with --single, or
    one NDJSON file per resource type with --ndjson-per-type). FHIR Bundles or NDJSON of
    resources in, or QuestionnaireResponses to the IMS visit form: one IMS record per line.
    Bad input is reported on stderr with its file, record and field (a response's item
    linkId); the rest is converted. Exit code 1 if any failed.
    """
    kind = detect_input(paths) if source == "auto" else source
    err = _stderr()
    failed = converted = 0
    if per_type is not None:
        if output is not None or single or validate:
            raise click.BadParameter(
                "--ndjson-per-type writes its own files: give it without -o, --single and "
                "--validate",
                param_hint="--ndjson-per-type",
            )
        if kind != "ims":
            raise click.BadParameter(
                "--ndjson-per-type takes IMS records (the inputs hold FHIR)",
                param_hint="--ndjson-per-type",
            )
        replaced = {(per_type / f"{t}.ndjson").resolve() for t in RESOURCE_TYPES}
        target = per_type.resolve()
        for path in paths:
            resolved = path.resolve()
            if resolved in replaced or (
                path.is_dir() and (resolved == target or resolved in target.parents)
            ):
                raise click.BadParameter(
                    f"the input {path} holds (or is) a file --ndjson-per-type replaces: write "
                    "into another directory",
                    param_hint="--ndjson-per-type",
                )
        with NdjsonPerType(per_type) as writer:
            for item in read_records(paths, on_skip=_say_skipped):
                if isinstance(item, RecordError):
                    failed += 1
                    err.print(f"[red]invalid[/red] {escape(str(item))}")
                    continue
                writer.write(item.record, checked=True)
                converted += 1
        files = ", ".join(f"{t}.ndjson {n}" for t, n in sorted(writer.counts.items()))
        err.print(f"{converted} converted, {failed} failed ({per_type}: {files or 'no files'})")
        sys.exit(EXIT_SOME_FAILED if failed else EXIT_OK)
    with click.open_file(str(output) if output else "-", "w", encoding="utf-8") as out:
        if kind == "ims":
            good = []
            for item in read_records(paths, on_skip=_say_skipped):
                if isinstance(item, RecordError):
                    failed += 1
                    err.print(f"[red]invalid[/red] {escape(str(item))}")
                elif single:
                    good.append(item.record)
                else:
                    try:
                        text = bundle_json(item.record, validate=validate, checked=True)
                    except ValidationError as exc:
                        failed += 1
                        where = escape(str(item.location))
                        err.print(f"[red]not valid FHIR[/red] {where}: {_model_issues(exc)}")
                        continue
                    out.write(text + "\n")
                    converted += 1
            if single:
                try:
                    out.write(transaction_json(good, validate=validate) + "\n")
                    converted = len(good)
                except ValidationError as exc:
                    failed += len(good)
                    err.print(f"[red]not valid FHIR[/red] the Bundle: {_model_issues(exc)}")
        else:
            for result in read_fhir(paths, on_skip=_say_skipped):
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
                for warning in result.warnings:
                    err.print(f"[yellow]warning[/yellow] {escape(str(warning))}")
                for skipped in result.skipped:
                    err.print(f"[yellow]skipped[/yellow] {skipped.resource}: {skipped.reason}")
    err.print(f"{converted} converted, {failed} failed")
    sys.exit(EXIT_SOME_FAILED if failed else EXIT_OK)


def _patient(value: str | None) -> str | None:
    """``--patient``: a Patient id; empty is an error, not "every patient"."""
    if value is not None:
        try:
            patient_reference(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from exc
    return value


def _say_skipped(path: Path, reason: str) -> None:
    """Tell the user about a file of a directory that is not read (the reader's one rule)."""
    _stderr().print(f"[yellow]skipped[/yellow] {escape(str(path))}: {reason}")


def _namespace(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--namespace`` (or its variable or config key): an absolute http(s) URI, checked here.

    A namespace the records cannot hold would make every record fail, or worse, write identifier
    systems that ``pull`` cannot map back; it is a setup error, named where it was set.
    """
    if value is None:
        return None
    try:
        return check_namespace(value)
    except ValueError as exc:
        source = ctx.get_parameter_source(param.name or "")
        if source is ParameterSource.ENVIRONMENT:
            where = SETTINGS["namespace"].env
        elif source is ParameterSource.DEFAULT_MAP:
            where = f"`namespace` in {ctx.find_root().meta.get(_CONFIG)}"
        else:
            where = "--namespace"
        raise ConfigurationError(
            f"namespace {value!r} (from {where}) {exc}", setting="namespace"
        ) from None


def _on_this_machine(server: str | None) -> bool:
    """Whether the server is on loopback; one that cannot be parsed is the client's to refuse."""
    try:
        return bool(server) and is_loopback(httpx.URL(str(server)).host)
    except (httpx.InvalidURL, TypeError):
        return True


def _with_namespace(record: Encounter, namespace: str | None) -> Encounter:
    if namespace is None or record.clinic.namespace is not None:
        return record
    # No validation needed: _namespace checked the value, and the mapping validates again.
    return record.model_copy(
        update={"clinic": record.clinic.model_copy(update={"namespace": namespace})}
    )


def _fatal(err: Console, problem: str | BaseException) -> NoReturn:
    """Report an error that stops the whole run (setup, server, state): one line, exit 2."""
    message = problem if isinstance(problem, str) else error_message(problem)
    # A server's words may be in it: no control character reaches the terminal.
    message = "".join(c if c.isprintable() else " " if c in "\t\n\r" else "" for c in message)
    err.print(f"[red]error[/red] {escape(message)}")
    sys.exit(EXIT_USAGE)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@server_options
@_option(
    "state",
    type=click.Path(dir_okay=False, path_type=Path),
    default=default_state_path,
    show_default="the user's data directory",
    help="SQLite state file.",
)
@_option(
    "batch_size",
    type=click.IntRange(1, 500),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Encounters per transaction.",
)
@_option(
    "concurrency",
    type=click.IntRange(1, 64),
    default=DEFAULT_CONCURRENCY,
    show_default=True,
    help="Transactions in flight.",
)
@_option(
    "on_conflict",
    type=click.Choice(["report", "overwrite"]),
    default="report",
    show_default=True,
    help="What to do when the server's copy changed since the last push.",
)
@_option(
    "match",
    type=click.Choice(MATCH_POLICIES),
    default="identifier",
    show_default=True,
    help="How the patient, practitioner and clinic are found on the server: by health number "
    "or licence, else the clinic's identifier (identifier); by the clinic's identifier only "
    "(create: servers the clinic owns); patients by the server's Patient/$match (mpi).",
)
@_option(
    "match_threshold",
    type=click.FloatRange(0, 1, min_open=True),
    default=DEFAULT_MATCH_THRESHOLD,
    show_default=True,
    help="Least Patient/$match score taken as the patient (--match mpi).",
)
@click.option(
    "--create-patients/--no-create-patient",
    "create_patients",
    envvar=SETTINGS["create_patients"].env,
    default=True,
    show_default=True,
    help="Create a patient the server does not hold; --no-create-patient fails the encounter "
    "instead.",
)
@_option(
    "namespace",
    callback=_namespace,
    help="Identifier namespace (an https URI the clinic owns) for clinics whose records name none.",
)
@_option(
    "allow_default_namespace",
    is_flag=True,
    help="Push records that name no namespace to a server not on this machine, under "
    "ims-fhir's default one (two clinics with the same id would share patients there).",
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
    show_progress = err.is_terminal and not options["as_json"]
    remote = not _on_this_machine(options.get("server"))
    warned: set[str] = set()

    def records() -> Iterator[ReadRecord]:
        for item in read_records(paths, on_skip=_say_skipped):
            if isinstance(item, RecordError):
                invalid.append(item)
                err.print(f"[red]invalid[/red] {escape(str(item))}")
            else:
                record = _with_namespace(item.record, options["namespace"])
                if remote:
                    _check_remote(err, item.location, record, options, warned)
                yield ReadRecord(item.location, record)

    async def run() -> None:
        # A bar needs its total: the input is read once more, only on a terminal, and only
        # from files (a pipe, such as <(...), can be read once).
        rereadable = all(p.is_file() or p.is_dir() for p in paths)
        total = sum(1 for _ in read_records(paths)) if show_progress and rereadable else None
        noted: set[str] = set()
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
                    match=options["match"],
                    create_patients=options["create_patients"],
                    match_threshold=options["match_threshold"],
                )
                with _progress(err, enabled=show_progress, total=total) as advance:
                    async for result in pusher.push(records()):
                        summary.add(result)
                        if options["as_json"]:
                            results.append(result)
                        advance(result)
                        for note in result.notes:
                            if note not in noted:  # once per push, not once per encounter
                                noted.add(note)
                                err.print(f"[yellow]note[/yellow] {escape(note)}")
                        if result.action in {"failed", "conflict"}:
                            err.print(
                                f"[red]{result.action}[/red] {result.record_id}: "
                                f"{escape(result.message or '')}"
                            )
                        elif not err.is_terminal and not options["as_json"]:
                            err.print(f"{result.action} {result.record_id}")

    asyncio.run(run())  # a server or state problem stops it all: one line, exit 2 (_Cli)
    for _ in invalid:
        summary.add(PushResult("", "failed"))
    _report(summary, results, invalid, as_json=options["as_json"], dry_run=options["dry_run"])
    if summary.counts.get("conflict") and not options["as_json"]:
        err.print(
            f"{summary.counts['conflict']} encounter(s) changed on the server since ims-fhir wrote "
            "them: look at the server's copy, then keep it (change nothing) or replace it with "
            "the record by pushing again with --on-conflict overwrite"
        )
    sys.exit(EXIT_OK if summary.ok else EXIT_SOME_FAILED)


def _check_remote(
    err: Console, where: object, record: Encounter, options: dict[str, Any], warned: set[str]
) -> None:
    """What a push to a server not on this machine needs of a record, before it is sent.

    Its clinic's own namespace (or the user's word that the default will do), and identifier
    systems that are not examples: a fixture's ``fhir.example.ca`` system in a regional record
    names nothing anyone can resolve.
    """
    if record.clinic.namespace is None and not options["allow_default_namespace"]:
        raise ConfigurationError(
            f"{where}: clinic {record.clinic.id!r} names no identifier namespace, and the "
            "server is not on this machine: under ims-fhir's default one "
            f"({default_namespace(record.clinic.id)}) two clinics with the same clinic id would "
            "match each other's patients and encounters",
            fix=f"give the clinic's own with {where_to_set('namespace')} (or in the records), "
            f"or accept the default with {where_to_set('allow_default_namespace')}",
        )
    for found in example_systems(record):
        if found not in warned:
            warned.add(found)
            what = "namespace" if found == record.clinic.namespace else "system"
            err.print(
                f"[yellow]warning[/yellow] identifier {what} {escape(found)} is under an example "
                "domain (RFC 2606: example.com, *.example, fhir.example.ca, ...), which no "
                "registry knows: a regional record cannot resolve it; use the one the clinic or "
                "jurisdiction registered (ims-fhir knows jurisdictions' health numbers: "
                "mappings/Parameters-jurisdictional-identifiers.json)"
            )


class _progress:  # noqa: N801 - a context manager used like a function
    """A progress bar on a terminal, nothing otherwise."""

    def __init__(self, console: Console, *, enabled: bool, total: int | None) -> None:
        self.enabled = enabled
        self.total = total
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
        task = self.bar.add_task("push", total=self.total, last="")

        def advance(result: PushResult) -> None:
            self.bar.update(task, advance=1, last=f"{result.action} {result.record_id}")

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.stop()


_ACTIONS = ("created", "updated", "unchanged", "entered-in-error", "conflict", "failed")


def _key(action: str) -> str:
    """A JSON key for an action: every key of the JSON reports is snake_case."""
    return action.replace("-", "_")


def _report(
    summary: PushSummary,
    results: list[PushResult],
    invalid: list[RecordError],
    *,
    as_json: bool,
    dry_run: bool,
) -> None:
    actions = [a for a in _ACTIONS if not dry_run or a not in {"created", "updated"}]
    actions += [a for a in ("would-create", "would-update") if dry_run or summary.counts.get(a)]
    counts = {action: summary.counts.get(action, 0) for action in actions}
    if as_json:
        report = {
            "dry_run": dry_run,
            "summary": {_key(action): count for action, count in counts.items()},
            "resources_written": summary.resources_written,
            "resources_entered_in_error": summary.resources_retired,
            "results": [
                {
                    "record_id": r.record_id,
                    "action": r.action,
                    "resources_written": r.written,
                    "resources_entered_in_error": r.retired,
                    "message": r.message,
                    "notes": list(r.notes),
                }
                for r in results
            ],
            "notes": summary.notes,
            "invalid": [_error_json(e) for e in invalid],
        }
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
        return
    parts = [f"{value} {name}" for name, value in counts.items()]
    if dry_run:
        resources = (
            f"dry run, nothing sent: would write {summary.resources_written} resources and mark "
            f"{summary.resources_retired} entered-in-error"
        )
    else:
        resources = (
            f"{summary.resources_written} resources written, "
            f"{summary.resources_retired} marked entered-in-error"
        )
    click.echo(", ".join(parts) + f" ({resources})")


def parse_since(value: str | None) -> str | None:
    """Check ``--since`` here rather than send the server what it cannot read."""
    if value is None:
        return None
    text = value.strip()
    try:
        if len(text) == 10:
            return dt.date.fromisoformat(text).isoformat()
        instant = dt.datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO 8601 date or instant: give e.g. 2026-11-01 or "
            "2026-11-01T08:00:00Z"
        ) from None
    if instant.tzinfo is None:
        raise click.BadParameter(
            f"{value!r} has no time zone: add Z (UTC) or an offset, e.g. {text}Z or {text}-05:00"
        )
    return instant.isoformat()


def _entered_in_error(reason: str) -> bool:
    return reason.startswith("entered in error")


@cli.command(name="pull")
@server_options
@click.option(
    "--patient",
    callback=lambda _ctx, _param, value: _patient(value),
    help="Only this patient's encounters (server id, e.g. Patient/123).",
)
@click.option(
    "--since",
    callback=lambda _ctx, _param, value: parse_since(value),
    help="Only encounters changed at or after this date or instant (ISO 8601: 2026-11-01, "
    "2026-11-01T08:00:00Z).",
)
@click.option(
    "--namespace",
    "namespace_filter",
    help="Only encounters of clinics with this identifier namespace (given here only: a "
    "configured namespace does not narrow a pull).",
)
@click.option("--clinic", help="Only encounters of the clinic with this id.")
@click.option(
    "--page-size", type=click.IntRange(1, 500), default=DEFAULT_PAGE_SIZE, show_default=True
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    callback=_output_file,
    help="NDJSON file (default stdout).",
)
@click.option(
    "--bulk",
    is_flag=True,
    help="Use the server's Bulk Data $export (NDJSON files), not page by page searches.",
)
@click.option(
    "--bulk-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("ims-fhir-bulk"),
    show_default=True,
    help="--bulk: where the export's files are kept; run again with it to resume. Emptied "
    "after a pull without errors. One pull at a time uses it.",
)
@click.option(
    "--level",
    type=click.Choice(["system", "patient", "group"]),
    default="system",
    show_default=True,
    help="--bulk: $export, Patient/$export or Group/ID/$export.",
)
@click.option("--group", help="--bulk --level group: the Group's id.")
@click.option(
    "--type-filter/--no-type-filter",
    default=True,
    show_default=True,
    help="--bulk: send _typeFilter (the Encounter profile, the namespace).",
)
@click.option(
    "--file-host",
    "file_hosts",
    multiple=True,
    help="--bulk: a host besides the server's that may hold the export's files (it is never "
    "sent the token); repeatable.",
)
@click.option(
    "--bulk-concurrency",
    type=click.IntRange(1, 32),
    default=DEFAULT_BULK_CONCURRENCY,
    show_default=True,
    help="--bulk: files downloaded at once.",
)
@click.option(
    "--max-poll-wait",
    type=_SECONDS,
    default=MAX_POLL_WAIT,
    show_default=True,
    help="--bulk: the longest wait between status polls, whatever Retry-After asks.",
)
def pull_command(**options: Any) -> None:
    """Fetch IMS encounters from a FHIR server and write them as IMS records (NDJSON).

    With --bulk, the server exports them (FHIR Bulk Data $export) into NDJSON files, fetched
    in parallel and rebuilt here; an interrupted run resumes from --bulk-dir, and Ctrl-C
    cancels the export on the server.
    """
    err = _stderr()
    totals = {"records": 0, "skipped": 0, "retired": 0, "other_clinic": 0, "unmappable": 0}
    try:
        check_clinic_filter(options["namespace_filter"], options["clinic"])
    except ValueError as exc:
        option = "--clinic" if str(exc).startswith(repr(options["clinic"])) else "--namespace"
        raise click.BadParameter(str(exc), param_hint=option) from None
    bulk = options["bulk"]
    if bulk and options["patient"] is not None:
        raise click.BadParameter(
            "--bulk exports whole populations: use --level group with a Group of the "
            "patients, or pull --patient without --bulk",
            param_hint="--patient",
        )
    if (options["group"] is not None) != (options["level"] == "group"):
        raise click.BadParameter("give --group ID with --level group (and only then)")
    if bulk:
        try:
            export_request(level=options["level"], group=options["group"])
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--group") from None
    bulk_only = {
        "--level": options["level"] != "system",
        "--no-type-filter": not options["type_filter"],
        "--file-host": bool(options["file_hosts"]),
    }
    given = [flag for flag, used in bulk_only.items() if used]
    if given and not bulk:
        raise click.BadParameter(f"{', '.join(given)} only with --bulk", param_hint="--bulk")

    progress_line = _BulkProgressLine(err)

    def reports(client: AsyncFhirClient) -> AsyncIterator[MappingReport]:
        if not bulk:
            return pull(
                client,
                patient=options["patient"],
                since=options["since"],
                namespace=options["namespace_filter"],
                clinic=options["clinic"],
                page_size=options["page_size"],
            )
        return bulk_pull(
            client,
            options["bulk_dir"],
            level=options["level"],
            group=options["group"],
            since=options["since"],
            namespace=options["namespace_filter"],
            clinic=options["clinic"],
            type_filter=options["type_filter"],
            file_hosts=options["file_hosts"],
            concurrency=options["bulk_concurrency"],
            max_poll_wait=options["max_poll_wait"],
            on_progress=progress_line,
            remove_files=True,
        )

    async def run() -> None:
        async with _client(options) as client, contextlib.AsyncExitStack() as files:
            output = options["output"]
            out: Any = None

            def opened() -> Any:
                # Opened (and emptied) once the pull has something to say: a pull refused at
                # once (another one holds --bulk-dir, the server is down) leaves it as it was.
                nonlocal out
                if out is None:
                    path = str(output) if output else "-"
                    out = files.enter_context(click.open_file(path, "w", encoding="utf-8"))
                return out

            page = 0
            async for report in reports(client):
                page += 1
                opened()
                for record in report.records:
                    out.write(record.model_dump_json(exclude_defaults=True) + "\n")
                totals["records"] += len(report.records)
                retired = sum(1 for r in report.skipped if _entered_in_error(r.reason))
                other = sum(1 for r in report.skipped if r.reason.startswith(OTHER_CLINIC))
                totals["retired"] += retired
                totals["other_clinic"] += other
                totals["skipped"] += len(report.skipped) - retired - other
                totals["unmappable"] += sum(e.count for e in report.errors)
                for error in report.errors:
                    where = "batch" if bulk else "page"
                    err.print(f"[red]unmappable[/red] {where} {page}: {escape(str(error))}")
                for warning in report.warnings:
                    where = "batch" if bulk else "page"
                    err.print(f"[yellow]warning[/yellow] {where} {page}: {escape(str(warning))}")
            opened()  # nothing to write: still an (empty) output, as asked

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        if not bulk:
            said = "pull stopped"
        elif progress_line.stage in {None, "kick-off"}:
            # No status URL yet: nothing to cancel, though the server may have begun.
            said = (
                "pull stopped before the server answered the kick-off: if it started an "
                "export, it runs on (nothing names it to cancel)"
            )
        elif progress_line.stage in {"indexing", "rebuilding"}:
            # The export was complete: its files stay, and the next run rebuilds from them.
            said = (
                f"pull stopped; the export's files stay in {escape(str(options['bulk_dir']))}: "
                "pull again to rebuild from them"
            )
        else:
            said = "the export was cancelled on the server"
        err.print(f"[red]cancelled[/red] {said}")
        sys.exit(130)
    err.print(
        f"{totals['records']} records pulled, {totals['unmappable']} encounters could not be "
        f"mapped; skipped: {totals['retired']} resources ims-fhir marked entered-in-error, "
        f"{totals['skipped']} not made by ims-fhir"
        + (
            f", {totals['other_clinic']} encounters of other clinics"
            if options["namespace_filter"] or options["clinic"]
            else ""
        )
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

    def show(item: Check) -> None:
        nonlocal ok
        mark = "ok  " if item.ok else "MISSING"
        click.echo(f"{mark} {item.name}{': ' + item.detail if item.detail and not item.ok else ''}")
        ok &= item.ok

    async def run() -> None:
        nonlocal ok
        async with _client(options) as client:
            statement = await client.request_json("GET", "metadata")
            if statement.get("resourceType") != "CapabilityStatement":
                raise UnsafeServerError(
                    f"{str(client.base_url).rstrip('/')}: not a FHIR server (metadata answered "
                    f"a {statement.get('resourceType')}); check the server URL"
                )
            checks = check_capabilities(statement)
            for item in checks:
                show(item)
            if any(c.name == "$validate" and c.ok for c in checks):
                show(await _profiles_check(client))
            if options["write_test"]:
                ok &= await _write_test(client)

    asyncio.run(run())
    click.echo(
        "the server can take IMS encounters" if ok else "the server lacks what is marked MISSING"
    )
    sys.exit(EXIT_OK if ok else EXIT_SOME_FAILED)


async def _profiles_check(client: AsyncFhirClient) -> Check:
    """Whether the server's $validate knows ims-fhir's profiles (the package is installed)."""
    name = "ims-fhir profiles for $validate"
    patient = next(
        e["resource"]
        for e in bundle_dict(synthetic_encounter())["entry"]
        if e["resource"]["resourceType"] == "Patient"
    )
    profile = patient["meta"]["profile"][0]
    try:
        outcome = await client.validate(patient, profile=profile)
    except FhirError as exc:
        return Check(name, False, f"$validate failed: {exc}")
    if unknown_profile(outcome, profile):
        return Check(
            name,
            False,
            "not installed: build the package with `ims-fhir package` and install it on the "
            "server (README: Profiles and the FHIR package)",
        )
    return Check(name, True)


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
        if not pushed:
            if written:
                await _delete(client, written)
            click.echo("skipped read back: nothing was written")
            return False
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
        await _delete(client, written)
        return same


async def _delete(client: AsyncFhirClient, written: Sequence[ResourceState]) -> None:
    # One transaction: the resources refer to each other, and a server keeping referential
    # integrity lets them go together.
    deletes = [
        {"request": {"method": "DELETE", "url": f"{r.resource_type}/{r.resource_id}"}}
        for r in written
    ]
    await client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": deletes})
    click.echo(f"ok   removed the {len(written)} resources written")


class _BulkProgressLine:
    """A line on stderr when a bulk pull moves on (a stage, a new X-Progress, 10% more)."""

    def __init__(self, err: Console) -> None:
        self.err = err
        self.last: tuple[str, str, int] | None = None
        self.stage: str | None = None  # where the pull is: what Ctrl-C stops

    def __call__(self, progress: BulkProgress) -> None:
        self.stage = progress.stage
        tenth = progress.done * 10 // progress.total if progress.total else 0
        key = (progress.stage, progress.message, tenth)
        if key == self.last:
            return
        self.last = key
        count = f" {progress.done}/{progress.total}" if progress.total is not None else ""
        message = f": {escape(progress.message)}" if progress.message else ""
        self.err.print(f"[dim]bulk[/dim] {progress.stage}{count}{message}")


def main() -> None:
    """Run the command line (the ``ims-fhir`` console script)."""
    cli()
