"""What earlier versions of ims-fhir wrote still maps back to the same records.

``tests/data/earlier/`` holds the golden Bundles as ims-fhir 0.1.0 wrote them at commit 9a14045
(before the mapping spec, the fast path and the clinical-fidelity changes: no ``text`` on local
codes, shortened muscle displays, elements in the spec's order). A server holds what an older
version pushed; pull and convert must still read it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ims_fhir import Encounter, from_fhir

from .conftest import FIXTURES, ROOT

EARLIER = sorted((ROOT / "tests" / "data" / "earlier").glob("*.bundle.json"))


def test_there_are_earlier_bundles() -> None:
    assert len(EARLIER) >= 6


@pytest.mark.parametrize("path", EARLIER, ids=lambda p: p.name.removesuffix(".bundle.json"))
def test_an_earlier_bundle_maps_back_to_its_record(path: Path) -> None:
    name = path.name.removesuffix(".bundle.json")
    record = Encounter.model_validate_json(
        (FIXTURES / "encounters" / f"{name}.json").read_text(encoding="utf-8")
    )
    # 0.1 wrote no time the record was made (the encounter's end stood for it).
    record = record.model_copy(update={"recorded": None})
    report = from_fhir(json.loads(path.read_text(encoding="utf-8")))
    assert report.errors == []
    assert report.records == [record]
