"""The codes of the record vocabulary as ``Literal`` types, for type checkers.

Generated from ``mappings/CodeSystem-ims-local.json`` by ``scripts/codes.py``: edit the
CodeSystem, then run ``python scripts/codes.py``. A test fails when this file is stale.
Validation reads the CodeSystem itself (``model._Vocabulary``); these only type.
"""

from typing import Literal

__all__ = [
    "AdverseEventCode",
    "DiagnosisCode",
    "MuscleCode",
    "NeedleResponseCode",
    "PainTimingCode",
    "SeverityCode",
    "SideCode",
    "SignCode",
    "SiteRoleCode",
    "SpinalLevelCode",
    "TrophedemaTestCode",
    "VisitTypeCode",
]


SignCode = Literal[
    "tenderness-motor-point",
    "hyperalgesia",
    "allodynia",
    "vasomotor",
    "sudomotor",
    "pilomotor",
    "trophedema",
    "local-hair-loss",
    "muscle-shortening",
    "restricted-rom",
    "pain-on-pulling",
]
"""Group ``sign``."""

MuscleCode = Literal[
    "multifidus",
    "vastus-lateralis",
    "gluteus-maximus",
    "quadratus-lumborum",
    "supraspinatus",
    "splenius-capitis",
    "semispinalis-capitis",
    "teres-major",
    "vastus-medialis",
    "gluteus-medius",
    "piriformis",
    "trapezius",
    "infraspinatus",
    "erector-spinae",
    "iliocostalis-lumborum",
    "longissimus-thoracis",
    "levator-scapulae",
    "rhomboid",
    "tibialis-anterior",
    "gastrocnemius",
    "psoas-major",
    "upper-trapezius",
    "deltoid",
    "biceps-brachii",
    "extensor-carpi-radialis",
    "peroneus-longus",
    "biceps-femoris",
    "tensor-fasciae-latae",
    "sternocleidomastoid",
    "scalenes",
]
"""Group ``muscle``."""

SideCode = Literal["left", "right", "bilateral", "midline"]
"""Group ``side``."""

SpinalLevelCode = Literal[
    "C1",
    "C2",
    "C3",
    "C4",
    "C5",
    "C6",
    "C7",
    "C8",
    "T1",
    "T2",
    "T3",
    "T4",
    "T5",
    "T6",
    "T7",
    "T8",
    "T9",
    "T10",
    "T11",
    "T12",
    "L1",
    "L2",
    "L3",
    "L4",
    "L5",
    "S1",
    "S2",
    "S3",
    "S4",
    "S5",
]
"""Group ``spinal-level``."""

TrophedemaTestCode = Literal["matchstick", "skin-rolling", "peau-d-orange"]
"""Group ``trophedema-test``."""

NeedleResponseCode = Literal["grasp", "twitch", "no-response"]
"""Group ``needle-response``."""

SiteRoleCode = Literal["paraspinal", "peripheral"]
"""Group ``site-role``."""

AdverseEventCode = Literal[
    "pneumothorax", "vasovagal", "bleeding", "haematoma", "post-needling-soreness", "other-event"
]
"""Group ``adverse-event``."""

SeverityCode = Literal["mild", "moderate", "severe"]
"""Group ``severity``."""

DiagnosisCode = Literal[
    "neuropathic-pain",
    "radiculopathy",
    "cervical-radiculopathy",
    "thoracic-radiculopathy",
    "lumbar-radiculopathy",
    "lumbosacral-radiculopathy",
    "sciatica",
    "chronic-pain-syndrome",
]
"""Group ``diagnosis``."""

VisitTypeCode = Literal["initial-assessment", "follow-up", "treatment-only"]
"""Group ``visit-type``."""

PainTimingCode = Literal["before-treatment", "after-treatment"]
"""Group ``pain-timing``."""
