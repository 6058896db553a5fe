"""The mapping spec (mappings/Parameters-field-map.json) and its four consumers agree.

The forward mapping, the reverse mapping, the profiles and docs/mapping.md are all driven by the
spec's slot rules. These tests read the spec on their own and check each consumer against it:
the Bundles hold each field where and as its rule says (fixtures and generated records), the
profiles define each extension and slice as the rules say, and a spec that is not well formed
is refused. (The round trip tests check the reverse mapping reads what the forward one wrote;
test_docs that docs/mapping.md is the spec's rendering; profiles.py --check that mappings/ is.)
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from ims_fhir import Encounter, from_fhir, to_fhir_json
from ims_fhir.mapping.spec import Element, Slot, parse_spec, spec
from ims_fhir.record.terminology import LOCAL_SYSTEM

from .conftest import ENCOUNTER_FILES, ROOT
from .strategies import encounters

UCUM = "http://unitsofmeasure.org"
MAPPINGS = ROOT / "mappings"


def _record_values(record: Encounter, slot: Slot) -> Counter[str]:
    """Every value of the slot's field in the record, as comparable text."""
    nodes: list[Any] = [record]
    for step in slot.path.split("."):
        many = step.endswith("[]")
        nodes = [getattr(n, step.removesuffix("[]")) for n in nodes if n is not None]
        if many:
            nodes = [item for n in nodes for item in n]
    values = [v for n in nodes if n is not None for v in (n if slot.repeats else [n])]
    return Counter(_record_text(slot, v) for v in values)


def _record_text(slot: Slot, value: Any) -> str:
    if slot.type == "complex":
        return json.dumps({p.key: float(getattr(value, p.field)) for p in slot.parts})
    if slot.type == "Quantity":
        return repr(float(value))
    return str(value)


def _fhir_values(bundle: dict[str, Any], slot: Slot) -> Counter[str]:
    """Every value found at the slot's place in the Bundle's resources of the slot's profile."""
    found: Counter[str] = Counter()
    steps = slot.container.split(".")[1:]  # without the resource type
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if not resource["meta"]["profile"][0].endswith("/" + slot.profile):
            continue
        nodes = [resource]
        for step in steps:
            nodes = [x for n in nodes for x in _as_list(n.get(step))]
        for node in nodes:
            if slot.is_extension and node.get("url") != slot.url:
                continue
            if not slot.is_extension and slot.key not in _local_codes(node["code"]):
                continue
            found[_fhir_text(slot, node)] += 1
    return found


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [] if value is None else [value]


def _local_codes(concept: dict[str, Any]) -> list[str]:
    return [c["code"] for c in concept.get("coding", []) if c.get("system") == LOCAL_SYSTEM]


def _fhir_text(slot: Slot, node: dict[str, Any]) -> str:
    if slot.type == "complex":
        assert set(node) == {"url", "extension"}, node
        parts = {sub["url"]: sub for sub in node["extension"]}
        assert set(parts) == {p.url for p in slot.parts}, node
        return json.dumps({p.key: float(_fhir_text(p, parts[p.url])) for p in slot.parts})
    key = slot.value_key
    assert set(node) - {"url", "code"} == {key}, (slot.path, node)
    value = node[key]
    if slot.type == "Quantity":
        assert (value["system"], value["code"]) == (UCUM, slot.unit), (slot.path, value)
        return repr(float(value["value"]))
    if slot.type == "CodeableConcept":
        (code,) = _local_codes(value)
        return code
    return str(value)


def _element_record_values(record: Encounter, rule: Element) -> Counter[str]:
    nodes: list[Any] = [record]
    for step in rule.path.split("."):
        nodes = [getattr(n, step.removesuffix("[]")) for n in nodes if n is not None]
        if step.endswith("[]"):
            nodes = [item for n in nodes for item in n]
    return Counter(_element_text(rule, n) for n in nodes if n is not None)


def _element_text(rule: Element, value: Any) -> str:
    if rule.type == "dateTime":
        if isinstance(value, str):
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        return repr(value.timestamp())
    if rule.type == "date":
        return value if isinstance(value, str) else value.isoformat()
    if rule.type == "Quantity":
        value = value["value"] if isinstance(value, dict) else value
        return repr(float(value))
    return str(value)


def _element_fhir_values(bundle: dict[str, Any], rule: Element) -> Counter[str]:
    found: Counter[str] = Counter()
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if not resource["meta"]["profile"][0].endswith("/" + rule.profile):
            continue
        node: Any = resource
        for name, first in rule.steps:
            node = node.get(name) if isinstance(node, dict) else None
            if first and node is not None:
                assert isinstance(node, list) and len(node) >= 1, (rule.path, node)
                node = node[0]
        if node is None:
            continue
        if rule.type == "CodeableConcept":
            (node,) = _local_codes(node)
        if rule.type == "Quantity":
            assert node["code"] == spec_unit_code(rule), (rule.path, node)
        found[_element_text(rule, node)] += 1
    return found


def spec_unit_code(rule: Element) -> str:
    from ims_fhir.record.terminology import terminology

    assert rule.unit is not None
    return terminology().convention(f"unit-{rule.unit}").code


def _agrees_with_spec(record: Encounter) -> None:
    bundle = json.loads(to_fhir_json(record))
    for slot in spec().slots:
        assert _fhir_values(bundle, slot) == _record_values(record, slot), slot.path
    for rule in spec().elements:
        expected = _element_record_values(record, rule)
        assert _element_fhir_values(bundle, rule) == expected, rule.path


@pytest.mark.parametrize("path", ENCOUNTER_FILES, ids=lambda p: p.stem)
def test_fixture_bundles_hold_each_field_where_the_spec_says(path: Path) -> None:
    _agrees_with_spec(Encounter.model_validate_json(path.read_text(encoding="utf-8")))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=encounters())
def test_generated_bundles_hold_each_field_where_the_spec_says(record: Encounter) -> None:
    _agrees_with_spec(record)
    assert from_fhir(to_fhir_json(record)).records == [record]


def test_the_fixtures_use_every_slot_and_element() -> None:
    # Otherwise a slot could be wrong in both directions and no fixture would show it.
    used = set()
    for path in ENCOUNTER_FILES:
        record = Encounter.model_validate_json(path.read_text(encoding="utf-8"))
        used |= {s.path for s in spec().slots if _record_values(record, s)}
        used |= {e.path for e in spec().elements if _element_record_values(record, e)}
    assert used == {s.path for s in spec().slots} | {e.path for e in spec().elements}


def _definition(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((MAPPINGS / f"StructureDefinition-{name}.json").read_text())
    return data


def _element(sd: dict[str, Any], element_id: str) -> dict[str, Any]:
    return next(e for e in sd["differential"]["element"] if e["id"] == element_id)


@pytest.mark.parametrize(
    "slot", [s for s in spec().slots if s.is_extension and "://" not in s.key], ids=lambda s: s.path
)
def test_each_extension_is_defined_as_the_spec_says(slot: Slot) -> None:
    sd = _definition(slot.key)
    assert sd["url"] == slot.url
    assert [c["expression"] for c in sd["context"]] == [slot.context]
    root = _element(sd, "Extension")
    assert (root["short"], root["definition"], root["max"]) == (
        slot.short,
        slot.definition,
        "*" if slot.repeats else "1",
    )
    if slot.type == "complex":
        assert _element(sd, "Extension.value[x]")["max"] == "0"
        for part in slot.parts:
            value = _element(sd, f"Extension.extension:{part.url}.value[x]")
            assert value["type"] == [{"code": part.type}]
            unit = _element(sd, f"Extension.extension:{part.url}.value[x].code")
            assert unit["fixedCode"] == part.unit
        return
    value = _element(sd, "Extension.value[x]")
    assert value["type"] == [{"code": slot.type}]
    if slot.vocabulary:
        expected = f"https://ims-fhir.org/fhir/ValueSet/{spec().value_set(slot.vocabulary)}"
        assert value["binding"]["valueSet"] == expected
    if slot.unit:
        assert _element(sd, "Extension.value[x].code")["fixedCode"] == slot.unit


@pytest.mark.parametrize(
    "slot",
    [s for s in spec().slots if s.profile == "ims-needled-site"],
    ids=lambda s: s.path,
)
def test_the_needled_site_profile_slices_each_extension_as_the_spec_says(slot: Slot) -> None:
    sd = _definition("ims-needled-site")
    path = slot.context  # e.g. Procedure, Procedure.bodySite
    element = _element(sd, f"{path}.extension:{slot.slice}")
    assert element["type"] == [{"code": "Extension", "profile": [slot.url]}]
    assert (element["min"], element["max"]) == (slot.min, slot.max)


def test_every_vocabulary_has_its_value_set() -> None:
    for vocabulary in spec().vocabularies:
        path = MAPPINGS / f"ValueSet-{vocabulary.value_set}.json"
        assert vocabulary.group in json.loads(path.read_text())["description"]


def _rule(**parts: Any) -> dict[str, Any]:
    out = []
    for name, value in parts.items():
        key = "valueInteger" if isinstance(value, int) else "valueString"
        out.append({"name": name, key: value})
    return {"name": "rule", "part": out}


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        (_rule(field="a.b", slot="Procedure.extension:x", type="Quantity"), "needs a unit"),
        (_rule(field="a.b", slot="Procedure.extension:x", type="Coding"), "unknown type"),
        (
            _rule(field="a.b", slot="Procedure.extension:x", type="CodeableConcept"),
            "needs a vocabulary",
        ),
        (
            _rule(
                field="a.b", slot="Procedure.extension:x", type="CodeableConcept", vocabulary="z"
            ),
            "has no ValueSet",
        ),
        (_rule(field="a.b", slot="Procedure.extension:x", type="complex"), "has parts"),
        ({"name": "other", "part": []}, "unknown parameter"),
        (_rule(field="a.b", profile="p", at="x", type="Quantity"), "has a unit"),
        (_rule(field="a.b", profile="p", at="x", type="CodeableConcept"), "has a vocabulary"),
        (_rule(field="a.b", profile="p", at="x[0]", type="string"), "array's first"),
        (_rule(field="a.b", profile="p", at="x", type="Period"), "unknown type"),
    ],
)
def test_a_malformed_spec_is_refused(rule: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_spec({"resourceType": "Parameters", "parameter": [rule]})


def _spec_with(*extra: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((MAPPINGS / "Parameters-field-map.json").read_text())
    data["parameter"] += list(extra)
    return data


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        (_rule(field="clinic.name", profile="p", at="x", type="string"), "two rules"),
        (
            _rule(field="a.b", profile="p", at="x", slot="Procedure.extension:x", type="string"),
            "not both",
        ),
        (
            _rule(
                field="a.c",
                profile="ims-needled-site",
                slot="Procedure.extension:insertions",
                type="string",
            ),
            "another field has the slot",
        ),
        (_rule(field="a.d", profile="p", slot="Procedure.extensions:x", type="string"), "writes"),
        (
            _rule(field="a.e", profile="p", slot="Procedure.extension:x", type="string", max="2"),
            "max",
        ),
        (_rule(field="a.f", profile="p", at="note[1].text", type="string"), r"only \[0\]"),
        (
            _rule(
                field="a.g", profile="p", slot="Procedure.extension:y", type="Quantity", unit="km"
            ),
            "no convention unit-km",
        ),
    ],
)
def test_a_spec_that_would_map_otherwise_is_refused(rule: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_spec(_spec_with(rule))


def test_the_spec_in_mappings_is_accepted() -> None:
    assert parse_spec(_spec_with()).slots == spec().slots
