"""Pull: fetch IMS encounters back from a FHIR server and rebuild the records.

Encounters are found by the project's profile, a page at a time. For each page, the resources
that make those encounters up are fetched with their own paged searches (``Observation?encounter=
...`` and so on) rather than ``_include``/``_revinclude``: servers cap the resources they include
per page (HAPI at 1,000) and drop the rest without a word, which would lose data. Consents,
linked from the session by an extension servers do not index, are fetched by id. Each page is
mapped back on its own, so memory stays bounded however many encounters the server holds.

A pull can be narrowed to one clinic: by its identifier namespace, searched on the server as the
system of the Encounter's identifier (``identifier=<namespace>/encounter|``, a token search on
the system alone), and by its clinic id. Either way each record rebuilt is checked again here: a
server that ignores or widens the search does not bring another clinic's records in.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

from .._exceptions import MappingError
from ..client.asynchronous import AsyncFhirClient
from ..client.http import ClientOptions
from ..mapping.from_fhir import MappingReport, SkippedResource, from_fhir
from ..mapping.identity import Ext, Kind, Profile, default_namespace, search_escape, system
from ..record.model import Encounter, check_namespace
from .push import refuse_own_http_client, run_blocking

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "ENCOUNTER_TYPES",
    "OTHER_CLINIC",
    "PARTS",
    "REFERRED",
    "pull",
    "pull_all",
    "search_params",
]

DEFAULT_PAGE_SIZE = 50

# FHIR R4 id (datatypes.html#id): what may go into a search for it.
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# A clinic id, as the record model takes it (SourceId).
_CLINIC_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-_]{0,63}")
OTHER_CLINIC = "another clinic's encounter"
"""How a record left out by ``namespace`` or ``clinic`` begins its ``skipped`` reason."""

# Every search parameter pull relies on is named here, and only here: check_capabilities asks
# a server for each of them (see search_params).
_PROFILE, _PATIENT, _SINCE, _BY_ID = "_profile", "subject", "_lastUpdated", "_id"
_IDENTIFIER = "identifier"
PARTS = {
    "Observation": "encounter",
    "Procedure": "encounter",
    "Condition": "encounter",
    "Provenance": "target",
}
"""The resources that make an encounter up, by type: the element (and search parameter, of the
same name) that points at the Encounter."""
REFERRED = ("Patient", "Practitioner", "Organization", "Consent")
"""What encounters and their sessions refer to, fetched by id."""
ENCOUNTER_TYPES = ("Encounter", *PARTS, *REFERRED)
"""Every resource type an IMS encounter is made of."""


def search_params() -> dict[str, frozenset[str]]:
    """Resource type -> the search parameters pull uses on it."""
    params = {"Encounter": frozenset({_PROFILE, _PATIENT, _SINCE, _IDENTIFIER})}
    params |= {resource_type: frozenset({param}) for resource_type, param in PARTS.items()}
    params |= {resource_type: frozenset({_BY_ID}) for resource_type in REFERRED}
    return params


def patient_reference(patient: str) -> str:
    """``Patient/<id>`` for a patient given as ``123`` or ``Patient/123``.

    Raises:
        ValueError: not a FHIR id. An empty one (a script's unset variable) must not widen a
            pull to every patient.
    """
    ref = patient.strip().removeprefix("Patient/")
    if not _ID.fullmatch(ref):
        raise ValueError(f"{patient!r} is not a Patient id, e.g. Patient/123")
    return f"Patient/{ref}"


def check_clinic_filter(namespace: str | None, clinic: str | None) -> None:
    """Refuse a ``namespace`` or ``clinic`` to pull by that cannot be one.

    Raises:
        ValueError: saying why. An empty one (a script's unset variable) must not widen a pull.
    """
    if namespace is not None:
        try:
            check_namespace(namespace)
        except ValueError as exc:
            raise ValueError(f"namespace {namespace!r} {exc}") from None
    if clinic is not None and not _CLINIC_ID.fullmatch(clinic):
        raise ValueError(
            f"{clinic!r} is not a clinic id (letters, digits, '.', '-', '_'; at most 64)"
        )


def pull_params(
    *,
    patient: str | None = None,
    since: str | dt.datetime | None = None,
    namespace: str | None = None,
    page_size: int,
) -> dict[str, Any]:
    """The Encounter search that finds IMS encounters (of one patient, clinic namespace, ...)."""
    params: dict[str, Any] = {_PROFILE: Profile.ENCOUNTER.url, "_count": str(page_size)}
    if patient is not None:
        params[_PATIENT] = patient_reference(patient)
    if namespace is not None:
        # A token with the system alone ("system|") matches any value in it (R4 search.html).
        params[_IDENTIFIER] = search_escape(system(namespace, Kind.ENCOUNTER)) + "|"
    if since is not None:
        params[_SINCE] = "ge" + (since.isoformat() if isinstance(since, dt.datetime) else since)
    return params


async def pull(
    client: AsyncFhirClient,
    *,
    patient: str | None = None,
    since: str | dt.datetime | None = None,
    namespace: str | None = None,
    clinic: str | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
) -> AsyncIterator[MappingReport]:
    """Yield, page by page, the records rebuilt and what was skipped or could not be mapped.

    Args:
        client: the server's client.
        patient: only this patient's encounters (``Patient/123`` or ``123``).
        since: only encounters changed at or after this date or instant.
        namespace: only encounters of clinics with this identifier namespace (the default one
            of a clinic that names none is ``default_namespace(clinic_id)``).
        clinic: only encounters of the clinic with this id.
        page_size: encounters per page.

    A record of another clinic that the server sends anyway is left out and listed in
    ``skipped`` (its reason begins with :data:`OTHER_CLINIC`); with ``namespace``, so is the
    error of another clinic's encounter that could not be mapped (its details left out).

    Raises:
        ValueError: ``patient``, ``namespace`` or ``clinic`` cannot be one.
    """
    check_clinic_filter(namespace, clinic)
    params = pull_params(patient=patient, since=since, namespace=namespace, page_size=page_size)
    async for page in client.pages("Encounter", params):
        encounters: list[dict[str, Any]] = []
        malformed: list[MappingError] = []
        entries = page.get("entry") if isinstance(page, dict) else None
        for n, entry in enumerate(entries if isinstance(entries, list) else []):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict):
                malformed.append(MappingError("Encounter search", f"entry[{n}]", "no resource"))
                continue
            if resource.get("resourceType") != "Encounter":
                continue  # an OperationOutcome a server may add to a searchset
            if isinstance(resource.get("id"), str) and _ID.fullmatch(resource["id"]):
                encounters.append(resource)
            else:
                malformed.append(
                    MappingError(f"Encounter at entry[{n}]", "Encounter.id", "not a FHIR id")
                )
        if not encounters:
            if malformed:
                yield MappingReport(errors=malformed)
            continue
        report = await rebuild(client, encounters)
        report.errors[:0] = malformed
        if namespace is not None or clinic is not None:
            keep_clinic(report, namespace, clinic)
        yield report


async def rebuild(client: AsyncFhirClient, encounters: list[dict[str, Any]]) -> MappingReport:
    """Rebuild the records of ``encounters`` (Encounter JSON with ids) from what the server holds.

    The resources that make them up are searched for by their reference to the Encounters, and
    those the encounters and sessions refer to are read by id, then all are mapped back at once.
    """
    refs = [f"Encounter/{e['id']}" for e in encounters]
    resources: list[Any] = list(encounters)
    for resource_type, param in PARTS.items():
        resources += await _any_of(client, resource_type, param, refs)
    wanted = referred_ids(encounters, resources)
    for resource_type in REFERRED:
        found = sorted(wanted[resource_type])
        if found:
            resources += await fetch_by_id(client, resource_type, found)
    return from_fhir(resources)


def referred_ids(encounters: list[Any], resources: list[Any]) -> dict[str, set[str]]:
    """Type in :data:`REFERRED` -> the ids that ``encounters`` and their ``resources`` point at."""
    wanted = {
        "Patient": {ref_id(e.get("subject")) for e in encounters},
        "Practitioner": {
            ref_id(p.get("individual") if isinstance(p, dict) else None)
            for e in encounters
            for p in _list(e.get("participant"))
        },
        "Organization": {ref_id(e.get("serviceProvider")) for e in encounters},
        "Consent": {
            ref_id(ext.get("valueReference") if isinstance(ext, dict) else None)
            for r in resources
            if isinstance(r, dict) and r.get("resourceType") == "Procedure"
            for ext in _list(r.get("extension"))
            if isinstance(ext, dict)
            and ext.get("url") in (Ext.SESSION_CONSENT.url, Ext.SUPPORTING_INFO.url)
        },
    }
    return {
        resource_type: {i for i in ids if i is not None} for resource_type, ids in wanted.items()
    }


async def fetch_by_id(client: AsyncFhirClient, resource_type: str, ids: list[str]) -> list[Any]:
    """The resources of ``resource_type`` with these ids (those the server has), as JSON."""
    return await _any_of(client, resource_type, _BY_ID, ids)


MAX_LIST_CHARS = 1800
"""The longest list of values (joined by commas) one search sends: some servers and proxies
refuse a URL past 2,000 characters (HTTP 414), and 200 ids of 36 (UUIDs) are 7,400. A longer
list is searched in parts."""


def value_lists(values: list[str], limit: int = MAX_LIST_CHARS) -> Iterator[str]:
    """``values`` joined by commas, in as few lists as keep each within ``limit`` characters."""
    part: list[str] = []
    size = 0
    for value in values:
        if part and size + 1 + len(value) > limit:
            yield ",".join(part)
            part, size = [], 0
        size += len(value) + (1 if part else 0)
        part.append(value)
    if part:
        yield ",".join(part)


async def _any_of(
    client: AsyncFhirClient, resource_type: str, param: str, values: list[str]
) -> list[Any]:
    """What a search for any of ``values`` finds (``param=a,b,...``), a URL of bounded length."""
    found: list[Any] = []
    for joined in value_lists(values):
        found += await _all(client, resource_type, {param: joined})
    return found


def keep_clinic(report: MappingReport, namespace: str | None, clinic: str | None) -> None:
    """Leave out the records of other clinics than the one asked for (never trust the server).

    With ``namespace``, the errors of other namespaces' encounters too: each is counted in
    ``skipped`` by the resource it names, without its reason (which may quote the record).
    """
    kept: list[Encounter] = []
    for record in report.records:
        ns = record.clinic.namespace or default_namespace(record.clinic.id)
        if (namespace is None or ns == namespace) and (
            clinic is None or record.clinic.id == clinic
        ):
            kept.append(record)
        else:
            report.skipped.append(
                SkippedResource(
                    f"encounter {record.id!r}",
                    f"{OTHER_CLINIC}: clinic {record.clinic.id!r}, namespace {ns}",
                )
            )
    report.records = kept
    if namespace is None:
        return  # an error names no clinic id: with --clinic alone, every error is listed
    errors: list[MappingError] = []
    for error in report.errors:
        if not error.namespaces or namespace in error.namespaces:
            errors.append(error)  # possibly this clinic's: never left out unseen
        else:
            # Counted, not shown: what is wrong with it may quote another clinic's record.
            named = ", ".join(sorted(error.namespaces)[:3])
            report.skipped.append(
                SkippedResource(
                    error.resource, f"{OTHER_CLINIC} that could not be mapped: namespace {named}"
                )
            )
    report.errors = errors


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


async def _all(client: AsyncFhirClient, resource_type: str, params: dict[str, str]) -> list[Any]:
    return [r async for r in client.search(resource_type, params | {"_count": "200"}, raw=True)]


def ref_id(reference: Any) -> str | None:
    """The id a reference points at, if it is a FHIR id (what else could be searched for?)."""
    ref = reference.get("reference") if isinstance(reference, dict) else None
    if not isinstance(ref, str) or "/" not in ref:
        return None
    found = ref.split("/_history")[0].rsplit("/", 1)[-1]
    return found if _ID.fullmatch(found) else None


def pull_all(
    base_url: str,
    *,
    patient: str | None = None,
    since: str | dt.datetime | None = None,
    namespace: str | None = None,
    clinic: str | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    client_options: ClientOptions | None = None,
) -> MappingReport:
    """Pull every matching encounter from the server at ``base_url`` (blocking).

    The records, skipped resources and errors of every page in one report. Callable inside a
    running event loop too (see :func:`~ims_fhir.push`); for many encounters, iterate
    :func:`pull` instead, which holds one page at a time.
    """
    refuse_own_http_client(client_options, "pull_all")
    check_clinic_filter(namespace, clinic)

    async def run() -> MappingReport:
        report = MappingReport()
        async with AsyncFhirClient(base_url, **(client_options or {})) as client:
            pages = pull(
                client,
                patient=patient,
                since=since,
                namespace=namespace,
                clinic=clinic,
                page_size=page_size,
            )
            async for page in pages:
                report.extend(page)
        return report

    return run_blocking(run)
