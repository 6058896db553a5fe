"""The reverse mapping is total: any JSON in, a report out, and no record that hides a change.

The promise (see ``mapping/from_fhir.py``): for any input, :func:`from_fhir` returns a report;
each IMS encounter is either a record that says what its resources say, or a MappingError naming
the resource and element path. These tests feed it every resource type of FHIR R4, arbitrary JSON,
and ims-fhir's own Bundles with one element broken in every way hypothesis finds.
"""

from __future__ import annotations

import copy
import datetime as dt
import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fhir.resources.R4B as r4b
import pytest
from fhir.resources.R4B import get_fhir_model_class
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ims_fhir import (
    Encounter,
    MappingError,
    RecordError,
    from_fhir,
    terminology,
    to_fhir_json,
)
from ims_fhir.mapping.identity import Ext, split_system
from ims_fhir.mapping.spec import spec
from ims_fhir.record.terminology import LOCAL_SYSTEM

from .conftest import FIXTURES
from .strategies import encounters

JSON = dict[str, Any]

LUMBAR = Encounter.model_validate_json(
    (FIXTURES / "encounters" / "01-lumbar-l5-initial.json").read_text(encoding="utf-8")
)
CERVICAL = Encounter.model_validate_json(
    (FIXTURES / "encounters" / "05-cervical-c5-c6-initial.json").read_text(encoding="utf-8")
)


def _bundle(record: Encounter) -> JSON:
    return json.loads(to_fhir_json(record))


def _assert_total(value: Any) -> None:
    """from_fhir returns a report for ``value``; no error is the catch-all's."""
    report = from_fhir(value)
    for error in report.errors:
        assert isinstance(error, MappingError)
        assert not error.reason.startswith("internal:"), error


# -- every resource type of FHIR R4 ----------------------------------------------------------------

_PRIMITIVES = {
    "Boolean": True,
    "Integer": 1,
    "PositiveInt": 1,
    "UnsignedInt": 0,
    "Decimal": 1.5,
    "Integer64": 1,
}


def _filled(type_name: str, depth: int) -> Any:
    """A JSON instance of a FHIR type with every element filled (choice types: all of them)."""
    try:
        model = get_fhir_model_class(type_name)
    except ValueError:
        return None
    out: JSON = {}
    if "implicitRules" in model.model_fields:  # a resource, not a data type
        out["resourceType"] = type_name
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if not extra.get("element_property") or name in ("contained", "modifierExtension"):
            continue
        value = _value(str(info.annotation), depth)
        if value is None:
            continue
        out[info.alias or name] = [value] if "List[" in str(info.annotation) else value
    return out


def _value(annotation: str, depth: int) -> Any:
    if "abc." in annotation:
        name = annotation.split("abc.", 1)[1].split("Type", 1)[0]
        if depth <= 0 or name in ("Resource", "Extension", "FHIRPrimitiveExtension"):
            return None
        return _filled(name, depth - 1)
    for primitive, value in _PRIMITIVES.items():
        if f"{primitive}()" in annotation:
            return value
    if "bool" in annotation:
        return True
    return "x1"


def _resource_types() -> list[str]:
    names = set()
    for module in sorted(p.stem for p in Path(r4b.__file__).parent.glob("*.py")):
        if module.startswith(("_", "fhirtypes")):
            continue
        loaded = importlib.import_module(f"{r4b.__name__}.{module}")
        for obj in vars(loaded).values():
            fields = getattr(obj, "model_fields", {})
            if getattr(obj, "__module__", None) == loaded.__name__ and "implicitRules" in fields:
                names.add(obj.__name__)
    return sorted(names)


RESOURCE_TYPES = _resource_types()


def test_the_generator_covers_r4() -> None:
    assert len(RESOURCE_TYPES) > 140, RESOURCE_TYPES
    filled = _filled("QuestionnaireResponse", 3)
    assert isinstance(filled["identifier"], dict)  # 0..1 Identifier: the crash this guards


@pytest.mark.parametrize("resource_type", RESOURCE_TYPES)
def test_every_r4_resource_type_is_skipped_or_reported(resource_type: str) -> None:
    resource = _filled(resource_type, 3)
    resource["id"] = "x1"
    report = from_fhir(resource)
    assert report.records == []
    if resource_type == "Bundle":  # read as a Bundle: its entry holds no resource
        assert [e.path for e in report.errors] == ["Bundle.entry[0]"]
    else:
        assert report.errors == []
        assert [s.resource for s in report.skipped] == [f"{resource_type}/x1"]
    # Beside an ims-fhir encounter, pointing at it: the encounter still maps or is an error
    # that names what is wrong; nothing raises.
    bundle = _bundle(LUMBAR)
    encounter_url = bundle["entry"][3]["fullUrl"]
    for key in ("encounter", "subject", "focus", "partOf", "basedOn", "target"):
        if key in resource:
            value = {"reference": encounter_url}
            resource[key] = [value] if isinstance(resource[key], list) else value
    bundle["entry"].append({"fullUrl": "urn:uuid:x1", "resource": resource})
    report = from_fhir(bundle)
    assert report.records == [LUMBAR] or report.errors
    _assert_total(bundle)


# -- arbitrary JSON --------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(["Bundle", "Encounter", "Observation", "Procedure", "resourceType"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["resourceType", "entry", "resource", "fullUrl", "id", "identifier", "reference"]
            )
            | st.text(max_size=6),
            children,
            max_size=5,
        )
    ),
    max_leaves=30,
)


@given(json_values)
@settings(max_examples=300, deadline=None)
def test_any_json_value_gives_a_report(value: Any) -> None:
    _assert_total(value)
    _assert_total(json.dumps(value))


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("{", id="truncated"),
        pytest.param("[" * 100_000, id="deep"),
        pytest.param('{"resourceType": NaN}', id="nan"),
        pytest.param('{"resourceType": "Bundle", "entry": [Infinity]}', id="infinity"),
        pytest.param("1" * 5000, id="huge-integer"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
    ],
)
def test_text_that_is_not_json_is_an_error(text: str | bytes) -> None:
    report = from_fhir(text)
    assert report.records == []
    (error,) = report.errors
    assert error.path == "<json>" and "not valid JSON" in error.reason


# -- ims-fhir's own Bundles, one element broken -----------------------------------------------

# Elements the reverse mapping does not read, and why. A change to one of them must leave the
# record as it was; a change anywhere else must show in the record or be an error.
_NOT_READ = {
    # assigned or rewritten by servers (signature.py, FHIR R4 resource.html)
    "id",
    "meta",
    "text",
    "fullUrl",
    "request",
    # for people: the mapping reads codes by system and code
    "display",
    "use",
    "unit",  # a Quantity's unit is read by its UCUM code (the text only when there is none)
    # derived from the encounter when ims-fhir writes (to_fhir.py), not part of the record
    "category",
    "performer",
    "effectiveDateTime",
    "performedPeriod",
    "recordedDate",
    "recorder",
    "class",
    "clinicalStatus",
    "scope",
    "organization",
    "policyRule",
    "usedCode",
    "active",
    "agent",
    "recorded",
    "div",
    "managingOrganization",
}
# Read only to find what is entered in error; any other value reads as "in force".
_STATUS_ONLY = {"status", "verificationStatus"}


def _meanings() -> dict[tuple[Any, Any], str]:
    t = terminology()
    local = [c.code for c in t.emitted_codings() if c.system == LOCAL_SYSTEM]
    meanings = {(c.system, c.code): code for code in local for c in t.codings(code)}
    for kind in ("health-card", "licence"):
        coding = t.convention(f"identifier-type-{kind}")
        meanings[(coding.system, coding.code)] = kind
    return meanings


_MEANING = _meanings()
_OUR_EXTENSIONS = (
    {e.url for e in Ext}
    | {s.url for s in spec().slots if s.is_extension}
    | {p.url for s in spec().slots for p in s.parts}
)


def _strip(value: Any, key: str | None = None) -> Any:
    if key == "coding" and isinstance(value, list) and all(isinstance(c, dict) for c in value):
        # A CodeableConcept means the concepts its codings stand for, whichever codings; one
        # ims-fhir does not know is ignored beside one it knows (another system's coding).
        known = {_MEANING.get((str(c.get("system")), str(c.get("code")))) for c in value}
        known.discard(None)
        # The same coding twice says it once.
        return sorted(known) if known else sorted({json.dumps(_strip(c)) for c in value})
    if key == "extension" and isinstance(value, list):
        # An extension whose url no one here defined may be ignored (FHIR R4 extensibility.html).
        value = [v for v in value if not isinstance(v, dict) or v.get("url") in _OUR_EXTENSIONS]
    if key == "identifier" and isinstance(value, list):
        # The same identifier twice says it once.
        unique = {json.dumps(_strip(v), sort_keys=True): _strip(v) for v in value}
        return list(unique.values())
    if isinstance(value, dict):
        # An empty element or null says nothing (FHIR R4 json.html forbids them).
        out = {k: _strip(v, k) for k, v in value.items() if k not in _NOT_READ}
        return {k: v for k, v in out.items() if v not in ({}, [], None)}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    return float(value)


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*path, key))
    elif isinstance(value, list):
        for n, item in enumerate(value):
            yield from _paths(item, (*path, n))


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        value = value[part]
    return value


_OTHER_TYPES = [None, True, 0, 1e400, 2**70, -1.5, "", "x", [], [1], {}, {"x": 1}]


def _mutations(bundle: JSON) -> st.SearchStrategy[tuple[str, tuple[Any, ...], Any]]:
    paths = [p for p in _paths(bundle) if len(p) >= 4 and p[2] == "resource"]
    links = [
        p
        for p in paths
        if p[-1] == "reference" and any(k in p for k in ("hasMember", "partOf", "detail"))
    ]
    full_urls = [e["fullUrl"] for e in bundle["entry"]]
    options = [
        st.tuples(st.just("replace"), st.sampled_from(paths), st.sampled_from(_OTHER_TYPES)),
        st.tuples(st.just("delete"), st.sampled_from(paths), st.none()),
        st.tuples(st.just("duplicate"), st.sampled_from(paths), st.none()),
        st.tuples(st.just("entry"), st.sampled_from(list(range(len(full_urls)))), st.none()),
    ]
    if links:  # a partOf or hasMember pointed at another part, or at its own resource
        options.append(
            st.tuples(st.just("loop"), st.sampled_from(links), st.sampled_from(full_urls))
        )
    return st.one_of(options)


def _apply(bundle: JSON, kind: str, path: tuple[Any, ...], value: Any) -> bool:
    """Mutate ``bundle``; False if the mutation does not apply (nothing changed)."""
    if kind == "entry":  # the same entry twice, or twice with different content
        entry = copy.deepcopy(bundle["entry"][path])
        if value is None and entry["resource"].get("note"):
            entry["resource"]["note"] = [{"text": "a different note"}]
        bundle["entry"].append(entry)
        return True
    parent, last = _get(bundle, path[:-1]), path[-1]
    if kind == "replace":
        if type(parent[last]) is type(value) and parent[last] == value:
            return False
        parent[last] = value
    elif kind == "delete":
        del parent[last]
    elif kind == "duplicate":
        if not isinstance(parent, list):
            return False
        parent.insert(last, copy.deepcopy(parent[last]))
    elif kind == "loop":
        parent[last] = value
    return True


def _check(original: Encounter, mutated: JSON) -> None:
    report = from_fhir(copy.deepcopy(mutated))
    for error in report.errors:
        assert not error.reason.startswith("internal:"), error
    if report.errors:
        assert report.records == []
        return
    (record,) = report.records
    rebuilt = json.loads(to_fhir_json(record))
    got = {
        _key(e["resource"]): _shared(_strip(_by_key(e["resource"], rebuilt)))
        for e in rebuilt["entry"]
    }
    sent = {
        _key(e["resource"]): _shared(_strip(_by_key(e["resource"], mutated)))
        for e in mutated["entry"]
        if isinstance(e, dict) and isinstance(e.get("resource"), dict)
    }
    for key, resource in got.items():
        source = sent.get(key)
        if source is None and resource["resourceType"] in SHARED_TYPES:
            # Without the clinic's identifier: the one of its type the encounter refers to.
            source = next(
                (r for r in sent.values() if r.get("resourceType") == resource["resourceType"]),
                None,
            )
        assert (
            source == resource
            or _status_only(source, resource)
            or _earlier_references(source, resource)
            or _before_issue_16(source, resource)
            or _held_by_the_region(source, resource)
        ), f"{key}: the record does not say what the resource says and no error said why"


def _shared(resource: JSON) -> JSON:
    """A Patient or Practitioner as the record holds it: identifier types it knows, or none.

    These are shared with other systems; the record keeps an identifier's kind as health card,
    licence or other, so another type (or one without a system) reads as other.
    """
    practitioner = resource.get("resourceType") == "Practitioner"  # a licence is written as LN
    if resource.get("resourceType") in ("Patient", "Practitioner"):
        # A shared resource may hold other names (maiden, alias): the record keeps the first.
        if isinstance(resource.get("name"), list):
            resource["name"] = resource["name"][:1]
        for ident in resource.get("identifier") or []:
            if (
                isinstance(ident, dict)
                and practitioner
                or not any(
                    c in ("health-card", "licence")
                    for c in (
                        ident["type"].get("coding", ())
                        if isinstance(ident.get("type"), dict)
                        else ()
                    )
                    if isinstance(c, str)
                )
            ):
                ident.pop("type", None)
    return resource


SHARED_TYPES = ("Organization", "Patient", "Practitioner")  # a region may hold them


def _earlier_references(sent: Any, rebuilt: JSON) -> bool:
    """An Encounter whose references lack the identifiers of their targets, as 0.1 wrote it."""
    if not isinstance(sent, dict) or rebuilt.get("resourceType") != "Encounter":
        return False

    def plain(resource: JSON) -> JSON:
        out = copy.deepcopy(resource)
        for holder in [out.get("subject"), out.get("serviceProvider")] + [
            p.get("individual") for p in out.get("participant") or [] if isinstance(p, dict)
        ]:
            if isinstance(holder, dict):
                holder.pop("identifier", None)
        return out

    return plain(sent) == plain(rebuilt) and any(
        isinstance(holder, dict) and "identifier" not in holder
        for holder in [sent.get("subject"), sent.get("serviceProvider")]
        + [p.get("individual") for p in sent.get("participant") or [] if isinstance(p, dict)]
    )


def _before_issue_16(sent: Any, rebuilt: JSON) -> bool:
    """What an earlier version wrote where one element differs: the practitioner's identifier
    untyped (in the Encounter's reference or its own), a Provenance without ``occurredPeriod``
    or ``activity``."""
    if not isinstance(sent, dict):
        return False
    variants = []
    kind = rebuilt.get("resourceType")
    if kind == "Encounter":
        variant = copy.deepcopy(rebuilt)
        for p in variant["participant"]:
            p["individual"]["identifier"].pop("type", None)
        variants.append(variant)
    if kind == "Practitioner":
        variant = copy.deepcopy(rebuilt)
        variant["identifier"][0].pop("type", None)
        variants.append(variant)
    if kind == "Provenance":  # 0.1 wrote neither
        variants += [
            {k: v for k, v in rebuilt.items() if k != name}
            for name in ("occurredPeriod", "activity")
        ]
    return sent in variants


def _held_by_the_region(sent: Any, rebuilt: JSON) -> bool:
    """A shared resource without the clinic's identifier: one the region holds (issue 17).

    The encounter's reference names it by the clinic's identifier; the resource need not.
    """
    if not isinstance(sent, dict) or rebuilt.get("resourceType") not in SHARED_TYPES:
        return False

    def others(resource: JSON) -> JSON:
        out = dict(resource)
        kept = [
            i
            for i in out.get("identifier") or []
            if not (isinstance(i, dict) and split_system(str(i.get("system"))))
        ]
        out.pop("identifier", None)
        return out | ({"identifier": kept} if kept else {})

    return others(sent) == others(rebuilt)


def _status_only(sent: Any, rebuilt: JSON) -> bool:
    if not isinstance(sent, dict):
        return False
    trimmed = {k: v for k, v in sent.items() if k not in _STATUS_ONLY}
    return trimmed == {
        k: v for k, v in rebuilt.items() if k not in _STATUS_ONLY
    } and "entered-in-error" not in json.dumps(sent.get("status"))


def _by_key(resource: JSON, bundle: JSON) -> JSON:
    """The resource with each reference replaced by the key of what it points at."""
    keys = {
        e.get("fullUrl"): _key(e["resource"])
        for e in bundle["entry"]
        if isinstance(e, dict) and isinstance(e.get("resource"), dict)
    }
    types = {key: key.split("|")[0] for key in keys.values()}

    def aliases(value: Any) -> None:
        """A shared resource without the clinic's identifier is known by the reference to it."""
        if isinstance(value, dict):
            ident, ref = value.get("identifier"), value.get("reference")
            if isinstance(ident, dict) and isinstance(ref, str) and ref in keys:
                system = str(ident.get("system"))
                if split_system(system) and not split_system(keys[ref].split("|")[1]):
                    keys[ref] = f"{types[keys[ref]]}|{system}|{ident.get('value')}"
            for item in value.values():
                aliases(item)
        elif isinstance(value, list):
            for item in value:
                aliases(item)

    aliases(bundle["entry"])

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: keys.get(v, v) if k == "reference" and isinstance(v, str) else walk(v)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    out: JSON = walk(resource)
    return out


def _key(resource: JSON) -> str:
    if resource.get("resourceType") == "Provenance":
        return "Provenance"
    ident = resource.get("identifier")
    first = ident[0] if isinstance(ident, list) and ident and isinstance(ident[0], dict) else {}
    return f"{resource.get('resourceType')}|{first.get('system')}|{first.get('value')}"


@given(data=st.data())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_one_broken_element_is_an_error_or_shows_in_the_record(data: st.DataObject) -> None:
    original = data.draw(st.sampled_from([LUMBAR, CERVICAL]))
    bundle = _bundle(original)
    kind, path, value = data.draw(_mutations(bundle))
    if not _apply(bundle, kind, path, value):
        return
    _check(original, bundle)


@given(encounters(), st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_generated_records_with_one_broken_element(record: Encounter, data: st.DataObject) -> None:
    bundle = _bundle(record)
    assert from_fhir(copy.deepcopy(bundle)).records == [record]
    kind, path, value = data.draw(_mutations(bundle))
    if _apply(bundle, kind, path, value):
        _check(record, bundle)


@pytest.mark.parametrize(
    ("where", "value", "path"),
    [
        pytest.param("pain", 1e400, "valueQuantity.value", id="infinite-nrs"),
        pytest.param("pain", 10**400, "valueQuantity.value", id="huge-nrs"),
        pytest.param("finding", "a string", "note", id="note-as-string"),
        # The finding is no longer recognisable as one: the panel's member is what is wrong.
        pytest.param("finding", {"coding": []}, "identifier", id="identifier-as-object"),
    ],
)
def test_the_reported_breakages_name_the_element(where: str, value: Any, path: str) -> None:
    bundle = _bundle(LUMBAR)
    resource = next(
        e["resource"] for e in bundle["entry"] if f"/{where}/" in json.dumps(e["resource"])
    )
    leaf, _, last = path.rpartition(".")
    target = _get(resource, tuple(leaf.split("."))) if leaf else resource
    target[last] = value
    report = from_fhir(bundle)
    assert report.records == []
    (error,) = report.errors
    assert (path if path != "identifier" else "hasMember") in error.path, error


# -- what an independent attacker found (issue 14 review) ------------------------------------------


def _find(bundle: JSON, suffix: str) -> JSON:
    return next(
        e["resource"]
        for e in bundle["entry"]
        if e["resource"].get("resourceType") != "Provenance"
        and str(e["resource"].get("identifier", [{}])[0].get("value", "")).endswith(suffix)
    )


def _set(suffix: str, **values: Any) -> Any:
    return lambda b: _find(b, suffix).update(values)


@pytest.mark.parametrize(
    ("change", "path"),
    [
        pytest.param(_set("/session", status="not-done"), "Procedure.status", id="not-done"),
        pytest.param(
            _set(
                "/diagnosis",
                verificationStatus={
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                            "code": "refuted",
                        }
                    ]
                },
            ),
            "Condition.verificationStatus",
            id="refuted",
        ),
        pytest.param(_set("enc-v-0001", status="cancelled"), "Encounter.status", id="cancelled"),
        pytest.param(_set("/consent", status="rejected"), "Consent.status", id="consent-rejected"),
        pytest.param(
            lambda b: _find(b, "/pain/p1")["valueQuantity"].update(comparator="<"),
            "Observation.valueQuantity.comparator",
            id="comparator",
        ),
        pytest.param(
            lambda b: _find(b, "/consent")["provision"].update(
                modifierExtension=[{"url": "http://example.org/x", "valueBoolean": True}]
            ),
            "Consent.provision.modifierExtension",
            id="nested-modifier",
        ),
        pytest.param(
            lambda b: _find(b, "/consent")["provision"].update(provision=[{"type": "deny"}]),
            "Consent.provision.provision",
            id="nested-provision",
        ),
        pytest.param(
            lambda b: _find(b, "/finding/f1").update(
                performer=[{"reference": "Practitioner/someone-else"}]
            ),
            "Observation.performer",
            id="other-performer",
        ),
        pytest.param(  # once an "internal" error: a list is not hashable
            lambda b: _find(b, "/diagnosis")["verificationStatus"]["coding"][0].update(
                system=["x"]
            ),
            "Condition.verificationStatus",
            id="coding-system-a-list",
        ),
        pytest.param(  # once an "internal" error: a list display is not hashable either
            lambda b: _find(b, "/site/s1")["contained"][0]["locationQualifier"][0]["coding"][
                0
            ].update(display=[]),
            "Procedure.contained[0].locationQualifier[0].coding[0].display",
            id="coding-display-a-list",
        ),
        pytest.param(
            _set("/finding/f1", effectiveDateTime="1999-01-01T00:00:00Z"),
            "Observation.effectiveDateTime",
            id="moved-date",
        ),
        pytest.param(  # the standard form of the side says the other side
            lambda b: _find(b, "/site/s1")["contained"][0]["locationQualifier"][0].update(
                coding=[{"system": "http://snomed.info/sct", "code": "7771000"}]
            ),
            "Procedure.contained",
            id="body-structure-other-side",
        ),
        pytest.param(
            lambda b: _find(b, "/site/s1")["contained"][0]["location"].update(
                coding=[{"system": "http://snomed.info/sct", "code": "1403006"}]
            ),
            "Procedure.contained",
            id="body-structure-other-muscle",
        ),
        pytest.param(
            lambda b: _extension(_find(b, "/site/s1"), "targetBodyStructure").update(
                valueReference={"reference": "BodyStructure/elsewhere"}
            ),
            "Procedure.extension[8].valueReference.reference",
            id="body-structure-link-elsewhere",
        ),
        pytest.param(
            lambda b: _find(b, "/site/s1")["extension"].pop(),
            "Procedure.contained",
            id="body-structure-without-link",
        ),
        pytest.param(
            lambda b: _find(b, "/consent").update(policy=[{"uri": "https://other.example.org/p"}]),
            "Consent.policy",
            id="other-consent-policy",
        ),
        pytest.param(
            lambda b: _find(b, "/consent").update(
                policyRule={"coding": [{"system": "http://example.org", "code": "OPTOUT"}]}
            ),
            "Consent.policyRule",
            id="policy-rule-beside-policy",
        ),
    ],
)
def test_what_reverses_the_meaning_is_an_error(change: Any, path: str) -> None:
    _refused_at(change, path)


def _refused_at(change: Any, path: str) -> None:
    """The lumbar Bundle, changed, maps to no record and to one error at ``path``."""
    bundle = _bundle(LUMBAR)
    change(bundle)
    report = from_fhir(bundle)
    assert report.records == []
    assert [e.path for e in report.errors] == [path]


def test_what_the_previous_version_wrote_maps_back_the_same() -> None:
    """Before the standard side, the consent policy URI and the practitioner's type (issue 16)."""
    bundle = _bundle(LUMBAR)
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if "contained" in resource:
            del resource["contained"]
            resource["extension"] = [
                x for x in resource["extension"] if x["url"] != Ext.TARGET_BODY_STRUCTURE.url
            ]
        if resource["resourceType"] == "Consent":
            del resource["policy"]
            resource["policyRule"] = {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}
                ]
            }
        if resource["resourceType"] == "Practitioner":
            resource["identifier"][0].pop("type")
        if resource["resourceType"] == "Encounter":
            resource["participant"][0]["individual"]["identifier"].pop("type")
    assert from_fhir(bundle).records == [LUMBAR]
    assert from_fhir(_bundle(LUMBAR)).records == [LUMBAR]


def test_a_practitioner_number_of_another_type_is_an_error() -> None:
    bundle = _bundle(LUMBAR)
    practitioner = _resource(bundle, "Practitioner")
    practitioner["identifier"][0]["type"] = {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]
    }
    report = from_fhir(bundle)
    assert report.records == []
    assert [e.path for e in report.errors] == ["Practitioner.identifier[0].type.coding"]


def test_the_same_resource_twice_differing_only_in_meta_is_one() -> None:
    bundle = _bundle(LUMBAR)
    again = copy.deepcopy(bundle["entry"][1])
    again["resource"]["meta"] = {"versionId": "2"}
    bundle["entry"].append(again)
    assert from_fhir(bundle).records == [LUMBAR]


def test_another_systems_identifiers_ending_in_patient_are_theirs() -> None:
    bundle = _bundle(LUMBAR)
    patient = bundle["entry"][1]["resource"]
    patient["identifier"].insert(
        0, {"system": "https://hospital.example.org/patient", "value": "MRN-77"}
    )
    (record,) = from_fhir(bundle).records
    assert record.patient.id == LUMBAR.patient.id
    assert record.patient.identifiers[0].value == "MRN-77"


def test_another_systems_encounter_is_skipped_not_an_error() -> None:
    foreign = {
        "resourceType": "Encounter",
        "id": "ehr-1",
        "identifier": [{"system": "https://ehr.example.org/encounter", "value": "e1"}],
        "status": "finished",
    }
    report = from_fhir([foreign])
    assert report.errors == [] and [s.resource for s in report.skipped] == ["Encounter/ehr-1"]


def test_two_encounters_with_one_identifier_are_both_errors() -> None:
    bundle = _bundle(LUMBAR)
    twin = copy.deepcopy(
        next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Encounter")
    )
    twin["fullUrl"] = "urn:uuid:00000000-0000-0000-0000-00000000000f"
    twin["resource"]["period"]["end"] = "2026-01-14T11:00:00-08:00"
    bundle["entry"].append(twin)
    report = from_fhir(bundle)
    assert report.records == [] and len(report.errors) == 2
    assert all("2 Encounters carry identifier" in e.reason for e in report.errors)


@pytest.mark.parametrize("as_text", [True, False], ids=["text", "dict"])
def test_a_lone_surrogate_is_an_error_and_the_other_encounter_maps(as_text: bool) -> None:
    bad = json.dumps(_bundle(LUMBAR)).replace('"enc-v-0001"', '"enc-v-0001\\ud800"', 1)
    merged = {"resourceType": "Bundle", "entry": json.loads(bad)["entry"]}
    merged["entry"] += _bundle(CERVICAL)["entry"]
    report = from_fhir(json.dumps(merged) if as_text else merged)
    assert report.records == [CERVICAL]
    assert report.errors


def test_deep_nesting_in_dicts_does_not_crash() -> None:
    deep: Any = "x"
    for _ in range(5000):
        deep = {"detail": [deep]}
    bundle = _bundle(LUMBAR)
    _find(bundle, "/diagnosis")["evidence"] = [deep]
    twice = [
        {"resourceType": "Patient", "id": "p", "x": deep},
        {"resourceType": "Patient", "id": "p", "x": deep},
    ]
    _assert_total(bundle)
    _assert_total(twice)


def test_an_instant_past_the_last_utc_instant_is_an_error_not_a_crash() -> None:
    # 9999-12-31T23:59:59-14:00 is after 9999-12-31T23:59:59Z: converting it to UTC overflows.
    bundle = _bundle(LUMBAR)
    finding = next(
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Observation"
        and e["resource"]["identifier"][0]["value"].endswith("/finding/f1")
    )
    finding["effectiveDateTime"] = "9999-12-31T23:59:59-14:00"
    report = from_fhir(bundle)
    assert report.records == []
    assert [e.path for e in report.errors] == ["Observation.effectiveDateTime"]


def test_an_offset_fhir_cannot_hold_is_refused_in_the_record() -> None:
    data = json.loads(LUMBAR.model_dump_json())
    for offset in ("+14:30", "-23:11"):
        data["start"] = data["start"][:19] + offset
        with pytest.raises(ValidationError, match="at most 14:00"):
            Encounter.model_validate(data)
    late = LUMBAR.start.replace(tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30, seconds=15)))
    with pytest.raises(RecordError, match="whole minutes"):
        to_fhir_json(LUMBAR.model_copy(update={"start": late}))


def _resource(bundle: JSON, rtype: str, suffix: str = "") -> JSON:
    return next(
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == rtype
        and (not suffix or e["resource"]["identifier"][0]["value"].endswith(suffix))
    )


def _extension(resource: JSON, tail: str) -> JSON:
    return next(x for x in resource["extension"] if x["url"].endswith(tail))


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (
            lambda b: _resource(b, "Patient").update(modifierExtension=[{"url": "x"}]),
            "Patient.modifierExtension",
        ),
        (
            lambda b: _resource(b, "Observation", "/finding/f1").update(
                valueCodeableConcept={"text": "absent"}
            ),
            "Observation.valueCodeableConcept",
        ),
        (
            lambda b: _resource(b, "Observation", "/finding/f1").update(
                dataAbsentReason={"text": "not asked"}
            ),
            "Observation.dataAbsentReason",
        ),
        (
            lambda b: _resource(b, "Procedure", "/site/s1")["extension"].append(
                {"url": Ext.SESSION_CONSENT.url, "valueReference": {"reference": "Consent/1"}}
            ),
            "Procedure.extension[9].url",
        ),
        (
            lambda b: _extension(_resource(b, "Procedure", "/site/s1"), "/insertions").update(
                valueInteger=99
            ),
            "Procedure.extension[4].valueInteger",
        ),
        (
            lambda b: _resource(b, "Observation", "/pain/p1")["bodySite"].update(
                coding=[{"system": "http://snomed.info/sct", "code": "37931006"}]
            ),
            "Observation.bodySite.coding",
        ),
    ],
    ids=[
        "modifier-on-patient",
        "second-value",
        "absent-reason",
        "our-extension-elsewhere",
        "second-extension-value",
        "coded-pain-site",
    ],
)
def test_what_would_be_silently_dropped_is_an_error(mutate: Any, path: str) -> None:
    _refused_at(mutate, path)


def test_a_narrative_is_well_formed_xml_whatever_the_record_holds() -> None:
    import xml.etree.ElementTree as ET

    name = LUMBAR.patient.name.model_copy(update={"family": "O\x01Brien\ufffe"})
    record = LUMBAR.model_copy(update={"patient": LUMBAR.patient.model_copy(update={"name": name})})
    for entry in json.loads(to_fhir_json(record))["entry"]:
        ET.fromstring(entry["resource"]["text"]["div"])  # raises on a character XML forbids
    assert from_fhir(to_fhir_json(record)).records == [record]  # the data keeps it
