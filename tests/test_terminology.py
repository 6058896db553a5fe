"""Every code comes from mappings/, and every standard code there is one TERMINOLOGY.md allows."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from ims_fhir import Encounter, terminology, to_fhir_json
from ims_fhir.mapping.identity import Ext, Profile
from ims_fhir.record.terminology import LOCAL_SYSTEM

from .conftest import ENCOUNTER_FILES, ROOT
from .strategies import encounters

SCT = "http://snomed.info/sct"
LOINC = "http://loinc.org"
MAPPINGS = ROOT / "mappings"
# The shared folder beside the checkout is the source of truth; tests/data/shared is a copy
# so the suite also runs where shared/ is absent (and a test below keeps the copy current).
SHARED = ROOT.parent / "shared"
SHARED_COPY = ROOT / "tests" / "data" / "shared"
SHARED_DIR = SHARED if (SHARED / "TERMINOLOGY.md").exists() else SHARED_COPY


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((MAPPINGS / name).read_text(encoding="utf-8"))
    return data


def _terminology_codes() -> dict[str, set[str]]:
    """Codes TERMINOLOGY.md lists, by confidence (V, M), from its tables."""
    out: dict[str, set[str]] = {"V": set(), "M": set()}
    for line in (SHARED_DIR / "TERMINOLOGY.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[2][:1] not in {"V", "M"}:
            continue
        codes = re.findall(r"\b\d{3,6}-\d\b|\b\d{5,18}\b", cells[1])
        out[cells[2][0]].update(codes)
    out["V"].update(_prose_codes())
    return out


def _prose_codes() -> dict[str, str]:
    """Codes its prose marks verified: "LOINC 59284-0 *Patient Consent* is in ... (V)"."""
    text = (SHARED_DIR / "TERMINOLOGY.md").read_text(encoding="utf-8")
    pattern = r"(?:LOINC|SCT) (\d{3,6}-\d|\d{5,18}) \*([^*]+)\*[^\n(]*\(V\)"
    return {code: name for code, name in re.findall(pattern, text)}


def _inbound_laterality() -> set[str]:
    text = (SHARED_DIR / "TERMINOLOGY.md").read_text(encoding="utf-8")
    paragraph = next(p for p in text.split("\n\n") if "accept both on the way in" in p)
    return set(re.findall(r"\b\d{6,18}\b", paragraph))


def _reference_codes() -> set[str]:
    codes = set()
    for tsv in (SHARED_DIR / "reference").glob("*.tsv"):
        for line in tsv.read_text(encoding="utf-8").splitlines()[1:]:
            codes.add(line.split("\t", 1)[0])
    return codes


VERIFIED = _terminology_codes()["V"] | _reference_codes()
MEDIUM = _terminology_codes()["M"]


def _codings(node: Any) -> list[dict[str, Any]]:
    found = []
    if isinstance(node, dict):
        if "system" in node and "code" in node and isinstance(node["code"], str):
            found.append(node)
        for value in node.values():
            found += _codings(value)
    elif isinstance(node, list):
        for item in node:
            found += _codings(item)
    return found


def test_the_copy_of_shared_is_current() -> None:
    if not (SHARED / "TERMINOLOGY.md").exists():
        pytest.skip("no shared/ beside this checkout")
    assert (SHARED / "TERMINOLOGY.md").read_text() == (SHARED_COPY / "TERMINOLOGY.md").read_text()


def test_terminology_parsing_finds_the_tables() -> None:
    codes = _terminology_codes()
    assert {"247348008", "72514-3", "7771000"} <= codes["V"]
    assert {"55406008", "44868003", "181675000"} <= codes["M"]
    assert _inbound_laterality() == {"419161000", "419465000", "272741003"}


@pytest.mark.parametrize("path", ENCOUNTER_FILES, ids=lambda p: p.stem)
def test_every_code_emitted_is_in_mappings(path: Path) -> None:
    from ims_fhir import Encounter

    record = Encounter.model_validate_json(path.read_text(encoding="utf-8"))
    known = {(c.system, c.code) for c in terminology().emitted_codings()}
    for coding in _codings(json.loads(to_fhir_json(record))):
        if (
            coding["system"] in {SCT, LOINC, LOCAL_SYSTEM}
            or "terminology.hl7.org" in coding["system"]
            or coding["system"] == "http://unitsofmeasure.org"
        ):
            assert (coding["system"], coding["code"]) in known, coding


def test_emitted_standard_codes_are_verified() -> None:
    for coding in terminology().emitted_codings():
        if coding.system in {SCT, LOINC}:
            assert coding.code in VERIFIED, f"{coding} is not V in TERMINOLOGY.md"


def test_every_standard_code_in_mappings_is_allowed() -> None:
    inbound = _inbound_laterality()
    concept_map = _load("ConceptMap-ims-to-standard.json")
    for group in concept_map["group"]:
        for element in group["element"]:
            for target in element["target"]:
                code, equivalence = target["code"], target["equivalence"]
                if equivalence == "relatedto":
                    assert code in MEDIUM, f"relatedto target {code} is not an M code"
                    assert "M (secondary evidence only)" in target["comment"]
                else:
                    assert code in VERIFIED | inbound, f"{code} is not V in TERMINOLOGY.md"
                    assert target["comment"].startswith("TERMINOLOGY.md: V")
    for path in MAPPINGS.glob("*.json"):
        for coding in _codings(json.loads(path.read_text(encoding="utf-8"))):
            if coding["system"] in {SCT, LOINC}:
                assert coding["code"] in VERIFIED | inbound, f"{path.name}: {coding}"


def test_m_codes_are_never_emitted() -> None:
    emitted = {c.code for c in terminology().emitted_codings()}
    assert not emitted & (MEDIUM - VERIFIED)


def test_local_codes_are_unique_and_defined() -> None:
    code_system = _load("CodeSystem-ims-local.json")
    codes = []
    for group in code_system["concept"]:
        codes.append(group["code"])
        for concept in group["concept"]:
            codes.append(concept["code"])
            assert concept["definition"], concept["code"]
    assert len(codes) == len(set(codes))
    assert code_system["count"] == len(codes)


def test_every_extension_and_bound_value_set_is_defined() -> None:
    resources = [json.loads(p.read_text()) for p in MAPPINGS.glob("*.json")]
    defined = {r["url"] for r in resources if "url" in r}
    for ext in Ext:
        if "ims-fhir.org" in ext.url:
            assert ext.url in defined, ext
    core = {"http://hl7.org/fhir/ValueSet/body-site"}  # R4's own, bound by ims-finding
    for path in MAPPINGS.glob("StructureDefinition-*.json"):
        for element in json.loads(path.read_text())["differential"]["element"]:
            if "binding" in element:
                assert element["binding"]["valueSet"] in defined | core, (path.name, element["id"])


def test_each_mapping_file_names_its_sources() -> None:
    for path in MAPPINGS.glob("*.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        if data["resourceType"] == "Parameters":
            for parameter in data["parameter"]:
                names = {p["name"] for p in parameter.get("part", [])}
                assert "source" in names, (path.name, parameter)
        else:
            assert "TERMINOLOGY.md" in data["description"] or "Source" in data["description"], path


def test_profiles_are_named_consistently() -> None:
    assert all(
        p.url.startswith("https://ims-fhir.org/fhir/StructureDefinition/ims-") for p in Profile
    )


def _reference_displays() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for tsv in (SHARED_DIR / "reference").glob("*.tsv"):
        for line in tsv.read_text(encoding="utf-8").splitlines()[1:]:
            code, _, display = line.partition("\t")
            out.setdefault(code, set()).add(display)
    return out


def _terminology_names() -> dict[str, tuple[str, bool]]:
    """The concept TERMINOLOGY.md names beside each verified code (its table's first column)."""
    out = {}
    for line in (SHARED_DIR / "TERMINOLOGY.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[2][:1] == "V":
            codes = re.findall(r"\b\d{3,6}-\d\b|\b\d{5,18}\b", cells[1])
            # "Severity mild / moderate / severe | SCT 255604002 / 6736007 / 24484000": the
            # names of a row of several codes, in the same order.
            names = re.sub(r"\([^)]*\)", "", cells[0]).split(" / ")
            several = len(codes) > 1 and len(names) == len(codes)
            for n, code in enumerate(codes):
                out[code] = (names[n] if several else cells[0], several)
    for code, name in _prose_codes().items():
        out.setdefault(code, (name, False))
    return out


def _words(text: str) -> str:
    """A name without its parenthetical remark, case or punctuation."""
    return re.sub(r"[^a-z0-9]", "", re.sub(r"\([^)]*\)", "", text.lower()))


def test_every_emitted_display_is_the_one_the_reference_gives() -> None:
    # A validator with a terminology server reports a display that is not the code's. Where a
    # reference list has the code, its display exactly; else the concept TERMINOLOGY.md names.
    references, names = _reference_displays(), _terminology_names()
    emitted = {
        (c.system, c.code, c.display)
        for c in terminology().emitted_codings()
        if c.system in {SCT, LOINC}
    }
    for path in ENCOUNTER_FILES:
        record = Encounter.model_validate_json(path.read_text(encoding="utf-8"))
        for coding in _codings(json.loads(to_fhir_json(record))):
            if coding["system"] in {SCT, LOINC}:
                emitted.add((coding["system"], coding["code"], coding.get("display")))
    wrong = []
    for _system, code, display in sorted(emitted, key=str):
        if code in references:
            if display not in references[code]:
                wrong.append(f"{code} {display!r}: the reference list says {references[code]}")
        else:
            # One of several names in a row ("Severity mild / moderate / severe") may lack
            # the row's first word.
            name, several = names.get(code, ("", False))
            words, given = _words(name), _words(str(display))
            if not given or not (words == given or (several and words.endswith(given))):
                wrong.append(f"{code} {display!r}: TERMINOLOGY.md names {name!r}")
    assert not wrong, wrong


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=encounters())
def test_an_absent_sign_carries_no_standard_finding_code(record: Encounter) -> None:
    # Anything that indexes on a SNOMED CT finding code would read the sign as present.
    bundle = json.loads(to_fhir_json(record))
    absent = {
        f"{record.id}/finding/{f.id}"
        for f in (record.assessment.findings if record.assessment else [])
        if not f.present
    }
    for entry in bundle["entry"]:
        resource = entry["resource"]
        values = {i["value"] for i in resource.get("identifier", [])}
        if resource["resourceType"] == "Observation" and values & absent:
            assert resource["valueBoolean"] is False
            assert {c["system"] for c in resource["code"]["coding"]} == {LOCAL_SYSTEM}
            assert resource["code"]["text"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=encounters())
def test_every_needled_site_says_side_and_muscle_in_words(record: Encounter) -> None:
    # Side matters for safety; a reader without ims-fhir's extension has only the text.
    t = terminology()
    bundle = json.loads(to_fhir_json(record))
    texts = {
        i["value"]: r["bodySite"][0].get("text")
        for r in (e["resource"] for e in bundle["entry"])
        if r["resourceType"] == "Procedure" and "bodySite" in r
        for i in r.get("identifier", [])
    }
    for site in record.treatment.sites if record.treatment else []:
        side, muscle = t.local(site.side).display, t.local(site.muscle).display
        assert texts[f"{record.id}/site/{site.id}"] == f"{side} {muscle[:1].lower()}{muscle[1:]}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=encounters())
def test_every_needled_site_gives_its_side_in_a_standard_r4_form(record: Encounter) -> None:
    """Read as a system without ims-fhir would: the core procedure-targetBodyStructure
    extension names a BodyStructure whose locationQualifier is the side in SNOMED CT."""
    standard = {
        "left": "7771000",
        "right": "24028007",
        "bilateral": "51440002",
        "midline": "399488007",
    }
    bundle = json.loads(to_fhir_json(record))
    procedures = {
        r["identifier"][0]["value"]: r
        for r in (e["resource"] for e in bundle["entry"])
        if r["resourceType"] == "Procedure"
    }
    for site in record.treatment.sites if record.treatment else []:
        procedure = procedures[f"{record.id}/site/{site.id}"]
        (link,) = [
            x["valueReference"]["reference"]
            for x in procedure["extension"]
            if x["url"] == "http://hl7.org/fhir/StructureDefinition/procedure-targetBodyStructure"
        ]
        (target,) = [c for c in procedure["contained"] if f"#{c['id']}" == link]
        assert target["resourceType"] == "BodyStructure"
        assert target["patient"] == procedure["subject"]
        sides = {
            c["code"]
            for q in target["locationQualifier"]
            for c in q["coding"]
            if c["system"] == "http://snomed.info/sct"
        }
        assert sides == ({standard[site.side]} if site.side in standard else set())
        assert target["location"]["coding"] == procedure["bodySite"][0]["coding"]


# -- the table of jurisdictional identifier systems ---------------------------------------------

CANADA = {"AB", "BC", "MB", "NB", "NL", "NS", "NT", "NU", "ON", "PE", "QC", "SK", "YT"}


def test_every_province_and_territory_has_its_registered_health_number_system() -> None:
    entries = terminology().identifier_systems()
    canadian = {e.jurisdiction.code: e for e in entries if e.jurisdiction.code.startswith("CA-")}
    assert {code.removeprefix("CA-") for code in canadian} == CANADA
    for entry in canadian.values():
        assert entry.system.startswith("https://fhir.infoway-inforoute.ca/NamingSystem/ca-")
        assert entry.jurisdiction.system == "urn:iso:std:iso:3166:-2"
    assert canadian["CA-ON"].system.endswith("/ca-on-patient-hcn")  # Ontario's is not *-id
    nhi = terminology().identifier_system("https://standards.digital.health.nz/ns/nhi-id")
    assert nhi is not None and nhi.jurisdiction.code == "NZ"


def test_every_table_entry_is_a_health_number_with_a_verified_source() -> None:
    health_card = terminology().convention("identifier-type-health-card")
    entries = terminology().identifier_systems()
    assert len({e.system for e in entries}) == len(entries)
    for entry in entries:
        assert entry.identifies == "patient-health-number"
        assert (entry.type.system, entry.type.code) == (health_card.system, "JHN")
        assert entry.source.startswith("https://"), entry.system
        assert not any(label == "example" for label in entry.system.split("/")[2].split("."))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"type": "identifier-type-nope"}, "not in Parameters-conventions", id="type"),
        pytest.param({"identifies": "dog-licence"}, "identifies 'dog-licence'", id="identifies"),
        pytest.param({"source": None}, "missing source", id="no-source"),
    ],
)
def test_a_broken_table_entry_is_refused_when_loaded(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    from ims_fhir.record.terminology import Terminology

    for source in MAPPINGS.glob("*.json"):
        (tmp_path / source.name).write_bytes(source.read_bytes())
    table = _load("Parameters-jurisdictional-identifiers.json")
    parts = table["parameter"][0]["part"]
    for name, value in change.items():
        part = next(p for p in parts if p["name"] == name)
        if value is None:
            parts.remove(part)
        else:
            part["valueCode" if name == "identifies" else "valueString"] = value
    (tmp_path / "Parameters-jurisdictional-identifiers.json").write_text(json.dumps(table))
    with pytest.raises(ValueError, match=message):
        Terminology(tmp_path)


def test_a_system_listed_twice_is_refused(tmp_path: Path) -> None:
    from ims_fhir.record.terminology import Terminology

    for source in MAPPINGS.glob("*.json"):
        (tmp_path / source.name).write_bytes(source.read_bytes())
    table = _load("Parameters-jurisdictional-identifiers.json")
    table["parameter"].append(table["parameter"][0])
    (tmp_path / "Parameters-jurisdictional-identifiers.json").write_text(json.dumps(table))
    with pytest.raises(ValueError, match="listed twice"):
        Terminology(tmp_path)
