"""The FHIR package and the conformance artifacts it carries."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

from click.testing import CliRunner

from ims_fhir.cli.commands import cli
from ims_fhir.mapping.package import PACKAGE_NAME, build_package


def test_package_layout(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["package", "-o", str(tmp_path / "p.tgz")])
    assert result.exit_code == 0, result.output
    with tarfile.open(tmp_path / "p.tgz") as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("package/package.json"))  # type: ignore[arg-type]
        index = json.load(tar.extractfile("package/.index.json"))  # type: ignore[arg-type]
        resources = {
            n: json.load(tar.extractfile(n))  # type: ignore[arg-type]
            for n in names
            if n.endswith(".json") and not n.endswith(("package.json", ".index.json"))
        }
    assert all(n.startswith("package/") for n in names)
    assert manifest["name"] == PACKAGE_NAME
    assert manifest["fhirVersions"] == ["4.0.1"]
    assert manifest["canonical"] == "https://ims-fhir.org/fhir"
    listed = {f["filename"]: f for f in index["files"]}
    assert set(listed) == {n.removeprefix("package/") for n in resources}
    for name, resource in resources.items():
        entry = listed[name.removeprefix("package/")]
        assert (entry["resourceType"], entry["id"], entry["url"]) == (
            resource["resourceType"],
            resource["id"],
            resource["url"],
        )
    kinds = {r["resourceType"] for r in resources.values()}
    assert kinds == {"CodeSystem", "ConceptMap", "ValueSet", "StructureDefinition", "Questionnaire"}
    profiles = [
        r
        for r in resources.values()
        if r["resourceType"] == "StructureDefinition" and r["type"] != "Extension"
    ]
    assert len(profiles) == 12


def test_package_builds_are_reproducible(tmp_path: Path) -> None:
    first = build_package(tmp_path / "a.tgz").read_bytes()
    assert build_package(tmp_path / "b.tgz").read_bytes() == first


def test_every_structure_definition_has_a_snapshot_covering_its_differential(root: Path) -> None:
    for path in (root / "mappings").glob("StructureDefinition-*.json"):
        sd = json.loads(path.read_text(encoding="utf-8"))
        snapshot = {e["id"]: e for e in sd["snapshot"]["element"]}
        for element in sd["differential"]["element"]:
            assert element["id"] in snapshot, (path.name, element["id"])
            for constraint in element.get("constraint", []):
                keys = {c["key"] for c in snapshot[element["id"]].get("constraint", [])}
                assert constraint["key"] in keys, (path.name, element["id"], constraint["key"])


def test_artifacts_match_their_generator(root: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(root / "scripts" / "profiles.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_profiles_name_what_the_mapper_writes(root: Path) -> None:
    from ims_fhir.mapping.identity import Profile

    urls = {
        json.loads(p.read_text(encoding="utf-8"))["url"]
        for p in (root / "mappings").glob("StructureDefinition-ims-*.json")
    }
    assert {p.url for p in Profile} == urls
