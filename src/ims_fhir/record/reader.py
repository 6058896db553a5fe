"""Reading IMS encounter records from files.

Accepted inputs: a JSON file holding one record or a list of records, an NDJSON file (one record
per line, read line by line so memory stays flat however long the file), and directories of such
files. A bad record never stops the others: :func:`read_records` yields each good record and each
bad one as a :class:`~ims_fhir.RecordError` in file order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError

from .._exceptions import FieldIssue, RecordError, RecordLocation
from .model import Encounter

__all__ = [
    "MAX_RECORD_BYTES",
    "ReadRecord",
    "check_record",
    "decode_json",
    "json_values",
    "read_records",
    "validate_record",
    "walk",
]

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


def read_records(
    paths: Iterable[str | Path], on_skip: Callable[[Path, str], None] | None = None
) -> Iterator[ReadRecord | RecordError]:
    """Yield every record in ``paths`` (files or directories), good or bad, in order.

    Args:
        paths: files and directories; see :func:`walk` for what a directory contributes.
        on_skip: called with each file of a directory that is not read, and why.
    """
    for file in walk(paths, on_skip):
        if isinstance(file, RecordError):
            yield file
            continue
        for location, value in json_values(file):
            yield value if isinstance(value, RecordError) else validate_record(value, location)


def walk(
    paths: Iterable[str | Path], on_skip: Callable[[Path, str], None] | None = None
) -> Iterator[Path | RecordError]:
    """The files to read, in order: the one rule for both directions of ``convert``.

    A file named on its own is read whatever its name (NDJSON if it ends in ``.ndjson`` or
    ``.jsonl``, else JSON). In a directory, files ending in ``.json``, ``.ndjson`` or ``.jsonl``
    are read, in sorted order, subdirectories included (links to directories are not
    followed); any other file, a broken link or a pipe is not read, and ``on_skip`` is told (a
    README beside the records is not an error). A path that does not exist or cannot be read
    is a :class:`~ims_fhir.RecordError`, and the other paths go on.
    """
    for path in paths:
        path = Path(path)
        try:
            if path.is_dir():
                yield from _walk_dir(path, on_skip)
            elif path.is_file():
                yield path
            else:
                reason = "not a regular file" if path.exists() else "no such file or directory"
                yield RecordError(RecordLocation(str(path)), [FieldIssue("<file>", reason)])
        except OSError as exc:
            yield RecordError(
                RecordLocation(str(path)), [FieldIssue("<file>", f"cannot read: {exc.strerror}")]
            )


def _walk_dir(root: Path, on_skip: Callable[[Path, str], None] | None) -> Iterator[Path]:
    """Files of a directory, sorted; subdirectories too, but not links to directories."""
    for child in sorted(root.rglob("*")):
        if child.is_symlink() and child.is_dir():
            reason = "a link to a directory (not followed)"
        elif child.is_dir():
            continue
        elif not child.is_file():
            reason = "not a regular file (a broken link, a pipe, a device)"
        elif child.suffix in _NDJSON_SUFFIXES | _JSON_SUFFIXES:
            yield child
            continue
        else:
            reason = "not a .json, .ndjson or .jsonl file"
        if on_skip is not None:
            on_skip(child, reason)


def decode_json(raw: str | bytes) -> Any:
    """Decode JSON text; ``NaN`` and ``Infinity`` are not JSON (RFC 8259) and are refused.

    Raises:
        ValueError: not UTF-8 (``UnicodeDecodeError``), not JSON (``json.JSONDecodeError``),
            or nested too deeply to decode.
    """
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    text = text.removeprefix("\ufeff")  # a byte order mark: RFC 8259 lets a parser ignore it
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def json_values(file: Path) -> Iterator[tuple[RecordLocation, Any]]:
    """Each JSON value of a file with where it is: a line of NDJSON, an item of a JSON list.

    What cannot be read is yielded as a :class:`~ims_fhir.RecordError` in its place (a file
    or line over :data:`MAX_RECORD_BYTES` is never loaded), and the file goes on.
    """
    try:
        yield from _json_values(file)
    except OSError as exc:  # unreadable, vanished, a device error: this file, not the run
        location = RecordLocation(str(file))
        reason = f"cannot read: {exc.strerror or exc}"
        yield location, RecordError(location, [FieldIssue("<file>", reason)])


def _json_values(file: Path) -> Iterator[tuple[RecordLocation, Any]]:
    name = str(file)
    if file.suffix in _NDJSON_SUFFIXES:
        with file.open("rb") as handle:
            for number, line in _lines(handle):
                location = RecordLocation(name, line=number)
                if line is None:
                    reason = f"longer than {MAX_RECORD_BYTES} bytes"
                    yield location, RecordError(location, [FieldIssue("<line>", reason)])
                elif line.strip():
                    yield location, _decoded(line, location, "<line>")
        return
    location = RecordLocation(name)
    if file.stat().st_size > MAX_RECORD_BYTES:
        reason = f"larger than {MAX_RECORD_BYTES} bytes: use NDJSON"
        yield location, RecordError(location, [FieldIssue("<file>", reason)])
        return
    value = _decoded(file.read_bytes(), location, "<file>")
    if isinstance(value, list):
        for index, item in enumerate(value):
            yield RecordLocation(name, index=index), item
    else:
        yield location, value


def _decoded(raw: bytes, location: RecordLocation, what: str) -> Any:
    try:
        return decode_json(raw)
    except UnicodeDecodeError as exc:
        return RecordError(location, [FieldIssue(what, f"not UTF-8: {exc}")])
    except json.JSONDecodeError as exc:
        where = RecordLocation(location.file, location.line or exc.lineno, location.index)
        return RecordError(
            where, [FieldIssue("<json>", f"invalid JSON: {exc.msg} (column {exc.colno})")]
        )
    except ValueError as exc:
        return RecordError(location, [FieldIssue("<json>", f"invalid JSON: {exc}")])


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


def check_record(record: Encounter, where: str = "<record built in code>") -> Encounter:
    """Validate a record again and return it; raise :class:`RecordError` naming each bad field.

    A record built in code (e.g. by ``model_copy(update=...)``) may have skipped validation.
    """
    if not isinstance(record, Encounter):
        location = RecordLocation(where)
        raise RecordError(location, [FieldIssue("<record>", "not an ims_fhir.Encounter")])
    try:
        return Encounter.model_validate(record)
    except ValidationError as exc:
        location = RecordLocation(where, record_id=str(record.id)[:64])
        raise RecordError(location, [_issue(error) for error in exc.errors()]) from None


def _issue(error: Any) -> FieldIssue:
    path = ""
    for part in error["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    reason = error["msg"]
    if reason.startswith("Value error, "):
        reason = reason.removeprefix("Value error, ")
    return FieldIssue(path or "<record>", reason)


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
