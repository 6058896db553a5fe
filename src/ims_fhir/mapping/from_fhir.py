"""Reverse mapping: FHIR R4 resources -> IMS encounter records.

Input is what a caller has: a transaction Bundle made by :func:`~ims_fhir.to_fhir`, a searchset
Bundle from a server, any list of resources, or the JSON text of either. What servers do to
resources is expected: ids they assign, literal references (``Patient/123`` or absolute URLs)
in place of ``urn:uuid``, added ``meta``, rewritten narrative, any order.

:func:`from_fhir` is total. For any JSON value it returns a :class:`MappingReport`: each IMS
encounter either becomes a record that says what the resources say, or a
:class:`~ims_fhir.MappingError` naming the resource, the element path and the reason. Nothing
is dropped without a word: a resource that carries one of an encounter's identifiers, or that an
encounter's ``hasMember``, ``partOf``, ``evidence``, ``reasonReference`` or Provenance names,
must be read into the record (or be a part the record retired), or the encounter is an error.
Everything else is listed in :attr:`MappingReport.skipped` with the reason.

Indexes (by type, by reference key, by identifier, by encounter) are built once per input, so
the time is linear in the number of resources.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError

from .._exceptions import MappingError, clip
from ..record.model import Encounter
from ..record.reader import decode_json
from ..record.terminology import Terminology, terminology
from .identity import (
    LOCAL_IDENTIFIER_TYPES,
    SHARED_TYPES,
    Ext,
    Kind,
    Profile,
    default_namespace,
    literal,
    provenance_id,
    split_system,
    without_contained_ids,
)
from .identity import system as _system  # `system` is a common local name here
from .spec import (
    BODY_SITE_EXTENSION,
    COMPLICATION_EXTENSION,
    COMPONENT,
    OBSERVATION_BODY_SITE_EXTENSION,
    PROCEDURE_EXTENSION,
    Element,
    Slot,
    spec,
)
from .to_fhir import bundle_dict

__all__ = ["MappingReport", "SkippedResource", "from_fhir"]

JSON = dict[str, Any]
_CONSENT_LINKS = frozenset({Ext.SESSION_CONSENT.url, Ext.SUPPORTING_INFO.url})
_TARGET = Ext.TARGET_BODY_STRUCTURE.url
# Identifier kinds whose value is "<encounter id>/...": the parts of one encounter.
_PART_KINDS = frozenset({Kind.OBSERVATION, Kind.CONDITION, Kind.PROCEDURE, Kind.CONSENT})
# FHIR R4 integer: a signed 32-bit value (datatypes.html#integer).
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
_LEAVES = frozenset({str, int, float, bool, type(None)})
# Every extension ims-fhir writes: one of them anywhere else is not another system's.
_OUR_EXTENSION_URLS = frozenset(
    {slot.url for slot in spec().slots if slot.is_extension} | {e.url for e in Ext}
)


@dataclass(frozen=True, slots=True)
class SkippedResource:
    """A resource the reverse mapping did not use, and why."""

    resource: str
    reason: str


@dataclass(slots=True)
class MappingReport:
    """What :func:`from_fhir` rebuilt, skipped and could not map."""

    records: list[Encounter] = field(default_factory=list)
    skipped: list[SkippedResource] = field(default_factory=list)
    errors: list[MappingError] = field(default_factory=list)
    warnings: list[MappingError] = field(default_factory=list)
    """What the input did not say about a record rebuilt: e.g. an encounter without its
    Provenance, whose record reads ``recorded`` as not given."""

    def extend(self, other: MappingReport) -> None:
        """Add what ``other`` rebuilt, skipped, could not map and warned of (pages, batches)."""
        self.records += other.records
        self.skipped += other.skipped
        self.errors += other.errors
        self.warnings += other.warnings


def from_fhir(resources: Any) -> MappingReport:
    """Rebuild encounter records from a Bundle, a list of resources, or JSON text.

    Args:
        resources: a Bundle (model or JSON dict), an iterable of resources (models or dicts),
            or the JSON text of either. Any JSON value is accepted: what is not FHIR is
            reported, never raised.

    Returns:
        The records rebuilt, in the order their Encounters appear, with what was skipped and
        the errors of encounters that could not be rebuilt.

    Raises:
        TypeError: ``resources`` is none of the above (a programming error, not bad data).
    """
    report = MappingReport()
    if isinstance(resources, str | bytes):
        try:
            resources = decode_json(resources)
        except ValueError as exc:
            report.errors.append(MappingError("<input>", "<json>", f"not valid JSON: {exc}"))
            return report
    index = _Index(list(_resources(resources, report)))
    terms = terminology()
    used: set[_Res] = set()
    encounters: dict[tuple[str, str], list[_Res]] = defaultdict(list)
    for encounter in index.by_type.get("Encounter", ()):
        ours = encounter.our_identifier(Kind.ENCOUNTER)
        if ours is not None and (
            ours in index.claims
            or provenance_id(*ours) in index.with_id
            or _looks_ims(encounter, terms)
        ):
            encounters[ours].append(encounter)
    namespaces = _Namespaces(index)
    for ours, found in encounters.items():
        if len(found) > 1:  # which one is the record? Neither can be trusted.
            names = ", ".join(e.name for e in found[:3])
            for encounter in found:
                report.errors.append(
                    MappingError(
                        encounter.name,
                        "Encounter.identifier",
                        f"{len(found)} Encounters carry identifier {clip(repr(ours[1]))}: {names}",
                        namespaces=namespaces.of(encounter, ours),
                    )
                )
                used.add(encounter)
            used.update(index.claims.get(ours, ()))
            continue
        rebuild: _Rebuild | None = None
        try:
            rebuild = _Rebuild(index, found[0], ours, terms)
            record = rebuild.run()
            rebuild.check_links(record)
        except MappingError as exc:
            exc.namespaces = namespaces.of(found[0], ours)
            report.errors.append(exc)
        except (
            ArithmeticError,
            LookupError,
            ValueError,
            TypeError,
            AttributeError,
            RecursionError,
        ) as exc:
            # A shape no check foresaw (UnicodeError is a ValueError): still this encounter's
            # error, never a crash that loses the others.
            report.errors.append(
                MappingError(
                    found[0].name,
                    "Encounter",
                    f"internal: cannot read ({exc!r:.200})",
                    namespaces=namespaces.of(found[0], ours),
                )
            )
        else:
            report.records.append(record)
            if not rebuild.provenances:
                report.warnings.append(
                    MappingError(
                        found[0].name,
                        "Encounter",
                        "no Provenance names it in the input: when the record was made is not "
                        "known, and the record says none (the encounter's end)",
                    )
                )
            for retired in rebuild.retired:
                report.skipped.append(
                    SkippedResource(retired.name, "entered in error: no longer part of the record")
                )
        used.add(found[0])
        used.update(index.claims.get(ours, ()))
        if rebuild is not None:
            used |= rebuild.claimed
    report.errors += _orphans(index, used, namespaces)
    for res in index.duplicates:
        report.skipped.append(SkippedResource(res.name, "listed again: the same resource"))
    for res in index.items:
        if res not in used:
            report.skipped.append(SkippedResource(res.name, res.skip_reason()))
    return report


def _looks_ims(encounter: _Res, terms: Terminology) -> bool:
    """Whether an Encounter with an ims-fhir-shaped identifier says otherwise it is one.

    Its identifier system ends in ``/encounter``, as another system's may
    (``https://ehr.example.org/encounter``); ims-fhir's also has the project's profile or a
    visit type of its CodeSystem (or parts or a Provenance of ims-fhir name it). Another
    system's Encounter is skipped, not an error.
    """
    meta = encounter.data.get("meta")
    profiles = meta.get("profile") if isinstance(meta, Mapping) else None
    if isinstance(profiles, list) and any(
        isinstance(p, str) and p.split("|")[0] == Profile.ENCOUNTER.url for p in profiles
    ):
        return True
    types = encounter.data.get("type")
    for concept in types if isinstance(types, list) else []:
        codings = concept.get("coding") if isinstance(concept, Mapping) else None
        for coding in codings if isinstance(codings, list) else []:
            if isinstance(coding, Mapping) and terms.from_coding(
                _str(coding.get("system")), _str(coding.get("code")), "visit-type"
            ):
                return True
    return False


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class _Namespaces:
    """The identifier namespaces each Encounter of the input carries, itself or by its parts.

    Its own ims-fhir identifiers', and those of every part that points at it or claims one of
    its identifier values: whose encounter it is cannot be told from one identifier (another
    writer may add one of another namespace before the clinic's).
    """

    def __init__(self, index: _Index) -> None:
        self.by_value: dict[str, set[str]] = defaultdict(set)
        self.by_encounter: dict[_Res, set[str]] = defaultdict(set)
        for namespace, value in index.claims:
            self.by_value[value].add(namespace)
        for encounter, by_type in index.parts.items():
            for parts in by_type.values():
                for part in parts:
                    self.by_encounter[encounter].update(ns for ns, _, _ in part.our_identifiers())

    def of(self, encounter: _Res, ours: tuple[str, str] | None = None) -> frozenset[str]:
        found = {ours[0]} if ours is not None else set()
        for namespace, _, value in encounter.our_identifiers():
            found.add(namespace)
            found |= self.by_value.get(value.split("/", 1)[0], set())
        return frozenset(found | self.by_encounter.get(encounter, set()))


def _orphans(index: _Index, used: set[_Res], namespaces: _Namespaces) -> list[MappingError]:
    """Parts of an IMS encounter that point at an Encounter ims-fhir cannot recognise.

    Parts without their Encounter in the input (a partial export) are skipped and listed; but
    parts that point at an Encounter that is there, without the identifier ims-fhir gave it, are
    an encounter lost: that is an error.
    """
    errors = []
    seen: set[_Res] = set()
    for (namespace, encounter_id), parts in index.claims.items():
        for part in parts:
            if part in used:
                continue
            target = index.resolve(part.data.get("encounter"))
            if isinstance(target, _Res) and target not in seen and target not in used:
                seen.add(target)
                used.add(target)
                used.update(p for p in parts)
                errors.append(
                    MappingError(
                        target.name,
                        "Encounter.identifier",
                        f"the parts of IMS encounter {clip(repr(encounter_id))} point at this "
                        "Encounter, which has no ims-fhir identifier of that encounter",
                        namespaces=namespaces.of(target) | {namespace},
                    )
                )
    return errors


# -- input ---------------------------------------------------------------------------------------


class _Res:
    """One resource of the input, with where it came from."""

    __slots__ = ("_key", "_ours", "data", "full_url", "name", "pos", "type")

    def __init__(self, data: Mapping[str, Any], where: str, full_url: Any, pos: int) -> None:
        self.data = data
        # Computed once, when first asked: the resource is not changed while it is read.
        self._ours: tuple[tuple[str, Kind, str], ...] | None = None
        self._key: str | None = None
        rtype = data.get("resourceType")
        self.type = rtype if isinstance(rtype, str) else ""
        self.full_url = full_url if isinstance(full_url, str) and full_url else None
        rid = data.get("id")
        if self.type and isinstance(rid, str) and rid:
            self.name = f"{self.type}/{rid[:64]}"
        elif self.full_url is not None:
            self.name = f"{self.type or '?'}/{self.full_url[:100]}"
        else:
            self.name = f"{self.type or '?'} at {where}"
        self.pos = pos

    def keys(self) -> Iterator[str]:
        """Every reference string that may point at this resource."""
        rid = self.data.get("id")
        if self.type and isinstance(rid, str) and rid:
            yield f"{self.type}/{rid}"
        if self.full_url is not None:
            yield self.full_url
            tail = literal(self.full_url)
            if tail != self.full_url and "/" in tail:
                yield tail

    def identifiers(self) -> list[Mapping[str, Any]]:
        value = self.data.get("identifier")
        if isinstance(value, Mapping):  # 0..1 in some resource types
            return [value]
        return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []

    def our_identifiers(self) -> tuple[tuple[str, Kind, str], ...]:
        """(namespace, kind, value) of each ims-fhir identifier."""
        if self._ours is None:
            found = []
            for ident in self.identifiers():
                sys, value = ident.get("system"), ident.get("value")
                if isinstance(sys, str) and isinstance(value, str) and _unicode(sys + value):
                    parts = split_system(sys)
                    if parts is not None:
                        found.append((parts[0], parts[1], value))
            self._ours = tuple(found)
        return self._ours

    def key(self) -> str:
        """:func:`_key_of` its content."""
        if self._key is None:
            self._key = _key_of(self.data)
        return self._key

    def our_identifier(self, kind: Kind, namespace: str | None = None) -> tuple[str, str] | None:
        """(namespace, value) of its ims-fhir identifier of ``kind``, in ``namespace`` if given."""
        for found_ns, found, value in self.our_identifiers():
            if found is kind and namespace in (None, found_ns):
                return found_ns, value
        return None

    def skip_reason(self) -> str:
        if not self.type:
            return "not a FHIR resource (no resourceType)"
        if self.our_identifiers():
            return "made by ims-fhir but not linked to an IMS encounter in this input"
        return "not made by ims-fhir (no ims-fhir identifier)"


def _resources(value: Any, report: MappingReport) -> Iterator[_Res]:
    """The resources of the input, each with its place; what is not one is reported."""
    pos = 0

    def one(item: Any, where: str, full_url: Any = None) -> Iterator[_Res]:
        nonlocal pos
        if hasattr(item, "model_dump_json"):
            item = json.loads(item.model_dump_json())
        if not isinstance(item, Mapping):
            report.errors.append(MappingError(where, where, "not a FHIR resource (not an object)"))
            return
        if item.get("resourceType") == "Bundle" and not full_url:
            entries = item.get("entry")
            if entries is None:
                return
            if not isinstance(entries, list):
                report.errors.append(MappingError(where, f"{where}.entry", "not an array"))
                return
            for n, entry in enumerate(entries):
                at = f"{where}.entry[{n}]"
                if not isinstance(entry, Mapping):
                    report.errors.append(MappingError(where, at, "not an object"))
                elif not isinstance(entry.get("resource"), Mapping):
                    report.errors.append(MappingError(where, at, "no resource"))
                else:
                    pos += 1
                    yield _Res(entry["resource"], at, entry.get("fullUrl"), pos)
            return
        pos += 1
        yield _Res(item, where, full_url, pos)

    if isinstance(value, Mapping) or hasattr(value, "model_dump_json"):
        yield from one(value, "Bundle" if _is_bundle(value) else "<input>")
    elif isinstance(value, list | tuple) or (
        isinstance(value, Iterable) and not isinstance(value, str | bytes)
    ):
        for n, item in enumerate(value):
            yield from one(item, f"Bundle[{n}]" if _is_bundle(item) else f"<input>[{n}]")
    elif value is None or isinstance(value, bool | int | float | str):
        report.errors.append(MappingError("<input>", "<input>", "not a FHIR resource or Bundle"))
    else:
        raise TypeError(f"cannot read FHIR resources from {type(value).__name__}")


def _unicode(text: str) -> bool:
    """Text a FHIR string may hold: non-empty, and Unicode (JSON lets a lone surrogate in)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return bool(text)


def _is_bundle(value: Any) -> bool:
    return isinstance(value, Mapping) and value.get("resourceType") == "Bundle"


_AMBIGUOUS: Any = object()


def _same_content(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """The same resource twice: equal but for what servers rewrite (versions, narrative)."""
    try:
        return {k: v for k, v in a.items() if k not in ("meta", "text")} == {
            k: v for k, v in b.items() if k not in ("meta", "text")
        }
    except RecursionError:
        return False


class _Index:
    """Everything the rebuilds look up, built once: by type, reference, identifier, encounter."""

    def __init__(self, items: list[_Res]) -> None:
        self.by_type: dict[str, list[_Res]] = defaultdict(list)
        self.with_id: dict[str, list[_Res]] = defaultdict(list)
        self._keys: dict[str, _Res] = {}
        # The same resource listed twice (several encounters of one patient in one Bundle, or
        # a page boundary moving under a paged search) is one resource; two different ones
        # under one reference are ambiguous, and what refers to them an error.
        self.duplicates: list[_Res] = []
        self.items: list[_Res] = []
        for res in items:
            keys = list(res.keys())
            same = next((self._keys[k] for k in keys if k in self._keys), None)
            if same is not None and same is not _AMBIGUOUS and _same_content(same.data, res.data):
                self.duplicates.append(res)
                continue
            self.items.append(res)
            self.by_type[res.type].append(res)
            if isinstance(res.data.get("id"), str):
                self.with_id[res.data["id"]].append(res)
            for key in keys:
                held = self._keys.get(key)
                if held is None:
                    self._keys[key] = res
                elif held is not res:
                    self._keys[key] = _AMBIGUOUS
        # (namespace, encounter id) -> the resources whose ims-fhir identifier names a part of it
        self.claims: dict[tuple[str, str], list[_Res]] = defaultdict(list)
        for res in self.items:
            for namespace, kind, value in res.our_identifiers():
                if kind in _PART_KINDS:
                    self.claims[(namespace, value.split("/", 1)[0])].append(res)
        # encounter -> resources whose `encounter` points at it, by type
        self.parts: dict[_Res, dict[str, list[_Res]]] = defaultdict(lambda: defaultdict(list))
        for rtype in ("Observation", "Procedure", "Condition"):
            for res in self.by_type.get(rtype, ()):
                target = self.resolve(res.data.get("encounter"))
                if isinstance(target, _Res) and target.type == "Encounter":
                    self.parts[target][rtype].append(res)
        # encounter -> Provenances that name it
        self.provenances: dict[_Res, list[_Res]] = defaultdict(list)
        for res in self.by_type.get("Provenance", ()):
            targets = res.data.get("target")
            for target in targets if isinstance(targets, list) else []:
                found = self.resolve(target)
                if isinstance(found, _Res) and found.type == "Encounter":
                    self.provenances[found].append(res)

    def resolve(self, reference: Any) -> _Res | None:
        """The resource a Reference points at; None if absent; ``_AMBIGUOUS`` if two match."""
        if not isinstance(reference, Mapping):
            return None
        ref = reference.get("reference")
        if not isinstance(ref, str) or not ref:
            return None
        found = self._keys.get(ref)
        if found is None:
            found = self._keys.get(literal(ref))
        return found


# -- reading JSON with its path --------------------------------------------------------------------


class _Node:
    """A JSON object inside a resource, read with its element path kept for errors."""

    __slots__ = ("_index", "_key", "_parent", "_path", "data", "res")

    def __init__(
        self,
        res: _Res,
        path: str | None,
        data: Mapping[str, Any],
        parent: _Node | None = None,
        key: Any = None,
        index: int | None = None,
    ) -> None:
        self.res = res
        self.data = data
        # A child's path is written only if an error names it: its parent, the key in the
        # parent (the input's own key object) and its index in that array, until then.
        self._path = path
        self._parent = parent
        self._key = key
        self._index = index

    @property
    def path(self) -> str:
        if self._path is None:
            assert self._parent is not None
            path = self._parent.at(self._key)
            self._path = path if self._index is None else f"{path}[{self._index}]"
        return self._path

    def at(self, key: str | None) -> str:
        return f"{self.path}.{key}" if key else self.path

    def fail(self, key: str | None, reason: str) -> MappingError:
        return MappingError(self.res.name, self.at(key), reason)

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def obj(self, key: str) -> _Node | None:
        value = self.data.get(key)
        if value is None:
            return None
        if type(value) is not dict and not isinstance(value, Mapping):
            raise self.fail(key, "expected an object")
        return _Node(self.res, None, value, self, key)

    def need_obj(self, key: str) -> _Node:
        node = self.obj(key)
        if node is None:
            raise self.fail(key, "missing")
        return node

    def objs(self, key: str) -> list[_Node]:
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(key, "expected an array")
        out = []
        for n, item in enumerate(value):
            if type(item) is not dict and not isinstance(item, Mapping):
                raise self.fail(f"{key}[{n}]", "expected an object")
            out.append(_Node(self.res, None, item, self, key, n))
        return out

    def only(self, key: str) -> _Node | None:
        """The one object of a repeating element the record holds one of."""
        items = self.objs(key)
        if len(items) > 1:
            raise self.fail(key, f"{len(items)} given; the record holds one")
        return items[0] if items else None

    def string(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(key, "expected a non-empty string")
        if not _unicode(value):
            raise self.fail(key, "not valid Unicode (a lone surrogate)")
        return value

    def need_string(self, key: str) -> str:
        value = self.string(key)
        if value is None:
            raise self.fail(key, "missing")
        return value

    def strings(self, key: str) -> list[str]:
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(
            isinstance(v, str) and v and _unicode(v) for v in value
        ):
            raise self.fail(key, "expected an array of non-empty strings")
        return list(value)

    def boolean(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, bool):
            raise self.fail(key, "expected true or false")
        return value

    def number(self, key: str) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, "expected a number")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise self.fail(key, "number out of range")
        return number

    def integer(self, key: str) -> int | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, "expected an integer")
        if not _INT_MIN <= value <= _INT_MAX:
            raise self.fail(key, "integer out of range")
        return value

    def no_modifiers(self) -> None:
        """No ``modifierExtension`` anywhere in it: one changes what the element means."""
        # A quick look first (no paths built, only containers visited); the path is found
        # only for what it finds, or for a value JSON would not give (another Mapping).
        if type(self.data) is not dict:
            return self._no_modifiers()
        if _plainly_without_modifiers(self.data):
            return None
        stack: list[tuple[Any, int]] = [(self.data, 0)]
        while stack:
            value, depth = stack.pop()
            if depth > 64:
                return self._no_modifiers()
            if type(value) is dict:
                if value.get("modifierExtension") is not None:
                    return self._no_modifiers()
                children = value.values()
            else:
                children = value
            for child in children:
                kind = type(child)
                if kind is dict or kind is list:
                    stack.append((child, depth + 1))
                elif kind not in _LEAVES:
                    return self._no_modifiers()

    def _no_modifiers(self) -> None:
        stack: list[tuple[Any, str, int]] = [(self.data, self.path, 0)]
        while stack:
            value, path, depth = stack.pop()
            if depth > 64:
                raise MappingError(self.res.name, path, "nested too deeply")
            if isinstance(value, Mapping):
                if value.get("modifierExtension") is not None:
                    raise MappingError(
                        self.res.name,
                        f"{path}.modifierExtension",
                        "a modifier extension ims-fhir does not know",
                    )
                stack += [(v, f"{path}.{k}", depth + 1) for k, v in value.items()]
            elif isinstance(value, list):
                stack += [(v, f"{path}[{n}]", depth + 1) for n, v in enumerate(value)]


# Each line of orjson's indented output is indented two spaces a level: a container nested 65
# deep (what the walk below refuses) opens on a line indented 130 spaces or more.
_DEEP_LINE = b"\n" + b" " * 130
_PLAIN = orjson.OPT_INDENT_2 | orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS
_PLAIN |= orjson.OPT_PASSTHROUGH_DATETIME


def _plainly_without_modifiers(data: dict[str, Any]) -> bool:
    """No key ``modifierExtension`` anywhere, nothing nested 65 deep, all of it plain JSON.

    What the walk of ``no_modifiers`` finds too, known at C speed: orjson writes every key as
    it is (no escapes in a name of letters), one line per value, and refuses what is not plain
    JSON data (a subclass, a date, a dataclass, another Mapping, a key not a string, an integer
    past 64 bits, nesting past 255). False says only "look closer", never "there is one".
    """
    try:
        text = orjson.dumps(data, option=_PLAIN)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return False
    return b'"modifierExtension"' not in text and _DEEP_LINE not in text


# -- one encounter ---------------------------------------------------------------------------------


class _Rebuild:
    """Rebuilds one encounter; raises MappingError with the resource and element path."""

    def __init__(self, index: _Index, encounter: _Res, ours: tuple[str, str], terms: Terminology):
        self.index = index
        self.res = encounter
        self.enc = _Node(encounter, "Encounter", encounter.data)
        self.ns, self.enc_id = ours
        self.t = terms
        self.used: set[_Res] = {encounter}
        # Shared resources known to the clinic only by the reference to them: their key.
        self.aliases: dict[_Res, str] = {}
        self.retired: list[_Res] = []
        self.claims = index.claims.get(ours, [])
        self._claims_set = set(self.claims)
        self.live = encounter.data.get("status") != "entered-in-error"
        parts = index.parts.get(encounter)
        self.parts: Mapping[str, list[_Res]] = parts if parts is not None else {}
        # The Provenance lists the resources in the order the record gave them; servers may
        # return resources in any order, so that list (when present) is the order of pain
        # scores and needled sites. Findings are ordered by the panel's hasMember.
        self.rank: dict[_Res, int] = {}
        # What the Provenance names is what the record holds: in a retracted encounter, where
        # every part is entered in error, a part removed before the retraction is not named.
        self.listed: set[_Res] | None = None
        self.patient_res: _Res | None = None
        # Provenance has no identifier in R4: ims-fhir's is the one with the id it derives.
        # Found by that id, whatever its targets say (they are checked against the record).
        prov_id = provenance_id(self.ns, self.enc_id)
        linked = [p for p in index.provenances.get(encounter, ()) if p.data.get("id") == prov_id]
        linked += [r for r in index.with_id.get(prov_id, ()) if r not in linked]
        self.provenances = linked

    @property
    def claimed(self) -> set[_Res]:
        """What this encounter accounts for, mapped or not: never listed as skipped."""
        return self.used | set(self.retired) | self._claims_set | set(self.provenances)

    # -- helpers -------------------------------------------------------------------------------

    def use(self, res: _Res) -> _Res:
        self.used.add(res)
        return res

    def resolve(self, node: _Node, key: str, reference: _Node | None) -> _Res | None:
        if reference is None:
            return None
        found = self.index.resolve(reference.data)
        if found is _AMBIGUOUS:
            raise node.fail(key, "reference matches more than one resource in the input")
        if found is None and reference.has("reference"):
            reference.string("reference")  # a non-string reference is named as such
        return found

    def shared_identifier(
        self, target: _Res, node: _Node, key: str, kind: Kind
    ) -> tuple[str, str] | None:
        """(namespace, value) of the clinic's identifier of the shared resource ``node.key``.

        The resource's own, else the one the reference carries (``Reference.identifier``): on
        a regional record the resource may be one the region (or another clinic) holds, without
        the clinic's identifier (see sync/matching.py). Both, disagreeing, is an error.
        """
        for ident in _Node(target, target.type or "resource", target.data).objs("identifier"):
            if ident.string("system") == _system(self.ns, kind) and not ident.string("value"):
                raise ident.fail("value", "the clinic's identifier without a value")
        own = target.our_identifier(kind, self.ns)
        reference = node.obj(key)
        identifier = reference.obj("identifier") if reference is not None else None
        if identifier is None or identifier.string("system") != _system(self.ns, kind):
            return own
        value = identifier.string("value")
        if not value or (own is not None and own[1] != value):
            raise identifier.fail("value", f"not the clinic's identifier of {key}'s target")
        if own is None:
            # Its key as the record maps it again: its identifiers and the clinic's.
            listed = target.data.get("identifier")
            mine = {"system": _system(self.ns, kind), "value": value}
            self.aliases[target] = _key_of(
                {**target.data, "identifier": [*(listed if isinstance(listed, list) else []), mine]}
            )
        return self.ns, value

    def resolve_required(self, node: _Node, key: str, rtype: str) -> _Res:
        target = self.resolve(node, key, node.need_obj(key))
        if target is None:
            raise node.fail(key, "reference does not resolve in the input")
        if target.type != rtype:
            raise node.fail(key, f"reference is to a {target.type or 'non-resource'}, not {rtype}")
        return self.use(target)

    def codes(self, concept: _Node, group: str) -> set[str]:
        found = set()
        for coding in concept.objs("coding"):
            system, code = coding.string("system"), coding.string("code")
            local = self.t.from_coding(system, code, group)
            if local is not None:
                found.add(local)
        if len(found) > 1:
            raise concept.fail("coding", f"codings disagree: {sorted(found)}")
        return found

    def code(self, concept: _Node | None, group: str, parent: _Node, key: str) -> str:
        found = self.codes(concept, group) if concept is not None else set()
        if not found:
            raise (concept or parent).fail(
                None if concept else key, f"no coding of a known {group}"
            )
        return next(iter(found))

    def expect(self, node: _Node, local: str) -> None:
        """The resource's ``code`` is the one ims-fhir gives this kind of part."""
        group = self.t.group_of(local) or ""
        if self.code(node.obj("code"), group, node, "code") != local:
            raise node.fail("code", f"not {local}")

    def optional_code(self, concept: _Node | None, group: str) -> str | None:
        found = self.codes(concept, group) if concept is not None else set()
        return next(iter(found)) if found else None

    def quantity(self, node: _Node, key: str, unit: str) -> float:
        q = node.need_obj(key)
        if q.has("comparator"):  # a modifier: "< 10" is not 10
            raise q.fail("comparator", "a bound, not a value the record can hold")
        value = q.number("value")
        if value is None:
            raise q.fail("value", "missing")
        expected = self.t.convention(f"unit-{unit}")
        code, system = q.string("code"), q.string("system")
        if code is not None or system is not None:
            # qty-3: a unit code has its system.
            if (system, code) != (expected.system, expected.code):
                raise q.fail("code", f"unit {system}|{code}; ims-fhir records {expected.code}")
        elif q.string("unit") not in {expected.code, expected.display}:
            raise q.fail("unit", f"no unit or not {expected.code}")
        return value

    def part(self, res: _Res, kind: Kind, middle: str) -> str | None:
        """The part id after ``<encounter>/<middle>/`` in the resource's identifier, or None."""
        ours = res.our_identifier(kind)
        if ours is None or ours[0] != self.ns:
            return None
        prefix = f"{self.enc_id}/{middle}"
        if ours[1] == prefix:
            return ""
        if ours[1].startswith(prefix + "/"):
            return ours[1][len(prefix) + 1 :] or None
        return None

    def of_type(self, rtype: str) -> list[_Res]:
        return self.parts.get(rtype, [])

    def is_retired(self, res: _Res) -> bool:
        """A part the record no longer holds: entered in error while its encounter is not."""
        node = _Node(res, res.type, res.data)
        if res.type == "Condition":
            status = node.obj("verificationStatus")
            codes = {c.string("code") for c in status.objs("coding")} if status else set()
            retired = "entered-in-error" in codes
        else:
            retired = node.string("status") == "entered-in-error"
        if not retired:
            return False
        if self.live or (self.listed is not None and res not in self.listed):
            self.retired.append(res)
            return True
        return False

    # -- the record ----------------------------------------------------------------------------

    def run(self) -> Encounter:
        enc = self.enc
        enc.no_modifiers()
        self.read_provenance()
        period = enc.need_obj("period")
        data: JSON = {
            "id": self.enc_id,
            "clinic": self.clinic(),
            "patient": self.patient(),
            "practitioner": self.practitioner(),
            "start": period.need_string("start"),
            "end": period.need_string("end"),
        }
        self.read_fields(enc, Profile.ENCOUNTER, data)
        recorded_at: _Node | None = None
        for prov in self.provenances:  # when the record was made (the end: not given)
            recorded_at = _Node(prov, "Provenance", prov.data)
            recorded = recorded_at.string("recorded")
            if recorded is not None:
                data["recorded"] = recorded
        if enc.string("status") == "entered-in-error":
            data["retracted"] = True
        observations = self.of_type("Observation")
        findings = self.findings(observations)
        assessment = self.assessment(observations, findings)
        if assessment is not None:
            data["assessment"] = assessment
        pain = self.pain(observations)
        if pain:
            data["pain"] = pain
        treatment = self.treatment()
        if treatment is not None:
            data["treatment"] = treatment
        self.account_for_claims()
        try:
            return Encounter.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            if recorded_at is not None and (
                first["loc"][:1] == ("recorded",) or "('recorded')" in first["msg"]
            ):
                # When the record was made is the Provenance's to say: name it there.
                raise recorded_at.fail("recorded", first["msg"]) from exc
            path = ".".join(str(p) for p in first["loc"]) or "<record>"
            raise MappingError(
                self.res.name, path, f"rebuilt record is invalid: {first['msg']}"
            ) from exc

    def read_provenance(self) -> None:
        if len(self.provenances) > 1:
            names = ", ".join(p.name for p in self.provenances[:3])
            raise self.enc.fail(None, f"more than one ims-fhir Provenance names it: {names}")
        for prov in self.provenances:
            node = _Node(prov, "Provenance", prov.data)
            if prov.type != "Provenance":
                raise node.fail("resourceType", "has the id of this encounter's Provenance")
            node.no_modifiers()
            self.listed = set()
            for n, target in enumerate(node.objs("target")):
                found = self.resolve(node, f"target[{n}]", target)
                if found is None:
                    raise node.fail(f"target[{n}]", "names a resource not in the input")
                self.listed.add(found)
                self.rank.setdefault(found, n)

    def ordered(self, items: list[_Res]) -> list[_Res]:
        base = len(self.rank)
        return sorted(items, key=lambda r: self.rank.get(r, base + r.pos))

    def check_links(self, record: Encounter) -> None:
        """What the record implies but does not hold is what the resources say.

        Links between the parts (``hasMember``, ``partOf``, ``reasonReference``, ``evidence``,
        the Provenance's ``target``) and what ims-fhir derives from the encounter (statuses,
        performers, dates, the consent's scope) are not fields of the record; they follow from
        it. Mapping the record forward again and comparing those elements (references by the
        identifiers of what they point at, instants by instant, codings by system and code)
        finds a source that says something the record would not: a procedure ``not-done``, a
        diagnosis ``refuted``, another performer, links to other parts.
        """
        forward = bundle_dict(record, checked=True)["entry"]
        forward_keys = [_key_of(e["resource"]) for e in forward]
        keys = {e["fullUrl"]: k for e, k in zip(forward, forward_keys, strict=True)}
        systems = self.t.systems()
        mine = {r.key(): r for r in self.used | set(self.provenances)}

        memo: dict[str, str] = {}

        def forward_key(ref: str) -> str:
            return keys.get(ref, ref)

        def key_in_source(ref: str) -> str:
            known = memo.get(ref)
            if known is None:
                target = self.index.resolve({"reference": ref})
                if not isinstance(target, _Res):
                    known = ref
                else:
                    known = self.aliases.get(target) or target.key()
                memo[ref] = known
            return known

        encounter = next(
            e["resource"] for e in forward if e["resource"]["resourceType"] == "Encounter"
        )
        for entry, forward_key_of in zip(forward, forward_keys, strict=True):
            resource = entry["resource"]
            source = mine.get(forward_key_of)
            if source is None:
                continue
            node = _Node(source, source.type, source.data)
            earlier = _earlier_shape(resource, encounter)
            data = source.data
            for element in _DERIVED:
                ours, theirs = resource.get(element), data.get(element)
                if ours is None and theirs is None and element not in earlier:
                    continue  # neither says anything (most elements, most resources)
                if element == "contained":
                    if source.type in SHARED_TYPES:
                        continue  # the region's (a patient's contained GP): not the record's
                    ours, theirs = without_contained_ids(ours), without_contained_ids(theirs)
                if _agree(ours, theirs, forward_key, key_in_source):
                    continue  # the same but for how references name the same resources
                want = _normal(ours, forward_key, systems)
                got = _normal(theirs, key_in_source, systems)
                if got != want and any(
                    # What an earlier version wrote for the same record is read as well.
                    got == _normal(old, forward_key, systems)
                    for old in earlier.get(element, ())
                ):
                    continue
                if got != want:
                    raise node.fail(
                        element, f"says {_short(got)}; the record implies {_short(want)}"
                    )

    def account_for_claims(self) -> None:
        """Every resource that carries one of this encounter's identifiers was read or retired."""
        done = self.used | set(self.retired) | set(self.provenances)
        for res in self.claims:
            if res not in done:
                ident = next(v for ns, _, v in res.our_identifiers() if ns == self.ns)
                raise MappingError(
                    res.name,
                    f"{res.type or 'resource'}.identifier",
                    f"carries identifier {clip(repr(ident))} of this encounter but is not one "
                    "of its parts (a duplicate, or not linked to it by encounter)",
                )

    def clinic(self) -> JSON:
        org = self.resolve_required(self.enc, "serviceProvider", "Organization")
        ours = self.shared_identifier(org, self.enc, "serviceProvider", Kind.ORGANIZATION)
        node = _Node(org, "Organization", org.data)
        node.no_modifiers()
        if ours is None:
            raise node.fail("identifier", "no ims-fhir organization identifier")
        out = self.read_fields(node, Profile.ORGANIZATION, {"id": ours[1]})
        registered = self.foreign_identifiers(node, Kind.ORGANIZATION)
        if registered:
            out["identifiers"] = registered
        if self.ns != default_namespace(ours[1]):
            out["namespace"] = self.ns
        return out

    def human_name(self, node: _Node) -> JSON:
        names = node.objs("name")
        if not names:
            raise node.fail("name", "missing")
        name = names[0]
        out: JSON = {"family": name.string("family")}
        given = name.strings("given")
        if given:
            out["given"] = given
        return out

    def _kind(self, ident: _Node) -> str:
        concept = ident.obj("type")
        for coding in concept.objs("coding") if concept else []:
            pair = (coding.string("system"), coding.string("code"))
            for kind in ("health-card", "licence"):
                expected = self.t.convention(f"identifier-type-{kind}")
                if pair == (expected.system, expected.code):
                    return kind
        return "other"

    def foreign_identifiers(self, node: _Node, kind: Kind) -> list[JSON]:
        """Identifiers other than this clinic's own (another system's may end in /patient)."""
        out = []
        for ident in node.objs("identifier"):
            system = ident.string("system")
            if system == _system(self.ns, kind):
                continue
            out.append(
                {"system": system, "value": ident.string("value"), "kind": self._kind(ident)}
            )
        return out

    def known_displays(self, node: _Node, depth: int = 0) -> None:
        """Each coding under ``node`` of a code the mapping knows displays that code, or nothing.

        A display is what most systems show: one naming another concept (the other side) is a
        contradiction, not a detail.
        """
        if depth > 8:
            return
        for key, value in node.data.items():
            if key == "coding" and isinstance(value, list):
                for n, coding in enumerate(value):
                    if not isinstance(coding, Mapping):
                        continue
                    system, code, shown = (coding.get(k) for k in ("system", "code", "display"))
                    if not (isinstance(system, str) and isinstance(code, str)) or shown is None:
                        continue
                    known = self.t.displays(system, code)
                    if known and (not isinstance(shown, str) or shown not in known):
                        raise node.fail(
                            f"coding[{n}].display",
                            f"{clip(repr(shown))}, but {code} is {min(known)!r}",
                        )
            elif isinstance(value, Mapping):
                self.known_displays(_Node(node.res, None, value, node, key), depth + 1)
            elif isinstance(value, list):
                for n, item in enumerate(value):
                    if isinstance(item, Mapping):
                        self.known_displays(_Node(node.res, None, item, node, key, n), depth + 1)

    def local_type(self, node: _Node, kind: Kind) -> None:
        """The clinic's own identifier of ``node`` has its type, or none (earlier versions)."""
        want = self.t.convention(LOCAL_IDENTIFIER_TYPES[kind])
        for ident in node.objs("identifier"):
            concept = (
                ident.obj("type") if ident.string("system") == _system(self.ns, kind) else None
            )
            if concept is not None and not any(
                (c.string("system"), c.string("code")) == (want.system, want.code)
                for c in concept.objs("coding")
            ):
                raise concept.fail(
                    "coding", f"the clinic's {kind.value} number is typed {want.code}"
                )

    def patient(self) -> JSON:
        p = self.patient_res = self.resolve_required(self.enc, "subject", "Patient")
        ours = self.shared_identifier(p, self.enc, "subject", Kind.PATIENT)
        node = _Node(p, "Patient", p.data)
        node.no_modifiers()
        if ours is None:
            raise node.fail("identifier", "no ims-fhir patient identifier")
        self.local_type(node, Kind.PATIENT)
        out = {
            "id": ours[1],
            "identifiers": self.foreign_identifiers(node, Kind.PATIENT),
            "name": self.human_name(node),
        }
        return self.read_fields(node, Profile.PATIENT, out)

    def practitioner(self) -> JSON:
        participant = self.enc.only("participant")
        if participant is None:
            raise self.enc.fail("participant", "missing")
        pr = self.resolve_required(participant, "individual", "Practitioner")
        ours = self.shared_identifier(pr, participant, "individual", Kind.PRACTITIONER)
        node = _Node(pr, "Practitioner", pr.data)
        node.no_modifiers()
        if ours is None:
            raise node.fail("identifier", "no ims-fhir practitioner identifier")
        self.local_type(node, Kind.PRACTITIONER)
        out: JSON = {"id": ours[1], "name": self.human_name(node)}
        licences = self.foreign_identifiers(node, Kind.PRACTITIONER)
        if licences:
            out["licence"] = licences[0]
        return out

    def read_fields(self, node: _Node, profile: Profile, out: JSON) -> JSON:
        """Read the fields the mapping spec keeps in ``node``'s plain elements into ``out``.

        A required one that is missing is an error, and so is a container (``note``,
        ``bodySite``) without the value the record keeps in it.
        """
        for rule in spec().elements_of(profile.value):
            parent: _Node | None = node
            *containers, (key, listed) = rule.steps
            for name, first in containers:
                assert parent is not None
                parent = parent.only(name) if first else parent.obj(name)
                if parent is None:
                    break
            if parent is not None and key.startswith("value"):
                _one_value(parent, key)
            value = None if parent is None else self.element_value(rule, parent, key, listed)
            if value is None:
                if rule.min or (containers and parent is not None):
                    where = key if parent else rule.at
                    raise (parent or node).fail(where, f"missing (the record's {rule.path})")
                continue
            out[rule.field] = value
        return out

    def element_value(self, rule: Element, node: _Node, key: str, listed: bool) -> Any:
        if rule.type == "CodeableConcept":
            assert rule.vocabulary is not None
            concept = node.only(key) if listed else node.obj(key)
            return None if concept is None else self.code(concept, rule.vocabulary, node, key)
        if rule.type == "Quantity":
            assert rule.unit is not None
            return None if node.obj(key) is None else self.quantity(node, key, rule.unit)
        if rule.type == "boolean":
            return node.boolean(key)
        return node.string(key)

    def read_slots(
        self, parent: _Node, element: str, profile: Profile, container: str, out: JSON, what: str
    ) -> None:
        """Read the fields the mapping spec keeps in ``parent``'s extensions or components.

        Another system's extensions are left alone; a component ims-fhir does not write, a
        second value of a field that holds one, or a missing required one is an error.
        """
        extension = element == "extension"
        slots, by_key = _slots_by_key(profile.value, container, extension)
        for node in parent.objs(element):
            key = (
                node.need_string("url")
                if extension
                else self.optional_code(node.obj("code"), "observation-element")
            )
            slot = by_key.get(key or "")
            if slot is None:
                if extension and key not in _OUR_EXTENSION_URLS:
                    continue  # another system's extension
                if (
                    key == _TARGET
                    and profile is Profile.NEEDLED_SITE
                    and container == PROCEDURE_EXTENSION
                ):
                    continue  # read apart (site())
                where, kind = ("url", "an extension") if extension else ("code", "a component")
                raise node.fail(where, f"not {kind} ims-fhir writes on {what}")
            value = self.slot_value(slot, node)
            if slot.repeats:
                out.setdefault(slot.field, []).append(value)
            else:
                self.once(out, slot.field, node)
                out[slot.field] = value
        for slot in slots:
            if slot.min and slot.field not in out:
                raise parent.fail(element, f"no {slot.key}")

    def slot_value(self, slot: Slot, node: _Node) -> Any:
        key = slot.value_key
        _one_value(node, key if slot.type != "complex" else None)
        if slot.type == "complex":
            parts: dict[str, _Node] = {}
            known = {part.url for part in slot.parts}
            for sub in node.objs("extension"):
                name = sub.need_string("url")
                if name in parts:
                    raise sub.fail("url", f"a second {name}")
                if name not in known:
                    raise sub.fail("url", f"not a part of {slot.key}")
                parts[name] = sub
            out: JSON = {}
            for part in slot.parts:
                if part.url not in parts:
                    raise node.fail("extension", f"no {part.url}")
                out[part.field] = self.slot_value(part, parts[part.url])
            return out
        if slot.type == "Quantity":
            assert slot.unit is not None
            return self.quantity(node, key, slot.unit)
        if slot.type == "CodeableConcept":
            assert slot.vocabulary is not None
            return self.code(node.obj(key), slot.vocabulary, node, key)
        if slot.type == "string":
            return node.need_string(key)
        value = node.integer(key)
        if value is None:
            raise node.fail(key, "missing")
        return value

    def ours(self, res: _Res) -> _Node:
        """A part of the encounter, about the encounter's patient."""
        node = _Node(res, res.type, res.data)
        node.no_modifiers()
        key = "patient" if res.type == "Consent" else "subject"
        if self.resolve_required(node, key, "Patient") is not self.patient_res:
            raise node.fail(key, "not the encounter's patient")
        self.use(res)
        return node

    def findings(self, observations: list[_Res]) -> list[JSON]:
        out = []
        for res in observations:
            fid = self.part(res, Kind.OBSERVATION, "finding")
            if not fid or self.is_retired(res):
                continue
            obs = self.ours(res)
            f = self.read_fields(obs, Profile.FINDING, {"id": fid})
            site = obs.obj("bodySite")
            if site is not None:
                muscle = self.optional_code(site, "muscle")
                if muscle:
                    f["muscle"] = muscle
                elif site.objs("coding"):
                    # Codings, none of them a muscle ims-fhir knows: the text alone (which
                    # names the muscle too) must not turn a coded muscle into a region.
                    raise site.fail("coding", "no muscle code ims-fhir knows")
                text = site.string("text")
                if text and not (muscle and text == self.t.local(muscle).display):
                    f["region"] = text
                extensions = OBSERVATION_BODY_SITE_EXTENSION
                self.read_slots(site, "extension", Profile.FINDING, extensions, f, "a body site")
            self.read_slots(obs, "component", Profile.FINDING, COMPONENT, f, "a finding")
            out.append(f)
        return out

    @staticmethod
    def once(record: JSON, key: str, node: _Node) -> None:
        if key in record:
            raise node.fail(None, f"a second {key}; the record holds one")

    def assessment(self, observations: list[_Res], findings: list[JSON]) -> JSON | None:
        panels = [o for o in observations if self.part(o, Kind.OBSERVATION, "assessment") == ""]
        live = [p for p in panels if not self.is_retired(p)]
        if len(live) > 1:
            raise _Node(live[1], "Observation", live[1].data).fail(
                "identifier", "a second assessment panel"
            )
        if not live:
            if findings:
                raise self.enc.fail(None, "findings without an assessment panel")
            return None
        panel = self.ours(live[0])
        self.expect(panel, "gunn-assessment-panel")
        finding_res = {r for r in self.used if self.part(r, Kind.OBSERVATION, "finding") and r.type}
        order: dict[str, int] = {}
        for n, member in enumerate(panel.objs("hasMember")):
            target = self.resolve(panel, f"hasMember[{n}]", member)
            if target is None:
                raise panel.fail(f"hasMember[{n}]", "member not in the input")
            if target not in finding_res:
                raise panel.fail(
                    f"hasMember[{n}]", f"{target.name} is not a finding of this encounter"
                )
            fid = self.part(target, Kind.OBSERVATION, "finding")
            if fid in order:
                raise panel.fail(f"hasMember[{n}]", f"finding {clip(repr(fid))} listed twice")
            order[str(fid)] = n
        missing = [f["id"] for f in findings if f["id"] not in order]
        if missing:
            raise panel.fail("hasMember", f"findings {missing} are not members")
        a: JSON = {"findings": sorted(findings, key=lambda f: order[f["id"]])}
        self.read_slots(panel, "component", Profile.ASSESSMENT_PANEL, COMPONENT, a, "the panel")
        self.read_fields(panel, Profile.ASSESSMENT_PANEL, a)
        conditions = [
            c
            for c in self.of_type("Condition")
            if self.part(c, Kind.CONDITION, "diagnosis") == "" and not self.is_retired(c)
        ]
        if len(conditions) > 1:
            raise _Node(conditions[1], "Condition", conditions[1].data).fail(
                "identifier", "a second diagnosis"
            )
        for res in conditions:
            cond = self.ours(res)
            a["diagnosis"] = self.read_fields(cond, Profile.DIAGNOSIS, {})
        return a

    def pain(self, observations: list[_Res]) -> list[JSON]:
        out = []
        for res in self.ordered(observations):
            pid = self.part(res, Kind.OBSERVATION, "pain")
            if not pid or self.is_retired(res):
                continue
            obs = self.ours(res)
            self.expect(obs, "pain-score")
            p: JSON = {"id": pid}
            self.read_slots(obs, "component", Profile.PAIN_SCORE, COMPONENT, p, "a pain score")
            self.read_fields(obs, Profile.PAIN_SCORE, p)
            site = obs.obj("bodySite")
            if site is not None and site.data.get("coding") is not None:
                # Where the patient feels it is the patient's words; a code would be dropped.
                raise site.fail("coding", "ims-fhir writes a pain location as text only")
            if p["nrs"] != int(p["nrs"]):
                raise obs.fail("valueQuantity.value", "NRS must be a whole number")
            p["nrs"] = int(p["nrs"])
            out.append(p)
        return out

    def treatment(self) -> JSON | None:
        procedures = self.of_type("Procedure")
        sessions = [p for p in procedures if self.part(p, Kind.PROCEDURE, "session") == ""]
        if len(sessions) > 1:
            raise _Node(sessions[1], "Procedure", sessions[1].data).fail(
                "identifier", "a second session"
            )
        if not sessions:
            return None
        session = self.ours(sessions[0])
        self.expect(session, "ims-session")
        t: JSON = {}
        session_slots = _slots_by_key(Profile.SESSION.value, PROCEDURE_EXTENSION, True)[1]
        for ext in session.objs("extension"):
            url = ext.need_string("url")
            if url in _OUR_EXTENSION_URLS and url not in _CONSENT_LINKS | session_slots.keys():
                raise ext.fail("url", "not an extension ims-fhir writes on a session")
            if url in _CONSENT_LINKS:
                consent = self.resolve(ext, "valueReference", ext.obj("valueReference"))
                if consent is None or consent.type != "Consent":
                    raise ext.fail("valueReference", "does not resolve to a Consent in the input")
                if "consent" in t:
                    raise ext.fail(None, "a second consent")
                t["consent"] = self.consent(self.ours(consent))
        sites = []
        for res in self.ordered(procedures):
            sid = self.part(res, Kind.PROCEDURE, "site")
            if sid and not self.is_retired(res):
                node = self.ours(res)
                self.expect(node, "ims-needled-site")
                sites.append(self.site(node, sid))
        if sites:
            t["sites"] = sites
        events = []
        for comp in session.objs("complication"):
            e: JSON = {"kind": self.code(comp, "adverse-event", session, "complication")}
            self.read_slots(
                comp, "extension", Profile.SESSION, COMPLICATION_EXTENSION, e, "a complication"
            )
            events.append(e)
        if events:
            t["adverse_events"] = events
        return self.read_fields(session, Profile.SESSION, t)

    def consent(self, consent: _Node) -> JSON:
        if not consent.has("policy") and not consent.has("policyRule"):
            raise consent.fail("policy", "missing, and no policyRule either (R4 ppc-1)")
        performer = consent.only("performer")
        if performer is None:
            raise consent.fail("performer", "missing")
        target = self.resolve(consent, "performer[0]", performer)
        if target is not None and target.type == "Patient":
            by = "patient"
        else:
            by = performer.need_string("display")
        provision = consent.need_obj("provision")
        extra = sorted(set(provision.data) - {"type", "id", "extension"})
        if extra:  # nested rules, periods, actors: a consent the record cannot hold
            raise provision.fail(extra[0], "a provision ims-fhir does not write")
        decision = provision.need_string("type")
        if decision not in ("permit", "deny"):
            raise provision.fail("type", "neither permit nor deny")
        out = self.read_fields(consent, Profile.CONSENT, {"given": decision == "permit", "by": by})
        source = consent.obj("sourceReference")
        if source is not None:
            # The signed form, by the clinic's form number (to_fhir.py consent()).
            if source.need_string("type") != "DocumentReference":
                raise source.fail("type", "not a DocumentReference")
            ident = source.need_obj("identifier")
            if ident.string("system") != _system(self.ns, Kind.CONSENT_FORM):
                raise ident.fail("system", "not the clinic's consent form system")
            out["form_reference"] = ident.need_string("value")
        return out

    def site(self, proc: _Node, sid: str) -> JSON:
        s = self.read_fields(proc, Profile.NEEDLED_SITE, {"id": sid})
        body_site = proc.only("bodySite")
        assert body_site is not None  # the muscle, required, was read from it
        site = Profile.NEEDLED_SITE
        self.read_slots(body_site, "extension", site, BODY_SITE_EXTENSION, s, "a body site")
        # The side as a contained BodyStructure (to_fhir.py site()); its content is checked
        # with what the record implies (check_links), the link to it here. Earlier versions
        # wrote neither.
        targets = [x for x in proc.objs("extension") if x.string("url") == _TARGET]
        if len(targets) > 1:
            raise targets[1].fail("url", "a second target body structure")
        if targets:
            _one_value(targets[0], "valueReference")
            extra = sorted(set(targets[0].data) - {"url", "valueReference"})
            if extra:
                raise targets[0].fail(extra[0], "beside the link to the target body structure")
            link = targets[0].need_obj("valueReference")
            reference = link.string("reference")
            # A contained resource's id is local to its resource: a server may assign its own
            # ('#1' for ims-fhir's '#site'); the link names the one BodyStructure contained.
            named = [
                c
                for c in proc.objs("contained")
                if reference == f"#{c.string('id')}" and c.string("resourceType") == "BodyStructure"
            ]
            if set(link.data) != {"reference"} or len(named) != 1:
                raise link.fail("reference", "not the contained BodyStructure of the site")
        for where in (*proc.objs("bodySite"), *proc.objs("contained")):
            self.known_displays(where)
        if bool(targets) != proc.has("contained"):
            raise proc.fail(
                "contained", "a target body structure without its link, or a link without it"
            )
        self.read_slots(
            proc, "extension", Profile.NEEDLED_SITE, PROCEDURE_EXTENSION, s, "a needled site"
        )
        if isinstance(s.get("dwell_time_s"), float) and s["dwell_time_s"].is_integer():
            s["dwell_time_s"] = int(s["dwell_time_s"])
        return s


# Elements the record implies without holding them, checked against what the source says:
# links between the parts, and what ims-fhir derives from the encounter (to_fhir.py).
_DERIVED = (
    "hasMember",
    "partOf",
    "reasonReference",
    "evidence",
    "target",
    "status",
    "statusReason",
    "verificationStatus",
    "clinicalStatus",
    "performer",
    "recorder",
    "effectiveDateTime",
    "performedPeriod",
    "recordedDate",
    "scope",
    "recorded",
    "occurredPeriod",
    "activity",
    "agent",
    "contained",
    "policy",
    "policyRule",
    "subject",
    "participant",
    "serviceProvider",
)


@functools.cache
def _slots_by_key(
    profile: str, container: str, extension: bool
) -> tuple[tuple[Slot, ...], dict[str, Slot]]:
    """A profile's slots in ``container``, and by URL (extensions) or component code."""
    slots = tuple(spec().slots_of(profile, container))
    return slots, {slot.url if extension else slot.key: slot for slot in slots}


def _one_value(node: _Node, key: str | None) -> None:
    """Only the value ims-fhir writes (``key``; None: none), and no reason it is absent."""
    others = sorted(k for k in node.data if k.startswith("value") and k != key)
    if others:
        raise node.fail(others[0], "a value ims-fhir does not write beside its own")
    if key is not None and "dataAbsentReason" in node.data:
        raise node.fail("dataAbsentReason", "a reason the value is absent, beside the value")


def _earlier_shape(resource: JSON, encounter: JSON) -> dict[str, list[Any]]:
    """Derived elements as earlier versions wrote them, where they differ from today's.

    For each element, the shapes an earlier version wrote for the same record. A session not
    done had no ``statusReason``, and the encounter's period and practitioner as
    ``performedPeriod`` and ``performer`` (tests/data/earlier holds such a Bundle); an encounter
    referred to its patient, practitioner and clinic without their identifiers (0.1), then with
    the practitioner's untyped; a Provenance had no ``occurredPeriod`` and no ``activity``; a
    Consent had ``policyRule`` OPTIN and no ``policy``; a needled site had no contained
    BodyStructure.
    """
    kind = resource["resourceType"]
    if kind == "Provenance":
        return {"occurredPeriod": [None], "activity": [None]}  # neither was written
    if kind == "Consent":
        opt_in = terminology().convention("consent-policy-opt-in")
        return {"policy": [None], "policyRule": [{"coding": [opt_in.as_fhir()]}]}
    if kind == "Encounter":
        participants = resource["participant"]
        untyped = [
            {"individual": {**p["individual"], "identifier": _untyped(p["individual"])}}
            for p in participants
        ]
        # References without the clinic's identifier of their targets (sync/matching.py).
        return {
            "subject": [{"reference": resource["subject"]["reference"]}],
            "participant": [
                [{"individual": {"reference": p["individual"]["reference"]}} for p in participants],
                untyped,
            ],
            "serviceProvider": [{"reference": resource["serviceProvider"]["reference"]}],
        }
    if kind != "Procedure":
        return {}
    if "contained" in resource:
        return {"contained": [None]}
    if "statusReason" not in resource:
        return {}
    actor = encounter["participant"][0]["individual"]
    return {
        "statusReason": [None],
        "performedPeriod": [encounter["period"]],
        # A reference only: the clinic's identifier in it came later (sync/matching.py).
        "performer": [[{"actor": {"reference": actor["reference"]}}]],
    }


def _untyped(reference: JSON) -> JSON:
    return {k: v for k, v in reference["identifier"].items() if k != "type"}


def _normal(value: Any, key: Callable[[str], str], systems: set[str], depth: int = 0) -> Any:
    """An element as its meaning, to compare two copies of it.

    References become the keys of what they point at, instants are in UTC, codings are the set
    of those in systems ims-fhir uses (a terminology service may add others); no displays.
    """
    if depth > 20:
        return "<too deep>"
    kind = type(value)  # JSON's own types first: isinstance of an ABC costs a lookup each time
    if value is None or kind is bool or kind is int or kind is float:
        return value
    if kind is list:
        return [_normal(v, key, systems, depth + 1) for v in value]
    if kind is not dict and kind is not str and not isinstance(value, Mapping | list | str):
        return value
    if kind is dict or isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k == "reference" and isinstance(v, str):
                out[k] = key(v)
            elif k == "coding" and isinstance(v, list):
                out[k] = sorted(
                    {
                        f"{c.get('system')}|{_emitted(c.get('system'), c.get('code'))}"
                        for c in v
                        if not isinstance(c, Mapping) or _str(c.get("system")) in systems
                    }
                    if all(isinstance(c, Mapping) for c in v)
                    else {json.dumps(v, default=str)}
                )
            elif k != "display":
                out[k] = _normal(v, key, systems, depth + 1)
        return out
    if isinstance(value, list):
        return [_normal(v, key, systems, depth + 1) for v in value]
    if isinstance(value, str) and len(value) > 10 and value[4:5] == "-" and "T" in value:
        try:
            instant = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
        if instant.tzinfo is not None:
            try:
                return instant.astimezone(dt.UTC).isoformat()
            except OverflowError:  # 9999-12-31T23:59:59-14:00 is past the last UTC instant
                return value
    return value


def _agree(
    ours: Any, theirs: Any, key: Callable[[str], str], other: Callable[[str], str], depth: int = 0
) -> bool:
    """Are two copies of an element the same JSON but for how their references are written?

    Each ``reference`` string in ``ours``, read through ``key``, names what the one in its
    place in ``theirs`` names through ``other`` (a ``urn:uuid`` and ``Patient/123`` for one
    patient); everything else is equal, of the same JSON type. Their :func:`_normal` forms are
    then equal (references are all it reads through a key function), so comparing them that
    way can be skipped. False says only "compare them": where it cannot tell (nesting past
    :func:`_normal`'s depth, codings, which it reads otherwise) or where they differ at all.
    """
    if depth > 20:
        return False
    kind = type(ours)
    if kind is dict:
        if type(theirs) is not dict or ours.keys() != theirs.keys():
            return False
        for k, v in ours.items():
            w = theirs[k]
            if k == "reference" and type(v) is str:
                if type(w) is not str or key(v) != other(w):
                    return False
            elif k == "coding":
                # Read as a set of codes when all are objects: the same objects, the same set.
                if not (
                    type(v) is list
                    and all(type(c) is dict for c in v)
                    and _agree(v, w, _itself, _itself, depth + 1)
                ):
                    return False
            elif not _agree(v, w, key, other, depth + 1):
                return False
        return True
    if kind is list:
        return (
            type(theirs) is list
            and len(ours) == len(theirs)
            and all(_agree(v, w, key, other, depth + 1) for v, w in zip(ours, theirs, strict=True))
        )
    return kind in _LEAVES and type(theirs) is kind and ours == theirs


def _itself(text: str) -> str:
    return text


def _emitted(system: Any, code: Any) -> Any:
    """A code as the concept it stands for: the one ims-fhir emits for it (TERMINOLOGY.md)."""
    if isinstance(system, str) and isinstance(code, str):
        return terminology().emitted_code(system, code)
    return code


def _short(value: Any) -> str:
    return clip(json.dumps(value, ensure_ascii=False, default=str))


def _key_of(resource: Mapping[str, Any]) -> str:
    """What a resource is, whoever assigned its id.

    Its identifiers that look like ims-fhir's (all of them, sorted: another system's may end in
    ``/patient`` too), or its type.
    """
    if resource.get("resourceType") == "Provenance":
        return "Provenance"
    identifiers = resource.get("identifier")
    keys = sorted(
        f"{ident['system']}|{ident.get('value')}"
        for ident in (identifiers if isinstance(identifiers, list) else [])
        if isinstance(ident, Mapping)
        and isinstance(ident.get("system"), str)
        and split_system(ident["system"]) is not None
    )
    return " ".join(keys) if keys else f"{resource.get('resourceType')}?"
