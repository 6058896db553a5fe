"""The sync engine: push IMS encounters to a FHIR server, safely and repeatably.

For each encounter (see ``README.md``, "Guarantees"):

- **Atomic.** Its resources are written in one transaction (several encounters per transaction
  with ``batch_size``), so a server never holds half an encounter. A server that answers a
  transaction with success while some entries failed is not atomic: the push stops.
- **Incremental.** The state store (:class:`~ims_fhir.StateStore`) keeps each encounter's content
  hash and, for each resource written, its server id, version and signature (``signature.py``).
  Unchanged encounters cost no request at all; a changed one sends only the resources that
  changed, in its own transaction.
- **Changes on the clinic side.** A finding, pain score or needled site gone from the record makes
  its resource ``entered-in-error``; a retracted record makes all of its resources so.
- **Never a blind write.** Before anything is written by server id, the server's copy is read and
  checked: it must be the resource of that type carrying the identifier the state says, or the id
  is forgotten and the resource is looked up by identifier. Its content must be ims-fhir's own
  (its signature is one ims-fhir wrote or was writing), or the encounter is reported as a
  conflict and left alone, unless ``on_conflict="overwrite"``. With no state for an encounter
  (first push, lost or new state file, an interrupted push), what the server holds for the
  encounter's identifiers is read first, so an edit made there is never overwritten.
- **Checked answers.** Every transaction response is checked entry by entry: count, status,
  resource type and id of each ``location``; versions come from ``etag``, else ``location``,
  else the returned resource; an unknown version is never a conflict (signatures decide).
- **Resumable.** Signatures of a write are marked pending in the state before it is sent and
  committed after it succeeds. A re-run after a lost answer, a 5xx after commit or ``kill -9``
  recognises its own earlier write by content and finishes without duplicates, for first pushes,
  edits, removals and retractions alike.

Shared resources (the clinic, patients, practitioners) are created by conditional creates in the
transaction of the first encounter that needs them. Concurrent transactions that conditionally
create the same resource race (the server refuses all but one), so a transaction that would
create one claims it first; a later one that needs it waits for that transaction to finish.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import datetime as dt
import hashlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

from .._exceptions import (
    AuthenticationError,
    ConflictError,
    ConnectError,
    FhirError,
    InvalidResponseError,
    NotFoundError,
    PermissionDeniedError,
    RecordError,
    StateError,
    StatusError,
    UnsafeServerError,
)
from ..client.asynchronous import AsyncFhirClient
from ..client.http import ClientOptions, entries_repeatable, objects
from ..mapping.identity import identifier_query, literal, search_escape
from ..mapping.to_fhir import bundle_dict, record_key
from ..record.model import Encounter
from ..record.reader import ReadRecord
from ..record.terminology import CANONICAL, terminology
from .matching import (
    DEFAULT_MATCH_THRESHOLD,
    MATCH_POLICIES,
    MatchPolicy,
    demographic_differences,
    mark_snapshot,
    match_keys,
    match_query,
    mpi_candidates,
    snapshot_of,
)
from .signature import (
    References,
    canonical_json,
    identifier_key,
    identifier_keys,
    record_digest,
    signature,
    standard_json,
)
from .state import RecordState, ResourceState, StateStore

__all__ = ["SYNC_SIGNATURE_URL", "Action", "PushResult", "PushSummary", "Pusher", "push"]

logger = logging.getLogger("ims_fhir.sync")

SYNC_SIGNATURE_URL = f"{CANONICAL}/StructureDefinition/sync-signature"
"""The ``meta`` extension that carries the signature each resource is written with.

The signature (see ``signature.py``) marks the content as ims-fhir's own write where the state
store cannot say so (a new or lost state file). It rides in the resource's ``meta``, one value
per version: a server that drops it makes ims-fhir report a conflict rather than overwrite. Not a
``meta.tag``: HAPI keeps every tag a resource ever had and stores each tag code once in a table
of its own, so a code unique to each write costs every write; nor ``meta.source``, which stays
the clinic's namespace (what a ``_source`` search finds).
"""

T = TypeVar("T")

DEFAULT_BATCH_SIZE = 1
DEFAULT_CONCURRENCY = 4

Action = Literal[
    "created",
    "updated",
    "unchanged",
    "entered-in-error",
    "conflict",
    "failed",
    "would-create",
    "would-update",
]
JSON = dict[str, Any]

# Where each resource type keeps the status that marks it entered in error.
_STATUS_PATH = {"Observation": "status", "Procedure": "status", "Consent": "status"}

# Errors after which no other encounter can fare better: the push stops at once.
FATAL_ERRORS: tuple[type[Exception], ...] = (
    AuthenticationError,
    PermissionDeniedError,
    ConnectError,
    UnsafeServerError,
    StateError,
)

# The types ims-fhir creates conditionally (on their identifier).
_CONDITIONAL_TYPES = frozenset(
    {
        "Organization",
        "Patient",
        "Practitioner",
        "Encounter",
        "Observation",
        "Condition",
        "Procedure",
        "Consent",
    }
)

# Identifiers per search request (the URL stays well under servers' line limits).
_SEARCH_CHUNK = 20

# How far ahead of this machine's clock a snapshot or an encounter may be and still count.
_CLOCK_SKEW = dt.timedelta(days=1)


class _Seen:
    """The encounters met so far in one push, with where each came from.

    Kept in a private temporary SQLite database (on disk, a small page cache in memory; closed
    when the push is done with it), so a push of millions of encounters runs in flat memory.
    """

    def __init__(self) -> None:
        self._db = sqlite3.connect("")
        self._db.execute("CREATE TABLE seen (key TEXT PRIMARY KEY, source TEXT NOT NULL)")

    def first(self, key: str, source: str) -> str | None:
        """Where ``key`` was met before, or None (and it is remembered as met at ``source``)."""
        row = self._db.execute("SELECT source FROM seen WHERE key = ?", (key,)).fetchone()
        if row is not None:
            return str(row[0])
        self._db.execute("INSERT INTO seen VALUES (?, ?)", (key, source))
        return None


@dataclass(frozen=True, slots=True)
class PushResult:
    """What happened to one encounter."""

    record_id: str
    action: Action
    written: int = 0
    retired: int = 0
    message: str | None = None
    notes: tuple[str, ...] = ()
    """Things the clinic should know that did not stop the push, e.g. a patient the server
    owns whose demographics differ from the clinic's record (field names, never values)."""


@dataclass(slots=True)
class PushSummary:
    """Counts of a push: one per action, plus resources written and requests sent."""

    counts: dict[str, int] = field(default_factory=dict)
    resources_written: int = 0
    resources_retired: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, result: PushResult) -> None:
        """Count one result."""
        self.counts[result.action] = self.counts.get(result.action, 0) + 1
        self.resources_written += result.written
        self.resources_retired += result.retired
        self.notes += [n for n in result.notes if n not in self.notes]

    @property
    def ok(self) -> bool:
        """True when no encounter failed or conflicted."""
        return not (self.counts.get("failed") or self.counts.get("conflict"))


@dataclass(slots=True)
class _Current:
    """The server's copy of one resource, checked to be the one its identifier names."""

    resource_type: str
    resource_id: str
    version: str | None
    content: JSON


@dataclass(slots=True)
class _Item:
    """One encounter prepared for a push."""

    record: Encounter
    key: str
    content_hash: str
    record_digest: str | None
    entries: list[JSON]  # its own entries (not the shared Patient/Practitioner/Organization)
    shared: list[JSON]
    references: References
    desired: dict[str, str]  # identifier -> signature of what this push would write
    record_state: RecordState | None
    known: dict[str, ResourceState] = field(default_factory=dict)
    pending: dict[str, set[str]] = field(default_factory=dict)
    # Filled by planning:
    current: dict[str, _Current | None] = field(default_factory=dict)
    send: list[JSON] = field(default_factory=list)  # entries of this encounter to send
    keep: list[ResourceState] = field(default_factory=list)  # on the server as wanted already
    retired_keep: list[ResourceState] = field(default_factory=list)
    sent_signatures: dict[str, str] = field(default_factory=dict)  # identifier -> signature
    retiring: set[str] = field(default_factory=set)
    shared_known: dict[str, ResourceState] = field(default_factory=dict)
    # The shared resources: identifier -> the keys that find it (policy), signature wanted.
    shared_keys: dict[str, list[str]] = field(default_factory=dict)
    shared_desired: dict[str, str] = field(default_factory=dict)
    # Filled by reading and planning: the server's copies of shared resources that were read,
    # what to send instead of their conditional creates (None: nothing, references made
    # literal), and what the state is to hold of them after the write.
    shared_current: dict[str, _Current] = field(default_factory=dict)
    shared_send: dict[str, JSON | None] = field(default_factory=dict)  # by fullUrl
    shared_state: dict[str, ResourceState] = field(default_factory=dict)
    shared_missing: set[str] = field(default_factory=set)  # looked up, not on the server
    shared_literal: dict[str, str] = field(default_factory=dict)  # fullUrl -> Type/id
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    intent: Action = "updated"  # what a successful write of this encounter is reported as

    @property
    def first_push(self) -> bool:
        return (self.record_state is None or self.record_state.content_hash is None) and not (
            self.known
        )

    @property
    def unsure(self) -> bool:
        """The state cannot vouch for what the server holds for this encounter."""
        return self.record_state is None or self.record_state.pending_hash is not None


class _Conflict(Exception):
    """The server holds content ims-fhir did not write; nothing of the encounter is sent."""


def content_hash(bundle: JSON) -> str:
    """The hash of an encounter's mapped Bundle (so a mapping change counts as a change).

    ``2:`` and the SHA-256 of the Bundle as orjson writes it with sorted keys. Hashes without a
    version are ims-fhir 0.1's (``json.dumps``); :func:`_same_content` still reads them.
    """
    return "2:" + hashlib.sha256(canonical_json(bundle)).hexdigest()[:32]


def _same_content(stored: str | None, digest: str, bundle: JSON) -> bool:
    """Is ``stored`` (from the state) the hash of ``bundle``, whose hash is ``digest``?"""
    if stored is None or stored == digest:
        return stored is not None
    if ":" in stored:
        return False
    return stored == hashlib.sha256(standard_json(bundle)).hexdigest()[:32]


def _token(key: str) -> str:
    """An identifier key as a FHIR search token (values never hold ``|``; systems may)."""
    system, _, value = key.rpartition("|")
    return f"{search_escape(system)}|{search_escape(value)}"


class Pusher:
    """Pushes encounters to one server; reuse it for several pushes to the same server.

    Args:
        client: the client for the server.
        state: the state store.
        batch_size: encounters per transaction.
        concurrency: transactions in flight at once.
        on_conflict: ``"report"`` (default) leaves a conflicting encounter alone and reports
            it; ``"overwrite"`` writes it anyway.
        dry_run: report what would be written, sending nothing.
        verify: check every encounter against the server, even those the state says are
            unchanged: resources deleted or changed there are found, re-created or reported,
            and the state is rebuilt from what the server holds.
        preflight: before the first write, check that the server is a FHIR R4 server that
            takes transactions and accepts the credentials (:meth:`preflight`).
        match: how the patient, practitioner and clinic are found on the server
            (``matching.py``): ``"identifier"`` (default) by their strong identifiers (health
            number, licence) or the clinic-local one; ``"create"`` by the clinic-local one only;
            ``"mpi"`` patients by the server's ``Patient/$match``.
        create_patients: create a patient the server does not hold; False fails the encounter
            instead (a regional record where every patient must already be registered).
        match_threshold: the least ``$match`` score taken as the patient (``match="mpi"``).
    """

    def __init__(
        self,
        client: AsyncFhirClient,
        state: StateStore,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
        on_conflict: Literal["report", "overwrite"] = "report",
        dry_run: bool = False,
        verify: bool = False,
        preflight: bool = True,
        match: MatchPolicy = "identifier",
        create_patients: bool = True,
        match_threshold: float = DEFAULT_MATCH_THRESHOLD,
    ) -> None:
        """Create the pusher."""
        if match not in MATCH_POLICIES:
            raise ValueError(f"match must be one of {', '.join(MATCH_POLICIES)}, not {match!r}")
        if not 0 < match_threshold <= 1:
            raise ValueError(f"match_threshold must be in (0, 1], not {match_threshold!r}")
        self.match: MatchPolicy = match
        self.create_patients = create_patients
        self.match_threshold = match_threshold
        # Patient/$match answers of this push, by the patient's identifier (policy "mpi").
        self._mpi: dict[str, list[JSON]] = {}
        self.client = client
        self.state = state
        self.server = str(client.base_url).rstrip("/")
        self.batch_size = max(1, batch_size)
        self.concurrency = max(1, concurrency)
        self.on_conflict = on_conflict
        self.dry_run = dry_run
        self.verify = verify
        # (record key, content hash, record digest) of records found unchanged by mapping them:
        # their digests go to the state in groups, so the next push need not map them.
        self._digests: list[tuple[str, str, str]] = []
        self.run_preflight = preflight
        self._preflight_done = False
        self._preflight_lock = asyncio.Lock()
        self._preflight_error: FhirError | None = None
        # Shared resources being created, by key: done when the transaction creating them is.
        self._creating: dict[str, asyncio.Future[None]] = {}

    # -- public --------------------------------------------------------------------------------

    async def preflight(self) -> None:
        """Check the server before writing: one clear error instead of one per encounter.

        Raises:
            UnsafeServerError: the base URL is not a FHIR R4 server, or it says it does not
                take transactions.
            AuthenticationError, PermissionDeniedError: the credentials are refused.
            ConnectError, TimeoutException: the server cannot be reached.
        """
        where = self.server
        try:
            statement = await self.client.request_json("GET", "metadata")
        except NotFoundError as exc:
            raise UnsafeServerError(
                f"{where}: no FHIR server at this base URL (GET metadata answered 404); "
                "check the server URL's path (e.g. .../fhir or .../r4)"
            ) from exc
        except InvalidResponseError as exc:
            raise UnsafeServerError(
                f"{where}: not a FHIR server (its metadata is not a CapabilityStatement); "
                "check the server URL"
            ) from exc
        if statement.get("resourceType") != "CapabilityStatement":
            raise UnsafeServerError(
                f"{where}: not a FHIR server (metadata answered a "
                f"{statement.get('resourceType')}); check the server URL"
            )
        version = str(statement.get("fhirVersion") or "")
        if not version.startswith("4.0"):
            raise UnsafeServerError(
                f"{where}: the server speaks FHIR {version or 'of an unknown version'}; "
                "ims-fhir writes FHIR R4 (4.0.x): use the server's R4 endpoint"
            )
        for rest in objects(statement.get("rest")):
            if rest.get("mode") != "server":
                continue
            interactions = {i.get("code") for i in objects(rest.get("interaction"))}
            if interactions and "transaction" not in interactions:
                raise UnsafeServerError(
                    f"{where}: the server does not support transactions, which ims-fhir needs "
                    "to write each encounter whole; use a server that does"
                )
            refusing = sorted(
                str(r.get("type"))
                for r in objects(rest.get("resource"))
                if r.get("type") in _CONDITIONAL_TYPES and r.get("conditionalCreate") is False
            )
            if refusing:
                # Without it a create repeated after a lost answer would make a duplicate.
                raise UnsafeServerError(
                    f"{where}: the server does not support conditional create for "
                    f"{', '.join(refusing)}, which ims-fhir needs to write safely; use a server "
                    "that does"
                )
        # metadata is often public: an authenticated search shows whether the credentials work.
        try:
            await self.client.request_json("GET", "Encounter", params={"_summary": "count"})
        except (AuthenticationError, PermissionDeniedError):
            raise
        except StatusError:
            pass  # a server without _summary=count: the credentials are tested by the push
        self._preflight_done = True

    async def push(self, records: Iterable[Encounter | ReadRecord]) -> AsyncIterator[PushResult]:
        """Push ``records`` (read lazily); yield one result per encounter as each completes.

        Raises:
            UnsafeServerError, AuthenticationError, PermissionDeniedError, ConnectError,
            StateError: the push cannot go on for any encounter; it stops at once. Writes in
                flight stay pending in the state and are recognised by the next push.
        """
        queue: asyncio.Queue[list[_Item] | None] = asyncio.Queue(maxsize=self.concurrency * 2)
        # Bounded: the producer waits for the consumer, so memory stays flat and results flow.
        results: asyncio.Queue[PushResult | BaseException | None] = asyncio.Queue(maxsize=256)
        seen = _Seen()

        fatal: list[BaseException] = []

        async def produce() -> None:
            cancelled = False
            try:
                batch: list[_Item] = []
                for number, given in enumerate(records, start=1):
                    if fatal:
                        return
                    if isinstance(given, ReadRecord):
                        record, source = given.record, str(given.location)
                    else:
                        record, source = given, f"record #{number} ({given.id})"
                    try:
                        key, item = self._prepare(record)
                    except RecordError as exc:
                        # A record built in code that skipped validation: nothing is written.
                        message = "; ".join(str(issue) for issue in exc.issues)
                        await results.put(
                            PushResult(str(record.id), "failed", message=f"{source}: {message}")
                        )
                        continue
                    first = seen.first(key, source)
                    if first is not None:
                        await results.put(
                            PushResult(
                                record.id,
                                "failed",
                                message=f"the encounter {key.partition('|')[2]!r} is in this "
                                f"push twice: {first} and {source}; the second was not "
                                "pushed (remove one of them)",
                            )
                        )
                        continue
                    if item is None:
                        if len(self._digests) >= 256:
                            self._save_digests()
                        await results.put(PushResult(record.id, "unchanged"))
                        continue
                    batch.append(item)
                    if len(batch) >= self.batch_size:
                        await queue.put(batch)
                        batch = []
                if batch:
                    await queue.put(batch)
            except asyncio.CancelledError:
                # The push is cancelled: the workers are too, and a full queue would never
                # take the end markers (a cancelled push that never ended).
                cancelled = True
                raise
            finally:
                self._save_digests()
                if not cancelled:
                    for _ in range(self.concurrency):
                        await queue.put(None)

        async def work() -> None:
            while (batch := await queue.get()) is not None:
                if fatal:
                    continue  # the push is stopping: start nothing new
                try:
                    for result in await self._push_batch(batch):
                        await results.put(result)
                except FATAL_ERRORS as exc:
                    # Stop, but let the transactions in flight finish and be recorded.
                    fatal.append(exc)
                except Exception as exc:  # noqa: BLE001 - reported per encounter below
                    for item in batch:
                        await results.put(PushResult(item.record.id, "failed", message=str(exc)))

        async def run() -> None:
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(produce())
                    for _ in range(self.concurrency):
                        group.create_task(work())
            except asyncio.CancelledError:
                raise  # the consumer is gone: nothing more to hand over
            except BaseExceptionGroup as failed:  # reading the input failed
                await results.put(failed.exceptions[0])
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                await results.put(exc)
            if fatal:
                await results.put(fatal[0])
            await results.put(None)

        runner = asyncio.create_task(run())
        try:
            while (result := await results.get()) is not None:
                if isinstance(result, BaseException):
                    raise result
                yield result
        finally:
            if not runner.done():
                runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    def _save_digests(self) -> None:
        digests, self._digests = self._digests, []
        if digests and not self.dry_run:
            self.state.note_digests(self.server, digests)

    # -- preparing -----------------------------------------------------------------------------

    def _prepare(self, record: Encounter) -> tuple[str, _Item | None]:
        """Map one encounter and compare it with the state; no item when nothing is to be done."""
        # A record whose digest the state holds maps to the Bundle last written: unchanged,
        # known without mapping it (--verify maps and reads everything).
        quick = None if self.verify else record_digest(record)
        if quick is not None:
            key = record_key(record)
            record_state = self.state.record(self.server, key)
            if (
                record_state is not None
                and record_state.record_digest == quick
                and record_state.content_hash is not None
                and record_state.pending_hash is None
            ):
                return key, None
        bundle = bundle_dict(record)
        digest = content_hash(bundle)
        entries = bundle["entry"]
        encounter = next(e for e in entries if e["resource"]["resourceType"] == "Encounter")
        key = identifier_key(encounter["resource"])
        record_state = self.state.record(self.server, key)
        if (
            not self.verify
            and record_state is not None
            and _same_content(record_state.content_hash, digest, bundle)
            and record_state.pending_hash is None
        ):
            if quick is not None and record_state.content_hash is not None:
                self._digests.append((key, record_state.content_hash, quick))
            return key, None
        own = [e for e in entries if e["request"]["method"] != "POST"]
        shared = [e for e in entries if e["request"]["method"] == "POST"]
        references = References()
        references.add_entries(entries)
        # An encounter never pushed has no resources in the state (both are written together).
        known = self.state.resources(self.server, key) if record_state is not None else {}
        for resource in known.values():
            references.add_id(resource.resource_type, resource.resource_id, resource.identifier)
        shared_known = self.state.resources_by_identifier(
            self.server, (identifier_key(entry["resource"]) for entry in shared)
        )
        for found in shared_known.values():
            references.add_id(found.resource_type, found.resource_id, found.identifier)
        desired = {identifier_key(e["resource"]): signature(e["resource"], references) for e in own}
        item = _Item(
            record=record,
            key=key,
            content_hash=digest,
            record_digest=quick,
            entries=own,
            shared=shared,
            references=references,
            desired=desired,
            record_state=record_state,
            known=known,
            pending=self.state.pending_signatures(self.server, key) if record_state else {},
            shared_known=shared_known,
        )
        for entry in shared:
            # Found by the policy's identifiers, created only where none of them is held, and
            # marked as ims-fhir's write of this encounter's snapshot (see matching.py).
            resource = entry["resource"]
            identifier = identifier_key(resource)
            keys = match_keys(resource, self.match)
            item.shared_keys[identifier] = keys
            entry["request"] = entry["request"] | {"ifNoneExist": match_query(keys)}
            sig = signature(resource, references)
            item.shared_desired[identifier] = sig
            _mark(resource, sig)
            mark_snapshot(resource, record.start)
        if record.retracted:
            item.intent = "entered-in-error"
        elif item.first_push:
            item.intent = "created"
        return key, item

    # -- pushing -------------------------------------------------------------------------------

    async def _push_batch(self, batch: list[_Item]) -> list[PushResult]:
        if self.dry_run:
            return [self._dry(item) for item in batch]
        if self.run_preflight and not self._preflight_done:
            async with self._preflight_lock:  # once, before the first request of a push
                if self._preflight_error is not None:
                    raise self._preflight_error
                if not self._preflight_done:
                    try:
                        await self.preflight()
                    except FhirError as exc:
                        self._preflight_error = exc
                        raise
        claim = await self._claim_shared(batch)
        try:
            return await self._push_claimed(batch)
        finally:
            for key in claim:
                future = self._creating.pop(key)
                if not future.done():
                    future.set_result(None)

    async def _push_claimed(self, batch: list[_Item]) -> list[PushResult]:
        results: list[PushResult] = []
        ready: list[_Item] = []
        try:
            await self._read_current(batch)
        except FATAL_ERRORS:
            raise
        except FhirError as exc:
            return [PushResult(i.record.id, "failed", message=str(exc)) for i in batch]
        for item in batch:
            if item.error is not None:
                results.append(PushResult(item.record.id, "failed", message=item.error))
                continue
            try:
                self._plan(item)
            except _Conflict as conflict:
                results.append(PushResult(item.record.id, "conflict", message=str(conflict)))
                continue
            ready.append(item)
        if not ready:
            return results
        try:
            results += await self._write(ready)
        except FATAL_ERRORS:
            raise
        except FhirError as exc:
            if len(ready) == 1:
                results.append(await self._recover(ready[0], exc))
            else:  # isolate the encounter that failed the transaction
                for item in ready:
                    try:
                        results += await self._write([item])
                    except FATAL_ERRORS:
                        raise
                    except FhirError as single:
                        results.append(await self._recover(item, single))
        return results

    async def _recover(self, item: _Item, exc: FhirError) -> PushResult:
        """Handle a failed write whose outcome may be unknown: check the server, then finish.

        A version conflict may be this push's own write whose answer was lost (the client
        retried it, and the retry's If-Match was stale); a 5xx, a broken connection or an answer
        that cannot be this request's may have come after the server committed. Reading the
        server's copies again and comparing signatures tells ims-fhir's write from another's.
        """
        if isinstance(exc, StatusError) and exc.status_code < 500:
            if not isinstance(exc, ConflictError):
                # Refused outright: nothing was written; the next push starts afresh.
                self.state.clear_pending(self.server, [item.key])
                return PushResult(item.record.id, "failed", message=str(exc))
        logger.info("checking the server after a failed write (%s)", type(exc).__name__)
        return await self._recheck(item, str(exc))

    async def _recheck(self, item: _Item, why: str) -> PushResult:
        """Read the server's copies again, re-plan and write once more."""
        item.pending = self.state.pending_signatures(self.server, item.key)
        item.record_state = self.state.record(self.server, item.key)
        item.known = self.state.resources(self.server, item.key)
        try:
            # The shared resources are searched for too: a conditional create that failed may
            # have found several (a health number the server holds twice).
            await self._read_current([item], search_shared=True)
            if item.error is not None:
                return PushResult(item.record.id, "failed", message=item.error)
            self._plan(item)
            (result,) = await self._write([item], recheck=False)
        except _Conflict as conflict:
            return PushResult(item.record.id, "conflict", message=str(conflict))
        except FATAL_ERRORS:
            raise
        except FhirError as again:
            refused = isinstance(again, StatusError) and again.status_code < 500
            if refused and not isinstance(again, ConflictError):
                self.state.clear_pending(self.server, [item.key])
            return PushResult(item.record.id, "failed", message=f"{again} (after: {why})")
        return result

    def _dry(self, item: _Item) -> PushResult:
        action: Action = "would-create" if item.first_push else "would-update"
        return PushResult(item.record.id, action, written=len(item.entries))

    async def _claim_shared(self, batch: list[_Item]) -> list[str]:
        """Claim the shared resources this batch's transaction will create; return their keys.

        Waits first for the transactions already creating any of them, then claims what is still
        unknown (no await between the check and the claim, so claims never overlap). Waiting
        never holds a claim, so no two batches wait on each other. If the creating transaction
        failed, the resource is still unknown and this batch claims it in turn.
        """
        keys = {identifier_key(entry["resource"]) for item in batch for entry in item.shared}
        while True:
            held = self.state.resources_by_identifier(self.server, keys)
            missing = [key for key in keys if key not in held]
            busy = {self._creating[key] for key in missing if key in self._creating}
            if not busy:
                break
            await asyncio.wait(busy)
        if missing:
            future = asyncio.get_running_loop().create_future()
            self._creating |= dict.fromkeys(missing, future)
        return missing

    # -- reading what the server holds ----------------------------------------------------------

    async def _read_current(self, batch: list[_Item], *, search_shared: bool = False) -> None:
        """Find each item's resources on the server; fill ``item.current``.

        By the ids the state holds (each checked to carry the identifier the state says), and by
        identifier where the state cannot vouch (no state, a push interrupted, ``verify``) or an
        id proved wrong. Only what was checked here is used to read references afterwards.

        Shared resources (``matching.py``) are looked up by every identifier the policy matches
        on where the state holds no id for them, and read by id where the clinic's record of
        them changed since the state last saw them; with ``match="mpi"`` the server's
        ``Patient/$match`` names the patient.
        """
        if self.match == "mpi":
            await self._match_patients(batch)
        reads: set[tuple[str, str]] = set()
        searches: dict[str, set[str]] = {}  # type -> identifier keys
        probes: dict[int, list[tuple[str, str]]] = {}  # items of which nothing is known
        for item in batch:
            item.current, item.error = {}, None
            item.shared_current, item.shared_send, item.shared_state = {}, {}, {}
            item.shared_missing, item.shared_literal, item.notes = set(), {}, []
            probe = not item.known and not self.verify
            self._want_shared(reads, searches, item, read_all=not probe, search=search_shared)
            if probe:
                # Nothing of it known: its Provenance, at an id derived from the encounter's
                # identifier and written in every transaction that writes any of it, tells by a
                # read (searches cost servers far more) whether any of it is on the server.
                # Only then are the server's ids of its shared resources needed (to compare
                # copies); a first write creates them by identifier, never by a stored id.
                probes[id(item)] = [
                    ("Provenance", identifier_key(e["resource"]))
                    for e in item.entries
                    if e["resource"]["resourceType"] == "Provenance"
                ]
                for _, key in probes[id(item)]:
                    reads.add(("Provenance", key.partition("/")[2]))
                continue
            for known in self._to_check(item):
                reads.add((known.resource_type, known.resource_id))
            if item.unsure or self.verify:
                self._want_own(searches, item)
        pool = await self._fetch(reads, searches)
        again: dict[str, set[str]] = {}
        for item in batch:
            if id(item) in probes and any(
                pool.by_id.get(("Provenance", key.partition("/")[2])) for _, key in probes[id(item)]
            ):
                # Some of it is there: look all of it up, the shared resources by identifier too.
                self._want_own(again, item)
                for entry in item.shared:
                    identifier = identifier_key(entry["resource"])
                    for key in item.shared_keys[identifier]:
                        self._want(again, entry["resource"]["resourceType"], key)
        for item in batch:
            for known in self._to_check(item):
                keys = item.shared_keys.get(known.identifier, [known.identifier])
                if (known.resource_type, known.resource_id) not in pool.read:
                    continue  # not read: not needed by this push
                found = pool.by_id.get((known.resource_type, known.resource_id))
                if found is None or not identifier_keys(found).intersection(keys):
                    # Gone, or the id holds another resource (a state that lies, or a server
                    # that answered for another request): forget the id, look up by identifier.
                    if found is not None:
                        logger.warning(
                            "%s/%s does not carry the identifier the state recorded; "
                            "looking it up by identifier",
                            known.resource_type,
                            known.resource_id,
                        )
                    for key in keys:
                        self._want(again, known.resource_type, key)
        if again:
            pool.merge(await self._fetch(set(), again))
        for item in batch:
            item.references.ids = {}
            wanted = [
                (identifier_key(e["resource"]), e["resource"]["resourceType"]) for e in item.entries
            ]
            wanted += [(k.identifier, k.resource_type) for k in item.known.values()]
            for identifier, resource_type in wanted:
                held = item.known.get(identifier)
                found = pool.by_id.get((held.resource_type, held.resource_id)) if held else None
                if found is not None and identifier in identifier_keys(found):
                    matches = [found]
                else:
                    matches = pool.matching(resource_type, identifier)
                if len(matches) > 1:
                    ids = ", ".join(f"{resource_type}/{m.get('id')}" for m in matches[:5])
                    item.error = (
                        f"{len(matches)} resources on the server carry the identifier "
                        f"{identifier.partition('|')[2]!r} of one ims-fhir resource ({ids}); "
                        "merge or delete the extra ones on the server"
                    )
                if matches:
                    current = _current(matches[0])
                    item.references.add_id(current.resource_type, current.resource_id, identifier)
                    item.current[identifier] = current
                elif identifier in pool.searched or identifier in item.known:
                    item.current.setdefault(identifier, None)
            for entry in item.shared:
                self._resolve_shared(item, entry, pool)

    def _resolve_shared(self, item: _Item, entry: JSON, pool: _Pool) -> None:
        """Which server resource is the item's shared resource ``entry``, if one was looked up."""
        resource_type = str(entry["resource"]["resourceType"])
        identifier = identifier_key(entry["resource"])
        keys = item.shared_keys[identifier]
        if self.match == "mpi" and resource_type == "Patient":
            matches = self._mpi[identifier]
            searched = True
        else:
            held = item.shared_known.get(identifier)
            found = pool.by_id.get((held.resource_type, held.resource_id)) if held else None
            unique = {
                (m["resourceType"], m["id"]): m
                for key in keys
                for m in pool.matching(resource_type, key)
            }
            if found is not None and identifier_keys(found).intersection(keys):
                # The one the state names first; any other carrying its identifiers (found by
                # a search, after a conflict) makes it ambiguous.
                unique = {(found["resourceType"], found["id"]): found} | unique
            matches = list(unique.values())
            searched = any(key in pool.searched for key in keys)
        noun = resource_type.lower()
        if len(matches) > 1:
            ids = ", ".join(f"{resource_type}/{m.get('id')}" for m in matches[:5])
            mpi = self.match == "mpi" and resource_type == "Patient"
            how = "are named by Patient/$match for" if mpi else "carry the identifiers of"
            item.error = (
                f"ambiguous {noun}: {len(matches)} {resource_type} resources on the server "
                f"{how} this encounter's {noun} ({ids}); nothing was written (merge them on the "
                "server, or give the record an identifier that tells them apart)"
            )
        elif matches:
            current = _current(matches[0])
            local_system = identifier.rpartition("|")[0]
            other = [
                f"{local_system}|{i.get('value')}"
                for i in matches[0].get("identifier") or []
                if isinstance(i, dict) and i.get("system") == local_system
            ]
            if other and identifier not in other:
                item.error = (
                    f"{current.resource_type}/{current.resource_id} is this clinic's {noun} "
                    f"{other[0].rpartition('|')[2]!r}, and this record's {noun} "
                    f"{identifier.rpartition('|')[2]!r} has its identifiers too: one person "
                    "twice in the clinic's records; nothing was written (merge them there)"
                )
                return
            item.references.add_id(current.resource_type, current.resource_id, identifier)
            item.shared_current[identifier] = current
        elif searched:
            item.shared_missing.add(identifier)
        if not matches and resource_type == "Patient" and not self.create_patients and searched:
            item.error = (
                f"no Patient on the server matches this encounter's patient "
                f"({', '.join(k.partition('|')[0] for k in keys)}); not created, as asked "
                "(register the patient there first, or allow creating patients)"
            )

    @staticmethod
    def _to_check(item: _Item) -> list[ResourceState]:
        """The resources the state holds ids for that this push must check on the server."""
        own = [k for k in item.known.values() if k.identifier in item.desired or not k.retired]
        return own + list(item.shared_known.values())

    @staticmethod
    def _want(searches: dict[str, set[str]], resource_type: str, identifier: str) -> None:
        searches.setdefault(resource_type, set()).add(identifier)

    def _want_own(self, searches: dict[str, set[str]], item: _Item) -> None:
        """Search for the item's own resources the state holds no id for."""
        for entry in item.entries:
            identifier = identifier_key(entry["resource"])
            if identifier not in item.known:
                self._want(searches, entry["resource"]["resourceType"], identifier)

    def _want_shared(
        self,
        reads: set[tuple[str, str]],
        searches: dict[str, set[str]],
        item: _Item,
        *,
        read_all: bool,
        search: bool = False,
    ) -> None:
        """Look up the item's shared resources this push must check.

        Those the state holds no id for, by every identifier the policy matches on; the others
        by id, when any of them is to be checked (its wanted content is not what the state last
        saw of it) or with ``read_all``: their ids are how the server's copies refer to each
        other, so a signature is read right only with all of them checked.
        """
        read_all = read_all or any(
            item.shared_known.get(key) is None
            or item.shared_known[key].signature != item.shared_desired[key]
            for key in item.shared_desired
        )
        for entry in item.shared:
            resource_type = str(entry["resource"]["resourceType"])
            identifier = identifier_key(entry["resource"])
            if self.match == "mpi" and resource_type == "Patient":
                continue  # named by $match
            held = item.shared_known.get(identifier)
            if (
                held is None
                or search
                # Changed in the clinic's record: what else carries its (maybe new) identifiers?
                or held.signature != item.shared_desired[identifier]
                # Never created: it must be on the server, and found there now.
                or (resource_type == "Patient" and not self.create_patients)
            ):
                for key in item.shared_keys[identifier]:
                    self._want(searches, resource_type, key)
            if held is not None and read_all:
                reads.add((held.resource_type, held.resource_id))

    async def _match_patients(self, batch: list[_Item]) -> None:
        """Ask the server's ``Patient/$match`` for each patient not asked yet in this push."""
        for item in batch:
            for entry in item.shared:
                resource = entry["resource"]
                identifier = identifier_key(resource)
                if resource["resourceType"] != "Patient" or identifier in self._mpi:
                    continue
                body = {
                    "resourceType": "Parameters",
                    "parameter": [
                        {"name": "resource", "resource": _without_meta(resource)},
                        # All candidates, graded: certain matches only would hide an ambiguity.
                        {"name": "onlyCertainMatches", "valueBoolean": False},
                        {"name": "count", "valueInteger": 10},
                    ],
                }
                try:
                    answer = await self.client.request_json(
                        "POST", "Patient/$match", json_body=body, retry_safe=True
                    )
                except StatusError as exc:
                    if exc.status_code >= 500 and exc.status_code != 501:
                        raise  # a server error, not a missing operation
                    raise UnsafeServerError(
                        f"{self.server}: Patient/$match failed ({exc}); the server has no master "
                        "patient index ims-fhir can use: match by identifier instead"
                    ) from exc
                try:
                    found = mpi_candidates(self.server, answer, self.match_threshold)
                    self._mpi[identifier] = found
                except ValueError as exc:
                    raise InvalidResponseError(str(exc)) from None

    async def _fetch(self, reads: set[tuple[str, str]], searches: dict[str, set[str]]) -> _Pool:
        """One batch of reads by id and searches by identifier; results matched by content."""
        pool = _Pool()
        pool.read |= reads
        searched: list[tuple[str, str]] = []
        paged = False
        requests: list[JSON] = [
            {"request": {"method": "GET", "url": f"{t}/{i}"}} for t, i in sorted(reads)
        ]
        for resource_type, keys in sorted(searches.items()):
            ordered = sorted(keys)
            for identifier in ordered:
                pool.searched.add(identifier)
            if resource_type == "Provenance":  # no identifier: its key is Type/id, a read
                requests += [{"request": {"method": "GET", "url": key}} for key in ordered]
                continue
            for start in range(0, len(ordered), _SEARCH_CHUNK):
                chunk = ordered[start : start + _SEARCH_CHUNK]
                tokens = ",".join(_token(key) for key in chunk)
                searched.append((resource_type, tokens))
                # Ask for more than the chunk: duplicates must show, not hide behind paging.
                url = f"{resource_type}?identifier={_quote(tokens)}&_count={2 * len(chunk) + 10}"
                requests.append({"request": {"method": "GET", "url": url}})
        if not requests:
            return pool
        answer = await self.client.request_json(
            "POST",
            "",
            json_body={"resourceType": "Bundle", "type": "batch", "entry": requests},
            retry_safe=True,
            # Fresh results: HAPI otherwise answers a repeated search from its cache, which
            # may predate the resources this very push created.
            headers={"Cache-Control": "no-cache"},
        )
        for entry in _answer_entries(self.server, answer, "batch", len(requests)):
            status = _status(entry)
            resource = entry.get("resource")
            if status in {404, 410} or (200 <= status < 300 and resource is None):
                continue
            if not 200 <= status < 300 or not isinstance(resource, dict):
                raise InvalidResponseError(
                    f"{self.server}: a read in a batch failed with status {status}"
                )
            if resource.get("resourceType") == "Bundle":
                if any(
                    isinstance(link, dict) and link.get("relation") == "next"
                    for link in resource.get("link") or []
                ):
                    paged = True  # the server pages below _count (R4 allows it)
                for found in resource.get("entry") or []:
                    if isinstance(found, dict) and isinstance(found.get("resource"), dict):
                        pool.add(found["resource"])
            else:
                pool.add(resource)
        if paged:
            # Search again, one search at a time, following every page (bounded and checked
            # by the client: same host, no loops).
            for resource_type, tokens in searched:
                params = {"identifier": tokens, "_count": "100"}
                async for found in self.client.search(resource_type, params, raw=True):
                    pool.add(found)
        return pool

    # -- planning ------------------------------------------------------------------------------

    def _plan(self, item: _Item) -> None:
        """Decide, from the server's copies, what to send; raise _Conflict to send nothing."""
        item.send, item.keep, item.retired_keep = [], [], []
        item.sent_signatures, item.retiring = {}, set()
        overwrite = self.on_conflict == "overwrite"
        literal_refs: dict[str, str] = {}  # fullUrl -> Type/id of what is not sent
        self._plan_shared(item, literal_refs)
        updates: list[tuple[JSON, _Current]] = []
        creates: list[JSON] = []
        conflicts: list[str] = []
        for entry in item.entries:
            identifier = identifier_key(entry["resource"])
            current = item.current.get(identifier)
            wanted = item.desired[identifier]
            if current is None:
                creates.append(entry)
                continue
            found = signature(current.content, item.references)
            if found == wanted:
                item.keep.append(self._state_of(item, identifier, current, found))
                literal_refs[entry["fullUrl"]] = f"{current.resource_type}/{current.resource_id}"
            elif self._ours(item, identifier, current, found) or overwrite:
                updates.append((entry, current))
            else:
                conflicts.append(self._conflict_message(current))
        retirements: list[tuple[str, JSON, _Current]] = []
        for identifier, known in item.known.items():
            if identifier in item.desired or known.retired:
                continue
            current = item.current.get(identifier)
            if current is None:  # gone from the server: nothing to retire, nothing to check
                item.retired_keep.append(replace(known, retired=True))
                continue
            retired = _retirement(current.content)
            found = signature(current.content, item.references)
            if found == signature(retired, item.references):
                item.retired_keep.append(
                    self._state_of(item, identifier, current, found, retired=True)
                )
            elif self._ours(item, identifier, current, found) or overwrite:
                retirements.append((identifier, retired, current))
            else:
                conflicts.append(self._conflict_message(current))
        if conflicts:
            raise _Conflict(
                "; ".join(conflicts)
                + " (resolve it on the server, or push again with --on-conflict overwrite to "
                "replace what is there)"
            )
        if item.intent == "created" and (updates or retirements):
            item.intent = "updated"  # no state for it, but it was on the server (a lost state)
        for entry in creates:
            item.send.append(self._create_entry(entry, literal_refs))
        for entry, current in updates:
            item.send.append(self._update_entry(entry, current, literal_refs))
        for identifier, retired, current in retirements:
            item.retiring.add(identifier)
            item.send.append(self._retire_entry(retired, current))
        for entry in item.send:
            resource = entry["resource"]
            identifier = identifier_key(resource)
            # What is sent of the record's own resources is what it wants (making references
            # literal does not change a signature); a retirement is signed afresh.
            sig = (
                signature(resource, item.references)
                if identifier in item.retiring
                else item.desired[identifier]
            )
            item.sent_signatures[identifier] = sig
            _mark(resource, sig)

    def _plan_shared(self, item: _Item, literal_refs: dict[str, str]) -> None:
        """Decide what to send of the shared resources (``matching.py``).

        One found on the server is referred to by id. One ims-fhir owns follows the clinic's
        record (an ``If-Match`` update) when this encounter is no older than the one it was last
        written from; one it does not own is never written, and a difference in its demographics
        becomes a note. One looked up and not found is created by a conditional create on its
        strong identifiers where it has any: the same query from every clinic, so a server that
        keeps one resource per match URL (HAPI) never makes two for clinics racing.
        """
        latest = dt.datetime.now(dt.UTC) + _CLOCK_SKEW
        for entry in item.shared:
            full = entry["fullUrl"]
            identifier = identifier_key(entry["resource"])
            current = item.shared_current.get(identifier)
            if current is None:
                if identifier in item.shared_missing:
                    keys = item.shared_keys[identifier]
                    query = match_query(keys[:-1] or keys)
                    item.shared_send[full] = entry | {
                        "request": entry["request"] | {"ifNoneExist": query}
                    }
                continue  # else not read: the conditional create finds it (or creates it)
            held = item.shared_known.get(identifier)
            wanted = item.shared_desired[identifier]
            found = signature(current.content, item.references)
            owned = self._owns(identifier, current, found, held)
            state = ResourceState(
                identifier,
                current.resource_type,
                current.resource_id,
                current.version,
                signature=found if owned else wanted,
                owned=owned,
            )
            item.shared_state[identifier] = state
            where = f"{current.resource_type}/{current.resource_id}"
            item.shared_send[full] = None  # checked just now: referred to by id
            literal_refs[full] = item.shared_literal[full] = where
            if found == wanted:
                continue
            if not owned:
                differing = demographic_differences(entry["resource"], current.content)
                if differing:
                    item.notes.append(
                        f"{where} differs from the clinic's record in {', '.join(differing)}; "
                        "not changed, as ims-fhir did not create it for this clinic (raise it "
                        "with the server's owner)"
                    )
                continue
            if item.record.retracted:
                continue  # a withdrawn record changes no one's details
            if item.record.start > latest:
                item.notes.append(
                    f"{where} not updated from this encounter: it is dated in the future"
                )
                continue
            written = snapshot_of(current.content)
            if written is not None and item.record.start < written <= latest:
                # A newer encounter wrote it: an older one never reverts it. (A snapshot in the
                # future is no encounter's: it freezes nothing.)
                item.notes.append(f"{where} not updated from this encounter: a newer one wrote it")
                continue
            resource = dict(entry["resource"]) | {"id": current.resource_id}
            request: JSON = {"method": "PUT", "url": where}
            if current.version:
                request["ifMatch"] = f'W/"{current.version}"'
            item.shared_send[full] = {"fullUrl": full, "resource": resource, "request": request}
            item.shared_state[identifier] = replace(state, signature=wanted)

    @staticmethod
    def _owns(identifier: str, current: _Current, found: str, held: ResourceState | None) -> bool:
        """Did ims-fhir create this shared resource for this clinic, unchanged since it wrote it?

        Created for this clinic: the clinic-local identifier is its first (a resource the
        region registered, or another clinic created, has another first). Unchanged: its content
        has the signature it is marked with, or the one the state saw ims-fhir write.
        """
        if identifier_key(current.content) != identifier:
            return False
        if found == _marked(current.content):
            return True
        return (
            held is not None
            and held.owned
            and held.resource_id == current.resource_id
            and held.signature == found
        )

    def _ours(self, item: _Item, identifier: str, current: _Current, found: str) -> bool:
        """Is the server's copy one that ims-fhir wrote (or was writing)?"""
        known = item.known.get(identifier)
        if known is not None:
            if found == known.signature:
                return True
            if (
                known.version is not None
                and current.version == known.version
                and current.resource_id == known.resource_id
            ):
                return True
        if found in item.pending.get(identifier, ()):
            return True
        # Content the server holds exactly as ims-fhir wrote it carries that signature in its
        # meta; an edit by anyone else changes the content, not the mark. That recognises
        # ims-fhir's writes the state does not know of (a new or lost state file, one restored
        # from a backup, another machine's push), but not a copy put back to one of ims-fhir's
        # earlier writes, mark and all: the state keeps the signatures later writes replaced.
        if found != _marked(current.content):
            return False
        return known is None or found not in self.state.superseded(self.server, identifier)

    @staticmethod
    def _conflict_message(current: _Current) -> str:
        return (
            f"{current.resource_type}/{current.resource_id} was changed on the server by "
            f"someone else (version {current.version or 'unknown'}); not overwritten"
        )

    @staticmethod
    def _state_of(
        item: _Item, identifier: str, current: _Current, found: str, *, retired: bool = False
    ) -> ResourceState:
        return ResourceState(
            identifier=identifier,
            resource_type=current.resource_type,
            resource_id=current.resource_id,
            version=current.version,
            record_key=item.key,
            retired=retired,
            signature=found,
        )

    @staticmethod
    def _create_entry(entry: JSON, literal_refs: dict[str, str]) -> JSON:
        resource = _rewrite(entry["resource"], literal_refs)
        request = entry["request"]
        if resource.get("identifier"):
            # A conditional create: never replaces what appeared since it was read.
            system, _, value = identifier_key(resource).rpartition("|")
            request = {
                "method": "POST",
                "url": resource["resourceType"],
                "ifNoneExist": identifier_query(system, value),
            }
        return {"fullUrl": entry["fullUrl"], "resource": resource, "request": request}

    @staticmethod
    def _update_entry(entry: JSON, current: _Current, literal_refs: dict[str, str]) -> JSON:
        resource = _rewrite(entry["resource"], literal_refs)
        resource["id"] = current.resource_id
        request: JSON = {"method": "PUT", "url": f"{current.resource_type}/{current.resource_id}"}
        if current.version:
            request["ifMatch"] = f'W/"{current.version}"'
        return {"fullUrl": entry["fullUrl"], "resource": resource, "request": request}

    def _retire_entry(self, retired: JSON, current: _Current) -> JSON:
        request: JSON = {"method": "PUT", "url": f"{current.resource_type}/{current.resource_id}"}
        if current.version:
            request["ifMatch"] = f'W/"{current.version}"'
        full = f"{self.server}/{current.resource_type}/{current.resource_id}"
        return {"fullUrl": full, "resource": retired, "request": request}

    # -- writing -------------------------------------------------------------------------------

    async def _write(self, items: list[_Item], *, recheck: bool = True) -> list[PushResult]:
        entries: list[JSON] = []
        owners: list[_Item | None] = []
        shared_from: dict[int, _Item] = {}  # index of a shared entry -> the item it came from
        shared_at: dict[str, int] = {}  # fullUrl of a shared entry -> its index
        for item in items:
            updates = [e for e in item.shared_send.values() if e is not None]
            if not item.send and not updates:
                continue
            for entry in item.shared:
                full = entry["fullUrl"]
                if full in item.shared_send:
                    chosen = item.shared_send[full]
                    if chosen is None:
                        continue  # referred to by id
                else:
                    chosen = entry
                # What the item refers to by id, this resource does too (a patient's clinic).
                chosen = chosen | {"resource": _rewrite(chosen["resource"], item.shared_literal)}
                at = shared_at.get(full)
                if at is None:
                    shared_at[full] = len(entries)
                    shared_from[len(entries)] = item
                    entries.append(chosen)
                    owners.append(None)
                elif (chosen["request"]["method"], item.record.start) > (
                    entries[at]["request"]["method"],
                    shared_from[at].record.start,
                ):
                    # Two encounters of one batch share it: an update before a create, and of
                    # two alike the newer encounter's is written.
                    entries[at], shared_from[at] = chosen, item
            for entry in item.send:
                entries.append(entry)
                owners.append(item)
        self.state.mark_pending(
            self.server,
            [(i.key, i.content_hash) for i in items],
            [(ident, i.key, sig) for i in items for ident, sig in i.sent_signatures.items()],
        )
        answers: list[_Answer] = []
        if entries:
            bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
            response = await self.client.request_json(
                "POST", "", json_body=bundle, retry_safe=entries_repeatable(bundle)
            )
            answers = self._check_answer(response, entries)
        written: list[ResourceState] = []
        results: list[PushResult] = []
        unsure: list[_Item] = []
        shared_written: set[str] = set()
        for index, (entry, owner, answer) in enumerate(zip(entries, owners, answers, strict=True)):
            identifier = identifier_key(entry["resource"])
            if owner is None:
                shared_written.add(identifier)
                written.append(self._shared_written(shared_from[index], identifier, entry, answer))
                continue
            if entry["request"]["method"] == "POST" and answer.status != 201:
                # A conditional create found the resource already there: not written by us now.
                unsure.append(owner)
                continue
            written.append(
                ResourceState(
                    identifier=identifier,
                    resource_type=answer.resource_type,
                    resource_id=answer.resource_id,
                    version=answer.version,
                    record_key=owner.key,
                    retired=identifier in owner.retiring,
                    signature=owner.sent_signatures[identifier],
                )
            )
        done = [i for i in items if i not in unsure]
        for item in done:
            written += item.keep + item.retired_keep
            # Shared resources read and not sent: what was learnt of them (owner, content).
            written += [s for k, s in item.shared_state.items() if k not in shared_written]
        self.state.commit_written(
            self.server, [(i.key, i.content_hash, i.record_digest) for i in done], written
        )
        for item in items:
            if item in unsure:
                why = "a create found the resource on the server already"
                if not recheck:
                    results.append(PushResult(item.record.id, "failed", message=why))
                else:
                    results.append(await self._recheck(item, why))
                continue
            sent = [e for e in item.send if identifier_key(e["resource"]) not in item.retiring]
            # Nothing to send on a first look: the server held all of it already. On a second
            # look (after a lost answer) the first attempt is what wrote it.
            action = "unchanged" if not item.send and recheck else item.intent
            results.append(
                PushResult(
                    item.record.id,
                    action,
                    written=len(sent),
                    retired=len(item.retiring),
                    notes=tuple(item.notes),
                )
            )
        return results

    @staticmethod
    def _shared_written(
        item: _Item, identifier: str, entry: JSON, answer: _Answer
    ) -> ResourceState:
        """What the state is to hold of a shared resource after the transaction that sent it."""
        if entry["request"]["method"] == "PUT" or answer.status == 201:
            # Written by ims-fhir for this clinic now: an update, or a create.
            return ResourceState(
                identifier,
                answer.resource_type,
                answer.resource_id,
                answer.version,
                signature=item.shared_desired[identifier],
                owned=True,
            )
        # The conditional create found it: what was learnt by reading it, else nothing more
        # than where it is (its owner and content are checked when the clinic's record of it
        # changes).
        base = item.shared_state.get(identifier) or item.shared_known.get(identifier)
        if base is not None and base.resource_id == answer.resource_id:
            return replace(base, resource_type=answer.resource_type, version=answer.version)
        return ResourceState(identifier, answer.resource_type, answer.resource_id, answer.version)

    def _check_answer(self, response: JSON, entries: list[JSON]) -> list[_Answer]:
        """Check a transaction-response entry by entry; raise when it cannot be the answer."""
        where = self.server
        got = _answer_entries(where, response, "transaction", len(entries))
        answers = []
        failed = 0
        for sent, entry in zip(entries, got, strict=True):
            status = _status(entry)
            if not 200 <= status < 300:
                failed += 1
                continue
            answers.append(_answer(where, sent, entry, status))
        if failed:
            raise UnsafeServerError(
                f"{where}: the server answered a transaction with success while {failed} of its "
                f"{len(entries)} entries failed: its transactions are not atomic, so ims-fhir "
                "cannot write an encounter whole there; the push stopped (the next push checks "
                "what landed)"
            )
        return answers


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    resource_type: str
    resource_id: str
    version: str | None


def _answer_entries(where: str, answer: JSON, kind: str, count: int) -> list[JSON]:
    """The entries of a batch- or transaction-response: one object per request, or raise."""
    if answer.get("resourceType") != "Bundle" or answer.get("type") != f"{kind}-response":
        raise InvalidResponseError(f"{where}: the answer to a {kind} is not a {kind}-response")
    entries = answer.get("entry")
    if not isinstance(entries, list) or len(entries) != count:
        raise InvalidResponseError(
            f"{where}: a {kind} of {count} entries was answered with "
            f"{len(entries) if isinstance(entries, list) else 'no'} entries; its outcome is unknown"
        )
    if not all(isinstance(entry, dict) for entry in entries):
        raise InvalidResponseError(f"{where}: a {kind}-response entry is not an object")
    return entries


def _status(entry: JSON) -> int:
    response = entry.get("response")
    text = str(response.get("status", "")) if isinstance(response, dict) else ""
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return 0


def _answer(where: str, sent: JSON, entry: JSON, status: int) -> _Answer:
    """Read one entry's answer, checking it answers what was sent."""
    response = entry["response"]
    resource_type = str(sent["resource"]["resourceType"])
    location = response.get("location")
    parts = str(location or "").rstrip("/").split("/")
    version = None
    if "_history" in parts:
        at = parts.index("_history")
        version = parts[at + 1] if at + 1 < len(parts) else None
        parts = parts[:at]
    if len(parts) < 2 or parts[-2] != resource_type or not parts[-1]:
        raise InvalidResponseError(
            f"{where}: the answer to a {resource_type} entry has location "
            f"{literal(str(location)) if location else 'none'}; its outcome is unknown"
        )
    resource_id = parts[-1]
    url = str(sent["request"]["url"])
    if "?" not in url and "/" in url and url.split("/", 1)[1] != resource_id:
        raise InvalidResponseError(
            f"{where}: the answer to {url} names {resource_type}/{resource_id}; "
            "its outcome is unknown"
        )
    returned = entry.get("resource")
    if isinstance(returned, dict):
        if identifier_key(sent["resource"]) not in identifier_keys(returned | {"id": resource_id}):
            raise InvalidResponseError(
                f"{where}: the answer to a {resource_type} entry returned another resource"
            )
        version = version or (returned.get("meta") or {}).get("versionId")
    etag = response.get("etag")
    if isinstance(etag, str) and etag:
        version = etag.removeprefix("W/").strip('"')
    return _Answer(status, resource_type, resource_id, str(version) if version else None)


class _Pool:
    """Resources read from the server, indexed by ``(type, id)`` and by identifier."""

    def __init__(self) -> None:
        self.by_id: dict[tuple[str, str], JSON] = {}
        self.by_key: dict[str, dict[tuple[str, str], JSON]] = {}
        self.searched: set[str] = set()
        self.read: set[tuple[str, str]] = set()  # (type, id) asked for by id

    def add(self, resource: JSON) -> None:
        resource_type, resource_id = resource.get("resourceType"), resource.get("id")
        if not isinstance(resource_type, str) or not isinstance(resource_id, str):
            return
        self.by_id[(resource_type, resource_id)] = resource
        for key in identifier_keys(resource):
            self.by_key.setdefault(key, {})[(resource_type, resource_id)] = resource

    def merge(self, other: _Pool) -> None:
        for resource in other.by_id.values():
            self.add(resource)
        self.searched |= other.searched
        self.read |= other.read

    def matching(self, resource_type: str, key: str) -> list[JSON]:
        return [r for (t, _), r in self.by_key.get(key, {}).items() if t == resource_type]


def _mark(resource: JSON, sig: str) -> None:
    """Put ``sig`` in the signature extension of ``resource``'s meta (the only one there)."""
    meta = resource.get("meta")
    meta = dict(meta) if isinstance(meta, dict) else {}  # a new dict: the mapped one stays as is
    others = [e for e in _meta_extensions(meta) if not _is_signature(e)]
    meta["extension"] = [*others, {"url": SYNC_SIGNATURE_URL, "valueString": sig}]
    resource["meta"] = meta


def _marked(resource: JSON) -> str | None:
    """The signature a server copy is marked with; None without exactly one."""
    extensions = _meta_extensions(resource.get("meta"))
    found = [e.get("valueString") for e in extensions if _is_signature(e)]
    return found[0] if len(found) == 1 and isinstance(found[0], str) and found[0] else None


def _meta_extensions(meta: Any) -> list[Any]:
    """The extensions of a ``meta`` as a server sent it (none where either is malformed)."""
    extensions = meta.get("extension") if isinstance(meta, dict) else None
    return extensions if isinstance(extensions, list) else []


def _is_signature(extension: Any) -> bool:
    return isinstance(extension, dict) and extension.get("url") == SYNC_SIGNATURE_URL


def _without_meta(resource: JSON) -> JSON:
    return {key: value for key, value in resource.items() if key != "meta"}


def _current(resource: JSON) -> _Current:
    meta = resource.get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    return _Current(
        resource_type=str(resource["resourceType"]),
        resource_id=str(resource["id"]),
        version=str(version) if version else None,
        content=resource,
    )


def _quote(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="=|,$:/")


def _rewrite(value: Any, literal_refs: dict[str, str]) -> Any:
    """``value`` with references to entries not sent made literal (``Type/id``).

    A new top-level dict (callers set its ``id`` and replace its ``meta`` whole); below it, only
    what holds such a reference is copied, the rest is shared with ``value``, which nothing
    changes in place.
    """
    out = _literal(value, literal_refs) if literal_refs else value
    return dict(out) if out is value and isinstance(value, dict) else out


def _literal(value: Any, literal_refs: dict[str, str]) -> Any:
    kind = type(value)
    if kind is dict:
        return _literal_object(value, literal_refs)
    if kind is list:
        return _literal_array(value, literal_refs)
    return value


def _literal_object(value: JSON, literal_refs: dict[str, str]) -> JSON:
    changed: JSON | None = None  # a copy, made at the first element that changes
    new: Any
    for key, item in value.items():
        kind = type(item)
        if kind is str:
            if key != "reference":
                continue
            new = literal_refs.get(item, item)
        elif kind is dict:
            new = _literal_object(item, literal_refs)
        elif kind is list:
            new = _literal_array(item, literal_refs)
        else:
            continue
        if new is not item:
            if changed is None:
                changed = dict(value)
            changed[key] = new
    return value if changed is None else changed


def _literal_array(value: list[Any], literal_refs: dict[str, str]) -> list[Any]:
    items: list[Any] | None = None  # a copy, made at the first element that changes
    new: Any
    for n, item in enumerate(value):
        kind = type(item)
        if kind is dict:
            new = _literal_object(item, literal_refs)
        elif kind is list:
            new = _literal_array(item, literal_refs)
        else:
            continue
        if new is not item:
            if items is None:
                items = list(value)
            items[n] = new
    return value if items is None else items


def _retirement(current: JSON) -> JSON:
    """The server's copy marked entered-in-error (what a removed or retracted part becomes)."""
    resource = copy.deepcopy(current)
    resource_type = resource["resourceType"]
    if resource_type == "Condition":
        resource.pop("clinicalStatus", None)  # con-5
        coding = terminology().convention("condition-verification-entered-in-error")
        resource["verificationStatus"] = {"coding": [coding.as_fhir()]}
    else:
        resource[_STATUS_PATH.get(resource_type, "status")] = "entered-in-error"
    meta = resource.get("meta")
    if isinstance(meta, dict):
        meta.pop("versionId", None)
        meta.pop("lastUpdated", None)
    return resource


def push(
    records: Iterable[Encounter | ReadRecord],
    base_url: str,
    state: StateStore,
    *,
    client_options: ClientOptions | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    concurrency: int = DEFAULT_CONCURRENCY,
    on_conflict: Literal["report", "overwrite"] = "report",
    dry_run: bool = False,
    verify: bool = False,
    match: MatchPolicy = "identifier",
    create_patients: bool = True,
    match_threshold: float = DEFAULT_MATCH_THRESHOLD,
) -> list[PushResult]:
    """Push ``records`` to the server at ``base_url`` and return every result (blocking).

    ``client_options`` go to :class:`~ims_fhir.AsyncFhirClient` (auth, timeout, ...), the
    others to :class:`Pusher`. Callable from plain code and from inside a running event loop
    (it then runs in a worker thread and blocks the caller until done: in async code, iterate
    ``Pusher.push`` instead, which also yields results as they come).
    """
    refuse_own_http_client(client_options, "push")

    async def run() -> list[PushResult]:
        async with AsyncFhirClient(base_url, **(client_options or {})) as client:
            pusher = Pusher(
                client,
                state,
                batch_size=batch_size,
                concurrency=concurrency,
                on_conflict=on_conflict,
                dry_run=dry_run,
                verify=verify,
                match=match,
                create_patients=create_patients,
                match_threshold=match_threshold,
            )
            return [result async for result in pusher.push(records)]

    return run_blocking(run)


def refuse_own_http_client(client_options: ClientOptions | None, name: str) -> None:
    """The blocking calls run their own event loop; an ``httpx.AsyncClient`` belongs to one."""
    if client_options and client_options.get("http_client") is not None:
        raise ValueError(
            f"{name}() runs its own event loop, and an httpx.AsyncClient works only in the loop "
            "it was made in: pass http_client to AsyncFhirClient and use the async API "
            "(Pusher.push, pull) instead"
        )


def run_blocking(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run the coroutine ``make()`` to completion, inside a running event loop or not.

    ``asyncio.run`` refuses to run inside a loop (Jupyter, an async web framework); there the
    coroutine gets a loop of its own in a worker thread.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ims-fhir") as pool:
        return pool.submit(lambda: asyncio.run(make())).result()
