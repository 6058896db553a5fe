"""Names shared by both mapping directions: identifiers, references, profiles and extensions.

Every resource ims-fhir writes carries a business identifier derived from the record's stable
source ids: the system is ``{namespace}/{kind}`` where the namespace is the clinic's (configurable
per clinic, see :attr:`~ims_fhir.Clinic.namespace`), and the value is built from source keys, e.g.
``enc-1/finding/f3``. The transaction's ``urn:uuid`` fullUrls are UUIDv5 of that identifier, so
mapping a record twice gives the same bytes.
"""

from __future__ import annotations

import functools
import hashlib
import re
import uuid
from enum import StrEnum
from typing import Any
from urllib.parse import quote, urlsplit

from ..record.model import Encounter
from ..record.terminology import CANONICAL, EXTENSION_BASE, PROFILE_BASE

DEFAULT_NAMESPACE_BASE = f"{CANONICAL}/sid"


def search_escape(value: str) -> str:
    """Escape a token for a FHIR search: backslash, comma, dollar and bar (R4 search.html)."""
    for char in ("\\", ",", "$", "|"):
        value = value.replace(char, "\\" + char)
    return value


def identifier_query(identifier_system: str, value: str) -> str:
    """``identifier=system|value``, escaped for FHIR search and percent-encoded for a URL."""
    return f"identifier={identifier_token(identifier_system, value)}"


def identifier_token(identifier_system: str, value: str) -> str:
    """``system|value`` as a token of a search in a URL: escaped, then percent-encoded."""
    return f"{_system_token(identifier_system)}|{_value_token(value)}"


@functools.lru_cache(maxsize=256)
def _system_token(identifier_system: str) -> str:
    return quote(search_escape(identifier_system), safe=":/")  # a few systems, met many times


# What escaping leaves as it is, and percent-encoding too but for "/": most values are such
# (ids, numbers, ``enc-1/finding/f3``).
_PLAIN = re.compile(r"[A-Za-z0-9_.~/-]*")


def _value_token(value: str) -> str:
    if _PLAIN.fullmatch(value):
        return value.replace("/", "%2F")  # what quote(value, safe="") gives for these
    return quote(search_escape(value), safe="")


def default_namespace(clinic_id: str) -> str:
    """Return the identifier namespace used for a clinic that configures none."""
    return f"{DEFAULT_NAMESPACE_BASE}/{clinic_id}"


# Names reserved for examples and tests (RFC 2606, RFC 6761): the example domains and the test,
# invalid and localhost top-level domains. A label "example" anywhere in a host counts too
# (fhir.example.ca, standards.example.nz, as the fixtures use): such a name is a stand-in,
# never a registered identifier system.
_RESERVED_TLDS = frozenset({"example", "test", "invalid", "localhost"})


def is_example_system(identifier_system: str) -> bool:
    """Tell whether an identifier system's host is a name reserved for examples (RFC 2606)."""
    try:
        host = urlsplit(identifier_system).hostname
    except ValueError:
        return False
    if not host:
        return False  # urn:oid:..., urn:uuid:...: no host to judge
    labels = host.rstrip(".").split(".")
    return labels[-1] in _RESERVED_TLDS or "example" in labels


def example_systems(record: Encounter) -> list[str]:
    """The identifier systems (and the clinic namespace) of ``record`` under example names."""
    candidates = [record.clinic.namespace or default_namespace(record.clinic.id)]
    candidates += [ident.system for ident in record.patient.identifiers]
    if record.practitioner.licence is not None:
        candidates.append(record.practitioner.licence.system)
    return [c for c in dict.fromkeys(candidates) if is_example_system(c)]


class Kind(StrEnum):
    """The identifier kinds: the last path segment of each identifier system."""

    PATIENT = "patient"
    PRACTITIONER = "practitioner"
    ORGANIZATION = "organization"
    ENCOUNTER = "encounter"
    OBSERVATION = "observation"
    CONDITION = "condition"
    PROCEDURE = "procedure"
    CONSENT = "consent"
    CONSENT_FORM = "consent-form"
    PROVENANCE = "provenance"


def system(namespace: str, kind: Kind) -> str:
    """Return the identifier system for one kind of resource of a clinic."""
    return f"{namespace}/{kind.value}"


# The type of the clinic's own identifier of a resource, by kind: a convention's name
# (Parameters-conventions.json; codes from R4's identifier-type value set).
LOCAL_IDENTIFIER_TYPES = {
    Kind.PATIENT: "identifier-type-mr",  # the clinic's patient number: a medical record number
    Kind.PRACTITIONER: "identifier-type-prn",  # its number for a physiotherapist: provider number
}


# Resources many encounters share, and a region may hold: written once, matched, not owned.
SHARED_TYPES = frozenset({"Patient", "Practitioner", "Organization"})
RESOURCE_TYPES = frozenset(
    {"Encounter", "Observation", "Procedure", "Condition", "Provenance", "Consent"} | SHARED_TYPES
)
"""Every resource type a record maps to (pull's ENCOUNTER_TYPES, tested to agree)."""


def consent_policy(namespace: str) -> str:
    """The URI naming a clinic's IMS consent policy (``Consent.policy.uri``), in its namespace."""
    return f"{namespace}/policy/ims-consent"


def split_system(value: str) -> tuple[str, Kind] | None:
    """Split an identifier system into (namespace, kind), or None if it is not ours."""
    namespace, _, last = value.rpartition("/")
    try:
        return namespace, Kind(last)
    except ValueError:
        return None


def full_url(identifier_system: str, value: str) -> str:
    """Return the deterministic ``urn:uuid`` fullUrl of the resource with this identifier.

    The UUID is version 5 (RFC 4122: SHA-1 of the URL namespace and the name), as
    ``uuid.uuid5(uuid.NAMESPACE_URL, name)`` gives, computed without building UUID objects.
    """
    name = f"{identifier_system}|{value}".encode()  # as uuid5 encodes a name
    digest = bytearray(hashlib.sha1(_URL_NAMESPACE + name, usedforsecurity=False).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # the RFC 4122 variant
    h = digest.hex()
    return f"urn:uuid:{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_URL_NAMESPACE = uuid.NAMESPACE_URL.bytes


def literal(reference: str) -> str:
    """``Type/id`` of a literal reference, relative or absolute, with any ``_history`` dropped."""
    parts = reference.split("?")[0].rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return "/".join(parts[-2:]) if len(parts) >= 2 else reference


def without_contained_ids(contained: Any) -> Any:
    """Contained resources without their ids, which are local to their resource.

    A server may assign its own (``#1`` for ``#site``); what points at one is compared by its
    place instead. Anything but a list is returned as it is.
    """
    if not isinstance(contained, list):
        return contained
    return [
        {k: v for k, v in c.items() if k != "id"} if isinstance(c, dict) else c for c in contained
    ]


def provenance_id(namespace: str, encounter_id: str) -> str:
    """The id of an encounter's Provenance (R4 gives Provenance no identifier, so it has this)."""
    name = f"{system(namespace, Kind.PROVENANCE)}|{encounter_id}"
    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


class Profile(StrEnum):
    """The project's profiles, one per kind of resource the mapper writes."""

    PATIENT = "ims-patient"
    PRACTITIONER = "ims-practitioner"
    ORGANIZATION = "ims-organization"
    ENCOUNTER = "ims-encounter"
    ASSESSMENT_PANEL = "ims-assessment-panel"
    FINDING = "ims-finding"
    PAIN_SCORE = "ims-pain-score"
    DIAGNOSIS = "ims-diagnosis"
    SESSION = "ims-session"
    NEEDLED_SITE = "ims-needled-site"
    CONSENT = "ims-consent"
    PROVENANCE = "ims-provenance"

    @property
    def url(self) -> str:
        """The profile's canonical URL."""
        return f"{PROFILE_BASE}/{self.value}"


class Ext(StrEnum):
    """Extensions the mapping uses besides the spec's slots (``spec.py``)."""

    # Links the session Procedure to its Consent. TERMINOLOGY.md names the core
    # workflow-supportingInfo extension, but FHIR R4 (4.0.1) allows that one only on
    # DiagnosticReport, Observation and CommunicationRequest, so R4 validators reject it on a
    # Procedure; it is still accepted on the way in.
    SESSION_CONSENT = "session-consent"
    # Core extensions (FHIR extensions pack), named in TERMINOLOGY.md.
    STRUCTURE_LATERALITY = "http://hl7.org/fhir/StructureDefinition/observation-structureLaterality"
    SUPPORTING_INFO = "http://hl7.org/fhir/StructureDefinition/workflow-supportingInfo"
    # R4 core: a Procedure's target as a BodyStructure, whose locationQualifier holds the side
    # a Procedure.bodySite cannot (TERMINOLOGY.md, "Laterality on a Procedure").
    TARGET_BODY_STRUCTURE = "http://hl7.org/fhir/StructureDefinition/procedure-targetBodyStructure"

    @property
    def url(self) -> str:
        """The extension's canonical URL."""
        return self.value if "://" in self.value else f"{EXTENSION_BASE}/{self.value}"
