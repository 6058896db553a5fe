"""File conversion behind ``ims-fhir convert``: IMS records <-> FHIR, streamed where it can be."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

import orjson

from .._exceptions import FieldIssue, RecordError
from ..record.model import Encounter
from ..record.reader import json_values, walk
from .from_fhir import MappingReport, from_fhir
from .identity import RESOURCE_TYPES, SHARED_TYPES
from .questionnaire_response import questionnaire_report
from .to_fhir import bundle_dict

__all__ = ["NdjsonPerType", "detect_input", "read_fhir"]

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
                value, responses = _without_responses(value)
                for n, response in responses:  # a search of responses, a collection of them
                    yield questionnaire_report(response, f"{location} entry {n}")
                if value is None:
                    continue
                if value.get("type") == "searchset":
                    # Pages of one search, saved as files: an encounter's resources may be
                    # on several pages, so they are mapped together, like loose resources.
                    loose.append(value)
                else:
                    yield from_fhir(value)
            elif isinstance(value, dict) and value.get("resourceType") == "QuestionnaireResponse":
                yield questionnaire_report(value, str(location))  # the IMS visit form, filled in
            elif isinstance(value, dict) and isinstance(value.get("resourceType"), str):
                loose.append(value)
            else:
                yield RecordError(location, [FieldIssue("<json>", "not a FHIR resource")])
    if loose:
        yield from_fhir(loose)


def _without_responses(bundle: dict[str, Any]) -> tuple[dict[str, Any] | None, list[Any]]:
    """A Bundle's QuestionnaireResponses (by entry number) apart from the rest of it.

    The rest is None when the Bundle held responses only; the Bundle itself when it held none.
    """
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return bundle, []
    responses, rest = [], []
    for n, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") == "QuestionnaireResponse":
            responses.append((n, resource))
        else:
            rest.append(entry)
    if not responses:
        return bundle, []
    return ({**bundle, "entry": rest} if rest else None), responses


_URN_REFERENCE = re.compile(rb'"reference":"urn:uuid:([0-9a-f-]{36})"')


class NdjsonPerType:
    """Write records as Bulk Data NDJSON: one file per resource type, ``<Type>.ndjson``.

    What ``$import`` and bulk loaders take, and what a Bulk Data ``$export`` gives, so
    ``bulk_pull``'s rebuild reads it back. Each resource gets an id (the uuid of its
    ``urn:uuid`` full URL in the transaction Bundle, stable for the same record), and each
    ``urn:uuid`` reference becomes ``Type/id``. A patient, practitioner or clinic many records
    share is written once (the first time): the ids seen are kept, a few dozen bytes each;
    everything else streams. Use as a context manager; :meth:`write` one record at a time.
    """

    def __init__(self, directory: str | Path) -> None:
        """Write into ``directory`` (created if missing); its ``<Type>.ndjson`` are replaced.

        Each file is written beside its final name (``.<Type>.ndjson.part``, so an input in
        the same directory is read whole) and takes its name when the writer is closed
        without an error; then the ``<Type>.ndjson`` of every other type a record maps to is
        removed: a file left from an earlier conversion would bring back what the records no
        longer hold (a removed treatment) to whatever loads the directory. After an error
        the directory is left as it was.
        """
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.counts: Counter[str] = Counter()
        self._files: dict[str, IO[bytes]] = {}
        self._seen: set[str] = set()
        self._closed = False

    def __enter__(self) -> NdjsonPerType:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(keep=exc_type is None)

    def _part(self, kind: str) -> Path:
        return self.directory / f".{kind}.ndjson.part"

    def close(self, *, keep: bool = True) -> None:
        """Close the files and give them their names (``keep=False``: discard them)."""
        if self._closed:
            return
        self._closed = True
        for handle in self._files.values():
            handle.close()
        written = set(self._files)
        self._files.clear()
        for kind in written:
            if keep:
                os.replace(self._part(kind), self.directory / f"{kind}.ndjson")
            else:
                self._part(kind).unlink(missing_ok=True)
        if keep:
            for kind in RESOURCE_TYPES - written:
                (self.directory / f"{kind}.ndjson").unlink(missing_ok=True)

    def write(self, record: Encounter, *, checked: bool = False) -> None:
        """Write one record's resources (``checked``: it was just validated, as read)."""
        entries = bundle_dict(record, checked=checked)["entry"]
        local = {}
        for entry in entries:
            uuid = str(entry["fullUrl"]).removeprefix("urn:uuid:")
            local[uuid.encode()] = f"{entry['resource']['resourceType']}/{uuid}".encode()

        def literal(match: re.Match[bytes]) -> bytes:
            target = local.get(match.group(1))
            return b'"reference":"' + target + b'"' if target else match.group(0)

        for entry in entries:
            resource = entry["resource"]
            kind = resource["resourceType"]
            uuid = str(entry["fullUrl"]).removeprefix("urn:uuid:")
            if kind in SHARED_TYPES:
                key = f"{kind}/{uuid}"
                if key in self._seen:
                    continue
                self._seen.add(key)
            body = orjson.dumps({"resourceType": kind, "id": uuid} | resource)
            handle = self._files.get(kind)
            if handle is None:
                handle = self._files[kind] = self._part(kind).open("wb")
            handle.write(_URN_REFERENCE.sub(literal, body) + b"\n")
            self.counts[kind] += 1
