"""Errors raised by ims-fhir.

The tree::

    ImsFhirError
    ├── RecordError            a record that cannot be read or fails clinical validation
    └── MappingError           FHIR resources that cannot be mapped back to a record

Each error carries what a caller needs to act on it: a :class:`RecordError` names the file, the
line or index, the record id when known, and each field path with its reason; a
:class:`MappingError` names the resource and the element path.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FieldIssue", "ImsFhirError", "MappingError", "RecordError", "RecordLocation"]


class ImsFhirError(Exception):
    """Base class of every error ims-fhir raises on purpose."""


@dataclass(frozen=True, slots=True)
class RecordLocation:
    """Where a record was read from."""

    file: str
    line: int | None = None
    index: int | None = None
    record_id: str | None = None

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
        if self.index is not None:
            where += f" [{self.index}]"
        if self.record_id is not None:
            where += f" record {self.record_id!r}"
        return where


@dataclass(frozen=True, slots=True)
class FieldIssue:
    """One problem with one field of a record."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class RecordError(ImsFhirError):
    """A record that could not be read or is not clinically valid."""

    def __init__(self, location: RecordLocation, issues: list[FieldIssue]) -> None:
        """Create the error from where the record came from and what is wrong with it."""
        self.location = location
        self.issues = issues
        super().__init__(f"{location}: " + "; ".join(str(issue) for issue in issues))


class MappingError(ImsFhirError):
    """FHIR content that cannot be mapped to an IMS record."""

    def __init__(self, resource: str, path: str, reason: str) -> None:
        """Create the error naming the resource (``Type/id``) and the element path."""
        self.resource = resource
        self.path = path
        self.reason = reason
        super().__init__(f"{resource}: {path}: {reason}")
