"""Hypothesis strategies for IMS encounter records, covering every field of the model."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

from hypothesis import strategies as st

from ims_fhir import Encounter, terminology

# A jurisdiction's registered system (mappings/Parameters-jurisdictional-identifiers.json): an
# identifier in it is a health card whatever kind it is given, typed JHN, and must round-trip.
ON_HEALTH_CARD = "https://fhir.infoway-inforoute.ca/NamingSystem/ca-on-patient-hcn"


def _codes(group: str) -> st.SearchStrategy[str]:
    return st.sampled_from(list(terminology().vocabulary(group)))


ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9.\-_]{0,11}", fullmatch=True)
text = (
    st.text(
        alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
        min_size=1,
        max_size=40,
    )
    .map(str.strip)
    .filter(bool)
)
offsets = st.integers(min_value=-12 * 4, max_value=14 * 4).map(
    lambda q: dt.timezone(dt.timedelta(minutes=15 * q))
)
starts = st.builds(
    lambda day, minute, tz: (
        dt.datetime(2020, 1, 1, tzinfo=tz) + dt.timedelta(days=day, minutes=minute)
    ),
    st.integers(0, 3000),
    st.integers(0, 24 * 60 - 1),
    offsets,
)
segments = st.lists(_codes("spinal-level"), max_size=3, unique=True)
mm = st.decimals(min_value="0.5", max_value="100", places=1).map(float)


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


def _prune(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


@st.composite
def findings(draw: st.DrawFn, fid: str) -> dict[str, Any]:
    sign = draw(_codes("sign"))
    present = draw(st.booleans())
    muscle = draw(_maybe(_codes("muscle")))
    region = draw(text) if muscle is None else draw(_maybe(text))
    data = {
        "id": fid,
        "sign": sign,
        "present": present,
        "grade": draw(_maybe(st.integers(0, 3))) if present else draw(st.sampled_from([None, 0])),
        "muscle": muscle,
        "region": region,
        "side": draw(_maybe(_codes("side"))),
        "segments": draw(segments),
        "note": draw(_maybe(text)),
    }
    if sign == "trophedema":
        data["test"] = draw(_maybe(_codes("trophedema-test")))
    if sign == "restricted-rom":
        data["joint"] = draw(text)
        data["movement"] = draw(text)
        data["degrees"] = draw(_maybe(st.integers(0, 180).map(float)))
    return _prune(data)


@st.composite
def sites(draw: st.DrawFn, sid: str) -> dict[str, Any]:
    length = draw(st.sampled_from([13.0, 25.0, 30.0, 40.0, 50.0, 60.0, 75.0]))
    return _prune(
        {
            "id": sid,
            "muscle": draw(_codes("muscle")),
            "side": draw(_codes("side")),
            "role": draw(_codes("site-role")),
            "segments": draw(segments),
            "needle_diameter_mm": draw(st.sampled_from([0.16, 0.18, 0.2, 0.25, 0.3])),
            "needle_length_mm": length,
            "insertions": draw(st.integers(1, 10)),
            "max_depth_mm": draw(mm.filter(lambda d: d <= length)),
            "dwell_time_s": draw(st.integers(0, 600)),
            "response": draw(_codes("needle-response")),
            "electrical_stimulation": draw(
                _maybe(
                    st.fixed_dictionaries(
                        {
                            "frequency_hz": st.sampled_from([2.0, 4.0, 10.0, 100.0]),
                            "intensity_ma": st.sampled_from([0.5, 2.0, 4.5, 10.0]),
                            "minutes": st.sampled_from([5.0, 10.0, 15.0]),
                        }
                    )
                )
            ),
        }
    )


def _unique_ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{n}" for n in range(1, count + 1)]


@st.composite
def encounters(draw: st.DrawFn) -> Encounter:
    start = draw(starts)
    end = start + dt.timedelta(minutes=draw(st.integers(5, 180)))
    visit = draw(_codes("visit-type"))
    has_assessment = visit != "treatment-only" and draw(st.booleans())
    has_treatment = not has_assessment or draw(st.booleans())
    clinic_id = draw(ids)
    data: dict[str, Any] = {
        "id": draw(ids),
        "clinic": _prune(
            {
                "id": clinic_id,
                "name": draw(text),
                "identifiers": draw(
                    st.lists(
                        st.fixed_dictionaries(
                            {"system": st.just("https://example.org/sid/facility"), "value": ids}
                        ),
                        max_size=1,
                    )
                ),
                "namespace": draw(_maybe(st.just(f"https://{clinic_id.lower()}.example/sid"))),
            }
        ),
        "patient": {
            "id": draw(ids),
            "identifiers": draw(
                st.lists(
                    st.fixed_dictionaries(
                        {
                            "system": st.sampled_from(
                                [
                                    "https://example.org/sid/phn",
                                    "urn:oid:2.16.840.1.113883.4.1",
                                    ON_HEALTH_CARD,
                                ]
                            ),
                            "value": ids,
                            "kind": st.sampled_from(["health-card", "other"]),
                        }
                    ),
                    max_size=2,
                )
            ),
            "name": {"family": draw(text), "given": draw(st.lists(text, max_size=2))},
            "birth_date": (start.date() - dt.timedelta(days=draw(st.integers(0, 36000)))),
            "sex": draw(st.sampled_from(["female", "male", "other", "unknown"])),
        },
        "practitioner": _prune(
            {
                "id": draw(ids),
                "name": {"family": draw(text), "given": draw(st.lists(text, max_size=1))},
                "licence": draw(
                    _maybe(
                        st.fixed_dictionaries(
                            {
                                "system": st.just("https://example.org/sid/licence"),
                                "value": ids,
                                "kind": st.just("licence"),
                            }
                        )
                    )
                ),
            }
        ),
        "start": start,
        "end": end,
        "visit_type": visit,
        "retracted": draw(st.booleans()),
        # When the record was made: at the end (not given), or some minutes to days later.
        "recorded": draw(
            _maybe(st.integers(0, 10**6).map(lambda s: end + dt.timedelta(seconds=s)))
        ),
    }
    if has_assessment:
        count = draw(st.integers(0, 4))
        data["assessment"] = _prune(
            {
                "findings": [draw(findings(fid)) for fid in _unique_ids("f", count)],
                "suspected_levels": draw(segments),
                "diagnosis": draw(
                    _maybe(
                        st.fixed_dictionaries(
                            {"code": _codes("diagnosis")}, optional={"note": text}
                        )
                    )
                ),
                "notes": draw(_maybe(text)),
            }
        )
    timings = ["before-treatment"] + (["after-treatment"] if has_treatment else [])
    data["pain"] = [
        _prune(
            {
                "id": pid,
                "timing": draw(st.sampled_from(timings)),
                "nrs": draw(st.integers(0, 10)),
                "location": draw(_maybe(text)),
            }
        )
        for pid in _unique_ids("p", draw(st.integers(0, 3)))
    ]
    if has_treatment:
        given = draw(st.booleans())
        consent = draw(
            _maybe(
                st.fixed_dictionaries(
                    {
                        "given": st.just(given),
                        "at": st.just(start),
                        "by": st.sampled_from(["patient", "Jo Parent (guardian)"]),
                    },
                    optional={"form_reference": ids},
                )
            )
        )
        may_needle = consent is None or consent["given"]
        count = draw(st.integers(0, 4)) if may_needle else 0
        data["treatment"] = _prune(
            {
                "consent": consent,
                "sites": [draw(sites(sid)) for sid in _unique_ids("s", count)],
                "adverse_events": draw(
                    st.lists(
                        st.fixed_dictionaries(
                            {
                                "kind": _codes("adverse-event").filter(
                                    lambda k: k != "other-event"
                                ),
                                "severity": _codes("severity"),
                            },
                            optional={"note": text},
                        ),
                        max_size=2,
                    )
                ),
                "notes": draw(_maybe(text)),
            }
        )
    return Encounter.model_validate(data)


def in_namespace(record: Encounter, namespace: str) -> Encounter:
    """``record`` as a clinic with ``namespace`` holds it, its people known to that clinic only.

    Tests that share one server keep apart by namespace. A health number or licence is matched
    across clinics (sync/matching.py), so those of fixtures and seeded synthetic records, which
    every test reuses, get a suffix unique to the namespace: each test's patients are its own.
    """
    suffix = "-" + hashlib.sha256(namespace.encode()).hexdigest()[:8]

    def own(identifier: Any) -> Any:
        return identifier.model_copy(update={"value": identifier.value + suffix})

    patient = record.patient.model_copy(
        update={"identifiers": [own(i) for i in record.patient.identifiers]}
    )
    practitioner = record.practitioner
    if practitioner.licence is not None:
        practitioner = practitioner.model_copy(update={"licence": own(practitioner.licence)})
    clinic = record.clinic.model_copy(update={"namespace": namespace})
    return record.model_copy(
        update={"clinic": clinic, "patient": patient, "practitioner": practitioner}
    )
