"""Faster code against the code it replaced: the same values, byte for byte.

Signatures, content hashes and record digests are kept in state files, and request bodies go to
servers: a faster implementation must give exactly what the one it replaced gave, or every
encounter pushed before looks changed. Each replaced function is kept here as it was (a reference
copy) and compared with the new one on the fixtures, on synthetic records and on generated
values.
"""

from __future__ import annotations

import enum
import hashlib
import math
import re
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ims_fhir import ReadRecord, read_records
from ims_fhir.mapping import identity
from ims_fhir.mapping.identity import search_escape, without_contained_ids
from ims_fhir.mapping.to_fhir import bundle_dict
from ims_fhir.record.model import Encounter
from ims_fhir.record.synthetic import synthetic_encounters
from ims_fhir.sync import push
from ims_fhir.sync import signature as sig
from ims_fhir.sync.signature import References, canonical_json

from .conftest import ENCOUNTER_FILES, ROOT

# -- reference copies ---------------------------------------------------------------------------


def _reference_normalised(value: Any, references: References) -> Any:
    """``signature._normalised`` before it copied only what changes (ims-fhir 0.2)."""
    kind = type(value)
    if kind is dict:
        out = {}
        for key, item in value.items():
            kind = type(item)
            if kind is str:
                out[key] = references.resolve(item) if key == "reference" else item
            elif kind is dict or kind is list:
                out[key] = _reference_normalised(item, references)
            elif key == "reference" and isinstance(item, str):
                out[key] = references.resolve(item)
            else:
                out[key] = _reference_leaf(item, references)
        return out
    if kind is list:
        return [
            item if type(item) is str else _reference_normalised(item, references) for item in value
        ]
    return _reference_leaf(value, references)


def _reference_leaf(value: Any, references: References) -> Any:
    if isinstance(value, str | bool) or value is None:
        return value
    if isinstance(value, int | float):
        return _reference_number(value)
    if isinstance(value, Mapping):
        return _reference_normalised(dict(value), references)
    if isinstance(value, list | tuple):
        return [_reference_normalised(item, references) for item in value]
    return value


def _reference_number(value: float) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return format(Decimal(str(value)).normalize(), "f")


def _reference_signature(resource: Mapping[str, Any], references: References) -> str:
    """``signature.signature`` over the reference normalisation."""
    content = {k: v for k, v in resource.items() if k not in ("id", "meta", "text")}
    contained = content.get("contained")
    if isinstance(contained, list) and contained:
        local = {
            f"#{c['id']}": f"#contained[{n}]"
            for n, c in enumerate(contained)
            if isinstance(c, dict) and isinstance(c.get("id"), str)
        }
        content["contained"] = without_contained_ids(contained)
        references = sig._Local(references, local)
    digest = hashlib.sha256(canonical_json(_reference_normalised(content, references)))
    return digest.hexdigest()[:32]


def _reference_literal(value: Any, literal_refs: dict[str, str]) -> Any:
    """``push._literal`` before it dispatched once per element (ims-fhir 0.2)."""
    kind = type(value)
    if kind is dict:
        changed: dict[str, Any] | None = None
        for key, item in value.items():
            if key == "reference" and type(item) is str:
                new = literal_refs.get(item, item)
            elif type(item) is dict or type(item) is list:
                new = _reference_literal(item, literal_refs)
            else:
                continue
            if new is not item:
                if changed is None:
                    changed = dict(value)
                changed[key] = new
        return value if changed is None else changed
    if kind is list:
        items: list[Any] | None = None
        for n, item in enumerate(value):
            if type(item) is dict or type(item) is list:
                new = _reference_literal(item, literal_refs)
                if new is not item:
                    if items is None:
                        items = list(value)
                    items[n] = new
        return value if items is None else items
    return value


_REFERENCE_PLAIN = re.compile(r"[A-Za-z0-9_.~-]*")


def _reference_value_token(value: str) -> str:
    """``identity._value_token`` before "/" had a fast path (ims-fhir 0.2)."""
    if _REFERENCE_PLAIN.fullmatch(value):
        return value
    return quote(search_escape(value), safe="")


# -- inputs -------------------------------------------------------------------------------------


def _fixture_records() -> list[Encounter]:
    found = [r.record for r in read_records(ENCOUNTER_FILES) if isinstance(r, ReadRecord)]
    assert len(found) == len(ENCOUNTER_FILES)
    return found


def _bundles() -> list[dict[str, Any]]:
    """Mapped Bundles of the fixtures and synthetic records, and the FHIR fixture Bundles."""
    records = _fixture_records() + list(synthetic_encounters(300, seed=3))
    mapped = [bundle_dict(r) for r in records]
    files = sorted((ROOT / "fixtures" / "fhir").glob("*.json"))
    assert files
    return mapped + [orjson.loads(Path(f).read_bytes()) for f in files]


def _references(bundle: dict[str, Any]) -> References:
    references = References()
    references.add_entries(e for e in bundle["entry"] if "fullUrl" in e and "resource" in e)
    references.add_id("Patient", "p1", "http://example.org/patient|p1")
    return references


# Numbers as a server may write them, and at the edges of the new integer path.
_EDGE_NUMBERS = [
    0,
    -0.0,
    13.0,
    13,
    1e-7,
    -1e-7,
    1.5e300,
    2**63 - 1,
    2**64,
    10**28 - 1,
    10**28,
    -(10**28) + 1,
    -(10**28),
    10**28 + 1,
    12345678901234567890123456789,
    float("inf"),
    float("-inf"),
    float("nan"),
]
_names = ["reference", "value", "id", "contained", "coding", "x"]
_keys = st.sampled_from(_names) | st.text(max_size=4)
_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.sampled_from(_EDGE_NUMBERS)
    | st.floats()
    | st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=8)
    | st.sampled_from(["urn:uuid:a", "Patient/p1", "http://h/fhir/Patient/9/_history/2", "#c"])
)
json_values = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_keys, inner, max_size=5),
    max_leaves=40,
)


def _same(new: Any, old: Any) -> None:
    """Equal values of equal types all the way down, so equal in any JSON writer."""
    assert type(new) is type(old)
    if isinstance(old, dict):
        assert list(new) == list(old)
        for key in old:
            _same(new[key], old[key])
    elif isinstance(old, list):
        assert len(new) == len(old)
        for a, b in zip(new, old, strict=True):
            _same(a, b)
    else:
        assert new == old or (new != new and old != old)  # noqa: PLR0124 - NaN


# -- signatures ---------------------------------------------------------------------------------


def test_signatures_of_mapped_and_fhir_fixture_resources_are_unchanged() -> None:
    count = 0
    for bundle in _bundles():
        references = _references(bundle)
        for entry in bundle["entry"]:
            resource = entry["resource"]
            assert sig.signature(resource, references) == _reference_signature(resource, references)
            count += 1
    assert count > 4000


@settings(max_examples=2000, deadline=None)
@given(json_values)
def test_normalised_generated_json_is_unchanged(value: Any) -> None:
    references = References()
    references.full_urls["urn:uuid:a"] = "http://example.org/x|a"
    references.add_id("Patient", "p1", "http://example.org/patient|p1")
    new = sig._normalised(value, references)
    old = _reference_normalised(value, references)
    _same(new, old)
    if isinstance(value, dict):
        resource = {"resourceType": "Basic", "id": "x", **value}
        assert sig.signature(resource, references) == _reference_signature(resource, references)


@pytest.mark.parametrize("number", _EDGE_NUMBERS, ids=repr)
def test_a_number_is_written_as_the_decimal_route_writes_it(number: float) -> None:
    references = References()
    value = {"value": number, "list": [number], "reference": number}
    _same(sig._normalised(value, references), _reference_normalised(value, references))


class _Code(enum.IntEnum):
    ONE = 1


class _Text(enum.StrEnum):
    REF = "urn:uuid:a"


@pytest.mark.parametrize(
    "value",
    [
        {"reference": _Text.REF, "n": _Code.ONE, "t": (1, "a", {"reference": "urn:uuid:a"})},
        [_Code.ONE, True, None, (2.0,)],
        {"nested": {"deeper": [[{"reference": "Patient/p1/_history/3"}]]}},
    ],
    ids=["str-and-int-subclasses-and-tuples", "list-of-odd-leaves", "deep"],
)
def test_values_of_types_json_never_gives_are_normalised_as_before(value: Any) -> None:
    references = References()
    references.full_urls["urn:uuid:a"] = "http://example.org/x|a"
    _same(sig._normalised(value, references), _reference_normalised(value, references))


def test_what_holds_no_reference_or_number_is_not_copied_and_the_input_is_not_changed() -> None:
    (record,) = synthetic_encounters(1, seed=1)
    bundle = bundle_dict(record)
    before = orjson.dumps(bundle)
    references = _references(bundle)
    for entry in bundle["entry"]:
        sig.signature(entry["resource"], references)
    assert orjson.dumps(bundle) == before
    coding = {"system": "s", "code": "c"}
    assert sig._normalised(coding, references) is coding


# -- references made literal (push._rewrite) ----------------------------------------------------


def _literal_refs(bundle: dict[str, Any]) -> dict[str, str]:
    """Every other entry's fullUrl as a ``Type/id``, as a push has those it does not send."""
    entries = [e for e in bundle["entry"] if "fullUrl" in e and "resource" in e]
    return {
        e["fullUrl"]: f"{e['resource']['resourceType']}/id{n}"
        for n, e in enumerate(entries)
        if n % 2 == 0
    }


def test_references_made_literal_in_mapped_and_fhir_fixture_resources_are_unchanged() -> None:
    rewritten = 0
    for bundle in _bundles():
        literal_refs = _literal_refs(bundle)
        for entry in bundle["entry"]:
            resource = entry["resource"]
            before = orjson.dumps(resource)
            new = push._rewrite(resource, literal_refs)
            old = _reference_literal(resource, literal_refs)
            _same(new, old if old is not resource else dict(resource))
            assert new is not resource  # callers set its id and meta
            assert orjson.dumps(resource) == before
            rewritten += new != resource
    assert rewritten > 1000


@settings(max_examples=1500, deadline=None)
@given(json_values)
def test_references_made_literal_in_generated_json_are_unchanged(value: Any) -> None:
    literal_refs = {"urn:uuid:a": "Patient/p1", "#c": "Basic/c"}
    _same(push._literal(value, literal_refs), _reference_literal(value, literal_refs))


# -- search tokens (identity.identifier_query) --------------------------------------------------

_token_text = st.text() | st.text(alphabet="aZ09_.~-/|,$\\% é\ud800", max_size=12)


@settings(max_examples=3000, deadline=None)
@given(_token_text)
def test_a_value_token_is_percent_encoded_as_before(value: str) -> None:
    assert _outcome(identity._value_token, value) == _outcome(_reference_value_token, value)


def _outcome(function: Any, value: str) -> tuple[str, str]:
    """What ``function(value)`` gives, or the type of what it raises (a lone surrogate)."""
    try:
        return "returns", function(value)
    except Exception as exc:  # noqa: BLE001 - compared, not handled
        return "raises", type(exc).__name__


def test_identifier_queries_of_mapped_resources_are_unchanged() -> None:
    count = 0
    for bundle in _bundles()[:200]:
        for entry in bundle["entry"]:
            for item in entry["resource"].get("identifier") or []:
                value = item["value"]
                assert identity._value_token(value) == _reference_value_token(value)
                count += "/" in value
    assert count > 1000
