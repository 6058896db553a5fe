"""Bulk pull: IMS encounters from a server's FHIR Bulk Data ``$export``, at population scale.

The Bulk Data Access IG (v2) flow, each step checked, nothing from the server trusted:

1. **Kick-off**: ``GET [base]/$export`` (or ``Patient/$export``, ``Group/<id>/$export``) with
   ``Prefer: respond-async``, ``_type`` the types IMS encounters are made of, ``_since`` and
   ``_typeFilter`` (the Encounter profile, and the clinic namespace). The answer must be 202
   with a ``Content-Location`` on the server's own origin (the token is sent there).
2. **Status**: polled, honouring ``Retry-After`` (up to ``max_poll_wait``) and passing
   ``X-Progress`` on; 429 waits too. The 200 answer is the manifest, whose shape is checked:
   every file URL must be on the server's origin, or on a host the caller named, which never
   gets the token (a manifest asking to send it there is refused).
3. **Download**: the NDJSON files, ``concurrency`` at a time, each streamed to a ``.part`` file
   and renamed once complete. The work directory keeps the status URL and the manifest
   (``export.json``), so a run interrupted by a lost connection, a crash or a kill resumes
   where it stopped: files already fetched are not fetched again, an export still running is
   polled again rather than started anew. A cancelled run (Ctrl-C, a cancelled task) sends
   ``DELETE`` to the status URL and forgets the export.
4. **Rebuild**: files hold one resource type each, so an encounter's resources are spread over
   all of them. Each line is parsed once and stored in a SQLite index beside the files (the
   Encounter by id; its parts under the Encounter they point at; patients, practitioners,
   organizations and consents by id); then the encounters are read back in file order, a
   batch at a time, with their parts and what they refer to, and mapped back. Time is linear
   in the lines and memory holds one batch. A bad line is an error naming the file and line;
   the rest go on.

With ``since``, the export holds only what changed: an encounter whose finding changed has an
unchanged Encounter the export leaves out, and vice versa. So the export only says *which*
encounters changed; they are then rebuilt whole from the server, as ``pull`` does. Resources a
Patient- or Group-level export cannot hold (practitioners, organizations: not in the patient
compartment), or that an export left out, are read by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import random
import re
import sqlite3
import tempfile
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import filelock
import httpx
import orjson

from .._exceptions import (
    ConfigurationError,
    FhirError,
    GoneError,
    InvalidResponseError,
    MappingError,
    NotFoundError,
    RateLimitError,
    ServerError,
    StatusError,
    TransportError,
    describe_request,
)
from ..client.asynchronous import AsyncFhirClient
from ..client.constants import FHIR_JSON
from ..client.http import Call, ClientOptions, check_url, parse_retry_after, same_origin
from ..mapping.from_fhir import MappingReport, from_fhir
from ..mapping.identity import Kind, Profile, identifier_query, system
from ..record.reader import json_values
from .pull import (
    ENCOUNTER_TYPES,
    PARTS,
    REFERRED,
    check_clinic_filter,
    fetch_by_id,
    keep_clinic,
    rebuild,
    ref_id,
    referred_ids,
)
from .push import refuse_own_http_client, run_blocking

__all__ = [
    "DEFAULT_BULK_CONCURRENCY",
    "MAX_EXPORT_FILE_BYTES",
    "MAX_POLL_WAIT",
    "BulkProgress",
    "bulk_pull",
    "bulk_pull_all",
    "rebuild_ndjson",
    "remove_export",
]

logger = logging.getLogger("ims_fhir.bulk")

DEFAULT_BULK_CONCURRENCY = 4
"""Files downloaded at once."""

MAX_POLL_WAIT = 120.0
"""Seconds: the longest wait between two status polls, whatever ``Retry-After`` asks."""

FIRST_POLL_WAIT = 1.0
"""Seconds before the first poll when the server gives no ``Retry-After`` (doubled each time)."""

MAX_EXPORT_FILE_BYTES = 4 * 1024**3
"""The largest NDJSON file downloaded (servers split exports into files far smaller)."""

MAX_EXPORT_FILES = 100_000
"""The most files a manifest may list."""

MAX_LINE_ERRORS = 1000
"""Bad lines (and export issues) reported one by one (the rest are counted)."""

BATCH = 200
"""Encounters rebuilt at once from the index."""

NDJSON = "application/fhir+ndjson"
STATE_FILE = "export.json"
INDEX_FILE = "index.sqlite3"
LOCK_FILE = "pull.lock"
"""Held (``flock``) by the pull using the directory: two at once would share its files."""

Level = Literal["system", "patient", "group"]

# The patient compartment (R4 compartmentdefinition-patient) holds neither of these: a Patient
# or Group export is not asked for them (HAPI refuses the export), they are read by id.
_OUTSIDE_PATIENT_COMPARTMENT = frozenset({"Practitioner", "Organization"})
_X_PROGRESS_CHARS = 200


@dataclass(frozen=True, slots=True)
class BulkProgress:
    """What a bulk pull is doing, for a progress display (never holds patient data)."""

    stage: Literal["kick-off", "waiting", "downloading", "indexing", "rebuilding"]
    message: str = ""
    done: int = 0
    total: int | None = None


@dataclass(frozen=True, slots=True)
class ExportFile:
    """One file of a manifest: its resource type, where it is, and whether to send the token."""

    type: str
    url: str
    credentials: bool
    count: int | None = None  # resources in it, when the manifest says (it may not)


@dataclass(slots=True)
class _Export:
    """The work directory's memory of one export (``export.json``)."""

    server: str
    request: dict[str, Any]
    status_url: str | None = None
    manifest: dict[str, Any] | None = None
    files: list[str] = field(default_factory=list)


# -- kick-off -------------------------------------------------------------------------------


def export_request(
    *,
    level: Level = "system",
    group: str | None = None,
    since: str | dt.datetime | None = None,
    namespace: str | None = None,
    type_filter: bool = True,
) -> dict[str, Any]:
    """The kick-off: ``{"path": ..., "params": {...}}`` (what export.json remembers too)."""
    if level == "group":
        if group is None or not group.strip():
            raise ValueError("a Group export needs the Group's id")
        path = f"Group/{_fhir_id(group.strip().removeprefix('Group/'), 'Group')}/$export"
    elif group is not None:
        raise ValueError("group is given only with level='group'")
    else:
        path = {"system": "$export", "patient": "Patient/$export"}.get(level, "")
        if not path:
            raise ValueError(f"level must be 'system', 'patient' or 'group', not {level!r}")
    types = [
        t for t in ENCOUNTER_TYPES if level == "system" or t not in _OUTSIDE_PATIENT_COMPARTMENT
    ]
    params: dict[str, Any] = {"_type": ",".join(types), "_outputFormat": NDJSON}
    if since is not None:
        params["_since"] = _instant(since)
    if type_filter:
        # A search query inside the parameter: its values percent-encoded as in any query (a
        # namespace may hold '&', '+' or '%'), then the whole encoded again as one value.
        criteria = f"_profile={quote(Profile.ENCOUNTER.url, safe=':/')}"
        if namespace is not None:
            criteria += "&" + identifier_query(system(namespace, Kind.ENCOUNTER), "")
        params["_typeFilter"] = "Encounter?" + criteria
    return {"path": path, "params": params}


def _instant(since: str | dt.datetime) -> str:
    """``_since`` is an instant: a date alone is its start in UTC; a time zone is required."""
    if isinstance(since, dt.datetime):
        when = since
    else:
        text = since.strip()
        try:
            when = (
                dt.datetime.combine(dt.date.fromisoformat(text), dt.time(), dt.UTC)
                if len(text) == 10
                else dt.datetime.fromisoformat(text)
            )
        except ValueError:
            raise ValueError(f"since {since!r} is not an ISO 8601 date or instant") from None
    if when.tzinfo is None:
        raise ValueError(f"since {since!r} has no time zone")
    return when.isoformat()


def _fhir_id(value: str, what: str) -> str:
    if ref_id({"reference": f"{what}/{value}"}) != value:
        raise ValueError(f"{value!r} is not a {what} id")
    return value


# -- manifest -------------------------------------------------------------------------------


def check_manifest(
    data: Any,
    base_url: httpx.URL,
    *,
    file_hosts: frozenset[str] = frozenset(),
    where: str = "the export manifest",
) -> tuple[list[ExportFile], list[ExportFile]]:
    """The output files and the error files of a manifest, checked; raise if it cannot be used.

    Raises:
        InvalidResponseError: the manifest is not the IG's JSON, lists a type not asked for, or
            a file on another host than the server's (and ``file_hosts``), or asks for the
            token to be sent to another host.
    """

    def bad(reason: str) -> InvalidResponseError:
        return InvalidResponseError(f"{where}: {reason}")

    if not isinstance(data, dict):
        raise bad("not a JSON object")
    needs_token = data.get("requiresAccessToken")
    if not isinstance(needs_token, bool):
        raise bad("requiresAccessToken is missing or not true/false")
    if not isinstance(data.get("transactionTime"), str):
        raise bad("transactionTime is missing")
    lists = {}
    for key in ("output", "error"):
        items = data.get(key, [])
        if not isinstance(items, list):
            raise bad(f"{key} is not a list")
        if len(items) > MAX_EXPORT_FILES:
            raise bad(f"{key} lists {len(items)} files (at most {MAX_EXPORT_FILES} are taken)")
        lists[key] = items
    files: dict[str, list[ExportFile]] = {"output": [], "error": []}
    for key, items in lists.items():
        for n, item in enumerate(items):
            if not isinstance(item, dict):
                raise bad(f"{key}[{n}] is not an object")
            kind, url = item.get("type"), item.get("url")
            if not isinstance(kind, str) or not isinstance(url, str) or not url:
                raise bad(f"{key}[{n}] has no type or url")
            if key == "output" and kind not in ENCOUNTER_TYPES:
                raise bad(f"{key}[{n}] is of type {kind[:40]!r}, which was not asked for")
            try:
                checked = httpx.URL(url)
                ours = checked.is_absolute_url and same_origin(checked, base_url)
                if not ours:  # another host: https only (or this machine)
                    checked = check_url(url, allow_insecure_http=False)
            except (ConfigurationError, httpx.InvalidURL) as exc:
                reason = exc.reason if isinstance(exc, ConfigurationError) else str(exc)
                raise bad(f"{key}[{n}]: {reason}") from None
            if not ours and checked.host not in file_hosts:
                raise bad(
                    f"{key}[{n}] is on another host ({checked.host}); not fetched (name the "
                    "host as a file host if the server keeps its files there)"
                )
            if not ours and needs_token:
                raise bad(
                    f"{key}[{n}] is on another host ({checked.host}) but the manifest asks for "
                    "the access token to be sent there; refused"
                )
            count = item.get("count")
            if type(count) is float and count.is_integer():
                count = int(count)  # 3.0 is JSON's 3 too
            if count is not None and (type(count) is not int or count < 0):
                raise bad(f"{key}[{n}]: count is not a number of resources")
            files[key].append(ExportFile(kind, str(checked), ours and needs_token, count))
    return files["output"], files["error"]


# -- the work directory ---------------------------------------------------------------------


def _load_state(work_dir: Path) -> _Export | None:
    path = work_dir / STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"{path} cannot be read ({exc})",
            fix="remove it to start the export anew, or choose another work directory",
        ) from None
    try:
        status_url = data.get("status_url")
        if status_url is not None and not isinstance(status_url, str):
            raise TypeError("status_url")
        files = data.get("files", [])
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise TypeError("files")
        if any(not _FILE_NAME.fullmatch(f) for f in files):
            raise ValueError("files")
        return _Export(
            server=str(data["server"]),
            request=dict(data["request"]),
            status_url=status_url,
            manifest=data.get("manifest"),
            files=list(files),
        )
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ConfigurationError(
            f"{path} is not an ims-fhir bulk export state file",
            fix="remove it, or choose another work directory",
        ) from None


def _save_state(work_dir: Path, state: _Export) -> None:
    path = work_dir / STATE_FILE
    text = json.dumps(
        {
            "server": state.server,
            "request": state.request,
            "status_url": state.status_url,
            "manifest": state.manifest,
            "files": state.files,
        },
        indent=1,
    )
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _file_name(n: int, kind: str) -> str:
    return f"{n:05d}.{kind}.ndjson"


_FILE_NAME = re.compile(r"(\d{5}\.[A-Za-z]+|error-\d{5})\.ndjson(\.part)?")


# -- the pull -------------------------------------------------------------------------------


async def bulk_pull(
    client: AsyncFhirClient,
    work_dir: str | os.PathLike[str],
    *,
    level: Level = "system",
    group: str | None = None,
    since: str | dt.datetime | None = None,
    namespace: str | None = None,
    clinic: str | None = None,
    type_filter: bool = True,
    file_hosts: Iterable[str] = (),
    concurrency: int = DEFAULT_BULK_CONCURRENCY,
    max_poll_wait: float = MAX_POLL_WAIT,
    max_file_bytes: int = MAX_EXPORT_FILE_BYTES,
    on_progress: Callable[[BulkProgress], None] | None = None,
    sleep: Callable[[float], Any] = asyncio.sleep,
    remove_files: bool = False,
) -> AsyncIterator[MappingReport]:
    """Export from the server with Bulk Data ``$export`` and yield the records rebuilt, by batch.

    Args:
        client: the server's client (its auth, TLS settings and headers are used).
        work_dir: where the NDJSON files, the export's state and the index are kept. Run again
            with the same directory and arguments after an interruption to resume.
        level: ``"system"`` (``$export``), ``"patient"`` (``Patient/$export``) or ``"group"``
            (``Group/<group>/$export``).
        group: the Group's id, with ``level="group"``.
        since: only encounters changed at or after this date or instant (``_since``).
        namespace: only encounters of clinics with this identifier namespace.
        clinic: only encounters of the clinic with this id.
        type_filter: send ``_typeFilter`` (Encounter profile and namespace); turn off for a
            server that refuses it. Records are checked here either way.
        file_hosts: hosts besides the server's own that may hold the files (never sent the
            token or the client's headers).
        concurrency: files downloaded at once.
        max_poll_wait: the longest wait between polls, in seconds, whatever ``Retry-After``.
        max_file_bytes: the largest file downloaded.
        on_progress: called with each :class:`BulkProgress`.
        sleep: how to wait between polls (tests pass their own clock).
        remove_files: once every record is handed out and no report held an error, remove the
            export's files (patients' data, of no further use), while the directory is still
            this pull's (``pull --bulk`` does). Else they stay, for the errors naming their lines.

    Yields:
        MappingReports: first one with the export's own errors (bad lines, error files), if
        any; then one per batch of encounters.

    Raises:
        ValueError: arguments that cannot be one (an empty namespace, a bad Group id).
        ConfigurationError: the server offers no ``$export``; the work directory holds
            another export.
        FhirError: the server failed, or answered what the IG does not allow.
    """
    check_clinic_filter(namespace, clinic)
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1: {concurrency}")
    if not max_poll_wait > 0:
        raise ValueError(f"max_poll_wait must be a positive number of seconds: {max_poll_wait}")
    work = Path(work_dir)
    request = export_request(
        level=level, group=group, since=since, namespace=namespace, type_filter=type_filter
    )
    progress = on_progress or (lambda _: None)
    hosts = frozenset(h.lower() for h in file_hosts)
    work.mkdir(parents=True, exist_ok=True)
    with _held(work):
        state = _load_state(work)
        server = str(client.base_url)
        if state is not None and (state.server != server or state.request != request):
            raise ConfigurationError(
                f"{work} holds another export ({state.server}, {state.request['path']})",
                fix="choose another work directory, or remove it to start anew",
            )
        if state is None or (state.status_url is None and state.manifest is None):
            state = _Export(server, request)
        exporter = _Exporter(
            client, work, state, hosts, concurrency, max_file_bytes, progress, sleep
        )
        try:
            if state.manifest is None:
                if state.status_url is None:
                    await exporter.kick_off()
                await exporter.wait(max_poll_wait)
            errors = await exporter.download()
        except asyncio.CancelledError:
            await exporter.cancel()
            raise
        report = MappingReport(errors=errors)
        index = _Index(work / INDEX_FILE)
        clean = True  # no report held an error
        try:
            progress(BulkProgress("indexing", total=len(state.files)))
            report.errors += index.load(work / name for name in state.files)
            report.warnings += index.conflict_warnings()
            if report.errors or report.warnings:
                clean = not report.errors
                yield report
            progress(BulkProgress("rebuilding", total=index.encounter_count()))
            done = 0
            if since is not None:
                batches = _rebuild_changed(client, index)
            else:
                batches = _rebuild_from_server_gaps(client, index)
            async for batch in batches:
                if namespace is not None or clinic is not None:
                    keep_clinic(batch, namespace, clinic)
                done += len(batch.records) + len(batch.errors)
                progress(BulkProgress("rebuilding", done=done, total=index.encounter_count()))
                clean = clean and not batch.errors
                yield batch
            # Every record handed out: the export is spent. The next pull with this directory
            # starts a new one (the files stay until then, for the errors that name their lines);
            # only a pull interrupted before this point resumes.
            (work / STATE_FILE).unlink(missing_ok=True)
        finally:
            index.close()
        if remove_files and clean:
            _remove_files(work)


@contextlib.contextmanager
def _held(work: Path) -> Iterator[None]:
    """Hold ``work`` for this pull, or say that another pull has it."""
    lock = _try_hold(work)
    if lock is None:
        raise ConfigurationError(
            f"{work} is in use by another bulk pull",
            fix="wait for it to end, or give this pull another work directory",
        )
    try:
        yield
    finally:
        lock.release()


def _try_hold(work: Path) -> filelock.BaseFileLock | None:
    """Take ``work`` for this pull; None if another pull has it (never wait for it).

    The lock is the operating system's (``flock``): a pull killed outright frees it.
    """
    lock = filelock.FileLock(work / LOCK_FILE, timeout=0)
    try:
        with warnings.catch_warnings():
            # Where the filesystem has no flock, filelock falls back to a lock file created
            # exclusively (and removed on release), saying so in a warning: not for the user.
            warnings.filterwarnings("ignore", "flock not supported", UserWarning)
            lock.acquire()
    except filelock.Timeout:
        return None
    except OSError as exc:
        raise ConfigurationError(
            f"cannot lock {work / LOCK_FILE}: {exc.strerror or exc}",
            fix="give the pull a work directory it can write to",
        ) from None
    return lock


async def _rebuild_from_server_gaps(
    client: AsyncFhirClient, index: _Index
) -> AsyncIterator[MappingReport]:
    """Rebuild from the index; what it lacks of what encounters refer to is read by id."""
    for encounters, parts in index.batches():
        wanted = referred_ids(encounters, parts)
        found, missing = index.referred(wanted)
        for resource_type, ids in missing.items():
            fetched = await fetch_by_id(client, resource_type, sorted(ids))
            index.add_referred(fetched)
            found += fetched
        yield from_fhir([*encounters, *parts, *found])


async def _rebuild_changed(client: AsyncFhirClient, index: _Index) -> AsyncIterator[MappingReport]:
    """With ``_since``: the encounters the export touches, rebuilt whole from the server."""
    for ids in index.touched(BATCH):
        encounters = [e for e in await fetch_by_id(client, "Encounter", ids) if isinstance(e, dict)]
        if encounters:
            yield await rebuild(client, encounters)


class _Exporter:
    """Kick-off, status and download of one export, remembered in the work directory."""

    def __init__(
        self,
        client: AsyncFhirClient,
        work: Path,
        state: _Export,
        file_hosts: frozenset[str],
        concurrency: int,
        max_file_bytes: int,
        progress: Callable[[BulkProgress], None],
        sleep: Callable[[float], Any],
    ) -> None:
        self.client = client
        self.work = work
        self.state = state
        self.file_hosts = file_hosts
        self.concurrency = concurrency
        self.max_file_bytes = max_file_bytes
        self.progress = progress
        self.sleep = sleep
        self.counted: set[str] = set()  # files fetched in this run whose count was right

    async def kick_off(self) -> None:
        self.progress(BulkProgress("kick-off", self.state.request["path"]))
        # Files of an export that was cancelled or abandoned must not pass for this one's.
        for stale in self.work.glob("*.ndjson*"):
            if _FILE_NAME.fullmatch(stale.name):
                stale.unlink()
        call = Call(
            "GET",
            self.state.request["path"],
            self.state.request["params"],
            # no-cache: a pull wants what the server holds now; HAPI, for one, otherwise hands
            # back the files of an earlier export with the same parameters.
            {"Accept": FHIR_JSON, "Prefer": "respond-async", "Cache-Control": "no-cache"},
        )
        try:
            response = await self.client.send(call)
        except StatusError as exc:
            if exc.response is not None and exc.response.status_code in {400, 404, 405, 501}:
                if not await self._offers_export():
                    raise ConfigurationError(
                        f"{self.client.base_url} offers no Bulk Data $export (its "
                        "CapabilityStatement lists no export operation)",
                        fix="pull without --bulk, or ask the server's operator to enable "
                        "bulk export",
                    ) from None
            raise
        where = describe_request(response.request)
        if response.status_code != 202:
            raise InvalidResponseError(
                f"{where}: the kick-off answered {response.status_code}, not 202 Accepted",
                request=response.request,
                response=response,
            )
        location = response.headers.get("Content-Location", "")
        status_url = self.client.base_url.join(location) if location else None
        if status_url is None or not same_origin(status_url, self.client.base_url):
            raise InvalidResponseError(
                f"{where}: the kick-off gave "
                + ("no status URL" if status_url is None else f"a status URL on {status_url.host}")
                + " (Content-Location must be on the server's own origin)",
                request=response.request,
                response=response,
            )
        self.state.status_url = str(status_url)
        _save_state(self.work, self.state)
        self.progress(BulkProgress("waiting", "the export started"))  # now it can be cancelled

    async def _offers_export(self) -> bool:
        try:
            statement = await self.client.request_json("GET", "metadata")
        except FhirError:
            return True  # cannot tell: the kick-off's own error says more
        for rest in _objects(statement.get("rest")):
            for where in [rest, *_objects(rest.get("resource"))]:
                for operation in _objects(where.get("operation")):
                    if str(operation.get("name", "")).lstrip("$") == "export":
                        return True
        return False

    def _status_url_is_ours(self) -> bool:
        """The status URL is on the server's origin (one from export.json may not be)."""
        url = self.state.status_url
        return url is not None and same_origin(httpx.URL(url), self.client.base_url)

    async def wait(self, max_poll_wait: float) -> None:
        """Poll the status URL until the manifest comes; keep it in the work directory."""
        assert self.state.status_url is not None
        if not self._status_url_is_ours():
            raise ConfigurationError(
                f"{self.work / STATE_FILE} names a status URL on another host",
                fix="remove it to start the export anew",
            )
        backoff = FIRST_POLL_WAIT
        while True:
            try:
                response = await self.client.send(
                    Call("GET", self.state.status_url, None, {"Accept": "application/json"}),
                    ok=frozenset({429}),
                )
            except (NotFoundError, GoneError) as exc:
                _remove_files(self.work)  # forgotten: the next run starts a new export
                raise ConfigurationError(
                    f"the export is gone from the server ({exc})",
                    fix="pull again: a new export is started",
                ) from None
            if response.status_code == 200:
                break
            where = describe_request(response.request)
            if response.status_code not in {202, 429}:
                raise InvalidResponseError(
                    f"{where}: the export status answered {response.status_code} (the IG "
                    "allows 202 in progress, 200 complete, or an error)",
                    request=response.request,
                    response=response,
                )
            asked = parse_retry_after(response.headers.get("Retry-After"))
            if asked is None:
                delay, backoff = backoff, min(backoff * 2, max_poll_wait)
            else:
                delay = asked
            delay = min(max(delay, 0.1), max_poll_wait)
            note = _printable(response.headers.get("X-Progress", ""))
            self.progress(BulkProgress("waiting", note))
            logger.info("export in progress (%s); polling again in %.1f s", note, delay)
            await self.sleep(delay)
        try:
            manifest = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            _remove_files(self.work)  # a finished export whose manifest cannot be used
            raise InvalidResponseError(
                f"{describe_request(response.request)}: the manifest is not JSON",
                request=response.request,
                response=response,
            ) from None
        # Kept before it is checked: what fails may be the user's to fix (a --file-host), and
        # the export is then resumed, not started again.
        self.state.manifest = manifest
        _save_state(self.work, self.state)
        self._checked(manifest)

    def _checked(self, manifest: Any) -> tuple[list[ExportFile], list[ExportFile]]:
        try:
            return check_manifest(manifest, self.client.base_url, file_hosts=self.file_hosts)
        except InvalidResponseError as exc:
            raise InvalidResponseError(
                f"{exc}; {self.work / STATE_FILE} keeps the export: pull again once that is "
                "fixed to resume it, or remove the file to start a new export"
            ) from None

    async def download(self) -> list[MappingError]:
        """Fetch the files not fetched yet; return the errors the export's error files list."""
        output, error_files = self._checked(self.state.manifest)
        names = [_file_name(n, f.type) for n, f in enumerate(output)]
        todo = [(f, name) for f, name in zip(output, names, strict=True)]
        todo = [(f, name) for f, name in todo if not (self.work / name).is_file()]
        errors_named = [(f, f"error-{n:05d}.ndjson") for n, f in enumerate(error_files)]
        todo += [(f, name) for f, name in errors_named if not (self.work / name).is_file()]
        total = len(output) + len(error_files)
        done = total - len(todo)
        self.progress(BulkProgress("downloading", done=done, total=total))
        gate = asyncio.Semaphore(self.concurrency)

        async def fetch(file: ExportFile, name: str) -> None:
            nonlocal done
            async with gate:
                await self._fetch(file, self.work / name)
            done += 1
            self.progress(BulkProgress("downloading", done=done, total=total))

        tasks = [asyncio.create_task(fetch(file, name)) for file, name in todo]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            # One file failed for good (or the pull is cancelled): stop the others, whose
            # parts are removed; the files completed stay for the next run.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        self.state.files = names
        _save_state(self.work, self.state)
        short = []
        for file, name in [*zip(output, names, strict=True), *errors_named]:
            if name in self.counted:
                continue  # fetched in this run, its count found right
            found = _count_mismatch(self.work / name, file)
            if found is not None:
                short.append(
                    MappingError(
                        str(self.work / name),
                        "<export>",
                        f"{found} resources where the manifest says {file.count}, after "
                        f"{self.client.retry.max_retries + 1} downloads: the encounters of "
                        "the missing ones are not pulled (pull again to retry)",
                    )
                )
        return short + [e for _, name in errors_named for e in _export_errors(self.work / name)]

    async def _fetch(self, file: ExportFile, path: Path) -> None:
        """One file, to ``path`` once complete; started again after a failure that may pass."""
        partial = path.with_name(path.name + ".part")
        attempt = 0
        while True:
            attempt += 1
            try:
                try:
                    with partial.open("wb") as out:
                        await self.client.download(
                            file.url,
                            out.write,
                            credentials=file.credentials,
                            accept=NDJSON,
                            max_bytes=self.max_file_bytes,
                        )
                    found = _count_mismatch(partial, file)
                    if found is None:
                        self.counted.add(path.name)
                    elif attempt <= self.client.retry.max_retries:  # cut short? again
                        raise _ShortFile(
                            f"{path.name}: {found} resources where the manifest says "
                            f"{file.count} (cut short?)"
                        )
                    os.replace(partial, path)  # kept when still short; download() reports it
                    return
                finally:
                    partial.unlink(missing_ok=True)  # a part is never taken for a whole file
            except (NotFoundError, GoneError) as exc:
                raise ConfigurationError(
                    f"{path.name}: the server no longer has the file ({exc})",
                    fix=f"the export has expired: remove {self.work / STATE_FILE} and pull again",
                ) from None
            except (TransportError, ServerError, RateLimitError, _ShortFile) as exc:
                retry = self.client.retry
                if attempt > retry.max_retries:
                    raise
                response = exc.response if isinstance(exc, StatusError) else None
                asked = parse_retry_after(response.headers.get("Retry-After")) if response else None
                if asked is not None and asked > retry.max_retry_after:
                    raise
                delay = asked if asked is not None else retry.backoff(attempt, random.random)
                said = _printable(str(exc), 500)  # the server's words may be in it
                logger.warning("%s: %s; fetching the file again in %.1f s", path.name, said, delay)
                await self.sleep(delay)

    async def cancel(self) -> None:
        """Tell the server to stop (and drop) the export; forget it here."""
        status_url = self.state.status_url
        ours = self._status_url_is_ours()
        _remove_files(self.work)  # the files fetched so far too: patients' data, now of no use
        if status_url is None or not ours:
            return  # never the client's credentials to a host export.json names
        try:
            # Shielded: the task is being cancelled, and this request must still go out.
            await asyncio.shield(
                asyncio.wait_for(
                    self.client.send(Call("DELETE", status_url), ok=frozenset({404, 410})), 10
                )
            )
        except (FhirError, TimeoutError, asyncio.CancelledError) as exc:
            logger.warning("could not cancel the export on the server: %s", exc)


class _ShortFile(Exception):
    """A file with fewer (or more) resources than the manifest's ``count``: cut short."""


def _count_mismatch(path: Path, file: ExportFile) -> int | None:
    """The resources ``path`` holds, if not the manifest's ``count``; None if as it says.

    A connection closed early at a line's end leaves a file that looks whole; None too when
    the manifest gives no count.
    """
    if file.count is None:
        return None
    with path.open("rb") as lines:
        found = sum(1 for line in lines if line.strip())
    return None if found == file.count else found


def _printable(text: str, limit: int = _X_PROGRESS_CHARS) -> str:
    return "".join(c for c in text[:limit] if c.isprintable())


def _objects(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _export_errors(path: Path) -> list[MappingError]:
    """The issues of an export's error file (OperationOutcomes, one a line)."""
    errors: list[MappingError] = []
    more = 0
    for location, value in json_values(path):
        where = f"{path} line {location.line}"
        issues = _objects(value.get("issue")) if isinstance(value, dict) else []
        for issue in issues or [{}]:
            if len(errors) >= MAX_LINE_ERRORS:
                more += 1
                continue
            text = issue.get("diagnostics") or issue.get("code") or "an error it does not describe"
            # The server's words, shown on a terminal: no control characters.
            errors.append(
                MappingError(
                    f"the server's export ({where})", "<export>", _printable(str(text), 1000)
                )
            )
    if more:
        where = f"the server's export ({path})"
        errors.append(MappingError(where, "<export>", f"and {more} more", count=more))
    return errors


# -- the index ------------------------------------------------------------------------------


class _Index:
    """Resources from per-type NDJSON files, grouped by encounter, on disk (SQLite).

    Encounters keep the order they were read in; their parts are found by the Encounter they
    point at, what they refer to by type and id, each with an index: linear in the lines.
    """

    def __init__(self, path: Path) -> None:
        path.unlink(missing_ok=True)  # built anew each time, from the files
        self.path = path
        self.conflicts: set[str] = set()
        self.more_conflicts = 0
        self.db = sqlite3.connect(path)
        self.db.executescript(
            """
            PRAGMA journal_mode = OFF;
            PRAGMA synchronous = OFF;
            CREATE TABLE encounter (id TEXT PRIMARY KEY, body BLOB NOT NULL);
            CREATE TABLE part (encounter TEXT NOT NULL, body BLOB NOT NULL);
            CREATE TABLE referred (
                type TEXT NOT NULL, id TEXT NOT NULL, body BLOB NOT NULL, PRIMARY KEY (type, id)
            );
            """
        )

    def close(self) -> None:
        self.db.close()
        self.path.unlink(missing_ok=True)

    def load(self, files: Iterable[Path]) -> list[MappingError]:
        """Read every line of ``files``; the errors of lines that cannot be used.

        At most :data:`MAX_LINE_ERRORS` are kept, then one that counts the rest: files of bad
        lines (a broken or hostile server) must not fill the memory with errors.
        """
        errors: list[MappingError] = []
        more = 0  # bad lines past the cap, counted
        more_files = 0  # the files holding them
        first: Path | None = None  # the first of those, named when it is the only one
        with self.db:
            for file in files:
                before = more
                for location, value in json_values(file):
                    where = f"{file} line {location.line}"
                    if not isinstance(value, dict):
                        reason = (
                            str(value.issues[0].reason)
                            if hasattr(value, "issues") and value.issues
                            else "not a JSON object"
                        )
                    else:
                        problem = self.add(value)
                        if not problem:
                            continue
                        reason = problem
                    if len(errors) < MAX_LINE_ERRORS:
                        errors.append(MappingError(where, "<line>", reason))
                    else:
                        more += 1
                if more > before:
                    more_files += 1
                    first = first or file
        if more:
            where = f"{more_files} files" if more_files > 1 else str(first)
            errors.append(
                MappingError(
                    where, "<line>", f"and {more} more lines that cannot be used", count=more
                )
            )
        self.db.execute("CREATE INDEX part_by_encounter ON part (encounter)")
        return errors

    def conflict_warnings(self) -> list[MappingError]:
        """Resources read twice with different content (the first copy read is used)."""
        warnings = [
            MappingError(
                name,
                "<export>",
                "is in the export twice with different content; its encounters are rebuilt "
                "from the first copy read (check it on the server)",
            )
            for name in sorted(self.conflicts)
        ]
        if self.more_conflicts:
            warnings.append(
                MappingError(
                    "the export",
                    "<export>",
                    f"and {self.more_conflicts} more resources in it twice with different content",
                    count=self.more_conflicts,
                )
            )
        return warnings

    def add(self, resource: dict[str, Any]) -> str | None:
        """Store one resource; what is wrong with it, if it cannot be stored."""
        kind, rid = resource.get("resourceType"), resource.get("id")
        if not isinstance(kind, str) or kind not in ENCOUNTER_TYPES:
            return f"resourceType {str(kind)[:40]!r} is not one an IMS encounter uses"
        if not isinstance(rid, str) or ref_id({"reference": f"{kind}/{rid}"}) != rid:
            return f"{kind} without a FHIR id"
        body = orjson.dumps(resource)
        if kind == "Encounter":
            cursor = self.db.execute(
                "INSERT OR IGNORE INTO encounter (id, body) VALUES (?, ?)", (rid, body)
            )
            return None if cursor.rowcount else f"Encounter/{rid} is in the export twice"
        if kind in PARTS:
            for encounter in _encounters_of(kind, resource):
                self.db.execute(
                    "INSERT INTO part (encounter, body) VALUES (?, ?)", (encounter, body)
                )
            return None
        cursor = self.db.execute(
            "INSERT OR IGNORE INTO referred (type, id, body) VALUES (?, ?, ?)", (kind, rid, body)
        )
        if not cursor.rowcount:
            (held,) = self.db.execute(
                "SELECT body FROM referred WHERE type = ? AND id = ?", (kind, rid)
            ).fetchone()
            name = f"{kind}/{rid}"
            if _content(orjson.loads(held)) != _content(resource) and name not in self.conflicts:
                if len(self.conflicts) < MAX_LINE_ERRORS:
                    self.conflicts.add(name)
                else:
                    self.more_conflicts += 1
        return None

    def add_referred(self, resources: Sequence[Any]) -> None:
        """Keep resources read from the server by id, for later batches."""
        with self.db:
            for r in resources:
                if isinstance(r, dict) and r.get("resourceType") in REFERRED:
                    self.add(r)

    def encounter_count(self) -> int:
        (count,) = self.db.execute("SELECT count(*) FROM encounter").fetchone()
        return int(count)

    def batches(self) -> Iterator[tuple[list[Any], list[Any]]]:
        """(Encounters, their parts), :data:`BATCH` encounters at a time, in file order."""
        last = 0
        while True:
            rows = self.db.execute(
                "SELECT rowid, id, body FROM encounter WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (last, BATCH),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            ids = [row[1] for row in rows]
            marks = ",".join("?" * len(ids))
            parts = self.db.execute(
                f"SELECT body FROM part WHERE encounter IN ({marks})",  # noqa: S608 (marks only)
                ids,
            ).fetchall()
            yield [orjson.loads(r[2]) for r in rows], [orjson.loads(p[0]) for p in parts]

    def referred(self, wanted: dict[str, set[str]]) -> tuple[list[Any], dict[str, set[str]]]:
        """The referred resources held, and the ids (by type) not held."""
        found: list[Any] = []
        missing: dict[str, set[str]] = {}
        for kind, ids in wanted.items():
            for rid in ids:
                row = self.db.execute(
                    "SELECT body FROM referred WHERE type = ? AND id = ?", (kind, rid)
                ).fetchone()
                if row is None:
                    missing.setdefault(kind, set()).add(rid)
                else:
                    found.append(orjson.loads(row[0]))
        return found, missing

    def touched(self, size: int) -> Iterator[list[str]]:
        """The ids of every encounter the export holds or holds a part of, ``size`` at a time."""
        rows = self.db.execute(
            "SELECT id FROM encounter UNION SELECT DISTINCT encounter FROM part ORDER BY 1"
        )
        while batch := rows.fetchmany(size):
            yield [row[0] for row in batch]


def _content(resource: dict[str, Any]) -> bytes:
    """What a resource says, to compare two copies (``meta`` is the server's bookkeeping)."""
    return orjson.dumps(
        {k: v for k, v in resource.items() if k != "meta"}, option=orjson.OPT_SORT_KEYS
    )


def _encounters_of(kind: str, resource: dict[str, Any]) -> list[str]:
    """The ids of the Encounters a part points at (by the element pull searches on)."""
    value = resource.get(PARTS[kind])
    found = []
    for ref in value if isinstance(value, list) else [value]:
        text = ref.get("reference") if isinstance(ref, dict) else None
        if isinstance(text, str) and "Encounter/" in text:
            encounter = ref_id(ref)
            if encounter is not None:
                found.append(encounter)
    return found


def remove_export(work_dir: str | os.PathLike[str]) -> None:
    """Remove what a bulk pull keeps in ``work_dir`` (its files and state; nothing else).

    Nothing is removed while another pull holds the directory. The empty lock file stays: one
    removed could be locked by two pulls at once (one holding the old file, one a new one).
    (On a filesystem without ``flock``, filelock's own lock file comes and goes instead.)
    """
    work = Path(work_dir)
    if not work.is_dir():
        return
    lock = _try_hold(work)
    if lock is None:
        return  # another pull has taken the directory since: the files are its own now
    try:
        _remove_files(work)
    finally:
        lock.release()


def _remove_files(work: Path) -> None:
    for path in work.iterdir():
        if _FILE_NAME.fullmatch(path.name) or path.name in {STATE_FILE, INDEX_FILE}:
            path.unlink(missing_ok=True)


# -- offline and blocking -------------------------------------------------------------------


def rebuild_ndjson(
    paths: Iterable[str | os.PathLike[str]], *, index_dir: str | os.PathLike[str] | None = None
) -> Iterator[MappingReport]:
    """Rebuild records from Bulk Data NDJSON files (one resource type each), offline.

    What ``bulk_pull`` does once the files are fetched, for files you have: a batch of records
    at a time, in bounded memory. Resources the files lack are errors of the records needing
    them (nothing is read from a server). The first report holds the errors of bad lines.
    """
    files = [Path(p) for p in paths]
    # A file of its own, never one of the user's (an index.sqlite3 beside the files).
    where = Path(index_dir) if index_dir is not None else (files[0].parent if files else None)
    handle, name = tempfile.mkstemp(prefix=".ims-fhir-index-", suffix=".sqlite3", dir=where)
    os.close(handle)
    index = _Index(Path(name))
    # Gone from the directory at once (SQLite keeps the open file): a killed rebuild leaves
    # no copy of the patients' data behind.
    Path(name).unlink()
    try:
        errors = index.load(files)
        warnings = index.conflict_warnings()
        if errors or warnings:
            yield MappingReport(errors=errors, warnings=warnings)
        for encounters, parts in index.batches():
            found, _ = index.referred(referred_ids(encounters, parts))
            yield from_fhir([*encounters, *parts, *found])
    finally:
        index.close()


def bulk_pull_all(
    base_url: str,
    work_dir: str | os.PathLike[str],
    *,
    level: Level = "system",
    group: str | None = None,
    since: str | dt.datetime | None = None,
    namespace: str | None = None,
    clinic: str | None = None,
    type_filter: bool = True,
    file_hosts: Iterable[str] = (),
    concurrency: int = DEFAULT_BULK_CONCURRENCY,
    max_poll_wait: float = MAX_POLL_WAIT,
    client_options: ClientOptions | None = None,
) -> MappingReport:
    """Bulk-pull every matching encounter from the server at ``base_url`` (blocking).

    :func:`bulk_pull` in one report. For many encounters iterate :func:`bulk_pull` instead,
    which holds one batch at a time.
    """
    refuse_own_http_client(client_options, "bulk_pull_all")
    check_clinic_filter(namespace, clinic)

    async def run() -> MappingReport:
        report = MappingReport()
        async with AsyncFhirClient(base_url, **(client_options or {})) as client:
            batches = bulk_pull(
                client,
                work_dir,
                level=level,
                group=group,
                since=since,
                namespace=namespace,
                clinic=clinic,
                type_filter=type_filter,
                file_hosts=file_hosts,
                concurrency=concurrency,
                max_poll_wait=max_poll_wait,
            )
            async for batch in batches:
                report.extend(batch)
        return report

    return run_blocking(run)
