#!/usr/bin/env python3
"""Write src/ims_fhir/record/codes.py from the local CodeSystem (``--check``: fail if stale).

The record model's coded fields are typed with ``Literal`` types of the CodeSystem's codes, so a
typo in user code is a type error, not a run-time one. The codes stay data: this script reads
them from mappings/CodeSystem-ims-local.json, and a test fails when the two differ.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ims_fhir.record.terminology import terminology  # noqa: E402

TARGET = ROOT / "src" / "ims_fhir" / "record" / "codes.py"

# Record type name -> CodeSystem group, in the order record/model.py uses them.
GROUPS = {
    "SignCode": "sign",
    "MuscleCode": "muscle",
    "SideCode": "side",
    "SpinalLevelCode": "spinal-level",
    "TrophedemaTestCode": "trophedema-test",
    "NeedleResponseCode": "needle-response",
    "SiteRoleCode": "site-role",
    "AdverseEventCode": "adverse-event",
    "SeverityCode": "severity",
    "DiagnosisCode": "diagnosis",
    "VisitTypeCode": "visit-type",
    "PainTimingCode": "pain-timing",
}


def generate() -> str:
    """Return the text of record/codes.py."""
    lines = [
        '"""The codes of the record vocabulary as ``Literal`` types, for type checkers.',
        "",
        "Generated from ``mappings/CodeSystem-ims-local.json`` by ``scripts/codes.py``: edit the",
        "CodeSystem, then run ``python scripts/codes.py``. A test fails when this file is stale.",
        "Validation reads the CodeSystem itself (``model._Vocabulary``); these only type.",
        '"""',
        "",
        "from typing import Literal",
        "",
        f"__all__ = {sorted(GROUPS)!r}",
        "",
    ]
    for name, group in GROUPS.items():
        codes = ", ".join(repr(code) for code in terminology().vocabulary(group))
        lines += ["", f"{name} = Literal[{codes}]", f'"""Group ``{group}``."""']
    text = "\n".join(lines) + "\n"
    formatted = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--stdin-filename", str(TARGET), "-"],
        input=text,
        capture_output=True,
        text=True,
        check=True,
    )
    return formatted.stdout


def main() -> int:
    """Write the file, or with ``--check`` report whether it is current."""
    produced = generate()
    if "--check" in sys.argv[1:]:
        if not TARGET.exists() or TARGET.read_text(encoding="utf-8") != produced:
            print("src/ims_fhir/record/codes.py is stale: run python scripts/codes.py")
            return 1
        return 0
    TARGET.write_text(produced, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
