"""Terminology loaded from the FHIR artifacts under ``mappings/``.

Every code ims-fhir emits comes from these files (see ``mappings/README.md``):

- ``CodeSystem-ims-local.json``: the project's own codes, grouped by kind (sign, muscle, side, ...).
  The groups are the record's vocabulary too.
- ``ConceptMap-ims-to-standard.json``: local code -> SNOMED CT / LOINC, with TERMINOLOGY.md's
  confidence expressed as the equivalence (``relatedto`` for unverified codes, never emitted).
- ``Parameters-conventions.json``: fixed FHIR codings (categories, units, ...) with their source.
- ``Parameters-jurisdictional-identifiers.json``: identifier systems registered by jurisdictions
  (provincial and national health numbers), each with the page its URI was verified on.

The files are read once, on first use, and indexed.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

CANONICAL = "https://ims-fhir.org/fhir"
"""Canonical base URL of every artifact the project publishes."""

LOCAL_SYSTEM = f"{CANONICAL}/CodeSystem/ims-local"
EXTENSION_BASE = f"{CANONICAL}/StructureDefinition"
PROFILE_BASE = f"{CANONICAL}/StructureDefinition"

# A target with one of these equivalences may be emitted (the first one per concept) and is
# accepted on the way in. ``relatedto`` marks TERMINOLOGY.md's unverified (M) codes, and a
# ``narrower`` target would claim more than the record says.
_EMITTABLE = frozenset({"equal", "equivalent", "wider"})


@dataclass(frozen=True, slots=True)
class Coding:
    """A plain coding: system, code and display."""

    system: str
    code: str
    display: str

    def as_fhir(self) -> dict[str, str]:
        """Return the coding as FHIR JSON."""
        return {"system": self.system, "code": self.code, "display": self.display}


@dataclass(frozen=True, slots=True)
class IdentifierSystem:
    """A jurisdiction's registered identifier system (``Parameters-jurisdictional-identifiers``)."""

    system: str
    jurisdiction: Coding
    identifies: str
    """What its identifiers are: ``patient-health-number``."""
    type: Coding
    """The identifier type ims-fhir writes with it (a convention: JHN for health numbers)."""
    source: str


# What a jurisdictional system may identify, and the record kind its identifiers are.
IDENTIFIES = {"patient-health-number": "health-card"}


def mappings_dir() -> Path:
    """Return the directory holding the mapping artifacts.

    An installed wheel carries them as ``ims_fhir/mappings``; a source checkout keeps them at the
    top of the repository.
    """
    packaged = resources.files("ims_fhir").joinpath("mappings")
    if packaged.is_dir():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parents[3] / "mappings"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError("ims-fhir mapping artifacts not found (mappings/ is missing)")


class Terminology:
    """Index over the mapping artifacts; use :func:`terminology` for the shared instance."""

    def __init__(self, directory: Path) -> None:
        """Load and index the artifacts in ``directory``."""
        self.directory = directory
        code_system = _load(directory / "CodeSystem-ims-local.json")
        concept_map = _load(directory / "ConceptMap-ims-to-standard.json")
        conventions = _load(directory / "Parameters-conventions.json")
        jurisdictional = _load(directory / "Parameters-jurisdictional-identifiers.json")

        self._groups: dict[str, dict[str, str]] = {}
        self._local: dict[str, Coding] = {}
        self._group_of: dict[str, str] = {}
        for group in code_system["concept"]:
            members: dict[str, str] = {}
            for concept in group.get("concept", []):
                members[concept["code"]] = concept["display"]
                self._local[concept["code"]] = Coding(
                    LOCAL_SYSTEM, concept["code"], concept["display"]
                )
                self._group_of[concept["code"]] = group["code"]
            self._groups[group["code"]] = members
            self._local[group["code"]] = Coding(LOCAL_SYSTEM, group["code"], group["display"])

        self._standard: dict[str, Coding] = {}
        self._reverse: dict[tuple[str, str], str] = {}
        self._displays = {(LOCAL_SYSTEM, code): c.display for code, c in self._local.items()}
        self._systems: set[str] | None = None
        for cm_group in concept_map["group"]:
            for element in cm_group["element"]:
                for target in element.get("target", []):
                    if target["equivalence"] not in _EMITTABLE:
                        continue
                    coding = Coding(cm_group["target"], target["code"], target["display"])
                    self._displays[(coding.system, coding.code)] = coding.display
                    self._standard.setdefault(element["code"], coding)
                    self._reverse[(coding.system, coding.code)] = element["code"]

        self._conventions: dict[str, Coding] = {}
        for parameter in conventions["parameter"]:
            value = parameter["valueCoding"]
            self._conventions[parameter["name"]] = Coding(
                value["system"], value["code"], value["display"]
            )

        self._identifier_systems: dict[str, IdentifierSystem] = {}
        for parameter in jurisdictional["parameter"]:
            entry = _identifier_system(parameter, self._conventions)
            if entry.system in self._identifier_systems:
                raise ValueError(f"{parameter['name']}: system {entry.system} is listed twice")
            self._identifier_systems[entry.system] = entry

    def vocabulary(self, group: str) -> Mapping[str, str]:
        """Return the codes (and displays) of one group of the local CodeSystem."""
        return self._groups[group]

    def group_of(self, code: str) -> str | None:
        """Return the group a local code belongs to, if it is a local code."""
        return self._group_of.get(code)

    def local(self, code: str) -> Coding:
        """Return the local coding for ``code``; KeyError if it is not a local code."""
        return self._local[code]

    def standard(self, code: str) -> Coding | None:
        """Return the standard coding emitted for a local code, if one is verified."""
        return self._standard.get(code)

    def codings(self, code: str) -> list[Coding]:
        """Return the codings for a local concept: the verified standard code first, if any."""
        standard = self._standard.get(code)
        local = self._local[code]
        return [standard, local] if standard else [local]

    def displays(self, system: str, code: str) -> set[str]:
        """What a code the mapping knows (local, or a standard code it maps) may display.

        Its own display, or its local concept's (ims-fhir 0.1 wrote that for muscles); empty if
        the code is not one the mapping knows.
        """
        own = self._displays.get((system, code))
        if own is None:
            return set()
        local = code if system == LOCAL_SYSTEM else self._reverse.get((system, code))
        return {own} | ({self._local[local].display} if local in self._local else set())

    def emitted_code(self, system: str, code: str) -> str:
        """The code ims-fhir emits for the concept ``system|code`` stands for, in ``system``.

        Itself, unless it is another standard code of a local concept that the mapping reads
        (R4's 419161000 *Unilateral left* for 7771000 *Left*, TERMINOLOGY.md).
        """
        local = self._reverse.get((system, code))
        emitted = self._standard.get(local) if local is not None else None
        return emitted.code if emitted is not None and emitted.system == system else code

    def from_coding(self, system: str | None, code: str | None, group: str) -> str | None:
        """Return the local code in ``group`` that a coding stands for, or None."""
        if system is None or code is None:
            return None
        if system == LOCAL_SYSTEM:
            found: str | None = code
        else:
            found = self._reverse.get((system, code))
        if found is not None and self._group_of.get(found) == group:
            return found
        return None

    def convention(self, name: str) -> Coding:
        """Return a fixed FHIR coding from ``Parameters-conventions.json``."""
        return self._conventions[name]

    def identifier_system(self, system: str) -> IdentifierSystem | None:
        """Return the jurisdictional identifier system registered as ``system``, if known."""
        return self._identifier_systems.get(system)

    def identifier_systems(self) -> list[IdentifierSystem]:
        """Every known jurisdictional identifier system, in the file's order."""
        return list(self._identifier_systems.values())

    def systems(self) -> set[str]:
        """Every code system this terminology emits codings of."""
        if self._systems is None:
            self._systems = {c.system for c in self.emitted_codings()}
        return self._systems

    def emitted_codings(self) -> Iterator[Coding]:
        """Yield every coding this terminology can emit (for conformance tests)."""
        yield from self._local.values()
        yield from self._standard.values()
        yield from self._conventions.values()


def _identifier_system(
    parameter: dict[str, Any], conventions: Mapping[str, Coding]
) -> IdentifierSystem:
    """One entry of the jurisdictional identifier table, checked: a typo must not pass."""
    name = parameter["name"]
    parts = {part["name"]: part for part in parameter["part"]}
    missing = {"system", "jurisdiction", "identifies", "type", "source"} - set(parts)
    if missing:
        raise ValueError(f"{name}: missing {', '.join(sorted(missing))}")
    identifies = parts["identifies"]["valueCode"]
    if identifies not in IDENTIFIES:
        raise ValueError(f"{name}: identifies {identifies!r}, not one of {', '.join(IDENTIFIES)}")
    type_name = parts["type"]["valueString"]
    if type_name not in conventions:
        raise ValueError(f"{name}: type {type_name!r} is not in Parameters-conventions.json")
    where = parts["jurisdiction"]["valueCoding"]
    return IdentifierSystem(
        system=parts["system"]["valueUri"],
        jurisdiction=Coding(where["system"], where["code"], where["display"]),
        identifies=identifies,
        type=conventions[type_name],
        source=parts["source"]["valueString"],
    )


def _load(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        data: dict[str, Any] = json.load(handle)
    return data


@functools.cache
def terminology() -> Terminology:
    """Return the terminology loaded from the packaged ``mappings/`` (loaded once)."""
    return Terminology(mappings_dir())
