from __future__ import annotations

import json
from pathlib import Path

import pytest

from ims_fhir import Encounter, ReadRecord, RecordError, read_records
from ims_fhir.record.reader import MAX_RECORD_BYTES

from .conftest import ENCOUNTER_FILES, INVALID_FILES


def _one(path: Path) -> ReadRecord | RecordError:
    (item,) = list(read_records([path]))
    return item


@pytest.mark.parametrize("path", ENCOUNTER_FILES, ids=lambda p: p.stem)
def test_every_fixture_loads(path: Path) -> None:
    item = _one(path)
    assert isinstance(item, ReadRecord), item
    assert item.record.id == json.loads(path.read_text(encoding="utf-8"))["id"]


def test_there_are_enough_fixtures() -> None:
    assert len(ENCOUNTER_FILES) >= 25
    assert len(INVALID_FILES) >= 15


@pytest.mark.parametrize("path", INVALID_FILES, ids=lambda p: p.stem)
def test_every_invalid_fixture_gives_its_documented_error(path: Path) -> None:
    expected = json.loads(path.with_suffix(".expected").read_text(encoding="utf-8"))
    item = _one(path)
    assert isinstance(item, RecordError)
    assert item.location.file == str(path)
    for want in expected["errors"]:
        assert any(
            issue.path == want["path"] and want["reason"] in issue.reason for issue in item.issues
        ), f"{want} not in {item.issues}"


def test_a_list_file_reports_bad_items_and_keeps_the_good(tmp_path: Path) -> None:
    good = json.loads(ENCOUNTER_FILES[0].read_text(encoding="utf-8"))
    bad = dict(good, id="bad-one", visit_type="séance")
    target = tmp_path / "many.json"
    target.write_text(json.dumps([good, bad, good | {"id": "copy-2"}]), encoding="utf-8")
    items = list(read_records([target]))
    assert [type(i).__name__ for i in items] == ["ReadRecord", "RecordError", "ReadRecord"]
    error = items[1]
    assert isinstance(error, RecordError)
    assert (error.location.index, error.location.record_id) == (1, "bad-one")
    assert error.issues[0].path == "visit_type"
    assert "unknown visit-type 'séance'" in str(error)


def test_ndjson_reports_line_numbers_and_carries_on(tmp_path: Path) -> None:
    good = ENCOUNTER_FILES[1].read_text(encoding="utf-8")
    lines = [
        json.dumps(json.loads(good)),
        "{not json",
        "",
        json.dumps(json.loads(good) | {"id": "second"}),
    ]
    target = tmp_path / "batch.ndjson"
    target.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\n")
    items = list(read_records([target]))
    kinds = [(type(i).__name__, i.location.line) for i in items]
    assert kinds == [("ReadRecord", 1), ("RecordError", 2), ("ReadRecord", 4), ("RecordError", 5)]
    assert "not UTF-8" in str(items[3])


def test_a_line_too_long_is_skipped_without_loading_it(tmp_path: Path) -> None:
    good = json.dumps(json.loads(ENCOUNTER_FILES[0].read_text(encoding="utf-8")))
    target = tmp_path / "huge.ndjson"
    with target.open("w", encoding="utf-8") as handle:
        handle.write('{"id": "' + "x" * (MAX_RECORD_BYTES + 10) + '"}\n')
        handle.write(good + "\n")
    items = list(read_records([target]))
    assert isinstance(items[0], RecordError)
    assert "longer than" in str(items[0])
    assert isinstance(items[1], ReadRecord)
    assert items[1].location.line == 2


def test_a_directory_is_read_in_name_order(tmp_path: Path) -> None:
    for name in ("b.json", "a.ndjson", "notes.txt"):
        (tmp_path / name).write_text(
            ENCOUNTER_FILES[0].read_text(encoding="utf-8").replace("\n", " ") + "\n",
            encoding="utf-8",
        )
    files = [Path(i.location.file).name for i in read_records([tmp_path])]
    assert files == ["a.ndjson", "b.json"]


def test_a_missing_path_is_reported() -> None:
    (item,) = list(read_records(["/no/such/file.json"]))
    assert isinstance(item, RecordError)
    assert "no such file" in str(item)


@pytest.mark.parametrize(
    ("segments", "expected"),
    [
        pytest.param(["L4-L5"], ["L4", "L5"], id="range"),
        pytest.param(["L5-S1"], ["L5", "S1"], id="lumbosacral-range"),
        pytest.param(["C5-C7"], ["C5", "C6", "C7"], id="three-levels"),
        pytest.param(["S1", "L5"], ["L5", "S1"], id="sorted-cranio-caudal"),
        pytest.param("T12-L1", ["T12", "L1"], id="a-single-string"),
    ],
)
def test_segment_ranges_expand_to_levels(segments: object, expected: list[str]) -> None:
    data = json.loads(ENCOUNTER_FILES[0].read_text(encoding="utf-8"))
    data["treatment"]["sites"][0]["segments"] = segments
    record = Encounter.model_validate(data)
    assert record.treatment is not None
    assert record.treatment.sites[0].segments == expected


def test_records_are_frozen() -> None:
    data = json.loads(ENCOUNTER_FILES[0].read_text(encoding="utf-8"))
    record = Encounter.model_validate(data)
    with pytest.raises(Exception, match="frozen"):
        record.id = "other"  # type: ignore[misc]
