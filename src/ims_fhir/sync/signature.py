"""Signatures: how ims-fhir recognises its own writes on a server, whatever the server does.

A resource's *signature* is a hash of its content with everything a server may assign or rewrite
left out: ``id``, ``meta`` (versions, timestamps, tags, profiles, ``source``) and the narrative,
and with every reference replaced by the business identifier of what it points at, and numbers
compared by value. So the copy a
server holds has the same signature as what ims-fhir sent, whether the server turned
``urn:uuid:...`` into ``Patient/123``, made references absolute, kept old tags, dropped them or
added its own.

The sync engine keeps the signature of each resource it wrote, and of each resource it is about
to write, in the state store: a server copy whose signature is one of those is ims-fhir's own
write; any other content was put there by someone else. Tags are not used to decide anything:
FHIR R4 lets servers keep (HAPI), drop or replace them across versions.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from decimal import ROUND_HALF_EVEN, Context, Decimal, DivisionByZero, InvalidOperation, Overflow
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from .._version import __version__
from ..mapping.identity import literal, without_contained_ids
from ..record.terminology import mappings_dir

if TYPE_CHECKING:
    from ..record.model import Encounter

__all__ = ["References", "identifier_key", "identifier_keys", "record_digest", "signature"]

JSON = dict[str, Any]

_SERVER_OWNED = ("id", "meta", "text")


def identifier_key(resource: Mapping[str, Any]) -> str:
    """The key ims-fhir tracks a resource by: its first identifier, or ``Type/id`` without one."""
    identifiers = resource.get("identifier")
    if isinstance(identifiers, list) and identifiers and isinstance(identifiers[0], dict):
        first = identifiers[0]
        return f"{first.get('system')}|{first.get('value')}"
    return f"{resource.get('resourceType')}/{resource.get('id')}"


def identifier_keys(resource: Mapping[str, Any]) -> set[str]:
    """Every key a server copy answers to: each ``system|value``, and ``Type/id``."""
    keys = {f"{resource.get('resourceType')}/{resource.get('id')}"}
    identifiers = resource.get("identifier")
    if isinstance(identifiers, dict):  # 0..1 in some resource types
        identifiers = [identifiers]
    for item in identifiers if isinstance(identifiers, list) else []:
        if isinstance(item, dict):
            keys.add(f"{item.get('system')}|{item.get('value')}")
    return keys


class References:
    """Maps the references of a resource to the identifiers of their targets.

    ``full_urls`` maps the ``fullUrl`` of each entry ims-fhir sends (``urn:uuid:...``) to its
    key; ``ids`` maps ``Type/id`` on the server to the key of what is there.
    """

    def __init__(self) -> None:
        self.full_urls: dict[str, str] = {}
        self.ids: dict[str, str] = {}

    def add_entries(self, entries: Iterable[JSON]) -> None:
        """Learn the keys of the entries of a Bundle ims-fhir built."""
        for entry in entries:
            self.full_urls[entry["fullUrl"]] = identifier_key(entry["resource"])

    def add_id(self, resource_type: str, resource_id: str, key: str) -> None:
        """Learn that ``Type/id`` on the server is the resource with ``key``."""
        self.ids[f"{resource_type}/{resource_id}"] = key

    def resolve(self, reference: str) -> str:
        """The key of what ``reference`` points at, or the reference as ``Type/id``."""
        known = self.full_urls.get(reference)
        if known is not None:
            return known
        target = literal(reference)
        return self.ids.get(target, target)


def _normalised(value: Any, references: References) -> Any:
    """``value`` with references as keys and numbers as their decimal text (see signature).

    What holds neither is returned as it is, not copied (nothing changes it afterwards): most
    of a resource is codings and text.
    """
    kind = type(value)
    if kind is dict:
        return _object(value, references)
    if kind is list:
        return _array(value, references)
    return _leaf(value, references)


def _object(value: dict[str, Any], references: References) -> dict[str, Any]:
    out: dict[str, Any] | None = None  # a copy, made at the first element that changes
    new: Any
    for key, item in value.items():
        kind = type(item)
        if kind is str:
            if key != "reference":
                continue
            new = references.resolve(item)
        elif kind is dict:
            new = _object(item, references)
        elif kind is list:
            new = _array(item, references)
        elif kind is bool or item is None:
            continue
        elif kind is int and -_EXACT < item < _EXACT:
            new = str(item)  # what the decimal route writes for an int of up to 28 digits
        elif key == "reference" and isinstance(item, str):
            new = references.resolve(item)
        else:
            new = _leaf(item, references)
        if new is not item:
            if out is None:
                out = dict(value)
            out[key] = new
    return value if out is None else out


def _array(value: list[Any], references: References) -> list[Any]:
    out: list[Any] | None = None  # a copy, made at the first element that changes
    new: Any
    for n, item in enumerate(value):
        kind = type(item)
        if kind is str or kind is bool or item is None:
            continue
        if kind is dict:
            new = _object(item, references)
        elif kind is list:
            new = _array(item, references)
        elif kind is int and -_EXACT < item < _EXACT:
            new = str(item)
        else:
            new = _leaf(item, references)
        if new is not item:
            if out is None:
                out = list(value)
            out[n] = new
    return value if out is None else out


# Integers the decimal route (``_number``) writes as ``str`` does: those within the default
# decimal context's 28 digits of precision (beyond them, ``normalize`` rounds).
_EXACT = 10**28


def _leaf(value: Any, references: References) -> Any:
    if isinstance(value, str | bool) or value is None:
        return value
    if isinstance(value, int | float):
        return _number(value)
    if isinstance(value, Mapping):  # straight to _object: no deeper a stack than a dict's
        return _object(dict(value), references)
    if isinstance(value, list | tuple):
        return _array(list(value), references)
    return value


# The decimal context signatures were first written in (Python's default), every field spelt
# out: an application embedding ims-fhir may set its threads' context, or the DefaultContext
# new ones copy, otherwise, and a signature must not depend on it.
_DECIMAL = Context(
    prec=28,
    rounding=ROUND_HALF_EVEN,
    Emin=-999999,
    Emax=999999,
    capitals=1,
    clamp=0,
    flags=[],
    traps=[InvalidOperation, DivisionByZero, Overflow],
)


def _number(value: float) -> str:
    """A number by its value: servers may write ``13.0`` as ``13`` (JSON does not tell them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return format(Decimal(str(value)).normalize(_DECIMAL), "f")


def signature(resource: Mapping[str, Any], references: References) -> str:
    """The signature of ``resource``: its content without server-owned parts, references as keys.

    Contained resources are named by their place, not their id: a contained resource's id is
    local to its resource, and a server may assign its own (``#1`` for ``#site``).
    """
    content = {k: v for k, v in resource.items() if k not in _SERVER_OWNED}
    contained = content.get("contained")
    if isinstance(contained, list) and contained:
        local = {
            f"#{c['id']}": f"#contained[{n}]"
            for n, c in enumerate(contained)
            if isinstance(c, dict) and isinstance(c.get("id"), str)
        }
        content["contained"] = without_contained_ids(contained)
        references = _Local(references, local)
    return hashlib.sha256(canonical_json(_normalised(content, references))).hexdigest()[:32]


class _Local(References):
    """References, with those to contained resources (``#id``) by their place instead."""

    def __init__(self, outer: References, local: dict[str, str]) -> None:
        super().__init__()
        self.full_urls, self.ids, self.local = outer.full_urls, outer.ids, local

    def resolve(self, reference: str) -> str:
        found = self.local.get(reference)
        return found if found is not None else super().resolve(reference)


@functools.cache
def mapping_fingerprint() -> bytes:
    """The digest of what decides how a record maps, read once per process.

    ims-fhir's version, its mapping and record code, and the artifacts in ``mappings/``.
    """
    digest = hashlib.sha256(f"ims-fhir {__version__}\n".encode())
    package = Path(__file__).resolve().parents[1]
    files = [
        *sorted((package / "mapping").glob("*.py")),
        *sorted((package / "record").glob("*.py")),
        *sorted(mappings_dir().glob("*.json")),
    ]
    for file in files:
        digest.update(f"{file.parent.name}/{file.name}\n".encode())
        digest.update(file.read_bytes())
    return digest.digest()


def record_digest(record: Encounter) -> str | None:
    """A digest of ``record`` and of the mapping: equal digests map to the same Bundle.

    Lets a re-push tell an unchanged record without mapping it (the state keeps the digest
    beside the Bundle's content hash). None where the record cannot be written out (a record
    built in code that skipped validation): the caller maps and checks it instead.
    """
    try:
        text = record.model_dump_json(warnings="error")
    except (ValueError, TypeError):  # pydantic's serialisation errors and warnings
        return None
    digest = hashlib.sha256(mapping_fingerprint())
    digest.update(text.encode("utf-8", "surrogatepass"))
    return "r1:" + digest.hexdigest()[:40]


def canonical_json(value: Any) -> bytes:
    """``value`` as compact JSON with sorted keys, in UTF-8: what a signature digests.

    The bytes ``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``
    wrote before, for values without floats (a signature's numbers are strings by then), by
    orjson, ten times faster (tests/test_signature.py proves it on generated values); the
    standard library writes what orjson refuses (a lone surrogate, an integer beyond 64 bits).
    """
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONEncodeError, TypeError):
        return standard_json(value)


def standard_json(value: Any) -> bytes:
    """``value`` as ``json.dumps`` writes it compact with sorted keys, in UTF-8.

    What ims-fhir 0.1 hashed (its content hashes are still read from old state files), and what
    :func:`canonical_json` falls back to.
    """
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass")
