"""Reverse mapping: FHIR R4 resources -> IMS encounter records.

Input is what a caller has: a transaction Bundle made by :func:`~ims_fhir.to_fhir`, a searchset
Bundle from a server, or any list of resources. What servers do to resources is expected: ids
they assign, literal references (``Patient/123`` or absolute URLs) in place of ``urn:uuid``,
added ``meta``, rewritten narrative, extra codings from a terminology service, any order.

Foreign data never crashes it. Resources this project did not make are skipped and listed in
the :class:`MappingReport` with the reason; a resource of ours that cannot be read back gives a
:class:`~ims_fhir.MappingError` naming the resource and the element path, reported for its
encounter while the other encounters are still rebuilt.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from ._exceptions import MappingError
from ._identity import (
    ESTIM_DURATION,
    ESTIM_FREQUENCY,
    ESTIM_INTENSITY,
    Ext,
    Kind,
    default_namespace,
    split_system,
)
from ._record import Encounter
from ._terminology import Terminology, terminology

__all__ = ["MappingReport", "SkippedResource", "from_fhir"]

JSON = dict[str, Any]
_CONSENT_LINKS = frozenset({Ext.SESSION_CONSENT.url, Ext.SUPPORTING_INFO.url})


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


def from_fhir(resources: Any) -> MappingReport:
    """Rebuild encounter records from a Bundle, a list of resources, or JSON text.

    Args:
        resources: a Bundle (model or JSON dict), an iterable of resources (models or dicts),
            or the JSON text of either.

    Returns:
        The records rebuilt, in the order their Encounters appear, with what was skipped and
        the errors of encounters that could not be rebuilt.
    """
    index = _Index(_as_resources(resources))
    report = MappingReport()
    used: set[int] = set()
    for encounter in index.by_type("Encounter"):
        ours = _our_identifier(encounter, Kind.ENCOUNTER)
        if ours is None:
            continue
        rebuild = _Rebuild(index, encounter, ours[0], terminology())
        try:
            record = rebuild.run()
        except MappingError as exc:
            report.errors.append(exc)
            used.add(id(encounter))
            continue
        report.records.append(record)
        used |= rebuild.touched
        for retired in rebuild.retired:
            used.add(id(retired))
            report.skipped.append(
                SkippedResource(_name(retired), "entered in error: no longer part of the record")
            )
    for resource in index.resources:
        if id(resource) not in used:
            report.skipped.append(SkippedResource(_name(resource), _skip_reason(resource)))
    return report


def _as_resources(value: Any) -> list[JSON]:
    if isinstance(value, str | bytes):
        value = json.loads(value)
    if hasattr(value, "model_dump_json"):
        value = json.loads(value.model_dump_json())
    if isinstance(value, Mapping):
        if value.get("resourceType") == "Bundle":
            out = []
            for entry in value.get("entry") or []:
                resource = entry.get("resource")
                if isinstance(resource, Mapping):
                    item = dict(resource)
                    if entry.get("fullUrl"):
                        item["__fullUrl"] = entry["fullUrl"]
                    out.append(item)
            return out
        return [dict(value)]
    if isinstance(value, Iterable):
        out = []
        for item in value:
            out.extend(_as_resources(item))
        return out
    raise TypeError(f"cannot read FHIR resources from {type(value).__name__}")


def _name(resource: JSON) -> str:
    where = resource.get("id") or resource.get("__fullUrl", "?")
    return f"{resource.get('resourceType', '?')}/{where}"


def _our_identifier(resource: JSON, kind: Kind) -> tuple[str, str] | None:
    """Return (namespace, value) of the resource's ims-fhir identifier of ``kind``."""
    for ident in resource.get("identifier") or []:
        parts = split_system(str(ident.get("system", "")))
        if parts is not None and parts[1] is kind and isinstance(ident.get("value"), str):
            return parts[0], ident["value"]
    return None


def _skip_reason(resource: JSON) -> str:
    for kind in Kind:
        if _our_identifier(resource, kind) is not None:
            return "made by ims-fhir but not linked to an IMS encounter in this input"
    return "not made by ims-fhir (no ims-fhir identifier)"


class _Index:
    """Resolves references of every form a server may use."""

    def __init__(self, resources: list[JSON]) -> None:
        self.resources = resources
        self._by_key: dict[str, JSON] = {}
        for resource in resources:
            rtype, rid = resource.get("resourceType"), resource.get("id")
            if rtype and rid:
                self._by_key[f"{rtype}/{rid}"] = resource
            full = resource.get("__fullUrl")
            if isinstance(full, str):
                self._by_key[full] = resource
                tail = _type_id_tail(full)
                if tail:
                    self._by_key.setdefault(tail, resource)

    def by_type(self, resource_type: str) -> list[JSON]:
        return [r for r in self.resources if r.get("resourceType") == resource_type]

    def resolve(self, reference: Any) -> JSON | None:
        if not isinstance(reference, Mapping):
            return None
        ref = reference.get("reference")
        if not isinstance(ref, str):
            return None
        found = self._by_key.get(ref)
        if found is None:
            tail = _type_id_tail(ref)
            found = self._by_key.get(tail) if tail else None
        return found

    def points_to(self, reference: Any, target: JSON) -> bool:
        return self.resolve(reference) is target


def _type_id_tail(url: str) -> str | None:
    parts = url.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2][:1].isupper():
        return f"{parts[-2]}/{parts[-1]}"
    return None


class _Rebuild:
    """Rebuilds one encounter; raises MappingError with the resource and element path."""

    def __init__(self, index: _Index, encounter: JSON, namespace: str, terms: Terminology) -> None:
        self.index = index
        self.enc = encounter
        self.ns = namespace
        self.t = terms
        self.touched: set[int] = {id(encounter)}
        self.retired: list[JSON] = []
        self.live = encounter.get("status") != "entered-in-error"
        self.enc_id = _our_identifier(encounter, Kind.ENCOUNTER)[1]  # type: ignore[index]
        # The Provenance lists the resources in the order the record gave them; servers may
        # return resources in any order, so that list (when present) is the order of pain
        # scores and needled sites. Findings are ordered by the panel's hasMember.
        self.rank: dict[int, int] = {}
        # What the Provenance names is what the record holds: in a retracted encounter, where
        # every part is entered in error, a part removed before the retraction is not named.
        self.listed: set[int] | None = None
        for prov in index.by_type("Provenance"):
            targets = [index.resolve(t) for t in prov.get("target") or []]
            if any(t is encounter for t in targets):
                self.use(prov)
                self.listed = (self.listed or set()) | {id(t) for t in targets if t is not None}
                for n, target in enumerate(targets):
                    if target is not None:
                        self.rank.setdefault(id(target), n)
        base = len(index.resources)
        for n, resource in enumerate(index.resources):
            self.rank.setdefault(id(resource), base + n)

    # -- helpers -------------------------------------------------------------------------------

    def fail(self, resource: JSON, path: str, reason: str) -> MappingError:
        return MappingError(_name(resource), f"{resource.get('resourceType')}.{path}", reason)

    def need(self, resource: JSON, path: str) -> Any:
        value: Any = resource
        for part in path.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
            if value is None:
                raise self.fail(resource, path, "missing")
        return value

    def code_in(self, resource: JSON, path: str, concept: Any, group: str) -> str:
        for coding in (concept or {}).get("coding") or []:
            found = self.t.from_coding(coding.get("system"), coding.get("code"), group)
            if found is not None:
                return found
        raise self.fail(resource, path, f"no coding of a known {group}")

    def optional_code(self, concept: Any, group: str) -> str | None:
        for coding in (concept or {}).get("coding") or []:
            found = self.t.from_coding(coding.get("system"), coding.get("code"), group)
            if found is not None:
                return found
        return None

    def linked(self, resource_type: str, element: str = "encounter") -> list[JSON]:
        out = []
        for resource in self.index.by_type(resource_type):
            if self.index.points_to(resource.get(element), self.enc):
                out.append(resource)
        return out

    def suffix(self, resource: JSON, kind: Kind, middle: str) -> str | None:
        ours = _our_identifier(resource, kind)
        if ours is None:
            return None
        prefix = f"{self.enc_id}/{middle}"
        if ours[1] == prefix:
            return ""
        if ours[1].startswith(prefix + "/"):
            return ours[1][len(prefix) + 1 :]
        return None

    def use(self, resource: JSON) -> JSON:
        self.touched.add(id(resource))
        return resource

    def resolve_required(self, resource: JSON, path: str) -> JSON:
        target = self.index.resolve(self.need(resource, path))
        if target is None:
            raise self.fail(resource, path, "reference does not resolve in the input")
        return self.use(target)

    def quantity(self, resource: JSON, path: str, value: Any) -> float:
        number = (value or {}).get("value")
        if not isinstance(number, int | float):
            raise self.fail(resource, path, "quantity without a numeric value")
        return float(number)

    # -- the record ----------------------------------------------------------------------------

    def is_retired(self, resource: JSON) -> bool:
        """A part the record no longer holds: entered in error while its encounter is not."""
        status = resource.get("status")
        if resource.get("resourceType") == "Condition":
            codes = [
                c.get("code")
                for c in (resource.get("verificationStatus") or {}).get("coding") or []
            ]
            status = "entered-in-error" if "entered-in-error" in codes else None
        if status != "entered-in-error":
            return False
        if self.live or (self.listed is not None and id(resource) not in self.listed):
            self.retired.append(resource)
            return True
        return False

    def run(self) -> Encounter:
        enc = self.enc
        data: JSON = {
            "id": self.enc_id,
            "clinic": self.clinic(),
            "patient": self.patient(),
            "practitioner": self.practitioner(),
            "start": self.need(enc, "period.start"),
            "end": self.need(enc, "period.end"),
            "visit_type": self.code_in(enc, "type", (enc.get("type") or [None])[0], "visit-type"),
        }
        if enc.get("status") == "entered-in-error":
            data["retracted"] = True
        observations = self.linked("Observation")
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
        try:
            return Encounter.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            path = ".".join(str(p) for p in first["loc"]) or "<record>"
            raise MappingError(
                _name(enc), path, f"rebuilt record is invalid: {first['msg']}"
            ) from exc

    def clinic(self) -> JSON:
        org = self.resolve_required(self.enc, "serviceProvider")
        ours = _our_identifier(org, Kind.ORGANIZATION)
        if ours is None:
            raise self.fail(org, "identifier", "no ims-fhir organization identifier")
        out: JSON = {"id": ours[1], "name": self.need(org, "name")}
        if self.ns != default_namespace(ours[1]):
            out["namespace"] = self.ns
        return out

    def _name(self, resource: JSON) -> JSON:
        names = resource.get("name") or []
        if not names:
            raise self.fail(resource, "name", "missing")
        name = names[0]
        out: JSON = {"family": name.get("family")}
        if name.get("given"):
            out["given"] = name["given"]
        return out

    @staticmethod
    def _kind(ident: JSON) -> str:
        for coding in (ident.get("type") or {}).get("coding") or []:
            if coding.get("code") == "JHN":
                return "health-card"
            if coding.get("code") == "LN":
                return "licence"
        return "other"

    def patient(self) -> JSON:
        p = self.resolve_required(self.enc, "subject")
        ours = _our_identifier(p, Kind.PATIENT)
        if ours is None:
            raise self.fail(p, "identifier", "no ims-fhir patient identifier")
        identifiers = [
            {"system": i.get("system"), "value": i.get("value"), "kind": self._kind(i)}
            for i in p.get("identifier") or []
            if split_system(str(i.get("system", ""))) is None
        ]
        return {
            "id": ours[1],
            "identifiers": identifiers,
            "name": self._name(p),
            "birth_date": self.need(p, "birthDate"),
            "sex": self.need(p, "gender"),
        }

    def practitioner(self) -> JSON:
        participants = self.enc.get("participant") or []
        if not participants:
            raise self.fail(self.enc, "participant", "missing")
        pr = self.resolve_required(participants[0], "individual")
        ours = _our_identifier(pr, Kind.PRACTITIONER)
        if ours is None:
            raise self.fail(pr, "identifier", "no ims-fhir practitioner identifier")
        out: JSON = {"id": ours[1], "name": self._name(pr)}
        for ident in pr.get("identifier") or []:
            if split_system(str(ident.get("system", ""))) is None:
                out["licence"] = {
                    "system": ident.get("system"),
                    "value": ident.get("value"),
                    "kind": self._kind(ident),
                }
                break
        return out

    def _segments(self, resource: JSON, components: list[JSON], code: str) -> list[str]:
        out = []
        for i, comp in enumerate(components):
            if self.optional_code(comp.get("code"), "observation-element") == code:
                out.append(
                    self.code_in(
                        resource,
                        f"component[{i}].valueCodeableConcept",
                        comp.get("valueCodeableConcept"),
                        "spinal-level",
                    )
                )
        return out

    def findings(self, observations: list[JSON]) -> list[JSON]:
        out = []
        for obs in observations:
            fid = self.suffix(obs, Kind.OBSERVATION, "finding")
            if not fid or self.is_retired(obs):
                continue
            self.use(obs)
            sign = self.code_in(obs, "code", obs.get("code"), "sign")
            present = obs.get("valueBoolean")
            if not isinstance(present, bool):
                raise self.fail(obs, "valueBoolean", "a finding needs a boolean value")
            f: JSON = {"id": fid, "sign": sign, "present": present}
            site = obs.get("bodySite") or {}
            muscle = self.optional_code(site, "muscle")
            if muscle:
                f["muscle"] = muscle
            if site.get("text") and not (muscle and site["text"] == self.t.local(muscle).display):
                f["region"] = site["text"]
            for ext in site.get("extension") or []:
                if ext.get("url") == Ext.STRUCTURE_LATERALITY.url:
                    f["side"] = self.code_in(
                        obs,
                        "bodySite.extension.valueCodeableConcept",
                        ext.get("valueCodeableConcept"),
                        "side",
                    )
            components = obs.get("component") or []
            segments = self._segments(obs, components, "spinal-segment")
            if segments:
                f["segments"] = segments
            for i, comp in enumerate(components):
                code = self.optional_code(comp.get("code"), "observation-element")
                if code == "grade":
                    f["grade"] = comp.get("valueInteger")
                elif code == "trophedema-test-used":
                    f["test"] = self.code_in(
                        obs,
                        f"component[{i}].valueCodeableConcept",
                        comp.get("valueCodeableConcept"),
                        "trophedema-test",
                    )
                elif code == "rom-joint":
                    f["joint"] = comp.get("valueString")
                elif code == "rom-movement":
                    f["movement"] = comp.get("valueString")
                elif code == "rom-degrees":
                    f["degrees"] = self.quantity(
                        obs, f"component[{i}].valueQuantity", comp.get("valueQuantity")
                    )
            notes = obs.get("note") or []
            if notes:
                f["note"] = notes[0].get("text")
            out.append(f)
        return out

    def assessment(self, observations: list[JSON], findings: list[JSON]) -> JSON | None:
        panel = next(
            (o for o in observations if self.suffix(o, Kind.OBSERVATION, "assessment") == ""),
            None,
        )
        if panel is None:
            if findings:
                raise self.fail(self.enc, "encounter", "findings without an assessment panel")
            return None
        self.use(panel)
        order = {}
        for n, member in enumerate(panel.get("hasMember") or []):
            target = self.index.resolve(member)
            if target is None:
                raise self.fail(panel, f"hasMember[{n}]", "member not in the input")
            fid = self.suffix(target, Kind.OBSERVATION, "finding")
            if fid:
                order[fid] = n
        missing = [f["id"] for f in findings if f["id"] not in order]
        if missing:
            raise self.fail(panel, "hasMember", f"findings {missing} are not members")
        a: JSON = {"findings": sorted(findings, key=lambda f: order[f["id"]])}
        levels = self._segments(panel, panel.get("component") or [], "suspected-levels")
        if levels:
            a["suspected_levels"] = levels
        notes = panel.get("note") or []
        if notes:
            a["notes"] = notes[0].get("text")
        for cond in self.linked("Condition"):
            if self.suffix(cond, Kind.CONDITION, "diagnosis") == "" and not self.is_retired(cond):
                self.use(cond)
                d: JSON = {"code": self.code_in(cond, "code", cond.get("code"), "diagnosis")}
                cnotes = cond.get("note") or []
                if cnotes:
                    d["note"] = cnotes[0].get("text")
                a["diagnosis"] = d
        return a

    def pain(self, observations: list[JSON]) -> list[JSON]:
        out = []
        for obs in sorted(observations, key=lambda o: self.rank[id(o)]):
            pid = self.suffix(obs, Kind.OBSERVATION, "pain")
            if not pid or self.is_retired(obs):
                continue
            self.use(obs)
            timing = None
            for i, comp in enumerate(obs.get("component") or []):
                if self.optional_code(comp.get("code"), "observation-element") == "score-timing":
                    timing = self.code_in(
                        obs,
                        f"component[{i}].valueCodeableConcept",
                        comp.get("valueCodeableConcept"),
                        "pain-timing",
                    )
            if timing is None:
                raise self.fail(obs, "component", "no pain-timing component")
            nrs = self.quantity(obs, "valueQuantity", obs.get("valueQuantity"))
            if nrs != int(nrs):
                raise self.fail(obs, "valueQuantity.value", "NRS must be a whole number")
            p: JSON = {"id": pid, "timing": timing, "nrs": int(nrs)}
            location = (obs.get("bodySite") or {}).get("text")
            if location:
                p["location"] = location
            out.append(p)
        return out

    def treatment(self) -> JSON | None:
        procedures = self.linked("Procedure")
        session = next(
            (p for p in procedures if self.suffix(p, Kind.PROCEDURE, "session") == ""), None
        )
        if session is None:
            return None
        self.use(session)
        t: JSON = {}
        for ext in session.get("extension") or []:
            if ext.get("url") in _CONSENT_LINKS:
                consent = self.index.resolve(ext.get("valueReference"))
                if consent is not None and consent.get("resourceType") == "Consent":
                    t["consent"] = self.consent(self.use(consent))
        sites = []
        for proc in sorted(procedures, key=lambda p: self.rank[id(p)]):
            sid = self.suffix(proc, Kind.PROCEDURE, "site")
            if sid and not self.is_retired(proc):
                sites.append(self.site(self.use(proc), sid))
        if sites:
            t["sites"] = sites
        events = []
        for n, comp in enumerate(session.get("complication") or []):
            e: JSON = {"kind": self.code_in(session, f"complication[{n}]", comp, "adverse-event")}
            for ext in comp.get("extension") or []:
                if ext.get("url") == Ext.ADVERSE_EVENT_SEVERITY.url:
                    e["severity"] = self.code_in(
                        session,
                        f"complication[{n}].extension",
                        ext.get("valueCodeableConcept"),
                        "severity",
                    )
                elif ext.get("url") == Ext.ADVERSE_EVENT_NOTE.url:
                    e["note"] = ext.get("valueString")
            events.append(e)
        if events:
            t["adverse_events"] = events
        notes = session.get("note") or []
        if notes:
            t["notes"] = notes[0].get("text")
        return t

    def consent(self, consent: JSON) -> JSON:
        performer = (consent.get("performer") or [{}])[0]
        target = self.index.resolve(performer)
        by = "patient" if target is not None and target.get("resourceType") == "Patient" else None
        if by is None:
            by = performer.get("display")
        if not by:
            raise self.fail(consent, "performer", "no patient reference or display")
        out: JSON = {
            "given": self.need(consent, "provision.type") == "permit",
            "at": self.need(consent, "dateTime"),
            "by": by,
        }
        form = ((consent.get("sourceReference") or {}).get("identifier") or {}).get("value")
        if form:
            out["form_reference"] = form
        return out

    def site(self, proc: JSON, sid: str) -> JSON:
        body_sites = proc.get("bodySite") or []
        if not body_sites:
            raise self.fail(proc, "bodySite", "a needled site needs a muscle")
        body_site = body_sites[0]
        s: JSON = {"id": sid, "muscle": self.code_in(proc, "bodySite[0]", body_site, "muscle")}
        for ext in body_site.get("extension") or []:
            if ext.get("url") == Ext.BODYSITE_LATERALITY.url:
                s["side"] = self.code_in(
                    proc, "bodySite[0].extension", ext.get("valueCodeableConcept"), "side"
                )
        segments = []
        for n, ext in enumerate(proc.get("extension") or []):
            url = ext.get("url")
            path = f"extension[{n}]"
            if url == Ext.SITE_ROLE.url:
                s["role"] = self.code_in(proc, path, ext.get("valueCodeableConcept"), "site-role")
            elif url == Ext.SPINAL_SEGMENT.url:
                segments.append(
                    self.code_in(proc, path, ext.get("valueCodeableConcept"), "spinal-level")
                )
            elif url == Ext.NEEDLE_DIAMETER.url:
                s["needle_diameter_mm"] = self.quantity(proc, path, ext.get("valueQuantity"))
            elif url == Ext.NEEDLE_LENGTH.url:
                s["needle_length_mm"] = self.quantity(proc, path, ext.get("valueQuantity"))
            elif url == Ext.INSERTIONS.url:
                s["insertions"] = ext.get("valuePositiveInt")
            elif url == Ext.MAX_DEPTH.url:
                s["max_depth_mm"] = self.quantity(proc, path, ext.get("valueQuantity"))
            elif url == Ext.DWELL_TIME.url:
                s["dwell_time_s"] = self.quantity(proc, path, ext.get("valueQuantity"))
            elif url == Ext.NEEDLE_RESPONSE.url:
                s["response"] = self.code_in(
                    proc, path, ext.get("valueCodeableConcept"), "needle-response"
                )
            elif url == Ext.ELECTRICAL_STIMULATION.url:
                parts = {e.get("url"): e.get("valueQuantity") for e in ext.get("extension") or []}
                s["electrical_stimulation"] = {
                    "frequency_hz": self.quantity(proc, path, parts.get(ESTIM_FREQUENCY)),
                    "intensity_ma": self.quantity(proc, path, parts.get(ESTIM_INTENSITY)),
                    "minutes": self.quantity(proc, path, parts.get(ESTIM_DURATION)),
                }
        if segments:
            s["segments"] = segments
        if isinstance(s.get("dwell_time_s"), float) and s["dwell_time_s"].is_integer():
            s["dwell_time_s"] = int(s["dwell_time_s"])
        return s
