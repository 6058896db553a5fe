from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from ims_fhir.cli.commands import cli
from ims_fhir.record.schema import record_json_schema, record_json_schema_text


def test_committed_schema_is_current(root: Path) -> None:
    committed = (root / "docs" / "ims-encounter.schema.json").read_text(encoding="utf-8")
    assert committed == record_json_schema_text(), (
        "run: ims-fhir schema > docs/ims-encounter.schema.json"
    )


def test_cli_prints_the_schema() -> None:
    result = CliRunner().invoke(cli, ["schema"])
    assert result.exit_code == 0
    assert json.loads(result.output) == record_json_schema()


def test_schema_lists_the_vocabularies() -> None:
    defs = record_json_schema()["$defs"]
    assert "trophedema" in defs["Finding"]["properties"]["sign"]["enum"]
    assert "multifidus" in defs["NeedledSite"]["properties"]["muscle"]["enum"]
    assert defs["PainScore"]["properties"]["nrs"]["maximum"] == 10
