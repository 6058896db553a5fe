"""The wheel carries mappings/ and works from a clean virtualenv in another directory."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def wheel(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(root)],
        check=True,
    )
    (built,) = out.glob("ims_fhir-*.whl")
    return built


def test_wheel_contains_the_mappings_and_type_marker(wheel: Path, root: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for data_file in (root / "mappings").glob("*.json"):
        assert f"ims_fhir/mappings/{data_file.name}" in names
    assert "ims_fhir/py.typed" in names


@pytest.mark.slow
def test_installed_wheel_runs_from_another_directory(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)],
        check=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = "import ims_fhir; print(ims_fhir.terminology().directory)"
    found = subprocess.run(
        [str(python), "-c", code], cwd=elsewhere, check=True, capture_output=True, text=True
    ).stdout.strip()
    assert found.startswith(str(env_dir)), found
    schema = subprocess.run(
        [str(env_dir / "bin" / "ims-fhir"), "schema"],
        cwd=elsewhere,
        check=True,
        capture_output=True,
        text=True,
    )
    assert '"Encounter"' in schema.stdout
