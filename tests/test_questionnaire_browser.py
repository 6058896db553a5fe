"""The IMS visit form in a real browser: LHC-Forms renders the Questionnaire in headless Chromium,
the test fills it in as a clinician would, and the renderer's QuestionnaireResponse becomes a
record that is pushed to the test HAPI server and pulled back unchanged.

Everything is local: Debian's chromium (``scripts/setup`` installs it), LHC-Forms from
``tests/browser/node_modules`` (``npm ci``, also by ``scripts/setup``), served to the page by
Playwright's request routing under ``http://forms.test``; every other request is refused, so
the form renders as it is, with no terminology server (each choice lists its own answers). The
form as filled in is saved as
``tests/hapi/target/questionnaire-form.png`` (the README's screenshot is a copy).
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from ims_fhir import Encounter, StateStore, from_questionnaire_response, pull_all, push
from ims_fhir.mapping.questionnaire import questionnaire

from .conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
LFORMS = ROOT / "tests" / "browser" / "node_modules" / "lforms" / "dist" / "lforms"
SCREENSHOT = ROOT / "tests" / "hapi" / "target" / "questionnaire-form.png"
ORIGIN = "forms.test"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>IMS visit</title>
<link href="/lforms/webcomponent/styles.css" rel="stylesheet">
<script src="/lforms/webcomponent/assets/lib/zone.min.js"></script>
<script src="/lforms/webcomponent/runtime.js" type="module"></script>
<script src="/lforms/webcomponent/polyfills.js" type="module"></script>
<script src="/lforms/webcomponent/main.js" type="module"></script>
<script src="/lforms/fhir/R4/lformsFHIR.min.js" defer></script>
</head><body><div id="form"></div>
<script>
window.addEventListener("load", async () => {
  try {
    const q = await (await fetch("/questionnaire.json")).json();
    await LForms.Util.addFormToPage(q, "form");
    window.formReady = true;
  } catch (e) { window.formError = String(e); }
});
</script></body></html>"""


@pytest.fixture(scope="module")
def page() -> Iterator[Any]:
    """A page of headless Debian Chromium showing the IMS visit form, rendered by LHC-Forms."""
    if not CHROMIUM.exists():
        pytest.fail("no /usr/bin/chromium: run scripts/setup (apt-get install chromium)")
    if not (LFORMS / "webcomponent" / "main.js").exists():
        pytest.fail("no LHC-Forms in tests/browser/node_modules: run scripts/setup (npm ci)")
    from playwright.sync_api import Route, sync_playwright

    form = questionnaire()
    refused: list[str] = []

    def serve(route: Route) -> None:
        url = urlsplit(route.request.url)
        if url.hostname != ORIGIN:
            refused.append(route.request.url)
            route.abort()
        elif url.path == "/index.html":
            route.fulfill(body=PAGE, content_type="text/html")
        elif url.path == "/questionnaire.json":
            route.fulfill(body=json.dumps(form), content_type="application/fhir+json")
        elif url.path.startswith("/lforms/") and ".." not in url.path:
            file = LFORMS / url.path.removeprefix("/lforms/")
            if file.is_file():
                route.fulfill(path=str(file))
            else:
                route.fulfill(status=404, body="")
        else:
            route.fulfill(status=404, body="")

    errors: list[str] = []
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = playwright.chromium.launch_persistent_context(
            profile,  # a fresh user-data-dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=ARGS,
            timezone_id="America/Vancouver",
            viewport={"width": 1000, "height": 800},
        )
        try:
            context.route("**/*", serve)
            view = context.new_page()
            view.set_default_timeout(15_000)
            view.on("pageerror", lambda exc: errors.append(str(exc)))
            view.goto(f"http://{ORIGIN}/index.html")
            view.wait_for_function("window.formReady || window.formError", timeout=60_000)
            assert view.evaluate("window.formError") is None, view.evaluate("window.formError")
            yield view
            assert errors == [], errors
            assert refused == [], f"the page tried to leave the machine: {refused}"
        finally:
            context.close()


def _field(page: Any, link_id: str, path: str) -> Any:
    """The input of item ``link_id`` at repetition path ``path`` (LHC-Forms ids: linkId/1/2/1)."""
    return page.locator(f'[id="{link_id}/{path}"]')


def _type(page: Any, link_id: str, path: str, value: str) -> None:
    _field(page, link_id, path).fill(value)


def _pick(page: Any, link_id: str, path: str, display: str) -> None:
    """Choose an answer as a clinician does: type it and click it in the list."""
    box = _field(page, link_id, path)
    box.click()
    box.press_sequentially(display, delay=5)
    page.locator("#lhc-tools-searchResults li", has_text=display).first.click()


def _yes(page: Any, link_id: str, path: str) -> None:
    page.locator(f'label[id="{link_id}/{path}|true"]').click()


def _when(page: Any, link_id: str, path: str, value: str) -> None:
    """A date (MM/DD/YYYY) or date and time (MM/DD/YYYY HH:MM:SS), typed into its picker."""
    box = page.locator(f'[id="{link_id}/{path}"] input').first
    box.fill(value)
    box.press("Enter")


def _fill_in(page: Any, clinic: str) -> None:
    _type(page, "id", "1/1", "v-browser-1")
    _when(page, "start", "1/1", "03/02/2026 09:30:00")
    _when(page, "end", "1/1", "03/02/2026 10:15:00")
    _pick(page, "visit_type", "1/1", "Initial assessment")
    _yes(page, "assessment-done", "1/1")
    _yes(page, "treatment-done", "1/1")
    _type(page, "clinic.id", "1/1", clinic)
    _type(page, "clinic.name", "1/1", "Harbour Physiotherapy")
    _type(page, "patient.id", "1/1", "pt-77")
    _type(page, "patient.name.family", "1/1", "Nakamura")
    _type(page, "patient.name.given", "1/1", "Aiko")
    _when(page, "patient.birth_date", "1/1", "05/14/1971")
    _pick(page, "patient.sex", "1/1", "Female")
    _type(page, "practitioner.id", "1/1", "pr-5")
    _type(page, "practitioner.name.family", "1/1", "Okafor")
    # The assessment: one finding.
    _pick(page, "assessment.findings.sign", "1/1/1", "Muscle shortening / taut band")
    _yes(page, "assessment.findings.present", "1/1/1")
    _type(page, "assessment.findings.grade", "1/1/1", "2")
    _pick(page, "assessment.findings.muscle", "1/1/1", "Multifidus")
    _pick(page, "assessment.findings.side", "1/1/1", "Left")
    _pick(page, "assessment.findings.segments", "1/1/1", "Spinal segment L5")
    # Pain before and after.
    _pick(page, "pain.timing", "1/1", "Before treatment")
    _type(page, "pain.nrs", "1/1", "7")
    _type(page, "pain.location", "1/1", "low back")
    page.locator('[id="add-pain/1"]').click()
    _pick(page, "pain.timing", "2/1", "After treatment")
    _type(page, "pain.nrs", "2/1", "3")
    # The session: consent, then two needled sites.
    _yes(page, "treatment.consent.given", "1/1/1")
    _when(page, "treatment.consent.at", "1/1/1", "03/02/2026 09:35:00")
    _type(page, "treatment.consent.by", "1/1/1", "patient")
    for n, (muscle, role, diameter, length, insertions, depth, response) in enumerate(
        [
            ("Multifidus", "Paraspinal site", "0.25", "40", "3", "30", "Grasp"),
            ("Gluteus medius", "Peripheral site", "0.3", "50", "2", "35", "Local twitch response"),
        ],
        1,
    ):
        if n > 1:
            page.locator('[id="add-treatment.sites/1/1"]').click()
        at = f"1/{n}/1"
        _pick(page, "treatment.sites.muscle", at, muscle)
        _pick(page, "treatment.sites.side", at, "Left")
        _pick(page, "treatment.sites.role", at, role)
        _type(page, "treatment.sites.needle_diameter_mm", at, diameter)
        _type(page, "treatment.sites.needle_length_mm", at, length)
        _type(page, "treatment.sites.insertions", at, insertions)
        _type(page, "treatment.sites.max_depth_mm", at, depth)
        _type(page, "treatment.sites.dwell_time_s", at, "0")
        _pick(page, "treatment.sites.response", at, response)


def _expected(clinic: str) -> Encounter:
    """The record the clinician charted, written out by hand."""
    vancouver = dt.timezone(dt.timedelta(hours=-8))

    def at(hour: int, minute: int) -> dt.datetime:
        return dt.datetime(2026, 3, 2, hour, minute, tzinfo=vancouver)

    site = {"side": "left", "dwell_time_s": 0}
    return Encounter.model_validate(
        {
            "id": "v-browser-1",
            "clinic": {"id": clinic, "name": "Harbour Physiotherapy"},
            "patient": {
                "id": "pt-77",
                "name": {"family": "Nakamura", "given": ["Aiko"]},
                "birth_date": "1971-05-14",
                "sex": "female",
            },
            "practitioner": {"id": "pr-5", "name": {"family": "Okafor"}},
            "start": at(9, 30),
            "end": at(10, 15),
            "visit_type": "initial-assessment",
            "assessment": {
                "findings": [
                    {
                        "id": "f1",
                        "sign": "muscle-shortening",
                        "present": True,
                        "grade": 2,
                        "muscle": "multifidus",
                        "side": "left",
                        "segments": ["L5"],
                    }
                ]
            },
            "pain": [
                {"id": "p1", "timing": "before-treatment", "nrs": 7, "location": "low back"},
                {"id": "p2", "timing": "after-treatment", "nrs": 3},
            ],
            "treatment": {
                "consent": {"given": True, "at": at(9, 35), "by": "patient"},
                "sites": [
                    site
                    | {
                        "id": "s1",
                        "muscle": "multifidus",
                        "role": "paraspinal",
                        "needle_diameter_mm": 0.25,
                        "needle_length_mm": 40,
                        "insertions": 3,
                        "max_depth_mm": 30,
                        "response": "grasp",
                    },
                    site
                    | {
                        "id": "s2",
                        "muscle": "gluteus-medius",
                        "role": "peripheral",
                        "needle_diameter_mm": 0.3,
                        "needle_length_mm": 50,
                        "insertions": 2,
                        "max_depth_mm": 35,
                        "response": "twitch",
                    },
                ],
            },
        }
    )


def test_a_clinician_fills_the_form_and_the_record_goes_to_hapi_and_back(
    page: Any, fhir_base_url: str, tmp_path: Path
) -> None:
    clinic = f"browser-{uuid.uuid4().hex[:10]}"  # this run's own records on a shared server
    _fill_in(page, clinic)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    # The renderer's own export (JSON text: the page's objects are not plain JSON).
    exported = json.loads(
        page.evaluate(
            "JSON.stringify(LForms.Util.getFormFHIRData("
            "'QuestionnaireResponse', 'R4', document.getElementById('form')))"
        )
    )
    assert exported["questionnaire"] == f"{questionnaire()['url']}|{questionnaire()['version']}"
    record = from_questionnaire_response(exported)
    assert record == _expected(clinic)

    with StateStore(tmp_path / "state.sqlite3") as state:
        (result,) = push([record], fhir_base_url, state)
    assert result.action == "created", result
    report = pull_all(fhir_base_url, clinic=clinic)
    # Exactly this record, equal. (On a server other tests share, the report may also list
    # errors of encounters they left broken on purpose; a broken one of ours would be missing.)
    assert report.records == [record], report.errors
