"""QuestionnaireResponse <-> record, for the IMS visit Questionnaire.

A QuestionnaireResponse is input: every item is checked against the form (known linkId at that
place, the answer type the item has, one answer where one is allowed, a code of the item's
ValueSet, required items present when enabled, nothing answered that is not enabled) before
the record is built, and the record's own clinical validation runs last. Every problem is a
:class:`~ims_fhir.MappingError` whose ``path`` is the item's linkId.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Any

from pydantic import ValidationError

from .._exceptions import MappingError, clip
from ..record.model import Encounter
from .from_fhir import MappingReport
from .questionnaire_form import (
    FORM_VERSION,
    QUESTIONNAIRE_URL,
    Item,
    form,
    items_by_link_id,
    local_coding,
)

__all__ = [
    "NOT_CAPTURED",
    "from_questionnaire_response",
    "questionnaire_report",
    "to_questionnaire_response",
]

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# An R4 dateTime to the second at least, with a UTC offset: what the record's Instant holds.
_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
_STATUSES = ("completed", "amended")
# Record fields the form does not capture (the EMR keeps them; a record built from a
# QuestionnaireResponse has them at their defaults).
NOT_CAPTURED = (
    "clinic.identifiers",
    "clinic.namespace",
    "patient.identifiers",
    "practitioner.licence",
    "retracted",
    "recorded",
)


class _Error(Exception):
    def __init__(self, link_id: str, reason: str) -> None:
        self.link_id = link_id
        self.reason = reason


def _name(qr: Any) -> str:
    rid = qr.get("id") if isinstance(qr, dict) else None
    return f"QuestionnaireResponse/{rid}" if isinstance(rid, str) else "QuestionnaireResponse"


def from_questionnaire_response(qr: Any) -> Encounter:
    """Build the IMS record that a QuestionnaireResponse to the IMS visit form holds.

    Args:
        qr: the QuestionnaireResponse as FHIR JSON (a dict).

    Returns:
        The record.

    Raises:
        MappingError: the response is not one this version of the form can hold, or what it
            says is not a valid record; ``path`` names the item's linkId (or ``questionnaire``,
            ``status``, ``resourceType`` for the response's own elements).
    """
    name = _name(qr)
    if not isinstance(qr, dict) or qr.get("resourceType") != "QuestionnaireResponse":
        raise MappingError(name, "resourceType", "not a QuestionnaireResponse")
    _check_questionnaire(name, qr.get("questionnaire"))
    status = qr.get("status")
    if status not in _STATUSES:
        raise MappingError(
            name,
            "status",
            f"status {status!r}: only a completed (or amended) response is a record",
        )
    data: dict[str, Any] = {}
    try:
        _read_items(qr.get("item"), form(), data, "", {})
    except _Error as exc:
        raise MappingError(name, exc.link_id, exc.reason) from None
    try:
        return Encounter.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        link_id, where = _link_id_of(error["loc"], error["msg"])
        raise MappingError(name, link_id, where + error["msg"]) from None


def _check_questionnaire(name: str, canonical: Any) -> None:
    if not isinstance(canonical, str):
        raise MappingError(
            name, "questionnaire", f"names no Questionnaire; expected {QUESTIONNAIRE_URL}"
        )
    url, bar, version = canonical.partition("|")
    if url != QUESTIONNAIRE_URL:
        raise MappingError(
            name,
            "questionnaire",
            f"answers {url!r}, not the IMS visit form ({QUESTIONNAIRE_URL})",
        )
    if bar and version != FORM_VERSION:
        raise MappingError(
            name,
            "questionnaire",
            f"answers version {version!r} of the IMS visit form; this ims-fhir reads version "
            f"{FORM_VERSION} only (convert it with the ims-fhir release that made that form)",
        )


# The record's checks across fields, and the item a clinician corrects for each.
_ACROSS_FIELDS = (
    ("ends before", "end"),
    ("made before the encounter starts", "end"),
    ("born after the encounter", "patient.birth_date"),
    ("treatment-only visit has no assessment", "visit_type"),
    ("after-treatment pain score needs a treatment", "pain.timing"),
    ("needs an assessment, a treatment or both", "assessment-done"),
    ("although consent was refused", "treatment.consent.given"),
    # Inside one finding, site or adverse event.
    ("a finding needs a muscle or a region", "assessment.findings.muscle"),
    ("'test' applies to trophedema only", "assessment.findings.test"),
    ("restricted range of motion needs", "assessment.findings.joint"),
    ("apply to restricted-rom only", "assessment.findings.joint"),
    ("absent sign cannot have a grade", "assessment.findings.grade"),
    ("deeper than the needle is long", "treatment.sites.max_depth_mm"),
    ("'other-event' needs a note", "treatment.adverse_events.note"),
    ("findings: id", "assessment.findings.id"),
    ("sites: id", "treatment.sites.id"),
    ("pain: id", "pain.id"),
)


def _link_id_of(loc: tuple[int | str, ...], message: str) -> tuple[str, str]:
    """The linkId of a record validation error's location, and where in it the problem is.

    The place reads "in repetition 2 of treatment.sites: " or "in answer 2: ".
    """
    known = items_by_link_id()
    # Field names inside pydantic's tagged parts ("function-after[...]") are not ours.
    names: list[str] = []
    places: list[str] = []
    for part in loc:
        if isinstance(part, str):
            if part.isidentifier():
                names.append(part)
            continue
        item = known.get(".".join(names))
        if item is not None and item.type == "group":
            places.append(f"in repetition {part + 1} of {item.link_id}")
        elif item is not None:
            places.append(f"in answer {part + 1}")
    where = "".join(f"{p}: " for p in places)
    for words, link_id in _ACROSS_FIELDS:
        if words in message:
            return link_id, where
    while names:
        candidate = ".".join(names)
        if candidate in known:
            return candidate, where
        names.pop()
    return "encounter", where


def _answers(item: dict[str, Any], spec: Item) -> list[Any]:
    if "item" in item:
        raise _Error(spec.link_id, "a question's answers hold no nested items here")
    answers = item.get("answer")
    if not isinstance(answers, list) or not answers:
        raise _Error(spec.link_id, "an item without answers (leave the item out instead)")
    if len(answers) > 1 and not spec.repeats:
        raise _Error(spec.link_id, f"{len(answers)} answers where the form allows one")
    values = []
    for answer in answers:
        if not isinstance(answer, dict):
            raise _Error(spec.link_id, "an answer is not a JSON object")
        if "item" in answer:
            raise _Error(spec.link_id, "an answer holds nested items; this form has none")
        keys = [k for k in answer if k.startswith("value")]
        extra = [k for k in answer if not k.startswith("value") and k not in {"id", "extension"}]
        if extra:
            raise _Error(spec.link_id, f"an answer has unknown elements: {', '.join(extra)}")
        if keys != [spec.answer_key]:
            got = ", ".join(keys) or "no value"
            raise _Error(
                spec.link_id, f"answered with {got}; a {spec.type} item takes {spec.answer_key}"
            )
        values.append(_value(spec, answer[spec.answer_key]))
    # A code chosen twice is a slip (the record would refuse it less clearly); a name may
    # repeat (given names "Mary Mary").
    if spec.type == "choice" and len(set(values)) != len(values):
        raise _Error(spec.link_id, "the same answer is given twice")
    return values


def _value(spec: Item, value: Any) -> Any:
    link_id, kind = spec.link_id, spec.type
    if kind in {"string", "text"}:
        if not isinstance(value, str) or not value.strip():
            raise _Error(link_id, "a string answer must be non-empty text")
        return value  # a line break too: the record's short texts may hold one
    if kind == "integer":
        if type(value) is not int:
            raise _Error(link_id, f"{value!r} is not an integer")
        return value
    if kind == "decimal":
        if type(value) is int and abs(value) > sys.float_info.max:
            raise _Error(link_id, "a number beyond any decimal this form takes")
        if type(value) not in (int, float) or not math.isfinite(value):
            raise _Error(link_id, f"{value!r:.40} is not a decimal number")
        return float(value)
    if kind == "boolean":
        if type(value) is not bool:
            raise _Error(link_id, f"{value!r} is not true or false")
        return value
    if kind == "date":
        if not isinstance(value, str) or not _DATE.match(value):
            raise _Error(link_id, f"{value!r} is not a full date (YYYY-MM-DD)")
        return value
    if kind == "dateTime":
        if not isinstance(value, str) or not _DATE_TIME.match(value):
            raise _Error(
                link_id,
                f"{value!r} is not a date and time to the second with a UTC offset "
                "(e.g. 2026-03-02T09:30:00-05:00)",
            )
        return value
    return _code(spec, value)


def _code(spec: Item, coding: Any) -> str:
    link_id = spec.link_id
    if not isinstance(coding, dict):
        raise _Error(link_id, "a coding answer is not a JSON object")
    system, code = coding.get("system"), coding.get("code")
    if not isinstance(system, str) or not isinstance(code, str):
        raise _Error(link_id, "a coding answer needs a system and a code")
    for option_system, option_code, option_display in spec.options:
        if (system, code) == (option_system, option_code):
            _check_display(link_id, coding, option_display)
            return code
    allowed = ", ".join(c for _, c, _ in spec.options)
    raise _Error(link_id, f"{system}|{code} is not an answer option of the item ({allowed})")


def _check_display(link_id: str, coding: dict[str, Any], display: str) -> None:
    """A display that names another concept ({left, "Right"}) leaves the answer in doubt."""
    given = coding.get("display")
    if given is None:
        return
    if not isinstance(given, str) or _words(given) != _words(display):
        raise _Error(
            link_id,
            f"the answer's code {coding['code']!r} is {display!r}, but its display says "
            f"{given!r:.80}: which was meant? (leave the display out, or give the code's)",
        )


def _words(text: str) -> str:
    return " ".join(text.split()).casefold()


def _put(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


def _enabled(spec: Item, answered: dict[str, Any]) -> bool:
    if spec.enable_when is None:
        return True
    question, wanted = spec.enable_when
    return answered.get(question) == wanted


def _read_items(
    items: Any,
    specs: tuple[Item, ...],
    data: dict[str, Any],
    parent: str,
    answered: dict[str, Any],
) -> None:
    """Read the items of one group (or the response) into ``data``, checking each."""
    where = parent or "the response"
    if items is None:
        items = []
    if not isinstance(items, list):
        raise _Error(parent or "item", "'item' is not a list")
    by_id = {s.link_id: s for s in specs}
    found: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        if not isinstance(item, dict):
            raise _Error(parent or "item", f"an item of {where} is not a JSON object")
        link_id = item.get("linkId")
        if not isinstance(link_id, str) or not link_id:  # "" names nothing: no path either
            raise _Error(parent or "item", f"an item of {where} has no linkId")
        if link_id not in by_id:
            known = items_by_link_id()
            reason = (
                f"not an item of {where} (it belongs elsewhere in the form)"
                if link_id in known
                else f"unknown linkId in {where}"
            )
            # The input's own text as the path: a line of an error, never the whole of it.
            raise _Error(clip(link_id, 80), reason)
        found.setdefault(link_id, []).append(item)
    # Questions first, then groups: a group's enableWhen reads its siblings' answers.
    ordered = sorted(specs, key=lambda s: s.type == "group")
    for spec in ordered:
        given = found.get(spec.link_id, [])
        if len(given) > 1 and not (spec.type == "group" and spec.repeats):
            raise _Error(spec.link_id, f"the item appears {len(given)} times; the form has it once")
        enabled = _enabled(spec, answered)
        if given and not enabled:
            question, wanted = spec.enable_when or ("", "")
            raise _Error(
                spec.link_id,
                f"answered although the form enables it only when {question} is {wanted}",
            )
        if not given:
            if spec.required and enabled:
                raise _Error(spec.link_id, "a required item is missing")
            if spec.key is None and spec.type == "boolean":
                answered[spec.link_id] = False
            continue
        if spec.type == "group":
            entries = []
            for number, item in enumerate(given, 1):
                if "answer" in item:
                    raise _Error(spec.link_id, "a group has no answers")
                entry: dict[str, Any] = {}
                # An inline group's answers are its parent's (the switches in "encounter");
                # each repetition of a group has its own.
                scope = answered if spec.key is None else dict(answered)
                try:
                    _read_items(item.get("item"), spec.children, entry, spec.link_id, scope)
                except _Error as exc:
                    if spec.repeats:  # which of the repetitions, as the record's checks say
                        exc.reason = f"in repetition {number} of {spec.link_id}: {exc.reason}"
                    raise
                entries.append(entry)
            if spec.id_prefix is not None:
                _fill_ids(entries, spec.id_prefix)
            value: Any = entries if spec.repeats else entries[0]
            if spec.key is None:
                data.update(entries[0])
            else:
                _put(data, spec.key, value)
            continue
        (item,) = given
        values = _answers(item, spec)
        value = values if spec.repeats else values[0]
        answered[spec.link_id] = value
        if spec.key is not None:
            _put(data, spec.key, value)
    for switch, group in (("assessment-done", "assessment"), ("treatment-done", "treatment")):
        if answered.get(switch) is True and group in by_id and group not in data:
            data[group] = {}


_NUMBERED = re.compile("[0-9]{1,64}")  # the digits of an id (at most 64 characters)


def _fill_ids(entries: list[dict[str, Any]], prefix: str) -> None:
    """Give each repetition the form left without an id (a new one) the next free id.

    The next after the highest ``{prefix}{n}`` the group holds: a form pre-filled from a record
    keeps its ids in hidden items, and a repetition the clinician adds must not take one that a
    kept repetition holds, nor (as far as the response shows) one a removed repetition held.
    A fresh form's repetitions are numbered in order: f1, f2, ...
    """
    # As the record reads them: stripped of surrounding white space (" p1" is p1).
    taken = [e["id"].strip() for e in entries if isinstance(e.get("id"), str)]
    numbers = [
        int(i[len(prefix) :])
        for i in taken
        if i.startswith(prefix) and _NUMBERED.fullmatch(i[len(prefix) :])
    ]
    after = max(numbers, default=0)
    for entry in entries:
        if "id" not in entry:
            after += 1
            entry["id"] = f"{prefix}{after}"


def to_questionnaire_response(record: Encounter) -> dict[str, Any]:
    """The QuestionnaireResponse to the IMS visit form that holds ``record`` (pre-population).

    What the form does not capture (identifiers, the clinic's namespace, the practitioner's
    licence, ``retracted``, ``recorded``) is left out; everything else converts back to the
    same record with :func:`from_questionnaire_response`.
    """
    data = record.model_dump(mode="json", exclude_none=True)
    data["assessment-done"] = record.assessment is not None
    data["treatment-done"] = record.treatment is not None
    return {
        "resourceType": "QuestionnaireResponse",
        "questionnaire": f"{QUESTIONNAIRE_URL}|{FORM_VERSION}",
        "status": "completed",
        "item": _write_items(form(), data, data),
    }


def _get(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _write_items(
    specs: tuple[Item, ...], data: dict[str, Any], root: dict[str, Any]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for spec in specs:
        if spec.key is None and spec.type == "boolean":
            if root.get(spec.link_id):
                out.append({"linkId": spec.link_id, "answer": [{"valueBoolean": True}]})
            continue
        value: Any = data if spec.key is None else _get(data, spec.key)
        if value is None or value == [] or (spec.type != "group" and value == {}):
            continue
        if spec.type == "group":
            for entry in value if spec.repeats else [value]:
                children = _write_items(spec.children, entry, root)
                if children:  # an empty assessment or treatment: its switch says it
                    out.append({"linkId": spec.link_id, "text": spec.text, "item": children})
            continue
        answers = value if spec.repeats else [value]
        out.append(
            {
                "linkId": spec.link_id,
                "text": spec.text,
                "answer": [{spec.answer_key: _answer(spec, v)} for v in answers],
            }
        )
    return out


def _answer(spec: Item, value: Any) -> Any:
    if spec.type == "choice":
        for system, code, display in spec.options:
            if code == value:
                return {"system": system, "code": code, "display": display}
        return local_coding(value)
    return value


def questionnaire_report(qr: Any, where: str | None = None) -> MappingReport:
    """:func:`from_questionnaire_response` as ``ims-fhir convert`` reports it: never raises.

    ``where`` (a file and line) prefixes the name of a response in errors: one exported by a
    form renderer often has no id to find it by.
    """
    try:
        return MappingReport(records=[from_questionnaire_response(qr)])
    except MappingError as exc:
        if where is not None:
            exc = MappingError(f"{where}: {exc.resource}", exc.path, exc.reason)
        return MappingReport(errors=[exc])
