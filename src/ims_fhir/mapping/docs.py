"""Render ``docs/mapping.md`` from the artifacts in ``mappings/``.

Run ``python -m ims_fhir.mapping.docs`` (writes ``docs/mapping.md`` and ``docs/profiles.md``);
a test keeps the committed copies current.
"""

from __future__ import annotations

import json
from typing import Any

from ..record.terminology import mappings_dir, terminology
from .spec import spec


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((mappings_dir() / name).read_text(encoding="utf-8"))
    return data


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _element(rule: dict[str, Any]) -> str:
    """A rule's FHIR element in words; a slot or element rule's from its machine parts."""
    if "slot" not in rule and "at" not in rule:
        return str(rule["element"])
    kind = rule["type"] + (f" {rule['unit']}" if "unit" in rule else "")
    if "vocabulary" in rule:
        kind += f" from {spec().value_set(rule['vocabulary'])}"
    if rule.get("parts"):
        kind += ": " + ", ".join(
            f"{p['slot']} ({p['type']} {p['unit']})" if "unit" in p else p["slot"]
            for p in rule["parts"]
        )
    where = rule.get("slot") or rule["at"]
    text = f"{rule['profile']}: `{where}` ({kind}; {rule['min']}..{rule.get('max', '1')})"
    return text + (f"; {rule['note']}" if "note" in rule else "")


def _codes(rule: dict[str, Any]) -> str:
    """A rule's codes; a slot or element rule's follow from its slot, vocabulary and units."""
    if "slot" not in rule and "at" not in rule:
        return str(rule.get("codes", ""))
    slot = rule.get("slot", "extension:")
    codes = [] if "extension:" in slot else [f"local:{slot.partition(':')[2]}"]
    if "vocabulary" in rule:
        codes.append(f"group:{rule['vocabulary']}")
    codes += [f"convention:unit-{r['unit']}" for r in [rule, *rule.get("parts", [])] if "unit" in r]
    return "; ".join(codes)


def render_mapping_doc() -> str:
    """Return the Markdown text of ``docs/mapping.md``."""
    code_system = _load("CodeSystem-ims-local.json")
    concept_map = _load("ConceptMap-ims-to-standard.json")
    conventions = _load("Parameters-conventions.json")

    targets: dict[str, list[str]] = {}
    for group in concept_map["group"]:
        system = "SCT" if group["target"].endswith("snomed.info/sct") else "LOINC"
        for element in group["element"]:
            for target in element["target"]:
                targets.setdefault(element["code"], []).append(
                    f"{system} {target['code']} {target['display']} "
                    f"({target['equivalence']}; {target['comment']})"
                )

    lines = [
        "# How an IMS record maps to FHIR R4",
        "",
        "Generated from `mappings/` by `python -m ims_fhir.mapping.docs`; do not edit by hand.",
        "`{ns}` is the clinic's identifier namespace. Codes: `group:` a group of the local",
        f"CodeSystem `{code_system['url']}` (listed below with their standard codes),",
        "`local:` one local code, `convention:` a fixed coding of `Parameters-conventions.json`.",
        "",
        "| record field | FHIR element | codes | source |",
        "|---|---|---|---|",
    ]
    for rule in spec().rules:
        lines.append(
            f"| `{_cell(rule['field'])}` | {_cell(_element(rule))} | "
            f"{_cell(_codes(rule))} | {_cell(rule['source'])} |"
        )
    lines += [
        "",
        "## Which identifier decides each shared resource",
        "",
        "A sync finds the patient, practitioner and clinic on the server by these identifiers",
        "(`src/ims_fhir/sync/matching.py`), strongest first; one resource carrying any of them",
        "is used, several fail the encounter, none is created (If-None-Exist on the strong ones,",
        "else the clinic's).",
        "The encounter refers to each by the server's id and by the clinic's identifier",
        "(`Reference.identifier`), so one the region holds, without the clinic's identifier,",
        "still maps back.",
        "",
        "| resource | `--match identifier` (default) | `--match create` | `--match mpi` |",
        "|---|---|---|---|",
        "| Patient | identifiers typed JHN (`convention:identifier-type-health-card`), then "
        "`{ns}/patient` | `{ns}/patient` | the server's `Patient/$match`, certain matches at "
        "or above `--match-threshold` |",
        "| Practitioner | the licence (typed LN, `convention:identifier-type-licence`), then "
        "`{ns}/practitioner` | `{ns}/practitioner` | as `identifier` |",
        "| Organization | the clinic's registered identifiers (`clinic.identifiers`), then "
        "`{ns}/organization` | `{ns}/organization` | as `identifier` |",
    ]
    lines += ["", "## Codes", ""]
    for group in code_system["concept"]:
        lines += [
            f"### `{group['code']}`: {group['display']}",
            "",
            "| local code | display | standard code (equivalence; confidence) |",
            "|---|---|---|",
        ]
        for concept in group.get("concept", []):
            standard = "; ".join(targets.get(concept["code"], [])) or "none (local code only)"
            lines.append(
                f"| `{concept['code']}` | {_cell(concept['display'])} | {_cell(standard)} |"
            )
        lines.append("")
    lines += [
        "## Fixed codings",
        "",
        "| name | system | code | source |",
        "|---|---|---|---|",
    ]
    for parameter in conventions["parameter"]:
        coding = parameter["valueCoding"]
        source = next(p["valueString"] for p in parameter["part"] if p["name"] == "source")
        code = f"`{coding['code']}` {coding['display']}"
        lines.append(f"| `{parameter['name']}` | {coding['system']} | {code} | {_cell(source)} |")
    lines += [
        "",
        "## Jurisdictional identifier systems",
        "",
        "From `Parameters-jurisdictional-identifiers.json`: a patient identifier in one of these",
        "systems is a health number, typed as given here, whatever kind the record gives it.",
        "",
        "| system | jurisdiction | identifies | type | verified on |",
        "|---|---|---|---|---|",
    ]
    for entry in terminology().identifier_systems():
        where = f"{entry.jurisdiction.display} (`{entry.jurisdiction.code}`)"
        lines.append(
            f"| {entry.system} | {where} | {entry.identifies} | `{entry.type.code}` | "
            f"{_cell(entry.source)} |"
        )
    return "\n".join(lines) + "\n"


def render_profiles_doc() -> str:
    """Return the Markdown text of ``docs/profiles.md``: each profile's constrained elements."""
    lines = [
        "# Profiles",
        "",
        "Generated from the StructureDefinitions in `mappings/` by",
        "`python -m ims_fhir.mapping.docs`; do not edit by hand. Each table lists the elements a",
        "profile constrains (its differential); the snapshot in the same file holds the full",
        "definition.",
        "",
    ]
    for path in sorted(mappings_dir().glob("StructureDefinition-*.json")):
        sd = json.loads(path.read_text(encoding="utf-8"))
        kind = "Extension" if sd["type"] == "Extension" else f"Profile on {sd['type']}"
        lines += [f"## {sd['title']} (`{sd['id']}`)", "", f"{kind}: `{sd['url']}`", ""]
        lines += [_cell(sd["description"]), ""]
        if sd.get("context"):
            lines += ["Used on: " + ", ".join(f"`{c['expression']}`" for c in sd["context"]), ""]
        lines += ["| element | card. | type / binding | notes |", "|---|---|---|---|"]
        for element in sd["differential"]["element"]:
            card = ""
            if "min" in element or "max" in element:
                card = f"{element.get('min', '')}..{element.get('max', '')}"
            kinds = []
            for type_ in element.get("type", []):
                target = type_.get("profile") or type_.get("targetProfile") or []
                kinds.append(
                    type_["code"]
                    + (f"({', '.join(t.rsplit('/', 1)[-1] for t in target)})" if target else "")
                )
            if "binding" in element:
                binding = element["binding"]
                kinds.append(f"{binding['strength']}: {binding['valueSet'].rsplit('/', 1)[-1]}")
            notes = []
            for key, value in element.items():
                if key.startswith(("pattern", "fixed")):
                    notes.append(f"{key} {json.dumps(value, ensure_ascii=False)}")
            for constraint in element.get("constraint", []):
                notes.append(f"{constraint['key']}: {constraint['human']}")
            if element.get("slicing"):
                notes.append(
                    "sliced by " + ", ".join(d["path"] for d in element["slicing"]["discriminator"])
                )
            if element.get("sliceName"):
                notes.append(f"slice {element['sliceName']}")
            types, remarks = _cell(", ".join(kinds)), _cell("; ".join(notes))
            lines.append(f"| `{element['id']}` | {card} | {types} | {remarks} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    import pathlib

    docs = pathlib.Path(__file__).resolve().parents[3] / "docs"
    (docs / "mapping.md").write_text(render_mapping_doc(), encoding="utf-8")
    (docs / "profiles.md").write_text(render_profiles_doc(), encoding="utf-8")
