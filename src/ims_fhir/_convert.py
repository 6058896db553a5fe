"""File conversion behind ``ims-fhir convert``: IMS records <-> FHIR, streamed where it can be."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from ._exceptions import FieldIssue, MappingError, RecordError, RecordLocation
from ._from_fhir import MappingReport, from_fhir
from ._reader import MAX_RECORD_BYTES, _lines

__all__ = ["detect_input", "read_fhir"]

InputKind = Literal["ims", "fhir"]


def detect_input(paths: Iterable[Path]) -> InputKind:
    """Tell whether the inputs hold IMS records or FHIR resources (from the first value)."""
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.suffix not in {".json", ".ndjson", ".jsonl"}:
                continue
            with file.open("rb") as handle:
                head = handle.read(4096).decode("utf-8", errors="replace")
            if '"resourceType"' in head.split("\n", 1)[0] or '"resourceType"' in head[:200]:
                return "fhir"
            return "ims"
    return "ims"


def read_fhir(paths: Iterable[Path]) -> Iterator[MappingReport | RecordError]:
    """Map FHIR input back to records.

    Each Bundle is mapped on its own as it is read (so NDJSON of Bundles streams); loose
    resources are gathered and mapped together at the end, since they refer to each other.
    """
    loose: list[Any] = []
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            for location, value in _values(file):
                if isinstance(value, RecordError):
                    yield value
                elif isinstance(value, dict) and value.get("resourceType") == "Bundle":
                    yield _map(value, location)
                elif isinstance(value, dict) and "resourceType" in value:
                    loose.append(value)
                else:
                    yield RecordError(location, [FieldIssue("<json>", "not a FHIR resource")])
    if loose:
        yield from_fhir(loose)


def _map(value: Any, location: RecordLocation) -> MappingReport | RecordError:
    try:
        return from_fhir(value)
    except (TypeError, ValueError, MappingError) as exc:
        return RecordError(location, [FieldIssue("<bundle>", str(exc))])


def _values(file: Path) -> Iterator[tuple[RecordLocation, Any]]:
    name = str(file)
    if file.suffix in {".ndjson", ".jsonl"}:
        with file.open("rb") as handle:
            for number, line in _lines(handle):  # an over-long line is skipped, never loaded
                location = RecordLocation(name, line=number)
                if line is None:
                    reason = f"longer than {MAX_RECORD_BYTES} bytes"
                    yield location, RecordError(location, [FieldIssue("<line>", reason)])
                elif line.strip():
                    yield location, _decode(line, location)
    else:
        location = RecordLocation(name)
        if file.stat().st_size > MAX_RECORD_BYTES:
            yield location, RecordError(location, [FieldIssue("<file>", "too large")])
            return
        value = _decode(file.read_bytes(), location)
        if isinstance(value, list):
            for index, item in enumerate(value):
                yield RecordLocation(name, index=index), item
        else:
            yield location, value


def _decode(raw: bytes, location: RecordLocation) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        return RecordError(location, [FieldIssue("<json>", f"not valid JSON: {exc}")])
