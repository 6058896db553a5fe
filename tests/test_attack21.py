"""Attacks on issue 21 (the IMS visit Questionnaire, QuestionnaireResponse <-> record).

Each test states what should hold; each failed on the change as merged and passes since the
finding was fixed.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ims_fhir import Encounter, MappingError, from_questionnaire_response, to_questionnaire_response
from ims_fhir.cli.commands import cli
from ims_fhir.mapping.questionnaire import questionnaire
from ims_fhir.mapping.questionnaire_form import items_by_link_id

from .conftest import ROOT
from .questionnaire_support import JSON, LOCAL, find, fixture, items, parent_of

SNOMED = "http://snomed.info/sct"


# --- HIGH: an internal error instead of a MappingError ------------------------------------------


def test_a_huge_integer_as_a_decimal_answer_is_a_mapping_error() -> None:
    """JSON has no size limit on numbers; Python's json reads 4000...0 as an int, which
    ``math.isfinite`` cannot convert: OverflowError escapes from_questionnaire_response."""
    qr = to_questionnaire_response(fixture("01-"))
    find(qr, "treatment.sites.needle_length_mm")["answer"] = [{"valueDecimal": 4 * 10**400}]
    with pytest.raises(MappingError) as caught:
        from_questionnaire_response(qr)
    assert caught.value.path == "treatment.sites.needle_length_mm", str(caught.value)


def test_convert_reports_a_huge_decimal_answer_without_a_traceback(tmp_path: Path) -> None:
    text = json.dumps(to_questionnaire_response(fixture("01-")))
    huge = text.replace('"valueDecimal": 40.0', '"valueDecimal": 4' + "0" * 400, 1)
    assert huge != text
    source = tmp_path / "response.json"
    source.write_text(huge)
    result = CliRunner().invoke(cli, ["convert", str(source)])
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1, result.output
    # The first decimal answer of 40.0 is the range of motion's degrees (the fifth finding).
    assert (
        "assessment.findings.degrees: in repetition 5 of assessment.findings: a number beyond"
        in (result.stderr)
    )


# --- MEDIUM ----------------------------------------------------------------------------------


def _remove_first_and_add_one(qr: JSON, group: str) -> None:
    """What a clinician does in a pre-filled form: delete the first repetition of a repeating
    group, then "add another" (a new repetition, its hidden id empty)."""
    parent = parent_of(qr, group)
    repetitions = [i for i in parent["item"] if i["linkId"] == group]
    assert len(repetitions) >= 2
    new = copy.deepcopy(repetitions[0])
    new["item"] = [i for i in new["item"] if i["linkId"] != f"{group}.id"]
    parent["item"].remove(repetitions[0])
    parent["item"].append(new)


@pytest.mark.parametrize("group", ["pain", "assessment.findings", "treatment.sites"])
def test_a_prefilled_form_with_a_repetition_removed_and_one_added_is_a_record(group: str) -> None:
    """Pre-population writes the record's ids (p1, p2) into hidden items; a new repetition
    gets its id by position (p2), which the kept one already has: the form is refused with
    "id 'p2' is used twice", named by "encounter"/"assessment"/"treatment", about an item
    the clinician can neither see nor change."""
    qr = to_questionnaire_response(fixture("01-"))
    _remove_first_and_add_one(qr, group)
    record = from_questionnaire_response(qr)
    ids = {
        "pain": [p.id for p in record.pain],
        "assessment.findings": [f.id for f in record.assessment.findings],  # type: ignore[union-attr]
        "treatment.sites": [s.id for s in record.treatment.sites],  # type: ignore[union-attr]
    }[group]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("clinic.name", lambda d, v: d["clinic"].__setitem__("name", v)),
        ("patient.name.given", lambda d, v: d["patient"]["name"].__setitem__("given", [v])),
        ("pain.location", lambda d, v: d["pain"][0].__setitem__("location", v)),
        (
            "assessment.findings.region",
            lambda d, v: d["assessment"]["findings"][0].__setitem__("region", v),
        ),
        ("treatment.consent.by", lambda d, v: d["treatment"]["consent"].__setitem__("by", v)),
    ],
)
def test_a_record_with_a_line_break_in_a_short_text_round_trips(field: str, change: Any) -> None:
    """The record model takes a line break in a ShortText; to_questionnaire_response writes it
    into a ``string`` item, and from_questionnaire_response refuses its own output ("a line
    break in a one-line answer"). The round-trip hypothesis test never saw it: strategies.text
    leaves out every control character."""
    data = fixture("01-").model_dump(mode="json")
    change(data, "Line one\nline two")
    record = Encounter.model_validate(data)  # a valid record
    assert from_questionnaire_response(to_questionnaire_response(record)) == record, field


def test_convert_reads_responses_in_a_searchset_bundle(tmp_path: Path) -> None:
    """What an EMR gets from ``GET [base]/QuestionnaireResponse?questionnaire=...``: a
    searchset Bundle of responses. convert skips each as "not made by ims-fhir (no ims-fhir
    identifier)" and exits 0 with "0 converted, 0 failed": the visits are silently lost."""
    response = to_questionnaire_response(fixture("05-"))
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {
                "fullUrl": "https://emr.example.org/fhir/QuestionnaireResponse/1",
                "resource": response,
                "search": {"mode": "match"},
            }
        ],
    }
    source = tmp_path / "search.json"
    source.write_text(json.dumps(bundle))
    result = CliRunner().invoke(cli, ["convert", str(source)])
    assert "0 converted, 0 failed" not in result.stderr, result.stderr
    (line,) = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert Encounter.model_validate_json(line) == fixture("05-")


def test_convert_says_where_a_failing_response_without_an_id_is(tmp_path: Path) -> None:
    """Renderers export responses without an id. The error names neither the file nor the
    line ("unmappable QuestionnaireResponse: pain.nrs: ..."): in a day's NDJSON the clinic
    cannot find which visit to correct (JSON errors do name file:line)."""
    good = to_questionnaire_response(fixture("01-"))
    bad = copy.deepcopy(good)
    find(bad, "pain.nrs")["answer"] = [{"valueInteger": 12}]
    source = tmp_path / "responses.ndjson"
    source.write_text("\n".join(json.dumps(q) for q in (good, good, bad, good)) + "\n")
    result = CliRunner().invoke(cli, ["convert", str(source)])
    assert result.exit_code == 1
    assert "pain.nrs" in result.stderr
    assert "responses.ndjson:3" in result.stderr, result.stderr


def test_a_wider_snomed_option_is_not_read_as_the_narrower_gunn_sign() -> None:
    """ValueSet ims-signs (the sign item's answerValueSet) offers SNOMED 247348008 "Tenderness"
    next to the local "Tenderness over motor points"; the ConceptMap says the SNOMED concept is
    *wider*. A clinician who picks "Tenderness" gets the specific Gunn sign
    tenderness-motor-point in the record, silently. Expected: such an option is not offered,
    or choosing it is refused naming the item."""
    value_set = json.loads((ROOT / "mappings" / "ValueSet-ims-signs.json").read_text())
    offered = {
        (include["system"], concept["code"])
        for include in value_set["compose"]["include"]
        for concept in include["concept"]
    }
    qr = to_questionnaire_response(fixture("01-"))
    find(qr, "assessment.findings.sign")["answer"] = [
        {"valueCoding": {"system": SNOMED, "code": "247348008", "display": "Tenderness"}}
    ]
    if (SNOMED, "247348008") not in offered:
        return
    with pytest.raises(MappingError) as caught:
        record = from_questionnaire_response(qr)
        pytest.fail(f"read as {record.assessment.findings[0].sign}")  # type: ignore[union-attr]
    assert caught.value.path == "assessment.findings.sign"


# --- LOW -------------------------------------------------------------------------------------


def _present_false(qr: JSON) -> None:
    find(qr, "assessment.findings.present")["answer"] = [{"valueBoolean": False}]


def _depth_149(qr: JSON) -> None:
    find(qr, "treatment.sites.max_depth_mm")["answer"] = [{"valueDecimal": 149.0}]


def _no_muscle_no_region(qr: JSON) -> None:
    parent = parent_of(qr, "assessment.findings.muscle")
    drop = {"assessment.findings.muscle", "assessment.findings.region"}
    parent["item"] = [i for i in parent["item"] if i["linkId"] not in drop]


@pytest.mark.parametrize(
    ("name", "change", "expected"),
    [
        ("absent-sign-with-grade", _present_false, {"assessment.findings.grade"}),
        ("deeper-than-the-needle", _depth_149, {"treatment.sites.max_depth_mm"}),
        (
            "finding-without-muscle-or-region",
            _no_muscle_no_region,
            {"assessment.findings.muscle", "assessment.findings.region"},
        ),
    ],
)
def test_a_record_check_names_the_question_to_correct(
    name: str, change: Any, expected: set[str]
) -> None:
    """The record's checks inside a finding or site are reported on the repeating group
    ("assessment.findings", "treatment.sites"): a form engine cannot point at the question."""
    qr = to_questionnaire_response(fixture("01-"))
    change(qr)
    with pytest.raises(MappingError) as caught:
        from_questionnaire_response(qr)
    assert caught.value.path in expected, f"{name}: {caught.value}"


def test_other_event_without_a_note_names_the_note() -> None:
    qr = to_questionnaire_response(fixture("19-"))
    for event in (i for i in items(qr) if i["linkId"] == "treatment.adverse_events"):
        event["item"] = [i for i in event["item"] if i["linkId"] != "treatment.adverse_events.note"]
    with pytest.raises(MappingError) as caught:
        from_questionnaire_response(qr)
    assert caught.value.path == "treatment.adverse_events.note", str(caught.value)


def test_a_second_answer_is_not_called_a_repetition_of_its_group() -> None:
    """patient.name.given is in no repeating group; its second answer too long is reported
    "in repetition 2 of its group"."""
    qr = to_questionnaire_response(fixture("01-"))
    find(qr, "patient.name.given")["answer"] = [{"valueString": "A"}, {"valueString": "B" * 201}]
    with pytest.raises(MappingError) as caught:
        from_questionnaire_response(qr)
    assert caught.value.path == "patient.name.given"
    assert "repetition 2 of its group" not in caught.value.reason, str(caught.value)


def test_a_coding_whose_display_names_another_concept_is_not_taken_silently() -> None:
    """{code: left, display: Right}: which did the clinician mean? Read as left, silently."""
    qr = to_questionnaire_response(fixture("01-"))
    find(qr, "treatment.sites.side")["answer"] = [
        {"valueCoding": {"system": LOCAL, "code": "left", "display": "Right"}}
    ]
    with pytest.raises(MappingError) as caught:
        from_questionnaire_response(qr)
    assert caught.value.path == "treatment.sites.side"


def test_each_answer_list_offers_a_concept_once() -> None:
    """The answerValueSets held the local codes and their SNOMED CT equivalents, so an
    expansion (what the form engine shows) listed Left, Right, Right and left, Midline twice,
    Mild/Moderate/Severe twice, seven diagnoses twice. Each choice now lists its options: each
    concept once, a local code, no ValueSet a renderer must expand."""
    twice: dict[str, list[str]] = {}
    choices = [i for i in items(questionnaire()) if i["type"] == "choice"]
    assert choices
    for item in choices:
        assert "answerValueSet" not in item, item["linkId"]
        codings = [option["valueCoding"] for option in item["answerOption"]]
        displays = Counter(c["display"].casefold() for c in codings)
        codes = Counter((c["system"], c["code"]) for c in codings)
        repeated = sorted(d for d, n in displays.items() if n > 1)
        repeated += sorted(c for (_, c), n in codes.items() if n > 1)
        if repeated:
            twice[item["linkId"]] = repeated
        if item["linkId"] != "patient.sex":
            assert {c["system"] for c in codings} == {LOCAL}, item["linkId"]
    assert not twice, twice
    assert items_by_link_id()  # the form is built
