from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from ims_fhir.cli.commands import cli


def test_validate_fixtures_succeeds(root: Path) -> None:
    result = CliRunner().invoke(cli, ["validate", str(root / "fixtures" / "encounters")])
    assert result.exit_code == 0, result.output
    assert "26 valid, 0 invalid" in result.output


def test_validate_reports_each_bad_record_and_exits_1(root: Path) -> None:
    invalid = root / "fixtures" / "invalid"
    result = CliRunner().invoke(cli, ["validate", "--json", str(invalid)])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["valid"] == 0
    assert report["invalid"] == len(list(invalid.glob("*.json")))
    nrs = next(e for e in report["errors"] if e["file"].endswith("nrs-above-10.json"))
    assert nrs["record_id"] == "bad-nrs-above-10"
    assert nrs["issues"] == [
        {"path": "pain[0].nrs", "reason": "Input should be less than or equal to 10"}
    ]


def test_validate_mixed_input_keeps_the_good(root: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "validate",
            str(root / "fixtures" / "encounters" / "01-lumbar-l5-initial.json"),
            str(root / "fixtures" / "invalid" / "grade-above-3.json"),
        ],
    )
    assert result.exit_code == 1
    assert "1 valid, 1 invalid" in result.stdout
    assert "assessment.findings[0].grade" in result.stderr
