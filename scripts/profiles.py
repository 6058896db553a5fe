#!/usr/bin/env python3
"""Write the project's conformance artifacts into mappings/: extensions, ValueSets, profiles.

    python scripts/profiles.py                      # write the differentials (keeps snapshots)
    python scripts/profiles.py --snapshot BASE_URL  # also fill snapshots by BASE_URL's $snapshot
    python scripts/profiles.py --check              # fail if mappings/ differs from this script

The CodeSystem and ConceptMap are the source of the codes; this script derives the ValueSets from
them and states the constraints the mapping promises as StructureDefinitions. Snapshots come from
a FHIR server's ``StructureDefinition/$snapshot`` (the HAPI test server: tests/hapi/run -- with
--ims.conformance-dir=mappings), so no snapshot is written by hand.
"""

from __future__ import annotations

import html
import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

from ims_fhir._version import __version__
from ims_fhir.mapping.spec import (
    BODY_SITE_EXTENSION,
    PROCEDURE_EXTENSION,
    Slot,
    spec,
)
from ims_fhir.record.terminology import CANONICAL

CANON = CANONICAL
LOCAL = f"{CANON}/CodeSystem/ims-local"
SCT, LOINC, UCUM = "http://snomed.info/sct", "http://loinc.org", "http://unitsofmeasure.org"
MAPPINGS = Path(__file__).resolve().parents[1] / "mappings"
VERSION = __version__
JSON = dict[str, Any]


def load(name: str) -> JSON:
    data: JSON = json.loads((MAPPINGS / name).read_text(encoding="utf-8"))
    return data


def narrative(title: str, description: str) -> JSON:
    """A conformance resource's narrative: its title and description, for a human reader."""
    body = "".join(f"<p>{html.escape(line, quote=False)}</p>" for line in (title, description))
    return {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{body}</div>'}


def meta(kind: str, id_: str, name: str, title: str, description: str) -> JSON:
    return {
        "resourceType": kind,
        "id": id_,
        "text": narrative(title, description),
        "url": f"{CANON}/{kind}/{id_}",
        "version": VERSION,
        "name": name,
        "title": title,
        "status": "active",
        "experimental": False,
        "publisher": "ims-fhir",
        "description": description,
    }


def camel(id_: str) -> str:
    return "".join(w.capitalize() for w in id_.split("-"))


# -- ValueSets ---------------------------------------------------------------------------------


def value_sets() -> list[JSON]:
    cs, cm = load("CodeSystem-ims-local.json"), load("ConceptMap-ims-to-standard.json")
    groups = {g["code"]: g["concept"] for g in cs["concept"]}
    standard: dict[str, list[tuple[str, str, str]]] = {}
    for group in cm["group"]:
        for element in group["element"]:
            for target in element["target"]:
                if target["equivalence"] in ("equal", "equivalent", "wider"):
                    standard.setdefault(element["code"], []).append(
                        (group["target"], target["code"], target["display"])
                    )
    out = []
    for vocabulary in spec().vocabularies:
        id_, title, group = vocabulary.value_set, vocabulary.title, vocabulary.group
        include = [
            {
                "system": LOCAL,
                "concept": [{"code": c["code"], "display": c["display"]} for c in groups[group]],
            }
        ]
        by_system: dict[str, list[JSON]] = {}
        for concept in groups[group]:
            for system, code, display in standard.get(concept["code"], []):
                by_system.setdefault(system, []).append({"code": code, "display": display})
        include += [{"system": s, "concept": c} for s, c in by_system.items()]
        vs = meta(
            "ValueSet",
            id_,
            camel(id_),
            title,
            f"{title}: the codes of group '{group}' of CodeSystem ims-local and their verified "
            "standard codes (ConceptMap ims-to-standard; source TERMINOLOGY.md).",
        )
        vs["compose"] = {"include": include}
        out.append(vs)
    return out


# -- extensions --------------------------------------------------------------------------------

EXT_SOURCE = (
    "Source: the ims-fhir mapping issue (needled-site extensions); units UCUM (TERMINOLOGY.md)."
)


def extension(
    id_: str,
    title: str,
    description: str,
    contexts: list[str],
    value_type: str,
    *,
    repeats: bool = False,
    unit: str | None = None,
    value_set: str | None = None,
) -> JSON:
    url = f"{CANON}/StructureDefinition/{id_}"
    type_: JSON = {"code": value_type}
    if value_type == "Reference":
        type_["targetProfile"] = ["http://hl7.org/fhir/StructureDefinition/Consent"]
    value: JSON = {
        "id": "Extension.value[x]",
        "path": "Extension.value[x]",
        "min": 1,
        "type": [type_],
    }
    if value_set:
        value["binding"] = {"strength": "required", "valueSet": f"{CANON}/ValueSet/{value_set}"}
    elements: list[JSON] = [
        {
            "id": "Extension",
            "path": "Extension",
            "short": title,
            "definition": description,
            "min": 0,
            "max": "*" if repeats else "1",
        },
        {"id": "Extension.extension", "path": "Extension.extension", "max": "0"},
        {"id": "Extension.url", "path": "Extension.url", "fixedUri": url},
        value,
    ]
    if unit:
        elements += [
            {
                "id": "Extension.value[x].system",
                "path": "Extension.value[x].system",
                "min": 1,
                "fixedUri": UCUM,
            },
            {
                "id": "Extension.value[x].code",
                "path": "Extension.value[x].code",
                "min": 1,
                "fixedCode": unit,
            },
        ]
    return structure(
        id_,
        title,
        f"{description} {EXT_SOURCE}",
        "Extension",
        elements,
        base="http://hl7.org/fhir/StructureDefinition/Extension",
        contexts=contexts,
        kind="complex-type",
    )


def complex_extension(slot: Slot) -> JSON:
    """An extension of sub-extensions (electrical-stimulation), from its spec rule."""
    elements: list[JSON] = [
        {
            "id": "Extension",
            "path": "Extension",
            "short": slot.short,
            "definition": slot.definition,
            "min": 0,
            "max": slot.max,
        },
        {
            "id": "Extension.extension",
            "path": "Extension.extension",
            "min": len(slot.parts),
            "slicing": {"discriminator": [{"type": "value", "path": "url"}], "rules": "closed"},
        },
    ]
    for part in slot.parts:
        name = part.url
        base = f"Extension.extension:{name}"
        elements += [
            {
                "id": base,
                "path": "Extension.extension",
                "sliceName": name,
                "short": part.short,
                "min": 1,
                "max": "1",
            },
            {"id": f"{base}.extension", "path": "Extension.extension.extension", "max": "0"},
            {"id": f"{base}.url", "path": "Extension.extension.url", "fixedUri": name},
            {
                "id": f"{base}.value[x]",
                "path": "Extension.extension.value[x]",
                "min": 1,
                "type": [{"code": part.type}],
            },
            {
                "id": f"{base}.value[x].system",
                "path": "Extension.extension.value[x].system",
                "min": 1,
                "fixedUri": UCUM,
            },
            {
                "id": f"{base}.value[x].code",
                "path": "Extension.extension.value[x].code",
                "min": 1,
                "fixedCode": part.unit,
            },
        ]
    elements += [
        {"id": "Extension.url", "path": "Extension.url", "fixedUri": slot.url},
        {"id": "Extension.value[x]", "path": "Extension.value[x]", "max": "0"},
    ]
    assert slot.short is not None and slot.definition is not None
    return structure(
        slot.key,
        slot.short,
        f"{slot.definition} {EXT_SOURCE}",
        "Extension",
        elements,
        base="http://hl7.org/fhir/StructureDefinition/Extension",
        contexts=[slot.context],
        kind="complex-type",
    )


def spec_extensions() -> list[JSON]:
    """The extensions the mapping spec's slot rules name (the project's own)."""
    out = []
    for slot in spec().slots:
        if not slot.is_extension or "://" in slot.key:
            continue
        if slot.type == "complex":
            out.append(complex_extension(slot))
            continue
        assert slot.short is not None and slot.definition is not None, slot.path
        value_set = spec().value_set(slot.vocabulary) if slot.vocabulary else None
        out.append(
            extension(
                slot.key,
                slot.short,
                slot.definition,
                [slot.context],
                slot.type,
                repeats=slot.repeats,
                unit=slot.unit,
                value_set=value_set,
            )
        )
    return out


def spec_slices(path: str, profile: str, container: str) -> list[JSON]:
    """The extension slices of one element of a profile, from the spec's slot rules."""
    slots = spec().slots_of(profile, container)
    return ext_slices(path, [(s.slice or s.key, s.key, s.min, s.max) for s in slots])


def extensions() -> list[JSON]:
    return [
        *spec_extensions(),
        # Not a record field: the link from the session to its Consent.
        extension(
            "session-consent",
            "Consent of the session",
            "The Consent to this IMS session. FHIR R4 (4.0.1) allows the core workflow-supportingInfo extension, which TERMINOLOGY.md names, only on DiagnosticReport, Observation and CommunicationRequest, so R4 validators reject it on a Procedure.",
            ["Procedure"],
            "Reference",
        ),
        # Not a record field: how ims-fhir's sync recognises its own writes (sync/push.py).
        extension(
            "sync-signature",
            "Sync signature",
            "The signature of the content ims-fhir wrote in this version of the resource: a hash of the resource without id, meta and narrative, references read as the identifiers of their targets. The sync engine reads it only where its state store has no record of the resource, to tell its own write from an edit made on the server. It carries no clinical meaning.",
            ["Meta"],
            "string",
        ),
        # Not a record field: which encounter a shared resource was last written from
        # (sync/matching.py), so an older encounter never reverts what a newer one wrote.
        extension(
            "sync-snapshot",
            "Sync snapshot",
            "On a patient, practitioner or organisation ims-fhir created for a clinic: the start of the encounter whose record the content was written from. The sync engine updates such a resource from an encounter no older than this, never from an older one. It carries no clinical meaning.",
            ["Meta"],
            "dateTime",
        ),
    ]


# -- profiles ----------------------------------------------------------------------------------


def element_order(type_: str, elements: list[JSON]) -> list[JSON]:
    """Sort differential elements into the base resource's element order (stable).

    Snapshot generators walk the base in order and skip a differential element that comes
    "too late"; fhir.resources knows the order of a resource's top-level elements. Nested
    elements (meta.source, period.start, ...) directly follow their parent in the lists below.
    """
    if type_ == "Extension":
        return elements
    from fhir.resources.R4B import get_fhir_model_class

    sequence = get_fhir_model_class(type_).elements_sequence()

    def rank(element: JSON) -> int:
        parts = element["path"].split(".")
        if len(parts) == 1:
            return -1
        name = parts[1].removesuffix("[x]")
        return next(
            i for i, field in enumerate(sequence) if field == name or field.startswith(name)
        )

    return sorted(elements, key=rank)


def structure(
    id_: str,
    title: str,
    description: str,
    type_: str,
    elements: list[JSON],
    *,
    base: str | None = None,
    contexts: list[str] | None = None,
    kind: str = "resource",
) -> JSON:
    elements = element_order(type_, elements)
    sd = meta("StructureDefinition", id_, camel(id_), title, description)
    sd |= {"fhirVersion": "4.0.1", "kind": kind, "abstract": False}
    if contexts:
        sd["context"] = [{"type": "element", "expression": c} for c in contexts]
    sd |= {
        "type": type_,
        "baseDefinition": base or f"http://hl7.org/fhir/StructureDefinition/{type_}",
        "derivation": "constraint",
        "differential": {"element": elements},
    }
    return sd


def e(element_id: str, **rules: Any) -> JSON:
    """A differential element: its id (with slice names) and path (without)."""
    path = ".".join(part.split(":")[0] for part in element_id.split("."))
    return {"id": element_id, "path": path, **rules}


def local(code: str) -> JSON:
    return {"patternCodeableConcept": {"coding": [{"system": LOCAL, "code": code}]}}


def bound(value_set: str, strength: str = "required") -> JSON:
    return {"binding": {"strength": strength, "valueSet": f"{CANON}/ValueSet/{value_set}"}}


def ref(*targets: str) -> list[JSON]:
    return [
        {
            "code": "Reference",
            "targetProfile": [f"http://hl7.org/fhir/StructureDefinition/{t}" for t in targets],
        }
    ]


def ext_slices(path: str, slices: list[tuple[str, str, int, str]]) -> list[JSON]:
    out = [
        e(
            f"{path}.extension",
            slicing={"discriminator": [{"type": "value", "path": "url"}], "rules": "open"},
        )
    ]
    for name, ext_id, minimum, maximum in slices:
        url = ext_id if "://" in ext_id else f"{CANON}/StructureDefinition/{ext_id}"
        out.append(
            e(
                f"{path}.extension:{name}",
                sliceName=name,
                min=minimum,
                max=maximum,
                type=[{"code": "Extension", "profile": [url]}],
            )
        )
    return out


def invariant(key: str, human: str, expression: str) -> JSON:
    return {"key": key, "severity": "error", "human": human, "expression": expression}


def local_code(key: str, group: str, what: str) -> JSON:
    """An element invariant: the CodeableConcept carries a local code of ``group``.

    Every coded element ims-fhir writes carries its local code. Validators without a SNOMED CT
    terminology server (HAPI's, for one) only warn about an unknown code in a ValueSet that
    also lists SNOMED codes, so the promise is stated as a FHIRPath invariant as well.
    """
    codes = [
        c["code"]
        for g in load("CodeSystem-ims-local.json")["concept"]
        if g["code"] == group
        for c in g["concept"]
    ]
    listed = " | ".join(f"'{c}'" for c in codes)
    return invariant(
        key,
        f"Carries a known local code for {what}",
        f"coding.where(system = '{LOCAL}' and (code in ({listed}))).exists()",
    )


def identified(path: str) -> list[JSON]:
    return [
        e(f"{path}.identifier", min=1),
        e(f"{path}.meta", min=1),
        e(f"{path}.meta.source", min=1),
    ]


SRC = "Constraints promised by the ims-fhir mapping (docs/mapping.md); codes from mappings/ (TERMINOLOGY.md)."


def profiles() -> list[JSON]:
    obs_common = [
        e("Observation.status"),
        e("Observation.subject", min=1, type=ref("Patient")),
        e("Observation.encounter", min=1, type=ref("Encounter")),
        e("Observation.effective[x]", min=1, type=[{"code": "dateTime"}]),
        e("Observation.performer", min=1),
    ]
    proc_common = [
        e("Procedure.subject", type=ref("Patient")),
        e("Procedure.encounter", min=1, type=ref("Encounter")),
        e("Procedure.performed[x]", min=1, type=[{"code": "Period"}]),
        e("Procedure.performer", min=1),
        e(
            "Procedure.category",
            min=1,
            patternCodeableConcept={"coding": [{"system": SCT, "code": "91251008"}]},
        ),
        e("Procedure.usedCode", min=1),
    ]
    grade = (
        f"component.where(code.coding.exists(system = '{LOCAL}' and code = 'grade'))"
        ".all((value as integer) >= 0 and (value as integer) <= 3)"
    )
    return [
        structure(
            "ims-patient",
            "IMS patient",
            f"A patient of an IMS clinic. {SRC}",
            "Patient",
            [
                e("Patient", short="IMS patient"),
                *identified("Patient"),
                e("Patient.name", min=1),
                e("Patient.gender", min=1),
                e("Patient.birthDate", min=1),
            ],
        ),
        structure(
            "ims-practitioner",
            "IMS practitioner",
            f"The physiotherapist. {SRC}",
            "Practitioner",
            [
                e("Practitioner", short="IMS practitioner"),
                *identified("Practitioner"),
                e("Practitioner.name", min=1),
            ],
        ),
        structure(
            "ims-organization",
            "IMS clinic",
            f"The clinic. {SRC}",
            "Organization",
            [
                e("Organization", short="IMS clinic"),
                *identified("Organization"),
                e("Organization.name", min=1),
            ],
        ),
        structure(
            "ims-encounter",
            "IMS encounter",
            f"One IMS visit. {SRC}",
            "Encounter",
            [
                e("Encounter", short="IMS visit"),
                *identified("Encounter"),
                e(
                    "Encounter.class",
                    patternCoding={
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                        "code": "AMB",
                    },
                ),
                e(
                    "Encounter.type",
                    min=1,
                    max="1",
                    **bound("ims-visit-types"),
                    constraint=[local_code("ims-visit-1", "visit-type", "the visit type")],
                ),
                e("Encounter.subject", min=1, type=ref("Patient")),
                e("Encounter.participant", min=1),
                e("Encounter.period", min=1),
                e("Encounter.period.start", min=1),
                e("Encounter.period.end", min=1),
                e("Encounter.serviceProvider", min=1, type=ref("Organization")),
            ],
        ),
        structure(
            "ims-assessment-panel",
            "IMS assessment panel",
            f"The assessment of Gunn's signs: one member per finding. {SRC}",
            "Observation",
            [
                e("Observation", short="IMS assessment panel"),
                *identified("Observation"),
                e("Observation.category", min=1),
                e("Observation.code", **local("gunn-assessment-panel")),
                *obs_common,
                e("Observation.value[x]", max="0"),
                e("Observation.hasMember", type=ref("Observation")),
            ],
        ),
        structure(
            "ims-finding",
            "IMS finding",
            f"One of Gunn's signs, present or absent, at one place. {SRC}",
            "Observation",
            [
                e(
                    "Observation",
                    short="IMS finding",
                    constraint=[invariant("ims-grade-1", "A grade is 0 to 3", grade)],
                ),
                *identified("Observation"),
                e("Observation.category", min=1),
                e(
                    "Observation.code",
                    **bound("ims-signs"),
                    constraint=[local_code("ims-sign-1", "sign", "the sign")],
                ),
                *obs_common,
                e("Observation.value[x]", min=1, type=[{"code": "boolean"}]),
                # Laterality uses the core observation-structureLaterality extension (TERMINOLOGY.md);
                # it is not sliced here because R4 validators do not have its definition.
                # Muscles and skin regions alike (trophic and autonomic signs sit on skin): R4's
                # body-site value set (SNOMED CT body structures), preferred; a region without
                # a code is text (TERMINOLOGY.md; http://hl7.org/fhir/R4/valueset-body-site.html).
                e(
                    "Observation.bodySite",
                    min=1,
                    binding={
                        "strength": "preferred",
                        "valueSet": "http://hl7.org/fhir/ValueSet/body-site",
                    },
                ),
            ],
        ),
        structure(
            "ims-pain-score",
            "IMS pain score",
            f"Pain on the 0-10 numeric rating scale (LOINC 72514-3). {SRC}",
            "Observation",
            [
                e(
                    "Observation",
                    short="IMS pain score",
                    constraint=[
                        invariant(
                            "ims-nrs-1",
                            "The NRS is 0 to 10",
                            "(value as Quantity).value >= 0 and (value as Quantity).value <= 10",
                        )
                    ],
                ),
                *identified("Observation"),
                e("Observation.category", min=1),
                e(
                    "Observation.code",
                    patternCodeableConcept={"coding": [{"system": LOINC, "code": "72514-3"}]},
                ),
                *obs_common,
                e("Observation.value[x]", min=1, type=[{"code": "Quantity"}]),
                e("Observation.partOf", type=ref("Procedure")),
            ],
        ),
        structure(
            "ims-diagnosis",
            "IMS diagnosis",
            f"A diagnosis the clinician stated. {SRC}",
            "Condition",
            [
                e("Condition", short="IMS diagnosis"),
                *identified("Condition"),
                e(
                    "Condition.code",
                    min=1,
                    **bound("ims-diagnoses"),
                    constraint=[local_code("ims-diagnosis-1", "diagnosis", "the diagnosis")],
                ),
                e("Condition.subject", type=ref("Patient")),
                e("Condition.encounter", min=1, type=ref("Encounter")),
            ],
        ),
        structure(
            "ims-session",
            "IMS session",
            f"The needling session. {SRC}",
            "Procedure",
            [
                e(
                    "Procedure",
                    short="IMS session",
                    constraint=[
                        invariant(
                            "ims-session-1",
                            "A session not done says why, and asserts no time, performer or device",
                            "status = 'not-done' implies (statusReason.exists() and "
                            "performed.empty() and performer.empty() and usedCode.empty())",
                        ),
                        invariant(
                            "ims-session-2",
                            "A completed session has its time, performer and device",
                            "status = 'completed' implies (performed.exists() and "
                            "performer.exists() and usedCode.exists())",
                        ),
                    ],
                ),
                *identified("Procedure"),
                *ext_slices("Procedure", [("consent", "session-consent", 0, "1")]),
                e("Procedure.statusReason", **bound("ims-not-done-reasons")),
                e("Procedure.code", min=1, **local("ims-session")),
                *[
                    element | {"min": 0}
                    if element["path"]
                    in ("Procedure.performed[x]", "Procedure.performer", "Procedure.usedCode")
                    else element
                    for element in proc_common
                ],
                e(
                    "Procedure.complication",
                    **bound("ims-adverse-events"),
                    constraint=[local_code("ims-event-1", "adverse-event", "the adverse event")],
                ),
            ],
        ),
        structure(
            "ims-needled-site",
            "IMS needled site",
            f"One muscle site needled in a session. {SRC}",
            "Procedure",
            [
                e("Procedure", short="IMS needled site"),
                *identified("Procedure"),
                *spec_slices("Procedure", "ims-needled-site", PROCEDURE_EXTENSION),
                e("Procedure.partOf", min=1, type=ref("Procedure")),
                e("Procedure.code", min=1, **local("ims-needled-site")),
                *proc_common,
                e(
                    "Procedure.bodySite",
                    min=1,
                    max="1",
                    **bound("ims-muscles"),
                    constraint=[local_code("ims-muscle-1", "muscle", "the muscle")],
                ),
                *spec_slices("Procedure.bodySite", "ims-needled-site", BODY_SITE_EXTENSION),
            ],
        ),
        structure(
            "ims-consent",
            "IMS consent",
            f"Consent to IMS treatment. {SRC}",
            "Consent",
            [
                e("Consent", short="IMS consent"),
                *identified("Consent"),
                e("Consent.category", **local("ims-treatment-consent")),
                e("Consent.patient", min=1, type=ref("Patient")),
                e("Consent.dateTime", min=1),
                e("Consent.provision", min=1),
                e("Consent.provision.type", min=1),
            ],
        ),
        structure(
            "ims-provenance",
            "IMS provenance",
            f"Where an IMS encounter's resources came from. {SRC}",
            "Provenance",
            [
                e("Provenance", short="IMS provenance"),
                e("Provenance.meta", min=1),
                e("Provenance.meta.source", min=1),
                e("Provenance.agent", min=2),
            ],
        ),
    ]


# -- writing -----------------------------------------------------------------------------------


def artifacts() -> dict[str, JSON]:
    out = {}
    for resource in value_sets() + extensions() + profiles():
        out[f"{resource['resourceType']}-{resource['id']}.json"] = resource
    return out


def text(resource: JSON) -> str:
    return json.dumps(resource, indent=2, ensure_ascii=False) + "\n"


def snapshot(base: str, resource: JSON) -> JSON:
    body = json.dumps(
        {"resourceType": "Parameters", "parameter": [{"name": "definition", "resource": resource}]}
    )
    request = urllib.request.Request(
        f"{base.rstrip('/')}/StructureDefinition/$snapshot",
        data=body.encode(),
        headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310 - a local test server
        result: JSON = json.loads(response.read())
    elements = result["snapshot"]["element"]
    # A snapshot inherits the base's examples (R4 Consent's `urn:ietf:rfc:3986` identifier, with
    # a value that is no URI, fails validation of the package itself): the profiles state none.
    for element in elements:
        element.pop("example", None)
    # HAPI's snapshot generator drops constraints set on non-root elements of a differential;
    # a snapshot is base plus differential, so add what it left out.
    by_id = {element["id"]: element for element in elements}
    for diff in resource["differential"]["element"]:
        target = by_id.get(diff["id"])
        if target is None:
            continue
        keys = {c["key"] for c in target.get("constraint", [])}
        for constraint in diff.get("constraint", []):
            if constraint["key"] not in keys:
                target.setdefault("constraint", []).append(constraint | {"source": resource["url"]})
    resource = dict(resource)
    resource["snapshot"] = {"element": elements}
    return resource


def main(argv: list[str]) -> int:
    wanted = artifacts()
    if "--check" in argv:
        stale = []
        for name, resource in wanted.items():
            path = MAPPINGS / name
            current = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
            if current is None or {k: v for k, v in current.items() if k != "snapshot"} != resource:
                stale.append(name)
        if stale:
            print("mappings/ differs from scripts/profiles.py: " + ", ".join(stale))
            return 1
        return 0
    base = argv[argv.index("--snapshot") + 1] if "--snapshot" in argv else None
    for name, resource in wanted.items():
        path = MAPPINGS / name
        if resource["resourceType"] == "StructureDefinition":
            if base:
                resource = snapshot(base, resource)
            elif path.exists() and "snapshot" in (
                old := json.loads(path.read_text(encoding="utf-8"))
            ):
                resource = resource | {"snapshot": old["snapshot"]}
        path.write_text(text(resource), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
