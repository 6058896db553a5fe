"""Independent attack on a1ce030 (signature normalisation copies only what changes), 24242a9
(value token fast path with "/"), 727d7c5 (push._literal per-type dispatch) and 3f9d519 (numbers
in a fixed decimal context). Both findings are fixed: a Mapping nested in a Mapping goes
straight to the object walk (no deeper a stack than before), and the decimal context of a
signature's numbers spells out every field (an application's DefaultContext, copied by the
context before, changed rounding, traps and exponent limits)."""

from __future__ import annotations

import inspect
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import ims_fhir
from ims_fhir.sync.signature import References, signature

from .test_equivalence import _reference_signature

_SRC = str(Path(ims_fhir.__file__).resolve().parents[1])


# -- a1ce030: nested Mappings -------------------------------------------------------------------


def test_signature_of_nested_mappings_is_computed_where_the_old_code_computed_it() -> None:
    """Attacks a1ce030's "byte-identical for every input": a non-dict Mapping (the type
    ``signature`` is declared to take) nested in another now costs three Python frames per level
    (``_object`` -> ``_leaf`` -> ``_normalised`` -> ``_object``) where the old code used two
    (``_normalised`` -> ``_leaf`` -> ``_normalised``). At 400 levels under a recursion limit of
    1000 free frames the old code returned a signature; the new one raises RecursionError.
    (Plain dict and list nesting holds: the new code uses no more frames there, fewer for lists.)
    """
    value: Any = {"reference": "urn:uuid:a"}
    for _ in range(400):
        value = types.MappingProxyType({"extension": value})
    resource = {"resourceType": "Basic", "extension": [value]}
    references = References()
    references.full_urls["urn:uuid:a"] = "http://example.org/x|a"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + 1000)
    try:
        old = _reference_signature(resource, references)  # the ims-fhir 0.2 normalisation
        new = signature(resource, references)
    finally:
        sys.setrecursionlimit(limit)
    assert new == old


# -- 3f9d519: the decimal context is fixed only in part -----------------------------------------

_SCRIPT = """
import decimal, sys
mode = sys.argv[1]
if mode == "rounding":
    decimal.DefaultContext.rounding = decimal.ROUND_HALF_UP
elif mode == "inexact-trapped":
    decimal.DefaultContext.traps[decimal.Inexact] = True
elif mode == "emax":
    decimal.DefaultContext.Emax = 100
from ims_fhir.sync.signature import References, signature
for value in (10**28 + 25, 1.5e300):
    try:
        print(signature({"resourceType": "Observation", "valueInteger": value}, References()))
    except Exception as exc:
        print("raises", type(exc).__name__)
"""


def _signatures(mode: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": _SRC, "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    return done.stdout.split()


@pytest.mark.parametrize("mode", ["rounding", "inexact-trapped", "emax"])
def test_signature_does_not_depend_on_the_applications_default_decimal_context(mode: str) -> None:
    """Attacks 3f9d519 ("a signature must not depend on [the application's decimal context]";
    "fixed ... Python's default, 28 digits"): ``Context(prec=28)`` fixes only the precision and
    copies rounding, traps, Emin and Emax from ``decimal.DefaultContext`` when signature.py is
    imported. An application that sets ``DefaultContext`` at start-up (the documented way to
    configure decimal for all threads, e.g. ``ROUND_HALF_UP`` for money) before importing
    ims-fhir gets another signature for an integer beyond 28 digits (rounded otherwise), or
    ``decimal.Inexact`` / ``decimal.Overflow`` raised from ``signature`` for ``10**28 + 25`` or
    ``1.5e300``, where a process with Python's defaults gets a signature.
    """
    assert _signatures(mode) == _signatures("default")
