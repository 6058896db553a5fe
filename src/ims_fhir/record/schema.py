"""The published JSON Schema of the IMS encounter record."""

from __future__ import annotations

import json
from typing import Any

from .._version import __version__
from .model import Encounter
from .terminology import CANONICAL

__all__ = ["record_json_schema", "record_json_schema_text"]


def record_json_schema() -> dict[str, Any]:
    """Return the JSON Schema (draft 2020-12) of an :class:`~ims_fhir.Encounter` record."""
    schema = Encounter.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"{CANONICAL}/schema/ims-encounter-{__version__}.json",
        **schema,
    }


def record_json_schema_text() -> str:
    """Return the schema as the text committed in ``docs/ims-encounter.schema.json``."""
    return json.dumps(record_json_schema(), indent=2, ensure_ascii=False) + "\n"
