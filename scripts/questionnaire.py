"""Write mappings/Questionnaire-ims-visit.json from ims_fhir.mapping.questionnaire (or, with --check, compare).

python scripts/questionnaire.py            # regenerate
python scripts/questionnaire.py --check    # fail if mappings/ differs from the generator
"""

from __future__ import annotations

import sys
from pathlib import Path

from ims_fhir.mapping.questionnaire import QUESTIONNAIRE_FILE, questionnaire_json

PATH = Path(__file__).resolve().parents[1] / "mappings" / QUESTIONNAIRE_FILE


def main(argv: list[str]) -> int:
    text = questionnaire_json()
    if "--check" in argv:
        if not PATH.exists() or PATH.read_text(encoding="utf-8") != text:
            print(
                f"{PATH.name} differs from ims_fhir.mapping.questionnaire: run python scripts/questionnaire.py"
            )
            return 1
        return 0
    PATH.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
