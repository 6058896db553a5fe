"""Build the project's FHIR NPM package from ``mappings/``.

The package (a gzipped tar with ``package/package.json``, ``package/.index.json`` and one JSON
file per resource) holds the profiles, extensions, ValueSets, CodeSystem and ConceptMap, so that
any FHIR server can check IMS data, and the IMS visit Questionnaire (``questionnaire.py``).
Servers install it the way they install any IG package (for HAPI: the package installer, or
``tests/hapi/run -- --ims.package=FILE``). Builds are reproducible: the same mappings give the
same bytes.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from .._version import __version__
from ..record.terminology import CANONICAL, mappings_dir

__all__ = ["PACKAGE_NAME", "build_package", "package_resources"]

PACKAGE_NAME = "ims-fhir.r4"
_CONFORMANCE = ("CodeSystem", "ConceptMap", "ValueSet", "StructureDefinition", "Questionnaire")


def package_resources() -> list[dict[str, Any]]:
    """The conformance resources that go into the package, in file-name order."""
    out = []
    for path in sorted(mappings_dir().glob("*.json")):
        resource = json.loads(path.read_text(encoding="utf-8"))
        if resource.get("resourceType") in _CONFORMANCE:
            out.append(resource)
    return out


def _manifest() -> dict[str, Any]:
    return {
        "name": PACKAGE_NAME,
        "version": __version__,
        "description": "Profiles, extensions and terminology for IMS (Gunn intramuscular "
        "stimulation) encounters in FHIR R4, as written by ims-fhir.",
        "author": "ims-fhir",
        "license": "CC0-1.0",
        "canonical": CANONICAL,
        "url": CANONICAL,
        "fhirVersions": ["4.0.1"],
        "type": "fhir.ig",
        "dependencies": {"hl7.fhir.r4.core": "4.0.1"},
    }


def build_package(output: str | Path) -> Path:
    """Write the package to ``output`` (``.tgz``) and return its path."""
    resources = package_resources()
    files: dict[str, bytes] = {}
    index: list[dict[str, Any]] = []
    for resource in resources:
        name = f"{resource['resourceType']}-{resource['id']}.json"
        files[name] = (json.dumps(resource, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        keys = ("resourceType", "id", "url", "version", "kind", "type")
        index.append({"filename": name} | {k: resource[k] for k in keys if k in resource})
    manifest = json.dumps(_manifest(), indent=2) + "\n"
    files["package.json"] = manifest.encode("utf-8")
    listing = json.dumps({"index-version": 1, "files": index}, indent=2) + "\n"
    files[".index.json"] = listing.encode("utf-8")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(files[name])
            info.mode = 0o644
            info.mtime = 0  # reproducible
            tar.addfile(info, io.BytesIO(files[name]))
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(buffer.getvalue(), mtime=0))
    return path
