"""A re-push knows an unchanged record by its digest, without mapping it (issue 19).

The state keeps, beside the content hash of the Bundle last written for a record, a digest of
the record and of the mapping (ims-fhir's version, its mapping code, ``mappings/``). These tests
break each thing the shortcut rests on and check that the record is then mapped again.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

import ims_fhir.sync.push as push_module
from ims_fhir import Encounter, StateStore
from ims_fhir.mapping.to_fhir import record_key
from ims_fhir.record.synthetic import synthetic_encounters
from ims_fhir.sync import signature

from .test_matching import BASE, _Server, push_to_fake


@pytest.fixture
def mapped(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids of the records the push engine maps, in order."""
    calls: list[str] = []
    real = push_module.bundle_dict

    def counting(record: Encounter, **options: Any) -> Any:
        calls.append(record.id)
        return real(record, **options)

    monkeypatch.setattr(push_module, "bundle_dict", counting)
    return calls


def _records(n: int = 3) -> list[Encounter]:
    return [r.model_copy(update={"retracted": False}) for r in synthetic_encounters(n, seed=11)]


def _push(tmp_path: Path, records: list[Encounter], **options: Any) -> list[str]:
    server = _Server(match=None)  # type: ignore[arg-type]  # no $match: policy identifier
    return [r.action for r in push_to_fake(tmp_path, server.handle, records, **options)]


def test_a_re_push_of_unchanged_records_maps_none_of_them(
    tmp_path: Path, mapped: list[str]
) -> None:
    records = _records()
    assert _push(tmp_path, records) == ["created"] * 3
    mapped.clear()
    assert _push(tmp_path, records) == ["unchanged"] * 3
    assert mapped == []


def test_a_changed_record_is_mapped_again(tmp_path: Path, mapped: list[str]) -> None:
    records = _records()
    _push(tmp_path, records)
    mapped.clear()
    edited = records[1].model_copy(update={"end": records[1].end.replace(microsecond=1)})
    server = _Server(match=None)  # type: ignore[arg-type]
    results = push_to_fake(tmp_path, server.handle, [records[0], edited, records[2]])
    assert mapped == [edited.id]
    actions = {r.record_id: r.action for r in results}
    assert actions == {records[0].id: "unchanged", edited.id: "updated", records[2].id: "unchanged"}


def test_another_mapping_maps_every_record_again_and_learns_its_digest(
    tmp_path: Path, mapped: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    records = _records()
    _push(tmp_path, records)
    mapped.clear()
    # An upgraded ims-fhir (another version, mapping code or mappings/): the same record may
    # map to another Bundle, so its digest is not the one the state holds.
    monkeypatch.setattr(signature, "mapping_fingerprint", lambda: b"another mapping")
    assert _push(tmp_path, records) == ["unchanged"] * 3  # same Bundles: nothing to write
    assert mapped == [r.id for r in records]
    mapped.clear()
    assert _push(tmp_path, records) == ["unchanged"] * 3
    assert mapped == []  # the digests found unchanged by mapping were kept


def test_verify_maps_every_record(tmp_path: Path, mapped: list[str]) -> None:
    records = _records(1)
    _push(tmp_path, records)
    mapped.clear()
    _push(tmp_path, records, verify=True)
    assert mapped == [records[0].id]


def _state_rows(tmp_path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(tmp_path / "state.sqlite3") as db:
        return db.execute(
            "SELECT record_key, content_hash, pending_hash, record_digest FROM record"
        ).fetchall()


@pytest.mark.parametrize(
    "change",
    [
        "UPDATE record SET pending_hash = 'x'",  # a write in flight
        "UPDATE record SET content_hash = NULL",  # no Bundle recorded
        "UPDATE record SET record_digest = 'r1:0'",  # another digest
    ],
)
def test_a_state_that_does_not_vouch_for_the_record_gets_it_mapped(
    tmp_path: Path, mapped: list[str], change: str
) -> None:
    records = _records(1)
    _push(tmp_path, records)
    with sqlite3.connect(tmp_path / "state.sqlite3") as db:
        db.execute(change)
    mapped.clear()
    _push(tmp_path, records)
    assert mapped == [records[0].id]


def test_a_dry_run_keeps_no_digest(tmp_path: Path, mapped: list[str]) -> None:
    records = _records(1)
    _push(tmp_path, records)
    with sqlite3.connect(tmp_path / "state.sqlite3") as db:
        db.execute("UPDATE record SET record_digest = NULL")
    _push(tmp_path, records, dry_run=True)
    assert [row[3] for row in _state_rows(tmp_path)] == [None]


def test_a_schema_4_state_gains_the_digest_column(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE record (server TEXT NOT NULL, record_key TEXT NOT NULL, "
            "content_hash TEXT, pending_hash TEXT, PRIMARY KEY (server, record_key))"
        )
        db.execute("INSERT INTO record VALUES (?, 'k', 'h', NULL)", (BASE,))
        db.execute("PRAGMA user_version = 4")
    with StateStore(path) as state:
        found = state.record(BASE, "k")
    assert found is not None
    assert (found.content_hash, found.record_digest) == ("h", None)


def test_the_key_without_mapping_is_the_key_of_the_mapped_encounter() -> None:
    from ims_fhir.mapping.to_fhir import bundle_dict
    from ims_fhir.sync.signature import identifier_key

    for record in synthetic_encounters(20, seed=5):
        encounter = next(
            e["resource"]
            for e in bundle_dict(record)["entry"]
            if e["resource"]["resourceType"] == "Encounter"
        )
        assert record_key(record) == identifier_key(encounter)


def test_equal_records_have_equal_digests_and_any_change_another() -> None:
    (record,) = synthetic_encounters(1, seed=2)
    again = Encounter.model_validate_json(record.model_dump_json())
    assert signature.record_digest(record) == signature.record_digest(again)
    assert signature.record_digest(record) != signature.record_digest(
        record.model_copy(update={"visit_type": "treatment-only", "assessment": None})
        if record.treatment is not None
        else record.model_copy(update={"retracted": not record.retracted})
    )
