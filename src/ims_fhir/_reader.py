"""Reading IMS encounter records from files.

Accepted inputs: a JSON file holding one record or a list of records, an NDJSON file (one record
per line, read line by line so memory stays flat however long the file), and directories of such
files. A bad record never stops the others: :func:`read_records` yields each good record and each
bad one as a :class:`~ims_fhir.RecordError` in file order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError

from ._exceptions import FieldIssue, RecordError, RecordLocation
from ._record import Encounter

__all__ = ["MAX_RECORD_BYTES", "ReadRecord", "read_records", "validate_record"]

MAX_RECORD_BYTES = 8 * 1024 * 1024
"""The largest record (or JSON file) accepted; larger ones are reported, never loaded."""

_NDJSON_SUFFIXES = frozenset({".ndjson", ".jsonl"})
_JSON_SUFFIXES = frozenset({".json"})
_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ReadRecord:
    """A record read and validated, with where it came from."""

    location: RecordLocation
    record: Encounter


def read_records(paths: Iterable[str | Path]) -> Iterator[ReadRecord | RecordError]:
    """Yield every record in ``paths`` (files or directories), good or bad, in order."""
    for path in paths:
        path = Path(path)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.suffix in _NDJSON_SUFFIXES | _JSON_SUFFIXES:
                    yield from _read_file(child)
        elif path.is_file():
            yield from _read_file(path)
        else:
            yield RecordError(
                RecordLocation(str(path)), [FieldIssue("<file>", "no such file or directory")]
            )


def validate_record(data: Any, location: RecordLocation) -> ReadRecord | RecordError:
    """Validate one decoded JSON value as an :class:`Encounter`."""
    record_id = data.get("id") if isinstance(data, dict) else None
    if isinstance(record_id, str):
        location = RecordLocation(location.file, location.line, location.index, record_id[:64])
    if not isinstance(data, dict):
        return RecordError(location, [FieldIssue("<record>", "a record must be a JSON object")])
    try:
        return ReadRecord(location, Encounter.model_validate(data))
    except ValidationError as exc:
        return RecordError(location, [_issue(error) for error in exc.errors()])


def _issue(error: Any) -> FieldIssue:
    path = ""
    for part in error["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    reason = error["msg"]
    if reason.startswith("Value error, "):
        reason = reason.removeprefix("Value error, ")
    return FieldIssue(path or "<record>", reason)


def _read_file(path: Path) -> Iterator[ReadRecord | RecordError]:
    if path.suffix in _NDJSON_SUFFIXES:
        yield from _read_ndjson(path)
    else:
        yield from _read_json(path)


def _read_json(path: Path) -> Iterator[ReadRecord | RecordError]:
    name = str(path)
    if path.stat().st_size > MAX_RECORD_BYTES:
        yield RecordError(
            RecordLocation(name),
            [FieldIssue("<file>", f"larger than {MAX_RECORD_BYTES} bytes: use NDJSON")],
        )
        return
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        yield RecordError(RecordLocation(name), [FieldIssue("<file>", f"not UTF-8: {exc}")])
        return
    except json.JSONDecodeError as exc:
        yield RecordError(
            RecordLocation(name, line=exc.lineno),
            [FieldIssue("<json>", f"invalid JSON: {exc.msg} (column {exc.colno})")],
        )
        return
    except RecursionError:
        yield RecordError(RecordLocation(name), [FieldIssue("<json>", "JSON nested too deeply")])
        return
    if isinstance(data, list):
        for index, item in enumerate(data):
            yield validate_record(item, RecordLocation(name, index=index))
    else:
        yield validate_record(data, RecordLocation(name))


def _read_ndjson(path: Path) -> Iterator[ReadRecord | RecordError]:
    name = str(path)
    with path.open("rb") as handle:
        for number, line in _lines(handle):
            location = RecordLocation(name, line=number)
            if line is None:
                yield RecordError(
                    location, [FieldIssue("<line>", f"longer than {MAX_RECORD_BYTES} bytes")]
                )
                continue
            if not line.strip():
                continue
            try:
                data = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield RecordError(location, [FieldIssue("<line>", f"not UTF-8: {exc}")])
                continue
            except json.JSONDecodeError as exc:
                yield RecordError(
                    location,
                    [FieldIssue("<json>", f"invalid JSON: {exc.msg} (column {exc.colno})")],
                )
                continue
            except RecursionError:
                yield RecordError(location, [FieldIssue("<json>", "JSON nested too deeply")])
                continue
            yield validate_record(data, location)


def _lines(handle: BinaryIO) -> Iterator[tuple[int, bytes | None]]:
    """Yield (line number, line); None for a line too long to load, which is skipped."""
    number = 0
    while True:
        line = handle.readline(MAX_RECORD_BYTES + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_RECORD_BYTES and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = handle.readline(_CHUNK)
            yield number, None
            continue
        yield number, line
