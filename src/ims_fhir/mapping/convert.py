"""File conversion behind ``ims-fhir convert``: IMS records <-> FHIR, streamed where it can be."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from .._exceptions import FieldIssue, RecordError
from ..record.reader import json_values, walk
from .from_fhir import MappingReport, from_fhir
from .questionnaire_response import questionnaire_report

__all__ = ["detect_input", "read_fhir"]

InputKind = Literal["ims", "fhir"]


def detect_input(paths: Iterable[Path]) -> InputKind:
    """Tell whether the inputs hold IMS records or FHIR resources (from the first JSON value)."""
    for file in walk(paths):
        if isinstance(file, RecordError):
            continue
        for _, value in json_values(file):
            if isinstance(value, RecordError):
                break
            return "fhir" if isinstance(value, dict) and "resourceType" in value else "ims"
    return "ims"


def read_fhir(
    paths: Iterable[Path], on_skip: Callable[[Path, str], None] | None = None
) -> Iterator[MappingReport | RecordError]:
    """Map FHIR input back to records; files are found as :func:`~ims_fhir.read_records` does.

    Each Bundle, and each QuestionnaireResponse to the IMS visit form, is mapped on its own as
    it is read (so NDJSON of Bundles streams); loose
    resources and searchset pages are gathered and mapped together at the end, since they
    refer to each other.
    What is not FHIR JSON is a RecordError naming the file and line or index.
    """
    loose: list[Any] = []
    for file in walk(paths, on_skip):
        if isinstance(file, RecordError):
            yield file
            continue
        for location, value in json_values(file):
            if isinstance(value, RecordError):
                yield value
            elif isinstance(value, dict) and value.get("resourceType") == "Bundle":
                if value.get("type") == "searchset":
                    # Pages of one search, saved as files: an encounter's resources may be
                    # on several pages, so they are mapped together, like loose resources.
                    loose.append(value)
                else:
                    yield from_fhir(value)
            elif isinstance(value, dict) and value.get("resourceType") == "QuestionnaireResponse":
                yield questionnaire_report(value)  # the IMS visit form, filled in
            elif isinstance(value, dict) and isinstance(value.get("resourceType"), str):
                loose.append(value)
            else:
                yield RecordError(location, [FieldIssue("<json>", "not a FHIR resource")])
    if loose:
        yield from_fhir(loose)
