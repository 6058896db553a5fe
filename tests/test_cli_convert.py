"""``ims-fhir convert`` both ways on input nobody here wrote: the bad is reported, the rest kept."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ims_fhir import Encounter, to_fhir_json
from ims_fhir.cli.commands import cli

from .conftest import FIXTURES

LUMBAR = FIXTURES / "encounters" / "01-lumbar-l5-initial.json"
CERVICAL = FIXTURES / "encounters" / "05-cervical-c5-c6-initial.json"


def _record(path: Path) -> Encounter:
    return Encounter.model_validate_json(path.read_text(encoding="utf-8"))


def _bundle(path: Path) -> dict[str, Any]:
    return json.loads(to_fhir_json(_record(path)))


def _entry(bundle: dict[str, Any], suffix: str) -> dict[str, Any]:
    return next(
        e["resource"]
        for e in bundle["entry"]
        if str(e["resource"].get("identifier", [{}])[0].get("value", "")).endswith(suffix)
    )


def _shapes() -> list[tuple[str, Any]]:
    """Malformed Bundles of the kinds that once ended convert with a traceback."""
    out: list[tuple[str, Any]] = []

    def broken(name: str, change: Any) -> None:
        bundle = _bundle(LUMBAR)
        change(bundle)
        out.append((name, bundle))

    out += [
        ("string", "a string"),
        ("number", 10**400),
        ("list-of-strings", ["x", "y"]),
        ("bundle-entry-string", {"resourceType": "Bundle", "entry": ["x"]}),
        ("bundle-entry-object", {"resourceType": "Bundle", "entry": {"resource": {}}}),
        ("entry-resource-list", {"resourceType": "Bundle", "entry": [{"resource": []}]}),
    ]
    broken("encounter-identifier-object", lambda b: _entry(b, "enc-v-0001").update(identifier={}))
    broken("coding-object", lambda b: _entry(b, "/finding/f1")["code"].update(coding={"x": 1}))
    broken("note-string", lambda b: _entry(b, "/finding/f4").update(note="a string"))
    broken(
        "huge-integer",
        lambda b: next(
            x for x in _entry(b, "/site/s1")["extension"] if x["url"].endswith("/insertions")
        ).update(valuePositiveInt=10**400),
    )
    # 1e400 as a server would send it: a JSON number too large for a float
    broken("infinite-pain", lambda b: _entry(b, "/pain/p1")["valueQuantity"].update(value=HUGE))
    broken("type-not-string", lambda b: _entry(b, "/finding/f2").update(resourceType=7))
    broken("reference-number", lambda b: _entry(b, "/site/s2").update(partOf=[{"reference": 5}]))
    broken("period-string", lambda b: _entry(b, "enc-v-0001").update(period="today"))
    broken("name-string", lambda b: b["entry"][1]["resource"].update(name="Smith"))
    broken(
        "member-loop",
        lambda b: _entry(b, "/assessment").update(
            hasMember=[
                {
                    "reference": b["entry"][
                        next(
                            i
                            for i, e in enumerate(b["entry"])
                            if "/assessment" in json.dumps(e["resource"])
                        )
                    ]["fullUrl"]
                }
            ]
        ),
    )
    return out


HUGE = "__1e400__"


def _dumps(value: Any) -> str:
    return json.dumps(value).replace(f'"{HUGE}"', "1e400")


SHAPES = _shapes()
NOT_FHIR = 3  # the first three are not FHIR at all ("invalid"); the rest are ("unmappable")


def test_a_directory_with_a_readme_converts_what_is_fhir(tmp_path: Path) -> None:
    (tmp_path / "README.txt").write_text("exported by the regional record\n")
    (tmp_path / "bundle.json").write_text(to_fhir_json(_record(LUMBAR)))
    out = tmp_path / "out.ndjson"
    result = CliRunner().invoke(cli, ["convert", "--from", "fhir", str(tmp_path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "README.txt: not a .json, .ndjson or .jsonl file" in result.stderr
    assert [Encounter.model_validate_json(line) for line in out.read_text().splitlines()] == [
        _record(LUMBAR)
    ]
    # Records the other way: the same rule, said the same way.
    (tmp_path / "bundle.json").write_text(LUMBAR.read_text())
    result = CliRunner().invoke(cli, ["validate", str(tmp_path)])
    assert result.exit_code == 0 and "README.txt: not a .json" in result.stderr


@pytest.mark.parametrize(("name", "value"), SHAPES, ids=[n for n, _ in SHAPES])
def test_a_malformed_bundle_is_reported_and_the_next_is_converted(
    tmp_path: Path, name: str, value: Any
) -> None:
    source = tmp_path / "in.ndjson"
    good = _bundle(CERVICAL)
    source.write_text(_dumps(value) + "\n" + json.dumps(good) + "\n")
    out = tmp_path / "out.ndjson"
    result = CliRunner().invoke(cli, ["convert", "--from", "fhir", str(source), "-o", str(out)])
    assert isinstance(result.exception, SystemExit), result.output
    lines = out.read_text().splitlines()
    assert [Encounter.model_validate_json(line) for line in lines] == [_record(CERVICAL)]
    assert result.exit_code == 1, result.output
    assert "1 converted, " in result.stderr


def test_every_shape_in_one_file(tmp_path: Path) -> None:
    source = tmp_path / "in.ndjson"
    good = _bundle(CERVICAL)
    source.write_text(
        "".join(_dumps(copy.deepcopy(v)) + "\n" for _, v in SHAPES) + json.dumps(good) + "\n"
    )
    out = tmp_path / "out.ndjson"
    result = CliRunner().invoke(cli, ["convert", "--from", "fhir", str(source), "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert len(out.read_text().splitlines()) == 1
    # Every broken IMS encounter is named (resource, element path, reason), once.
    assert result.stderr.count("unmappable") == len(SHAPES) - NOT_FHIR, result.stderr
    assert f"1 converted, {len(SHAPES)} failed" in result.stderr


def test_unreadable_files_pages_and_byte_order_marks(tmp_path: Path) -> None:
    """One unreadable file is reported and the others converted; a search saved as pages in
    several files maps as one; a byte order mark is ignored; key order does not fool the
    detection of FHIR input."""
    record = _record(LUMBAR)
    bundle = _bundle(LUMBAR)
    entries = [{"resource": e["resource"], "fullUrl": e["fullUrl"]} for e in bundle["entry"]]
    half = len(entries) // 2
    for n, page in enumerate((entries[:half], entries[half:])):
        searchset = {"resourceType": "Bundle", "type": "searchset", "entry": page}
        (tmp_path / f"page{n}.json").write_text(json.dumps(searchset, sort_keys=True))
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + to_fhir_json(_record(CERVICAL)).encode())
    (tmp_path / "z-unreadable.json").symlink_to("/proc/self/mem")  # read() fails: EIO
    out = tmp_path / "out.ndjson"
    result = CliRunner().invoke(cli, ["convert", str(tmp_path), "-o", str(out)])  # auto-detect
    assert result.exit_code == 1, result.output
    assert "z-unreadable.json" in result.stderr and "cannot read" in result.stderr
    pulled = sorted(
        (Encounter.model_validate_json(line) for line in out.read_text().splitlines()),
        key=lambda r: r.id,
    )
    assert pulled == sorted([record, _record(CERVICAL)], key=lambda r: r.id)
