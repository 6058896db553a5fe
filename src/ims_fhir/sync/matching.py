"""How an encounter's shared resources (patient, practitioner, clinic) are found on a server.

A regional record already holds the region's patients (by health number), practitioners (by
licence) and organisations, and many clinics write to it. Each shared resource ims-fhir maps has
its clinic-local identifier first (``{namespace}/patient|pt-1``), then the identifiers that name
the person or organisation beyond the clinic: *strong* identifiers. What decides which resource
on the server is the one meant is the user's matching policy:

- ``identifier`` (default): the resource that carries any of its strong identifiers or its
  clinic-local one. Exactly one is used; several fail the encounter as ambiguous, nothing
  written; none is created, by a conditional create on its strong identifiers
  (``If-None-Exist: identifier=jhn|1``: the same query from every clinic, so clinics racing to
  create one patient make one on a server that keeps one resource per match URL).
- ``create``: the clinic-local identifier only (servers the clinic owns: what ims-fhir 0.1 did).
- ``mpi``: the server's master patient index decides for patients (FHIR ``Patient/$match``,
  certain matches at or above a score threshold); practitioners and organisations as
  ``identifier``.

Which identifiers are strong is read from the identifier types in ``mappings/`` (R4
``identifier-type``): JHN for a patient, LN for a practitioner; for an organisation every
identifier but the clinic-local one.

Demographics follow the clinic's record only where ims-fhir owns the resource: one it created
for this clinic (the clinic-local identifier is its first) that nobody changed since (its
content still has the signature ims-fhir marked it with). Each such write carries the time of
the encounter it came from (the ``sync-snapshot`` meta extension), and an older encounter never
replaces what a newer one wrote. A resource the region owns is never written: a difference is
reported, by field name (never the values: they are patient data).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, Literal, get_args

from ..mapping.identity import identifier_token
from ..record.terminology import CANONICAL, terminology

__all__ = [
    "DEFAULT_MATCH_THRESHOLD",
    "SYNC_SNAPSHOT_URL",
    "MatchPolicy",
    "demographic_differences",
    "match_keys",
    "match_query",
    "mpi_candidates",
    "snapshot_of",
]

JSON = dict[str, Any]

MatchPolicy = Literal["identifier", "create", "mpi"]
MATCH_POLICIES: tuple[str, ...] = get_args(MatchPolicy)

DEFAULT_MATCH_THRESHOLD = 0.95
"""The least ``search.score`` of a ``$match`` candidate taken as the patient (policy ``mpi``)."""

SYNC_SNAPSHOT_URL = f"{CANONICAL}/StructureDefinition/sync-snapshot"
"""The ``meta`` extension with the time of the encounter a shared resource was written from."""

# The fields compared between the clinic's record and a server's copy, per shared type.
_DEMOGRAPHICS = {
    "Patient": ("name", "birthDate", "gender"),
    "Practitioner": ("name",),
    "Organization": ("name",),
}

# The identifier type that makes an identifier strong, per type (conventions in mappings/).
_STRONG_TYPE = {
    "Patient": "identifier-type-health-card",
    "Practitioner": "identifier-type-licence",
}


def _typed(identifier: Mapping[str, Any], convention: str) -> bool:
    wanted = terminology().convention(convention)
    kind = identifier.get("type")
    codings = kind.get("coding") if isinstance(kind, dict) else None
    return any(
        isinstance(c, dict) and c.get("system") == wanted.system and c.get("code") == wanted.code
        for c in codings or []
    )


def match_keys(resource: Mapping[str, Any], policy: MatchPolicy) -> list[str]:
    """The identifier keys (``system|value``) that find ``resource`` on a server, strongest first.

    ``resource`` is one ims-fhir mapped: its first identifier is the clinic-local one.
    """
    identifiers = [i for i in resource.get("identifier") or [] if isinstance(i, dict)]
    local = f"{identifiers[0].get('system')}|{identifiers[0].get('value')}"
    if policy == "create":
        return [local]
    convention = _STRONG_TYPE.get(str(resource.get("resourceType")))
    strong = [
        f"{i.get('system')}|{i.get('value')}"
        for i in identifiers[1:]
        if convention is None or _typed(i, convention)
    ]
    return [*dict.fromkeys(strong), local]


def match_query(keys: list[str]) -> str:
    """``identifier=a|1,b|2``: any of ``keys`` (FHIR search OR), escaped and percent-encoded.

    A key is ``system|value``; a value holds no ``|`` (a system may: see push's ``_token``).
    """
    tokens = []
    for key in keys:
        system, _, value = key.rpartition("|")
        tokens.append(identifier_token(system, value))
    return "identifier=" + ",".join(tokens)


def snapshot_of(resource: Mapping[str, Any]) -> dt.datetime | None:
    """The snapshot time a server copy carries; None without exactly one that parses."""
    meta = resource.get("meta")
    extensions = meta.get("extension") if isinstance(meta, dict) else None
    found = [
        e.get("valueDateTime")
        for e in (extensions if isinstance(extensions, list) else [])
        if isinstance(e, dict) and e.get("url") == SYNC_SNAPSHOT_URL
    ]
    if len(found) != 1 or not isinstance(found[0], str):
        return None
    try:
        value = dt.datetime.fromisoformat(found[0].replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo is not None else None


def mark_snapshot(resource: JSON, when: dt.datetime) -> None:
    """Put ``when`` in ``resource``'s snapshot extension (its meta is replaced, not changed)."""
    meta = dict(resource.get("meta") or {})
    others = [
        e
        for e in meta.get("extension") or []
        if not (isinstance(e, dict) and e.get("url") == SYNC_SNAPSHOT_URL)
    ]
    stamp = when.isoformat().replace("+00:00", "Z")
    meta["extension"] = [*others, {"url": SYNC_SNAPSHOT_URL, "valueDateTime": stamp}]
    resource["meta"] = meta


def demographic_differences(wanted: Mapping[str, Any], held: Mapping[str, Any]) -> list[str]:
    """The demographic fields (names only) where the server's copy differs from the clinic's."""
    fields = _DEMOGRAPHICS.get(str(wanted.get("resourceType")), ())
    return [name for name in fields if _comparable(wanted.get(name)) != _comparable(held.get(name))]


def _comparable(value: Any) -> Any:
    """A name or date as a consumer reads it: case, spaces and empty parts left out."""
    if isinstance(value, list):
        return [_comparable(item) for item in value if item not in (None, "", [], {})]
    if isinstance(value, dict):
        out = {
            key: _comparable(item)
            for key, item in value.items()
            if key in {"family", "given", "prefix", "suffix"} and item not in (None, "", [])
        }
        return out
    if isinstance(value, str):
        return " ".join(value.split()).casefold()
    return value


def mpi_candidates(where: str, answer: JSON, threshold: float) -> list[JSON]:
    """The patients a ``$match`` answer gives at or above ``threshold``, checked.

    Raises:
        ValueError: the answer is not a searchset Bundle of Patients with scores.
    """
    if answer.get("resourceType") != "Bundle" or answer.get("type") != "searchset":
        raise ValueError(f"{where}: the answer to Patient/$match is not a searchset Bundle")
    found: list[JSON] = []
    for entry in answer.get("entry") or []:
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: a Patient/$match answer entry is not an object")
        resource = entry.get("resource")
        search = entry.get("search")
        if not isinstance(resource, dict) or resource.get("resourceType") != "Patient":
            continue  # e.g. an OperationOutcome with warnings
        if not isinstance(resource.get("id"), str) or not resource["id"]:
            raise ValueError(f"{where}: a Patient/$match candidate has no id")
        score = search.get("score") if isinstance(search, dict) else None
        if isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1:
            raise ValueError(f"{where}: a Patient/$match candidate has no score between 0 and 1")
        if score >= threshold and all(f["id"] != resource["id"] for f in found):
            found.append(resource)  # a patient named twice is one candidate
    return found
