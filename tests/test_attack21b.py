"""Attacks on the issue 21 review fixes (commit 5e27425): answer options, the display check,
the next free id for a repetition left without one, record checks named by their item.

Each test states what should hold; each fails on 5e27425.
"""

from __future__ import annotations

import copy

import pytest

from ims_fhir import Encounter, MappingError, from_questionnaire_response, to_questionnaire_response

from .conftest import ENCOUNTER_FILES
from .questionnaire_support import JSON, find, items


def fixture(name: str) -> Encounter:
    path = next(p for p in ENCOUNTER_FILES if name in p.stem)
    return Encounter.model_validate_json(path.read_text(encoding="utf-8"))


def scores(qr: JSON) -> list[JSON]:
    return [i for i in qr["item"] if i["linkId"] == "pain"]


def add_a_score(qr: JSON) -> None:
    """What a clinician does in a pre-filled form: "add another" pain score (a new
    repetition: its hidden id is empty)."""
    new = copy.deepcopy(scores(qr)[-1])
    new["item"] = [i for i in new["item"] if i["linkId"] != "pain.id"]
    qr["item"].append(new)


# --- the next free id -----------------------------------------------------------------------


@pytest.mark.parametrize("pad", ["p{n} ", " p{n}", "p{n}\t", "\u00a0p{n}"])
def test_a_score_added_to_a_form_prefilled_with_padded_ids_takes_a_free_id(pad: str) -> None:
    """README: a repetition the clinician adds "never takes a kept one's id". An EMR that
    pre-fills the hidden ids from its own data (a fixed-width CHAR column pads "p1" to
    "p1   ") sends ids the record reads as p1 and p2 (it strips whitespace), but _fill_ids
    only counts ids that are exactly ``p<digits>``: it finds none and gives the new score p1,
    the kept one's id. The response is refused ("pain: id 'p1' is used twice", at the hidden
    pain.id the clinician can neither see nor change) instead of giving p3."""
    qr = to_questionnaire_response(fixture("01-"))
    for n, score in enumerate(scores(qr), 1):
        find(score, "pain.id")["answer"] = [{"valueString": pad.format(n=n)}]
    add_a_score(qr)
    record = from_questionnaire_response(qr)
    assert [p.id for p in record.pain] == ["p1", "p2", "p3"]


def test_a_score_added_twice_after_the_ninth_digit_takes_a_free_id() -> None:
    """_fill_ids counts only ``p`` followed by one to nine digits. After a kept p999999999
    it gives the new score p1000000000 (ten digits), which it then does not count: the record
    it made, pre-filled again with one more score added, gets p1000000000 a second time and
    is refused ("pain: id 'p1000000000' is used twice"). A repetition added must never take
    a kept one's id, and ims-fhir's own output must be a form one can add to."""
    data = fixture("01-").model_dump(mode="json")
    data["pain"] = data["pain"][:1]
    data["pain"][0]["id"] = "p999999999"
    qr = to_questionnaire_response(Encounter.model_validate(data))
    add_a_score(qr)
    first = from_questionnaire_response(qr)
    assert [p.id for p in first.pain] == ["p999999999", "p1000000000"]
    again = to_questionnaire_response(first)  # the EMR pre-fills the next form from it
    add_a_score(again)
    second = from_questionnaire_response(again)
    ids = [p.id for p in second.pain]
    assert ids[:2] == ["p999999999", "p1000000000"]
    assert len(set(ids)) == 3, ids


# --- which repetition -----------------------------------------------------------------------


def _second_site(qr: JSON) -> JSON:
    return [i for i in items(qr) if i["linkId"] == "treatment.sites"][1]


def _display_of_another_side(qr: JSON) -> None:
    side = next(i for i in _second_site(qr)["item"] if i["linkId"] == "treatment.sites.side")
    coding = side["answer"][0]["valueCoding"]
    coding["display"] = "Midline" if coding["code"] != "midline" else "Left"


def test_a_display_naming_another_side_in_the_second_site_names_the_second_site() -> None:
    """Fixture 01 records four needled sites. A depth deeper than the needle in the second
    one is reported "treatment.sites.max_depth_mm: in repetition 2 of treatment.sites: ...";
    a coding whose display names another side in that same site (the new display check) is
    reported "treatment.sites.side: the answer's code ..." with no repetition: the form
    engine, and the clinician, cannot tell which of the four sites to correct. Every problem
    inside a repeating group should say which repetition it is in."""
    qr = to_questionnaire_response(fixture("01-"))
    _display_of_another_side(qr)
    with pytest.raises(MappingError) as caught:
        from_questionnaire_response(qr)
    assert caught.value.path == "treatment.sites.side"
    assert "in repetition 2 of treatment.sites" in caught.value.reason, str(caught.value)
