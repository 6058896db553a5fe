"""Pull: fetch IMS encounters back from a FHIR server and rebuild the records.

Encounters are found by the project's profile, a page at a time. For each page, the resources
that make those encounters up are fetched with their own paged searches (``Observation?encounter=
...`` and so on) rather than ``_include``/``_revinclude``: servers cap the resources they include
per page (HAPI at 1,000) and drop the rest without a word, which would lose data. Consents,
linked from the session by an extension servers do not index, are fetched by id. Each page is
mapped back on its own, so memory stays bounded however many encounters the server holds.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import AsyncIterator
from typing import Any

from .._exceptions import MappingError
from ..client.asynchronous import AsyncFhirClient
from ..client.http import ClientOptions
from ..mapping.from_fhir import MappingReport, from_fhir
from ..mapping.identity import Ext, Profile
from .push import refuse_own_http_client, run_blocking

__all__ = ["DEFAULT_PAGE_SIZE", "pull", "pull_all", "search_params"]

DEFAULT_PAGE_SIZE = 50

# FHIR R4 id (datatypes.html#id): what may go into a search for it.
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")

# Every search parameter pull relies on is named here, and only here: check_capabilities asks
# a server for each of them (see search_params).
_PROFILE, _PATIENT, _SINCE, _BY_ID = "_profile", "subject", "_lastUpdated", "_id"
# The resources that make an encounter up, by type: the parameter that points at the Encounter.
_PARTS = {
    "Observation": "encounter",
    "Procedure": "encounter",
    "Condition": "encounter",
    "Provenance": "target",
}
# What encounters and their sessions refer to, fetched by id.
_REFERRED = ("Patient", "Practitioner", "Organization", "Consent")


def search_params() -> dict[str, frozenset[str]]:
    """Resource type -> the search parameters pull uses on it."""
    params = {"Encounter": frozenset({_PROFILE, _PATIENT, _SINCE})}
    params |= {resource_type: frozenset({param}) for resource_type, param in _PARTS.items()}
    params |= {resource_type: frozenset({_BY_ID}) for resource_type in _REFERRED}
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


def pull_params(
    *, patient: str | None = None, since: str | dt.datetime | None = None, page_size: int
) -> dict[str, Any]:
    """The Encounter search that finds IMS encounters (of one patient, changed since a time)."""
    params: dict[str, Any] = {_PROFILE: Profile.ENCOUNTER.url, "_count": str(page_size)}
    if patient is not None:
        params[_PATIENT] = patient_reference(patient)
    if since is not None:
        params[_SINCE] = "ge" + (since.isoformat() if isinstance(since, dt.datetime) else since)
    return params


async def pull(
    client: AsyncFhirClient,
    *,
    patient: str | None = None,
    since: str | dt.datetime | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
) -> AsyncIterator[MappingReport]:
    """Yield, page by page, the records rebuilt and what was skipped or could not be mapped."""
    params = pull_params(patient=patient, since=since, page_size=page_size)
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
        refs = ",".join(f"Encounter/{e['id']}" for e in encounters)
        resources: list[Any] = list(encounters)
        for resource_type, param in _PARTS.items():
            resources += await _all(client, resource_type, {param: refs})
        wanted = {
            "Patient": {_ref_id(e.get("subject")) for e in encounters},
            "Practitioner": {
                _ref_id(p.get("individual") if isinstance(p, dict) else None)
                for e in encounters
                for p in _list(e.get("participant"))
            },
            "Organization": {_ref_id(e.get("serviceProvider")) for e in encounters},
            "Consent": {
                _ref_id(ext.get("valueReference") if isinstance(ext, dict) else None)
                for r in resources
                if isinstance(r, dict) and r.get("resourceType") == "Procedure"
                for ext in _list(r.get("extension"))
                if isinstance(ext, dict)
                and ext.get("url") in (Ext.SESSION_CONSENT.url, Ext.SUPPORTING_INFO.url)
            },
        }
        for resource_type in _REFERRED:
            found = sorted(i for i in wanted[resource_type] if i is not None)
            if found:
                resources += await _all(client, resource_type, {_BY_ID: ",".join(found)})
        report = from_fhir(resources)
        report.errors[:0] = malformed
        yield report


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


async def _all(client: AsyncFhirClient, resource_type: str, params: dict[str, str]) -> list[Any]:
    return [r async for r in client.search(resource_type, params | {"_count": "200"}, raw=True)]


def _ref_id(reference: Any) -> str | None:
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
    page_size: int = DEFAULT_PAGE_SIZE,
    client_options: ClientOptions | None = None,
) -> MappingReport:
    """Pull every matching encounter from the server at ``base_url`` (blocking).

    The records, skipped resources and errors of every page in one report. Callable inside a
    running event loop too (see :func:`~ims_fhir.push`); for many encounters, iterate
    :func:`pull` instead, which holds one page at a time.
    """
    refuse_own_http_client(client_options, "pull_all")

    async def run() -> MappingReport:
        report = MappingReport()
        async with AsyncFhirClient(base_url, **(client_options or {})) as client:
            async for page in pull(client, patient=patient, since=since, page_size=page_size):
                report.records += page.records
                report.skipped += page.skipped
                report.errors += page.errors
        return report

    return run_blocking(run)
