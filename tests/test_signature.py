"""Signatures and content hashes: the faster writer digests the very bytes the standard one did.

Signatures and content hashes are stored in state files; a push compares them with what it
would write now. Signatures written by orjson instead of ``json.dumps`` must be byte for byte the
same; content hashes carry a version, and one of ims-fhir 0.1 is still recognised, or every
encounter pushed before would look changed (and be read back from the server) once.
"""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ims_fhir.mapping.to_fhir import bundle_dict
from ims_fhir.record.model import Encounter
from ims_fhir.record.synthetic import synthetic_encounters
from ims_fhir.sync.push import _same_content, content_hash
from ims_fhir.sync.signature import References, canonical_json, signature

from .conftest import ENCOUNTER_FILES
from .strategies import encounters


def _standard(value: Any) -> bytes:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass")


# What a signature digests: no floats (numbers are strings by then).
_leaves = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.text()
_values = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=1500, deadline=None)
@given(_values)
def test_canonical_json_is_the_standard_librarys_compact_sorted_json(value: Any) -> None:
    assert canonical_json(value) == _standard(value)


def test_lone_surrogates_and_big_integers_are_written_as_before() -> None:
    for value in [{"s": "\ud800"}, 2**65, [None], {"b": [True, False, "é"]}]:
        assert canonical_json(value) == _standard(value)


def test_a_hash_of_other_content_is_not_the_same_content() -> None:
    one, two = (bundle_dict(r) for r in synthetic_encounters(2, seed=5))
    old_one = hashlib.sha256(
        json.dumps(one, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    ).hexdigest()[:32]
    assert not _same_content(old_one, content_hash(two), two)
    assert not _same_content(content_hash(one), content_hash(two), two)
    assert not _same_content(None, content_hash(two), two)


def _old_normalised(value: Any, references: References) -> Any:
    """The normalisation as ims-fhir 0.1 wrote it (before it dispatched on exact types)."""
    if isinstance(value, dict):
        return {
            key: (
                references.resolve(item)
                if key == "reference" and isinstance(item, str)
                else _old_normalised(item, references)
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_old_normalised(item, references) for item in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format(Decimal(str(value)).normalize(), "f")
    return value


def _old_signature(resource: dict[str, Any], references: References) -> str:
    content = {k: v for k, v in resource.items() if k not in ("id", "meta", "text")}
    text = json.dumps(
        _old_normalised(content, references),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def test_signatures_and_content_hashes_of_fixtures_and_synthetic_records_are_unchanged() -> None:
    records = [Encounter.model_validate_json(p.read_text("utf-8")) for p in ENCOUNTER_FILES]
    for record in records + list(synthetic_encounters(200, seed=11)):
        _same_digests(record)


@settings(max_examples=150, deadline=None)
@given(encounters())
def test_signatures_and_content_hashes_of_generated_records_are_unchanged(
    record: Encounter,
) -> None:
    _same_digests(record)


def _same_digests(record: Encounter) -> None:
    bundle = bundle_dict(record)
    old_hash = hashlib.sha256(
        json.dumps(bundle, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    ).hexdigest()[:32]
    digest = content_hash(bundle)
    assert digest.startswith("2:") and _same_content(digest, digest, bundle)
    # A state written by ims-fhir 0.1 (json.dumps hashes) still finds the encounter unchanged.
    assert _same_content(old_hash, digest, bundle), record.id
    references = References()
    references.add_entries(bundle["entry"])
    for entry in bundle["entry"]:
        resource = entry["resource"]
        assert signature(resource, references) == _old_signature(_placed(resource), references)


def _placed(resource: dict[str, Any]) -> dict[str, Any]:
    """Contained resources named by their place, as signatures name them (since issue 16,
    which brought the first ones: no state holds an earlier signature of such a resource)."""
    contained = resource.get("contained")
    if not contained:
        return resource
    names = {f"#{c['id']}": f"#contained[{n}]" for n, c in enumerate(contained)}
    text = json.dumps(
        {**resource, "contained": [{k: v for k, v in c.items() if k != "id"} for c in contained]}
    )
    for old, new in names.items():
        text = text.replace(f'"reference": "{old}"', f'"reference": "{new}"')
    placed: dict[str, Any] = json.loads(text)
    return placed


def test_a_signature_does_not_depend_on_the_callers_decimal_context() -> None:
    """An application embedding ims-fhir may change its thread's decimal context; a number's
    text in a signature stays what the default context (28 digits) gave when it was stored."""
    import decimal

    resource = {
        "resourceType": "Observation",
        "valueQuantity": {"value": 123456.789, "unit": "mm"},
        "component": [{"valueInteger": 10**30 + 7}, {"valueQuantity": {"value": 1.5e-7}}],
    }
    expected = signature(resource, References())
    for precision in (3, 8, 40):
        with decimal.localcontext() as context:
            context.prec = precision
            context.rounding = decimal.ROUND_DOWN
            assert signature(resource, References()) == expected, precision
