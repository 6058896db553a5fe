from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
ENCOUNTER_FILES = sorted((FIXTURES / "encounters").glob("*.json"))
INVALID_FILES = sorted((FIXTURES / "invalid").glob("*.json"))


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT
