"""What the Questionnaire tests share: fixtures as the form captures them, items by linkId."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ims_fhir import Encounter
from ims_fhir.mapping.questionnaire_response import NOT_CAPTURED

from .conftest import ENCOUNTER_FILES

__all__ = ["JSON", "LOCAL", "captured_only", "find", "fixture", "items", "parent_of"]

JSON = dict[str, Any]
LOCAL = "https://ims-fhir.org/fhir/CodeSystem/ims-local"


def captured_only(record: Encounter) -> Encounter:
    """``record`` without what the form does not capture (NOT_CAPTURED at their defaults)."""
    data = record.model_dump()
    for path in NOT_CAPTURED:
        *parents, last = path.split(".")
        target = data
        for part in parents:
            target = target[part]
        target[last] = [] if last == "identifiers" else (False if last == "retracted" else None)
    return Encounter.model_validate(data)


def fixture(name: str) -> Encounter:
    """The fixture whose file name holds ``name``, as the form captures it."""
    path = next(p for p in ENCOUNTER_FILES if name in p.stem)
    return captured_only(Encounter.model_validate_json(path.read_text(encoding="utf-8")))


def items(node: Any) -> Iterator[JSON]:
    """Every item under ``node``, depth first."""
    for item in node.get("item", []):
        yield item
        yield from items(item)


def find(qr: JSON, link_id: str) -> JSON:
    """The first item with ``link_id``."""
    return next(i for i in items(qr) if i["linkId"] == link_id)


def parent_of(qr: JSON, link_id: str) -> JSON:
    """The node holding the first item with ``link_id``."""
    return next(
        n for n in [qr, *items(qr)] if any(i["linkId"] == link_id for i in n.get("item", []))
    )
