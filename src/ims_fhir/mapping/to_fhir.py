"""Forward mapping: an IMS encounter record -> a FHIR R4 transaction Bundle.

One encounter becomes (see ``docs/mapping.md`` for the element-by-element table):

- Organization (the clinic), Patient and Practitioner, each created only if no resource with
  the same identifier exists (``If-None-Exist``), so they are never duplicated;
- Encounter (class AMB), and when an assessment was made, a panel Observation whose
  ``hasMember`` lists one Observation per finding (absent findings too: absence is clinical
  information) and a Condition for a stated diagnosis with the present findings as evidence;
- one pain Observation per NRS score (LOINC 72514-3), the after-treatment ones ``partOf`` the
  session;
- when a treatment was given, the session Procedure with one Procedure per needled site
  (``partOf`` the session) and a Consent linked by the ``session-consent`` extension;
- one Provenance naming the practitioner and the clinic: the record's creation (activity CREATE)
  of the encounter's period, recorded at the encounter's end.

Every request but the Provenance's is conditional on the resource's business identifier, so
posting the Bundle twice changes nothing; the Provenance (R4 gives it no identifier) is written
to a deterministic id. A retracted record maps to the same resources, ``entered-in-error``.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.resource import Resource

from ..record.model import Encounter, Finding, HumanName, NeedledSite, PainScore, Treatment
from ..record.reader import check_record
from ..record.terminology import Terminology, terminology
from .identity import (
    LOCAL_IDENTIFIER_TYPES,
    Ext,
    Kind,
    Profile,
    consent_policy,
    default_namespace,
    full_url,
    identifier_query,
    provenance_id,
    system,
)
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

__all__ = [
    "bundle_dict",
    "bundle_json",
    "to_fhir",
    "to_fhir_json",
    "to_resources",
    "to_transaction",
    "transaction_json",
]

JSON = dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Entry:
    full_url: str
    resource: JSON
    method: str
    url: str
    if_none_exist: str | None = None


def to_fhir(record: Encounter) -> Bundle:
    """Map one encounter to a FHIR R4 transaction Bundle of conditional requests.

    The Bundle is a validated fhir.resources model. To write JSON, :func:`to_fhir_json` is
    some 20 times faster and gives the same content.

    Raises:
        RecordError: the record is not valid (one built in code skipped validation).
    """
    return Bundle.model_validate(bundle_dict(record))


def to_transaction(records: Iterable[Encounter]) -> Bundle:
    """Map several encounters to one transaction Bundle (a validated model).

    Resources shared by the encounters (the clinic, a patient seen twice, the practitioner) are
    listed once: a transaction may not hold two requests for the same resource.
    """
    return Bundle.model_validate(_transaction(records))


def to_fhir_json(record: Encounter, *, validate: bool = False) -> str:
    """Map one encounter to the JSON text of its transaction Bundle (deterministic, compact).

    The JSON is written straight from the mapped data; it holds the same content as
    ``to_fhir(record).model_dump_json()`` (the tests prove it for generated records), with
    elements in the mapping's order. ``validate=True`` also checks the Bundle against the
    fhir.resources R4B models first (some 20 times slower) and raises if it does not conform.

    Raises:
        RecordError: the record is not valid (one built in code skipped validation).
        pydantic.ValidationError: with ``validate=True``, the Bundle does not conform.
    """
    return bundle_json(record, validate=validate)


def bundle_json(record: Encounter, *, validate: bool = False, checked: bool = False) -> str:
    """:func:`to_fhir_json`, with :func:`bundle_dict`'s ``checked``."""
    bundle = bundle_dict(record, checked=checked)
    if validate:
        Bundle.model_validate(bundle)
    return orjson.dumps(bundle).decode()


def transaction_json(records: Iterable[Encounter], *, validate: bool = False) -> str:
    """The JSON text of :func:`to_transaction`'s Bundle, written as :func:`to_fhir_json` is."""
    bundle = _transaction(records)
    if validate:
        Bundle.model_validate(bundle)
    return orjson.dumps(bundle).decode()


def to_resources(record: Encounter) -> list[Resource]:
    """Map one encounter to its resources, in the order the Bundle lists them."""
    bundle = to_fhir(record)
    return [entry.resource for entry in bundle.entry or []]


def _transaction(records: Iterable[Encounter]) -> JSON:
    entries: dict[str, JSON] = {}
    for record in records:
        for entry in bundle_dict(record)["entry"]:
            entries.setdefault(entry["fullUrl"], entry)
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries.values())}


def record_key(record: Encounter) -> str:
    """``system|value`` of the encounter's identifier: what the sync state keys it by."""
    namespace = record.clinic.namespace or default_namespace(record.clinic.id)
    return f"{system(namespace, Kind.ENCOUNTER)}|{record.id}"


def bundle_dict(record: Encounter, *, checked: bool = False) -> JSON:
    """Map one encounter to its transaction Bundle as plain JSON data.

    The record is validated again first (one built in code, e.g. by ``model_copy``, skipped
    validation), unless ``checked`` says the caller has just validated it.
    """
    builder = _Builder(record if checked else check_record(record), terminology())
    entries = builder.build()
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": e.full_url,
                "resource": e.resource,
                "request": {"method": e.method, "url": e.url}
                | ({"ifNoneExist": e.if_none_exist} if e.if_none_exist else {}),
            }
            for e in entries
        ],
    }


def _instant(value: dt.datetime) -> str:
    # UTC as "Z", as fhir.resources writes it (the fast path gives what the validated one does).
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _put(body: JSON, steps: tuple[tuple[str, bool], ...], value: Any) -> None:
    """Set the element at ``steps`` (an array's first, where a step says so) in ``body``."""
    node = body
    for name, listed in steps[:-1]:
        node = node.setdefault(name, [{}])[0] if listed else node.setdefault(name, {})
    name, listed = steps[-1]
    if listed:
        # Into what other rules put there: what they wrote stays (a needled site's bodySite
        # text says side and muscle; the muscle's concept would say the muscle only).
        first = node.setdefault(name, [{}])[0]
        for key, item in value.items():
            first.setdefault(key, item)
    else:
        node[name] = value


# Characters XML 1.0 does not allow (C0 controls but tab, newline and carriage return; U+FFFE,
# U+FFFF): a narrative holding one is not well-formed XHTML. The resource's data keeps them.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _div(*lines: str) -> JSON:
    body = "".join(
        f"<p>{html.escape(_NOT_XML.sub(chr(0xFFFD), line), quote=False)}</p>" for line in lines
    )
    return {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{body}</div>'}


def _human_name(name: HumanName) -> JSON:
    out: JSON = {"family": name.family}
    if name.given:
        out["given"] = list(name.given)
    return out


class _Builder:
    """Builds the entries of one encounter's Bundle; one instance per record."""

    def __init__(self, record: Encounter, terms: Terminology) -> None:
        self.r = record
        self.t = terms
        self.ns = record.clinic.namespace or default_namespace(record.clinic.id)
        self.entries: list[_Entry] = []
        self.retracted = record.retracted
        self.session_url = full_url(system(self.ns, Kind.PROCEDURE), f"{record.id}/session")

    # -- helpers -------------------------------------------------------------------------------

    def concept(self, code: str, text: str | None = None) -> JSON:
        """A CodeableConcept of the code's codings.

        One of local codings only has the local display as ``text`` too, so a system that
        knows none of them still has words to show (R4 datatypes.html#CodeableConcept).
        """
        standard = self.t.standard(code)
        if standard is None:
            return self.local_concept(code, text)
        out: JSON = {"coding": [standard.as_fhir(), self.t.local(code).as_fhir()]}
        if text is not None:
            out["text"] = text
        return out

    def local_concept(self, code: str, text: str | None = None) -> JSON:
        """A CodeableConcept of the local coding alone, with its display as text."""
        local = self.t.local(code)
        return {"coding": [local.as_fhir()], "text": local.display if text is None else text}

    def convention(self, *names: str) -> JSON:
        return {"coding": [self.t.convention(n).as_fhir() for n in names]}

    def quantity(self, value: float | int, unit: str) -> JSON:
        coding = self.t.convention(f"unit-{unit}")
        return {
            "value": value,
            "unit": coding.display,
            "system": coding.system,
            "code": coding.code,
        }

    def fields(self, profile: Profile, source: object, body: JSON) -> JSON:
        """Put ``source``'s fields the mapping spec keeps in plain elements into ``body``."""
        for rule in spec().elements_of(profile.value):
            value = getattr(source, rule.field)
            if value is not None:
                _put(body, rule.steps, self.element_value(rule, value))
        return body

    def element_value(self, rule: Element, value: Any) -> Any:
        if rule.type == "CodeableConcept":
            return self.concept(value)
        if rule.type == "Quantity":
            assert rule.unit is not None
            return self.quantity(value, rule.unit)
        if rule.type == "dateTime":
            return _instant(value)
        if rule.type == "date":
            return value.isoformat()
        return value

    def slots(self, profile: Profile, container: str, source: object) -> list[JSON]:
        """The extensions or components of ``source``'s fields, as the mapping spec says."""
        out = []
        for slot in spec().slots_of(profile.value, container):
            value = getattr(source, slot.field)
            if value is None:
                continue
            for item in value if slot.repeats else [value]:
                head = {"url": slot.url} if slot.is_extension else {"code": self.concept(slot.key)}
                out.append(head | self.slot_value(slot, item))
        return out

    def slot_value(self, slot: Slot, value: Any) -> JSON:
        if slot.type == "complex":
            return {
                "extension": [
                    {"url": part.url} | self.slot_value(part, getattr(value, part.field))
                    for part in slot.parts
                ]
            }
        if slot.type == "Quantity":
            assert slot.unit is not None
            return {slot.value_key: self.quantity(value, slot.unit)}
        if slot.type == "CodeableConcept":
            return {slot.value_key: self.concept(value)}
        return {slot.value_key: value}

    def identifier(self, kind: Kind, value: str) -> JSON:
        out: JSON = {"use": "official"}
        if kind in LOCAL_IDENTIFIER_TYPES:  # e.g. the clinic's patient number: MR
            out["type"] = self.convention(LOCAL_IDENTIFIER_TYPES[kind])
        return out | {"system": system(self.ns, kind), "value": value}

    def shared_ref(self, url: str, kind: Kind, value: str) -> JSON:
        """A reference to a shared resource, with the clinic's identifier of it."""
        identifier = {k: v for k, v in self.identifier(kind, value).items() if k != "use"}
        return {"reference": url, "identifier": identifier}

    def meta(self, profile: Profile) -> JSON:
        return {"profile": [profile.url], "source": self.ns}

    def add(
        self,
        resource_type: str,
        kind: Kind,
        value: str,
        profile: Profile,
        body: JSON,
        summary: Sequence[str],
        *,
        create_only: bool = False,
    ) -> str:
        """Add a resource with its identifier; return the reference to use for it."""
        identifier_system = system(self.ns, kind)
        url = full_url(identifier_system, value)
        identifiers = [self.identifier(kind, value), *body.pop("identifier", [])]
        resource = {
            "resourceType": resource_type,
            "meta": self.meta(profile),
            "text": _div(*summary),
            "identifier": identifiers,
            **body,
        }
        query = identifier_query(identifier_system, value)
        if create_only:
            entry = _Entry(url, resource, "POST", resource_type, if_none_exist=query)
        else:
            entry = _Entry(url, resource, "PUT", f"{resource_type}?{query}")
        self.entries.append(entry)
        return url

    def status(self, normal: str) -> str:
        return "entered-in-error" if self.retracted else normal

    # -- resources -----------------------------------------------------------------------------

    def build(self) -> list[_Entry]:
        r = self.r
        self.org = self.organization()
        self.patient = self.patient_resource()
        self.practitioner = self.practitioner_resource()
        self.encounter = self.encounter_resource()
        # After-treatment scores refer to the session, which is added after them.
        session_url = self.session_url if r.treatment is not None else None
        panel_url = condition_url = None
        finding_urls: dict[str, str] = {}
        if r.assessment is not None:
            for finding in r.assessment.findings:
                finding_urls[finding.id] = self.finding(finding)
            panel_url = self.panel(list(finding_urls.values()))
            if r.assessment.diagnosis is not None:
                present = [finding_urls[f.id] for f in r.assessment.findings if f.present]
                condition_url = self.condition(present)
        for score in r.pain:
            self.pain(score, session_url)
        if r.treatment is not None:
            consent_url = self.consent(r.treatment) if r.treatment.consent else None
            reasons = [u for u in (condition_url, panel_url) if u]
            self.session(r.treatment, reasons, consent_url)
            for site in r.treatment.sites:
                self.site(site)
        self.provenance()
        return self.entries

    def organization(self) -> str:
        clinic = self.r.clinic
        return self.add(
            "Organization",
            Kind.ORGANIZATION,
            clinic.id,
            Profile.ORGANIZATION,
            self.fields(
                Profile.ORGANIZATION,
                clinic,
                {
                    # Registered identifiers, untyped (R4 identifier-type has no code a
                    # reference list here confirms for them).
                    "identifier": [
                        {"system": i.system, "value": i.value} for i in clinic.identifiers
                    ],
                    "active": True,
                },
            ),
            [f"Clinic: {clinic.name}"],
            create_only=True,
        )

    def patient_resource(self) -> str:
        p = self.r.patient
        extra = []
        for ident in p.identifiers:
            item: JSON = {"system": ident.system, "value": ident.value}
            # A system a jurisdiction registered is typed as its entry in the table says (JHN
            # for a health number), whatever kind the record gave; the record model has already
            # made that kind health-card, so the type reads back as the record's kind.
            known = self.t.identifier_system(ident.system)
            if known is not None:
                item["type"] = {"coding": [known.type.as_fhir()]}
            elif ident.kind == "health-card":
                item["type"] = self.convention("identifier-type-health-card")
            elif ident.kind == "licence":
                item["type"] = self.convention("identifier-type-licence")
            extra.append(item)
        return self.add(
            "Patient",
            Kind.PATIENT,
            p.id,
            Profile.PATIENT,
            self.fields(
                Profile.PATIENT,
                p,
                {
                    "identifier": extra,
                    "name": [_human_name(p.name)],
                    "managingOrganization": {"reference": self.org},
                },
            ),
            [f"Patient {' '.join(p.name.given)} {p.name.family}, born {p.birth_date}, {p.sex}"],
            create_only=True,
        )

    def practitioner_resource(self) -> str:
        pr = self.r.practitioner
        extra = []
        if pr.licence is not None:
            extra.append(
                {
                    "type": self.convention("identifier-type-licence"),
                    "system": pr.licence.system,
                    "value": pr.licence.value,
                }
            )
        return self.add(
            "Practitioner",
            Kind.PRACTITIONER,
            pr.id,
            Profile.PRACTITIONER,
            {"identifier": extra, "active": True, "name": [_human_name(pr.name)]},
            [f"Physiotherapist {' '.join(pr.name.given)} {pr.name.family}"],
            create_only=True,
        )

    def encounter_resource(self) -> str:
        r = self.r
        return self.add(
            "Encounter",
            Kind.ENCOUNTER,
            r.id,
            Profile.ENCOUNTER,
            self.fields(
                Profile.ENCOUNTER,
                r,
                {
                    "status": self.status("finished"),
                    "class": self.t.convention("encounter-class-ambulatory").as_fhir(),
                    # Each shared resource also by the clinic's identifier (Reference.identifier):
                    # on a regional record it may be one the region registered, which carries
                    # only the region's identifiers.
                    "subject": self.shared_ref(self.patient, Kind.PATIENT, r.patient.id),
                    "participant": [
                        {
                            "individual": self.shared_ref(
                                self.practitioner, Kind.PRACTITIONER, r.practitioner.id
                            )
                        }
                    ],
                    "period": {"start": _instant(r.start), "end": _instant(r.end)},
                    "serviceProvider": self.shared_ref(self.org, Kind.ORGANIZATION, r.clinic.id),
                },
            ),
            [
                f"IMS visit ({self.t.local(r.visit_type).display}) at {r.clinic.name}",
                f"{_instant(r.start)} to {_instant(r.end)}",
            ]
            + (["Entered in error: withdrawn by the clinic."] if r.retracted else []),
        )

    def _observation_common(self, category: str) -> JSON:
        return {
            "status": self.status("final"),
            "category": [self.convention(category)],
        }

    def _context(self, performer: str | None = None) -> JSON:
        return {
            "subject": {"reference": self.patient},
            "encounter": {"reference": self.encounter},
            "effectiveDateTime": _instant(self.r.start),
            "performer": [{"reference": performer or self.practitioner}],
        }

    def _segments(self, segments: Iterable[str]) -> list[JSON]:
        return [
            {"code": self.concept("spinal-segment"), "valueCodeableConcept": self.concept(level)}
            for level in segments
        ]

    def finding(self, f: Finding) -> str:
        t = self.t
        body_site: JSON = {}
        laterality = self.slots(Profile.FINDING, OBSERVATION_BODY_SITE_EXTENSION, f)
        if laterality:
            body_site["extension"] = laterality
        if f.muscle is not None:
            body_site["coding"] = [c.as_fhir() for c in t.codings(f.muscle)]
        if f.region is not None:
            body_site["text"] = f.region
        elif f.muscle is not None and t.standard(f.muscle) is None:
            body_site["text"] = t.local(f.muscle).display
        components = self.slots(Profile.FINDING, COMPONENT, f)
        body: JSON = {
            **self._observation_common("observation-category-exam"),
            **self._context(),
            "bodySite": body_site,
        }
        self.fields(Profile.FINDING, f, body)
        if not f.present:
            # A SNOMED CT finding code says the finding is there: an absent sign keeps its local
            # code only, so nothing that indexes on the code reads it as present (TERMINOLOGY.md).
            body["code"] = self.local_concept(f.sign)
        if components:
            body["component"] = components
        where = ", ".join(
            x
            for x in (
                t.local(f.muscle).display if f.muscle else None,
                f.region,
                t.local(f.side).display.lower() if f.side else None,
                "-".join(f.segments) if f.segments else None,
            )
            if x
        )
        state = "present" if f.present else "absent"
        grade = f", grade {f.grade}" if f.grade is not None else ""
        return self.add(
            "Observation",
            Kind.OBSERVATION,
            f"{self.r.id}/finding/{f.id}",
            Profile.FINDING,
            body,
            [f"{t.local(f.sign).display}: {state}{grade} ({where})"],
        )

    def panel(self, members: list[str]) -> str:
        assert self.r.assessment is not None
        a = self.r.assessment
        body: JSON = {
            **self._observation_common("observation-category-exam"),
            "code": self.concept("gunn-assessment-panel"),
            **self._context(),
        }
        if members:
            body["hasMember"] = [{"reference": m} for m in members]
        components = self.slots(Profile.ASSESSMENT_PANEL, COMPONENT, a)
        if components:
            body["component"] = components
        self.fields(Profile.ASSESSMENT_PANEL, a, body)
        present = sum(1 for f in a.findings if f.present)
        levels = ", ".join(a.suspected_levels) or "none stated"
        return self.add(
            "Observation",
            Kind.OBSERVATION,
            f"{self.r.id}/assessment",
            Profile.ASSESSMENT_PANEL,
            body,
            [
                f"Assessment of Gunn's signs: {present} of {len(a.findings)} signs present",
                f"Suspected segmental levels: {levels}",
            ],
        )

    def condition(self, evidence: list[str]) -> str:
        assert self.r.assessment is not None and self.r.assessment.diagnosis is not None
        d = self.r.assessment.diagnosis
        body: JSON = {
            "verificationStatus": self.convention(
                "condition-verification-entered-in-error"
                if self.retracted
                else "condition-verification-confirmed"
            ),
            "category": [self.convention("condition-category-encounter-diagnosis")],
            "subject": {"reference": self.patient},
            "encounter": {"reference": self.encounter},
            "recordedDate": _instant(self.r.start),
            "recorder": {"reference": self.practitioner},
        }
        if not self.retracted:  # con-5: no clinicalStatus on an entered-in-error Condition
            body["clinicalStatus"] = self.convention("condition-clinical-active")
        if evidence:
            body["evidence"] = [{"detail": [{"reference": e} for e in evidence]}]
        self.fields(Profile.DIAGNOSIS, d, body)
        return self.add(
            "Condition",
            Kind.CONDITION,
            f"{self.r.id}/diagnosis",
            Profile.DIAGNOSIS,
            body,
            [f"Diagnosis: {self.t.local(d.code).display}"],
        )

    def pain(self, score: PainScore, session: str | None) -> str:
        body: JSON = {
            **self._observation_common("observation-category-survey"),
            "code": self.concept("pain-score"),
            **self._context(performer=self.patient),
            "component": self.slots(Profile.PAIN_SCORE, COMPONENT, score),
        }
        if score.timing == "after-treatment":
            body["effectiveDateTime"] = _instant(self.r.end)
            if session is not None:
                body["partOf"] = [{"reference": session}]
        self.fields(Profile.PAIN_SCORE, score, body)
        where = f" ({score.location})" if score.location else ""
        return self.add(
            "Observation",
            Kind.OBSERVATION,
            f"{self.r.id}/pain/{score.id}",
            Profile.PAIN_SCORE,
            body,
            [f"Pain {score.nrs}/10 {self.t.local(score.timing).display.lower()}{where}"],
        )

    def consent(self, treatment: Treatment) -> str:
        c = treatment.consent
        assert c is not None
        performer = (
            {"reference": self.patient} if c.by.casefold() == "patient" else {"display": c.by}
        )
        body: JSON = {
            "status": self.status("active"),
            "scope": self.convention("consent-scope-treatment"),
            "category": [self.concept("ims-treatment-consent")],
            "patient": {"reference": self.patient},
            "performer": [performer],
            "organization": [{"reference": self.org}],
            # The clinic's consent policy by URI: R4's consent-policy value set has no opt-in
            # code (TERMINOLOGY.md; ims-fhir 0.1 wrote policyRule OPTIN, still read).
            "policy": [{"uri": consent_policy(self.ns)}],
            "provision": {"type": "permit" if c.given else "deny"},
        }
        self.fields(Profile.CONSENT, c, body)
        if c.form_reference is not None:
            body["sourceReference"] = {
                "type": "DocumentReference",
                "identifier": {
                    "system": system(self.ns, Kind.CONSENT_FORM),
                    "value": c.form_reference,
                },
            }
        decision = "given" if c.given else "refused"
        return self.add(
            "Consent",
            Kind.CONSENT,
            f"{self.r.id}/consent",
            Profile.CONSENT,
            body,
            [f"Consent to IMS {decision} by {c.by} at {_instant(c.at)}"],
        )

    def _procedure_common(self, done: bool = True) -> JSON:
        out: JSON = {
            "category": self.convention("procedure-category"),
            "subject": {"reference": self.patient},
            "encounter": {"reference": self.encounter},
        }
        if done:  # a procedure not done has no time it was performed, nor a performer
            out["performedPeriod"] = {"start": _instant(self.r.start), "end": _instant(self.r.end)}
            out["performer"] = [{"actor": {"reference": self.practitioner}}]
        return out

    def session(self, treatment: Treatment, reasons: list[str], consent: str | None) -> str:
        devices = ["device-needle"]
        if any(s.electrical_stimulation for s in treatment.sites):
            devices.append("device-electrostimulation")
        done = bool(treatment.sites)
        body: JSON = {"status": self.status("completed" if done else "not-done")}
        if not done:
            # Why (R4 Procedure.statusReason): the patient refused, or no reason recorded.
            refused = treatment.consent is not None and not treatment.consent.given
            body["statusReason"] = self.concept("refused-by-patient" if refused else "not-needled")
        body |= {"code": self.concept("ims-session"), **self._procedure_common(done)}
        if done:  # no device was used in a session not done
            body["usedCode"] = [self.convention(d) for d in devices]
        if consent is not None:
            body["extension"] = [
                {"url": Ext.SESSION_CONSENT.url, "valueReference": {"reference": consent}}
            ]
        if reasons:
            body["reasonReference"] = [{"reference": r} for r in reasons]
        if treatment.adverse_events:
            body["complication"] = [
                self.concept(event.kind)
                | {"extension": self.slots(Profile.SESSION, COMPLICATION_EXTENSION, event)}
                for event in treatment.adverse_events
            ]
        self.fields(Profile.SESSION, treatment, body)
        events = ", ".join(self.t.local(e.kind).display for e in treatment.adverse_events)
        return self.add(
            "Procedure",
            Kind.PROCEDURE,
            f"{self.r.id}/session",
            Profile.SESSION,
            body,
            [f"IMS session: {len(treatment.sites)} site(s) needled"]
            + ([f"Adverse events: {events}"] if events else []),
        )

    def site(self, s: NeedledSite) -> str:
        t = self.t
        extensions = self.slots(Profile.NEEDLED_SITE, PROCEDURE_EXTENSION, s)
        # The side in a standard R4 form as well (TERMINOLOGY.md, "Laterality on a Procedure"):
        # a contained BodyStructure, the muscle its location and the side its locationQualifier,
        # named by the core procedure-targetBodyStructure extension.
        muscle, side = t.local(s.muscle).display, t.local(s.side).display
        extensions.append(
            {"url": Ext.TARGET_BODY_STRUCTURE.url, "valueReference": {"reference": "#site"}}
        )
        body: JSON = {
            "contained": [
                {
                    "resourceType": "BodyStructure",
                    "id": "site",
                    "location": {
                        "coding": [c.as_fhir() for c in t.codings(s.muscle)],
                        "text": muscle,
                    },
                    "locationQualifier": [
                        {"coding": [c.as_fhir() for c in t.codings(s.side)], "text": side}
                    ],
                    "patient": {"reference": self.patient},
                }
            ],
            "extension": extensions,
            "partOf": [{"reference": self.session_url}],
            "status": self.status("completed"),
            "code": self.concept("ims-needled-site"),
            **self._procedure_common(),
            "bodySite": [
                {
                    "extension": self.slots(Profile.NEEDLED_SITE, BODY_SITE_EXTENSION, s),
                    # The side and the muscle in words, for every reader (TERMINOLOGY.md).
                    "text": f"{side} {_lower_first(muscle)}",
                }
            ],
            "usedCode": [self.convention("device-needle")],
        }
        self.fields(Profile.NEEDLED_SITE, s, body)
        return self.add(
            "Procedure",
            Kind.PROCEDURE,
            f"{self.r.id}/site/{s.id}",
            Profile.NEEDLED_SITE,
            body,
            [
                f"Needled {t.local(s.muscle).display} ({t.local(s.side).display.lower()}, "
                f"{s.role}, {'-'.join(s.segments) or 'no segment'})",
                f"Needle {s.needle_diameter_mm} x {s.needle_length_mm} mm, "
                f"{s.insertions} insertion(s), max depth {s.max_depth_mm} mm, "
                f"{s.dwell_time_s} s, response: {s.response}",
            ],
        )

    def provenance(self) -> None:
        targets = [e.full_url for e in self.entries]
        value = self.r.id
        prov_system = system(self.ns, Kind.PROVENANCE)
        resource_id = provenance_id(self.ns, value)
        resource: JSON = {
            "resourceType": "Provenance",
            "id": resource_id,
            "meta": self.meta(Profile.PROVENANCE),
            "text": _div(f"Provenance of IMS encounter {value} from {self.r.clinic.name}"),
            "target": [{"reference": t} for t in targets],
            # When the encounter happened; `recorded` is when the record of it was made: the
            # record's own time if it has one, else the encounter's end.
            "occurredPeriod": {"start": _instant(self.r.start), "end": _instant(self.r.end)},
            "recorded": _instant(self.r.recorded or self.r.end),
            "activity": self.convention("provenance-activity-create"),
            "agent": [
                {
                    "type": self.convention("provenance-author"),
                    "who": {"reference": self.practitioner},
                    "onBehalfOf": {"reference": self.org},
                },
                {"type": self.convention("provenance-custodian"), "who": {"reference": self.org}},
            ],
        }
        self.entries.append(
            _Entry(full_url(prov_system, value), resource, "PUT", f"Provenance/{resource_id}")
        )
