"""The IMS visit Questionnaire on a real FHIR server: it validates, it is installed with the
package, and responses made from the fixtures validate against it."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

from ims_fhir import Encounter, FhirClient, to_questionnaire_response
from ims_fhir.mapping.questionnaire import questionnaire
from ims_fhir.mapping.questionnaire_form import QUESTIONNAIRE_URL

from .conftest import ENCOUNTER_FILES

JSON = dict[str, Any]


@pytest.fixture(scope="module")
def client(fhir_base_url: str) -> Iterator[FhirClient]:
    with FhirClient(fhir_base_url) as c:
        yield c


def errors(outcome: JSON) -> list[JSON]:
    return [i for i in outcome.get("issue", []) if i["severity"] in {"error", "fatal"}]


def test_the_questionnaire_validates_with_zero_errors(client: FhirClient) -> None:
    outcome = client.validate(questionnaire())
    assert errors(outcome) == [], errors(outcome)


def test_a_broken_questionnaire_is_rejected(client: FhirClient) -> None:
    # The check above can fail: an item without a linkId, an unknown item type.
    broken = copy.deepcopy(questionnaire())
    broken["item"][0]["item"][0].pop("linkId")
    broken["item"][1]["type"] = "dropdown"
    assert len(errors(client.validate(broken))) >= 2


@pytest.fixture(scope="module")
def stored(client: FhirClient) -> JSON:
    """The Questionnaire as the server holds it (the validator checks responses against it)."""
    client.update(questionnaire())
    return client.request_json("GET", "Questionnaire", params={"url": QUESTIONNAIRE_URL})


@pytest.mark.parametrize("path", ENCOUNTER_FILES[:6], ids=lambda p: p.stem)
def test_responses_made_from_records_validate_against_it(
    client: FhirClient, stored: JSON, path: Any
) -> None:
    assert stored["total"] == 1
    qr = to_questionnaire_response(Encounter.model_validate_json(path.read_text("utf-8")))
    outcome = client.validate(qr)
    assert errors(outcome) == [], errors(outcome)


def test_a_response_with_an_answer_outside_the_value_set_is_rejected(
    client: FhirClient, stored: JSON
) -> None:
    qr = to_questionnaire_response(
        Encounter.model_validate_json(ENCOUNTER_FILES[0].read_text("utf-8"))
    )
    visit = qr["item"][0]["item"]
    (visit_type,) = [i for i in visit if i["linkId"] == "visit_type"]
    visit_type["answer"] = [{"valueCoding": {"system": "urn:example", "code": "nope"}}]
    assert errors(client.validate(qr)) != []
