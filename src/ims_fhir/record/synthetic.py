"""Deterministic synthetic IMS encounters, for tests, benchmarks and ``check --write-test``.

Synthetic only: names are drawn from a small list of invented ones, ids are counters. The same
seed gives the same encounters; every record is clinically valid.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections.abc import Iterator
from typing import Any

from .model import Encounter
from .terminology import terminology

__all__ = ["synthetic_encounter", "synthetic_encounters"]

_FAMILY = ["Tremblay", "Ngata", "Ødegård", "Muñoz", "Nguyễn", "Okafor", "Brändli", "MacNeil"]
_GIVEN = ["Zoë", "Hemi", "Søren", "José", "Anaïs", "Chidi", "Jürg", "Iain", "Mārama"]
_ZONES = [-8, -7, -5, -4, -3, 1, 2, 12, 13]


def synthetic_encounters(
    count: int, *, seed: int = 0, patients: int | None = None
) -> Iterator[Encounter]:
    """Yield ``count`` valid synthetic encounters; ``patients`` of them share each patient."""
    rng = random.Random(seed)
    vocab = terminology().vocabulary
    signs, muscles, sides = list(vocab("sign")), list(vocab("muscle")), list(vocab("side"))
    levels = list(vocab("spinal-level"))
    patient_count = patients or max(1, count // 3)
    for n in range(count):
        p = n % patient_count
        clinic = f"clinic-{p % 3}"
        tz = dt.timezone(dt.timedelta(hours=_ZONES[p % len(_ZONES)]))
        start = dt.datetime(2026, 1, 5, 8, tzinfo=tz) + dt.timedelta(
            days=n // patient_count * 7, minutes=rng.randrange(0, 9 * 60, 15)
        )
        end = start + dt.timedelta(minutes=rng.choice([20, 30, 45, 60]))
        level = rng.randrange(0, len(levels) - 1)
        segs = levels[level : level + rng.choice([1, 2])]
        findings = [
            _finding(rng, f"f{i}", signs, muscles, sides, segs) for i in range(rng.randrange(0, 6))
        ]
        sites = [_site(rng, f"s{i}", muscles, sides, segs) for i in range(rng.randrange(1, 6))]
        visit = rng.choice(["initial-assessment", "follow-up", "treatment-only"])
        data: dict[str, Any] = {
            "id": f"syn-{seed}-{n}",
            "clinic": {"id": clinic, "name": f"Synthetic IMS clinic {p % 3}"},
            "patient": {
                "id": f"syn-pt-{seed}-{p}",
                "identifiers": [
                    {
                        "system": "https://example.org/sid/phn",
                        "value": f"9{seed:03d}{p:06d}",
                        "kind": "health-card",
                    }
                ],
                "name": {"family": _FAMILY[p % len(_FAMILY)], "given": [_GIVEN[p % len(_GIVEN)]]},
                "birth_date": dt.date(1940 + p % 60, 1 + p % 12, 1 + p % 28),
                "sex": ["female", "male", "other", "unknown"][p % 4],
            },
            "practitioner": {
                "id": f"syn-pr-{p % 5}",
                "name": {"family": "Practitioner", "given": [f"P{p % 5}"]},
            },
            "start": start,
            "end": end,
            "visit_type": visit,
            "pain": [{"id": "p1", "timing": "before-treatment", "nrs": rng.randrange(0, 11)}],
            "treatment": {
                "consent": {"given": True, "at": start, "by": "patient"},
                "sites": sites,
                "adverse_events": (
                    [{"kind": "post-needling-soreness", "severity": "mild"}]
                    if rng.random() < 0.1
                    else []
                ),
            },
            "retracted": rng.random() < 0.02,
        }
        data["pain"].append({"id": "p2", "timing": "after-treatment", "nrs": rng.randrange(0, 11)})
        if visit != "treatment-only":
            data["assessment"] = {"findings": findings, "suspected_levels": segs}
        yield Encounter.model_validate(data)


def _finding(
    rng: random.Random,
    fid: str,
    signs: list[str],
    muscles: list[str],
    sides: list[str],
    segs: list[str],
) -> dict[str, Any]:
    sign = rng.choice(signs)
    present = rng.random() < 0.8
    finding: dict[str, Any] = {
        "id": fid,
        "sign": sign,
        "present": present,
        "grade": rng.randrange(1, 4) if present else 0,
        "muscle": rng.choice(muscles),
        "side": rng.choice(sides),
        "segments": segs,
    }
    if sign == "restricted-rom":
        finding |= {
            "joint": "lumbar spine",
            "movement": "flexion",
            "degrees": float(rng.randrange(10, 90)),
        }
    if sign == "trophedema":
        finding["test"] = rng.choice(["matchstick", "skin-rolling", "peau-d-orange"])
    return finding


def _site(
    rng: random.Random, sid: str, muscles: list[str], sides: list[str], segs: list[str]
) -> dict[str, Any]:
    length = rng.choice([25.0, 30.0, 40.0, 50.0, 60.0])
    site: dict[str, Any] = {
        "id": sid,
        "muscle": rng.choice(muscles),
        "side": rng.choice(sides),
        "role": rng.choice(["paraspinal", "peripheral"]),
        "segments": segs,
        "needle_diameter_mm": rng.choice([0.18, 0.2, 0.25, 0.3]),
        "needle_length_mm": length,
        "insertions": rng.randrange(1, 6),
        "max_depth_mm": float(rng.randrange(5, int(length))),
        "dwell_time_s": rng.randrange(0, 60),
        "response": rng.choice(["grasp", "twitch", "no-response"]),
    }
    if rng.random() < 0.15:
        site["electrical_stimulation"] = {"frequency_hz": 2.0, "intensity_ma": 3.0, "minutes": 10.0}
    return site


def synthetic_encounter() -> Encounter:
    """One small synthetic encounter with fresh, unique ids (for ``check --write-test``)."""
    tag = uuid.uuid4().hex[:12]
    (record,) = synthetic_encounters(1, seed=int(tag[:6], 16))
    clinic = record.clinic.model_copy(
        update={"id": f"write-test-{tag}", "name": "ims-fhir write test"}
    )
    patient = record.patient.model_copy(update={"id": f"write-test-{tag}", "identifiers": []})
    practitioner = record.practitioner.model_copy(update={"id": f"write-test-{tag}"})
    return record.model_copy(
        update={
            "id": f"write-test-{tag}",
            "clinic": clinic,
            "patient": patient,
            "practitioner": practitioner,
            "retracted": False,
        }
    )
