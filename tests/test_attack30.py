"""Independent attack on 093363f and 66bfebc (the reverse mapping's speed-ups), claimed to give
the same MappingReport as 444d471 for every input. Each input below mapped differently before
and after those commits (checked by running both); all five findings are fixed: check_links asks
the source for each derived element again (not for the keys it lists), a node's index in an
array is kept apart from its key (a tuple key is a key), and a string's Unicode is checked where
it is read, whatever was found of its resource before."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from ims_fhir import Encounter, from_fhir, to_fhir_json

from .conftest import ENCOUNTER_FILES

JSON = dict[str, Any]

LUMBAR = Encounter.model_validate_json(ENCOUNTER_FILES[0].read_text(encoding="utf-8"))
FOLLOW_UP = Encounter.model_validate_json(ENCOUNTER_FILES[1].read_text(encoding="utf-8"))


def _bundle(record: Encounter) -> JSON:
    bundle: JSON = json.loads(to_fhir_json(record))
    return bundle


def _first(bundle: JSON, rtype: str, without: str = "") -> dict[str, Any]:
    return next(
        e
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == rtype and without not in e["resource"]
    )


# -- check_links visits only the keys the source lists (093363f) --------------------------------


class _CaseInsensitive(Mapping[str, Any]):
    """Looks keys up whatever their case and lists them as given, as requests'
    CaseInsensitiveDict does: ``get("statusReason")`` finds ``"StatusReason"``."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        for k, v in self._data.items():
            if k.lower() == key.lower():
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


@pytest.mark.parametrize(
    ("rtype", "element", "value"),
    [
        ("Procedure", "statusReason", {"text": "patient refused: not done"}),
        ("Procedure", "partOf", [{"reference": "Procedure/other"}]),
        ("Observation", "hasMember", [{"reference": "Observation/other"}]),
    ],
)
def test_check_links_reads_an_element_a_mapping_gives_but_lists_otherwise(
    rtype: str, element: str, value: Any
) -> None:
    """Attacks check_links' ``present`` (resource.keys() | data.keys() | earlier.keys()): an
    element the source gives (``data.get(element)``, as every other read does) but lists under
    another spelling is no longer compared. 444d471 refused the Procedure's statusReason (a
    session not done) / partOf / hasMember the record does not imply; the new code returns the
    record as if the element were absent."""
    bundle = _bundle(LUMBAR)
    entry = _first(bundle, rtype, without=element)
    resource = dict(entry["resource"])
    resource[element[0].upper() + element[1:]] = value
    entry["resource"] = _CaseInsensitive(resource)
    report = from_fhir(bundle)
    assert not report.records
    assert [(e.path, e.reason.split(";")[0]) for e in report.errors] == [
        (f"{rtype}.{element}", f"says {json.dumps(value)}")
    ]


class _ListKey(Mapping[Any, Any]):
    """A Mapping with one more key, a list (unhashable), found by equality."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: Any) -> Any:
        if key == ["x"]:
            return "y"
        return self._data[key]

    def __iter__(self) -> Iterator[Any]:
        yield from self._data
        yield ["x"]

    def __len__(self) -> int:
        return len(self._data) + 1


def test_check_links_does_not_hash_the_sources_keys() -> None:
    """Attacks the same ``present`` set: it hashes every key the source lists. 444d471 mapped
    this Bundle (the extra key is no element ims-fhir reads); the new code reports
    ``internal: cannot read (TypeError("unhashable type: 'list'"))`` and loses the record."""
    bundle = _bundle(LUMBAR)
    entry = _first(bundle, "Procedure")
    entry["resource"] = _ListKey(entry["resource"])
    report = from_fhir(bundle)
    assert not report.errors
    assert report.records == [LUMBAR]


class _Spelled(str):
    """A key equal to an element's name, that prints as another."""

    def __str__(self) -> str:
        return "text"


def test_check_links_names_the_fhir_element_not_the_sources_key() -> None:
    """Attacks the same ``present`` set: its members now come from the source's own keys, so the
    error's element path is written from the source's key object. 444d471 named
    ``Procedure.statusReason``; the new code names ``Procedure.text`` (an element that says
    nothing wrong) for a plain dict whose key is a str subclass."""
    bundle = _bundle(LUMBAR)
    resource = _first(bundle, "Procedure", without="statusReason")["resource"]
    resource[_Spelled("statusReason")] = {"text": "patient refused: not done"}
    report = from_fhir(bundle)
    assert [e.path for e in report.errors] == ["Procedure.statusReason"]


# -- lazy element paths (093363f) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        (("x", 0), "('x', 0)"),  # new: Procedure.bodySite[0].x[0]...
        (("x",), "('x',)"),  # new: internal: cannot read (IndexError)
        ((), ""),  # new: internal: cannot read (IndexError)
        (("a", "b", "c"), "('a', 'b', 'c')"),  # new: Procedure.bodySite[0].a[b]...
    ],
)
def test_a_tuple_key_is_not_read_as_a_step_into_an_array(key: tuple[Any, ...], shown: str) -> None:
    """Attacks ``_Node``'s lazy path: a step that is a tuple is taken for (key, index). In
    known_displays the step is the input's own key, which a Python dict may make a tuple. A
    wrong display under it was named ``Procedure.bodySite[0].('x', 0).coding[0].display`` by
    444d471; the new code names ``...bodySite[0].x[0]...`` (an array element that is not there),
    or, for a tuple not of two, loses the error to ``internal: cannot read (IndexError)``."""
    bundle = _bundle(LUMBAR)
    resource = _first(bundle, "Procedure")["resource"]
    while "bodySite" not in resource:
        resource = next(
            e["resource"]
            for e in bundle["entry"]
            if e["resource"]["resourceType"] == "Procedure" and "bodySite" in e["resource"]
        )
    site = resource["bodySite"][0]
    coding = {**site["coding"][0], "display": "Not this muscle"}
    site[key] = {"coding": [coding]}
    report = from_fhir(bundle)
    (error,) = report.errors
    step = f".{shown}" if shown else ""
    assert (error.resource.split("/")[0], error.path) == (
        "Procedure",
        f"Procedure.bodySite[0]{step}.coding[0].display",
    )


# -- _Res.plain is never unset (093363f) --------------------------------------------------------


class _Changes(Mapping[str, Any]):
    """A resource that, looked at for modifier extensions, changes another one: what a caller's
    lazy or shared Mapping may do. ``plain`` was set on the other one before."""

    def __init__(self, data: Mapping[str, Any], victim: Any, path: tuple[Any, ...], value: Any):
        self._data = dict(data)
        self._victim, self._path, self._value = victim, path, value

    def __getitem__(self, key: str) -> Any:
        if key == "modifierExtension":
            target = self._victim
            for step in self._path[:-1]:
                target = target[step]
            target[self._path[-1]] = self._value
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def test_a_shared_resource_changed_after_it_was_found_plain_is_still_checked() -> None:
    """Attacks ``_Res.plain`` (set once, never unset; 'the resource is not changed while it is
    read'): two encounters share their Practitioner; the first encounter's rebuild finds it plain
    JSON; the second encounter's Provenance, a caller's Mapping, puts a lone surrogate into the
    Practitioner's identifier type before the second rebuild reads it. 444d471 refused the
    second encounter (``Practitioner.identifier[0].type.coding[0].system``: not valid Unicode);
    the new code skips the check (no_modifiers finds the resource no longer plain, but leaves
    ``plain`` True) and returns both records."""
    first, second = _bundle(LUMBAR), _bundle(FOLLOW_UP)
    entries = first["entry"] + second["entry"]
    practitioner = _first(first, "Practitioner")["resource"]
    (n, ident) = next(
        (n, i)
        for n, i in enumerate(practitioner["identifier"])
        if i["system"].endswith("/practitioner")
    )
    good = ident["type"]["coding"][0]
    provenance = _first(second, "Provenance")
    provenance["resource"] = _Changes(
        provenance["resource"],
        practitioner,
        ("identifier", n, "type", "coding"),
        [{"system": "urn:x\ud800", "code": "PRN"}, good],
    )
    report = from_fhir({"resourceType": "Bundle", "type": "collection", "entry": entries})
    assert [(e.path, e.reason) for e in report.errors] == [
        (
            f"Practitioner.identifier[{n}].type.coding[0].system",
            "not valid Unicode (a lone surrogate)",
        )
    ]
    assert report.records == [LUMBAR]
