from __future__ import annotations

from pathlib import Path

from ims_fhir import Encounter
from ims_fhir.mapping.docs import render_mapping_doc
from ims_fhir.mapping.spec import spec


def test_mapping_doc_is_current(root: Path) -> None:
    committed = (root / "docs" / "mapping.md").read_text(encoding="utf-8")
    assert committed == render_mapping_doc(), "regenerate: python -m ims_fhir.mapping.docs"


def _leaf_fields(model: type, prefix: str = "") -> set[str]:
    from pydantic import BaseModel

    out = set()
    for name, info in model.model_fields.items():  # type: ignore[attr-defined]
        annotation = info.annotation
        inner = getattr(annotation, "__args__", (annotation,))
        nested = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
        for sub in inner:
            nested += [
                a
                for a in getattr(sub, "__args__", ())
                if isinstance(a, type) and issubclass(a, BaseModel)
            ]
        path = f"{prefix}{name}"
        if nested:
            out |= _leaf_fields(nested[0], path + ("[]." if "list" in str(annotation) else "."))
        else:
            out.add(path)
    return out


def test_every_record_field_has_a_mapping_rule(root: Path) -> None:
    documented = set()
    for rule in spec().rules:
        field = rule["field"]
        stem = field.rsplit(".", 1)[0] + "." if "." in field else ""
        for part in field.split(", "):
            documented.add(part if "." in part or not stem else stem + part)
    missing = {
        f
        for f in _leaf_fields(Encounter)
        if not any(f == d or f.startswith((d + ".", d + "[]")) for d in documented)
    }
    assert not missing, f"no mapping rule for {sorted(missing)}"
