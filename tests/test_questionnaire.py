"""The IMS visit Questionnaire (mapping/questionnaire*.py): generated from the spec,
round-tripped, and strict about the QuestionnaireResponses it reads (errors name the linkId)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import ims_fhir
from ims_fhir import Encounter, MappingError, from_questionnaire_response, to_questionnaire_response
from ims_fhir.cli.commands import cli
from ims_fhir.mapping.package import build_package
from ims_fhir.mapping.questionnaire import questionnaire
from ims_fhir.mapping.questionnaire_form import FORM_VERSION, QUESTIONNAIRE_URL, items_by_link_id
from ims_fhir.mapping.questionnaire_response import NOT_CAPTURED
from ims_fhir.mapping.spec import spec

from .conftest import ENCOUNTER_FILES, ROOT
from .questionnaire_support import JSON, LOCAL, captured_only, find, fixture, items, parent_of
from .strategies import encounters

# --- the Questionnaire --------------------------------------------------------------------------


def test_the_committed_questionnaire_is_what_the_generator_makes() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "questionnaire.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    committed = json.loads((ROOT / "mappings" / "Questionnaire-ims-visit.json").read_text())
    assert committed == questionnaire()


def test_the_package_carries_the_questionnaire(tmp_path: Path) -> None:
    with tarfile.open(build_package(tmp_path / "p.tgz")) as tar:
        q = json.load(tar.extractfile("package/Questionnaire-ims-visit.json"))  # type: ignore[arg-type]
        index = json.load(tar.extractfile("package/.index.json"))  # type: ignore[arg-type]
    assert q["url"] == QUESTIONNAIRE_URL and q["version"] == FORM_VERSION
    assert any(f["resourceType"] == "Questionnaire" for f in index["files"])


def test_every_choice_offers_the_local_codes_of_its_value_set() -> None:
    """Each choice lists its options: the local codes of the project's ValueSet for the item's
    vocabulary, in the CodeSystem's order with its displays (the standard codes that ValueSet
    also holds are left out: each concept once, none wider than the record's)."""
    value_sets = {
        vs["id"]: vs
        for vs in (json.loads(p.read_text()) for p in (ROOT / "mappings").glob("ValueSet-*.json"))
    }
    form_items = items_by_link_id()
    checked = 0
    for item in items(questionnaire()):
        if item["type"] != "choice":
            continue
        assert "answerValueSet" not in item, item["linkId"]
        offered = [option["valueCoding"] for option in item["answerOption"]]
        vocabulary = form_items[item["linkId"]].vocabulary
        if vocabulary is None:  # R4's own administrative-gender codes
            assert item["linkId"] == "patient.sex"
            assert {c["system"] for c in offered} == {"http://hl7.org/fhir/administrative-gender"}
            continue
        value_set = value_sets[spec().value_set(vocabulary)]
        local = [
            {"system": include["system"], "code": concept["code"], "display": concept["display"]}
            for include in value_set["compose"]["include"]
            if include["system"] == LOCAL
            for concept in include["concept"]
        ]
        assert offered == local, item["linkId"]
        checked += 1
    assert checked >= 15


def test_limits_required_and_enable_when_follow_the_record_model() -> None:
    by_id = {i["linkId"]: i for i in items(questionnaire())}

    def limits(link_id: str) -> dict[str, Any]:
        return {
            e["url"].rsplit("/", 1)[-1]: e.get("valueInteger", e.get("valueDecimal"))
            for e in by_id[link_id].get("extension", [])
            if e["url"].endswith(("minValue", "maxValue"))
        }

    assert limits("pain.nrs") == {"minValue": 0, "maxValue": 10}
    assert limits("assessment.findings.grade") == {"minValue": 0, "maxValue": 3}
    assert limits("treatment.sites.insertions") == {"minValue": 1, "maxValue": 100}
    for required in ("id", "start", "patient.birth_date", "pain.nrs", "treatment.sites.muscle"):
        assert by_id[required].get("required") is True, required
    for optional in ("assessment.findings.grade", "pain.location", "assessment.findings.id"):
        assert "required" not in by_id[optional], optional
    for link_id, sign in [
        ("assessment.findings.test", "trophedema"),
        ("assessment.findings.joint", "restricted-rom"),
        ("assessment.findings.degrees", "restricted-rom"),
    ]:
        (condition,) = by_id[link_id]["enableWhen"]
        assert condition["question"] == "assessment.findings.sign"
        assert condition["answerCoding"]["code"] == sign
    for repeating in ("assessment.findings", "pain", "treatment.sites", "treatment.adverse_events"):
        assert by_id[repeating]["type"] == "group" and by_id[repeating]["repeats"] is True


def _record_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    out = set()
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = info.annotation
        inner = get_args(annotation)[0] if get_origin(annotation) is list else annotation
        candidates = [inner, *get_args(inner)]
        sub = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if sub is not None and name not in {"identifiers", "licence"}:
            out |= _record_paths(sub, f"{path}.")
        else:
            out.add(path)
    return out


def test_every_record_field_is_captured_or_listed_as_not_captured() -> None:
    leaves = {
        i.link_id for i in items_by_link_id().values() if i.type != "group" and i.key is not None
    }
    fields = _record_paths(Encounter)
    assert leaves | set(NOT_CAPTURED) == fields
    assert not leaves & set(NOT_CAPTURED)


# --- record <-> QuestionnaireResponse ---------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(encounters())
def test_record_to_response_to_record_is_lossless_for_what_the_form_captures(
    record: Encounter,
) -> None:
    qr = to_questionnaire_response(record)
    back = from_questionnaire_response(json.loads(json.dumps(qr)))
    assert back == captured_only(record)


def test_every_fixture_round_trips() -> None:
    for path in ENCOUNTER_FILES:
        record = captured_only(Encounter.model_validate_json(path.read_text(encoding="utf-8")))
        assert from_questionnaire_response(to_questionnaire_response(record)) == record, path


def test_a_form_filled_without_ids_gets_them_by_position() -> None:
    qr = to_questionnaire_response(fixture("01-"))
    for link_id in ("assessment.findings.id", "pain.id", "treatment.sites.id"):
        for group in items(qr):
            if "item" in group:
                group["item"] = [i for i in group["item"] if i["linkId"] != link_id]
        qr["item"] = [i for i in qr["item"] if i["linkId"] != link_id]
    record = from_questionnaire_response(qr)
    assert [f.id for f in record.assessment.findings] == [  # type: ignore[union-attr]
        f"f{n}"
        for n in range(1, len(record.assessment.findings) + 1)  # type: ignore[union-attr]
    ]
    assert [p.id for p in record.pain] == [f"p{n}" for n in range(1, len(record.pain) + 1)]


def test_a_repetition_added_to_a_prefilled_form_takes_the_next_free_id() -> None:
    """Pre-filled p1, p2; the clinician removes p1 and adds a score: the new one is p3, not p1
    (which the removed one held) nor p2 (which the kept one holds)."""
    qr = to_questionnaire_response(fixture("01-"))
    scores = [i for i in qr["item"] if i["linkId"] == "pain"]
    assert [find(s, "pain.id")["answer"][0]["valueString"] for s in scores] == ["p1", "p2"]
    new = copy.deepcopy(scores[0])
    new["item"] = [i for i in new["item"] if i["linkId"] != "pain.id"]
    qr["item"].remove(scores[0])
    qr["item"].append(new)
    assert [p.id for p in from_questionnaire_response(qr).pain] == ["p2", "p3"]


@pytest.mark.parametrize(
    ("display", "read"),
    [(None, True), ("Left", True), ("  left ", True), ("Right", False), ("", False), (7, False)],
)
def test_a_coding_display_must_name_the_code(display: Any, read: bool) -> None:
    qr = to_questionnaire_response(fixture("01-"))
    coding: JSON = {"system": LOCAL, "code": "left"}
    if display is not None:
        coding["display"] = display
    find(qr, "treatment.sites.side")["answer"] = [{"valueCoding": coding}]
    if read:
        assert from_questionnaire_response(qr).treatment.sites[0].side == "left"  # type: ignore[union-attr]
        return
    with pytest.raises(MappingError) as caught:
        from_questionnaire_response(qr)
    assert caught.value.path == "treatment.sites.side"
    assert "its display says" in caught.value.reason


def test_a_second_answer_is_named_as_an_answer() -> None:
    qr = to_questionnaire_response(fixture("01-"))
    find(qr, "patient.name.given")["answer"] = [{"valueString": "A"}, {"valueString": "B" * 201}]
    with pytest.raises(MappingError) as caught:
        from_questionnaire_response(qr)
    assert caught.value.path == "patient.name.given"
    assert caught.value.reason.startswith("in answer 2: "), caught.value.reason


def test_a_standard_coding_is_not_an_answer_option() -> None:
    """The form offers local codes only; a SNOMED CT code (even one the ConceptMap says is
    equivalent) is not one of its answers, and some are wider than the local concept."""
    qr = to_questionnaire_response(fixture("01-"))
    side = find(qr, "treatment.sites.side")
    side["answer"] = [{"valueCoding": {"system": "http://snomed.info/sct", "code": "7771000"}}]
    with pytest.raises(MappingError) as caught:
        from_questionnaire_response(qr)
    assert caught.value.path == "treatment.sites.side"
    assert "not an answer option" in caught.value.reason


def test_a_bare_canonical_is_read_as_this_version() -> None:
    qr = to_questionnaire_response(fixture("01-"))
    qr["questionnaire"] = QUESTIONNAIRE_URL
    assert from_questionnaire_response(qr) == fixture("01-")


# --- hostile responses ------------------------------------------------------------------------


def _set_answer(link_id: str, *answers: JSON) -> Callable[[JSON], None]:
    def change(qr: JSON) -> None:
        find(qr, link_id)["answer"] = list(answers)

    return change


def _drop(link_id: str) -> Callable[[JSON], None]:
    def change(qr: JSON) -> None:
        parent = parent_of(qr, link_id)
        parent["item"] = [i for i in parent["item"] if i["linkId"] != link_id]

    return change


def _add_top(item: JSON) -> Callable[[JSON], None]:
    return lambda qr: qr["item"].append(item)


def _twice(link_id: str) -> Callable[[JSON], None]:
    def change(qr: JSON) -> None:
        parent = parent_of(qr, link_id)
        parent["item"].append(copy.deepcopy(find(qr, link_id)))

    return change


def _code(code: str, system: str = LOCAL) -> JSON:
    return {"valueCoding": {"system": system, "code": code}}


def _sign_to(code: str) -> Callable[[JSON], None]:
    return _set_answer("assessment.findings.sign", _code(code))


def _both(*changes: Callable[[JSON], None]) -> Callable[[JSON], None]:
    def change(qr: JSON) -> None:
        for one in changes:
            one(qr)

    return change


HOSTILE: list[tuple[str, Callable[[JSON], None], str, str]] = [
    (
        "unknown-link-id",
        _add_top({"linkId": "bogus", "answer": [{"valueString": "x"}]}),
        "bogus",
        "unknown linkId",
    ),
    (
        "empty-link-id",
        _add_top({"linkId": "", "answer": [{"valueString": "x"}]}),
        "item",
        "has no linkId",
    ),
    (
        "a-long-unknown-link-id",
        _add_top({"linkId": "x" * 5000, "answer": [{"valueString": "x"}]}),
        "x" * 77 + "...",
        "unknown linkId",
    ),
    (
        "misplaced",
        _add_top({"linkId": "pain.nrs", "answer": [{"valueInteger": 3}]}),
        "pain.nrs",
        "elsewhere",
    ),
    (
        "string-for-integer",
        _set_answer("pain.nrs", {"valueString": "7"}),
        "pain.nrs",
        "valueInteger",
    ),
    (
        "bool-for-integer",
        _set_answer("pain.nrs", {"valueInteger": True}),
        "pain.nrs",
        "not an integer",
    ),
    (
        "nrs-11",
        _set_answer("pain.nrs", {"valueInteger": 11}),
        "pain.nrs",
        "less than or equal to 10",
    ),
    (
        "grade-4",
        _set_answer("assessment.findings.grade", {"valueInteger": 4}),
        "assessment.findings.grade",
        "3",
    ),
    ("unknown-code", _sign_to("made-up"), "assessment.findings.sign", "not an answer option"),
    (
        "code-of-another-value-set",
        _sign_to("gluteus-medius"),
        "assessment.findings.sign",
        "not an answer option",
    ),
    (
        "snomed-code-outside-value-set",
        _set_answer("treatment.sites.side", _code("22298006", "http://snomed.info/sct")),
        "treatment.sites.side",
        "not an answer option",
    ),
    (
        "two-answers-where-one",
        _set_answer("visit_type", _code("initial"), _code("follow-up")),
        "visit_type",
        "2 answers",
    ),
    (
        "same-answer-twice",
        _set_answer("treatment.sites.segments", _code("L5"), _code("L5")),
        "treatment.sites.segments",
        "twice",
    ),
    ("missing-required", _drop("patient.birth_date"), "patient.birth_date", "required"),
    ("missing-required-group", _drop("clinic"), "clinic", "required"),
    ("empty-answers", _set_answer("clinic.name"), "clinic.name", "without answers"),
    (
        "decimal-as-string",
        _set_answer("treatment.sites.needle_length_mm", {"valueDecimal": "40"}),
        "treatment.sites.needle_length_mm",
        "decimal",
    ),
    (
        "date-time-without-offset",
        _set_answer("start", {"valueDateTime": "2026-03-02T09:30:00"}),
        "start",
        "UTC offset",
    ),
    (
        "partial-date",
        _set_answer("patient.birth_date", {"valueDate": "1980-05"}),
        "patient.birth_date",
        "full date",
    ),
    (
        "two-values-in-one-answer",
        _set_answer("clinic.name", {"valueString": "A", "valueInteger": 1}),
        "clinic.name",
        "answered with",
    ),
    (
        "nested-item-in-answer",
        _set_answer("clinic.name", {"valueString": "A", "item": []}),
        "clinic.name",
        "nested",
    ),
    ("group-twice", _twice("clinic"), "clinic", "2 times"),
    ("question-twice", _twice("clinic.name"), "clinic.name", "2 times"),
    (
        "test-for-another-sign",
        _both(
            _sign_to("sudomotor"),
            lambda qr: parent_of(qr, "assessment.findings.sign")["item"].append(
                {"linkId": "assessment.findings.test", "answer": [_code("matchstick")]}
            ),
        ),
        "assessment.findings.test",
        "enables it only when",
    ),
    (
        "restricted-rom-without-joint",
        _sign_to("restricted-rom"),
        "assessment.findings.joint",
        "required",
    ),
    (
        "assessment-while-switched-off",
        _set_answer("assessment-done", {"valueBoolean": False}),
        "assessment",
        "enables it only when",
    ),
    (
        "after-treatment-pain-without-treatment",
        _both(_set_answer("treatment-done", {"valueBoolean": False}), _drop("treatment")),
        "pain.timing",
        "needs a treatment",
    ),
    (
        "needled-although-consent-refused",
        _set_answer("treatment.consent.given", {"valueBoolean": False}),
        "treatment.consent.given",
        "consent was refused",
    ),
    (
        "treatment-only-with-an-assessment",
        _set_answer("visit_type", _code("treatment-only")),
        "visit_type",
        "no assessment",
    ),
    (
        "born-after-the-visit",
        _set_answer("patient.birth_date", {"valueDate": "2030-01-01"}),
        "patient.birth_date",
        "born after",
    ),
    (
        "end-before-start",
        _set_answer("end", {"valueDateTime": "2000-01-01T00:00:00Z"}),
        "end",
        "ends before",
    ),
    (
        "deeper-than-the-needle",
        _set_answer("treatment.sites.max_depth_mm", {"valueDecimal": 149.0}),
        "treatment.sites.max_depth_mm",
        "in repetition 1 of treatment.sites",
    ),
    (
        "item-not-a-list",
        lambda qr: find(qr, "clinic").__setitem__("item", {}),
        "clinic",
        "not a list",
    ),
    ("item-without-link-id", _add_top({"answer": []}), "item", "no linkId"),
    (
        "gender-not-an-option",
        _set_answer("patient.sex", _code("female")),
        "patient.sex",
        "not an answer option",
    ),
]


@pytest.mark.parametrize(
    ("change", "link_id", "message"),
    [pytest.param(c, link, m, id=name) for name, c, link, m in HOSTILE],
)
def test_a_hostile_response_is_refused_naming_the_link_id(
    change: Callable[[JSON], None], link_id: str, message: str
) -> None:
    qr = to_questionnaire_response(fixture("01-"))
    qr["id"] = "qr-1"
    change(qr)
    with pytest.raises(MappingError) as caught:
        from_questionnaire_response(qr)
    assert caught.value.path == link_id, str(caught.value)
    assert link_id in items_by_link_id() or link_id in ("item", "bogus", "x" * 77 + "...")
    assert message in caught.value.reason, str(caught.value)
    assert str(caught.value).startswith("QuestionnaireResponse/qr-1: ")


@pytest.mark.parametrize(
    ("change", "path", "message"),
    [
        pytest.param(
            {"questionnaire": f"{QUESTIONNAIRE_URL}|0.9.0"},
            "questionnaire",
            "version '0.9.0'",
            id="other-version",
        ),
        pytest.param(
            {"questionnaire": "https://example.org/Questionnaire/phq-9"},
            "questionnaire",
            "not the IMS visit form",
            id="other-form",
        ),
        pytest.param(
            {"questionnaire": None}, "questionnaire", "names no Questionnaire", id="no-form"
        ),
        pytest.param({"status": "in-progress"}, "status", "completed", id="in-progress"),
        pytest.param(
            {"resourceType": "Observation"},
            "resourceType",
            "not a QuestionnaireResponse",
            id="not-a-qr",
        ),
    ],
)
def test_a_response_to_another_form_or_not_finished_is_refused(
    change: JSON, path: str, message: str
) -> None:
    qr = to_questionnaire_response(fixture("01-")) | change
    with pytest.raises(MappingError) as caught:
        from_questionnaire_response(qr)
    assert caught.value.path == path and message in caught.value.reason, str(caught.value)


@pytest.mark.parametrize("value", [None, [], "text", 3])
def test_what_is_not_a_response_is_a_mapping_error(value: Any) -> None:
    with pytest.raises(MappingError, match="resourceType"):
        from_questionnaire_response(value)


# --- the command line ------------------------------------------------------------------------


def test_convert_reads_responses_and_reports_a_bad_one_by_link_id(tmp_path: Path) -> None:
    good = to_questionnaire_response(fixture("05-"))
    bad = to_questionnaire_response(fixture("01-"))
    find(bad, "pain.nrs")["answer"] = [{"valueInteger": 12}]
    other = to_questionnaire_response(fixture("01-")) | {
        "questionnaire": f"{QUESTIONNAIRE_URL}|0.1.0"
    }
    source = tmp_path / "responses.ndjson"
    source.write_text("\n".join(json.dumps(q) for q in (good, bad, other)) + "\n")
    result = CliRunner().invoke(cli, ["convert", str(source)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    (line,) = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert Encounter.model_validate_json(line) == fixture("05-")
    assert "pain.nrs" in result.stderr and "questionnaire" in result.stderr
    assert "version '0.1.0'" in result.stderr
    assert "1 converted, 2 failed" in result.stderr


def test_the_functions_are_exported() -> None:
    assert ims_fhir.from_questionnaire_response is from_questionnaire_response
    assert "to_questionnaire_response" in ims_fhir.__all__


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from _paths(sub, (*prefix, key))
    elif isinstance(value, list):
        for index, sub in enumerate(value):
            yield from _paths(sub, (*prefix, index))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_element_replaced_by_any_json_gives_a_record_or_a_mapping_error(
    data: st.DataObject,
) -> None:
    qr = to_questionnaire_response(fixture("06-"))
    path = data.draw(st.sampled_from(list(_paths(qr))[1:]))
    *parents, last = path
    target: Any = qr
    for step in parents:
        target = target[step]
    target[last] = data.draw(JSON_VALUES)
    try:
        from_questionnaire_response(qr)
    except MappingError as exc:
        assert exc.path, exc
