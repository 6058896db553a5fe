#!/usr/bin/env python3
"""Write src/ims_fhir/client/blocking.py from client/asynchronous.py (``--check``: fail if stale).

The synchronous client is generated, never edited by hand, so the two cannot drift apart.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ims_fhir" / "client"
ASYNC, SYNC = SRC / "asynchronous.py", SRC / "blocking.py"

HEADER = (
    '"""The synchronous FHIR client.\n\n'
    "Generated from ``asynchronous.py`` by ``scripts/unasync.py``: edit that file, then run\n"
    "``python scripts/unasync.py``. A test fails when this file is stale.\n"
    '"""\n'
)

# Order matters: longer, more specific patterns first.
REPLACEMENTS = [
    (r"AsyncFhirClient", "FhirClient"),
    (r"httpx\.AsyncClient", "httpx.Client"),
    (r"httpx\.AsyncBaseTransport", "httpx.BaseTransport"),
    (r"AsyncIterator", "Iterator"),
    (r"\basync def ", "def "),
    (r"\basync for ", "for "),
    (r"\basync with ", "with "),
    (r"\bawait ", ""),
    (r"__aenter__", "__enter__"),
    (r"__aexit__", "__exit__"),
    (r"\baclose\b", "close"),
    (r"\baiter_bytes\b", "iter_bytes"),
    (r"\baiter_raw\b", "iter_raw"),
    (r"asyncio\.sleep", "time.sleep"),
    (r"import asyncio\n", ""),
]


def generate() -> str:
    """Return the text of the synchronous client."""
    text = ASYNC.read_text(encoding="utf-8")
    _, _, body = text.partition('"""\n\n')  # drop the module docstring
    body = body.split('"""', 1)[1] if body.startswith('"""') else body
    for pattern, replacement in REPLACEMENTS:
        body = re.sub(pattern, replacement, body)
    # Removing "await" shortens lines; the formatter gives them the layout it would keep.
    formatted = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--stdin-filename", str(SYNC), "-"],
        input=HEADER + "\n" + body,
        capture_output=True,
        text=True,
        check=True,
    )
    return formatted.stdout


def main() -> int:
    """Write the file, or with ``--check`` report whether it is current."""
    produced = generate()
    if "--check" in sys.argv[1:]:
        if SYNC.read_text(encoding="utf-8") != produced:
            print("src/ims_fhir/client/blocking.py is stale: run python scripts/unasync.py")
            return 1
        return 0
    SYNC.write_text(produced, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
