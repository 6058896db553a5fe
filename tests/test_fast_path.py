"""The fast forward path (dicts written by orjson) against the validated one (fhir.resources).

``to_fhir_json`` writes the mapped dicts without building fhir.resources models; these tests are
what makes that safe: for every fixture and generated record its output validates under the R4B
models and holds exactly what the validated model serialises, and ``validate=True`` gives the
same bytes. Records built in code that skipped validation are refused where they enter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle
from hypothesis import HealthCheck, given, settings

from ims_fhir import Encounter, RecordError, push, to_fhir, to_fhir_json, to_transaction
from ims_fhir.mapping.to_fhir import transaction_json
from ims_fhir.sync.state import StateStore

from .conftest import ENCOUNTER_FILES, ROOT
from .strategies import encounters


def _record(path: Path) -> Encounter:
    return Encounter.model_validate_json(path.read_text(encoding="utf-8"))


def _same_as_validated(record: Encounter) -> None:
    fast = to_fhir_json(record)
    model = to_fhir(record)
    # The validated model, serialised by fhir.resources, says exactly what the fast JSON says
    # (fhir.resources orders elements as the spec lists them; the fast path as it maps them).
    assert json.loads(fast) == json.loads(model.model_dump_json())
    # The fast output is a conformant Bundle by itself...
    Bundle.model_validate_json(fast)
    # ...and the checked path writes the very same bytes.
    assert to_fhir_json(record, validate=True) == fast


@pytest.mark.parametrize("path", ENCOUNTER_FILES, ids=lambda p: p.stem)
def test_fixture_fast_output_is_the_validated_output(path: Path) -> None:
    _same_as_validated(_record(path))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=encounters())
def test_generated_fast_output_is_the_validated_output(record: Encounter) -> None:
    _same_as_validated(record)


def test_transaction_json_is_to_transaction() -> None:
    records = [_record(p) for p in ENCOUNTER_FILES]
    fast = transaction_json(records)
    assert json.loads(fast) == json.loads(to_transaction(records).model_dump_json())
    assert transaction_json(records, validate=True) == fast


def test_fast_output_is_deterministic() -> None:
    record = _record(ENCOUNTER_FILES[0])
    again = Encounter.model_validate_json(record.model_dump_json())
    assert to_fhir_json(record) == to_fhir_json(again)


# -- records built in code ---------------------------------------------------------------------


def _bad_copy() -> Encounter:
    record = _record(ENCOUNTER_FILES[0])
    assert record.pain, "the first fixture has pain scores"
    score = record.pain[0].model_copy(update={"nrs": 11})  # model_copy does not validate
    return record.model_copy(update={"pain": [score, *record.pain[1:]]})


@pytest.mark.parametrize(
    "mapper",
    [to_fhir, to_fhir_json, lambda r: to_transaction([r]), lambda r: transaction_json([r])],
    ids=["to_fhir", "to_fhir_json", "to_transaction", "transaction_json"],
)
def test_a_record_that_skipped_validation_is_refused_where_it_enters(mapper: Any) -> None:
    with pytest.raises(RecordError) as caught:
        mapper(_bad_copy())
    assert [i.path for i in caught.value.issues] == ["pain[0].nrs"]
    assert "less than or equal to 10" in str(caught.value)


def test_push_fails_a_record_that_skipped_validation_and_sends_nothing(tmp_path: Path) -> None:
    # An unreachable server: were the record sent, the push would fail differently (connect).
    with StateStore(tmp_path / "state.sqlite3") as state:
        results = push([_bad_copy()], "http://127.0.0.1:9/fhir", state)
    assert [r.action for r in results] == ["failed"]
    assert "pain[0].nrs" in (results[0].message or "")


def test_convert_validate_flag_writes_the_same_bytes(tmp_path: Path) -> None:
    def convert(*extra: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "ims_fhir", "convert", *map(str, ENCOUNTER_FILES), *extra],
            capture_output=True,
            text=True,
            env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    fast = convert()
    assert fast == convert("--validate")
    assert len(fast.splitlines()) == len(ENCOUNTER_FILES)
