"""The sync engine: push IMS encounters to a FHIR server, safely and repeatably.

For each encounter (see ``README.md``, "Guarantees"):

- **Atomic.** Its resources are written in one transaction of conditional requests (several
  encounters per transaction with ``batch_size``), so a server never holds half an encounter.
- **Incremental.** The state store (:class:`~ims_fhir.StateStore`) keeps each encounter's content
  hash and the server id and version of each resource written. Unchanged encounters cost no
  request at all; a changed one sends only its own transaction.
- **Changes on the clinic side.** A finding, pain score or needled site gone from the record makes
  its resource ``entered-in-error``; a retracted record makes all of its resources so.
- **Conflicts.** Resources written before are updated with ``If-Match`` on the version last
  written; if someone else changed one since, the encounter is reported as a conflict and not
  overwritten, unless ``on_conflict="overwrite"``.
- **Resumable.** A write is marked pending in the state before it is sent and recorded after it
  succeeds; every resource carries the content hash as a ``meta.tag``. A re-run after a crash at
  any point recognises its own earlier write by that tag and finishes without duplicates.

Shared resources (the clinic, patients, practitioners) are created by conditional creates in the
transaction of the first encounter that needs them. Concurrent transactions that conditionally
create the same resource race (the server refuses all but one), so a transaction that would
create one claims it first; a later one that needs it waits for that transaction to finish.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from ._async_client import AsyncFhirClient
from ._exceptions import ConflictError, FhirError, InvalidResponseError, StatusError
from ._http import Outcome
from ._record import Encounter
from ._state import ResourceState, StateStore
from ._terminology import CANONICAL, terminology
from ._to_fhir import _bundle

__all__ = ["SYNC_TAG_SYSTEM", "Action", "PushResult", "PushSummary", "Pusher", "push"]

logger = logging.getLogger("ims_fhir.sync")

SYNC_TAG_SYSTEM = f"{CANONICAL}/CodeSystem/ims-sync-hash"
"""``meta.tag`` system of the content hash each pushed resource carries."""

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


@dataclass(frozen=True, slots=True)
class PushResult:
    """What happened to one encounter."""

    record_id: str
    action: Action
    written: int = 0
    retired: int = 0
    message: str | None = None


@dataclass(slots=True)
class PushSummary:
    """Counts of a push: one per action, plus resources written and requests sent."""

    counts: dict[str, int] = field(default_factory=dict)
    resources_written: int = 0
    resources_retired: int = 0

    def add(self, result: PushResult) -> None:
        """Count one result."""
        self.counts[result.action] = self.counts.get(result.action, 0) + 1
        self.resources_written += result.written
        self.resources_retired += result.retired

    @property
    def ok(self) -> bool:
        """True when no encounter failed or conflicted."""
        return not (self.counts.get("failed") or self.counts.get("conflict"))


@dataclass(slots=True)
class _Item:
    """One encounter prepared for a push."""

    record: Encounter
    key: str
    content_hash: str
    entries: list[JSON]  # its own entries (not the shared Patient/Practitioner/Organization)
    shared: list[JSON]
    known: dict[str, ResourceState] = field(default_factory=dict)
    previous_hash: str | None = None
    pending_hash: str | None = None
    retire: list[JSON] = field(default_factory=list)
    previous: dict[str, str | None] = field(default_factory=dict)  # identifier -> version


def _identifier(resource: JSON) -> str:
    first = resource["identifier"][0] if resource.get("identifier") else None
    if first is None:  # Provenance: R4 gives it no identifier; its id is deterministic
        return f"{resource['resourceType']}/{resource['id']}"
    return f"{first['system']}|{first['value']}"


def _entry_key(entry: JSON) -> str:
    return _identifier(entry["resource"])


def content_hash(bundle: JSON) -> str:
    """The hash of an encounter's mapped Bundle (so a mapping change counts as a change)."""
    text = json.dumps(bundle, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


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
    ) -> None:
        """Create the pusher."""
        self.client = client
        self.state = state
        self.server = str(client.base_url).rstrip("/")
        self.batch_size = max(1, batch_size)
        self.concurrency = max(1, concurrency)
        self.on_conflict = on_conflict
        self.dry_run = dry_run
        # Shared resources being created, by key: done when the transaction creating them is.
        self._creating: dict[str, asyncio.Future[None]] = {}

    # -- public --------------------------------------------------------------------------------

    async def push(self, records: Iterable[Encounter]) -> AsyncIterator[PushResult]:
        """Push ``records`` (read lazily); yield one result per encounter as each completes."""
        queue: asyncio.Queue[list[_Item] | None] = asyncio.Queue(maxsize=self.concurrency * 2)
        results: asyncio.Queue[PushResult | BaseException | None] = asyncio.Queue()

        async def produce() -> None:
            try:
                batch: list[_Item] = []
                for record in records:
                    item = self._prepare(record)
                    if item is None:
                        await results.put(PushResult(record.id, "unchanged"))
                        continue
                    batch.append(item)
                    if len(batch) >= self.batch_size:
                        await queue.put(batch)
                        batch = []
                if batch:
                    await queue.put(batch)
            finally:
                for _ in range(self.concurrency):
                    await queue.put(None)

        async def work() -> None:
            while (batch := await queue.get()) is not None:
                try:
                    for result in await self._push_batch(batch):
                        await results.put(result)
                except Exception as exc:  # noqa: BLE001 - reported per encounter below
                    for item in batch:
                        await results.put(PushResult(item.record.id, "failed", message=str(exc)))

        async def run() -> None:
            try:
                await asyncio.gather(produce(), *(work() for _ in range(self.concurrency)))
            except BaseException as exc:  # the producer failed (e.g. reading input)
                await results.put(exc)
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

    # -- preparing -----------------------------------------------------------------------------

    def _prepare(self, record: Encounter) -> _Item | None:
        """Map one encounter and compare it with the state; None when nothing is to be done."""
        bundle = _bundle(record)
        digest = content_hash(bundle)
        entries = bundle["entry"]
        encounter = next(e for e in entries if e["resource"]["resourceType"] == "Encounter")
        key = _entry_key(encounter)
        known_record = self.state.record(self.server, key)
        if (
            known_record is not None
            and known_record.content_hash == digest
            and known_record.pending_hash is None
        ):
            return None
        own = [e for e in entries if e["request"]["method"] != "POST"]
        shared = [e for e in entries if e["request"]["method"] == "POST"]
        for entry in own:
            meta = entry["resource"].setdefault("meta", {})
            meta["tag"] = [{"system": SYNC_TAG_SYSTEM, "code": digest}]
        return _Item(
            record=record,
            key=key,
            content_hash=digest,
            entries=own,
            shared=shared,
            known=self.state.resources(self.server, key),
            previous_hash=known_record.content_hash if known_record else None,
            pending_hash=known_record.pending_hash if known_record else None,
        )

    # -- pushing -------------------------------------------------------------------------------

    async def _push_batch(self, batch: list[_Item]) -> list[PushResult]:
        if self.dry_run:
            return [self._dry(item) for item in batch]
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
        for item in batch:
            conflict = await self._check_versions(item)
            if conflict is not None:
                results.append(PushResult(item.record.id, "conflict", message=conflict))
            else:
                ready.append(item)
        if not ready:
            return results
        try:
            results += await self._write(ready)
        except FhirError as exc:
            if len(ready) == 1:
                results.append(await self._recover(ready[0], exc))
            else:  # isolate the encounter that failed the transaction
                for item in ready:
                    try:
                        results += await self._write([item])
                    except FhirError as single:
                        results.append(await self._recover(item, single))
        return results

    async def _recover(self, item: _Item, exc: FhirError) -> PushResult:
        """Handle a failed write; a version conflict may be our own write whose answer was lost.

        The client retries a transaction whose response never came; if the first attempt had
        landed, the retry's If-Match is stale. The resources then carry this write's content
        hash, so checking again tells our write from someone else's.
        """
        if not isinstance(exc, ConflictError):
            return self._failure(item, exc)
        item.pending_hash = item.content_hash
        item.retire = []
        conflict = await self._check_versions(item)
        if conflict is not None:
            return PushResult(item.record.id, "conflict", message=conflict)
        try:
            (result,) = await self._write([item])
        except FhirError as again:
            return self._failure(item, again)
        return result

    def _dry(self, item: _Item) -> PushResult:
        action: Action = "would-update" if item.previous_hash or item.known else "would-create"
        return PushResult(item.record.id, action, written=len(item.entries))

    def _failure(self, item: _Item, exc: FhirError) -> PushResult:
        if isinstance(exc, StatusError) and exc.status_code < 500:
            # Refused outright: nothing was written. After a timeout or a 5xx the write may
            # have happened, so it stays pending and the next run recognises it.
            self.state.clear_pending(self.server, [item.key])
        if isinstance(exc, ConflictError):
            return PushResult(item.record.id, "conflict", message=str(exc))
        return PushResult(item.record.id, "failed", message=str(exc))

    async def _claim_shared(self, batch: list[_Item]) -> list[str]:
        """Claim the shared resources this batch's transaction will create; return their keys.

        Waits first for the transactions already creating any of them, then claims what is still
        unknown (no await between the check and the claim, so claims never overlap). Waiting
        never holds a claim, so no two batches wait on each other. If the creating transaction
        failed, the resource is still unknown and this batch claims it in turn.
        """
        keys = {_entry_key(entry) for item in batch for entry in item.shared}
        while True:
            missing = [key for key in keys if self.state.resource(self.server, key) is None]
            busy = {self._creating[key] for key in missing if key in self._creating}
            if not busy:
                break
            await asyncio.wait(busy)
        if missing:
            future = asyncio.get_running_loop().create_future()
            self._creating |= dict.fromkeys(missing, future)
        return missing

    async def _check_versions(self, item: _Item) -> str | None:
        """Compare the server's versions with the state's; plan retirements. None if clear."""
        wanted = {_entry_key(e) for e in item.entries}
        live = {k: v for k, v in item.known.items() if not v.retired or k in wanted}
        if not live:
            return None
        reads = [
            {"request": {"method": "GET", "url": f"{r.resource_type}/{r.resource_id}"}}
            for r in live.values()
        ]
        outcomes = await self.client.batch(
            {"resourceType": "Bundle", "type": "batch", "entry": reads}
        )
        current: dict[str, JSON] = {}
        for (identifier, known), outcome in zip(live.items(), outcomes, strict=True):
            if outcome.resource is None:
                if outcome.status in {404, 410}:
                    continue  # deleted on the server: written again below
                return f"{known.resource_type}/{known.resource_id}: read failed ({outcome.status})"
            resource = json.loads(outcome.resource.model_dump_json())
            version = (resource.get("meta") or {}).get("versionId")
            tags = {t.get("code") for t in (resource.get("meta") or {}).get("tag") or []}
            ours = version == known.version or (
                item.pending_hash is not None and item.pending_hash in tags
            )
            if not ours and self.on_conflict != "overwrite":
                return (
                    f"{known.resource_type}/{known.resource_id} was changed on the server "
                    f"(version {version}, last written {known.version}); not overwritten"
                )
            current[identifier] = resource
        overwrite = self.on_conflict == "overwrite"
        # Update in place what exists: PUT Type/id with If-Match on the server's version.
        for entry in item.entries:
            identifier = _entry_key(entry)
            if identifier in current:
                item.previous[identifier] = _to_versioned_put(entry, current[identifier], overwrite)
        for identifier, known in live.items():
            if identifier not in wanted and identifier in current and not known.retired:
                entry = _retirement(current[identifier], overwrite, self.server)
                item.previous[identifier] = (current[identifier].get("meta") or {}).get("versionId")
                item.retire.append(entry)
        return None

    async def _write(self, items: list[_Item]) -> list[PushResult]:
        entries: list[JSON] = []
        seen: set[str] = set()
        for item in items:
            for entry in item.shared + item.entries + item.retire:
                full = entry.get("fullUrl") or _entry_key(entry)
                if full not in seen:
                    seen.add(full)
                    entries.append(entry)
        self.state.mark_pending(self.server, [(i.key, i.content_hash) for i in items])
        outcomes = await self.client.transaction(
            {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        )
        by_entry = dict(zip((id(e) for e in entries), outcomes, strict=True))
        written: list[ResourceState] = []
        results = []
        for item in items:
            count = 0
            for entry in item.shared:
                if id(entry) in by_entry:
                    written.append(_written(entry, by_entry[id(entry)], None))
            for entry in item.entries:
                outcome = by_entry.get(id(entry))
                if outcome is not None:
                    written.append(_written(entry, outcome, item.key))
                    before = item.previous.get(_entry_key(entry))
                    count += outcome.status == 201 or outcome.version != before
            for entry in item.retire:
                written.append(_written(entry, by_entry[id(entry)], item.key, retired=True))
            if item.record.retracted:
                action: Action = "entered-in-error"
            elif item.previous_hash is None and not item.known:
                action = "created"
            else:
                action = "updated"
            results.append(
                PushResult(item.record.id, action, written=count, retired=len(item.retire))
            )
        self.state.commit_written(self.server, [(i.key, i.content_hash) for i in items], written)
        return results


def _written(
    entry: JSON, outcome: Outcome, record_key: str | None, retired: bool = False
) -> ResourceState:
    resource_type = entry["resource"]["resourceType"]
    resource_id = outcome.id or entry["resource"].get("id")
    if resource_id is None:
        raise InvalidResponseError(f"{resource_type}: the transaction response has no location")
    return ResourceState(
        identifier=_entry_key(entry),
        resource_type=resource_type,
        resource_id=resource_id,
        version=outcome.version,
        record_key=record_key,
        retired=retired,
    )


def _to_versioned_put(entry: JSON, current: JSON, overwrite: bool) -> str | None:
    """Turn a conditional PUT into ``PUT Type/id`` with If-Match; return the server's version."""
    resource = entry["resource"]
    resource["id"] = current["id"]
    entry["request"] = {"method": "PUT", "url": f"{resource['resourceType']}/{current['id']}"}
    version: str | None = (current.get("meta") or {}).get("versionId")
    if version and not overwrite:
        entry["request"]["ifMatch"] = f'W/"{version}"'
    return version


def _retirement(current: JSON, overwrite: bool, server: str) -> JSON:
    """An entry that marks a resource the record no longer holds as entered-in-error."""
    resource = copy.deepcopy(current)
    resource_type = resource["resourceType"]
    if resource_type == "Condition":
        resource.pop("clinicalStatus", None)  # con-5
        coding = terminology().convention("condition-verification-entered-in-error")
        resource["verificationStatus"] = {"coding": [coding.as_fhir()]}
    else:
        resource[_STATUS_PATH.get(resource_type, "status")] = "entered-in-error"
    resource.get("meta", {}).pop("versionId", None)
    resource.get("meta", {}).pop("lastUpdated", None)
    version = (current.get("meta") or {}).get("versionId")
    request: JSON = {"method": "PUT", "url": f"{resource_type}/{resource['id']}"}
    if version and not overwrite:
        request["ifMatch"] = f'W/"{version}"'
    # A transaction entry needs a fullUrl: the resource's own URL on the server.
    full = f"{server}/{resource_type}/{resource['id']}"
    return {"fullUrl": full, "resource": resource, "request": request}


def push(
    records: Iterable[Encounter],
    base_url: str,
    state: StateStore,
    *,
    client_options: dict[str, Any] | None = None,
    **options: Any,
) -> list[PushResult]:
    """Push ``records`` to the server at ``base_url`` and return every result (blocking).

    ``client_options`` go to :class:`~ims_fhir.AsyncFhirClient` (auth, timeout, ...), the
    other ``options`` to :class:`Pusher`. For large inputs, iterate ``Pusher.push`` in an
    event loop instead: it yields results as they come.
    """

    async def run() -> list[PushResult]:
        async with AsyncFhirClient(base_url, **(client_options or {})) as client:
            pusher = Pusher(client, state, **options)
            return [result async for result in pusher.push(records)]

    return asyncio.run(run())
