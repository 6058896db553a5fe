"""The IMS visit form: one tree of items, from which the Questionnaire and both mappings are made.

Each item's ``linkId`` is the record field it holds, as a dotted path (``clinic.name``,
``assessment.findings.grade``): a repeating group is the list field (``treatment.sites``) and
its items are the fields of one list entry (``treatment.sites.muscle``). Three groups hold no
record field of their own: ``encounter`` (the visit's own fields), and the two switches
``assessment-done`` and ``treatment-done`` (booleans that say the record has an assessment or a
treatment, and enable those groups). The linkIds are stable: renaming one is a new
Questionnaire version.

What each item demands comes from the record model (required, repeats, minimum and maximum)
and from the mapping spec (the vocabulary, hence the answer options, and the UCUM unit); the item
table below only gives the text a clinician reads and where the item sits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, get_args, get_origin

import annotated_types
from pydantic import BaseModel

from ..record import model as m
from ..record.terminology import CANONICAL, LOCAL_SYSTEM, terminology
from .spec import Element, Slot, spec

__all__ = [
    "ADMINISTRATIVE_GENDER",
    "FORM_VERSION",
    "QUESTIONNAIRE_URL",
    "Item",
    "form",
    "items_by_link_id",
]

QUESTIONNAIRE_URL = f"{CANONICAL}/Questionnaire/ims-visit"
# The form's own version: bump it whenever an item changes (a QuestionnaireResponse names the
# version it answered, and one for another version is refused). 1.1.0: answer options are the
# local codes only (1.0.0 bound the project's ValueSets, standard codes included).
FORM_VERSION = "1.1.0"
ADMINISTRATIVE_GENDER = "http://hl7.org/fhir/administrative-gender"
_GENDERS = {"female": "Female", "male": "Male", "other": "Other", "unknown": "Unknown"}

# Record list fields whose entries have an id the clinician never types: a hidden item, filled
# in by position (f1, f2, ...) when a form leaves it empty.
_ID_PREFIX = {"assessment.findings": "f", "pain": "p", "treatment.sites": "s"}


@dataclass(frozen=True, slots=True)
class Item:
    """One item of the form."""

    link_id: str
    text: str
    type: str  # group, string, text, integer, decimal, date, dateTime, boolean, choice
    key: str | None  # where its value goes in the parent's dict ("name.family"); None: inline
    required: bool = False
    repeats: bool = False
    vocabulary: str | None = None  # a group of the local CodeSystem (choice)
    # (system, code, display) (choice): the group's local codes, or administrative gender.
    options: tuple[tuple[str, str, str], ...] = ()
    min_value: float | None = None
    max_value: float | None = None
    unit: str | None = None  # UCUM
    hidden: bool = False
    # (question linkId, the answer that enables this item): a local code or a boolean.
    enable_when: tuple[str, str | bool] | None = None
    children: tuple[Item, ...] = ()
    id_prefix: str | None = None  # a repeating group whose entries get positional ids

    @property
    def answer_key(self) -> str:
        """The ``value[x]`` key of this item's answers."""
        return {
            "string": "valueString",
            "text": "valueString",
            "integer": "valueInteger",
            "decimal": "valueDecimal",
            "date": "valueDate",
            "dateTime": "valueDateTime",
            "boolean": "valueBoolean",
            "choice": "valueCoding",
        }[self.type]


# (linkId tail, text, FHIR item type or a nested table) for one model's fields.
_Row = tuple[str, str, str | list[Any]]


def _annotation_model(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
        if get_origin(candidate) is list:
            inner = _annotation_model(get_args(candidate)[0])
            if inner is not None:
                return inner
    return None


def _bounds(metadata: list[Any]) -> tuple[float | None, float | None]:
    low: Any = None
    high: Any = None
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            low = item.ge
        elif isinstance(item, annotated_types.Le):
            high = item.le
        elif isinstance(item, annotated_types.Interval):
            low, high = item.ge, item.le
    return low, high  # a strict bound (gt) has no inclusive minValue: the record checks it


def _metadata(annotation: Any, found: list[Any]) -> list[Any]:
    """The constraints on a type, through Annotated, X | None, list[X] and Field(...)."""
    out: list[Any] = []
    for item in [*found, *getattr(annotation, "__metadata__", ())]:
        out += [*getattr(item, "metadata", ()), item]
    for arg in get_args(annotation):
        if arg is not type(None):
            out += _metadata(arg, [])
    return out


def _spec_rule(path: str) -> Slot | Element | None:
    rules: list[tuple[str, Slot | Element]] = [
        *((r.path, r) for r in spec().slots),
        *((r.path, r) for r in spec().elements),
        # A complex extension's parts: named by their bare field within the parent's path.
        *((f"{s.path}.{p.path}", p) for s in spec().slots for p in s.parts),
    ]
    for rule_path, rule in rules:
        if rule_path == path:
            return rule
    return None


def _leaf(
    model: type[BaseModel],
    attr: str,
    record_path: str,
    link_id: str,
    text: str,
    kind: str,
    *,
    key: str,
    vocabulary: str | None = None,
    enable_when: tuple[str, str | bool] | None = None,
    hidden: bool = False,
) -> Item:
    info = model.model_fields[attr]
    annotation = info.annotation
    repeats = get_origin(annotation) is list
    metadata = _metadata(annotation, list(info.metadata))
    low, high = _bounds(metadata) if kind in {"integer", "decimal"} else (None, None)
    rule = _spec_rule(record_path)
    unit = getattr(rule, "unit", None)
    if rule is not None and rule.vocabulary is not None:
        if vocabulary is not None and vocabulary != rule.vocabulary:
            raise ValueError(f"{record_path}: the spec says {rule.vocabulary}, not {vocabulary}")
        vocabulary = rule.vocabulary
    if kind == "choice" and vocabulary is None and attr != "sex":
        raise ValueError(f"{record_path}: a choice needs a vocabulary")
    options: tuple[tuple[str, str, str], ...] = ()
    if attr == "sex":
        options = tuple((ADMINISTRATIVE_GENDER, c, d) for c, d in _GENDERS.items())
    elif vocabulary is not None:
        # The local codes of the vocabulary, each concept once: the project's ValueSets also
        # hold the standard codes the ConceptMap maps (some wider, e.g. SNOMED CT "Tenderness"
        # for the Gunn sign), which a form must not offer as the same answer.
        options = tuple(
            (LOCAL_SYSTEM, code, display)
            for code, display in terminology().vocabulary(vocabulary).items()
        )
    return Item(
        link_id=link_id,
        text=text,
        type=kind,
        key=key,
        required=(info.is_required() and not hidden) or link_id in _REQUIRED_WHEN_ENABLED,
        repeats=repeats,
        vocabulary=vocabulary,
        options=options,
        min_value=low,
        max_value=high,
        unit=unit,
        hidden=hidden,
        enable_when=enable_when,
    )


def _sign(code: str) -> tuple[str, str]:
    return ("assessment.findings.sign", code)


_FINDING: list[_Row] = [
    ("id", "Finding id (kept from the clinic system; filled in when empty)", "hidden"),
    ("sign", "Sign", "choice"),
    ("present", "Present", "boolean"),
    ("grade", "Grade (0-3)", "integer"),
    ("muscle", "Muscle", "choice"),
    ("region", "Region (when not one muscle)", "string"),
    ("side", "Side", "choice"),
    ("segments", "Spinal segments", "choice"),
    ("test", "Trophedema test used", "choice"),
    ("joint", "Joint", "string"),
    ("movement", "Movement", "string"),
    ("degrees", "Range (degrees)", "decimal"),
    ("note", "Note", "text"),
]
_ENABLED_BY = {
    "assessment.findings.test": "trophedema",
    "assessment.findings.joint": "restricted-rom",
    "assessment.findings.movement": "restricted-rom",
    "assessment.findings.degrees": "restricted-rom",
}
# What the record model's validators demand of an enabled sign-specific item.
_REQUIRED_WHEN_ENABLED = {"assessment.findings.joint", "assessment.findings.movement"}
_SITE: list[_Row] = [
    ("id", "Site id (kept from the clinic system; filled in when empty)", "hidden"),
    ("muscle", "Muscle", "choice"),
    ("side", "Side", "choice"),
    ("role", "Role", "choice"),
    ("segments", "Spinal segments", "choice"),
    ("needle_diameter_mm", "Needle diameter", "decimal"),
    ("needle_length_mm", "Needle length", "decimal"),
    ("insertions", "Insertions", "integer"),
    ("max_depth_mm", "Maximum depth", "decimal"),
    ("dwell_time_s", "Dwell time", "integer"),
    ("response", "Needle response", "choice"),
    (
        "electrical_stimulation",
        "Electrical stimulation",
        [
            ("frequency_hz", "Frequency", "decimal"),
            ("intensity_ma", "Intensity", "decimal"),
            ("minutes", "Duration", "decimal"),
        ],
    ),
]
_NAME: list[_Row] = [("family", "Family name", "string"), ("given", "Given names", "string")]
# Vocabularies of fields the spec holds in a resource of their own (no rule with a vocabulary).
_VOCABULARY = {
    "assessment.findings[].muscle": "muscle",
    "treatment.adverse_events[].kind": "adverse-event",
}


def _group(
    model: type[BaseModel],
    rows: list[_Row],
    prefix: str,
    record_prefix: str,
    key_prefix: str = "",
) -> list[Item]:
    out: list[Item] = []
    for attr, text, kind in rows:
        link_id = f"{prefix}.{attr}" if prefix else attr
        record_path = f"{record_prefix}.{attr}" if record_prefix else attr
        info = model.model_fields[attr]
        if isinstance(kind, list):
            sub = _annotation_model(info.annotation)
            assert sub is not None, attr
            if attr == "name":  # flattened into the parent group: patient.name.family
                out += _group(sub, kind, link_id, record_path, key_prefix=f"{attr}.")
                continue
            repeats = get_origin(info.annotation) is list
            out.append(
                Item(
                    link_id=link_id,
                    text=text,
                    type="group",
                    key=key_prefix + attr,
                    required=info.is_required(),
                    repeats=repeats,
                    children=tuple(
                        _group(sub, kind, link_id, record_path + ("[]" if repeats else ""))
                    ),
                    id_prefix=_ID_PREFIX.get(link_id),
                )
            )
            continue
        ew_code = _ENABLED_BY.get(link_id)
        out.append(
            _leaf(
                model,
                attr,
                record_path,
                link_id,
                text,
                "string" if kind == "hidden" else kind,
                key=key_prefix + attr,
                vocabulary=_VOCABULARY.get(record_path),
                enable_when=_sign(ew_code) if ew_code else None,
                hidden=kind == "hidden",
            )
        )
    return out


@functools.cache
def form() -> tuple[Item, ...]:
    """The form's top-level items, in the order a clinician fills them in."""
    encounter = Item(
        link_id="encounter",
        text="Visit",
        type="group",
        key=None,
        required=True,
        children=(
            *_group(
                m.Encounter,
                [
                    ("id", "Visit id (the clinic system's)", "string"),
                    ("start", "Start", "dateTime"),
                    ("end", "End", "dateTime"),
                    ("visit_type", "Visit type", "choice"),
                ],
                "",
                "",
            ),
            Item("assessment-done", "Assessment of Gunn's signs done", "boolean", key=None),
            Item("treatment-done", "Needling session (treatment) recorded", "boolean", key=None),
        ),
    )
    _person: list[_Row] = [
        ("clinic", "Clinic", [("id", "Clinic id", "string"), ("name", "Clinic name", "string")]),
        (
            "patient",
            "Patient",
            [
                ("id", "Patient id (the clinic system's)", "string"),
                ("name", "Name", _NAME),
                ("birth_date", "Birth date", "date"),
                ("sex", "Administrative sex", "choice"),
            ],
        ),
        (
            "practitioner",
            "Physiotherapist",
            [("id", "Practitioner id (the clinic system's)", "string"), ("name", "Name", _NAME)],
        ),
    ]
    people = _group(m.Encounter, _person, "", "")
    assessment = _group(
        m.Encounter,
        [
            (
                "assessment",
                "Assessment of Gunn's signs",
                [
                    ("findings", "Finding", _FINDING),
                    ("suspected_levels", "Suspected segmental levels", "choice"),
                    (
                        "diagnosis",
                        "Diagnosis",
                        [("code", "Diagnosis", "choice"), ("note", "Note", "text")],
                    ),
                    ("notes", "Assessment notes", "text"),
                ],
            ),
            (
                "pain",
                "Pain score (NRS)",
                [
                    (
                        "id",
                        "Score id (kept from the clinic system; filled in when empty)",
                        "hidden",
                    ),
                    ("timing", "When", "choice"),
                    ("nrs", "Pain (0 = none, 10 = worst imaginable)", "integer"),
                    ("location", "Where", "string"),
                ],
            ),
            (
                "treatment",
                "Needling session",
                [
                    (
                        "consent",
                        "Consent",
                        [
                            ("given", "Consent given", "boolean"),
                            ("at", "When", "dateTime"),
                            ("by", "By (the patient, or a named guardian)", "string"),
                            ("form_reference", "Consent form reference", "string"),
                        ],
                    ),
                    ("sites", "Needled site", _SITE),
                    (
                        "adverse_events",
                        "Adverse event",
                        [
                            ("kind", "Event", "choice"),
                            ("severity", "Severity", "choice"),
                            ("note", "Note", "text"),
                        ],
                    ),
                    ("notes", "Session notes", "text"),
                ],
            ),
        ],
        "",
        "",
    )
    out = []
    for item in assessment:
        if item.link_id in {"assessment", "treatment"}:
            item = _replace(item, enable_when=(f"{item.link_id}-done", True))
        out.append(item)
    return (encounter, *people, *out)


def _replace(item: Item, **changes: Any) -> Item:
    values = {f: getattr(item, f) for f in Item.__dataclass_fields__} | changes
    return Item(**values)


@functools.cache
def items_by_link_id() -> dict[str, Item]:
    """Every item of the form by its linkId."""
    out: dict[str, Item] = {}

    def walk(items: tuple[Item, ...]) -> None:
        for item in items:
            if item.link_id in out:
                raise ValueError(f"linkId {item.link_id} twice")
            out[item.link_id] = item
            walk(item.children)

    walk(form())
    return out


def local_coding(code: str) -> dict[str, str]:
    """The local CodeSystem coding of a record code."""
    return terminology().local(code).as_fhir()
