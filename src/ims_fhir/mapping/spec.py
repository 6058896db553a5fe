"""The mapping spec: ``mappings/Parameters-field-map.json`` read into rules.

The spec has one rule per record field: the FHIR element that holds it, and the source (a
TERMINOLOGY.md row or an R4 spec page) that justifies it. A field held in an extension or an
Observation component is a *slot* rule: it also gives the profile, the slot
(``Procedure.extension:needle-length``, ``Observation.component:grade``), the value type, the
UCUM unit, the vocabulary (a group of the local CodeSystem) and the cardinality. Slot rules
are what the forward mapping writes, what the reverse mapping reads, what
``scripts/profiles.py`` defines the extensions and slices from and what ``docs/mapping.md``
lists, so each of those facts is written once. The spec also names the ValueSet of each
vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Any

from ..record.terminology import EXTENSION_BASE, mappings_dir, terminology

__all__ = [
    "BODY_SITE_EXTENSION",
    "COMPLICATION_EXTENSION",
    "COMPONENT",
    "Element",
    "OBSERVATION_BODY_SITE_EXTENSION",
    "PROCEDURE_EXTENSION",
    "SPEC_FILE",
    "Slot",
    "Spec",
    "Vocabulary",
    "parse_spec",
    "spec",
]

SPEC_FILE = "Parameters-field-map.json"
# The containers slot rules name.
COMPONENT = "Observation.component"
OBSERVATION_BODY_SITE_EXTENSION = "Observation.bodySite.extension"
PROCEDURE_EXTENSION = "Procedure.extension"
BODY_SITE_EXTENSION = "Procedure.bodySite.extension"
COMPLICATION_EXTENSION = "Procedure.complication.extension"

_TYPES = frozenset({"CodeableConcept", "Quantity", "integer", "positiveInt", "string", "complex"})


@dataclass(frozen=True, slots=True)
class Slot:
    """A record field held in an extension or a component."""

    path: str  # the record field, e.g. "treatment.sites[].needle_length_mm"
    profile: str  # the profile of the resource that holds it, e.g. "ims-needled-site"
    container: str  # e.g. "Procedure.extension", "Observation.component"
    key: str  # the extension's id (its URL's tail) or the component's local code
    type: str  # the FHIR value type, or "complex" for an extension of extensions
    unit: str | None  # UCUM code of a Quantity
    vocabulary: str | None  # the local CodeSystem group of a CodeableConcept
    min: int
    max: str
    slice: str | None  # the slice name in the profile
    short: str | None  # an extension's title
    definition: str | None  # an extension's definition
    parts: tuple[Slot, ...]  # a complex extension's sub-extensions
    # Derived once, here: the mappings read them for every value they write or read.
    field: str = dataclasses.field(init=False)  # the record attribute (the path's last step)
    repeats: bool = dataclasses.field(init=False)  # a list: one extension or component per item
    is_extension: bool = dataclasses.field(init=False)  # else a component
    url: str = dataclasses.field(init=False)  # an extension's URL (a sub-extension's bare name)
    value_key: str = dataclasses.field(init=False)  # valueQuantity, valuePositiveInt, ...
    context: str = dataclasses.field(init=False)  # where an extension may appear

    def __post_init__(self) -> None:
        bare = not self.container or "://" in self.key
        derived = {
            "field": _attribute(self.path),
            "repeats": self.max == "*",
            "is_extension": self.container.endswith("extension") or not self.container,
            "url": self.key if bare else f"{EXTENSION_BASE}/{self.key}",
            "value_key": "value" + self.type[0].upper() + self.type[1:],
            "context": self.container.removesuffix(".extension"),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)


def _attribute(path: str) -> str:
    return path.rsplit(".", 1)[-1].removesuffix("[]")


@dataclass(frozen=True, slots=True)
class Element:
    """A record field held in a plain element of a resource (not an extension or component)."""

    path: str  # the record field
    profile: str
    at: str  # the element within the resource: "name", "note[0].text", "type[0]"
    type: str  # string, code, date, dateTime, boolean, CodeableConcept or Quantity
    unit: str | None
    vocabulary: str | None
    min: int
    field: str = dataclasses.field(init=False)  # the record attribute (the path's last step)
    # The element's steps: (name, whether it is the first of an array).
    steps: tuple[tuple[str, bool], ...] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        steps = tuple((s.removesuffix("[0]"), s.endswith("[0]")) for s in self.at.split("."))
        object.__setattr__(self, "field", _attribute(self.path))
        object.__setattr__(self, "steps", steps)


@dataclass(frozen=True, slots=True)
class Vocabulary:
    """A group of the local CodeSystem and the ValueSet that holds it."""

    group: str
    value_set: str
    title: str


@dataclass(frozen=True, slots=True, eq=False)  # hashed by identity: one instance, cached
class Spec:
    """The rules of the mapping spec."""

    rules: tuple[dict[str, Any], ...]  # every rule's parts by name (slot rules too)
    slots: tuple[Slot, ...]
    elements: tuple[Element, ...]
    vocabularies: tuple[Vocabulary, ...]

    def slots_of(self, profile: str, container: str) -> tuple[Slot, ...]:
        """The slots of one container of one profile, in the order they are written."""
        return _slots_of(self, profile, container)

    def elements_of(self, profile: str) -> tuple[Element, ...]:
        """The element rules of one profile, in the order they are written."""
        return _elements_of(self, profile)

    def value_set(self, group: str) -> str:
        """The id of the ValueSet of a vocabulary group."""
        return next(v.value_set for v in self.vocabularies if v.group == group)


@functools.cache
def _slots_of(spec_: Spec, profile: str, container: str) -> tuple[Slot, ...]:
    return tuple(s for s in spec_.slots if s.profile == profile and s.container == container)


@functools.cache
def _elements_of(spec_: Spec, profile: str) -> tuple[Element, ...]:
    return tuple(e for e in spec_.elements if e.profile == profile)


_ELEMENT_TYPES = frozenset(
    {"string", "code", "date", "dateTime", "boolean", "CodeableConcept", "Quantity"}
)


def _element(values: dict[str, Any]) -> Element:
    element = Element(
        path=values["field"],
        profile=values["profile"],
        at=values["at"],
        type=values["type"],
        unit=values.get("unit"),
        vocabulary=values.get("vocabulary"),
        min=int(values.get("min", 0)),
    )
    if element.type not in _ELEMENT_TYPES:
        raise ValueError(f"{element.path}: unknown type {element.type!r}")
    if (element.type == "Quantity") != bool(element.unit):
        raise ValueError(f"{element.path}: a Quantity, and only one, has a unit")
    if (element.type == "CodeableConcept") != bool(element.vocabulary):
        raise ValueError(f"{element.path}: a CodeableConcept, and only one, has a vocabulary")
    *_, (_, listed) = element.steps
    if listed and element.type != "CodeableConcept":
        raise ValueError(f"{element.path}: only a CodeableConcept may be an array's first")
    return element


@functools.cache
def spec() -> Spec:
    """The mapping spec, read once from ``mappings/``."""
    path = mappings_dir() / SPEC_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    try:
        return parse_spec(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a valid mapping spec ({exc!r})") from exc


def _parts(parameter: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    values: dict[str, Any] = {}
    nested = []
    for part in parameter["part"]:
        if part["name"] == "part":
            nested.append(part)
            continue
        if part["name"] in values:
            raise ValueError(f"{part['name']} twice in a rule")
        (value,) = (v for k, v in part.items() if k.startswith("value"))
        values[part["name"]] = value
    return values, nested


def _slot(values: dict[str, Any], nested: list[dict[str, Any]], container: str) -> Slot:
    if values["type"] not in _TYPES:
        raise ValueError(f"{values['field']}: unknown type {values['type']!r}")
    if values["type"] == "Quantity" and not values.get("unit"):
        raise ValueError(f"{values['field']}: a Quantity needs a unit")
    if values["type"] == "CodeableConcept" and not values.get("vocabulary"):
        raise ValueError(f"{values['field']}: a CodeableConcept needs a vocabulary")
    parts = []
    for part in nested:
        sub, deeper = _parts(part)
        if deeper:
            raise ValueError(f"{values['field']}: sub-extensions nest one level only")
        parts.append(_slot(sub | {"profile": values.get("profile", "")}, [], ""))
    if (values["type"] == "complex") != bool(parts):
        raise ValueError(f"{values['field']}: a complex extension, and only one, has parts")
    # "Procedure.extension:needle-length" -> needle-length (the first colon: a key may be a
    # URL); a sub-extension's slot is its bare name.
    container_, colon, key = values["slot"].partition(":")
    key = key if colon else container_
    return Slot(
        path=values["field"],
        profile=values.get("profile", ""),
        container=container,
        key=key,
        type=values["type"],
        unit=values.get("unit"),
        vocabulary=values.get("vocabulary"),
        min=int(values.get("min", 0)),
        max=str(values.get("max", "1")),
        slice=values.get("slice"),
        short=values.get("short"),
        definition=values.get("definition"),
        parts=tuple(parts),
    )


def parse_spec(data: dict[str, Any]) -> Spec:
    """Read the spec from its Parameters resource; raise ValueError naming what is wrong."""
    if data.get("resourceType") != "Parameters":
        raise ValueError("not a Parameters resource")
    rules: list[dict[str, Any]] = []
    slots: list[Slot] = []
    elements: list[Element] = []
    vocabularies: list[Vocabulary] = []
    for parameter in data["parameter"]:
        values, nested = _parts(parameter)
        if parameter["name"] == "vocabulary":
            vocabularies.append(Vocabulary(values["group"], values["valueSet"], values["title"]))
        elif parameter["name"] == "rule":
            rules.append(values | ({"parts": [_parts(p)[0] for p in nested]} if nested else {}))
            if "slot" in values:
                container, _, _ = values["slot"].partition(":")
                slots.append(_slot(values, nested, container))
            elif "at" in values:
                elements.append(_element(values))
        else:
            raise ValueError(f"unknown parameter {parameter['name']!r}")
    _check(rules, slots, elements, vocabularies)
    return Spec(tuple(rules), tuple(slots), tuple(elements), tuple(vocabularies))


_CONTAINERS = frozenset(
    {
        COMPONENT,
        OBSERVATION_BODY_SITE_EXTENSION,
        PROCEDURE_EXTENSION,
        BODY_SITE_EXTENSION,
        COMPLICATION_EXTENSION,
    }
)


def _check(
    rules: list[dict[str, Any]],
    slots: list[Slot],
    elements: list[Element],
    vocabularies: list[Vocabulary],
) -> None:
    """What would make the mappings write or read something else than the rule says."""
    fields = [given["field"] for given in rules]
    twice = sorted({f for f in fields if fields.count(f) > 1})
    if twice:
        raise ValueError(f"{twice[0]}: two rules for one field")
    for given in rules:
        if "slot" in given and "at" in given:
            raise ValueError(f"{given['field']}: a slot rule or an element rule, not both")
    terms = terminology()
    groups = {v.group for v in vocabularies}
    keys = [(s.profile, s.container, s.key) for s in slots]
    for slot in slots:
        if keys.count((slot.profile, slot.container, slot.key)) > 1:
            raise ValueError(f"{slot.path}: another field has the slot {slot.key}")
        if slot.container not in _CONTAINERS:
            raise ValueError(f"{slot.path}: no mapping writes {slot.container}")
        if slot.max not in {"1", "*"}:
            raise ValueError(f"{slot.path}: max must be 1 or *")
    for element in elements:
        if any("[" in step for step, _ in element.steps):
            raise ValueError(f"{element.path}: only [0] may index an element")
    coded: list[Slot | Element] = [*slots, *elements, *(p for s in slots for p in s.parts)]
    for rule in coded:
        if rule.vocabulary is not None and rule.vocabulary not in groups:
            raise ValueError(f"{rule.path}: vocabulary {rule.vocabulary!r} has no ValueSet")
        try:
            if rule.vocabulary is not None:
                terms.vocabulary(rule.vocabulary)
        except KeyError:
            raise ValueError(
                f"{rule.path}: no group {rule.vocabulary!r} in the CodeSystem"
            ) from None
        try:
            if rule.unit is not None:
                terms.convention(f"unit-{rule.unit}")
        except KeyError:
            raise ValueError(f"{rule.path}: no convention unit-{rule.unit}") from None
