"""Check whether a FHIR server can take what ims-fhir pushes and pulls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..client.http import objects
from .pull import search_params

__all__ = ["Check", "check_capabilities", "needs"]

# How push writes each resource type: a conditional create or a conditional update on the
# business identifier it then also searches by (the Provenance, which R4 gives no identifier,
# is written to a client-chosen id).
_WRITES = {
    "Patient": "create",
    "Practitioner": "create",
    "Organization": "create",
    "Encounter": "update",
    "Observation": "update",
    "Condition": "update",
    "Procedure": "update",
    "Consent": "update",
    "Provenance": "update",
}
# Parameters every server supports on every type (FHIR R4 search.html#all).
_ALWAYS = {"_id", "_lastUpdated", "_profile", "_tag", "_security", "_source"}


def needs() -> dict[str, tuple[str, frozenset[str]]]:
    """What push and pull use, by resource type: the kind of write, and the search parameters."""
    pulled = search_params()
    return {
        resource_type: (
            write,
            frozenset(() if resource_type == "Provenance" else ("identifier",))
            | pulled.get(resource_type, frozenset()),
        )
        for resource_type, write in _WRITES.items()
    }


@dataclass(frozen=True, slots=True)
class Check:
    """One requirement, whether the server meets it, and why not."""

    name: str
    ok: bool
    detail: str = ""


def check_capabilities(statement: dict[str, Any]) -> list[Check]:
    """Compare a CapabilityStatement (JSON) with what push and pull need."""
    checks = []
    version = str(statement.get("fhirVersion", ""))
    checks.append(Check("FHIR 4.0.x", version.startswith("4.0"), f"server says {version or '?'}"))
    rest: dict[str, Any] = next(
        (r for r in objects(statement.get("rest")) if r.get("mode") == "server"), {}
    )
    system = {i.get("code") for i in objects(rest.get("interaction"))}
    checks.append(Check("transactions", "transaction" in system, ""))
    resources = {str(r.get("type")): r for r in objects(rest.get("resource"))}
    for resource_type, (write, params) in needs().items():
        resource = resources.get(resource_type)
        if resource is None:
            checks.append(Check(resource_type, False, "not supported"))
            continue
        interactions = {i.get("code") for i in objects(resource.get("interaction"))}
        missing = [i for i in ("read", "update", "search-type") if i not in interactions]
        if write == "create" and "create" not in interactions:
            missing.append("create")
        if write == "create" and not resource.get("conditionalCreate"):
            missing.append("conditional create")
        if (
            write == "update"
            and not resource.get("conditionalUpdate")
            and resource_type != "Provenance"
        ):
            missing.append("conditional update")
        if resource_type == "Provenance" and resource.get("updateCreate") is False:
            # The Provenance is written to a client-chosen id (R4 gives it no identifier).
            # Servers often leave updateCreate out; --write-test shows whether it works.
            missing.append("update as create (client-assigned id)")
        declared = {p.get("name") for p in objects(resource.get("searchParam"))}
        missing += [f"search parameter {p}" for p in sorted(params - declared - _ALWAYS)]
        checks.append(Check(resource_type, not missing, ", ".join(missing)))
    operations = {o.get("name") for o in objects(rest.get("operation"))}
    for resource in resources.values():
        operations |= {o.get("name") for o in objects(resource.get("operation"))}
    checks.append(
        Check(
            "$validate", "validate" in operations, "" if "validate" in operations else "not listed"
        )
    )
    return checks
