"""The clinic-side record of one IMS visit.

An :class:`Encounter` carries what a physiotherapist charts at an IMS visit: the patient, the
assessment of Gunn's signs of neuropathy, pain scores and the needling session. The models are
frozen pydantic v2 models that refuse unknown fields, and their validation is clinical: a field
that is typed right but clinically impossible (NRS 11, a grade of 4, a segment L7, a depth deeper
than the needle) is an error naming the field.

Coded fields take the record vocabulary: the codes of the matching group of the local CodeSystem
in ``mappings/`` (``ims-fhir schema`` lists them).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from . import codes
from .terminology import IDENTIFIES, terminology

__all__ = [
    "AdverseEvent",
    "Assessment",
    "Clinic",
    "Consent",
    "Diagnosis",
    "ElectricalStimulation",
    "Encounter",
    "Finding",
    "HumanName",
    "Identifier",
    "NeedledSite",
    "PainScore",
    "Patient",
    "Practitioner",
    "Treatment",
    "check_namespace",
]


class _Vocabulary:
    """A string restricted to one group of the local CodeSystem, looked up when first used."""

    def __init__(self, group: str) -> None:
        self.group = group

    def _check(self, value: str) -> str:
        codes = terminology().vocabulary(self.group)
        if value not in codes:
            raise PydanticCustomError(
                "ims_vocabulary",
                "unknown {group} {value}; expected one of: {expected}",
                {"group": self.group, "value": repr(value), "expected": ", ".join(codes)},
            )
        return value

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        # A string checked against the CodeSystem, not the Literal it is typed as: the codes
        # are read from the data, and the error names the group and lists its codes.
        return core_schema.no_info_after_validator_function(
            self._check, core_schema.str_schema(strip_whitespace=True)
        )

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {
            "type": "string",
            "enum": list(terminology().vocabulary(self.group)),
            "description": f"A code of group '{self.group}' of the ims-local CodeSystem.",
        }


SourceId = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9.\-_]{0,63}$"),
    Field(description="A stable id from the clinic system: letters, digits, '.', '-', '_'."),
]
Text = Annotated[str, StringConstraints(min_length=1, max_length=10_000)]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=200)]

# Typed as the CodeSystem's codes (generated into codes.py), so a type checker finds a typo;
# validated against the CodeSystem itself, with the record vocabulary's own error message.
Sign = Annotated[codes.SignCode, _Vocabulary("sign")]
Muscle = Annotated[codes.MuscleCode, _Vocabulary("muscle")]
Side = Annotated[codes.SideCode, _Vocabulary("side")]
TrophedemaTest = Annotated[codes.TrophedemaTestCode, _Vocabulary("trophedema-test")]
NeedleResponse = Annotated[codes.NeedleResponseCode, _Vocabulary("needle-response")]
SiteRole = Annotated[codes.SiteRoleCode, _Vocabulary("site-role")]
AdverseEventKind = Annotated[codes.AdverseEventCode, _Vocabulary("adverse-event")]
Severity = Annotated[codes.SeverityCode, _Vocabulary("severity")]
DiagnosisCode = Annotated[codes.DiagnosisCode, _Vocabulary("diagnosis")]
VisitType = Annotated[codes.VisitTypeCode, _Vocabulary("visit-type")]
PainTiming = Annotated[codes.PainTimingCode, _Vocabulary("pain-timing")]


def spinal_levels() -> list[str]:
    """Return the spinal levels from C1 to S5 in cranio-caudal order."""
    return list(terminology().vocabulary("spinal-level"))


def _expand_segments(value: Any) -> Any:
    """Expand ranges such as ``"L4-L5"`` or ``"C5-C7"`` to the levels they span, in order."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        return value
    levels = spinal_levels()
    out: list[Any] = []
    for item in value:
        if isinstance(item, str) and "-" in item:
            first, _, last = item.partition("-")
            if first not in levels or last not in levels:
                raise PydanticCustomError(
                    "ims_segment",
                    "{item} is not a spinal segment range: both ends must be levels C1..S5",
                    {"item": repr(item)},
                )
            start, end = levels.index(first), levels.index(last)
            if start >= end:
                raise PydanticCustomError(
                    "ims_segment",
                    "segment range {item} must run cranial to caudal (e.g. L4-L5)",
                    {"item": repr(item)},
                )
            out.extend(levels[start : end + 1])
        else:
            out.append(item)
    return out


def _check_segment_order(value: list[str]) -> list[str]:
    if len(set(value)) != len(value):
        raise PydanticCustomError("ims_segment", "a spinal segment is listed twice", {})
    levels = spinal_levels()
    return sorted(value, key=levels.index)


def _fhir_offset(value: dt.datetime) -> dt.datetime:
    """An offset FHIR can write: whole minutes, at most 14 hours (R4 datatypes.html#dateTime)."""
    offset = value.utcoffset()
    if offset is not None and (
        abs(offset) > dt.timedelta(hours=14) or offset % dt.timedelta(minutes=1)
    ):
        raise PydanticCustomError(
            "ims_offset", "a UTC offset must be whole minutes, at most 14:00 (FHIR R4)", {}
        )
    return value


# A date and time with a UTC offset FHIR R4 can hold.
Instant = Annotated[AwareDatetime, AfterValidator(_fhir_offset)]


class _Model(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", str_strip_whitespace=True, revalidate_instances="always"
    )


# Typed as strings, not SpinalLevelCode: a range such as "L4-L5" is input too (it is stored as
# the levels it spans, each checked against the CodeSystem).
Segments = Annotated[
    list[Annotated[str, _Vocabulary("spinal-level")]],
    Field(
        description="Spinal segments, e.g. ['L5'] or ['L4-L5'] (a range expands to its levels).",
    ),
]


class _HasSegments(_Model):
    segments: Segments = []

    @field_validator("segments", mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        return _expand_segments(value)

    @field_validator("segments")
    @classmethod
    def _order(cls, value: list[str]) -> list[str]:
        return _check_segment_order(value)


class Identifier(_Model):
    """A business identifier such as a provincial health-card number."""

    system: Annotated[str, StringConstraints(pattern=r"^[a-zA-Z][a-zA-Z0-9+.\-]*:\S+$")] = Field(
        description="The namespace URI of the identifier."
    )
    value: Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[^|]+$")] = (
        Field(description="The identifier; never `|`, which FHIR search reads as system|value.")
    )
    kind: Literal["health-card", "licence", "other"] = Field(
        default="other",
        description="A patient identifier in a known jurisdictional health-number system "
        "(mappings/Parameters-jurisdictional-identifiers.json) is a health-card one.",
    )


def check_namespace(value: str) -> str:
    """Return ``value`` if it can be a clinic's identifier namespace, else raise ValueError.

    A namespace is the base that ``/patient``, ``/encounter``, ... are appended to, so it is an
    absolute http(s) URI with a host, and without a query or fragment (the kinds would land in
    them) or a trailing ``/``.
    """
    example = "e.g. https://clinic.example.ca/fhir/sid"
    parts: SplitResult | None
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:  # an unclosed IPv6 bracket, say
        parts, host = None, None
    if parts is None or parts.scheme not in {"http", "https"} or not host:
        raise ValueError(f"is not an absolute http(s) URI with a host ({example})")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"holds a space or a control character ({example})")
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise ValueError(f"has a query or fragment; a namespace is a base URI ({example})")
    if value.endswith("/"):
        raise ValueError(f"ends with '/'; leave it off ({example})")
    return value


class HumanName(_Model):
    """A person's name."""

    family: ShortText
    given: list[ShortText] = []


class Clinic(_Model):
    """The clinic that holds the record."""

    id: SourceId
    name: ShortText
    identifiers: list[Identifier] = Field(
        default=[],
        description="Identifiers others know the clinic by, e.g. a registered facility number: "
        "how a regional record finds its Organization.",
    )
    namespace: (
        Annotated[
            str,
            StringConstraints(pattern=r"^https?://\S+[^/]$"),
            AfterValidator(check_namespace),
        ]
        | None
    ) = Field(
        default=None,
        description="Base URI of the clinic's identifier systems; default built from its id.",
    )


class Patient(_Model):
    """The patient as the clinic knows them."""

    id: SourceId
    identifiers: list[Identifier] = []
    name: HumanName
    birth_date: dt.date
    sex: Literal["female", "male", "other", "unknown"]

    @field_validator("identifiers")
    @classmethod
    def _known_health_numbers(cls, value: list[Identifier]) -> list[Identifier]:
        # An identifier in a system a jurisdiction registered for health numbers is one, even
        # when the record says "other": FHIR types it so (JHN), and the kind read back from
        # that type must be the record's, for the round trip to be lossless.
        terms = terminology()
        out = []
        for ident in value:
            known = terms.identifier_system(ident.system)
            if known is not None and ident.kind == "other":
                ident = ident.model_copy(update={"kind": IDENTIFIES[known.identifies]})
            out.append(ident)
        return out


class Practitioner(_Model):
    """The physiotherapist who assessed and treated."""

    id: SourceId
    name: HumanName
    licence: Identifier | None = None


class Finding(_HasSegments):
    """One sign of neuropathy looked for at one place, present or absent."""

    id: SourceId
    sign: Sign
    present: bool
    grade: Annotated[int, Field(ge=0, le=3)] | None = None
    muscle: Muscle | None = None
    region: ShortText | None = Field(default=None, description="Where, when not one muscle.")
    side: Side | None = None
    test: TrophedemaTest | None = Field(default=None, description="Trophedema only.")
    joint: ShortText | None = Field(default=None, description="Restricted ROM only.")
    movement: ShortText | None = Field(default=None, description="Restricted ROM only.")
    degrees: Annotated[float, Field(ge=0, le=360)] | None = None
    note: Text | None = None

    @model_validator(mode="after")
    def _clinical(self) -> Finding:
        if self.muscle is None and self.region is None:
            raise ValueError("a finding needs a muscle or a region")
        if self.test is not None and self.sign != "trophedema":
            raise ValueError("'test' applies to trophedema only")
        rom = (self.joint, self.movement, self.degrees)
        if self.sign == "restricted-rom":
            if self.joint is None or self.movement is None:
                raise ValueError("restricted range of motion needs 'joint' and 'movement'")
        elif any(v is not None for v in rom):
            raise ValueError("'joint', 'movement' and 'degrees' apply to restricted-rom only")
        if not self.present and self.grade not in (None, 0):
            raise ValueError("an absent sign cannot have a grade above 0")
        return self


class Diagnosis(_Model):
    """A diagnosis the clinician states."""

    code: DiagnosisCode
    note: Text | None = None


class Assessment(_Model):
    """The assessment of Gunn's signs."""

    findings: list[Finding] = []
    suspected_levels: Segments = []
    diagnosis: Diagnosis | None = None
    notes: Text | None = None

    @field_validator("suspected_levels", mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        return _expand_segments(value)

    @field_validator("suspected_levels")
    @classmethod
    def _order(cls, value: list[str]) -> list[str]:
        return _check_segment_order(value)

    @model_validator(mode="after")
    def _unique_ids(self) -> Assessment:
        _require_unique("findings", [f.id for f in self.findings])
        return self


class PainScore(_Model):
    """A pain score on the 0-10 numeric rating scale."""

    id: SourceId
    timing: PainTiming
    nrs: Annotated[int, Field(ge=0, le=10)]
    location: ShortText | None = None


class ElectricalStimulation(_Model):
    """Electrical stimulation through the needle."""

    frequency_hz: Annotated[float, Field(gt=0, le=200)]
    intensity_ma: Annotated[float, Field(gt=0, le=50)]
    minutes: Annotated[float, Field(gt=0, le=60)]


class NeedledSite(_HasSegments):
    """One muscle site needled in the session."""

    id: SourceId
    muscle: Muscle
    side: Side
    role: SiteRole
    needle_diameter_mm: Annotated[float, Field(gt=0, le=1)]
    needle_length_mm: Annotated[float, Field(gt=0, le=150)]
    insertions: Annotated[int, Field(ge=1, le=100)]
    max_depth_mm: Annotated[float, Field(gt=0, le=150)]
    dwell_time_s: Annotated[int, Field(ge=0, le=3600)]
    response: NeedleResponse
    electrical_stimulation: ElectricalStimulation | None = None

    @model_validator(mode="after")
    def _depth_within_needle(self) -> NeedledSite:
        if self.max_depth_mm > self.needle_length_mm:
            raise ValueError("max_depth_mm is deeper than the needle is long")
        return self


class AdverseEvent(_Model):
    """An adverse event of the session."""

    kind: AdverseEventKind
    severity: Severity
    note: Text | None = None

    @model_validator(mode="after")
    def _other_needs_note(self) -> AdverseEvent:
        if self.kind == "other-event" and self.note is None:
            raise ValueError("an adverse event of kind 'other-event' needs a note")
        return self


class Consent(_Model):
    """The patient's consent to needling."""

    given: bool
    at: Instant
    by: ShortText = Field(description="Who consented: the patient, or a named guardian.")
    form_reference: ShortText | None = None


class Treatment(_Model):
    """The needling session."""

    consent: Consent | None = None
    sites: list[NeedledSite] = []
    adverse_events: list[AdverseEvent] = []
    notes: Text | None = None

    @model_validator(mode="after")
    def _clinical(self) -> Treatment:
        _require_unique("sites", [s.id for s in self.sites])
        if self.consent is not None and not self.consent.given and self.sites:
            raise ValueError("needled sites are recorded although consent was refused")
        return self


class Encounter(_Model):
    """One IMS visit: the unit that ims-fhir maps and syncs."""

    id: SourceId
    clinic: Clinic
    patient: Patient
    practitioner: Practitioner
    start: Instant
    end: Instant
    visit_type: VisitType
    assessment: Assessment | None = None
    pain: list[PainScore] = []
    treatment: Treatment | None = None
    retracted: bool = Field(
        default=False, description="True when the clinic withdrew the record (entered in error)."
    )
    recorded: Instant | None = Field(
        default=None,
        description="When the clinician made the record, if not at the encounter's end "
        "(Provenance.recorded; the end when not given: a time equal to the end is none, as "
        "validation makes it).",
    )

    @model_validator(mode="after")
    def _clinical(self) -> Encounter:
        if self.end <= self.start:
            raise ValueError("the encounter ends before (or when) it starts")
        if self.recorded is not None and self.recorded < self.start:
            raise ValueError("the record is made before the encounter starts ('recorded')")
        if self.recorded == self.end:
            # The default, said explicitly: one record, one form (what FHIR gives back).
            object.__setattr__(self, "recorded", None)
        if self.patient.birth_date > self.start.date():
            raise ValueError("the patient is born after the encounter")
        if self.assessment is None and self.treatment is None:
            raise ValueError("an encounter needs an assessment, a treatment or both")
        if self.visit_type == "treatment-only" and self.assessment is not None:
            raise ValueError("a treatment-only visit has no assessment")
        _require_unique("pain", [p.id for p in self.pain])
        if self.treatment is None and any(p.timing == "after-treatment" for p in self.pain):
            raise ValueError("an after-treatment pain score needs a treatment")
        return self


def _require_unique(field: str, ids: list[str]) -> None:
    seen: set[str] = set()
    for item in ids:
        if item in seen:
            raise ValueError(f"{field}: id {item!r} is used twice")
        seen.add(item)
