"""An EMR integration with ims-fhir: build records, map, push, edit, push again, pull, errors.

What an EMR vendor writes around the library, typed as it would be: ``scripts/test`` runs
``mypy --strict`` over it (``tests/test_typing.py``), so a change to the library that breaks code
like this fails CI. Run it against a FHIR server (``tests/hapi/run`` starts one)::

    FHIR_BASE_URL=http://127.0.0.1:8080/fhir python examples/emr_integration.py
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import tempfile
from pathlib import Path

import httpx
from fhir.resources.R4B.bundle import Bundle

from ims_fhir import (
    Assessment,
    BearerAuth,
    ClientOptions,
    Clinic,
    ConfigurationError,
    Encounter,
    FhirError,
    Finding,
    HumanName,
    Identifier,
    NeedledSite,
    PainScore,
    Patient,
    Practitioner,
    PushResult,
    RecordError,
    RecordLocation,
    StateStore,
    TimeoutException,
    Treatment,
    from_fhir,
    pull_all,
    push,
    to_fhir,
    validate_record,
)

PACIFIC = dt.timezone(dt.timedelta(hours=-8))


def build_record(visit_id: str, *, nrs_after: int = 3) -> Encounter:
    """One IMS visit as the EMR holds it, built in code (lists and defaults as a user writes)."""
    start = dt.datetime(2026, 3, 2, 9, 0, tzinfo=PACIFIC)
    return Encounter(
        id=visit_id,
        clinic=Clinic(id="emr-example-clinic", name="EMR Example IMS Clinic"),
        patient=Patient(
            id="emr-pt-1",
            identifiers=[
                Identifier(system="https://fhir.example.ca/sid/bc-phn", value="9000000999")
            ],
            name=HumanName(family="Example", given=["Robin"]),
            birth_date=dt.date(1980, 5, 17),
            sex="female",
        ),
        practitioner=Practitioner(id="emr-pr-1", name=HumanName(family="Harding")),
        start=start,
        end=start + dt.timedelta(minutes=45),
        visit_type="initial-assessment",
        assessment=Assessment(
            findings=[
                Finding(
                    id="f1",
                    sign="tenderness-motor-point",
                    present=True,
                    grade=2,
                    muscle="multifidus",
                    side="bilateral",
                    segments=["L4-L5"],
                )
            ],
            suspected_levels=["L5"],
        ),
        pain=[
            PainScore(id="p1", timing="before-treatment", nrs=6),
            PainScore(id="p2", timing="after-treatment", nrs=nrs_after),
        ],
        treatment=Treatment(
            sites=[
                NeedledSite(
                    id="s1",
                    muscle="multifidus",
                    side="left",
                    role="paraspinal",
                    needle_diameter_mm=0.3,
                    needle_length_mm=50,
                    insertions=4,
                    max_depth_mm=35,
                    dwell_time_s=30,
                    response="grasp",
                    segments=["L5"],
                )
            ]
        ),
    )


def check_records(rows: list[dict[str, object]]) -> list[Encounter]:
    """Validate records the EMR exported as JSON; report the bad ones and keep the others."""
    good: list[Encounter] = []
    for index, row in enumerate(rows):
        checked = validate_record(row, RecordLocation("emr export", index=index))
        if isinstance(checked, RecordError):
            print(f"not sent: {checked}", file=sys.stderr)  # names the field and the reason
        else:
            good.append(checked.record)
    return good


def report(results: list[PushResult]) -> None:
    """Show each encounter's outcome; a conflict is left for a person to decide."""
    for result in results:
        if result.action == "conflict":
            print(f"{result.record_id}: changed on the server, not overwritten: {result.message}")
        else:
            print(f"{result.record_id}: {result.action} ({result.written} resources)")


def main(base_url: str) -> int:
    """Map, push, edit, push again and pull one visit; return a process exit code."""
    record = build_record("emr-visit-1")
    bundle: Bundle = to_fhir(record)
    assert from_fhir(bundle).records == [record]  # the mapping is lossless

    options: ClientOptions = {"timeout": httpx.Timeout(30.0, connect=5.0), "headers": {}}
    token = os.environ.get("FHIR_TOKEN")
    if token:
        options["auth"] = BearerAuth(token)
    try:
        with tempfile.TemporaryDirectory() as tmp, StateStore(Path(tmp) / "s.sqlite3") as state:
            bad = record.model_dump(mode="json") | {"pain": [{"id": "p", "timing": "x", "nrs": 11}]}
            records = check_records([record.model_dump(mode="json"), bad])
            report(push(records, base_url, state, client_options=options))
            edited = build_record("emr-visit-1", nrs_after=2)  # the clinician corrects a score
            report(push([edited], base_url, state, client_options=options, batch_size=10))
        pulled = pull_all(base_url, patient=None, client_options=options)
        mine = [r for r in pulled.records if r.id == edited.id]
        print(f"pulled {len(pulled.records)} records; ours has NRS {mine[0].pain[1].nrs}")
        for error in pulled.errors:
            print(f"could not map {error.resource}: {error.reason}", file=sys.stderr)
    except ConfigurationError as exc:  # a setting (or the state file) that cannot work
        print(f"setup: {exc}", file=sys.stderr)
        return 2
    except TimeoutException as exc:
        print(f"the server did not answer in time: {exc}", file=sys.stderr)
        return 2
    except FhirError as exc:  # the server refused or could not be reached
        print(f"server: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(os.environ.get("FHIR_BASE_URL", "http://127.0.0.1:8080/fhir")))
