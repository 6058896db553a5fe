"""The reverse mapping's shortcuts decide exactly what the long way decides.

``no_modifiers`` first asks orjson whether a resource plainly holds no ``modifierExtension``
and nothing nested 65 deep; ``check_links`` skips comparing an element whose two copies
are equal as JSON and whose references point at the same things. Each test maps the same input
with the shortcuts and without them (patched out) and requires the same report: records,
errors (resource, path, reason), warnings and skipped resources. Element paths are written
only when an error names one: the tests below put a bad value at every leaf and require the
error to name that leaf's path.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ims_fhir import Encounter, MappingReport, from_fhir, to_fhir_json
from ims_fhir.mapping import from_fhir as reverse

from .conftest import ENCOUNTER_FILES
from .strategies import encounters
from .test_mapping_hostile import _apply, _mutations

JSON = dict[str, Any]

FIXTURE_RECORDS = [Encounter.model_validate_json(p.read_text()) for p in ENCOUNTER_FILES]


def _outcome(report: MappingReport) -> tuple[Any, ...]:
    return (
        report.records,
        [(e.resource, e.path, e.reason, e.namespaces) for e in report.errors],
        [(w.resource, w.path, w.reason) for w in report.warnings],
        report.skipped,
    )


def _both_ways(monkeypatch: pytest.MonkeyPatch, value: Any) -> tuple[Any, Any]:
    """The report with the shortcuts, and without them (the walk and the full comparison)."""
    fast = _outcome(from_fhir(copy.deepcopy(value)))
    with monkeypatch.context() as patch:
        patch.setattr(reverse, "_plainly_without_modifiers", lambda data: False)
        patch.setattr(reverse, "_agree", lambda *args, **kwargs: False)
        slow = _outcome(from_fhir(copy.deepcopy(value)))
    return fast, slow


def _nested(depth: int, leaf: Any, key: str = "x") -> Any:
    value = leaf
    for n in range(depth):
        value = {key: [value]} if n % 2 else {key: value}
    return value


_KEYS = st.sampled_from(["modifierExtension", "extension", "url", "x", "modifierExtensio"])
_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=3), st.just(""))
_TREES = st.recursive(
    _LEAF,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_KEYS, inner, max_size=3)),
    max_leaves=12,
)


def _resource_paths(bundle: JSON) -> list[tuple[int, str]]:
    return [(n, key) for n, e in enumerate(bundle["entry"]) for key in e["resource"]]


@given(data=st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_tree_put_anywhere_in_a_resource_is_judged_the_same_either_way(
    data: st.DataObject,
) -> None:
    record = data.draw(st.sampled_from(FIXTURE_RECORDS))
    bundle = json.loads(to_fhir_json(record))
    n, key = data.draw(st.sampled_from(_resource_paths(bundle)))
    tree = data.draw(_TREES)
    depth = data.draw(st.sampled_from([0, 1, 30, 62, 63, 64, 65, 66, 120, 300]))
    where = data.draw(st.sampled_from(["beside", "inside"]))
    nested = _nested(depth, tree, data.draw(_KEYS))
    if where == "beside":
        bundle["entry"][n]["resource"][f"{key}X"] = nested
    else:
        bundle["entry"][n]["resource"][key] = nested
    with pytest.MonkeyPatch.context() as monkeypatch:
        fast, slow = _both_ways(monkeypatch, bundle)
    assert fast == slow


@pytest.mark.parametrize("depth", [62, 63, 64, 65, 66, 200, 254, 255, 256, 300])
@pytest.mark.parametrize("leaf", ["x", {}, [], {"modifierExtension": [{"url": "u"}]}, None])
def test_the_depth_at_which_nesting_is_refused_is_the_walks(
    monkeypatch: pytest.MonkeyPatch, depth: int, leaf: Any
) -> None:
    bundle = json.loads(to_fhir_json(FIXTURE_RECORDS[0]))
    bundle["entry"][0]["resource"]["extension"] = [{"url": "u", "valueX": _nested(depth, leaf)}]
    fast, slow = _both_ways(monkeypatch, bundle)
    assert fast == slow


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({"modifierExtension": None}, id="null-modifier"),
        pytest.param({"modifierExtension": []}, id="empty-modifier"),
        pytest.param({"modifierExtension": [{"url": "u", "valueBoolean": True}]}, id="modifier"),
        pytest.param({"note": "modifierExtension"}, id="the-word-as-a-value"),
        pytest.param({"x": 2**70}, id="integer-past-64-bits"),
        pytest.param({"x": {1: "a key not a string"}}, id="int-key"),
    ],
)
def test_odd_values_are_judged_the_same_either_way(
    monkeypatch: pytest.MonkeyPatch, value: JSON
) -> None:
    for n in range(3):
        bundle = json.loads(to_fhir_json(FIXTURE_RECORDS[1]))
        bundle["entry"][n]["resource"]["code"] = value
        bundle["entry"][n]["resource"]["extension"] = [value]
        fast, slow = _both_ways(monkeypatch, bundle)
        assert fast == slow


def test_a_modifier_written_with_an_escape_is_still_found() -> None:
    """JSON text may spell the key with \\u escapes; it is the same key once read."""
    text = to_fhir_json(FIXTURE_RECORDS[0])
    bundle = json.loads(text)
    bundle["entry"][0]["resource"]["modifierExtension"] = [{"url": "u", "valueBoolean": True}]
    escaped = json.dumps(bundle).replace("modifierExtension", "modifierExtensio\\u006e")
    (error,) = from_fhir(escaped).errors
    assert error.path.endswith(".modifierExtension") and "modifier extension" in error.reason


# -- check_links: the same element, compared or not ---------------------------------------------


def _mutated(data: st.DataObject, record: Encounter) -> JSON | None:
    """The record's Bundle, as written or as a server returns it, with one thing broken.

    As served, references are literal (``Patient/s3``) in the source and ``urn:uuid`` in the
    record mapped forward again: the shortcut must read both through what they point at.
    """
    bundle = json.loads(to_fhir_json(record))
    if data.draw(st.booleans(), label="as served"):
        bundle = _as_from_a_server(bundle)
        assert from_fhir(copy.deepcopy(bundle)).records  # as served, it maps
    kind, path, value = data.draw(_mutations(bundle))
    return bundle if _apply(bundle, kind, path, value) else None


@given(data=st.data())
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_broken_element_is_judged_the_same_with_and_without_the_comparison_shortcut(
    data: st.DataObject,
) -> None:
    bundle = _mutated(data, data.draw(st.sampled_from(FIXTURE_RECORDS)))
    if bundle is None:
        return
    with pytest.MonkeyPatch.context() as monkeypatch:
        fast, slow = _both_ways(monkeypatch, bundle)
    assert fast == slow


@given(record=encounters(), data=st.data())
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_generated_records_are_judged_the_same_either_way(
    record: Encounter, data: st.DataObject
) -> None:
    bundle = _mutated(data, record)
    if bundle is None:
        return
    with pytest.MonkeyPatch.context() as monkeypatch:
        fast, slow = _both_ways(monkeypatch, bundle)
    assert fast == slow


def _as_from_a_server(bundle: JSON) -> JSON:
    """The Bundle as a server returns it: ids assigned, references literal, meta added."""
    ids: dict[str, str] = {}
    for n, entry in enumerate(bundle["entry"]):
        resource = entry["resource"]
        resource["id"] = f"s{n}"
        resource["meta"] = {"versionId": "2", "lastUpdated": "2026-11-27T10:00:00Z"}
        ids[entry["fullUrl"]] = f"{resource['resourceType']}/s{n}"
    text = json.dumps(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [
                {
                    "fullUrl": f"https://fhir.example/r4/{ids[e['fullUrl']]}",
                    "resource": e["resource"],
                }
                for e in bundle["entry"]
            ],
        }
    )
    for full_url, reference in ids.items():
        text = text.replace(json.dumps(full_url), json.dumps(reference))
    served: JSON = json.loads(text)
    return served


@pytest.mark.parametrize("served", [False, True], ids=["as-written", "as-served"])
@pytest.mark.parametrize(
    ("a", "b", "element"),
    [
        # The condition's evidence then names an absent finding (pilomotor, present=False).
        pytest.param("/finding/f5", "/finding/f6", "Condition.evidence", id="evidence"),
        pytest.param("/assessment", "/diagnosis", "Procedure.reasonReference", id="reason"),
        pytest.param("/assessment", "/session", "Observation.partOf", id="part-of"),
    ],
)
def test_references_naming_the_same_text_but_pointing_elsewhere_are_still_refused(
    monkeypatch: pytest.MonkeyPatch, a: str, b: str, element: str, served: bool
) -> None:
    """The shortcut must not take equal text for equal targets. Two resources swap what names
    them (their fullUrls as written; their ids and fullUrls as served, so every literal
    reference to one names the other): an element whose references read the same names
    another resource than the record implies."""
    bundle = json.loads(to_fhir_json(FIXTURE_RECORDS[0]))
    if served:
        bundle = _as_from_a_server(bundle)

    def entry(suffix: str) -> JSON:
        found: JSON = next(
            e
            for e in bundle["entry"]
            if str(e["resource"].get("identifier", [{}])[0].get("value", "")).endswith(suffix)
        )
        return found

    first, second = entry(a), entry(b)
    first["fullUrl"], second["fullUrl"] = second["fullUrl"], first["fullUrl"]
    if served:
        first["resource"]["id"], second["resource"]["id"] = (
            second["resource"]["id"],
            first["resource"]["id"],
        )
    fast, slow = _both_ways(monkeypatch, bundle)
    assert fast == slow
    records, errors = fast[0], fast[1]
    assert not records and any(path == element for _, path, _, _ in errors), errors


# -- every leaf: lone surrogates, and the path an error names ------------------------------------


def _leaves(value: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _leaves(v, (*path, k))]
    if isinstance(value, list):
        return [p for n, v in enumerate(value) for p in _leaves(v, (*path, n))]
    return [path]


def _set(bundle: JSON, path: tuple[str | int, ...], value: Any) -> None:
    node: Any = bundle
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value


def _fhir_path(resource_type: str, path: tuple[str | int, ...]) -> str:
    out = resource_type
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else f".{step}"
    return out


_FIRST = json.loads(to_fhir_json(FIXTURE_RECORDS[0]))
_STRING_LEAVES = {
    n: [p for p in _leaves(entry["resource"]) if p[-1] != "resourceType"]
    for n, entry in enumerate(_FIRST["entry"])
}


@pytest.mark.parametrize("n", sorted(_STRING_LEAVES))
def test_a_lone_surrogate_anywhere_is_judged_the_same_either_way(
    monkeypatch: pytest.MonkeyPatch, n: int
) -> None:
    for path in _STRING_LEAVES[n]:
        bundle = copy.deepcopy(_FIRST)
        resource = bundle["entry"][n]["resource"]
        old: Any = resource
        for step in path:
            old = old[step]
        if not isinstance(old, str):
            continue
        _set(resource, path, old[:3] + "\ud800" + old[3:])
        fast, slow = _both_ways(monkeypatch, bundle)
        assert fast == slow, path
        # Refused where it is read, as FHIR (not let through to the record's validation),
        # or read into no field the record keeps (a narrative, a display).
        assert not any("unicode string" in reason for _, _, reason, _ in fast[1]), path
        kept = json.dumps([r.model_dump(mode="python") for r in fast[0]], default=str)
        assert "\\ud800" not in kept, path


@pytest.mark.parametrize("n", sorted(_STRING_LEAVES))
def test_a_wrong_type_at_a_leaf_is_named_by_its_own_path(
    monkeypatch: pytest.MonkeyPatch, n: int
) -> None:
    """A value replaced by an object: where the mapping reads it, the error names its path."""
    for path in _STRING_LEAVES[n]:
        bundle = copy.deepcopy(_FIRST)
        resource = bundle["entry"][n]["resource"]
        _set(resource, path, {"not": "a value"})
        fast, slow = _both_ways(monkeypatch, bundle)
        assert fast == slow, path
        expected = _fhir_path(resource["resourceType"], path)
        errors = fast[1]
        # Read where the record keeps it, the error names the leaf; some leaves are compared
        # (check_links) or looked up, not read: their error names the element holding them.
        # An array of strings is judged whole: its error names the array.
        holder = (
            _fhir_path(resource["resourceType"], path[:-1]) if isinstance(path[-1], int) else ""
        )
        if any(reason.startswith("expected a") for _, _, reason, _ in errors):
            assert {expected, holder} & {p for _, p, _, _ in errors}, (expected, errors)
