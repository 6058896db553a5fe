"""Code written as the README and examples/ show type-checks under ``mypy --strict``.

One mypy run over the README's Python examples and every program in ``examples/``, with a user's
plain strict configuration (no pydantic plugin, none of this project's overrides): what the
people who embed ims-fhir would run on their own code.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


# Wrong on purpose, in the same run: it shows the check can fail (a list given as a string, a
# code that is not in the CodeSystem).
TYPOS = """\
from ims_fhir import HumanName, PainScore

HumanName(family="X", given="Robin")
PainScore(id="p1", timing="before-treatmnet", nrs=4)
"""


def test_readme_and_examples_pass_mypy_strict(tmp_path: Path) -> None:
    files = []
    for n, code in enumerate(re.findall(r"```python\n(.*?)```", README, flags=re.S)):
        path = tmp_path / f"readme_example_{n}.py"
        path.write_text(code, encoding="utf-8")
        files.append(path.name)
    for example in EXAMPLES:
        shutil.copy(example, tmp_path / example.name)
        files.append(example.name)
    (tmp_path / "typos.py").write_text(TYPOS, encoding="utf-8")
    (tmp_path / "mypy.ini").write_text("[mypy]\nstrict = True\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", *files, "typos.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert [e for e in errors if not e.startswith("typos.py")] == [], result.stdout
    assert [e.split(":")[1] for e in errors] == ["3", "4"], result.stdout  # the typos, found
    assert len(files) >= 5  # the README's examples and the EMR program were all checked


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_emr_example_builds_valid_records_and_reports_bad_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    emr = _example("emr_integration")
    record = emr.build_record("emr-visit-1")
    bad = record.model_dump(mode="json") | {"pain": [{"id": "p", "timing": "x", "nrs": 11}]}
    kept = emr.check_records([record.model_dump(mode="json"), bad])
    assert kept == [record]
    assert "pain[0].nrs" in capsys.readouterr().err
